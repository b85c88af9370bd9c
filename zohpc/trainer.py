"""The Trainer owns a run: its state (model, optimizer, schedule, masks, position, metrics),
its identity (run id, run directory, metrics log, all given at construction), the loop over
epochs, and its checkpoints, which it also writes itself when the run stops or fails
(:meth:`Trainer.guarded`). :meth:`Trainer.state_dict` is composed of its components' state
dicts, which ``checkpoint.to_file`` maps onto the file's groups; :meth:`Trainer.load_state_dict`
is the inverse. One step is :meth:`Trainer.train_step`, which calls the estimator's step
(``zohpc.steps``); the training loop and ``bench scaling`` use the same step objects.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from . import checkpoint as ckpt
from . import metrics as rec
from .config import DENSE_ESTIMATORS, Config, estimator_name, to_toml
from .data import epoch_batches
from .errors import PLUGIN_FAILURES, CheckpointError, ConfigError, UserError, describe
from .evaluation import evaluate
from .inputs import model_input
from .masks import MaskSchedule, read_mask_file
from .steps import attempt, build_step, settle
from .steps.protocol import standard
from .stop import Preempted, no_check
from .zo import Coordinates
from .zo.engine import check_deterministic
from .zo.objective import Objective

log = logging.getLogger("zohpc.train")


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
    """The optimizer of the configured estimator: LIZO and SPSA are their own (SPSA takes
    ``optim.momentum``, or Adam's ``optim.betas`` with ``optim.name = "adam"``); CGE and RGE
    step ``optim.name`` (sgd | adam) on their estimates."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones are never updated
    if not params:
        raise ConfigError("the model has no trainable parameters (every parameter has requires_grad=False)")
    name = estimator_name(cfg)
    if name == "spsa":
        from .optim import SPSA

        return SPSA(model, lr=o.lr, mu=cfg.zo.mu, queries=cfg.zo.spsa_queries, difference=cfg.zo.difference,
                    momentum=o.momentum if o.name == "sgd" else 0.0,
                    betas=tuple(o.betas) if o.name == "adam" else None, weight_decay=o.weight_decay,
                    seed=cfg.train.seed, comm=comm)
    if name != "lizo" and o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if name != "lizo" and o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    from .optim import LIZO

    bound = None if o.reuse_distance_bound < 0 else o.reuse_distance_bound
    return LIZO(params, lr=o.lr, num_sample_per_step=o.num_sample_per_step, reuse_distance_bound=bound,
                max_reuse_rate=o.max_reuse_rate, orthogonal_sample=o.orthogonal_sample, line_search=o.line_search,
                weight_decay=o.weight_decay, sample_norm=cfg.zo.mu, comm=comm, seed=cfg.train.seed)


def _injected_failure():
    """Test hook ``ZOHPC_TEST_FAIL_AT=RANK:STEP``: that rank raises at that step (the abort path)."""
    import os

    spec = os.environ.get("ZOHPC_TEST_FAIL_AT")
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


def augmented(task, x, epoch: int, batch_index: int):
    """The task's augment of a training batch; its failure (sys.exit too) is one line."""
    try:
        return task.augment(x, epoch, batch_index)
    except PLUGIN_FAILURES as exc:
        raise UserError(f"task '{task.name}': augment failed in epoch {epoch}, batch {batch_index} "
                        f"({describe(exc)})") from None


class Trainer:
    """Owns everything a checkpoint holds and runs the epochs (see the module docstring)."""

    def __init__(self, task, cfg: Config, comm, runtime, *, run_id: str = "", run_dir: str | None = None,
                 metrics: rec.MetricsLog | None = None, stop=None, progress=None):
        self.task, self.cfg, self.comm, self.stop, self.progress = task, cfg, comm, stop, progress
        self.run_id, self.run_dir = run_id, run_dir
        self.metrics = metrics if metrics is not None else rec.MetricsLog(None)
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
        self.last_saved = None  # the step of the newest checkpoint of this segment (or the resumed one)
        self.stop_checkpoint = None  # what the stop left: a checkpoint path, or None
        self.stop_error = None  # a checkpoint that could not be written on a stop (one line)
        self.masks = MaskSchedule({n: p.shape for n, p in self.model.named_parameters()}, cfg.train.seed,
                                  cfg.prune.mask_interval)
        self.step_state: dict = {}  # the step object's state (CGE: its query costs), checkpointed
        self.estimator = self.coords = self.current_draw = self.reuse_off_reason = None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds, composed of the components' state dicts
        (``checkpoint.to_file`` maps them onto the file's groups).

        Parameters: the trainable ones only. Frozen parameters (the base under LoRA adapters)
        never change; a resumed run re-makes them from the task (its factory, or the Hugging
        Face directory) and :meth:`load_state_dict` checks them against ``frozen_sha256``, so a
        checkpoint holds the adapters and resume stays exact."""
        return {
            "position": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "config_toml": to_toml(self.cfg),
            "model": {"params": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
                      "buffers": {n: b.detach().cpu() for n, b in self.model.named_buffers()},
                      "frozen_sha256": self.frozen_sha256()},
            "masks": self.masks.state_dict(self.epoch),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"base_lrs": list(self.base_lrs)},
            "rng": {"torch": torch.get_rng_state()},
            "estimator": self.estimator.state_dict() if self.estimator else self.step_state,
            "metrics": self.metrics.history,
            "run": {"run_id": self.run_id},
        }

    def expect(self) -> ckpt.Expect:
        """What a checkpoint of this run must hold (checked before its arrays are read)."""
        return ckpt.Expect.of(self.model, self.steps_per_epoch)

    def resume(self, path: str) -> None:
        """Load ``path`` against this run's :meth:`expect` and restore it, on every rank (a file
        that does not fit is one agreed line, exit 2)."""
        state = self.comm.agree(ckpt.load_checkpoint, path, self.expect())
        self.comm.agree(self.load_state_dict, ckpt.from_file(state))
        self.last_saved = self.step

    @property
    def complete(self) -> bool:
        """Nothing left: every step done and the last epoch's evaluation recorded."""
        return self.step >= self.total_steps and not self._eval_pending()

    def _eval_pending(self) -> bool:
        """The last step of an epoch is done but its evaluation is not (a stop came in between)."""
        return self.epoch < self.cfg.train.epochs and self.batch_in_epoch >= self.steps_per_epoch

    def frozen_sha256(self) -> str:
        """Fingerprint of the frozen parameters ("" when every parameter is trained); computed once."""
        if getattr(self, "_frozen_sha256", None) is None:
            from .lora import frozen_fingerprint

            self._frozen_sha256 = frozen_fingerprint(self.model)
        return self._frozen_sha256

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (``checkpoint.from_file`` of a validated file, after
        checking that it fits this model); no pruning ever."""
        path, model = state.get("path", "checkpoint"), state["model"]
        if model["frozen_sha256"] != self.frozen_sha256():
            raise CheckpointError(f"{path}: the frozen parameters differ from the checkpoint's (a changed base "
                                  f"model, or another lora setting): resume needs the base it was trained on")
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for kind, ours, theirs in (("parameter", trainable, model["params"]),
                                   ("buffer", dict(self.model.named_buffers()), model["buffers"])):
            if set(ours) != set(theirs):
                diff = sorted(set(ours) ^ set(theirs))
                raise CheckpointError(f"{path}: checkpoint is for another model ({kind}s differ: "
                                      f"{', '.join(diff[:4])})")
            for name, tensor in ours.items():
                if tuple(theirs[name].shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{path}: {kind} {name} has shape {tuple(theirs[name].shape)}, "
                                          f"the model needs {tuple(tensor.shape)}")
                tensor.copy_(theirs[name].to(tensor.device))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: field optimizer: does not fit optim.name = "
                                  f"{self.cfg.optim.name!r} ({str(exc).splitlines()[0]})") from None
        torch.set_rng_state(state["rng"]["torch"])
        pos = state["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        self.step_state = dict(state["estimator"])
        self.metrics.history = list(state["metrics"])
        self.masks.load_state_dict(state["masks"])

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
        elif cfg.prune.method != "none" and cfg.prune.sparsity > 0 and estimator_name(cfg) not in DENSE_ESTIMATORS:
            from .prune import prune_masks

            custom = self.task.loss is not None or self.task.batched_loss is not None
            outcome = attempt(lambda: prune_masks(
                self.model, cfg.prune.method, cfg.prune.sparsity, splits_for_pruning, cfg.prune, cfg.train.seed, comm,
                query_batch=cfg.zo.query_batch, check=self.stop.check if self.stop else no_check,
                objective=self.objective if custom else None))
            settle(comm, self.stop, outcome)
            masks, ratios = outcome.value
            self.masks = MaskSchedule(self.masks.shapes, cfg.train.seed, cfg.prune.mask_interval,
                                      ratios=ratios, fixed=masks, source=f"{cfg.prune.method} at sparsity "
                                      f"{cfg.prune.sparsity}")

    def setup_estimator(self) -> None:
        """The step object of the configured estimator (``zohpc.steps.build_step``) with its
        state from the checkpoint, set up on the current coordinates."""
        inside = self.progress.inside_step if self.progress is not None else None
        self.estimator = build_step(self.cfg, self.comm, self.model, self.optimizer, self.objective,
                                    stop=self.stop, progress=inside)
        self.estimator.load_state_dict(self.step_state)
        self.reuse_off_reason = getattr(self.estimator, "reuse_off_reason", None)
        self._refresh_coords()

    def _first_batch(self):
        return self.batch(epoch_batches(self.train_x.shape[0], self.batch_size, self.cfg.train.seed, self.epoch)[0],
                          0)

    def _refresh_coords(self) -> None:
        """New active coordinates when the mask draw changes (epoch boundaries)."""
        draw = self.masks.draw(self.epoch)
        if self.coords is not None and draw == self.current_draw:
            return
        self.current_draw = draw
        self.coords = Coordinates(self.model, self.masks.masks(self.epoch))
        self.estimator.setup(self.coords, self._first_batch())
        if not any(r.draw == draw for r in self.metrics.records(rec.Masks)):
            self.metrics.write(rec.Masks(epoch=self.epoch, draw=draw, active_coords=self.coords.total,
                                         time=time.time()))

    # ------------------------------------------------------------------ data
    def batch(self, idx: torch.Tensor, batch_index: int):
        """Minibatch ``idx`` of the training data on this rank's device, in standard strides
        (every rank builds it; the step protocol broadcasts the driver's values)."""
        x = self.train_x[idx]
        if self.task.augment is not None:
            x = augmented(self.task, x, self.epoch, batch_index)
        x = standard(model_input(x, next(self.model.parameters())))
        return x, standard(self.train_y[idx].to(self.device))

    # ------------------------------------------------------------------ one step
    def set_lr(self, step: int) -> float:
        factor = self.lr_factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, x, y):
        """One step of the configured estimator at ``self.step``, its update included."""
        if _injected_failure() == (self.comm.rank, self.step):
            raise RuntimeError(f"injected failure (ZOHPC_TEST_FAIL_AT) at step {self.step}")
        return self.estimator(x, y, self.step)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[float, dict] | None:
        """Test loss and metrics of the current model over all ranks (stoppable)."""
        return evaluate(self.comm, self.task, self.model, self.objective, self.cfg.data.test_batch_size,
                        stop=self.stop, label=(self.epoch, self.step))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        """Checkpoint the current (completed) state and prune this run's old ones. Collective:
        the driver writes, and a failure (a full disk) is one agreed line on every rank, so no
        rank is left waiting; the previous checkpoint stays intact."""
        def write():
            if not self.comm.is_driver:
                return None
            self.metrics.raise_error()
            path = ckpt.checkpoint_path(self.run_dir, self.step, self.run_id)
            ckpt.save_checkpoint(path, **ckpt.to_file(self.state_dict()))
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep, self.run_id)
            log.info("checkpoint %s", path)
            return path

        path = self.comm.agree(write)
        self.last_saved = self.step
        return path

    def _save_if_new(self) -> str | None:
        if self.run_dir and self.step != self.last_saved and self.step > 0:
            return self.save()
        return None

    @contextmanager
    def guarded(self):
        """Run start-up phases and epochs; on a stop (Preempted) or an error the Trainer itself
        checkpoints the last completed step (if newer than the last checkpoint). A checkpoint
        that cannot be written on a stop is kept as ``stop_error`` and the stop goes on."""
        try:
            yield
        except Preempted:
            try:
                self.stop_checkpoint = self._save_if_new()
            except UserError as exc:
                self.stop_error = str(exc)
            raise
        except UserError:
            self._save_if_new()  # the last good step is kept
            raise

    # ------------------------------------------------------------------ the loop
    def fit(self, t_start: float) -> dict:
        """Epochs until ``train.epochs`` (or ``train.max_steps``); raises Preempted on a stop.
        An epoch whose steps are done but whose evaluation is not (a stop came in between)
        is evaluated first."""
        cfg, comm, progress = self.cfg, self.comm, self.progress
        run_dir = self.run_dir
        if progress is not None:
            progress.start_loop(self.step, self.total_steps)
        n = self.train_x.shape[0]
        while self.epoch < cfg.train.epochs and (self.step < self.total_steps or self._eval_pending()):
            batches = epoch_batches(n, self.batch_size, cfg.train.seed, self.epoch)
            self._refresh_coords()
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = self.set_lr(self.step)
                bi = self.batch_in_epoch  # (a user's augment failing on any rank: agreed, one line)
                x, y = comm.agree(self.batch, batches[bi], bi) if self.task.augment else self.batch(batches[bi], bi)
                result = self.train_step(x, y)
                self.step += 1
                self.batch_in_epoch += 1
                seconds = time.perf_counter() - t0
                self.metrics.write(rec.Step(step=self.step, epoch=self.epoch, loss=result.loss, lr=lr,
                                            queries=result.queries, seconds=seconds, free_queries=result.free_queries,
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
                self.save()
            elif run_dir:
                comm.agree(self.metrics.raise_error)  # a metrics file that stopped taking writes
        if progress is not None:
            progress.close()
        return self.summary()

    def summary(self) -> dict:
        evals = self.metrics.records(rec.Eval)
        final = dict(evals[-1].metrics, test_loss=evals[-1].test_loss) if evals else {}
        best = {}
        for e in evals:
            for k, v in dict(e.metrics, test_loss=e.test_loss).items():
                if k not in best or (v < best[k] if self.task.minimizes(k) else v > best[k]):
                    best[k] = v
        queries = sum(r.queries for r in self.metrics.records(rec.Step))
        out = {"steps": self.step, "epochs": self.epoch, "queries": queries, "final": final, "best": best}
        if hasattr(self.optimizer, "counters"):  # LIZO: reused rows, fallbacks, ... (the same on every rank)
            out["optimizer_counters"] = self.optimizer.counters()
        return out
