"""Faults a crash, a full disk, a second signal or a crafted file can cause: each ends in one
line and a defined exit code, with the run directory's files as they were (hashes), and a
stop still resumes bit-identically."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from mpi_util import ROOT, env, mpiexec, run_ranks
from zohpc import checkpoint as ckpt
from zohpc.errors import CheckpointError
from zohpc.h5util import TRAILER_SIZE, append_trailer, write_array

ARGS = ["--set", "train.epochs=2", "--set", "data.limit=256", "--set", "data.batch_size=64",
        "--set", "prune.method=random", "--set", "train.log_every_seconds=1000"]
VOLATILE = {"time", "seconds", "rank_compute_seconds", "wall_seconds", "startup_seconds", "phases"}


def train(k, out, *extra, timeout=240, **env_extra):
    return run_ranks(k, ["-m", "zohpc.train", "--out", str(out), *ARGS, *extra], timeout=timeout, **env_extra)


def tree_hashes(path):
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_one_line(p, code, *needles):
    """Exit ``code``, exactly one line printed, no traceback, the line names ``needles``."""
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in lines if "error:" in line or "stop (" in line]
    assert len(errors) == 1, p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def assert_only_error_line(p, code, *needles):
    """Exit ``code`` and the whole output is one line (a refusal before any start-up phase)."""
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == code and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def trajectory(out):
    last = {}
    for r in records(out):
        if r["event"] in ("step", "eval"):
            last[(r["event"], r["step"])] = {k: v for k, v in r.items() if k not in VOLATILE}
    return [last[k] for k in sorted(last, key=lambda k: (k[1], k[0]))]


def final_params(out):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(str(out))[0]).params


def assert_same_run(a, b):
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert trajectory(a) == trajectory(b)
    assert [r["event"] for r in records(b)].count("done") >= 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (1 rank), and its newest checkpoint for crafting files from."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    p = train(1, out)
    assert p.returncode == 0, p.stderr
    return out


# ------------------------------------------------------------------ run directories
def test_second_process_on_a_claimed_directory_exits_2_and_changes_nothing(reference, tmp_path):
    """The claim is an flock: while a live process holds it, a start (here --resume auto) is
    refused in one line; the holder's death (kill -9 included) frees it without clean-up."""
    before = tree_hashes(reference)
    fd = os.open(os.path.join(reference, "lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        p = train(1, reference, "--resume", "auto", timeout=120)
    finally:
        os.close(fd)  # what the kernel does for a killed holder
    assert_only_error_line(p, 2, "in use by another run", str(reference))
    assert tree_hashes(reference) == before
    p = train(1, reference, "--resume", "auto", timeout=120)
    assert p.returncode == 0 and "already complete" in p.stderr, p.stderr
    assert tree_hashes(reference) == before


def test_claim_is_exclusive_and_released_by_a_killed_holder(tmp_path):
    from zohpc.errors import UserError
    from zohpc.rundir import claim_directory

    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from zohpc.rundir import claim_directory; "
                               f"c = claim_directory({out!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="in use by another run"):
        claim_directory(out)
    holder.kill()  # SIGKILL: no clean-up runs
    holder.wait(30)
    claim = claim_directory(out)
    claim.release()


def test_out_below_a_regular_file_is_one_line_before_heavy_work(tmp_path):
    (tmp_path / "file").write_text("x")
    before = tree_hashes(tmp_path)
    p = train(1, tmp_path / "file" / "run", timeout=120)
    assert_only_error_line(p, 2, str(tmp_path / "file"), "ENOTDIR")
    assert tree_hashes(tmp_path) == before


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (root in a container)")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (size-limited, so it fills up); unmounted afterwards."""
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=1m")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _fill(mnt, leave=0):
    """Fill the file system, leaving about ``leave`` bytes."""
    with open(os.path.join(mnt, "filler"), "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        size = os.path.getsize(os.path.join(mnt, "filler"))
        os.truncate(os.path.join(mnt, "filler"), max(0, size - leave))


def test_read_only_out_is_one_line_before_heavy_work(tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "size=1m,ro")
    try:
        p = train(1, mnt / "run", timeout=120)
        assert_only_error_line(p, 2, str(mnt), "EROFS")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_at_start_is_one_line_and_leaves_no_temporaries(small_fs):
    _fill(small_fs)
    before = tree_hashes(small_fs)
    p = train(1, small_fs / "run", timeout=120)
    assert_only_error_line(p, 2, "ENOSPC")
    assert tree_hashes(small_fs) == before and sorted(os.listdir(small_fs)) == ["filler"]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_two_ranks_no_hang_previous_intact(small_fs):
    out = small_fs / "run"
    p = train(2, out, "--set", "train.max_steps=4", "--set", "checkpoint.keep=1", timeout=240)
    assert p.returncode == 0, p.stderr
    first = ckpt.list_checkpoints(str(out))
    before = tree_hashes(os.path.join(out, "checkpoints"))
    _fill(small_fs, leave=8192)  # room for a few metrics lines, not for a checkpoint
    p = train(2, out, "--resume", "auto", timeout=240)
    assert_one_line(p, 2, "ENOSPC")
    assert tree_hashes(os.path.join(out, "checkpoints")) == before  # no temporaries, previous intact
    os.remove(os.path.join(small_fs, "filler"))
    p = train(2, out, "--resume", "auto", timeout=240)
    assert p.returncode == 0, p.stderr
    assert ckpt.list_checkpoints(str(out))[0] != first[0]


def test_out_with_a_newline_is_stored_losslessly(tmp_path):
    from zohpc.config import from_toml_text, load_config, to_toml

    out = str(tmp_path / "a\nb\t\"c\\")
    cfg = load_config(None, [], out)
    assert from_toml_text(to_toml(cfg), "test", check_paths=False).run.out == out


@pytest.mark.slow
def test_refused_mask_file_is_refused_before_the_directory(tmp_path):
    bad = tmp_path / "masks.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    out = tmp_path / "run"
    p = train(1, out, "--set", f"prune.masks_file={bad}", timeout=120)
    assert_one_line(p, 2, str(bad))
    assert not out.exists()
    p = train(1, out, "--resume", "auto", "--set", "train.max_steps=1", timeout=120)
    assert p.returncode == 0, p.stderr
    assert [r["event"] for r in records(out)].count("start") == 1


def test_refused_start_leaves_a_directory_a_fresh_rerun_accepts(tmp_path):
    """plan_start: a directory whose run never stepped (no checkpoint, no step record) is
    taken over by a new start; one that stepped is refused."""
    from zohpc.config import load_config
    from zohpc.errors import UserError
    from zohpc.rundir import plan_start

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "0123456789ab"}) + "\n")
    (out / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    cfg = load_config(None, [], str(out))
    assert plan_start(cfg, None, print).takeover and plan_start(cfg, "auto", print).takeover
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "step", "step": 1}) + "\n")
    with pytest.raises(UserError, match="already holds a run"):
        plan_start(cfg, None, print)


