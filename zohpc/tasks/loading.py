"""Finding a task (or a model) by name and checking what a factory returns.

``classify`` and the other built-ins are plain factories too; a user's plug-in is named
``package.module:factory`` (importable from PYTHONPATH or an installed package) and is
called as ``factory(cfg)`` on every rank. Everything here fails with one line naming the
task and the problem (exit 2), before any heavy work.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import PLUGIN_FAILURES, ConfigError, UserError, describe
from ..inputs import model_input
from .base import Task, accuracy

BUILTIN = {
    "classify": "zohpc.tasks.classify:build",
    "hf": "zohpc.tasks.hf:build",
}


def resolve(spec: str, key: str):
    """The callable named by ``package.module:attr`` (or a built-in name)."""
    target = BUILTIN.get(spec, spec) if key == "task.name" else spec
    if ":" not in target:
        known = ", ".join(BUILTIN) if key == "task.name" else "the model zoo"
        raise ConfigError(f"config key '{key}': {spec!r} is neither a built-in ({known}) nor package.module:factory")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except PLUGIN_FAILURES as exc:  # noqa: BLE001 - any import failure of a plug-in is the user's to fix
        raise ConfigError(f"config key '{key}': cannot import module '{module_name}' ({describe(exc)})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"config key '{key}': module '{module_name}' has no '{attr}'")
    if not callable(obj):
        raise ConfigError(f"config key '{key}': '{target}' is not callable")
    return obj


def call_factory(factory, cfg, what: str):
    try:
        return factory(cfg)
    except UserError:
        raise
    except PLUGIN_FAILURES as exc:  # noqa: BLE001
        raise UserError(f"{what}: the factory failed ({describe(exc)})") from None


def as_pair(data, task: str, split: str):
    """``(inputs, targets)`` tensors from a pair or a Dataset of pairs, checked."""
    if data is None:
        return None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
            items = [data[i] for i in range(n)]
            x = torch.stack([torch.as_tensor(a) for a, _ in items])
            y = torch.stack([torch.as_tensor(b) for _, b in items])
        except PLUGIN_FAILURES as exc:  # noqa: BLE001
            raise UserError(f"task '{task}': {split} data: cannot read the Dataset as (input, target) pairs "
                            f"({describe(exc)})") from None
    else:
        raise UserError(f"task '{task}': {split} data must be (inputs, targets) tensors or a Dataset of pairs, "
                        f"got {type(data).__name__}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"task '{task}': {split} inputs ({x.shape[0]}) and targets ({y.shape[0]}) differ in length")
    if x.shape[0] == 0:
        raise UserError(f"task '{task}': {split} data is empty")
    for name, t in (("inputs", x), ("targets", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"task '{task}': {split} {name} contain NaN or inf")
    return x.contiguous(), y.contiguous()


def check_task(task, name: str) -> Task:
    """``task`` checked field by field, its data as tensor pairs, and one probe (see :func:`probe`)."""
    if not isinstance(task, Task):
        raise UserError(f"task '{name}': the factory returned {type(task).__name__}, not a zohpc.tasks.Task")
    if task.name == "task":
        task.name = name
    if not isinstance(task.model, nn.Module):
        raise UserError(f"task '{name}': model is {type(task.model).__name__}, not a torch.nn.Module")
    if not any(True for _ in task.model.parameters()):
        raise UserError(f"task '{name}': the model has no parameters to train")
    for field_name in ("loss", "batched_loss", "metrics", "augment"):
        value = getattr(task, field_name)
        if value is not None and not callable(value):
            raise UserError(f"task '{name}': {field_name} is {type(value).__name__}, not callable")
    lower = task.lower_is_better
    if isinstance(lower, str) or not isinstance(lower, (tuple, list, set, frozenset)) \
            or not all(isinstance(k, str) for k in lower):
        raise UserError(f"task '{name}': lower_is_better is {lower!r}, not a tuple of metric names")
    task.lower_is_better = tuple(lower)
    task.train = as_pair(task.train, name, "train")
    task.test = as_pair(task.test, name, "test")
    if task.test is not None:
        for what, a, b in (("inputs", task.train[0], task.test[0]), ("targets", task.train[1], task.test[1])):
            if tuple(a.shape[1:]) != tuple(b.shape[1:]):
                raise UserError(f"task '{name}': test {what} have shape {tuple(b.shape[1:])} per example, "
                                f"train {what} {tuple(a.shape[1:])}")
    probe(task, name)
    if task.loss is None and task.batched_loss is None and task.metrics is None:
        task.metrics = accuracy  # cross entropy over class labels: a classifier (the probe checked it)
    return task


PROBE_EXAMPLES = 8  # examples in the probe batch (few: the probe must cost nothing next to a step)


@torch.no_grad()
def probe(task: Task, name: str) -> None:
    """Two unperturbed copies of the model on a few training examples, through the objective
    and the metrics, as a query sees them (BatchNorm on batch statistics, nothing updated).

    A model that does not fit the data, an objective that returns the wrong shape or NaN at
    the initial parameters, or metrics that fail: one line naming the task, before any heavy
    work (a plug-in's mistakes otherwise surface in the middle of the first step or epoch).
    """
    from ..zo.batchnorm import batch_stats_only
    from ..zo.objective import Objective

    x, y = task.train
    k = min(PROBE_EXAMPLES, x.shape[0])
    xb, yb = x[:k], y[:k]
    first = next(task.model.parameters())
    try:
        if task.augment is not None:
            xb = task.augment(xb, 0, 0)
            if not isinstance(xb, torch.Tensor):
                raise TypeError(f"augment returned {type(xb).__name__}, not a tensor")
        xb = model_input(xb, first)
        with batch_stats_only(task.model):
            out = task.model(xb)
    except PLUGIN_FAILURES as exc:  # noqa: BLE001 - the plug-in's model or augment is the user's to fix
        raise UserError(f"task '{name}': the model fails on {k} training inputs of shape "
                        f"{tuple(x.shape[1:])} ({describe(exc)})") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"task '{name}': the model returns {type(out).__name__}, not a tensor")
    yb = yb.to(out.device)
    if task.loss is None and task.batched_loss is None:
        if out.dim() != 2 or yb.dim() != 1 or yb.is_floating_point() or yb.dtype == torch.bool:
            raise UserError(f"task '{name}': no loss given, so the objective is cross entropy over class labels, "
                            f"which needs outputs (B, classes) and integer targets (B,); got outputs "
                            f"{tuple(out.shape)} and {yb.dtype} targets {tuple(yb.shape)}")
        for split, data in (("train", task.train), ("test", task.test)):  # every label, not the probe's few
            if data is None or data[1].numel() == 0:
                continue
            lo, hi = int(data[1].min()), int(data[1].max())
            if lo < 0 or hi >= out.shape[1]:
                raise UserError(f"task '{name}': {split} class labels must lie in [0, {out.shape[1]}) for a model "
                                f"with {out.shape[1]} outputs; got labels {lo}..{hi}")
    objective = Objective(task.loss, task.batched_loss, name)
    try:
        objective(torch.cat([out, out]), yb, 2)
    except UserError as exc:
        raise UserError(f"{exc} (at the initial parameters, before training)") from None
    except PLUGIN_FAILURES as exc:  # noqa: BLE001
        raise UserError(f"task '{name}': the objective fails on the model's outputs {tuple(out.shape)} "
                        f"({describe(exc)})") from None
    if task.metrics is not None:
        try:
            values = task.metrics(out, yb)
            _ = {str(key): float(v) for key, v in dict(values).items()}
        except PLUGIN_FAILURES as exc:  # noqa: BLE001
            raise UserError(f"task '{name}': metrics failed ({describe(exc)}); they must return a dict of "
                            "name -> number") from None


def build_task(cfg) -> Task:
    """The configured task, built and checked (every rank calls this with the same seed)."""
    name = cfg.task.name
    factory = resolve(name, "task.name")
    torch.manual_seed(cfg.train.seed)  # identical initialization on every rank
    task = call_factory(factory, cfg, f"task '{name}'")
    return check_task(task, name)


def build_model_from_config(cfg, input_shape, num_classes: int) -> nn.Module:
    """``model.name``: a zoo model, or ``package.module:factory`` called as ``factory(cfg)``."""
    from ..models import build_model

    name = cfg.model.name
    if ":" in name:
        model = call_factory(resolve(name, "model.name"), cfg, f"model '{name}'")
        if not isinstance(model, nn.Module):
            raise UserError(f"model '{name}': the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model
    return build_model(name, input_shape, num_classes)


