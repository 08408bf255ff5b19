"""`qeff-graph infer` on the embedded SmolLM2: same text as transformers' greedy generate."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from qeff_graph.cli import main
from tests.helpers import README_PROMPT, qeff_home, run_cli

pytestmark = pytest.mark.slow


def test_fresh_cache_infer_prints_hf_greedy_text(smollm2_infer, smollm2_export, smollm2_hf):
    """The README's first command, run from an empty QEFF_HOME (export + optimize + run)."""
    from transformers import AutoTokenizer

    run = smollm2_infer
    assert "export: reusing" not in run.stderr and "export: wrote" in run.stderr
    assert "compile: building" in run.stderr
    tok = AutoTokenizer.from_pretrained(smollm2_export[2].out_dir)
    (prompt,), (text,), (ids,) = run.result["prompts"], run.result["generated_texts"], run.result["generated_ids"]
    assert prompt == README_PROMPT
    expected, _ = smollm2_hf(tok(prompt)["input_ids"], 32, tok.eos_token_id)
    assert ids == expected
    assert text == tok.decode(expected, skip_special_tokens=True) and "Paris" in text
    assert f"=== prompt: {prompt!r}\n{text}" in run.stdout
    assert "TTFT:" in run.stdout and "tok/s" in run.stdout and "E2E:" in run.stdout
    assert set(run.result) >= {"prompts", "generated_texts", "generated_ids", "perf"}


def test_second_run_reuses_the_cache(smollm2_infer):
    first = smollm2_infer
    with qeff_home(first.home):
        rc, seconds, stdout, stderr = run_cli(first.argv)
    assert rc == 0
    assert "export: reusing" in stderr and "compile: reusing" in stderr
    assert "export: wrote" not in stderr and "compile: building" not in stderr
    print(f"infer from an empty cache: {first.seconds:.1f} s; second run (cache reused): {seconds:.1f} s")
    assert stdout.split("TTFT:")[0] == first.stdout.split("TTFT:")[0]  # same text


PROMPTS = ["The capital of France is", "Hi",
           "Once upon a time, in a land far away, there lived a",  # 13 tokens > prompt_len 8
           "def fibonacci(n):"]


@pytest.mark.parametrize("batch_size", [2, 4])
def test_four_prompts_batched_equal_hf_solo_runs(smollm2_infer, smollm2_export, smollm2_hf,
                                                  batch_size, tmp_path):
    from transformers import AutoTokenizer

    out_json = tmp_path / "out.json"
    argv = ["infer", "--prompt", "|".join(PROMPTS), "--generation_len", "16", "--batch_size",
            str(batch_size), "--prompt_len", "8", "--ctx_len", "64", "--output-json", str(out_json)]
    with qeff_home(smollm2_infer.home):
        rc, _, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    assert "export: reusing" in stderr
    result = json.loads(out_json.read_text())
    tok = AutoTokenizer.from_pretrained(smollm2_export[2].out_dir)
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) == 4 and max(lengths) > 8
    for prompt, ids in zip(PROMPTS, result["generated_ids"]):
        expected, _ = smollm2_hf(tok(prompt)["input_ids"], 16, tok.eos_token_id)
        assert ids == expected, (prompt, tok.decode(ids), tok.decode(expected))
        assert f"=== prompt: {prompt!r}" in stdout


