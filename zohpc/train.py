"""``python -m zohpc.train``: zeroth-order training over MPI, top to bottom.

    mpirun -n 8 python -m zohpc.train [--config F] [--set section.key=value ...] [--out DIR] [--resume auto|PATH]

A run's life (DESIGN.md): checks that need no heavy work (config, run directory, resume
against the stored config), then start-up phases announced with their durations (runtime,
task, masks, cost model), a ``ready`` record, the epochs, and a ``done`` record. A stop
signal at any point checkpoints the last completed step and exits 75 on every rank.
Without mpirun the same command runs on one rank. The Python API ``zohpc.run`` calls
:func:`train` too.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from . import metrics as rec
from .comm import run_main
from .config import DENSE_ESTIMATORS, Config, estimator_name, load_config
from .errors import EXIT_PREEMPTED, UserError
from .progress import Progress
from .rundir import Plan, plan_start, prepare_directory
from .runtime import setup_runtime
from .steps.protocol import share_state
from .stop import Preempted, StopRequest
from .tasks.loading import build_task, check_task
from .trainer import Trainer

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
    try:
        return _train(comm, cfg, task, resume, save, progress, stop, t_process)
    finally:
        stop.uninstall()
        progress.close()


def _train(comm, cfg, task, resume, save, progress, stop, t_process):
    run_dir = cfg.run.out if save else None

    def warn(msg):
        if comm.is_driver:
            progress.say(f"{progress.prog}: warning: {msg}")

    plan = comm.agree(plan_start, cfg, resume, warn) if save else Plan(run_id="", checkpoint=None, changed=[])
    with progress.phase("runtime"):
        runtime = setup_runtime(comm, cfg.train.device)
    with progress.phase("task", cfg.task.name if task is None else (task.name or "task")):
        task = comm.agree(build_task, cfg) if task is None else comm.agree(check_task, task, task.name or "task")
        if cfg.lora.target:
            from .lora import apply_lora

            comm.agree(apply_lora, task.model, cfg.lora, cfg.train.seed)
        trainer = comm.agree(Trainer, task, cfg, comm, runtime, stop=stop, progress=progress)
        share_state(comm, trainer.model, frozen=True)  # identical replicas, whatever the factory did per rank
    if plan.checkpoint is not None:
        path, state = plan.checkpoint
        comm.agree(trainer.load_state_dict, state)
        share_state(comm, trainer.model, frozen=True)
        if trainer.step >= trainer.total_steps:
            progress.say(f"{progress.prog}: run {run_dir} is already complete (step {trainer.step} of "
                         f"{trainer.total_steps}, epoch {trainer.epoch} of {cfg.train.epochs}); nothing to do")
            return 0, trainer.summary()
    trainer.run_id = plan.run_id
    if run_dir:
        if comm.is_driver:
            prepare_directory(cfg, plan)
        comm.barrier()
        setup_logging(run_dir, comm)
        trainer.metrics.path = os.path.join(run_dir, "metrics.jsonl") if comm.is_driver else None
        if cfg.logging.tensorboard and comm.is_driver:
            from .sinks import TensorBoardSink
            trainer.metrics.sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard")))
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
    last_saved = trainer.step if plan.checkpoint is not None else None
    try:
        if plan.checkpoint is None:
            with progress.phase("masks", _masks_what(cfg)):
                stop.enter("masks")
                trainer.setup_masks(_pruning_data(task))
        with progress.phase("cost model"):
            stop.enter("cost model")
            trainer.setup_estimator()
        if trainer.reuse_off_reason:
            progress.say(f"{progress.prog}: feature reuse off ({trainer.reuse_off_reason}): every query is a "
                         f"full forward, stacked {cfg.zo.query_batch} at a time")
        progress.say(f"{progress.prog}: {task.name} {_describe(task, cfg)}, {params:,} parameters"
                     f"{f' ({trained:,} trained: LoRA)' if cfg.lora.target else ''}, "
                     f"{comm.size} rank(s) x {runtime.threads} thread(s), {estimator_name(cfg).upper()}, "
                     f"masks: {trainer.masks.source}, {trainer.total_steps - trainer.step} step(s) to go"
                     + (f", out: {run_dir}" if run_dir else ""))
        ready = rec.Ready(startup_seconds=time.time() - t_process, step=trainer.step,
                          phases={k: round(v, 3) for k, v in progress.phases.items()})
        trainer.metrics.write(ready)
        progress.say(f"{progress.prog}: ready after {ready.startup_seconds:.1f} s")
        stop.enter("step")
        summary = trainer.fit(run_dir, t_process)
    except Preempted:
        path = None
        if run_dir and trainer.step != last_saved and trainer.step > 0:
            path = trainer.save(run_dir)
        if comm.is_driver:
            trainer.metrics.write(rec.Stopped(step=trainer.step, signal=stop.name, checkpoint=path,
                                              time=time.time() - t_process))
            where = f"checkpoint {path}" if path else ("the checkpoint it resumed from" if last_saved is not None
                                                      else "no checkpoint (no step completed)")
            progress.say(f"{progress.prog}: stop ({stop.name}) at step {trainer.step}: {where}; exit {EXIT_PREEMPTED}")
        comm.drain_stop_notices()
        comm.barrier()
        return EXIT_PREEMPTED, None
    except UserError:
        if run_dir and trainer.step != last_saved and trainer.step > 0:
            trainer.save(run_dir)  # the last good step is kept
        raise
    if run_dir:
        trainer.save(run_dir)
    wall = time.time() - t_process
    summary["seconds"] = wall
    trainer.metrics.write(rec.Done(step=trainer.step, epoch=trainer.epoch, best=summary["best"],
                                   final=summary["final"], queries=summary["queries"], wall_seconds=wall))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    progress.say(f"{progress.prog}: done: {trainer.step} steps{', final ' + shown if shown else ''}, "
                 f"{wall:.1f} s, {summary['queries']:,} queries" + (f"; run directory {run_dir}" if run_dir else ""))
    summary["history"] = trainer.metrics.history
    comm.barrier()
    return 0, summary


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


def _pruning_data(task):
    """What pruning at initialization scores on: the training data (class labels if any)."""
    from types import SimpleNamespace

    x, y = task.train
    classes = int(y.max()) + 1 if (not y.is_floating_point() and y.dim() == 1 and y.numel()) else 0
    return SimpleNamespace(train_x=x, train_y=y, num_classes=classes)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    def entry(comm):
        cfg = comm.agree(load_config, args.config, args.overrides, args.out)
        code, _ = train(comm, cfg, resume=args.resume)
        return code

    run_main(entry, "zohpc.train")


if __name__ == "__main__":
    main()
