"""Pruning at initialization: exact sparsity, GraSP sign, ZO vs autograd, ranks, CLI errors."""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from zohpc.config import DataConfig, PruneConfig
from zohpc.data import load_data
from zohpc.masks import maskable_names, read_mask_file
from zohpc.models import build_model
from zohpc.prune import grasp_hg, grasp_scores, prune_masks, select_prune_batch, zo_grasp_hg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(), 0)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return build_model("digits_cnn", (1, 8, 8), 10).to(dtype)


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("method", ["zo_grasp", "grasp", "random", "magnitude"])
def test_prune_masks_exact_sparsity_and_model_untouched(digits, method):
    m = _model()
    before = copy.deepcopy(m.state_dict())
    cfg = PruneConfig(queries=8, samples_per_class=5)
    masks, ratios = prune_masks(m, method, 0.9, digits, cfg, seed=1)
    total = sum(x.numel() for x in masks.values())
    inactive = sum(int((~x).sum()) for x in masks.values())
    assert list(masks) == maskable_names(m)
    assert abs(inactive - 0.9 * total) <= 1
    for n, x in masks.items():
        assert x.dtype == torch.bool
        assert ratios[n] == pytest.approx(float((~x).sum()) / x.numel())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # params and BN running stats


def test_same_seed_same_masks_other_seed_differs(digits):
    cfg = PruneConfig(queries=8, samples_per_class=5)
    a, _ = prune_masks(_model(), "zo_grasp", 0.8, digits, cfg, seed=3)
    b, _ = prune_masks(_model(), "zo_grasp", 0.8, digits, cfg, seed=3)
    c, _ = prune_masks(_model(), "zo_grasp", 0.8, digits, cfg, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_grasp_removes_highest_score(digits):
    """GraSP's convention: S = -theta * Hg; the pruned weights are those with the highest S."""
    m = _model()
    cfg = PruneConfig(samples_per_class=10)
    masks, _ = prune_masks(m, "grasp", 0.7, digits, cfg, seed=0)
    x, y = select_prune_batch(digits.train_x, digits.train_y, digits.num_classes, 10, 0)
    _, hg = grasp_hg(m, x, y)
    s = _flat(grasp_scores(m, hg))
    keep = _flat(masks)
    assert s[~keep].min() >= s[keep].max()
    # reference: S computed directly from parameters
    params = dict(m.named_parameters())
    assert torch.allclose(grasp_scores(m, hg)["fc.weight"], -params["fc.weight"].detach() * hg["fc.weight"])


def test_grasp_hg_matches_finite_difference_of_autograd_gradient(digits):
    """Hg by double backward vs (grad(theta + eps g) - grad(theta - eps g)) / 2 eps, float64."""
    m = _model(torch.float64)
    x, y = select_prune_batch(digits.train_x, digits.train_y, digits.num_classes, 10, 0)
    x = x.double()
    g, hg = grasp_hg(m, x, y)
    eps = 1e-5

    def grad_at(shift):
        net = copy.deepcopy(m).train()
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.track_running_stats = False
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.add_(shift * g[n])
        loss = torch.nn.functional.cross_entropy(net(x), y)
        return _flat(dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters())))))

    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert torch.allclose(_flat(hg), fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max()))


def test_zo_grasp_estimates_track_autograd(digits):
    """Float64, many queries: RGE g0 is unbiased (d/q scaling) and ZO Hg correlates with autograd Hg.

    A small batch (3 per class) keeps 2 * 4001 loss evaluations fast; q ~ 2d queries are
    needed because Hg is estimated at the noisy g0 and projected on the q directions.
    """
    m = _model(torch.float64)
    x, y = select_prune_batch(digits.train_x, digits.train_y, digits.num_classes, 3, 0)
    x = x.double()
    g, hg = grasp_hg(m, x, y)
    g0, hz = zo_grasp_hg(m, x, y, queries=4000, mu=1e-4, seed=0)
    g, hg, g0, hz = _flat(g), _flat(hg), _flat(g0), _flat(hz)
    # E[g0] = g: the projection of g0 on g has the size of g (relative std ~ sqrt(2/q))
    assert 0.8 < float(g0 @ g / (g @ g)) < 1.2
    corr_g = np.corrcoef(g.numpy(), g0.numpy())[0, 1]
    corr_h = np.corrcoef(hg.numpy(), hz.numpy())[0, 1]
    assert corr_g > 0.6  # about 0.8 measured
    assert corr_h > 0.5  # about 0.8 measured
    # and so do the GraSP scores of the masked weights
    names = [n for n, _ in m.named_parameters()]
    sizes = [p.numel() for p in m.parameters()]
    s_auto = _flat(grasp_scores(m, dict(zip(names, hg.split(sizes)))))
    s_zo = _flat(grasp_scores(m, dict(zip(names, hz.split(sizes)))))
    assert np.corrcoef(s_auto.numpy(), s_zo.numpy())[0, 1] > 0.5


