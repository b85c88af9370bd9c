"""HDF5 conventions shared by checkpoints, mask files and data files.

Every file is written to a temporary name in the target directory, flushed, sealed with a
whole-file SHA-256 trailer, fsynced and renamed, so a reader never sees a partial file.
The trailer is checked before HDF5 opens a file: the HDF5 library can crash the process
(not raise) on some damaged metadata. Every dataset carries a fletcher32 filter
(checked by HDF5 on read) and a SHA-256 attribute of its bytes (checked by us), and the
root carries ``format``, ``format_version`` and a ``complete`` flag written last.
Nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager

import h5py
import numpy as np

from .errors import CheckpointError


TRAILER_PREFIX = b"\nzohpc-sha256:"
TRAILER_SIZE = len(TRAILER_PREFIX) + 64 + 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _file_sha256(fh, length: int) -> str:
    digest = hashlib.sha256()
    remaining = length
    while remaining > 0:
        block = fh.read(min(remaining, 1 << 22))
        if not block:
            break
        digest.update(block)
        remaining -= len(block)
    return digest.hexdigest()


def append_trailer(path: str) -> None:
    """Append the whole-file SHA-256 trailer to a finished HDF5 file and fsync it."""
    with open(path, "rb+") as fh:
        size = os.fstat(fh.fileno()).st_size
        hexdigest = _file_sha256(fh, size)
        fh.seek(size)
        fh.write(TRAILER_PREFIX + hexdigest.encode("ascii") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def verify_trailer(path: str, format_name: str) -> None:
    """Check the trailer before any HDF5 call; CheckpointError names the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if size == 0:
                raise CheckpointError(f"{path}: empty file")
            if head != HDF5_SIGNATURE:
                raise CheckpointError(f"{path}: not an HDF5 file")
            trailer = b""
            if size >= TRAILER_SIZE:
                fh.seek(size - TRAILER_SIZE)
                trailer = fh.read(TRAILER_SIZE)
            if not (trailer.startswith(TRAILER_PREFIX) and trailer.endswith(b"\n")):
                _diagnose_no_trailer(path, format_name)
            expected = trailer[len(TRAILER_PREFIX):-1]
            fh.seek(0)
            actual = _file_sha256(fh, size - TRAILER_SIZE).encode("ascii")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if actual != expected:
        raise CheckpointError(f"{path}: checksum mismatch (corrupted file)")


def _diagnose_no_trailer(path: str, format_name: str) -> None:
    """No trailer: a foreign HDF5 file, or one of ours cut short. Both end in CheckpointError.

    Only an intact file can lack a trailer and still open, so asking HDF5 is safe here:
    a truncated file fails its end-of-file check cleanly.
    """
    try:
        with h5py.File(path, "r") as fh:
            found = fh.attrs.get("format", "")
            found = found.decode() if isinstance(found, bytes) else str(found)
    except Exception:  # noqa: BLE001 - any failure means damaged
        raise CheckpointError(f"{path}: truncated or damaged HDF5 file (checksum trailer missing)") from None
    if found != format_name:
        raise CheckpointError(f"{path}: not a {format_name} file (format attribute is {found or 'missing'!r})")
    raise CheckpointError(f"{path}: truncated or damaged {format_name} (checksum trailer missing)")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_array(group: h5py.Group, name: str, array) -> h5py.Dataset:
    """Store ``array`` with fletcher32 (when chunkable) and a SHA-256 attribute."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        stored = array.astype(np.uint8)
    else:
        stored = array
    kwargs = {"fletcher32": True, "chunks": True} if stored.ndim > 0 and stored.size > 0 else {}
    ds = group.create_dataset(name, data=stored, **kwargs)
    ds.attrs["sha256"] = _digest(stored)
    ds.attrs["bool"] = bool(array.dtype == np.bool_)
    return ds


def read_array(group: h5py.Group, name: str, path: str = "") -> np.ndarray:
    """Read a dataset written by :func:`write_array` and verify its checksum."""
    where = f"{path}:{group.name.rstrip('/')}/{name}"
    if name not in group:
        raise CheckpointError(f"{where}: dataset missing (incomplete file)")
    ds = group[name]
    try:
        data = ds[()]
    except OSError as exc:  # fletcher32 or low-level read failure
        raise CheckpointError(f"{where}: unreadable or corrupted ({exc})") from None
    data = np.asarray(data)
    expected = ds.attrs.get("sha256")
    if expected is None or _digest(data) != (expected.decode() if isinstance(expected, bytes) else expected):
        raise CheckpointError(f"{where}: checksum mismatch (corrupted file)")
    if bool(ds.attrs.get("bool", False)):
        data = data.astype(np.bool_)
    return data


def fsync_dir(directory: str) -> None:
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


@contextmanager
def atomic_h5(path: str, format_name: str, format_version: int):
    """Yield an open HDF5 file that appears at ``path`` only once fully written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = format_name
            fh.attrs["format_version"] = int(format_version)
            fh.attrs["complete"] = False
            yield fh
            fh.attrs["complete"] = True
            fh.flush()
        append_trailer(tmp)  # whole-file SHA-256, fsynced, before the file gets its real name
        os.replace(tmp, path)
        fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_verified(path: str, format_name: str, max_version: int) -> h5py.File:
    """Open ``path`` read-only after checking it is a complete zohpc file of the given format."""
    verify_trailer(path, format_name)  # before HDF5 touches a possibly damaged file
    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise CheckpointError(f"{path}: not an HDF5 file, or truncated") from None
    try:
        found = _attr_str(fh.attrs.get("format", ""))
        if found != format_name:
            raise CheckpointError(f"{path}: not a {format_name} file (format attribute is {found or 'missing'!r})")
        version = int(fh.attrs.get("format_version", -1))
        if not 1 <= version <= max_version:
            raise CheckpointError(f"{path}: {format_name} format version {version} is not supported (this zohpc reads 1..{max_version})")
        if not bool(fh.attrs.get("complete", False)):
            raise CheckpointError(f"{path}: incomplete file (writer did not finish)")
    except CheckpointError:
        fh.close()
        raise
    except Exception as exc:  # damaged metadata reads as a corrupted file
        fh.close()
        raise CheckpointError(f"{path}: corrupted file ({exc})") from None
    return fh


def attr_str(obj, key: str, path: str = "") -> str:
    if key not in obj.attrs:
        raise CheckpointError(f"{path}: attribute '{key}' missing (incomplete file)")
    return _attr_str(obj.attrs[key])
