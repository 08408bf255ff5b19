"""Turn a torch exporter failure into one line saying what the model did.

torch's exporters wrap the real cause in generic step messages ("Failed to export the model with
torch.export. This is step 1/3 …"). :func:`explain_export_failure` walks the exception chain for
the cause (an operator with no ONNX conversion, a shape guard torch.export could not prove, a
branch on a tensor's value, a tensor-size mismatch) and the line of model code that raised it.
"""

from __future__ import annotations

import linecache
import re
import traceback

__all__ = ["explain_export_failure"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DISPATCH = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>")
_TS_UNSUPPORTED = re.compile(r"Exporting the operator '([^']+)' to ONNX opset version (\d+) is not supported")
_INCONSISTENT = re.compile(r"The following inconsistencies were found:\s*(.+?) is inconsistent", re.S)
_DATA_DEPENDENT = re.compile(r"Could not (?:guard on|extract specialized integer from) data-dependent "
                             r"expression ([^\s(]+(?:\([^)]*\))?)")
_CONSTRAINT = re.compile(r"Constraints violated \(([^)]*)\)")
_NOT_ALL_VALUES = re.compile(r"Not all values of ([\w]+)[^\n]*? satisfy the generated guard ([^\n.]+)")
_SPECIALIZED = re.compile(r"You marked (\w+) as dynamic but your code specialized it to be a constant \((\d+)\)")

# model code is transformers' (or a model's own, ``transformers_modules``); these parts of
# transformers are its plumbing, not the model
_NOT_MODEL = ("/transformers/utils/", "/transformers/modeling_utils.py", "/transformers/integrations/accelerate.py")


def _chain(e: BaseException) -> list[BaseException]:
    from qeff_graph.export.loader import _exc_chain

    return _exc_chain(e)


def _clean(text: str, limit: int = 160) -> str:
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model_frame(chain: list[BaseException]) -> str:
    """``file.py:line `code``` of the innermost model-code frame in the chain, or ''."""
    best = None
    for exc in reversed(chain):  # innermost first: that is where the model code ran
        for frame in traceback.extract_tb(exc.__traceback__):
            path = frame.filename.replace("\\", "/")
            if any(p in path for p in _NOT_MODEL) or not ("/transformers/" in path or "transformers_modules/" in path):
                continue
            best = frame
        if best is not None:
            break
    if best is None:
        return ""
    code = (best.line or linecache.getline(best.filename, best.lineno) or "").strip()
    where = f"{best.filename.replace(chr(92), '/').rsplit('/', 1)[-1]}:{best.lineno}"
    return f" at {where}" + (f" `{_clean(code, 80)}`" if code else "")


def _summary(chain: list[BaseException]) -> str:
    """The innermost message worth showing (torch's step banners skipped)."""
    for exc in reversed(chain):
        text = _ANSI.sub("", str(exc))
        if "## Exception summary" in text:
            m = re.search(r"<class '([\w.]+)'>: (.+)", text.split("## Exception summary", 1)[1])
            if m:
                return f"{m.group(1).rsplit('.', 1)[-1]}: {_clean(m.group(2))}"
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        if first and "This is step" not in first and not first.startswith("Failed to "):
            return f"{type(exc).__name__}: {_clean(first)}"
    last = chain[-1]
    return f"{type(last).__name__}: {_clean(str(last))}" if str(last) else type(last).__name__


def explain_export_failure(e: BaseException, exporter: str, opset: int) -> str:
    """One line: what the model did that ``exporter`` refused, where in the model code, and what
    to try (the other exporter)."""
    chain = _chain(e)
    text = "\n".join(_ANSI.sub("", str(x)) for x in chain)
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    where = _model_frame(chain)
    if m := _DISPATCH.search(text):
        what = (f"the model calls {m.group(1)}.{m.group(2)}, which the dynamo exporter cannot convert to ONNX "
                f"(no ONNX function for it){where}")
    elif m := _TS_UNSUPPORTED.search(text):
        what = (f"the model calls {m.group(1)}, which the TorchScript exporter cannot convert at opset "
                f"{m.group(2)}{where}")
    elif m := _INCONSISTENT.search(text):
        what = (f"torch.export found contradictory shape guards on the dynamic dims "
                f"({_clean(m.group(1), 100)}){where}")
    elif m := _DATA_DEPENDENT.search(text):
        what = (f"the model branches on a tensor's value (data-dependent guard {_clean(m.group(1), 80)}), "
                f"which torch.export cannot trace{where}")
    elif m := _SPECIALIZED.search(text):
        what = (f"the model fixes the dynamic dim {m.group(1)} to {m.group(2)} (a shape guard){where}")
    elif m := _CONSTRAINT.search(text):
        detail = _NOT_ALL_VALUES.search(text)
        guard = f": guard {_clean(detail.group(2), 80)}" if detail else ""
        what = f"the model constrains the dynamic dims {m.group(1)}{guard}{where}"
    else:
        what = f"{_summary(chain)}{where}"
    return f"{what.rstrip('. ')}; try exporter={other!r}"
