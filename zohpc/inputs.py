"""Model inputs as every phase passes them: on the parameters' device, floating-point inputs
in the parameters' dtype, integer inputs (token ids) unchanged in dtype (one rule, one place)."""

from __future__ import annotations

import torch


def model_input(x, like: torch.Tensor) -> torch.Tensor:
    """``x`` on ``like``'s device; cast to ``like``'s dtype only if ``x`` is floating point."""
    x = torch.as_tensor(x).to(like.device)
    return x.to(like.dtype) if x.is_floating_point() else x
