import numpy as np
import onnx
from onnx import TensorProto, helper

from qeff_graph.ir.build import is_qeff_node
from qeff_graph.passes import Cleanup, PastShape
from tests.passes.graphs import D, H, cache_model, run, to_ir


def _shape_graph():
    """Shape reads of the cache with various start/end, as outputs."""
    model = cache_model()
    g = model.graph
    reads = {"full": {}, "heads_on": {"start": 1}, "last2": {"start": -2}, "len_only": {"start": -2, "end": -1}}
    for name, attrs in reads.items():
        g.node.append(helper.make_node("Shape", ["past_key_values.0.value"], [name], **attrs))
        g.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, [None]))
    onnx.checker.check_model(model)
    return model


def _only_shape_outputs(model):
    """Keep just the shape reads as outputs so the graph runs with a ctx-long cache."""
    keep = [v for v in model.graph.outputs if v.name in ("full", "heads_on", "last2", "len_only", "total_len")]
    model.graph.outputs.clear()
    model.graph.outputs.extend(keep)
    Cleanup()(model)
    return model


def test_virtual_shape_values():
    model = to_ir(_shape_graph())
    result = PastShape()(model)
    assert result.modified
    assert PastShape()(model).modified is False  # idempotent: its own reads are kept
    _only_shape_outputs(model)
    assert all(is_qeff_node(n) for n in model.graph if n.op_type == "Shape" and n.inputs[0].name.startswith("past"))
    ctx, batch, seq = 10, 2, 3
    cache = np.zeros((batch, H, ctx, D), np.float32)
    out = run(model, {"input_ids": np.zeros((batch, seq), np.int64),
                      "attention_mask": np.ones((batch, ctx), np.int64),
                      "position_ids": np.zeros((batch, seq), np.int64),
                      "past_key_values.0.key": cache, "past_key_values.0.value": cache})
    assert out["full"].tolist() == [batch, H, ctx - seq, D]
    assert out["heads_on"].tolist() == [H, ctx - seq, D]
    assert out["last2"].tolist() == [ctx - seq, D]
    assert out["len_only"].tolist() == [ctx - seq]
    assert out["total_len"].tolist() == [ctx]


def test_batch_comes_from_input_ids():
    """With continuous batching the cache has more rows than the input batch."""
    model = to_ir(_shape_graph())
    PastShape()(model)
    _only_shape_outputs(model)
    cache = np.zeros((5, H, 7, D), np.float32)
    out = run(model, {"input_ids": np.zeros((2, 1), np.int64), "attention_mask": np.ones((2, 7), np.int64),
                      "position_ids": np.zeros((2, 1), np.int64),
                      "past_key_values.0.key": cache, "past_key_values.0.value": cache})
    assert out["full"].tolist() == [2, H, 6, D]
