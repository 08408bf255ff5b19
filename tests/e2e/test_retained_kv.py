"""Token-exact greedy decoding vs Hugging Face transformers for every (arch, exporter) pair.

Each export is optimized with the default pipeline, then run with ONNX Runtime: 4 prompts of
different lengths (one longer than two prefill chunks) in one padded batch, chunked prefill with
prompt_len 8, 12 new tokens, ctx_len 64 and 128 (the same program: ctx_len is a dynamic dim).
"""

from __future__ import annotations

import numpy as np
import pytest

import qeff_graph as qg
from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.generation import generate_ids
from tests.e2e.conftest import EXPORTERS, OPTIMUM, prompts

NEW_TOKENS = 12
PROMPT_LEN = 8


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("arch", list(OPTIMUM))
def test_token_exact_vs_hf(arch, exporter, exports, hf_reference, tmp_path):
    program = qg.optimize(exports(arch, exporter), tmp_path / "program", ctx_len=128,
                          prompt_len=PROMPT_LEN, batch_size=4)
    passes = {e["pass"]: e for e in program.manifest["pipeline"]}
    assert list(passes)[:4] == ["past-shape", "position-mask", "kv-retention", "last-token-logits"]
    # ort: every layer lowered, GroupQueryAttention where ort-gqa proved it, else the valid length only
    gqa, valid = passes["ort-gqa"]["stats"], passes["ort-valid-attention"]["stats"]
    assert gqa["lowered"] == gqa["layers"] or valid["lowered"] == valid["layers"], (gqa, valid)
    batch = prompts()
    expected = [hf_reference(arch, p, NEW_TOKENS) for p in batch]
    for ctx_len, batch_size in ((64, 4), (128, 4), (64, 2)):
        session = RetainedStateSession(program.path, batch_size=batch_size, ctx_len=ctx_len)
        assert session.inplace == set(session.cache_specs)  # every cache tensor updated in place
        assert session.rows_alone == bool(gqa["lowered"])
        result = generate_ids(session, batch, prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS,
                              return_logits=True)
        for i, (tokens, logits) in enumerate(expected):
            assert result.generated_ids[i] == tokens, (ctx_len, batch_size, i)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(result.logits[i], logits))
            assert diff < 1e-4, (ctx_len, batch_size, i, diff)


