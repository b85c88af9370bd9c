"""Checkpoints: exact round trips, and damaged files never load as different data."""

from __future__ import annotations

import math
import os
import random

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zohpc import __version__
from zohpc.checkpoint import (
    FORMAT_NAME,
    TRAILER_SIZE,
    Checkpoint,
    append_trailer,
    checkpoint_dir,
    checkpoint_path,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_tree,
    resolve_resume,
    save_checkpoint,
    write_tree,
)
from zohpc.config import Config, to_toml
from zohpc.errors import CheckpointError
from zohpc.models import build_model


# --------------------------------------------------------------------------- exact comparison
def assert_same(a, b, where="root"):
    """Exact equality: container and key types, tensor dtype/shape/bits, float bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert b.device.type == "cpu"
        assert a.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == \
            b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), f"{where}: tensor bits differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: array bits differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for (ka, va), kb in zip(a.items(), b):
            assert type(ka) is type(kb), f"{where}: key {ka!r} type"
            assert_same(va, b[kb], f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b))), where
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), f"{where}: float bits"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Checkpoint, b: Checkpoint):
    for field in ("step", "epoch", "config_toml", "params", "buffers", "masks", "optimizer",
                  "scheduler", "rng", "metrics", "extra", "format_version", "zohpc_version"):
        assert_same(getattr(a, field), getattr(b, field), field)


# --------------------------------------------------------------------------- fixtures
def trained_model(opt_name="sgd", steps=3, seed=0):
    torch.manual_seed(seed)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def checkpoint_kwargs(step=30, opt_name="sgd"):
    model, opt, sched = trained_model(opt_name)
    gen = torch.Generator().manual_seed(1234)
    torch.randn(3, generator=gen)
    py = random.Random(7)
    py.random()
    return dict(
        step=step, epoch=step // 10, config_toml=to_toml(Config()),
        params={k: v.detach().clone() for k, v in model.named_parameters()},
        buffers={k: v.clone() for k, v in model.named_buffers()},
        masks={k: torch.rand(v.shape, generator=gen) > 0.3 for k, v in model.named_parameters() if v.dim() > 1},
        optimizer=opt.state_dict(), scheduler=sched.state_dict(),
        rng={"torch": torch.get_rng_state(), "batch": gen.get_state(), "numpy": np.random.RandomState(3).get_state(),
             "python": py.getstate(), "pcg": np.random.default_rng(9).bit_generator.state},
        metrics=[{"event": "start", "ranks": 1, "model": "digits_cnn", "params": 1946, "active_coords": 900, "time": 0.0},
                 {"event": "step", "step": 1, "epoch": 0, "loss": 2.302585092994046, "lr": 0.1, "queries": 901,
                  "seconds": 0.25, "rank_compute_seconds": [0.2], "time": 0.3},
                 {"event": "eval", "step": 1, "epoch": 0, "test_acc": 0.125, "test_loss": 2.29, "time": 0.5}],
        extra={"lizo": {"U": torch.randn(4, 7, dtype=torch.float64), "count": 3}, 0: "int key", "0": "str key"},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small real checkpoint, its bytes and the loaded reference."""
    directory = tmp_path_factory.mktemp("ckpt")
    kw = checkpoint_kwargs()
    path = save_checkpoint(str(directory / "ckpt-00000030.h5"), **kw)
    with open(path, "rb") as fh:
        data = fh.read()
    return path, data, kw, load_checkpoint(path)


