"""Load and save ONNX models on onnx_ir without reading weight bytes.

* :func:`load` parses the ModelProto and checks that every external-data file it references
  exists and is large enough; the weights themselves stay on disk (onnx_ir memory-maps them
  lazily when, and only when, something asks for their values).
* :func:`save` is atomic: it writes into a temporary directory beside the target and renames.
  Weights that already live in external data files are cloned into the new directory under
  the same relative name and offsets: a copy-on-write reflink where the filesystem has them,
  else a copy that keeps holes (sparse files stay sparse). ``hardlink=True`` hard-links them
  instead, so rewriting a 13 GB model writes only the small graph — but ``onnx.load`` and
  ``onnx.checker`` refuse hard-linked data files ("potential hardlink attack"); ONNX Runtime
  and onnx_ir accept them. New tensors go inline, or into ``<name>.data`` when they add up
  to more than 64 MiB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qeff_graph.errors import QeffGraphError

__all__ = ["load", "save", "atomic_dir", "write_model_files", "weight_bytes", "external_files", "read_tensor"]

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
    for tensor in _external_tensors(model):
        file = os.path.join(tensor.base_dir, tensor.location)
        if file not in sizes:
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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target).absolute()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a program dir is an ordinary dir
    except OSError as exc:
        raise QeffGraphError(
            f"cannot write to {parent} ({exc.strerror}); choose a writable output directory"
        ) from None
    try:
        yield tmp
        backup = None
        if target.exists():
            if not target.is_dir():
                raise QeffGraphError(f"{target} exists and is not a directory; pick another -o")
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            backup.rmdir()
            os.rename(target, backup)
        os.rename(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, xfs, ...)


def clone_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst``: a reflink if the filesystem can, else a hole-preserving copy."""
    import fcntl

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            os.lseek(fin.fileno(), start, os.SEEK_SET)
            os.lseek(fout.fileno(), start, os.SEEK_SET)
            left = end - start
            while left > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
            offset = end
        fout.truncate(size)


def _place(src: str, dst: str, hardlink: bool) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if hardlink:
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            logger.warning("cannot hard-link %s into %s (%s): copying %.1f MiB; put the output on "
                           "the same filesystem as the model to avoid this", src,
                           os.path.dirname(dst), exc.strerror, os.path.getsize(src) / 2**20)
    clone_file(src, dst)


def write_model_files(model: ir.Model, directory: str | os.PathLike, filename: str = "model.onnx",
                      *, hardlink: bool = False) -> Path:
    """Write ``model`` into ``directory`` (not atomic; use inside :func:`atomic_dir`).

    External tensors keep their file name and offsets; their files are cloned (or, with
    ``hardlink``, hard-linked) into ``directory``. In-memory tensors are serialized inline unless they add up to more than
    :data:`INLINE_LIMIT_BYTES`, in which case those above 1 KiB go to ``<filename>.data``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / filename

    compact = _mostly_unused_files(model)
    linked: set[str] = set()
    for tensor in _external_tensors(model):
        src = os.path.join(tensor.base_dir, tensor.location)
        dst = str(directory / tensor.location)
        if src in compact:
            continue
        if dst not in linked and os.path.abspath(src) != os.path.abspath(dst):
            _place(src, dst, hardlink)
        linked.add(dst)

    inline = [
        v
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and (not isinstance(v.const_value, ir.ExternalTensor)
                                          or _file_of(v.const_value) in compact)
    ]
    inline_total = sum(v.const_value.nbytes for v in inline)
    restore: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        if inline_total > INLINE_LIMIT_BYTES:
            data_name = f"{filename}.data"
            if str(directory / data_name) in linked:
                data_name = f"{filename}.extra.data"
            restore = _externalize(inline, directory, data_name)
        for value in inline:  # left inline: weights from a compacted file are read in
            if isinstance(value.const_value, ir.ExternalTensor) and _file_of(value.const_value) in compact:
                restore.append((value, value.const_value))
                value.const_value = ir.Tensor(read_tensor(value.const_value), name=value.name)
        proto = ir.to_proto(model)
        onnx.save_model(proto, onnx_path)
    finally:
        for value, tensor in restore:
            value.const_value = tensor
    return onnx_path


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


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Atomically save ``model``.

    ``path`` ending in ``.onnx`` names the file (its directory receives the data files);
    otherwise ``path`` is a directory that will hold ``model.onnx``. Returns the .onnx path.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        directory, filename = path.parent, path.name
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{filename}.tmp-", dir=directory) as tmp:
            write_model_files(model, tmp, filename)
            for entry in sorted(Path(tmp).iterdir()):
                os.replace(entry, directory / entry.name)
        return path
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp)
    return path / "model.onnx"
