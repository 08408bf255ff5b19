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


def tiny_config(arch: str):
    """A tiny random config for ``arch`` in {llama, gpt2, phi3, mistral, qwen2}."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128)
    if arch == "mistral":
        return tf.MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, sliding_window=4096)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, use_sliding_window=False)
    if arch == "phi3":
        return tf.Phi3Config(**TINY, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, sliding_window=None, pad_token_id=0,
                             original_max_position_embeddings=512)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=512,
                             n_positions=512, initializer_range=0.3)
    raise ValueError(arch)


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
