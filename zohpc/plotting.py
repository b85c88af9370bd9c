"""matplotlib for zohpc's figures (``analyze --plot``, the reproduce studies): loaded on
demand with a headless backend, and figures written atomically."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

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


@contextmanager
def figure(path: str, panels: int = 1, size: tuple = (6.4, 4.2)):
    """``with figure(path, 2, (11, 4)) as (fig, (ax0, ax1)):`` panels side by side; on a
    normal exit the figure is written atomically to ``path``; it is closed either way."""
    plt = pyplot()
    fig, axes = plt.subplots(1, panels, figsize=size)
    try:
        yield fig, axes
        save_figure(fig, path)
    finally:
        plt.close(fig)
