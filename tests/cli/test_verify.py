"""`qeff-graph verify` (numbers, not loadability), `--bisect` naming a broken pass, and
`optimize --verify numeric` writing nothing when the program differs from its source."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from qeff_graph.ir.build import Builder
from qeff_graph.passes.registry import register
from tests.e2e.conftest import OPTIMUM
from tests.helpers import run_cli

SOURCE = str(OPTIMUM["llama"] / "optimum" / "model.onnx")
HF = str(OPTIMUM["llama"] / "hf")
BROKEN = "past-shape,position-mask,kv-retention,last-token-logits,test-broken-scores,cleanup"


@register("test-broken-scores")
class BrokenScores(ir.passes.InPlacePass):
    """Test only: scales the scores of the last Softmax by 1.5 (a plausible-looking wrong rewrite)."""

    def call(self, model):
        softmax = [n for n in model.graph if n.op_type == "Softmax"][-1]
        b = Builder(model.graph, "test-broken")
        softmax.replace_input_with(0, b.op("Mul", softmax.inputs[0], b.const(np.array(1.5, np.float32))))
        b.commit()
        model.graph.sort()
        return ir.passes.PassResult(model, modified=True)


def _optimize(out, passes=None, extra=()):
    argv = ["optimize", SOURCE, "-o", str(out), "--ctx-len", "64", "--prompt-len", "8", "--batch-size", "4",
            "-q", *extra]
    return run_cli(argv + (["--passes", passes] if passes else []))


def test_verify_good_program_against_source_and_transformers(tmp_path):
    assert _optimize(tmp_path / "p")[0] == 0
    rc, _, out, err = run_cli(["verify", SOURCE, str(tmp_path / "p"), "--json"])
    assert rc == 0, err
    report = json.loads(out)["report"]
    assert report["reference"].startswith("onnx:") and report["tokens_equal"]
    assert report["agreement"] == [1.0] * 4 and report["max_logit_diff"] < 1e-4
    assert report["prompt_lengths"] == [5, 19, 3, 10]
    rc, _, out, err = run_cli(["verify", SOURCE, str(tmp_path / "p"), "--reference", HF, "--prompts", "2"])
    assert rc == 0, err
    assert out.startswith(f"verify {tmp_path / 'p'}: OK: 2 prompts") and "transformers:" in out


def test_bisect_names_the_broken_pass(tmp_path):
    assert _optimize(tmp_path / "bad", BROKEN)[0] == 0  # the broken pass itself "works"
    rc, _, out, err = run_cli(["verify", SOURCE, str(tmp_path / "bad"), "--bisect"])
    assert rc == 1, err
    assert "MISMATCH" in out
    assert out.strip().splitlines()[-1] == "bisect: outputs first differ after pass test-broken-scores"
    assert "after last-token-logits    (program) agreement 1.000" in out


def test_bisect_on_a_good_program_names_nothing(tmp_path):
    """A pass before the rewrite is checked in the source contract, the rest as programs."""
    assert _optimize(tmp_path / "p", "cleanup,past-shape,position-mask,kv-retention,last-token-logits")[0] == 0
    rc, _, out, _ = run_cli(["verify", SOURCE, str(tmp_path / "p"), "--bisect", "--new-tokens", "4"])
    assert rc == 0
    assert "after cleanup              (source ) agreement 1.000" in out
    assert "after last-token-logits    (program) agreement 1.000" in out
    assert out.strip().splitlines()[-1] == "bisect: no pass changes the outputs"


def test_optimize_verify_numeric(tmp_path):
    rc, _, _, err = _optimize(tmp_path / "ok", extra=["--verify", "numeric"])
    assert rc == 0, err
    manifest = json.loads((tmp_path / "ok" / "qeff_graph.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["agreement"] == [1.0] * 4
    rc, _, _, err = _optimize(tmp_path / "bad", BROKEN, extra=["--verify", "numeric"])
    assert rc == 2
    assert err.count("\n") == 1 and "differs from" in err and "--bisect" in err
    assert not (tmp_path / "bad").exists()  # nothing was written
    assert not list(tmp_path.glob("*.tmp*"))


def test_verify_bad_inputs(tmp_path):
    assert _optimize(tmp_path / "p")[0] == 0
    for argv, needle in [
        (["verify", str(tmp_path / "missing.onnx"), str(tmp_path / "p")], "does not exist"),
        (["verify", str(tmp_path / "p" / "model.onnx"), str(tmp_path / "p")], "is a retained-state program"),
        (["verify", SOURCE, str(tmp_path / "p"), "--new-tokens", "70"], "leaves no room for a prompt"),
        (["verify", SOURCE, str(tmp_path / "p"), "--prompts", "0"], "--prompts"),
    ]:
        rc, _, _, err = run_cli(argv)
        assert rc == 2 and err.count("\n") == 1 and needle in err, (argv, err)
