"""ZO-SGD family: the RGE estimate, ZOSGD / ZOSignSGD steps, state round trip, ranks."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from zohpc.comm import world
from zohpc.optim import RGE, ZOSGD, ZOSignSGD, estimate_grad_rge
from zohpc.zo.rge import directions

torch.set_num_threads(1)
D64 = torch.float64


def quadratic(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, dtype=D64, generator=g)
    a = m @ m.T / d + torch.eye(d, dtype=D64)
    b = torch.randn(d, dtype=D64, generator=g)
    x = torch.nn.Parameter(torch.randn(d, dtype=D64, generator=g))
    f = lambda: 0.5 * x @ (a @ x) + b @ x  # noqa: E731
    return x, f, lambda: a @ x.detach() + b


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def test_rge_with_many_directions_points_along_the_gradient():
    d = 20
    x, f, true_grad = quadratic(d)
    estimate_grad_rge(f, [x], q=2000, mu=1e-5, seed=1)
    assert cos(x.grad, true_grad()) > 0.97
    assert 0.8 < float(x.grad.norm() / true_grad().norm()) < 1.3  # scale="dim": unbiased length
    estimate_grad_rge(f, [x], q=2000, mu=1e-5, seed=1, scale="none")
    assert 0.8 / d < float(x.grad.norm() / true_grad().norm()) < 1.3 / d


def test_rge_central_difference_is_exact_on_a_quadratic():
    d, q, mu = 8, 5, 1e-2
    x, f, true_grad = quadratic(d, 3)
    x0 = x.detach().clone()
    loss = estimate_grad_rge(f, [x], q=q, mu=mu, seed=2, step=3, difference="central")
    u = directions(d, (2, 3), 0, q)
    ref = (d / q) * u.T @ (u @ true_grad())
    assert torch.allclose(x.grad, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(x.detach(), x0) and loss == pytest.approx(float(f().detach()))


def test_each_step_draws_new_directions_named_by_seed_and_step():
    x, f, _ = quadratic(6, 8)
    estimate_grad_rge(f, [x], q=3, mu=1e-4, seed=1, step=0)
    g0 = x.grad.clone()
    estimate_grad_rge(f, [x], q=3, mu=1e-4, seed=1, step=1)
    assert not torch.allclose(g0, x.grad)
    estimate_grad_rge(f, [x], q=3, mu=1e-4, seed=1, step=0)
    assert torch.equal(g0, x.grad)
    est = RGE([x], q=3, mu=1e-4, seed=1)
    est.estimate(f)
    assert torch.equal(g0, x.grad) and est.state_dict()["steps"] == 1


def test_sign_sgd_moves_by_lr_times_sign_of_the_estimate():
    x, f, _ = quadratic(12, 4)
    x0 = x.detach().clone()
    opt = ZOSignSGD([x], lr=0.01, q=6, mu=1e-4, seed=9)
    opt.step(f)
    y, fy, _ = quadratic(12, 4)
    estimate_grad_rge(fy, [y], q=6, mu=1e-4, seed=9, step=0)
    assert torch.equal(x.detach() - x0, (x0 - 0.01 * torch.sign(y.grad)) - x0)
    assert torch.allclose((x.detach() - x0).abs(), torch.full_like(x0, 0.01), rtol=0, atol=1e-15)


def test_zosgd_step_is_sgd_on_the_estimate():
    x, f, _ = quadratic(10, 5)
    x0 = x.detach().clone()
    opt = ZOSGD([x], lr=0.05, q=4, mu=1e-4, seed=3)
    opt.step(f)
    y, fy, _ = quadratic(10, 5)
    estimate_grad_rge(fy, [y], q=4, mu=1e-4, seed=3, step=0)
    assert torch.allclose(x.detach(), x0 - 0.05 * y.grad, rtol=0, atol=1e-15)
    assert opt.num_queries == 5


@pytest.mark.parametrize("kind", ["sgd", "sign"])
def test_optimizers_decrease_the_loss(kind):
    x, f, _ = quadratic(10, 6)
    opt = ZOSGD([x], lr=0.02, q=10, momentum=0.5) if kind == "sgd" else ZOSignSGD([x], lr=0.01, q=10, momentum=0.9)
    first = float(f().detach())
    for _ in range(150):
        opt.step(f)
    assert float(f().detach()) < 0.5 * first


def test_rge_estimator_drives_a_torch_optimizer():
    x, f, _ = quadratic(10, 7)
    est = RGE([x], q=10, mu=1e-4, seed=1)
    opt = torch.optim.Adam([x], lr=0.05)
    first = float(f().detach())
    for _ in range(100):
        est.estimate(f)
        opt.step()
    assert float(f().detach()) < 0.5 * first and est.queries == 100 * 11
    saved = copy.deepcopy(est.state_dict())
    est.estimate(f)
    g1 = x.grad.clone()
    est.load_state_dict(saved)
    est.estimate(f)
    assert torch.equal(x.grad, g1)


@pytest.mark.parametrize("cls", [ZOSGD, ZOSignSGD])
def test_state_dict_round_trip_is_bit_identical(cls):
    torch.manual_seed(0)
    data, target = torch.randn(30, 5), torch.randint(0, 3, (30,))
    net = lambda: torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))  # noqa: E731
    model = net()
    loss_fn = torch.nn.CrossEntropyLoss()
    build = lambda m: cls([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.005}],  # noqa: E731
                          lr=0.01, q=4, momentum=0.9, weight_decay=1e-3, seed=2)
    closure = lambda m: (lambda: loss_fn(m(data), target))  # noqa: E731
    opt = build(model)
    for _ in range(5):
        opt.step(closure(model))
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for _ in range(5):
        opt.step(closure(model))
    model2 = net()
    model2.load_state_dict(saved_model)
    opt2 = build(model2)
    opt2.load_state_dict(saved_opt)
    for _ in range(5):
        opt2.step(closure(model2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.num_queries == opt2.num_queries == 50


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from zohpc.comm import world
    from zohpc.optim import ZOSGD


    def run(comm):
        x = torch.nn.Parameter(torch.linspace(-1, 1, 13, dtype=torch.float64))
        f = lambda: ((x - 0.3) ** 2).sum() + torch.sin(3 * x).sum()
        opt = ZOSGD([x], lr=0.01, q=7, momentum=0.5, seed=4, comm=comm)
        for _ in range(20):
            opt.step(f)
        return x.detach().clone()


    if __name__ == "__main__":
        torch.set_num_threads(1)
        comm = world()
        out = run(comm)
        if comm.rank == 0:
            torch.save(out, sys.argv[1])
    """
)


def test_two_ranks_follow_the_single_process_trajectory(tmp_path):
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec not found")
    script = tmp_path / "run_zosgd.py"
    script.write_text(SCRIPT)
    namespace = {"__name__": "zosgd_script"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    ref = namespace["run"](world())
    out = tmp_path / "k2.pt"
    subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(out)], check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert torch.equal(torch.load(out), ref)
