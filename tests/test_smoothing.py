"""Randomized smoothing certification against cases known independently of the code under test."""

import math

import numpy as np
import pytest
import torch

from mpi_util import run_ranks
from zohpc.seeding import generator
from zohpc.smoothing import (ABSTAIN, certified_accuracy, certify, certify_set, clopper_pearson_lower,
                             max_radius, norm_ppf)


def binom_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term in log space (no scipy)."""
    if p <= 0:
        return 0.0 if k > 0 else 1.0
    if p >= 1:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(k, n + 1)]
    top = max(terms)
    return math.exp(top) * math.fsum(math.exp(t - top) for t in terms)


def cp_lower_reference(k: int, n: int, alpha: float) -> float:
    """The p with P(X >= k; n, p) = alpha, by bisection (the tail grows with p)."""
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binom_upper_tail(k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (7, 10, 0.05), (50, 100, 0.001), (95, 100, 0.001),
                                       (990, 1000, 0.001), (9990, 10000, 0.001), (3, 40, 0.2)])
def test_clopper_pearson_matches_binomial_tail_inversion(k, n, alpha):
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(cp_lower_reference(k, n, alpha), rel=1e-7, abs=1e-10)


def test_clopper_pearson_closed_forms():
    for n in (1, 10, 1000, 10000):
        for alpha in (0.001, 0.05):
            # all successes: p^n = alpha; one success: 1 - (1 - p)^n = alpha; none: 0
            assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)
            assert clopper_pearson_lower(1, n, alpha) == pytest.approx(1 - (1 - alpha) ** (1 / n), rel=1e-8)
            assert clopper_pearson_lower(0, n, alpha) == 0.0
    with pytest.raises(ValueError):
        clopper_pearson_lower(5, 4, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson_lower(1, 4, 0.0)


def test_norm_ppf_known_values():
    assert norm_ppf(0.5) == pytest.approx(0.0, abs=1e-15)
    assert norm_ppf(0.975) == pytest.approx(1.959963984540054, rel=1e-12)
    assert norm_ppf(0.99865) == pytest.approx(3.0, abs=1e-3)  # Phi(3) = 0.998650...
    assert norm_ppf(0.1) == pytest.approx(-1.2815515655446004, rel=1e-12)


def test_constant_classifier_certifies_the_largest_radius():
    x = torch.zeros(1, 4, 4)
    pred, radius = certify(lambda z: np.full(z.shape[0], 3), x, 0.25, 10, 1000, 0.001, 10)
    assert pred == 3
    assert radius == pytest.approx(0.25 * norm_ppf(0.001 ** (1 / 1000)), rel=1e-9)
    assert radius == pytest.approx(max_radius(0.25, 1000, 0.001), rel=1e-12)


def quantile_classifier(sigma, probs):
    """At x = 0, class c when the first noisy pixel falls in the c-th quantile band: P(c) = probs[c]."""
    cuts = torch.tensor([sigma * norm_ppf(float(c)) for c in np.cumsum(probs)[:-1]], dtype=torch.float64)

    def classify(z):
        return torch.bucketize(z[:, 0, 0, 0].double().contiguous(), cuts).numpy()

    return classify


def test_abstains_when_the_lower_bound_is_below_one_half():
    x = torch.zeros(1, 2, 2, dtype=torch.float64)
    # top class 0 with probability 0.45: abstain (a threshold below 0.45 would certify it)
    pred, radius = certify(quantile_classifier(0.5, [0.45, 0.3, 0.25]), x, 0.5, 1000, 2000, 0.001, 3)
    assert (pred, radius) == (ABSTAIN, 0.0)
    # top class with probability 0.52: the estimate is above 1/2, its lower bound is not
    pred, radius = certify(quantile_classifier(0.5, [0.52, 0.48]), x, 0.5, 1000, 2000, 0.001, 2)
    assert (pred, radius) == (ABSTAIN, 0.0)
    # probability 0.7: certified, class 0, a small positive radius
    pred, radius = certify(quantile_classifier(0.5, [0.7, 0.3]), x, 0.5, 1000, 2000, 0.001, 2)
    assert pred == 0 and 0 < radius < 0.5 * norm_ppf(0.7)


def test_linear_classifier_radius_is_its_distance_to_the_boundary():
    """f(z) = [z_0 > 0]: at x with x_0 = t > 0 the smoothed classifier is 1 with probability
    Phi(t / sigma), so the exact certified radius is t; the bound is a little below it."""
    t, sigma = 0.3, 0.25
    x = torch.zeros(1, 3, 3, dtype=torch.float64)
    x[0, 0, 0] = t
    pred, radius = certify(lambda z: (z[:, 0, 0, 0] > 0).long().numpy(), x, sigma, 100, 20000, 0.001, 2,
                           gen=torch.Generator().manual_seed(1))
    assert pred == 1
    assert t - 0.05 < radius < t


def test_certify_set_uses_one_generator_per_point():
    xs = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))

    def classify(z):
        return (z.flatten(1).sum(1) > 0).long().numpy()

    preds, radii = certify_set(classify, xs, 0.5, 20, 200, 0.01, 2, batch=64, seed=7)
    for i in range(5):
        assert (preds[i], radii[i]) == certify(classify, xs[i], 0.5, 20, 200, 0.01, 2, 64, generator("certify", 7, i))


def test_certified_accuracy_counts_correct_certified_points_within_radius():
    preds = [1, 2, ABSTAIN, 0, 1]
    radii = [0.5, 0.1, 0.0, 0.0, 0.3]
    labels = [1, 2, 3, 1, 1]
    assert certified_accuracy(preds, radii, labels, [0.0, 0.1, 0.3, 0.5, 0.6]) == [0.6, 0.6, 0.4, 0.2, 0.0]


CERTIFY_SCRIPT = """
import sys, json, torch
from zohpc.comm import world
from zohpc.smoothing import certify_set
comm = world()
xs = torch.randn(7, 1, 3, 3, generator=torch.Generator().manual_seed(0))
cls = lambda z: (z.flatten(1).sum(1) > 0).long().numpy()
p, r = certify_set(cls, xs, 0.5, 20, 300, 0.01, 2, batch=64, seed=3, comm=comm if comm.size > 1 else None)
print(json.dumps({"rank": comm.rank, "p": p.tolist(), "r": r.tolist()}))
"""


def test_certify_set_over_two_ranks_equals_one_rank():
    one = run_ranks(1, ["-c", CERTIFY_SCRIPT], timeout=120)
    two = run_ranks(2, ["-c", CERTIFY_SCRIPT], timeout=120)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    import json

    ref = json.loads(one.stdout.strip())
    outs, text, dec = [], two.stdout, json.JSONDecoder()
    while "{" in text:  # the two ranks' lines reach the pipe in any order, newlines included
        obj, end = dec.raw_decode(text, text.index("{"))
        outs.append(obj)
        text = text[end:]
    assert sorted(o["rank"] for o in outs) == [0, 1]
    for o in outs:  # every rank holds every point's result
        assert o["p"] == ref["p"] and o["r"] == ref["r"]
