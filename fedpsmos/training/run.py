"""Entry point of the training rules: turn a rule's plain params into a :func:`train_model` call.

One function serves the four model kinds (docs/design.md "The pipeline and the privacy boundary"):
``pretrain`` (M0, the fully labelled site), ``central`` (all sites pooled, from M0), ``site_alone`` (one
site's organs only, from scratch) and ``adapted`` (one site, from the federated model, with a freeze mode).
Each keeps its best epoch by the score on the trained sites' validation cases when their manifests hold any
(:func:`train_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpsmos.network import NetworkSpec
from fedpsmos.organs import CLASS_INDEX, NUM_CLASSES, ORGANS
from fedpsmos.training.epochs import train_model
from fedpsmos.training.loader import resolve_workers
from fedpsmos.training.selection import validation_cases_from_manifest
from fedpsmos.training.site_data import site_data_from_manifest
from fedpsmos.training.trainer import TrainSettings

KINDS: tuple[str, ...] = ("pretrain", "central", "baseline", "site_alone", "adapted")


def class_map_for(organs: Sequence[str]) -> np.ndarray | None:
    """Map from global classes to a model's classes when it outputs only ``organs``; ``None`` for all five.

    Model class ``k`` (1-based) is ``organs[k - 1]``; every other global class maps to the model's background.

    Parameters
    ----------
    organs:
        global organ names the model outputs, in global class order.
    """
    unknown = [o for o in organs if o not in ORGANS]
    if unknown or not organs or len(set(organs)) != len(organs):
        raise ValueError(f"organs must be distinct names from {ORGANS}, got {list(organs)}")
    ordered = [o for o in ORGANS if o in organs]
    if list(organs) != ordered:
        raise ValueError(f"organs must be in global class order {ordered}, got {list(organs)}")
    if tuple(organs) == ORGANS:
        return None
    class_map = np.zeros(NUM_CLASSES, dtype=np.int64)
    for k, organ in enumerate(organs, start=1):
        class_map[CLASS_INDEX[organ]] = k
    return class_map


def train_from_params(params: Mapping[str, Any], output: Mapping[str, str | Path]) -> None:
    """Train the model a rule describes.

    Parameters
    ----------
    params:
        ``kind`` (pretrain | central | site_alone | adapted), ``sites`` (list of {site, manifest, npz_dir,
        patches}), ``init`` (checkpoint path or ""), ``loss`` (loss spec), ``epochs``, ``freeze_mode``,
        ``network`` (config ``network`` section), ``training`` (config ``training`` section),
        ``patch_size``, ``seed``, ``organs`` (the organs the model outputs), and optionally
        ``preprocessing`` (the resolved ``results/preprocessed/settings.json``, recorded in the checkpoint's
        meta so that ``fedpsmos predict`` can preprocess new scans the same way) and ``threads`` (the job's
        threads, default 1: with ``training.workers: auto`` the batch workers are ``threads - 1``
        on a GPU, none on the CPU).
    output:
        ``model``, ``curve_csv``, ``curve_png`` paths.
    """
    kind = params["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(KINDS)})")
    organs = list(params["organs"])
    class_map = class_map_for(organs)
    sites = [
        site_data_from_manifest(s["site"], s["manifest"], s["npz_dir"], s["patches"]) for s in params["sites"]
    ]
    # The same sites' held-out cases (only their files are opened), for best-epoch selection.
    validation = [
        case
        for s in params["sites"]
        for case in validation_cases_from_manifest(s["site"], s["manifest"], s["npz_dir"])
    ]
    meta = {
        "kind": kind,
        "organs": organs,
        "classes": ["background", *organs],
        "site": sites[0].site if len(sites) == 1 else None,
        "n_cases": sum(len(s.npz_paths) for s in sites),
    }
    if params.get("preprocessing"):
        meta["preprocessing"] = dict(params["preprocessing"])
    init = str(params.get("init") or "")
    train_model(
        network=NetworkSpec.from_config(params["network"], num_classes=len(organs) + 1),
        init=Path(init) if init else None,
        sites=sites,
        loss_spec=params["loss"],
        settings=TrainSettings.from_config(params["training"]),
        epochs=int(params["epochs"]),
        seed=int(params["seed"]),
        out_model=Path(output["model"]),
        out_curve_csv=Path(output["curve_csv"]),
        out_curve_png=Path(output["curve_png"]),
        freeze_mode=str(params.get("freeze_mode") or "full"),
        class_map=class_map,
        meta=meta,
        patch_size=[int(p) for p in params["patch_size"]],
        validation=validation,
        workers=resolve_workers(
            params["training"].get("workers", "auto"), int(params.get("threads", 1)), params.get("device")
        ),
    )
