"""``python -m zohpc.analyze`` on realistic run directories, checkpoints and mask files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from zohpc import analyze
from zohpc.checkpoint import checkpoint_path, save_checkpoint
from zohpc.config import Config, to_toml
from zohpc.models import build_model

# The documented JSON schema (zohpc/analyze.py docstring): key -> allowed types.
RUN_SCHEMA = {
    "path": (str,), "name": (str,), "kind": (str,), "model": (str, type(None)), "ranks": (int, type(None)),
    "step": (int, type(None)), "epoch": (int, type(None)), "finished": (bool,),
    "best_test_acc": (float, type(None)), "last_test_acc": (float, type(None)), "last_loss": (float, type(None)),
    "queries": (int, type(None)), "wall_seconds": (float, int, type(None)), "steps_logged": (int,),
    "evals_logged": (int,), "checkpoint": (str, type(None)), "config": (dict, type(None)),
    "masks": (dict, type(None)), "param_norms": (dict,), "param_norm_total": (float, type(None)),
    "warnings": (list,),
}
MASKS_SCHEMA = {"source", "sparsity", "layers", "method", "seed", "requested_sparsity"}

STEPS, EVAL_EVERY, QUERIES = 6, 3, 900


def make_run(root, name="run_a", lr=0.05, accs=(0.31, 0.52), finished=True, damaged_tail=False):
    """A run directory in the documented layout, with a checkpoint of a real small model."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    cfg = Config()
    cfg.optim.lr = lr
    cfg.run.out = str(run)
    (run / "config.toml").write_text(to_toml(cfg))
    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(lr * 10)  # runs differ in their weights
    masks = {n: (torch.arange(p.numel()).reshape(p.shape) % 4 != 0) for n, p in model.named_parameters() if p.dim() > 1}
    # start and masks records carry the clock's date, steps and evals seconds since the start
    records = [{"event": "start", "ranks": 2, "model": "digits_cnn", "params": 1946, "active_coords": 1500,
                "time": 1796469552.1},
               {"event": "masks", "epoch": 0, "draw": 0, "active_coords": 1500, "time": 1796469553.0}]
    acc_iter = iter(accs)
    for step in range(1, STEPS + 1):
        records.append({"event": "step", "step": step, "epoch": (step - 1) // EVAL_EVERY, "loss": 2.5 - 0.1 * step,
                        "lr": lr, "queries": QUERIES, "seconds": 0.5, "rank_compute_seconds": [0.4, 0.45],
                        "time": 0.5 * step})
        if step % EVAL_EVERY == 0:
            records.append({"event": "eval", "step": step, "epoch": step // EVAL_EVERY, "test_acc": next(acc_iter),
                            "test_loss": 1.5, "time": 0.5 * step + 0.1})
    if finished:
        records.append({"event": "done", "step": STEPS, "epoch": 2, "best_test_acc": max(accs),
                        "final_test_acc": accs[-1], "queries": STEPS * QUERIES, "wall_seconds": 3.25})
    text = "".join(json.dumps(r) + "\n" for r in records)
    if damaged_tail:
        text += '{"event": "step", "step": 7, "lo'  # a job killed mid-write
    (run / "metrics.jsonl").write_text(text)
    save_checkpoint(checkpoint_path(run, STEPS), step=STEPS, epoch=2, config_toml=to_toml(cfg),
                    params={n: p.detach().clone() for n, p in model.named_parameters()},
                    buffers={n: b.clone() for n, b in model.named_buffers()}, masks=masks,
                    optimizer={"state": {}, "param_groups": [{"lr": lr, "params": list(range(10))}]},
                    scheduler={"last_epoch": 2}, rng={"torch": torch.get_rng_state()}, metrics=records)
    return run, model, masks


def run_main(capsys, *argv):
    code = analyze.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_schema(run: dict):
    assert set(run) == set(RUN_SCHEMA), set(run) ^ set(RUN_SCHEMA)
    for key, types in RUN_SCHEMA.items():
        assert isinstance(run[key], types), (key, run[key])
    assert run["kind"] in ("run", "checkpoint", "masks")
    if run["masks"] is not None:
        assert set(run["masks"]) == MASKS_SCHEMA
        for layer in run["masks"]["layers"].values():
            assert set(layer) == {"sparsity", "numel"}
    assert all(isinstance(v, (float, type(None))) for v in run["param_norms"].values())


