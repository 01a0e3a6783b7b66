"""Synthetic sites for the five-site default: nnU-Net v2 raw folders of phantom abdomens (docs/design.md,
"Organs and label maps").

The paper's five data sets (its Table 1) cannot ship with the workflow, so the CPU default generates one
nnU-Net v2 raw folder per site instead, each case drawn by :func:`fedpsmos.data.phantom.make_case`.

Sites differ as the paper's do: spacing, noise, organ-vs-fat contrast, an intensity offset, the field of
view, and above all which organs the label file annotates (the partial label maps). Organs a site does not
annotate are still in its images, and are 0 in its labels. Sites also store their voxels in different
orders, as real data sets do: the optional ``orientation`` of a site's spec (a DICOM code, default ``"LPS"``;
``"RAS"`` flips x and y as many NIfTI writers do, ``"SPL"``/``"IPL"`` put the slice axis first as KiTS19
does) is applied to the LPS-painted image and label with SimpleITK's ``DICOMOrient`` when they are written,
so the physical content, and which kidney is the left one, is the same whatever the orientation.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedpsmos.atomic import atomic_directory
from fedpsmos.data.phantom import make_case
from fedpsmos.organs import CLASS_INDEX, ORGANS, SPLIT_KIDNEY
from fedpsmos.preprocessing.orientation import CANONICAL, check_orientation_code, reorient


def site_seed(seed: int, site: str) -> int:
    """A stable integer mixing a site's name into a seed (Python's ``hash`` is salted per process).

    Parameters
    ----------
    seed: the experiment seed; site: the site name.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(site.encode("utf-8"))) % (2**63)


def default_case_ids(site: str, spec: Mapping[str, Any]) -> list[str]:
    """Case ids ``{site}_{i:03d}`` of a synthetic site, known before its folder exists (Snakemake DAG).

    Parameters
    ----------
    site: the site name; spec: the site's ``synthetic`` config (uses ``cases``).
    """
    n = int(spec["cases"])
    if n < 1:
        raise ValueError(f"site {site}: synthetic.cases must be >= 1, got {n}")
    return [f"{site}_{i:03d}" for i in range(n)]


def site_label_values(labels: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The value each global organ gets in a synthetic site's label file: the first value of its entry.

    Parameters
    ----------
    labels: the site's label map ``{organ: [values]}``; ``kidney`` gives one value to both kidneys.
    """
    values: dict[str, int] = {}
    for organ, vals in labels.items():
        vals = list(vals)
        if not vals:
            raise ValueError(f"label map entry {organ!r} has no value")
        if organ == SPLIT_KIDNEY:
            values["kidney_left"] = values["kidney_right"] = int(vals[0])
        elif organ in ORGANS:
            values[organ] = int(vals[0])
        else:
            raise ValueError(f"unknown organ {organ!r} in label map (known: {', '.join(ORGANS)}, kidney)")
        if not 0 < int(vals[0]) < 256:
            raise ValueError(f"label value {vals[0]} of {organ!r} must be in 1..255 (uint8 label files)")
    return values


def site_label_array(global_label: np.ndarray, label_values: Mapping[str, int]) -> np.ndarray:
    """Map a global label onto a site's partial label file: annotated organs get the site's value, others 0.

    Parameters
    ----------
    global_label: uint8 global classes; label_values: ``{organ: site value}`` from :func:`site_label_values`.
    """
    lut = np.zeros(256, dtype=np.uint8)
    for organ, value in label_values.items():
        lut[CLASS_INDEX[organ]] = value
    return lut[global_label]


def _write_image(
    array: np.ndarray, path: Path, spacing_zyx: Sequence[float], orientation: str = CANONICAL
) -> None:
    """Write an LPS-painted ``[Z, Y, X]`` array with its axes permuted/flipped to ``orientation``."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(list(spacing_zyx))])
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection(tuple(np.eye(3).ravel()))
    if orientation != CANONICAL:
        image = reorient(image, orientation)
    sitk.WriteImage(image, str(path), useCompression=True)


def _dataset_json(site: str, labels: Mapping[str, Sequence[int]], n: int) -> dict[str, Any]:
    names: dict[str, int] = {"background": 0}
    for organ, vals in labels.items():
        names[organ] = int(list(vals)[0])
    return {
        "name": f"fedpsmos synthetic {site}",
        "channel_names": {"0": "CT"},
        "labels": names,
        "numTraining": n,
        "file_ending": ".nii.gz",
    }


def write_site(
    out_dir: str | os.PathLike[str],
    *,
    site: str,
    spec: Mapping[str, Any],
    labels: Mapping[str, Iterable[int]],
    seed: int,
) -> list[str]:
    """Write one synthetic site as an nnU-Net v2 raw folder; returns its case ids.

    Parameters
    ----------
    out_dir: the folder to create (``imagesTr``, ``labelsTr``, ``dataset.json``); it must not hold files.
    site: site name (case ids are ``{site}_{i:03d}``); spec: the site's ``synthetic`` config with ``cases``,
    ``spacing`` (z, y, x mm), ``noise``, ``contrast``, ``offset``, ``fov`` and optionally ``orientation``
    (the DICOM orientation code the files are stored in, default ``"LPS"``); labels: the site's label map
    ``{organ: [values]}`` (the first value is written; ``kidney`` is one value for both kidneys);
    seed: experiment seed; cases are deterministic in ``(seed, site, case index)``.
    The folder is built beside ``out_dir`` and renamed onto it, so it appears whole or not at all.
    """
    out = Path(out_dir)
    label_map = {organ: [int(v) for v in vals] for organ, vals in labels.items()}
    values = site_label_values(label_map)
    cases = default_case_ids(site, spec)
    spacing = [float(s) for s in spec["spacing"]]
    if len(spacing) != 3:
        raise ValueError(f"site {site}: synthetic.spacing must be (z, y, x), got {spacing}")
    try:
        orientation = check_orientation_code(str(spec.get("orientation", CANONICAL)))
    except ValueError as err:
        raise ValueError(f"site {site}: synthetic.{err}") from err
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: refusing to write a synthetic site over an existing non-empty path")
    with atomic_directory(
        out
    ) as tmp:  # an existing (empty) folder, e.g. made by a workflow manager, is replaced
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        base = site_seed(seed, site)
        for i, case in enumerate(cases):
            rng = np.random.default_rng([base, i])
            hu, global_label = make_case(
                spacing=spacing,
                fov=float(spec["fov"]),
                noise=float(spec["noise"]),
                contrast=float(spec["contrast"]),
                offset=float(spec["offset"]),
                rng=rng,
            )
            _write_image(hu, tmp / "imagesTr" / f"{case}_0000.nii.gz", spacing, orientation)
            _write_image(
                site_label_array(global_label, values),
                tmp / "labelsTr" / f"{case}.nii.gz",
                spacing,
                orientation,
            )
        (tmp / "dataset.json").write_text(
            json.dumps(_dataset_json(site, label_map, len(cases)), indent=2) + "\n"
        )
    return cases
