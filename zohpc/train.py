"""``python -m zohpc.train``: zeroth-order training over MPI, top to bottom.

    mpirun -n 8 python -m zohpc.train [--config F] [--set section.key=value ...] [--out DIR] [--resume auto|PATH]

Builds data, model, masks, optimizer and schedule from the config, then runs epochs of
distributed sparse-CGE steps (RGE or LIZO as options), evaluates on the test split every
epoch and writes the run directory: ``config.toml``, ``metrics.jsonl``, ``logs/rank-R.log``
and ``checkpoints/``. Without mpirun the same command runs on one rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .comm import Comm, run_main
from .config import Config, load_config, to_toml
from .data import DataSplits, augment_batch, epoch_batches, load_data
from .distributed import BatchStatsOnly, DistributedCGE, DistributedRGE, choose_features_mode
from .errors import EXIT_PREEMPTED, CheckpointError, UserError
from .masks import layerwise_random_masks, mask_draw, read_mask_file
from .models import build_model
from .zo import Coordinates, QueryEngine, check_deterministic

log = logging.getLogger("zohpc.train")
# workers step the schedule (to stay in step with the driver) but not the optimizer
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.train",
                                description="Zeroth-order (backprop-free) training over MPI.")
    p.add_argument("--config", metavar="FILE", help="TOML config (defaults: the embedded digits run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set optim.lr=0.1)")
    p.add_argument("--out", metavar="DIR", help="run directory (overrides run.out)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest checkpoint in the run directory that verifies, or from PATH")
    return p


# ---------------------------------------------------------------------------- pieces


class MaskSchedule:
    """Which coordinates are active in each epoch: dense, fixed, or layer-wise random.

    DeepZero's protocol draws a fresh random mask with fixed per-layer ratios every
    ``mask_interval`` epochs; the draw is a pure function of (seed, epoch), so a resumed
    run and every rank see the same masks.
    """

    def __init__(self, model, cfg: Config, comm: Comm, splits: DataSplits):
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        self.seed = cfg.train.seed
        self.interval = cfg.prune.mask_interval
        self.fixed = None
        self.ratios = None
        self.source = "dense"
        if cfg.prune.masks_file:
            mf = comm.agree(read_mask_file, cfg.prune.masks_file, model, cfg.model.name)
            self.ratios = dict(mf.ratios)
            self.source = f"{cfg.prune.masks_file} ({mf.method})"
            if self.interval == 0:
                self.fixed = {n: m.to(torch.bool) for n, m in mf.masks.items()}
        elif cfg.prune.method != "none" and cfg.prune.sparsity > 0:
            from .prune import prune_masks

            masks, ratios = prune_masks(model, cfg.prune.method, cfg.prune.sparsity, splits, cfg.prune,
                                        cfg.train.seed, comm)
            self.ratios = dict(ratios)
            self.source = f"{cfg.prune.method} at sparsity {cfg.prune.sparsity}"
            if self.interval == 0:
                self.fixed = masks

    def draw(self, epoch: int) -> int:
        return mask_draw(epoch, self.interval) if self.ratios is not None else 0

    def masks(self, epoch: int):
        if self.ratios is None:
            return None
        if self.fixed is not None:
            return self.fixed
        shapes = {n: self.shapes[n] for n in self.ratios}
        return layerwise_random_masks(shapes, self.ratios, self.seed, self.draw(epoch))


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Multiplier of the base lr at a global step: linear warm-up, then cosine/step/constant."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            span = max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        if o.schedule == "step":
            return o.gamma ** ((step // steps_per_epoch) // o.step_epochs)
        return 1.0

    return factor


def build_optimizer(cfg: Config, model, comm: Comm):
    o = cfg.optim
    params = list(model.parameters())
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    from .optim import LIZO

    return LIZO(params, lr=o.lr, num_sample_per_step=o.num_sample_per_step,
                reuse_distance_bound=o.reuse_distance_bound or None, max_reuse_rate=o.max_reuse_rate,
                orthogonal_sample=o.orthogonal_sample, line_search=o.line_search,
                weight_decay=o.weight_decay, sample_norm=cfg.zo.mu, comm=comm, seed=cfg.train.seed)


@torch.no_grad()
def evaluate(model, splits: DataSplits, batch_size: int, device) -> tuple[float, float]:
    model.eval()
    correct, loss_sum, n = 0, 0.0, splits.test_x.shape[0]
    for i in range(0, n, batch_size):
        x = splits.test_x[i:i + batch_size].to(device)
        y = splits.test_y[i:i + batch_size].to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train()
    return correct / n, loss_sum / n


@torch.no_grad()
def update_running_stats(model, x) -> None:
    """The driver's one unperturbed train-mode forward per step updates BatchNorm statistics."""
    model.train()
    model(x)


