"""What QEfficient's compression options mean on the ONNX Runtime backend.

* ``--mxfp6`` (MXFP6 matmul weights on Cloud AI 100) → ``matmul-nbits``: weight-only,
  symmetric, 32-element blocks with one scale each (the MX block size), 8 bits by default
  (``--weight-bits 4`` for int4). On the 2-core AVX2 CI machine 8-bit weights with int8
  compute decode SmolLM2-135M 1.2-1.9x faster than fp32 and keep its greedy text for dozens
  of tokens before it drifts; 4-bit changes a 135M model's text from the first token
  (``qeff-graph bench``).
* ``--mxint8`` (MXINT8 KV cache) → a float16 KV cache: ONNX Runtime has no MX tensor types;
  float16 halves the cache as MXINT8 nearly does.
"""

from __future__ import annotations

__all__ = ["ort_program_options"]


def ort_program_options(*, mxfp6: bool = False, mxint8: bool = False, weight_bits: int | None = None,
                        kv_dtype: str = "float32") -> tuple[dict, list[str]]:
    """``({"kv_dtype", "weight_bits"}, notes)`` for ``optimize`` from the qaic-style flags."""
    notes = []
    if mxint8 and kv_dtype != "float16":
        kv_dtype = "float16"
        notes.append("--mxint8 on ort keeps the KV cache in float16 (ONNX Runtime has no MXINT8 "
                     "tensors; --backend qaic compiles it as MXINT8)")
    if mxfp6 and weight_bits is None:
        weight_bits = 8
    if weight_bits is not None and mxfp6:
        notes.append(f"--mxfp6 on ort quantizes MatMul weights to {weight_bits}-bit blocks of 32 "
                     "(MatMulNBits)")
    return {"kv_dtype": kv_dtype, "weight_bits": weight_bits}, notes
