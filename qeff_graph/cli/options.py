"""Shared option helpers: kebab-case flags with QEfficient's underscore spellings as aliases."""

from __future__ import annotations

import argparse

__all__ = ["add", "add_program_options", "positive_int"]


def add(parser: argparse.ArgumentParser, flag: str, *more: str, **kwargs) -> argparse.Action:
    """Add ``--some-flag`` together with ``--some_flag`` (hidden alias)."""
    flags = [flag, *more]
    if flag.startswith("--") and "-" in flag[2:]:
        flags.append("--" + flag[2:].replace("-", "_"))
    return parser.add_argument(*flags, **kwargs)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_program_options(parser: argparse.ArgumentParser) -> None:
    """The shape/precision options a retained-KV program is built for (optimize, infer)."""
    add(parser, "--ctx-len", type=positive_int, default=128, help="KV cache length (tokens)")
    add(parser, "--prompt-len", type=positive_int, default=32,
        help="prefill chunk length (seq_len of the prefill specialization)")
    add(parser, "--batch-size", type=positive_int, default=1,
        help="rows run together (batch size of both specializations)")
    add(parser, "--kv-dtype", choices=["float32", "float16"], default="float32",
        help="precision of the KV cache IO")
