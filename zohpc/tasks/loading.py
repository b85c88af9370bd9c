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

from ..errors import ConfigError, UserError
from .base import Task

BUILTIN = {
    "classify": "zohpc.tasks.classify:build",
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def resolve(spec: str, key: str):
    """The callable named by ``package.module:attr`` (or a built-in name)."""
    target = BUILTIN.get(spec, spec) if key == "task.name" else spec
    if ":" not in target:
        known = ", ".join(BUILTIN) if key == "task.name" else "the model zoo"
        raise ConfigError(f"config key '{key}': {spec!r} is neither a built-in ({known}) nor package.module:factory")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of a plug-in is the user's to fix
        raise ConfigError(f"config key '{key}': cannot import module '{module_name}' ({_one_line(exc)})") from None
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
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: the factory failed ({_one_line(exc)})") from None


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
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"task '{task}': {split} data: cannot read the Dataset as (input, target) pairs "
                            f"({_one_line(exc)})") from None
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
    if not isinstance(task, Task):
        raise UserError(f"task '{name}': the factory returned {type(task).__name__}, not a zohpc.tasks.Task")
    if task.name == "task":
        task.name = name
    if not isinstance(task.model, nn.Module):
        raise UserError(f"task '{name}': model is {type(task.model).__name__}, not a torch.nn.Module")
    if not any(True for _ in task.model.parameters()):
        raise UserError(f"task '{name}': the model has no parameters to train")
    if task.loss is not None and not callable(task.loss):
        raise UserError(f"task '{name}': loss is not callable")
    task.train = as_pair(task.train, name, "train")
    task.test = as_pair(task.test, name, "test")
    return task


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


