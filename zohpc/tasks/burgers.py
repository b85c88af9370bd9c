"""Solver in the loop (DeepZero after Um et al., NeurIPS 2020): a coarse numpy solver of 1-D
viscous Burgers whose trajectory is corrected by a small CNN, trained through the solver.

The physics. ``u_t + (u^2/2)_x = nu u_xx`` on the periodic interval [0, 2 pi). The solver is
one explicit finite-volume step: Rusanov (local Lax-Friedrichs) flux, central diffusion,
forward Euler. The *reference* runs that scheme on a grid ``fine_factor`` times finer with
stable sub-steps and is averaged back onto the coarse cells; the *coarse* solver takes one
step of ``dt`` on ``grid`` cells. Its numerical diffusion smears the steepening fronts, and
that error is what the correction has to learn.

The model and the unroll (why the model predicts a window). Um et al. call the corrector after
every solver step on the corrected state: ``u_{k+1} = S(u_k) + c(S(u_k))``, unrolled for n
steps in the loss. The task contract evaluates ONE forward of the model per minibatch and
hands its output to ``loss(outputs, targets)``; a loss cannot call the (perturbed) model again,
so the closed loop cannot live inside the objective. The closest faithful design: the
model sees the state at the start of a window of ``unroll`` steps and predicts the
corrections of all ``unroll`` steps at once, ``(c_1 .. c_n) = g(u_0)``; the objective runs the
black-box numpy solver with them, ``u_k = S(u_{k-1}) + c_k``, and compares every ``u_k`` with
the reference. The solver stays in the loop: ``c_1`` is judged by what the solver makes of it
n steps later. Rollouts of any length call the model at the start of every window, on its
own corrected state. ``unroll = 1`` is the per-step corrector of Um et al. (then the solver-
in-the-loop objective equals the supervised one, which is why the study uses n > 1).

Layout: states are ``(B, 1, 1, grid)`` "images" of height 1, so the corrector is made of
Conv2d layers with (1, k) kernels behind circular padding, the ops the query engine runs
incrementally. Targets are the reference windows ``(B, unroll + 1, grid)``, entry 0 being the
window's initial state (the solver starts from it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import derive_seed, generator
from .base import Task, task_options

DEFAULTS = {
    "grid": 32,  # coarse cells
    "fine_factor": 8,  # reference grid = grid * fine_factor cells
    "nu": 0.01,  # viscosity
    "dt": 0.05,  # coarse time step
    "modes": 3,  # initial state: sum of sin(k x + phase), k = 1..modes
    "amplitude": 1.0,  # amplitudes uniform in [-amplitude, amplitude]
    "unroll": 4,  # solver steps per window (corrections predicted per window)
    "train_trajectories": 48,
    "test_trajectories": 16,
    "steps": 40,  # coarse steps per trajectory
    "width": 8,  # channels of the corrector
    "kernel": 5,  # (1, kernel) convolutions
    "data_seed": 0,
}


# ---------------------------------------------------------------------------- the solver
def step_np(u: np.ndarray, dx: float, dt: float, nu: float) -> np.ndarray:
    """One explicit step (Rusanov flux, central diffusion) of periodic Burgers on the last axis."""
    up = np.concatenate((u[..., 1:], u[..., :1]), -1)  # u_{i+1}
    um = np.concatenate((u[..., -1:], u[..., :-1]), -1)  # u_{i-1}
    flux = 0.25 * (u * u + up * up) - 0.5 * np.maximum(np.abs(u), np.abs(up)) * (up - u)  # F_{i+1/2}
    flux_m = np.concatenate((flux[..., -1:], flux[..., :-1]), -1)  # F_{i-1/2}
    return u - (dt / dx) * (flux - flux_m) + (nu * dt / (dx * dx)) * (up - 2.0 * u + um)


def step_torch(u: torch.Tensor, dx: float, dt: float, nu: float) -> torch.Tensor:
    """:func:`step_np` in torch, operation for operation (differentiable: the white-box copy)."""
    up = torch.cat((u[..., 1:], u[..., :1]), -1)
    um = torch.cat((u[..., -1:], u[..., :-1]), -1)
    flux = 0.25 * (u * u + up * up) - 0.5 * torch.maximum(u.abs(), up.abs()) * (up - u)
    flux_m = torch.cat((flux[..., -1:], flux[..., :-1]), -1)
    return u - (dt / dx) * (flux - flux_m) + (nu * dt / (dx * dx)) * (up - 2.0 * u + um)


class Burgers:
    """The coarse and the reference solver of one option set (see DEFAULTS)."""

    def __init__(self, opts: dict):
        self.n = int(opts["grid"])
        self.factor = int(opts["fine_factor"])
        self.nu = float(opts["nu"])
        self.dt = float(opts["dt"])
        self.modes = int(opts["modes"])
        self.amplitude = float(opts["amplitude"])
        self.dx = 2 * math.pi / self.n
        self.dx_fine = self.dx / self.factor

    def coarse(self, u: np.ndarray) -> np.ndarray:
        return step_np(u, self.dx, self.dt, self.nu)

    def coarse_torch(self, u: torch.Tensor) -> torch.Tensor:
        return step_torch(u, self.dx, self.dt, self.nu)

    def downsample(self, u_fine: np.ndarray) -> np.ndarray:
        """Cell averages of the fine solution on the coarse cells."""
        return u_fine.reshape(*u_fine.shape[:-1], self.n, self.factor).mean(-1)

    def initial(self, count: int, seed: int) -> np.ndarray:
        """``count`` random smooth periodic states on the fine grid (float64)."""
        rng = np.random.default_rng(seed)
        x = (np.arange(self.n * self.factor) + 0.5) * self.dx_fine
        k = np.arange(1, self.modes + 1)[None, :, None]
        a = rng.uniform(-self.amplitude, self.amplitude, (count, self.modes, 1))
        phase = rng.uniform(0, 2 * math.pi, (count, self.modes, 1))
        return (a * np.sin(k * x[None, None, :] + phase)).sum(1)

    def reference(self, count: int, steps: int, seed: int) -> np.ndarray:
        """Fine-grid trajectories on the coarse cells: ``(count, steps + 1, grid)`` float64.

        Sub-steps keep the fine explicit scheme stable: ``dt_f (max|u| / dx_f + 2 nu / dx_f^2) <= 0.8``
        (max|u| never grows for Burgers, so the initial bound holds throughout).
        """
        u = self.initial(count, seed)
        umax = float(np.abs(u).max()) if u.size else 1.0
        rate = umax / self.dx_fine + 2 * self.nu / self.dx_fine ** 2
        sub = max(1, math.ceil(self.dt * rate / 0.8))
        out = [self.downsample(u)]
        for _ in range(steps):
            for _ in range(sub):
                u = step_np(u, self.dx_fine, self.dt / sub, self.nu)
            out.append(self.downsample(u))
        return np.stack(out, 1)


# ---------------------------------------------------------------------------- corrector
class Corrector(nn.Module):
    """A state ``(B, 1, 1, N)`` to the corrections of the next ``unroll`` steps ``(B, unroll, 1, N)``.

    Three (1, k) convolutions behind circular padding (the domain is periodic), tanh between.
    The last layer starts small, so an untrained corrector is close to the plain solver.
    """

    def __init__(self, unroll: int, width: int = 8, kernel: int = 5):
        super().__init__()
        self.pad = kernel // 2
        self.conv1 = nn.Conv2d(1, width, (1, kernel))
        self.conv2 = nn.Conv2d(width, width, (1, kernel))
        self.conv3 = nn.Conv2d(width, unroll, (1, kernel))

    def _p(self, x):
        return F.pad(x, (self.pad, self.pad, 0, 0), mode="circular")

    def forward(self, x):
        h = torch.tanh(self.conv1(self._p(x)))
        h = torch.tanh(self.conv2(self._p(h)))
        return self.conv3(self._p(h))


def make_model(opts: dict, seed: int) -> Corrector:
    """The corrector with weights drawn from the ``burgers-init`` stream of ``seed``."""
    model = Corrector(int(opts["unroll"]), int(opts["width"]), int(opts["kernel"]))
    gen = generator("burgers-init", seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            bound = 1.0 / math.sqrt(fan_in) if p.dim() > 1 else 0.0
            if name.startswith("conv3"):
                bound *= 0.1
            p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    return model


# ---------------------------------------------------------------------------- data
def windows(traj: np.ndarray, unroll: int) -> np.ndarray:
    """Every window of ``unroll + 1`` consecutive states: ``(trajectories * starts, unroll + 1, N)``."""
    T = traj.shape[1]
    starts = range(T - unroll)
    return np.concatenate([traj[:, t:t + unroll + 1] for t in starts], 0)


def as_inputs(states: np.ndarray) -> torch.Tensor:
    """States ``(B, N)`` as the corrector's input ``(B, 1, 1, N)`` float32."""
    return torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32)).reshape(states.shape[0], 1, 1, -1)


