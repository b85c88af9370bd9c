"""Slurm templates without Slurm: valid bash, settings from the environment, real CLI options and
config keys, and the preempt/requeue logic.

The behavioural tests run the templates with plain bash and fake ``srun``/``scontrol``
executables first on PATH: the fake srun records the command line it was given and plays a
run that finishes, fails, or checkpoints and exits 75 on SIGUSR1; the fake scontrol records
requeues and reports a restart count. tests/test_slurm.py runs the same templates on a real
Slurm cluster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zohpc.config import Config, apply_mapping, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
TEMPLATES = ["train.sbatch", "prune.sbatch", "sweep.sbatch"]
SHARED_MARK = "# ============ shared by jobs/*.sbatch from here on"


def sweep_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def sbatch_options(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_valid_bash_and_works_as_shipped(name):
    p = subprocess.run(["bash", "-n", str(JOBS / name)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    text = (JOBS / name).read_text()
    assert text.startswith("#!/bin/bash\n")
    assert not re.search(r"<[A-Z][A-Z_]+>", text), "placeholders make an unedited template fail at submit"
    for opt in sbatch_options(text):
        # site-specific: a GPU request is an invalid gres on a CPU cluster, a partition or
        # account may not exist, a time limit may exceed the partition's (EnforcePartLimits)
        assert not opt.startswith(("--gpus", "--gres", "--partition", "--account", "--time", "-p", "-A", "-t")), opt
    assert any(opt.startswith("--output=slurm-%x-") for opt in sbatch_options(text))


def test_templates_share_one_launch_block():
    """The launch, signal forwarding and requeue code is the same text in every template."""
    blocks = {}
    for name in TEMPLATES:
        text = (JOBS / name).read_text()
        assert text.count(SHARED_MARK) == 1, name
        blocks[name] = text[text.index(SHARED_MARK):]
    assert len(set(blocks.values())) == 1, "jobs/*.sbatch: the shared blocks differ"


def test_train_templates_resume_and_requeue():
    for name in ("train.sbatch", "sweep.sbatch"):
        opts = sbatch_options((JOBS / name).read_text())
        assert "--requeue" in opts and "--open-mode=append" in opts
        assert any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in opts)


def test_sweep_file_keys_are_real_config_keys():
    lines = sweep_lines(JOBS / "sweep.txt")
    assert len(lines) == 6  # the template's default --array=1-6
    assert "--array=1-6%3" in sbatch_options((JOBS / "sweep.sbatch").read_text())
    for line in lines:
        for kv in line.split():
            section, key, value = parse_override(kv)
            apply_mapping(Config(), {section: {key: value}}, f"--set {kv}")  # ConfigError on an unknown key/type
        load_config(None, line.split())  # every sweep run is a complete, valid config


# --------------------------------------------------------------------------- behaviour
FAKE_SRUN = r"""#!/bin/bash
# fake srun: record the command line, then play a run
printf '%s\n' "$@" > "$FAKE_DIR/srun.args"
echo "fake srun output"
case "$FAKE_MODE" in
    ok) exit 0 ;;
    fail) exit 2 ;;
    preempt)
        trap 'echo usr1 >> "$FAKE_DIR/signals"; kill "$child" 2>/dev/null; exit 75' USR1
        sleep 30 & child=$!
        touch "$FAKE_DIR/started"
        wait "$child"
        exit 1 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol.log"
case "$*" in
    *"show job"*) echo "JobId=$SLURM_JOB_ID JobName=x Requeue=1 Restarts=${FAKE_RESTARTS:-0} BatchFlag=1" ;;
    requeue*) exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""
