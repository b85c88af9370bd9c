"""Datasets for zohpc: digits (bundled default), cifar10, mnist, zohpc HDF5, synthetic.

Every loader returns the same :class:`DataSplits` (float32 ``N,C,H,W`` normalized images,
int64 labels); one module per source, one for what a step sees (:mod:`.batches`), one for
the dispatch from a config (:mod:`.load`) and the ``python -m zohpc.data convert|info`` CLI
(:mod:`.cli`). Untrusted input is refused with one-line :class:`~zohpc.errors.DataError`
messages naming the file; CIFAR-10's pickles go through :mod:`.safe_pickle`.
"""

from .batches import augment_batch, class_balanced_indices, epoch_batches, steps_per_epoch, test_batches
from .builtin import load_digits_raw, load_synthetic_raw
from .cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar10_raw
from .hdf5 import FORMAT_NAME, FORMAT_VERSION, load_hdf5_raw, resolve_h5_path, write_hdf5
from .load import DATASET_NAMES, load_data, load_raw
from .mnist import load_mnist_raw, read_idx
from .safe_pickle import RestrictedUnpickler, restricted_load
from .splits import DataSplits, RawData, normalize

__all__ = ["DataSplits", "RawData", "normalize", "epoch_batches", "steps_per_epoch", "test_batches",
           "augment_batch", "class_balanced_indices", "load_digits_raw", "load_synthetic_raw",
           "load_cifar10_raw", "CIFAR10_MEAN", "CIFAR10_STD", "load_mnist_raw", "read_idx", "load_hdf5_raw",
           "write_hdf5", "resolve_h5_path", "FORMAT_NAME", "FORMAT_VERSION", "load_raw", "load_data",
           "DATASET_NAMES", "RestrictedUnpickler", "restricted_load"]
