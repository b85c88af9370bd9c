"""File-system writes of a run, and their failures as one line.

Every file zohpc writes into a run directory appears whole or not at all: it is written
under a temporary name in the same directory, flushed, fsynced and renamed, and the
temporary is removed when anything fails (a full disk, a read-only mount, a path through a
regular file). An OSError there becomes a :class:`FileSystemError`: one line naming the
path, what was being done, and the errno, reported like any user error (exit 2; 75 when
a stop is already in progress, see ``zohpc.train``).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from .errors import ConfigError, UserError


class FileSystemError(UserError):
    """A file-system operation on the run directory or a checkpoint failed (path + errno)."""

    def __init__(self, what: str, path: str, exc: OSError):
        code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "no errno"
        reason = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(f"cannot {what} {path}: {reason} ({code})")
        self.path, self.errno = path, exc.errno


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse it)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str) -> str:
    """Where ``path`` is written before its rename: hidden, in the same directory, per process."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str, what: str = "write"):
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    On any failure the temporary is removed; an OSError becomes a FileSystemError naming
    ``path``. (The writer closes its own file before the block ends.)
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise FileSystemError(what, path, exc) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_atomic(path: str, data: str | bytes, what: str = "write") -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)


def make_dirs(path: str, what: str = "create directory") -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise FileSystemError(what, path, exc) from None


def append_line(path: str, line: str) -> None:
    """Append one ``\\n``-terminated line in one write; a cut last line (a crash in the middle
    of an earlier append) is removed first, so every line of the file stays a whole record."""
    raw = line.encode() if line.endswith("\n") else (line + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _drop_cut_line(fd)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise FileSystemError("append to", path, exc) from None


def _drop_cut_line(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 20))
    tail = os.pread(fd, size - start, start)
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, start + cut + 1 if cut >= 0 else start if start else 0)


def check_new_file(path: str, option: str, force: bool = False, keep: tuple = ()) -> None:
    """Refuse to write ``path`` over a file the user already has (unless ``force``) or over
    one of the inputs ``keep`` (never): a one-line ConfigError naming ``option``."""
    if not path or os.path.isdir(path):
        raise ConfigError(f"{option} '{path}': must name a file, not a directory")
    for src in keep:
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise ConfigError(f"{option} '{path}': is the input {src} itself (write elsewhere)")
    if os.path.exists(path) and not force:
        raise ConfigError(f"{option} '{path}': exists (pass --force to replace it)")
