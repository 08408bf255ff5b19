import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import LastTokenLogits
from tests.passes.graphs import run, to_ir


def _lm(scale: bool = True):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["raw" if scale else "logits"])]
    if scale:  # soft-capping style tail the pass must walk through
        nodes += [helper.make_node("Div", ["raw", "cap"], ["d"]), helper.make_node("Tanh", ["d"], ["t"]),
                  helper.make_node("Mul", ["t", "cap"], ["logits"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "lm", [vi("input_ids", TensorProto.INT64, ["b", "s"]),
                                            vi("position_ids", TensorProto.INT64, ["b", "s"])],
                              [vi("logits", TensorProto.FLOAT, ["b", "s", 7])],
                              [numpy_helper.from_array(rng.standard_normal((11, 5)).astype(np.float32), "emb"),
                               numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array(3.0, np.float32), "cap")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("scale", [False, True])
def test_gathers_last_valid_position(scale):
    proto = _lm(scale)
    ids = np.array([[1, 2, 3, 4], [5, 6, 0, 0]])
    pos = np.array([[0, 1, 2, 3], [7, 8, -1, -1]])
    before = run(proto, {"input_ids": ids, "position_ids": pos})["logits"]
    model = to_ir(proto)
    assert LastTokenLogits()(model).modified
    gather = [n for n in model.graph if n.op_type == "GatherND"]
    assert len(gather) == 1 and gather[0].outputs[0].uses()
    after = run(model, {"input_ids": ids, "position_ids": pos})["logits"]
    assert after.shape == (2, 1, 7)
    np.testing.assert_allclose(after[:, 0], before[[0, 1], [3, 1]], atol=1e-6)
    assert not LastTokenLogits()(model).modified  # idempotent


def test_no_lm_head():
    proto = _lm(False)
    proto.graph.node[1].op_type = "Add"  # logits = h + w: no MatMul
    with pytest.raises(QeffGraphError, match="LM head"):
        LastTokenLogits()(to_ir(proto))
