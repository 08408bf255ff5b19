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
from pathlib import Path

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError
from qeff_graph.models.base import CachedModel, load_tokenizer

__all__ = ["QEFFAutoModelForCausalLM", "GenerateOutput", "encode_prompt", "generate_text", "load_tokenizer"]


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


class QEFFAutoModelForCausalLM(CachedModel):
    """A causal LM to export, compile for a backend and run with a retained KV cache."""

    kind = "causal-lm"

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
        from qeff_graph.export.loader import check_model_kind

        check_model_kind(name_or_path, gguf_file, "causal-lm")  # an encoder is refused before any work
        return cls(str(name_or_path), gguf_file, **kwargs)

    def _export_to(self, target: Path) -> None:
        from qeff_graph.export import export_causal_lm

        export_causal_lm(self.source, target, exporter=self.exporter, opset=self.opset, gguf_file=self.gguf_file,
                         hf_token=self.hf_token, trust_remote_code=self.trust_remote_code, cache_entry=True)

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

    def _check_resources(self, spec) -> None:
        """The KV cache must fit in memory: checked before the export starts."""
        from qeff_graph.resources import check_kv_cache_fits

        geo = self.geometry()
        if geo is not None and spec.backend == "ort":
            check_kv_cache_fits(rows=spec.rows, layers=geo.num_layers, kv_heads=geo.num_kv_heads,
                                ctx_len=spec.ctx_len, head_dim=geo.head_dim, kv_dtype=spec.kv_dtype)

    def generate(self, tokenizer=None, prompts: list[str] | str = (), generation_len: int | None = None,
                 stream: bool = False, threads: int | None = None, chat_template: bool = False,
                 write_io_dir: str | os.PathLike | None = None) -> GenerateOutput:
        """Greedy generation for ``prompts`` with the compiled program (ONNX Runtime).

        ``chat_template`` wraps each prompt as a user turn with the tokenizer's chat template
        (instruct models); ``write_io_dir`` saves the first prefill/decode step's IO as raw files.
        """
        self._runnable()
        return generate_text(self.program, tokenizer or self.tokenizer(), prompts,
                             generation_len=generation_len, stream=stream,
                             threads=threads or self.spec.threads(), chat_template=chat_template,
                             write_io_dir=write_io_dir)


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