def test_json_schema_and_values(tmp_path, capsys):
    run, model, masks = make_run(tmp_path, damaged_tail=True)
    ckpt = checkpoint_path(run, STEPS)
    code, out, err = run_main(capsys, run, ckpt, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"schema_version", "runs"} and doc["schema_version"] == 1
    r, c = doc["runs"]
    for entry in doc["runs"]:
        check_schema(entry)
    assert r["kind"] == "run" and c["kind"] == "checkpoint"
    assert r["model"] == "digits_cnn" and r["ranks"] == 2 and r["finished"] is True
    assert r["step"] == STEPS and r["epoch"] == 2
    assert r["best_test_acc"] == 0.52 and r["last_test_acc"] == 0.52 and r["last_loss"] == pytest.approx(1.9)
    assert r["queries"] == STEPS * QUERIES and r["wall_seconds"] == 3.25
    assert r["steps_logged"] == STEPS and r["evals_logged"] == 2
    assert r["checkpoint"] == ckpt and r["config"]["optim"]["lr"] == 0.05
    assert any("metrics.jsonl" in w and "skipped" in w for w in r["warnings"])
    # per-layer sparsity, counted independently: every 4th entry inactive
    for name, m in masks.items():
        assert r["masks"]["layers"][name]["sparsity"] == pytest.approx(float((~m).sum()) / m.numel())
        assert r["masks"]["layers"][name]["numel"] == m.numel()
    total = sum(m.numel() for m in masks.values())
    assert r["masks"]["sparsity"] == pytest.approx(sum(int((~m).sum()) for m in masks.values()) / total)
    # parameter norms against a float64 reference
    for name, p in model.named_parameters():
        ref = math.sqrt(float((p.detach().double() ** 2).sum()))
        assert r["param_norms"][name] == pytest.approx(ref, rel=1e-12)
    assert r["param_norm_total"] == pytest.approx(
        math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters())), rel=1e-12)
    # the checkpoint alone reports the same history
    assert c["step"] == STEPS and c["queries"] == STEPS * QUERIES and c["best_test_acc"] == 0.52
    assert c["param_norms"] == r["param_norms"] and c["masks"] == r["masks"]


def test_unfinished_run_and_duplicate_steps(tmp_path, capsys):
    run, _, _ = make_run(tmp_path, finished=False)
    with open(run / "metrics.jsonl", "a") as fh:  # step 6 logged twice (replayed after a resume)
        fh.write(json.dumps({"event": "step", "step": STEPS, "epoch": 1, "loss": 1.0, "lr": 0.05,
                             "queries": QUERIES, "seconds": 0.5, "time": 9.0}) + "\n")
    code, out, _ = run_main(capsys, run, "--json")
    r = json.loads(out)["runs"][0]
    assert code == 0 and r["finished"] is False
    assert r["queries"] == STEPS * QUERIES and r["last_loss"] == 1.0 and r["wall_seconds"] == 9.0


def test_wall_seconds_add_up_over_resumed_segments():
    """Each segment's step/eval/stopped times count from its own start: the run's wall time is
    their sum (the done record's whole for the last segment), never a date."""
    seg1 = [{"event": "start", "time": 1796469552.1}, {"event": "step", "step": 1, "time": 500.0},
            {"event": "step", "step": 2, "time": 1000.0}, {"event": "stopped", "step": 2, "signal": "SIGTERM",
                                                            "checkpoint": None, "time": 1001.0}]
    seg2 = [{"event": "resume", "step": 2, "checkpoint": "c.h5"}, {"event": "step", "step": 3, "time": 205.0}]
    s = analyze._apply_metrics(analyze._empty_summary("r", "run"), seg1 + seg2)
    assert s["wall_seconds"] == 1206.0 and s["finished"] is False
    done = {"event": "done", "step": 3, "epoch": 1, "wall_seconds": 210.0}
    s = analyze._apply_metrics(analyze._empty_summary("r", "run"), seg1 + seg2 + [done])
    assert s["wall_seconds"] == 1211.0 and s["finished"] is True


def test_text_comparison_table(tmp_path, capsys):
    a, _, _ = make_run(tmp_path, "run_a", lr=0.05, accs=(0.31, 0.52))
    b, _, _ = make_run(tmp_path, "run_b", lr=0.1, accs=(0.40, 0.61))
    code, out, _ = run_main(capsys, a, b)
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["run_a", "run_b"]
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in out.splitlines() if len(line.split()) > 3}
    assert rows["best test"][-2:] == ["0.52", "0.61"]
    assert "Config differences:" in out
    lr_line = next(line for line in out.splitlines() if line.startswith("optim.lr"))
    assert lr_line.split()[1:] == ["0.05", "0.1"]
    assert "features.0.weight" in out and "Mask sparsity per layer" in out and "Parameter L2 norms" in out
    assert "5,400" in out  # queries


