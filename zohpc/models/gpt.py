"""A GPT-2-shaped decoder in plain PyTorch (for the memory and SPSA benchmarks): token and
position embeddings, pre-norm blocks (causal ``scaled_dot_product_attention``, GELU MLP),
a final LayerNorm and an output layer tied to the token embedding. ``GPTConfig()`` is
GPT-2 small: 124,439,808 parameters. No dropout (zeroth-order queries need a fixed forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab: int = 50257
    context: int = 1024
    layers: int = 12
    heads: int = 12
    width: int = 768


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv, self.proj = nn.Linear(c.width, 3 * c.width), nn.Linear(c.width, c.width)
        self.fc, self.out = nn.Linear(c.width, 4 * c.width), nn.Linear(4 * c.width, c.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, W = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, W)
        h = h + self.proj(a)
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    """``forward(tokens (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, c: GPTConfig = GPTConfig()):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.width), nn.Embedding(c.context, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.wte.weight)  # tied output layer


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: ``targets`` (B, T) are the next tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