def solver_loss_fn(solver: Burgers):
    """The black-box objective of one copy: mean squared error of the corrected numpy rollout."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        ref = targets.detach().cpu().numpy().astype(np.float64)
        corr = outputs.detach().cpu().numpy().astype(np.float64).reshape(ref.shape[0], ref.shape[1] - 1, -1)
        u = ref[:, 0]
        total = 0.0
        for k in range(corr.shape[1]):
            u = solver.coarse(u) + corr[:, k]
            total += float(np.mean((u - ref[:, k + 1]) ** 2))
        return total / corr.shape[1]

    return loss


def solver_batched_loss_fn(solver: Burgers):
    """The same black box for Q stacked copies ``(Q, B, ...)`` at once: shape ``(Q,)``, entry q
    equal to the per-copy loss up to rounding (numpy over the copy axis too)."""

    def batched(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ref = targets.detach().cpu().numpy().astype(np.float64)
        Q, n = outputs.shape[0], ref.shape[1] - 1
        corr = outputs.detach().cpu().numpy().astype(np.float64).reshape(Q, ref.shape[0], n, -1)
        u = np.broadcast_to(ref[:, 0], (Q, *ref[:, 0].shape))
        total = np.zeros(Q)
        for k in range(n):
            u = solver.coarse(u) + corr[:, :, k]
            total += np.mean((u - ref[:, k + 1]) ** 2, axis=(1, 2))
        return torch.from_numpy(total / n)

    return batched


def unrolled_torch_loss(solver: Burgers, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same objective with the torch solver (differentiable; FO-SOL trains on it)."""
    ref = targets.to(torch.float64)
    corr = outputs.to(torch.float64).reshape(ref.shape[0], ref.shape[1] - 1, -1)
    u = ref[:, 0]
    total = ref.new_zeros(())
    for k in range(corr.shape[1]):
        u = solver.coarse_torch(u) + corr[:, k]
        total = total + ((u - ref[:, k + 1]) ** 2).mean()
    return total / corr.shape[1]


