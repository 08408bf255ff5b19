"""Export: Hugging Face dir | hub id | .gguf ──▶ unmodified ONNX with a flat dynamic KV cache.

This is the only package that imports torch, and it does so lazily (inside the functions), so
``import qeff_graph.export`` is cheap.

>>> from qeff_graph.export import export_causal_lm
>>> res = export_causal_lm("path/to/hf_dir", "out/onnx")            # dynamo, opset 18
>>> res = export_causal_lm("model.Q4_1.gguf", "out/onnx", exporter="torchscript")
"""

from __future__ import annotations

from .encoder import export_encoder
from .exporter import DEFAULT_OPSET, EXPORTERS, ONNX_FILENAME, ExportResult, export_causal_lm
from .loader import default_encoder_path, default_model_path, load_hf_causal_lm, load_hf_encoder

__all__ = ["export_causal_lm", "export_encoder", "load_hf_causal_lm", "load_hf_encoder", "ExportResult",
           "default_encoder_path", "default_model_path", "EXPORTERS", "DEFAULT_OPSET", "ONNX_FILENAME"]
