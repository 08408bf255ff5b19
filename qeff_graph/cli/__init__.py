"""``qeff-graph`` command line: one module per subcommand, thin shells over the Python API.

Exit codes: 0 success; 2 a problem with the input, the options or the environment (one line
``error: ...`` naming it and the fix, printed before any long work where it can be known then);
1 an internal error (a bug: one line, the traceback with ``QEFF_GRAPH_DEBUG=1``); 130 Ctrl-C;
143 SIGTERM. Interrupted or killed runs leave no partial output: what was being written is
removed (SIGKILL: at the next run). Progress goes to stderr through :mod:`qeff_graph.progress`.
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

_COMMANDS = ("infer", "embed", "optimize", "verify", "passes", "inspect", "export", "compile", "execute",
             "bench")


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
        epilog="Exit codes: 0 success; 2 bad input, options or environment (one `error:` line); "
        "1 internal error (QEFF_GRAPH_DEBUG=1 for the traceback); 130 Ctrl-C; 143 SIGTERM. "
        "Cache: $QEFF_HOME, else $XDG_CACHE_HOME/qeff_cache, else ~/.cache/qeff_cache.",
    )
    parser.add_argument("--version", action="version", version=f"qeff-graph {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for name in _COMMANDS:
        importlib.import_module(f"qeff_graph.cli.{name.replace('-', '_')}").add_parser(sub)
        sub.choices[name].set_defaults(command_parser=sub.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # the subcommand's usage error, naming its own --help
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return int(exc.code or 0)
    from qeff_graph import progress
    from qeff_graph.fs import handle_termination

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    channel = progress.StderrHandler()
    channel.setFormatter(logging.Formatter("%(message)s"))
    progress.logger.addHandler(channel)
    progress.logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    progress.logger.propagate = False
    handle_termination()
    try:
        return _run(args)
    finally:
        progress.logger.removeHandler(channel)


def _run(args) -> int:
    from qeff_graph import progress
    from qeff_graph.fs import Terminated

    try:
        with progress.quiet(getattr(args, "quiet", False)):
            return int(args.run(args) or 0)
    except QeffGraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("error: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("error: out of memory; lower --ctx-len / --batch-size or use a smaller model", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: disk full, permissions, a vanished file
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check free disk space and permissions", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal bug: one line unless debugging
        if os.environ.get("QEFF_GRAPH_DEBUG"):
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: internal error: {type(exc).__name__}: {first} "
              "(set QEFF_GRAPH_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1
