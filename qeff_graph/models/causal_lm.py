"""``QEFFAutoModelForCausalLM``: from_pretrained → export → compile → generate, with a cache.

Mirrors QEfficient's API. ``export()`` writes the unmodified ONNX (torch exporter) into the
cache, ``compile()`` runs the retained-KV pipeline into a program directory, ``generate()``
runs it with ONNX Runtime. Artifacts that already exist in the cache are reused.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from qeff_graph import __version__, cache
from qeff_graph.errors import QeffGraphError

__all__ = ["QEFFAutoModelForCausalLM", "GenerateOutput", "encode_prompt", "generate_text", "load_tokenizer"]

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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class QEFFAutoModelForCausalLM:
    """A causal LM to export, compile for a backend and run with a retained KV cache."""

    def __init__(self, source: str, gguf_file: str | None = None, *, hf_token: str | None = None,
                 cache_dir: str | os.PathLike | None = None, exporter: str = "dynamo",
                 opset: int | None = None, force: bool = False):
        self.source, self.gguf_file = source, gguf_file
        self.hf_token, self.cache_dir = hf_token, cache_dir
        self.exporter, self.opset, self.force = exporter, opset, force
        self.onnx_path: Path | None = None
        self.program_path: Path | None = None
        self.compile_options: dict = {}
        self.backend = "ort"
        self.threads: int | None = None  # ORT intra-op threads (compile's num_cores on ort)
        name = f"{source}/{gguf_file}" if gguf_file else source
        self.slug = cache.model_slug(gguf_file.removesuffix(".gguf") if gguf_file else source)
        self.identity = {"model": os.path.abspath(name) if os.path.exists(source) else name,
                         "exporter": exporter, "opset": opset, "version": __version__}

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, gguf_file: str | None = None, **kwargs):
        """A local HF dir, a ``.gguf`` file (or dir + ``gguf_file``), a hub id, or ``None`` for
        the embedded default model (SmolLM2-135M-Instruct)."""
        if name_or_path is None:
            from qeff_graph.export import default_model_path

            directory, gguf_file = default_model_path()
            name_or_path = str(directory)
        elif str(name_or_path).endswith(".gguf") and gguf_file is None:
            name_or_path, gguf_file = os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
        return cls(str(name_or_path), gguf_file, **kwargs)

    def export(self, progress: bool = True) -> Path:
        """Export (unmodified ONNX) into the cache unless it is already there."""
        target = cache.export_dir(self.slug, cache.options_hash(**self.identity), self.cache_dir)
        onnx_path = target / "model.onnx"
        if onnx_path.exists() and not self.force:
            if progress:
                _say(f"export: reusing {target}")
        else:
            from qeff_graph.export import export_causal_lm

            export_causal_lm(self.source, target, exporter=self.exporter, opset=self.opset,
                             gguf_file=self.gguf_file, hf_token=self.hf_token, progress=progress)
        self.onnx_path = onnx_path
        return onnx_path

    def compile(self, prefill_seq_len: int = 32, ctx_len: int = 128, batch_size: int = 1,
                full_batch_size: int | None = None, num_cores: int = 16, mxfp6_matmul: bool = False,
                mxint8_kv_cache: bool = False, backend: str = "ort", *, kv_dtype: str = "float32",
                device_group: list[int] | None = None, mos: int | None = None,
                aic_enable_depth_first: bool = False, aic_hw_version: str = "2.0",
                weight_bits: int | None = None, progress: bool = True) -> Path:
        """Optimize the export into a program directory for ``backend`` (cached).

        ``ort``: ``mxfp6_matmul`` lowers the MatMul weights to 8-bit blocks (``matmul-nbits``,
        ``weight_bits`` picks 4 or 8); ``mxint8_kv_cache`` stores the KV cache in float16 (ONNX
        Runtime has no MXINT8 tensors; see :mod:`qeff_graph.backends.ort.options`);
        ``num_cores`` caps the CPU threads; one device only.
        ``qaic``: writes ``compile.sh`` for ``qaic-exec`` with these options and runs it when
        the Cloud AI 100 SDK is installed.
        """
        if backend not in ("ort", "qaic"):
            raise QeffGraphError(f"unknown backend {backend!r}; use ort or qaic")
        if num_cores < 1:
            raise QeffGraphError(f"num_cores must be >= 1, got {num_cores}")
        from qeff_graph.backends.ort.options import ort_program_options
        from qeff_graph.program import copy_side_files, optimize

        options = dict(prompt_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size,
                       full_batch_size=full_batch_size, kv_dtype=kv_dtype)
        qaic = {}
        if backend == "ort":
            if mos is not None or aic_enable_depth_first:
                raise QeffGraphError("mos and aic_enable_depth_first only apply to backend='qaic'")
            if device_group and len(device_group) > 1:
                raise QeffGraphError(f"--device-group {','.join(map(str, device_group))}: ONNX Runtime "
                                     "runs on one CPU here; multi-device partitioning needs --backend qaic")
            lowered, notes = ort_program_options(mxfp6=mxfp6_matmul, mxint8=mxint8_kv_cache,
                                                 weight_bits=weight_bits, kv_dtype=kv_dtype)
            options.update(lowered)
            for note in notes if progress else ():
                _say(f"compile: {note}")
            self.threads = min(num_cores, len(os.sched_getaffinity(0)))
        else:
            qaic = dict(num_cores=num_cores, mxfp6=mxfp6_matmul, mxint8=mxint8_kv_cache, mos=mos,
                        aic_enable_depth_first=aic_enable_depth_first, device_group=device_group,
                        hw_version=aic_hw_version)
        onnx_path = self.onnx_path or self.export(progress)
        digest = cache.options_hash(**self.identity, backend=backend, **options, **qaic)
        target = cache.program_dir(self.slug, backend, digest, self.cache_dir)
        if (target / "qeff_graph.json").exists() and not self.force:
            if progress:
                _say(f"compile: reusing {target}")
        else:
            if progress:
                _say(f"compile: optimizing for {backend} …")
            optimize(onnx_path, target, **options)
            copy_side_files(onnx_path.parent, target)  # tokenizer next to the program
            if qaic:
                from qeff_graph.backends.qaic import compile_qaic

                result = compile_qaic(target, **qaic)
                if progress:
                    _say(f"compile: qaic-exec {'ran' if result.executed else 'not found'}; "
                         f"the command is in {result.script}")
        self.program_path = target
        self.compile_options = options
        self.backend = backend
        return target

    def tokenizer(self):
        base = self.program_path or (self.onnx_path.parent if self.onnx_path else None)
        if base is None or not (base / "tokenizer_config.json").exists():
            raise QeffGraphError("this model has no tokenizer files; pass prompts as token ids")
        return load_tokenizer(base)

    def generate(self, tokenizer=None, prompts: list[str] | str = (), generation_len: int | None = None,
                 stream: bool = False, threads: int | None = None, chat_template: bool = False,
                 write_io_dir: str | os.PathLike | None = None) -> GenerateOutput:
        """Greedy generation for ``prompts`` with the compiled program (ONNX Runtime).

        ``chat_template`` wraps each prompt as a user turn with the tokenizer's chat template
        (instruct models); ``write_io_dir`` saves the first prefill/decode step's IO as raw files.
        """
        if self.program_path is None:
            self.compile()
        if self.backend != "ort":
            script = self.program_path / "compile.sh"
            raise QeffGraphError(f"the program in {self.program_path} is compiled for {self.backend}; "
                                 f"qeff-graph runs ort programs (qaic: run {script} and use the SDK's "
                                 "runtime), or compile with backend='ort'")
        return generate_text(self.program_path, self.compile_options, tokenizer or self.tokenizer(),
                             prompts, generation_len=generation_len, stream=stream,
                             threads=threads or self.threads, chat_template=chat_template,
                             write_io_dir=write_io_dir)


def generate_text(program_path, options: dict, tokenizer, prompts: list[str] | str,
                  generation_len: int | None = None, stream: bool = False,
                  threads: int | None = None, chat_template: bool = False,
                  write_io_dir: str | os.PathLike | None = None) -> GenerateOutput:
    """Tokenize ``prompts``, run a program with ``options`` (its manifest's), decode the text.

    Uses continuous batching when the program was built with ``full_batch_size``.
    """
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import generate_continuous, generate_ids

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise QeffGraphError("no prompt given; pass --prompt or --prompts-txt-file-path")
    ids = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    rows = options.get("full_batch_size") or options["batch_size"]
    session = RetainedStateSession(program_path, batch_size=rows, ctx_len=options["ctx_len"],
                                   threads=threads, write_io_dir=write_io_dir)
    on_tokens = None
    if stream:
        def on_tokens(i, toks):
            print(tokenizer.decode(toks, skip_special_tokens=True), end="", flush=True)
    run = generate_continuous if options.get("full_batch_size") else generate_ids
    result = run(session, ids, prompt_len=options["prompt_len"], generation_len=generation_len,
                 eos_token_id=tokenizer.eos_token_id, on_tokens=on_tokens)
    if stream:
        print()
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
        raise QeffGraphError(f"{directory} has no tokenizer files; compile it from an export that "
                             "has a tokenizer (qeff-graph export saves one) or copy them there")
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        if config.get("tokenizer_class") in _PLAIN_FAST and (directory / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer is a user problem
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QeffGraphError(f"cannot load the tokenizer in {directory}: {first}") from None
