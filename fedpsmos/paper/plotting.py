"""What the paper's figures share: the Agg backend, one colour per site, natural order, empty panels, saving.

Every figure is returned as a :class:`matplotlib.figure.Figure` (so tests read its axes, lines and labels)
and written through :func:`save_figure` (:func:`fedpsmos.atomic.atomic_path`), with the Agg backend so it
runs without a display.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

# The other figure modules take ``plt`` from here, so pyplot is never imported before the backend is set.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpsmos.atomic import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | os.PathLike[str], *, pdf: bool = False) -> list[Path]:
    """Save a figure as PNG (and a PDF beside it), atomically, and close it.

    Parameters
    ----------
    fig:
        The figure.
    path:
        ``.png`` target.
    pdf:
        Also write ``.pdf`` with the same stem.
    """
    targets = [Path(path)] + ([Path(path).with_suffix(".pdf")] if pdf else [])
    for target in targets:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=target.suffix[1:])
    plt.close(fig)
    return targets


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders ``site2`` before ``site10``.

    Parameters
    ----------
    text:
        A name with embedded numbers.
    """
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text)))


def site_colours(sites: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One distinct qualitative colour per site (tab10, tab20 beyond ten), the same in every figure.

    Parameters
    ----------
    sites:
        Site names; they are coloured in natural order, so a site keeps its colour whatever subset is drawn.
    """
    ordered = sorted(set(sites), key=natural_key)
    cmap = plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20")
    return {site: cmap(i % cmap.N) for i, site in enumerate(ordered)}


def empty_panel(ax: plt.Axes, text: str) -> None:
    """Mark a panel that has nothing to draw yet.

    Parameters
    ----------
    ax:
        The panel.
    text:
        What it says, e.g. ``no federated curves yet``.
    """
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
