"""Kill `optimize` (SIGKILL, SIGTERM, SIGINT) and `infer` (SIGKILL, SIGTERM) at exact moments;
the next plain run must succeed with the same output and nothing may be left behind.

The moments are the progress checkpoints of the build (``QEFF_GRAPH_STOP_AT=<name>`` makes the
process stop itself there with SIGSTOP): the test waits until it is stopped, then kills it.
After SIGTERM (SIGINT) the process itself must have removed what it was writing and exited
with 143 (130);
after SIGKILL the leftovers are the next run's to sweep. At every moment the output folder is
either the complete old program or the complete new one (checked against its manifest's hashes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qeff_graph.cli import main
from tests.e2e.conftest import OPTIMUM

ROOT = Path(__file__).resolve().parents[2]
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
EXIT = {"term": (143, "error: terminated"), "int": (130, "error: interrupted")}
OPTIMIZE_MOMENTS = ["program:load", "pass:kv-retention", "program:write", "program:side-files",
                    "program:manifest", "program:rename", "program:renamed"]
INFER_MOMENTS = ["export:trace", "export:rename", "pass:position-mask", "program:rename", "generate"]
SENTENCES = ["the cat sat on the mat", "my name is tiny llama"]


def leftovers(root: Path) -> list[Path]:
    """Temp folders (``.<name>.tmp-XXXXXXXX``) anywhere under ``root``."""
    return [p for p in root.rglob(".*.tmp-*")]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def start_stopped(argv: list[str], moment: str, env: dict, log: Path) -> subprocess.Popen:
    """Start ``qeff-graph argv`` and return once it has stopped itself at ``moment``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qeff_graph", *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "QEFF_GRAPH_STOP_AT": moment},
                                # as from a terminal, even when the tests run in a background job
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while _state(proc.pid) != "T":
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before reaching {moment}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{moment} not reached in 300 s")
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen, how: str, log: Path) -> None:
    """SIGKILL, SIGTERM or SIGINT (Ctrl-C) the stopped run; TERM and INT must end it cleanly."""
    proc.send_signal(SIGNALS[how])
    if how != "kill":
        proc.send_signal(signal.SIGCONT)  # the signal is delivered once it runs again
    rc = proc.wait(timeout=120)
    if how in EXIT:
        text = log.read_text()
        code, line = EXIT[how]
        assert rc == code, text
        assert text.strip().splitlines()[-1].startswith(line), text
        assert "Traceback" not in text
    else:
        assert rc == -signal.SIGKILL


def _tokens(program: Path, prompt: list[int]) -> list[int]:
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import generate_ids
    from qeff_graph.program import Program

    spec = Program.open(program).spec
    session = RetainedStateSession(program, batch_size=spec.rows, ctx_len=spec.ctx_len)
    return generate_ids(session, [prompt], prompt_len=spec.prompt_len, generation_len=8).generated_ids[0]


# ---- optimize -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def optimize_reference(tmp_path_factory):
    """The source (a copy of the tiny Optimum llama export) and the program a clean run makes."""
    work = tmp_path_factory.mktemp("optimize-ref")
    src = work / "src"
    src.mkdir()
    for name in ("model.onnx", "config.json", "generation_config.json"):
        shutil.copy(OPTIMUM["llama"] / "optimum" / name, src / name)
    ref = work / "ref"
    assert main(["optimize", str(src / "model.onnx"), "-o", str(ref), "--ctx-len", "64", "--prompt-len", "8",
                 "-q"]) == 0
    return src, ref


@pytest.mark.parametrize("how", sorted(SIGNALS))
@pytest.mark.parametrize("moment", OPTIMIZE_MOMENTS)
def test_killed_optimize_leaves_old_or_new_program_and_next_run_succeeds(optimize_reference, tmp_path,
                                                                         moment, how):
    from qeff_graph.program import Program

    source, ref = optimize_reference
    src = tmp_path / "src"
    shutil.copytree(source, src)
    out = tmp_path / "prog"
    argv = ["optimize", str(src / "model.onnx"), "-o", str(out), "--prompt-len", "8", "-q"]
    assert main([*argv, "--ctx-len", "32"]) == 0  # an earlier program at -o: replaced, never mixed
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    log = tmp_path / "log.txt"
    kill(start_stopped([*argv, "--ctx-len", "64"], moment, {}, log), how, log)

    program = Program.open(out, hashes=True)  # whole: the old one or the new one
    if moment != "program:renamed":
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    else:
        assert program.spec.ctx_len == 64
    if how != "kill":
        assert leftovers(tmp_path) == []  # the process cleaned up itself
    assert (src / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()

    assert main([*argv, "--ctx-len", "64"]) == 0  # the next plain run
    program = Program.open(out, hashes=True)
    assert program.spec.ctx_len == 64
    assert leftovers(tmp_path) == []
    prompt = [5, 17, 42, 99, 7, 3, 11, 250, 31]
    assert _tokens(out, prompt) == _tokens(ref, prompt)


# ---- infer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def infer_reference(tmp_path_factory):
    """A tiny llama with a tokenizer, and what an uninterrupted `infer` prints and caches."""
    from tests.helpers import make_tiny_llama_with_tokenizer

    work = tmp_path_factory.mktemp("infer-ref")
    hf = make_tiny_llama_with_tokenizer(work / "tiny-llama", SENTENCES)
    home = work / "home"
    out_json = work / "ref.json"
    argv = infer_argv(hf, out_json)
    proc = subprocess.run([sys.executable, "-m", "qeff_graph", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "QEFF_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return hf, home, json.loads(out_json.read_text())


def infer_argv(hf: Path, out_json: Path) -> list[str]:
    return ["infer", "--model-name", str(hf), "--exporter", "torchscript", "--prompt",
            "|".join(SENTENCES), "--generation-len", "6", "--ctx-len", "32", "--prompt-len", "4",
            "--batch-size", "2", "--output-json", str(out_json)]


def _check_cache(home: Path) -> None:
    from qeff_graph.export.exporter import ExportResult
    from qeff_graph.program import Program

    exports = list(home.glob("*/onnx/*"))
    programs = list(home.glob("*/qpc/*"))
    assert len(exports) == 1 and len(programs) == 1, (exports, programs)
    ExportResult.read(exports[0], hashes=True)
    Program.open(programs[0], hashes=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "term"])
@pytest.mark.parametrize("moment", INFER_MOMENTS)
def test_killed_infer_next_run_gives_the_same_tokens(infer_reference, tmp_path, moment, how):
    hf, ref_home, ref = infer_reference
    home = tmp_path / "home"
    home.mkdir()
    if not moment.startswith("export:"):  # the export is done by then: start from the cached one
        for export in ref_home.glob("*/onnx"):
            shutil.copytree(export, home / export.relative_to(ref_home))
    out_json = tmp_path / "out.json"
    env = {"QEFF_HOME": str(home)}
    log = tmp_path / "log.txt"
    kill(start_stopped(infer_argv(hf, out_json), moment, env, log), how, log)
    assert not out_json.exists()  # written only at the very end, whole
    if how != "kill":
        assert leftovers(home) == []

    proc = subprocess.run([sys.executable, "-m", "qeff_graph", *infer_argv(hf, out_json)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_json.read_text())
    assert result["generated_ids"] == ref["generated_ids"]
    assert leftovers(home) == [] and leftovers(tmp_path) == []
    _check_cache(home)
    assert sorted(p.name for p in home.rglob("*")) == sorted(p.name for p in ref_home.rglob("*"))
