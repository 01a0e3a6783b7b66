"""Scoring a model on a site's local validation cases, for best-model selection (paper Sec. 4.2).

A validation case is a whole preprocessed case (``results/preprocessed/{site}/{case}.b2zip``) that the
manifest's ``validation`` list holds out of training. A model is scored case by case: the project's sliding
window (:func:`fedpsmos.inference.sliding_window.predict_logits`, step 0.5, no mirroring) on the preprocessed
grid, the argmax, and :func:`fedpsmos.evaluation.metrics.dice` for every organ that is both labelled in the
case (its ``labelled`` mask: a partially labelled site scores only its own organs) and output by the model (a
site-alone model scores only its own classes). Voxels whose label is the ignore label (``IGNORE_CLASS``, class
unknown) are left out of every Dice: a prediction there counts neither for nor against an organ. A case's
score is the mean over its scored organs; the validation score is the mean over cases. Only the given cases'
files are opened, so a site's scorer reads its own data and nothing else. Inference takes no random numbers,
so scoring never changes a training run's random streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpsmos.data.manifest import Manifest
from fedpsmos.evaluation.metrics import dice
from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, ORGANS
from fedpsmos.preprocessing.storage import case_id, case_path, read_case

VALIDATION_STEP = 0.5  # nnU-Net's tile step; mirroring is off: selection runs often, 8x cheaper without it


class SelectionError(ValueError):
    """Validation cases are unusable (missing from a rule's inputs, or no organ to score)."""


@dataclass(frozen=True)
class ValidationCase:
    """One held-out case of a site: its name and its preprocessed case file (``npz``)."""

    site: str
    case: str
    npz: Path


def validation_cases_from_manifest(
    site: str, manifest: str | Path, npz: str | Path | Sequence[str | Path]
) -> tuple[ValidationCase, ...]:
    """The ``validation`` cases a site's manifest names (empty when validation is off), in manifest order.

    Parameters
    ----------
    site:
        The site; must match the manifest.
    manifest:
        ``results/data/{site}/manifest.json`` (docs/architecture.md, "Manifest").
    npz:
        ``results/preprocessed/{site}`` (the folder holding ``{case}.b2zip``), or the list of case files a
        rule was given, which must then include every validation case.
    """
    names = Manifest.load(manifest, site=site).validation
    if isinstance(npz, str | Path):
        return tuple(ValidationCase(site, c, case_path(npz, c)) for c in names)
    given = {case_id(p): Path(p) for p in npz}
    missing = [c for c in names if c not in given]
    if missing:
        raise SelectionError(f"{manifest}: site {site} validation cases missing from the inputs: {missing}")
    return tuple(ValidationCase(site, c, given[c]) for c in names)


def output_organs(class_map: np.ndarray | None) -> tuple[str, ...]:
    """The organs a model outputs, in channel order, from its global-class -> model-class map.

    Parameters
    ----------
    class_map:
        ``None`` for a model of all five organs, else ``class_map[global class] = model class``.
    """
    if class_map is None:
        return ORGANS
    by_channel = {int(k): organ for organ in ORGANS if (k := class_map[CLASS_INDEX[organ]]) > 0}
    return tuple(by_channel[k] for k in sorted(by_channel))


def _scored_prediction(pred: np.ndarray, label: np.ndarray, channel: int) -> np.ndarray:
    """Mask of the voxels predicted as ``channel``, less those whose label is ``IGNORE_CLASS``."""
    predicted = pred == channel
    ignored = label == IGNORE_CLASS
    return predicted & ~ignored if ignored.any() else predicted


def case_dice(
    model: nn.Module,
    cases: Sequence[ValidationCase],
    *,
    organs: Sequence[str],
    patch_size: Sequence[int],
    device: str | torch.device,
    precision: str = "auto",
) -> list[dict[str, float]]:
    """Per case, the Dice of every organ the case labels and the model outputs (module docstring).

    Parameters
    ----------
    model:
        The network; its training/eval mode is restored afterwards.
    cases:
        The validation cases (only their files are opened).
    organs:
        The organs the model outputs, channel ``k`` being ``organs[k - 1]`` (:func:`output_organs`).
    patch_size:
        Sliding-window tile (z, y, x), the training patch size.
    device:
        Where inference runs.
    precision:
        ``auto``, ``bf16``, ``fp16`` or ``fp32`` (:mod:`fedpsmos.precision`): the training precision, so that
        validation scores the model as it trains.
    """
    was_training = model.training
    out: list[dict[str, float]] = []
    try:
        for case in cases:
            data = read_case(case.npz, ("image", "label", "labelled"))
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"])
            labelled = np.asarray(data["labelled"], dtype=bool)
            logits = predict_logits(
                model,
                image,
                patch_size=patch_size,
                step=VALIDATION_STEP,
                mirror=False,
                device=device,
                precision=precision,
            )
            if logits.shape[0] != len(organs) + 1:
                raise SelectionError(f"model outputs {logits.shape[0]} channels, expected {len(organs) + 1}")
            pred = logits.argmax(dim=0).cpu().numpy()
            out.append(
                {
                    organ: dice(_scored_prediction(pred, label, k), label == CLASS_INDEX[organ])
                    for k, organ in enumerate(organs, start=1)
                    if labelled[CLASS_INDEX[organ]]
                }
            )
    finally:
        model.train(was_training)
    return out


def organ_means(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per organ, the mean Dice over the cases that scored it.

    Parameters
    ----------
    per_case:
        :func:`case_dice` output.
    """
    organs = sorted({o for scores in per_case for o in scores}, key=ORGANS.index)
    return {o: float(np.mean([s[o] for s in per_case if o in s])) for o in organs}


def mean_score(per_case: Sequence[dict[str, float]]) -> float:
    """The validation score: mean over cases of each case's mean organ Dice (cases scoring no organ skipped).

    Parameters
    ----------
    per_case:
        :func:`case_dice` output.
    """
    means = [float(np.mean(list(s.values()))) for s in per_case if s]
    if not means:
        raise SelectionError("no validation case has an organ that the model outputs and the case labels")
    score = float(np.mean(means))
    if not math.isfinite(score):
        raise SelectionError(f"validation score is {score}")
    return score


def score_on_validation(
    model: nn.Module,
    cases: Sequence[ValidationCase],
    *,
    organs: Sequence[str],
    patch_size: Sequence[int],
    device: str | torch.device,
    precision: str = "auto",
) -> float:
    """Mean Dice of ``model`` on validation cases, each over its own labelled organs (module docstring).

    Parameters
    ----------
    model, cases, organs, patch_size, device, precision:
        See :func:`case_dice`.
    """
    return mean_score(
        case_dice(model, cases, organs=organs, patch_size=patch_size, device=device, precision=precision)
    )
