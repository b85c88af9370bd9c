"""Black-box adversarial attack under an L-infinity budget (ReLIZO's attack application).

The digits classifier is seen only through its logits (:class:`~zohpc.tasks.blackbox.BlackBox`).
The attack's unknown is a perturbation ``delta = epsilon * tanh(w)`` of one image in
``[0, 1]`` pixel space: the tanh keeps every query inside the budget ``|delta|_inf <= epsilon``
with no projection step (so an optimizer's record of its iterate stays valid), and the
result is clamped to valid pixels. The objective is Carlini and Wagner's margin
``max(z_y - max_{j != y} z_j, -kappa)`` of the black box's logits ``z``: negative exactly
when the image is misclassified.

The task (``task.name = "zohpc.tasks.attack:build"``): model = :class:`Perturbation`; train
and test data = the one attacked test image (``image``) and its label; loss = the margin
(numpy, per copy); metrics = ``success`` (1 when misclassified) and ``margin``.

:func:`attack` runs one per-image attack with any ``torch.optim``-style ZO optimizer and
stops at the first query that fools the classifier or when the query budget is spent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Task
from .blackbox import BlackBox, PixelData, build_with_classifier

DEFAULTS = {
    "image": 0,  # index of the attacked image in the test set
    "epsilon": 0.1,  # L-infinity budget in [0, 1] pixel units
    "kappa": 0.0,  # margin floor: the loss stops improving once the margin is below -kappa
    "classifier": "digits_cnn",
    "classifier_epochs": 30,
    "seed": 0,
}


class Perturbation(nn.Module):
    """``x -> clamp(x + epsilon * tanh(w), 0, 1)``: one image's perturbation, the budget built in."""

    def __init__(self, shape, epsilon: float):
        super().__init__()
        if not epsilon > 0:
            raise ValueError(f"Perturbation: epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.w = nn.Parameter(torch.zeros(tuple(shape)))

    def delta(self) -> torch.Tensor:
        return self.epsilon * torch.tanh(self.w)

    def forward(self, x):
        return (x + self.epsilon * torch.tanh(self.w)).clamp(0.0, 1.0)


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row ``z_y - max_{j != y} z_j``: negative exactly when the row is misclassified."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(logits.shape[0])
    true = logits[rows, labels]
    other = logits.copy()
    other[rows, labels] = -np.inf
    return true - other.max(axis=1)


def make_task(classifier: nn.Module, data: PixelData, opts: dict) -> Task:
    """The attack on test image ``opts["image"]`` of ``data`` against ``classifier`` (a black box)."""
    from ..errors import ConfigError

    i = int(opts["image"])
    if not 0 <= i < data.test_x.shape[0]:
        raise ConfigError(f"config key 'task.image': {i} is not a test image index (0..{data.test_x.shape[0] - 1})")
    if not opts["epsilon"] > 0:
        raise ConfigError(f"config key 'task.epsilon': must be > 0, got {opts['epsilon']}")
    bb = BlackBox(classifier)
    kappa = float(opts["kappa"])
    x, y = data.test_x[i:i + 1].clone(), data.test_y[i:i + 1].clone()

    def loss(outputs, targets):
        return float(np.maximum(margins(bb(outputs), targets.numpy()), -kappa).mean())

    def metrics(outputs, targets):
        m = margins(bb(outputs), targets.numpy())
        return {"success": float(np.mean(m < 0)), "margin": float(np.mean(m))}

    task = Task(model=Perturbation(x.shape[1:], float(opts["epsilon"])), train=(x, y), test=(x, y), loss=loss,
                metrics=metrics, name="attack", lower_is_better=("margin",), info=dict(opts))
    return task


def build(cfg) -> Task:
    """Factory for ``task.name = "zohpc.tasks.attack:build"`` (options: see ``DEFAULTS``)."""
    return build_with_classifier(cfg, DEFAULTS, "attack", make_task)


class _Over(Exception):
    """The attack is over (success or budget spent): leaves the optimizer's step at once."""


def attack(blackbox: BlackBox, x: torch.Tensor, y: int, epsilon: float, make_step, budget: int,
           kappa: float = 0.0) -> dict:
    """Attack one image ``x`` (C, H, W) of label ``y`` with at most ``budget`` black-box queries.

    ``make_step(params) -> step`` builds the method on the perturbation's parameters;
    ``step(closure)`` is one iteration (``optimizer.step`` of a ZO optimizer, or an
    estimator filling ``.grad`` followed by a first-order optimizer's step). Every query
    counts, and the first query that fools the classifier ends the attack with success.
    Returns ``{"success": bool, "queries": int, "margin": float}`` (the lowest margin seen).
    """
    pert = Perturbation(x.shape, epsilon)
    step = make_step(list(pert.parameters()))
    xb, yb = x[None], np.array([int(y)])
    state = {"queries": 0, "success": False, "best": np.inf}

    def closure():
        with torch.no_grad():
            m = float(margins(blackbox(pert(xb)), yb)[0])
        state["queries"] += 1
        state["best"] = min(state["best"], m)
        if m < 0:
            state["success"] = True
            raise _Over
        if state["queries"] >= budget:
            raise _Over
        return max(m, -kappa)

    try:
        while True:
            step(closure)
    except _Over:
        pass
    return {"success": state["success"], "queries": state["queries"], "margin": state["best"]}
