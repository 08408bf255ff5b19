"""``build_program(source, spec, out)``: the one way a program directory comes to exist.

::

    model.onnx (+ model.onnx.data ...)  the rewritten graph (data: the program's own file names)
    specializations.json                prefill (seq_len=prompt_len) and decode (seq_len=1) shapes
    custom_io.yaml                      KV IO name -> precision
    tokenizer / config files            copied from beside the source, when it has them
    compile.sh, mdp.json, qpc/          backend qaic: the qaic-exec command (and its output)
    qeff_graph.json                     manifest: tool version, source + hash, options (the
                                        ProgramSpec), IO contract, pass log, backend, and every
                                        file above with its size and SHA-256

The CLI (``optimize``, ``compile``, ``infer``) and the Python API (``optimize()``,
``QEFFAutoModelForCausalLM.compile``) call only :func:`build_program`. It checks everything
it can before any work (options, pass and dump names, the output folder, the source), writes
the whole folder in one :class:`~qeff_graph.fs.AtomicDir` (so a kill at any moment leaves either
the old folder or the new one, never a mix) and never touches a folder that is not a program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import yaml

from qeff_graph import __version__, progress
from qeff_graph import ir as qir
from qeff_graph.artifact import BrokenArtifactError, check_files, file_sha256, file_table, read_json
from qeff_graph.errors import QeffGraphError
from qeff_graph.fs import AtomicDir, link_or_clone
from qeff_graph.program.spec import ProgramSpec

__all__ = ["MANIFEST", "Program", "Source", "build_program", "check_output_dir", "config_sliding_window",
           "custom_io", "is_program_dir", "optimize", "read_manifest", "resolve_source"]

MANIFEST = "qeff_graph.json"
# Files that travel with a program: tokenizer and model config (execute needs them).
SIDE_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "config", "generation_config",
              "chat_template", "added_tokens", "spiece", "sentencepiece")


@dataclasses.dataclass
class Program:
    """A program directory and its manifest (see the module docstring)."""

    path: Path
    manifest: dict
    action: str = "built"  # how build_program got it: optimized | re-optimized | copied | reused

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def spec(self) -> ProgramSpec:
        return ProgramSpec.from_dict(self.manifest.get("options") or {})

    @classmethod
    def open(cls, path: str | os.PathLike, *, hashes: bool = False) -> Program:
        """The program in ``path``, checked against its manifest (sizes always; hashes of small
        files always and of all files with ``hashes``). Raises :class:`BrokenArtifactError`."""
        path = Path(path)
        manifest = read_manifest(path)
        check_files(path, manifest.get("files"), hashes=hashes)
        return cls(path, manifest, "reused")


def is_program_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(program_dir: str | os.PathLike) -> dict:
    """The manifest of a program directory; one-line errors for a missing or damaged one."""
    path = Path(program_dir)
    if not path.is_dir():
        raise QeffGraphError(f"{path} is not a directory; pass a program directory from `qeff-graph compile`")
    if not (path / MANIFEST).exists():
        raise QeffGraphError(f"{path} is not a qeff-graph program directory (no {MANIFEST}); "
                             "run `qeff-graph optimize` or `qeff-graph compile` first")
    manifest = read_json(path / MANIFEST, "program manifest")
    if manifest.get("tool") != "qeff-graph" or not isinstance(manifest.get("options"), dict):
        raise BrokenArtifactError(f"{path / MANIFEST} is not a qeff-graph manifest (damaged?); "
                                  "rebuild the program with `qeff-graph compile`")
    return manifest


@dataclasses.dataclass(frozen=True)
class Source:
    """What a build reads: the graph, where tokenizer/config files are, the source program."""

    onnx: Path
    side_dir: Path
    program: Program | None = None


def resolve_source(source: str | os.PathLike) -> Source:
    """An ``.onnx`` file, a folder holding one (an export) or a program directory."""
    path = Path(source)
    if not path.exists():
        raise QeffGraphError(f"{source} does not exist; pass an .onnx export, its folder or a program directory")
    if path.is_dir():
        if is_program_dir(path):
            return Source(path / "model.onnx", path, Program(path, read_manifest(path)))
        if (path / "model.onnx").is_file():
            return Source(path / "model.onnx", path)
        found = sorted(path.glob("*.onnx"))
        if len(found) != 1:
            raise QeffGraphError(f"{source} is a folder without a single .onnx file (nor {MANIFEST}); "
                                 "pass the .onnx file itself")
        return Source(found[0], path)
    if path.name == "model.onnx" and is_program_dir(path.parent):
        return Source(path, path.parent, Program(path.parent, read_manifest(path.parent)))
    return Source(path, path.parent)


def check_output_dir(out: str | os.PathLike, source: Source | None = None) -> Path:
    """Refuse (one line, nothing touched) an output that is a file, a folder holding anything but
    a qeff-graph program, or a folder the source lies in. A program there is replaced whole."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QeffGraphError(f"output {out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not is_program_dir(out):
        raise QeffGraphError(f"output folder {out} is not empty and is not a qeff-graph program; "
                             "choose a new or empty folder (nothing was changed)")
    if source is not None and source.program is None:
        real_out, real_src = out.resolve(), source.onnx.resolve()
        if real_src.is_relative_to(real_out):
            raise QeffGraphError(f"the source {source.onnx} is inside the output folder {out}, which "
                                 "would be replaced; choose another -o")
    return out


def config_sliding_window(directory: str | os.PathLike, ctx_len: int) -> int | tuple[int | None, ...] | None:
    """The attention windows of the HF ``config.json`` in ``directory`` (whatever the key:
    :func:`~qeff_graph.export.loader.attention_windows`) that are shorter than ``ctx_len`` (a
    longer one never masks anything): one int when every layer slides alike, a tuple with one
    entry per layer (None: full attention) when they differ, None when no layer slides."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    from qeff_graph.export.loader import attention_windows

    try:
        windows = attention_windows(config)
    except QeffGraphError as exc:
        raise QeffGraphError(f"{path}: {exc}") from None
    windows = [w if w is not None and w < ctx_len else None for w in windows]
    if all(w is None for w in windows):
        return None
    if len(set(windows)) == 1:
        return windows[0]
    return tuple(windows)


def custom_io(model_io: dict, precision: str) -> list[dict]:
    """``- IOName: past_key.0 / Precision: float16`` entries for every KV input and output."""
    names = [v["name"] for v in model_io["inputs"] if v["name"].startswith(("past_key.", "past_value."))]
    names += [v["name"] for v in model_io["outputs"] if v["name"].endswith("_RetainedState")]
    return [{"IOName": n, "Precision": precision} for n in names]


def _io_contract(model: ir.Model) -> dict:
    def describe(v: ir.Value) -> dict:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape.dims] if v.shape is not None else None
        return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.inputs],
            "outputs": [describe(v) for v in model.graph.outputs]}


def _side_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [f for f in sorted(directory.iterdir())
            if f.is_file() and f.name.startswith(SIDE_FILES) and f.name != MANIFEST]


def _source_hashes(directory: Path) -> dict[str, dict]:
    """``{file name: {size, sha256}}`` from the manifest of the folder a source lives in, if any."""
    for name in (MANIFEST, "export.json"):
        with contextlib.suppress(QeffGraphError):
            files = read_json(directory / name, "manifest").get("files")
            if isinstance(files, dict):
                return files
    return {}


def _mode_cap(onnx: Path) -> int:
    """Permission bits no written file may exceed: those of the source graph (and owner rw)."""
    return (stat.S_IMODE(onnx.stat().st_mode) & 0o666) | 0o600


def _narrow_modes(directory: Path, cap: int, skip: set[str]) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and path.name not in skip:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & ~(cap | 0o111):
                os.chmod(path, mode & (cap | 0o111))


def _check_encoder_graph(graph: ir.Model, path: Path) -> None:
    """An encoder export: inputs input_ids and attention_mask, output last_hidden_state, no cache."""
    inputs = {v.name for v in graph.graph.inputs}
    outputs = {v.name for v in graph.graph.outputs}
    if any(n.startswith(("past_key", "past_value")) for n in inputs):
        raise QeffGraphError(f"{path} has a KV cache: it is a causal LM, not an encoder; run it with "
                             "`qeff-graph infer` / `optimize`")
    if not {"input_ids", "attention_mask"} <= inputs or "last_hidden_state" not in outputs:
        raise QeffGraphError(f"{path} is not an encoder export (inputs {sorted(inputs)}, outputs {sorted(outputs)}; "
                             "expected input_ids, attention_mask -> last_hidden_state); export it with "
                             "`qeff-graph embed` / QEFFAutoModel")


def export_gguf(directory: Path) -> Path | None:
    """The GGUF file an export in ``directory`` was made from (``export.json``: ``source``,
    ``gguf_file``), or None when it was not made from one. One-line error when it is gone."""
    try:
        info = read_json(directory / "export.json", "export manifest")
    except QeffGraphError:
        return None  # an ONNX file from elsewhere: a float model
    name, source = info.get("gguf_file"), str(info.get("source") or "")
    if not isinstance(name, str) or not name:
        return None
    base = source.split("::")[0] if "::" in source else source
    path = Path(base) if base.lower().endswith(".gguf") else Path(base) / name
    if not path.is_file() and "::" in source and not Path(base).exists():  # a hub id: the hub's file cache
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, name)
            path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        raise QeffGraphError(f"{directory} was exported from the GGUF {name}, whose blocks --weight-bits 4 carries, "
                             f"but {path} is gone; put it back there or re-export the model")
    return path.resolve()


def _dump_names(names: list[str], dump_before: Sequence[str], dump_after: Sequence[str]) -> None:
    unknown = [n for n in (*dump_before, *dump_after) if n not in names]
    if unknown:
        raise QeffGraphError(f"--dump-before/--dump-after {', '.join(unknown)}: not a pass of this pipeline "
                             f"({', '.join(names)})")


def build_program(
    source: str | os.PathLike,
    spec: ProgramSpec,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    hardlink_data: bool = False,
    verify: bool | str | None = None,
    dump_dir: str | os.PathLike | None = None,
    dump_before: Sequence[str] = (),
    dump_after: Sequence[str] = (),
    cache_entry: bool = False,
) -> Program:
    """Build the program ``spec`` describes from ``source`` into ``out``, atomically.

    ``source``: a dynamic-KV ONNX export (file or folder) or a program directory (its graph
    is reused when only shapes/backend options differ, else it is rebuilt from the program's
    recorded source). ``hardlink_data`` hard-links the source's weight files instead of
    cloning them (the cache does this: variants of one export share one weight file; ONNX
    Runtime reads them, ``onnx.load`` refuses hard-linked data). Every problem with the input
    raises :class:`QeffGraphError` before anything is written. ``cache_entry``: ``out`` is a
    cache entry (everything in it was written by qeff-graph), replaced even if it is damaged.
    """
    src = resolve_source(source)
    out = Path(out)
    build = dict(model_name=model_name, hardlink_data=hardlink_data, verify=verify, dump_dir=dump_dir,
                 dump_before=dump_before, dump_after=dump_after, cache_entry=cache_entry)
    if src.program is not None:
        return _from_program(src, spec, out, **build)
    return _from_onnx(src, spec, out, **build)


def _from_onnx(src: Source, spec: ProgramSpec, out: Path, *, model_name, hardlink_data, verify, dump_dir,
               dump_before, dump_after, cache_entry) -> Program:
    started = time.perf_counter()
    if not cache_entry:
        check_output_dir(out, src)
    if spec.kind == "encoder":
        window = None
    else:
        window = (config_sliding_window(src.onnx.parent, spec.ctx_len) if spec.sliding_window == "auto"
                  else spec.sliding_window)
    spec = dataclasses.replace(spec, sliding_window=window)
    names = spec.pipeline()
    _dump_names(names, dump_before, dump_after)
    from qeff_graph.passes import PassManager, build_pipeline

    # unknown passes and bad pass options fail here, before the model is read
    options = spec.pass_options(window)
    gguf = export_gguf(src.onnx.parent) if spec.weight_bits == 4 and "matmul-nbits" in names else None
    if gguf is not None:  # --weight-bits 4 on a GGUF export: matmul-nbits carries the GGUF's own blocks
        options["gguf"] = str(gguf)
    numeric = verify == "numeric"  # checker between passes, then the program against its source
    if numeric and spec.kind != "causal-lm":
        raise QeffGraphError("--verify numeric compares causal-LM programs with their source; use "
                             "--verify checker or ort for encoders")
    if numeric and (spec.weight_bits or spec.kv_dtype != "float32"):
        raise QeffGraphError("--verify numeric asks for exact tokens and logits within 1e-4, which a quantized "
                             "weight or float16 cache program does not give; build it, then measure it with "
                             "`qeff-graph verify SOURCE PROGRAM --tolerance T`")
    manager = PassManager(build_pipeline(names, **options), verify="checker" if numeric else verify,
                          dump_dir=dump_dir or f"{os.path.abspath(out)}.dumps",
                          dump_before=dump_before, dump_after=dump_after, progress=True)
    progress.checkpoint("program:load")
    graph = qir.load(src.onnx)
    if spec.kind == "encoder":
        _check_encoder_graph(graph, src.onnx)
    else:
        kv = qir.find_kv_cache(graph)  # says clearly when there is no KV cache
        if kv.retained:
            raise QeffGraphError(f"{src.onnx} is already a retained-state program (optimized); pass the original "
                                 "export, or `qeff-graph compile PROGRAM_DIR -o DIR` to rebuild it with other options")
    progress.checkpoint("program:passes")
    graph = manager(graph).model
    io = _io_contract(graph)
    manifest = {
        "tool": "qeff-graph",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_name": model_name,
        "source": {"path": str(src.onnx.resolve()), "sha256": file_sha256(src.onnx),
                   "kv_form": "dynamic", **({"gguf": str(gguf)} if gguf is not None else {})},
        "options": spec.to_dict(),
        "kv_cache": qir.find_kv_cache(graph).summary() if spec.kind == "causal-lm" else None,
        "io": io,
        "pipeline": manager.log,
        "weight_bytes": qir.weight_bytes(graph),
    }

    def write_graph(tmp: Path) -> tuple[dict, set[str]]:
        placed = qir.write_model_files(graph, tmp, hardlink=hardlink_data)
        # a placed weight file has its source's hash: from the source's manifest, else hashed once
        known = _source_hashes(src.onnx.parent)
        here = src.onnx.resolve().parent
        hints = {dst: known.get(Path(s).name) if Path(s).resolve().parent == here else None
                 for dst, (s, _) in placed.items()}
        hints = {dst: hints[dst] or {"size": os.path.getsize(s), "sha256": file_sha256(s)}
                 for dst, (s, _) in placed.items()}
        return hints, {dst for dst, (_, how) in placed.items() if how == "hardlink"}

    def check(tmp: Path) -> None:  # the program is whole in tmp: verify it before it appears
        from qeff_graph.program.verify import verify_program

        report = verify_program(src.onnx, tmp)
        manifest["verify"] = report.to_dict()
        if not report.passed:
            raise QeffGraphError(f"--verify numeric: the program differs from {src.onnx}: {report.summary()}; "
                                 "nothing was written (`qeff-graph verify --bisect` names the pass)")

    return _write_program(out, spec, manifest, write_graph, side_dir=src.side_dir, mode_cap=_mode_cap(src.onnx),
                          started=started, action="optimized", hardlink=hardlink_data,
                          check=check if numeric else None)


def _from_program(src: Source, spec: ProgramSpec, out: Path, **build) -> Program:
    """A program as the source: reuse its graph when only shapes/backend differ, else rebuild
    from the export it was made from (which must still be there, unchanged)."""
    started = time.perf_counter()
    program = src.program
    check_files(program.path, program.manifest.get("files"))  # a damaged program is no source
    old = program.spec
    window = old.sliding_window if spec.sliding_window == "auto" and old.ctx_len == spec.ctx_len \
        else spec.sliding_window
    if window == "auto":  # the program carries the model's config.json
        window = config_sliding_window(program.path, spec.ctx_len)
    want = dataclasses.replace(spec, sliding_window=window)
    same_dir = out.exists() and out.resolve() == program.path.resolve()
    if want.artifact_options() == old.artifact_options() and same_dir:
        return Program(program.path, program.manifest, "reused")
    if not build["cache_entry"]:
        check_output_dir(out)
    if want.graph_options() != old.graph_options():
        original = Path(program.manifest.get("source", {}).get("path", ""))
        if not original.is_file():
            raise QeffGraphError(f"{program.path} was built with other graph options and its source {original} "
                                 "is gone; compile from the .onnx export instead")
        if file_sha256(original) != program.manifest["source"].get("sha256"):
            raise QeffGraphError(f"the source {original} of {program.path} changed since it was built; "
                                 "compile from the .onnx export instead")
        build["model_name"] = build["model_name"] or program.manifest.get("model_name")
        side_dir = original.parent if _side_files(original.parent) else program.path
        result = _from_onnx(Source(original, side_dir), spec, out, **build)
        result.action = "re-optimized"
        return result
    manifest = {k: v for k, v in program.manifest.items() if k not in ("files", "backend", "seconds")}
    manifest.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), version=__version__,
                    options=want.to_dict(),
                    model_name=build.get("model_name") or program.manifest.get("model_name"))
    graph_files = [n for n in program.manifest["files"] if n == "model.onnx" or n.startswith("model.onnx.")]

    def write_graph(tmp: Path) -> tuple[dict, set[str]]:
        linked = set()
        for name in graph_files:
            if link_or_clone(program.path / name, tmp / name, hardlink=build["hardlink_data"]) == "hardlink":
                linked.add(name)
        return {n: program.manifest["files"][n] for n in graph_files}, linked

    return _write_program(out, want, manifest, write_graph, side_dir=program.path,
                          mode_cap=_mode_cap(program.onnx_path), started=started, action="copied",
                          hardlink=build["hardlink_data"])


def _write_program(out: Path, spec: ProgramSpec, manifest: dict, write_graph, *, side_dir: Path,
                   mode_cap: int, started: float, action: str, hardlink: bool, check=None) -> Program:
    """The one atomic write of a whole program folder. ``hardlink``: weight and side files are
    hard-linked from the source where possible (cache entries), else cloned. ``check(tmp)`` runs
    on the complete temporary folder before it replaces ``out`` (raising leaves nothing)."""
    dir_mode = None if mode_cap & 0o044 else 0o700
    with progress.task(f"writing {out}"), AtomicDir(out, mode=dir_mode, label="program") as tmp:
        progress.checkpoint("program:write")
        hints, linked = write_graph(tmp)
        (tmp / "specializations.json").write_text(json.dumps(spec.specializations(), indent=2) + "\n")
        (tmp / "custom_io.yaml").write_text(yaml.safe_dump(custom_io(manifest["io"], spec.kv_precision()),
                                                           sort_keys=False))
        progress.checkpoint("program:side-files")
        for f in _side_files(side_dir):
            if not (tmp / f.name).exists() and link_or_clone(f, tmp / f.name, hardlink=hardlink) == "hardlink":
                linked.add(f.name)
        manifest["backend"] = _backend_files(tmp, out, spec)
        progress.checkpoint("program:manifest")
        manifest["files"] = file_table(tmp, exclude=(MANIFEST,), known=hints)
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check is not None:
            check(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _narrow_modes(tmp, mode_cap, linked)
    return Program(out, manifest, action)


def _backend_files(tmp: Path, out: Path, spec: ProgramSpec) -> dict:
    if spec.backend == "ort":
        return {"name": "ort", "threads": spec.threads()}
    from qeff_graph.backends.qaic import compile_qaic

    return compile_qaic(tmp, Path(os.path.abspath(out)), **spec.qaic_options())


def optimize(model: str | os.PathLike, output_dir: str | os.PathLike, *, model_name: str | None = None,
             hardlink_data: bool = False, verify: bool | str | None = None,
             dump_dir: str | os.PathLike | None = None, dump_before: Sequence[str] = (),
             dump_after: Sequence[str] = (), **options) -> Program:
    """``qeff-graph optimize`` in Python: ``options`` are :class:`ProgramSpec` fields
    (``ctx_len=128, prompt_len=32, batch_size=1, kv_dtype="float32", full_batch_size=None,
    weight_bits=None, passes=None, sliding_window="auto"``, backend options)."""
    try:
        spec = ProgramSpec(**options)
    except TypeError as exc:
        raise QeffGraphError(f"optimize(): {exc}; see qeff_graph.ProgramSpec for the options") from None
    if resolve_source(model).program is not None:
        raise QeffGraphError(f"{model} is already a qeff-graph program (optimized); pass the original export, "
                             "or `qeff-graph compile PROGRAM_DIR -o DIR` to rebuild it with other options")
    return build_program(model, spec, output_dir, model_name=model_name, hardlink_data=hardlink_data,
                         verify=verify, dump_dir=dump_dir, dump_before=dump_before, dump_after=dump_after)
