"""`qeff-graph bench` on a tiny random llama: table, JSON and plot; IO binding = numpy feeds."""

from __future__ import annotations

import json

import pytest

from qeff_graph.cli import main
from tests.cli import fail_one_line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny llama dir, cache dir): the benches of this module share its export."""
    from tests.helpers import make_tiny_hf

    root = tmp_path_factory.mktemp("bench-tiny")
    return make_tiny_hf("llama", root / "tiny-llama"), root / "cache"


def test_bench_table_json_plot(tiny, tmp_path, capsys):
    hf, cache = tiny
    out = tmp_path / "bench"
    argv = ["bench", "-m", str(hf), "--variants", "fp32,numpy,int8", "--batch-sizes", "1,2",
            "--repeats", "2", "--prompt-tokens", "12", "--generation-len", "6", "--ctx-len", "32",
            "--prompt-len", "8", "--cache-dir", str(cache), "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "variant | batch | weights MB | prefill tok/s" in text and "median of 2" in text
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        ("fp32", 1), ("numpy", 1), ("int8", 1), ("fp32", 2), ("numpy", 2), ("int8", 2)]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    assert all(r["agree"] == 1.0 for r in rows if r["variant"] == "numpy")  # same program, same tokens
    assert {r["decode_ratio"] for r in rows if r["variant"] == "fp32"} == {1.0}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_speculative_variants(tiny, tmp_path, capsys):
    """spec-lookup / spec-int4: the fp32 program with a verify step; same tokens as fp32, their
    acceptance rate and tokens per target step in the table and the JSON."""
    hf, cache = tiny
    out = tmp_path / "bench"
    argv = ["bench", "-m", str(hf), "--variants", "fp32,spec-lookup,spec-int4", "--batch-sizes", "1,2",
            "--repeats", "1", "--prompt-tokens", "12", "--generation-len", "8", "--ctx-len", "32",
            "--prompt-len", "8", "--num-speculative-tokens", "3", "--cache-dir", str(cache),
            "-o", str(out), "--no-plot"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| accepted | tok/step" in text and "K=3" in text
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["num_speculative_tokens"] == 3
    rows = data["rows"]
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("fp32", "spec-lookup", "spec-int4")]
    for r in rows:
        if r["variant"] == "fp32":
            assert r["acceptance_rate"] is None and r["tokens_per_step"] is None
        else:
            assert r["agree"] == 1.0 and r["tokens_per_step"] >= 1  # verified: the fp32 tokens
    assert all(r["acceptance_rate"] is not None for r in rows if r["variant"] == "spec-int4")
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "spec-lookup", "--prompt-len", "4",
                                 "--num-speculative-tokens", "4", "-o", str(tmp_path / "b2")])
    assert "longer than --prompt-len 4" in err


def test_bench_bad_options(tmp_path, capsys):
    err = fail_one_line(capsys, ["bench", "--variants", "fp32,fp8", "-o", str(tmp_path)])
    assert "unknown variant(s) fp8" in err
    err = fail_one_line(capsys, ["bench", "--ctx-len", "64", "-o", str(tmp_path)])
    assert "exceed --ctx-len 64" in err
    err = fail_one_line(capsys, ["bench", "--batch-sizes", "0", "-o", str(tmp_path)])
    assert "integers >= 1" in err


def test_bench_embed_peers_side_by_side(tmp_path, capsys):
    """--task embed on a tiny BERT: qeff-graph, plain ORT on the unmodified export and
    sentence-transformers embed the same texts; same vectors, a row per system and batch."""
    import pytest

    pytest.importorskip("sentence_transformers")
    from tests.e2e.test_encoder import tiny_encoder
    from tests.helpers import save_tiny_tokenizer

    hf = tmp_path / "tiny-bert"
    tiny_encoder("bert", hf)
    save_tiny_tokenizer(hf, ["the cat sat on the mat"])
    out = tmp_path / "bench"
    assert main(["bench", "--task", "embed", "-m", str(hf), "--texts", "8", "--repeats", "1", "--batch-sizes", "1,4",
                 "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qeff-graph is ×" in text and "sentence-transformers" in text
    rows = json.loads((out / "bench-embed.json").read_text())["rows"]
    assert [(r["system"], r["batch_size"]) for r in rows] == [
        (s, b) for b in (1, 4) for s in ("qeff-graph", "ort-export", "sentence-transformers")]
    assert all(r["sentences_s"] > 0 for r in rows) and max(r["max_diff"] for r in rows) < 1e-4
