"""The real SmolLM2-135M-Instruct (embedded default model): dynamo export → optimize → ORT.

Slow (the dynamo export of 30 layers takes ~1.5 min on 2 cores); still runs in CI.
"""

from __future__ import annotations

import numpy as np
import pytest

import qeff_graph as qg
from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.generation import generate_ids

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "My name is", "def fibonacci(n):\n    ",
           "Once upon a time, in a land far away, there lived a"]


def test_optimize_and_32_tokens_equal_hf(smollm2_export, smollm2_hf, tmp_path):
    from transformers import AutoTokenizer

    directory, gguf, export = smollm2_export
    onnx_path = export.onnx_path
    program = qg.optimize(onnx_path, tmp_path / "program", ctx_len=128, prompt_len=8, hardlink_data=True)
    copied = qg.optimize(onnx_path, tmp_path / "copied", ctx_len=128, prompt_len=8)  # default: data copied
    print(f"optimize SmolLM2-135M: {program.manifest['seconds']:.2f} s (data hard-linked), "
          f"{copied.manifest['seconds']:.2f} s (0.54 GB copied); speed is for `qeff-graph bench`")
    assert program.manifest["kv_cache"]["layers"] == 30 and program.manifest["kv_cache"]["kv_heads"] == 3

    tokenizer = AutoTokenizer.from_pretrained(onnx_path.parent)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    session = RetainedStateSession(program.path, batch_size=4, ctx_len=128)
    result = generate_ids(session, ids, prompt_len=8, generation_len=32,
                          eos_token_id=tokenizer.eos_token_id, return_logits=True)
    for i, prompt in enumerate(ids):
        expected, logits = smollm2_hf(prompt, 32, tokenizer.eos_token_id)
        assert result.generated_ids[i] == expected, (PROMPTS[i], tokenizer.decode(result.generated_ids[i]),
                                                      tokenizer.decode(expected))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(result.logits[i], logits))
        assert diff < 1e-4, diff
    assert sum(len(g) for g in result.generated_ids) >= 64
    assert "Paris" in tokenizer.decode(result.generated_ids[0])
