"""Write a program's step inputs/outputs as raw files, the way QEfficient's ``--write-io-dir`` does.

The first prefill chunk goes to ``<dir>/prefill/`` and the first decode step to
``<dir>/decode/``: one ``<name>.raw`` per tensor (C order, native dtype) for ``input_ids``,
``position_ids`` (``batch_index``) and ``logits``. ``<dir>/aic_batch_io.json`` lists them as
``{"IO-files": [[{"path", "io-direction", "dims", "elem-size", "map-to"}, ...], ...]}``, the
layout ``qaic-runner`` replays. The retained KV buffers are left out, as QEfficient skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qeff_graph.fs import write_atomic

__all__ = ["IOFileWriter", "IO_INDEX"]

IO_INDEX = "aic_batch_io.json"


class IOFileWriter:
    """Records the first step of each phase (``"prefill"``, ``"decode"``) into a directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written: dict[str, list[dict]] = {}

    def wants(self, phase: str) -> bool:
        return phase not in self.written

    def record(self, phase: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        if not self.wants(phase):
            return
        sub = self.directory / phase
        sub.mkdir(exist_ok=True)
        specs = []
        for direction, tensors in (("in", inputs), ("out", outputs)):
            for name, array in tensors.items():
                if name.startswith("past_"):  # retained state: stays on the device
                    continue
                array = np.ascontiguousarray(array)
                write_atomic(sub / f"{name}.raw", array.tobytes())
                specs.append({"path": f"{phase}/{name}.raw", "io-direction": direction,
                              "dims": list(array.shape), "elem-size": array.itemsize, "map-to": name})
        self.written[phase] = specs
        write_atomic(self.directory / IO_INDEX, json.dumps({"IO-files": list(self.written.values())}, indent=1) + "\n")
