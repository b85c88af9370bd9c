"""Transformer operations in the query engine: rules, feature reuse, free embedding rows.

Reference: the full-forward engine (every query a complete forward of the perturbed model)
and float64 autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zohpc.zo import Coordinates, FullForwardEngine, QueryEngine, cge
from zohpc.zo.reps import Chan, Full

VOCAB, D, T, USED = 12, 4, 4, 7


class TinyTransformer(nn.Module):
    """Token ids -> embedding + positions -> PyTorch encoder layer -> LayerNorm, mean, GELU -> head."""

    def __init__(self, classes=3):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(0.1 * torch.randn(1, T, D))
        self.layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        h = self.layer(self.emb(x) + self.pos)
        return self.head(F.gelu(self.norm(h).mean(dim=1)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _setup(batch=5, dtype=torch.float64):
    torch.manual_seed(0)
    m = TinyTransformer().to(dtype).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, USED, (batch, T), generator=g)  # tokens USED.. never occur
    y = torch.randint(0, 3, (batch,), generator=g)
    return m, x, y


def test_estimates_equal_full_forward_and_absent_tokens_are_free():
    m, x, y = _setup()
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=6)
    ref = FullForwardEngine(m, query_batch=6)
    assert torch.equal(eng.prepare(x, y), eng.base) and abs(float(eng.base) - float(ref.prepare(x, y))) < 1e-12
    got = eng.losses(coords, 0, coords.total, 1e-3)
    want = ref.losses(coords, 0, coords.total, 1e-3)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    absent = VOCAB - len(set(x.reshape(-1).tolist()))
    assert eng.free_queries == absent * D == eng.free_count(coords) and ref.free_queries == 0
    pi = coords.param_names.index("emb.weight")
    rows = torch.arange(VOCAB * D) // D
    free = ~torch.isin(rows, x.reshape(-1))
    part = got[coords.offsets[pi]:coords.offsets[pi] + VOCAB * D]
    assert torch.equal(part[free], eng.base.expand(int(free.sum())))  # zero finite difference
    assert not torch.equal(part[~free], eng.base.expand(int((~free).sum())))
    p2, m2 = eng.central_losses(coords, 0, coords.total, 1e-3)
    r2, s2 = ref.central_losses(coords, 0, coords.total, 1e-3)
    assert torch.allclose(p2, r2, rtol=1e-12, atol=0) and torch.allclose(m2, s2, rtol=1e-12, atol=0)


def test_feature_reuse_through_transformer_ops():
    """Downstream of every parameter the ops run once per stacked pass, and the executor's
    representations are the planned ones."""
    m, x, y = _setup()
    eng = QueryEngine(m, query_batch=4)
    eng.prepare(x, y)
    for pi, plan in enumerate(eng.plans):
        name = eng.param_names[pi]
        eng.trace = {}
        eng.query(pi, [0, eng.params[pi].numel() - 1], [0.01, -0.01])
        kinds = {n: ("chan", r.s) if isinstance(r, Chan) else "full" if isinstance(r, Full) else "per"
                 for n, r in eng.trace.items()}
        assert kinds == {n: (r[:2] if isinstance(r, tuple) else r) for n, r in plan.reps.items()}, name
        assert plan.copy_ops <= 1, (name, plan.copy_ops)  # (in_proj: F.linear per copy, then stacked)
        if name.startswith(("emb", "norm", "head")):
            assert plan.copy_ops == 0 or name.startswith("norm"), name
    emb = eng.plans[eng.param_names.index("emb.weight")]
    assert [emb.how[n] for n in emb.sources] == ["source_emb"]


def test_cge_matches_float64_autograd():
    m, x, y = _setup(batch=8)
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=8)
    eng.prepare(x, y)
    g = cge(eng, coords, 1e-6, "central")
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    true = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert ((g - true).norm() / true.norm()).item() <= 1e-6


def test_float32_integer_tokens_keep_dtype():
    m, x, y = _setup(dtype=torch.float32)
    eng = QueryEngine(m, query_batch=4)
    eng.prepare(x, y)
    assert eng.feature_tensors()[0].dtype == torch.int64
    shapes = eng.feature_shapes(tuple(x.shape), x.dtype)
    assert shapes[0] == (tuple(x.shape), torch.int64)


def test_attention_mask_inputs_fall_back_per_copy():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            h = self.emb(x)
            a = self.attn(h, h, h, need_weights=False)[0]
            q = F.scaled_dot_product_attention(a, h, h)
            return self.head(torch.softmax(q, dim=-1).sum(1))

    torch.manual_seed(0)
    m = Masked().double()
    x = torch.randint(0, USED, (4, T))
    y = torch.randint(0, 2, (4,))
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=5)
    eng.prepare(x, y)
    ref = FullForwardEngine(m, query_batch=5)
    ref.prepare(x, y)
    assert torch.allclose(eng.losses(coords, 0, coords.total, 1e-3), ref.losses(coords, 0, coords.total, 1e-3),
                          rtol=1e-12, atol=0)
    assert all(p.copy_ops <= 1 for p in eng.plans)


@pytest.mark.parametrize("p", [0.1])
def test_transformer_with_dropout_refused(p):
    from zohpc.errors import UserError
    layer = nn.TransformerEncoderLayer(D, nhead=2, dropout=p, batch_first=True)
    with pytest.raises(UserError, match="is random"):
        QueryEngine(nn.Sequential(layer))


TOKEN_TASK = '''
import torch
from zohpc.models.token_transformer import TokenTransformer
from zohpc.tasks import Task


def build(cfg):
    g = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.randint(0, 24, (192, 8), generator=g)  # vocabulary 32: tokens 24..31 never occur
    y = (x[:, 0] < 12).long()
    model = TokenTransformer(32, 8, 2, dim=8, heads=2, layers=1, ff=16)
    return Task(model=model, train=(x[:128], y[:128]), test=(x[128:], y[128:]), loss=None, name="tokens")
'''


@pytest.mark.slow
def test_tiny_transformer_trains_by_sparse_cge_under_mpi_with_feature_reuse(tmp_path):
    """Needs integer inputs through the task probe, pruning and the broadcast (helper 16's side)."""
    import json
    import os

    from mpi_util import ROOT, run_ranks

    (tmp_path / "token_task.py").write_text(TOKEN_TASK)
    out = tmp_path / "run"
    p = run_ranks(2, ["-m", "zohpc.train", "--out", str(out), "--set", "task.name=token_task:build",
                      "--set", "prune.method=random", "--set", "prune.sparsity=0.5", "--set", "data.batch_size=32",
                      "--set", "train.max_steps=3", "--set", "train.epochs=1", "--set", "train.log_every_seconds=1000"],
                  timeout=240, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "feature reuse off" not in p.stdout + p.stderr
    with open(out / "metrics.jsonl") as fh:
        steps = [r for r in map(json.loads, fh) if r["event"] == "step"]
    assert len(steps) == 3 and all(r["free_queries"] > 0 for r in steps)


def test_a_single_embedding_query_leaves_the_cache_intact():
    """A pass of one copy (Q = 1) must write into its own tensor, never the cached output."""
    m, x, y = _setup()
    eng = QueryEngine(m, query_batch=1)
    ref = FullForwardEngine(m, query_batch=1)
    eng.prepare(x, y)
    ref.prepare(x, y)
    pi = eng.param_names.index("emb.weight")
    token = int(x[0, 0])
    for _ in range(2):  # the second query reads the cache the first one may have written
        got = eng.query(pi, [token * D], [0.25])
        assert torch.allclose(got, ref.query(pi, [token * D], [0.25]), rtol=1e-12, atol=0)


def _token_transformer():
    from zohpc.models.token_transformer import TokenTransformer

    torch.manual_seed(0)
    m = TokenTransformer(VOCAB, T, 3, dim=8, heads=2, layers=2, ff=16).double().train()
    g = torch.Generator().manual_seed(2)
    return m, torch.randint(0, USED, (6, T), generator=g), torch.randint(0, 3, (6,), generator=g)


def _engine_equal_to_full_forwards(m, x, y, q):
    """The QueryEngine of ``m``, prepared, after checking every coordinate's loss against a full forward."""
    coords = Coordinates(m)
    eng, ref = QueryEngine(m, query_batch=q), FullForwardEngine(m, query_batch=q)
    eng.prepare(x, y)
    ref.prepare(x, y)
    assert torch.allclose(eng.losses(coords, 0, coords.total, 1e-3), ref.losses(coords, 0, coords.total, 1e-3),
                          rtol=1e-12, atol=0)
    return eng


def test_explicit_attention_blocks_reuse_features_from_the_perturbed_projection():
    """TokenTransformer's blocks are plain ops: a query starts at the perturbed nn.Linear
    (one output feature moved, no matmul), reshapes and attention run once per pass, and the
    losses equal full forwards of the perturbed model."""
    m, x, y = _token_transformer()
    eng = _engine_equal_to_full_forwards(m, x, y, 7)
    for name, plan in zip(eng.param_names, eng.plans):
        if name.startswith("blocks.") and ".norm" not in name:
            assert [plan.how[n] for n in plan.sources] == [f"source_lin_{name.rsplit('.', 1)[1][0]}_nd"], name
            assert plan.copy_ops == 0, name
        if name == "pos":  # read by get_attr: the perturbed copies stack against the batch at the add
            assert plan.copy_ops == 0 and "binary_param" in plan.how.values()
        for n, how in plan.how.items():
            if n.op == "call_method" and n.target in ("reshape", "transpose", "chunk"):
                assert how == "rowwise", (name, n.name)
    late = eng.plans[eng.param_names.index("blocks.1.fc2.weight")]
    early = eng.plans[eng.param_names.index("blocks.0.qkv.weight")]
    assert late.flops < early.flops / 4  # the last FFN weight re-runs only the block's tail


def test_reshapes_that_touch_the_batch_dim_run_copy_by_copy():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            self.lin = nn.Linear(D, D)
            self.head = nn.Linear(T * D, 3)

        def forward(self, x):
            h = self.lin(self.emb(x))  # (B, T, D)
            return self.head(h.transpose(0, 1).reshape(-1, T * D))  # samples mixed: the batch dim moved

    torch.manual_seed(0)
    m = Mixer().double()
    x, y = torch.randint(0, USED, (T, T)), torch.randint(0, 3, (T,))  # batch == length: shapes cannot tell
    eng = _engine_equal_to_full_forwards(m, x, y, 4)
    plan = eng.plans[eng.param_names.index("lin.weight")]
    hows = {n.name: plan.how[n] for n in plan.order if n.op == "call_method"}
    assert hows == {"transpose": "generic", "reshape": "generic"}, hows


@pytest.mark.parametrize("norm_first", [False, True])
def test_pytorch_encoder_layers_are_opened_into_their_ops(norm_first):
    """nn.TransformerEncoder of plain nn.TransformerEncoderLayers (GELU, pre- or post-norm, a
    final norm) is traced op by op: a query starts at the perturbed projection inside the layer,
    and every loss equals a full forward of the PyTorch modules themselves."""
    class Encoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            layer = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=norm_first)
            self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)).mean(1))

    torch.manual_seed(0)
    m = Encoded().double().train()
    x, y = torch.randint(0, USED, (5, T)), torch.randint(0, 3, (5,))
    eng = _engine_equal_to_full_forwards(m, x, y, 6)
    assert not any(n.op == "call_module" and isinstance(eng.modules[n.target], nn.TransformerEncoderLayer)
                   for n in eng.nodes)
    plan = eng.plans[eng.param_names.index("enc.layers.1.linear1.weight")]
    assert [plan.how[n] for n in plan.sources] == ["source_lin_w_nd"] and plan.copy_ops == 0
    qkv = eng.plans[eng.param_names.index("enc.layers.0.self_attn.in_proj_weight")]
    assert qkv.copy_ops == 1  # the perturbed projection per copy; everything after it stacked


def test_an_encoder_layer_called_with_a_mask_stays_one_module():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            self.layer = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=True)
            self.head = nn.Linear(D, 3)
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64))

        def forward(self, x):
            return self.head(self.layer(self.emb(x), src_mask=self.causal).mean(1))

    torch.manual_seed(0)
    m = Masked().double().train()
    x, y = torch.randint(0, USED, (5, T)), torch.randint(0, 3, (5,))
    eng = _engine_equal_to_full_forwards(m, x, y, 6)
    assert any(n.op == "call_module" and n.target == "layer" for n in eng.nodes)
