"""Compile-and-run backends: ``ort`` (ONNX Runtime, runs everywhere) and ``qaic``."""
