"""Tests for zohpc.data: every loader on small files written here in the real formats."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from zohpc import data as D
from zohpc.config import DataConfig
from zohpc.data import cli as data_cli
from zohpc.errors import DataError
from zohpc.seeding import derive_seed

ENV = dict(os.environ, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------- helpers
def cfg(name, directory="", **kw):
    return DataConfig(name=name, dir=str(directory), **kw)


@pytest.fixture(scope="module")
def digits():
    return D.load_data(cfg("digits"))


def cifar_arrays(seed=0, sizes=(3, 2, 3, 2, 3), test=4):
    """Random uint8 images (N, 3072) and labels for 5 train batches and a test batch."""
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)) for n in sizes]
    test_batch = (rng.integers(0, 256, (test, 3072), dtype=np.uint8), rng.integers(0, 10, test))
    return batches, test_batch


def write_cifar_bin(folder, batches, test_batch):
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, (x, y) in zip(names, list(batches) + [test_batch]):
        records = np.concatenate([np.asarray(y, dtype=np.uint8)[:, None], x], axis=1)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(records.tobytes())


def write_cifar_py(folder, batches, test_batch, protocol=2):
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, (name, (x, y)) in enumerate(zip(names, list(batches) + [test_batch])):
        obj = {b"batch_label": b"batch %d" % k, b"labels": [int(v) for v in y], b"data": x,
               b"filenames": [b"img%d.png" % i for i in range(len(y))]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol if k % 2 == 0 else max(protocol, 4))


def idx_bytes(array, magic):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_mnist(folder, gz, train=12, test=5, seed=1, side=28):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (train, side, side)), 2051),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, train), 2049),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (test, side, side)), 2051),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, test), 2049),
    }
    os.makedirs(folder, exist_ok=True)
    for name, (arr, magic) in arrays.items():
        blob = idx_bytes(arr, magic)
        if gz:
            with gzip.open(os.path.join(folder, name + ".gz"), "wb") as fh:
                fh.write(blob)
        else:
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(blob)
    return {k: np.asarray(v[0], dtype=np.uint8) for k, v in arrays.items()}


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "zohpc.data", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------------------- digits
def test_digits_read_from_the_package_file_equal_sklearns_loader():
    """The direct read of digits.csv.gz (no scikit-learn import at start-up) gives exactly the
    images and labels of ``sklearn.datasets.load_digits``."""
    import numpy as np
    from sklearn.datasets import load_digits

    from zohpc.data.builtin import digits_arrays

    images, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_shapes_counts_and_normalization(digits):
    assert digits.name == "digits"
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert abs(float(digits.train_x.mean())) < 1e-5
    assert abs(float(digits.train_x.std()) - 1.0) < 1e-3
    # stratified: each class's share of the test set matches its share overall (within 1)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    totals = np.bincount(bunch.target, minlength=10)
    test_counts = torch.bincount(digits.test_y, minlength=10).numpy()
    assert test_counts.sum() == 360
    assert np.all(np.abs(test_counts - totals * 360 / 1797) < 1.0)
    # reference: the normalized images are (pixel - train mean) / train std of the raw pixels
    raw = D.load_digits_raw()
    x = raw.train_x.astype(np.float64)
    ref = (x - x.mean()) / x.std()
    assert np.allclose(digits.train_x.numpy(), ref, atol=1e-5)
    # train and test together are exactly sklearn's 1,797 images (as multisets of rows)
    both = np.concatenate([raw.train_x, raw.test_x]).reshape(1797, 64)
    assert sorted(map(bytes, both)) == sorted(map(bytes, np.rint(bunch.data).astype(np.uint8)))


def test_digits_split_is_fixed_and_independent_of_seed(digits):
    again = D.load_data(cfg("digits"), seed=123)
    for a, b in ((digits.train_x, again.train_x), (digits.train_y, again.train_y),
                 (digits.test_x, again.test_x), (digits.test_y, again.test_y)):
        assert torch.equal(a, b)


def test_limit_keeps_first_training_examples(digits):
    small = D.load_data(cfg("digits", limit=100))
    assert small.num_train == 100 and small.num_test == 360
    assert torch.equal(small.train_x, digits.train_x[:100])
    assert torch.equal(small.train_y, digits.train_y[:100])


# ---------------------------------------------------------------------------- cifar10
def test_cifar_binary_and_python_agree(tmp_path):
    batches, test_batch = cifar_arrays()
    write_cifar_bin(tmp_path / "b" / "cifar-10-batches-bin", batches, test_batch)
    write_cifar_py(tmp_path / "p" / "cifar-10-batches-py", batches, test_batch)
    from_bin = D.load_data(cfg("cifar10", tmp_path / "b"))
    from_py = D.load_data(cfg("cifar10", tmp_path / "p"))
    direct = D.load_data(cfg("cifar10", tmp_path / "p" / "cifar-10-batches-py"))  # the folder itself
    assert from_bin.train_x.shape == (13, 3, 32, 32) and from_bin.test_x.shape == (4, 3, 32, 32)
    assert from_bin.input_shape == (3, 32, 32) and from_bin.num_classes == 10
    for other in (from_py, direct):
        assert torch.equal(from_bin.train_x, other.train_x) and torch.equal(from_bin.train_y, other.train_y)
        assert torch.equal(from_bin.test_x, other.test_x) and torch.equal(from_bin.test_y, other.test_y)
    # reference: channel-planar layout, (pixel/255 - mean[c]) / std[c]
    pixels = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    mean = np.array(D.CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.array(D.CIFAR10_STD).reshape(1, 3, 1, 1)
    assert np.allclose(from_bin.train_x.numpy(), (pixels - mean) / std, atol=1e-5)
    assert from_bin.train_y.tolist() == [int(v) for b in batches for v in b[1]]


def test_cifar_binary_files_directly_in_dir(tmp_path):
    batches, test_batch = cifar_arrays(seed=3)
    write_cifar_bin(tmp_path, batches, test_batch)
    splits = D.load_data(cfg("cifar10", tmp_path, limit=5))
    assert splits.num_train == 5 and splits.num_test == 4
    assert splits.train_y.tolist() == [int(v) for v in batches[0][1]] + [int(v) for v in batches[1][1]]


class _Evil:
    """Pickles to a call of ``fn(arg)``: what a hostile CIFAR batch would contain."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "nested"])
