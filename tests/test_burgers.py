"""The solver-in-the-loop task: the numpy solver, its torch copy, the black-box objective."""

import numpy as np
import pytest
import torch

from zohpc.errors import ConfigError
from zohpc.tasks import burgers as B

SMALL = {**B.DEFAULTS, "train_trajectories": 4, "test_trajectories": 3, "steps": 10, "unroll": 3}


@pytest.fixture(scope="module")
def data():
    return B.BurgersData(SMALL)


def test_torch_solver_equals_numpy_solver(data):
    u = data.train_traj[:, 3]
    for _ in range(5):
        want = data.solver.coarse(u)
        got = data.solver.coarse_torch(torch.from_numpy(u)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
        u = want
    # float32 in: same within float32 rounding
    u32 = torch.from_numpy(data.train_traj[:, 3]).float()
    np.testing.assert_allclose(data.solver.coarse_torch(u32).double().numpy(),
                               data.solver.coarse(data.train_traj[:, 3]), atol=1e-5)


def test_solver_conserves_mass_and_reference_is_smooth_start(data):
    u = data.train_traj[:, 0]
    v = data.solver.coarse(u)
    np.testing.assert_allclose(v.sum(-1), u.sum(-1), atol=1e-12)  # flux form, periodic
    sums = data.train_traj.sum(-1)
    np.testing.assert_allclose(sums, np.broadcast_to(sums[:, :1], sums.shape), atol=1e-10)
    # the initial state is a sum of sines: zero mean, bounded by modes * amplitude
    assert np.abs(u.mean(-1)).max() < 1e-12
    assert np.abs(u).max() <= SMALL["modes"] * SMALL["amplitude"]


def test_reference_differs_from_coarse_solver(data):
    src = B.rollout(data.solver, None, data.test_traj[:, 0], data.test_traj.shape[1] - 1, data.unroll)
    err = np.abs(src[:, 1:] - data.test_traj[:, 1:]).mean()
    assert err > 1e-3  # there is something to correct
    assert err < 0.5 * np.abs(data.test_traj).mean()  # but the coarse solver is not garbage


def test_black_box_loss_equals_torch_loss(data):
    model = B.make_model(SMALL, 0)
    x, y = data.pairs(data.train_windows[:7])
    out = model(x)
    task = B.make_task(SMALL, 0, data)
    a = task.loss(out, y)
    b = float(B.unrolled_torch_loss(data.solver, out, y).detach())
    assert isinstance(a, float)
    assert a == pytest.approx(b, rel=1e-12)
    assert a > 0


def test_exact_corrections_give_zero_loss_and_zero_give_src(data):
    win = data.train_windows[:9]
    corr = B.supervised_targets(data.solver, win)  # r_k - S(r_{k-1})
    loss = B.solver_loss_fn(data.solver)
    y = torch.from_numpy(win)
    assert loss(torch.from_numpy(corr), y) == pytest.approx(0.0, abs=1e-25)
    zero = loss(torch.zeros(win.shape[0], data.unroll, 1, SMALL["grid"], dtype=torch.float64), y)
    u, want = win[:, 0], 0.0
    for k in range(data.unroll):
        u = data.solver.coarse(u)
        want += np.mean((u - win[:, k + 1]) ** 2)
    assert zero == pytest.approx(want / data.unroll, rel=1e-12)


def test_rollout_calls_the_model_once_per_window(data):
    class Count(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.full((x.shape[0], data.unroll, 1, x.shape[-1]), 0.01)

    m = Count()
    traj = B.rollout(data.solver, m, data.test_traj[:, 0], 7, data.unroll)
    assert m.calls == 3  # windows start at steps 0, 3, 6
    u = data.test_traj[:, 0]
    for _ in range(7):
        u = data.solver.coarse(u) + 0.01
    np.testing.assert_allclose(traj[:, -1], u, atol=1e-6)


def test_model_shapes_windows_and_determinism(data):
    model = B.make_model(SMALL, 0)
    x, y = data.pairs(data.train_windows)
    assert x.shape == (len(data.train_windows), 1, 1, SMALL["grid"])
    assert y.shape == (len(data.train_windows), SMALL["unroll"] + 1, SMALL["grid"])
    assert len(data.train_windows) == SMALL["train_trajectories"] * (SMALL["steps"] + 1 - SMALL["unroll"])
    assert model(x).shape == (x.shape[0], SMALL["unroll"], 1, SMALL["grid"])
    same = B.make_model(SMALL, 0)
    for p, q in zip(model.parameters(), same.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(model.conv1.weight, B.make_model(SMALL, 1).conv1.weight)
    # periodic: shifting the input shifts the output
    shifted = model(torch.roll(x[:2], 5, -1))
    torch.testing.assert_close(shifted, torch.roll(model(x[:2]), 5, -1), atol=1e-6, rtol=1e-5)


def test_build_reads_task_options():
    class Cfg:
        class task:
            options = {"grid": 16, "steps": 6, "unroll": 2, "train_trajectories": 2, "test_trajectories": 1}

        class train:
            seed = 3

    task = B.build(Cfg)
    assert task.train[0].shape == (2 * 5, 1, 1, 16)
    assert task.info["grid"] == 16
    Cfg.task.options = {"gird": 16}
    with pytest.raises(ConfigError, match="task.gird"):
        B.build(Cfg)
    Cfg.task.options = {"steps": 2, "unroll": 4}
    with pytest.raises(ConfigError, match="task.steps"):
        B.build(Cfg)
