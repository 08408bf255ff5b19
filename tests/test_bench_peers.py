"""qeff_graph.bench_peers without models: the greedy loop's stop rule and perf, which peers
`peers` selects, the one-line refusals, and a worker's failure reaching the parent in one line."""

from __future__ import annotations

import numpy as np
import pytest

from qeff_graph import bench_peers
from qeff_graph.errors import QeffGraphError


def test_greedy_loop_stops_rows_at_eos_and_length():
    steps = iter([[5, 9], [2, 9], [7, 9], [8, 9]])  # row 0 meets EOS (2) at its third token
    out, perf = bench_peers.greedy_loop(lambda ids: np.array([4, 9]), lambda t: np.array(next(steps)),
                                        [[1, 2, 3], [1, 2, 3]], 4, eos=2)
    assert out == [[4, 5, 2], [9, 9, 9, 9]]
    assert perf["prompt_tokens"] == 6 and perf["generated_tokens"] == 7
    assert perf["ttft_s"] == perf["prefill_s"] >= 0 and perf["decode_tok_s"] > 0
    out, _ = bench_peers.greedy_loop(lambda ids: np.array([3]), lambda t: t + 1, [[1]], 3, eos=None)
    assert out == [[3, 4, 5]]
    out, perf = bench_peers.greedy_loop(lambda ids: np.array([3]), lambda t: t + 1, [[1]], 5, eos=None,
                                        done=lambda: True)  # the runtime finished the row itself
    assert out == [[3]] and perf["decode_tok_s"] is None


@pytest.fixture
def source(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    return bench_peers.Source.of(str(tmp_path), None)


def test_select_variants(source, monkeypatch):
    monkeypatch.setattr(bench_peers, "installed", lambda peer: peer in ("torch", "ort-plain", "llama.cpp"))
    ours = ("fp32", "int4")
    variants, skipped = bench_peers.select_variants(["fp32", "peers", "torch"], ours, source, [1], "text")
    assert variants == ["fp32", "torch", "ort-plain"]
    assert skipped == ["genai-fp32: not installed: pip install onnxruntime-genai",
                       "genai-int4: not installed: pip install onnxruntime-genai",
                       ("llama.cpp: needs a local GGUF file of the model: pass -m FILE.gguf (llama.cpp's "
                        "convert_hf_to_gguf.py makes one)")]
    with pytest.raises(QeffGraphError, match=r"^peer genai-int4: not installed: pip install onnxruntime-genai$"):
        bench_peers.select_variants(["fp32", "genai-int4"], ours, source, [1], "text")
    with pytest.raises(QeffGraphError, match="unknown variant"):
        bench_peers.select_variants(["fp32", "mlc"], ours, source, [1], "text")
    with pytest.raises(QeffGraphError, match="no variant to run"):
        bench_peers.select_variants(["peers"], ours, source, [1, 2], "code-rewrite")


def test_llama_cpp_refuses_batches(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(bench_peers, "installed", lambda peer: True)
    src = bench_peers.Source.of(str(gguf), None)
    assert src.gguf_path == gguf.resolve()
    assert bench_peers.peer_problem("llama.cpp", src, [1], "text") is None
    assert "use --batch-sizes 1" in bench_peers.peer_problem("llama.cpp", src, [1, 4], "text")


def test_peak_rss_is_measured():
    assert bench_peers._peak_rss_mb() > 1


def test_worker_failure_is_one_line(tmp_path):
    with pytest.raises(QeffGraphError) as info:
        bench_peers.Worker("ort-plain", {"onnx": str(tmp_path / "missing.onnx"), "threads": 1, "prompts": [[1]],
                                         "generation_len": 2, "eos": None})
    message = str(info.value)
    assert message.startswith("bench: ort-plain: ") and "\n" not in message
