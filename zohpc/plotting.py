"""matplotlib for zohpc's figures (``analyze --plot``, the reproduce studies): loaded on
demand with a headless backend, and figures written atomically."""

from __future__ import annotations

import os
import tempfile

from .errors import UserError

PLOT_HINT = "plotting needs matplotlib: pip install matplotlib (or pip install 'zohpc[plot]')"


class PlotUnavailable(UserError):
    """matplotlib is missing."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or PlotUnavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(PLOT_HINT) from None
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Write a figure atomically (a temporary name in the same directory, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
