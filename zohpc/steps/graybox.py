"""Gray-box mode (``zo.boundary = "outputs"``): the model is white-box, only the objective
behind it is a black box. The queries perturb the model's *outputs*, not its parameters:
the objective's gradient at the outputs is estimated by finite differences, and one backward
pass through the model turns it into the parameter gradient the optimizer steps on. Queries
cost in proportion to the output interface, not to the parameter count (DeepZero's ZO-AE-DS
baseline is this with an autoencoder's latent code as the interface).

The estimator: CGE over each sample's output coordinates. The objective must be the mean
of per-sample losses, ``f(O) = (1/B) sum_b f(o_b)`` with ``f(o_b)`` the task's loss on the
minibatch of sample b alone (cross entropy, the solver's and the defense's losses are);
:meth:`GrayBoxStep.setup` checks that on the first minibatch. Then ``df/do_bj = (1/B)
(f(o_b + h e_j) - f(o_b)) / h`` is exact to finite-difference error, with no random directions
(RGE over the B*D output coordinates would need far more queries for that accuracy, and a
sample's own loss is all a coordinate of it moves). One query = one black-box call on one
sample's perturbed output; a step costs ``B (1 + D)`` queries (forward difference) or
``B (1 + 2D)`` (central), the ``1`` being each sample's unperturbed loss. ``h`` is the step
the output dtype actually took, ``(o + mu) - o`` (exact in float64).

Over MPI: the driver's forward (with its graph) gives the outputs, broadcast to every rank;
each sample's queries are cut into stacked passes of ``zo.query_batch`` copies, and the passes
are split contiguously over the ranks (a pass is the same on any rank count, so the result is
bit-identical for any number of ranks); the loss values are gathered (Gatherv) on the driver,
which backpropagates and steps the optimizer; :func:`finish` shares the parameters. Nothing is
kept between steps (checkpoints and resume are those of any driver-updates step).
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import UserError
from ..stop import no_check
from ..zo.batchnorm import batch_stats_only
from .protocol import Outcome, StepResult, attempt, finish, settle, share_batch
from ..sharding import contiguous_split


class NotDifferentiableError(UserError):
    """The model cannot carry an output gradient back to a trainable parameter."""


def check_differentiable(model: torch.nn.Module, x: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    """The per-sample output shape and the dtype of ``model`` on ``x``, after checking that gray-box mode can
    train it: trainable parameters, a floating-point output with the minibatch as its first
    dimension, and an autograd path from the output to at least one trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NotDifferentiableError("zo.boundary = \"outputs\": the model has no trainable parameters "
                                     "(every parameter has requires_grad=False)")
    with torch.enable_grad(), batch_stats_only(model):
        out = model(x)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        kind = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise NotDifferentiableError(f"zo.boundary = \"outputs\": the model returns {kind}, not a floating-point "
                                     "tensor (its outputs are what the queries perturb)")
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise NotDifferentiableError(f"zo.boundary = \"outputs\": the model's output {tuple(out.shape)} does not "
                                     f"have the minibatch ({x.shape[0]}) as its first dimension")
    if not out.requires_grad:
        raise NotDifferentiableError("zo.boundary = \"outputs\": the model's forward is not differentiable (its "
                                     "output carries no gradient: detached, numpy or no_grad inside); train it "
                                     "with zo.boundary = \"parameters\"")
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    if all(g is None for g in grads):
        raise NotDifferentiableError("zo.boundary = \"outputs\": no trainable parameter is on the autograd path "
                                     "to the model's output; train it with zo.boundary = \"parameters\"")
    return tuple(out.shape[1:]), out.dtype


