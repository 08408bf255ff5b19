"""Speculative decoding end to end: the tokens of plain greedy decoding and of transformers.

Tiny families (their Optimum exports, no export time): a program compiled with
``num_speculative_tokens=3`` run with prompt lookup and with its own int4 program as the draft,
batch 1 (a prompt longer than ``prompt_len``: chunked prefill) and a right-padded batch of 4,
regular and continuous batching. SmolLM2 (slow; the session's cached export): ``infer
--num-speculative-tokens 4`` with both drafters on a padded batch of 4, and the Python API on an
input-grounded prompt, batch 1.
"""

from __future__ import annotations

import json

import onnx
import pytest

import qeff_graph as qg
from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.errors import QeffGraphError
from qeff_graph.generation import PromptLookup, generate_ids
from qeff_graph.models.causal_lm import (
    SELF_DRAFT_ACCURACY_LEVEL,
    make_drafter,
    resolve_draft,
)
from tests.e2e.conftest import prompts
from tests.helpers import qeff_home, run_cli

K = 3
CTX = 64
PROMPT_LEN = 8
N = 16


@pytest.fixture(scope="module")
def programs(exports, tmp_path_factory):
    """programs(arch, **options) -> Program optimized from the arch's Optimum export (memoized)."""
    made = {}

    def get(arch: str, **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-spec")
            made[key] = qg.optimize(exports(arch, "optimum"), out / "program", ctx_len=CTX, prompt_len=PROMPT_LEN,
                                    hardlink_data=True, **options)
        return made[key]

    return get


def run(program, rows, drafter=None, **kw):
    session = RetainedStateSession(program.path, batch_size=program.spec.rows, ctx_len=CTX)
    return generate_ids(session, rows, prompt_len=PROMPT_LEN, generation_len=N, drafter=drafter, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "mistral"])
@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_token_exact(arch, batch, programs, hf_reference):
    rows = prompts() if batch == 4 else [prompts()[1]]  # lengths 5/19/3/10 padded; 19 > prompt_len alone
    target = programs(arch, num_speculative_tokens=K, batch_size=batch)
    assert target.spec.specializations()["specializations"][-1]["seq_len"] == str(K + 1)
    plain = run(programs(arch, batch_size=batch), rows, return_logits=True)
    int4 = programs(arch, weight_bits=4, batch_size=batch)
    expected = [hf_reference(arch, p, N)[0] for p in rows]
    assert plain.generated_ids == expected
    for drafter in (PromptLookup(K), make_drafter(target, resolve_draft(int4, target))):
        result = run(target, rows, drafter, return_logits=True)
        assert result.generated_ids == expected, drafter.name
        # the verify step's logits are plain decode's, up to float32 rounding of a wider matmul
        assert max(float(abs(a - b).max()) for x, y in zip(result.logits, plain.logits) for a, b in zip(x, y)) < 1e-4
        perf = result.perf
        assert perf["drafter"] == drafter.name and perf["num_speculative_tokens"] == K
        assert perf["generated_tokens"] == batch * N
        if drafter.name != "prompt-lookup":  # a draft model proposes at every step
            assert perf["verify_steps"] == perf["target_steps"] and perf["draft_tokens_proposed"] > 0
    none = run(target, rows, make_drafter(target, "none"))  # the verify program, decoding plainly
    assert none.generated_ids == expected and "drafter" not in none.perf


def test_tiny_gpt2_prompt_lookup_accepts(programs, hf_reference):
    """The tiny gpt2 repeats itself: prompt lookup's drafts get accepted and steps are saved."""
    rows = [[11, 12] * 8]
    target = programs("gpt2", num_speculative_tokens=K, batch_size=1)
    result = run(target, rows, PromptLookup(K))
    assert result.generated_ids == [hf_reference("gpt2", rows[0], N)[0]]
    assert result.perf["acceptance_rate"] > 0 and result.perf["draft_tokens_accepted"] > 0
    assert result.perf["target_steps"] < N - 1


