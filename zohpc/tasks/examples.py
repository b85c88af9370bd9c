"""A complete plug-in task: an MLP regressor whose objective is a black box (numpy).

Shipped as ``zohpc.tasks.examples:regression``; the README lists this file as the model to
copy ("Bring your own problem"). Train it on two ranks:

    mpirun -n 2 python -m zohpc.train --config configs/bring_your_own.toml --out runs/regression

Options, in the ``[task]`` table or as ``--set task.KEY=VALUE``: ``objective = "numpy"``
(the black box, called once per perturbed copy) or ``"torch"`` (the same mean squared error
as a vectorized ``batched_loss``: the fast path), and the sizes of the data and the model.
"""

import numpy as np
import torch
from torch import nn

from zohpc.errors import ConfigError
from zohpc.seeding import generator
from zohpc.tasks.base import Task, task_options

OPTIONS = {"objective": "numpy", "inputs": 8, "hidden": 32, "train_size": 512, "test_size": 256, "noise": 0.05}


def numpy_mse(outputs, targets):
    """The objective of ONE perturbed copy: numpy on detached values, no autograd path."""
    out = outputs.detach().cpu().numpy().astype(np.float64)
    return float(np.mean((out - targets.cpu().numpy()) ** 2))


def batched_mse(outputs, targets):
    """The same objective for Q stacked copies at once: outputs (Q, B, 1) -> losses (Q,)."""
    return ((outputs - targets.unsqueeze(0)) ** 2).flatten(1).mean(1)


def metrics(outputs, targets):
    """Evaluation on a test batch: name -> mean over the batch."""
    err = (outputs.double() - targets.double()).abs()
    return {"mse": float((err ** 2).mean()), "mae": float(err.mean())}


def make_data(n, inputs, noise, seed, split):
    """y = sin(2 x.w) + x.v / 2 + noise, for a fixed teacher (w, v) drawn from the run's seed."""
    teacher = generator("examples.regression.teacher", seed)
    w = torch.randn(inputs, generator=teacher) / inputs ** 0.5
    v = torch.randn(inputs, generator=teacher) / inputs ** 0.5
    g = generator("examples.regression." + split, seed)
    x = torch.randn(n, inputs, generator=g)
    y = torch.sin(2 * (x @ w)) + 0.5 * (x @ v) + noise * torch.randn(n, generator=g)
    return x, y.unsqueeze(1)  # targets (n, 1): any shape and dtype is fine


def regression(cfg):
    """The factory: ``task.name = "zohpc.tasks.examples:regression"`` calls it on every rank."""
    opts = task_options(cfg, OPTIONS, "regression")  # the [task] table, type-checked
    if opts["objective"] not in ("numpy", "torch"):
        raise ConfigError(f"config key 'task.objective': {opts['objective']!r} is not 'numpy' or 'torch'")
    seed = cfg.train.seed
    train = make_data(opts["train_size"], opts["inputs"], opts["noise"], seed, "train")
    test = make_data(opts["test_size"], opts["inputs"], opts["noise"], seed, "test")
    model = nn.Sequential(nn.Linear(opts["inputs"], opts["hidden"]), nn.Tanh(), nn.Linear(opts["hidden"], 1))
    black_box = opts["objective"] == "numpy"
    return Task(model=model, train=train, test=test, metrics=metrics, name="regression",
                loss=numpy_mse if black_box else None, batched_loss=None if black_box else batched_mse)
