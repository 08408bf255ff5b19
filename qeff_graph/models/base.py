"""What the QEfficient-style model classes share: the cache rule, export and compile through it.

A :class:`CachedModel` exports its source once into ``<cache>/<slug>/onnx/<hash>/`` and builds
each :class:`~qeff_graph.program.ProgramSpec` into ``<cache>/<slug>/qpc/<backend>-<hash>/``
with :func:`~qeff_graph.program.build_program`; a cached entry is reused only after it matches
its manifest (:func:`reuse_or_build`). Subclasses say how to export (:meth:`_export_to`) and
what to check before a build (:meth:`_check_resources`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from qeff_graph import __version__, cache
from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

__all__ = ["CachedModel", "load_tokenizer", "reuse_or_build"]

# tokenizer classes that are the `tokenizers` backend itself: loaded without AutoTokenizer,
# whose import chain pulls in torch (~2 s of a cached `infer`)
_PLAIN_FAST = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def reuse_or_build(path: Path, what: str, open_: Callable[[Path], object], build: Callable[[], object],
                   *, force: bool = False):
    """The cache rule, once: reuse ``path`` if ``open_`` accepts it, else (missing, broken,
    ``force``) build it, saying which in one line."""
    if path.exists() and not force:
        try:
            found = open_(path)
            _progress.say(f"{what}: reusing {path}")
            return found
        except QeffGraphError as exc:
            _progress.say(f"{what}: cached entry is broken ({exc}); rebuilding")
    return build()


class CachedModel:
    """A model exported and compiled through the cache (see the module docstring)."""

    kind = "causal-lm"  # the ProgramSpec kind this class builds

    def __init__(self, source: str, gguf_file: str | None = None, *, hf_token: str | None = None,
                 cache_dir: str | os.PathLike | None = None, exporter: str = "dynamo",
                 opset: int | None = None, force: bool = False, verify_cache: bool = False,
                 trust_remote_code: bool = False):
        cache.cache_root(cache_dir)  # a cache that cannot be used fails now, not after an export
        self.source, self.gguf_file = source, gguf_file
        self.hf_token, self.cache_dir = hf_token, cache_dir
        self.exporter, self.opset, self.force = exporter, opset, force
        self.verify_cache, self.trust_remote_code = verify_cache, trust_remote_code
        self.onnx_path: Path | None = None
        self.program = None  # qeff_graph.program.Program once compiled
        self.spec = None  # its ProgramSpec
        self._tokenizer = None
        name = f"{source}/{gguf_file}" if gguf_file else source
        self.slug = cache.model_slug(gguf_file.removesuffix(".gguf") if gguf_file else source)
        self.identity = {"model": os.path.abspath(name) if os.path.exists(source) else name,
                         "exporter": exporter, "opset": opset, "version": __version__}
        if self.kind != "causal-lm":
            self.identity["kind"] = self.kind

    @property
    def program_path(self) -> Path | None:
        return self.program.path if self.program is not None else None

    @property
    def export_path(self) -> Path:
        return cache.export_dir(self.slug, cache.options_hash(**self.identity), self.cache_dir)

    def export(self, progress: bool = True) -> Path:
        """Export (unmodified ONNX) into the cache unless a sound export is already there."""
        from qeff_graph.export.exporter import read_export

        target = self.export_path
        with _progress.quiet(not progress):
            cache.sweep(self.cache_dir)
            reuse_or_build(target, "export", lambda p: read_export(p, hashes=self.verify_cache),
                           lambda: self._export_to(target), force=self.force)
        self.onnx_path = target / "model.onnx"
        return self.onnx_path

    def _export_to(self, target: Path) -> None:
        raise NotImplementedError

    def _check_resources(self, spec) -> None:
        """Checks before any long work (the causal LM estimates its KV cache here)."""

    def compile_spec(self, spec, *, progress: bool = True) -> Path:
        """Build (or reuse from the cache) the program of a :class:`~qeff_graph.program.ProgramSpec`."""
        if spec.kind != self.kind:
            raise QeffGraphError(f"a {spec.kind} program cannot be built from a {self.kind} model")
        with _progress.quiet(not progress):
            self.program = self._program(spec)
        self.spec = spec
        return self.program.path

    def _program(self, spec):
        from qeff_graph.program import Program, build_program

        for note in spec.notes():
            _progress.say(f"compile: {note}")
        self._check_resources(spec)
        onnx_path = self.onnx_path or self.export()
        target = cache.program_dir(self.slug, spec.backend, spec.cache_key(**self.identity), self.cache_dir)

        def build():
            twin = _graph_twin(target.parent, onnx_path, spec)
            _progress.say(f"compile: building {target.name} for {spec.backend}"
                          + (f" (graph shared with {twin.name})" if twin else ""))
            return build_program(twin or onnx_path, spec, target, model_name=self.identity["model"],
                                 hardlink_data=True, cache_entry=True)

        return reuse_or_build(target, "compile", lambda p: Program.open(p, hashes=self.verify_cache), build,
                              force=self.force)

    def tokenizer(self):
        """The tokenizer of the program, else of the export, else of the local source folder."""
        if self._tokenizer is None:
            base = self.program_path or (self.onnx_path.parent if self.onnx_path else None)
            if base is None and os.path.isdir(self.source) and self.gguf_file is None:
                base = Path(self.source)
            if base is None:
                raise QeffGraphError("this model has no tokenizer files yet; export or compile it first, "
                                     "or pass token ids")
            self._tokenizer = load_tokenizer(base)
        return self._tokenizer

    def _runnable(self) -> None:
        """Compile with the defaults if needed; refuse a program this machine cannot run."""
        if self.program is None:
            self.compile()
        if self.spec.backend != "ort":
            script = self.program.path / "compile.sh"
            raise QeffGraphError(f"the program in {self.program.path} is compiled for {self.spec.backend}; "
                                 f"qeff-graph runs ort programs (qaic: run {script} and use the SDK's "
                                 "runtime), or compile with backend='ort'")


def _graph_twin(programs: Path, onnx_path: Path, spec) -> Path | None:
    """A cached program of the same export whose graph ``spec`` can share (same graph options:
    only shapes or backend options differ), so its graph and weight files are hard-linked
    instead of rebuilt (a quantized graph is built once for every batch / ctx_len)."""
    from qeff_graph.artifact import read_json
    from qeff_graph.program import MANIFEST, Program, ProgramSpec

    want = {k: v for k, v in spec.graph_options().items() if k != "sliding_window"}
    source = str(onnx_path.resolve())
    for candidate in sorted(programs.glob("*-*")) if programs.is_dir() else ():
        try:
            manifest = read_json(candidate / MANIFEST, "program manifest")
            options = ProgramSpec.from_dict(manifest["options"]).graph_options()
        except (QeffGraphError, KeyError, TypeError):
            continue
        options.pop("sliding_window")
        if options == want and manifest.get("source", {}).get("path") == source:
            try:
                Program.open(candidate)  # a damaged twin is no source
            except QeffGraphError:
                continue
            return candidate
    return None


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in ``directory`` (an export or program dir); one-line errors."""
    import json

    directory = Path(directory)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                   "tokenizer.model", "vocab.json")):
        raise QeffGraphError(f"{directory} has no tokenizer files; build it from an export that has a "
                             "tokenizer (`qeff-graph export` saves one; optimize/compile copy it) or copy "
                             "them there")
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        if config.get("tokenizer_class") in _PLAIN_FAST and (directory / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer is a user problem
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QeffGraphError(f"cannot load the tokenizer in {directory}: {first}") from None
