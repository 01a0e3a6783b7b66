"""Check every image/label pair of a site, split it, and write its manifest.

The site's ``validate_site`` rule (docs/design.md "The pipeline and the privacy boundary").

A case is accepted when its image and label are readable 3-D scalar images on the same grid (size, spacing,
origin and direction within tolerance), the spacing is positive, the intensities are finite and not
constant, and the label holds only 0 and the values the site's label map names (its organs', background and
ignore values; any value with ``background: rest``). The first bad case stops the
site with a one-line :class:`DataError` naming the file and the problem; no manifest is written then.

The split is per site and deterministic: sorted case ids, a permutation seeded by ``(seed, site)``, the first
``test_cases`` cases (or ``round(test_fraction * n)``; at least one, at most ``n - 1``) to ``test``, the next
``validation_cases`` to ``validation`` (a local validation set for best-model selection, taken from what
would otherwise be training cases, so the test split does not depend on it; reduced, with a warning, so that
at least one training case remains), the rest to ``train``. The manifest format is the one in
``docs/architecture.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedpsmos.data.label_map import LabelMap
from fedpsmos.data.manifest import Manifest
from fedpsmos.data.sources import CaseFiles, DataError, list_cases
from fedpsmos.data.synthetic import site_seed
from fedpsmos.io import ImageError, nifti_header, read_image_pair
from fedpsmos.organs import LabelMapError

__all__ = ["DataError", "SplitSettings", "build_manifest", "split_cases", "validate_case"]

_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _nifti_nonfinite(path: Path, header: Mapping[str, Any]) -> int:
    """Count NaN/inf voxels of a float NIfTI from its raw data.

    SimpleITK 2.5's NIfTI reader returns NaN voxels as 0 (observed), so the check has to bypass it.
    """
    code = _NIFTI_FLOATS.get(header["datatype"])
    if code is None:
        return 0
    dtype = np.dtype(header["endian"] + code)
    remaining = header["n_voxels"]
    bad = 0
    with header["opener"](path, "rb") as handle:
        handle.seek(header["offset"])
        while remaining > 0:  # in chunks: a float CT can be hundreds of MB
            n = min(remaining, 1 << 22)
            chunk = np.frombuffer(handle.read(n * dtype.itemsize), dtype=dtype)
            if chunk.size == 0:
                break
            bad += int(np.count_nonzero(~np.isfinite(chunk)))
            remaining -= chunk.size
    return bad


def _geometry(image: sitk.Image) -> dict[str, list[float] | list[int]]:
    return {
        "sitk_size": [int(s) for s in image.GetSize()],
        "sitk_spacing": [float(s) for s in image.GetSpacing()],
        "sitk_origin": [float(s) for s in image.GetOrigin()],
        "sitk_direction": [float(s) for s in image.GetDirection()],
    }


def validate_case(case: CaseFiles, *, label_values: Iterable[int] | None) -> dict[str, Any]:
    """Check one image/label pair; returns its geometry (``sitk_size``, ``sitk_spacing``, ``sitk_origin``,
    ``sitk_direction``) for the manifest.

    Parameters
    ----------
    case: the case's files; label_values: the values the site's label map names (0 is always allowed),
    ``None`` to allow any value (``background: rest``).
    Raises :class:`DataError` ``"{path}: {problem}"`` for the first problem found.
    """
    try:
        image, label = read_image_pair(case.image, case.label)
    except ImageError as err:
        raise DataError(str(err)) from err

    pixels = sitk.GetArrayViewFromImage(image)
    bad = 0
    if np.issubdtype(pixels.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        header = nifti_header(case.image)
        if header is not None and not bad:
            bad = _nifti_nonfinite(Path(case.image), header)
    if bad:
        raise DataError(f"{case.image}: image has {bad} non-finite (NaN or infinite) intensities")
    if pixels.size == 0 or pixels.min() == pixels.max():
        value = pixels.flat[0] if pixels.size else "none"
        raise DataError(f"{case.image}: image intensity is constant ({value}), not a CT")

    values = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or np.any(values != np.rint(values)):
            raise DataError(f"{case.label}: label holds non-integer values")
    present = {int(v) for v in np.unique(values)}
    if label_values is not None:
        allowed = {0, *(int(v) for v in label_values)}
        unexpected = sorted(present - allowed)
        if unexpected:
            raise DataError(
                f"{case.label}: label values {unexpected} are not in the site's label map "
                f"(allowed {sorted(allowed)}; name the others under the site's background or ignore)"
            )
    info = _geometry(image)
    info["label_values"] = sorted(present)
    return info


@dataclass(frozen=True, kw_only=True)
class SplitSettings:
    """How a site's cases are split (config ``split``, overridden key by key by ``sites.{site}.split``)."""

    test_fraction: float
    test_cases: int | None = None  # a count overrides the fraction (the paper's Table 1 test counts)
    validation_cases: int = 0  # held out of training for best-model selection; 0 = no validation

    @classmethod
    def from_config(
        cls, split: Mapping[str, Any], site_split: Mapping[str, Any] | None = None
    ) -> SplitSettings:
        """Settings from the config's ``split`` section and a site's optional ``split`` override.

        Parameters
        ----------
        split:
            ``{test_fraction, validation_cases?}``.
        site_split:
            ``{test?, test_fraction?, validation_cases?}`` of one site; ``test`` is a number of cases.
        """
        merged = {**split, **(site_split or {})}
        test = merged.get("test")
        return cls(
            test_fraction=float(merged["test_fraction"]),
            test_cases=None if test is None else int(test),
            validation_cases=int(merged.get("validation_cases", 0)),
        )


