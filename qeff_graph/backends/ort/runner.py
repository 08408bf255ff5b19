"""Run a retained-state ONNX program with ONNX Runtime.

:class:`RetainedStateSession` owns the KV cache: it allocates ``past_key.{i}``/
``past_value.{i}`` as ``[batch, kv_heads, ctx_len, head_dim]`` zeros and, after every
:meth:`run`, binds each ``*_RetainedState`` output back as the next input, so callers only
feed ``input_ids`` and ``position_ids`` (and ``batch_index`` with continuous batching).

With ``io_binding`` (the default) the cache lives in preallocated ``OrtValue`` buffers bound
with ONNX Runtime's IO binding — no per-step allocation and no numpy round trip of the cache.
A cache tensor that the program updates in place
(:func:`~qeff_graph.backends.ort.inplace.inplace_cache_inputs`: only its ScatterND reads its
values) has one buffer bound as both the input and its ``*_RetainedState`` output, so a step
writes only the new rows; any other has two buffers, a step reads one and writes the other,
then they swap. ``io_binding=False`` feeds numpy arrays instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qeff_graph.backends.ort.inplace import inplace_cache_inputs_of
from qeff_graph.backends.ort.io_files import IOFileWriter
from qeff_graph.backends.ort.session import cpu_session
from qeff_graph.errors import QeffGraphError
from qeff_graph.resources import check_kv_cache_fits

__all__ = ["RetainedStateSession"]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_CACHE_NAME = re.compile(r"^past_(key|value)\.(\d+)$")


class RetainedStateSession:
    """An ORT session over a retained-state program with its KV cache.

    Args:
        model: a program directory (holding ``model.onnx``) or an ``.onnx`` path.
        batch_size: rows of the cache (``full_batch_size`` with continuous batching).
        ctx_len: cache length.
        threads: intra-op threads (default: all cores).
        write_io_dir: if set, the first prefill and decode steps' IO are written there as raw
            files (:class:`~qeff_graph.backends.ort.io_files.IOFileWriter`).
        io_binding: keep the cache in bound OrtValue buffers (default) instead of numpy feeds.
        session: an ONNX Runtime session of this program to share (its weights are in memory once).
    """

    def __init__(self, model: str | os.PathLike, *, batch_size: int, ctx_len: int,
                 threads: int | None = None, write_io_dir: str | os.PathLike | None = None,
                 io_binding: bool = True, session: ort.InferenceSession | None = None):
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.exists():
            raise QeffGraphError(f"{path} does not exist; pass a program directory from `qeff-graph optimize`")
        if batch_size < 1 or ctx_len < 1:
            raise QeffGraphError(f"batch_size ({batch_size}) and ctx_len ({ctx_len}) must be >= 1")
        self.session = session or cpu_session(path, threads)
        self.batch_size = batch_size
        self.ctx_len = ctx_len
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.cache_specs = {}
        for spec in self.session.get_inputs():
            if _CACHE_NAME.match(spec.name):
                heads, head_dim = spec.shape[1], spec.shape[3]
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise QeffGraphError(f"cache input {spec.name} has symbolic heads/head_dim {spec.shape}")
                self.cache_specs[spec.name] = ((batch_size, heads, ctx_len, head_dim), _ORT_TYPES[spec.type])
        if not self.cache_specs:
            raise QeffGraphError(f"{path} has no past_key.{{i}} inputs; run `qeff-graph optimize` on it first")
        (_, heads, _, head_dim), dtype = next(iter(self.cache_specs.values()))
        check_kv_cache_fits(rows=batch_size, layers=len(self.cache_specs) // 2, kv_heads=heads, ctx_len=ctx_len,
                            head_dim=head_dim, kv_dtype=np.dtype(dtype).name)
        self.continuous_batching = "batch_index" in self.input_names
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.io_writer = IOFileWriter(write_io_dir) if write_io_dir else None
        self.io_binding = io_binding
        self.inplace = inplace_cache_inputs_of(path) if io_binding else set()
        self._buffers: list[np.ndarray] = []  # the memory of the bound OrtValues (io_binding)
        self.reset()

    def reset(self) -> None:
        """Zero the KV cache (bound buffers are zeroed where they are, not allocated again)."""
        if self._buffers:
            for array in self._buffers:  # the OrtValues wrap these arrays' memory
                array.fill(0)
            return
        self.cache = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.cache_specs.items()}
        if self.io_binding:
            spare = {n: a if n in self.inplace else np.zeros_like(a) for n, a in self.cache.items()}
            self._buffers = [*self.cache.values(), *(a for n, a in spare.items() if n not in self.inplace)]
            self._bound = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.cache.items()}
            self._spare = {n: self._bound[n] if n in self.inplace else ort.OrtValue.ortvalue_from_numpy(a)
                           for n, a in spare.items()}
            self.cache = None  # lives in the bound buffers

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray,
            batch_index: np.ndarray | None = None, phase: str = "decode") -> np.ndarray:
        """One step; returns logits ``[batch, 1, vocab]`` (a program compiled with
        ``num_speculative_tokens=K``: ``[batch, seq_len, vocab]`` for a step of at most K+1
        tokens) and keeps the updated cache.

        ``phase`` (``"prefill"``, ``"decode"`` or ``"verify"``) only names the step for ``write_io_dir``.
        """
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        if self.continuous_batching:
            if batch_index is None:
                raise QeffGraphError("this program uses continuous batching: pass batch_index")
            feeds["batch_index"] = np.ascontiguousarray(batch_index, dtype=np.int64).reshape(-1, 1)
        if self.io_binding:
            logits = self._run_bound(feeds)
        else:
            outputs = self.session.run(self.output_names, {**feeds, **self.cache})
            result = dict(zip(self.output_names, outputs))
            for name in self.cache:
                self.cache[name] = result[f"{name}_RetainedState"]
            logits = result["logits"]
        if self.io_writer is not None and self.io_writer.wants(phase):
            self.io_writer.record(phase, feeds, {"logits": logits})  # the cache stays out
        return logits

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        for name, value in self._bound.items():
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(f"{name}_RetainedState", self._spare[name])
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy().copy()  # detach from the binding's buffer
        self._bound, self._spare = self._spare, self._bound
        return logits
