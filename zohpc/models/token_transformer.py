"""A small transformer classifier on token ids (the engine benchmark's transformer).

Embedding plus learned positions, post-norm encoder blocks (the arithmetic of PyTorch's
``nn.TransformerEncoderLayer`` with ReLU and no dropout, written out op by op), a final
LayerNorm, mean pooling over positions and a linear head.

Why written out: the query engine re-runs only what lies downstream of a perturbed
parameter, op by op. ``nn.TransformerEncoderLayer`` is one opaque module to torch.fx, so a
perturbed weight inside it re-runs the whole layer per copy; here every projection is its
own ``nn.Linear`` and a query starts at the perturbed one (an FFN weight of the last block
re-runs only that block's tail and the head). Every op is one the engine has a rule for.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EncoderBlock(nn.Module):
    """Post-norm self-attention and feed-forward block on (B, T, dim); the batch stays in dim 0."""

    def __init__(self, length: int, dim: int, heads: int, ff: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.length, self.dim, self.heads = length, dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff)
        self.fc2 = nn.Linear(ff, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T, D, H = self.length, self.dim, self.heads
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = q.reshape(-1, T, H, D // H).transpose(1, 2)
        k = k.reshape(-1, T, H, D // H).transpose(1, 2)
        v = v.reshape(-1, T, H, D // H).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, T, D)
        h = self.norm1(h + self.proj(a))
        return self.norm2(h + self.fc2(F.relu(self.fc1(h))))


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, num_classes: int, dim: int = 64, heads: int = 4,
                 layers: int = 2, ff: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(length, dim, heads, ff) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.blocks(self.emb(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


__all__ = ["EncoderBlock", "TokenTransformer"]
