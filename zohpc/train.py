"""``python -m zohpc.train``: zeroth-order training over MPI, top to bottom.

    mpirun -n 8 python -m zohpc.train [--config F] [--set section.key=value ...] [--out DIR] [--resume auto|PATH]

A run's life (DESIGN.md): checks that need no heavy work (config, the claim of the run
directory, resume against the stored config, the directory's files), then start-up phases
announced with their durations (runtime, task, masks, cost model), a ``ready`` record, the
epochs, and a ``done`` record. A stop signal at any point (from the first import on)
checkpoints the last completed step and exits 75 on every rank. Without mpirun the same
command runs on one rank. The Python API ``zohpc.run`` calls :func:`train` too.

This module keeps the CLI, the run-directory plan, the runtime and the phase announcements;
the :class:`~zohpc.trainer.Trainer` owns the run itself.
"""

from __future__ import annotations

from .stop import install_process_latch

if __name__ == "__main__":
    install_process_latch()  # before the heavy imports below: a signal during them is a stop (exit 75)

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from . import metrics as rec  # noqa: E402
from .comm import run_main  # noqa: E402
from .config import DENSE_ESTIMATORS, Config, estimator_name, load_config  # noqa: E402
from .errors import EXIT_PREEMPTED, UserError  # noqa: E402
from .masks import read_mask_file  # noqa: E402
from .progress import Progress  # noqa: E402
from .prune import PruningData  # noqa: E402
from .rundir import Plan, claim_directory, plan_start, prepare_directory  # noqa: E402
from .runtime import check_runtime, setup_runtime  # noqa: E402
from .steps.protocol import share_state  # noqa: E402
from .stop import Preempted, StopRequest  # noqa: E402
from .tasks.loading import build_task, check_task  # noqa: E402
from .trainer import Trainer  # noqa: E402

log = logging.getLogger("zohpc.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.train",
                                description="Zeroth-order (backprop-free) training over MPI.")
    p.add_argument("--config", metavar="FILE", help="TOML config (defaults: the embedded digits run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set optim.lr=0.1)")
    p.add_argument("--out", metavar="DIR", help="run directory (overrides run.out); must not hold another run")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue the run in --out from its newest checkpoint that verifies (auto: start it "
                        "if it has none), or from the checkpoint PATH")
    return p


