"""ONNX Runtime backend: run a retained-state program with the KV cache kept across steps."""

from qeff_graph.backends.ort.runner import RetainedStateSession

__all__ = ["RetainedStateSession"]
