"""Benchmark ``qeff_graph.optimize`` on a Llama-2-7B-shaped graph whose weights are a sparse file.

The graph is a decomposed Llama as torch exports it (dynamic KV: ``present = Concat(past,
new, axis=2)``, attention-mask-derived additive mask, decomposed RMSNorm, rotary from
``position_ids``), with *every* weight an external-data initializer in ``model.onnx.data``.
By default that file is created with ``truncate`` only: ~25 GiB apparent for fp32 weights
(~12.5 GiB for ``--dtype float16``), ~0 bytes on disk, and nothing is ever read from it
unless a pass (or the save) touches weight bytes. Touched pages of the memory-mapped file
count in the optimizing process's RSS, which is exactly what the benchmark measures.

``optimize`` runs in a child process; its wall time and peak RSS (``ru_maxrss`` of that one
child, via ``os.wait4``) are reported, with a per-phase breakdown (load, each pass, save)
recorded inside the child, and the disk usage of the program directory::

    python benchmarks/large_graph.py                    # Llama-2-7B shape, 32 layers
    python benchmarks/large_graph.py --layers 4 --json out.json --check
    python benchmarks/large_graph.py --profile prof.out # cProfile of the child

``build_llama_shaped(..., random_weights=True)`` writes real random weights instead (for tiny
shapes), so the synthetic graph can be checked against ONNX Runtime: see
``tests/e2e/test_large_graph.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_llama_shaped", "run_optimize_child", "disk_usage", "main"]

OPSET = 18
IR_VERSION = 9
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned offsets: ORT (and onnx_ir) can mmap each tensor
LIMIT_SECONDS = 15.0
LIMIT_RSS_MIB = 1024.0

_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


class _Weights:
    """Lays out external-data initializers in one file; never holds more than one tensor."""

    def __init__(self, data_path: Path, rng: np.random.Generator | None):
        self.data_path = data_path
        self.rng = rng  # None: sparse zeros (nothing written)
        self.offset = 0
        self.protos: list[TensorProto] = []
        self._file = open(data_path, "wb")

    def add(self, name: str, shape: tuple[int, ...], elem_type: int, *, init=None,
            always_write: np.ndarray | None = None) -> str:
        """Register ``name``; ``init(rng, shape)`` makes its values when weights are random.

        ``always_write`` is written even in sparse mode (tiny buffers such as ``inv_freq``).
        """
        np_type = helper.tensor_dtype_to_np_dtype(elem_type)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_type).itemsize
        self.offset += (-self.offset) % ALIGN
        data = always_write
        if data is None and self.rng is not None:
            data = init(self.rng, shape) if init is not None else self.rng.standard_normal(shape)
        if data is not None:
            data = np.ascontiguousarray(data, dtype=np_type)
            assert data.nbytes == nbytes, (name, data.shape, shape)
            self._file.seek(self.offset)
            self._file.write(data.tobytes())
        tensor = TensorProto(name=name, data_type=elem_type, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.protos.append(tensor)
        self.offset += nbytes
        return name

    def close(self) -> int:
        """Extend the file to its full size (a hole where nothing was written); return it."""
        self._file.truncate(self.offset)
        self._file.close()
        return self.offset


class _Graph:
    """Node list with torch-like names (``/model/layers.0/self_attn/q_proj/MatMul``)."""

    def __init__(self, elem_type: int):
        self.nodes: list[onnx.NodeProto] = []
        self.elem_type = elem_type
        self.np_type = helper.tensor_dtype_to_np_dtype(elem_type)
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def op(self, op_type: str, inputs: list[str], scope: str = "", out: str | None = None, **attrs) -> str:
        self._n += 1
        name = f"{scope}/{op_type}_{self._n}"
        out = out or f"{scope}/{op_type}_{self._n}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, value, dtype=None) -> str:
        """A Constant node (small shape/axes/scalar constants are not weights)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._n += 1
            out = f"/Constant_{self._n}_output_0"
            self.nodes.append(helper.make_node(
                "Constant", [], [out], name=f"/Constant_{self._n}",
                value=numpy_helper.from_array(array, out)))
            self._consts[key] = out
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=self.np_type))

    def rmsnorm(self, x: str, weight: str, eps: float, scope: str) -> str:
        """Decomposed RMSNorm as torch.onnx emits it for LlamaRMSNorm."""
        square = self.op("Pow", [x, self.scalar(2.0)], scope)
        mean = self.op("ReduceMean", [square, self.i64(-1)], scope, keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [mean, self.scalar(eps)], scope)], scope)
        normalized = self.op("Mul", [x, self.op("Reciprocal", [rms], scope)], scope)
        return self.op("Mul", [weight, normalized], scope)

    def rotate_half(self, x: str, head_dim: int, scope: str) -> str:
        half = head_dim // 2
        x1 = self.op("Slice", [x, self.i64(0), self.i64(half), self.i64(3), self.i64(1)], scope)
        x2 = self.op("Slice", [x, self.i64(half), self.i64(2**62), self.i64(3), self.i64(1)], scope)
        return self.op("Concat", [self.op("Neg", [x2], scope), x1], scope, axis=-1)

    def rope(self, x: str, cos: str, sin: str, head_dim: int, scope: str) -> str:
        return self.op("Add", [self.op("Mul", [x, cos], scope),
                               self.op("Mul", [self.rotate_half(x, head_dim, scope), sin], scope)], scope)