def process_start() -> float:
    """Wall-clock time this process started (Linux /proc), else now."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def setup_logging(run_dir: str, comm) -> None:
    handler = logging.FileHandler(os.path.join(run_dir, "logs", f"rank-{comm.rank}.log"))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {comm.rank} %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("zohpc")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def train(comm, cfg: Config, *, task=None, resume: str | None = None, save: bool = True,
          prog: str = "zohpc.train", t_start: float | None = None) -> tuple[int, dict | None]:
    """One segment of a run: returns (exit code, summary). Stop signals are handled while it runs.

    ``t_start``: the wall-clock time start-up is counted from (default: when the process
    started; ``zohpc.run`` passes the time of its call, so several runs in one script each
    count their own)."""
    t_process = process_start() if t_start is None else t_start
    progress = Progress(comm.is_driver, cfg.train.log_every_seconds, prog)
    stop = StopRequest(comm).install()
    claims: list = []
    try:
        return _train(comm, cfg, task, resume, save, progress, stop, t_process, claims)
    finally:
        for claim in claims:
            claim.release()
        stop.uninstall()
        progress.close()


def _stop_point(stop) -> None:
    """Collective: a stop requested on any rank so far (from the first import on) ends the
    start-up here."""
    if stop.agreed():
        raise Preempted()


def _open_directory(comm, cfg, resume, warn, claims) -> Plan:
    """Claim the run directory (driver), plan the start, and write the directory's files, all
    before any heavy work; a refused start leaves a directory it created as it was (absent)."""
    run_dir = cfg.run.out
    claim = comm.agree(lambda: claim_directory(run_dir) if comm.is_driver else None)
    if claim is not None:
        claims.append(claim)
    try:
        plan = comm.agree(plan_start, cfg, resume, warn)
    except UserError:
        if claim is not None:
            claim.release(discard=True)
        raise
    def prepare():
        if claim is not None:
            try:
                prepare_directory(cfg, plan)
            except UserError:
                if plan.checkpoint is None and not plan.takeover and not plan.restart:
                    _discard_new_run(run_dir)  # a new run that could not write its files leaves nothing
                raise

    try:
        comm.agree(prepare)
    except UserError:
        if claim is not None:
            claim.release(discard=True)
        raise
    comm.barrier()
    setup_logging(run_dir, comm)
    return plan


def _discard_new_run(run_dir: str) -> None:
    """Remove what a new run's failed preparation put in its directory (a full disk)."""
    import shutil

    for name in ("run.json", "config.toml", "metrics.jsonl"):
        try:
            os.remove(os.path.join(run_dir, name))
        except OSError:
            pass
    for name in ("logs", "checkpoints"):
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _train(comm, cfg, task, resume, save, progress, stop, t_process, claims):
    run_dir = cfg.run.out if save else None

    def warn(msg):
        if comm.is_driver:
            progress.say(f"{progress.prog}: warning: {msg}")

    comm.agree(check_runtime, comm, cfg.train.device)  # (silent; a refusal before the directory is made)
    if cfg.prune.masks_file and resume is None:  # a fresh start's damaged or foreign mask file, too (a
        comm.agree(read_mask_file, cfg.prune.masks_file)  # resume takes its masks from the checkpoint)
    plan = _open_directory(comm, cfg, resume, warn, claims) if save else Plan(run_id="", checkpoint=None, changed=[])
    metrics = rec.MetricsLog(os.path.join(run_dir, "metrics.jsonl") if run_dir and comm.is_driver else None)
    if run_dir and cfg.logging.tensorboard and comm.is_driver:
        from .sinks import TensorBoardSink
        metrics.sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard")))
    trainer = None
    try:
        _stop_point(stop)
        with progress.phase("runtime"):
            runtime = setup_runtime(comm, cfg.train.device)
        with progress.phase("task", cfg.task.name if task is None else (task.name or "task")):
            task = comm.agree(build_task, cfg) if task is None else comm.agree(check_task, task, task.name or "task")
            if cfg.lora.target:
                from .lora import apply_lora

                comm.agree(apply_lora, task.model, cfg.lora, cfg.train.seed)
            trainer = comm.agree(Trainer, task, cfg, comm, runtime, run_id=plan.run_id, run_dir=run_dir,
                                 metrics=metrics, stop=stop, progress=progress)
            share_state(comm, trainer.model, frozen=True)  # identical replicas, whatever the factory did per rank
        _stop_point(stop)
        if plan.checkpoint is not None:
            trainer.resume(plan.checkpoint[0])
            share_state(comm, trainer.model, frozen=True)
            if trainer.complete:
                progress.say(f"{progress.prog}: run {run_dir} is already complete (step {trainer.step} of "
                             f"{trainer.total_steps}, epoch {trainer.epoch} of {cfg.train.epochs}); nothing to do")
                return 0, trainer.summary()
    except UserError:
        _forget_new_directory(comm, plan, claims)
        raise
    except Preempted:
        return _stopped(comm, trainer, metrics, progress, stop, t_process)
    try:
        return _run(comm, cfg, task, plan, trainer, runtime, progress, stop, t_process)
    except Preempted:
        return _stopped(comm, trainer, metrics, progress, stop, t_process)


def _forget_new_directory(comm, plan, claims) -> None:
    """Bad input found before the first step of a new run (the task, the masks, the model): the
    directory this start created is removed again, so the error leaves no trace (a directory
    that existed before is left for a rerun to take over)."""
    if not comm.is_driver or not claims or plan.checkpoint is not None or plan.takeover or plan.restart:
        return
    claim = claims[0]
    if claim.created and claim.created_lock:
        _discard_new_run(claim.out)
        claim.release(discard=True)


