"""The Trainer: the state of a run (model, optimizer, schedule, masks, position, metrics) and
the loop over epochs. Its checkpoint contents are listed once, in :meth:`Trainer.state_dict`;
:meth:`Trainer.load_state_dict` is the inverse. One step is :meth:`Trainer.train_step`, which
calls the estimator's step (``zohpc.steps``); the training loop and ``bench scaling`` use
the same step objects.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from . import checkpoint as ckpt
from . import metrics as rec
from .config import Config, to_toml
from .data import epoch_batches
from .errors import CheckpointError, ConfigError, UserError
from .masks import layer_ratios, layerwise_random_masks, mask_draw, read_mask_file
from .steps import CGEStep, LIZOStep, RGEStep
from .steps.protocol import standard
from .sharding import contiguous_split
from .stop import Preempted, StepAbandoned, no_check
from .zo import Coordinates
from .zo.engine import NondeterministicModelError, QueryEngine, check_deterministic
from .zo.objective import Objective

log = logging.getLogger("zohpc.train")


class MaskSchedule:
    """Which coordinates are active in each epoch: dense, fixed, or layer-wise random.

    DeepZero's protocol draws a fresh random mask with fixed per-layer ratios every
    ``interval`` epochs; a draw is a pure function of (seed, draw), so a resumed run and
    every rank see the same masks. ``fixed``: one mask for the whole run (interval 0).
    """

    def __init__(self, shapes: dict, seed: int, interval: int, ratios=None, fixed=None, source="dense"):
        self.shapes, self.seed, self.interval = shapes, seed, interval
        self.ratios = None if ratios is None else {k: float(v) for k, v in ratios.items()}
        self.fixed = fixed if interval == 0 else None
        self.source = source

    def draw(self, epoch: int) -> int:
        return mask_draw(epoch, self.interval) if self.ratios is not None else 0

    def masks(self, epoch: int):
        if self.ratios is None:
            return None
        if self.fixed is not None:
            return self.fixed
        return layerwise_random_masks({n: self.shapes[n] for n in self.ratios}, self.ratios, self.seed,
                                      self.draw(epoch))


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


def build_optimizer(cfg: Config, model, comm):
    """The configured optimizer over the trainable parameters (frozen ones are never updated)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    from .optim import LIZO

    bound = None if o.reuse_distance_bound < 0 else o.reuse_distance_bound
    return LIZO(params, lr=o.lr, num_sample_per_step=o.num_sample_per_step, reuse_distance_bound=bound,
                max_reuse_rate=o.max_reuse_rate, orthogonal_sample=o.orthogonal_sample, line_search=o.line_search,
                weight_decay=o.weight_decay, sample_norm=cfg.zo.mu, comm=comm, seed=cfg.train.seed)


def make_engine(model, objective, cfg: Config):
    """The CGE query engine: per-layer feature reuse, or full forwards with the reason why."""
    from .zo.stacked import FullForwardEngine

    if not cfg.zo.feature_reuse:
        return FullForwardEngine(model, objective, cfg.zo.query_batch), "zo.feature_reuse = false"
    try:
        return QueryEngine(model, objective=objective, query_batch=cfg.zo.query_batch), None
    except NondeterministicModelError:
        raise
    except ConfigError as exc:  # the model cannot be traced: every query is a full forward
        return FullForwardEngine(model, objective, cfg.zo.query_batch), str(exc)


def stoppable(stop, fn):
    """Run a piece of work that a stop may cut short, then agree: Preempted on every rank if
    any rank abandoned it or was asked to stop. ``fn`` is collective-free, or its collectives
    raise StepAbandoned on every rank alike (``Comm.allgatherv_or_abandon``)."""
    result, abandoned = None, False
    try:
        result = fn()
    except StepAbandoned:
        abandoned = True
    if stop is not None and stop.agreed(abandoned):
        raise Preempted()
    return result


def _injected_failure():
    """Test hook ``ZOHPC_TEST_FAIL_AT=RANK:STEP``: that rank raises at that step (the abort path)."""
    import os

    spec = os.environ.get("ZOHPC_TEST_FAIL_AT")
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


