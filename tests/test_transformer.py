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
