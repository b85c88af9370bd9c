"""A small transformer classifier on token ids (the engine benchmark's transformer).

Embedding plus learned positions, PyTorch ``nn.TransformerEncoderLayer`` blocks
(batch-first, dropout 0: deterministic, as ZO needs), a final LayerNorm, mean pooling over
positions and a linear head. Every op is one the query engine has a rule for.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, num_classes: int, dim: int = 64, heads: int = 4,
                 layers: int = 2, ff: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, dim))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff, dropout=0.0,
                                                                 batch_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.blocks(self.emb(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


__all__ = ["TokenTransformer"]