class Progress:
    """Rank 0's progress: a bar on a terminal, otherwise a line every few seconds."""

    def __init__(self, enabled: bool, every: float, total_steps: int):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = every
        self.total = total_steps
        self.last = 0.0

    def update(self, step: int, epoch: int, loss: float, lr: float, qps: float, force: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            frac = step / max(1, self.total)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            print(f"\r[{bar}] step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.4g} "
                  f"{qps:,.0f} queries/s", end="", file=sys.stderr, flush=True)
        elif force or now - self.last >= self.every:
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.4g} {qps:,.0f} queries/s",
                  file=sys.stderr, flush=True)
        else:
            return
        self.last = now

    def message(self, text: str):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


class MetricsLog:
    """``metrics.jsonl`` on the driver: one JSON object per line; the history goes into checkpoints."""

    def __init__(self, path: str | None, history: list[dict] | None = None):
        self.path = path
        self.history = list(history or [])
        if path is not None:
            with open(path, "w") as fh:  # a resumed run rewrites what the checkpoint knows
                for rec in self.history:
                    fh.write(json.dumps(rec) + "\n")

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


class StopSignal:
    """SIGTERM/SIGUSR1 ask for a checkpoint after the current step (preemption)."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.flag = True

    def agreed(self, comm: Comm) -> bool:
        return comm.allreduce_max(1.0 if self.flag else 0.0) > 0


def setup_logging(run_dir: str, comm: Comm) -> None:
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, "logs", f"rank-{comm.rank}.log"))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {comm.rank} %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("zohpc")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def injected_failure_point():
    """``ZOHPC_TEST_FAIL_AT=RANK:STEP`` makes that rank raise at that step (tests of the abort path)."""
    spec = os.environ.get("ZOHPC_TEST_FAIL_AT")
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


@torch.no_grad()
def restore_model(model, state, path: str) -> None:
    """Copy a checkpoint's parameters and buffers into ``model`` after checking they fit."""
    for kind, ours, theirs in (("parameter", dict(model.named_parameters()), state.params),
                               ("buffer", dict(model.named_buffers()), state.buffers)):
        if set(ours) != set(theirs):
            missing = sorted(set(ours) ^ set(theirs))
            raise CheckpointError(f"{path}: checkpoint is for another model ({kind}s differ: {', '.join(missing[:4])})")
        for name, tensor in ours.items():
            if tuple(theirs[name].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{path}: {kind} {name} has shape {tuple(theirs[name].shape)}, "
                                      f"the model needs {tuple(tensor.shape)}")
            tensor.copy_(theirs[name].to(tensor.device))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


# ---------------------------------------------------------------------------- the run