def test_malicious_cifar_pickle_does_not_run(tmp_path, attack):
    batches, test_batch = cifar_arrays()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_py(folder, batches, test_batch)
    marker = tmp_path / "PWNED"
    if attack == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    elif attack == "builtins.exec":
        payload = _Evil(exec, f"open({str(marker)!r}, 'w').write('x')")
    else:  # hidden inside the labels list next to a valid data array
        payload = [1, 2, _Evil(os.system, f"touch {marker}")]
    bad = folder / "data_batch_3"
    obj = {b"data": batches[2][0], b"labels": payload} if attack == "nested" else {b"data": payload, b"labels": [0]}
    with open(bad, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)
    with pytest.raises(DataError) as info:
        D.load_data(cfg("cifar10", tmp_path))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # and the unpickler itself refuses before calling anything
    with pytest.raises(DataError):
        D.restricted_load(str(bad))
    assert not marker.exists()


def _py2_style_batch(x, labels):
    """Pickle bytes as Python 2's cPickle wrote CIFAR-10 (py2 str data, ``numpy.core`` names)."""
    def sbs(b):
        return b"U" + bytes([len(b)]) + b

    out = b"\x80\x02}q\x00(" + sbs(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + sbs(b"b") + b"\x87R"
    out += b"(K\x01K" + bytes([x.shape[0]]) + b"M\x00\x0c\x86"  # state: version, shape (n, 3072)
    out += b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + sbs(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    raw = x.tobytes()
    out += b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
    out += sbs(b"labels") + b"]q\x01(" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"eu."
    return out


def test_cifar_python2_style_pickle(tmp_path):
    batches, test_batch = cifar_arrays(seed=5)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_py(folder, batches, test_batch)
    (folder / "data_batch_4").write_bytes(_py2_style_batch(*batches[3]))
    write_cifar_bin(tmp_path / "bin", batches, test_batch)
    a, b = D.load_data(cfg("cifar10", tmp_path)), D.load_data(cfg("cifar10", tmp_path / "bin"))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_numpy_arrays(tmp_path, protocol):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 12)
    path = tmp_path / "batch"
    with open(path, "wb") as fh:
        pickle.dump({b"data": arr, b"labels": [3, 4], "s": "text"}, fh, protocol=protocol)
    obj = D.restricted_load(str(path))
    assert np.array_equal(obj[b"data"], arr) and obj[b"labels"] == [3, 4] and obj["s"] == "text"


def test_cifar_bad_inputs(tmp_path):
    batches, test_batch = cifar_arrays()
    folder = tmp_path / "c"
    write_cifar_bin(folder, batches, test_batch)
    # truncated record
    path = folder / "data_batch_2.bin"
    blob = path.read_bytes()
    path.write_bytes(blob[:-7])
    with pytest.raises(DataError, match=str(path)):
        D.load_data(cfg("cifar10", folder))
    path.write_bytes(blob)
    # label out of range
    bad = bytearray(blob)
    bad[0] = 12
    path.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=f"{path}.*label 12"):
        D.load_data(cfg("cifar10", folder))
    path.write_bytes(blob)
    # missing test file
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError, match=str(folder / "test_batch.bin")):
        D.load_data(cfg("cifar10", folder))
    # a directory with no batches, and one that does not exist
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        os.makedirs(tmp_path / "empty")
        D.load_data(cfg("cifar10", tmp_path / "empty"))
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        D.load_data(cfg("cifar10", tmp_path / "nowhere"))