def test_mask_file(tmp_path, capsys):
    masks_mod = pytest.importorskip("zohpc.masks")
    model = build_model("digits_cnn", (1, 8, 8), 10)
    names = masks_mod.maskable_names(model)
    ratios = {n: 0.25 * (i + 1) for i, n in enumerate(names)}
    masks = masks_mod.layerwise_random_masks(model, ratios, seed=3, draw=0)
    path = tmp_path / "masks.h5"
    masks_mod.write_mask_file(str(path), model_name="digits_cnn", masks=masks, method="zo_grasp", seed=3,
                              sparsity=0.5)
    code, out, err = run_main(capsys, path, "--json")
    assert code == 0, err
    r = json.loads(out)["runs"][0]
    check_schema(r)
    assert r["kind"] == "masks" and r["model"] == "digits_cnn"
    assert r["masks"]["method"] == "zo_grasp" and r["masks"]["seed"] == 3 and r["masks"]["requested_sparsity"] == 0.5
    for n in names:
        assert r["masks"]["layers"][n]["sparsity"] == pytest.approx(float((~masks[n]).sum()) / masks[n].numel())
    code, out, _ = run_main(capsys, path)
    method_row = next(line for line in out.splitlines() if line.startswith("mask method"))
    assert code == 0 and method_row.split()[-1] == "zo_grasp" and names[0] in out


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, _, _ = make_run(tmp_path, "run_a")
    png = tmp_path / "curves.png"
    code, out, err = run_main(capsys, a, checkpoint_path(a, STEPS), "--plot", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    a, _, _ = make_run(tmp_path, "run_a")
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code, out, err = run_main(capsys, a, "--plot", tmp_path / "x.png")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    ckpt = checkpoint_path(run, STEPS)
    corrupted = tmp_path / "corrupted.h5"
    data = bytearray(open(ckpt, "rb").read())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh["x"] = np.arange(3)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    cases = {tmp_path / "missing": "no such file", corrupted: "checksum mismatch", foreign: "not a zohpc",
             text: "not HDF5", empty_dir: "not a zohpc run directory"}
    for path, expected in cases.items():
        code, out, err = run_main(capsys, run, path)
        assert code == 2, path
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert str(path) in err and expected in err, err


def test_run_with_corrupted_newest_checkpoint_warns(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    with open(checkpoint_path(run, STEPS), "r+b") as fh:
        fh.truncate(500)
    code, out, _ = run_main(capsys, run, "--json")
    r = json.loads(out)["runs"][0]
    assert code == 0 and r["checkpoint"] is None and r["param_norms"] == {}
    assert any(checkpoint_path(run, STEPS) in w and w.endswith("skipping") for w in r["warnings"])
    assert r["best_test_acc"] == 0.52  # the metrics still count


def test_module_entry_point(tmp_path):
    run, _, _ = make_run(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "zohpc.analyze", str(run), "--json"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["runs"][0]["queries"] == STEPS * QUERIES
    p = subprocess.run([sys.executable, "-m", "zohpc.analyze", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr.startswith("zohpc.analyze: error:") and "nope" in p.stderr


def test_real_training_run_directory(tmp_path):
    """A directory written by a real (short) zohpc.train run, analyzed by the CLI."""
    run = tmp_path / "real"
    env = dict(os.environ, OMP_NUM_THREADS="1", ZOHPC_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "zohpc.train", "--out", str(run), "--set", "train.epochs=2",
                        "--set", "data.limit=256", "--set", "prune.queries=16"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr
    png = tmp_path / "curves.png"
    p = subprocess.run([sys.executable, "-m", "zohpc.analyze", str(run), "--json", "--plot", str(png)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (r,) = doc["runs"]
    check_schema(r)
    assert r["kind"] == "run" and r["finished"] and r["step"] == 8 and r["evals_logged"] == 2
    assert 0.0 <= r["last_test_acc"] <= 1.0 and r["queries"] > 0
    assert abs(r["masks"]["sparsity"] - 0.5) < 0.01  # the default zo_grasp sparsity, from the checkpoint
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
