"""A transformer classifier on token ids, written as a plug-in (no ``loss``: cross entropy,
and accuracy in the evaluation records).

Shipped as ``zohpc.tasks.tokens:classifier``; the README's "Training a transformer" uses it:

    mpirun -n 2 python -m zohpc.train --set task.name=zohpc.tasks.tokens:classifier \\
        --set zo.estimator=spsa --set prune.method=none --out runs/tokens

The model is ``nn.Embedding`` + PyTorch's ``nn.TransformerEncoder`` (``dropout=0.0``: its
Dropout modules stay in the model and are accepted at p = 0) + a linear head on the mean
over positions. The data are random sequences; the label says which of two marker tokens
occurs more often (learnable by counting, so a few hundred steps show progress).
"""

from __future__ import annotations

import torch
from torch import nn

from ..seeding import generator
from .base import Task, task_options

OPTIONS = {"vocab": 32, "seq_len": 16, "d_model": 32, "heads": 2, "layers": 1, "ff": 64,
           "train_size": 512, "test_size": 256}


class TokenClassifier(nn.Module):
    """Embedding + positional embedding + encoder layers + mean pooling + linear head."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int, ff: int, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        return self.head(self.enc(h).mean(1))


def make_data(n: int, vocab: int, seq_len: int, seed: int, split: str):
    """Random token sequences; label 1 when token 1 occurs more often than token 2."""
    g = generator("tasks.tokens." + split, seed)
    x = torch.randint(0, vocab, (n, seq_len), generator=g)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    return x, y


def classifier(cfg) -> Task:
    """The factory: ``task.name = "zohpc.tasks.tokens:classifier"``; options in ``[task]``."""
    o = task_options(cfg, OPTIONS, "tokens")
    seed = cfg.train.seed
    model = TokenClassifier(o["vocab"], o["seq_len"], o["d_model"], o["heads"], o["layers"], o["ff"])
    return Task(model=model, name="tokens",
                train=make_data(o["train_size"], o["vocab"], o["seq_len"], seed, "train"),
                test=make_data(o["test_size"], o["vocab"], o["seq_len"], seed, "test"),
                info={"vocab": o["vocab"], "seq_len": o["seq_len"]})
