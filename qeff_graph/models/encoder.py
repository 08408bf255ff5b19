"""``QEFFAutoModel``: encoder (embedding) models — from_pretrained → export → compile → generate.

Mirrors QEfficient's ``QEFFAutoModel``::

    model = QEFFAutoModel.from_pretrained("all-MiniLM-L6-v2 folder", pooling="mean")
    model.compile(seq_len=[32, 128], batch_size=32, num_cores=16)
    out = model.generate(["a sentence", "another one"])     # or a tokenizer's output
    out["pooled"], out["last_hidden_state"]

The export is the unmodified ``AutoModel`` (``last_hidden_state``); pooling (mean | cls | max)
and L2 normalization are appended to the graph by the ``pooling`` pass. With ``pooling=None``
the model folder's sentence-transformers configuration decides (``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module), else mean pooling; ``normalize=None``
likewise follows the folder (else no normalization).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError
from qeff_graph.models.base import CachedModel

__all__ = ["QEFFAutoModel", "encode_texts", "sentence_transformers_pooling"]

_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_ST_UNSUPPORTED = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                   "pooling_mode_lasttoken")


def sentence_transformers_pooling(directory: str | os.PathLike) -> tuple[str | None, bool | None]:
    """``(pooling, normalize)`` a sentence-transformers folder declares, ``(None, None)`` if none."""
    directory = Path(directory)
    try:
        modules = json.loads((directory / "modules.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(modules, list):
        return None, None
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            path = directory / str(module.get("path", "")) / "config.json"
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                raise QeffGraphError(f"{path} (the sentence-transformers pooling config) cannot be read; "
                                     "pass pooling= explicitly") from None
            bad = [k for k in _ST_UNSUPPORTED if config.get(k)]
            modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
            if bad or len(modes) != 1:
                raise QeffGraphError(f"{path} asks for pooling {bad or modes or 'none'}; qeff-graph pools one of "
                                     "mean, cls, max: pass pooling= explicitly")
            pooling = modes[0]
    return pooling, normalize


def encode_texts(tokenizer, texts: list[str], max_len: int, *, truncate: bool = True) -> list[list[int]]:
    """Token ids of ``texts`` (special tokens included); texts longer than ``max_len`` tokens are
    truncated with one warning line, or refused when ``truncate`` is False."""
    rows = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    long = [i for i, r in enumerate(rows) if len(r) > max_len]
    if long and not truncate:
        raise QeffGraphError(f"text {long[0]} has {len(rows[long[0]])} tokens, more than the largest --seq-len "
                             f"{max_len}; compile a larger --seq-len or drop --no-truncate")
    if long:
        _progress.say(f"warning: {len(long)} text(s) longer than {max_len} tokens truncated (the first is text "
                      f"{long[0]}); compile a larger --seq-len to keep them whole")
        rows = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
    return [list(r) for r in rows]


def _rows_of(inputs) -> list[list[int]] | None:
    """Token rows from a tokenizer's output (``input_ids`` + ``attention_mask``) or from lists of
    token ids; None for texts."""
    import numpy as np

    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, (list, tuple)) for r in inputs):
        if not all(isinstance(t, (int, np.integer)) for r in inputs for t in r):
            raise QeffGraphError("token rows must hold integer token ids")
        return [list(map(int, r)) for r in inputs]
    if isinstance(inputs, (str, list, tuple)) or not hasattr(inputs, "__getitem__"):
        return None
    try:
        ids, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"])
    except (KeyError, TypeError):
        raise QeffGraphError("inputs must be texts or a tokenizer's output with input_ids and attention_mask") from None
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise QeffGraphError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be [batch, seq] alike")
    return [ids[i][mask[i].astype(bool)].tolist() for i in range(len(ids))]


class QEFFAutoModel(CachedModel):
    """An encoder to export, compile for a backend and run for embeddings."""

    kind = "encoder"
    # measured with `qeff-graph bench --task embed` (all-MiniLM-L6-v2, 2 cores, batch 32 x 128 tokens):
    # the TorchScript export runs 1.2-1.3x faster in ONNX Runtime than the dynamo export
    default_exporter = "torchscript"

    def __init__(self, source: str, *, pooling: str | None = None, normalize: bool | None = None,
                 exporter: str | None = None, **kwargs):
        super().__init__(source, None, exporter=exporter or self.default_exporter, **kwargs)
        declared, declared_norm = sentence_transformers_pooling(source) if os.path.isdir(source) else (None, None)
        self.pooling = pooling or declared or "mean"
        self.normalize = bool(normalize if normalize is not None else declared_norm)

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, pooling: str | None = None,
                        normalize: bool | None = None, **kwargs):
        """A local model folder (a sentence-transformers folder too), a hub id, or ``None`` for the
        embedded all-MiniLM-L6-v2. ``pooling``: mean | cls | max (None: as the folder says, else
        mean); ``normalize``: L2-normalize the pooled vector (None: as the folder says). Other
        keyword arguments as for ``QEFFAutoModelForCausalLM``."""
        from qeff_graph.export.loader import check_model_kind, default_encoder_path
        from qeff_graph.passes.pooling import POOLING_MODES

        if pooling is not None and pooling not in POOLING_MODES:
            raise QeffGraphError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLING_MODES)}")
        if name_or_path is None:
            from qeff_graph import cache

            name_or_path = default_encoder_path(cache.cache_root(kwargs.get("cache_dir")) / "_models")
        check_model_kind(name_or_path, None, "encoder")  # a causal LM is refused before any work
        return cls(str(name_or_path), pooling=pooling, normalize=normalize, **kwargs)

    def _export_to(self, target: Path) -> None:
        from qeff_graph.export import export_encoder

        export_encoder(self.source, target, exporter=self.exporter, opset=self.opset, hf_token=self.hf_token,
                       trust_remote_code=self.trust_remote_code, cache_entry=True)

    def compile(self, seq_len: int | list[int] | None = None, batch_size: int | None = None,
                num_cores: int | None = None, backend: str = "ort", *, mxfp6_matmul: bool = False,
                device_group: list[int] | None = None, mos: int | None = None,
                aic_enable_depth_first: bool = False, aic_hw_version: str | None = None,
                progress: bool = True) -> Path:
        """Build (or reuse from the cache) the program: one specialization per ``seq_len``
        (default 128), ``batch_size`` rows (default 1); returns its folder."""
        from qeff_graph.program import ProgramSpec

        options = dict(kind="encoder", seq_lens=seq_len, batch_size=batch_size, num_cores=num_cores,
                       backend=backend, mxfp6=mxfp6_matmul, device_group=device_group, mos=mos,
                       aic_enable_depth_first=aic_enable_depth_first, aic_hw_version=aic_hw_version,
                       pooling=self.pooling, normalize=self.normalize)
        spec = ProgramSpec(**{k: v for k, v in options.items() if v is not None})
        return self.compile_spec(spec, progress=progress)

    def encode(self, texts: list[str], max_len: int, *, truncate: bool = True) -> list[list[int]]:
        """Token ids of ``texts`` with this model's tokenizer (from the source folder, else the
        export: exported first if needed); see :func:`encode_texts`."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise QeffGraphError("empty text; give non-empty texts")
        try:
            tokenizer = self.tokenizer()
        except QeffGraphError:
            self.export()
            tokenizer = self.tokenizer()
        return encode_texts(tokenizer, texts, max_len, truncate=truncate)

    def generate(self, inputs, *, truncate: bool = True, threads: int | None = None) -> dict:
        """Embed ``inputs`` (texts, token-id rows, or a tokenizer's output): ``{"last_hidden_state": [N, seq,
        hidden], "attention_mask": [N, seq], "pooled": [N, hidden], "perf": {...}}`` (numpy)."""
        from qeff_graph.backends.ort.encoder import EncoderSession
        from qeff_graph.generation import embed_ids

        self._runnable()
        longest = max(self.spec.seq_lens)
        rows = _rows_of(inputs)
        if rows is None:
            rows = self.encode([inputs] if isinstance(inputs, str) else list(inputs), longest, truncate=truncate)
        elif any(len(r) > longest for r in rows):
            raise QeffGraphError(f"an input has {max(len(r) for r in rows)} tokens, more than the largest "
                                 f"--seq-len {longest}; truncate it or compile a larger seq_len")
        session = EncoderSession(self.program.path, threads=threads or self.spec.threads())
        pad = getattr(self._tokenizer, "pad_token_id", None) or 0
        bar = _progress.bar(len(rows), "embed")
        try:
            with _progress.task(f"embed: {len(rows)} texts"):
                result = embed_ids(session, rows, seq_lens=self.spec.seq_lens, batch_size=self.spec.batch_size,
                                   pad_token_id=pad, on_batch=bar.update)
        finally:
            bar.close()
        out = {"last_hidden_state": result.last_hidden_state, "attention_mask": result.attention_mask,
               "perf": result.perf}
        if result.pooled is not None:
            out["pooled"] = result.pooled
        return out