def test_cifar_python_batch_with_wrong_content(tmp_path):
    batches, test_batch = cifar_arrays()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_py(folder, batches, test_batch)
    bad = folder / "data_batch_1"
    for obj, match in (({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, "3072"),
                       ({b"data": batches[0][0], b"labels": [0]}, "labels"),
                       ({b"data": batches[0][0], b"labels": [0, 1, 10]}, "0..9"),
                       ([1, 2, 3], "dict")):
        with open(bad, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
        with pytest.raises(DataError, match=f"{bad}.*{match}"):
            D.load_data(cfg("cifar10", tmp_path))
    bad.write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(DataError, match=str(bad)):
        D.load_data(cfg("cifar10", tmp_path))


# ---------------------------------------------------------------------------- mnist
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    splits = D.load_data(cfg("mnist", tmp_path))
    assert splits.train_x.shape == (12, 1, 28, 28) and splits.test_x.shape == (5, 1, 28, 28)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert splits.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    train = arrays["train-images-idx3-ubyte"].astype(np.float64)
    mean, std = train.mean(), train.std()
    ref = (arrays["t10k-images-idx3-ubyte"].astype(np.float64) - mean) / std
    assert np.allclose(splits.test_x.numpy()[:, 0], ref, atol=1e-5)


def test_mnist_bad_files(tmp_path):
    write_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    blob, lblob = images.read_bytes(), labels.read_bytes()
    # wrong magic: a label file where images belong
    images.write_bytes(struct.pack(">i", 2049) + blob[4:])
    with pytest.raises(DataError, match=f"{images}.*magic number 2049"):
        D.load_data(cfg("mnist", tmp_path))
    # truncated
    images.write_bytes(blob[:-100])
    with pytest.raises(DataError, match=f"{images}.*size"):
        D.load_data(cfg("mnist", tmp_path))
    images.write_bytes(blob)
    # labels out of range
    labels.write_bytes(lblob[:-1] + bytes([10]))
    with pytest.raises(DataError, match=f"{labels}.*out of range"):
        D.load_data(cfg("mnist", tmp_path))
    # count mismatch between labels and images
    labels.write_bytes(idx_bytes(np.zeros(11), 2049))
    with pytest.raises(DataError, match=f"{labels}.*11 labels"):
        D.load_data(cfg("mnist", tmp_path))
    # missing file
    labels.unlink()
    with pytest.raises(DataError, match=str(labels)):
        D.load_data(cfg("mnist", tmp_path))


def test_mnist_truncated_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=str(path)):
        D.load_data(cfg("mnist", tmp_path))


# ---------------------------------------------------------------------------- hdf5
def test_hdf5_round_trip_function(tmp_path):
    synth = cfg("synthetic", synthetic_shape=[2, 5, 6], synthetic_classes=3, synthetic_size=40)
    raw = D.load_raw(synth)
    D.write_hdf5(raw, str(tmp_path / "data.h5"))
    expected = D.load_data(synth)
    for where in (tmp_path / "data.h5", tmp_path):  # the file, or its directory
        got = D.load_data(cfg("hdf5", where))
        assert got.name == "synthetic" and got.num_classes == 3 and got.input_shape == (2, 5, 6)
        for a, b in ((expected.train_x, got.train_x), (expected.train_y, got.train_y),
                     (expected.test_x, got.test_x), (expected.test_y, got.test_y)):
            assert torch.equal(a, b)
    # uint8 pixels with normalization (the compact CIFAR/MNIST form) round-trip as well
    write_mnist(tmp_path / "m", gz=True)
    D.write_hdf5(D.load_raw(cfg("mnist", tmp_path / "m")), str(tmp_path / "m.h5"))
    with h5py.File(tmp_path / "m.h5", "r") as fh:
        assert fh["train/x"].dtype == np.uint8
    a, b = D.load_data(cfg("mnist", tmp_path / "m")), D.load_data(cfg("hdf5", tmp_path / "m.h5"))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_hdf5_round_trip_cli(tmp_path, capsys):
    write_mnist(tmp_path / "src", gz=True)
    out = tmp_path / "d" / "data.h5"
    os.makedirs(out.parent)
    res = run_cli("convert", "--from", "mnist", "--dir", str(tmp_path / "src"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "12 train / 5 test" in res.stdout
    expected = D.load_data(cfg("mnist", tmp_path / "src"))
    got = D.load_data(cfg("hdf5", out.parent))
    assert got.name == "mnist" and got.input_shape == (1, 28, 28)
    for a, b in ((expected.train_x, got.train_x), (expected.train_y, got.train_y),
                 (expected.test_x, got.test_x), (expected.test_y, got.test_y)):
        assert torch.equal(a, b)
    # info in-process (the subprocess wrapper is exercised above and in the error test)
    capsys.readouterr()
    assert data_cli._info(data_cli._build_parser().parse_args(["info", str(out), "--json"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_train"] == 12 and summary["num_test"] == 5
    assert summary["input_shape"] == [1, 28, 28] and summary["num_classes"] == 10
    assert sum(summary["train_class_counts"]) == 12


def test_cli_user_error_exits_2(tmp_path):
    missing = tmp_path / "no-such-dir"
    res = run_cli("convert", "--from", "mnist", "--dir", str(missing), "--out", str(tmp_path / "x.h5"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zohpc.data: error:") and str(missing) in lines[0]
    assert not (tmp_path / "x.h5").exists()


def test_hdf5_foreign_and_bad_files_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh.attrs["format"] = "zohpc-checkpoint"
        fh.attrs["format_version"] = 1
        fh.attrs["complete"] = True
        fh.create_dataset("train/x", data=np.zeros((2, 1, 2, 2)))
    with pytest.raises(DataError, match=f"{foreign}.*not a zohpc-data file"):
        D.load_data(cfg("hdf5", foreign))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as fh:
        fh.create_dataset("x", data=np.zeros(3))
    with pytest.raises(DataError, match=str(plain)):
        D.load_data(cfg("hdf5", plain))
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match=f"{text}.*not an HDF5 file"):
        D.load_data(cfg("hdf5", text))
    # a well-formed file whose labels exceed num_classes
    from zohpc.h5util import atomic_h5, write_array

    bad = tmp_path / "bad.h5"
    with atomic_h5(str(bad), D.FORMAT_NAME, D.FORMAT_VERSION) as fh:
        fh.attrs["num_classes"] = 3
        for part in ("train", "test"):
            g = fh.create_group(part)
            write_array(g, "x", np.zeros((4, 1, 2, 2), np.float32))
            write_array(g, "y", np.array([0, 1, 2, 7]))
    with pytest.raises(DataError, match=f"{bad}.*labels must lie in \\[0, 2\\]"):
        D.load_data(cfg("hdf5", bad))
    # corrupted bytes are caught by the checksums
    good = tmp_path / "good.h5"
    D.write_hdf5(D.load_raw(cfg("synthetic", synthetic_shape=[1, 4, 4], synthetic_size=8)), str(good))
    with h5py.File(good, "r+") as fh:
        fh["train/y"][0] = (int(fh["train/y"][0]) + 1) % 2  # rewritten in place: sha256 no longer matches
    with pytest.raises(DataError, match=str(good)):
        D.load_data(cfg("hdf5", good))


def test_missing_paths_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "data.h5")):
        D.load_data(cfg("hdf5", tmp_path))
    with pytest.raises(DataError, match=str(tmp_path / "x.h5")):
        D.load_data(cfg("hdf5", tmp_path / "x.h5"))
    with pytest.raises(DataError, match=str(tmp_path / "mn")):
        D.load_data(cfg("mnist", tmp_path / "mn"))
    with pytest.raises(DataError, match="data.dir"):
        D.load_data(cfg("cifar10", ""))
    with pytest.raises(DataError, match="data.name"):
        D.load_data(cfg("imagenet"))


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_learnable():
    c = cfg("synthetic", synthetic_shape=[1, 8, 8], synthetic_classes=4, synthetic_size=200)
    a, b = D.load_data(c), D.load_data(c, seed=99)
    assert a.train_x.shape == (200, 1, 8, 8) and a.test_x.shape == (50, 1, 8, 8)
    assert a.num_classes == 4 and a.input_shape == (1, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.bincount(a.train_y).tolist() == [50, 50, 50, 50]
    # nearest class centroid (from train) classifies the test set well: the labels carry signal
    cent = torch.stack([a.train_x[a.train_y == k].mean(0).flatten() for k in range(4)])
    pred = torch.cdist(a.test_x.flatten(1), cent).argmin(1)
    assert float((pred == a.test_y).float().mean()) > 0.8
    tiny = D.load_data(cfg("synthetic", synthetic_shape=[1, 2, 2], synthetic_size=3))
    assert tiny.num_test == 1


# ---------------------------------------------------------------------------- batching
def test_epoch_batches_deterministic_and_disjoint():
    a = D.epoch_batches(103, 10, seed=5, epoch=2)
    b = D.epoch_batches(103, 10, seed=5, epoch=2)
    assert len(a) == 10 == D.steps_per_epoch(103, 10)
    assert all(x.dtype == torch.int64 and x.shape == (10,) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a)
    assert flat.unique().numel() == flat.numel() == 100 and int(flat.min()) >= 0 and int(flat.max()) < 103
    other_epoch = torch.cat(D.epoch_batches(103, 10, seed=5, epoch=3))
    other_seed = torch.cat(D.epoch_batches(103, 10, seed=6, epoch=2))
    assert not torch.equal(flat, other_epoch) and not torch.equal(flat, other_seed)
    # the documented recipe, so any rank can reproduce it
    gen = torch.Generator().manual_seed(derive_seed("batches", 5, 2))
    assert torch.equal(flat, torch.randperm(103, generator=gen)[:100])
    # fewer examples than a batch: one batch holding each example once
    (only,) = D.epoch_batches(7, 10, seed=0, epoch=0)
    assert sorted(only.tolist()) == list(range(7))
    assert derive_seed("batches", 1, 0) != derive_seed("batches", 0, 1)


def test_test_batches_cover_test_set_in_order():
    splits = D.load_data(cfg("synthetic", synthetic_shape=[1, 2, 2], synthetic_size=40))
    parts = list(D.test_batches(splits, 3))
    assert [len(y) for _, y in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in parts]), splits.test_x)
    assert torch.equal(torch.cat([y for _, y in parts]), splits.test_y)


def _reference_augment(x, seed, epoch, step, pad=4):
    """Slow, obvious version: explicit zero padding, crop and flip per image."""
    b, c, h, w = x.shape
    gen = torch.Generator().manual_seed(derive_seed("augment", seed, epoch, step))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        padded[:, pad:pad + h, pad:pad + w] = x[i]
        crop = padded[:, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out, dy, dx, flip


def test_augment_matches_reference_and_is_reproducible():
    x = torch.randn(64, 3, 32, 32)
    out = D.augment_batch(x, seed=1, epoch=0, step=7)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref, dy, dx, flip = _reference_augment(x, 1, 0, 7)
    assert torch.equal(out, ref)
    assert torch.equal(out, D.augment_batch(x, seed=1, epoch=0, step=7))
    assert not torch.equal(out, D.augment_batch(x, seed=1, epoch=0, step=8))
    assert not torch.equal(out, D.augment_batch(x, seed=1, epoch=1, step=7))
    # the draws vary per example: both flips and a spread of offsets occur
    assert 0 < int(flip.sum()) < 64 and len(set(dy.tolist())) > 3 and len(set(dx.tolist())) > 3


def test_augment_known_image():
    img = torch.arange(1, 4 * 5 + 1, dtype=torch.float32).view(1, 1, 4, 5)
    for step in range(40):
        out = D.augment_batch(img, seed=0, epoch=0, step=step)
        _, dy, dx, flip = _reference_augment(img, 0, 0, step)
        oy, ox = int(dy[0]) - 4, int(dx[0]) - 4  # shift of the crop window relative to the image
        expected = torch.zeros(4, 5)
        for i in range(4):
            for j in range(5):
                si, sj = i + oy, j + ox
                if 0 <= si < 4 and 0 <= sj < 5:
                    expected[i, j] = img[0, 0, si, sj]
        if flip[0]:
            expected = expected.flip(1)
        assert torch.equal(out[0, 0], expected), step
    # a step whose draws are the centre offset without flip gives the image back unchanged
    def centred(s):
        _, dy, dx, flip = _reference_augment(img, 0, 0, s)
        return int(dy[0]) == 4 and int(dx[0]) == 4 and not bool(flip[0])

    step = next(s for s in range(5000) if centred(s))
    assert torch.equal(D.augment_batch(img, 0, 0, step), img)


def test_class_balanced_indices():
    y = torch.tensor([0, 1, 2, 0, 1, 0, 0, 2, 1, 0])
    idx = D.class_balanced_indices(y, 2, seed=3, num_classes=3)
    assert torch.bincount(y[idx], minlength=3).tolist() == [2, 2, 2]
    assert torch.equal(idx, D.class_balanced_indices(y, 2, seed=3, num_classes=3))
    assert torch.bincount(y[D.class_balanced_indices(y, 4, seed=0)], minlength=3).tolist() == [4, 3, 2]
