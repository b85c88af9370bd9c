"""From a ``[data]`` config to :class:`DataSplits`: the one dispatch over dataset names."""

from __future__ import annotations

from ..errors import DataError
from .builtin import load_digits_raw, load_synthetic_raw
from .cifar import load_cifar10_raw
from .hdf5 import load_hdf5_raw
from .mnist import load_mnist_raw
from .splits import DataSplits, RawData, normalize

DATASET_NAMES = ("digits", "cifar10", "mnist", "hdf5", "synthetic")


def load_raw(cfg_data) -> RawData:
    """The un-normalized data named by a :class:`zohpc.config.DataConfig`."""
    name = cfg_data.name
    if name == "digits":
        return load_digits_raw()
    if name == "cifar10":
        return load_cifar10_raw(cfg_data.dir)
    if name == "mnist":
        return load_mnist_raw(cfg_data.dir)
    if name == "hdf5":
        return load_hdf5_raw(cfg_data.dir)
    if name == "synthetic":
        return load_synthetic_raw(cfg_data.synthetic_shape, cfg_data.synthetic_classes, cfg_data.synthetic_size)
    raise DataError(f"config key 'data.name': {name!r} is not one of {', '.join(DATASET_NAMES)}")


def load_data(cfg_data, seed: int = 0) -> DataSplits:
    """Load, check and normalize the dataset of ``cfg_data``; ``cfg_data.limit`` trims train.

    ``seed`` is accepted for API stability but does not change the data: splits and
    synthetic data use fixed seeds so that every run of a config sees the same dataset.
    """
    del seed
    limit = int(getattr(cfg_data, "limit", 0) or 0)
    if limit < 0:
        raise DataError(f"config key 'data.limit': must be >= 0, got {limit}")
    return normalize(load_raw(cfg_data), limit=limit)