def test_zo_grasp_passes_the_stop_check_between_stacked_passes(digits):
    from zohpc.stop import StepAbandoned

    m = _model()
    before = copy.deepcopy(m.state_dict())
    x, y = select_prune_batch(digits.train_x, digits.train_y, digits.num_classes, 2, 0)
    calls = []
    zo_grasp_hg(m, x, y, queries=12, mu=5e-3, seed=0, query_batch=4, check=lambda: calls.append(1))
    assert len(calls) == 6  # two phases of 12 directions in passes of 4

    def stop():
        raise StepAbandoned()

    with pytest.raises(StepAbandoned):
        zo_grasp_hg(m, x, y, queries=12, mu=5e-3, seed=0, query_batch=4, check=stop)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def _run(k, args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", ZOHPC_THREADS="1")
    cmd = ([_mpiexec(), "-n", str(k)] if k > 1 else []) + [sys.executable, "-m", "zohpc.prune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_cli_two_ranks_equal_one_rank(tmp_path):
    common = ["--method", "zo_grasp", "--sparsity", "0.9", "--set", "model.name=digits_cnn",
              "--set", "prune.queries=16", "--set", "zo.query_batch=4", "--seed", "5"]  # 4 stacked passes, 2 per rank
    one = _run(1, [*common, "--out", str(tmp_path / "one.h5")])
    assert one.returncode == 0, one.stderr
    two = _run(2, [*common, "--out", str(tmp_path / "two.h5")])
    assert two.returncode == 0, two.stderr
    a = read_mask_file(str(tmp_path / "one.h5"), model_name="digits_cnn")
    b = read_mask_file(str(tmp_path / "two.h5"), model=_model(), model_name="digits_cnn")
    assert list(a.masks) == list(b.masks)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.ratios == b.ratios and a.seed == b.seed == 5 and a.method == "zo_grasp"
    total = sum(x.numel() for x in a.masks.values())
    assert abs(a.achieved_sparsity - 0.9) <= 1.0 / total
    assert "fc.weight" in one.stdout and "sparsity" in one.stdout


def test_cli_bad_sparsity_exits_2_with_one_line(tmp_path):
    r = _run(1, ["--sparsity", "1.0", "--out", str(tmp_path / "x.h5")], timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "prune.sparsity" in lines[0], r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_setup_refuses_bad_method_and_out_path(tmp_path):
    """The start-up checks the CLI runs on every rank (in-process: no spawn needed)."""
    from zohpc.errors import ConfigError
    from zohpc.prune import _setup, build_parser

    p = build_parser()
    with pytest.raises(ConfigError, match="prune.method"):
        _setup(p.parse_args(["--method", "nope", "--out", str(tmp_path / "x.h5")]))
    with pytest.raises(ConfigError, match="prune.method"):
        _setup(p.parse_args(["--method", "none", "--out", str(tmp_path / "x.h5")]))
    with pytest.raises(ConfigError, match="--out"):
        _setup(p.parse_args(["--out", str(tmp_path)]))
    with pytest.raises(ConfigError, match="prune.sparsity"):
        _setup(p.parse_args(["--sparsity", "-0.1", "--out", str(tmp_path / "x.h5")]))
    cfg, seed = _setup(p.parse_args(["--set", "train.seed=4", "--sparsity", "0.3", "--out", str(tmp_path / "x.h5")]))
    assert seed == 4 and cfg.prune.sparsity == 0.3 and cfg.prune.method == "zo_grasp"
    (tmp_path / "mine.h5").write_bytes(b"a file of the user's")
    with pytest.raises(ConfigError, match="exists \\(pass --force to replace it\\)"):
        _setup(p.parse_args(["--out", str(tmp_path / "mine.h5")]))
    assert _setup(p.parse_args(["--out", str(tmp_path / "mine.h5"), "--force"]))[0].prune.method == "zo_grasp"
    with pytest.raises(ConfigError, match="task.name.*not for 'zohpc.tasks.examples:regression'"):
        _setup(p.parse_args(["--set", "task.name=zohpc.tasks.examples:regression", "--out", str(tmp_path / "y.h5")]))
    args = p.parse_args(["--out", "m.h5", "--seed", "2", "--method", "grasp", "--set", "a.b=1", "--set", "c.d=2"])
    assert args.seed == 2 and args.method == "grasp" and args.overrides == ["a.b=1", "c.d=2"] and args.sparsity is None
