"""Silence the warning/log flood of torch.export, torch.onnx and transformers for a block."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from typing import Iterator

_NOISY_LOGGERS = (
    "torch",
    "torch.onnx",
    "torch._dynamo",
    "torch._inductor",
    "torch.export",
    "torch._export",
    "torch.fx",
    "torch.fx.experimental.symbolic_shapes",
    "torch._subclasses",
    "torch.utils._sympy",
    "onnxscript",
    "onnx_ir",
    "transformers",
    "accelerate",
    "huggingface_hub",
)


@contextlib.contextmanager
def quiet(*, capture_stdout: bool = True, progress_bars: bool = True) -> Iterator[io.StringIO]:
    """Suppress Python warnings, lower noisy loggers to ERROR and capture stray prints.

    ``progress_bars=False`` also hides transformers' own tqdm bars (weight loading, GGUF
    de-quantisation). Yields the buffer that captured stdout (empty when not captured).
    """
    saved_levels = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved_levels[name] = lg.level
        lg.setLevel(logging.ERROR)
    tf_logging = None
    tf_verbosity = None
    tf_bars = None
    try:
        from transformers.utils import logging as tf_logging  # type: ignore

        tf_verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()
        tf_bars = tf_logging.is_progress_bar_enabled()
        if not progress_bars:
            tf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing/changed
        tf_logging = None
    gguf_module, gguf_tqdm = None, None
    if not progress_bars:  # the GGUF de-quantization bar is plain tqdm, outside transformers' switch
        try:
            import functools

            import transformers.modeling_gguf_pytorch_utils as gguf_module

            gguf_tqdm = gguf_module.tqdm
            gguf_module.tqdm = functools.partial(gguf_tqdm, disable=True)
        except (ImportError, AttributeError):  # pragma: no cover - transformers changed
            gguf_module = None
    buf = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if capture_stdout:
                with contextlib.redirect_stdout(buf):
                    yield buf
            else:
                yield buf
    finally:
        if gguf_module is not None:
            gguf_module.tqdm = gguf_tqdm
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        if tf_logging is not None:
            try:
                tf_logging.set_verbosity(tf_verbosity)
                if tf_bars:
                    tf_logging.enable_progress_bar()
            except Exception:  # pragma: no cover
                pass
        sys.stdout.flush()
