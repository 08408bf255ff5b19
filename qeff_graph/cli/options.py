"""Shared CLI options: kebab-case flags with QEfficient's underscore spellings as aliases.

Program options are declared here once and turned into a
:class:`~qeff_graph.program.ProgramSpec` by :func:`spec_options`: argparse defaults are
``None`` (the spec's defaults apply), so the help shows the spec's defaults and a program dir
given to ``compile`` keeps the options it was built with unless a flag overrides them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["HelpFormatter", "add", "add_accuracy_level", "add_compression_options", "add_program_options",
           "add_qaic_options", "add_run_options", "check_run_outputs", "device_group", "positive_int",
           "positive_ints", "spec_options", "read_prompts", "read_texts", "SPEC_ARGS"]

# argparse dests that are ProgramSpec fields
SPEC_ARGS = ("ctx_len", "prompt_len", "batch_size", "full_batch_size", "kv_dtype", "weight_bits", "passes",
             "backend", "num_cores", "mxfp6", "mxint8", "mos", "aic_enable_depth_first", "device_group",
             "aic_hw_version", "num_speculative_tokens", "ort_lowering", "accuracy_level")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the help already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add(parser: argparse.ArgumentParser, flag: str, *more: str, **kwargs) -> argparse.Action:
    """Add ``--some-flag`` (and any ``more`` spellings) together with ``--some_flag`` aliases."""
    flags = [flag, *more]
    flags += ["--" + f[2:].replace("-", "_") for f in flags if f.startswith("--") and "-" in f[2:]]
    return parser.add_argument(*flags, **kwargs)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _default(name: str) -> str:
    from qeff_graph.program import DEFAULTS

    return f"(default: {DEFAULTS[name]})"


def add_program_options(parser: argparse.ArgumentParser, *, inherit: str = "") -> None:
    """The shapes and precision a retained-KV program is built for (optimize, compile, infer).
    ``inherit``: words appended to each default, e.g. "or the input program's"."""
    more = f" {inherit}" if inherit else ""

    def d(name: str) -> str:
        return _default(name)[:-1] + more + ")"

    add(parser, "--ctx-len", type=positive_int, default=None, help=f"KV cache length (tokens) {d('ctx_len')}")
    add(parser, "--prompt-len", type=positive_int, default=None,
        help=f"prefill chunk length (seq_len of the prefill specialization) {d('prompt_len')}")
    add(parser, "--batch-size", type=positive_int, default=None,
        help=f"rows run together (batch size of both specializations) {d('batch_size')}")
    add(parser, "--full-batch-size", type=positive_int, default=None,
        help="continuous batching: cache rows (slots refilled from the prompt queue as rows finish); "
        "adds the batch_index input")
    add(parser, "--kv-dtype", choices=["float32", "float16"], default=None,
        help=f"precision of the KV cache IO {d('kv_dtype')}")
    add(parser, "--num-speculative-tokens", type=positive_int, default=None, metavar="K",
        help="speculative decoding: add a verify specialization of K+1 tokens that returns the logits of "
        "every position (K+1 <= --prompt-len); a run then drafts K tokens per step (--draft) and keeps "
        f"what greedy decoding would give (default: none{more})")
    add(parser, "--ort-lowering", type=int, choices=[0, 1, 2], default=None,
        help="ort: how far the program is lowered to ONNX Runtime's kernels: 2 GroupQueryAttention where the "
        "ort-gqa pass proves every layer, else attention over the valid cache length; 1 the valid-length "
        f"attention only; 0 the portable graph (what qaic gets) {d('ort_lowering')}")


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    """QEfficient's --mxfp6/--mxint8 with their meaning on each backend."""
    add(parser, "--mxfp6", "--mxfp6-matmul", action="store_true",
        help="compress matmul weights: qaic -mxfp6-matmul; ort: weight-only MatMulNBits, "
        "blocks of 32 (--weight-bits, default 8)")
    add(parser, "--mxint8", "--mxint8-kv-cache", action="store_true",
        help="compress the KV cache: qaic MXINT8 custom IO; ort: float16 KV cache")
    add(parser, "--weight-bits", type=int, choices=[4, 8], default=None,
        help="ort: quantize matmul weights to 4 or 8 bits (the matmul-nbits pass; --mxfp6 means 8); 4 on a "
        "GGUF model carries the GGUF's own blocks (exact)")
    add_accuracy_level(parser)


def add_accuracy_level(parser: argparse.ArgumentParser) -> None:
    """MatMulNBits' accuracy_level for --weight-bits programs."""
    add(parser, "--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
        help="with --weight-bits: how MatMulNBits computes; 1 float compute, exactly the weights written "
        "(default); 4 int8 activations, faster but moves greedy text (SmolLM2 int4: 96.6%% of next tokens "
        "equal fp32's); 0/2/3 as ONNX Runtime defines them")


def add_qaic_options(parser, *, num_cores_help: str) -> None:
    """Cloud AI 100 compile options (``-aic-num-cores``, ``-mos``, ...)."""
    add(parser, "--num-cores", type=positive_int, default=None, help=num_cores_help)
    add(parser, "--device-group", type=device_group, default=None, metavar="0,1",
        help="qaic device ids; more than one writes mdp.json (multi-device partition); "
        "ort runs on one device")
    add(parser, "--mos", type=positive_int, default=None, help="qaic only: -mos (max output splits)")
    add(parser, "--aic-enable-depth-first", action="store_true", help="qaic only: -aic-enable-depth-first")
    add(parser, "--aic-hw-version", default=None, help=f"qaic: -aic-hw-version {_default('aic_hw_version')}")