def train(comm: Comm, args) -> int:
    t_start = time.perf_counter()
    cfg = comm.agree(load_config, args.config, args.overrides, args.out)
    run_dir = cfg.run.out
    device = comm.agree(comm.bind_device, cfg.train.device)
    threads = comm.set_threads()
    splits = comm.agree(load_data, cfg.data, cfg.train.seed)

    resume_from = None
    if args.resume:
        warn = (lambda msg: print(f"zohpc.train: warning: {msg}", file=sys.stderr, flush=True)) \
            if comm.is_driver else (lambda msg: None)
        resume_from = comm.agree(ckpt.resolve_resume, args.resume, run_dir, warn)
        if resume_from is None and args.resume != "auto":
            raise UserError(f"--resume {args.resume}: no checkpoint to resume from")

    os.makedirs(run_dir, exist_ok=True)
    comm.barrier()
    setup_logging(run_dir, comm)
    log.info("rank %d/%d local %d/%d device %s threads %d", comm.rank, comm.size, comm.local_rank,
             comm.local_size, device, threads)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes).to(device)
    comm.agree(check_deterministic, model)
    masks = MaskSchedule(model, cfg, comm, splits)

    bs = min(cfg.data.batch_size, splits.train_x.shape[0])
    steps_per_epoch = len(epoch_batches(splits.train_x.shape[0], bs, cfg.train.seed, 0))
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = build_optimizer(cfg, model, comm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    lizo = cfg.optim.name == "lizo"

    engine = QueryEngine(model, query_batch=cfg.zo.query_batch)
    cge_proto = DistributedCGE(comm, model, engine, mu=cfg.zo.mu, difference=cfg.zo.difference)
    rge_proto = DistributedRGE(comm, model, mu=cfg.zo.mu, queries=cfg.zo.rge_queries, seed=cfg.train.seed)

    step, epoch, batch_in_epoch, history = 0, 0, 0, []
    if resume_from is not None:
        path, state = resume_from
        comm.agree(restore_model, model, state, path)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng["torch"])
        step, epoch = state.step, state.epoch
        batch_in_epoch = int(state.extra.get("batch_in_epoch", 0))
        history = state.metrics
        log.info("resumed from %s at step %d epoch %d", path, step, epoch)

    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if comm.is_driver else None, history)
    progress = Progress(comm.is_driver, cfg.train.log_every_seconds, total_steps)
    if comm.is_driver:
        with open(os.path.join(run_dir, "config.toml"), "w") as fh:
            fh.write(to_toml(cfg))
    stop = StopSignal()
    fail_at = injected_failure_point()

    current_draw = None
    coords = None
    rebalances_left = 0
    x_shape = (bs, *splits.input_shape)
    saved_costs = resume_from[1].extra.get("costs") if resume_from is not None else None
    logged_draws = {r["draw"] for r in history if r.get("event") == "masks"}

    def save(final_epoch: int, final_batch: int):
        if not comm.is_driver:
            return
        path = ckpt.checkpoint_path(run_dir, step)
        ckpt.save_checkpoint(
            path, step=step, epoch=final_epoch, config_toml=to_toml(cfg),
            params={n: p.detach().cpu() for n, p in model.named_parameters()},
            buffers={n: b.detach().cpu() for n, b in model.named_buffers()},
            masks={n: m.cpu() for n, m in (masks.masks(final_epoch) or {}).items()},
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state(),
            metrics=metrics.history,
            extra={"batch_in_epoch": final_batch, "costs": list(cge_proto.costs or [])})
        ckpt.prune_checkpoints(run_dir, cfg.checkpoint.keep)
        log.info("checkpoint %s", path)

    if comm.is_driver and not history:
        metrics.write({"event": "start", "ranks": comm.size, "model": cfg.model.name,
                       "params": sum(p.numel() for p in model.parameters()), "masks": masks.source,
                       "estimator": "lizo" if lizo else cfg.zo.estimator, "time": 0.0})
    progress.message(f"zohpc.train: {cfg.model.name} on {cfg.data.name} ({splits.train_x.shape[0]} train), "
                     f"{comm.size} rank(s) x {threads} thread(s), "
                     f"{'LIZO' if lizo else cfg.zo.estimator.upper()}, masks: {masks.source}, out: {run_dir}")

    best_acc, last_acc = 0.0, None
    for rec in history:
        if rec.get("event") == "eval":
            best_acc, last_acc = max(best_acc, rec["test_acc"]), rec["test_acc"]
    total_queries = sum(r.get("queries", 0) for r in history if r.get("event") == "step")

    while epoch < cfg.train.epochs and step < total_steps:
        batches = epoch_batches(splits.train_x.shape[0], bs, cfg.train.seed, epoch)
        if not lizo and (coords is None or masks.draw(epoch) != current_draw):
            current_draw = masks.draw(epoch)
            coords = Coordinates(model, masks.masks(epoch))
            xb, yb = splits.train_x[batches[0]].to(device), splits.train_y[batches[0]].to(device)
            if cfg.zo.estimator == "cge":
                if saved_costs:
                    costs = saved_costs  # a resumed run keeps its shard layout: same rounding
                elif cge_proto.costs is None:
                    costs = cge_proto.measure_costs(coords, xb, yb)
                else:
                    costs = cge_proto.costs  # per-parameter query cost does not depend on the mask
                cge_proto.set_coords(coords, costs)
                rebalances_left = 2  # refine the layout with the first real step times
                if cfg.zo.features == "auto":
                    cge_proto.features = choose_features_mode(comm, engine, xb, yb)
                else:
                    cge_proto.features = cfg.zo.features
                log.info("coords %d, shard %s, predicted imbalance %.3f, features %s", coords.total,
                         cge_proto.shard, cge_proto.predicted_imbalance(), cge_proto.features)
            rge_proto.set_coords(coords)
            if comm.is_driver and current_draw not in logged_draws:
                logged_draws.add(current_draw)
                metrics.write({"event": "masks", "epoch": epoch, "draw": current_draw,
                               "active_coords": coords.total, "time": time.perf_counter() - t_start})

        while batch_in_epoch < len(batches) and step < total_steps:
            t0 = time.perf_counter()
            if fail_at == (comm.rank, step):
                raise RuntimeError(f"injected failure (ZOHPC_TEST_FAIL_AT) at step {step}")
            x = y = None
            if comm.is_driver:
                idx = batches[batch_in_epoch]
                x, y = splits.train_x[idx], splits.train_y[idx]
                if cfg.data.augment:
                    x = augment_batch(x, cfg.train.seed, epoch, batch_in_epoch)
                # standard strides, exactly like the buffers other ranks allocate (same kernels, same rounding)
                x = x.to(device).clone(memory_format=torch.contiguous_format)
                y = y.to(device).contiguous()
            lr = optimizer.param_groups[0]["lr"]

            if lizo:
                loss, queries, compute = lizo_step(comm, model, optimizer, x, y, x_shape, device)
            else:
                proto = cge_proto if cfg.zo.estimator == "cge" else rge_proto
                values, loss, times = proto.gradient(x, y, x_shape, step)
                queries = proto.queries_per_step
                compute = times.compute
                if proto is cge_proto and rebalances_left > 0:
                    rebalances_left -= 1
                    cge_proto.rebalance(compute)
                    log.info("rebalanced: shard %s, predicted imbalance %.3f", cge_proto.shard,
                             cge_proto.predicted_imbalance())
                if comm.is_driver:
                    t1 = time.perf_counter()
                    optimizer.zero_grad(set_to_none=False)
                    coords.fill_grad(model, values)
                    optimizer.step()
                    update_running_stats(model, x)
                    times.optimizer = time.perf_counter() - t1
                times.param_bcast = cge_proto.share_parameters()
            scheduler.step()
            per_rank = comm.gather_floats([compute])
            step += 1
            batch_in_epoch += 1
            total_queries += queries
            seconds = time.perf_counter() - t0
            if comm.is_driver:
                if not math.isfinite(loss):
                    raise UserError(f"training diverged: loss is {loss} at step {step} (lower optim.lr or zo.mu)")
                metrics.write({"event": "step", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                               "queries": queries, "seconds": seconds,
                               "rank_compute_seconds": [round(v, 6) for v in per_rank[:, 0].tolist()],
                               "time": time.perf_counter() - t_start})
                progress.update(step, epoch, loss, lr, queries / max(seconds, 1e-9))
            if stop.agreed(comm):
                save(epoch, batch_in_epoch)
                progress.message(f"zohpc.train: stop signal: checkpoint written at step {step}; exit {EXIT_PREEMPTED}")
                comm.barrier()
                return EXIT_PREEMPTED

        if batch_in_epoch >= len(batches):
            if comm.is_driver:
                acc, tloss = evaluate(model, splits, cfg.data.test_batch_size, device)
                best_acc, last_acc = max(best_acc, acc), acc
                metrics.write({"event": "eval", "step": step, "epoch": epoch, "test_acc": acc, "test_loss": tloss,
                               "time": time.perf_counter() - t_start})
                progress.message(f"epoch {epoch}: test accuracy {acc:.4f}, test loss {tloss:.4f} "
                                 f"({time.perf_counter() - t_start:.1f} s)")
            epoch += 1
            batch_in_epoch = 0
            every = cfg.checkpoint.every_epochs
            if every and epoch % every == 0 and epoch < cfg.train.epochs:
                save(epoch, 0)
        else:
            break  # max_steps reached inside an epoch

    save(epoch, batch_in_epoch)
    if comm.is_driver:
        wall = time.perf_counter() - t_start
        metrics.write({"event": "done", "step": step, "epoch": epoch, "best_test_acc": best_acc,
                       "final_test_acc": last_acc, "queries": total_queries, "wall_seconds": wall})
        progress.message(f"zohpc.train: done: {step} steps, best test accuracy {best_acc:.4f}, "
                         f"final {last_acc if last_acc is None else round(last_acc, 4)}, {wall:.1f} s, "
                         f"{total_queries:,} queries; run directory {run_dir}")
    comm.barrier()
    return 0


def lizo_step(comm: Comm, model, optimizer, x, y, x_shape, device):
    """One LIZO step: every rank holds the minibatch and steps identically; queries are shared."""
    dtype = next(model.parameters()).dtype
    if not comm.is_driver:
        x = torch.empty(x_shape, dtype=dtype, device=device)
        y = torch.empty(x_shape[0], dtype=torch.int64, device=device)
    comm.bcast_(x)
    comm.bcast_(y)
    guard = BatchStatsOnly(model)

    @torch.no_grad()
    def closure():
        with guard:
            return F.cross_entropy(model(x), y)

    q0 = optimizer.queries_made
    t0 = time.perf_counter()
    loss = optimizer.step(closure)
    compute = time.perf_counter() - t0
    if comm.is_driver:
        update_running_stats(model, x)
    return float(loss), int(optimizer.queries_made - q0), compute


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_main(lambda comm: train(comm, args), "zohpc.train")


if __name__ == "__main__":
    main()
