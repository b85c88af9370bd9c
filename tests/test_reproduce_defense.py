"""The denoised-smoothing task (ZO-DS) and the ``certified_defense`` study."""

import json

import pytest
import torch
from torch import nn

from mpi_util import run_ranks
from zohpc.config import load_config
from zohpc.errors import ConfigError
from zohpc.tasks.blackbox import PixelClassifier, PixelData
from zohpc.tasks.denoise import (DEFAULTS, Denoiser, build, cross_entropy_np, make_denoiser, make_task,
                                 noisy_copies, train_fo)


def tiny_data(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=gen)
    y = (x.flatten(1)[:, :8].sum(1) > x.flatten(1)[:, 8:].sum(1)).long()
    return PixelData(x, y, x[:8].clone(), y[:8].clone(), 2, 1.0, (0.0,), (1.0,))


class HalfSums(nn.Module):
    """A known classifier on 1x4x4 images: logits = (sum of the first 8 pixels, of the last 8)."""

    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([f[:, :8].sum(1), f[:, 8:].sum(1)], 1)


def test_cross_entropy_np_matches_torch():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 30  # large logits: needs the max shift
    y = torch.randint(0, 5, (7,), generator=gen)
    ref = float(nn.functional.cross_entropy(z, y))
    assert cross_entropy_np(z.numpy(), y.numpy()) == pytest.approx(ref, rel=1e-12)


def test_denoiser_starts_near_identity_and_is_seeded():
    d = make_denoiser(1, 8, 3, 0)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert float((d(x) - x).abs().max()) < 0.2
        assert torch.equal(d(x), make_denoiser(1, 8, 3, 0)(x))
        assert not torch.equal(d(x), make_denoiser(1, 8, 3, 1)(x))
    assert sum(p.numel() for p in d.parameters()) == 80 + 584 + 73
    torch.fx.symbolic_trace(d)  # the query engine traces the model for per-layer feature reuse
    with pytest.raises(ValueError):
        Denoiser(1, 8, 0)


def test_noisy_copies_are_seeded_copy_major_and_have_the_noise_level():
    x = torch.full((50, 1, 8, 8), 0.5)
    a = noisy_copies(x, 3, 0.25, 0, "t")
    assert a.shape == (150, 1, 8, 8)
    assert torch.equal(a, noisy_copies(x, 3, 0.25, 0, "t"))
    assert torch.equal(a[:50], noisy_copies(x, 1, 0.25, 0, "t"))  # copy c depends on c only
    assert float((a - 0.5).std()) == pytest.approx(0.25, rel=0.05)


def test_task_loss_is_the_black_box_cross_entropy_of_the_denoised_batch():
    data = tiny_data()
    clf = HalfSums()
    task = make_task(clf, data, dict(DEFAULTS, sigma=0.1, copies=2))
    x, y = task.train
    assert x.shape[0] == 2 * data.train_x.shape[0] and torch.equal(y, data.train_y.repeat(2))
    with torch.no_grad():
        out = task.model(x[:10])
        ref = float(nn.functional.cross_entropy(clf(out).double(), y[:10]))
        assert task.loss(out, y[:10]) == pytest.approx(ref, rel=1e-6)
        tx, ty = task.test
        acc = float((clf(task.model(tx)).argmax(1) == ty).double().mean())
        assert task.metrics(task.model(tx), ty) == {"accuracy": pytest.approx(acc)}
    assert task.loss(out.detach(), y[:10]) == task.loss(out, y[:10])  # values only, no graph


def test_fo_ds_lowers_the_objective():
    data = tiny_data(64)
    clf = PixelClassifier(HalfSums(), 1.0, (0.0,), (1.0,))
    task = make_task(clf, data, dict(DEFAULTS, sigma=0.5, copies=2))
    x, y = task.train
    before = task.loss(task.model(x).detach(), y)
    train_fo(task.model, clf, task.train, epochs=5, lr=1e-2, batch_size=16)
    assert task.loss(task.model(x).detach(), y) < before - 0.05


def test_build_reads_and_checks_task_options():
    cfg = load_config(None, ["task.name=zohpc.tasks.denoise:build", "task.classifier_epochs=1",
                             "task.copies=1", "task.sigma=0.5"], None)
    task = build(cfg)
    x, y = task.train
    assert x.shape[0] == 1437 and task.info["sigma"] == 0.5
    cfg = load_config(None, ["task.name=zohpc.tasks.denoise:build", "task.noise=0.5"], None)
    with pytest.raises(ConfigError, match="task.noise"):
        build(cfg)


def test_study_quick_two_ranks(tmp_path):
    proc = run_ranks(2, ["-m", "zohpc.reproduce", "certified_defense", "--quick", "--json", "--out", str(tmp_path)],
                     timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    radii = result["radii"]
    assert len(radii) == 4 and radii[0] == 0.0
    ca = result["certified_accuracy"]
    assert set(ca) >= {"none", "fo_ds", "zo_ds"}
    for values in ca.values():
        assert len(values) == 4 and all(0 <= v <= 1 for v in values)
        assert values == sorted(values, reverse=True)  # fewer points certified at larger radii
    assert result["zo"]["steps"] > 0 and result["zo"]["ranks"] == 2
    # ZO training helps: the ZO denoiser beats smoothing the black box alone
    assert ca["zo_ds"][0] > ca["none"][0]
    assert result["noisy_accuracy"]["zo_ds"] > result["noisy_accuracy"]["none"]
    # the gray-box row: the same steps, one image per query, and it helps too
    gb = result["gb"]
    assert gb["steps"] == result["zo"]["steps"] and gb["queries"] == gb["images_queried"] > 0
    assert result["noisy_accuracy"]["gb_ds"] > result["noisy_accuracy"]["none"]
    for name in ("certified_defense.json", "certified_defense.txt", "certified_defense.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_denoise_task_trains_with_the_cli_and_rge(tmp_path):
    out = tmp_path / "run"
    proc = run_ranks(2, ["-m", "zohpc.train", "--config", "configs/certified_defense.toml", "--set", "zo.estimator=rge",
                         "--set", "task.classifier_epochs=2", "--set", "train.max_steps=3", "--out", str(out)],
                     timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert done["event"] == "done" and done["queries"] > 0
