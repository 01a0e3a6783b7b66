"""Apply a site's partial label map to its label image (docs/design.md "Organs and label maps").

A site maps its own label values onto the global classes of :mod:`fedpsmos.organs` (0 background, 1 liver,
2 spleen, 3 pancreas, 4 kidney_left, 5 kidney_right); several values may map to one organ (MSD liver: 1 liver
and 2 tumour are both liver). Value 0 is background; any other value not in the map is an error, because
silently treating an unknown structure as background would teach the network that it is background.

The key ``kidney`` stands for one label covering both kidneys. Its voxels are split by the side of the body
in physical LPS coordinates, where +x points to the patient's left: a voxel with ``x > midline`` is
``kidney_left``, the others ``kidney_right``. Physical x comes from each voxel's index through the image
geometry (``origin + direction @ (spacing * index)``), so flipped or rotated direction matrices are handled.

The midline, unless given, is the mean of the x-centroids of the two largest connected components of the
kidney mask (26-connectivity), each component counted once so that kidneys of unequal size do not pull it
sideways; the two kidneys lie about symmetrically either side of the spine. When the mask has a single
component (one kidney, or a fused horseshoe kidney) the midline falls back to the x-centre of the image's
physical field of view, since CT is reconstructed centred on the patient; pass ``midline_x`` to override.

Besides its organs a site may name two more groups of values (:class:`LabelMap`): ``background``, structures
outside the task (BTCV's gallbladder or aorta), mapped to 0, or ``"rest"``, every value not otherwise named;
and ``ignore``, voxels whose class is unknown, mapped to :data:`fedpsmos.organs.IGNORE_CLASS` (255) so that
losses and metrics leave them out. In the configuration any value may be a name from the site's nnU-Net
``dataset.json`` instead of a number; :meth:`LabelMap.from_config` resolves the names, and the manifest
records the resolved numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, SPLIT_KIDNEY, LabelMapError, labelled_organs

REST = "rest"  # ``background: rest``: every value not named elsewhere is background
_KIDNEY_PLACEHOLDER = -1  # lookup-table value of ``kidney`` voxels until the side split


def _value(value: Any, where: str, *, allow_zero: bool = False) -> int:
    """A label value as an ``int``, rejecting booleans, fractions, negatives and (unless allowed) 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise LabelMapError(f"label value {value!r} of {where} must be an integer")
    if int(value) != value or int(value) < (0 if allow_zero else 1):
        what = "a non-negative" if allow_zero else "a positive"
        raise LabelMapError(f"label value {value!r} of {where} must be {what} integer")
    return int(value)