# ------------------------------------------------------------------ metrics.jsonl
def test_append_after_a_cut_line_keeps_every_line_a_record(tmp_path):
    from zohpc import metrics as rec

    path = str(tmp_path / "metrics.jsonl")
    log = rec.MetricsLog(path)
    log.write(rec.Start(ranks=1))
    log.write(rec.Step(step=1))
    with open(path, "rb+") as fh:  # a crash in the middle of the second append
        fh.truncate(os.path.getsize(path) - 9)
    rec.MetricsLog(path).write(rec.Resume(step=0, checkpoint="x"))
    events = [json.loads(line)["event"] for line in open(path)]
    assert events == ["start", "resume"]


# ------------------------------------------------------------------ untrusted HDF5
def _recraft(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst``, let ``edit(h5py.File)`` change it, and seal it with a
    valid trailer (what an attacker can always do: the trailer is only a checksum)."""
    data = open(src, "rb").read()[:-TRAILER_SIZE]
    with open(dst, "wb") as fh:
        fh.write(data)
    with h5py.File(dst, "r+") as fh:
        edit(fh)
    append_trailer(str(dst))
    return str(dst)


def _newest(reference):
    return ckpt.list_checkpoints(str(reference))[0]


def _replace(group, name, array):
    del group[name]
    write_array(group, name, array)


def _bomb(fh):
    tree = json.loads(fh["params"]["__tree__"][()].decode())
    node = tree["root"]["items"][0][1]
    node["shape"] = [400_000_000]
    del fh["params"][node["ds"]]
    ds = fh["params"].create_dataset(node["ds"], shape=(400_000_000,), dtype="float32", chunks=(1 << 20,),
                                     fletcher32=True)
    ds.attrs["sha256"] = "0" * 64
    ds.attrs["bool"] = False
    _replace(fh["params"], "__tree__", np.bytes_(json.dumps(tree).encode()))


MEMORY_PROBE = """
import resource, sys
from zohpc.errors import CheckpointError
kind, path = sys.argv[1], sys.argv[2]
try:
    if kind == "checkpoint":
        from zohpc.checkpoint import load_checkpoint
        load_checkpoint(path)
    else:
        from zohpc.masks import read_mask_file
        read_mask_file(path)
    print("loaded")
except CheckpointError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak(kind, path):
    p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, path], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env())
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    message, rss = p.stdout.strip().splitlines()
    return message, int(rss)


