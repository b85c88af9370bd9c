"""zohpc's own data file: pixels as stored plus their normalization, written atomically, verified on read."""

from __future__ import annotations

import os

import numpy as np

from ..errors import CheckpointError, DataError, one_line
from .splits import RawData, check_raw

FORMAT_NAME = "zohpc-data"
FORMAT_VERSION = 1


def resolve_h5_path(path: str) -> str:
    """A ``.h5`` file, or a directory holding ``data.h5``."""
    if not path:
        raise DataError("config key 'data.dir': required for hdf5 (a .h5 file or a directory with data.h5)")
    if os.path.isdir(path):
        candidate = os.path.join(path, "data.h5")
        if not os.path.isfile(candidate):
            raise DataError(f"{candidate}: missing zohpc data file (data.dir is a directory without data.h5)")
        return candidate
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    return path


def load_hdf5_raw(path: str) -> RawData:
    """A file written by :func:`write_hdf5`; checksums verified, shapes and labels checked."""
    from ..h5util import attr_str, open_verified, read_array

    path = resolve_h5_path(path)
    try:
        fh = open_verified(path, FORMAT_NAME, FORMAT_VERSION)
    except CheckpointError as exc:
        raise DataError(str(exc)) from None
    try:
        with fh:
            name = attr_str(fh, "name", path) if "name" in fh.attrs else "hdf5"
            if "num_classes" not in fh.attrs:
                raise DataError(f"{path}: attribute 'num_classes' missing")
            num_classes = int(fh.attrs["num_classes"])
            arrays = {}
            for part in ("train", "test"):
                if part not in fh:
                    raise DataError(f"{path}: group '{part}' missing")
                for key in ("x", "y"):
                    arrays[f"{part}_{key}"] = read_array(fh[part], key, path)
            mean = read_array(fh, "mean", path) if "mean" in fh else None
            std = read_array(fh, "std", path) if "std" in fh else None
    except CheckpointError as exc:
        raise DataError(str(exc)) from None
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: corrupted zohpc data file ({one_line(exc)})") from None
    raw = RawData(name, arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                  num_classes, mean, std, source=path)
    check_raw(raw)
    return raw


def write_hdf5(raw: RawData, path: str) -> None:
    """Write ``raw`` atomically in the zohpc-data format (pixels as stored, plus mean/std)."""
    from ..h5util import atomic_h5, write_array

    check_raw(raw)
    with atomic_h5(path, FORMAT_NAME, FORMAT_VERSION) as fh:
        fh.attrs["name"] = raw.name
        fh.attrs["num_classes"] = int(raw.num_classes)
        fh.attrs["input_shape"] = np.asarray(raw.train_x.shape[1:], dtype=np.int64)
        for part in ("train", "test"):
            group = fh.create_group(part)
            write_array(group, "x", np.ascontiguousarray(getattr(raw, f"{part}_x")))
            write_array(group, "y", np.ascontiguousarray(getattr(raw, f"{part}_y")).astype(np.int64))
        if raw.mean is not None:
            write_array(fh, "mean", np.asarray(raw.mean, dtype=np.float64))
            write_array(fh, "std", np.asarray(raw.std, dtype=np.float64))