def supervised_targets(solver: Burgers, win: np.ndarray) -> np.ndarray:
    """NON's targets: the per-step corrections along the reference, ``r_k - S(r_{k-1})``."""
    return win[:, 1:] - solver.coarse(win[:, :-1])


@torch.no_grad()
def rollout(solver: Burgers, model: nn.Module | None, u0: np.ndarray, steps: int, unroll: int) -> np.ndarray:
    """Corrected coarse trajectories ``(B, steps + 1, N)`` from ``u0`` (model None: the solver alone).

    The model is called on the current (corrected) state at the start of every window of
    ``unroll`` steps, exactly as in training.
    """
    u = np.asarray(u0, dtype=np.float64)
    out = [u]
    corr = None
    for t in range(steps):
        k = t % unroll
        if model is not None and k == 0:
            corr = model(as_inputs(u)).double().numpy().reshape(u.shape[0], unroll, -1)
        u = solver.coarse(u)
        if model is not None:
            u = u + corr[:, k]
        out.append(u)
    return np.stack(out, 1)


def rollout_mae(solver: Burgers, model, ref: np.ndarray, unroll: int) -> float:
    """Mean absolute error of rollouts from ``ref[:, 0]`` against the reference, over all later steps."""
    traj = rollout(solver, model, ref[:, 0], ref.shape[1] - 1, unroll)
    return float(np.abs(traj[:, 1:] - ref[:, 1:]).mean())


# ---------------------------------------------------------------------------- the task
class BurgersData:
    """Reference trajectories and training windows of one option set (deterministic from data_seed)."""

    def __init__(self, opts: dict):
        self.opts = dict(opts)
        self.solver = Burgers(opts)
        seed = int(opts["data_seed"])
        steps = int(opts["steps"])
        self.unroll = int(opts["unroll"])
        self.train_traj = self.solver.reference(int(opts["train_trajectories"]), steps,
                                                derive_seed("burgers-data", seed, 0))
        self.test_traj = self.solver.reference(int(opts["test_trajectories"]), steps,
                                               derive_seed("burgers-data", seed, 1))
        self.train_windows = windows(self.train_traj, self.unroll)
        self.test_windows = windows(self.test_traj, self.unroll)

    def pairs(self, win: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return as_inputs(win[:, 0]), torch.from_numpy(np.ascontiguousarray(win, dtype=np.float32))


def make_task(opts: dict, seed: int = 0, data: BurgersData | None = None) -> Task:
    """The solver-in-the-loop task: the corrector trained through the black-box numpy solver."""
    data = data or BurgersData(opts)
    loss = solver_loss_fn(data.solver)

    def metrics(outputs, targets):
        return {"window_mse": loss(outputs, targets)}

    return Task(model=make_model(opts, seed), train=data.pairs(data.train_windows), loss=loss,
                batched_loss=solver_batched_loss_fn(data.solver), test=data.pairs(data.test_windows),
                metrics=metrics, name="burgers",
                info={"train_windows": int(data.train_windows.shape[0]), "grid": int(opts["grid"]),
                      "unroll": int(opts["unroll"])})


def check_options(opts: dict) -> None:
    from ..errors import ConfigError

    for key in ("grid", "fine_factor", "modes", "unroll", "train_trajectories", "test_trajectories",
                "width", "kernel"):
        if opts[key] < 1:
            raise ConfigError(f"config key 'task.{key}': must be >= 1, got {opts[key]}")
    for key in ("nu", "dt", "amplitude"):
        if not opts[key] > 0:
            raise ConfigError(f"config key 'task.{key}': must be > 0, got {opts[key]}")
    if opts["steps"] <= opts["unroll"]:
        raise ConfigError(f"config key 'task.steps': must exceed task.unroll ({opts['unroll']}), got {opts['steps']}")
    if opts["kernel"] % 2 == 0 or opts["kernel"] > opts["grid"]:
        raise ConfigError(f"config key 'task.kernel': must be odd and <= task.grid, got {opts['kernel']}")


def build(cfg) -> Task:
    """``task.name = "zohpc.tasks.burgers:build"``: options from the ``[task]`` table over DEFAULTS."""
    opts = task_options(cfg, DEFAULTS, "burgers")
    check_options(opts)
    return make_task(opts, int(cfg.train.seed))
