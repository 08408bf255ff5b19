"""Shared option helpers: kebab-case flags with QEfficient's underscore spellings as aliases."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "add", "add_compression_options", "add_program_options", "add_qaic_options",
           "device_group", "positive_int", "positive_ints"]


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


def add_program_options(parser: argparse.ArgumentParser) -> None:
    """The shape/precision options a retained-KV program is built for (optimize, infer)."""
    add(parser, "--ctx-len", type=positive_int, default=128, help="KV cache length (tokens)")
    add(parser, "--prompt-len", type=positive_int, default=32,
        help="prefill chunk length (seq_len of the prefill specialization)")
    add(parser, "--batch-size", type=positive_int, default=1,
        help="rows run together (batch size of both specializations)")
    add(parser, "--kv-dtype", choices=["float32", "float16"], default="float32",
        help="precision of the KV cache IO")


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


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    """QEfficient's --mxfp6/--mxint8 with their meaning on each backend."""
    add(parser, "--mxfp6", "--mxfp6-matmul", action="store_true",
        help="compress matmul weights: qaic -mxfp6-matmul; ort: weight-only MatMulNBits, "
        "blocks of 32 (--weight-bits, default 8)")
    add(parser, "--mxint8", "--mxint8-kv-cache", action="store_true",
        help="compress the KV cache: qaic MXINT8 custom IO; ort: float16 KV cache")
    add(parser, "--weight-bits", type=int, choices=[4, 8], default=None,
        help="ort: bits of the quantized matmul weights (implies --mxfp6)")


def add_qaic_options(parser, *, num_cores_help: str) -> None:
    """Cloud AI 100 compile options (``-aic-num-cores``, ``-mos``, ...)."""
    add(parser, "--num-cores", type=positive_int, default=None, help=num_cores_help)
    add(parser, "--device-group", type=device_group, default=None, metavar="0,1",
        help="qaic device ids; more than one writes mdp.json (multi-device partition); "
        "ort runs on one device")
    add(parser, "--mos", type=positive_int, default=None, help="qaic: -mos (max output splits)")
    add(parser, "--aic-enable-depth-first", action="store_true", help="qaic: -aic-enable-depth-first")
    add(parser, "--aic-hw-version", default="2.0", help="qaic: -aic-hw-version")
