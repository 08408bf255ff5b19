"""Named default pipelines.

``retained-kv`` (the default of ``qeff-graph optimize``) turns a dynamic-KV export into the
retained-state contract of DESIGN.md::

    past-shape → position-mask → kv-retention → last-token-logits
        → custom-rmsnorm → [fp16-clamp when the cache is float16]
        → [matmul-nbits with weight_bits]
        → [ort-skip-norm, ort-gqa on the ort backend (ort_lowering 2): residual Add + RMSNorm fused;
           GroupQueryAttention, where every layer is proven]
        → [ort-valid-attention on the ort backend: the layers left attend over the valid length only]
        → cleanup

``encoder`` (``qeff-graph embed``, ``QEFFAutoModel``) prepares an encoder export::

    [pooling when a pooling mode is set] → fp16-clamp
        → [ort-fuse-encoder on the ort backend: ONNX Runtime's fused Attention]
        → [matmul-int8 with weight_bits 8 (``--mxfp6`` on ort): int8 weights and activations] → cleanup
"""

from __future__ import annotations

from qeff_graph.passes import registry

__all__ = ["PIPELINES", "pipeline_names", "build_pipeline"]

PIPELINES: dict[str, list[str]] = {
    "retained-kv": [
        "past-shape",
        "position-mask",
        "kv-retention",
        "last-token-logits",
        "custom-rmsnorm",
        "fp16-clamp",
        "matmul-nbits",
        "ort-skip-norm",
        "ort-gqa",
        "ort-valid-attention",
        "cleanup",
    ],
    "encoder": ["pooling", "fp16-clamp", "ort-fuse-encoder", "matmul-int8", "cleanup"],
}


def pipeline_names(name: str = "retained-kv", *, kv_dtype: str = "float32",
                   weight_bits: int | None = None, pooling: str | None = None,
                   ort_lowering: int = 0) -> list[str]:
    """The passes of pipeline ``name``; the optional ones only when their option asks for them
    (``ort_lowering``: 0 portable, 1 valid-length attention, 2 GroupQueryAttention where proven)."""
    names = list(PIPELINES[name])
    if name == "encoder":
        return [n for n in names if (n != "pooling" or pooling) and (n != "ort-fuse-encoder" or ort_lowering)
                and (n != "matmul-int8" or weight_bits == 8)]
    if not ort_lowering and "ort-valid-attention" in names:
        names.remove("ort-valid-attention")
    if (ort_lowering or 0) < 2:
        names = [n for n in names if n not in ("ort-skip-norm", "ort-gqa")]
    if kv_dtype != "float16" and "fp16-clamp" in names:
        names.remove("fp16-clamp")
    if weight_bits is None and "matmul-nbits" in names:
        names.remove("matmul-nbits")
    return names


def build_pipeline(names: list[str], **options):
    """Instantiate registered passes by name, each taking the options its constructor knows."""
    return [registry.create(n, **options) for n in names]
