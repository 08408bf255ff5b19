import json

import onnx_ir as ir
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import KVRetention, PassManager, registry
from qeff_graph.passes.manager import VerificationError
from tests.passes.graphs import cache_model, to_ir


class BreakGraph(ir.passes.InPlacePass):
    """Makes the graph invalid: a node reading a value nobody produces."""

    def call(self, model):
        dangling = ir.Value(name="nowhere")
        model.graph.append(ir.node("Relu", [dangling]))
        model.graph.outputs.append(model.graph[-1].outputs[0])
        model.graph[-1].outputs[0].name = "broken"
        return ir.passes.PassResult(model, modified=True)


class Crash(ir.passes.InPlacePass):
    def call(self, model):
        raise RuntimeError("boom")


def test_log_has_time_node_delta_stats_params():
    pm = PassManager(["past-shape", "position-mask", "kv-retention", "cleanup"], kv_dtype="float16")
    result = pm(to_ir(cache_model()))
    assert result.modified
    assert [e["pass"] for e in pm.log] == ["past-shape", "position-mask", "kv-retention", "cleanup"]
    kv = pm.log[2]
    assert kv["params"] == {"kv_dtype": "float16", "continuous_batching": False}
    assert kv["stats"] == {"layers": 1, "scatters": 2}
    assert kv["nodes_after"] > kv["nodes_before"] and kv["seconds"] >= 0
    assert pm.log[3]["nodes_after"] < pm.log[3]["nodes_before"]
    json.dumps(pm.log)  # goes into the manifest
    assert "kv-retention" in pm.report()


def test_verify_catches_invalid_graph_and_dumps(tmp_path):
    pm = PassManager([KVRetention(), BreakGraph()], verify="checker", dump_dir=tmp_path)
    with pytest.raises(VerificationError, match="after pass 'BreakGraph'"):
        pm(to_ir(cache_model()))
    assert (tmp_path / "invalid-after-BreakGraph.onnx.txt").exists()


def test_verify_ort_loads_model():
    pm = PassManager(["past-shape", "position-mask", "kv-retention", "last-token-logits"], verify="ort")
    pm(to_ir(cache_model()))
    assert all("verify_seconds" in e for e in pm.log)


def test_failure_names_the_pass_and_dumps(tmp_path):
    pm = PassManager([KVRetention(), Crash()], dump_dir=tmp_path)
    with pytest.raises(ir.passes.PassError, match="pass 'Crash' failed: RuntimeError: boom"):
        pm(to_ir(cache_model()))
    assert (tmp_path / "failed-Crash.onnx.txt").read_text().count("= ScatterND (") == 2


def test_dump_before_after(tmp_path):
    pm = PassManager(["kv-retention"], dump_dir=tmp_path, dump_before=["kv-retention"], dump_after=["kv-retention"])
    pm(to_ir(cache_model()))
    assert "Concat" in (tmp_path / "before-kv-retention.onnx.txt").read_text()
    assert "ScatterND" in (tmp_path / "after-kv-retention.onnx.txt").read_text()


def test_registry():
    assert registry.create("kv-retention", kv_dtype="float16", ctx_len=5).kv_dtype == "float16"
    with pytest.raises(QeffGraphError, match="unknown pass 'nope'"):
        registry.get("nope")
    assert all(doc for _, doc in registry.available())


def test_requires_and_ensures_are_enforced():
    """A failed requires is a one-line user error; a failed ensures is a pass bug with a dump."""
    import onnx_ir as ir
    import pytest

    from qeff_graph.errors import QeffGraphError
    from qeff_graph.passes import KVRetention, PassManager
    from tests.passes.graphs import cache_model, to_ir

    model = to_ir(cache_model())
    PassManager([KVRetention()])(model)
    with pytest.raises(QeffGraphError, match="pass 'kv-retention' cannot run on this graph: .*already retained"):
        PassManager([KVRetention()])(model)

    class Liar(ir.passes.InPlacePass):
        pass_name = "liar"

        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

        def ensures(self, model):
            raise ir.passes.PostconditionError("promised a Foo node")

    with pytest.raises(ir.passes.PassError, match="pass 'liar' did not ensure what it promises: promised a Foo"):
        PassManager([Liar()])(to_ir(cache_model()))