def _scaled_normal(scale: float):
    return lambda rng, shape: rng.standard_normal(shape) * scale


def _norm_weight(rng, shape):
    return 1.0 + 0.1 * rng.standard_normal(shape)


def build_llama_shaped(
    path_dir: str | os.PathLike,
    layers: int = 32,
    hidden: int = 4096,
    heads: int = 32,
    kv_heads: int = 32,
    intermediate: int = 11008,
    vocab: int = 32000,
    *,
    random_weights: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` (a Llama-shaped dynamic-KV export) into ``path_dir``.

    Every weight is an external-data initializer in ``model.onnx.data`` at a page-aligned
    offset. With ``random_weights=False`` (the default) no weight is materialized: the data
    file is extended with ``truncate`` to its full size and is sparse (all zeros, ~0 bytes on
    disk); only ``inv_freq`` (``head_dim / 2`` values) is written so the rotary embedding is
    real. ``random_weights=True`` writes seeded random weights (one tensor at a time; meant for
    tiny shapes that ONNX Runtime runs). Returns the path of ``model.onnx``.

    IO: ``input_ids``, ``attention_mask`` ``[batch_size, total_sequence_length]``,
    ``position_ids``, ``past_key_values.{i}.key/value`` ``[batch_size, kv_heads,
    past_sequence_length, head_dim]``; outputs ``logits`` ``[batch_size, sequence_length,
    vocab]`` and ``present.{i}.key/value``. Opset 18, IR version 9.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
    head_dim = hidden // heads
    if head_dim % 2:
        raise ValueError("head_dim must be even (rotary embedding)")
    n_rep = heads // kv_heads
    elem, np_type = _DTYPES[dtype]
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = path_dir / "model.onnx"

    w = _Weights(path_dir / DATA_FILE, np.random.default_rng(seed) if random_weights else None)
    g = _Graph(elem)
    neg_big = -3.0e4 if dtype == "float16" else -1e9  # two of them still fit in fp16

    def linear(name: str, fan_in: int, fan_out: int) -> str:
        # torch exports nn.Linear as MatMul(x, W^T) with the transposed weight as initializer
        return w.add(name, (fan_in, fan_out), elem, init=_scaled_normal(1.0 / math.sqrt(fan_in)))

    # ---- inputs / outputs ------------------------------------------------------------------
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", vocab])]
    cache_shape = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    present_shape = ["batch_size", kv_heads, "total_sequence_length", head_dim]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", elem, present_shape))

    # ---- embedding -------------------------------------------------------------------------
    embed = w.add("model.embed_tokens.weight", (vocab, hidden), elem)
    x = g.op("Gather", [embed, "input_ids"], "/model/embed_tokens", axis=0)

    # ---- rotary embedding (HF LlamaRotaryEmbedding: cos/sin of position * inv_freq) ---------
    inv_freq_values = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = w.add("model.rotary_emb.inv_freq", (head_dim // 2,), TensorProto.FLOAT,
                     always_write=inv_freq_values.astype(np.float32))
    s = "/model/rotary_emb"
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], s, to=TensorProto.FLOAT), g.i64(-1)], s)
    freqs = g.op("Mul", [pos, inv_freq], s)  # [B, S, head_dim/2]
    emb = g.op("Concat", [freqs, freqs], s, axis=-1)
    cos, sin = g.op("Cos", [emb], s), g.op("Sin", [emb], s)
    if dtype != "float32":
        cos, sin = g.op("Cast", [cos], s, to=elem), g.op("Cast", [sin], s, to=elem)
    cos = g.op("Unsqueeze", [cos, g.i64(1)], s)  # [B, 1, S, head_dim]
    sin = g.op("Unsqueeze", [sin, g.i64(1)], s)

    # ---- causal + padding mask, built once (reads the past length off the cache) -----------
    s = "/model"
    past_len = g.op("Shape", ["past_key_values.0.key"], s, start=2, end=3)
    seq_len = g.op("Shape", ["input_ids"], s, start=1, end=2)
    total = g.op("Add", [past_len, seq_len], s)
    q_pos = g.op("Range", [g.op("Squeeze", [past_len, g.i64(0)], s),
                           g.op("Squeeze", [total, g.i64(0)], s), g.const(1, np.int64)], s)
    k_pos = g.op("Range", [g.const(0, np.int64), g.op("Squeeze", [total, g.i64(0)], s),
                           g.const(1, np.int64)], s)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.i64(0)], s),
                                  g.op("Unsqueeze", [q_pos, g.i64(1)], s)], s)  # [S, T]
    causal = g.op("Where", [causal, g.scalar(0.0), g.scalar(neg_big)], s)
    maskf = g.op("Cast", ["attention_mask"], s, to=elem)
    padding = g.op("Mul", [g.op("Sub", [g.scalar(1.0), maskf], s), g.scalar(neg_big)], s)
    padding = g.op("Unsqueeze", [padding, g.i64(1, 2)], s)  # [B, 1, 1, T]
    mask = g.op("Add", [causal, padding], s)  # [B, 1, S, T]

    scale = g.scalar(1.0 / math.sqrt(head_dim))
    for i in range(layers):
        p, s = f"model.layers.{i}", f"/model/layers.{i}"
        h = g.rmsnorm(x, w.add(f"{p}.input_layernorm.weight", (hidden,), elem, init=_norm_weight),
                      eps, f"{s}/input_layernorm")
        a = f"{s}/self_attn"

        def project(proj: str, n_heads: int) -> str:
            out = g.op("MatMul", [h, linear(f"{p}.self_attn.{proj}.weight", hidden, n_heads * head_dim)],
                       f"{a}/{proj}")
            out = g.op("Reshape", [out, g.i64(0, 0, n_heads, head_dim)], a)
            return g.op("Transpose", [out], a, perm=[0, 2, 1, 3])  # [B, n, S, head_dim]

        q = g.rope(project("q_proj", heads), cos, sin, head_dim, a)
        k = g.rope(project("k_proj", kv_heads), cos, sin, head_dim, a)
        v = project("v_proj", kv_heads)
        key = g.op("Concat", [f"past_key_values.{i}.key", k], a, out=f"present.{i}.key", axis=2)
        value = g.op("Concat", [f"past_key_values.{i}.value", v], a, out=f"present.{i}.value", axis=2)
        if n_rep > 1:  # repeat_kv: [B, kv, T, d] -> [B, kv, n_rep, T, d] -> [B, heads, T, d]
            key, value = (
                g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.i64(2)], a), g.i64(1, 1, n_rep, 1, 1)], a),
                                 g.i64(0, heads, -1, head_dim)], a)
                for t in (key, value)
            )
        scores = g.op("MatMul", [q, g.op("Transpose", [key], a, perm=[0, 1, 3, 2])], a)
        scores = g.op("Add", [g.op("Mul", [scores, scale], a), mask], a)
        probs = g.op("Softmax", [scores], a, axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, value], a)], a, perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.i64(0, 0, hidden)], a)
        attn = g.op("MatMul", [ctx, linear(f"{p}.self_attn.o_proj.weight", hidden, hidden)], f"{a}/o_proj")
        x = g.op("Add", [x, attn], s)

        h = g.rmsnorm(x, w.add(f"{p}.post_attention_layernorm.weight", (hidden,), elem, init=_norm_weight),
                      eps, f"{s}/post_attention_layernorm")
        m = f"{s}/mlp"
        gate = g.op("MatMul", [h, linear(f"{p}.mlp.gate_proj.weight", hidden, intermediate)], f"{m}/gate_proj")
        up = g.op("MatMul", [h, linear(f"{p}.mlp.up_proj.weight", hidden, intermediate)], f"{m}/up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{m}/act_fn")], f"{m}/act_fn")
        down = g.op("MatMul", [g.op("Mul", [act, up], m),
                               linear(f"{p}.mlp.down_proj.weight", intermediate, hidden)], f"{m}/down_proj")
        x = g.op("Add", [x, down], s)

    h = g.rmsnorm(x, w.add("model.norm.weight", (hidden,), elem, init=_norm_weight), eps, "/model/norm")
    g.op("MatMul", [h, linear("lm_head.weight", hidden, vocab)], "/lm_head", out="logits")
    w.close()

    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, initializer=w.protos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qeff_graph.benchmarks.large_graph", producer_version="1")
    model.ir_version = IR_VERSION
    onnx.save_model(model, onnx_path)  # initializers carry no raw_data: nothing is written twice
    return onnx_path


# ---- measuring optimize in a child process -------------------------------------------------

_CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(rest.split()[0])
    return fields

import qeff_graph
from qeff_graph import ir as qir
t_import = time.perf_counter() - t0
phases = {}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = {"seconds": round(time.perf_counter() - start, 4), **status()}
    return wrapper

def weights_touched(model):
    # external tensors whose bytes were loaded (onnx_ir mmaps lazily on first access)
    import onnx_ir as ir
    names = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and (
                    getattr(t, "raw", None) is not None or getattr(t, "_array", None) is not None):
                names.append(value.name)
    return names

def mapped_data_rss_kib():
    # resident KiB of mappings of external data files (touched weight pages)
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head[0]) > 8 and ":" not in head[0]:
                current = len(head) >= 6 and head[-1].endswith(".data")
            elif current and head and head[0] == "Rss:":
                total += int(head[1])
    return total

write_model_files = qir.write_model_files
checks = {}

def save(model, *args, **kwargs):
    # the rewritten graph is alive here: every pass has run, nothing is saved yet
    touched = weights_touched(model)
    checks.update(weights_touched=len(touched), weights_touched_names=touched[:10],
                  mapped_data_rss_kib_before_save=mapped_data_rss_kib())
    try:
        return write_model_files(model, *args, **kwargs)
    finally:
        touched = weights_touched(model)
        checks.update(weights_touched_after_save=len(touched),
                      mapped_data_rss_kib_after_save=mapped_data_rss_kib())

load = qir.load

def load_and_touch(*args, **kwargs):
    model = load(*args, **kwargs)
    for name in spec.get("touch", ()):  # negative control: read these weights' bytes
        float(model.graph.initializers[name].const_value.numpy().sum())
    return model

qir.load = timed("load", load_and_touch)
qir.write_model_files = timed("save", save)
profile = None
if spec.get("profile"):
    import cProfile
    profile = cProfile.Profile()
    profile.enable()
t1 = time.perf_counter()
program = qeff_graph.optimize(spec["model"], spec["out"], **spec["options"])
t_optimize = time.perf_counter() - t1
if profile is not None:
    profile.disable()
    profile.dump_stats(spec["profile"])
result = {
    "import_seconds": round(t_import, 4),
    "optimize_seconds": round(t_optimize, 4),
    "phases": phases,
    "passes": [{"pass": e["pass"], "seconds": e["seconds"], "nodes_before": e["nodes_before"],
                "nodes_after": e["nodes_after"], "stats": e["stats"]}
               for e in program.manifest["pipeline"]],
    "final_status_kib": status(),
    **checks,
}
with open(spec["result"], "w") as f:
    json.dump(result, f)
"""


def run_optimize_child(model: str | os.PathLike, out_dir: str | os.PathLike, *, ctx_len: int = 1024,
                       prompt_len: int = 128, batch_size: int = 1, profile: str | None = None,
                       timeout: float | None = None, touch_weights: tuple[str, ...] = (),
                       hardlink_data: bool = False) -> dict:
    """Run ``qeff_graph.optimize`` in a fresh Python process; measure that process only.

    Returns ``wall_seconds`` (spawn to exit, interpreter start and imports included),
    ``peak_rss_kib`` (the child's peak RSS, KiB: ``VmHWM`` read by the child itself just
    before it exits; ``wait4_maxrss_kib`` is the kernel's ``ru_maxrss``, which can include the
    parent's RSS at spawn time), and what the child recorded: ``optimize_seconds``,
    ``phases`` (load/save seconds and RSS after each), per-pass seconds, final RSS split into
    anonymous and file-backed KiB, and the weight-read checks made just before the save (the
    rewritten graph still alive): ``weights_touched`` (external initializers whose bytes were
    loaded, with the first names) and ``mapped_data_rss_kib_*`` (resident pages of mapped
    ``*.data`` files). ``touch_weights`` names initializers the child reads right after loading:
    a negative control proving that these checks catch a weight read.
    """
    with tempfile.TemporaryDirectory(prefix="qeff-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        spec = {"model": str(model), "out": str(out_dir), "result": result_path, "profile": profile,
                "touch": list(touch_weights),
                "options": {"ctx_len": ctx_len, "prompt_len": prompt_len, "batch_size": batch_size,
                            "hardlink_data": hardlink_data}}
        stderr_path = os.path.join(tmp, "stderr.txt")
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            start = time.perf_counter()
            pid = os.posix_spawn(sys.executable, [sys.executable, "-c", _CHILD, json.dumps(spec)],
                                 dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, fd, 2)])
        finally:
            os.close(fd)
        deadline = None if timeout is None else start + timeout
        while True:
            waited, status, usage = os.wait4(pid, os.WNOHANG if deadline else 0)
            if waited == pid:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, 9)
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not os.path.exists(result_path):
            err = Path(stderr_path).read_text()[-4000:]
            raise RuntimeError(f"optimize child failed (exit {code}, wall {wall:.1f}s):\n{err}")
        result = json.loads(Path(result_path).read_text())
    # The child's own high-water mark (VmHWM of its post-exec address space). ru_maxrss from
    # wait4 can also include the parent's RSS at spawn time (the pre-exec image shares the
    # parent's mm), which inflates it when the parent is big, e.g. a pytest run with models
    # loaded; it is kept for reference only.
    hwm = result.get("final_status_kib", {}).get("VmHWM")
    result.update(wall_seconds=round(wall, 3), peak_rss_kib=hwm if hwm else usage.ru_maxrss,
                  wait4_maxrss_kib=usage.ru_maxrss,
                  rusage_children_maxrss_kib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return result


def disk_usage(path: str | os.PathLike) -> tuple[int, int]:
    """(actual bytes on disk, apparent bytes) of a file or tree; each inode counted once."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    seen, actual, apparent = set(), 0, 0
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        actual += st.st_blocks * 512
        apparent += st.st_size
    return actual, apparent


def _fmt_table(rows: list[dict]) -> str:
    cols = [("layers", "layers", "{}"), ("hidden", "hidden", "{}"), ("dtype", "dtype", "{}"),
            ("weights GiB (apparent)", "weights_gib_apparent", "{:.2f}"),
            ("build s", "build_seconds", "{:.2f}"),
            ("optimize s (child wall)", "wall_seconds", "{:.2f}"),
            ("optimize() s", "optimize_seconds", "{:.2f}"),
            ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
            ("output disk MiB", "output_disk_mib", "{:.2f}"),
            ("output apparent GiB", "output_apparent_gib", "{:.2f}")]
    header = " | ".join(c[0] for c in cols)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(" | ".join(fmt.format(r[key]).rjust(len(title)) for title, key, fmt in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    parser.add_argument("--ctx-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hardlink-data", action="store_true",
                        help="hard-link the data file into the program (default: clone/sparse copy)")
    parser.add_argument("--out", help="work directory for source/ and program/ (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep source/ and program/ afterwards")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--profile", help="cProfile the child; write pstats here and print the top")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when optimize takes >= {LIMIT_SECONDS:g} s or >= {LIMIT_RSS_MIB:g} MiB")
    args = parser.parse_args(argv)

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qeff-large-graph-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        onnx_path = build_llama_shaped(work / "source", args.layers, args.hidden, args.heads, args.kv_heads,
                                       args.intermediate, args.vocab, dtype=args.dtype)
        build_seconds = time.perf_counter() - start
        onnx.checker.check_model(str(onnx_path))  # path form: external data is not loaded
        src_actual, src_apparent = disk_usage(onnx_path.parent / DATA_FILE)
        program = work / "program"
        if program.exists():
            shutil.rmtree(program)
        child = run_optimize_child(onnx_path, program, ctx_len=args.ctx_len, prompt_len=args.prompt_len,
                                   batch_size=args.batch_size, profile=args.profile,
                                   hardlink_data=args.hardlink_data)
        out_actual, out_apparent = disk_usage(program)
        data_out = program / DATA_FILE
        row = {
            "layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
            "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype,
            "ctx_len": args.ctx_len, "prompt_len": args.prompt_len, "batch_size": args.batch_size,
            "weights_gib_apparent": src_apparent / 2**30,
            "source_data_disk_mib": src_actual / 2**20,
            "source_onnx_mib": onnx_path.stat().st_size / 2**20,
            "build_seconds": build_seconds,
            "peak_rss_mib": child["peak_rss_kib"] / 1024,
            "output_disk_mib": out_actual / 2**20,
            "output_apparent_gib": out_apparent / 2**30,
            "output_data_hard_linked": data_out.exists()
            and os.path.samefile(data_out, onnx_path.parent / DATA_FILE),
            "limits": {"seconds": LIMIT_SECONDS, "rss_mib": LIMIT_RSS_MIB},
            **child,
        }
        print(_fmt_table([row]))
        print("\nphases (seconds, RSS KiB after):")
        for name, phase in child["phases"].items():
            print(f"  {name:<8} {phase['seconds']:>8.3f}s  VmHWM={phase.get('VmHWM')}  "
                  f"RssAnon={phase.get('RssAnon')}  RssFile={phase.get('RssFile')}")
        for e in child["passes"]:
            print(f"  {e['pass']:<20} {e['seconds']:>8.3f}s  nodes {e['nodes_before']}->{e['nodes_after']}  {e['stats']}")
        print(f"  imports  {child['import_seconds']:>8.3f}s   final: {child['final_status_kib']}")
        print(f"  output data file hard-linked: {row['output_data_hard_linked']}")
        print(f"  weights whose bytes were loaded (before/after save): {child.get('weights_touched')}/"
              f"{child.get('weights_touched_after_save')}  {child.get('weights_touched_names') or ''}; "
              f"resident KiB of mapped data files: {child.get('mapped_data_rss_kib_after_save')}")
        if args.profile:
            import pstats

            print(f"\ncProfile of the child (top 25 by cumulative time), full stats in {args.profile}:")
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=2, default=str) + "\n")
        too_slow = row["wall_seconds"] >= LIMIT_SECONDS
        too_big = row["peak_rss_mib"] >= LIMIT_RSS_MIB
        if too_slow or too_big:
            print(f"\nOVER LIMIT: wall {row['wall_seconds']:.2f}s (limit {LIMIT_SECONDS:g}), "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB (limit {LIMIT_RSS_MIB:g})")
        return 1 if args.check and (too_slow or too_big) else 0
    finally:
        if args.keep:
            print(f"\nkept {work} (source/ and program/)")
        elif args.out:  # remove only what this run made in a directory the user named
            for sub in ("source", "program"):
                shutil.rmtree(work / sub, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
