"""Datasets for zohpc: digits (embedded default), cifar10, mnist, zohpc HDF5, synthetic.

Every loader returns the same :class:`DataSplits` (float32 ``N,C,H,W`` normalized images,
int64 labels) so the rest of zohpc never looks at file formats. Loaders read the raw
integer pixels first and normalize once at the end, which is also what lets the HDF5
converter store compact ``uint8`` pixels plus the normalization to apply.

Randomness that decides *which* examples a step sees (batch order, augmentation) comes
from :mod:`zohpc.seeding` generators named by a tag and ``(seed, epoch[, step])``, so any rank
and any resumed run reproduces it without communication.

Untrusted input is refused with one-line :class:`DataError` messages naming the file.
CIFAR-10's python batches are pickles: they are read with :class:`RestrictedUnpickler`,
which admits only the handful of numpy callables an ``ndarray`` needs and never imports
or calls anything else, so a hostile file cannot run code.

CLI::

    python -m zohpc.data convert --from cifar10 --dir ~/data/cifar --out cifar10.h5
    python -m zohpc.data info cifar10.h5
    python -m zohpc.data info --name digits
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .errors import CheckpointError, DataError
from .seeding import derive_seed, generator  # noqa: F401 - derive_seed re-exported (data.derive_seed)

FORMAT_NAME = "zohpc-data"
FORMAT_VERSION = 1

DATASET_NAMES = ("digits", "cifar10", "mnist", "hdf5", "synthetic")

# Per-channel mean/std of the CIFAR-10 training set for pixels scaled to [0, 1]
# (the population std; the often-quoted 0.2023/0.1994/0.2010 is a mistaken per-image value).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DIGITS_TEST_SIZE = 360  # of 1,797: the fixed split is 1,437 train / 360 test
DIGITS_SPLIT_SEED = 20_240_101  # fixed, independent of train.seed: the split is part of the dataset
SYNTHETIC_SEED = 7_919  # fixed, independent of train.seed: the data is a property of the config


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------- containers
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


# ---------------------------------------------------------------------------- batching
def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a permutation from ``derive_seed("batches", seed, epoch)``.

    ``torch.randperm(num_examples)`` on a CPU generator seeded with that value, cut into
    ``num_examples // batch_size`` batches of exactly ``batch_size`` (the incomplete tail
    is dropped, so every step sees the same batch size and BatchNorm statistics stay
    comparable); if ``num_examples < batch_size`` there is one batch of all examples.
    Any rank computes the same list from the same arguments.
    """
    if num_examples < 1:
        raise ValueError(f"epoch_batches: num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(num_examples, generator=generator("batches", seed, epoch), dtype=torch.int64)
    if num_examples < batch_size:
        return [perm]
    full = (num_examples // batch_size) * batch_size
    return list(perm[:full].view(-1, batch_size).unbind(0))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of batches :func:`epoch_batches` returns."""
    return max(1, num_examples // batch_size)


def test_batches(splits: DataSplits, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(x, y)`` views over the test set in file order; the last may be short."""
    if batch_size < 1:
        raise ValueError(f"test_batches: batch_size must be >= 1, got {batch_size}")
    for start in range(0, splits.num_test, batch_size):
        yield splits.test_x[start:start + batch_size], splits.test_y[start:start + batch_size]


test_batches.__test__ = False  # not a pytest test despite the name


def augment_batch(x: torch.Tensor, seed: int, epoch: int, step: int, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: zero-pad by ``padding``, random crop back, flip with p=1/2.

    Draws, in order, from a CPU generator seeded with ``derive_seed("augment", seed, epoch,
    step)``: row offsets ``dy`` and column offsets ``dx`` (each ``randint(0, 2*padding+1,
    (B,))``), then flips ``rand(B) < 0.5``. Example ``b`` becomes
    ``pad(x)[b, :, dy:dy+H, dx:dx+W]``, mirrored left-right when flipped. Vectorized with
    one advanced-indexing gather; works on any device and returns a new tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        return x.clone()
    gen = generator("augment", seed, epoch, step)
    span = 2 * padding + 1
    dy = torch.randint(0, span, (b,), generator=gen)
    dx = torch.randint(0, span, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def class_balanced_indices(labels: torch.Tensor, per_class: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Up to ``per_class`` training indices of every class, drawn reproducibly from ``seed``.

    For pruning scores that want a fixed class-balanced sample (GraSP uses 25 per class);
    classes with fewer examples contribute all of theirs. Sorted by class, then draw order.
    """
    labels = labels.cpu()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    perm = torch.randperm(labels.numel(), generator=generator("class-sample", seed))
    shuffled = labels[perm]
    picked = []
    for cls in range(num_classes):
        picked.append(perm[shuffled == cls][:per_class])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)


# ---------------------------------------------------------------------------- normalization
def normalize(raw: RawData, limit: int = 0) -> DataSplits:
    """Checked float32 tensors from :class:`RawData`; ``limit > 0`` keeps the first ``limit`` train examples."""
    _check_raw(raw)
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


def _check_raw(raw: RawData) -> None:
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


# ---------------------------------------------------------------------------- digits
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


def load_digits_raw() -> RawData:
    """scikit-learn's bundled 8x8 digits (no download): fixed stratified 1,437/360 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    x = np.rint(images).astype(np.uint8)[:, None, :, :]  # values 0..16, exact integers
    y = np.asarray(bunch.target, dtype=np.int64)
    test_idx = _stratified_test_indices(y, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    is_test = np.zeros(y.shape[0], dtype=bool)
    is_test[test_idx] = True
    train_x, train_y = x[~is_test], y[~is_test]
    mean = float(train_x.mean(dtype=np.float64))
    std = float(train_x.std(dtype=np.float64))
    return RawData("digits", train_x, train_y, x[is_test], y[is_test], 10,
                   np.array([mean]), np.array([std]), source="sklearn digits")


# ---------------------------------------------------------------------------- cifar10
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


def _safe_latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 only."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only for latin-1 strings")
    return obj.encode("latin-1", errors="strict")


def _frombuffer(buf, dtype, shape, order="C"):
    """Stand-in for numpy's private ``_frombuffer`` (pickle protocol 5), rebuilt from public API."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, whatever its module


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dicts, lists, strings and numbers, nothing else.

    ``find_class`` maps an exact allow-list of ``(module, name)`` pairs to objects taken
    from the already-imported numpy; it never imports a module, so a pickle naming
    ``os.system``, ``builtins.eval`` or anything else fails before any of it can run.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _safe_latin1_encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def restricted_load(path: str):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (bytes keys, as Python 2 wrote them)."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, OverflowError, MemoryError, UnicodeError) as exc:
        raise DataError(f"{path}: not a safe CIFAR-10 python batch ({_one_line(exc) or type(exc).__name__})") from None


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


# ---------------------------------------------------------------------------- mnist
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
        raise DataError(f"{path}: unreadable or truncated gzip ({_one_line(exc)})") from None
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


# ---------------------------------------------------------------------------- synthetic
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


# ---------------------------------------------------------------------------- hdf5
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
    from .h5util import attr_str, open_verified, read_array

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
        raise DataError(f"{path}: corrupted zohpc data file ({_one_line(exc)})") from None
    raw = RawData(name, arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                  num_classes, mean, std, source=path)
    _check_raw(raw)
    return raw


def write_hdf5(raw: RawData, path: str) -> None:
    """Write ``raw`` atomically in the zohpc-data format (pixels as stored, plus mean/std)."""
    from .h5util import atomic_h5, write_array

    _check_raw(raw)
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


# ---------------------------------------------------------------------------- dispatch
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


# ---------------------------------------------------------------------------- CLI
def _summary(splits: DataSplits, source: str) -> dict:
    counts = torch.bincount(splits.train_y, minlength=splits.num_classes).tolist()
    return {
        "name": splits.name,
        "source": source,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "train_class_counts": counts,
        "train_mean": round(float(splits.train_x.mean()), 6),
        "train_std": round(float(splits.train_x.std()), 6),
    }


def _data_config(name: str, directory: str, args) -> object:
    from .config import DataConfig

    cfg = DataConfig(name=name, dir=directory or "")
    if getattr(args, "limit", None):
        cfg.limit = args.limit
    if getattr(args, "synthetic_shape", None):
        cfg.synthetic_shape = list(args.synthetic_shape)
    if getattr(args, "synthetic_classes", None):
        cfg.synthetic_classes = args.synthetic_classes
    if getattr(args, "synthetic_size", None):
        cfg.synthetic_size = args.synthetic_size
    return cfg


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zohpc.data",
                                     description="Convert datasets to zohpc's HDF5 format and inspect them.")
    sub = parser.add_subparsers(dest="command", required=True)

    def synthetic_opts(p):
        p.add_argument("--synthetic-shape", type=int, nargs=3, metavar=("C", "H", "W"))
        p.add_argument("--synthetic-classes", type=int)
        p.add_argument("--synthetic-size", type=int)

    conv = sub.add_parser("convert", help="write a dataset as a zohpc-data HDF5 file")
    conv.add_argument("--from", dest="source", required=True, choices=("digits", "cifar10", "mnist", "synthetic", "hdf5"))
    conv.add_argument("--dir", default="", help="source directory (cifar10, mnist) or file (hdf5)")
    conv.add_argument("--out", required=True, help="output .h5 file")
    conv.add_argument("--limit", type=int, default=0, help="keep only the first N training examples")
    synthetic_opts(conv)

    info = sub.add_parser("info", help="print a short summary of a dataset")
    info.add_argument("path", nargs="?", default="", help="zohpc .h5 file (or its directory), or --name/--dir")
    info.add_argument("--name", choices=DATASET_NAMES)
    info.add_argument("--dir", default="")
    info.add_argument("--limit", type=int, default=0)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    synthetic_opts(info)
    return parser


def _convert(args) -> int:
    if args.limit < 0:
        raise DataError(f"--limit must be >= 0, got {args.limit}")
    if args.source in ("cifar10", "mnist", "hdf5") and not args.dir:
        raise DataError(f"--dir is required for --from {args.source}")
    raw = load_raw(_data_config(args.source, args.dir, args))
    if args.limit:
        raw.train_x, raw.train_y = raw.train_x[: args.limit], raw.train_y[: args.limit]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise DataError(f"{args.out}: output directory {out_dir} does not exist")
    try:
        write_hdf5(raw, args.out)
    except OSError as exc:
        raise DataError(f"{args.out}: cannot write ({_one_line(exc)})") from None
    print(f"wrote {args.out}: {raw.name}, {raw.train_x.shape[0]} train / {raw.test_x.shape[0]} test, "
          f"shape {tuple(raw.train_x.shape[1:])}, {raw.num_classes} classes")
    return 0


def _info(args) -> int:
    if args.name and args.path:
        raise DataError("give either a PATH (zohpc .h5) or --name, not both")
    if not args.name and not args.path:
        raise DataError("give a PATH (zohpc .h5) or --name NAME")
    name, directory = (args.name, args.dir) if args.name else ("hdf5", args.path)
    splits = load_data(_data_config(name, directory, args))
    summary = _summary(splits, directory or name)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['name']} ({summary['source']}): {summary['num_train']} train / {summary['num_test']} test, "
              f"shape {tuple(summary['input_shape'])}, {summary['num_classes']} classes")
        print(f"train class counts: {summary['train_class_counts']}")
        print(f"normalized train mean {summary['train_mean']:.4f}, std {summary['train_std']:.4f}")
    return 0


def main(argv=None) -> None:
    """``python -m zohpc.data convert|info``; user errors exit 2 with one line."""
    args = _build_parser().parse_args(argv)

    def run(comm) -> int:
        def work():
            if not comm.is_driver:  # a serial tool: under mpiexec only rank 0 works
                return 0
            return _convert(args) if args.command == "convert" else _info(args)

        return comm.agree(work)

    from .comm import run_main

    run_main(run, "zohpc.data")


if __name__ == "__main__":
    main()