# --------------------------------------------------------------------------- round trips
def test_tree_round_trip_is_exact(tmp_path):
    tree = {
        "ints": [0, -1, 2**70, -(2**63)], "floats": [0.1, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e308],
        "flags": (True, False, None), "text": "ünïcode\n\x00end", "bytes": b"\x00\xffraw",
        3: {"nested": [{"deep": torch.tensor(1.5)}]}, "3": "string three", (1, "a"): "tuple key", 2.5: "float key",
        "bool": torch.rand(3, 4) > 0.5, "u8": torch.arange(256, dtype=torch.uint8), "i64": torch.tensor([-(2**62), 5]),
        "f32": torch.randn(2, 3, 4), "f64": torch.randn(5, dtype=torch.float64), "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32), "bf16": torch.randn(6).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(), "noncontig": torch.arange(12.0).reshape(3, 4).t(),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3), "npbool": np.array([True, False]),
        "np_be": np.arange(3, dtype=">f4"), "np_scalar": np.float32(2.5), "np_int": np.int64(-3),
        "empty_list": [], "empty_dict": {}, "empty_tuple": (),
    }
    path = str(tmp_path / "tree.h5")
    with h5py.File(path, "w") as fh:
        write_tree(fh.create_group("t"), tree)
    with h5py.File(path, "r") as fh:
        back = read_tree(fh["t"], path)
    assert_same(tree["noncontig"].contiguous(), back["noncontig"])
    tree["noncontig"] = tree["noncontig"].contiguous()
    assert_same(tree, back)
    assert back["floats"][1] == 0.0 and math.copysign(1, back["floats"][1]) == -1


def test_tree_refuses_unsupported_types(tmp_path):
    with h5py.File(str(tmp_path / "x.h5"), "w") as fh:
        with pytest.raises(TypeError, match="set"):
            write_tree(fh.create_group("a"), {"s": {1, 2}})
        with pytest.raises(TypeError):
            write_tree(fh.create_group("b"), {"o": np.array([object()])})


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_and_scheduler_state_continue_identically(tmp_path, opt_name):
    """A restored optimizer + scheduler takes the same next steps, bit for bit."""
    kw = checkpoint_kwargs(opt_name=opt_name)
    path = save_checkpoint(checkpoint_path(tmp_path, 30), **kw)
    ck = load_checkpoint(path)
    assert_same(kw["optimizer"], ck.optimizer, "optimizer")
    assert_same(kw["scheduler"], ck.scheduler, "scheduler")

    def continue_from(params, opt_state, sched_state):
        torch.manual_seed(5)
        model = build_model("digits_cnn", (1, 8, 8), 10)
        model.load_state_dict({**params, **kw["buffers"]})
        _, opt, sched = trained_model(opt_name, steps=0)
        opt = type(opt)(model.parameters(), **{k: v for k, v in opt.defaults.items()})
        sched = type(sched)(opt, **({"lr_lambda": lambda e: 0.5 ** e} if opt_name == "sgd" else {"T_max": 10}))
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return [p.detach().clone() for p in model.parameters()], sched.get_last_lr()

    ref = continue_from(kw["params"], kw["optimizer"], kw["scheduler"])
    got = continue_from(ck.params, ck.optimizer, ck.scheduler)
    assert_same(ref, got)


def test_checkpoint_round_trip(saved):
    path, _, kw, ck = saved
    assert isinstance(ck, Checkpoint) and ck.path == path
    assert ck.zohpc_version == __version__ and ck.format_version == 1
    for field, value in kw.items():
        assert_same(value, getattr(ck, field), field)
    torch.set_rng_state(ck.rng["torch"])  # a real generator state, usable as is
    gen = torch.Generator()
    gen.set_state(ck.rng["batch"])
    np.random.RandomState().set_state(ck.rng["numpy"])
    random.Random().setstate(ck.rng["python"])
    with h5py.File(path, "r") as fh:  # the documented layout, readable with plain h5py
        assert fh.attrs["format"] == FORMAT_NAME and fh.attrs["format_version"] == 1
        assert fh.attrs["step"] == 30 and fh.attrs["epoch"] == 3 and fh.attrs["config"] == kw["config_toml"]
        assert fh.attrs["zohpc_version"] == __version__
        for group in ("params", "buffers", "masks", "optimizer", "scheduler", "rng", "metrics", "extra"):
            assert group in fh
        np.testing.assert_array_equal(fh["params/fc.weight"][()], kw["params"]["fc.weight"].numpy())
        import json
        assert json.loads(fh["metrics/records"][()]) == kw["metrics"]