class GrayBoxStep:
    """One gray-box step: per-sample CGE at the outputs, a backward pass, the optimizer's step."""

    name = "graybox"

    def __init__(self, comm, model, optimizer, objective, *, mu: float, difference: str = "forward",
                 query_batch: int = 32, stop=None):
        self.comm, self.model, self.optimizer, self.objective = comm, model, optimizer, objective
        self.mu, self.difference, self.query_batch, self.stop = float(mu), difference, int(query_batch), stop
        self.coords = None
        self.out_shape: tuple[int, ...] | None = None
        self.out_dtype = None
        self.batch = 0  # samples of the last minibatch (the query count depends on it)

    # ---- the contract -----------------------------------------------------------------
    def setup(self, coords, sample_batch) -> None:
        """Checks before any step, on every rank alike (exit 2 on all): the model is
        differentiable and the objective is the mean of per-sample losses."""
        self.coords = coords  # masks do not apply: the queries perturb outputs
        x, y = sample_batch
        self.out_shape, self.out_dtype = self.comm.agree(check_differentiable, self.model, x)
        self.batch = int(x.shape[0])
        self.comm.agree(self.check_per_sample, x, y)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing is kept between steps."""

    @property
    def dim(self) -> int:
        return math.prod(self.out_shape)

    @property
    def units(self) -> int:
        """Queries per sample: its unperturbed loss and one (forward) or two (central) per coordinate."""
        return 1 + self.dim * (2 if self.difference == "central" else 1)

    @property
    def queries_per_step(self) -> int:
        return self.batch * self.units

    @torch.no_grad()
    def check_per_sample(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The objective on the minibatch equals the mean of its per-sample values (to 1e-4, relative)."""
        with batch_stats_only(self.model):
            out = self.model(x)
        whole = float(self.objective(out, y, 1)[0])
        parts = [float(self.objective(out[b:b + 1], y[b:b + 1], 1)[0]) for b in range(out.shape[0])]
        mean = math.fsum(parts) / len(parts)
        if not abs(whole - mean) <= 1e-4 * max(abs(whole), abs(mean)) + 1e-300:
            raise UserError(f"zo.boundary = \"outputs\": task '{self.objective.name}': the loss of a minibatch "
                            f"({whole:.6g}) is not the mean of its samples' losses ({mean:.6g}); gray-box CGE "
                            "queries one sample at a time (use zo.boundary = \"parameters\")")

    # ---- the layout of the queries ----------------------------------------------------
    def passes(self, batch: int) -> list[tuple[int, int, int]]:
        """Every stacked pass ``(sample, first unit, end unit)``, sample-major."""
        out = []
        for b in range(batch):
            for s in range(0, self.units, self.query_batch):
                out.append((b, s, min(self.units, s + self.query_batch)))
        return out

    def perturbed(self, o: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Copies ``start..stop-1`` of one sample's flat output ``o`` (D,): unit 0 unperturbed,
        then ``+mu e_j`` (forward), or ``+mu e_j, -mu e_j`` in turn (central)."""
        n = stop - start
        copies = o.unsqueeze(0).repeat(n, 1)
        units = torch.arange(start, stop)
        rows = torch.nonzero(units > 0).flatten()
        k = units[rows] - 1
        if self.difference == "central":
            j, sign = k // 2, 1.0 - 2.0 * (k % 2).to(o.dtype)
        else:
            j, sign = k, torch.ones(len(k), dtype=o.dtype)
        copies[rows, j] = o[j] + sign * self.mu
        return copies

    def values(self, outputs: torch.Tensor, y: torch.Tensor, passes, check) -> torch.Tensor:
        """The black box's loss of every unit of ``passes`` (float64, in order)."""
        flat = outputs.reshape(outputs.shape[0], -1)
        out = []
        for b, s, e in passes:
            check()
            copies = self.perturbed(flat[b], s, e).reshape(e - s, *self.out_shape)
            out.append(self.objective(copies, y[b:b + 1], e - s, check=check).to(torch.float64))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def output_gradient(self, outputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``df/dO`` of the minibatch mean from every unit's value (B, units), in float64."""
        o = outputs.reshape(outputs.shape[0], -1)
        v = values.view(o.shape[0], self.units)
        up = (o + self.mu).to(torch.float64) - o.to(torch.float64)  # the steps the dtype took
        if self.difference == "central":
            down = o.to(torch.float64) - (o - self.mu).to(torch.float64)
            g = (v[:, 1::2] - v[:, 2::2]) / (up + down)
        else:
            g = (v[:, 1:] - v[:, :1]) / up
        return g / o.shape[0]

    # ---- one step ---------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        comm, model = self.comm, self.model
        times = {}
        t0 = time.perf_counter()
        share_batch(comm, x, y)
        self.batch = int(x.shape[0])

        # the driver's forward, its graph kept for the backward; the outputs on every rank
        graph, error = None, None
        outputs = torch.empty((self.batch, *self.out_shape), dtype=self.out_dtype, device=x.device)
        if comm.is_driver:
            try:
                with torch.enable_grad(), batch_stats_only(model):
                    graph = model(x)
                outputs.copy_(graph.detach())
            except UserError as exc:
                error = str(exc)
                outputs.fill_(math.nan)
        comm.bcast_(outputs)
        t1 = time.perf_counter()
        times["forward"] = t1 - t0

        # this rank's passes: whole passes, contiguous, the same cut for a given rank count
        passes = self.passes(self.batch)
        bounds = contiguous_split(len(passes), comm.size)
        mine = passes[bounds[comm.rank]:bounds[comm.rank + 1]]
        count = sum(e - s for _, s, e in mine)
        check = self.stop.check if self.stop is not None else no_check
        outcome = Outcome(error=error)
        if error is None:
            outcome = attempt(lambda: self.values(outputs, y, mine, check))
        local = outcome.value if outcome.value is not None else torch.full((count,), math.nan, dtype=torch.float64)
        t2 = time.perf_counter()
        times["compute"] = outcome.seconds = t2 - t1

        counts = [sum(e - s for _, s, e in passes[bounds[r]:bounds[r + 1]]) for r in range(comm.size)]
        values = comm.gatherv(local.contiguous(), counts)
        times["gather"] = time.perf_counter() - t2
        compute = settle(comm, self.stop, outcome, f"step {step + 1}")

        loss = math.nan
        if comm.is_driver:
            base = values.view(self.batch, self.units)[:, 0]
            loss = math.fsum(base.tolist()) / self.batch

        def update():
            grad = self.output_gradient(outputs, values).view_as(graph).to(graph.dtype)
            self.optimizer.zero_grad(set_to_none=False)
            graph.backward(grad)
            self.optimizer.step()

        t3 = time.perf_counter()
        finish(comm, model, x, update)
        times["update"] = time.perf_counter() - t3
        shared = torch.tensor([loss], dtype=torch.float64)
        comm.bcast_(shared)
        return StepResult(loss=float(shared[0]), queries=self.queries_per_step, compute=compute, times=times)
