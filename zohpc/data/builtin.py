"""The datasets that need no file: scikit-learn's bundled digits and seeded synthetic data.

Both are fixed properties of the config (their seeds do not follow ``train.seed``), so every
run of a config sees the same examples.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from ..seeding import generator
from .splits import RawData

DIGITS_TEST_SIZE = 360  # of 1,797: the fixed split is 1,437 train / 360 test
DIGITS_SPLIT_SEED = 20_240_101  # fixed, independent of train.seed: the split is part of the dataset
SYNTHETIC_SEED = 7_919  # fixed, independent of train.seed: the data is a property of the config


def _stratified_test_indices(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """Per-class counts by largest remainder of ``test_size * n_c / n``; members drawn by ``seed``."""
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / n
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: test_size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, labels) of scikit-learn's bundled digits.

    Read straight from the package's ``datasets/data/digits.csv.gz`` (64 pixels and the label
    per row, as ``sklearn.datasets.load_digits`` reads it): importing scikit-learn costs about
    4 s (scipy.stats), on every rank, which was the largest part of the default run's start-up.
    Falls back to ``load_digits`` where that file is not found."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            rows = np.loadtxt(path, delimiter=",", dtype=np.float64)
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_digits_raw() -> RawData:
    """scikit-learn's bundled 8x8 digits (no download): fixed stratified 1,437/360 split."""
    images, y = digits_arrays()
    x = np.rint(images).astype(np.uint8)[:, None, :, :]  # values 0..16, exact integers
    test_idx = _stratified_test_indices(y, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    is_test = np.zeros(y.shape[0], dtype=bool)
    is_test[test_idx] = True
    train_x, train_y = x[~is_test], y[~is_test]
    mean = float(train_x.mean(dtype=np.float64))
    std = float(train_x.std(dtype=np.float64))
    return RawData("digits", train_x, train_y, x[is_test], y[is_test], 10,
                   np.array([mean]), np.array([std]), source="sklearn digits")


def load_synthetic_raw(shape, classes: int, size: int) -> RawData:
    """Learnable random data: each class has a fixed random mean image; examples add noise.

    Means are N(0, 1) per pixel, noise N(0, 1.5^2), the sum scaled to unit variance: classes
    overlap per pixel but separate easily over a whole image. Seeded by the fixed :data:`SYNTHETIC_SEED` and the shape, so
    the same config gives the same data everywhere. Test size is ``max(1, size // 4)``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise DataError(f"config key 'data.synthetic_shape': need 3 positive integers, got {list(shape)}")
    if classes < 2:
        raise DataError(f"config key 'data.synthetic_classes': need >= 2, got {classes}")
    if size < 1:
        raise DataError(f"config key 'data.synthetic_size': need >= 1, got {size}")
    gen = generator("synthetic", SYNTHETIC_SEED, *shape, classes)
    means = torch.randn((classes, *shape), generator=gen)

    def draw(n: int, tag: str):
        g = generator(f"synthetic-{tag}", SYNTHETIC_SEED, *shape, classes, n)
        y = torch.arange(n) % classes  # balanced, then shuffled
        y = y[torch.randperm(n, generator=g)]
        x = (means[y] + 1.5 * torch.randn((n, *shape), generator=g)) / (1.0 + 1.5 ** 2) ** 0.5  # unit variance
        return x.numpy().astype(np.float32), y.numpy().astype(np.int64)

    train_x, train_y = draw(size, "train")
    test_x, test_y = draw(max(1, size // 4), "test")
    return RawData("synthetic", train_x, train_y, test_x, test_y, classes, source="synthetic")
