"""``python -m zohpc.plan``: its JSON, its sbatch header, its answers to bad input.
(Whether its predictions hold is measured, not asserted: README "Planning a run".)"""

from __future__ import annotations

import json
import re

import pytest

from mpi_util import ROOT
from zohpc.plan import SIGNAL_LEAD_SECONDS, build_parser, run, slurm_header

KEYS = {"step_seconds", "epoch_seconds", "run_seconds", "imbalance", "comm_bytes_per_step", "memory_per_rank_mb"}


def test_json_has_the_predictions(capsys):
    from zohpc.comm import world

    args = build_parser().parse_args(["--ranks", "3", "--json", "--budget", "0.5", "--set", "train.epochs=2"])
    assert run(world(), args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert KEYS <= set(plan)
    assert plan["ranks"] == 3 and plan["imbalance"] >= 1.0
    assert 0 < plan["step_seconds"] and plan["epoch_seconds"] >= plan["steps_per_epoch"] * plan["step_seconds"]
    assert plan["run_seconds"] >= plan["total_steps"] * plan["step_seconds"]
    assert plan["total_steps"] == 2 * plan["steps_per_epoch"]
    assert plan["comm_bytes_per_step"] > plan["bytes"]["parameters_and_buffers"]  # 2 receivers of the parameters
    assert plan["memory_per_rank_mb"] > 0


def test_slurm_header_matches_the_templates():
    with open(f"{ROOT}/jobs/train.sbatch") as fh:
        lead = int(re.search(r"--signal=B:USR1@(\d+)", fh.read()).group(1))
    assert lead == SIGNAL_LEAD_SECONDS
    plan = {"ranks": 6, "run_seconds": 3600.0, "step_seconds": 1.0, "epoch_seconds": 60.0}
    args = build_parser().parse_args(["--ranks", "6", "--device", "cuda", "--gpus-per-node", "4", "--threads", "8"])
    lines = slurm_header(plan, args)
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --cpus-per-task=8" in lines
    assert "#SBATCH --time=01:17:00" in lines  # 3600 s x 1.25 + 120 s, rounded up to minutes
    assert f"#SBATCH --signal=B:USR1@{lead}" in lines and "#SBATCH --requeue" in lines
    args = build_parser().parse_args(["--ranks", "6", "--margin", "2"])
    plan["run_seconds"] = 3 * 86400.0
    lines = slurm_header(plan, args)
    assert "#SBATCH --nodes=1" in lines and "#SBATCH --time=6-00:02:00" in lines
    assert not any("gpus" in line for line in lines)


@pytest.mark.parametrize("argv,culprit", [
    (["--ranks", "0"], "--ranks"),
    (["--ranks", "100000000"], "--ranks must be <= 100,000"),
    (["--ranks", "two"], "--ranks"),
    (["--ranks", "2", "--bandwidth-gbs", "-1"], "--bandwidth-gbs"),
    (["--ranks", "2", "--config", "/nonexistent/zohpc.toml"], "/nonexistent/zohpc.toml"),
    (["--ranks", "2", "--set", "zo.estimator=spsa"], "zo.estimator"),
])
def test_bad_input_one_line_exit_2(argv, culprit, capsys):
    from zohpc.plan import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zohpc.plan: error:") and culprit in lines[0], lines
