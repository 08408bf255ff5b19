"""The pooling pass on a hand-built encoder graph: each mode (and L2 normalize) against numpy,
run before/after in ONNX Runtime; refusals for graphs that are not encoders."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import PassManager, Pooling
from tests.passes.graphs import run, to_ir


def _encoder(hidden_rank: int = 3, mask: bool = True, opset: int = 18):
    """``last_hidden_state = emb[input_ids] * 2``: an encoder-shaped graph with real numbers."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["g"]),
             helper.make_node("Mul", ["g", "two"], ["last_hidden_state" if hidden_rank == 3 else "g2"])]
    if hidden_rank != 3:
        nodes.append(helper.make_node("ReduceSum", ["g2", "one"], ["last_hidden_state"], keepdims=0))
        opset = max(opset, 13)
    inputs = [vi("input_ids", TensorProto.INT64, ["b", "s"])]
    if mask:
        inputs.append(vi("attention_mask", TensorProto.INT64, ["b", "s"]))
    shape = ["b", "s", 6] if hidden_rank == 3 else ["b", 6]
    graph = helper.make_graph(nodes, "enc", inputs, [vi("last_hidden_state", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(rng.standard_normal((20, 6)).astype(np.float32), "emb"),
                               numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                               numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reference(h: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    m = mask[:, :, None].astype(np.float32)
    if mode == "mean":
        out = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif mode == "cls":
        out = h[:, 0]
    else:
        out = np.where(m > 0, h, -1e9).max(1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


@pytest.mark.parametrize("opset", [11, 17, 18])  # reduction axes: attribute, then input
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooled_output_matches_sentence_transformers_math(mode, normalize, opset):
    proto = _encoder(opset=opset)
    ids = np.array([[3, 7, 1, 9, 0], [4, 4, 2, 0, 0], [5, 0, 0, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.int64)
    before = run(proto, {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    model = to_ir(proto)
    result = Pooling(pooling=mode, normalize=normalize)(model)
    assert result.modified
    out = run(result.model, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_array_equal(out["last_hidden_state"], before)  # kept as it was
    assert out["pooled"].shape == (3, 6)
    np.testing.assert_allclose(out["pooled"], _reference(before, mask, mode, normalize), rtol=1e-6, atol=1e-6)
    if mode != "cls":  # what sits under the pads does not matter
        before[:, -1] = 1e6
        np.testing.assert_allclose(_reference(before, mask, mode, normalize), out["pooled"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["no_mask", "rank2", "twice"])
def test_refuses_graphs_it_does_not_understand(case):
    proto = _encoder(hidden_rank=2 if case == "rank2" else 3, mask=case != "no_mask")
    model = to_ir(proto)
    if case == "twice":
        model = Pooling()(model).model
    with pytest.raises(QeffGraphError, match="pooling.*cannot run"):
        PassManager([Pooling()])(model)


def test_unknown_mode():
    with pytest.raises(QeffGraphError, match="unknown pooling 'sum'"):
        Pooling(pooling="sum")
