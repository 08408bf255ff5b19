"""Export an encoder (BERT family, sentence-transformers folders) to an *unmodified* ONNX graph.

Graph IO (what the ``encoder`` pipeline starts from):

=================  ==========================================================================
inputs             ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model
                   has token types) int64 ``[batch_size, sequence_length]``
outputs            ``last_hidden_state`` float ``[batch_size, sequence_length, hidden]``
=================  ==========================================================================

The output folder is one atomic folder like a causal-LM export: ``model.onnx`` (+ data above
64 MiB), ``config.json``, the tokenizer, and ``export.json`` (``"kind": "encoder"``, every
file's size and SHA-256). Pooling is not part of the export: it is a pass (``pooling``).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

from qeff_graph import progress as _progress

from ._quiet import quiet
from .exporter import (
    EXTERNAL_DATA_THRESHOLD,
    ONNX_FILENAME,
    _consolidate_external,
    check_export_options,
    dynamo_export,
    run_exporter,
    save_config_and_tokenizer,
)
from .loader import load_hf_encoder

__all__ = ["export_encoder", "encoder_io_names"]

EXAMPLE = dict(batch=2, seq=7)  # distinct and > 1: no dim gets specialised


def encoder_io_names(model) -> list[str]:
    """The inputs the exported graph takes: token types only when the model has several."""
    names = ["input_ids", "attention_mask"]
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    if accepts and (getattr(model.config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return names


def _wrapper(model, names: list[str]):
    import torch

    class Encoder(torch.nn.Module):
        """``(*inputs) -> last_hidden_state`` (positional, in ``names`` order)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args)), return_dict=True).last_hidden_state

    return Encoder().eval()


def export_encoder(model_or_path: Any, out_dir: str | os.PathLike, *, exporter: str = "dynamo",
                   opset: int | None = None, hf_token: str | None = None,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   tokenizer: Any | None = None, trust_remote_code: bool = False,
                   cache_entry: bool = False) -> Path:
    """Export an encoder to ``out_dir/model.onnx`` (see the module docstring); returns that path.

    ``model_or_path``: a loaded ``transformers`` encoder (``AutoModel``), a local model folder
    (a sentence-transformers folder works: its transformer is exported) or a hub id.
    """
    with _progress.quiet(not progress):
        return _export(model_or_path, Path(out_dir).expanduser().absolute(), exporter, opset, hf_token,
                       cache_dir, tokenizer, trust_remote_code, cache_entry)


def _export(model_or_path, out_dir: Path, exporter, opset, hf_token, cache_dir, tokenizer, trust_remote_code,
            cache_entry) -> Path:
    t0 = time.perf_counter()
    opset = check_export_options(exporter, opset, out_dir, cache_entry)
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        _progress.checkpoint("export:load")
        with _progress.task(f"export: loading {source}"):
            model, tok = load_hf_encoder(model_or_path, hf_token, cache_dir, progress=_progress.on_terminal(),
                                         trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        model, source = model_or_path.eval(), getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__
    seconds_load = time.perf_counter() - t0

    import torch

    from qeff_graph.artifact import file_table
    from qeff_graph.fs import AtomicDir

    names = encoder_io_names(model)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    external = n_params * 4 > EXTERNAL_DATA_THRESHOLD
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (EXAMPLE["batch"], EXAMPLE["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so the mask path is traced
    args = (ids, mask, torch.zeros_like(ids))[: len(names)]
    wrapper = _wrapper(model, names)
    with AtomicDir(out_dir, label="export") as tmp:
        t1 = time.perf_counter()
        _progress.checkpoint("export:trace")
        onnx_path = tmp / ONNX_FILENAME
        what = (f"export: {type(model).__name__} with {exporter} (opset {opset}, {config.num_hidden_layers} layers, "
                f"hidden {config.hidden_size}, {n_params / 1e6:.1f} M params)")
        run_exporter(what, source, exporter, opset,
                     lambda: _trace(wrapper, args, names, onnx_path, exporter, opset, external, config))
        if exporter == "torchscript":
            _consolidate_external(tmp, onnx_path, external)
        seconds_export = time.perf_counter() - t1
        _progress.checkpoint("export:write")
        tokenizer_saved = save_config_and_tokenizer(model, tokenizer, tmp)
        info = {
            "kind": "encoder",
            "exporter": exporter,
            "opset": opset,
            "source": source,
            "model_class": type(model).__name__,
            "model_type": config.model_type,
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "num_parameters": n_params,
            "external_data": external,
            "inputs": names,
            "outputs": ["last_hidden_state"],
            "tokenizer_saved": tokenizer_saved,
            "versions": {"torch": torch.__version__},
            "seconds": round(time.perf_counter() - t0, 3),
            "timings": {"load": round(seconds_load, 3), "export": round(seconds_export, 3)},
            "files": file_table(tmp),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    _progress.say(f"export: wrote {out_dir / ONNX_FILENAME} in {info['seconds']:.1f} s")
    return out_dir / ONNX_FILENAME


def _trace(wrapper, args, names: list[str], onnx_path: Path, exporter: str, opset: int, external: bool,
           config) -> None:
    import torch

    if exporter == "dynamo":
        longest = getattr(config, "max_position_embeddings", None) or 4096
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):
            longest -= (getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the pad id
        b = torch.export.Dim("batch_size", max=4096)
        s = torch.export.Dim("sequence_length", max=longest)
        dyn = (tuple({0: b, 1: s} for _ in names),)  # one entry: the wrapper takes *args
        dynamo_export(wrapper, args, onnx_path, input_names=names, output_names=["last_hidden_state"],
                      dynamic_shapes=dyn, opset=opset, external=external)
        return
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
    with quiet(), torch.no_grad():
        torch.onnx.export(wrapper, args, str(onnx_path), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