def test_checkpoint_memory_bomb_is_refused_below_1_gb(reference, tmp_path):
    path = _recraft(_newest(reference), tmp_path / "bomb.h5", _bomb)
    assert os.path.getsize(path) < 1 << 20
    message, rss = _peak("checkpoint", path)
    assert "declares 1600000000 bytes" in message and path in message, message
    assert rss < 1 << 30


def test_mask_file_memory_bomb_is_refused_below_1_gb(tmp_path):
    from zohpc.masks import write_mask_file

    src = str(tmp_path / "masks.h5")
    write_mask_file(src, model_name="m", masks={"w": torch.ones(4, 4, dtype=torch.bool)}, method="random", seed=0,
                    sparsity=0.0)

    def bomb(fh):
        del fh["masks"]["w"]
        ds = fh["masks"].create_dataset("w", shape=(1 << 30,), dtype="uint8", chunks=(1 << 20,))
        ds.attrs["sha256"], ds.attrs["bool"], ds.attrs["ratio"] = "0" * 64, True, 0.0
        ds.attrs["shape"] = np.array([1 << 30])

    path = _recraft(src, tmp_path / "bomb.h5", bomb)
    message, rss = _peak("masks", path)
    assert "declares" in message and path in message, message
    assert rss < 1 << 30


def _external(target):
    def edit(fh):
        name = json.loads(fh["params"]["__tree__"][()].decode())["root"]["items"][0][1]["ds"]
        del fh["params"][name]
        fh["params"][name] = h5py.ExternalLink(target, "/data")
    return edit


def _soft(fh):
    name = json.loads(fh["params"]["__tree__"][()].decode())["root"]["items"][0][1]["ds"]
    fh["params"]["alias"] = h5py.SoftLink(f"/params/{name}")


def _hard(fh):
    name = json.loads(fh["params"]["__tree__"][()].decode())["root"]["items"][0][1]["ds"]
    fh["extra"]["again"] = fh["params"][name]


@pytest.mark.parametrize("kind", ["external", "soft", "hard"])
def test_links_of_any_kind_are_refused_before_being_followed(reference, tmp_path, kind):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)  # opening it would block: the link must never be followed
    edit = {"external": _external(fifo), "soft": _soft, "hard": _hard}[kind]
    path = _recraft(_newest(reference), tmp_path / f"{kind}.h5", edit)
    with pytest.raises(CheckpointError, match="links are refused") as info:
        ckpt.load_checkpoint(path)
    assert path in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_external_link_to_a_fifo_is_one_line_and_exit_2_under_two_ranks(reference, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    path = _recraft(_newest(reference), tmp_path / "ext.h5", _external(fifo))
    p = train(2, tmp_path / "run", "--resume", path, timeout=120)
    assert_only_error_line(p, 2, path, "external link")


def _resave(reference, dst, **changes):
    """A checkpoint of ``reference`` re-written with some fields changed (a valid file)."""
    ck = ckpt.load_checkpoint(_newest(reference))
    kw = {f: getattr(ck, f) for f in ("step", "epoch", "config_toml", "params", "buffers", "masks", "optimizer",
                                      "scheduler", "rng", "metrics", "extra")}
    for key, value in changes.items():
        if key.startswith("extra."):
            kw["extra"] = dict(kw["extra"], **{key[6:]: value})
        else:
            kw[key] = value
    return ckpt.save_checkpoint(str(dst), **kw)


def _expect(reference):
    from zohpc.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    return ckpt.Expect.of(model, steps_per_epoch=4)


@pytest.mark.parametrize("change,field", [
    ({"rng": {"torch": torch.zeros(7, dtype=torch.uint8)}}, "rng.torch"),
    ({"rng": {"torch": torch.zeros(5056, dtype=torch.uint8)}}, "rng.torch"),
    ({"extra.batch_in_epoch": "3"}, "extra.batch_in_epoch"),
    ({"extra.costs": ["x"]}, "extra.costs"),
    ({"extra.mask_ratios": {"conv1.weight": 7.0}}, "extra.mask_ratios"),
    ({"step": -4}, "field step"),
    ({"step": 5}, "field step"),
])
def test_restored_fields_are_validated_one_line_naming_file_and_field(reference, tmp_path, change, field):
    path = _resave(reference, tmp_path / "c.h5", **change)
    ckpt.load_checkpoint(path)  # a sound file: only the model's expectations refuse it
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path, _expect(reference))
    assert path in str(info.value) and field in str(info.value) and "\n" not in str(info.value)