def split_cases(
    case_ids: Iterable[str], *, split: SplitSettings, seed: int, site: str
) -> dict[str, list[str]]:
    """Deterministic per-site train/validation/test split: sorted ids, a permutation seeded by (seed, site).

    Parameters
    ----------
    case_ids: the site's cases; split: test fraction or count and validation count; seed: experiment seed;
    site: site name (mixed into the seed so sites do not share one permutation).
    With at least two cases train and test get one case or more; a single case goes to ``train`` (warning).
    Validation cases come after the test cases in the permutation, so the test split is the same with or
    without validation; they are reduced (warning) so that at least one training case remains.
    """
    ids = sorted(case_ids)
    if not 0.0 <= split.test_fraction < 1.0:
        raise ValueError(f"site {site}: test_fraction must be in [0, 1), got {split.test_fraction}")
    if split.validation_cases < 0 or (split.test_cases is not None and split.test_cases < 1):
        raise ValueError(f"site {site}: split counts must be >= 0 (test >= 1), got {split}")
    if not ids:
        raise ValueError(f"site {site}: no cases to split")
    if len(ids) == 1:
        warnings.warn(
            f"site {site} has a single case: it goes to train, the test split is empty", stacklevel=2
        )
        return {"train": ids, "validation": [], "test": []}
    wanted = split.test_cases if split.test_cases is not None else round(split.test_fraction * len(ids))
    n_test = min(max(wanted, 1), len(ids) - 1)
    if split.test_cases is not None and n_test != split.test_cases:
        warnings.warn(f"site {site}: {split.test_cases} test cases asked, {n_test} possible", stacklevel=2)
    n_val = min(split.validation_cases, len(ids) - n_test - 1)
    if n_val != split.validation_cases:
        warnings.warn(
            f"site {site}: {split.validation_cases} validation cases asked, {n_val} leave a training case",
            stacklevel=2,
        )
    order = np.random.default_rng([site_seed(seed, site), 0x5B117]).permutation(len(ids))
    test = {ids[i] for i in order[:n_test]}
    validation = {ids[i] for i in order[n_test : n_test + n_val]}
    return {
        "train": [c for c in ids if c not in test and c not in validation],
        "validation": [c for c in ids if c in validation],
        "test": [c for c in ids if c in test],
    }


def build_manifest(
    out: str | os.PathLike[str],
    *,
    site: str,
    source: str,
    root: str | os.PathLike[str],
    labels: Mapping[str, Iterable[int | str]],
    split: SplitSettings,
    seed: int,
    background: Iterable[int | str] | str | None = None,
    ignore: Iterable[int | str] | None = None,
    files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate every case of a site, split it and write ``manifest.json`` atomically
    (:class:`fedpsmos.data.manifest.Manifest`); returns the manifest's JSON data.

    Parameters
    ----------
    out: manifest path; site: site name; source: ``synthetic``/``nnunet``/``msd``/``files``; root: the
    site's raw folder; labels: the site's label map ``{organ: [values]}``; split: test and validation counts;
    seed: experiment seed of the split; background, ignore: the site's background values (or ``"rest"``) and
    ignored values; files: the site's ``{images, labels}`` path templates (``files`` source only,
    :mod:`fedpsmos.data.templates`). Values may be names of ``{root}/dataset.json`` labels
    (:meth:`fedpsmos.data.label_map.LabelMap.from_config`); the manifest records the resolved numbers.
    Stops at the first bad case with :class:`DataError`; nothing is written then.
    """
    try:
        label_map = LabelMap.from_config(labels, background, ignore, dataset_json=Path(root) / "dataset.json")
    except LabelMapError as err:
        raise DataError(f"site {site}: {err}") from err
    label_values = label_map.allowed_values()
    cases = list_cases(source, root, site=site, files=files)
    infos = {c.case: validate_case(c, label_values=label_values) for c in cases}
    parts = split_cases(infos, split=split, seed=seed, site=site)
    which = {c: name for name in ("train", "validation", "test") for c in parts[name]}
    manifest = {
        "site": site,
        "source": source,
        "root": str(root),
        **label_map.to_manifest(),
        "organs": list(label_map.organs),
        "cases": [
            {
                "case": c.case,
                "image": str(c.image),
                "label": str(c.label),
                "split": which[c.case],
                **infos[c.case],
            }
            for c in cases
        ],
        "train": parts["train"],
        "validation": parts["validation"],
        "test": parts["test"],
    }
    Manifest(manifest, out).write()
    return manifest
