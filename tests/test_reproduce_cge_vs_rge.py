"""``python -m zohpc.reproduce cge_vs_rge --quick`` under two ranks: rows, fields, and CGE
(and RGE) beating the untrained model; the table's goal checks."""

import json
import os

import pytest

from mpi_util import run_ranks

from zohpc.reproduce import cge_vs_rge as study

FIELDS = {"params", "fo", "cge", "rge", "cge_seconds", "cge_no_reuse_seconds"}


def test_quick_study_under_two_ranks(tmp_path):
    out = tmp_path / "cvr"
    proc = run_ranks(2, ["-m", "zohpc.reproduce", "cge_vs_rge", "--quick", "--json", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert [r["params"] for r in rows] == [730, 3700]  # the paper's counts for cnn_d1, cnn_d2
    for r in rows:
        assert FIELDS <= set(r)
        assert r["cge"] > r["init"] + 10  # CGE trains
        assert r["cge_seconds"] > 0 and r["cge_no_reuse_seconds"] > r["cge_seconds"]  # reuse pays here
    for ext in ("json", "txt", "png"):
        assert os.path.getsize(out / f"cge_vs_rge.{ext}") > 0


def test_models_match_paper_parameter_counts():
    counts = [sum(p.numel() for p in study.make_model(d, 0).parameters()) for d in range(1, 6)]
    assert counts == study.PAPER["params"]
    a, b = study.make_model(3, 0), study.make_model(3, 0)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))


def test_table_goal_checks():
    row = {"params": 730, "fo": 90.0, "cge": 89.5, "rge": 80.0, "cge_seconds": 1.0, "cge_no_reuse_seconds": 3.0}
    res = {"rows": [row], "settings": {"epochs": 1, "batch_size": 8, "rge_queries": 4, "timing": "t"}}
    text = study.table(res)
    assert "within 1 point of FO at every size: met" in text and "3.0x" in text
    res["rows"] = [{**row, "cge": 88.0}]
    assert "within 1 point of FO at every size: NOT met" in study.table(res)


def test_plot_writes_png(tmp_path):
    row = {"params": 730, "fo": 90.0, "cge": 89.5, "rge": 80.0, "cge_seconds": 1.0, "cge_no_reuse_seconds": 3.0}
    study.plot({"rows": [row, {**row, "params": 3700}]}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_step_seconds_reads_step_records_only():
    history = [{"event": "start"}, {"event": "ready", "step": 0, "startup_seconds": 9.0},
               {"event": "step", "step": 1, "seconds": 5.0}, {"event": "step", "step": 2, "seconds": 1.0},
               {"event": "step", "step": 3, "seconds": 3.0},
               {"event": "eval", "step": 3, "test_loss": 1.0, "seconds": 99.0},
               {"event": "done", "step": 3, "wall_seconds": 50.0}]
    assert study.step_seconds({"history": history}, 2, 3) == 2.0
    assert study.step_seconds({"history": history}, 1, 1) == 5.0
    with pytest.raises(RuntimeError, match="steps 2..4"):
        study.step_seconds({"history": history}, 2, 4)