@pytest.mark.parametrize("lowering", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_lowering_with_numpy_feeds_agrees(arch, lowering, exports, hf_reference, tmp_path):
    """The portable graph (ort_lowering=0, what qaic gets), the valid-length lowering (1) and the
    GroupQueryAttention one (2) run with numpy feeds (no buffer sharing: GroupQueryAttention then
    copies the cache) give the same tokens as transformers, like the lowered program in place."""
    program = qg.optimize(exports(arch, "optimum"), tmp_path / "p", ctx_len=64, prompt_len=PROMPT_LEN,
                          batch_size=4, ort_lowering=lowering)
    names = [e["pass"] for e in program.manifest["pipeline"]]
    assert ("ort-valid-attention" in names) == (lowering > 0) and ("ort-gqa" in names) == (lowering == 2)
    batch = prompts()
    session = RetainedStateSession(program.path, batch_size=4, ctx_len=64, io_binding=False)
    assert session.inplace == set() and session.rows_alone == (lowering == 2)
    result = generate_ids(session, batch, prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS)
    assert result.generated_ids == [hf_reference(arch, p, NEW_TOKENS)[0] for p in batch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_stops_at_ctx_len(arch, exports, hf_reference, tmp_path):
    """A row that reaches ctx_len stops there (and the last cache slot is usable)."""
    program = qg.optimize(exports(arch, "optimum"), tmp_path / "p", ctx_len=32, prompt_len=8)
    prompt = prompts((20,), seed=3)[0]
    session = RetainedStateSession(program.path, batch_size=1, ctx_len=32)
    result = generate_ids(session, [prompt], prompt_len=8, generation_len=100)
    assert result.stop_reasons == ["ctx_len"]
    assert len(result.generated_ids[0]) == 32 - 20 + 1  # positions 20..31 filled, one more predicted
    tokens, _ = hf_reference(arch, prompt, len(result.generated_ids[0]))
    assert result.generated_ids[0] == tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuous_batching_token_exact(arch, exports, hf_reference, tmp_path):
    """5 prompts through 2 cache slots, refilled as slots free up, equal HF solo runs."""
    program = qg.optimize(exports(arch, "optimum"), tmp_path / "cb", ctx_len=64, prompt_len=PROMPT_LEN,
                          full_batch_size=2)
    assert "batch_index" in [i["name"] for i in program.manifest["io"]["inputs"]]
    batch = prompts((5, 19, 3, 10, 7), seed=5)
    expected = [hf_reference(arch, p, NEW_TOKENS)[0] for p in batch]
    # a pseudo-EOS taken from one reference makes rows stop, and slots free up, at different steps
    eos = expected[1][3]

    def until_eos(tokens):
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    session = RetainedStateSession(program.path, batch_size=2, ctx_len=64)
    assert session.continuous_batching
    result = generate_ids(session, batch, prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS,
                          eos_token_id=eos)
    assert len({len(g) for g in result.generated_ids}) > 1  # rows really finished at different times
    for i in range(len(batch)):
        assert result.generated_ids[i] == until_eos(expected[i]), i
    assert result.perf["full_batch_size"] == 2


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
def test_sliding_window_shorter_than_ctx_len(exporter, tmp_path):
    """Mistral with sliding_window=4 (< ctx_len 64): the window comes from config.json."""
    from tests.helpers import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 4
    model, onnx_path = _export(config, exporter, tmp_path)
    program = qg.optimize(onnx_path, tmp_path / "p", ctx_len=64, prompt_len=PROMPT_LEN, batch_size=4)
    assert program.manifest["options"]["sliding_window"] == 4
    batch = prompts()
    session = RetainedStateSession(program.path, batch_size=4, ctx_len=64)
    result = generate_ids(session, batch, prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS,
                          return_logits=True)
    _assert_matches_hf(model, batch, result)
    # with nothing configured the window is read off the export's own mask (the mask probe)
    bare = qg.optimize(onnx_path, tmp_path / "bare", ctx_len=64, prompt_len=PROMPT_LEN, batch_size=4,
                       sliding_window=None)
    mask = next(e for e in bare.manifest["pipeline"] if e["pass"] == "position-mask")
    assert mask["stats"]["windows"] == "4,4"
    again = generate_ids(RetainedStateSession(bare.path, batch_size=4, ctx_len=64), batch,
                         prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS)
    assert again.generated_ids == result.generated_ids
    # and the window really matters here: transformers without it generates other tokens
    from qeff_graph.program.verify import hf_greedy

    model.config.sliding_window = None
    assert [hf_greedy(model, p, NEW_TOKENS)[0] for p in batch] != result.generated_ids


def _export(config, exporter: str, tmp_path):
    """A seeded random model from ``config`` saved under tmp_path/hf, and its ONNX export."""
    import torch
    from transformers import AutoModelForCausalLM

    from qeff_graph.export import export_causal_lm

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "hf")
    kind, opset = EXPORTERS[exporter]
    return model, export_causal_lm(str(tmp_path / "hf"), tmp_path / "onnx", exporter=kind, opset=opset,
                                   progress=False).onnx_path


def _assert_matches_hf(model, batch, result):
    """Each prompt's tokens equal transformers' greedy ones (solo run), logits within 1e-4."""
    from qeff_graph.program.verify import hf_greedy

    for i, prompt in enumerate(batch):
        tokens, logits = hf_greedy(model, prompt, NEW_TOKENS)
        assert result.generated_ids[i] == tokens, i
        diff = max(float(np.abs(a - b).max()) for a, b in zip(result.logits[i], logits))
        assert diff < 1e-4, (i, diff)


def test_config_windows_per_layer(tmp_path):
    import json

    from qeff_graph.program import config_sliding_window

    def windows(config, ctx_len=64):
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, **config}))
        return config_sliding_window(tmp_path, ctx_len)

    assert windows({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}) == (8, None)
    assert windows({"sliding_window": 8, "layer_types": ["sliding_attention"] * 2}) == 8
    assert windows({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, 8) is None
    assert windows({"sliding_window": 8, "use_sliding_window": False}) is None
    assert windows({"window_size": 8}) == 8  # another key, same meaning


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
def test_mixed_sliding_and_full_layers(exporter, tmp_path):
    """Qwen2 with layer 1 sliding (window 4) and layer 0 full: one window per layer."""
    from tests.helpers import tiny_config

    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 1
    config.layer_types = ["full_attention", "sliding_attention"]
    model, onnx_path = _export(config, exporter, tmp_path)
    program = qg.optimize(onnx_path, tmp_path / "p", ctx_len=64, prompt_len=PROMPT_LEN, batch_size=4)
    assert program.manifest["options"]["sliding_window"] == [None, 4]
    batch = prompts()
    result = generate_ids(RetainedStateSession(program.path, batch_size=4, ctx_len=64), batch,
                          prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS, return_logits=True)
    every = qg.optimize(onnx_path, tmp_path / "all", ctx_len=64, prompt_len=PROMPT_LEN, batch_size=4,
                        sliding_window=4)
    all_slide = generate_ids(RetainedStateSession(every.path, batch_size=4, ctx_len=64), batch,
                             prompt_len=PROMPT_LEN, generation_len=NEW_TOKENS)
    assert all_slide.generated_ids != result.generated_ids  # the per-layer choice matters here
    _assert_matches_hf(model, batch, result)
