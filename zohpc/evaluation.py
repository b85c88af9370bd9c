"""Evaluation of a model on its task's test split, the batches split over the ranks.

Apart from the Trainer because it needs none of a run's state: the model, the task, the
objective and the communicator. The result is the same for any rank count up to float64
summation order (each rank sums its contiguous block of batches; one allreduce).
"""

from __future__ import annotations

import math

import torch

from .errors import PLUGIN_FAILURES, UserError, describe
from .inputs import model_input
from .sharding import contiguous_split
from .steps import attempt, settle


@torch.no_grad()
def evaluate(comm, task, model, objective, batch_size: int, *, stop=None, label=(0, 0)) -> tuple[float, dict] | None:
    """(test loss, {metric: value}) over ``task.test``, or None without a test split.

    ``stop``: a stop request checked between batches (a stop raises on every rank through
    ``settle``); ``label``: (epoch, step), naming the evaluation in stop hooks and messages."""
    if task.test is None:
        return None
    epoch, step = label
    (tx, ty) = task.test
    nb = -(-tx.shape[0] // batch_size)
    bounds = contiguous_split(nb, comm.size)
    rows = []
    first = next(model.parameters())

    def work():
        model.eval()
        try:
            for b in range(bounds[comm.rank], bounds[comm.rank + 1]):
                if stop is not None:
                    stop.check()
                x = model_input(tx[b * batch_size:(b + 1) * batch_size], first)
                y = ty[b * batch_size:(b + 1) * batch_size].to(first.device)
                out = model(x)
                loss = float(objective(out, y, 1)[0])
                rows.append((x.shape[0], loss, task_metrics(task, out, y)))
        finally:
            model.train()

    if stop is not None:
        stop.sub = f"eval{epoch}"
    try:
        settle(comm, stop, attempt(work), f"evaluation at step {step}")
    finally:
        if stop is not None:
            stop.sub = ""
    last = comm.size - 1  # the split puts larger blocks last: the last rank always has a batch
    keys = comm.bcast_strings(sorted(rows[0][2]) if comm.rank == last else None, root=last)
    sums = torch.zeros(2 + len(keys), dtype=torch.float64)
    for n, loss, metrics in rows:
        sums[0] += n
        sums[1] += n * loss
        for i, k in enumerate(keys):
            sums[2 + i] += n * float(metrics.get(k, math.nan))
    comm.allreduce_sum_(sums)
    return float(sums[1] / sums[0]), {k: float(sums[2 + i] / sums[0]) for i, k in enumerate(keys)}


def task_metrics(task, out, y) -> dict:
    """The task's own metrics of one batch as floats; a plug-in's failure is one line."""
    if task.metrics is None:
        return {}
    try:
        values = task.metrics(out, y)
        return {str(k): float(v) for k, v in dict(values).items()}
    except PLUGIN_FAILURES as exc:  # noqa: BLE001 - a plug-in's failure is reported as the task's
        raise UserError(f"task '{task.name}': metrics failed ({describe(exc)})") from None
