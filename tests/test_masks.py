"""Masks and mask files: exact sparsity, layer-wise random draws, round trip, refused files."""

import h5py
import numpy as np
import pytest
import torch

from zohpc.errors import CheckpointError
from zohpc.masks import (
    global_sparsity,
    layer_ratios,
    layerwise_random_masks,
    mask_draw,
    maskable_names,
    masks_from_scores,
    read_mask_file,
    write_mask_file,
)
from zohpc.models import build_model


def _model(name="digits_cnn", shape=(1, 8, 8)):
    torch.manual_seed(0)
    return build_model(name, shape, 10)


def test_maskable_names_are_conv_and_linear_weights_in_order():
    m = _model()
    names = maskable_names(m)
    assert names == ["features.0.weight", "features.4.weight", "fc.weight"]
    all_names = [n for n, _ in m.named_parameters()]
    assert [n for n in all_names if n in names] == names
    r = _model("resnet20", (3, 32, 32))
    rn = maskable_names(r)
    assert len(rn) == 20 and rn[0] == "conv1.weight" and rn[-1] == "fc.weight"
    assert all("bn" not in n and n.endswith("weight") for n in rn)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.97, 0.999])
def test_global_sparsity_exact(sparsity):
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.randn(7, 3, generator=gen), "b": torch.randn(13, generator=gen), "c": torch.randn(2, 2, 5, generator=gen)}
    total = sum(s.numel() for s in scores.values())
    masks, ratios = masks_from_scores(scores, sparsity)
    inactive = sum(int((~m).sum()) for m in masks.values())
    assert inactive == round(sparsity * total)
    assert abs(global_sparsity(masks) - sparsity) <= 1.0 / total
    # the lowest scores are the removed ones
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.cat([m.reshape(-1) for m in masks.values()])
    if 0 < inactive < total:
        assert flat[~keep].max() <= flat[keep].min()
    assert ratios == layer_ratios(masks)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())


def test_ties_are_broken_deterministically():
    scores = {"a": torch.zeros(10), "b": torch.zeros(10)}
    m1, _ = masks_from_scores(scores, 0.5)
    m2, _ = masks_from_scores({k: v.clone() for k, v in scores.items()}, 0.5)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    # earlier coordinates removed first among equal scores
    assert not m1["a"].any() and m1["b"].all()


def test_layerwise_random_ratios_exact_and_redrawn_per_interval():
    m = _model("resnet20", (3, 32, 32))
    names = maskable_names(m)
    ratios = {n: (i % 7) / 7.0 + 0.05 for i, n in enumerate(names)}
    a = layerwise_random_masks(m, ratios, seed=3, draw=0)
    params = dict(m.named_parameters())
    assert list(a) == names
    for n in names:
        assert a[n].shape == params[n].shape and a[n].dtype == torch.bool
        assert int((~a[n]).sum()) == round(ratios[n] * params[n].numel())
    same = layerwise_random_masks({n: params[n].shape for n in names}, ratios, seed=3, draw=0)
    assert all(torch.equal(a[n], same[n]) for n in names)
    b = layerwise_random_masks(m, ratios, seed=3, draw=1)
    c = layerwise_random_masks(m, ratios, seed=4, draw=0)
    big = [n for n in names if params[n].numel() > 100]
    assert all(not torch.equal(a[n], b[n]) for n in big)
    assert all(not torch.equal(a[n], c[n]) for n in big)
    assert layer_ratios(b) == layer_ratios(a)


def test_mask_draw_schedule():
    assert [mask_draw(e, 5) for e in range(12)] == [0] * 5 + [1] * 5 + [2] * 2
    assert [mask_draw(e, 0) for e in range(4)] == [0, 0, 0, 0]
    assert [mask_draw(e, 1) for e in range(3)] == [0, 1, 2]