def test_tiny_same_program_draft_is_always_accepted(programs, hf_reference):
    """The fp32 program as its own draft: every proposal accepted, K+1 tokens per verify step."""
    rows = prompts()
    target = programs("llama", num_speculative_tokens=K, batch_size=4)
    draft = programs("llama", batch_size=4)
    result = run(target, rows, make_drafter(target, resolve_draft(draft, target)))
    assert result.generated_ids == [hf_reference("llama", p, N)[0] for p in rows]
    assert result.perf["acceptance_rate"] == 1.0 and result.perf["tokens_per_target_step"] > 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_continuous_batching(arch, programs, hf_reference):
    """5 prompts through 2 slots; the int4 draft has its own batch_index cache rows."""
    rows = prompts((5, 19, 3, 10, 7))
    target = programs(arch, num_speculative_tokens=K, full_batch_size=2)
    int4 = programs(arch, weight_bits=4, full_batch_size=2)
    expected = [hf_reference(arch, p, N)[0] for p in rows]
    for drafter in (PromptLookup(K), make_drafter(target, resolve_draft(int4, target))):
        result = run(target, rows, drafter)
        assert result.generated_ids == expected, drafter.name
        assert result.perf["full_batch_size"] == 2
        assert result.perf["verify_steps"] > 0 or drafter.name == "prompt-lookup"
    plain = programs(arch, weight_bits=4, batch_size=2)
    with pytest.raises(QeffGraphError, match="compiled without continuous batching and the target with"):
        resolve_draft(plain, target)


def test_qaic_specializations_carry_the_verify_step(exports, tmp_path, monkeypatch):
    """QEfficient's compile for a speculative target: prefill, decode, then seq_len K+1 (decode's batch)."""
    import qeff_graph.backends.qaic.command as command
    from qeff_graph.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(command, "SDK_QAIC_EXEC", str(tmp_path / "no-sdk" / "qaic-exec"))
    out = tmp_path / "qaic"
    assert main(["compile", str(exports("llama", "optimum")), "-o", str(out), "--backend", "qaic", "--ctx-len", "64",
                 "--prompt-len", "16", "--full-batch-size", "4", "--num-speculative-tokens", "5", "-q"]) == 0
    assert json.loads((out / "specializations.json").read_text()) == {"specializations": [
        {"batch_size": "1", "seq_len": "16", "ctx_len": "64", "full_batch_size": "4"},
        {"batch_size": "4", "seq_len": "1", "ctx_len": "64", "full_batch_size": "4"},
        {"batch_size": "4", "seq_len": "6", "ctx_len": "64", "full_batch_size": "4"}]}
    manifest = json.loads((out / "qeff_graph.json").read_text())
    logits = next(o for o in manifest["io"]["outputs"] if o["name"] == "logits")
    assert logits["shape"][1] == "num_logits"
    assert f"-network-specialization-config={out.resolve()}/specializations.json" in manifest["backend"]["command"]


def test_api_drafts_and_tokenizer_check(tmp_path):
    """compile(num_speculative_tokens=K) + generate(draft=...): every drafter gives the plain tokens;
    a draft with another tokenizer is refused in one line."""
    from qeff_graph.models import QEFFAutoModelForCausalLM
    from tests.helpers import make_tiny_llama_with_tokenizer, save_tiny_tokenizer

    words = ["the cat sat on the mat and the dog sat on the log"]
    hf = make_tiny_llama_with_tokenizer(tmp_path / "tiny", words)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(hf), cache_dir=tmp_path / "cache", exporter="torchscript")
    model.compile(prefill_seq_len=8, ctx_len=CTX, batch_size=2, num_speculative_tokens=K, progress=False)
    texts = ["the cat sat on the mat and the dog", "the log"]
    plain = model.generate(prompts=texts, generation_len=N, draft="none")
    assert "drafter" not in plain.perf
    int4 = model.draft_program("self-int4")
    assert int4.spec.weight_bits == 4 and int4.spec.num_speculative_tokens is None
    # a draft only proposes: int8 compute (faster, not exact) is what it is built with
    assert int4.spec.accuracy_level == SELF_DRAFT_ACCURACY_LEVEL == 4
    graph = onnx.load(int4.path / "model.onnx", load_external_data=False).graph
    levels = {onnx.helper.get_node_attr_value(n, "accuracy_level") for n in graph.node if n.op_type == "MatMulNBits"}
    assert levels == {4}
    for draft, name in [(None, "prompt-lookup"), ("prompt-lookup", "prompt-lookup"), ("self-int4", "self-int4"),
                        (str(int4.path), "self-int4"), (int4, "self-int4")]:
        out = model.generate(prompts=texts, generation_len=N, draft=draft)
        assert out.generated_ids == plain.generated_ids, draft
        assert out.perf["drafter"] == name and out.perf["num_speculative_tokens"] == K
    # another tokenizer: same architecture and vocabulary size, other words
    other = make_tiny_llama_with_tokenizer(tmp_path / "other", words)
    save_tiny_tokenizer(other, ["a completely different list of words"])
    with pytest.raises(QeffGraphError, match="has another tokenizer than the target"):
        model.generate(prompts=texts, generation_len=N, draft=str(other))
    with pytest.raises(QeffGraphError, match="--lookup-ngram applies to --draft prompt-lookup"):
        model.generate(prompts=texts, draft="self-int4", lookup_ngram=2)
    model.compile(prefill_seq_len=8, ctx_len=CTX, batch_size=2, progress=False)  # no verify step
    with pytest.raises(QeffGraphError, match="--draft needs a program compiled with --num-speculative-tokens"):
        model.generate(prompts=texts, draft="prompt-lookup")


