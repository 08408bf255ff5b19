"""Blockwise weight formats for ``matmul-nbits``: float weights quantized here, or GGUF blocks carried.

A :class:`Blocks` is one weight ``Wt`` ``[N, K]`` (output rows, blocks of ``block_size``
consecutive K entries) in the form ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized``
compute with, plus an optional per-block offset::

    w[n, j*block + i] = (q[n, j, i] - zero_point[n, j]) * scale[n, j]  (+ mins[n, j])

``zero_points`` None means ORT's default ``2^(bits-1)``. ``mins`` (a block's float minimum, as
in GGUF's ``Q4_1``) has no MatMulNBits input: the pass adds it as ``(x summed per block) @ mins^T``.
``halves``: 8-bit codes stored as 4-bit high-nibble blocks then low-nibble blocks (see
:meth:`Blocks.as_halves`), computed as two 4-bit MatMulNBits whose outputs are added
(:meth:`Blocks.parts`).

* :func:`quantize_float` — a float weight: round to nearest on each block's own [min, max] with
  a float minimum, or on a symmetric grid where that has the smaller squared error (exact for
  blocks already on one, e.g. dequantized GGUF ``Q8_0``/``Q4_0``).
* :class:`GGUFWeights` — find the GGUF tensor a float weight was dequantized from, exactly
  (rows may be permuted or a subset: transformers' GGUF loader permutes llama's q/k rows, and
  fused tensors are split by rows; blocks run along K so rows carry over whole), and carry its
  blocks: ``Q4_0`` → 4-bit (zero point 8), ``Q4_1`` → 4-bit with ``mins`` (``d*q + m`` =
  ``(q - 8)*d + (m + 8d)``, exact when ``m + 8d`` is a float32, else zero point 0 and ``m``),
  ``Q8_0`` → 8-bit (zero point 128); ``Q5_0``/``Q5_1`` → 8-bit blocks of 32 (codes moved onto
  zero point 128, ``Q5_1`` with ``mins``); the K-quants ``Q4_K`` → 4-bit and ``Q5_K`` → 8-bit blocks
  of 32 with ``mins`` (scale ``d*sc``, minimum ``-dmin*m`` per block of the super-block), ``Q6_K``
  → 8-bit blocks of 16 (scale ``d*sc``, int8 ``sc``: it may be negative). :meth:`Blocks.dequantize`
  then equals the GGUF's own dequantization (``gguf.dequantize``, what transformers loads) bit
  for bit. Not carried (re-quantized from the float weights, listed by the pass): ``Q2_K``,
  ``Q3_K``, the ``IQ*`` types, ``F16``/``BF16``/``F32``.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache

import numpy as np

from qeff_graph.errors import QeffGraphError

__all__ = ["Blocks", "GGUFWeights", "quantize_float", "row_digests"]

_ROWS = 4096  # rows handled per chunk, to bound temporary memory


@dataclasses.dataclass
class Blocks:
    """``Wt`` ``[N, K]`` as integer codes ``q`` ``[N, nb, block]`` with per-block ``scales``
    ``[N, nb]``, optional ``zero_points`` (uint8 ``[N, nb]``) and ``mins`` ``[N, nb]``."""

    q: np.ndarray
    scales: np.ndarray
    bits: int
    k: int
    zero_points: np.ndarray | None = None
    mins: np.ndarray | None = None
    origin: str = "quantized"  # "quantized", or the GGUF type and tensor name it was carried from
    halves: bool = False  # 8-bit blocks as 4-bit: high-nibble blocks then low-nibble blocks, summed

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k_blocks(self) -> int:
        """Blocks per row of K (the 4-bit halves count once)."""
        return self.q.shape[1] // (2 if self.halves else 1)

    def as_halves(self) -> Blocks:
        """8-bit blocks as two 4-bit ones, each over ``x``: ``(q - z)*s = (q>>4 - z>>4)*16s +
        (q&15 - z&15)*s`` (each term exact in float32; so is the sum for float16-precision scales,
        as GGUF's) — ORT's CPU MatMulNBits has no float-compute 8-bit kernel, its 4-bit one is
        fast. Needs K a multiple of the block size."""
        assert self.bits == 8 and not self.halves and self.k == self.k_blocks * self.block_size
        zp = np.full(self.scales.shape, 128, np.uint8) if self.zero_points is None else self.zero_points
        scales = self.scales.astype(np.float32)
        return dataclasses.replace(
            self, q=np.concatenate([self.q >> 4, self.q & 15], axis=1), bits=4, halves=True,
            scales=np.concatenate([scales * 16, scales], axis=1).astype(self.scales.dtype),
            zero_points=np.concatenate([zp >> 4, zp & 15], axis=1))

    def parts(self) -> list[Blocks]:
        """The blocks one ``MatMulNBits`` each computes with: halves as their high-nibble and
        low-nibble 4-bit blocks (summed by an Add), else ``[self]``. ``mins`` stay with the whole."""
        if not self.halves:
            return [self]
        nb, default = self.k_blocks, 2 ** (self.bits - 1)
        parts = []
        for part in (slice(0, nb), slice(nb, 2 * nb)):
            zp = None if self.zero_points is None else self.zero_points[:, part]
            parts.append(dataclasses.replace(self, q=self.q[:, part], scales=self.scales[:, part], mins=None,
                                             halves=False, zero_points=None if zp is None or (zp == default).all()
                                             else zp))
        return parts

    @classmethod
    def stack(cls, parts: list[Blocks]) -> Blocks:
        """The blocks of several weights of one K side by side along N (their ``Wt`` rows
        concatenated): one MatMulNBits computes them all. A part without zero points gets the
        default ``2^(bits-1)``, one without minima zeros: every part's values stay exactly its own."""
        first = parts[0]
        if any((p.bits, p.k, p.block_size, p.halves, p.scales.dtype) !=
               (first.bits, first.k, first.block_size, first.halves, first.scales.dtype) for p in parts):
            raise ValueError("blocks of different bits/K/block size/form cannot be stacked")
        zps = [p.zero_points for p in parts]
        zero_points = None if all(z is None for z in zps) else np.concatenate(
            [np.full(p.scales.shape, 2 ** (p.bits - 1), np.uint8) if z is None else z for p, z in zip(parts, zps)])
        mins = [p.mins for p in parts]
        mins = None if all(m is None for m in mins) else np.concatenate(
            [np.zeros((p.n, p.k_blocks), p.scales.dtype) if m is None else m.astype(p.scales.dtype)
             for p, m in zip(parts, mins)])
        return cls(q=np.concatenate([p.q for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                   bits=first.bits, k=first.k, zero_points=zero_points, mins=mins,
                   origin="+".join(p.origin for p in parts), halves=first.halves)

    def packed(self) -> np.ndarray:
        """MatMulNBits ``B`` ``[N, nb, block*bits/8]``: 4-bit codes two per byte, even index low."""
        if self.bits == 8:
            return self.q
        return self.q[..., 0::2] | (self.q[..., 1::2] << 4)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits ``zero_points``: uint8 ``[N * ceil(nb*bits/8)]`` (4-bit: two per byte)."""
        if self.zero_points is None:
            return None
        if self.bits == 8:
            return self.zero_points.reshape(-1)
        n, nb = self.zero_points.shape
        padded = np.zeros((n, nb + nb % 2), np.uint8)
        padded[:, :nb] = self.zero_points
        return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]`` — for a carried GGUF tensor, bit-equal to ``gguf.dequantize``."""
        zp = np.float32(2 ** (self.bits - 1)) if self.zero_points is None else \
            self.zero_points.astype(np.float32)[..., None]
        w = (self.q.astype(np.float32) - zp) * self.scales.astype(np.float32)[..., None]
        if self.halves:
            w = w[:, :self.k_blocks] + w[:, self.k_blocks:]
        if self.mins is not None:
            w = w + self.mins.astype(np.float32)[..., None]
        return w.reshape(self.n, -1)[:, :self.k]


def _scale(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Scales as stored (the weight's dtype), as float32; 1.0 for an all-zero block."""
    scale = scale.astype(dtype).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale


def quantize_float(wt: np.ndarray, bits: int, block_size: int) -> Blocks:
    """Blocks of ``wt`` ``[N, K]`` (float32/float16), round to nearest; per block the grid with
    the smallest squared error, all kept as ``(q - 2^(bits-1)) * scale + min``:

    * min/max with a float minimum (GGUF's ``Q4_1``/``Q8_1`` form): ``scale = (max - min) /
      (2^bits - 1)``, ``q = round((w - min) / scale)`` — all ``2^bits`` levels span the block, no
      integer zero point rounds the grid off it;
    * symmetric (no minimum): ``scale = w_absmax / -2^(bits-1)`` (the largest magnitude on the
      negative end) or ``|w|_max / (2^(bits-1) - 1)`` — exact for blocks already on such a grid
      (dequantized GGUF ``Q4_0`` / ``Q8_0``).
    """
    n, k = wt.shape
    nb = -(-k // block_size)
    levels = 2 ** bits - 1
    half = 2 ** (bits - 1)
    q = np.empty((n, nb, block_size), np.uint8)
    scales = np.empty((n, nb), wt.dtype)
    mins = np.empty((n, nb), wt.dtype)
    for r in range(0, n, _ROWS):
        w = np.zeros((min(_ROWS, n - r), nb * block_size), np.float32)
        w[:, :k] = wt[r:r + _ROWS]
        w = w.reshape(len(w), nb, block_size)
        valid = (np.arange(nb * block_size) < k).reshape(nb, block_size)  # K padding is no data
        lo = np.where(valid, w, np.inf).min(axis=-1)
        hi = np.where(valid, w, -np.inf).max(axis=-1)
        s = _scale((hi - lo) / levels, wt.dtype)
        lo = lo.astype(wt.dtype).astype(np.float32)
        amax = np.take_along_axis(w, np.abs(w).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        best_err = None
        sym = _scale(amax / -half, wt.dtype)  # the largest magnitude on the -2^(bits-1) end (Q4_0's grid)
        sym2 = _scale(np.abs(amax) / (half - 1), wt.dtype)  # ... or on +-(2^(bits-1) - 1) (Q8_0's)
        for s, m in ((s, lo), (sym, -half * sym), (sym2, -half * sym2)):
            codes = np.clip(np.rint((w - m[..., None]) / s[..., None]), 0, levels)
            offset = (m + half * s).astype(wt.dtype).astype(np.float32)  # the min with zero point 2^(bits-1)
            err = np.square(np.where(valid, (codes - half) * s[..., None] + offset[..., None] - w, 0)).sum(-1)
            if best_err is None:
                best_err, best = err, (codes, s, offset)
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best = tuple(np.where(better[..., None] if a.ndim == 3 else better, a, b)
                             for a, b in zip((codes, s, offset), best))
        codes, s, offset = best
        q[r:r + _ROWS] = codes.astype(np.uint8)
        scales[r:r + _ROWS] = s.astype(wt.dtype)
        mins[r:r + _ROWS] = offset.astype(wt.dtype)
    return Blocks(q, scales, bits, k, mins=None if not mins.any() else mins)


# ---- GGUF ------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _hash_coefficients(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)


def row_digests(wt: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each row's float32 bytes (wrapping polynomial; matches are verified)."""
    coef = _hash_coefficients(wt.shape[1])
    out = np.empty(wt.shape[0], np.uint64)
    for r in range(0, wt.shape[0], _ROWS):
        chunk = np.ascontiguousarray(wt[r:r + _ROWS], dtype=np.float32).view(np.uint32)
        out[r:r + _ROWS] = (chunk.astype(np.uint64) * coef).sum(axis=1, dtype=np.uint64)
    return out


def _codes4(qs: np.ndarray) -> np.ndarray:
    """ggml 4-bit block bytes ``[..., 16]`` → codes ``[..., 32]`` (low nibbles first, then high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes ``[..., 2]`` → float32 ``[...]``."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """ggml's 5th code bit of ``count`` elements from the 4 bytes ``qh`` (a little-endian uint32)
    → ``[..., count]`` of 0/1."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _centered(codes: np.ndarray, scale: np.ndarray, center: int, bits: int, k: int) -> Blocks:
    """``scale * (code - center)``: codes moved onto ORT's default zero point ``2^(bits-1)`` (no
    zero-point input, the kernels' symmetric path); exact, ``code - center`` being a small integer."""
    q = (codes.astype(np.int16) - center + 2 ** (bits - 1)).astype(np.uint8)
    return Blocks(q, scale, bits, k)


def _carry(type_name: str, raw: np.ndarray, k: int) -> Blocks | None:
    """GGUF rows ``raw`` (uint8 ``[N, bytes]``) of a carried type → :class:`Blocks`; None for
    another type. Codes are unpacked as ``gguf.quants`` does; per-block scales (and minima) are the
    float32 products it computes, so :meth:`Blocks.dequantize` equals ``gguf.dequantize`` bit for
    bit (the pass checks it). 4-bit codes stay 4-bit; 5- and 6-bit codes go into 8-bit blocks.

    ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1`` (blocks of 32); the K-quants ``Q4_K``,
    ``Q5_K`` (super-blocks of 256: 8 blocks of 32, 6-bit scales and minima) and ``Q6_K`` (16
    blocks of 16, int8 scales)."""
    n = raw.shape[0]
    if type_name == "Q8_0":
        b = raw.reshape(n, -1, 34)
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(q, _f16(b[..., 0:2]), 8, k)
    if type_name == "Q4_0":
        b = raw.reshape(n, -1, 18)
        return Blocks(_codes4(b[..., 2:]), _f16(b[..., 0:2]), 4, k)
    if type_name == "Q4_1":
        b = raw.reshape(n, -1, 20)
        return _min_form(_codes4(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 4, k)
    if type_name == "Q5_0":
        b = raw.reshape(n, -1, 22)
        codes = _codes4(b[..., 6:]) | (_high_bits(b[..., 2:6], 32) << 4)
        return _centered(codes, _f16(b[..., 0:2]), 16, 8, k)
    if type_name == "Q5_1":
        b = raw.reshape(n, -1, 24)
        codes = _codes4(b[..., 8:]) | (_high_bits(b[..., 4:8], 32) << 4)
        return _min_form(codes, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5, 8, k)
    if type_name in ("Q4_K", "Q5_K"):
        b = raw.reshape(n, -1, 144 if type_name == "Q4_K" else 176)
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, m = _k_scales(b[..., 4:16])
        scale = (d * sc.astype(np.float32)).reshape(n, -1)  # [N, super * 8]: one per block of 32
        minimum = -(dmin * m.astype(np.float32)).reshape(n, -1)
        qs = b[..., -128:].reshape(n, -1, 4, 32)  # per super-block: 4 groups of 32 bytes, 2 blocks each
        codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 32)
        if type_name == "Q4_K":
            return _min_form(codes, scale, minimum, 4, 4, k)
        qh = b[..., 16:48].reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        codes = codes | ((qh & 1).reshape(n, -1, 32) << 4)
        return _min_form(codes, scale, minimum, 5, 8, k)
    if type_name == "Q6_K":
        b = raw.reshape(n, -1, 210)
        ql = b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        codes = (ql & 0x0F).reshape(n, -1, 8, 32) | ((qh & 0x03).reshape(n, -1, 8, 32) << 4)
        scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return _centered(codes.reshape(n, -1, 16), scale.reshape(n, -1), 32, 8, k)
    return None


def _min_form(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, code_bits: int, bits: int,
              k: int) -> Blocks:
    """``scale * code + minimum`` (codes ``0 .. 2^code_bits - 1``) as ``(code - c) * scale +
    (minimum + c * scale)``, ``c = 2^(code_bits-1)``, on ORT's default zero point (no zero-point
    input: the kernels' symmetric path) when that shifted minimum is exact in float32 (both forms
    then round the same real number: bit-equal); else zero point 0 and ``minimum`` as it is."""
    center = 2 ** (code_bits - 1)
    shifted = minimum + np.float32(center) * scale
    exact = shifted.astype(np.float64) == minimum.astype(np.float64) + center * scale.astype(np.float64)
    if exact.all():
        blocks = _centered(codes, scale, center, bits, k)
        blocks.mins = shifted
        return blocks
    return Blocks(codes.astype(np.uint8), scale, bits, k, zero_points=np.zeros(scale.shape, np.uint8), mins=minimum)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of a ``Q4_K``/``Q5_K`` super-block → eight 6-bit scales and minima."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


class GGUFWeights:
    """The 2-D tensors of a GGUF file, indexed by the digests of their dequantized rows.

    :meth:`find` returns the blocks of the GGUF tensor a float32 weight ``[N, K]`` was
    dequantized from — every row bit-equal, rows in any order, possibly a subset — or says why
    not. The file is memory-mapped; each tensor is dequantized once to index it and again only
    when a weight is carried from it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            import gguf
        except ImportError:
            raise QeffGraphError("carrying GGUF blocks needs the gguf package; run `pip install gguf`") from None
        if not os.path.isfile(self.path):
            raise QeffGraphError(f"GGUF file {self.path} does not exist; pass the .gguf the export was made "
                                 "from, or quantize without it")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise QeffGraphError(f"cannot read GGUF file {self.path}: {type(exc).__name__}: {exc}; "
                                 "pass an intact .gguf") from None
        self._gguf = gguf
        self._tensors = [t for t in self._reader.tensors if len(t.shape) == 2]
        self._index: list[tuple[np.ndarray, np.ndarray]] | None = None  # per tensor: sorted digests, order

    @staticmethod
    def _dims(t) -> tuple[int, int]:
        return int(t.shape[1]), int(t.shape[0])  # ggml lists ne0 (K) first

    def _dequantize(self, t, rows: np.ndarray | None = None) -> np.ndarray:
        n, k = self._dims(t)
        data = t.data if rows is None else t.data[rows]
        return np.asarray(self._gguf.dequantize(data, t.tensor_type), dtype=np.float32).reshape(-1, k)

    def _build_index(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._index is None:
            index = []
            for t in self._tensors:
                digests = row_digests(self._dequantize(t))
                order = np.argsort(digests, kind="stable")
                index.append((digests[order], order))
            self._index = index
        return self._index

    def find(self, wt: np.ndarray) -> tuple[str, str, np.ndarray] | None:
        """``(tensor name, GGUF type, rows)`` whose dequantized rows have ``wt``'s row digests
        (same row count first); :meth:`carry` / :meth:`dequantize` give what to check bit for bit."""
        n, k = wt.shape
        digests = row_digests(wt)
        index = self._build_index()
        candidates = [i for i, t in enumerate(self._tensors) if self._dims(t)[1] == k and self._dims(t)[0] >= n]
        candidates.sort(key=lambda i: self._dims(self._tensors[i])[0] != n)
        for i in candidates:
            sorted_digests, order = index[i]
            pos = np.searchsorted(sorted_digests, digests)
            pos[pos == len(sorted_digests)] = 0
            if np.array_equal(sorted_digests[pos], digests):
                t = self._tensors[i]
                return t.name, t.tensor_type.name, order[pos]
        return None

    def dequantize(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``gguf.dequantize`` of these rows of tensor ``name`` (float32 ``[len(rows), K]``)."""
        return self._dequantize(self._tensor(name), rows)

    def _tensor(self, name: str):
        return next(t for t in self._tensors if t.name == name)

    def carry(self, name: str, rows: np.ndarray) -> Blocks | None:
        """The blocks of tensor ``name``'s ``rows``; None for a type that is not carried."""
        t = self._tensor(name)
        n, k = self._dims(t)
        blocks = _carry(t.tensor_type.name, np.asarray(t.data[rows]), k)
        if blocks is not None:
            blocks.origin = f"{t.tensor_type.name} {name}"
        return blocks
