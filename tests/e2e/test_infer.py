"""`qeff-graph infer` on the embedded SmolLM2: same text as transformers' greedy generate."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from qeff_graph import cache
from qeff_graph.cli import main
from qeff_graph.models import QEFFAutoModelForCausalLM

pytestmark = pytest.mark.slow


@pytest.fixture()
def seeded_cache(smollm2_export, tmp_path):
    """A cache root that already holds the session's SmolLM2 export (hard links)."""
    model = QEFFAutoModelForCausalLM.from_pretrained(cache_dir=tmp_path)
    target = cache.export_dir(model.slug, cache.options_hash(**model.identity), tmp_path)
    shutil.copytree(smollm2_export[2].out_dir, target, copy_function=os.link)
    return tmp_path


def test_infer_default_model_matches_hf(seeded_cache, smollm2_export, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_json = tmp_path / "out.json"
    argv = ["infer", "--prompt", "The capital of France is|My name is", "--generation-len", "32",
            "--cache_dir", str(seeded_cache), "--batch-size", "2", "--prompt-len", "4",
            "--output-json", str(out_json)]
    start = time.perf_counter()
    assert main(argv) == 0
    first = time.perf_counter() - start
    captured = capsys.readouterr()
    assert "export: reusing" in captured.err and "compile: optimizing" in captured.err
    result = json.loads(out_json.read_text())
    assert set(result) >= {"prompts", "generated_texts", "generated_ids", "perf"}

    directory, gguf, export = smollm2_export
    tok = AutoTokenizer.from_pretrained(export.out_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, dtype=torch.float32).eval()
    for prompt, text, ids in zip(result["prompts"], result["generated_texts"], result["generated_ids"]):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = ref[0, enc["input_ids"].shape[1]:].tolist()
        assert ids == expected
        assert f"=== prompt: {prompt!r}\n{text}" in captured.out
    assert "Paris" in result["generated_texts"][0]
    assert "TTFT:" in captured.out and "tok/s" in captured.out

    start = time.perf_counter()
    assert main(argv) == 0
    second = time.perf_counter() - start
    assert "compile: reusing" in capsys.readouterr().err
    print(f"infer: first (optimize + run) {first:.2f} s, second (cached) {second:.2f} s")
    assert json.loads(out_json.read_text())["generated_ids"] == result["generated_ids"]


def test_infer_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["infer", "--model-name", "no-such-org/no-such-model", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then one error line
    assert err[-1].startswith("error: ") and "not found" in err[-1]
    assert sum(line.startswith("error") for line in err) == 1 and "Traceback" not in "".join(err)
    assert main(["infer", "--batch-size", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
