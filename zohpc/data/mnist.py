"""MNIST-format IDX files (also Fashion-MNIST), plain or gzipped, checked against their headers."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from ..errors import DataError, one_line
from .splits import RawData

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _find_idx(directory: str, base: str) -> str:
    """``base`` or ``base.gz`` (also the ``base.idx3`` spelling) in the dir, ``raw/`` or ``MNIST/raw/``."""
    names = [base, base.replace("-idx", ".idx")]
    for folder in (directory, os.path.join(directory, "raw"), os.path.join(directory, "MNIST", "raw")):
        for name in names:
            for candidate in (name, name + ".gz"):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    return path
    raise DataError(f"{os.path.join(directory, base)}: missing MNIST file (looked for {base} and {base}.gz)")


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as an array of its declared dims."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: unreadable or truncated gzip ({one_line(exc)})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found = struct.unpack(">i", raw[:4])[0]
    if found != magic:
        raise DataError(f"{path}: wrong magic number {found} (expected {magic}; not an IDX "
                        f"{'image' if magic == IDX_IMAGES_MAGIC else 'label'} file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimension in IDX header {dims}")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path}: size {len(raw)} bytes does not match the header dims {tuple(dims)} "
                        f"(expected {expected}; truncated or corrupted)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def load_mnist_raw(directory: str) -> RawData:
    """MNIST-format IDX files (also fits Fashion-MNIST); normalized with the train mean/std."""
    if not directory:
        raise DataError("config key 'data.dir': required for mnist")
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: MNIST directory does not exist")
    paths = {key: _find_idx(directory, base) for key, base in MNIST_FILES.items()}
    arrays = {}
    for key, path in paths.items():
        is_images = key.endswith("_x")
        arr = read_idx(path, IDX_IMAGES_MAGIC if is_images else IDX_LABELS_MAGIC)
        if is_images and (arr.ndim != 3 or arr.shape[1] < 1 or arr.shape[2] < 1):
            raise DataError(f"{path}: image file must have 3 dims (N, rows, cols), got {arr.shape}")
        if not is_images and arr.ndim != 1:
            raise DataError(f"{path}: label file must have 1 dim, got {arr.shape}")
        arrays[key] = arr
    for part in ("train", "test"):
        nx, ny = arrays[f"{part}_x"].shape[0], arrays[f"{part}_y"].shape[0]
        if nx != ny:
            raise DataError(f"{paths[f'{part}_y']}: {ny} labels but {paths[f'{part}_x']} has {nx} images")
        if ny == 0:
            raise DataError(f"{paths[f'{part}_y']}: no examples")
        if arrays[f"{part}_y"].max() >= 10:
            raise DataError(f"{paths[f'{part}_y']}: label {int(arrays[f'{part}_y'].max())} out of range 0..9")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"{paths['test_x']}: image size {arrays['test_x'].shape[1:]} differs from "
                        f"{paths['train_x']} {arrays['train_x'].shape[1:]}")
    train_x = arrays["train_x"][:, None, :, :]
    mean = float(train_x.mean(dtype=np.float64))
    std = float(train_x.std(dtype=np.float64)) or 1.0
    return RawData("mnist", train_x, arrays["train_y"].astype(np.int64), arrays["test_x"][:, None, :, :],
                   arrays["test_y"].astype(np.int64), 10, np.array([mean]), np.array([std]), source=directory)