def _run(comm, cfg, task, plan, trainer, runtime, progress, stop, t_process):
    run_dir = trainer.run_dir
    log.info("rank %d/%d local %d/%d %s", comm.rank, comm.size, comm.local_rank, comm.local_size, runtime.describe())
    params = sum(p.numel() for p in trainer.model.parameters())
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if plan.checkpoint is not None:
        trainer.metrics.write(rec.Resume(step=trainer.step, checkpoint=plan.checkpoint[0],
                                         changed=plan.changed, ranks=comm.size))
        for key in plan.changed:
            progress.say(f"{progress.prog}: resume: {key} changed (allowed: it does not alter the trajectory)")
    else:
        trainer.metrics.write(rec.Start(ranks=comm.size, model=type(trainer.model).__name__
                                        if task.name != "classify" else cfg.model.name, params=params,
                                        masks=_masks_what(cfg), estimator=estimator_name(cfg), task=task.name,
                                        time=time.time()))
    with trainer.guarded():
        if plan.checkpoint is None:
            with progress.phase("masks", _masks_what(cfg)):
                stop.enter("masks")
                trainer.setup_masks(PruningData.of_task(task))
        with progress.phase("cost model"):
            stop.enter("cost model")
            trainer.setup_estimator()
        if trainer.reuse_off_reason:
            progress.say(f"{progress.prog}: feature reuse off ({trainer.reuse_off_reason}): every query is a "
                         f"full forward, stacked {cfg.zo.query_batch} at a time")
        progress.say(f"{progress.prog}: {task.name} {_describe(task, cfg)}, {params:,} parameters"
                     f"{f' ({trained:,} trained: LoRA)' if cfg.lora.target else ''}, "
                     f"{comm.size} rank(s) x {runtime.threads} thread(s), {estimator_name(cfg).upper()}"
                     f"{' at the outputs (gray-box)' if cfg.zo.boundary == 'outputs' else ''}, "
                     f"masks: {trainer.masks.source}, {trainer.total_steps - trainer.step} step(s) to go"
                     + (f", out: {run_dir}" if run_dir else ""))
        ready = rec.Ready(startup_seconds=time.time() - t_process, step=trainer.step,
                          phases={k: round(v, 3) for k, v in progress.phases.items()})
        trainer.metrics.write(ready)
        progress.say(f"{progress.prog}: ready after {ready.startup_seconds:.1f} s")
        stop.enter("step")
        summary = trainer.fit(t_process)
        if run_dir:
            trainer.save()
    wall = time.time() - t_process
    summary["seconds"] = wall
    trainer.metrics.write(rec.Done(step=trainer.step, epoch=trainer.epoch, best=summary["best"],
                                   final=summary["final"], queries=summary["queries"], wall_seconds=wall))
    if run_dir:
        comm.agree(trainer.metrics.raise_error)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    progress.say(f"{progress.prog}: done: {trainer.step} steps{', final ' + shown if shown else ''}, "
                 f"{wall:.1f} s, {summary['queries']:,} queries" + (f"; run directory {run_dir}" if run_dir else ""))
    summary["history"] = trainer.metrics.history
    if stop.agreed():  # a stop after the last check: the run is complete, and the stop still exits 75
        comm.drain_stop_notices()
        comm.barrier()
        return EXIT_PREEMPTED, summary
    return 0, summary


def _stopped(comm, trainer, metrics, progress, stop, t_process):
    """Every rank agreed to stop: the Trainer has checkpointed what it could; say so, exit 75."""
    path = trainer.stop_checkpoint if trainer is not None else None
    if comm.is_driver:
        metrics.write(rec.Stopped(step=trainer.step if trainer else 0, signal=stop.name, checkpoint=path,
                                  time=time.time() - t_process))
        if trainer is not None and trainer.stop_error:
            progress.say(f"{progress.prog}: error: {trainer.stop_error} (stop {stop.name}; exit {EXIT_PREEMPTED})")
        else:
            step = trainer.step if trainer is not None else 0
            saved = trainer.last_saved if trainer is not None else None
            where = f"checkpoint {path}" if path else (f"its checkpoint of step {saved}" if saved is not None
                                                      else "no checkpoint (no step completed)")
            progress.say(f"{progress.prog}: stop ({stop.name}) at step {step}: {where}; exit {EXIT_PREEMPTED}")
    comm.drain_stop_notices()
    comm.barrier()
    return EXIT_PREEMPTED, None


def _masks_what(cfg: Config) -> str:
    if cfg.prune.masks_file:
        return f"from {cfg.prune.masks_file}"
    if estimator_name(cfg) in DENSE_ESTIMATORS or cfg.prune.method == "none" or cfg.prune.sparsity == 0:
        return "dense"
    return f"{cfg.prune.method} pruning at sparsity {cfg.prune.sparsity}"


def _describe(task, cfg: Config) -> str:
    if task.name == "classify":
        return f"{cfg.model.name} on {cfg.data.name} ({task.train[0].shape[0]} train)"
    return f"{type(task.model).__name__} ({task.train[0].shape[0]} train)"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    def entry(comm):
        cfg = comm.agree(load_config, args.config, args.overrides, args.out)
        code, _ = train(comm, cfg, resume=args.resume)
        return code

    run_main(entry, "zohpc.train")


if __name__ == "__main__":
    main()
