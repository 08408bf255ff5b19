"""Shared test helpers: tiny random Hugging Face causal LMs built from config classes; running
the CLI in-process with its output captured."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from pathlib import Path

TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=512, initializer_range=0.3,
            max_position_embeddings=512)
_GPT2_NAMES = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, initializer_range=0.3)
_GQA = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
_MOE = dict(num_experts_per_tok=2)

# The one table of tiny random causal LMs the tests build: name -> (config class, kwargs).
# Hidden 64, 2 layers, vocab 512, initializer_range 0.3. Names with a suffix are variants of a
# family (falcon: rotary, ALiBi, multi-query, the new decoder architecture with grouped KV heads).
# ALiBi models (falcon_alibi, bloom, mpt) are sized so that dropping the bias changes greedy
# tokens (tests/coverage checks it): Falcon needs 8 heads for that (its slopes are steeper),
# and a larger initializer_range is no option: at 1.0 transformers' own float32 logits are
# 2e-4 off its float64 ones, over the 1e-4 the tests allow.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(TINY, **_GQA)),
    "mistral": ("MistralConfig", dict(TINY, **_GQA, sliding_window=4096)),
    "mixtral": ("MixtralConfig", dict(TINY, **_GQA, **_MOE, num_local_experts=4)),
    "qwen2": ("Qwen2Config", dict(TINY, **_GQA, use_sliding_window=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(TINY, **_GQA, **_MOE, num_experts=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                         use_sliding_window=False)),
    # phi, gpt_neox, gptj: partial rotaries of 16 (the kernel's multiple) in heads of 32; codegen's 8 is not
    "phi": ("PhiConfig", dict(TINY, num_attention_heads=2, intermediate_size=128, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", dict(TINY, **_GQA, sliding_window=None, pad_token_id=0,
                                original_max_position_embeddings=512)),
    "starcoder2": ("Starcoder2Config", dict(TINY, **_GQA, sliding_window=None, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", dict(_GPT2_NAMES, n_inner=128, n_positions=512)),
    "gptj": ("GPTJConfig", dict(_GPT2_NAMES, n_head=2, n_inner=128, n_positions=512, rotary_dim=16)),
    "codegen": ("CodeGenConfig", dict(_GPT2_NAMES, n_inner=128, n_positions=512, n_ctx=512, rotary_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(TINY, num_attention_heads=2, intermediate_size=128, rotary_pct=0.5)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(_GPT2_NAMES, n_inner=128, n_positions=512, multi_query=True)),
    "falcon": ("FalconConfig", dict(TINY, num_attention_heads=4, num_kv_heads=4, multi_query=False,
                                    alibi=False, bos_token_id=1, eos_token_id=2)),
    "falcon_alibi": ("FalconConfig", dict(TINY, num_attention_heads=8, num_kv_heads=8, multi_query=False,
                                          alibi=True, bos_token_id=1, eos_token_id=2)),
    "falcon_mqa": ("FalconConfig", dict(TINY, num_attention_heads=4, num_kv_heads=4, multi_query=True,
                                        alibi=False, bos_token_id=1, eos_token_id=2)),
    "falcon_new": ("FalconConfig", dict(TINY, num_attention_heads=4, num_kv_heads=2,
                                        new_decoder_architecture=True, alibi=False, bos_token_id=1,
                                        eos_token_id=2)),
    "mpt": ("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512,
                              vocab_size=512, initializer_range=0.3, use_cache=True)),
    "gemma": ("GemmaConfig", dict(TINY, **_GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(TINY, **_GQA, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=512, initializer_range=0.3)),
    "opt": ("OPTConfig", dict(TINY, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64)),
    # per-head q/k RMSNorm (qwen3, gemma3; olmo2's over the whole projection), gemma3's sliding and full
    # layers with their own rope bases, granite's multipliers, cohere's interleaved rotary and logit scale,
    # stablelm's and persimmon's partial rotaries (16 of 32; persimmon with q/k LayerNorm)
    "qwen3": ("Qwen3Config", dict(TINY, **_GQA, head_dim=32, use_sliding_window=False)),
    "gemma3": ("Gemma3TextConfig", dict(TINY, **_GQA, head_dim=32, sliding_window=4, query_pre_attn_scalar=32,
                                        layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2Config", dict(TINY, **_GQA)),
    "granite": ("GraniteConfig", dict(TINY, **_GQA, embedding_multiplier=2.0, attention_multiplier=0.3,
                                      residual_multiplier=0.5, logits_scaling=2.0)),
    "cohere": ("CohereConfig", dict(TINY, **_GQA, logit_scale=0.5)),
    "stablelm": ("StableLmConfig", dict(TINY, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
                                        partial_rotary_factor=0.5)),
    "persimmon": ("PersimmonConfig", dict(TINY, num_attention_heads=2, intermediate_size=128,
                                          partial_rotary_factor=0.5)),
}


def tiny_config(arch: str):
    """A tiny random config for ``arch``, a key of :data:`FAMILIES`."""
    import transformers as tf

    if arch not in FAMILIES:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(FAMILIES)}")
    cls, kwargs = FAMILIES[arch]
    return getattr(tf, cls)(**kwargs)


def make_tiny_hf(arch: str, directory: str | Path) -> Path:
    """Save a seeded tiny random ``arch`` model (fp32) to ``directory``; return it."""
    import torch
    import transformers as tf

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.eval()
    model.save_pretrained(directory)
    return directory


def save_tiny_tokenizer(directory: str | Path, sentences: list[str], vocab_size: int = 512) -> None:
    """A word-level tokenizer for a tiny model: the words of ``sentences`` first, then ``w<i>``
    fillers, so that its vocab covers all ``vocab_size`` ids (``</s>`` is EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"]
    for w in " ".join(sentences).split():
        if w not in words:
            words.append(w)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(directory)


def make_tiny_llama_with_tokenizer(directory: str | Path, sentences: list[str]) -> Path:
    """:func:`make_tiny_hf` ("llama") plus :func:`save_tiny_tokenizer` over ``sentences``."""
    hf = make_tiny_hf("llama", directory)
    save_tiny_tokenizer(hf, sentences)
    return hf


README_PROMPT = "The capital of France is"


@dataclasses.dataclass
class FreshInfer:
    """What the first ``qeff-graph infer`` from an empty cache did."""

    home: Path  # the QEFF_HOME it ran with
    argv: list[str]
    rc: int
    seconds: float
    stdout: str
    stderr: str
    result: dict  # its --output-json


@contextlib.contextmanager
def qeff_home(path: Path):
    old = os.environ.get("QEFF_HOME")
    os.environ["QEFF_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QEFF_HOME", None)
        else:
            os.environ["QEFF_HOME"] = old


def run_cli(argv: list[str]) -> tuple[int, float, str, str]:
    """``qeff_graph.cli.main(argv)`` in-process: (exit code, seconds, stdout, stderr)."""
    from qeff_graph.cli import main

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, time.perf_counter() - start, out.getvalue(), err.getvalue()
