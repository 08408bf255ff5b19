"""Shared option helpers: kebab-case flags with QEfficient's underscore spellings as aliases."""

from __future__ import annotations

import argparse

__all__ = ["add", "positive_int"]


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
