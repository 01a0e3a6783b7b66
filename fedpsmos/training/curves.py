"""Training curves: one row per epoch (epoch, loss, lr, seconds) as CSV and as a PNG plot.

docs/architecture.md "Models": each model is written next to ``curve.csv`` and ``curve.png``. A run that
scored its model on validation cases (best-epoch selection, :mod:`fedpsmos.training.epochs`) has one more
column, ``validation_dice``, empty in the epochs that were not scored.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpsmos.atomic import atomic_path, write_text

CURVE_COLUMNS = ("epoch", "loss", "lr", "seconds")
VALIDATION_COLUMN = "validation_dice"


def write_curve_csv(path: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Write the per-epoch history as CSV with columns epoch, loss, lr, seconds (and validation_dice).

    Parameters
    ----------
    path:
        the CSV file.
    history:
        one mapping per epoch with at least the four columns; a ``validation_dice`` that is not ``None`` in
        some row adds that column (empty where ``None``).
    """
    scored = any(row.get(VALIDATION_COLUMN) is not None for row in history)
    columns = [*CURVE_COLUMNS, VALIDATION_COLUMN] if scored else list(CURVE_COLUMNS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        missing = [c for c in CURVE_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{path}: history row {dict(row)} lacks {', '.join(missing)}")
        values = {c: row[c] for c in CURVE_COLUMNS}
        if scored:
            score = row.get(VALIDATION_COLUMN)
            values[VALIDATION_COLUMN] = "" if score is None else score
        writer.writerow(values)
    write_text(path, buffer.getvalue())


def plot_curve(path: str | Path, history: Sequence[Mapping[str, Any]], *, title: str = "") -> None:
    """Plot training loss (left axis) and learning rate (right axis, log scale) per epoch as a PNG.

    Parameters
    ----------
    path:
        the PNG file.
    history:
        one mapping per epoch with epoch, loss and lr.
    title:
        figure title (e.g. the model id).
    """
    # The object-oriented API without pyplot: no global figure state, safe in worker processes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(
        epochs, [float(r["loss"]) for r in history], color="tab:blue", marker="." if len(epochs) < 50 else ""
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [float(r["lr"]) for r in history], color="tab:orange", linestyle="--")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    if epochs and min(float(r["lr"]) for r in history) > 0:
        lr_ax.set_yscale("log")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
