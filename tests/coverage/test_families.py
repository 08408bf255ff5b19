"""Coverage matrix: every model family × exporter, from export to token-exact generation.

For each tiny random model of ``tests.helpers.FAMILIES`` (hidden 64, 2 layers, vocab 512) and
each exporter (torch dynamo at opset 18, TorchScript at opset 17):

1. ``test_export_matches_hf``: the *unmodified* export (``qeff_graph.export.export_causal_lm``)
   run with ONNX Runtime as a dynamic-KV model — a left-padded batch of 4 prompts with its
   ``attention_mask`` prefilled from an empty cache, then decode steps feeding each step's
   ``present.*`` back as ``past_key_values.*`` — gives transformers' logits (same inputs, a
   ``DynamicCache``) within 1e-4 at every real position.
2. ``test_pipeline_token_exact``: the whole pipeline — ``qeff_graph.optimize`` (ctx_len 64,
   prompt_len 8, batch 4; the ort program, lowered in every layer), ``RetainedStateSession``, ``generate_ids`` (chunked prefill of a
   padded batch of 4) — gives transformers' greedy tokens exactly, logits within 1e-4.

Exports are made once per session (``conftest.py``). Nothing here is skipped or marked as
expected to fail: a family the toolchain does not handle yet fails with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.coverage.conftest import EXPORTERS
from tests.helpers import FAMILIES

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

PROMPTS = (5, 19, 3, 10)  # lengths: one longer than two prefill chunks of 8
DECODE_STEPS = 3
NEW_TOKENS = 10
PROMPT_LEN, CTX_LEN = 8, 64
TOL = 1e-4

# (family, exporter) pairs torch itself cannot export; test_torch_export_limits checks the one-line error
TORCH_CANNOT_EXPORT = {("cohere", "torchscript17"): "All tensors must have the same rank"}
CASES = [(f, e) for f in FAMILIES for e in EXPORTERS if (f, e) not in TORCH_CANNOT_EXPORT]
IDS = [f"{f}-{e}" for f, e in CASES]


def prompts(lengths=PROMPTS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, n).tolist() for n in lengths]


def _left_padded(batch: list[list[int]]):
    """ids, attention_mask, position_ids of a left-padded batch (positions as HF generate sets them)."""
    width = max(map(len, batch))
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for r, p in enumerate(batch):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return ids, mask, pos


def _hf_step(model, cache, ids, mask, pos):
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True)
    return out.logits.numpy(), out.past_key_values


@pytest.mark.parametrize("family,exporter", CASES, ids=IDS)
def test_export_matches_hf(family, exporter, family_model, family_export):
    res = family_export(family, exporter)
    model = family_model(family)
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    ids, mask, pos = _left_padded(prompts())
    batch = ids.shape[0]
    past = {f"past_key_values.{i}.{kv}": np.zeros((batch, res.num_kv_heads, 0, res.head_dim), np.float32)
            for i in range(res.num_layers) for kv in ("key", "value")}
    cache = None
    for step in range(1 + DECODE_STEPS):
        got = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
        want, cache = _hf_step(model, cache, ids, mask, pos)
        real = mask[:, -ids.shape[1]:].astype(bool)  # logits of pad positions are not compared
        diff = float(np.abs(got[0][real] - want[real]).max())
        assert diff < TOL, f"step {step}: logits differ from transformers by {diff:.2e}"
        present = dict(zip([o.name for o in sess.get_outputs()], got))
        past = {f"past_key_values.{i}.{kv}": present[f"present.{i}.{kv}"]
                for i in range(res.num_layers) for kv in ("key", "value")}
        ids = want[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)  # transformers' greedy next token
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1


# families whose rotary ort-gqa puts in the kernel: rotate-half over the whole head, partial (phi,
# gpt_neox, stablelm, persimmon: the first 16 of 32), interleaved pairs (gptj, partial too; cohere;
# codegen's 8 of 32, widened to the kernel's 16 with identity pairs), behind a fused Q/K/V
# projection (gpt_neox, falcon*, persimmon) or q/k norms (qwen3, gemma3, olmo2)
ROTARY_IN_KERNEL = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "starcoder2", "gemma", "gemma2", "phi",
                    "gpt_neox", "gptj", "falcon", "falcon_mqa", "falcon_new", "qwen3", "gemma3", "olmo2", "granite",
                    "cohere", "stablelm", "persimmon", "codegen")
PAIRED_ROTARY = ("gptj", "cohere", "codegen")  # rotaries in interleaved pairs


@pytest.mark.parametrize("family,exporter", CASES, ids=IDS)
def test_pipeline_token_exact(family, exporter, family_model, family_export, tmp_path):
    import qeff_graph as qg
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import generate_ids

    res = family_export(family, exporter)
    model = family_model(family)
    program = qg.optimize(res.onnx_path, tmp_path / "program", ctx_len=CTX_LEN, prompt_len=PROMPT_LEN, batch_size=4)
    stats = {e["pass"]: e["stats"] for e in program.manifest["pipeline"]}
    gqa, valid = stats["ort-gqa"], stats["ort-valid-attention"]
    assert valid["lowered"] == 0, valid
    # every family: GroupQueryAttention (ALiBi as its attention_bias; bloom's heads folded into the batch)
    assert gqa["lowered"] == gqa["layers"], gqa
    if family in ROTARY_IN_KERNEL and gqa["lowered"]:  # the kernel applies the rotary, in gptj's pairs
        assert gqa["rotary"] == gqa["layers"], gqa
        graph = onnx.load(program.path / "model.onnx", load_external_data=False).graph
        kernels = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        pairs = family in PAIRED_ROTARY
        assert {onnx.helper.get_node_attr_value(n, "rotary_interleaved") for n in kernels} == {int(pairs)}
    else:  # no rotary
        assert gqa.get("rotary", 0) == 0, gqa
    session = RetainedStateSession(program.path, batch_size=4, ctx_len=CTX_LEN)
    batch = prompts()
    result = generate_ids(session, batch, prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS, return_logits=True)
    for i, prompt in enumerate(batch):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = ref.sequences[0, len(prompt):].tolist()
        diff = max(float(np.abs(a - b[0].numpy()).max()) for a, b in zip(result.logits[i], ref.logits))
        assert result.generated_ids[i] == tokens, f"prompt {i}: tokens differ (logits differ by {diff:.2e})"
        assert diff < TOL, f"prompt {i}: logits differ from transformers by {diff:.2e}"


@pytest.mark.parametrize("family,exporter", sorted(TORCH_CANNOT_EXPORT))
def test_torch_export_limits(family, exporter, family_export):
    """What torch cannot export fails in one line that names the exporter to use instead."""
    from qeff_graph.errors import QeffGraphError

    with pytest.raises(QeffGraphError, match=TORCH_CANNOT_EXPORT[(family, exporter)]) as info:
        family_export(family, exporter)
    assert "\n" not in str(info.value) and "try exporter='dynamo'" in str(info.value)


ALIBI = {"falcon_alibi": ("transformers.models.falcon.modeling_falcon", "build_alibi_tensor"),
         "bloom": ("transformers.models.bloom.modeling_bloom", "_get_alibi_slopes"),
         "mpt": ("transformers.models.mpt.modeling_mpt", "build_mpt_alibi_tensor")}


@pytest.mark.parametrize("family", list(ALIBI))
def test_alibi_bias_changes_tokens(family, family_model, monkeypatch):
    """The ALiBi models of the matrix are sized so that a graph that lost the bias (it lives in
    the attention mask: a mask rewrite can drop it) generates other tokens, not only other logits."""
    import importlib

    model = family_model(family)
    module_name, name = ALIBI[family]
    owner = importlib.import_module(module_name)
    if family == "mpt":
        owner = owner.MptModel
    original = getattr(owner, name)

    def greedy(prompt):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    with_bias = [greedy(p) for p in prompts()]
    if family == "mpt":
        monkeypatch.setattr(owner, name, lambda self, *a, **k: torch.zeros_like(original(self, *a, **k)))
    else:
        monkeypatch.setattr(owner, name, lambda *a, **k: torch.zeros_like(original(*a, **k)))
    without = [greedy(p) for p in prompts()]
    assert with_bias != without
