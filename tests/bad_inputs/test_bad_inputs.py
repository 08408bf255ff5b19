"""Bad inputs for every ``qeff-graph`` command, table-driven.

The product promise checked for each :class:`Case`: a user error

* exits with code 2;
* prints at most :data:`MAX_STDERR_LINES` lines on stderr, the last one ``error: ...`` (holding
  the case's expected text) and no other line starting with ``error``;
* prints no traceback (stdout or stderr);
* leaves nothing behind and changes nothing: every path under the test's work folder (the
  ``QEFF_HOME`` cache included) has the same bytes and mode before and after the run, and no
  path appears or disappears (no ``.<name>.tmp-XXXXXXXX`` folders, no half-written outputs).

Each case's ``setup(work, fx)`` builds what it needs inside ``work`` (copies of the shared
fixtures, never the originals) and returns the argv (or a :class:`Run` with env vars, a working
directory and attribute patches). The CLI runs in-process with ``QEFF_HOME`` inside ``work``
and ``HF_HUB_OFFLINE=1``; nothing here exports a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from tests.e2e.conftest import OPTIMUM
from tests.helpers import make_tiny_hf, run_cli

MAX_STDERR_LINES = 4
LLAMA_DIR = OPTIMUM["llama"] / "optimum"  # model.onnx + config.json + generation_config.json
LLAMA = LLAMA_DIR / "model.onnx"
NO_QAIC_PATH = "/nonexistent-qeff-graph-test-path"  # PATH without qaic-exec


# ---- the table ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What a case runs: argv, extra env vars, the working directory (default: the work folder)
    and ``{"module.attr": value}`` patches applied for the run."""

    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: Path | None = None
    patch: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, Fixtures], Run | list[str]]  # builds inside the work folder
    expect: str  # substring of the final `error: ` line
    marks: tuple = ()
    check: Callable[[Path], None] | None = None  # more assertions on the work folder afterwards

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


@dataclasses.dataclass(frozen=True)
class Fixtures:
    """Read-only templates made once per module; cases copy them into their work folder."""

    program: Path  # optimize LLAMA --ctx-len 32 --prompt-len 8 (model.onnx inline, no data file)
    ext_export: Path  # LLAMA re-saved with its weights in model.onnx.data (+ config files)
    ext_program: Path  # optimize ext_export (model.onnx + model.onnx.data)
    tiny_hf: Path  # make_tiny_hf("llama")


# ---- helpers for setups -------------------------------------------------------------------
def copy_dir(src: Path, dst: Path) -> Path:
    """Copy the regular files of ``src`` (recursively) into ``dst`` with ordinary modes (the
    shared fixtures are read-only)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_dir():
            copy_dir(p, dst / p.name)
        elif p.is_file():
            shutil.copyfile(p, dst / p.name)
    return dst


def export_copy(work: Path, name: str = "export") -> Path:
    """A copy of the tiny Optimum llama export (folder); returns the .onnx path."""
    return copy_dir(LLAMA_DIR, work / name) / "model.onnx"


def program_copy(work: Path, fx: Fixtures, name: str = "prog") -> Path:
    return copy_dir(fx.program, work / name)


def hf_copy(work: Path, fx: Fixtures, name: str = "tiny-llama") -> Path:
    return copy_dir(fx.tiny_hf, work / name)


def manifest_files(program: Path) -> dict:
    return json.loads((program / "qeff_graph.json").read_text())["files"]


def quiet_main(argv: list[str]) -> None:
    """Run the CLI for a setup step; it must succeed."""
    rc, _, out, err = run_cli(argv)
    assert rc == 0, f"setup command {argv} failed: {out}{err}"


def external_onnx(folder: Path, location: str) -> Path:
    """A small valid ONNX graph whose initializer's external data ``location`` is rewritten to
    ``location`` (saved with onnx.save(save_as_external_data=True) first)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    (entry,) = [e for e in proto.graph.initializer[0].external_data if e.key == "location"]
    entry.value = location
    path.write_bytes(proto.SerializeToString())
    return path


def no_kv_onnx(path: Path) -> Path:
    """A valid ONNX graph without any KV cache IO."""
    import onnx
    from onnx import TensorProto, helper

    path.parent.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


EVIL_CONFIG = '''\
from pathlib import Path
Path({marker!r}).write_text("configuration_evil.py was imported")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
'''

