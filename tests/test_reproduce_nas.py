"""The cell search space (:mod:`zohpc.tasks.cell_search`) and the ``nas`` study."""

import json

import pytest
import torch
from torch import nn

from mpi_util import run_ranks
from zohpc.tasks.cell_search import (EDGES, NODES, OPS, AvgPool3, DiscreteNet, MaxPool3, SearchNet, edge_list,
                                     genotype, genotype_names, mix)


def reference_cell(net: SearchNet, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The search network written out edge by edge: node j = sum over i < j of
    sum_k softmax(alpha[edge(i, j)])_k op_k(node i)."""
    weights = torch.softmax(alpha.double(), dim=1)
    nodes = [net.stem(x).double()]
    for j in range(1, NODES + 1):
        total = torch.zeros_like(nodes[0])
        for e, (src, dst) in enumerate(edge_list()):
            if dst == j:
                for k in range(len(OPS)):
                    total = total + weights[e, k] * net.edges[e][k](nodes[src].float()).double()
        nodes.append(total)
    out = torch.cat(nodes[1:], dim=1).mean(dim=(2, 3))
    return out @ net.head.weight.double().T + net.head.bias.double()


def test_pools_match_torch():
    x = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(MaxPool3()(x), nn.MaxPool2d(3, 1, 1)(x))
    torch.testing.assert_close(AvgPool3()(x), nn.AvgPool2d(3, 1, 1, count_include_pad=False)(x))


def test_edges_cover_every_earlier_node():
    assert len(edge_list()) == EDGES == 6
    assert edge_list() == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


def test_mixed_op_is_the_softmax_weighted_sum():
    torch.manual_seed(0)
    net = SearchNet(4)
    x = torch.randn(7, 1, 8, 8)
    alpha = torch.randn(EDGES, len(OPS))
    with torch.no_grad():
        torch.testing.assert_close(net(x, alpha=alpha).double(), reference_cell(net, x, alpha), rtol=1e-4, atol=1e-5)
    w = torch.tensor([0.25, 0.75])
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(mix(w, [a, b]), 0.25 * a + 0.75 * b)


def test_one_hot_alpha_is_the_genotype_on_shared_weights():
    torch.manual_seed(1)
    net = SearchNet(4)
    x = torch.randn(5, 1, 8, 8)
    geno = [4, 0, 3, 5, 1, 2]
    alpha = torch.full((EDGES, len(OPS)), -60.0)
    alpha[torch.arange(EDGES), torch.tensor(geno)] = 60.0
    with torch.no_grad():
        torch.testing.assert_close(net(x, alpha=alpha), net(x, genotype=geno), rtol=1e-5, atol=1e-5)


def test_genotype_is_the_argmax_per_edge():
    alpha = torch.zeros(EDGES, len(OPS))
    want = [5, 0, 2, 3, 1, 4]
    for e, k in enumerate(want):
        alpha[e, k] = 1.0 + e
    assert genotype(alpha) == want
    assert genotype(torch.zeros(EDGES, len(OPS))) == [0] * EDGES  # ties: the first op
    assert genotype_names(want)[0] == f"0->1:{OPS[5]}"


def test_discrete_net_holds_only_the_chosen_ops():
    conv_only = DiscreteNet([4] * EDGES, channels=4)
    no_params = DiscreteNet([0, 1, 2, 0, 1, 2], channels=4)  # skip and pools
    convs = sum(isinstance(m, nn.Conv2d) for m in conv_only.modules())
    assert convs == 1 + EDGES and sum(isinstance(m, nn.Conv2d) for m in no_params.modules()) == 1
    assert conv_only(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError):
        DiscreteNet([len(OPS)] * EDGES)


TINY = dict(seeds=1, val_size=40, channels=2, steps=6, arch_interval=3, budget=40, retrain_channels=2,
            retrain_epochs=1)


@pytest.fixture(scope="module")
def data():
    from zohpc.reproduce.nas import load_data

    return load_data(TINY["val_size"])


@pytest.mark.parametrize("method", ["lizo", "lizo_no_reuse", "zo_sgd", "random", "darts"])
def test_query_count_is_the_budget(data, method):
    from zohpc.reproduce.nas import COMMON, search

    r = search(method, data, TINY, dict(COMMON), seed=0)
    n = COMMON["samples"]
    if method == "random":
        assert r["queries"] == TINY["budget"]  # one validation query per sampled architecture
    elif method == "darts":
        assert r["queries"] == r["arch_steps"] == TINY["steps"]
    else:  # at most the budget, and less than one step short of it
        assert TINY["budget"] - (n + 1) < r["queries"] <= TINY["budget"]
    if method == "lizo_no_reuse":
        assert r["reuse_rate"] == 0 and r["queries"] == r["arch_steps"] * (n + 1)
    assert len(r["genotype"]) == EDGES


def test_reuse_buys_architecture_steps(data):
    from zohpc.reproduce.nas import COMMON, search

    steps = {m: search(m, data, TINY, dict(COMMON), seed=0)["arch_steps"] for m in ("lizo", "lizo_no_reuse")}
    assert steps["lizo"] > steps["lizo_no_reuse"]


def test_every_method_is_charged_its_genotypes_retrain(monkeypatch):
    """Methods that find the same genotype share one retrain, and each one's cpu_seconds counts it."""
    import time

    from zohpc.reproduce import nas

    calls = []

    def fake_search(method, data, s, cfg, seed, trace=False):
        return {"genotype": [0] * EDGES, "queries": 1, "arch_steps": 1, "curve": []}

    def fake_retrain(geno, data, s, cfg, seed):
        calls.append(geno)
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:  # CPU work, as a real retrain
            pass
        return 0.5

    monkeypatch.setattr(nas, "search", fake_search)
    monkeypatch.setattr(nas, "retrain", fake_retrain)
    rows, _ = nas.run_seed(0, None, TINY, dict(nas.COMMON), trace=False)
    assert len(calls) == 1 and set(rows) == set(nas.METHODS)
    for r in rows.values():
        assert r["accuracy"] == 0.5 and r["cpu_seconds"] - r["search_cpu_seconds"] >= 0.05


def test_budget_is_spread_over_the_phases():
    from zohpc.reproduce.nas import Budget

    b = Budget(100, 10, 4)
    assert [k for k in range(10) if b.phase_start(k)] == [0, 4, 8]
    assert [b.allowance(k) for k in (0, 4, 8)] == [40, 80, 100]


def test_study_quick_more_ranks_than_seeds(tmp_path):
    """Three ranks for the two quick seeds: one rank idles, rank 0 still reports seed 0's curves."""
    proc = run_ranks(3, ["-m", "zohpc.reproduce", "nas", "--quick", "--json", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["methods"]) == {"lizo", "lizo_no_reuse", "zo_sgd", "random", "darts"}
    budget = result["budget"]
    for m, r in result["methods"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["genotype"]) == EDGES
        assert len(r["per_seed"]) == len(result["seeds"]) == 2  # gathered on rank 0
        if m != "darts":
            assert budget - result["samples_per_step"] - 1 < r["queries"] <= budget
    assert result["methods"]["random"]["queries"] == budget
    assert isinstance(result["goal"]["met"], bool)
    assert set(result["curves_seed0"]) >= {"lizo", "zo_sgd"} and all(result["curves_seed0"].values())
    for name in ("nas.json", "nas.txt", "nas.png"):
        assert (tmp_path / name).stat().st_size > 0
