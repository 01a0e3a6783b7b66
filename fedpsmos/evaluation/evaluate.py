"""Per-case, per-organ Dice and HD95 of a model on a site's test split (paper Section 3).

The reference is the site's raw label file (original geometry) mapped to the global classes with the site's
resolved label map from its manifest, so metrics are computed in the original spacing. Reference voxels of
unknown class (the site's ``ignore`` values) are left out of Dice and HD95. Only the organs the site labels
are scored: the other organs are present in its images but unlabelled, so its reference cannot judge them
(a site-alone model outputs exactly its site's organs). Empty masks
follow :mod:`fedpsmos.evaluation.metrics`: a missed organ (reference present, prediction empty) or a
spurious one (reference empty, prediction present) gets Dice 0 and the HD95 penalty, the diagonal of the
reference image in mm, and is flagged in the ``missed`` / ``spurious`` columns so tables can count it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk

from fedpsmos.atomic import atomic_path
from fedpsmos.data.label_map import LabelMap, apply_label_map_image, as_label_map
from fedpsmos.data.manifest import Manifest
from fedpsmos.evaluation.metrics import DEFAULT_HD95, check_convention, dice, hd95, image_diagonal
from fedpsmos.io import read_image
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS

COLUMNS = ("model", "site", "case", "organ", "dice", "hd95")
# Written after COLUMNS: whether the case was a missed or spurious organ (HD95 is then the penalty) and the
# HD95 convention, so a table built from the CSV can count misses and state the convention it averages.
FLAG_COLUMNS = ("missed", "spurious", "hd95_convention")


class OrganScore(NamedTuple):
    """Scores of one organ in one case (:func:`evaluate_case`)."""

    organ: str
    dice: float
    hd95: float
    missed: bool
    spurious: bool


def manifest_label_map(manifest_path: str | os.PathLike[str]) -> LabelMap:
    """The resolved label map a site's manifest records (``labels``, ``background``, ``ignore``).

    Parameters
    ----------
    manifest_path:
        ``results/data/{site}/manifest.json``.
    """
    return Manifest.load(manifest_path).label_map


def reference_labels(manifest_path: str | os.PathLike[str]) -> dict[str, Path]:
    """Test case id -> raw reference label file, from a site's manifest.

    Parameters
    ----------
    manifest_path:
        ``results/data/{site}/manifest.json`` (docs/architecture.md, "Manifest"); label paths resolved by
        :meth:`fedpsmos.data.manifest.CaseRecord.label`.
    """
    manifest = Manifest.load(manifest_path)
    if not manifest.test:
        raise ValueError(f"{manifest_path}: the manifest's test split is empty")
    return {record.case: record.label for record in manifest.records(manifest.test)}


def _check_geometry(pred: sitk.Image, ref: sitk.Image, pred_path: Path) -> None:
    """Prediction and reference must share the original grid (size exactly, spacing/origin to 1e-4 mm)."""
    if pred.GetSize() != ref.GetSize():
        raise ValueError(f"{pred_path}: size {pred.GetSize()} differs from the reference {ref.GetSize()}")
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        a, b = getattr(pred, name)(), getattr(ref, name)()
        if not np.allclose(a, b, atol=1e-4):
            raise ValueError(f"{pred_path}: {name[3:].lower()} {a} differs from the reference {b}")


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    organs: Sequence[str],
    spacing_zyx: Sequence[float],
    *,
    convention: str = DEFAULT_HD95,
) -> list[OrganScore]:
    """Dice, HD95 and the missed/spurious flags of each organ on global-class label maps of one case.

    A missed or spurious organ's HD95 is the diagonal of this (the reference) image in mm. Voxels where the
    reference is IGNORE_CLASS are left out of both masks before scoring.

    Parameters
    ----------
    pred, ref:
        Global-class label maps ``[Z, Y, X]`` on the same grid (the reference image's).
    organs:
        Organs to score.
    spacing_zyx:
        Voxel spacing (z, y, x) in mm.
    convention:
        HD95 convention, ``max`` or ``pooled`` (:mod:`fedpsmos.evaluation.metrics`).
    """
    penalty = image_diagonal(ref.shape, spacing_zyx)
    ignored = ref == IGNORE_CLASS
    rows = []
    for organ in organs:
        value = CLASS_INDEX[organ]
        p, r = (pred == value) & ~ignored, ref == value
        p_any, r_any = bool(p.any()), bool(r.any())
        rows.append(
            OrganScore(
                organ,
                dice(p, r),
                hd95(p, r, spacing_zyx, convention=convention, penalty=penalty),
                missed=r_any and not p_any,
                spurious=p_any and not r_any,
            )
        )
    return rows


def evaluate_site(
    *,
    predictions_dir: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    labels: LabelMap | Mapping[str, Sequence[int]] | None = None,
    model: str,
    site: str,
    out_csv: str | os.PathLike[str],
    hd95_convention: str = DEFAULT_HD95,
) -> pd.DataFrame:
    """Score a model's predictions of a site's test cases; write a tidy CSV and return it.

    Parameters
    ----------
    predictions_dir:
        ``{case}.nii.gz`` in global classes and original geometry
        (:func:`fedpsmos.inference.predict.predict_site`).
    manifest_path:
        The site's manifest (test split and raw label paths).
    labels:
        The site's label map; ``None`` (the workflow): the resolved map the manifest records, with its
        background and ignore values.
    model, site:
        Values of the ``model`` (model id, e.g. ``adapted/decoder``) and ``site`` columns.
    out_csv:
        Output CSV, written atomically, with columns ``model, site, case, organ, dice, hd95`` (HD95 in mm,
        the penalty for a missed or spurious organ, NaN when the organ is absent from both), ``missed``
        (reference present, prediction empty), ``spurious`` (reference empty, prediction present) and
        ``hd95_convention``.
    hd95_convention:
        ``max`` or ``pooled`` (config ``evaluation.hd95``; :mod:`fedpsmos.evaluation.metrics`).
    """
    check_convention(hd95_convention)
    label_map = manifest_label_map(manifest_path) if labels is None else as_label_map(labels)
    organs = label_map.organs
    if not organs:
        raise ValueError(f"{manifest_path}: site {site} labels no organ to score model {model} on")
    rows = []
    for case, label_path in reference_labels(manifest_path).items():
        pred_path = Path(predictions_dir) / f"{case}.nii.gz"
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path}: prediction of test case {case} not found")
        ref_image = read_image(label_path, "reference label")
        pred_image = read_image(pred_path, "prediction")
        _check_geometry(pred_image, ref_image, pred_path)
        ref = apply_label_map_image(ref_image, label_map)
        pred = sitk.GetArrayFromImage(pred_image)
        spacing_zyx = ref_image.GetSpacing()[::-1]
        for score in evaluate_case(pred, ref, organs, spacing_zyx, convention=hd95_convention):
            rows.append((model, site, case, *score, hd95_convention))
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *FLAG_COLUMNS])
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame
