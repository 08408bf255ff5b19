"""``QEFFAutoModelForCausalLM``: from_pretrained → export → compile → generate, with a cache.

Mirrors QEfficient's API. ``export()`` writes the unmodified ONNX (torch exporter) into the
cache, ``compile()`` builds a program for a :class:`~qeff_graph.program.ProgramSpec` with
:func:`~qeff_graph.program.build_program`, ``generate()`` runs it with ONNX Runtime. Cached
artifacts are reused only after they match their manifests; a broken one is rebuilt with a
one-line notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from qeff_graph import __version__, cache
from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

__all__ = ["QEFFAutoModelForCausalLM", "GenerateOutput", "encode_prompt", "generate_text", "load_tokenizer",
           "reuse_or_build"]

# tokenizer classes that are the `tokenizers` backend itself: loaded without AutoTokenizer,
# whose import chain pulls in torch (~2 s of a cached `infer`)
_PLAIN_FAST = {"TokenizersBackend", "PreTrainedTokenizerFast"}


@dataclasses.dataclass
class GenerateOutput:
    prompts: list[str]
    generated_texts: list[str]
    generated_ids: list[list[int]]
    stop_reasons: list[str]
    perf: dict

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "generated_texts": self.generated_texts,
                "generated_ids": self.generated_ids, "stop_reasons": self.stop_reasons,
                "perf": self.perf}


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


class QEFFAutoModelForCausalLM:
    """A causal LM to export, compile for a backend and run with a retained KV cache."""

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

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, gguf_file: str | None = None, **kwargs):
        """A local HF dir, a ``.gguf`` file (or dir + ``gguf_file``), a hub id, or ``None`` for
        the embedded default model (SmolLM2-135M-Instruct). Keyword arguments: ``hf_token``,
        ``cache_dir``, ``exporter``, ``opset``, ``force``, ``verify_cache`` (hash every cached
        file before reuse), ``trust_remote_code`` (run Python code shipped with the model)."""
        if name_or_path is None:
            from qeff_graph.export import default_model_path

            directory, gguf_file = default_model_path()
            name_or_path = str(directory)
        elif str(name_or_path).endswith(".gguf") and gguf_file is None:
            name_or_path, gguf_file = os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
        return cls(str(name_or_path), gguf_file, **kwargs)

    @property
    def program_path(self) -> Path | None:
        return self.program.path if self.program is not None else None

    @property
    def export_path(self) -> Path:
        return cache.export_dir(self.slug, cache.options_hash(**self.identity), self.cache_dir)

    def export(self, progress: bool = True) -> Path:
        """Export (unmodified ONNX) into the cache unless a sound export is already there."""
        from qeff_graph.export import export_causal_lm
        from qeff_graph.export.exporter import ExportResult

        target = self.export_path
        with _progress.quiet(not progress):
            cache.sweep(self.cache_dir)
            result = reuse_or_build(
                target, "export", lambda p: ExportResult.read(p, hashes=self.verify_cache),
                lambda: export_causal_lm(self.source, target, exporter=self.exporter, opset=self.opset,
                                         gguf_file=self.gguf_file, hf_token=self.hf_token,
                                         trust_remote_code=self.trust_remote_code, cache_entry=True),
                force=self.force)
        self.onnx_path = result.onnx_path
        return self.onnx_path

    def geometry(self):
        """``KVGeometry`` from the cached export, else from the model's config (None if unknown)."""
        from qeff_graph.artifact import read_json
        from qeff_graph.export.loader import KVGeometry, model_geometry

        try:
            info = read_json(self.export_path / "export.json", "export manifest")
            return KVGeometry(info["num_layers"], info["num_kv_heads"], info["head_dim"], info["vocab_size"])
        except (QeffGraphError, KeyError):
            with _progress.task("compile: reading the model config (KV cache size check)"):
                return model_geometry(self.source, self.gguf_file, trust_remote_code=self.trust_remote_code)

    def compile(self, prefill_seq_len: int | None = None, ctx_len: int | None = None,
                batch_size: int | None = None, full_batch_size: int | None = None,
                num_cores: int | None = None, mxfp6_matmul: bool = False, mxint8_kv_cache: bool = False,
                backend: str = "ort", *, kv_dtype: str | None = None, device_group: list[int] | None = None,
                mos: int | None = None, aic_enable_depth_first: bool = False, aic_hw_version: str | None = None,
                weight_bits: int | None = None, progress: bool = True, **kwargs) -> Path:
        """Build (or reuse from the cache) the program for these options; returns its folder.

        Options left ``None`` take :data:`qeff_graph.program.DEFAULTS` (prompt_len 32, ctx_len
        128, batch 1, float32 KV); what each QEfficient flag means per backend is documented on
        :class:`~qeff_graph.program.ProgramSpec`. The KV cache size is checked against the
        available memory before the export starts.
        """
        from qeff_graph.program import ProgramSpec

        options = dict(prompt_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size,
                       full_batch_size=full_batch_size, num_cores=num_cores, mxfp6=mxfp6_matmul,
                       mxint8=mxint8_kv_cache, backend=backend, kv_dtype=kv_dtype, device_group=device_group,
                       mos=mos, aic_enable_depth_first=aic_enable_depth_first, aic_hw_version=aic_hw_version,
                       weight_bits=weight_bits, **kwargs)
        try:
            spec = ProgramSpec(**{k: v for k, v in options.items() if v is not None})
        except TypeError as exc:
            raise QeffGraphError(f"compile(): {exc}") from None
        return self.compile_spec(spec, progress=progress)

    def compile_spec(self, spec, *, progress: bool = True) -> Path:
        """:meth:`compile` for a ready :class:`~qeff_graph.program.ProgramSpec` (what ``infer`` uses)."""
        with _progress.quiet(not progress):
            self.program = self._program(spec)
        self.spec = spec
        return self.program.path

    def _program(self, spec):
        from qeff_graph.program import Program, build_program
        from qeff_graph.resources import check_kv_cache_fits

        for note in spec.notes():
            _progress.say(f"compile: {note}")
        geo = self.geometry()
        if geo is not None and spec.backend == "ort":
            check_kv_cache_fits(rows=spec.rows, layers=geo.num_layers, kv_heads=geo.num_kv_heads,
                                ctx_len=spec.ctx_len, head_dim=geo.head_dim, kv_dtype=spec.kv_dtype)
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
        if self._tokenizer is None:
            base = self.program_path or (self.onnx_path.parent if self.onnx_path else None)
            if base is None:
                raise QeffGraphError("this model has no tokenizer files yet; export or compile it first, "
                                     "or pass prompts as token ids")
            self._tokenizer = load_tokenizer(base)
        return self._tokenizer

    def generate(self, tokenizer=None, prompts: list[str] | str = (), generation_len: int | None = None,
                 stream: bool = False, threads: int | None = None, chat_template: bool = False,
                 write_io_dir: str | os.PathLike | None = None) -> GenerateOutput:
        """Greedy generation for ``prompts`` with the compiled program (ONNX Runtime).

        ``chat_template`` wraps each prompt as a user turn with the tokenizer's chat template
        (instruct models); ``write_io_dir`` saves the first prefill/decode step's IO as raw files.
        """
        if self.program is None:
            self.compile()
        if self.spec.backend != "ort":
            script = self.program.path / "compile.sh"
            raise QeffGraphError(f"the program in {self.program.path} is compiled for {self.spec.backend}; "
                                 f"qeff-graph runs ort programs (qaic: run {script} and use the SDK's "
                                 "runtime), or compile with backend='ort'")
        return generate_text(self.program, tokenizer or self.tokenizer(), prompts,
                             generation_len=generation_len, stream=stream,
                             threads=threads or self.spec.threads(), chat_template=chat_template,
                             write_io_dir=write_io_dir)


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