def test_infer_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["infer", "--model-name", "no-such-org/no-such-model", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then one error line
    assert err[-1].startswith("error: ") and "not found" in err[-1]
    assert sum(line.startswith("error") for line in err) == 1 and "Traceback" not in "".join(err)
    assert main(["infer", "--batch-size", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_chat_template_prompt_equals_hf(smollm2_infer, smollm2_export, smollm2_hf, tmp_path):
    """--chat-template: the prompt becomes a user turn of SmolLM2-Instruct's template (from the GGUF)."""
    from transformers import AutoTokenizer

    out_json = tmp_path / "out.json"
    with qeff_home(smollm2_infer.home):
        rc, _, stdout, stderr = run_cli(["infer", "--prompt", "What is the capital of France?",
                                         "--chat-template", "--generation-len", "12",
                                         "--output-json", str(out_json)])
    assert rc == 0, stderr
    tok = AutoTokenizer.from_pretrained(smollm2_export[2].out_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert "<|im_start|>assistant" in tok.decode(ids)
    expected, _ = smollm2_hf(list(ids), 12, tok.eos_token_id)
    result = json.loads(out_json.read_text())
    assert result["generated_ids"][0] == expected and "Paris" in result["generated_texts"][0]


def test_mxfp6_num_cores_and_write_io_dir(smollm2_infer, tmp_path):
    """--mxfp6 on ort: 8-bit MatMulNBits weights (LM head included); decode speed side by side."""
    import onnx

    io_dir = tmp_path / "io"
    fp32_json, q_json = tmp_path / "fp32.json", tmp_path / "q.json"
    common = ["infer", "--prompt", README_PROMPT, "--generation-len", "32", "--prompt-len", "8",
              "--num-cores", "2"]
    with qeff_home(smollm2_infer.home):
        rc, _, _, stderr = run_cli([*common, "--output-json", str(fp32_json)])
        assert rc == 0, stderr
        rc, _, stdout, stderr = run_cli([*common, "--mxfp6", "--output-json", str(q_json),
                                         "--write-io-dir", str(io_dir)])
    assert rc == 0, stderr
    assert "8-bit blocks of 32" in stderr
    programs = [p for p in smollm2_infer.home.glob("*/qpc/ort-*")
                if json.loads((p / "qeff_graph.json").read_text())["options"].get("weight_bits") == 8]
    assert len(programs) == 1
    graph = onnx.load(str(programs[0] / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    # every projection and the tied LM head; Q/K/V and gate/up packed: 30 x 4 + 1, each 8-bit
    # weight as two 4-bit halves (float compute)
    assert ops.count("MatMulNBits") == 2 * (30 * 4 + 1) and ops.count("Split") >= 60
    data = sum(f.stat().st_size for f in programs[0].glob("*.data"))
    assert data < 0.5 * 538e6, data  # int8 weights + the fp32 embedding, not a copy of the fp32 file
    fp32, q = json.loads(fp32_json.read_text()), json.loads(q_json.read_text())
    assert q["generated_texts"][0].startswith(" Paris")
    print(f"SmolLM2 decode tok/s, 2 threads: fp32 {fp32['perf']['decode_tok_s']}, "
          f"mxfp6→int8 {q['perf']['decode_tok_s']}; data {data / 1e6:.0f} MB")
    index = json.loads((io_dir / "aic_batch_io.json").read_text())["IO-files"]
    assert len(index) == 2 and (io_dir / "decode" / "logits.raw").stat().st_size == 49152 * 4


def test_backend_qaic_without_sdk_says_where_the_command_is(smollm2_infer, tmp_path, monkeypatch):
    import qeff_graph.backends.qaic.command as command

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin") + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(command, "find_qaic_exec", lambda: None)
    with qeff_home(smollm2_infer.home):
        rc, _, _, stderr = run_cli(["infer", "--prompt", "hi", "--backend", "qaic", "--mxfp6", "--mxint8",
                                    "--num-cores", "14", "--device-group", "0,1"])
    assert rc == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "compile.sh" in last and "backend='ort'" not in last
    script = Path(re.search(r"is in (\S+compile\.sh)", last).group(1))
    assert script.is_file()
    text = script.read_text()
    assert "-mxfp6-matmul" in text and "-mxint8" in text and "-aic-num-cores=14" in text
    assert (script.parent / "mdp.json").is_file()


def test_device_group_of_two_on_ort_is_an_error(capsys):
    assert main(["infer", "--prompt", "hi", "--device-group", "0,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--backend qaic" in err[-1]


def test_cache_variants_share_the_weights(smollm2_infer):
    """A second ctx_len / batch variant of SmolLM2 in the cache costs < 5% of the first on disk:
    its weight, graph and tokenizer files are hard links (checked on reuse like any cached file)."""
    import os

    from qeff_graph.models import QEFFAutoModelForCausalLM

    with qeff_home(smollm2_infer.home):
        model = QEFFAutoModelForCausalLM.from_pretrained()
        first = model.compile(prefill_seq_len=32, ctx_len=128)  # the README run's program
        second = model.compile(prefill_seq_len=8, ctx_len=256, batch_size=2)
    assert first != second

    def blocks(path: Path, exclude: set) -> int:
        return sum(p.stat().st_blocks * 512 for p in path.iterdir()
                   if p.is_file() and (p.stat().st_dev, p.stat().st_ino) not in exclude)

    shared = {(p.stat().st_dev, p.stat().st_ino) for d in (model.onnx_path.parent, first) for p in d.iterdir()}
    whole = blocks(first, set())
    own = blocks(second, shared)  # the variant's graph and weights are links to the first's
    print(f"SmolLM2 program: {whole / 1e6:.1f} MB; a second variant adds {own / 1e6:.2f} MB")
    assert own < 0.05 * whole, (own, whole)
    assert os.path.samefile(second / "model.onnx.data", model.onnx_path.parent / "model.onnx.data")


def test_readme_compile_execute_example(smollm2_export, smollm2_hf, tmp_path):
    """The README's worked `export → compile → execute` (the export is the session's): the
    program carries the tokenizer, execute streams each prompt under its header, HF's tokens."""
    from transformers import AutoTokenizer

    prompts = ["The capital of France is", "def fibonacci(n):"]
    prog = tmp_path / "smollm2-prog"
    rc, _, _, err = run_cli(["compile", str(smollm2_export[2].out_dir), "-o", str(prog), "--ctx-len", "256",
                             "--prompt-len", "16", "--batch-size", "2", "-q"])
    assert rc == 0, err
    out_json = tmp_path / "out.json"
    rc, _, stdout, err = run_cli(["execute", "--qpc-path", str(prog), "--prompt", "|".join(prompts),
                                  "--generation-len", "24", "--stream", "--output-json", str(out_json)])
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    tok = AutoTokenizer.from_pretrained(prog)
    for prompt, ids in zip(prompts, result["generated_ids"]):
        assert ids == smollm2_hf(tok(prompt)["input_ids"], 24, tok.eos_token_id)[0], prompt
    streamed = "".join(f"=== prompt: {p!r}\n{t}\n" for p, t in zip(prompts, result["generated_texts"]))
    assert stdout.split("TTFT:")[0] == streamed
