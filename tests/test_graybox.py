"""Gray-box mode (``zo.boundary = "outputs"``, :mod:`zohpc.steps.graybox`): the estimate
against autograd through a differentiable twin of the black box, rank-count independence,
and the models and configs it refuses."""

import json

import pytest
import torch
from torch import nn

from mpi_util import run_ranks
from zohpc.comm import world
from zohpc.config import load_config
from zohpc.errors import ConfigError, UserError
from zohpc.steps import GrayBoxStep, build_step
from zohpc.tasks import burgers
from zohpc.zo.objective import Objective

OPTS = {**burgers.DEFAULTS, "grid": 16, "fine_factor": 4, "train_trajectories": 4, "test_trajectories": 2,
        "steps": 8, "unroll": 2, "width": 4, "kernel": 3}


def solver_problem(batched: bool):
    """The tiny solver task, a minibatch, and the black-box objective (per copy or batched)."""
    task = burgers.make_task(OPTS, 0)
    x, y = task.train
    objective = Objective(task.loss, task.batched_loss if batched else None, task.name)
    return task, x[:6].contiguous(), y[:6].contiguous(), objective


def twin_gradient(task, x, y):
    """The parameter gradient of the objective through the torch copy of the solver (float64)."""
    model = task.model.double()
    loss = burgers.unrolled_torch_loss(burgers.Burgers(OPTS), model(x.double()), y.double())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    task.model.float()
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("difference,batched,tol", [("central", True, 1e-4), ("central", False, 1e-4),
                                                    ("forward", True, 0.1)])
def test_step_gradient_matches_autograd_through_the_twin(difference, batched, tol):
    """Central differences agree to 1e-4 (O(mu^2)); the forward difference's O(mu) bias
    (mu/2 f'' per output coordinate) adds up in the last layer's biases (next test: it is O(mu))."""
    task, x, y, objective = solver_problem(batched)
    ref = twin_gradient(task, x, y)
    opt = torch.optim.SGD(task.model.parameters(), lr=1.0)
    step = GrayBoxStep(world(), task.model, opt, objective, mu=1e-3, difference=difference, query_batch=7)
    step.setup(None, (x, y))
    with torch.no_grad():
        base = float(objective(task.model(x), y, 1)[0])
    before = torch.cat([p.detach().reshape(-1).clone() for p in task.model.parameters()])
    result = step(x, y, 0)
    after = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    est = (before - after).double()  # SGD, lr 1: the step is the gradient
    assert float((est - ref).norm() / ref.norm()) < tol
    d = OPTS["unroll"] * OPTS["grid"]
    assert result.queries == x.shape[0] * (1 + d * (2 if difference == "central" else 1))
    assert result.loss == pytest.approx(base, rel=1e-6)


def test_forward_difference_error_shrinks_with_mu():
    """Finite-difference error, not a wrong formula: the forward difference's error is O(mu)."""
    task, x, y, objective = solver_problem(True)
    ref = twin_gradient(task, x, y)
    errors = []
    for mu in (4e-3, 1e-3):
        model = burgers.make_model(OPTS, 0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        step = GrayBoxStep(world(), model, opt, objective, mu=mu, difference="forward", query_batch=64)
        step.setup(None, (x, y))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        step(x, y, 0)
        est = (before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])).double()
        errors.append(float((est - ref).norm() / ref.norm()))
    assert errors[1] < errors[0] / 2.5


def test_build_step_and_config_checks():
    cfg = load_config(None, ["zo.boundary=outputs", "prune.method=none"], None)
    task, x, y, objective = solver_problem(True)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    assert isinstance(build_step(cfg, world(), task.model, opt, objective), GrayBoxStep)
    with pytest.raises(ConfigError, match="prune.method"):
        load_config(None, ["zo.boundary=outputs"], None)  # the default prunes: masks choose parameters
    with pytest.raises(ConfigError, match="zo.boundary"):
        load_config(None, ["zo.boundary=outputs", "prune.method=none", "zo.estimator=spsa"], None)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).detach()


def test_models_it_cannot_train_and_objectives_that_are_not_per_sample():
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    frozen = nn.Linear(4, 3).requires_grad_(False)
    for model, match in ((Detached(), "not differentiable"), (frozen, "no trainable parameters")):
        step = GrayBoxStep(world(), model, None, Objective(), mu=1e-3)
        with pytest.raises(UserError, match=match):  # agreed over the ranks: exit 2 on all
            step.setup(None, (x, y))
    model = nn.Linear(4, 3)
    whole = Objective(loss=lambda out, t: float(out.sum()), name="sum")  # a sum, not a mean over samples
    with pytest.raises(UserError, match="mean of its samples"):
        GrayBoxStep(world(), model, None, whole, mu=1e-3).setup(None, (x, y))
    GrayBoxStep(world(), model, None, Objective(), mu=1e-3).setup(None, (x, y))  # cross entropy is per-sample


def test_two_ranks_bit_identical_to_one_and_the_error_exits_2(tmp_path):
    runs = {}
    for k in (1, 2):
        out = tmp_path / f"r{k}.json"
        proc = run_ranks(k, ["tests/scripts/graybox_script.py", "train", str(out)], timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[k] = json.loads(out.read_text())
    assert runs[1]["steps"] == 3 and runs[1]["queries"] == 3 * 16 * (1 + 2 * 32)
    assert runs[1] == runs[2]
    proc = run_ranks(2, ["tests/scripts/graybox_script.py", "frozen", str(tmp_path / "f.json")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "not differentiable" in lines[0]
