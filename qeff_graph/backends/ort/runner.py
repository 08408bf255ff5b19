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

A program lowered with ``GroupQueryAttention`` (``ort-gqa``;
:func:`~qeff_graph.backends.ort.inplace.rows_alone`) takes a step whose every row is "tokens at
consecutive positions, then pads" and fits the cache (first position + seq_len <= ctx_len), for
the whole batch at once. Any other step (pads first or between, a chunk that would reach past
the cache, a continuous-batching prefill into chosen slots) runs here row by row: each row's pads
(position -1) are dropped and the row's cache is bound as a ``[1, ...]`` view of the batch
buffer (its slot, ``batch_index``, with continuous batching); the logits are put back where the
whole-batch step would have returned them.
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
from qeff_graph.passes.last_token_logits import VERIFY_POSITIONS_KEY
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
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(outputs)
        logits = outputs.get("logits")
        if logits is None:
            raise QeffGraphError(f"{path} has no 'logits' output; pass a causal-LM program from `qeff-graph optimize`")
        # logits of a fixed shape past the batch dim ([batch, 1, vocab]) are written straight into an
        # array of ours: fetching them back from a binding wraps every bound output (0.15 ms a step)
        self._logits = ((tuple(logits.shape[1:]), _ORT_TYPES[logits.type])
                        if all(isinstance(d, int) for d in logits.shape[1:]) and logits.type in _ORT_TYPES else None)
        self.io_writer = IOFileWriter(write_io_dir) if write_io_dir else None
        self.io_binding = io_binding
        inplace, self.rows_alone = inplace_cache_inputs_of(path)
        self.inplace = inplace if io_binding else set()
        if self.rows_alone and io_binding and inplace != set(self.cache_specs):
            raise QeffGraphError(f"{path}: a GroupQueryAttention program whose cache is not updated in place")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.verify_positions = int(meta.get(VERIFY_POSITIONS_KEY, 0))  # K+1: steps that keep every position
        self._buffers: list[np.ndarray] = []  # the memory of the bound OrtValues (io_binding)
        self._rows: dict[int, dict[str, ort.OrtValue]] = {}  # per slot: OrtValues over its cache rows
        self._bindings: dict = {}  # (id(inputs), id(outputs)) -> IOBinding with those caches bound
        self.reset()

    def reset(self) -> None:
        """Start over with an empty KV cache (bound buffers are reused, not allocated again).

        Bound buffers are zeroed where they are, except a ``rows_alone`` program's: its
        GroupQueryAttention reads a row's cache only up to that row's valid length, which the next
        steps' positions set, so the rows an earlier prompt left are never read and are simply
        overwritten (zeroing them cost 4 ms of the first token at ctx_len 2048, batch 1)."""
        if self._buffers:
            if not self.rows_alone:
                for array in self._buffers:  # the OrtValues wrap these arrays' memory
                    array.fill(0)
            return
        self.cache = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.cache_specs.items()}
        self._arrays = dict(self.cache)  # name -> the whole cache array (bound buffers with io_binding)
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
        if self.rows_alone and self._split(feeds):
            logits = self._run_rows(feeds)
        elif self.rows_alone and not self.io_binding:  # the kernel needs past and present to be one buffer
            logits = self._run_in_place(feeds, self.cache)
        elif self.io_binding:
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

    def _split(self, feeds: dict[str, np.ndarray]) -> bool:
        """Whether a step of a ``rows_alone`` program must run row by row (module docstring)."""
        positions = feeds["position_ids"]
        if "batch_index" in feeds and not np.array_equal(feeds["batch_index"].reshape(-1),
                                                         np.arange(self.batch_size)):
            return True  # into chosen slots (continuous-batching prefill)
        real = positions >= 0
        count = real.sum(axis=1)
        if np.any(real[:, 1:] & ~real[:, :-1]):
            return True  # a pad before a real token
        first = np.where(count > 0, positions[:, 0], 1)  # an idle row counts as one cached token
        steps = np.diff(positions, axis=1)
        return bool(np.any((steps != 1) & real[:, 1:]) or np.any(first + positions.shape[1] > self.ctx_len))

    def _run_rows(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        input_ids, positions = feeds["input_ids"], feeds["position_ids"]
        rows, seq = positions.shape
        slots = feeds["batch_index"].reshape(-1) if "batch_index" in feeds else np.arange(rows)
        every = 0 < seq <= self.verify_positions  # the program returns every position of such a step
        out = None
        for r in range(rows):
            keep = np.flatnonzero(positions[r] >= 0)
            if keep.size == 0:
                continue
            pos = positions[r, keep]
            if np.any(np.diff(pos) != 1):
                raise QeffGraphError(f"row {r} of this step has positions {pos.tolist()}; a GroupQueryAttention "
                                     "program takes a row's tokens at consecutive positions")
            if not 0 <= int(slots[r]) < self.batch_size:
                raise QeffGraphError(f"batch_index {int(slots[r])} is outside the cache's {self.batch_size} rows")
            row = {"input_ids": input_ids[r:r + 1, keep], "position_ids": pos[None]}
            if "batch_index" in feeds:
                row["batch_index"] = np.zeros((1, 1), np.int64)  # the cache bound is the slot's own row
            logits = self._run_row(row, int(slots[r]))
            if out is None:
                out = np.zeros((rows, seq if every else 1, logits.shape[-1]), logits.dtype)
            if every:
                out[r, keep] = logits[0]
            else:
                out[r, 0] = logits[0, -1]  # the row's last token: the one a whole-batch step returns
        if out is None:
            raise QeffGraphError("every row of this step is padding (position -1); nothing to run")
        return out

    def _run_row(self, feeds: dict[str, np.ndarray], slot: int) -> np.ndarray:
        """One row's step with its cache rows bound in place (views of the batch's buffers)."""
        if not self.io_binding:
            return self._run_in_place(feeds, {n: a[slot:slot + 1] for n, a in self.cache.items()})
        if slot not in self._rows:  # views of the bound buffers: the row's memory, not a copy
            self._rows[slot] = {n: ort.OrtValue.ortvalue_from_numpy(a[slot:slot + 1]) for n, a in self._arrays.items()}
        return self._run_in_place(feeds, self._rows[slot])

    def _run_in_place(self, feeds: dict[str, np.ndarray], caches: dict) -> np.ndarray:
        """A step with each cache (an OrtValue, or a numpy array wrapped here) bound as both its
        input and its ``_RetainedState`` output: GroupQueryAttention writes the new rows there."""
        caches = {n: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for n, v in caches.items()}
        return self._run_binding(feeds, caches, caches)

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        logits = self._run_binding(feeds, self._bound, self._spare)
        self._bound, self._spare = self._spare, self._bound
        return logits

    def _run_binding(self, feeds: dict[str, np.ndarray], inputs: dict[str, ort.OrtValue],
                     outputs: dict[str, ort.OrtValue]) -> np.ndarray:
        """One run with ``feeds`` copied in, each cache read from ``inputs[name]`` and written to
        ``outputs[name]`` (the same OrtValue: in place); returns the logits in an array of their own.

        The caches of a pair of dicts this session keeps (``_bound``/``_spare``, a slot's ``_rows``)
        are bound once, in a binding kept with that pair: a step then rebinds only its feeds and
        the logits (binding SmolLM2's 120 cache values took 0.14 ms a step). Logits of a fixed
        shape past the batch dim are written by ONNX Runtime into a new array bound before every
        run (so a kept binding never writes into an array already returned); others come back
        through the binding and are copied."""
        key = (id(inputs), id(outputs))  # only dicts alive as long as the session are kept: ids stay theirs
        io = self._bindings.get(key)
        if io is None:
            io = self.session.io_binding()
            io.bind_output("logits", "cpu")  # first: get_outputs()[0]
            for name, value in inputs.items():
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(f"{name}_RetainedState", outputs[name])
            if self._keeps(inputs) and self._keeps(outputs):
                self._bindings[key] = io
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        if self._logits is not None:
            dims, dtype = self._logits
            logits = np.empty((feeds["input_ids"].shape[0], *dims), dtype)
            io.bind_output("logits", "cpu", 0, dtype, list(logits.shape), logits.ctypes.data)
            self.session.run_with_iobinding(io)
            return logits
        io.bind_output("logits", "cpu")  # a fresh buffer each run: its shape follows the step
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy().copy()  # detach from the binding's buffer

    def _keeps(self, caches: dict) -> bool:
        """Whether ``caches`` is one of the dicts of OrtValues this session holds for its lifetime."""
        return any(caches is kept for kept in (getattr(self, "_bound", None), getattr(self, "_spare", None),
                                               *self._rows.values()))
