"""The task contract: what is being trained. Everything below it (engine, estimators,
step protocol, checkpoints) is the same for every task.

A task is built on every rank by a factory ``factory(cfg) -> Task`` (a built-in such as
``classify``, or a user's plug-in named ``package.module:factory``). Its objective may be a
black box: ZO only ever needs its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Task:
    """A model, its data and its objective.

    ``model``: any ``nn.Module`` (traceable by torch.fx for per-layer feature reuse; any other
    module still trains, with a full forward per query).
    ``train`` / ``test``: ``(inputs, targets)`` tensors with equal first dimension, or a
    ``torch.utils.data.Dataset`` of ``(input, target)`` pairs. Targets may have any shape and
    dtype. ``test`` may be None (no evaluation).
    ``loss(outputs, targets)``: the objective for ONE copy of the model on one minibatch:
    ``outputs`` is the model's output for the minibatch, ``targets`` the minibatch's
    targets; returns a float or a 0-dim tensor. It may be a black box (numpy on detached
    values, an external program).
    ``batched_loss(outputs, targets)``: optional fast path: ``outputs`` stacks Q perturbed
    copies, shape ``(Q, B, ...)``; returns a tensor of shape ``(Q,)``, entry q equal to
    ``loss(outputs[q], targets)``.
    ``metrics(outputs, targets)``: optional evaluation metrics on a test batch, a dict of
    name -> mean value over the batch (averaged over the test set weighted by batch size).
    ``augment(x, epoch, batch_index) -> x``: optional deterministic augmentation of a
    training batch (a pure function of its arguments, so every rank and a resumed run agree).
    ``loss=None`` (the default, with no ``batched_loss``) means mean cross entropy over class
    labels (the engine's fast path); such a classifier without ``metrics`` gets
    :func:`accuracy` (``"accuracy"`` in the evaluation records).
    Inputs may be token ids (integer tensors): they reach the model unchanged in every phase;
    only floating-point inputs are cast to the model's dtype.
    Dropout modules are accepted with ``p = 0`` only (finite differences need a fixed forward;
    PyTorch's encoder layers take ``dropout=0.0``).
    ``lower_is_better``: names of ``metrics`` whose best value is the smallest (the run's
    summary reports each metric's best over the evaluations). Besides those, a name ending
    in one of :data:`LOWER_IS_BETTER` (``loss``, ``error``, ``mse``, ...) is minimized; any
    other name is maximized.
    ``info``: free-form facts for the log (data set name, sizes).
    """

    model: nn.Module
    train: Any
    loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    test: Any = None
    batched_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metrics: Callable[[torch.Tensor, torch.Tensor], dict] | None = None
    name: str = "task"
    augment: Callable | None = None
    lower_is_better: tuple = ()
    info: dict = field(default_factory=dict)

    def minimizes(self, metric: str) -> bool:
        """Whether ``metric``'s best value is its smallest (``test_loss`` always is)."""
        return metric in self.lower_is_better or metric.lower().endswith(LOWER_IS_BETTER)


# metric name endings that mean "smaller is better" (a task may name others in lower_is_better)
LOWER_IS_BETTER = ("loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "regret")


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 accuracy over class labels: the metric of every cross-entropy classifier."""
    return {"accuracy": float((outputs.argmax(1) == targets).double().mean())}


def task_options(cfg, defaults: dict, task: str) -> dict:
    """The task's ``[task]`` options (``cfg.task.options``) over ``defaults``, type-checked.

    Unknown keys and values whose type differs from the default's raise ConfigError naming
    the key (ints are accepted where floats are expected).
    """
    from ..errors import ConfigError

    given = dict(getattr(getattr(cfg, "task", None), "options", None) or {})
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(f"config key 'task.{key}': unknown option of task '{task}' "
                              f"(known: {', '.join(sorted(defaults)) or 'none'})")
        want = type(defaults[key])
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"config key 'task.{key}': expected {want.__name__}, got {value!r}")
        out[key] = value
    return out
