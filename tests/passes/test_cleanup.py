import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.passes import Cleanup
from tests.passes.graphs import ops, run, to_ir


def test_dead_and_duplicate_nodes_removed():
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Neg", ["x"], ["dead"]),
             helper.make_node("Identity", ["y"], ["z"]), helper.make_node("Mul", ["z", "unused_w"], ["dead2"])]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [3])], [vi("z", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(np.ones(3, np.float32), "unused_w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    before = run(proto, {"x": x})["z"]
    model = to_ir(proto)
    cleanup = Cleanup()
    assert cleanup(model).modified
    assert sorted(ops(model)) == ["Add", "Relu"]
    assert cleanup.stats["nodes_removed"] == 4 and cleanup.stats["initializers_removed"] == 1
    np.testing.assert_array_equal(run(model, {"x": x})["z"], before)
    assert [v.name for v in model.graph.outputs] == ["z"]
