"""``QEFFAutoModelForCausalLM``: from_pretrained → export → compile → generate, with a cache.

Mirrors QEfficient's API. ``export()`` writes the unmodified ONNX (torch exporter) into the
cache, ``compile()`` builds a program for a :class:`~qeff_graph.program.ProgramSpec` with
:func:`~qeff_graph.program.build_program`, ``generate()`` runs it with ONNX Runtime. Cached
artifacts are reused only after they match their manifests; a broken one is rebuilt with a
one-line notice.

Speculative decoding: ``compile(num_speculative_tokens=K)`` builds a program with a verify
step of K+1 tokens; ``generate(..., draft=...)`` then drafts with prompt lookup (the default),
``"self-int4"`` (this model's int4 program, built through the same cache), another model or
program with the same tokenizer (a path, hub id, :class:`QEFFAutoModelForCausalLM` or
:class:`~qeff_graph.program.Program`), or ``"none"`` (plain decoding). :func:`resolve_draft`
turns those into a program and :func:`make_drafter` into the loop's drafter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError
from qeff_graph.models.base import CachedModel, load_tokenizer

__all__ = ["QEFFAutoModelForCausalLM", "GenerateOutput", "DRAFT_NAMES", "check_draft_options", "encode_prompt",
           "generate_text", "load_tokenizer", "make_drafter", "resolve_draft"]

# --draft values that are not a model: plain decoding, prompt lookup, this model's int4 program
DRAFT_NAMES = ("none", "prompt-lookup", "self-int4")
# self-int4's MatMulNBits compute: a draft only proposes (the target verifies every token), so int8
# activations are fine. Measured on SmolLM2-135M (2-core AVX2, ctx 384, the GGUF's own blocks): a
# decode step takes 9.0 ms at level 4 against 14.6 ms at level 1 (fp32: 22.5 ms), two tokens 10.3 against
# 23.0 ms, and 96.6% of its next tokens equal fp32's (6 chat prompts x 64 tokens, teacher-forced).
SELF_DRAFT_ACCURACY_LEVEL = 4


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
                weight_bits: int | None = None, num_speculative_tokens: int | None = None,
                progress: bool = True, **kwargs) -> Path:
        """Build (or reuse from the cache) the program for these options; returns its folder.

        Options left ``None`` take :data:`qeff_graph.program.DEFAULTS` (prompt_len 32, ctx_len
        128, batch 1, float32 KV); what each QEfficient flag means per backend is documented on
        :class:`~qeff_graph.program.ProgramSpec`. ``num_speculative_tokens=K`` adds the verify
        step of speculative decoding (K+1 tokens, logits for each). The KV cache size is checked
        against the available memory before the export starts.
        """
        from qeff_graph.program import ProgramSpec

        options = dict(prompt_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size,
                       full_batch_size=full_batch_size, num_cores=num_cores, mxfp6=mxfp6_matmul,
                       mxint8=mxint8_kv_cache, backend=backend, kv_dtype=kv_dtype, device_group=device_group,
                       mos=mos, aic_enable_depth_first=aic_enable_depth_first, aic_hw_version=aic_hw_version,
                       weight_bits=weight_bits, num_speculative_tokens=num_speculative_tokens, **kwargs)
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
                 write_io_dir: str | os.PathLike | None = None, draft=None,
                 lookup_ngram: int | None = None) -> GenerateOutput:
        """Greedy generation for ``prompts`` with the compiled program (ONNX Runtime).

        ``chat_template`` wraps each prompt as a user turn with the tokenizer's chat template
        (instruct models); ``write_io_dir`` saves the first prefill/decode step's IO as raw files.
        With a program compiled with ``num_speculative_tokens``, ``draft`` picks the drafter
        (module docstring; default prompt lookup over ``lookup_ngram``-grams, default 3): the
        tokens stay those of plain greedy decoding, ``perf`` adds the acceptance rate.
        """
        self._runnable()
        check_draft_options(draft, lookup_ngram, self.spec)
        draft = resolve_draft(draft, self.program, model=self)
        return generate_text(self.program, tokenizer or self.tokenizer(), prompts,
                             generation_len=generation_len, stream=stream,
                             threads=threads or self.spec.threads(), chat_template=chat_template,
                             write_io_dir=write_io_dir, draft=draft, lookup_ngram=lookup_ngram)

    def draft_program(self, draft: str):
        """The program of a draft for this model's program: ``"self-int4"`` (this model with
        4-bit weights, int8 compute: ``SELF_DRAFT_ACCURACY_LEVEL``) or another model (a path or hub
        id) compiled through this model's cache with the same shapes; returns a
        :class:`~qeff_graph.program.Program`."""
        self._runnable()
        shapes = _draft_spec(self.spec)
        if draft == "self-int4":
            twin = type(self)(self.source, self.gguf_file, hf_token=self.hf_token, cache_dir=self.cache_dir,
                              exporter=self.exporter, opset=self.opset, verify_cache=self.verify_cache,
                              trust_remote_code=self.trust_remote_code)
            twin.onnx_path = self.onnx_path
            twin.compile_spec(dataclasses.replace(shapes, weight_bits=4, accuracy_level=SELF_DRAFT_ACCURACY_LEVEL))
            return twin.program
        if os.path.isdir(draft) and _same_tokenizer(self.program.path, Path(draft)) is False:
            raise QeffGraphError(f"the draft {draft} has another tokenizer than the target; speculative decoding "
                                 "needs the same tokenizer: pick a draft of the same model family")  # before its export
        other = type(self).from_pretrained(draft, hf_token=self.hf_token, cache_dir=self.cache_dir,
                                           exporter=self.exporter, verify_cache=self.verify_cache,
                                           trust_remote_code=self.trust_remote_code)
        other.compile_spec(shapes)
        return other.program


def _draft_spec(spec):
    """A draft program's spec for a target's: same shapes, backend ort, no verify step, full precision."""
    from qeff_graph.program import ProgramSpec

    return ProgramSpec(ctx_len=spec.ctx_len, prompt_len=spec.prompt_len, batch_size=spec.batch_size,
                       full_batch_size=spec.full_batch_size, kv_dtype=spec.kv_dtype, num_cores=spec.num_cores)


def check_draft_options(draft, lookup_ngram: int | None, spec) -> None:
    """``draft``/``lookup_ngram`` fit the program: checked before any long work."""
    k = spec.num_speculative_tokens
    if draft is not None and draft != "none" and k is None:
        raise QeffGraphError("--draft needs a program compiled with --num-speculative-tokens K (its verify step); "
                             "add --num-speculative-tokens, or drop --draft")
    if lookup_ngram is not None:
        if k is None:
            raise QeffGraphError("--lookup-ngram applies to speculative decoding; add --num-speculative-tokens K")
        if draft not in (None, "prompt-lookup"):
            raise QeffGraphError(f"--lookup-ngram applies to --draft prompt-lookup, not to --draft {draft}; drop it")
        if not isinstance(lookup_ngram, int) or isinstance(lookup_ngram, bool) or lookup_ngram < 1:
            raise QeffGraphError(f"--lookup-ngram must be an integer >= 1, got {lookup_ngram!r}")


def resolve_draft(draft, program, *, model: QEFFAutoModelForCausalLM | None = None, cache_dir=None):
    """What ``generate_text`` takes as ``draft``: ``None`` (prompt lookup if ``program`` has a verify
    step), ``"none"``, ``"prompt-lookup"``, a draft :class:`~qeff_graph.program.Program` (built
    here from ``"self-int4"``, a model path or hub id, or a :class:`QEFFAutoModelForCausalLM`), or
    a :class:`~qeff_graph.generation.Drafter` as given. A draft program is checked against the
    target: same tokenizer (or vocabulary size when either has no tokenizer), ort backend,
    continuous batching alike."""
    from qeff_graph.generation import Drafter
    from qeff_graph.program import Program, is_program_dir

    if draft is None or isinstance(draft, Drafter) or draft in ("none", "prompt-lookup"):
        return draft
    if program.spec.num_speculative_tokens is None:
        check_draft_options(draft, None, program.spec)
    if isinstance(draft, QEFFAutoModelForCausalLM):
        if draft.program is None:
            draft.compile_spec(_draft_spec(program.spec))
        found = draft.program
    elif isinstance(draft, Program):
        found = draft
    elif not isinstance(draft, (str, os.PathLike)):
        raise QeffGraphError(f"draft must be one of {', '.join(DRAFT_NAMES)}, a model path or id, a program "
                             f"or a QEFFAutoModelForCausalLM, got {type(draft).__name__}")
    elif is_program_dir(draft):
        found = Program.open(draft)
    elif draft == "self-int4":
        if model is None:
            raise QeffGraphError(f"--draft self-int4 needs the model the program was built from; use `qeff-graph infer`, "
                                 f"or build the int4 program (`qeff-graph compile {program.path} -o DRAFT --weight-bits "
                                 "4 --accuracy-level 4`) and pass --draft DRAFT")
        found = model.draft_program("self-int4")
    elif model is not None:
        found = model.draft_program(str(draft))
    else:
        other = QEFFAutoModelForCausalLM.from_pretrained(str(draft), cache_dir=cache_dir)
        other.compile_spec(_draft_spec(program.spec))
        found = other.program
    check_draft_program(program, found, name=str(draft) if isinstance(draft, (str, os.PathLike)) else None)
    return found


def _vocab(program) -> int | None:
    out = next((o for o in program.manifest.get("io", {}).get("outputs", []) if o.get("name") == "logits"), None)
    size = out["shape"][-1] if out and out.get("shape") else None
    return size if isinstance(size, int) else None


def check_draft_program(target, draft, *, name: str | None = None) -> None:
    """A draft program must run here, batch like the target and speak its tokenizer."""
    label = name or str(draft.path)
    spec = draft.spec
    if spec.kind != "causal-lm" or spec.backend != "ort":
        raise QeffGraphError(f"the draft {label} is a {spec.kind} program for --backend {spec.backend}; a draft must "
                             "be a causal-LM program for --backend ort")
    inputs = {v["name"] for v in draft.manifest.get("io", {}).get("inputs", [])}
    if ("batch_index" in inputs) != bool(target.spec.full_batch_size):
        raise QeffGraphError(f"the draft {label} was compiled {'with' if 'batch_index' in inputs else 'without'} "
                             f"continuous batching and the target {'with' if target.spec.full_batch_size else 'without'}; "
                             "compile the draft with the target's --full-batch-size")
    same = _same_tokenizer(target.path, draft.path)
    if same is False:
        raise QeffGraphError(f"the draft {label} has another tokenizer than the target; speculative decoding needs the "
                             "same tokenizer: pick a draft of the same model family")
    if same is None and _vocab(draft) != _vocab(target):
        raise QeffGraphError(f"the draft {label} has a vocabulary of {_vocab(draft)} tokens, the target {_vocab(target)}; "
                             "speculative decoding needs the same tokenizer: pick a draft of the same model family")


def _same_tokenizer(a: Path, b: Path) -> bool | None:
    """True/False when both folders hold a tokenizer (same bytes, else the same token → id map),
    None when either has none."""
    from qeff_graph.artifact import file_sha256

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((a / f).exists() for f in files) or not any((b / f).exists() for f in files):
        return None
    if (a / "tokenizer.json").exists() and (b / "tokenizer.json").exists() \
            and file_sha256(a / "tokenizer.json") == file_sha256(b / "tokenizer.json"):
        return True
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    return ta.get_vocab() == tb.get_vocab() and ta.eos_token_id == tb.eos_token_id


def make_drafter(program, draft, *, lookup_ngram: int | None = None, threads: int | None = None, session=None):
    """The loop's :class:`~qeff_graph.generation.Drafter` for ``program`` (``draft`` as
    :func:`resolve_draft` returns it), or None for plain greedy decoding. ``session``: an ONNX
    Runtime session of the draft program to share (its weights in memory once)."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import Drafter, ProgramDrafter, PromptLookup
    from qeff_graph.generation.speculative import DEFAULT_LOOKUP_NGRAM

    spec = program.spec
    k = spec.num_speculative_tokens
    if draft == "none" or (draft is None and k is None):
        return None
    if k is None:
        check_draft_options("a draft", None, spec)  # raises: no verify step
    if isinstance(draft, Drafter):
        if draft.k != k:
            raise QeffGraphError(f"the drafter proposes {draft.k} tokens but the program verifies {k}; give it "
                                 f"k={k}")
        return draft
    if draft is None or draft == "prompt-lookup":
        return PromptLookup(k, lookup_ngram or DEFAULT_LOOKUP_NGRAM)
    session = RetainedStateSession(draft.path, batch_size=spec.rows, ctx_len=spec.ctx_len, threads=threads,
                                   session=session)
    label = "self-int4" if draft.spec.weight_bits == 4 and draft.manifest.get("model_name") == \
        program.manifest.get("model_name") else f"draft:{draft.manifest.get('model_name') or draft.path}"
    return ProgramDrafter(session, k=k, prompt_len=draft.spec.prompt_len, name=label, vocab_limit=_vocab(program))


