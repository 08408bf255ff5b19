"""Registry of passes by kebab-case name (``kv-retention``, ``fp16-clamp``, ...).

A pass class registers itself with ``@register("name")``; :func:`create` builds one from its
name and constructor keyword arguments; :func:`available` lists ``(name, one-line doc)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import onnx_ir as ir

from qeff_graph.errors import QeffGraphError

__all__ = ["register", "get", "create", "available", "names"]

_REGISTRY: dict[str, type[ir.passes.PassBase]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register a pass under ``name`` (also sets ``cls.pass_name``)."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name {name!r} registered twice")
        cls.pass_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[ir.passes.PassBase]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QeffGraphError(
            f"unknown pass {name!r}; `qeff-graph passes` lists the registered ones "
            f"({', '.join(names())})"
        ) from None


def create(name: str, **options) -> ir.passes.PassBase:
    """Instantiate pass ``name`` with the options its constructor accepts (others ignored)."""
    cls = get(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = {k: v for k, v in options.items() if k in params}
    return cls(**accepted)


def available() -> list[tuple[str, str]]:
    """``(name, first line of the docstring)`` for every registered pass, sorted by name."""
    out = []
    for name in names():
        doc = inspect.getdoc(_REGISTRY[name]) or ""
        out.append((name, doc.splitlines()[0] if doc else ""))
    return out
