"""The launch guard: a launcher/MPI mismatch stops every entry point with one line, exit 2, no files."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mpi_util import ROOT, env as mpi_env, run_ranks
from zohpc.errors import UserError
from zohpc.launch import check_launch, slurm_step_tasks

SRUN_WITHOUT_PLUGIN = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"SLURM_NTASKS": "4"}, None),                          # the batch shell: not in a step
    ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "3"}, 4),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, 2),  # the step's own count wins
    ({"SLURM_STEP_NUM_TASKS": "x"}, None),
])
def test_slurm_step_tasks(environ, expected):
    assert slurm_step_tasks(environ) == expected


@pytest.mark.parametrize("environ", [
    SRUN_WITHOUT_PLUGIN,
    {"SLURM_STEP_NUM_TASKS": "8"},
    {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "5"},
])
def test_srun_without_mpi_plugin_is_refused(environ):
    with pytest.raises(UserError) as info:
        check_launch(1, environ)
    msg = str(info.value)
    assert "\n" not in msg and "srun --mpi=pmi2" in msg and "mpirun" in msg and "1-rank MPI world" in msg


@pytest.mark.parametrize("world,environ", [
    (1, {}),
    (1, {"SLURM_NTASKS": "4"}),                              # one process in the batch shell is fine
    (1, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}),
    (4, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0", "PMI_SIZE": "4"}),  # srun --mpi=pmi2
    (8, {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "1", "PMI_SIZE": "8"}),  # mpirun: one proxy per node
    (2, {"PMI_SIZE": "2", "PMI_RANK": "1"}),                 # mpiexec (hydra)
    (3, {"OMPI_COMM_WORLD_SIZE": "3"}),
])
def test_consistent_launches_pass(world, environ):
    check_launch(world, environ)


@pytest.mark.parametrize("name", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
@pytest.mark.parametrize("world,launched", [(1, 4), (2, 4), (4, 2)])
def test_launcher_world_size_disagrees(name, world, launched):
    with pytest.raises(UserError) as info:
        check_launch(world, {name: str(launched)})
    msg = str(info.value)
    assert "\n" not in msg and f"{name}={launched}" in msg and f"has {world}" in msg and "srun --mpi=pmi2" in msg


def test_train_refused_before_touching_the_run_directory(tmp_path):
    out = tmp_path / "run"
    env = {**mpi_env(), **SRUN_WITHOUT_PLUGIN, "PYTHONPATH": ROOT}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "zohpc.train", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zohpc.train: error: this Slurm step has 2 tasks"), p.stderr
    assert "srun --mpi=pmi2" in lines[0]
    assert not out.exists() and os.listdir(tmp_path) == []
    assert seconds < 60  # start-up only: no data, model or training


@pytest.mark.parametrize("module,args", [("zohpc.prune", ["--out", "m.h5"]),
                                         ("zohpc.data", ["convert", "--from", "digits", "--out", "d.h5"])])
def test_other_entry_points_are_guarded(tmp_path, module, args):
    env = {**mpi_env(), "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_ID": "0", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "this Slurm step has 3 tasks" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_two_ranks_with_wrong_launcher_size_exit_2_once(tmp_path):
    # mpiexec itself sets PMI_SIZE=2; an OMPI_COMM_WORLD_SIZE from another launcher disagrees
    p = run_ranks(2, ["-m", "zohpc.train", "--out", str(tmp_path / "run")], timeout=120,
                  OMPI_COMM_WORLD_SIZE=4, PYTHONPATH=ROOT)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "OMPI_COMM_WORLD_SIZE=4" in lines[0], p.stderr  # exit 2 on both, printed once
    assert not (tmp_path / "run").exists()
