"""The job templates on a real single-node Slurm cluster (pytest marker ``slurm``).

The fixture installs the Debian packages if missing (root and apt-get needed, else the tests
skip), starts munged, slurmctld and slurmd by hand with a private configuration and state
under a temporary directory, and stops exactly the processes it started, also on failure.
The tests submit the shipped ``jobs/*.sbatch`` files unedited, configured only through the
environment and ``sbatch`` options, exactly as a cluster user would.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel"]
TEMPLATE_VARS = {"CONFIG", "OUT", "EXTRA_SETS", "MODULES", "VENV", "MASKS", "METHOD", "SPARSITY", "SEED", "SWEEP_FILE"}
GUARD_LINE = "this Slurm step has 2 tasks but each task is a separate 1-rank MPI world"

pytestmark = pytest.mark.slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> list[str]:
    return [d for d in COMMANDS if shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def _install() -> None:
    """apt-get install the Debian Slurm and MUNGE packages (CI machines start without them)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm test: needs root to install Slurm and start its daemons")
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm test: slurmctld/slurmd/munge are missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"


class Cluster:
    """One node (this machine, ``hostname -s``) at 127.0.0.1; daemons in the foreground, ours only."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.cpus = max(2, os.cpu_count() or 1)  # the jobs run 2 ranks (config_overrides lets slurmd accept it)
        # munged runs as the munge user, which cannot enter pytest's 0700 temp dirs: a dir of its own
        self.munge_dir = Path(tempfile.mkdtemp(prefix="zohpc-munge-"))
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # the templates read these from the environment: start from none of the caller's
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "ZOHPC_"))
                    or k in TEMPLATE_VARS]:
            if var != "SLURM_CONF":
                del self.env[var]
        self.env["PATH"] = f"{os.path.dirname(sys.executable)}:{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        munge = pwd.getpwnam("munge")
        os.chmod(self.munge_dir, 0o755)
        mdir = self.munge_dir / "m"
        mdir.mkdir()
        mdir.chmod(0o755)  # munged: clients need execute permission on the socket directory
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_socket = mdir / "munge.socket"
        self._spawn(["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                     f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"],
                    user=munge.pw_uid, group=munge.pw_gid, log=self.base / "munged.out")
        self.wait_for(lambda: self.munge_socket.exists(), 30, "munged did not create its socket")
        for sub in ("state", "spool"):
            (self.base / sub).mkdir()
        self.conf.write_text(self.slurm_conf())
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], log=self.base / "slurmctld.out")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], log=self.base / "slurmd.out")
        self.wait_for(lambda: self.sh("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip() == "idle", 90,
                   "the node did not become idle")

    def slurm_conf(self) -> str:
        b = self.base
        return "\n".join([
            "ClusterName=zohpc-ci",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={b / 'spool'}",
            f"SlurmctldPidFile={b / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'slurmd.pid'}",
            f"SlurmctldLogFile={b / 'slurmctld.log'}",
            f"SlurmdLogFile={b / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "EnforcePartLimits=ALL",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,sched_min_interval=100000",
            "KillWait=30",
            "MinJobAge=600",
            "SlurmdParameters=config_overrides",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=60 State=UP",
            "",
        ])

    def _spawn(self, cmd, log: Path, **kw) -> None:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.base,
                                    start_new_session=True, **kw)
        self.procs.append(proc)
        time.sleep(0.5)
        assert proc.poll() is None, f"{cmd[0]} exited at once ({proc.returncode}):\n{self.tail(log)}"

    def stop(self) -> None:
        """Cancel our jobs, then stop the daemons this object started (newest first), by PID."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self.sh("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.sh("squeue", "-h", check=False).stdout.strip():
                time.sleep(1)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def tail(path: Path, n: int = 4000) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return f"({path} not readable)"

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(self.base / name)}" for name in
                         ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"))

    @staticmethod
    def wait_for(cond, timeout: float, what: str, step: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(step)
        raise AssertionError(f"timed out after {timeout:.0f} s: {what}")

    def sh(self, *cmd, check: bool = True, timeout: float = 60, cwd=None, env=None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd or self.base,
                           env={**self.env, **(env or {})})
        if check:
            assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def sbatch(self, script: str, *args, cwd: Path, env=None) -> str:
        p = self.sh("sbatch", "--parsable", *args, str(JOBS / script), cwd=cwd, env=env)
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (the first record: the array's first task for an array id)."""
        p = self.sh("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for token in re.findall(r"(\w[\w/:]*)=(\S*)", p.stdout.splitlines()[0] if p.stdout else ""):
            fields.setdefault(token[0], token[1])
        return fields

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        try:
            return self.wait_for(lambda: (j := self.job(job_id)) and j.get("JobState") in final and j, timeout,
                              f"job {job_id} did not finish", step=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.job(job_id)}\n{self.diagnostics()}") from None


# ---------------------------------------------------------------------------- fixtures
TRAIN_SETS = "train.epochs=8 prune.method=random"    # ~176 steps: long enough to interrupt
OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    if os.geteuid() != 0:
        pytest.skip("Slurm test: needs root to start munged, slurmctld and slurmd")
    if _missing():
        _install()
        assert not _missing(), f"still missing after apt-get install: {_missing()}"
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    t0 = time.monotonic()
    try:
        c.start()
        OUTCOMES["cluster start"] = f"{time.monotonic() - t0:.1f} s"
        yield c
    finally:
        c.stop()
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None and OUTCOMES:  # each job's outcome and duration, on the terminal
            with capture.global_and_fixture_disabled():
                print("\n" + "\n".join(f"slurm: {name}: {outcome}" for name, outcome in OUTCOMES.items()))


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    """Where the jobs are submitted from: their runs/ and slurm-*.out land here, not in the repository."""
    return tmp_path_factory.mktemp("submit")


def run_job(cluster: Cluster, name: str, script: str, *args, cwd: Path, env=None, timeout: float = 240):
    t0 = time.monotonic()
    job_id = cluster.sbatch(script, *args, cwd=cwd, env=env)
    job = cluster.wait_done(job_id, timeout)
    record(name, job, time.monotonic() - t0)
    return job_id, job


def record(name: str, job: dict, seconds: float) -> None:
    OUTCOMES[name] = (f"job {job.get('JobId')} {job.get('JobState')} exit {job.get('ExitCode')} "
                      f"restarts {job.get('Restarts')}, {seconds:.0f} s from submit to end")


def job_log(out: Path, name: str, job_id: str) -> str:
    return (out / "logs" / f"{name}-{job_id}.out").read_text()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_checkpoint(out: Path) -> Path:
    found = sorted((out / "checkpoints").glob("ckpt-*.h5"))
    assert found, f"no checkpoint in {out}"
    return found[-1]


def tensors(path: Path) -> dict:
    """Every dataset under params/ and buffers/ of a checkpoint (the trained state), as numpy arrays."""
    import h5py

    found = {}
    with h5py.File(path, "r") as f:
        for group in ("params", "buffers"):
            if group in f:
                f[group].visititems(lambda n, obj, g=group: found.__setitem__(f"{g}/{n}", obj[()])
                                    if isinstance(obj, h5py.Dataset) else None)
    assert any(k.startswith("params/") for k in found), f"{path}: no params"
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape and ta[k].tobytes() == tb[k].tobytes(), f"{k} differs: {a} vs {b}"


def one_world(log: str, ranks: int = 2) -> None:
    """One MPI world of all the tasks: the start line names it, and training ended once."""
    assert f"{ranks} rank(s)" in log and "1 rank(s)" not in log, log
    assert log.count("zohpc.train: done:") <= 1, log


@pytest.fixture(scope="module")
def straight_run(cluster, submit_dir):
    job_id, job = run_job(cluster, "train job (straight)", "train.sbatch", cwd=submit_dir,
                          env={"EXTRA_SETS": TRAIN_SETS})
    return job_id, job, submit_dir / "runs" / f"zohpc-train-{job_id}"


# ---------------------------------------------------------------------------- the jobs
def test_train_job_runs_to_completion(straight_run, submit_dir):
    job_id, job, out = straight_run
    log = job_log(out, "train", job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", (job, log)
    one_world(log)
    assert "train.sbatch: srun --mpi=pmi2 " in log and "train.sbatch: done (exit 0)" in log
    done = [r for r in metrics(out) if r["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == 8 * (1437 // 64), done
    assert sorted(p.name for p in (out / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    # Slurm's own output file only points at the log in the run directory
    pointer = (submit_dir / f"slurm-zohpc-train-{job_id}.out").read_text()
    assert f"output goes to runs/zohpc-train-{job_id}/logs/train-{job_id}.out" in pointer


def test_preempted_job_requeues_resumes_and_matches_the_straight_run(cluster, submit_dir, straight_run):
    t0 = time.monotonic()
    job_id = cluster.sbatch("train.sbatch", cwd=submit_dir, env={"EXTRA_SETS": TRAIN_SETS})
    out = submit_dir / "runs" / f"zohpc-train-{job_id}"

    def max_step() -> int:
        try:
            return max((r["step"] for r in metrics(out) if r["event"] == "step"), default=0)
        except (OSError, ValueError):
            return 0

    # 1. the time-limit warning, by hand: SIGUSR1 to the batch shell only
    cluster.wait_for(lambda: max_step() > 0, 180, f"job {job_id} did not start training", step=0.2)
    cluster.sh("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_for(lambda: "(restart 1) started" in job_log(out, "train", job_id), 120,
                  f"job {job_id} was not requeued after SIGUSR1", step=0.5)
    stopped_at = int(re.search(r"checkpoint written at step (\d+)", job_log(out, "train", job_id)).group(1))
    # 2. a requeue from outside (an admin, preemption) while the resumed run trains
    cluster.wait_for(lambda: max_step() > stopped_at + 2, 180, f"job {job_id} did not resume training", step=0.2)
    cluster.sh("scontrol", "requeue", job_id)
    job = cluster.wait_done(job_id, 300)
    record("train job preempted (USR1, then outside requeue)", job, time.monotonic() - t0)

    log = job_log(out, "train", job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "2", (job, log)
    assert 0 < stopped_at < 8 * (1437 // 64), log
    assert log.count("SIGUSR1 received") == 1 and log.count("SIGTERM received") == 1, log
    assert log.count(f"requeued job {job_id}; it resumes") == 1, log          # its own requeue after USR1
    assert log.count(f"Slurm has requeued job {job_id} already") == 1, log    # the outside one, recognised
    assert "requeue failed" not in log and log.count("(restart 2) started") == 1, log
    one_world(log)
    # bit for bit the uninterrupted run
    _, _, straight = straight_run
    assert final_checkpoint(out).name == final_checkpoint(straight).name
    assert_same_tensors(final_checkpoint(out), final_checkpoint(straight))


def test_finished_run_resubmitted_does_not_train_again(cluster, submit_dir, straight_run):
    first_id, _, out = straight_run
    before = final_checkpoint(out)
    state = tensors(before)
    steps = [r["step"] for r in metrics(out) if r["event"] == "step"]
    job_id, job = run_job(cluster, "train job resubmitted into its finished OUT", "train.sbatch", cwd=submit_dir,
                          env={"EXTRA_SETS": TRAIN_SETS, "OUT": str(out)})
    log = job_log(out, "train", job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log)
    assert final_checkpoint(out) == before and [r["step"] for r in metrics(out) if r["event"] == "step"] == steps
    after = tensors(before)
    assert all(after[k].tobytes() == state[k].tobytes() for k in state)


def test_sweep_array_runs_one_line_per_task(cluster, submit_dir):
    sweep = submit_dir / "sweep.txt"
    sweep.write_text("# two runs\noptim.lr=0.05 train.epochs=1\n\noptim.lr=0.1  train.epochs=1\n")
    t0 = time.monotonic()
    job_id = cluster.sbatch("sweep.sbatch", "--array=1-2", cwd=submit_dir,
                            env={"SWEEP_FILE": str(sweep), "EXTRA_SETS": "prune.method=random"})
    for task, lr in ((1, 0.05), (2, 0.1)):
        job = cluster.wait_done(f"{job_id}_{task}", 300)
        record(f"sweep array task {task}", job, time.monotonic() - t0)
        out = submit_dir / "runs" / f"sweep-{job_id}" / f"task-{task}"
        log = job_log(out, "sweep", job["JobId"])
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log)
        one_world(log)
        assert (out / "logs" / "sweep-line.txt").read_text().split() == [f"optim.lr={lr}", "train.epochs=1"]
        assert re.search(rf"^lr = {lr}$", (out / "config.toml").read_text(), re.M), (out / "config.toml").read_text()
        assert [r for r in metrics(out) if r["event"] == "done"][0]["epoch"] == 1


def test_prune_job_then_train_job_with_its_masks(cluster, submit_dir):
    env = {"METHOD": "random", "SPARSITY": "0.8"}
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["VENV"] = sys.prefix  # the template activates it
    t0 = time.monotonic()
    prune_id = cluster.sbatch("prune.sbatch", cwd=submit_dir, env=env)
    masks = f"runs/zohpc-prune-{prune_id}/masks.h5"
    train_id = cluster.sbatch("train.sbatch", f"--dependency=afterok:{prune_id}", cwd=submit_dir,
                              env={"EXTRA_SETS": f"prune.masks_file={masks} train.epochs=1"})
    prune = cluster.wait_done(prune_id, 240)
    record("prune job", prune, time.monotonic() - t0)
    prune_log = job_log(submit_dir / masks.rsplit("/", 1)[0], "prune", prune_id)
    assert prune["JobState"] == "COMPLETED" and prune["ExitCode"] == "0:0", (prune, prune_log)
    assert "(seed 0, 2 rank(s))" in prune_log and (submit_dir / masks).is_file(), prune_log
    train = cluster.wait_done(train_id, 240)
    record("train job with the prune job's masks", train, time.monotonic() - t0)
    out = submit_dir / "runs" / f"zohpc-train-{train_id}"
    log = job_log(out, "train", train_id)
    assert train["JobState"] == "COMPLETED" and train["ExitCode"] == "0:0", (train, log)
    one_world(log)
    assert f"masks: {masks} (random)" in log, log
    assert f'masks_file = "{masks}"' in (out / "config.toml").read_text()


def test_srun_without_the_mpi_plugin_is_refused(cluster, submit_dir):
    out = submit_dir / "runs" / "no-plugin"
    job_id, job = run_job(cluster, "train job, srun without --mpi (guard)", "train.sbatch", cwd=submit_dir,
                          env={"ZOHPC_SRUN_MPI": "", "OUT": str(out)}, timeout=120)
    log = job_log(out, "train", job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0" and job["Restarts"] == "0", (job, log)
    assert f"train.sbatch: srun --wait=60 python -m zohpc.train" in log, log
    assert log.count(f"zohpc.train: error: {GUARD_LINE}") == 2, log   # each of the 2 one-rank worlds
    assert "srun --mpi=pmi2" in log and "stopped by bad input (exit 2)" in log
    assert sorted(p.name for p in out.iterdir()) == ["logs"] and os.listdir(out / "logs") == [f"train-{job_id}.out"]
