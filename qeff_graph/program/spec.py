"""``ProgramSpec``: every option that defines a program, with its defaults and validation.

One frozen object per program. It is built from CLI flags, Python keyword arguments or a
program's manifest and checked once, in :meth:`ProgramSpec.__post_init__`: a bad value is a
one-line :class:`~qeff_graph.errors.QeffGraphError` naming the flag and the fix, raised before
any long work. QEfficient's backend flags are mapped here and nowhere else:

=====================  =============================================  ================================
option                 ``qaic``                                       ``ort``
=====================  =============================================  ================================
``mxfp6``              ``-mxfp6-matmul``                              ``weight_bits=8`` (MatMulNBits; an
                                                                      encoder: int8 compute)
``mxint8``             ``-mxint8`` + ``mxint8`` KV in custom_io.yaml  ``kv_dtype="float16"``
``num_cores``          ``-aic-num-cores`` (default 16)                CPU threads, capped at the cores
``device_group``       several devices → ``mdp.json``                 one device only
``mos``, depth-first   ``-mos``, ``-aic-enable-depth-first``          an error
=====================  =============================================  ================================

``num_speculative_tokens=K`` (speculative decoding, both backends) adds a *verify*
specialization of seq_len ``K+1`` after prefill and decode; the ``last-token-logits`` pass then
returns every position's logits for a step of at most ``K+1`` tokens (``[batch, K+1, vocab]``
for the verify step) and only the last valid one for longer (prefill) steps. ``K+1`` must fit in
a prefill chunk (``K+1 <= prompt_len``), as QEfficient requires.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from qeff_graph.errors import QeffGraphError

__all__ = ["ProgramSpec", "DEFAULTS", "BACKENDS", "KINDS", "KV_DTYPES", "GRAPH_FIELDS", "QAIC_FIELDS",
           "ENCODER_SEQ_LEN", "ORT_LOWERING"]

BACKENDS = ("ort", "qaic")
KINDS = ("causal-lm", "encoder")
KV_DTYPES = ("float32", "float16")
QAIC_DEFAULT_CORES = 16
ENCODER_SEQ_LEN = 128  # the encoder's seq_len specialization when none is given
# fields that change model.onnx (the rest only change specializations, IO precisions, backend files)
GRAPH_FIELDS = ("kind", "kv_dtype", "weight_bits", "passes", "sliding_window", "full_batch_size", "pooling",
                "normalize", "num_speculative_tokens", "weight_scheme", "ort_lowering", "accuracy_level")
# how weight_bits quantizes (matmul-nbits; an encoder's: matmul-int8): 6 = as 5, 8-bit blocks at float
# compute as two 4-bit MatMulNBits over A, added (5: one over [A, A]); encoders' int8 MatMuls first
# appear here; 5 = as 4, and a GGUF's Q5_0/Q5_1/Q4_K/Q5_K/Q6_K tensors
# carried (no longer re-quantized); 4 = as 3, with the MatMuls of one input packed into one
# MatMulNBits (Q/K/V, gate/up); 3 = blocks with a float minimum, a GGUF export's own blocks carried,
# float compute (issue 11); 1 = symmetric re-quantization, int8 compute (programs built before: their
# manifests lack the field); 2 = development builds of issue 11 (never reused)
WEIGHT_SCHEME = 6
# programs on ort are lowered to ONNX Runtime's kernels (encoders: the ort-fuse-encoder pass; causal
# LMs: ort-gqa where it proves every layer, else ort-valid-attention); this version is part of their cache
# key. 0: the portable graph (ort_lowering=0, and manifests built before the lowering, which lack the
# field; qaic: None); 1: attention over the valid length only (no GroupQueryAttention)
ORT_LOWERING = 2
ORT_LOWERINGS = (0, 1, 2)
# causal-LM options an encoder program must leave at their defaults
_CAUSAL_ONLY = ("ctx_len", "prompt_len", "full_batch_size", "kv_dtype", "mxint8",
                "num_speculative_tokens", "accuracy_level")
QAIC_FIELDS = ("num_cores", "mos", "aic_enable_depth_first", "device_group", "aic_hw_version")


def _flag(name: str) -> str:
    return "--" + {"seq_lens": "seq_len"}.get(name, name).replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """The options a program is built for. Defaults: ctx_len 128, prompt_len 32, batch 1, fp32 KV.

    ``kind="encoder"`` (embedding models): ``seq_lens`` are the sequence-length
    specializations (default 128; the runtime pads a batch to the smallest that fits),
    ``pooling`` (mean | cls | max) and ``normalize`` append sentence-embedding pooling; the
    causal-LM options (ctx_len, prompt_len, KV cache, full batch, weight bits) do not apply.

    On ort a program is lowered to ONNX Runtime (``ort_lowering``, default ``ORT_LOWERING``): an
    encoder's attention becomes ORT's fused Attention (``ort-fuse-encoder``), a causal LM's attention
    becomes ``GroupQueryAttention`` (``ort-gqa``, where every layer is proven) or else attends over the
    valid length of its cache (``ort-valid-attention``; ``ort_lowering=1`` asks for this one only), and
    its RMSNorms become ``SimplifiedLayerNormalization``. ``ort_lowering=0`` keeps the portable graph,
    as qaic always does.
    """

    ctx_len: int = 128
    prompt_len: int = 32
    batch_size: int = 1
    full_batch_size: int | None = None
    kv_dtype: str = "float32"
    weight_bits: int | None = None
    passes: tuple[str, ...] | None = None  # None: the default retained-kv pipeline
    # "auto": config.json beside the model (per layer, whatever the key); windows >= ctx_len mask nothing
    sliding_window: int | tuple[int | None, ...] | str | None = "auto"
    backend: str = "ort"
    num_cores: int | None = None
    mxfp6: bool = False
    mxint8: bool = False
    mos: int | None = None
    aic_enable_depth_first: bool = False
    device_group: tuple[int, ...] | None = None
    aic_hw_version: str = "2.0"
    kind: str = "causal-lm"
    seq_lens: tuple[int, ...] | None = None
    pooling: str | None = None
    normalize: bool = False
    num_speculative_tokens: int | None = None  # K: a verify step of K+1 tokens (speculative decoding)
    weight_scheme: int | None = None  # set from weight_bits: WEIGHT_SCHEME (older manifests: 1)
    ort_lowering: int | None = None  # on ort: ORT_LOWERING (0: portable; older manifests: 0); qaic: None
    # MatMulNBits compute (with weight_bits): None = matmul-nbits' measured default (1, float compute:
    # exactly the weights written); 4 = int8 activations, faster, moves greedy text (speculative drafts)
    accuracy_level: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__.__get__(self)  # frozen: normalize in place, once
        if self.kind not in KINDS:
            raise QeffGraphError(f"unknown program kind {self.kind!r}; use one of {', '.join(KINDS)}")
        self._check_kind(set_)
        for name in ("ctx_len", "prompt_len", "batch_size"):
            _positive(name, getattr(self, name))
        for name in ("full_batch_size", "num_cores", "mos"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.ctx_len < self.prompt_len:
            raise QeffGraphError(f"--ctx-len ({self.ctx_len}) is smaller than --prompt-len ({self.prompt_len}); "
                                 "the prefill chunk must fit in the cache: raise --ctx-len or lower --prompt-len")
        if self.num_speculative_tokens is not None:
            _positive("num_speculative_tokens", self.num_speculative_tokens)
            k = self.num_speculative_tokens
            if k + 1 > self.prompt_len:
                raise QeffGraphError(f"--num-speculative-tokens {k} needs a verify step of {k + 1} tokens, longer "
                                     f"than --prompt-len {self.prompt_len}; use K <= {self.prompt_len - 1} or "
                                     f"--prompt-len >= {k + 1}")
        if self.kv_dtype not in KV_DTYPES:
            raise QeffGraphError(f"--kv-dtype {self.kv_dtype!r} is not supported; use float32 or float16")
        if self.weight_bits not in (None, 4, 8):
            raise QeffGraphError(f"--weight-bits must be 4 or 8, got {self.weight_bits!r}")
        if self.backend not in BACKENDS:
            raise QeffGraphError(f"unknown backend {self.backend!r}; use ort or qaic")
        if isinstance(self.sliding_window, (list, tuple)):  # one window per layer (None: full)
            for w in self.sliding_window:
                if w is not None:
                    _positive("sliding_window", w)
            set_("sliding_window", tuple(self.sliding_window))
        elif self.sliding_window not in ("auto", None):
            _positive("sliding_window", self.sliding_window)
        if self.passes is not None:
            set_("passes", _pass_names(self.passes))
        if self.device_group is not None:
            group = tuple(self.device_group)
            if not group or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in group) \
                    or len(set(group)) != len(group):
                raise QeffGraphError(f"--device-group {list(group)}: give distinct device ids >= 0, e.g. 0,1")
            set_("device_group", group)
        if self.backend == "ort":
            qaic_only = [_flag(n) for n in ("mos", "aic_enable_depth_first") if getattr(self, n)]
            if qaic_only:
                many = len(qaic_only) > 1
                raise QeffGraphError(f"{' and '.join(qaic_only)} only appl{'y' if many else 'ies'} to --backend "
                                     f"qaic; drop {'them' if many else 'it'} or compile with --backend qaic")
            if self.device_group is not None and len(self.device_group) > 1:
                raise QeffGraphError(f"--device-group {','.join(map(str, self.device_group))}: ONNX Runtime "
                                     "runs on one CPU here; multi-device partitioning needs --backend qaic")
            if self.mxint8:
                set_("kv_dtype", "float16")
            if self.mxfp6 and self.weight_bits is None:
                set_("weight_bits", 8)
        elif self.weight_bits is not None:
            raise QeffGraphError("--weight-bits applies to --backend ort; qaic compresses weights with --mxfp6")
        self._check_accuracy_level(set_)
        if self.weight_bits is None or self.weight_scheme is None:
            set_("weight_scheme", None if self.weight_bits is None else WEIGHT_SCHEME)
        if self.backend != "ort":
            if self.ort_lowering:
                raise QeffGraphError("--ort-lowering applies to --backend ort; qaic compiles the portable graph")
            set_("ort_lowering", None)  # qaic keeps the portable graph
        elif self.ort_lowering is None:
            set_("ort_lowering", ORT_LOWERING)
        elif self.ort_lowering not in ORT_LOWERINGS:
            raise QeffGraphError(f"ort_lowering must be 0 (portable graph), 1 (valid-length attention) or 2 "
                                 f"(GroupQueryAttention where proven), got {self.ort_lowering!r}")

    def _check_accuracy_level(self, set_) -> None:
        from qeff_graph.passes.matmul_nbits import ACCURACY_LEVELS, AUTO_LEVEL

        level = self.accuracy_level
        if level is None:
            return
        if level not in ACCURACY_LEVELS or isinstance(level, bool):
            raise QeffGraphError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got "
                                 f"{level!r} (1: float compute, the default; 4: int8 compute, faster)")
        if self.weight_bits is None:
            raise QeffGraphError(f"--accuracy-level {level} sets how quantized weights compute; add --weight-bits "
                                 "4 or 8 (or drop it)")
        if level == AUTO_LEVEL:
            set_("accuracy_level", None)  # the default: one cache key for "1" and "not given"

    def _check_kind(self, set_) -> None:
        from qeff_graph.passes.pooling import POOLING_MODES

        if self.kind == "causal-lm":
            given = [_flag(n) for n in ("seq_lens", "pooling") if getattr(self, n) is not None]
            if given or self.normalize:
                flags = given + (["--normalize"] if self.normalize else [])
                raise QeffGraphError(f"{', '.join(flags)} appl{'y' if len(flags) > 1 else 'ies'} to encoder "
                                     "(embedding) programs; use `qeff-graph embed`")
            return
        fields = {f.name: f.default for f in dataclasses.fields(self)}
        causal = [_flag(n) for n in _CAUSAL_ONLY if getattr(self, n) != fields[n]]
        if causal:
            raise QeffGraphError(f"{', '.join(causal)} appl{'y' if len(causal) > 1 else 'ies'} to causal-LM "
                                 "programs, not to an encoder; drop it (an encoder takes --seq-len, --pooling, "
                                 "--normalize)")
        if self.weight_bits not in (None, 8):
            raise QeffGraphError(f"--weight-bits {self.weight_bits}: an encoder program takes 8 (int8 weights and "
                                 "activations, as --mxfp6 on ort) or none")
        seq_lens = self.seq_lens if self.seq_lens is not None else (ENCODER_SEQ_LEN,)
        if isinstance(seq_lens, int):
            seq_lens = (seq_lens,)
        seq_lens = tuple(seq_lens)
        if not seq_lens:
            raise QeffGraphError("--seq-len is empty; give one or more lengths, e.g. 32,128")
        for n in seq_lens:
            _positive("seq_len", n)
        if len(set(seq_lens)) != len(seq_lens):
            raise QeffGraphError(f"--seq-len {','.join(map(str, seq_lens))} repeats a length; give distinct lengths")
        set_("seq_lens", tuple(sorted(seq_lens)))
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise QeffGraphError(f"unknown pooling {self.pooling!r}; use one of {', '.join(POOLING_MODES)}")
        if self.normalize and self.pooling is None:
            raise QeffGraphError("--normalize needs a pooling mode (--pooling mean|cls|max)")

    # ---- derived -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows of the KV cache: ``full_batch_size`` with continuous batching, else ``batch_size``."""
        return self.full_batch_size or self.batch_size

    def pipeline(self) -> list[str]:
        """Pass names this program is built with."""
        from qeff_graph.passes import pipeline_names

        if self.passes is not None:
            return list(self.passes)
        if self.kind == "encoder":
            return pipeline_names("encoder", pooling=self.pooling, ort_lowering=bool(self.ort_lowering),
                                  weight_bits=self.weight_bits)
        return pipeline_names(kv_dtype=self.kv_dtype, weight_bits=self.weight_bits,
                              ort_lowering=self.ort_lowering or 0)

    def pass_options(self, sliding_window: int | None) -> dict:
        """Constructor options handed to the passes (each takes those it knows)."""
        if self.kind == "encoder":
            return dict(pooling=self.pooling or "mean", normalize=self.normalize)
        options = dict(kv_dtype=self.kv_dtype, continuous_batching=bool(self.full_batch_size),
                       sliding_window=sliding_window)
        if self.weight_bits is not None:
            options["weight_bits"] = self.weight_bits
        if self.accuracy_level is not None:
            options["accuracy_level"] = self.accuracy_level
        if self.num_speculative_tokens is not None:
            options["num_speculative_tokens"] = self.num_speculative_tokens
        if self.ort_lowering:  # RMSNorm as ONNX Runtime's kernel (custom-rmsnorm's "ort" target)
            options["target"] = "ort"
        return options

    def threads(self) -> int | None:
        """ort: ``num_cores`` as CPU threads, capped at the cores this process may use."""
        if self.backend != "ort" or self.num_cores is None:
            return None
        return min(self.num_cores, len(os.sched_getaffinity(0)))

    def notes(self) -> list[str]:
        """What QEfficient's flags became on this backend (printed once by compile/infer)."""
        notes = []
        if self.backend == "ort" and self.mxint8:
            notes.append("--mxint8 on ort keeps the KV cache in float16 (ONNX Runtime has no MXINT8 "
                         "tensors; --backend qaic compiles it as MXINT8)")
        if self.backend == "ort" and self.mxfp6 and self.kind == "encoder":
            notes.append("--mxfp6 on ort quantizes an encoder's MatMuls to int8 weights and activations "
                         "(DynamicQuantizeMatMul: faster, not exact)")
        elif self.backend == "ort" and self.mxfp6:
            notes.append(f"--mxfp6 on ort quantizes MatMul weights to {self.weight_bits}-bit blocks of 32 "
                         "(MatMulNBits)")
        return notes

    def qaic_options(self) -> dict:
        """Keyword arguments of :func:`qeff_graph.backends.qaic.write_qaic_files`."""
        return dict(num_cores=self.num_cores or QAIC_DEFAULT_CORES, mxfp6=self.mxfp6, mxint8=self.mxint8,
                    mos=self.mos, aic_enable_depth_first=self.aic_enable_depth_first,
                    device_group=list(self.device_group) if self.device_group else None,
                    hw_version=self.aic_hw_version, retained_state=self.kind == "causal-lm")

    def kv_precision(self) -> str:
        """custom_io.yaml precision of the KV tensors."""
        if self.backend == "qaic" and self.mxint8:
            return "mxint8"
        return {"float32": "float", "float16": "float16"}[self.kv_dtype]

    def specializations(self) -> dict:
        """QEfficient's specializations: prefill (seq_len=prompt_len) first, decode second, then
        with ``num_speculative_tokens=K`` the verify step (seq_len K+1, decode's batch; left out
        when it equals prefill's shape); an encoder has one per seq_len."""
        if self.kind == "encoder":
            return {"specializations": [{"batch_size": str(self.batch_size), "seq_len": str(n)}
                                        for n in self.seq_lens]}
        s = {"ctx_len": str(self.ctx_len)}
        if self.full_batch_size:
            fbs = str(self.full_batch_size)
            prefill = {"batch_size": "1", "seq_len": str(self.prompt_len), **s, "full_batch_size": fbs}
            decode = {"batch_size": fbs, "seq_len": "1", **s, "full_batch_size": fbs}
        else:
            prefill = {"batch_size": str(self.batch_size), "seq_len": str(self.prompt_len), **s}
            decode = {"batch_size": str(self.batch_size), "seq_len": "1", **s}
        shapes = [prefill, decode]
        if self.num_speculative_tokens is not None:
            verify = {**decode, "seq_len": str(self.num_speculative_tokens + 1)}
            if verify != prefill:
                shapes.append(verify)
        return {"specializations": shapes}

    # ---- identity ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("passes", "device_group", "seq_lens", "sliding_window"):
            if isinstance(d[name], (list, tuple)):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ProgramSpec:
        """A spec from a manifest's ``options`` (unknown keys are ignored: newer/older manifests)."""
        if not isinstance(data, dict):
            raise QeffGraphError(f"program options must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if data.get("weight_bits") is not None and "weight_scheme" not in data:
            data = {**data, "weight_scheme": 1}  # built before the scheme was recorded
        if data.get("backend", "ort") == "ort" and data.get("ort_lowering") is None:
            data = {**data, "ort_lowering": 0}  # built before the ORT lowering (no field, or null)
        return cls(**{k: v for k, v in data.items() if k in names})

    def artifact_options(self) -> dict:
        """The options that change the built artifact (the cache key's part of the spec).

        On ort, ``mxfp6``/``mxint8`` are already folded into ``weight_bits``/``kv_dtype`` and
        ``num_cores`` only sets runtime threads; on qaic every qaic option changes the binary.
        """
        d = self.to_dict()
        if self.backend == "ort":
            for name in ("mxfp6", "mxint8", *QAIC_FIELDS):
                d.pop(name)
        if d["num_speculative_tokens"] is None:  # keys of programs cached before the option existed hold
            d.pop("num_speculative_tokens")
        if d["weight_scheme"] is None:  # likewise for unquantized programs
            d.pop("weight_scheme")
        if d["ort_lowering"] is None:  # and for qaic programs
            d.pop("ort_lowering")
        if d["accuracy_level"] is None:  # and for the default compute
            d.pop("accuracy_level")
        return d

    def graph_options(self) -> dict:
        """The options that change ``model.onnx`` itself."""
        options = {name: getattr(self, name) for name in GRAPH_FIELDS}
        options.update(full_batch_size=bool(self.full_batch_size), ort_lowering=self.ort_lowering or 0)
        return options  # ort_lowering 0 (ort) and None (qaic): the same portable graph

    def cache_key(self, **identity: Any) -> str:
        """16 hex digits of SHA-256 over the artifact options and ``identity`` (source, versions)."""
        text = json.dumps({**self.artifact_options(), **identity}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise QeffGraphError(f"{_flag(name)} must be an integer, got {value!r}")
    if value < 1:
        raise QeffGraphError(f"{_flag(name)} must be >= 1, got {value}")


def _pass_names(passes: Any) -> tuple[str, ...]:
    from qeff_graph.passes import registry

    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",")]
    names = tuple(passes)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise QeffGraphError("--passes is empty or has an empty name; give comma-separated pass names "
                             "(`qeff-graph passes` lists them) or leave it out for the default pipeline")
    for name in names:
        registry.get(name)  # unknown names: one line listing the registered ones
    return names


DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ProgramSpec)}
DEFAULTS["ort_lowering"] = ORT_LOWERING  # on ort (the field's None means "the backend's default")
