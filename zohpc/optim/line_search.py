"""LIZO's backtracking Armijo line search, its trials split over the ranks.

Whether to search at all and which trial of a chunk passes are the driver's decisions
(broadcast by :meth:`QueryRunner.agree`), so every rank runs the same number of chunks.
"""

from __future__ import annotations

import math

import torch

from ._queries import QueryRunner


def armijo_search(runner: QueryRunner, closure, params, x, x64, f0: float, grad_tot, direction, wd_vec, stats: dict,
                  taus: list, accept):
    """Backtracking Armijo on ``F = f + wd/2 |x|^2`` along ``-direction``; returns the accepted point or ``x``.

    Trials ``x - tau * direction`` for ``tau`` in ``taus``, ``runner.ranks`` at a time;
    ``accept(F(trial), F(x), tau, slope)`` judges one trial. Adds the trials to
    ``stats["line_search_queries"]`` and the accepted ``tau`` to ``stats["line_search_accepted"]``.
    """
    slope = float(torch.dot(grad_tot, direction))
    (search,) = runner.agree([slope > 0 and math.isfinite(slope)])
    if not search:
        return x
    penalty = (lambda z: 0.5 * float(torch.dot(wd_vec, z * z))) if bool((wd_vec > 0).any()) else (lambda z: 0.0)
    big_f0 = f0 + penalty(x64)
    chunk = runner.ranks
    for first in range(0, len(taus), chunk):
        batch = taus[first:first + chunk]
        trials = torch.stack([(x64 - tau * direction).to(x.dtype) for tau in batch])
        vals = runner.evaluate(closure, params, x, trials)
        stats["line_search_queries"] += vals.numel()
        passed = -1
        for i, (tau, trial, val) in enumerate(zip(batch, trials, vals.tolist())):
            if accept(val + penalty(trial.double()), big_f0, tau, slope):
                passed = i
                break
        (passed,) = runner.agree([passed])
        if passed >= 0:
            stats["line_search_accepted"] = batch[int(passed)]
            return trials[int(passed)]
    return x