def generate_text(program, tokenizer, prompts: list[str] | str, *, generation_len: int | None = None,
                  stream: bool = False, threads: int | None = None, chat_template: bool = False,
                  write_io_dir: str | os.PathLike | None = None, draft=None,
                  lookup_ngram: int | None = None) -> GenerateOutput:
    """Tokenize ``prompts``, run ``program`` (a :class:`~qeff_graph.program.Program`) with its
    manifest's shapes, decode the text. Continuous batching when it has ``full_batch_size``;
    speculative decoding when it has ``num_speculative_tokens`` (``draft`` as :func:`resolve_draft`
    returns it; default prompt lookup)."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import PromptStreamer, generate_ids

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise QeffGraphError("no prompt given; pass --prompt or --prompts-txt-file-path")
    ids = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    spec = program.spec
    drafter = make_drafter(program, draft, lookup_ngram=lookup_ngram, threads=threads)
    session = RetainedStateSession(program.path, batch_size=spec.rows, ctx_len=spec.ctx_len,
                                   threads=threads, write_io_dir=write_io_dir)
    streamer = PromptStreamer(prompts, lambda t: tokenizer.decode(t, skip_special_tokens=True)) if stream else None
    _progress.checkpoint("generate")
    busy = contextlib.nullcontext() if stream else _progress.task(f"generate: {len(prompts)} prompt(s)")
    with busy:
        result = generate_ids(session, ids, prompt_len=spec.prompt_len, generation_len=generation_len,
                              eos_token_id=tokenizer.eos_token_id,
                              on_tokens=streamer.on_tokens if streamer else None,
                              on_finish=streamer.on_finish if streamer else None, drafter=drafter)
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