class Trainer:
    """Owns everything a checkpoint holds and runs the epochs (see the module docstring)."""

    def __init__(self, task, cfg: Config, comm, runtime, *, stop=None, progress=None):
        self.task, self.cfg, self.comm, self.stop, self.progress = task, cfg, comm, stop, progress
        self.device = runtime.device
        self.model = task.model.to(self.device)
        check_deterministic(self.model)
        self.objective = Objective(task.loss, task.batched_loss, task.name)
        self.train_x, self.train_y = task.train
        n = self.train_x.shape[0]
        self.batch_size = min(cfg.data.batch_size, n)
        self.steps_per_epoch = len(epoch_batches(n, self.batch_size, cfg.train.seed, 0))
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.optimizer = build_optimizer(cfg, self.model, comm)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.lr_factor = lr_factor(cfg, self.steps_per_epoch)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.metrics = rec.MetricsLog(None)
        self.masks = MaskSchedule({n: p.shape for n, p in self.model.named_parameters()}, cfg.train.seed,
                                  cfg.prune.mask_interval)
        self.costs: list[float] | None = None
        self.estimator = None
        self.coords = None
        self.current_draw = None
        self.rebalances_left = 0
        self.reuse_off_reason = None
        self.run_id = ""

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds: the keyword arguments of ``checkpoint.save_checkpoint``.

        Parameters: the trainable ones only. Frozen parameters (the base under LoRA adapters)
        never change; a resumed run re-makes them from the task (its factory, or the Hugging
        Face directory) and :meth:`load_state_dict` checks them against ``frozen_sha256``, so a
        checkpoint holds the adapters and resume stays exact."""
        masks = self.masks.masks(self.epoch) or {}
        return dict(
            step=self.step, epoch=self.epoch, config_toml=to_toml(self.cfg),
            params={n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            buffers={n: b.detach().cpu() for n, b in self.model.named_buffers()},
            masks={n: m.cpu() for n, m in masks.items()},
            optimizer=self.optimizer.state_dict(),
            scheduler={"base_lrs": list(self.base_lrs)},
            rng={"torch": torch.get_rng_state()},
            metrics=self.metrics.history,
            extra={"batch_in_epoch": self.batch_in_epoch, "costs": list(self.costs or []),
                   "mask_ratios": self.masks.ratios, "mask_source": self.masks.source,
                   "mask_fixed": self.masks.fixed is not None, "run_id": self.run_id,
                   "frozen_sha256": self.frozen_sha256()})

    def frozen_sha256(self) -> str:
        """Fingerprint of the frozen parameters ("" when every parameter is trained); computed once."""
        if getattr(self, "_frozen_sha256", None) is None:
            from .lora import frozen_fingerprint

            self._frozen_sha256 = frozen_fingerprint(self.model)
        return self._frozen_sha256

    @torch.no_grad()
    def load_state_dict(self, state: ckpt.Checkpoint) -> None:
        """Restore a checkpoint (after checking that it fits this model); no pruning ever."""
        stored = str(state.extra.get("frozen_sha256", ""))
        if stored != self.frozen_sha256():
            raise CheckpointError(f"{state.path}: the frozen parameters differ from the checkpoint's (a changed base "
                                  f"model, or another lora setting): resume needs the base it was trained on")
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for kind, ours, theirs in (("parameter", trainable, state.params),
                                   ("buffer", dict(self.model.named_buffers()), state.buffers)):
            if set(ours) != set(theirs):
                diff = sorted(set(ours) ^ set(theirs))
                raise CheckpointError(f"{state.path}: checkpoint is for another model ({kind}s differ: "
                                      f"{', '.join(diff[:4])})")
            for name, tensor in ours.items():
                if tuple(theirs[name].shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{state.path}: {kind} {name} has shape {tuple(theirs[name].shape)}, "
                                          f"the model needs {tuple(tensor.shape)}")
                tensor.copy_(theirs[name].to(tensor.device))
        try:
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{state.path}: optimizer state does not fit optim.name = "
                                  f"{self.cfg.optim.name!r} ({str(exc).splitlines()[0]})") from None
        torch.set_rng_state(state.rng["torch"])
        self.step, self.epoch = state.step, state.epoch
        extra = state.extra
        self.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
        self.costs = list(extra.get("costs") or []) or None
        self.metrics = rec.MetricsLog(self.metrics.path, state.metrics)
        ratios = extra.get("mask_ratios")
        if ratios is None and state.masks:  # checkpoints written before ratios were stored
            ratios = layer_ratios(state.masks)
        if ratios is not None:
            fixed = {n: m.to(torch.bool) for n, m in state.masks.items()} if extra.get("mask_fixed", True) else None
            self.masks = MaskSchedule(self.masks.shapes, self.cfg.train.seed, self.cfg.prune.mask_interval,
                                      ratios=ratios, fixed=fixed,
                                      source=f"{extra.get('mask_source', 'checkpoint')} (from the checkpoint)")

    # ------------------------------------------------------------------ start-up
    def setup_masks(self, splits_for_pruning) -> None:
        """Masks for a fresh run: a mask file, or pruning at initialization (once), or dense."""
        cfg, comm = self.cfg, self.comm
        if cfg.prune.masks_file:
            mf = comm.agree(read_mask_file, cfg.prune.masks_file, self.model,
                            cfg.model.name if self.task.name == "classify" else None)
            fixed = {n: m.to(torch.bool) for n, m in mf.masks.items()}
            self.masks = MaskSchedule(self.masks.shapes, cfg.train.seed, cfg.prune.mask_interval,
                                      ratios=mf.ratios, fixed=fixed, source=f"{cfg.prune.masks_file} ({mf.method})")
        elif cfg.prune.method != "none" and cfg.prune.sparsity > 0 and cfg.optim.name != "lizo":
            from .prune import prune_masks

            custom = self.task.loss is not None or self.task.batched_loss is not None
            masks, ratios = stoppable(self.stop, lambda: prune_masks(
                self.model, cfg.prune.method, cfg.prune.sparsity, splits_for_pruning, cfg.prune, cfg.train.seed, comm,
                query_batch=cfg.zo.query_batch, check=self.stop.check if self.stop else no_check,
                objective=self.objective if custom else None))
            self.masks = MaskSchedule(self.masks.shapes, cfg.train.seed, cfg.prune.mask_interval,
                                      ratios=ratios, fixed=masks, source=f"{cfg.prune.method} at sparsity "
                                      f"{cfg.prune.sparsity}")

    def setup_estimator(self) -> None:
        """The step object of the configured estimator, and (CGE) the query cost model."""
        cfg, comm = self.cfg, self.comm
        if cfg.optim.name == "lizo":
            self.estimator = LIZOStep(comm, self.model, self.optimizer, self.objective, stop=self.stop)
        elif cfg.zo.estimator == "rge":
            from .zo.stacked import StackedForward

            evaluator = StackedForward(self.model, self.objective, cfg.zo.query_batch)
            self.estimator = RGEStep(comm, self.model, evaluator, mu=cfg.zo.mu, queries=cfg.zo.rge_queries,
                                     seed=cfg.train.seed, stop=self.stop)
        else:
            engine, reason = make_engine(self.model, self.objective, cfg)
            self.reuse_off_reason = reason
            self.estimator = CGEStep(comm, self.model, engine, mu=cfg.zo.mu, difference=cfg.zo.difference,
                                     stop=self.stop)
        self._refresh_coords()

    def _first_batch(self):
        return self.batch(epoch_batches(self.train_x.shape[0], self.batch_size, self.cfg.train.seed, self.epoch)[0],
                          0)

    def _cge_costs(self, coords) -> list[float]:
        """Seconds per query of each parameter: the FLOP model calibrated by a few timings on
        every rank (stoppable), averaged over the ranks so that all agree."""
        engine = self.estimator.engine
        if not isinstance(engine, QueryEngine):
            return [1.0] * len(coords.counts)  # full forwards: every query costs the same
        from .zo.costs import calibrated_costs

        x, y = self._first_batch()
        error = None

        def work():
            nonlocal error
            try:
                return calibrated_costs(engine, coords, x, y, check=self.stop.check if self.stop else no_check)
            except UserError as exc:  # the task's objective failed: every rank reports it below
                error = f"{exc} (cost model, before step 1)"
                return [0.0] * len(coords.counts)

        local = stoppable(self.stop, work)
        self.comm.raise_if_any(error)
        costs = torch.tensor(local, dtype=torch.float64)
        self.comm.allreduce_sum_(costs)
        return (costs / self.comm.size).tolist()

    def _refresh_coords(self) -> None:
        """New active coordinates when the mask draw changes (epoch boundaries)."""
        draw = self.masks.draw(self.epoch)
        if self.coords is not None and draw == self.current_draw:
            return
        self.current_draw = draw
        self.coords = Coordinates(self.model, self.masks.masks(self.epoch))
        if isinstance(self.estimator, CGEStep):
            if not self.costs:
                self.costs = self._cge_costs(self.coords)
            self.estimator.set_coords(self.coords, self.costs)
            if self.comm.size > 1 and isinstance(self.estimator.engine, QueryEngine):
                self.estimator.features = self._features_mode()
            self.rebalances_left = 2
            log.info("coords %d, shard %s, predicted imbalance %.3f, features %s", self.coords.total,
                     self.estimator.shard, self.estimator.predicted_imbalance(), self.estimator.features)
        else:
            self.estimator.set_coords(self.coords)
        if not any(r.draw == draw for r in self.metrics.records(rec.Masks)):
            self.metrics.write(rec.Masks(epoch=self.epoch, draw=draw, active_coords=self.coords.total,
                                         time=time.time()))

    def _features_mode(self) -> str:
        mode = self.cfg.zo.features
        if mode != "auto":
            return mode
        from .steps.cge import choose_features_mode

        x, y = self._first_batch()
        return choose_features_mode(self.comm, self.estimator.engine, x, y)

    # ------------------------------------------------------------------ data
    def batch(self, idx: torch.Tensor, batch_index: int):
        """Minibatch ``idx`` of the training data on this rank's device, in standard strides
        (every rank builds it; the step protocol broadcasts the driver's values)."""
        x = self.train_x[idx]
        if self.task.augment is not None:
            x = self.task.augment(x, self.epoch, batch_index)
        x = standard(x.to(self.device))
        if x.is_floating_point():
            x = x.to(next(self.model.parameters()).dtype)
        return x, standard(self.train_y[idx].to(self.device))

    # ------------------------------------------------------------------ one step
    def set_lr(self, step: int) -> float:
        factor = self.lr_factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def _update_running_stats(self, x) -> None:
        """The driver's one unperturbed train-mode forward per step updates BatchNorm statistics."""
        self.model.train()
        self.model(x)

    def train_step(self, x, y):
        """One step of the configured estimator at ``self.step`` (see ``zohpc.steps``)."""
        coords = self.coords
        if _injected_failure() == (self.comm.rank, self.step):
            raise RuntimeError(f"injected failure (ZOHPC_TEST_FAIL_AT) at step {self.step}")

        def apply_update(values, x_batch):
            if values is not None:
                self.optimizer.zero_grad(set_to_none=False)
                coords.fill_grad(self.model, values.to(self.device))
                self.optimizer.step()
            self._update_running_stats(x_batch)

        if self.progress is not None:
            self.estimator.progress = self.progress.inside_step(self.step)
        result = self.estimator(x, y, self.step, apply_update)
        if self.rebalances_left > 0:
            self.rebalances_left -= 1
            self.estimator.rebalance(result.compute)
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict] | None:
        """Test loss and metrics, the test batches split over the ranks (stoppable)."""
        if self.task.test is None:
            return None
        comm, (tx, ty) = self.comm, self.task.test
        bs = self.cfg.data.test_batch_size
        nb = -(-tx.shape[0] // bs)
        bounds = contiguous_split(nb, comm.size)
        rows, error = [], None
        dtype = next(self.model.parameters()).dtype

        def work():
            nonlocal error
            self.model.eval()
            try:
                for b in range(bounds[comm.rank], bounds[comm.rank + 1]):
                    if self.stop is not None:
                        self.stop.check()
                    x = tx[b * bs:(b + 1) * bs].to(self.device)
                    x = x.to(dtype) if x.is_floating_point() else x
                    y = ty[b * bs:(b + 1) * bs].to(self.device)
                    out = self.model(x)
                    loss = float(self.objective(out, y, 1)[0])
                    rows.append((x.shape[0], loss, self._metrics(out, y)))
            except UserError as exc:
                error = f"{exc} (evaluation at step {self.step})"
            finally:
                self.model.train()

        stoppable(self.stop, work)
        comm.raise_if_any(error)
        last = comm.size - 1  # the split puts larger blocks last: the last rank always has a batch
        keys = comm.bcast_strings(sorted(rows[0][2]) if comm.rank == last else None, root=last)
        sums = torch.zeros(2 + len(keys), dtype=torch.float64)
        for n, loss, metrics in rows:
            sums[0] += n
            sums[1] += n * loss
            for i, k in enumerate(keys):
                sums[2 + i] += n * float(metrics.get(k, math.nan))
        comm.allreduce_sum_(sums)
        return float(sums[1] / sums[0]), {k: float(sums[2 + i] / sums[0]) for i, k in enumerate(keys)}

    def _metrics(self, out, y) -> dict:
        if self.task.metrics is None:
            return {}
        try:
            values = self.task.metrics(out, y)
            return {str(k): float(v) for k, v in dict(values).items()}
        except Exception as exc:  # noqa: BLE001 - a plug-in's failure is reported as the task's
            raise UserError(f"task '{self.task.name}': metrics failed ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir: str) -> str | None:
        """Checkpoint the current (completed) state; driver only. Prunes this run's old ones."""
        if not self.comm.is_driver:
            return None
        path = ckpt.checkpoint_path(run_dir, self.step, self.run_id)
        ckpt.save_checkpoint(path, **self.state_dict())
        ckpt.prune_checkpoints(run_dir, self.cfg.checkpoint.keep, self.run_id)
        log.info("checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self, run_dir: str | None, t_start: float) -> dict:
        """Epochs until ``train.epochs`` (or ``train.max_steps``); raises Preempted on a stop."""
        cfg, comm, progress = self.cfg, self.comm, self.progress
        if progress is not None:
            progress.start_loop(self.step, self.total_steps)
        n = self.train_x.shape[0]
        while self.epoch < cfg.train.epochs and self.step < self.total_steps:
            batches = epoch_batches(n, self.batch_size, cfg.train.seed, self.epoch)
            self._refresh_coords()
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = self.set_lr(self.step)
                x, y = self.batch(batches[self.batch_in_epoch], self.batch_in_epoch)
                result = self.train_step(x, y)
                self.step += 1
                self.batch_in_epoch += 1
                seconds = time.perf_counter() - t0
                self.metrics.write(rec.Step(step=self.step, epoch=self.epoch, loss=result.loss, lr=lr,
                                            queries=result.queries, seconds=seconds,
                                            rank_compute_seconds=[round(v, 6) for v in result.compute],
                                            time=time.time() - t_start))
                if progress is not None:
                    progress.step(self.step, self.epoch, result.loss, lr, result.queries, seconds)
            if self.batch_in_epoch < len(batches):
                break  # max_steps reached inside an epoch
            evaluated = self.evaluate()
            if evaluated is not None:  # every rank keeps the history; the driver writes the file
                loss, metrics = evaluated
                self.metrics.write(rec.Eval(step=self.step, epoch=self.epoch, test_loss=loss, metrics=metrics,
                                            time=time.time() - t_start))
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                if progress is not None:
                    progress.say(f"epoch {self.epoch}: test loss {loss:.4f}{', ' + shown if shown else ''} "
                                 f"({time.time() - t_start:.1f} s)")
            self.epoch += 1
            self.batch_in_epoch = 0
            every = cfg.checkpoint.every_epochs
            if run_dir and every and self.epoch % every == 0 and self.epoch < cfg.train.epochs:
                self.save(run_dir)
        if progress is not None:
            progress.close()
        return self.summary()

    def summary(self) -> dict:
        evals = self.metrics.records(rec.Eval)
        final = dict(evals[-1].metrics, test_loss=evals[-1].test_loss) if evals else {}
        best = {}
        for e in evals:
            for k, v in dict(e.metrics, test_loss=e.test_loss).items():
                lower_is_better = k.endswith("loss") or k.endswith("error")
                if k not in best or (v < best[k] if lower_is_better else v > best[k]):
                    best[k] = v
        queries = sum(r.queries for r in self.metrics.records(rec.Step))
        return {"steps": self.step, "epochs": self.epoch, "queries": queries, "final": final, "best": best}
