"""``qeff-graph`` command line: one module per subcommand, thin shells over the Python API.

Every user error prints one line ``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from qeff_graph import __version__
from qeff_graph.errors import QeffGraphError

__all__ = ["main", "build_parser"]

_COMMANDS = ("infer", "optimize", "passes", "inspect", "export", "compile", "execute", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <problem> (see `<prog> --help`)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(
        prog="qeff-graph",
        description="Rewrite ONNX exports of transformers into retained-KV-cache programs, "
        "compile them for ONNX Runtime or Cloud AI 100 (qaic), and run them.",
    )
    parser.add_argument("--version", action="version", version=f"qeff-graph {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for name in _COMMANDS:
        importlib.import_module(f"qeff_graph.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except QeffGraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal bug: one line unless debugging
        if os.environ.get("QEFF_GRAPH_DEBUG"):
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: internal error: {type(exc).__name__}: {first} "
              "(set QEFF_GRAPH_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1