# ---- SmolLM2 -----------------------------------------------------------------------------
SMOL_PROMPTS = ["The capital of France is", "My name is", "def fibonacci(n):\n    ",
                "Once upon a time, in a land far away, there lived a"]  # 13 tokens > prompt_len 8
SMOL_N = 32
CODE = '''def count_words(text):
    counts = {}
    for word in text.split():
        word = word.lower()
        counts[word] = counts.get(word, 0) + 1
    return counts
'''
CODE_PROMPT = f"Here is some Python code:\n\n```python\n{CODE}```\n\nRewrite it with the variable `word` renamed to `token`."


@pytest.fixture(scope="module")
def smol_runs(smollm2_infer, tmp_path_factory):
    """run(draft) -> infer's --output-json for SMOL_PROMPTS, batch 4, K=4 (memoized)."""
    done = {}

    def get(draft: str):
        if draft not in done:
            out = tmp_path_factory.mktemp("spec") / "out.json"
            argv = ["infer", "--prompt", "|".join(SMOL_PROMPTS), "--batch-size", "4", "--prompt-len", "8",
                    "--ctx-len", "128", "--generation-len", str(SMOL_N), "--num-speculative-tokens", "4",
                    "--draft", draft, "--output-json", str(out)]
            with qeff_home(smollm2_infer.home):
                rc, _, stdout, stderr = run_cli(argv)
            assert rc == 0, stderr
            done[draft] = (json.loads(out.read_text()), stdout, stderr)
        return done[draft]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["prompt-lookup", "self-int4"])
def test_smollm2_infer_batch4_equals_plain_and_hf(draft, smol_runs, smollm2_export, smollm2_hf):
    from transformers import AutoTokenizer

    plain, _, _ = smol_runs("none")
    result, stdout, stderr = smol_runs(draft)
    tok = AutoTokenizer.from_pretrained(smollm2_export[2].out_dir)
    lengths = [len(tok(p)["input_ids"]) for p in SMOL_PROMPTS]
    assert len(set(lengths)) == 4 and max(lengths) > 8  # a padded batch, one prompt chunked
    for prompt, ids, plain_ids in zip(SMOL_PROMPTS, result["generated_ids"], plain["generated_ids"]):
        expected, _ = smollm2_hf(tok(prompt)["input_ids"], SMOL_N, tok.eos_token_id)
        assert ids == plain_ids == expected, (prompt, tok.decode(ids), tok.decode(expected))
    perf = result["perf"]
    assert perf["drafter"] == draft and perf["num_speculative_tokens"] == 4 and "drafter" not in plain["perf"]
    assert perf["draft_tokens_accepted"] > 0 and perf["tokens_per_target_step"] > 1
    assert f"speculative: {draft}, K=4 | acceptance: " in stdout
    if draft == "self-int4":
        assert "compile: building" in stderr or "compile: reusing" in stderr
        assert perf["verify_steps"] == perf["target_steps"]


@pytest.mark.slow
def test_smollm2_api_batch1_input_grounded(smollm2_infer, smollm2_hf):
    """Rewriting code the prompt holds: prompt lookup drafts most of the answer; self-int4 too."""
    from qeff_graph.models import QEFFAutoModelForCausalLM
    from qeff_graph.models.causal_lm import encode_prompt

    n = 64
    with qeff_home(smollm2_infer.home):
        model = QEFFAutoModelForCausalLM.from_pretrained()
        model.compile(prefill_seq_len=8, ctx_len=256, num_speculative_tokens=4, progress=False)
        runs = {d: model.generate(prompts=[CODE_PROMPT], generation_len=n, chat_template=True, draft=d)
                for d in ("none", "prompt-lookup", "self-int4")}
    ids = encode_prompt(model.tokenizer(), CODE_PROMPT, chat_template=True)
    expected, _ = smollm2_hf(ids, n, model.tokenizer().eos_token_id)
    for draft, out in runs.items():
        assert out.generated_ids[0] == expected[: len(out.generated_ids[0])], draft
        assert len(out.generated_ids[0]) == n or out.stop_reasons[0] == "eos"
    assert "token" in runs["none"].generated_texts[0]
    lookup = runs["prompt-lookup"].perf
    assert lookup["acceptance_rate"] > 0.3 and lookup["tokens_per_target_step"] > 1.5
    assert runs["self-int4"].perf["acceptance_rate"] > 0.3
