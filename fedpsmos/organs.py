"""The global organ classes and a site's partial label map (docs/design.md, "Organs and label maps").

Global classes: 0 background, 1 liver, 2 spleen, 3 pancreas, 4 kidney_left, 5 kidney_right. A site declares
which organs it annotates and which of its own label values map onto each. The pseudo-organ ``kidney`` stands
for a data set with one kidney label: its voxels are split into left and right by the side of the body in
physical (LPS) coordinates, see :func:`fedpsmos.data.label_map.apply_label_map`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

ORGANS: tuple[str, ...] = ("liver", "spleen", "pancreas", "kidney_left", "kidney_right")
CLASSES: tuple[str, ...] = ("background", *ORGANS)
NUM_CLASSES = len(CLASSES)  # C + 1 = 6
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
SPLIT_KIDNEY = "kidney"  # one kidney label, split left/right by body side
# Global label value of voxels whose class is unknown (a site's ``ignore`` values): left out of every loss
# term and every metric, as nnU-Net's ignore label. Never a network output channel.
IGNORE_CLASS = 255


class LabelMapError(ValueError):
    """A site's label map names an unknown organ or is otherwise malformed."""


def labelled_organs(label_map: Mapping[str, Iterable[int]]) -> tuple[str, ...]:
    """Global organs a site annotates, in global class order.

    Parameters
    ----------
    label_map:
        ``{organ: [site label values]}``; the key ``kidney`` stands for both kidneys.
    """
    names: set[str] = set()
    for organ in label_map:
        if organ == SPLIT_KIDNEY:
            names.update(("kidney_left", "kidney_right"))
        elif organ in ORGANS:
            names.add(organ)
        else:
            known = ", ".join((*ORGANS, SPLIT_KIDNEY))
            raise LabelMapError(f"unknown organ {organ!r} in label map (known: {known})")
    if not names:
        raise LabelMapError("label map annotates no organ")
    return tuple(o for o in ORGANS if o in names)


def labelled_mask(organs: Iterable[str]) -> np.ndarray:
    """Boolean mask over the C + 1 global classes of the classes a site annotates.

    Background (index 0) is always ``True``: every site labels what it calls background, and the losses
    decide what that background may contain (marginal merging, docs/design.md "Losses").
    """
    mask = np.zeros(NUM_CLASSES, dtype=bool)
    mask[0] = True
    for organ in organs:
        if organ not in CLASS_INDEX or organ == "background":
            raise LabelMapError(f"unknown organ {organ!r}")
        mask[CLASS_INDEX[organ]] = True
    return mask


def is_fully_labelled(mask: np.ndarray) -> bool:
    """Whether a labelled-class mask covers every organ."""
    return bool(np.all(mask))
