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

import errno
import hashlib
import os
from contextlib import contextmanager

import h5py
import numpy as np

from .errors import CheckpointError
from .fsio import atomic_path, fsync_dir, make_dirs  # noqa: F401 - fsync_dir re-exported


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
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{where}: not a dataset")
    check_declared_size(ds, where, path)
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


def declared_bytes(ds: h5py.Dataset) -> int:
    """Bytes a full read of ``ds`` allocates, from its declared shape and dtype (reads nothing)."""
    shape = ds.shape if ds.shape is not None else ()
    return int(np.prod(shape, dtype=np.float64)) * ds.dtype.itemsize


def check_declared_size(ds: h5py.Dataset, where: str, path: str = "") -> None:
    """Refuse, before reading, a dataset that declares more bytes than the file holds or than
    it stores (an unwritten dataset reads back as fill values: a memory bomb in a tiny file)."""
    nbytes = declared_bytes(ds)
    limit = os.path.getsize(path) if path and os.path.isfile(path) else None
    if limit is not None and nbytes > limit:
        raise CheckpointError(f"{where}: declares {nbytes} bytes, more than the whole file ({limit}; corrupted "
                              f"or crafted)")
    if nbytes and ds.dtype.kind != "O" and ds.id.get_storage_size() < nbytes:
        raise CheckpointError(f"{where}: declares {nbytes} bytes but stores {ds.id.get_storage_size()} "
                              f"(corrupted or crafted)")


MAX_OBJECTS = 1_000_000


def check_structure(fh: h5py.File, path: str) -> None:
    """Refuse anything that would make HDF5 read outside the verified file, before any link is
    followed: soft, external and user-defined links, an object reachable by two hard links,
    datasets with external raw storage or a virtual layout. One CheckpointError line naming
    the file and the object."""
    from h5py import h5d, h5l, h5o

    count = 0

    def walk(gid, where: str) -> None:
        nonlocal count
        names: list[bytes] = []
        gid.links.iterate(names.append)  # link names only: nothing is followed
        count += len(names)
        if count > MAX_OBJECTS:
            raise CheckpointError(f"{path}: more than {MAX_OBJECTS} HDF5 objects (crafted file)")
        for raw in names:
            full = f"{where.rstrip('/')}/{raw.decode('utf-8', 'replace')}"
            kind = gid.links.get_info(raw).type
            if kind != h5l.TYPE_HARD:
                what = {h5l.TYPE_SOFT: "a soft link", h5l.TYPE_EXTERNAL: "an external link"}.get(kind, "a link")
                raise CheckpointError(f"{path}:{full}: is {what}; links are refused (crafted file)")
            oid = h5o.open(gid, raw)
            info = h5o.get_info(oid)
            if info.rc != 1:
                raise CheckpointError(f"{path}:{full}: object has {info.rc} hard links; links are refused "
                                      f"(crafted file)")
            if info.type == h5o.TYPE_GROUP:
                walk(oid, full)
            elif info.type == h5o.TYPE_DATASET:
                dcpl = oid.get_create_plist()
                if dcpl.get_layout() == h5d.VIRTUAL or dcpl.get_external_count() > 0:
                    raise CheckpointError(f"{path}:{full}: data stored outside the file (virtual or external "
                                          f"dataset); refused (crafted file)")
            else:
                raise CheckpointError(f"{path}:{full}: unexpected HDF5 object (crafted file)")

    walk(fh.id, "/")


@contextmanager
def atomic_h5(path: str, format_name: str, format_version: int, in_memory: bool = False):
    """Yield an open HDF5 file that appears at ``path`` only once fully written.

    A failure while writing (a full disk, an unwritable directory) removes the temporary
    and raises a one-line FileSystemError naming ``path``; the previous file is untouched.
    ``in_memory`` (checkpoints, mask files): HDF5 builds the file in memory and plain
    writes put it on disk, so a full disk is an ordinary OSError and never reaches the
    HDF5 library (which reports it as assorted errors, also from object destructors, and
    can crash at exit).
    """
    directory = os.path.dirname(os.path.abspath(path))
    make_dirs(directory)
    with atomic_path(path, "write") as tmp:
        if in_memory:
            fh = h5py.File(f"{tmp}.core", "w", driver="core", backing_store=False)
            try:
                _begin(fh, format_name, format_version)
                yield fh
                fh.attrs["complete"] = True
                fh.flush()
                image = fh.id.get_file_image()
            finally:
                fh.close()
            digest = hashlib.sha256(image).hexdigest()
            with open(tmp, "wb") as out:
                out.write(image)
                out.write(TRAILER_PREFIX + digest.encode("ascii") + b"\n")
            return
        fh = None
        try:
            fh = h5py.File(tmp, "w")
            _begin(fh, format_name, format_version)
            yield fh
            fh.attrs["complete"] = True
            fh.flush()
            fh.close()
            fh = None
            append_trailer(tmp)  # whole-file SHA-256, fsynced, before the file gets its real name
        except OSError:
            raise
        except (RuntimeError, ValueError, KeyError) as exc:
            # HDF5 reports a failed write (ENOSPC, EIO) as assorted errors; the file system
            # says which it was
            failure = _storage_failure(directory)
            if failure is None:
                raise
            raise failure from exc
        finally:
            if fh is not None:
                try:
                    fh.close()
                except Exception:  # noqa: BLE001 - the file is being discarded
                    pass


def _begin(fh, format_name: str, format_version: int) -> None:
    fh.attrs["format"] = format_name
    fh.attrs["format_version"] = int(format_version)
    fh.attrs["complete"] = False


def _storage_failure(directory: str) -> OSError | None:
    """An OSError describing why writing in ``directory`` fails now (full, read-only), or None."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return exc
    if st.f_bavail == 0 or (st.f_favail == 0 and st.f_files > 0):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    return None


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
        check_structure(fh, path)  # before anything in the file is followed or read
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
