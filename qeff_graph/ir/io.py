"""Load and save ONNX models on onnx_ir without reading weight bytes.

* :func:`load` parses the ModelProto and checks that every external-data file it references
  exists and is large enough; the weights themselves stay on disk (onnx_ir memory-maps them
  lazily when, and only when, something asks for their values).
  A location that leaves the model's folder (absolute, ``..``, or a symlink out) is refused.
* :func:`save` is atomic (:class:`qeff_graph.fs.AtomicDir`). Weights that already live in
  external data files keep their offsets but get the output's own file names
  (``model.onnx.data``, ``model.onnx.data1``, ...): each source file is cloned (a copy-on-write
  reflink where the filesystem has them, else a copy that keeps holes) or, with
  ``hardlink=True``, hard-linked, so rewriting a 13 GB model writes only the small graph —
  ``onnx.load`` and ``onnx.checker`` refuse hard-linked data files ("potential hardlink
  attack"); ONNX Runtime accepts them, and :func:`read_tensor` reads those qeff-graph made
  itself. New tensors go inline, or into a data file of their own when they add up to more
  than 64 MiB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qeff_graph.errors import QeffGraphError

__all__ = ["load", "save", "write_model_files", "weight_bytes", "external_files", "read_tensor"]

logger = logging.getLogger(__name__)

# In-memory weights above this total go to external data: keeps the proto far below protobuf's
# 2 GiB limit, and writing raw bytes is several times faster than serializing them in a proto.
INLINE_LIMIT_BYTES = 64 * 1024 * 1024
# Tensors at least this big go to external data when a model is externalized.
EXTERNAL_THRESHOLD_BYTES = 1024


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (a ``.onnx`` file or a directory holding ``model.onnx``).

    Raises :class:`QeffGraphError` with a one-line message for a missing file, a file that is
    not ONNX or is truncated, and missing or short external data files.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if (path / "model.onnx").exists():
            path = path / "model.onnx"
        elif len(candidates) == 1:
            path = candidates[0]
        else:
            raise QeffGraphError(
                f"{path} is a directory without a single .onnx file; pass the .onnx file itself"
            )
    if not path.exists():
        raise QeffGraphError(f"{path} does not exist; pass the path of an .onnx file")
    if path.stat().st_size == 0:
        raise QeffGraphError(f"{path} is empty; re-export the model")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises DecodeError, onnx_ir may raise others
        raise QeffGraphError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: "
            f"{type(exc).__name__}); re-export it or pass the right file"
        ) from None
    if not model.graph.outputs:
        raise QeffGraphError(f"{path} is not a readable ONNX model (its graph has no outputs)")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    sizes: dict[str, int] = {}
    folder = os.path.realpath(path.parent)
    for tensor in _external_tensors(model):
        file = os.path.join(tensor.base_dir, tensor.location)
        if file not in sizes:
            real = os.path.realpath(file)
            if os.path.isabs(tensor.location) or os.path.commonpath([folder, real]) != folder:
                raise QeffGraphError(
                    f"tensor {tensor.name!r} of {path} keeps its data at {tensor.location!r}, outside "
                    "the model's folder; qeff-graph reads data files only beside the .onnx: move "
                    "them there and fix the locations")
            if not os.path.exists(file):
                raise QeffGraphError(
                    f"external data file {tensor.location!r} referenced by tensor "
                    f"{tensor.name!r} is missing next to {path}; copy the .onnx together with "
                    "its data files"
                )
            sizes[file] = os.path.getsize(file)
        end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if end > sizes[file]:
            raise QeffGraphError(
                f"external data file {tensor.location!r} is too short for tensor "
                f"{tensor.name!r} (needs {end} bytes, has {sizes[file]}); the file is "
                "truncated: copy it again"
            )


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def read_tensor(tensor: ir.TensorProtocol) -> np.ndarray:
    """``tensor.numpy()``, with a one-line fix when its external data file is hard-linked.

    onnx and onnx_ir refuse to read external data from a file with several hard links (a guard
    against hard-link attacks), which is what ``--hardlink-data`` outputs and their sources are.
    """
    try:
        return tensor.numpy()
    except ValueError as exc:
        if not isinstance(tensor, ir.ExternalTensor) or "hard link" not in str(exc):
            raise
        path = os.path.join(tensor.base_dir, tensor.location)
        from qeff_graph.artifact import lists_file

        if lists_file(path):  # a weight file qeff-graph itself hard-linked between cache entries
            dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
            count = tensor.nbytes // dtype.itemsize
            array = np.fromfile(path, dtype=dtype, count=count, offset=tensor.offset or 0)
            return array.reshape(tuple(tensor.shape.numpy())).astype(dtype.newbyteorder("="))
        raise QeffGraphError(
            f"cannot read weight {tensor.name!r}: its data file {path} has "
            f"{os.stat(path).st_nlink} hard links, which onnx/onnx_ir refuse to read; make it a "
            f"plain copy (cp {path} {path}.tmp && mv {path}.tmp {path}) and retry"
        ) from None


def external_files(model: ir.Model) -> list[str]:
    """Absolute paths of the external data files the model references."""
    files = {os.path.join(t.base_dir, t.location) for t in _external_tensors(model)}
    return sorted(files)


def weight_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers, computed from dtype and shape (nothing is read)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def write_model_files(model: ir.Model, directory: str | os.PathLike, filename: str = "model.onnx",
                      *, hardlink: bool = False) -> dict[str, tuple[str, str]]:
    """Write ``model`` into ``directory`` (not atomic: use inside :class:`qeff_graph.fs.AtomicDir`).

    External tensors keep their offsets; each source data file still mostly used is cloned (or,
    with ``hardlink``, hard-linked) under the output's own name: ``<filename>.data`` for one
    file, ``<filename>.data<k>`` for several. In-memory tensors (and the used tensors of a data
    file the model now uses less than half of) are serialized inline unless they add up to
    more than :data:`INLINE_LIMIT_BYTES`; then those above 1 KiB go to a data file of their own.
    Returns ``{written data file name: (source path, "hardlink" | "copy")}``.
    """
    from qeff_graph.fs import link_or_clone

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    compact = _mostly_unused_files(model)
    sources = list(dict.fromkeys(_file_of(t) for t in _external_tensors(model) if _file_of(t) not in compact))
    names = {src: f"{filename}.data" if len(sources) == 1 else f"{filename}.data{k}"
             for k, src in enumerate(sources)}
    placed = {}
    for src, name in names.items():
        placed[name] = (src, link_or_clone(src, directory / name, hardlink=hardlink))

    restore: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        inline = []
        for g in model.graphs():
            for value in g.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if isinstance(tensor, ir.ExternalTensor) and _file_of(tensor) in names:
                    restore.append((value, tensor))
                    value.const_value = ir.ExternalTensor(
                        names[_file_of(tensor)], offset=tensor.offset, length=tensor.length,
                        dtype=tensor.dtype, shape=tensor.shape, name=tensor.name, base_dir=str(directory))
                else:
                    inline.append(value)
        if sum(v.const_value.nbytes for v in inline) > INLINE_LIMIT_BYTES:
            data_name = f"{filename}.data" if not names else f"{filename}.extra.data"
            restore += _externalize(inline, directory, data_name)
        for value in inline:  # left inline: weights from a compacted file are read in
            if isinstance(value.const_value, ir.ExternalTensor) and _file_of(value.const_value) in compact:
                restore.append((value, value.const_value))
                value.const_value = ir.Tensor(read_tensor(value.const_value), name=value.name)
        onnx.save_model(ir.to_proto(model), directory / filename)
    finally:
        for value, tensor in reversed(restore):
            value.const_value = tensor
    return placed


def _file_of(tensor: ir.ExternalTensor) -> str:
    return os.path.join(tensor.base_dir, tensor.location)


def _mostly_unused_files(model: ir.Model) -> set[str]:
    """External data files of which the model still uses less than half (e.g. after weight
    quantization replaced most tensors): their used tensors are rewritten, not the whole file."""
    used: dict[str, int] = {}
    for tensor in _external_tensors(model):
        used[_file_of(tensor)] = used.get(_file_of(tensor), 0) + tensor.nbytes
    return {f for f, n in used.items() if os.path.exists(f) and 2 * n < os.path.getsize(f)}


def _externalize(values: list[ir.Value], directory: Path, data_name: str) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    restore = []
    offset = 0
    with open(directory / data_name, "wb") as f:
        for value in values:
            tensor = value.const_value
            if tensor.nbytes < EXTERNAL_THRESHOLD_BYTES:
                continue
            pad = (-offset) % 64
            f.write(b"\0" * pad)
            offset += pad
            data = read_tensor(tensor).tobytes() if isinstance(tensor, ir.ExternalTensor) else tensor.tobytes()
            f.write(data)
            ext = ir.ExternalTensor(
                data_name,
                offset=offset,
                length=len(data),
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=str(directory),
            )
            offset += len(data)
            restore.append((value, tensor))
            value.const_value = ext
    return restore


def _replaceable(directory: Path) -> bool:
    """An empty folder, an earlier :func:`save` (only ``model.onnx*``) or a qeff-graph program."""
    entries = [p.name for p in directory.iterdir()]
    return all(n.startswith("model.onnx") for n in entries) or "qeff_graph.json" in entries


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Save ``model``: every file appears whole (temp beside it, fsync, rename).

    ``path`` ending in ``.onnx`` names the file (its folder receives the data files, which are
    moved in before the graph); otherwise ``path`` is a folder that will hold ``model.onnx``,
    written as one :class:`~qeff_graph.fs.AtomicDir` (a folder holding anything but an earlier
    save or a program is refused). Returns the .onnx path.
    """
    from qeff_graph.fs import AtomicDir, TempDir, fsync_dir, fsync_file

    path = Path(path)
    if path.suffix == ".onnx":
        directory, filename = path.parent, path.name
        with TempDir(path) as tmp:
            write_model_files(model, tmp, filename)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == filename):  # the graph last
                fsync_file(entry)
                os.replace(entry, directory / entry.name)
            fsync_dir(directory)
        return path
    if path.is_dir() and not _replaceable(path):
        raise QeffGraphError(f"{path} holds files other than a saved model; save into a new or empty folder")
    with AtomicDir(path) as tmp:
        write_model_files(model, tmp)
    return path / "model.onnx"