def test_extra_defaults_to_empty_dict(tmp_path):
    kw = checkpoint_kwargs()
    kw.pop("extra")
    ck = load_checkpoint(save_checkpoint(str(tmp_path / "c.h5"), **kw))
    assert ck.extra == {}


def test_unsupported_content_leaves_no_file(tmp_path):
    kw = checkpoint_kwargs()
    kw["extra"] = {"bad": object()}
    with pytest.raises(TypeError):
        save_checkpoint(checkpoint_path(tmp_path, 1), **kw)
    assert os.listdir(checkpoint_dir(tmp_path)) == []


# --------------------------------------------------------------------------- damaged files
def write_bytes(path, data):
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def load_same_or_error(path, reference):
    """The property every damaged file must have."""
    try:
        ck = load_checkpoint(path)
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(path) in msg
        return False
    assert_same_checkpoint(reference, ck)
    return True


def test_truncated_files_are_refused(saved, tmp_path):
    _, data, _, _ = saved
    cuts = sorted({0, 1, 7, 8, 100, 512, 2048, len(data) // 3, len(data) // 2, len(data) - TRAILER_SIZE,
                   len(data) - TRAILER_SIZE + 10, len(data) - 1})
    for n in cuts:
        path = write_bytes(tmp_path / f"cut{n}.h5", data[:n])
        with pytest.raises(CheckpointError, match="cut"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(write_bytes(tmp_path / "empty.h5", b""))
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(write_bytes(tmp_path / "half.h5", data[: len(data) // 2]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_bytes_never_load_as_different_data(saved, tmp_path, position, mask):
    path, data, _, reference = saved
    offset = int(position * len(data))
    damaged = bytearray(data)
    damaged[offset] ^= mask
    target = write_bytes(tmp_path / "flip.h5", bytes(damaged))
    load_same_or_error(target, reference)


def test_flipped_bytes_in_header_and_trailer(saved, tmp_path):
    _, data, _, reference = saved
    offsets = list(range(0, 64)) + list(range(len(data) - TRAILER_SIZE - 4, len(data)))
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        assert not load_same_or_error(write_bytes(tmp_path / "flip.h5", bytes(damaged)), reference)


def test_foreign_non_hdf5_and_missing_files(tmp_path):
    foreign = str(tmp_path / "foreign.h5")
    with h5py.File(foreign, "w") as fh:
        fh["data"] = np.arange(10)
        fh.attrs["format"] = "something-else"
    with pytest.raises(CheckpointError, match="not a zohpc-checkpoint file.*something-else"):
        load_checkpoint(foreign)
    plain = str(tmp_path / "plain.h5")
    with h5py.File(plain, "w") as fh:
        fh["x"] = 1
    with pytest.raises(CheckpointError, match="plain.h5: not a zohpc-checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        load_checkpoint(write_bytes(tmp_path / "text.h5", b"hello, this is not HDF5 at all\n" * 10))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.h5"))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path))


def retouch(path, edit):
    """Edit the HDF5 part with h5py, then re-seal: tests the checks behind the trailer."""
    size = os.path.getsize(path)
    os.truncate(path, size - TRAILER_SIZE)
    with h5py.File(path, "r+") as fh:
        edit(fh)
    append_trailer(path)


@pytest.mark.parametrize("case", ["attr", "group", "dtype", "shape", "sha", "complete", "version", "config"])
def test_inner_checks_catch_consistent_looking_damage(saved, tmp_path, case):
    src, data, _, _ = saved
    path = write_bytes(tmp_path / "c.h5", data)

    def edit(fh):
        if case == "attr":
            fh.attrs["step"] = 31
        elif case == "config":
            fh.attrs["config"] = "[train]\nepochs = 99\n"
        elif case == "group":
            del fh["scheduler"]
        elif case == "dtype":
            w = fh["params/fc.bias"][()]
            del fh["params/fc.bias"]
            from zohpc.h5util import write_array
            write_array(fh["params"], "fc.bias", w.astype(np.float64))
        elif case == "shape":
            w = fh["params/fc.weight"][()]
            del fh["params/fc.weight"]
            from zohpc.h5util import write_array
            write_array(fh["params"], "fc.weight", w.reshape(-1))
        elif case == "sha":
            fh["params/fc.bias"][0] += 1.0
        elif case == "complete":
            fh.attrs["complete"] = False
        elif case == "version":
            fh.attrs["format_version"] = 99
    retouch(path, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert path in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- run directories
def make_run(tmp_path, steps=(10, 20, 30), run_id=None):
    kw = checkpoint_kwargs()
    for s in steps:
        kw["step"] = s
        save_checkpoint(checkpoint_path(tmp_path, s, run_id), **kw)
    return kw


def test_list_find_prune_and_temporaries(tmp_path):
    make_run(tmp_path, steps=(9, 100, 20))
    assert checkpoint_path(tmp_path, 20) == os.path.join(str(tmp_path), "checkpoints", "ckpt-00000020.h5")
    leftover = os.path.join(checkpoint_dir(tmp_path), ".ckpt-00000200.h5.tmp-4242")
    write_bytes(leftover, b"partial")
    write_bytes(os.path.join(checkpoint_dir(tmp_path), "notes.txt"), b"x")
    listed = list_checkpoints(tmp_path)
    assert [os.path.basename(p) for p in listed] == ["ckpt-00000100.h5", "ckpt-00000020.h5", "ckpt-00000009.h5"]
    warnings = []
    path, ck = find_resumable(tmp_path, warn=warnings.append)
    assert path == listed[0] and ck.step == 100 and warnings == []
    assert prune_checkpoints(tmp_path, keep=1, run_id="0123456789ab") == []  # names without our run id
    make_run(tmp_path, steps=(5, 50), run_id="0123456789ab")
    ours = [p for p in list_checkpoints(tmp_path) if p not in listed]
    removed = prune_checkpoints(tmp_path, keep=1, run_id="0123456789ab")
    assert removed == [ours[1]] and os.path.basename(ours[1]) == "ckpt-00000005-0123456789ab.h5"
    assert sorted(list_checkpoints(tmp_path)) == sorted(listed + ours[:1])
    assert os.path.exists(leftover)  # not ours to judge: a writer may still be running
    assert list_checkpoints(tmp_path / "nowhere") == [] and find_resumable(tmp_path / "nowhere") is None


def test_find_resumable_skips_corrupted_newest(tmp_path):
    make_run(tmp_path, steps=(10, 20, 30))
    newest = checkpoint_path(tmp_path, 30)
    with open(newest, "r+b") as fh:
        fh.seek(os.path.getsize(newest) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(checkpoint_path(tmp_path, 20), 1000)
    warnings = []
    path, ck = find_resumable(tmp_path, warn=warnings.append)
    assert path == checkpoint_path(tmp_path, 10) and ck.step == 10
    assert len(warnings) == 2
    assert newest in warnings[0] and "checksum mismatch" in warnings[0] and warnings[0].endswith("skipping")
    assert checkpoint_path(tmp_path, 20) in warnings[1]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None and resolve_resume("auto", tmp_path) is None
    make_run(tmp_path, steps=(10, 20))
    path, ck = resolve_resume("auto", tmp_path)
    assert ck.step == 20
    path, ck = resolve_resume(checkpoint_path(tmp_path, 10), "/elsewhere")
    assert ck.step == 10 and path == checkpoint_path(tmp_path, 10)
    path, ck = resolve_resume(str(tmp_path), "/elsewhere")
    assert ck.step == 20
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "nope.h5"), tmp_path)
    bad = write_bytes(tmp_path / "bad.h5", b"junk")
    with pytest.raises(CheckpointError, match="bad.h5"):
        resolve_resume(bad, tmp_path)
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_resume(str(empty_run), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_directory_is_a_checkpoint_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            save_checkpoint(str(locked / "c.h5"), **checkpoint_kwargs())
    finally:
        locked.chmod(0o700)
