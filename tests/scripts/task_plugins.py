"""Plug-in tasks for tests/test_tasks.py. The tests copy this file into a temporary
directory as ``zoplug.py`` and name its factories as ``--set task.name=zoplug:FACTORY``
(PYTHONPATH set for the subprocess): a user's module, not part of the zohpc package.

Every objective here is a black box: numpy on detached values, or an external program.
"""

import os
import subprocess
import sys

import numpy as np
import torch
from torch import nn

from zohpc.data import epoch_batches
from zohpc.tasks.base import Task, task_options

SENTINEL = 777.0  # a training target that makes the "late" objectives fail when its batch comes


def numpy_mse(outputs, targets):
    out = outputs.detach().cpu().numpy().astype(np.float64)
    return float(np.mean((out - targets.cpu().numpy()) ** 2))


def linear_data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.linspace(-1.0, 1.0, d).unsqueeze(1)
    return x, torch.tanh(x @ w) + 0.3 * (x @ w)


def mlp(d=4, hidden=8):
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def regression(cfg):
    """A small MLP on a smooth target; the numpy objective is its only loss."""
    return Task(model=mlp(), train=linear_data(128, 4, 1), test=linear_data(64, 4, 2), loss=numpy_mse,
                metrics=lambda o, t: {"mse": numpy_mse(o, t)})


# ---- (b) an external program per copy ------------------------------------------------
SOLVER = ("import os, sys\n"
          "v = [float(t) for t in sys.stdin.read().split()]\n"
          "n = len(v) // 2\n"
          "print(repr(sum((a - b) ** 2 for a, b in zip(v[:n], v[n:])) / n))\n"
          "print(os.getpid())\n")


def external_mse(outputs, targets):
    """Mean squared error computed by another process: numbers on stdin, the loss on stdout."""
    numbers = outputs.detach().reshape(-1).tolist() + targets.reshape(-1).tolist()
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", SOLVER], input=" ".join(map(repr, numbers)),
                          capture_output=True, text=True, timeout=60, check=True)
    loss, pid = proc.stdout.split()
    log = os.environ.get("ZOPLUG_CALLS")
    if log:  # which process computed it (the test counts them)
        with open(log, "a") as fh:
            fh.write(f"{pid}\n")
    return float(loss)


def external(cfg):
    x, y = linear_data(16, 2, 3)
    return Task(model=nn.Linear(2, 1), train=(x, y), test=(x[:4], y[:4]), loss=external_mse, name="external")


def external_twin(cfg):
    """The same task with the objective as a batched torch function (a path that shares no
    code with the per-copy calls): the reference trajectory for ``external``."""
    task = external(cfg)
    task.loss, task.name = None, "external-twin"
    task.batched_loss = lambda o, t: ((o.double() - t.double().unsqueeze(0)) ** 2).flatten(1).mean(1).float()
    return task


# ---- (c) a model torch.fx cannot trace ------------------------------------------------
class FixedPoint(nn.Module):
    """h = tanh(A x + B h) iterated until it settles: the loop count depends on the data,
    which is Python control flow torch.fx cannot trace (and vmap cannot batch)."""

    def __init__(self, d=4, hidden=6):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        u = self.inp(x)
        h = torch.tanh(u)
        for _ in range(30):
            new = torch.tanh(u + 0.3 * self.rec(h))
            if float((new - h).abs().max()) < 1e-5:
                break
            h = new
        return self.out(h)


def untraceable(cfg):
    return Task(model=FixedPoint(), train=linear_data(128, 4, 1), test=linear_data(64, 4, 2), loss=numpy_mse,
                name="fixed_point")


# ---- (d) bad input ---------------------------------------------------------------------
NOT_CALLABLE = 42


def not_a_task(cfg):
    return {"model": mlp()}


def failing_model(cfg):
    raise ValueError("no such layer size: -3")


def mismatched(cfg):
    x, y = linear_data(32, 4, 1)
    return Task(model=mlp(), train=(x, y[:31]), loss=numpy_mse)


def non_finite(cfg):
    x, y = linear_data(32, 4, 1)
    x[5, 2] = float("nan")
    return Task(model=mlp(), train=(x, y), loss=numpy_mse)


def wrong_shape(cfg):
    def loss(outputs, targets):
        return (outputs.detach().numpy() - targets.numpy()) ** 2  # one value per example, not per copy

    return Task(model=mlp(), train=linear_data(32, 4, 1), loss=loss)


def _rank():
    from zohpc.comm import world

    return world().rank


def exits_on_rank_1(cfg):
    """A factory that gives up with sys.exit on one rank only (the others wait in a collective)."""
    if _rank() == 1:
        sys.exit(3)
    return regression(cfg)


def late_labels(cfg):
    """A classifier (cross entropy: no loss given) whose labels leave the model's 3 classes
    after the probe's first 8 training examples, and in the test split."""
    x, _ = linear_data(64, 4, 1)
    y = torch.arange(64) % 3
    y[40] = 7
    return Task(model=nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), train=(x, y), name="labels")


def _late(cfg, fail):
    """The objective fails (``fail(outputs, targets)``) in the third step of epoch 0: the
    step whose batch holds the SENTINEL target; earlier steps and the probe are fine."""
    task_options(cfg, {}, "late")
    n = 64
    x, y = linear_data(n, 4, 1)
    third = epoch_batches(n, min(cfg.data.batch_size, n), cfg.train.seed, 0)[2]
    y[int(third[third >= 8][0])] = SENTINEL  # not in the probe's first 8 examples

    def loss(outputs, targets):
        if bool((targets == SENTINEL).any()):
            return fail(outputs, targets)
        return numpy_mse(outputs, targets)

    return Task(model=mlp(), train=(x, y), test=linear_data(16, 4, 2), loss=loss, name="late")


def nan_late(cfg):
    return _late(cfg, lambda o, t: float("nan"))


def raises_late(cfg):
    def fail(o, t):
        raise RuntimeError("solver diverged")

    return _late(cfg, fail)


def exits_late(cfg):
    def fail(o, t):
        if _rank() == 1:
            sys.exit("the solver gave up")
        return numpy_mse(o, t)

    return _late(cfg, fail)


def exits_in_augment(cfg):
    """augment gives up with sys.exit on rank 1 in the third batch (step 3)."""
    task = regression(cfg)

    def augment(x, epoch, batch_index):
        if _rank() == 1 and batch_index == 2:
            sys.exit(3)
        return x

    task.augment = augment
    return task


CALLS = [0]


def nan_after(cfg):
    """NaN from the objective's N-th call on this rank on (N = env ZOPLUG_NAN_AFTER)."""
    limit = int(os.environ["ZOPLUG_NAN_AFTER"])

    def loss(outputs, targets):
        CALLS[0] += 1
        return float("nan") if CALLS[0] > limit else numpy_mse(outputs, targets)

    return Task(model=mlp(), train=linear_data(64, 4, 1), test=linear_data(16, 4, 2), loss=loss, name="counted")
