"""Writing files so that they appear whole or not at all, and cleaning up after killed runs.

Every artifact qeff-graph writes goes through this module:

* :func:`write_atomic` — one file: a temp file beside the target, fsync, one rename, fsync of
  the folder.
* :class:`AtomicDir` — one folder (a program, an export): built in ``.<name>.tmp-XXXXXXXX``
  beside the target, every file fsynced, then swapped in with one ``renameat2(RENAME_EXCHANGE)``
  (an existing target is replaced in one step; where the filesystem cannot exchange, two
  renames). The builder holds an exclusive ``flock`` on the temp folder for its lifetime (the
  kernel drops it when the process dies, however it dies), so :func:`sweep_stale` tells the
  leftovers of a dead process (lock free) from a running build (lock held) and removes only
  the former. Nothing else is ever deleted: only folders of this exact name pattern, which
  qeff-graph alone creates.
* :func:`clone_file` — a copy-on-write reflink where the filesystem has them, else a copy that
  keeps holes, with a plain read/write fallback across filesystems; the copy never gets wider
  permissions than its source.
* :func:`handle_termination` — SIGTERM raises :class:`Terminated` (a ``BaseException``), so the
  cleanup of an :class:`AtomicDir` runs on ``kill`` as it does on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

from qeff_graph.errors import QeffGraphError

__all__ = ["AtomicDir", "TempDir", "Terminated", "clone_file", "fsync_dir", "fsync_file", "handle_termination", "link_or_clone",
           "iter_files", "sweep_stale", "write_atomic", "check_writable_target"]

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}$")
_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, xfs, ...)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by :func:`handle_termination`)."""

    exit_code = 143


def handle_termination() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (cleanup handlers then run)."""

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM kills at once
        raise Terminated()

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, raise_terminated)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_error(parent: Path, exc: OSError) -> QeffGraphError:
    return QeffGraphError(f"cannot write to {parent} ({exc.strerror}); choose a writable output directory")


def write_atomic(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temp beside it, fsync, rename).

    The parent folder must exist (a missing one is a one-line error, as is an unwritable one).
    ``mode`` defaults to what ``open()`` would give a new file (``0o666 & ~umask``).
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    except OSError as exc:
        raise QeffGraphError(f"cannot write {path} ({exc.strerror}); choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise QeffGraphError(f"cannot write {path} ({exc.strerror}); nothing was changed") from None
        raise
    fsync_dir(path.parent)
    return path


def check_writable_target(path: str | os.PathLike, what: str) -> Path:
    """Fail now (one line) if ``path`` cannot be written later: missing or unwritable folder,
    or ``path`` itself a folder. Nothing is created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise QeffGraphError(f"{what} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise QeffGraphError(f"{what} {path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QeffGraphError(f"{what} {path}: folder {parent} is not writable; choose another path")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class TempDir:
    """A locked temp folder ``.<name>.tmp-XXXXXXXX`` beside ``target``, always removed on exit
    (or by :func:`sweep_stale` after a kill). ``mode``: its permission bits (default
    ``0o777 & ~umask``); ``label`` names its progress checkpoints."""

    def __init__(self, target: str | os.PathLike, *, mode: int | None = None, label: str = "dir"):
        self.target = Path(os.path.abspath(target))
        self.mode = mode
        self.label = label  # names the progress checkpoints: "<label>:rename", "<label>:renamed"
        self.tmp: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> Path:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _mkdir_error(parent, exc) from None
        sweep_stale(parent)
        for _ in range(16):
            tmp = parent / f".{self.target.name}.tmp-{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp, 0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _mkdir_error(parent, exc) from None
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until exit: tells a running build from a dead one
            try:
                same = os.stat(tmp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # a sweeper took it for stale between mkdir and flock
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover
            raise QeffGraphError(f"cannot create a temporary folder in {parent}")
        self.tmp, self._lock_fd = tmp, fd
        try:
            os.chmod(tmp, self.mode if self.mode is not None else 0o777 & ~_umask())
        except OSError as exc:
            self.__exit__(None, None, None)
            raise _mkdir_error(parent, exc) from None
        return tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class AtomicDir(TempDir):
    """Build a folder beside ``target`` and swap it in whole; see the module docstring.

    ``with AtomicDir(target) as tmp: ...write into tmp...`` — on success ``target`` is the new
    folder (an existing one is replaced in one step); on any exception (Ctrl-C and SIGTERM
    included) the temp folder is removed and ``target`` is untouched.
    """

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            super().__exit__(exc_type, exc, tb)

    def _commit(self) -> None:
        from qeff_graph import progress

        tmp, target = self.tmp, self.target
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(os.path.join(root, name))
            fsync_dir(root)
        progress.checkpoint(f"{self.label}:rename")
        if target.exists() or target.is_symlink():
            if not target.is_dir() or target.is_symlink():
                raise QeffGraphError(f"{target} exists and is not a directory; choose another output path")
            if not _exchange(tmp, target):
                old = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
                os.rename(target, old)  # swept as a leftover if we die before the next line
                os.rename(tmp, target)
                tmp = self.tmp = old
            progress.checkpoint(f"{self.label}:renamed")
            # tmp now holds the previous folder; __exit__ removes it
        else:
            os.rename(tmp, target)
            self.tmp = None
        fsync_dir(target.parent)


def sweep_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-XXXXXXXX`` folders in ``parent`` that no live process holds
    (their builder was killed). Returns what was removed."""
    parent = Path(parent)
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if _TMP.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone, or not a folder: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # held: a running build
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def clone_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` (new file): reflink if possible, else a hole-preserving copy.

    Works across filesystems (``copy_file_range`` falls back to read/write). ``dst`` gets the
    source's permission bits narrowed by the umask: a copy is never more open than its source.
    """
    mode = stat.S_IMODE(os.stat(src).st_mode) & ~_umask() & 0o666
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode | 0o600)
        with os.fdopen(fd, "wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            except OSError:
                _copy_sparse(fin.fileno(), fout.fileno())
    os.chmod(dst, mode | 0o600)


def _copy_sparse(fin: int, fout: int) -> None:
    size = os.fstat(fin).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fin, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fin, start, os.SEEK_HOLE)
        _copy_range(fin, fout, start, end - start)
        offset = end
    os.ftruncate(fout, size)


def _copy_range(fin: int, fout: int, start: int, length: int) -> None:
    os.lseek(fin, start, os.SEEK_SET)
    os.lseek(fout, start, os.SEEK_SET)
    left = length
    while left > 0:
        try:
            n = os.copy_file_range(fin, fout, min(left, 1 << 30))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # across filesystems (or nothing copied): plain read/write
            while left > 0:
                block = os.read(fin, min(left, 1 << 24))
                if not block:
                    return
                os.write(fout, block)
                left -= len(block)
            return
        left -= n


def link_or_clone(src: str | os.PathLike, dst: str | os.PathLike, *, hardlink: bool) -> str:
    """Put ``src`` at ``dst``: a hard link when asked and possible, else :func:`clone_file`.
    Returns ``"hardlink"`` or ``"copy"``."""
    if hardlink:
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    clone_file(src, dst)
    return "copy"


def iter_files(directory: str | os.PathLike) -> Iterator[Path]:
    """Every regular file under ``directory`` (relative paths, sorted)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path.relative_to(directory)
