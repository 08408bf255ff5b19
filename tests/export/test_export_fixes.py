"""What the exporter does beyond calling torch: epsilons kept, bfloat16 math runnable on ONNX
Runtime CPU, position_ids always an input, exportable experts, bounded dynamic dims, and
failures that say what the model did."""

from __future__ import annotations

import numpy as np
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.export import export_causal_lm
from tests.helpers import tiny_config

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tf = pytest.importorskip("transformers")


def _model(family: str, **overrides):
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _float_constants(path) -> list[float]:
    """Every scalar float the graph holds: initializers, Constant nodes, float attributes."""
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    found = []
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and np.prod(init.dims) == 1:
            found.append(float(numpy_helper.to_array(init).reshape(-1)[0]))
    for node in m.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.FLOAT:
                found.append(a.f)
            elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and np.prod(a.t.dims) == 1 \
                    and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                found.append(float(numpy_helper.to_array(a.t).reshape(-1)[0]))
    return found


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("dynamo", 23), ("torchscript", 17)])
def test_export_keeps_a_tiny_rmsnorm_epsilon(exporter, opset, tmp_path):
    """RMSNorm with eps 1e-8: onnxscript's no-op rules (abs tolerance 1e-8) take ``+ 1e-8`` for
    ``+ 0`` and delete it; the export must keep it (as an Add constant, or the epsilon of a fused
    RMSNormalization at opset 23)."""
    model = _model("llama", rms_norm_eps=1e-8)
    res = export_causal_lm(model, tmp_path / "onnx", exporter=exporter, opset=opset, progress=False)
    eps = [v for v in _float_constants(res.onnx_path) if 0 < v < 1e-6]
    assert eps and all(abs(v - 1e-8) < 1e-11 for v in eps), eps


def test_falcon_alibi_runs_on_ort_cpu_as_exported(tmp_path):
    """Falcon's ALiBi rounds its slopes to bfloat16 (``slopes.bfloat16() * arange``): the export
    computes that in float32 with the same bfloat16 rounding, so ORT CPU loads it and agrees
    with torch; TorchScript's export also keeps position_ids (ALiBi never reads it)."""
    model = _model("falcon_alibi")
    for exporter in ("dynamo", "torchscript"):
        res = export_causal_lm(model, tmp_path / exporter, exporter=exporter, progress=False)
        import json

        fixes = json.loads((res.out_dir / "export.json").read_text())["graph_fixes"]
        assert fixes["bfloat16_nodes_in_float32"] >= 1, fixes
        m = onnx.load(str(res.onnx_path), load_external_data=False)
        assert [i.name for i in m.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
        sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
        # positions past 256: bfloat16 keeps 8 bits, so the rounding shows (and must match torch's)
        past, seq = 300, 3
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, 512, (1, seq)), "attention_mask": np.ones((1, past + seq), np.int64),
                 "position_ids": np.arange(past, past + seq)[None]}
        kv = {f"past_key_values.{i}.{k}": rng.standard_normal((1, res.num_kv_heads, past, res.head_dim)).astype(np.float32)
              for i in range(res.num_layers) for k in ("key", "value")}
        got = sess.run(["logits"], {**feeds, **kv})[0]
        from qeff_graph.export.wrapper import FlatCacheCausalLM

        with torch.no_grad():
            want = FlatCacheCausalLM(model, res.num_layers)(
                *(torch.from_numpy(np.asarray(x)) for x in [*feeds.values(), *kv.values()]))[0].numpy()
        assert np.abs(got - want).max() < 1e-4, exporter


def test_bfloat16_arithmetic_is_computed_in_float32_with_bfloat16_rounding(tmp_path):
    """A hand-built graph: bfloat16 Mul and Add (no ORT CPU kernel) → float32 between casts; the
    result equals torch's bfloat16 arithmetic bit for bit."""
    from onnx import TensorProto, helper

    from qeff_graph.export.graph_fixes import compute_bfloat16_in_float32

    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["y"], ["yb"], to=TensorProto.BFLOAT16),
             helper.make_node("Mul", ["xb", "yb"], ["m"]),
             helper.make_node("Add", ["m", "xb"], ["a"]),
             helper.make_node("Cast", ["a"], ["out"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64]) for n in "xy"],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert compute_bfloat16_in_float32(model) == 2
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(64) * 300).astype(np.float32)
    y = rng.standard_normal(64).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "y": y})[0]
    xb, yb = torch.from_numpy(x).bfloat16(), torch.from_numpy(y).bfloat16()
    want = (xb * yb + xb).float().numpy()
    assert np.array_equal(got, want)
    assert compute_bfloat16_in_float32(model) == 0  # nothing left to rewrite


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_exports_with_batched_experts_and_restores_the_model(family, tmp_path):
    import json

    model = _model(family)
    before = model.get_experts_implementation()
    assert before[""] != "batched_mm"  # transformers' default (grouped_mm): neither exporter converts it
    for exporter in ("dynamo", "torchscript"):
        res = export_causal_lm(model, tmp_path / exporter, exporter=exporter, progress=False)
        assert json.loads((res.out_dir / "export.json").read_text())["experts_implementation"] == "batched_mm"
        assert model.get_experts_implementation() == before
        m = onnx.load(str(res.onnx_path), load_external_data=False)
        assert sum(n.op_type == "TopK" for n in m.graph.node) == 2  # one router per layer, kept


def test_bounded_position_table_exports_with_dynamic_past(tmp_path):
    """MPT's ALiBi table (max_seq_len) and its clamps made torch.export contradict itself on the
    past length; dims bounded by the model's maximum (and a sequence of at least one token) export."""
    model = _model("mpt")
    res = export_causal_lm(model, tmp_path / "mpt", exporter="dynamo", progress=False)
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    for past, seq in ((0, 5), (7, 1), (40, 8)):
        feeds = {"input_ids": np.arange(1, seq + 1)[None], "attention_mask": np.ones((1, past + seq), np.int64),
                 "position_ids": np.arange(past, past + seq)[None]}
        feeds.update({f"past_key_values.{i}.{k}": np.full((1, 4, past, 16), 0.1, np.float32)
                      for i in range(2) for k in ("key", "value")})
        logits = sess.run(["logits"], feeds)[0]
        assert logits.shape == (1, seq, 512) and np.isfinite(logits).all()


def test_export_failure_names_the_operator_and_the_other_exporter(tmp_path):
    """A model that calls an operator TorchScript cannot convert: one line naming the operator."""
    model = _model("llama")
    model.model.norm.register_forward_hook(lambda mod, args, out: out + 0 * torch.histc(out, bins=4).sum())
    with pytest.raises(QeffGraphError) as ei:
        export_causal_lm(model, tmp_path / "o", exporter="torchscript", progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "aten::histc" in msg and "opset 17" in msg and "try exporter='dynamo'" in msg
    assert "Torch IR graph" not in msg and len(msg) < 400


def test_export_failure_names_the_data_dependent_branch(tmp_path):
    """A model that branches on a tensor value cannot be traced by torch.export: the message says
    so (not torch's generic "step 1/3")."""
    model = _model("llama")

    def branch(mod, args, out):
        return out * 2 if out.sum() > 0 else out

    model.model.norm.register_forward_hook(branch)
    with pytest.raises(QeffGraphError) as ei:
        export_causal_lm(model, tmp_path / "o", exporter="dynamo", progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "step 1/3" not in msg and "try exporter='torchscript'" in msg
    assert "tensor's value" in msg or "data-dependent" in msg, msg
