"""A DARTS-style cell search space in miniature (for the ``nas`` study), sized for 8x8 digits.

One cell on a convolutional stem: node 0 is the stem's output, nodes ``1..NODES`` each sum
one edge from every earlier node, and the cell's output is the concatenation of nodes
``1..NODES``, pooled and classified. Each edge is a *mixed op* in the search network: the
softmax of its architecture weights ``alpha[e]`` mixes every candidate op's output,

    mixed_e(x) = sum_k softmax(alpha[e])_k * op_k(x),

so the validation loss is a smooth function of ``alpha`` (``EDGES x len(OPS)`` values) that
a gradient method (DARTS) or a zeroth-order one can minimize. The *genotype* is the op of
largest weight on each edge; the *discrete* network built from it has one op per edge and
is retrained from scratch. The search network can also run one genotype on its shared
weights (:meth:`SearchNet.forward` with ``genotype=``), which random search with weight
sharing uses.
"""

from __future__ import annotations

import torch
from torch import nn

OPS = ("skip", "max_pool3x3", "avg_pool3x3", "conv1x1", "conv3x3", "dil_conv3x3")
NODES = 3  # intermediate nodes of the cell
EDGES = NODES * (NODES + 1) // 2  # node j (1-based) has j incoming edges: 1 + 2 + 3


def edge_list() -> list[tuple[int, int]]:
    """``(source, target)`` node pairs in edge order (the rows of ``alpha``)."""
    return [(i, j) for j in range(1, NODES + 1) for i in range(j)]


def _box3(p: torch.Tensor, combine) -> torch.Tensor:
    """``combine`` over every 3x3 window of the padded ``p`` (stride 1), done as rows then columns."""
    h, w = p.shape[2] - 2, p.shape[3] - 2
    rows = combine(combine(p[:, :, :, 0:w], p[:, :, :, 1:w + 1]), p[:, :, :, 2:w + 2])
    return combine(combine(rows[:, :, 0:h], rows[:, :, 1:h + 1]), rows[:, :, 2:h + 2])


class MaxPool3(nn.Module):
    """3x3 max pooling, stride 1, padding 1: as ``nn.MaxPool2d(3, 1, 1)`` but separable
    (torch's pooling kernels cost 10x more on 8x8 maps with few channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _box3(nn.functional.pad(x, (1, 1, 1, 1), value=float("-inf")), torch.maximum)


class AvgPool3(nn.Module):
    """3x3 average pooling, stride 1, padding 1, padding not counted: as
    ``nn.AvgPool2d(3, 1, 1, count_include_pad=False)``, separable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = _box3(nn.functional.pad(x, (1, 1, 1, 1)), torch.add)
        ones = nn.functional.pad(torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device), (1, 1, 1, 1))
        return total / _box3(ones, torch.add)


def make_op(name: str, channels: int, affine: bool) -> nn.Module:
    """One candidate op, shape-preserving (channels, 8x8). Convs are ReLU-conv-BN as in DARTS;
    the search network's BNs have no affine parameters and always use batch statistics
    (``affine=False``), so a query's loss depends on the weights and ``alpha`` only."""
    def bn():
        return nn.BatchNorm2d(channels, affine=affine, track_running_stats=affine)

    if name == "skip":
        return nn.Identity()
    if name == "max_pool3x3":
        return MaxPool3()
    if name == "avg_pool3x3":
        return AvgPool3()
    if name == "conv1x1":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False), bn())
    if name == "conv3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), bn())
    if name == "dil_conv3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False), bn())
    raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")


def mix(weights: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The mixed op: ``sum_k weights[k] * outputs[k]``."""
    return sum(w * out for w, out in zip(weights, outputs))


def genotype(alpha: torch.Tensor) -> list[int]:
    """The op index of largest architecture weight on each edge (ties: the first)."""
    return [int(i) for i in torch.as_tensor(alpha).detach().argmax(dim=1)]


def genotype_names(geno: list[int]) -> list[str]:
    """``"src->dst:op"`` per edge, for the JSON and the table."""
    return [f"{i}->{j}:{OPS[k]}" for (i, j), k in zip(edge_list(), geno)]


def check_genotype(geno) -> list[int]:
    geno = [int(k) for k in geno]
    if len(geno) != EDGES or not all(0 <= k < len(OPS) for k in geno):
        raise ValueError(f"a genotype is {EDGES} op indices in [0, {len(OPS)}), got {geno}")
    return geno


class _Body(nn.Module):
    """Stem, cell edges (a list of candidate ops per edge) and classifier head."""

    def __init__(self, channels: int, num_classes: int, in_channels: int, ops_per_edge, affine: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels, affine=affine, track_running_stats=affine))
        self.edges = nn.ModuleList(nn.ModuleList(make_op(name, channels, affine) for name in names)
                                   for names in ops_per_edge)
        self.head = nn.Linear(NODES * channels, num_classes)

    def run_cell(self, x: torch.Tensor, edge_fn) -> torch.Tensor:
        nodes = [self.stem(x)]
        e = 0
        for j in range(1, NODES + 1):
            total = 0
            for i in range(j):
                total = total + edge_fn(e, nodes[i])
                e += 1
            nodes.append(total)
        out = torch.cat(nodes[1:], dim=1)
        return self.head(out.mean(dim=(2, 3)))


class SearchNet(_Body):
    """The supernet: every edge holds every op of :data:`OPS`; ``alpha`` is passed in, so
    the network weights and the architecture weights are separate parameter sets."""

    def __init__(self, channels: int = 8, num_classes: int = 10, in_channels: int = 1):
        super().__init__(channels, num_classes, in_channels, [OPS] * EDGES, affine=False)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None, genotype: list[int] | None = None):
        """With ``alpha`` (``EDGES x len(OPS)``): the mixed network. With ``genotype``: the
        one-op-per-edge network on the shared weights (only the chosen ops run)."""
        if (alpha is None) == (genotype is None):
            raise ValueError("SearchNet: pass exactly one of alpha, genotype")
        if genotype is not None:
            geno = check_genotype(genotype)
            return self.run_cell(x, lambda e, h: self.edges[e][geno[e]](h))
        weights = torch.softmax(alpha.to(x.dtype), dim=1)
        return self.run_cell(x, lambda e, h: mix(weights[e], [op(h) for op in self.edges[e]]))


class DiscreteNet(_Body):
    """A genotype's network, built from scratch for retraining (affine BN with running statistics)."""

    def __init__(self, geno: list[int], channels: int = 16, num_classes: int = 10, in_channels: int = 1):
        geno = check_genotype(geno)
        super().__init__(channels, num_classes, in_channels, [[OPS[k]] for k in geno], affine=True)
        self.genotype = geno

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_cell(x, lambda e, h: self.edges[e][0](h))


__all__ = ["OPS", "NODES", "EDGES", "edge_list", "make_op", "mix", "genotype", "genotype_names", "SearchNet",
           "DiscreteNet", "check_genotype", "MaxPool3", "AvgPool3"]
