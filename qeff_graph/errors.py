"""User-facing errors.

Every problem a user can cause (bad file, bad option, unsupported graph) is raised as a
:class:`QeffGraphError` whose message is one line naming the problem and the fix. The CLI prints
it as ``error: <message>`` and exits with code 2; Python callers can catch it.
"""

from __future__ import annotations

__all__ = ["PreconditionError", "QeffGraphError", "UnsupportedGraphError"]


class QeffGraphError(Exception):
    """A problem with the user's input: one line, naming the problem and the fix."""

    exit_code = 2


class UnsupportedGraphError(QeffGraphError):
    """The graph does not have the structure a pass expects (e.g. no KV cache)."""


def _precondition_base():
    import onnx_ir as ir

    return ir.passes.PreconditionError


class PreconditionError(UnsupportedGraphError, _precondition_base()):
    """A pass's ``requires`` check failed: the graph is not what the pass can rewrite (also an
    ``onnx_ir`` ``PreconditionError``, so its PassManager treats it as one)."""