@dataclass(frozen=True)
class LabelMap:
    """A site's resolved label map: its organs' values, its background values and its ignored values.

    Parameters
    ----------
    labels:
        ``{organ: site values}``; ``kidney`` is one label split left/right by body side.
    background:
        Values mapped to background (0), or :data:`REST` for every value not named in ``labels``/``ignore``.
        0 is background whether listed or not.
    ignore:
        Values of unknown class, mapped to :data:`fedpsmos.organs.IGNORE_CLASS`.

    A value may appear under one organ, in ``background`` or in ``ignore``, never in two of them.
    """

    labels: Mapping[str, Sequence[int]]
    background: Sequence[int] | str = ()
    ignore: Sequence[int] = ()
    _table: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = {str(o): tuple(_value(v, repr(str(o))) for v in vals) for o, vals in self.labels.items()}
        labelled_organs(labels)  # validates the organ names
        if SPLIT_KIDNEY in labels and {"kidney_left", "kidney_right"} & set(labels):
            raise LabelMapError(
                "'kidney' (split by body side) cannot be combined with kidney_left/kidney_right"
            )
        if isinstance(self.background, str):
            if self.background != REST:
                raise LabelMapError(
                    f"background must be a list of values or {REST!r}, got {self.background!r}"
                )
            background: tuple[int, ...] | str = REST
        else:
            background = tuple(_value(v, "background", allow_zero=True) for v in self.background)
        ignore = tuple(_value(v, "ignore") for v in self.ignore)
        table: dict[int, int] = {}
        owner: dict[int, str] = {}

        def claim(value: int, target: int, name: str) -> None:
            if value in owner and owner[value] != name:
                if owner[value] in labels and name in labels:
                    raise LabelMapError(f"label value {value} is mapped to more than one organ")
                raise LabelMapError(f"label value {value} is in both {owner[value]} and {name}")
            owner[value], table[value] = name, target

        for organ, values in labels.items():
            for value in values:
                claim(value, _KIDNEY_PLACEHOLDER if organ == SPLIT_KIDNEY else CLASS_INDEX[organ], organ)
        for value in background if isinstance(background, tuple) else ():
            claim(value, 0, "background")
        for value in ignore:
            claim(value, IGNORE_CLASS, "ignore")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "background", background)
        object.__setattr__(self, "ignore", ignore)
        object.__setattr__(self, "_table", table)

    @property
    def organs(self) -> tuple[str, ...]:
        """Global organs the site labels, in global class order."""
        return labelled_organs(self.labels)

    @property
    def rest_is_background(self) -> bool:
        """Whether every value not named is background (``background: rest``)."""
        return self.background == REST

    def table(self) -> dict[int, int]:
        """Site value -> global class (0, an organ, or IGNORE_CLASS); ``kidney`` values map to -1."""
        return dict(self._table)

    def allowed_values(self) -> set[int] | None:
        """Values a label file may hold (0 included); ``None`` when any value is allowed (``rest``)."""
        return None if self.rest_is_background else {0, *self._table}

    def unknown(self, values: Iterable[int]) -> list[int]:
        """The values of ``values`` this map does not name (sorted; empty with ``background: rest``)."""
        allowed = self.allowed_values()
        return [] if allowed is None else sorted({int(v) for v in values} - allowed)

    def describe(self) -> str:
        """The map in one line, for error messages."""
        parts = [f"labels { {o: list(v) for o, v in self.labels.items()} }"]
        if self.background:
            background = self.background if self.rest_is_background else list(self.background)
            parts.append(f"background {background}")
        if self.ignore:
            parts.append(f"ignore {list(self.ignore)}")
        return ", ".join(parts)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``labels``, ``background`` and ``ignore`` entries (numbers only)."""
        return {
            "labels": {organ: list(values) for organ, values in self.labels.items()},
            "background": self.background if self.rest_is_background else list(self.background),
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> LabelMap:
        """The resolved map a manifest records (:meth:`to_manifest`); old manifests lack background/ignore."""
        if not isinstance(manifest.get("labels"), Mapping):
            raise LabelMapError("the manifest has no 'labels' map (re-run rule validate_site)")
        return cls(manifest["labels"], manifest.get("background") or (), manifest.get("ignore") or ())

    @classmethod
    def from_config(
        cls,
        labels: Mapping[str, Iterable[int | str]],
        background: Iterable[int | str] | str | None = None,
        ignore: Iterable[int | str] | None = None,
        *,
        dataset_json: str | os.PathLike[str] | None = None,
    ) -> LabelMap:
        """The map of a site's configuration (``sites.{site}.labels``, ``background``, ``ignore``).

        Parameters
        ----------
        labels, background, ignore:
            Values as numbers or as label names of ``dataset_json``; ``background`` may be :data:`REST`.
        dataset_json:
            The site's nnU-Net ``dataset.json``, read only when a value is a name.

        Raises
        ------
        LabelMapError
            A name that ``dataset_json`` does not define (the message names the file and the name), a
            region-based label, a value in two groups, an unknown organ.
        """
        names: dict[str, tuple[int, ...]] | None = None

        def resolve(values: Iterable[int | str], where: str) -> list[int]:
            nonlocal names
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise LabelMapError(f"{where} must be a list of label values, got {values!r}")
            out: list[int] = []
            for value in values:
                if not isinstance(value, str):
                    out.append(value)  # type: ignore[arg-type]  # checked by the constructor
                    continue
                if names is None:
                    names = dataset_label_names(dataset_json, value)
                if value not in names:
                    raise LabelMapError(
                        f"{dataset_json}: no label named {value!r} (for {where}; defined: {sorted(names)})"
                    )
                out.extend(names[value])
            return out

        organ_values = {organ: resolve(values, organ) for organ, values in labels.items()}
        resolved_background: list[int] | str = (
            REST if background == REST else resolve(background or (), "background")
        )
        return cls(organ_values, resolved_background, resolve(ignore or (), "ignore"))  # type: ignore[arg-type]


def dataset_label_names(
    dataset_json: str | os.PathLike[str] | None, needed_by: str = "a label name"
) -> dict[str, tuple[int, ...]]:
    """Label name -> values of an nnU-Net ``dataset.json``, v2 or Medical Segmentation Decathlon form.

    nnU-Net v2 writes ``"labels": {"background": 0, "liver": 1}``; MSD ``"labels": {"0": "background",
    "1": "spleen"}`` (a name used twice in MSD form stands for all its values). A region-based v2 label (a
    list of values) is refused: its name stands for a union of labels, not for one value of the file.

    Parameters
    ----------
    dataset_json:
        Path of the file; ``None`` raises (names need a file).
    needed_by:
        The name that needs the file, for the error message when there is none.
    """
    if dataset_json is None:
        raise LabelMapError(f"label name {needed_by!r} needs the site's dataset.json, and the site has none")
    path = Path(dataset_json)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise LabelMapError(
            f"{path}: label name {needed_by!r} needs this dataset.json, which does not exist"
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelMapError(f"{path}: cannot read dataset.json: {err}") from err
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise LabelMapError(f"{path}: dataset.json has no 'labels' mapping")
    names: dict[str, list[int]] = {}
    if all(isinstance(k, str) and k.strip().isdigit() and isinstance(v, str) for k, v in raw.items()):
        for key, name in raw.items():  # MSD: value -> name
            names.setdefault(name, []).append(int(key))
        return {name: tuple(values) for name, values in names.items()}
    for name, value in raw.items():  # nnU-Net v2: name -> value
        if isinstance(value, list):
            raise LabelMapError(
                f"{path}: label {name!r} is region-based ({value}); region-based dataset.json labels are "
                "not supported, give the site's label values as numbers"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise LabelMapError(f"{path}: label {name!r} has value {value!r}, expected an integer")
        names[name] = [value]
    return {name: tuple(values) for name, values in names.items()}


def as_label_map(labels: LabelMap | Mapping[str, Sequence[int]]) -> LabelMap:
    """A :class:`LabelMap` as is, or a plain ``{organ: [values]}`` map with no background or ignore values."""
    return labels if isinstance(labels, LabelMap) else LabelMap(labels)


def physical_x(index_zyx: np.ndarray, *, origin: Sequence[float], spacing: Sequence[float], direction):
    """Physical LPS x (mm) of voxels given as ``[N, 3]`` (z, y, x) indices.

    Parameters
    ----------
    index_zyx:
        Voxel indices, one row per voxel, NumPy axis order.
    origin, spacing, direction:
        SimpleITK geometry in (x, y, z) order; ``direction`` has 9 values, row-major.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    step = d[0] * np.asarray(spacing, dtype=np.float64)  # mm of x per unit index along sitk x, y, z
    return float(origin[0]) + np.asarray(index_zyx, dtype=np.float64)[:, ::-1] @ step


