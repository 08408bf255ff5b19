"""Fixtures of the family coverage matrix: one tiny random HF model per family and one export
per (family, exporter), each made once per session (a failed export is remembered and raised
again by every test that needs it, without exporting twice)."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_config

# exporter id -> (exporter, opset)
EXPORTERS = {"dynamo18": ("dynamo", 18), "torchscript17": ("torchscript", 17)}


@pytest.fixture(scope="session")
def family_model():
    """family_model(family) -> the seeded tiny random ``transformers`` model (float32, eval)."""
    import torch
    from transformers import AutoModelForCausalLM

    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(0)
            made[family] = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
        return made[family]

    return get


@pytest.fixture(scope="session")
def family_export(family_model, tmp_path_factory):
    """family_export(family, exporter_id) -> ``ExportResult`` of the unmodified export."""
    from qeff_graph.export import export_causal_lm

    made: dict[tuple[str, str], object] = {}

    def get(family: str, exporter_id: str):
        key = (family, exporter_id)
        if key not in made:
            kind, opset = EXPORTERS[exporter_id]
            out = tmp_path_factory.mktemp(f"{family}-{exporter_id}") / "onnx"
            try:
                made[key] = export_causal_lm(family_model(family), out, exporter=kind, opset=opset, progress=False)
            except Exception as e:  # noqa: BLE001 - remembered, raised again by each test that needs it
                made[key] = e
        result = made[key]
        if isinstance(result, Exception):
            raise result
        return result

    return get
