"""CIFAR-10 from its binary or python distribution, each batch checked before use."""

from __future__ import annotations

import os

import numpy as np

from ..errors import DataError
from .safe_pickle import restricted_load
from .splits import RawData

# Per-channel mean/std of the CIFAR-10 training set for pixels scaled to [0, 1]
# (the population std; the often-quoted 0.2023/0.1994/0.2010 is a mistaken per-image value).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_layout(directory: str) -> tuple[str, str]:
    """``("bin" | "py", folder)`` for ``directory`` being the parent or the batches folder."""
    if not directory:
        raise DataError("config key 'data.dir': required for cifar10")
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: CIFAR-10 directory does not exist")
    for folder in (directory, os.path.join(directory, "cifar-10-batches-bin"),
                   os.path.join(directory, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "data_batch_1.bin")):
            return "bin", folder
        if os.path.isfile(os.path.join(folder, "data_batch_1")):
            return "py", folder
    raise DataError(f"{directory}: no CIFAR-10 batches found (expected data_batch_1.bin or data_batch_1, "
                    "here or in cifar-10-batches-bin/ or cifar-10-batches-py/)")


def _read_cifar_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing CIFAR-10 batch file")
    with open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DataError(f"{path}: size {len(raw)} bytes is not a positive multiple of the "
                        f"{CIFAR_RECORD}-byte CIFAR-10 record (truncated or not a CIFAR-10 binary batch)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0..9 (not a CIFAR-10 binary batch)")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _read_cifar_py(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing CIFAR-10 batch file")
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")

    def get(key):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise DataError(f"{path}: key '{key}' missing (not a CIFAR-10 python batch)")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001 - any odd object is a format error
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"{path}: labels must lie in 0..9, found {int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def load_cifar10_raw(directory: str) -> RawData:
    """CIFAR-10 from the binary or the python distribution (parent dir or batches folder)."""
    kind, folder = _cifar_layout(directory)
    suffix, reader = (".bin", _read_cifar_bin) if kind == "bin" else ("", _read_cifar_py)
    parts = [reader(os.path.join(folder, f"data_batch_{i}{suffix}")) for i in range(1, 6)]
    test_x, test_y = reader(os.path.join(folder, f"test_batch{suffix}"))
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    mean = np.array(CIFAR10_MEAN) * 255.0
    std = np.array(CIFAR10_STD) * 255.0
    return RawData("cifar10", train_x, train_y, test_x, test_y, 10, mean, std, source=folder)
