"""The README's custom-pipeline example runs as written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx_ir as ir

from tests.e2e.conftest import OPTIMUM

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example:custom-pipeline -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its custom-pipeline example"
    return match.group(1)


def test_custom_pipeline_example(tmp_path, monkeypatch, capsys):
    shutil.copy(OPTIMUM["llama"] / "optimum" / "model.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), "README.md", "exec"), {})
    report = capsys.readouterr().out
    assert "kv-retention" in report and "CountMatMuls" in report and "matmuls=" in report
    model = ir.load(tmp_path / "out" / "model.onnx")
    assert {v.name for v in model.graph.inputs} >= {"past_key.0", "past_value.1"}
    assert next(v for v in model.graph.inputs if v.name == "past_key.0").dtype == ir.DataType.FLOAT16