def generate_text(program, tokenizer, prompts: list[str] | str, *, generation_len: int | None = None,
                  stream: bool = False, threads: int | None = None, chat_template: bool = False,
                  write_io_dir: str | os.PathLike | None = None) -> GenerateOutput:
    """Tokenize ``prompts``, run ``program`` (a :class:`~qeff_graph.program.Program`) with its
    manifest's shapes, decode the text. Continuous batching when it has ``full_batch_size``."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import PromptStreamer, generate_ids

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise QeffGraphError("no prompt given; pass --prompt or --prompts-txt-file-path")
    ids = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    spec = program.spec
    session = RetainedStateSession(program.path, batch_size=spec.rows, ctx_len=spec.ctx_len,
                                   threads=threads, write_io_dir=write_io_dir)
    streamer = PromptStreamer(prompts, lambda t: tokenizer.decode(t, skip_special_tokens=True)) if stream else None
    _progress.checkpoint("generate")
    busy = contextlib.nullcontext() if stream else _progress.task(f"generate: {len(prompts)} prompt(s)")
    with busy:
        result = generate_ids(session, ids, prompt_len=spec.prompt_len, generation_len=generation_len,
                              eos_token_id=tokenizer.eos_token_id,
                              on_tokens=streamer.on_tokens if streamer else None,
                              on_finish=streamer.on_finish if streamer else None)
    if streamer is not None:
        streamer.close()
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in result.generated_ids]
    return GenerateOutput(prompts, texts, result.generated_ids, result.stop_reasons, result.perf)


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of ``prompt``; with ``chat_template``, as one user turn plus the generation prompt."""
    if not chat_template:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise QeffGraphError("this tokenizer has no chat template; drop --chat-template (base "
                             "models take plain prompts)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