def test_declared_shapes_are_checked_against_the_model_before_reading(reference, tmp_path):
    ck = ckpt.load_checkpoint(_newest(reference))
    name = next(iter(ck.params))
    params = dict(ck.params, **{name: torch.zeros(3, 3)})
    path = _resave(reference, tmp_path / "c.h5", params=params)
    with pytest.raises(CheckpointError, match=f"field params.{name}: declares float32 \\[3, 3\\]"):
        ckpt.load_checkpoint(path, _expect(reference))


@pytest.mark.slow
def test_negative_step_under_two_ranks_is_one_line_exit_2(reference, tmp_path):
    path = _resave(reference, tmp_path / "c.h5", step=-4)
    p = train(2, tmp_path / "run", "--resume", path, timeout=180)
    assert_one_line(p, 2, path, "field step")


# ------------------------------------------------------------------ signals
def _sigterm_caught(pid) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_the_imports_exits_75(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "zohpc.train", "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    deadline = time.time() + 30
    while not _sigterm_caught(proc.pid) and time.time() < deadline:
        time.sleep(0.001)
    assert "torch" not in open(f"/proc/{proc.pid}/maps").read()  # still importing
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert_one_line(p, 75, "stop (SIGTERM) at step 0")


@pytest.mark.slow
def test_second_sigterm_keeps_exit_75_and_resume_is_identical(reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "zohpc.train", "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env(ZOHPC_TEST_SIGNAL="step:6"))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "test hook: SIGTERM" in line:
            proc.send_signal(signal.SIGTERM)  # the second one, while the first is being handled
        if "stop (" in line:
            proc.send_signal(signal.SIGTERM)  # and a third, during the exit
    proc.wait(120)
    p = subprocess.CompletedProcess(cmd, proc.returncode, "", "".join(lines))
    assert_one_line(p, 75, "stop (SIGTERM)")
    p = train(1, out, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    assert_same_run(reference, out)


@pytest.mark.slow
def test_stop_during_the_final_evaluation_resumes_to_a_complete_run(reference, tmp_path):
    out = tmp_path / "run"
    p = train(1, out, ZOHPC_TEST_SIGNAL="eval1:1")
    assert_one_line(p, 75, "stop (SIGTERM) at step 8")
    before = [r["event"] for r in records(out)]
    assert before.count("eval") == 1 and "done" not in before
    p = train(1, out, "--resume", "auto")
    assert p.returncode == 0 and "already complete" not in p.stderr, p.stderr
    assert_same_run(reference, out)
    events = [r["event"] for r in records(out)]
    assert events.count("eval") == 2 and events[-1] == "done"


@pytest.mark.parametrize("argv, needles", [
    (["-m", "zohpc.plan", "--ranks", "2"], ["runs as one process", "without mpirun"]),
    (["-m", "zohpc.export", "/nonexistent/ckpt.h5", "/nonexistent/out.h5"], ["/nonexistent/ckpt.h5"]),
    (["-m", "zohpc.bench", "engine", "--mu", "0", "--json"], ["option --mu"]),
    (["-m", "zohpc.bench", "device"], ["bench device runs as one process"]),
], ids=["plan", "export", "bench", "bench_device"])
def test_one_process_tools_under_mpirun_refuse_once(argv, needles):
    """Tools that work on one rank, started under mpirun with bad input: exit 2 on every rank,
    the line printed once, no MPI_Abort."""
    p = run_ranks(2, argv, timeout=120)
    assert_only_error_line(p, 2, *needles)
    assert "Abort" not in p.stderr
