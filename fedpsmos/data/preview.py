"""A quick-look PNG of a site: axial slices with its partial labels overlaid (for the Snakemake report).

Slices are shown in the radiological convention (patient's right on the image's left, anterior up) after
reorienting each image to LPS, so a site whose kidney labels are swapped, or whose label grid is flipped
against its image, is visible at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedpsmos.atomic import atomic_path
from fedpsmos.data.manifest import Manifest
from fedpsmos.data.sources import DataError
from fedpsmos.io import read_image

ORGAN_COLOURS = {
    "liver": "#d62728",
    "spleen": "#2ca02c",
    "pancreas": "#1f77b4",
    "kidney_left": "#ffbf00",
    "kidney_right": "#e377c2",
    "kidney": "#ff7f0e",
}
WINDOW_HU = (-200.0, 300.0)  # abdominal soft-tissue window


def _read_lps(path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...]]:
    # rows anterior -> posterior, columns right -> left
    image = sitk.DICOMOrient(read_image(path, what), "LPS")
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def _slices(label: np.ndarray, n: int) -> list[int]:
    """Axial slices through the labelled organs: the median labelled slice (their centre) and quantiles
    of their z range around it; evenly spaced slices when the label is empty."""
    z = np.nonzero(label)[0]
    quantiles = [0.5] if n == 1 else np.linspace(0.2, 0.8, n)
    if z.size == 0:
        return sorted({int(q * (label.shape[0] - 1)) for q in quantiles})
    return sorted({int(np.quantile(z, q)) for q in quantiles})


def plot_site(
    manifest_path: str | os.PathLike[str], out_png: str | os.PathLike[str], *, n_cases: int = 3
) -> None:
    """Write one PNG with a row of axial slices per case (first ``n_cases`` of the manifest), labels overlaid.

    Parameters
    ----------
    manifest_path: the site's ``manifest.json``; out_png: the PNG to write (atomically);
    n_cases: how many cases to show (rows).
    """
    manifest = Manifest.load(manifest_path)
    cases = manifest.cases[: max(1, n_cases)]
    if not cases:
        raise DataError(f"{manifest_path}: manifest lists no cases")
    labels = manifest.label_map.labels
    # One colour per label value, from the organ it stands for.
    value_organ = {int(v): organ for organ, vals in labels.items() for v in vals}
    max_value = max(value_organ, default=1)
    colours = [(0, 0, 0, 0)] + [
        to_rgba(ORGAN_COLOURS.get(value_organ.get(v, ""), "#7f7f7f"), 0.45) for v in range(1, max_value + 1)
    ]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-0.5, max_value + 1.0), cmap.N)  # one colour per integer label value
    per_row = 3
    # A bare Figure on the Agg canvas: headless (cluster nodes) and no global pyplot state.
    fig = Figure(figsize=(3.2 * per_row, 3.0 * len(cases)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cases), per_row, squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        image, spacing = _read_lps(case.image, "image")
        label, _ = _read_lps(case.label, "label")
        for ax, z in zip(row, _slices(label, per_row), strict=False):
            ax.imshow(
                image[z], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=spacing[1] / spacing[0]
            )
            overlay = np.ma.masked_equal(label[z].astype(int), 0)
            ax.imshow(
                overlay,
                cmap=cmap,
                norm=norm,
                interpolation="nearest",
                aspect=spacing[1] / spacing[0],
            )
            ax.set_title(f"{case.case} ({case.split or '?'}) z={z}", fontsize=8)
        for ax in row:
            ax.axis("off")
    handles = [
        Patch(color=ORGAN_COLOURS.get(organ, "#7f7f7f"), label=f"{organ} ({', '.join(map(str, vals))})")
        for organ, vals in labels.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    organs = ", ".join(manifest.organs)
    fig.suptitle(f"{manifest.site}: {organs} (R | L, anterior up)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
