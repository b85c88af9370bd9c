"""Randomized smoothing certification (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, is
certified at ``x`` by Monte Carlo, as in the paper's CERTIFY:

1. selection: ``n0`` noisy samples; the most frequent class is the guess ``cA``;
2. estimation: ``n`` fresh samples; ``nA`` of them are ``cA``;
3. ``pA`` = the one-sided ``(1 - alpha)`` Clopper-Pearson lower bound of ``nA / n``;
4. ``pA < 1/2``: abstain; else ``g`` is ``cA`` within the L2 radius ``sigma * Phi^-1(pA)``
   (wrong with probability at most ``alpha``).

Certified accuracy at radius ``r`` is the fraction of test points that are certified,
correct, and have radius ``>= r``. Noise for test point ``i`` comes from its own
generator ``(seed, i)``, so the result does not depend on how points are split over ranks.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from .seeding import generator

ABSTAIN = -1


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` lower confidence bound of a binomial proportion ``k / n``.

    The ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 when ``k = 0``).
    """
    if not (0 <= k <= n and n >= 1):
        raise ValueError(f"clopper_pearson_lower: need 0 <= k <= n, n >= 1; got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"clopper_pearson_lower: alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    from scipy.stats import beta  # scikit-learn (the digits data) brings scipy

    return float(beta.ppf(alpha, k, n - k + 1))


def norm_ppf(p: float) -> float:
    """``Phi^-1(p)``, the standard normal quantile."""
    return NormalDist().inv_cdf(p)


def sample_counts(classify, x: torch.Tensor, sigma: float, num: int, num_classes: int, batch: int,
                  gen: torch.Generator) -> np.ndarray:
    """Class counts of ``classify`` (images -> labels) on ``num`` samples ``x + N(0, sigma^2)``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    left = num
    while left > 0:
        b = min(batch, left)
        noisy = x[None] + sigma * torch.randn((b, *x.shape), generator=gen, dtype=x.dtype)
        labels = np.asarray(classify(noisy), dtype=np.int64).reshape(-1)
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
        left -= b
    return counts


def certify(classify, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
            batch: int = 1000, gen: torch.Generator | None = None) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: ``(class, L2 radius)``, or ``(ABSTAIN, 0.0)``."""
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    c_a = int(np.argmax(sample_counts(classify, x, sigma, n0, num_classes, batch, gen)))
    n_a = int(sample_counts(classify, x, sigma, n, num_classes, batch, gen)[c_a])
    p_a = clopper_pearson_lower(n_a, n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, sigma * norm_ppf(p_a)


def certify_set(classify, xs: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
                batch: int = 1000, seed: int = 0, comm=None) -> tuple[np.ndarray, np.ndarray]:
    """Certify every row of ``xs``; ``(predictions, radii)`` on every rank of ``comm``.

    Points are split over the ranks in contiguous blocks; the values are all-gathered.
    """
    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    m = xs.shape[0]
    counts = [m // size + (1 if r < m % size else 0) for r in range(size)]
    start = sum(counts[:rank])
    local = torch.empty(2 * counts[rank], dtype=torch.float64)
    for j in range(counts[rank]):
        i = start + j
        pred, radius = certify(classify, xs[i], sigma, n0, n, alpha, num_classes, batch,
                               generator("certify", seed, i))
        local[2 * j], local[2 * j + 1] = pred, radius
    both = comm.allgatherv(local, [2 * c for c in counts]) if size > 1 else local
    both = both.view(m, 2).numpy()
    return both[:, 0].astype(np.int64), both[:, 1].copy()


def certified_accuracy(predictions, radii, labels, at) -> list[float]:
    """Fraction of points certified, correct and with radius ``>= r``, for each ``r`` in ``at``."""
    predictions, radii, labels = np.asarray(predictions), np.asarray(radii), np.asarray(labels)
    ok = (predictions == labels) & (predictions != ABSTAIN)
    return [float(np.mean(ok & (radii >= r - 1e-12))) if len(labels) else 0.0 for r in at]


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` samples can certify (every sample agrees): ``sigma Phi^-1(alpha^(1/n))``."""
    return sigma * norm_ppf(math.exp(math.log(alpha) / n))
