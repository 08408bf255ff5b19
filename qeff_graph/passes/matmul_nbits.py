"""Lower float MatMuls with a constant weight to ONNX Runtime's ``com.microsoft::MatMulNBits``.

``MatMul(A, W)`` with ``W`` a rank-2 float32/float16 constant ``[K, N]``, and ``MatMul(A,
Transpose(Wt, perm=[1, 0]))`` with ``Wt`` ``[N, K]`` (a tied LM head in torch dynamo exports),
become ``MatMulNBits(A, B, scales[, zero_points])`` with ``K``, ``N``, ``bits``, ``block_size``
and ``accuracy_level`` attributes, computing ``A @ W`` with ``W[k, n] = (q - zero_point) * scale
(+ min)`` per block of ``block_size`` consecutive K entries. A block minimum (GGUF ``Q4_1``'s
``m``; the float quantizer's offset) has no MatMulNBits input: it is added as ``(A @ E) @ mins``,
``E`` ``[K, K/block]`` summing A per block (shared by the MatMuls reading the same A). ORT's
float zero points would express it too, but leave the fast kernels (~45x slower,
notes/ORT_FAST_PATH.md). Where the blocks come from (:mod:`qeff_graph.passes.weight_blocks`):

* a float model: ``weight_bits`` (4 or 8) blocks of ``block_size`` (32), round to nearest on each
  block's own [min, max] with a float minimum, or a symmetric grid where that is closer.
* ``gguf=PATH`` (``--weight-bits 4`` on an export made from a GGUF file does this): each weight
  must be the exact dequantization of a tensor in that GGUF — rows in any order (transformers
  permutes llama's q/k rows) or a subset of its rows; matched by row digests, then checked bit
  for bit — else the pass refuses with one line; that tensor's own blocks are carried:
  ``Q4_0``/``Q4_1``/``Q4_K`` as 4-bit, ``Q8_0``/``Q5_0``/``Q5_1``/``Q5_K``/``Q6_K`` as 8-bit (blocks of
  16 for ``Q6_K``; an 8-bit tensor stays 8-bit: SmolLM2's tied embedding/LM head). The program
  then computes with exactly the GGUF's weights. Tensors of another type (F32, F16, ``Q2_K``,
  ``Q3_K``, ``IQ*``) are quantized from the float weights as above and listed in one progress line.

MatMuls that read the same ``A`` (the Q/K/V projections, gate/up) and whose weights have the same
block form and no other use are **packed**: one ``MatMulNBits`` over their blocks stacked along
N (and one block-minimum correction), then a ``Split`` back — fewer, wider kernels, the same
numbers (each column's blocks are its own weight's).

A ``Gather(table, ids)`` (axis 0) whose table is a weight quantized here in the ``Wt`` layout (a
tied embedding) or a GGUF tensor carried exactly (a GGUF export's embedding) becomes
``GatherBlockQuantized`` on the same ``B`` bytes (+ the block minimum, + a Reshape to
``[..., K]``); other Gathers keep their float table.

``accuracy_level`` ``"auto"`` is 1: float compute, so the program computes with exactly the
weights written. ORT's CPU kernels have no float-compute 8-bit path (a 576x1536 8-bit matmul took
1.7-5 ms at levels 0/1, 25-70x its 4-bit time, 1 thread), so 8-bit blocks run as two 4-bit halves:
``(q - z)*s = (q>>4 - z>>4)*16s + (q&15 - z&15)*s``, both exact, each a MatMulNBits over A, their
outputs added (one MatMulNBits over ``[A, A]`` with K doubled took twice as long: SmolLM2's
576x49152 LM head 4.0-4.3 ms against 2.2 ms, a 576x3072 weight 256-270 against 149-155 us per
layer, 30 layers streamed, 2 threads, AVX-512). Level 4 (int8
compute, activations quantized per block) keeps true 8-bit blocks and is 1.5-1.8x faster here, but
moves greedy text: measured on SmolLM2-135M (ORT 1.32, 2-core AVX-512, 12 chat prompts x 64
greedy tokens, share before the first difference from fp32; decode tok/s batch 1, ctx_len 256;
fp32 47.4 tok/s)::

    weights                 level   agree   tok/s
    int4, the GGUF's blocks   1     1.00    79.1    (0: the same kernels, 1.00, 81.6)
    int4, the GGUF's blocks   4     0.50   122.1
    int8, quantized here      1     1.00    54.9    (two 4-bit halves)
    int8, quantized here      4     0.35    99.0

Level 4 on one kind of weight only still moves it (int4: LM head 0.75, attention output 0.79,
MLP down 0.64), so ``"auto"`` keeps every weight at level 1.

Layout (as ORT's ``MatMulNBitsQuantizer`` writes it): ``B`` is uint8 ``[N, k_blocks,
block_size * bits / 8]`` — row-major ``Wt``, so the tied-head case needs no transpose — with
two 4-bit values per byte, element ``2i`` in the low nibble and ``2i + 1`` in the high one;
``scales`` has W's dtype and shape ``[N * k_blocks]`` (block index fastest); ``zero_points``
uint8, 4-bit ones two per byte, omitted when all are ORT's default ``2^(bits-1)``.

Unlike the graph-only passes, this one reads weight bytes: one matrix at a time (in row
chunks), through ``const_value.numpy()`` (external data is memory-mapped lazily), and the
GGUF's tensors (memory-mapped, dequantized one at a time to index their rows). A weight shared
by several MatMuls is quantized once; the float weight (and a Transpose feeding only quantized
MatMuls) is dropped once nothing else uses it. Whatever changes what this pass writes must bump
``qeff_graph.program.spec.WEIGHT_SCHEME`` (cached programs are keyed by it).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph import progress
from qeff_graph.errors import QeffGraphError
from qeff_graph.ir.build import QEFF_PREFIX, Builder, add_initializer
from qeff_graph.ir.io import read_tensor
from qeff_graph.passes.registry import register
from qeff_graph.passes.weight_blocks import Blocks, GGUFWeights, quantize_float

__all__ = ["MatMulNBits"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_OWN = f"{QEFF_PREFIX}matmul-nbits/"  # names of the nodes this pass writes
AUTO_LEVEL = 1  # accuracy_level="auto" (measured, module docstring)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level attribute


def _const_2d(value: ir.Value | None) -> ir.TensorProtocol | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.dtype not in _FLOATS or len(tensor.shape) != 2:
        return None
    return tensor


def _weight(value: ir.Value) -> tuple[ir.Value, bool] | None:
    """``(weight value, transposed)`` if ``value`` is a 2-D float constant, maybe via Transpose."""
    if value.is_graph_input():  # an overridable initializer is not a constant
        return None
    if _const_2d(value) is not None:
        return value, False
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
        perm = node.attributes.get_ints("perm", [1, 0])
        source = node.inputs[0]
        if list(perm) == [1, 0] and not source.is_graph_input() and _const_2d(source) is not None:
            return source, True
    return None


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the weight (and a Transpose/Constant producing it) once nothing reads it."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    node = value.producer()
    if node is not None and node.graph is graph and node.op_type in ("Transpose", "Constant"):
        graph.remove(node, safe=True)
        for source in node.inputs:
            if source is not None:
                _drop_if_unused(graph, source)
    elif node is None and value.is_initializer() and value.graph is graph:
        graph.initializers.pop(value.name)


class _Part:
    """One MatMulNBits' ``B`` / ``scales`` / ``zero_points`` initializers (and, made on demand,
    the ``scales`` / ``zero_points`` a GatherBlockQuantized on the same ``B`` reads)."""

    def __init__(self, q: _Quantized, blocks: Blocks, dtype: np.dtype, suffix: str):
        self.q, self.suffix = q, suffix
        self.b = q._init(f"_Q{blocks.bits}{suffix}", blocks.packed())
        self.scales = q._init(f"_scales{suffix}", blocks.scales.astype(dtype).reshape(-1))
        zp = blocks.packed_zero_points()
        self.zero_points = None if zp is None else q._init(f"_zero_points{suffix}", zp)
        self._zp_blocks = blocks.zero_points
        self._gather = None

    def gather_inputs(self) -> tuple[ir.Value, ir.Value | None]:
        """``(scales [N, nb, 1], zero_points [N, nb, 1] | None)`` for a GatherBlockQuantized."""
        if self._gather is None:
            q, sfx = self.q, self.suffix
            scales = q._init(f"_gather_scales{sfx}", self.scales.const_value.numpy().reshape(q.n, -1, 1))
            zp = None if self._zp_blocks is None else \
                q._init(f"_gather_zero_points{sfx}", self._zp_blocks.reshape(q.n, -1, 1))
            self._gather = (scales, zp)
        return self._gather


class _Quantized:
    """One weight in MatMulNBits form: its initializers (and those GatherBlockQuantized needs).
    ``parts``: one, or two for 8-bit halves (high-nibble and low-nibble 4-bit blocks, each a
    MatMulNBits over the same A, their outputs added)."""

    def __init__(self, pass_: MatMulNBits, graph: ir.Graph, base: str, blocks: Blocks, dtype: np.dtype):
        self.graph, self.base, self.pass_ = graph, base, pass_
        self.bits, self.block_size, self.k, self.n = blocks.bits, blocks.block_size, blocks.k, blocks.n
        self.nb, self.origin, self.dtype = blocks.k_blocks, blocks.origin, np.dtype(dtype)
        parts = blocks.parts()
        self.parts = [_Part(self, p, dtype, "" if len(parts) == 1 else sfx) for p, sfx in zip(parts, ("_hi", "_lo"))]
        self.mins = None if blocks.mins is None else blocks.mins.astype(dtype)
        self._mins_t = self._gather_mins = None

    def _init(self, suffix: str, data: np.ndarray) -> ir.Value:
        self.pass_.stats["bytes_after"] += data.nbytes
        return add_initializer(self.graph, f"{self.base}{suffix}", data)

    @property
    def ir_dtype(self) -> ir.DataType:
        return ir.DataType.from_numpy(self.dtype)

    def mins_t(self) -> ir.Value:
        """``[k_blocks, N]``: the block minima as the second operand of the correction MatMul."""
        if self._mins_t is None:
            self._mins_t = self._init("_mins", np.ascontiguousarray(self.mins.T))
        return self._mins_t

    def gather_mins(self) -> ir.Value | None:
        """``[N, nb]``: the block minima a Gather adds, or None."""
        if self.mins is not None and self._gather_mins is None:
            self._gather_mins = self._init("_gather_mins", self.mins)
        return self._gather_mins


@register("matmul-nbits")
class MatMulNBits(ir.passes.InPlacePass):
    """Quantize constant MatMul weights to 4/8-bit blocks (or carry a GGUF's): com.microsoft::MatMulNBits.

    ``weight_bits`` (4 or 8), ``block_size`` (power of two >= 16), ``accuracy_level`` ("auto":
    1, float compute; None omits it; 4 = int8 compute on CPU, faster, changes greedy text),
    ``min_elements`` (skip weights with fewer K*N values), ``gguf`` (path of the GGUF the float
    weights were dequantized from: carry its blocks), ``pack`` (default True: MatMuls that read
    the same input with weights of one block form — Q/K/V, gate/up — become one MatMulNBits over
    the weights stacked along N, then a Split; each weight's blocks stay exactly its own).

    Expects:
        Main-graph ``MatMul(A, W)`` / ``MatMul(A, Transpose(Wt))`` with a rank-2 float32/float16
        constant weight and A of rank >= 2; other MatMuls (and subgraphs) are left alone. With
        ``gguf``: float32 weights, each the exact dequantization of (rows of) a GGUF tensor.
    Guarantees:
        Each such MatMul is a ``MatMulNBits`` (+ the block-minimum correction where blocks have a
        minimum; 8-bit blocks below level 4 as two 4-bit halves, added) writing the same
        output value (graph outputs keep their names), computing A @ dequantized(W); carried
        weights dequantize bit-equal to the float weights (checked here); each weight
        is quantized once; a Gather over a tied or carried table is a ``GatherBlockQuantized``;
        float weights and Transposes nothing else uses are removed; ``com.microsoft`` v1 is
        imported. ``stats``: ``quantized``, ``weights``, ``carried``, ``requantized``,
        ``gathers``, ``bytes_before``, ``bytes_after``.
    """

    def __init__(self, weight_bits: int = 8, block_size: int = 32, accuracy_level: int | str | None = "auto",
                 min_elements: int = 0, gguf: str | None = None, pack: bool = True):
        super().__init__()
        self.pack = pack
        if weight_bits not in (4, 8):
            raise QeffGraphError(f"matmul-nbits: weight_bits must be 4 or 8, got {weight_bits}; "
                                 "pass weight_bits=4 or weight_bits=8")
        if block_size < 16 or block_size & (block_size - 1):
            raise QeffGraphError(f"matmul-nbits: block_size must be a power of two >= 16, got "
                                 f"{block_size}; use e.g. block_size=32")
        if accuracy_level not in ("auto", None, *ACCURACY_LEVELS):
            raise QeffGraphError(f"matmul-nbits: accuracy_level must be 0-4, None or 'auto', got {accuracy_level!r}")
        self.weight_bits, self.block_size = weight_bits, block_size
        self.accuracy_level, self.min_elements = accuracy_level, min_elements
        self.gguf = None if gguf is None else str(gguf)
        self.stats: dict[str, int] = {}
        self.requantized: list[str] = []  # GGUF-mode weights re-quantized (type not carried)

    @property
    def bits(self) -> int:
        return self.weight_bits

    def _matches(self, node: ir.Node) -> tuple[ir.Value, bool] | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        if (node.name or "").startswith(_OWN):  # a block-minimum correction this pass wrote
            return None
        a = node.inputs[0]
        if a is None or (a.dtype is not None and a.dtype not in _FLOATS):
            return None
        if a.shape is not None and a.shape.rank() < 2:
            return None
        found = _weight(node.inputs[1])
        if found is None or _const_2d(found[0]).size < max(self.min_elements, 1):
            return None
        return found

    def _blocks(self, weight: ir.Value, wt: np.ndarray, source: GGUFWeights | None, required: bool
                ) -> Blocks | None:
        """The blocks of ``wt`` ``[N, K]``: carried from the GGUF, else quantized here.

        ``required``: a weight the GGUF must hold (a MatMul's); a Gather's table that is not in it
        gives None (it stays float)."""
        if source is None:
            return quantize_float(wt, self.weight_bits, self.block_size)
        name = weight.name or "weight"
        if wt.dtype != np.float32:
            raise QeffGraphError(f"matmul-nbits: weight {name!r} is {wt.dtype}, but GGUF blocks are carried into "
                                 "float32 graphs only; export the GGUF in float32 or quantize without gguf")
        found = source.find(wt)
        if found is None:
            if not required:
                return None
            raise QeffGraphError(
                f"matmul-nbits: weight {name!r} {list(wt.shape)} is not the exact dequantization of any tensor "
                f"in {source.path}; the graph was not exported from this GGUF: re-export it from the GGUF, "
                "or quantize its float weights (--weight-bits 8, or this pass without gguf)")
        tensor, kind, rows = found
        blocks = source.carry(tensor, rows)
        exact = (blocks.dequantize() if blocks is not None else source.dequantize(tensor, rows)).view(np.uint32)
        if not np.array_equal(exact, wt.view(np.uint32)):  # row digests matched, the values do not
            raise QeffGraphError(f"matmul-nbits: weight {name!r} {list(wt.shape)} is not the exact dequantization "
                                 f"of {kind} {tensor} in {source.path}; re-export the model from this GGUF, or "
                                 "quantize its float weights (--weight-bits 8, or this pass without gguf)")
        if blocks is None and not required:
            return None  # a Gather's table of a type not carried stays float
        if blocks is None:
            self.requantized.append(f"{name} ({kind} {tensor})")
            return quantize_float(wt, self.weight_bits, self.block_size)
        self.stats["carried"] += 1
        return blocks

    def _weight_blocks(self, weight: ir.Value, transposed: bool, source: GGUFWeights | None,
                       required: bool = True) -> tuple[Blocks, np.dtype] | None:
        """The blocks a weight becomes (in the form the kernel runs) and its float dtype."""
        tensor = _const_2d(weight)
        array = read_tensor(tensor)
        wt = np.ascontiguousarray(array if transposed else array.T)
        blocks = self._blocks(weight, wt, source, required)
        if blocks is None:
            return None
        if required and blocks.bits == 8 and self._level() != 4 and blocks.k == blocks.k_blocks * blocks.block_size:
            blocks = blocks.as_halves()  # no float-compute 8-bit kernel on CPU: two 4-bit halves
        self.stats["bytes_before"] += tensor.nbytes
        self.stats["weights"] += 1
        return blocks, array.dtype

    def _quantize(self, graph: ir.Graph, weight: ir.Value, transposed: bool, source: GGUFWeights | None,
                  required: bool = True) -> _Quantized | None:
        found = self._made.pop((id(weight), transposed), None) or self._weight_blocks(weight, transposed, source, required)
        return None if found is None else _Quantized(self, graph, weight.name or "weight", *found)

    def _pack(self, b: Builder, graph: ir.Graph, matches: list, source: GGUFWeights | None, sums: dict) -> set:
        """MatMuls reading the same A whose weights have the same block form (and no other use)
        become one MatMulNBits over their weights stacked along N (one block-minimum correction),
        then a Split: Q/K/V, gate/up. Returns the nodes rewritten."""
        uses: dict = {}
        for _node, (weight, transposed) in matches:
            uses[(id(weight), transposed)] = uses.get((id(weight), transposed), 0) + 1
        by_input: dict = {}
        for node, found in matches:
            weight = node.inputs[1]  # W, or Transpose(Wt): read by this MatMul only (a tied table is not)
            alone = len(weight.uses()) == 1 and (weight is found[0] or len(found[0].uses()) == 1)
            if uses[(id(found[0]), found[1])] == 1 and alone:
                by_input.setdefault(id(node.inputs[0]), []).append((node, found))
        done = set()
        for members in by_input.values():
            if len(members) < 2:
                continue
            forms: dict = {}
            for node, found in members:
                blocks, dtype = self._made[(id(found[0]), found[1])] = self._weight_blocks(*found, source)
                form = (blocks.bits, blocks.k, blocks.block_size, blocks.halves, np.dtype(dtype), blocks.mins is None)
                forms.setdefault(form, []).append((node, found, blocks, dtype))
            for group in forms.values():
                if len(group) < 2:
                    continue  # alone in its form: its own MatMulNBits (the blocks wait in self._made)
                for _, found, _, _ in group:
                    del self._made[(id(found[0]), found[1])]
                group = [(node, blocks, dtype) for node, _, blocks, dtype in group]
                stacked = Blocks.stack([blocks for _, blocks, _ in group])
                q = _Quantized(self, graph, "+".join(n.inputs[1].name or "w" for n, _, _ in group), stacked, group[0][2])
                self._rewrite_matmul(b, graph, [n for n, _, _ in group], q, sums, sizes=[bl.n for _, bl, _ in group])
                done.update(n for n, _, _ in group)
                self.stats["packed"] += len(group)
        return done

    def _block_sums(self, b: Builder, graph: ir.Graph, a: ir.Value, q: _Quantized, cache: dict) -> ir.Value:
        """``A @ E``: A summed over each block of K (shared by the MatMuls reading the same A)."""
        key = (id(a), q.k, q.block_size)
        if key not in cache:
            ekey = ("E", q.k, q.block_size, q.mins.dtype)
            if ekey not in cache:
                e = np.zeros((q.k, q.nb), q.mins.dtype)
                e[np.arange(q.k), np.arange(q.k) // q.block_size] = 1
                self.stats["bytes_after"] += e.nbytes
                cache[ekey] = add_initializer(graph, f"qeff_block_sum_{q.k}_{q.block_size}_{e.dtype}", e)
            cache[key] = b.op("MatMul", a, cache[ekey])
        return cache[key]

    def _level(self) -> int | None:
        return AUTO_LEVEL if self.accuracy_level == "auto" else self.accuracy_level

    def _rewrite_matmul(self, b: Builder, graph: ir.Graph, node: ir.Node | list[ir.Node], q: _Quantized, sums: dict,
                        sizes: list[int] | None = None) -> None:
        """``node`` → MatMulNBits (+ correction); a list of nodes reading one A (``sizes``: their
        N) → one MatMulNBits over the stacked weights, split back along the last axis."""
        level = self._level()
        extra = {} if level is None else {"accuracy_level": level}
        nodes = node if isinstance(node, list) else [node]
        node = nodes[0]
        a = node.inputs[0]
        y = None
        for part in q.parts:  # 8-bit halves: a MatMulNBits per 4-bit half, added
            inputs = [a, part.b, part.scales] + ([part.zero_points] if part.zero_points is not None else [])
            out = b.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=q.k, N=q.n, bits=q.bits,
                       block_size=q.block_size, **extra)
            y = out if y is None else b.op("Add", y, out)
        if q.mins is not None:
            y = b.op("Add", y, b.op("MatMul", self._block_sums(b, graph, node.inputs[0], q, sums), q.mins_t()))
        ys = [y] if sizes is None else b.op_multi("Split", y, b.i64(*sizes), axis=-1, num_outputs=len(sizes))
        for each, y in zip(nodes, ys):
            old = each.outputs[0]
            _replace(b, graph, each, old, y, old.dtype or q.ir_dtype)  # MatMulNBits' output type is A's = W's

    def _rewrite_gather(self, b: Builder, graph: ir.Graph, node: ir.Node, q: _Quantized) -> None:
        ids = node.inputs[1]
        old = node.outputs[0]
        y = None
        for part in q.parts:  # [*ids, nb, block] each; 8-bit halves: high-nibble + low-nibble blocks
            scales, zp = part.gather_inputs()
            inputs = [part.b, ids, scales] + ([zp] if zp is not None else [])
            out = b.op("GatherBlockQuantized", *inputs, domain=MS_DOMAIN, bits=q.bits,
                       block_size=q.block_size, gather_axis=0, quantize_axis=2)
            y = out if y is None else b.op("Add", y, out)
        mins = q.gather_mins()
        if mins is not None:
            y = b.op("Add", y, b.op("Unsqueeze", b.op("Gather", mins, ids, axis=0), b.i64(-1)))
        rank = ids.shape.rank()
        y = b.op("Reshape", y, b.i64(*([0] * rank), q.nb * q.block_size))
        if q.nb * q.block_size != q.k:
            y = b.op("Slice", y, b.i64(0), b.i64(q.k), b.i64(-1))
        _replace(b, graph, node, old, y, old.dtype or q.ir_dtype)  # a Gather gives its table's type = W's
        self.stats["gathers"] += 1

    def _gather_table(self, node: ir.Node) -> ir.Value | None:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        if (node.name or "").startswith(_OWN):  # the block minima of a GatherBlockQuantized written here
            return None
        table, ids = node.inputs
        if table is None or table.is_graph_input() or _const_2d(table) is None or ids is None:
            return None
        if node.attributes.get_int("axis", 0) != 0 or ids.shape is None:
            return None
        return table

    def ensures(self, model: ir.Model) -> None:
        """No quantizable MatMul is left; every MatMulNBits written here has B / scales / zero
        points of the shapes its K, N, bits and block_size say (checked on shapes: no bytes read)."""
        left = [n.name for n in model.graph if self._matches(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"matmul-nbits left {len(left)} MatMul(s) unquantized: {left[:3]}")
        for node in model.graph:
            if node.op_type != "MatMulNBits" or not (node.name or "").startswith(_OWN):
                continue
            a = node.attributes
            k, n, bits, block = (a[x].value for x in ("K", "N", "bits", "block_size"))
            nb = -(-k // block)
            want = [(n, nb, block * bits // 8), (n * nb,)] + ([(n * -(-nb * bits // 8),)] if len(node.inputs) > 3 else [])
            got = [tuple(v.shape.numpy()) if v is not None and v.shape is not None else None for v in node.inputs[1:]]
            if got != want:
                raise ir.passes.PostconditionError(f"MatMulNBits {node.name}: inputs shaped {got}, K={k} N={n} "
                                                   f"bits={bits} block_size={block} need {want}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = {"quantized": 0, "weights": 0, "carried": 0, "requantized": 0, "gathers": 0, "packed": 0,
                      "bytes_before": 0, "bytes_after": 0}
        self.requantized = []
        graph = model.graph
        source = GGUFWeights(self.gguf) if self.gguf is not None else None
        b = Builder(graph, "matmul-nbits")
        done: dict[tuple[int, bool], _Quantized | None] = {}
        sums: dict = {}
        dead: list[ir.Value] = []
        matches = [(node, found) for node in list(graph) if (found := self._matches(node)) is not None]
        weights = {node: node.inputs[1] for node, _ in matches}  # read before a rewrite disconnects the node
        self._made: dict = {}  # blocks made while packing, for weights that stayed alone
        packed = self._pack(b, graph, matches, source, sums) if self.pack else set()
        dead += [weights[node] for node in packed]
        self.stats["quantized"] += len(packed)
        for node, found in matches:
            if node in packed:
                continue
            key = (id(found[0]), found[1])
            if key not in done:
                done[key] = self._quantize(graph, *found, source)
            dead.append(node.inputs[1])
            self._rewrite_matmul(b, graph, node, done[key], sums)
            self.stats["quantized"] += 1
        for node in list(graph):
            table = self._gather_table(node)
            if table is None:
                continue
            key = (id(table), True)
            if key not in done and source is not None:  # an untied table: carried if the GGUF has it
                done[key] = self._quantize(graph, table, True, source, required=False)
            if done.get(key) is None:
                continue
            self._rewrite_gather(b, graph, node, done[key])
            dead.append(table)
        for value in dead:
            _drop_if_unused(graph, value)
        if done:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.sort()
        self.stats["requantized"] = len(self.requantized)
        if self.requantized:
            progress.say(f"matmul-nbits: {len(self.requantized)} weight(s) re-quantized to {self.weight_bits} bits "
                         f"(their GGUF type is not carried): {', '.join(self.requantized)}")
        logger.info("matmul-nbits: %d MatMuls, %d weights (%d carried from GGUF), %d Gathers, %d -> %d bytes",
                    self.stats["quantized"], self.stats["weights"], self.stats["carried"], self.stats["gathers"],
                    self.stats["bytes_before"], self.stats["bytes_after"])
        return ir.passes.PassResult(model, modified=self.stats["quantized"] + self.stats["gathers"] > 0)


def _replace(b: Builder, graph: ir.Graph, node: ir.Node, old: ir.Value, y: ir.Value, dtype) -> None:
    """Commit ``b``'s nodes and put ``y`` (typed and shaped like ``old``) in place of ``node``."""
    y.dtype = dtype
    if old.shape is not None:
        y.shape = old.shape
    b.commit()
    ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = old.name
