"""Zeroth-order optimizers with the ``torch.optim`` API: LIZO (ReLIZO) and the ZO-SGD family."""

from .lizo import LIZO
from .spsa import SPSA
from .zosgd import RGE, ZOSGD, ZOSignSGD, estimate_grad_rge

__all__ = ["LIZO", "SPSA", "RGE", "ZOSGD", "ZOSignSGD", "estimate_grad_rge"]
