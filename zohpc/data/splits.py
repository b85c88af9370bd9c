"""The two shapes a dataset takes: :class:`RawData` as stored, :class:`DataSplits` as trained on.

Every loader returns :class:`RawData` (integer pixels plus the normalization to apply) and
:func:`normalize` is the one place that checks it and turns it into float32 tensors, so the
rest of zohpc never looks at file formats and the HDF5 converter can store compact pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass
class DataSplits:
    """A dataset ready for training: normalized float32 images and int64 labels."""

    name: str
    train_x: torch.Tensor  # float32 (N, C, H, W), normalized
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple  # (C, H, W)

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])


@dataclass
class RawData:
    """Pixels as stored (uint8 or float) plus the per-channel normalization to apply.

    ``normalized = (x - mean[c]) / std[c]`` with mean/std in the units of ``x``;
    ``mean is None`` means ``x`` is used as is (already normalized float data).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    source: str = field(default="")


def normalize(raw: RawData, limit: int = 0) -> DataSplits:
    """Checked float32 tensors from :class:`RawData`; ``limit > 0`` keeps the first ``limit`` train examples."""
    check_raw(raw)
    train_x, train_y = raw.train_x, raw.train_y
    if limit and limit > 0:
        train_x, train_y = train_x[:limit], train_y[:limit]

    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        if raw.mean is not None:
            mean = torch.as_tensor(np.asarray(raw.mean, dtype=np.float64), dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.as_tensor(np.asarray(raw.std, dtype=np.float64), dtype=torch.float32).view(1, -1, 1, 1)
            t.sub_(mean).div_(std)
        # standard strides: with C = 1 torch may keep channels-last strides, which oneDNN
        # reads as another layout and rounds differently from a rank's freshly allocated buffer
        return t.clone(memory_format=torch.contiguous_format)

    return DataSplits(
        name=raw.name,
        train_x=prep(train_x),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y).astype(np.int64)),
        test_x=prep(raw.test_x),
        test_y=torch.from_numpy(np.ascontiguousarray(raw.test_y).astype(np.int64)),
        num_classes=int(raw.num_classes),
        input_shape=tuple(int(d) for d in raw.train_x.shape[1:]),
    )


def check_raw(raw: RawData) -> None:
    """Refuse ``raw`` with one :class:`DataError` line unless its shapes, dtypes, labels and normalization fit."""
    where = raw.source or raw.name
    if raw.num_classes < 2:
        raise DataError(f"{where}: num_classes must be >= 2, got {raw.num_classes}")
    for part, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.ndim != 4:
            raise DataError(f"{where}: {part} images must have shape (N, C, H, W), got {tuple(x.shape)}")
        if y.ndim != 1:
            raise DataError(f"{where}: {part} labels must be one-dimensional, got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{where}: {part} has {x.shape[0]} images but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{where}: {part} split is empty")
        if not (np.issubdtype(y.dtype, np.integer)):
            raise DataError(f"{where}: {part} labels must be integers, got dtype {y.dtype}")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or x.dtype == np.float16:
            raise DataError(f"{where}: {part} images must be integer or float32/float64, got dtype {x.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= raw.num_classes:
            raise DataError(f"{where}: {part} labels must lie in [0, {raw.num_classes - 1}], found {lo}..{hi}")
    if raw.train_x.shape[1:] != raw.test_x.shape[1:]:
        raise DataError(f"{where}: train images {tuple(raw.train_x.shape[1:])} and test images "
                        f"{tuple(raw.test_x.shape[1:])} differ in shape")
    if (raw.mean is None) != (raw.std is None):
        raise DataError(f"{where}: normalization needs both mean and std")
    if raw.mean is not None:
        channels = raw.train_x.shape[1]
        mean, std = np.asarray(raw.mean, dtype=np.float64), np.asarray(raw.std, dtype=np.float64)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise DataError(f"{where}: mean/std must have one value per channel ({channels})")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise DataError(f"{where}: mean must be finite and std finite and > 0")
