"""Weight quantization on the real SmolLM2-135M-Instruct (a Q4_1 GGUF, its Q8_0 embedding tied to
the LM head): ``--weight-bits 4`` carries the GGUF's own blocks, ``--weight-bits 8`` quantizes
the float weights; both are checked against the fp32 program (greedy tokens) and the int4
program's weights against the GGUF itself, bit for bit.

Slow (reuses the session's SmolLM2 export; builds three programs, decodes 6 prompts x 64
tokens each); still runs in CI.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import qeff_graph as qg
from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.generation import generate_ids
from qeff_graph.program.spec import WEIGHT_SCHEME
from tests.passes.nbits import effective_weights

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France and why is it famous?", "Write a short poem about the sea.",
           "How do I make a cup of tea?", "Explain photosynthesis to a ten-year-old.",
           "Give me three tips for a job interview.", "Write a Python function that reverses a string."]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def programs(smollm2_export, tmp_path_factory):
    """fp32, int4 and int8 programs of the export, batch 6 (one row per prompt)."""
    _, _, export = smollm2_export
    out = tmp_path_factory.mktemp("quantized")
    return {name: qg.optimize(export.onnx_path, out / name, ctx_len=128, prompt_len=32, batch_size=6,
                              weight_bits=bits, hardlink_data=True)
            for name, bits in (("fp32", None), ("int4", 4), ("int8", 8))}


def _row_set(wt: np.ndarray) -> str:
    """The rows of ``[N, K]`` as a set (order-free: transformers permutes llama's q/k rows)."""
    rows = sorted(hashlib.sha256(r.tobytes()).digest() for r in np.ascontiguousarray(wt, np.float32))
    return hashlib.sha256(b"".join(rows)).hexdigest()


def test_int4_program_computes_with_the_gguf_weights_exactly(programs, smollm2_export):
    import gguf

    from qeff_graph import ir as qir

    directory, name, _ = smollm2_export
    program = programs["int4"]
    path = directory / name
    assert program.manifest["source"]["gguf"] == str(path.resolve())
    (log,) = [e for e in program.manifest["pipeline"] if e["pass"] == "matmul-nbits"]
    assert log["params"]["gguf"] == str(path.resolve())
    assert {k: log["stats"][k] for k in ("quantized", "carried", "requantized", "gathers")} == {
        "quantized": 211, "carried": 211, "requantized": 0, "gathers": 1}  # 30 x 7 + the tied head
    assert program.manifest["options"]["weight_scheme"] == WEIGHT_SCHEME == 6

    model = qir.load(program.onnx_path)
    weights = effective_weights(model)  # from the program's own B / scales / zero points / minima
    assert len(weights) == 211
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            k = int(t.shape[0])
            tensors[_row_set(np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(-1, k))] = \
                (t.name, t.tensor_type.name)
    found = {name: tensors.get(_row_set(w.T)) for name, w in weights.items()}
    assert None not in found.values(), [n for n, t in found.items() if t is None]
    assert {t for _, t in found.values()} == {"Q4_1", "Q8_0"}
    assert sum(t == "Q8_0" for _, t in found.values()) == 1  # the LM head: token_embd, tied
    # the embedding reads the head's blocks (GatherBlockQuantized on the same B); Q8_0 runs as
    # two 4-bit halves (high and low nibbles), each a MatMulNBits over the same input, added
    gbqs = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["N"].value == 49152]
    assert len(heads) == len(gbqs) == 2 and heads[0].inputs[0] is heads[1].inputs[0]
    assert {g.inputs[0].name for g in gbqs} == {h.inputs[1].name for h in heads}
    assert program.manifest["weight_bytes"] < 0.25 * programs["fp32"].manifest["weight_bytes"]


def _agreement(got: list[list[int]], ref: list[list[int]]) -> list[float]:
    shares = []
    for a, b in zip(got, ref):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        shares.append(same / len(b))
    return shares


def test_quantized_programs_agree_with_fp32(programs, smollm2_export):
    """Share of 64 greedy tokens before the first difference from fp32, 6 chat prompts: int4 (the
    GGUF's blocks) >= 0.9, int8 >= 0.95 (accuracy_level 1: float compute)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_export[2].out_dir)
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"]
           for p in PROMPTS]
    tokens = {}
    for name, program in programs.items():
        session = RetainedStateSession(program.path, batch_size=6, ctx_len=128)
        tokens[name] = generate_ids(session, ids, prompt_len=32, generation_len=NEW_TOKENS).generated_ids
    int4, int8 = _agreement(tokens["int4"], tokens["fp32"]), _agreement(tokens["int8"], tokens["fp32"])
    print(f"agreement with fp32 over {len(PROMPTS)} prompts x {NEW_TOKENS} tokens: int4 {np.mean(int4):.3f} "
          f"{int4}, int8 {np.mean(int8):.3f} {int8}")
    assert np.mean(int4) >= 0.9 and np.mean(int8) >= 0.95
