"""Artifacts appear whole or not at all, are checked before reuse, and never clobber user data:
atomic folders and files, stale temp sweeping, the cache's reuse checks and rebuilds, shared
weights, permissions, other filesystems, and the external-data location rules."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.artifact import BrokenArtifactError
from qeff_graph.cli import main
from qeff_graph.errors import QeffGraphError
from qeff_graph.fs import AtomicDir, clone_file, sweep_stale, write_atomic
from tests.e2e.conftest import OPTIMUM
from tests.helpers import make_tiny_hf, make_tiny_llama_with_tokenizer
from tests.robustness.test_kill import leftovers

LLAMA = OPTIMUM["llama"] / "optimum"


# ---- fs ------------------------------------------------------------------------------------------
def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "prog"
    with AtomicDir(target) as tmp:
        (tmp / "a").write_text("one")
    assert (target / "a").read_text() == "one"
    with pytest.raises(RuntimeError), AtomicDir(target) as tmp:
        (tmp / "a").write_text("two")
        (tmp / "b").write_text("two")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "one"
    with AtomicDir(target) as tmp:
        (tmp / "b").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced whole: no mix of old and new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog"]


def test_sweep_removes_only_dead_builds(tmp_path):
    """A temp folder whose builder is alive (lock held) stays; once it dies, the sweep removes it;
    folders that do not follow the temp-name pattern are never touched."""
    code = textwrap.dedent(f"""
        import sys, time
        from qeff_graph.fs import AtomicDir
        with AtomicDir({str(tmp_path / 'prog')!r}) as tmp:
            (tmp / "part").write_text("x")
            print(tmp, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        building = Path(proc.stdout.readline().strip())
        mine = tmp_path / ".prog.tmp-notours"  # the user's, not our pattern (8 hex digits)
        mine.mkdir()
        assert building.is_dir() and sweep_stale(tmp_path) == [] and building.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert sweep_stale(tmp_path) == [building] and not building.exists()
    assert mine.is_dir()


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("previous")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(QeffGraphError, match="No space left on device"):
        write_atomic(path, "new")
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_clone_file_keeps_holes_and_never_widens_the_mode(tmp_path):
    src = tmp_path / "w.data"
    with open(src, "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    src.chmod(0o600)
    dst = tmp_path / "copy.data"
    clone_file(src, dst)
    assert dst.read_bytes()[-3:] == b"end" and dst.stat().st_size == src.stat().st_size
    assert dst.stat().st_blocks * 512 < 1 << 20  # still sparse
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600


# ---- sources with external data ------------------------------------------------------------------
def _llama_with_external_data(directory: Path, mode: int = 0o644) -> Path:
    """The tiny Optimum llama with its weights in ``model.onnx.data`` (mode ``mode``)."""
    directory.mkdir(parents=True)
    model = onnx.load(str(LLAMA / "model.onnx"))
    onnx.save(model, str(directory / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=1024)
    (directory / "weights.bin").chmod(mode)
    for name in ("config.json", "generation_config.json"):
        (directory / name).write_bytes((LLAMA / name).read_bytes())
    return directory / "model.onnx"


def test_program_uses_its_own_data_names_and_keeps_restrictive_modes(tmp_path, capsys):
    source = _llama_with_external_data(tmp_path / "src", mode=0o600)
    out = tmp_path / "prog"
    assert main(["optimize", str(source), "-o", str(out), "--ctx-len", "32", "--prompt-len", "8", "-q"]) == 0
    assert (out / "model.onnx.data").is_file() and not (out / "weights.bin").exists()
    assert stat.S_IMODE((out / "model.onnx.data").stat().st_mode) == 0o600  # not widened to 0644
    loaded = onnx.load(str(out / "model.onnx"))  # a plain copy: onnx loads it, weights and all
    assert sum(t.ByteSize() for t in loaded.graph.initializer) > 0
    source.chmod(0o600)  # a private graph: nothing written from it is more open
    assert main(["optimize", str(source), "-o", str(out), "--ctx-len", "32", "--prompt-len", "8", "-q"]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert all(m & 0o077 == 0 for m in modes.values()), modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_output_on_another_filesystem(tmp_path):
    """-o on another filesystem (tmpfs): the data is copied and the folder still appears at once."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    source = _llama_with_external_data(tmp_path / "src")
    out = shm / f"qeff-graph-test-{os.getpid()}" / "prog"
    try:
        for extra in ([], ["--hardlink-data"]):  # a hard link cannot cross filesystems: copied
            assert main(["optimize", str(source), "-o", str(out), "--ctx-len", "32", "-q", *extra]) == 0
            assert (out / "model.onnx.data").read_bytes() == (tmp_path / "src" / "weights.bin").read_bytes()
            assert leftovers(out.parent) == []
    finally:
        import shutil

        shutil.rmtree(out.parent, ignore_errors=True)


def test_reading_refuses_data_outside_the_model_folder(tmp_path):
    import qeff_graph as qg

    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
                              [numpy_helper.from_array(np.ones(256, np.float32), "w")])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(helper.make_model(graph), model_dir / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    os.rename(model_dir / "m.data", tmp_path / "secret.data")
    proto = onnx.load(model_dir / "m.onnx", load_external_data=False)
    for location in ("../secret.data", str(tmp_path / "secret.data")):
        proto.graph.initializer[0].external_data[0].value = location
        onnx.save(proto, model_dir / "m.onnx")
        with pytest.raises(QeffGraphError, match="outside the model's folder"):
            qg.ir.load(model_dir / "m.onnx")
    (model_dir / "m.data").symlink_to(tmp_path / "secret.data")  # a symlink out is refused too
    proto.graph.initializer[0].external_data[0].value = "m.data"
    onnx.save(proto, model_dir / "m.onnx")
    with pytest.raises(QeffGraphError, match="outside the model's folder"):
        qg.ir.load(model_dir / "m.onnx")


# ---- the cache -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama", ["the cat sat on the mat"])


def _model(hf, cache, **kwargs):
    from qeff_graph.models import QEFFAutoModelForCausalLM

    return QEFFAutoModelForCausalLM.from_pretrained(str(hf), cache_dir=cache, exporter="torchscript", **kwargs)


def _generate(model) -> list[int]:
    model.compile(prefill_seq_len=4, ctx_len=32)
    return model.generate(prompts=["the cat sat"], generation_len=6).generated_ids[0]


def test_cache_rebuilds_a_broken_entry_with_a_notice(tiny_llama, tmp_path, caplog):
    from qeff_graph import progress

    cache = tmp_path / "cache"
    reference = _generate(_model(tiny_llama, cache))
    (program,) = cache.glob("*/qpc/*")
    (export,) = cache.glob("*/onnx/*")

    def run() -> tuple[list[int], str]:
        caplog.clear()
        with caplog.at_level("INFO", logger=progress.logger.name):
            progress.logger.propagate = True
            tokens = _generate(_model(tiny_llama, cache))
        return tokens, caplog.text

    onnx_bytes = (program / "model.onnx").read_bytes()
    (program / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])  # truncated
    tokens, said = run()
    assert tokens == reference and "compile: cached entry is broken" in said and "truncated" in said
    data = bytearray((export / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: the hash of a small file catches it
    (export / "model.onnx").write_bytes(bytes(data))
    tokens, said = run()
    assert tokens == reference and "export: cached entry is broken" in said and "SHA-256" in said
    (program / "qeff_graph.json").write_text("{not json")
    tokens, said = run()
    assert tokens == reference and "not valid JSON" in said
    assert leftovers(cache) == []


def test_big_files_are_hashed_only_with_verify_cache(tiny_llama, tmp_path, monkeypatch):
    import qeff_graph.artifact as artifact
    from qeff_graph.program import Program

    cache = tmp_path / "cache"
    _generate(_model(tiny_llama, cache))
    (program,) = cache.glob("*/qpc/*")
    monkeypatch.setattr(artifact, "CHEAP_HASH_BYTES", 0)  # every file counts as big
    data = bytearray((program / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (program / "model.onnx").write_bytes(bytes(data))
    Program.open(program)  # sizes agree: reused without reading it
    with pytest.raises(BrokenArtifactError, match="SHA-256"):
        Program.open(program, hashes=True)


def test_variants_share_the_export_weights(tmp_path, monkeypatch):
    """Programs of one export (ctx_len / batch variants) hard-link its weight file: a second
    variant costs its graph, not another copy of the weights."""
    import qeff_graph.export.exporter as exporter

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)  # weights in model.onnx.data
    hf = make_tiny_llama_with_tokenizer(tmp_path / "tiny", ["a b"])
    model = _model(hf, tmp_path / "cache")
    first = model.compile(prefill_seq_len=4, ctx_len=32)
    second = model.compile(prefill_seq_len=4, ctx_len=64, batch_size=2)
    export = model.onnx_path.parent
    data = export / "model.onnx.data"
    assert os.path.samefile(first / "model.onnx.data", data) and os.path.samefile(second / "model.onnx.data", data)
    assert data.stat().st_nlink == 3
    fp32 = model.generate(prompts=["a b"], generation_len=4).generated_ids[0]
    # matmul-nbits reads the weights through the hard-linked file (onnx would refuse it)
    q1 = model.compile(prefill_seq_len=4, ctx_len=64, batch_size=2, mxfp6_matmul=True)
    int8 = model.generate(prompts=["a b"], generation_len=4).generated_ids[0]
    assert int8[0] == fp32[0]
    # a quantized graph is built once: another shape of it links the first one's files
    q2 = model.compile(prefill_seq_len=4, ctx_len=32, mxfp6_matmul=True)
    graph_files = sorted(p.name for p in q1.iterdir() if p.name.startswith("model.onnx"))
    assert graph_files and sorted(p.name for p in q2.iterdir() if p.name.startswith("model.onnx")) == graph_files
    for name in graph_files:
        assert os.path.samefile(q1 / name, q2 / name), name
        assert not os.path.samefile(q2 / name, data)
    assert model.generate(prompts=["a b"], generation_len=4).generated_ids[0] == int8


def test_qeff_home_is_a_file(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("QEFF_HOME", str(home))
    assert main(["infer", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file, not a folder" in err and home.read_text() == "not a folder"


# ---- trust_remote_code -------------------------------------------------------------------------------
def _remote_code_model(directory: Path, marker: Path) -> Path:
    """A tiny llama whose config points at custom code (auto_map) that leaves a marker when run."""
    make_tiny_hf("llama", directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        from transformers import LlamaConfig
        pathlib.Path({str(marker)!r}).write_text("custom code ran")

        class EvilConfig(LlamaConfig):
            model_type = "evil-llama"
    """))
    (directory / "modeling_evil.py").write_text(textwrap.dedent("""
        from transformers import LlamaForCausalLM
        from .configuration_evil import EvilConfig

        class EvilForCausalLM(LlamaForCausalLM):
            config_class = EvilConfig
    """))
    return directory


def test_remote_code_runs_only_when_trusted(tmp_path):
    marker = tmp_path / "marker"
    hf = _remote_code_model(tmp_path / "evil", marker)
    code = textwrap.dedent(f"""
        from qeff_graph.errors import QeffGraphError
        from qeff_graph.export import load_hf_causal_lm
        try:
            load_hf_causal_lm({str(hf)!r})
        except QeffGraphError as exc:
            print("refused:", exc)
        import pathlib
        print("marker after refusal:", pathlib.Path({str(marker)!r}).exists())
        model, _ = load_hf_causal_lm({str(hf)!r}, trust_remote_code=True)
        print("loaded:", type(model).__name__)
    """)
    # a subprocess: transformers copies trusted code into HF_MODULES_CACHE, kept inside tmp_path
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("refused:") and "--trust-remote-code" in lines[0]
    assert lines[1] == "marker after refusal: False"
    assert lines[2] == "loaded: EvilForCausalLM" and marker.read_text() == "custom code ran"
