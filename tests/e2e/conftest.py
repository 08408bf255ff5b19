"""Fixtures for end-to-end tests: tiny HF models, their ONNX exports (cached per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "fixtures" / "tiny"
LOCAL = ROOT / "tests" / "fixtures" / "optimum"

# Where each arch's HF weights and Optimum export live.
OPTIMUM = {
    "llama": SHARED / "llama",
    "gpt2": SHARED / "gpt2",
    "phi3": LOCAL / "phi3",
    "mistral": LOCAL / "mistral",
}
EXPORTERS = {"optimum": None, "dynamo18": ("dynamo", 18), "dynamo23": ("dynamo", 23),
             "torchscript17": ("torchscript", 17)}


def hf_dir(arch: str) -> Path:
    path = OPTIMUM[arch] / "hf"
    if not path.exists():
        pytest.skip(f"fixture {path} is missing (shared/ not checked out beside the repo)")
    return path


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """exports(arch, exporter) -> path of the unmodified ONNX export (made once per session)."""
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, exporter: str) -> Path:
        key = (arch, exporter)
        if key not in made:
            if exporter == "optimum":
                made[key] = OPTIMUM[arch] / "optimum" / "model.onnx"
            else:
                from qeff_graph.export import export_causal_lm

                kind, opset = EXPORTERS[exporter]
                out = tmp_path_factory.mktemp(f"{arch}-{exporter}")
                made[key] = export_causal_lm(str(hf_dir(arch)), out / "onnx", exporter=kind,
                                             opset=opset, progress=False).onnx_path
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_reference():
    """hf_reference(arch, prompt_ids, n) -> (tokens, per-step logits) from HF greedy generate."""
    import torch
    from transformers import AutoModelForCausalLM

    models: dict[str, object] = {}
    memo: dict[tuple, tuple] = {}

    def get(arch: str, prompt: list[int], n: int):
        key = (arch, tuple(prompt), n)
        if key not in memo:
            if arch not in models:
                models[arch] = AutoModelForCausalLM.from_pretrained(hf_dir(arch), dtype=torch.float32).eval()
            with torch.no_grad():
                out = models[arch].generate(
                    torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                )
            memo[key] = (out.sequences[0, len(prompt):].tolist(), [s[0].numpy() for s in out.logits])
        return memo[key]

    return get


def prompts(lengths=(5, 19, 3, 10), seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 500, n).tolist() for n in lengths]