EVIL_MODELING = '''\
from pathlib import Path
Path({marker!r}).write_text("modeling_evil.py was imported")
from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def evil_model(work: Path, fx: Fixtures) -> tuple[Path, Path]:
    """A tiny HF dir whose config.json maps AutoConfig/AutoModelForCausalLM to Python files
    shipped in the folder (``auto_map``, a ``model_type`` transformers does not know, so only
    the remote code can load it); importing either file writes ``marker``."""
    model = hf_copy(work, fx, "evil-model")
    marker = work / "REMOTE_CODE_RAN"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(config, indent=2))
    (model / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (model / "modeling_evil.py").write_text(EVIL_MODELING.format(marker=str(marker)))
    return model, marker


def qaic_program(work: Path, fx: Fixtures) -> Path:
    """The tiny program compiled for qaic without the SDK (only compile.sh is written)."""
    src = program_copy(work, fx, "prog-src")
    out = work / "prog-qaic"
    with mock.patch("qeff_graph.backends.qaic.command.SDK_QAIC_EXEC", str(work / "no-sdk" / "qaic-exec")), \
            mock.patch.dict(os.environ, {"PATH": NO_QAIC_PATH}):
        quiet_main(["compile", str(src), "-o", str(out), "--backend", "qaic", "-q"])
    assert json.loads((out / "qeff_graph.json").read_text())["backend"]["executed"] is False
    return out


def flip_same_size(path: Path) -> None:
    """Change one byte of ``path`` keeping its size (a JSON file stays valid: a space → tab)."""
    data = bytearray(path.read_bytes())
    i = data.index(b" ")
    data[i:i + 1] = b"\t"
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- setups -------------------------------------------------------------------------------
# optimize
def opt_out_foreign(w, fx):
    src = export_copy(w)
    out = w / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(os.urandom(64))
    os.chmod(out / "notes.txt", 0o600)
    return ["optimize", str(src), "-o", str(out), "--ctx-len", "32", "--prompt-len", "8"]


def opt_out_holds_source_cd(w, fx):
    src = export_copy(w, "model-dir")
    return Run(["optimize", "model.onnx", "-o", ".", "--ctx-len", "32", "--prompt-len", "8"], cwd=src.parent)


def opt_out_holds_source_abs(w, fx):
    src = export_copy(w, "model-dir")
    return ["optimize", str(src), "-o", str(src.parent)]


def opt_source_inside_program_out(w, fx):
    prog = program_copy(w, fx)  # an earlier program as -o (replaceable) ...
    shutil.copyfile(LLAMA, prog / "export.onnx")  # ... that holds the source graph
    return ["optimize", str(prog / "export.onnx"), "-o", str(prog)]


def opt_out_symlink(w, fx):
    src = export_copy(w)
    prog = program_copy(w, fx)
    (w / "link").symlink_to(prog, target_is_directory=True)
    return ["optimize", str(src), "-o", str(w / "link")]


def opt_out_is_file(w, fx):
    src = export_copy(w)
    (w / "out.txt").write_text("not a folder\n")
    return ["optimize", str(src), "-o", str(w / "out.txt")]


def opt_program_onnx(w, fx):
    prog = program_copy(w, fx)
    return ["optimize", str(prog / "model.onnx"), "-o", str(w / "again")]


def opt_program_dir(w, fx):
    prog = program_copy(w, fx)
    return ["optimize", str(prog), "-o", str(w / "again")]


def opt_retained_graph_copy(w, fx):
    folder = w / "copied"
    folder.mkdir()
    shutil.copyfile(fx.program / "model.onnx", folder / "model.onnx")
    return ["optimize", str(folder / "model.onnx"), "-o", str(w / "again")]


def verify_args(kind):
    def setup(w, fx):
        prog = program_copy(w, fx)
        source = str(export_copy(w))
        return {"missing-source": ["verify", str(w / "nope.onnx"), str(prog)],
                "program-as-source": ["verify", str(prog / "model.onnx"), str(prog)],
                "not-a-program": ["verify", source, str(w)],
                "too-many-tokens": ["verify", source, str(prog), "--new-tokens", "40"],
                "numeric-fp16": ["optimize", source, "-o", str(w / "out"), "--verify", "numeric",
                                 "--kv-dtype", "float16"]}[kind]
    return setup


def opt_passes(value):
    def setup(w, fx):
        return ["optimize", str(export_copy(w)), "-o", str(w / "out"), "--passes", value]
    return setup


def opt_flags(*flags):
    def setup(w, fx):
        return ["optimize", str(export_copy(w)), "-o", str(w / "out"), *flags]
    return setup


def opt_ext_escape(w, fx):
    (w / "x.data").write_bytes(b"\0" * 64 * 64 * 4)  # really there, but outside the model's folder
    src = external_onnx(w / "model", "../x.data")
    return ["optimize", str(src), "-o", str(w / "out")]


def opt_ext_absolute(w, fx):
    data = w / "elsewhere" / "abs.data"
    data.parent.mkdir()
    data.write_bytes(b"\0" * 64 * 64 * 4)
    src = external_onnx(w / "model", str(data))
    return ["optimize", str(src), "-o", str(w / "out")]


def opt_ext_data_missing(w, fx):
    src = copy_dir(fx.ext_export, w / "export") / "model.onnx"
    (src.parent / "model.onnx.data").unlink()
    return ["optimize", str(src), "-o", str(w / "out")]


def opt_ext_data_truncated(w, fx):
    src = copy_dir(fx.ext_export, w / "export") / "model.onnx"
    truncate(src.parent / "model.onnx.data")
    return ["optimize", str(src), "-o", str(w / "out")]


def opt_not_onnx(w, fx):
    (w / "model.onnx").write_bytes(b"this is not an ONNX model\n" * 10)
    return ["optimize", str(w / "model.onnx"), "-o", str(w / "out")]


def opt_truncated(w, fx):
    src = export_copy(w)
    truncate(src, 0.3)
    return ["optimize", str(src), "-o", str(w / "out")]


def opt_empty_file(w, fx):
    (w / "model.onnx").write_bytes(b"")
    return ["optimize", str(w / "model.onnx"), "-o", str(w / "out")]


def opt_missing(w, fx):
    return ["optimize", str(w / "nope" / "model.onnx"), "-o", str(w / "out")]


def opt_folder_two_onnx(w, fx):
    (w / "two").mkdir()
    shutil.copyfile(LLAMA, w / "two" / "a.onnx")
    shutil.copyfile(LLAMA, w / "two" / "b.onnx")
    return ["optimize", str(w / "two"), "-o", str(w / "out")]


def opt_no_kv(w, fx):
    return ["optimize", str(no_kv_onnx(w / "plain" / "model.onnx")), "-o", str(w / "out")]


# compile
def comp_bad_manifest(w, fx):
    prog = program_copy(w, fx)
    (prog / "qeff_graph.json").write_text('{"tool": "qeff-graph", "files": {')
    return ["compile", str(prog), "-o", str(w / "out")]


def comp_out_foreign(w, fx):
    prog = program_copy(w, fx)
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("\\documentclass{article}\n")
    return ["compile", str(prog), "-o", str(w / "mine"), "--ctx-len", "64"]


def comp_flags(*flags, source="export"):
    def setup(w, fx):
        src = export_copy(w) if source == "export" else program_copy(w, fx)
        return ["compile", str(src), "-o", str(w / "out"), *flags]
    return setup


def comp_missing(w, fx):
    return ["compile", str(w / "no-such-program"), "-o", str(w / "out")]


def comp_truncated_program(w, fx):
    prog = copy_dir(fx.ext_program, w / "prog")
    truncate(prog / "model.onnx.data")
    return ["compile", str(prog), "-o", str(w / "out"), "--ctx-len", "64"]


def built_program(w: Path, name: str = "prog") -> tuple[Path, Path]:
    """(export copy .onnx, program optimized from it) inside the work folder."""
    src = export_copy(w)
    quiet_main(["optimize", str(src), "-o", str(w / name), "--ctx-len", "32", "--prompt-len", "8", "-q"])
    return src, w / name


def comp_source_gone(w, fx):
    src, prog = built_program(w)
    shutil.rmtree(src.parent)
    return ["compile", str(prog), "-o", str(w / "out"), "--kv-dtype", "float16"]


def comp_source_changed(w, fx):
    src, prog = built_program(w)
    truncate(src, 0.9)
    return ["compile", str(prog), "-o", str(w / "out"), "--weight-bits", "8"]


# infer (a tiny local HF dir: nothing needs the hub; every case fails before any export)
def infer(*flags, env=None):
    def setup(w, fx):
        model = hf_copy(w, fx)
        return Run(["infer", "--model-name", str(model), "--exporter", "torchscript", *flags], env=env or {})
    return setup


def infer_prompts_file(data: bytes | None):
    def setup(w, fx):
        model = hf_copy(w, fx)
        path = w / "prompts.txt"
        if data is not None:
            path.write_bytes(data)
        return ["infer", "--model-name", str(model), "--prompts-txt-file-path", str(path)]
    return setup


def infer_home_is_file(w, fx):
    model = hf_copy(w, fx)
    (w / "home-file").write_text("I am a file\n")
    return Run(["infer", "--model-name", str(model)], env={"QEFF_HOME": str(w / "home-file")})


def infer_json_missing_dir(w, fx):
    model = hf_copy(w, fx)
    return ["infer", "--model-name", str(model), "--output-json", str(w / "no-dir" / "out.json")]


def infer_json_is_dir(w, fx):
    model = hf_copy(w, fx)
    (w / "results").mkdir()
    return ["infer", "--model-name", str(model), "--output-json", str(w / "results")]


def infer_cache_dir_is_file(w, fx):
    model = hf_copy(w, fx)
    (w / "cache.txt").write_text("x\n")
    return ["infer", "--model-name", str(model), "--cache-dir", str(w / "cache.txt" / "sub")]


def infer_gguf_missing(w, fx):
    (w / "ggufs").mkdir()
    (w / "ggufs" / "other.gguf").write_bytes(b"GGUF")
    return ["infer", "--model-name", str(w / "ggufs"), "--gguf-file", "model.gguf"]


def infer_remote_code(w, fx):
    model, _marker = evil_model(w, fx)
    return ["infer", "--model-name", str(model), "--exporter", "torchscript", "--ctx-len", "32",
            "--prompt-len", "8", "--generation-len", "2"]


# execute
def exe_not_program(w, fx):
    (w / "folder").mkdir()
    (w / "folder" / "readme.txt").write_text("hi\n")
    return ["execute", "--qpc-path", str(w / "folder")]


def exe_bad_manifest(w, fx):
    prog = program_copy(w, fx)
    data = (prog / "qeff_graph.json").read_bytes()
    (prog / "qeff_graph.json").write_bytes(data[: len(data) // 2])
    return ["execute", "--qpc-path", str(prog)]


def exe_truncated_graph(w, fx):
    prog = program_copy(w, fx)
    assert not [n for n in manifest_files(prog) if ".data" in n]  # the tiny program keeps weights inline
    truncate(prog / "model.onnx")
    return ["execute", "--qpc-path", str(prog)]


def exe_truncated_data(w, fx):
    prog = copy_dir(fx.ext_program, w / "prog")
    assert "model.onnx.data" in manifest_files(prog)
    truncate(prog / "model.onnx.data")
    return ["execute", "--qpc-path", str(prog)]


def exe_changed_config(w, fx):
    prog = program_copy(w, fx)
    flip_same_size(prog / "config.json")
    return ["execute", "--qpc-path", str(prog)]


def exe_missing_file(w, fx):
    prog = program_copy(w, fx)
    (prog / "specializations.json").unlink()
    return ["execute", "--qpc-path", str(prog)]


def exe_qaic(w, fx):
    prog = qaic_program(w, fx)
    return Run(["execute", "--qpc-path", str(prog)], env={"PATH": NO_QAIC_PATH},
               patch={"qeff_graph.backends.qaic.command.SDK_QAIC_EXEC": str(w / "no-sdk" / "qaic-exec")})


def exe_json_missing_dir(w, fx):
    prog = program_copy(w, fx)
    return ["execute", "--qpc-path", str(prog), "--output-json", str(w / "no-dir" / "out.json")]


def exe_wrong_model(w, fx):
    prog = program_copy(w, fx)
    quiet_main(["compile", str(prog), "-o", str(w / "named"), "--model-name", "org/llama-a", "-q"])
    return ["execute", "--qpc-path", str(w / "named"), "--model-name", "org/mistral-b"]


def exe_io_dir_is_file(w, fx):
    prog = program_copy(w, fx)
    (w / "io.txt").write_text("x\n")
    return ["execute", "--qpc-path", str(prog), "--write-io-dir", str(w / "io.txt")]


def exe_empty_prompt(w, fx):
    prog = program_copy(w, fx)
    return ["execute", "--qpc-path", str(prog), "--prompt", "hello|  "]


def speculative_program(w: Path, name: str, words: str, *flags: str) -> Path:
    """The tiny llama with a word-level tokenizer over ``words``, optimized with ``flags``."""
    from tests.helpers import save_tiny_tokenizer

    src = export_copy(w, f"{name}-export")
    save_tiny_tokenizer(src.parent, [words])
    quiet_main(["optimize", str(src), "-o", str(w / name), "--ctx-len", "32", "--prompt-len", "8", "-q", *flags])
    return w / name


def exe_draft_other_tokenizer(w, fx):
    target = speculative_program(w, "target", "the cat sat on the mat", "--num-speculative-tokens", "3")
    draft = speculative_program(w, "draft", "a completely different list of words")
    return ["execute", "--qpc-path", str(target), "--prompt", "the cat", "--draft", str(draft)]


def exe_draft_self_int4(w, fx):
    target = speculative_program(w, "target", "the cat sat on the mat", "--num-speculative-tokens", "3")
    return ["execute", "--qpc-path", str(target), "--prompt", "the cat", "--draft", "self-int4"]


# export
def exp_out_foreign(w, fx):
    model = hf_copy(w, fx)
    (w / "mine").mkdir()
    (w / "mine" / "photo.jpg").write_bytes(os.urandom(256))
    return ["export", str(model), "-o", str(w / "mine"), "--exporter", "torchscript", "-q"]


def exp_out_file(w, fx):
    model = hf_copy(w, fx)
    (w / "out.onnx").write_text("x")
    return ["export", str(model), "-o", str(w / "out.onnx"), "--exporter", "torchscript", "-q"]


def exp_missing(w, fx):
    return ["export", str(w / "no-such-model"), "-o", str(w / "out"), "-q"]


def exp_not_gguf(w, fx):
    (w / "weights.bin").write_bytes(os.urandom(128))
    return ["export", str(w / "weights.bin"), "-o", str(w / "out"), "-q"]


def exp_dir_without_config(w, fx):
    (w / "empty-model").mkdir()
    (w / "empty-model" / "README.md").write_text("# nothing here\n")
    return ["export", str(w / "empty-model"), "-o", str(w / "out"), "-q"]


# embed (encoders)
def tiny_bert(w: Path) -> Path:
    """A tiny random BERT folder with a word-level tokenizer (no export needed to tokenize)."""
    import torch
    import transformers as tf

    from tests.helpers import save_tiny_tokenizer

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=512))
    model.save_pretrained(w / "tiny-bert")
    save_tiny_tokenizer(w / "tiny-bert", ["the cat sat on the mat"])
    return w / "tiny-bert"


def embed(*flags):
    def setup(w, fx):
        return ["embed", "--model-name", str(tiny_bert(w)), "--exporter", "torchscript", *flags]
    return setup


def embed_causal_lm(w, fx):
    return ["embed", "--model-name", str(hf_copy(w, fx)), "--text", "hello"]


def infer_encoder(w, fx):
    return ["infer", "--model-name", str(tiny_bert(w)), "--prompt", "hello"]


def embed_gguf(w, fx):
    (w / "model.gguf").write_bytes(b"GGUF" + os.urandom(64))
    return ["embed", "--model-name", str(w / "model.gguf"), "--text", "hello"]


def embed_output_missing_dir(w, fx):
    return embed("--text", "hello", "--output", str(w / "missing" / "e.npy"))(w, fx)


def embed_output_bad_suffix(w, fx):
    return embed("--text", "hello", "--output", str(w / "e.txt"))(w, fx)


# inspect / passes / bench
def insp_missing(w, fx):
    return ["inspect", str(w / "missing.onnx")]


def insp_not_onnx(w, fx):
    (w / "notes.onnx").write_text("hello\n")
    return ["inspect", str(w / "notes.onnx"), "--json"]


def bench_out_file(w, fx):
    model = hf_copy(w, fx)
    (w / "bench.txt").write_text("previous results\n")
    return ["bench", "--model-name", str(model), "-o", str(w / "bench.txt"), "--no-plot"]


def bench_bad_variant(w, fx):
    model = hf_copy(w, fx)
    return ["bench", "--model-name", str(model), "--variants", "fp32,nope", "-o", str(w / "bench-out"),
            "--no-plot"]



CASES = [
    # optimize
    Case("optimize-out-foreign-nonempty", opt_out_foreign, "is not empty and is not a qeff-graph program"),
    Case("optimize-out-holds-source-cd", opt_out_holds_source_cd, "is not empty and is not a qeff-graph program"),
    Case("optimize-out-holds-source-abs", opt_out_holds_source_abs, "is not empty and is not a qeff-graph program"),
    Case("optimize-source-inside-program-out", opt_source_inside_program_out, "is inside the output folder"),
    Case("optimize-out-symlink", opt_out_symlink, "exists and is not a folder"),
    Case("optimize-out-is-file", opt_out_is_file, "exists and is not a folder"),
    Case("optimize-input-program-onnx", opt_program_onnx, "already a qeff-graph program"),
    Case("optimize-input-program-dir", opt_program_dir, "already a qeff-graph program"),
    Case("optimize-input-retained-graph", opt_retained_graph_copy, "is already a retained-state program"),
    Case("verify-missing-source", verify_args("missing-source"), "does not exist"),
    Case("verify-program-as-source", verify_args("program-as-source"), "is a retained-state program"),
    Case("verify-not-a-program", verify_args("not-a-program"), "qeff_graph.json"),
    Case("verify-too-many-tokens", verify_args("too-many-tokens"), "leaves no room for a prompt"),
    Case("optimize-verify-numeric-fp16", verify_args("numeric-fp16"), "--verify numeric asks for exact tokens"),
    Case("optimize-passes-empty", opt_passes(""), "--passes is empty or has an empty name"),
    Case("optimize-passes-empty-name", opt_passes("past-shape,,kv-retention"), "--passes is empty or has an empty name"),
    Case("optimize-passes-unknown", opt_passes("past-shape,no-such-pass"), "unknown pass 'no-such-pass'"),
    Case("optimize-dump-after-unknown", opt_flags("--dump-after", "no-such-pass"), "no-such-pass: not a pass of this pipeline"),
    Case("optimize-dump-before-not-in-pipeline", opt_flags("--dump-before", "matmul-nbits"),
         "matmul-nbits: not a pass of this pipeline"),
    Case("optimize-ext-data-escapes", opt_ext_escape, "outside the model's folder"),
    Case("optimize-ext-data-absolute", opt_ext_absolute, "outside the model's folder"),
    Case("optimize-ext-data-missing", opt_ext_data_missing, "is missing next to"),
    Case("optimize-ext-data-truncated", opt_ext_data_truncated, "is too short for tensor"),
    Case("optimize-not-onnx", opt_not_onnx, "is not a readable ONNX model"),
    Case("optimize-truncated-onnx", opt_truncated, "is not a readable ONNX model"),
    Case("optimize-empty-file", opt_empty_file, "is empty"),
    Case("optimize-missing-file", opt_missing, "does not exist"),
    Case("optimize-folder-two-onnx", opt_folder_two_onnx, "without a single .onnx file"),
    Case("optimize-no-kv-cache", opt_no_kv, "KV"),
    Case("optimize-ctx-smaller-than-prompt", opt_flags("--ctx-len", "16", "--prompt-len", "32"),
         "--ctx-len (16) is smaller than --prompt-len (32)"),
    Case("optimize-batch-size-0", opt_flags("--batch-size", "0"), "must be >= 1, got 0"),
    Case("optimize-num-speculative-tokens-0", opt_flags("--num-speculative-tokens", "0"), "must be >= 1, got 0"),
    Case("optimize-speculative-longer-than-prompt-len", opt_flags("--prompt-len", "4", "--num-speculative-tokens", "4"),
         "needs a verify step of 5 tokens, longer than --prompt-len 4"),
    Case("optimize-kv-dtype-bad", opt_flags("--kv-dtype", "int8"), "invalid choice: 'int8'"),
    Case("optimize-missing-output-flag", lambda w, fx: ["optimize", str(export_copy(w))],
         "the following arguments are required: -o/--output-dir"),
    # compile
    Case("compile-manifest-not-json", comp_bad_manifest, "not valid JSON"),
    Case("compile-out-foreign-nonempty", comp_out_foreign, "is not empty and is not a qeff-graph program"),
    Case("compile-mos-on-ort", comp_flags("--mos", "2"), "--mos only applies to --backend qaic"),
    Case("compile-depth-first-on-ort", comp_flags("--aic-enable-depth-first", source="program"),
         "--aic-enable-depth-first only applies to --backend qaic"),
    Case("compile-weight-bits-on-qaic", comp_flags("--weight-bits", "4", "--backend", "qaic"),
         "--weight-bits applies to --backend ort"),
    Case("compile-device-group-on-ort", comp_flags("--device-group", "0,1", source="program"),
         "multi-device partitioning needs --backend qaic"),
    Case("compile-device-group-duplicate", comp_flags("--device-group", "1,1"), "give distinct device ids"),
    Case("compile-source-missing", comp_missing, "does not exist"),
    Case("compile-program-source-gone", comp_source_gone, "is gone; compile from the .onnx export instead"),
    Case("compile-program-source-changed", comp_source_changed, "changed since it was built"),
    Case("compile-program-truncated-data", comp_truncated_program, "model.onnx.data has"),
    Case("compile-speculative-longer-than-program-prompt-len",
         comp_flags("--num-speculative-tokens", "8", source="program"), "longer than --prompt-len 8"),
    # infer
    Case("infer-prompt-empty", infer("--prompt", ""), "empty prompt"),
    Case("infer-prompt-empty-part", infer("--prompt", "a||b"), "empty prompt"),
    Case("infer-prompts-file-binary", infer_prompts_file(b"\x00\xff\xfe"), "is not UTF-8 text"),
    Case("infer-prompts-file-nul", infer_prompts_file(b"hello\x00world\n"), "is binary"),
    Case("infer-prompts-file-empty", infer_prompts_file(b"\n  \n"), "has no prompts"),
    Case("infer-prompts-file-missing", infer_prompts_file(None), "does not exist"),
    Case("infer-qeff-home-is-file", infer_home_is_file, "is a file, not a folder"),
    Case("infer-output-json-missing-folder", infer_json_missing_dir, "does not exist; create it"),
    Case("infer-output-json-is-folder", infer_json_is_dir, "is a directory; give a file name"),
    Case("infer-kv-cache-too-big", infer("--ctx-len", str(10**13)), "the KV cache needs"),
    Case("infer-device-group-on-ort", infer("--device-group", "0,1"), "multi-device partitioning needs --backend qaic"),
    Case("infer-mos-on-ort", infer("--mos", "2"), "--mos only applies to --backend qaic"),
    Case("infer-generation-len-0", infer("--generation-len", "0"), "must be >= 1, got 0"),
    Case("infer-model-missing", lambda w, fx: ["infer", "--model-name", str(w / "no-model")],
         "no such model file or directory"),
    Case("infer-prompt-and-file", infer("--prompt", "hi", "--prompts-txt-file-path", "p.txt"),
         "not allowed with argument"),
    Case("infer-cache-dir-under-file", infer_cache_dir_is_file, "is a file, not a folder"),
    Case("infer-gguf-file-missing", infer_gguf_missing, "no GGUF file 'model.gguf'"),
    Case("infer-draft-without-verify-step", infer("--draft", "self-int4"),
         "--draft needs a program compiled with --num-speculative-tokens K"),
    Case("infer-lookup-ngram-with-model-draft", infer("--prompt-len", "8", "--num-speculative-tokens", "2",
                                                      "--draft", "self-int4", "--lookup-ngram", "2"),
         "--lookup-ngram applies to --draft prompt-lookup"),
    Case("infer-remote-code-refused", infer_remote_code, "--trust-remote-code",
         check=lambda w: not (w / "REMOTE_CODE_RAN").exists() or pytest.fail("the model's Python code ran")),
    # execute
    Case("execute-not-program", exe_not_program, "is not a qeff-graph program directory"),
    Case("execute-manifest-corrupt", exe_bad_manifest, "not valid JSON"),
    Case("execute-graph-truncated", exe_truncated_graph, "model.onnx has"),
    Case("execute-weight-file-truncated", exe_truncated_data, "model.onnx.data has"),
    Case("execute-config-changed", exe_changed_config, "config.json does not match the SHA-256"),
    Case("execute-file-missing", exe_missing_file, "specializations.json is missing"),
    Case("execute-qaic-program", exe_qaic, "was compiled for --backend qaic"),
    Case("execute-output-json-missing-folder", exe_json_missing_dir, "does not exist; create it"),
    Case("execute-wrong-model-name", exe_wrong_model, "was compiled from org/llama-a, not org/mistral-b"),
    Case("execute-write-io-dir-is-file", exe_io_dir_is_file, "exists and is not a folder"),
    Case("execute-prompt-empty-part", exe_empty_prompt, "empty prompt"),
    Case("execute-draft-other-tokenizer", exe_draft_other_tokenizer, "has another tokenizer than the target"),
    Case("execute-draft-without-verify-step", lambda w, fx: ["execute", "--qpc-path", str(program_copy(w, fx)),
                                                             "--draft", "prompt-lookup"],
         "--draft needs a program compiled with --num-speculative-tokens K"),
    Case("execute-draft-self-int4", exe_draft_self_int4, "--draft self-int4 needs the model the program was built from"),
    Case("execute-qpc-path-missing", lambda w, fx: ["execute", "--qpc-path", str(w / "gone")], "is not a directory"),
    # export
    Case("export-out-foreign-nonempty", exp_out_foreign, "is not empty and is not a qeff-graph export"),
    Case("export-out-is-file", exp_out_file, "exists and is not a folder"),
    Case("export-model-missing", exp_missing, "no such model file or directory"),
    Case("export-file-not-gguf", exp_not_gguf, "is a file but not a .gguf"),
    Case("export-dir-without-config", exp_dir_without_config, "no config.json"),
    Case("export-opset-0", lambda w, fx: ["export", str(hf_copy(w, fx)), "--opset", "0"], "must be >= 1, got 0"),
    # inspect / passes / bench / top level
    Case("inspect-missing-file", insp_missing, "does not exist"),
    Case("inspect-not-onnx", insp_not_onnx, "is not a readable ONNX model"),
    Case("passes-unknown-flag", lambda w, fx: ["passes", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    Case("bench-out-is-file", bench_out_file, "is a file; give a folder"),
    Case("bench-unknown-variant", bench_bad_variant, "unknown variant(s) nope"),
    Case("bench-ctx-too-small", lambda w, fx: ["bench", "--model-name", str(hf_copy(w, fx)), "--ctx-len", "64",
                                                "-o", str(w / "b"), "--no-plot"], "exceed --ctx-len 64"),
    Case("inspect-folder-without-onnx", lambda w, fx: ["inspect", str(hf_copy(w, fx))], "without a single .onnx file"),
    Case("bench-batch-sizes-bad", lambda w, fx: ["bench", "--batch-sizes", "1,x", "-o", str(w / "b")],
         "is not a comma-separated list of integers"),
    Case("unknown-command", lambda w, fx: ["optimise", "model.onnx"], "invalid choice: 'optimise'"),
    Case("embed-causal-lm", embed_causal_lm, "is not an encoder (model_type llama)"),
    Case("infer-encoder", infer_encoder, "is an encoder (bert), not a causal LM"),
    Case("embed-gguf", embed_gguf, "a GGUF file holds a causal LM"),
    Case("embed-unknown-pooling", embed("--text", "hi", "--pooling", "sum"), "invalid choice: 'sum'"),
    Case("embed-too-long-no-truncate", embed("--text", " ".join(["the cat"] * 20), "--seq-len", "16",
                                             "--no-truncate"), "more than the largest --seq-len 16"),
    Case("embed-empty-text", embed("--text", "hello|"), "empty text"),
    Case("embed-no-text", embed(), "one of the arguments --text --texts-file"),
    Case("embed-seq-len-repeated", embed("--text", "hi", "--seq-len", "32,32"), "give distinct integers"),
    Case("embed-causal-flag", embed("--text", "hi", "--mos", "2"), "--mos only applies to --backend qaic"),
    Case("embed-output-missing-dir", embed_output_missing_dir, "does not exist"),
    Case("embed-output-bad-suffix", embed_output_bad_suffix, "use a .npy or .jsonl file name"),
    Case("embed-binary-texts-file", lambda w, fx: embed("--texts-file", str(_binary(w)))(w, fx), "is binary"),
]


def _binary(w: Path) -> Path:
    (w / "texts.txt").write_bytes(b"hello\x00world\n")
    return w / "texts.txt"


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    import onnx

    if not LLAMA.exists():
        pytest.skip(f"fixture {LLAMA} is missing (shared/ not checked out beside the repo)")
    root = tmp_path_factory.mktemp("bad-inputs-fixtures")
    home = root / "qeff_home"
    with mock.patch.dict(os.environ, {"QEFF_HOME": str(home), "HF_HUB_OFFLINE": "1"}):
        program = root / "program"
        quiet_main(["optimize", str(LLAMA), "-o", str(program), "--ctx-len", "32", "--prompt-len", "8", "-q"])
        ext_export = copy_dir(LLAMA_DIR, root / "ext-export")
        model = onnx.load(ext_export / "model.onnx")
        onnx.save(model, ext_export / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        ext_program = root / "ext-program"
        quiet_main(["optimize", str(ext_export / "model.onnx"), "-o", str(ext_program), "--ctx-len", "32",
                    "--prompt-len", "8", "-q"])
        tiny_hf = make_tiny_hf("llama", root / "tiny-llama")
    assert not home.exists()
    return Fixtures(program, ext_export, ext_program, tiny_hf)


# ---- the test -----------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: kind, mode and (files) SHA-256 of the bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", oct(mode))
            else:
                found[rel] = ("file", oct(mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def diff(before: dict, after: dict) -> list[str]:
    out = [f"new: {p}" for p in sorted(after.keys() - before.keys())]
    out += [f"gone: {p}" for p in sorted(before.keys() - after.keys())]
    out += [f"changed: {p} {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys())
            if before[p] != after[p]]
    return out


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, fx: Fixtures, tmp_path: Path, monkeypatch):
    work = tmp_path
    home = work / "qeff_home"
    home.mkdir()
    for var in ("QEFF_GRAPH_DEBUG", "QEFF_GRAPH_STOP_AT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QEFF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)

    run = case.setup(work, fx)
    if not isinstance(run, Run):
        run = Run(list(run))
    before = snapshot(work)
    assert "qeff_home" in before

    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    for target, value in run.patch.items():
        monkeypatch.setattr(target, value)
    if run.cwd is not None:
        monkeypatch.chdir(run.cwd)

    rc, _seconds, stdout, stderr = run_cli(run.argv)
    monkeypatch.chdir(work)
    shown = f"argv: {run.argv}\nrc: {rc}\nstdout:\n{stdout}\nstderr:\n{stderr}"

    assert "Traceback" not in stdout + stderr, shown
    assert rc == 2, shown
    lines = stderr.splitlines()
    assert lines, shown
    assert len(lines) <= MAX_STDERR_LINES, shown
    assert lines[-1].startswith("error: "), shown
    assert [line for line in lines if line.startswith("error")] == [lines[-1]], shown
    assert case.expect in lines[-1], shown
    changes = diff(before, snapshot(work))
    assert not changes, "\n".join(changes) + "\n" + shown
    assert not any(home.iterdir()), f"the cache {home} was written to\n{shown}"
    if case.check is not None:
        case.check(work)


def test_evil_model_really_runs_remote_code(fx: Fixtures, tmp_path: Path):
    """The remote-code case's folder is real: transformers, asked to trust it, imports its
    files (which write the marker), in a subprocess with its own module cache."""
    import subprocess
    import sys

    model, marker = evil_model(tmp_path, fx)
    code = ("import sys; from transformers import AutoConfig; "
            "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(c).__name__)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "EvilConfig"
    assert marker.exists()
