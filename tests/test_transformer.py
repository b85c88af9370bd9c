"""Transformers on token ids (issue 16): integer inputs through every phase, Task(loss=None)
as a classifier with accuracy, dropout with p = 0 accepted, and the SPSA step.

The plug-in is ``zohpc.tasks.tokens:classifier`` (nn.Embedding + PyTorch's encoder layer
with ``dropout=0.0`` + a linear head, no ``loss``). MPI runs go through ``mpiexec -n 2``
with a timeout (tests/mpi_util.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from mpi_util import run_ranks
from zohpc.tasks import Task
from zohpc.tasks.loading import check_task
from zohpc.tasks.tokens import TokenClassifier, make_data
from zohpc.zo.engine import NondeterministicModelError, check_deterministic

TINY = ["task.name=zohpc.tasks.tokens:classifier", "task.vocab=8", "task.seq_len=4", "task.d_model=8",
        "task.ff=8", "task.train_size=64", "task.test_size=32", "data.batch_size=32", "prune.method=none"]


def train(k, out, *sets, timeout=180, **env):
    args = ["-m", "zohpc.train", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return run_ranks(k, args, timeout=timeout, **env)


def records(out, event):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r.get("event") == event]


def assert_clean(p, code=0):
    text = p.stdout + p.stderr
    assert p.returncode == code, text[-3000:]
    assert "Traceback" not in text and "MPI_Abort" not in text, text[-3000:]


# ---------------------------------------------------------------------------- the task contract
def test_task_without_loss_is_a_classifier_with_accuracy():
    torch.manual_seed(0)
    task = check_task(Task(model=TokenClassifier(8, 4, 8, 2, 1, 8), train=make_data(16, 8, 4, 0, "train")), "t")
    assert task.loss is None and task.metrics is not None
    out = task.model(task.train[0])
    assert set(task.metrics(out, task.train[1])) == {"accuracy"}


def test_dropout_with_p_zero_is_accepted_and_active_dropout_says_how_to_turn_it_off():
    check_deterministic(nn.TransformerEncoderLayer(8, 2, 8, dropout=0.0))
    check_deterministic(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
    with pytest.raises(NondeterministicModelError) as info:
        check_deterministic(nn.TransformerEncoderLayer(8, 2, 8, dropout=0.1))
    text = str(info.value)
    assert "p=0.1" in text and "dropout=0.0" in text and "\n" not in text
    with pytest.raises(NondeterministicModelError):
        check_deterministic(nn.RReLU())


def test_functional_dropout_with_constant_zero_is_accepted_by_the_engine():
    from zohpc.zo import QueryEngine

    class M(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.lin, self.p = nn.Linear(3, 2), p

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), p=self.p, training=True)

    QueryEngine(M(0.0))
    with pytest.raises(NondeterministicModelError):
        QueryEngine(M(0.5))


# ---------------------------------------------------------------------------- training on tokens
def test_token_transformer_trains_by_cge_on_two_ranks_and_reports_accuracy(tmp_path):
    out = tmp_path / "cge"
    p = train(2, out, *TINY, "train.epochs=1", "zo.features=broadcast")
    assert_clean(p)
    evals = records(out, "eval")
    assert evals and evals[-1]["test_acc"] is not None and 0.0 <= evals[-1]["metrics"]["accuracy"] <= 1.0
    assert "feature reuse off" not in p.stdout + p.stderr


@pytest.mark.parametrize("method", ["zo_grasp", "grasp"])
def test_pruning_at_initialization_on_token_ids(tmp_path, method):
    p = train(2, tmp_path / method, *TINY[:-1], f"prune.method={method}", "prune.sparsity=0.5", "train.max_steps=1")
    assert_clean(p)


# ---------------------------------------------------------------------------- SPSA
def _tiny(dtype=torch.float32):
    torch.manual_seed(0)
    model = TokenClassifier(8, 4, 8, 2, 1, 8).to(dtype)
    x, y = make_data(32, 8, 4, 0, "train")
    return model, x, y


def test_spsa_estimate_matches_autograd_in_expectation():
    """Central SPSA over many directions in float64: the cosine with the autograd gradient is
    near its expectation sqrt(q / (q + d)), and the update applies exactly -lr times the estimate."""
    import math

    from zohpc.optim import SPSA
    from zohpc.zo.spsa import direction

    model, x, y = _tiny(torch.float64)
    loss = torch.no_grad()(lambda: nn.functional.cross_entropy(model(x), y))
    with torch.enable_grad():
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in grads])
    q, d = 400, g.numel()
    opt = SPSA(model, lr=0.5, mu=1e-6, queries=q, difference="central", seed=3)
    coeffs, _ = opt.coefficients(opt.losses(loss))
    est = torch.cat([sum(c * direction(p, (3, 0), j, i) for j, c in enumerate(coeffs)).reshape(-1)
                     for i, p in enumerate(opt.params)])
    cos = float(est @ g / (est.norm() * g.norm()))
    assert cos > 0.8 * math.sqrt(q / (q + d)), cos
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step(loss)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, before - 0.5 * est, rtol=0, atol=1e-12)


def test_spsa_queries_leave_parameters_bit_identical_and_see_the_perturbed_weights():
    """Each layer reads W + mu z (tied weights alike), stored parameters never change; frozen
    parameters are not perturbed."""
    from zohpc.models.gpt import GPT, GPTConfig
    from zohpc.zo.spsa import direction, perturbed, trainable

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=16, context=8, layers=1, heads=2, width=8))
    model.wpe.weight.requires_grad_(False)  # frozen: read as stored
    tokens = torch.randint(0, 16, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad(), perturbed(model, (1, 2), 3, 1e-2):
        got = model(tokens)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    ref = GPT(GPTConfig(vocab=16, context=8, layers=1, heads=2, width=8))
    ref.load_state_dict(model.state_dict())
    ref.wpe.weight.requires_grad_(False)
    with torch.no_grad():
        for i, p in enumerate(trainable(ref)):
            p.add_(1e-2 * direction(p, (1, 2), 3, i))
        want = ref(tokens)
    assert torch.equal(got, want)
    assert torch.equal(ref.wpe.weight, model.wpe.weight)


def test_spsa_tied_weight_is_drawn_once_per_forward_after_the_first(monkeypatch):
    """GPT reads its embedding again in the output layer: after one pass has seen that, a
    pass draws its noise once (not twice) and computes the same output."""
    from zohpc.models.gpt import GPT, GPTConfig
    from zohpc.zo import spsa

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=16, context=8, layers=1, heads=2, width=8))
    tokens = torch.randint(0, 16, (2, 8))
    drawn = []
    real = spsa.perturbed_value
    monkeypatch.setattr(spsa, "perturbed_value", lambda p, *a: drawn.append(p) or real(p, *a))
    reread, outs, counts = {}, [], []
    for _ in range(2):
        drawn.clear()
        with torch.no_grad(), spsa.perturbed(model, (1, 2), 3, 1e-2, reread):
            outs.append(model(tokens))
        counts.append(sum(p is model.wte.weight for p in drawn))
    assert reread == {id(model.wte.weight): 2}
    assert counts == [2, 1]
    assert torch.equal(outs[0], outs[1])


def test_spsa_closure_with_several_forwards_holds_no_weight():
    """Micro-batches: a closure that calls the model twice reads every weight twice per
    closure but once per forward, so nothing is held across forwards (inference memory)."""
    from zohpc.models.gpt import GPT, GPTConfig
    from zohpc.zo import spsa

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=16, context=8, layers=1, heads=2, width=8))
    tokens = torch.randint(0, 16, (4, 8))
    reread = {}
    for _ in range(2):
        with torch.no_grad(), spsa.perturbed(model, (1, 2), 3, 1e-2, reread):
            model(tokens[:2])
            model(tokens[2:])
    assert reread == {id(model.wte.weight): 2}  # the tied embedding alone, as with one forward


SPSA = TINY[:3] + ["task.d_model=16", "task.ff=32", "task.layers=2", "task.seq_len=8", "task.train_size=64",
                   "task.test_size=32", "data.batch_size=32", "zo.estimator=spsa", "zo.difference=central",
                   "zo.spsa_queries=2", "zo.mu=0.001", "optim.lr=0.01", "optim.momentum=0.9", "zo.spsa_check_every=1"]


def final_params(out):
    from zohpc.checkpoint import list_checkpoints, load_checkpoint

    ck = load_checkpoint(list_checkpoints(str(out))[0])
    return ck.params, ck.optimizer


def assert_same_run(a, b):
    (pa, oa), (pb, ob) = final_params(a), final_params(b)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert oa["param_groups"][0]["spsa_step"] == ob["param_groups"][0]["spsa_step"]


@pytest.fixture(scope="module")
def spsa_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spsa") / "two"
    p = train(2, out, *SPSA, "train.epochs=3")
    assert_clean(p)
    return out


def test_token_transformer_trains_by_spsa_on_two_ranks_bit_identical_to_one(spsa_run, tmp_path):
    evals = records(spsa_run, "eval")
    assert len(evals) == 3 and evals[-1]["test_acc"] is not None
    steps = records(spsa_run, "step")
    assert len(steps) == 6 and all(r["queries"] == 4 for r in steps)
    one = tmp_path / "one"
    assert_clean(train(1, one, *SPSA, "train.epochs=3"))
    assert_same_run(spsa_run, one)  # no parameter broadcast: every rank applied the same update


def test_spsa_resume_is_bit_identical(spsa_run, tmp_path):
    out = tmp_path / "r"
    assert_clean(train(2, out, *SPSA, "train.epochs=3", "train.max_steps=3"))  # same lr schedule, stops at 3
    p = run_ranks(2, ["-m", "zohpc.train", "--out", str(out), "--resume", "auto", *sum(
        (["--set", s] for s in SPSA + ["train.epochs=3"]), [])], timeout=180)
    assert_clean(p)
    assert_same_run(spsa_run, out)


def test_stop_inside_an_spsa_step_exits_75_and_resumes_bit_identical(spsa_run, tmp_path):
    out = tmp_path / "s"
    # rank 1's 6th stop check: before its second query of step 3 (two queries per rank per step)
    p = train(2, out, *SPSA, "train.epochs=3", ZOHPC_TEST_SIGNAL="step:6:1")
    assert_clean(p, 75)
    assert "at step 2" in p.stdout + p.stderr
    p = run_ranks(2, ["-m", "zohpc.train", "--out", str(out), "--resume", "auto", *sum(
        (["--set", s] for s in SPSA + ["train.epochs=3"]), [])], timeout=180)
    assert_clean(p)
    assert_same_run(spsa_run, out)
