"""Run an encoder program (``last_hidden_state``, and ``pooled`` when it has pooling) with ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qeff_graph.backends.ort.session import cpu_session
from qeff_graph.errors import QeffGraphError

__all__ = ["EncoderSession"]


class EncoderSession:
    """An ORT session over an encoder program: :meth:`run` takes ids and a mask ``[batch, seq]``
    (token types are fed as zeros when the graph has them) and returns every output by name."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None,
                 session: ort.InferenceSession | None = None):
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if session is None and not path.exists():
            raise QeffGraphError(f"{path} does not exist; pass an encoder program directory")
        self.session = session = session or cpu_session(path, threads)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        if not {"input_ids", "attention_mask"} <= set(self.input_names):
            raise QeffGraphError(f"{path} is not an encoder program (inputs {self.input_names})")

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
