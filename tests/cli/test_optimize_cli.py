"""`qeff-graph optimize` / `passes` / `inspect` from the command line, good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.cli import main
from tests.cli import fail_one_line
from tests.e2e.conftest import OPTIMUM

LLAMA = OPTIMUM["llama"] / "optimum" / "model.onnx"


def test_optimize_writes_program(tmp_path, capsys):
    out = tmp_path / "prog"
    assert main(["optimize", str(LLAMA), "-o", str(out), "--ctx-len", "64", "--prompt-len", "16",
                 "--batch-size", "2", "--kv-dtype", "float16", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "2 layers, 2 kv heads, head_dim 16" in text and "fp16-clamp" in text
    # the model's config travels with the program (tokenizer files too, when the export has them)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "custom_io.yaml", "generation_config.json",
                                                      "model.onnx", "qeff_graph.json", "specializations.json"]
    spec = json.loads((out / "specializations.json").read_text())
    assert spec == {"specializations": [{"batch_size": "2", "seq_len": "16", "ctx_len": "64"},
                                        {"batch_size": "2", "seq_len": "1", "ctx_len": "64"}]}
    io = yaml.safe_load((out / "custom_io.yaml").read_text())
    assert {"IOName": "past_key.0", "Precision": "float16"} in io
    assert {"IOName": "past_value.1_RetainedState", "Precision": "float16"} in io
    assert len(io) == 8
    manifest = json.loads((out / "qeff_graph.json").read_text())
    assert manifest["kv_cache"]["layers"] == 2 and manifest["options"]["ctx_len"] == 64
    for entry in manifest["pipeline"]:
        assert {"pass", "seconds", "nodes_before", "nodes_after", "modified", "stats", "params"} <= set(entry)
        assert "verify_seconds" in entry or not entry["modified"]
    assert manifest["source"]["sha256"] and len(manifest["source"]["sha256"]) == 64
    names = [i["name"] for i in manifest["io"]["inputs"]]
    assert names == ["input_ids", "position_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]


def test_custom_passes_and_dumps(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["optimize", str(LLAMA), "-o", str(out), "--passes", "past-shape,position-mask,kv-retention",
                 "--dump-after", "kv-retention", "--dump-before", "past-shape", "-q"]) == 0
    assert capsys.readouterr().out == ""
    manifest = json.loads((out / "qeff_graph.json").read_text())
    assert [e["pass"] for e in manifest["pipeline"]] == ["past-shape", "position-mask", "kv-retention"]
    dumps = sorted(p.name for p in Path(f"{out}.dumps").iterdir())
    assert dumps == ["after-kv-retention.onnx.txt", "before-past-shape.onnx.txt"]
    assert "ScatterND" in Path(f"{out}.dumps/after-kv-retention.onnx.txt").read_text()


def test_optimize_weight_bits_adds_matmul_nbits(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["optimize", str(LLAMA), "-o", str(out), "--ctx-len", "32", "--prompt-len", "8",
                 "--weight-bits", "4"]) == 0
    assert "matmul-nbits" in capsys.readouterr().out
    manifest = json.loads((out / "qeff_graph.json").read_text())
    assert manifest["options"]["weight_bits"] == 4
    nbits = [e for e in manifest["pipeline"] if e["pass"] == "matmul-nbits"][0]
    assert nbits["stats"]["quantized"] == 15 and nbits["stats"]["bytes_after"] < nbits["stats"]["bytes_before"] / 4


def test_passes_lists_every_pass(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ["kv-retention", "past-shape", "position-mask", "last-token-logits", "fp16-clamp",
                 "custom-rmsnorm", "cleanup"]:
        assert f"\n{name}" in "\n" + out
    assert "pipeline retained-kv" in out


def test_inspect(capsys):
    assert main(["inspect", str(LLAMA)]) == 0
    out = capsys.readouterr().out
    assert "kv cache: 2 layers, 2 kv heads, head_dim 16" in out and "dynamic" in out
    assert "past_key_values.0.key" in out and "weights: 0.5 MiB" in out
    assert main(["inspect", str(LLAMA), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["MatMul"] > 0 and 0.99 * 139584 * 4 < info["weight_bytes"] <= 139584 * 4
    assert "attention: 2 sites (2 decomposed)" in out
    assert [a["layer"] for a in info["attention"]] == [0, 1]
    assert all(a["kind"] == "decomposed" and a["bias_terms"] == 0 for a in info["attention"])


def _no_kv_model(path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), path)


def _external_model(directory: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])],
                              [numpy_helper.from_array(np.ones(1024, np.float32), "w")])
    path = directory / "ext.onnx"
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    return path


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "no_kv", "missing_data", "unknown_pass",
                                  "ctx_lt_prompt", "unwritable", "missing_file", "zero_batch"])
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    out = tmp_path / "out"
    model = LLAMA
    extra: list[str] = []
    expect = ""
    if case == "not_onnx":
        model = tmp_path / "notes.onnx"
        model.write_text("this is not a protobuf\n" * 10)
        expect = "not a readable ONNX model"
    elif case == "truncated":
        model = tmp_path / "cut.onnx"
        model.write_bytes(LLAMA.read_bytes()[: LLAMA.stat().st_size // 2])
        expect = "not a readable ONNX model"
    elif case == "no_kv":
        model = tmp_path / "relu.onnx"
        _no_kv_model(model)
        expect = "no KV cache found"
    elif case == "missing_data":
        model = _external_model(tmp_path)
        (tmp_path / "ext.onnx.data").unlink()
        expect = "external data file 'ext.onnx.data'"
    elif case == "unknown_pass":
        extra = ["--passes", "kv-retention,no-such-pass"]
        expect = "unknown pass 'no-such-pass'"
    elif case == "ctx_lt_prompt":
        extra = ["--ctx-len", "16", "--prompt-len", "32"]
        expect = "--ctx-len (16) is smaller than --prompt-len (32)"
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub" / "out"
        expect = "cannot write to"
    elif case == "missing_file":
        model = tmp_path / "nope.onnx"
        expect = "does not exist"
    elif case == "zero_batch":
        code = main(["optimize", str(model), "-o", str(out), "--batch-size", "0"])
        assert code == 2 and "must be >= 1" in capsys.readouterr().err
        assert not out.exists()
        return
    err = fail_one_line(capsys, ["optimize", str(model), "-o", str(out), *extra])
    assert expect in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")] if out.parent.exists() else True


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits 2 with one line (not a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "qeff_graph", "optimize", str(tmp_path / "x.onnx"), "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_verify_writes_nothing_outside_the_output(tmp_path, monkeypatch, capsys):
    """--verify (and a failing pass's dump) never writes into the current folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["optimize", str(LLAMA), "-o", str(tmp_path / "p"), "--verify", "ort", "-q"]) == 0
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "p"]