def spec_options(args: argparse.Namespace) -> dict:
    """The ProgramSpec fields the user gave on the command line (flags left out are absent)."""
    return {name: getattr(args, name) for name in SPEC_ARGS
            if getattr(args, name, None) is not None and getattr(args, name) is not False}


def _int_list(text: str, *, minimum: int, what: str, problem: str) -> list[int]:
    """``0,1`` or ``[0,1]`` → ``[0, 1]``: distinct integers >= ``minimum``."""
    try:
        values = [int(s) for s in text.replace("[", "").replace("]", "").split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    if not values or any(v < minimum for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return values


def device_group(text: str) -> list[int]:
    """``0,1`` or ``[0,1]`` → ``[0, 1]`` (distinct ids >= 0)."""
    return _int_list(text, minimum=0, what="device ids", problem="give distinct device ids >= 0, e.g. 0,1")


def positive_ints(text: str) -> list[int]:
    """``1,4`` → ``[1, 4]`` (distinct integers >= 1)."""
    return _int_list(text, minimum=1, what="integers", problem="give distinct integers >= 1, e.g. 1,4")


# ---- running prompts (infer, execute) ------------------------------------------------------
DEFAULT_PROMPT = "My name is"


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Prompts, generation length and outputs shared by ``infer`` and ``execute``."""
    group = p.add_mutually_exclusive_group()
    add(group, "--prompt", default=None,
        help=f"prompt text; `|` separates several prompts (default: {DEFAULT_PROMPT!r})")
    add(group, "--prompts-txt-file-path", default=None, help="UTF-8 text file with one prompt per line")
    add(p, "--generation-len", type=positive_int, default=None,
        help="max new tokens (default: until EOS or ctx_len)")
    add(p, "--chat-template", action="store_true",
        help="wrap each prompt as a user turn with the tokenizer's chat template (instruct models)")
    add(p, "--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads "
        "(default: the program's --num-cores, else all cores)")
    p.add_argument("--stream", action="store_true",
                   help="print each prompt's answer as it is generated (prompts in order, each under its header)")
    add(p, "--output-json", default=None, metavar="FILE",
        help="write prompts, texts, ids and perf stats to FILE (atomically; its folder must exist)")
    add(p, "--write-io-dir", default=None, metavar="DIR",
        help="write the first prefill and decode step's inputs/outputs as raw files + aic_batch_io.json")
    add(p, "--draft", default=None, metavar="prompt-lookup|self-int4|none|PATH_OR_ID",
        help="speculative decoding drafter (the program needs --num-speculative-tokens K): prompt-lookup "
        "(default: n-gram match against the prompt and the text so far, no extra model), self-int4 (this "
        "model's int4 program, built through the cache; infer only), PATH_OR_ID (a draft program dir, or a "
        "model dir / .gguf / hub id compiled with the same shapes; it must have the same tokenizer), or none "
        "(plain greedy decoding); the tokens are the same in every case")
    add(p, "--lookup-ngram", type=positive_int, default=None, metavar="N",
        help="--draft prompt-lookup: match the last N tokens, then fewer, down to 2 (1 with N=1) (default: 3)")


def read_prompts(prompt: str | None, path: str | None) -> list[str]:
    """``--prompt`` (``|``-separated) or ``--prompts-txt-file-path`` (one per line); one-line errors."""
    return read_texts(prompt, path, what="prompt", default=DEFAULT_PROMPT)


def read_texts(text: str | None, path: str | None, *, what: str, default: str | None = None) -> list[str]:
    """Texts from a ``|``-separated flag or a UTF-8 file with one per line; one-line errors for a
    missing, binary or empty file and for empty texts (``what`` names them: prompt, text)."""
    from qeff_graph.errors import QeffGraphError

    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise QeffGraphError(f"{what}s file {path} does not exist; pass a text file with one {what} per line")
        try:
            content = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise QeffGraphError(f"{what}s file {path} is not UTF-8 text; pass a text file with one {what} "
                                 "per line") from None
        if "\0" in content:
            raise QeffGraphError(f"{what}s file {path} is binary (it holds NUL bytes); pass a text file")
        texts = [line.strip() for line in content.splitlines() if line.strip()]
        if not texts:
            raise QeffGraphError(f"{what}s file {path} has no {what}s; put one {what} per line")
        return texts
    if text is None and default is None:
        raise QeffGraphError(f"no {what} given; pass --{what} \"...\" or a {what}s file")
    texts = (default if text is None else text).split("|")
    if any(not s.strip() for s in texts):
        raise QeffGraphError(f"empty {what}; give non-empty text ({what}s are separated by `|`)")
    return texts


def check_run_outputs(args: argparse.Namespace) -> None:
    """``--output-json`` and ``--write-io-dir`` must be writable: checked before any work."""
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.fs import check_writable_target

    if args.output_json is not None:
        check_writable_target(args.output_json, "--output-json")
    if args.write_io_dir is not None:
        target = Path(args.write_io_dir)
        if target.exists() and not target.is_dir():
            raise QeffGraphError(f"--write-io-dir {target} exists and is not a folder; choose a folder")
        existing = next(p for p in (target, *target.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise QeffGraphError(f"--write-io-dir {target}: {existing} is not a writable folder; choose another")