def _write(path, model, sparsity=0.8, name="digits_cnn"):
    params = dict(model.named_parameters())
    scores = {n: params[n].detach().abs() for n in maskable_names(model)}
    masks, ratios = masks_from_scores(scores, sparsity)
    write_mask_file(str(path), model_name=name, masks=masks, method="magnitude", seed=7, sparsity=sparsity,
                    ratios=ratios, extra={"note": "test", "queries": 3})
    return masks, ratios


def test_mask_file_round_trip(tmp_path):
    m = _model()
    path = tmp_path / "m.h5"
    masks, ratios = _write(path, m)
    mf = read_mask_file(str(path), model=m, model_name="digits_cnn")
    assert mf.model_name == "digits_cnn" and mf.method == "magnitude" and mf.seed == 7 and mf.sparsity == 0.8
    assert list(mf.masks) == list(masks)
    for n in masks:
        assert mf.masks[n].dtype == torch.bool and torch.equal(mf.masks[n], masks[n])
        assert mf.shapes[n] == tuple(masks[n].shape)
        # ratios stored in the file match the masks
        assert mf.ratios[n] == pytest.approx(float((~mf.masks[n]).sum()) / mf.masks[n].numel())
    assert mf.ratios == pytest.approx(ratios)
    assert mf.achieved_sparsity == pytest.approx(global_sparsity(masks))
    assert mf.extra["note"] == "test" and mf.extra["queries"] == 3
    with h5py.File(path, "r") as fh:
        assert fh.attrs["format"] == "zohpc-masks"
        assert fh["masks/fc.weight"].attrs["ratio"] == pytest.approx(ratios["fc.weight"])


def test_mask_file_for_another_model(tmp_path):
    m = _model()
    path = tmp_path / "m.h5"
    _write(path, m)
    with pytest.raises(CheckpointError, match="is for model 'digits_cnn', not 'cnn_d2'") as ei:
        read_mask_file(str(path), model_name="cnn_d2")
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    wide = build_model("digits_cnn", (3, 8, 8), 10)  # same names, other first-layer shape
    with pytest.raises(CheckpointError, match=r"features\.0\.weight.*shape") as ei:
        read_mask_file(str(path), model=wide)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    other = build_model("resnet20", (1, 8, 8), 10)
    with pytest.raises(CheckpointError, match="no mask for parameter 'conv1.weight'"):
        read_mask_file(str(path), model=other)
    deeper = build_model("cnn_d2", (1, 8, 8), 10)  # same parameter names, other shapes
    with pytest.raises(CheckpointError, match="shape"):
        read_mask_file(str(path), model=deeper)


def test_refuses_foreign_corrupted_and_truncated_files(tmp_path):
    m = _model()
    good = tmp_path / "good.h5"
    _write(good, m)
    raw = good.read_bytes()

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh.create_dataset("x", data=np.arange(3))
    with pytest.raises(CheckpointError, match="not a zohpc-masks file") as ei:
        read_mask_file(str(foreign))
    assert str(foreign) in str(ei.value)

    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.h5"):
        read_mask_file(str(text))

    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.h5"):
        read_mask_file(str(truncated))

    # flip bytes inside the stored mask data: checksums catch it
    with h5py.File(good, "r") as fh:
        offset = fh["masks/fc.weight"].id.get_chunk_info(0).byte_offset
    assert 0 < offset < len(raw)
    damaged = bytearray(raw)
    for k in range(offset, min(len(raw), offset + 64)):
        damaged[k] ^= 0xFF
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="corrupt.h5"):
        read_mask_file(str(corrupt))

    with pytest.raises(CheckpointError, match="no such file"):
        read_mask_file(str(tmp_path / "missing.h5"))


def test_corrupted_mask_data_detected(tmp_path):
    """Rewrite one mask's data in place (keeping its old checksum): a checksum mismatch."""
    m = _model()
    path = tmp_path / "m.h5"
    _write(path, m)
    with h5py.File(path, "r+") as fh:
        ds = fh["masks/fc.weight"]
        data = ds[()]
        data[0, 0] ^= 1
        ds[...] = data
    with pytest.raises(CheckpointError, match="m.h5"):
        read_mask_file(str(path), model=m)
