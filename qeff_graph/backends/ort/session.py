"""The one way qeff-graph opens an ONNX Runtime session (CPU, quiet, optional thread count)."""

from __future__ import annotations

import os

import onnxruntime as ort

__all__ = ["cpu_session"]


def cpu_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` on the CPU provider with ``threads`` intra-op threads (None: all)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
