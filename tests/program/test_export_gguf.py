"""Which GGUF an export came from (``export.json``), for ``--weight-bits 4`` to carry its blocks."""

import json

import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.program.build import export_gguf


def _export(directory, **info):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "export.json").write_text(json.dumps(info))
    return directory


def test_export_gguf(tmp_path):
    gguf = tmp_path / "models" / "m.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert export_gguf(tmp_path / "none") is None  # an ONNX file from elsewhere: a float model
    assert export_gguf(_export(tmp_path / "hf", source="/some/hf/dir", gguf_file=None)) is None
    found = export_gguf(_export(tmp_path / "a", source=f"{gguf.parent}::{gguf.name}", gguf_file=gguf.name))
    assert found == gguf.resolve()
    assert export_gguf(_export(tmp_path / "b", source=str(gguf), gguf_file=gguf.name)) == gguf.resolve()
    gguf.unlink()
    with pytest.raises(QeffGraphError, match="was exported from the GGUF m.Q4_1.gguf") as info:
        export_gguf(tmp_path / "a")
    assert "\n" not in str(info.value) and "put it back" in str(info.value)
