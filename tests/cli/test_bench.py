"""`qeff-graph bench` on a tiny random llama: table, JSON and plot; IO binding = numpy feeds; the
peers (torch, plain ORT on the export; GenAI when installed) in the same run, each variant in its
own worker process. No wall-clock time is asserted: only rows, tokens and what was measured."""

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
    assert "variant | batch | ctx_len | KV cache   | weights MB | peak RSS MB | run RSS MB | prefill tok/s" in text
    assert "median of 2" in text
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["variant"], r["batch_size"], r["ctx_len"]) for r in rows] == [
        ("fp32", 1, 32), ("numpy", 1, 32), ("int8", 1, 32), ("fp32", 2, 32), ("numpy", 2, 32), ("int8", 2, 32)]
    assert {r["kv"] for r in rows} == {"fixed fp32"}
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


def test_bench_peers_side_by_side(tiny, tmp_path, capsys):
    """fp32 beside transformers (torch) and plain ORT on the unmodified export, at two ctx_lens and
    two batch sizes in one run: a row each, the same greedy tokens (all three are float32 greedy
    decoding of the same weights), each worker's memory measured; `peers` expands to the peers
    that can run here and lists the others as skipped (GenAI: no tokenizer; llama.cpp: no GGUF)."""
    hf, cache = tiny
    out = tmp_path / "bench"
    argv = ["bench", "-m", str(hf), "--variants", "fp32,peers", "--batch-sizes", "1,2", "--repeats", "2",
            "--prompt-tokens", "12", "--generation-len", "8", "--ctx-len", "32,64", "--prompt-len", "8",
            "--cache-dir", str(cache), "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "ctx_len 32,64" in text and "skipped llama.cpp: " in text
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert [(r["variant"], r["batch_size"], r["ctx_len"]) for r in rows] == [
        (v, b, c) for b in (1, 2) for c in (32, 64) for v in ("fp32", "torch", "ort-plain")]
    for r in rows:
        assert r["agree"] == 1.0, r  # exact peers: the same tokens as fp32
        assert r["peak_rss_mb"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_s"] > 0
        assert r["run_rss_mb"] is None or 0 < r["run_rss_mb"] <= r["peak_rss_mb"]
        assert r["kv"] == ("fixed fp32" if r["variant"] == "fp32" else "dynamic")
        assert len(r["decode_tok_s_rounds"]) == 2  # the samples of the median
    assert {r["decode_ratio"] for r in rows if r["variant"] == "fp32"} == {1.0}
    meta = data["meta"]
    assert meta["ctx_len"] == [32, 64] and meta["variants"] == ["fp32", "torch", "ort-plain"]
    assert meta["omp_wait_policy"] and meta["threads"] >= 1
    assert meta["agree_with"] == "fp32" and {"torch", "transformers", "onnxruntime"} <= set(meta["versions"])
    assert [s.split(":")[0] for s in meta["skipped"]] == ["genai-fp32", "genai-int4", "llama.cpp"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_genai_peer(tmp_path, capsys):
    """GenAI's fp32 model (built once into the bench cache) greedy-decodes what fp32 does; int4 runs."""
    pytest.importorskip("onnxruntime_genai")
    from tests.helpers import make_tiny_llama_with_tokenizer

    hf = make_tiny_llama_with_tokenizer(tmp_path / "tiny", ["the cat sat on the mat"])
    argv = ["bench", "-m", str(hf), "--variants", "fp32,genai-fp32,genai-int4", "--batch-sizes", "1,2",
            "--repeats", "1", "--prompt-tokens", "12", "--generation-len", "6", "--ctx-len", "32", "--prompt-len",
            "8", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "bench"), "--no-plot"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("fp32", "genai-fp32", "genai-int4")]
    assert all(r["agree"] == 1.0 and r["kv"] == "fixed fp32" for r in rows if r["variant"] == "genai-fp32")
    built = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("*/bench/genai-*"))
    assert built == ["fp32", "int4"]
    capsys.readouterr()
    assert main(argv) == 0  # the built models are reused
    assert "building the GenAI" not in capsys.readouterr().err


def test_bench_peer_refusals(tiny, tmp_path, capsys, monkeypatch):
    """A peer named explicitly that cannot run is refused before any work, in one line naming the fix."""
    from qeff_graph import bench_peers

    hf, _ = tiny
    o = ["-o", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")]
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "fp32,vllm", *o])
    assert "unknown variant(s) vllm" in err and "llama.cpp" in err and "peers" in err
    real = bench_peers.installed
    monkeypatch.setattr(bench_peers, "installed", lambda peer: peer != "llama.cpp" and real(peer))
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "fp32,llama.cpp", *o])
    assert err == "error: peer llama.cpp: not installed: pip install llama-cpp-python"
    monkeypatch.setattr(bench_peers, "installed", lambda peer: True)
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "llama.cpp", "--batch-sizes", "1", *o])
    assert "peer llama.cpp: needs a local GGUF file of the model" in err
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "genai-fp32", "--batch-sizes", "1", *o])
    assert "peer genai-fp32: the model in" in err and "has no tokenizer" in err
    err = fail_one_line(capsys, ["bench", "-m", str(hf), "--variants", "fp32,torch", "--prompt-set", "code-rewrite", *o])
    assert "peer torch: runs rows of equal length only" in err
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_bench_bad_options(tmp_path, capsys):
    err = fail_one_line(capsys, ["bench", "--variants", "fp32,fp8", "-o", str(tmp_path)])
    assert "unknown variant(s) fp8" in err
    err = fail_one_line(capsys, ["bench", "--ctx-len", "64", "-o", str(tmp_path)])
    assert "exceed --ctx-len 64" in err
    err = fail_one_line(capsys, ["bench", "--ctx-len", "2048,64", "-o", str(tmp_path)])
    assert "exceed --ctx-len 64" in err
    err = fail_one_line(capsys, ["bench", "--batch-sizes", "0", "-o", str(tmp_path)])
    assert "integers >= 1" in err


def test_bench_embed_peers_side_by_side(tmp_path, capsys):
    """--task embed on a tiny BERT: qeff-graph, its int8 program, plain ORT on the unmodified
    export and sentence-transformers embed the same texts; the same vectors (the int8 program's
    close), a row per system and batch."""
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
        (s, b) for b in (1, 4) for s in ("qeff-graph", "qeff-graph-int8", "ort-export", "sentence-transformers")]
    assert all(r["sentences_s"] > 0 for r in rows)
    exact = [r for r in rows if r["system"] != "qeff-graph-int8"]
    assert max(r["max_diff"] for r in exact) < 1e-4 and min(r["min_cos"] for r in exact) > 0.99999
    int8 = [r for r in rows if r["system"] == "qeff-graph-int8"]  # int8 MatMuls: close, not equal
    assert all(0.9 < r["min_cos"] < 1 for r in int8), int8
