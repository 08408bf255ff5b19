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


@pytest.mark.parametrize("scale", [False, True])
def test_speculative_keeps_every_position_of_a_verify_step(scale):
    """K=3: a step of <= 4 tokens returns all its logits; a longer (prefill) one the last valid."""
    proto = _lm(scale)
    model = to_ir(proto)
    result = LastTokenLogits(num_speculative_tokens=3)(model)
    assert result.modified
    assert model.graph.outputs[0].shape[1] == "num_logits"
    for ids, pos in [(np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[10, 11, 12, 13], [3, 4, 5, 6]])),
                     (np.array([[1, 2], [9, 9]]), np.array([[4, 5], [-1, -1]])),
                     (np.array([[3]]), np.array([[7]]))]:
        before = run(proto, {"input_ids": ids, "position_ids": pos})["logits"]
        after = run(model, {"input_ids": ids, "position_ids": pos})["logits"]
        assert after.shape == before.shape  # every position kept, in order
        np.testing.assert_allclose(after, before, atol=1e-6)
    # a prefill chunk longer than K+1, right-padded: only each row's last valid position
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 0, 0, 0, 0, 0]])
    pos = np.array([[8, 9, 10, 11, 12, 13, 14, 15], [0, 1, 2, -1, -1, -1, -1, -1]])
    before = run(proto, {"input_ids": ids, "position_ids": pos})["logits"]
    after = run(model, {"input_ids": ids, "position_ids": pos})["logits"]
    assert after.shape == (2, 1, 7)
    np.testing.assert_allclose(after[:, 0], before[[0, 1], [7, 2]], atol=1e-6)
    assert not LastTokenLogits(num_speculative_tokens=3)(model).modified  # idempotent


def test_speculative_refuses_a_graph_gathered_the_other_way():
    model = to_ir(_lm())
    LastTokenLogits()(model)
    with pytest.raises(QeffGraphError, match="already gathered for another --num-speculative-tokens"):
        LastTokenLogits(num_speculative_tokens=2)(model)
    model = to_ir(_lm())
    LastTokenLogits(num_speculative_tokens=2)(model)
    with pytest.raises(QeffGraphError, match="already gathered"):
        LastTokenLogits()(model)


@pytest.mark.parametrize("k", [0, -1, True, 2.0])
def test_speculative_k_must_be_a_positive_int(k):
    with pytest.raises(QeffGraphError, match="--num-speculative-tokens must be an integer >= 1"):
        LastTokenLogits(num_speculative_tokens=k)


def test_requires_position_ids():
    proto = _lm()
    del proto.graph.input[1]  # no position_ids
    with pytest.raises(QeffGraphError, match="needs a logits output and a position_ids input"):
        LastTokenLogits(num_speculative_tokens=2)(to_ir(proto))