def kidney_midline(kidney: np.ndarray, x_of_voxels: np.ndarray, fov_centre_x: float) -> float:
    """Body midline x (mm) from a kidney mask: mean x-centroid of its two largest components (module doc).

    Parameters
    ----------
    kidney:
        Boolean ``[Z, Y, X]`` mask of the single kidney label.
    x_of_voxels:
        Physical x of the mask's voxels in ``np.nonzero(kidney)`` order.
    fov_centre_x:
        Fallback when the mask has fewer than two components: x-centre of the field of view.
    """
    components, count = ndimage.label(kidney, structure=np.ones((3, 3, 3), dtype=bool))
    if count < 2:
        return float(fov_centre_x)
    ids = components[np.nonzero(kidney)]
    sizes = np.bincount(ids, minlength=count + 1)
    sums = np.bincount(ids, weights=x_of_voxels, minlength=count + 1)
    largest = np.argsort(sizes[1:], kind="stable")[::-1][:2] + 1
    return float(np.mean(sums[largest] / sizes[largest]))


def apply_label_map(
    label: np.ndarray,
    labels: LabelMap | Mapping[str, Sequence[int]],
    *,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    midline_x: float | None = None,
) -> np.ndarray:
    """Map a site label array ``[Z, Y, X]`` onto the global classes; returns uint8 (module docstring).

    Parameters
    ----------
    label:
        Site label values, integer (or integral float) array in NumPy (z, y, x) order.
    labels:
        The site's :class:`LabelMap`, or a plain ``{organ: [site values]}`` map; ``kidney`` is split
        left/right by body side, ``background`` values become 0 and ``ignore`` values IGNORE_CLASS.
    origin, spacing, direction:
        The label image's SimpleITK geometry (x, y, z order; direction row-major), used for the kidney split.
    midline_x:
        Physical x (mm) of the body midline; estimated from the kidney mask when ``None``.

    Raises
    ------
    LabelMapError
        If the array holds values the map does not name (the message lists them) or the map is malformed.
    """
    label_map = as_label_map(labels)
    table = label_map.table()
    if label.ndim != 3:
        raise LabelMapError(f"expected a 3-D label array, got shape {label.shape}")
    values = np.asarray(label)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise LabelMapError("label array holds non-integer values")
        values = values.astype(np.int64)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0:
        raise LabelMapError(f"label array holds negative values (min {low})")
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=high + 1))
    unknown = label_map.unknown(present)
    if unknown:
        raise LabelMapError(
            f"label values {unknown} are not in the site's label map ({label_map.describe()}); name them "
            f"under the site's background or ignore values, or set background: {REST}"
        )
    lut = np.zeros(high + 1, dtype=np.int16)  # values not in the table are background (0 or rest)
    for value, target in table.items():
        if value <= high:
            lut[value] = target
    mapped = lut[values]
    out = np.clip(mapped, 0, None).astype(np.uint8)
    kidney = mapped == _KIDNEY_PLACEHOLDER
    if kidney.any():
        index = np.argwhere(kidney)
        x = physical_x(index, origin=origin, spacing=spacing, direction=direction)
        if midline_x is None:
            corners = np.array(
                [
                    [i, j, k]
                    for i in (0, label.shape[0] - 1)
                    for j in (0, label.shape[1] - 1)
                    for k in (0, label.shape[2] - 1)
                ]
            )
            corner_x = physical_x(corners, origin=origin, spacing=spacing, direction=direction)
            midline_x = kidney_midline(kidney, x, 0.5 * (corner_x.min() + corner_x.max()))
        side = np.where(x > midline_x, CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"])
        out[tuple(index.T)] = side.astype(np.uint8)
    return out


def apply_label_map_image(
    image: sitk.Image, labels: LabelMap | Mapping[str, Sequence[int]], *, midline_x: float | None = None
) -> np.ndarray:
    """Apply a label map to a SimpleITK label image, using its geometry for the kidney split.

    Parameters
    ----------
    image:
        3-D single-component label image.
    labels:
        The site's :class:`LabelMap` or a plain ``{organ: [site values]}`` map.
    midline_x:
        Optional body midline x (mm), see :func:`apply_label_map`.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LabelMapError(
            f"expected a 3-D scalar label image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return apply_label_map(
        sitk.GetArrayViewFromImage(image),
        labels,
        origin=image.GetOrigin(),
        spacing=image.GetSpacing(),
        direction=image.GetDirection(),
        midline_x=midline_x,
    )
