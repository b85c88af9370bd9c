"""zo.precision delta modes: CGE estimates against float64 differences (a float64 model's engine).

The float64 engine is itself checked against full forwards (tests/test_engine*.py). Small
inputs keep these lean: ResNet-20 on 8x8 images, a two-block token transformer built from
linear layers, LayerNorm, scaled dot-product attention and GELU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zohpc.errors import ConfigError
from zohpc.models.resnet import cifar_resnet
from zohpc.zo import Coordinates, QueryEngine, cge
from zohpc.zo.lowp import round_tf32

MU = 1e-5  # small: finite differences far below float32 resolution of the loss (what cancels shows)
LIMITS = {"delta-tf32": 1e-3, "delta-bf16": 1e-2}


class Block(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        h = h + self.proj(a)
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TokenNet(nn.Module):
    def __init__(self, vocab=10, length=6, d=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, length, d))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.emb(x) + self.pos)).mean(dim=1))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _sample(model, per_param=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < per_param / p.numel() for n, p in model.named_parameters()}
    return Coordinates(model, masks)


def _resnet():
    torch.manual_seed(0)
    return cifar_resnet(20).train(), torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def _transformer():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return TokenNet().train(), torch.randint(0, 10, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g)


def _reference(model, x, y, coords):
    m64 = copy.deepcopy(model).double()
    eng = QueryEngine(m64, query_batch=8)
    eng.prepare(x.double() if x.is_floating_point() else x, y)
    return cge(eng, coords, MU)


@pytest.mark.parametrize("build", [_resnet, _transformer], ids=["resnet20", "transformer"])
def test_delta_modes_against_float64_differences(build):
    model, x, y = build()
    coords = _sample(model)
    ref = _reference(model, x, y, coords)
    for precision, limit in LIMITS.items():
        eng = QueryEngine(model, query_batch=8, precision=precision)
        base = eng.prepare(x, y)
        assert base.dtype == torch.float64
        est = cge(eng, coords, MU)
        err = float((est - ref).norm() / ref.norm())
        assert err <= limit, (precision, err)
        assert eng.precision_fallbacks == {}


def test_ieee_unchanged_bit_for_bit():
    """The default runs the IEEE paths: the same bits as an engine built without the key."""
    model, x, y = _resnet()
    coords = _sample(model, per_param=2)
    a, b = QueryEngine(model, query_batch=8), QueryEngine(model, query_batch=8, precision="ieee")
    assert torch.equal(a.prepare(x, y), b.prepare(x, y)) and a.base.dtype == torch.float32
    assert torch.equal(a.losses(coords, 0, coords.total, MU), b.losses(coords, 0, coords.total, MU))


class WithIndex(nn.Module):
    """An op whose value is an integer that moves with the perturbation: it has no difference."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + (h[:, :1] * 1e7).long().to(h.dtype) * 1e-7


def test_op_without_difference_falls_back_to_ieee_and_is_named():
    torch.manual_seed(0)
    m, x, y = WithIndex().train(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    coords = Coordinates(m)
    ieee = QueryEngine(m, query_batch=4)
    ieee.prepare(x, y)
    eng = QueryEngine(m, query_batch=4, precision="delta-bf16")
    eng.prepare(x, y)
    got = eng.losses(coords, 0, coords.total, MU)
    want = ieee.losses(coords, 0, coords.total, MU)
    pa = coords.offsets[coords.param_names.index("a.weight")]
    assert set(eng.precision_fallbacks) == {"a.weight", "a.bias"} and eng.precision_fallbacks["a.weight"] == "long"
    assert torch.equal(got[pa:pa + 20], want[pa:pa + 20].double())  # a's queries: IEEE float32
    with pytest.raises(ConfigError, match="zo.precision"):
        QueryEngine(m, precision="fp8")


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest_even():
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20, -(1 + 2 ** -11)])
    want = torch.tensor([1 + 2 ** -10, 1.0, 1 + 2 ** -9, 1 + 2 ** -10, -1.0])
    assert torch.equal(round_tf32(x), want)


def test_config_key_is_validated():
    from zohpc.config import load_config

    assert load_config(None, []).zo.precision == "ieee"
    assert load_config(None, ["zo.precision=delta-tf32"]).zo.precision == "delta-tf32"
    with pytest.raises(ConfigError, match="zo.precision"):
        load_config(None, ["zo.precision=fp8"])


def test_delta_mode_reads_large_conv_planes_without_copying_the_output():
    """Past 8 queries a large conv's single channels are read from channel-major copies; a
    delta mode starts from zeros, so it copies the padded input only (and its estimates hold)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(12, 4)).train()
    x, y = torch.randn(4, 2, 32, 32), torch.tensor([0, 1, 2, 3])  # 4 x 32 x 32 = 4096 positions
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["0.weight"].view(-1)[:16] = True
    coords = Coordinates(model, masks)
    ref = _reference(model, x, y, coords)
    for precision in ("ieee", "delta-tf32"):
        eng = QueryEngine(model, query_batch=4, precision=precision)
        eng.prepare(x, y)
        est = cge(eng, coords, MU)
        if precision != "ieee":
            assert float((est - ref).norm() / ref.norm()) <= LIMITS[precision]
        (out_copy, input_copy), = eng._channel_major.values()
        assert input_copy is not None and input_copy.is_contiguous()
        assert (out_copy is None) == (precision != "ieee")
