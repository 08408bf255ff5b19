"""The one progress channel: what long work (export, optimize, compile, generation) tells the user.

On a terminal, messages go to stderr and long steps show a tqdm bar; otherwise (CI logs, pipes,
notebooks) everything goes through the ``logging`` logger ``qeff_graph.progress`` at INFO
(the CLI routes it to stderr; Python callers configure logging as they like). ``quiet()``
silences the channel (``-q``, ``progress=False``).

:func:`checkpoint` names the moments of a build (``load``, ``passes``, ``write``, ``rename``,
...). With ``QEFF_GRAPH_STOP_AT=<name>`` in the environment the process stops itself
(``SIGSTOP``) there: the kill tests use it to SIGKILL/SIGTERM a build at an exact moment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

__all__ = ["say", "task", "bar", "checkpoint", "quiet", "is_enabled", "on_terminal", "logger", "StderrHandler"]

logger = logging.getLogger("qeff_graph.progress")
_state = threading.local()
HEARTBEAT_S = 30.0
SHOW_AFTER_S = 2.0


def is_enabled() -> bool:
    return not getattr(_state, "quiet", False)


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Silence the channel inside the block (when ``on``)."""
    old = getattr(_state, "quiet", False)
    _state.quiet = old or on
    try:
        yield
    finally:
        _state.quiet = old


def on_terminal() -> bool:
    """True when progress shows as live bars (stderr is a terminal and the channel is on)."""
    return is_enabled() and _tty()


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def say(message: str) -> None:
    """One line of progress."""
    if not is_enabled():
        return
    if _tty():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


@contextlib.contextmanager
def task(description: str) -> Iterator[None]:
    """A long step with no known length. On a terminal: a live elapsed-time bar. Otherwise a line
    once it has run :data:`SHOW_AFTER_S` (quick steps stay silent), one every
    :data:`HEARTBEAT_S` seconds, and one when it ends."""
    if not is_enabled():
        yield
        return
    start = time.monotonic()
    stop = threading.Event()
    shown = threading.Event()
    if _tty():
        from tqdm import tqdm

        bar_ = tqdm(desc=description, total=None, bar_format="{desc} {elapsed}", file=sys.stderr, leave=False)

        def tick():
            while not stop.wait(1.0):
                bar_.refresh()
    else:
        bar_ = None

        def tick():
            if stop.wait(SHOW_AFTER_S):
                return
            logger.info("%s …", description)
            shown.set()
            while not stop.wait(HEARTBEAT_S):
                logger.info("%s … %.0f s", description, time.monotonic() - start)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        if bar_ is not None:
            bar_.close()
        if ok and (shown.is_set() or bar_ is not None and time.monotonic() - start >= SHOW_AFTER_S):
            say(f"{description}: done in {time.monotonic() - start:.1f} s")


def bar(total: int, description: str):
    """A counted bar (``update()``/``close()``, ``set_postfix_str``); a no-op object when the
    channel is quiet or not on a terminal (the caller's ``say`` lines cover those)."""
    if is_enabled() and _tty():
        from tqdm import tqdm

        return tqdm(total=total, desc=description, file=sys.stderr, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def checkpoint(name: str) -> None:
    """Mark a named moment of a build; stops the process there when ``QEFF_GRAPH_STOP_AT`` names it."""
    logger.debug("checkpoint %s", name)
    if os.environ.get("QEFF_GRAPH_STOP_AT") == name:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


class StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is at the time (so redirections are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