BROKEN_PYTHON = """#!/bin/bash
exit 1
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    # the python that imports this zohpc (a wrapper, not a symlink: a symlinked venv python
    # outside its venv does not find the venv's packages)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_DIR": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zohpc-train",
           "SLURM_CPUS_PER_TASK": "3"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return tmp_path, env


def run_template(name, env, *args, timeout=60):
    return subprocess.run(["bash", str(JOBS / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def recorded_command(tmp_path, module):
    args = (tmp_path / "srun.args").read_text().splitlines()
    i = args.index("python")
    assert args[i + 1:i + 3] == ["-m", f"zohpc.{module}"]
    return args[:i], args[i + 3:]


def parse_with(module, argv):
    mod = __import__(f"zohpc.{module}", fromlist=["build_parser"])
    return mod.build_parser().parse_args(argv)


def log_of(tmp_path, out, name="train", job="4242"):
    return (tmp_path / "submit" / out / "logs" / f"{name}-{job}.out").read_text()


def preempt(tmp_path, env):
    proc = subprocess.Popen(["bash", str(JOBS / "train.sbatch")], env={**env, "FAKE_MODE": "preempt"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what Slurm does 120 s before the time limit
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "signals").read_text().split() == ["usr1"]  # forwarded to the step, once
    return proc.returncode, out + err, log_of(tmp_path, "runs/zohpc-train-4242")


def test_train_preempted_checkpoint_requeues(fake_slurm):
    tmp_path, env = fake_slurm
    rc, shell_out, log = preempt(tmp_path, env)
    assert rc == 75, log
    assert (tmp_path / "scontrol.log").read_text().split("\n")[-2].split() == ["requeue", "4242"]
    assert "SIGUSR1 received" in log and "requeued job 4242; it resumes from the checkpoint" in log
    srun_opts, argv = recorded_command(tmp_path, "train")
    assert srun_opts == ["--mpi=pmi2", "--wait=60"]
    args = parse_with("train", argv)
    assert args.resume == "auto" and args.out == "runs/zohpc-train-4242" and args.config is None
    # the job's own output file only points at the log in the run directory
    assert shell_out.strip() == "train.sbatch: job 4242: output goes to runs/zohpc-train-4242/logs/train-4242.out"


def test_requeue_from_outside_is_recognised(fake_slurm):
    """`scontrol requeue` from outside: Slurm already counts the restart, the script must not say it failed."""
    tmp_path, env = fake_slurm
    rc, _, log = preempt(tmp_path, {**env, "FAKE_RESTARTS": "1", "FAKE_REQUEUE_RC": "1"})
    assert rc == 75
    assert "requeue" not in (tmp_path / "scontrol.log").read_text().split()
    assert "Slurm has requeued job 4242 already" in log and "failed" not in log


def test_failed_requeue_says_how_to_resume(fake_slurm):
    tmp_path, env = fake_slurm
    rc, _, log = preempt(tmp_path, {**env, "SLURM_RESTART_COUNT": "2", "FAKE_RESTARTS": "2", "FAKE_REQUEUE_RC": "1"})
    assert rc == 75
    assert "(restart 2)" in log and "scontrol requeue failed; resubmit with OUT=runs/zohpc-train-4242" in log


@pytest.mark.parametrize("mode,code,message", [("ok", 0, "done (exit 0)"), ("fail", 2, "stopped by bad input")])
def test_train_normal_exit_does_not_requeue(fake_slurm, mode, code, message):
    tmp_path, env = fake_slurm
    (tmp_path / "submit" / "optim.betas=9").write_text("")  # a file the override would match as a glob
    p = run_template("train.sbatch", {**env, "FAKE_MODE": mode, "CONFIG": "my.toml", "OUT": "runs/x",
                                      "EXTRA_SETS": " optim.lr=0.1  optim.betas=[0.9,0.99] "},
                     "--set", "train.epochs=3")
    assert p.returncode == code, p.stderr
    assert not (tmp_path / "scontrol.log").exists()
    args = parse_with("train", recorded_command(tmp_path, "train")[1])
    assert args.config == "my.toml" and args.out == "runs/x" and args.resume == "auto"
    assert args.overrides == ["optim.lr=0.1", "optim.betas=[0.9,0.99]", "train.epochs=3"]
    for kv in args.overrides:
        section, key, value = parse_override(kv)
        apply_mapping(Config(), {section: {key: value}}, kv)
    log = log_of(tmp_path, "runs/x")
    assert "fake srun output" in log and message in log and "(restart 0)" in log


@pytest.mark.parametrize("setting,expected", [(None, ["--mpi=pmi2"]), ("--mpi=pmix", ["--mpi=pmix"]), ("", [])])
def test_srun_mpi_flag_is_settable(fake_slurm, setting, expected):
    tmp_path, env = fake_slurm
    if setting is not None:
        env = {**env, "ZOHPC_SRUN_MPI": setting}
    p = run_template("train.sbatch", {**env, "FAKE_MODE": "ok"})
    assert p.returncode == 0, p.stderr
    assert recorded_command(tmp_path, "train")[0] == [*expected, "--wait=60"]


def test_environment_setup(fake_slurm):
    tmp_path, env = fake_slurm
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text('export ACTIVATED=yes\n')
    (tmp_path / "bin" / "module").write_text('#!/bin/bash\necho "module $*" >> "$FAKE_DIR/module.log"\n')
    (tmp_path / "bin" / "module").chmod(0o755)
    (tmp_path / "bin" / "srun").write_text('#!/bin/bash\necho "$ACTIVATED $ZOHPC_THREADS $OMP_NUM_THREADS" '
                                           '> "$FAKE_DIR/srun.env"\n')
    p = run_template("train.sbatch", {**env, "VENV": str(venv), "MODULES": "gcc/12 openmpi/4"})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "srun.env").read_text().split() == ["yes", "3", "3"]
    assert (tmp_path / "module.log").read_text().split() == ["module", "load", "gcc/12", "openmpi/4"]


@pytest.mark.parametrize("case", ["no activate", "python without zohpc"])
def test_unusable_environment_stops_with_a_message(fake_slurm, case):
    tmp_path, env = fake_slurm
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    if case == "python without zohpc":
        (venv / "bin" / "python").write_text(BROKEN_PYTHON)
        (venv / "bin" / "python").chmod(0o755)
        (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    for name in TEMPLATES:
        p = run_template(name, {**env, "FAKE_MODE": "ok", "VENV": str(venv), "SLURM_ARRAY_TASK_ID": "1",
                                "SLURM_ARRAY_JOB_ID": "77", "SWEEP_FILE": str(JOBS / "sweep.txt")})
        assert p.returncode == 2, (name, p.stderr)
        log = next((tmp_path / "submit").rglob(f"{name.split('.')[0]}-4242.out")).read_text()
        assert ("no " + str(venv) + "/bin/activate" if case == "no activate" else "cannot import zohpc") in log, log
        assert not (tmp_path / "srun.args").exists()


def test_sweep_task_runs_its_line(fake_slurm):
    tmp_path, env = fake_slurm
    lines = sweep_lines(JOBS / "sweep.txt")
    task = len(lines)  # the last run
    env = {**env, "FAKE_MODE": "ok", "SWEEP_FILE": str(JOBS / "sweep.txt"), "SLURM_ARRAY_TASK_ID": str(task),
           "SLURM_ARRAY_JOB_ID": "77", "EXTRA_SETS": "train.epochs=2"}
    p = run_template("sweep.sbatch", env)
    assert p.returncode == 0, p.stderr
    args = parse_with("train", recorded_command(tmp_path, "train")[1])
    assert args.overrides == ["train.epochs=2", *lines[task - 1].split()]
    assert args.out == f"runs/sweep-77/task-{task}" and args.resume == "auto"
    out = tmp_path / "submit" / args.out
    assert (out / "logs" / "sweep-line.txt").read_text().split() == lines[task - 1].split()
    assert "done (exit 0)" in (out / "logs" / "sweep-4242.out").read_text()
    p = run_template("sweep.sbatch", {**env, "SLURM_ARRAY_TASK_ID": str(task + 1)})
    assert p.returncode == 2 and f"no line {task + 1}" in p.stderr
    p = run_template("sweep.sbatch", {k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_ID"})
    assert p.returncode == 2 and "submit as a job array" in p.stderr


def test_prune_template_command(fake_slurm):
    tmp_path, env = fake_slurm
    env = {**env, "FAKE_MODE": "ok", "SLURM_JOB_NAME": "zohpc-prune"}
    p = run_template("prune.sbatch", env)
    assert p.returncode == 0, p.stderr
    args = parse_with("prune", recorded_command(tmp_path, "prune")[1])
    # unset METHOD/SPARSITY/SEED: the config's prune.method, prune.sparsity and train.seed
    assert args.method is None and args.sparsity is None and args.seed is None and args.config is None
    assert args.out == "runs/zohpc-prune-4242/masks.h5"
    assert "done (exit 0)" in log_of(tmp_path, "runs/zohpc-prune-4242", "prune")
    p = run_template("prune.sbatch", {**env, "METHOD": "random", "SPARSITY": "0.9", "SEED": "7",
                                      "MASKS": "masks/m.h5", "EXTRA_SETS": "prune.queries=16"})
    assert p.returncode == 0, p.stderr
    args = parse_with("prune", recorded_command(tmp_path, "prune")[1])
    assert (args.method, args.sparsity, args.seed, args.out) == ("random", 0.9, 7, "masks/m.h5")
    assert args.overrides == ["prune.queries=16"] and not args.force
    # a requeued job rewrites its own default file (deterministic masks); a named MASKS never
    for f in ("runs/zohpc-prune-4242/masks.h5", "masks/m.h5"):
        (tmp_path / "submit" / f).write_bytes(b"written before the node failed")
    for extra, force in (({}, False), ({"SLURM_RESTART_COUNT": "1"}, True),
                         ({"SLURM_RESTART_COUNT": "1", "MASKS": "masks/m.h5"}, False)):
        assert run_template("prune.sbatch", {**env, **extra}).returncode == 0
        assert parse_with("prune", recorded_command(tmp_path, "prune")[1]).force is force, extra
    assert (tmp_path / "submit" / "masks" / "logs" / "prune-4242.out").exists()
