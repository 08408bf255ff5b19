"""`qeff-graph bench` on a tiny random llama: table, JSON and plot; IO binding = numpy feeds."""

from __future__ import annotations

import json

from qeff_graph.cli import main
from tests.cli import fail_one_line


def test_bench_table_json_plot(tmp_path, capsys):
    from tests.helpers import make_tiny_hf

    hf = make_tiny_hf("llama", tmp_path / "tiny-llama")
    out = tmp_path / "bench"
    argv = ["bench", "-m", str(hf), "--variants", "fp32,numpy,int8", "--batch-sizes", "1,2",
            "--repeats", "2", "--prompt-tokens", "12", "--generation-len", "6", "--ctx-len", "32",
            "--prompt-len", "8", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
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
