import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.passes import OrtSkipNorm, PassManager
from tests.passes.graphs import ops, run, to_ir

vi = helper.make_tensor_value_info
HIDDEN = 16


def _block(skip_shape=("b", "s", HIDDEN), cast=False):
    """h = x + y; n = SimplifiedLayerNormalization(h); out = n @ w + h (the residual reads h)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w")]
    nodes = [helper.make_node("Add", ["x", "y"], ["h"])]
    if cast:
        nodes.append(helper.make_node("Cast", ["h"], ["h_cast"], to=TensorProto.FLOAT))
    nodes += [helper.make_node("SimplifiedLayerNormalization", ["h_cast" if cast else "h", "gamma"], ["n"],
                               axis=-1, epsilon=1e-5, name="qeff/rmsnorm/SimplifiedLayerNormalization_0"),
              helper.make_node("MatMul", ["n", "w"], ["f"]),
              helper.make_node("Add", ["f", "h"], ["out"])]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["b", "s", HIDDEN]),
                                           vi("y", TensorProto.FLOAT, list(skip_shape))],
                              [vi("out", TensorProto.FLOAT, ["b", "s", HIDDEN]), vi("n", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("cast", [False, True])
def test_residual_add_and_norm_become_one_kernel(cast):
    proto = _block(cast=cast)
    model = to_ir(proto)
    manager = PassManager(["ort-skip-norm"])
    manager(model)
    assert manager.log[-1]["stats"] == {"fused": 1}
    kinds = ops(model)
    assert "SkipSimplifiedLayerNormalization" in kinds and "SimplifiedLayerNormalization" not in kinds
    assert kinds.count("Add") == 1  # the residual after the MatMul stays; the fused one is gone
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32),
             "y": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)}
    want, got = run(proto, feeds), run(model, feeds)
    for name in ("out", "n"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_a_broadcasting_add_is_left_alone():
    model = to_ir(_block(skip_shape=(1, 1, HIDDEN)))
    p = OrtSkipNorm()
    assert not p(model).modified and p.stats == {"fused": 0}
    assert "SkipSimplifiedLayerNormalization" not in ops(model)
