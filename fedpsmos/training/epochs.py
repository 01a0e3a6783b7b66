"""Training for whole epochs: resumable runs, best-epoch selection, the written model and its curve.

:func:`train_model` trains the pretrained (M0), central, site-alone and adapted models with a
:class:`~fedpsmos.training.trainer.Trainer` (docs/design.md "Training"), writing a resume checkpoint after
each epoch so that a killed job, rerun, ends with the same weights as an uninterrupted run (bit-identical on
the CPU for the same seed).

Best-epoch selection: when the trained sites hold local validation cases (the manifest's ``validation``
list, config ``split.validation_cases``), the model is scored on them after every ``validation_every``
epochs and after the last one (:func:`fedpsmos.training.selection.score_on_validation`: mean Dice over each
case's labelled organs that the model outputs, sliding window on the preprocessed grid). The best-scoring
weights (the earliest on a tie) are kept and become the written model; its meta records ``selected_epoch``
and the ``validation_dice`` history, and the curve gains a ``validation_dice`` column. The best weights and
score live in the resume checkpoint too, so a resumed run selects exactly as an uninterrupted one. Without
validation cases nothing is scored and the last epoch's weights are written, as before.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpsmos.io import file_sha256
from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    model_state_to_cpu,
    save_checkpoint,
)
from fedpsmos.training.curves import plot_curve, write_curve_csv
from fedpsmos.training.selection import ValidationCase, output_organs, score_on_validation
from fedpsmos.training.site_data import SiteData
from fedpsmos.training.trainer import Trainer, TrainingError, TrainSettings

log = logging.getLogger(__name__)

RESUME_NAME = "resume.pt"


def _plain(data: Any) -> Any:
    """JSON-round-tripped copy: plain data that compares equal after a checkpoint round trip."""
    return json.loads(json.dumps(data, default=str))


def load_initial_weights(model: nn.Module, init: Path, spec: NetworkSpec) -> None:
    """Load ``init``'s weights into ``model`` strictly, refusing a checkpoint of another network.

    Parameters
    ----------
    model:
        the network built from ``spec``.
    init:
        a model checkpoint whose meta holds its ``network`` spec.
    spec:
        the network being trained.
    """
    payload = load_checkpoint(init)
    network = payload["meta"].get("network")
    if network is not None:
        theirs = NetworkSpec.from_dict(network)
        if theirs.num_classes != spec.num_classes:
            raise TrainingError(
                f"{init}: initial model outputs {theirs.num_classes} classes, "
                f"this training needs {spec.num_classes}"
            )
        if theirs != spec:
            raise TrainingError(
                f"{init}: initial model's network {theirs.to_dict()} differs from {spec.to_dict()}"
            )
    load_model_state(model, payload["model"], source=init)


def train_model(
    *,
    network: NetworkSpec,
    init: Path | None,
    sites: Sequence[SiteData],
    loss_spec: Mapping[str, Any],
    settings: TrainSettings,
    epochs: int,
    seed: int,
    out_model: Path,
    out_curve_csv: Path,
    out_curve_png: Path,
    freeze_mode: str = "full",
    class_map: np.ndarray | None = None,
    meta: Mapping[str, Any],
    patch_size: Sequence[int],
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    validation: Sequence[ValidationCase] = (),
    workers: int = 0,
) -> None:
    """Train a model for ``epochs`` epochs (resuming from ``resume.pt`` beside ``out_model``) and write it.

    Parameters
    ----------
    network:
        the topology (``num_classes`` = the model's output classes).
    init:
        initial weights (e.g. M0 or the federated model); ``None`` starts from He initialisation.
    sites:
        training data.
    loss_spec:
        loss combination for :func:`fedpsmos.losses.build_loss`.
    settings:
        optimiser, schedule and sampling settings.
    epochs:
        epochs of ``settings.iterations_per_epoch`` iterations.
    seed:
        seeds the initialisation, sampling and augmentation.
    out_model, out_curve_csv, out_curve_png:
        the model checkpoint and its training curve.
    freeze_mode:
        adaptation mode (``full``, ``decoder``, ``encoder``).
    class_map:
        global class -> model class, for models that output a subset of the organs.
    meta:
        plain metadata stored in the checkpoint (kind, organs, classes, site, n_cases, ...).
    patch_size:
        (z, y, x) voxels.
    device:
        ``None``: CUDA if available, else CPU.
    on_epoch_end:
        called with the number of finished epochs after the resume checkpoint is written (tests use it to
        interrupt a run).
    validation:
        the trained sites' validation cases; empty: no scoring, the last epoch's weights are written.
    workers:
        background processes making the batches (0: in the training thread); the weights do not depend on it.
    """
    out_model = Path(out_model)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    stride = network.total_stride()
    if any(p % s for p, s in zip(patch_size, stride, strict=True)):
        raise TrainingError(
            f"patch size {list(patch_size)} is not divisible by the network's total stride {stride}"
        )
    full_meta = _plain(
        {
            **meta,
            "network": network.to_dict(),
            "epochs": int(epochs),
            "seed": int(seed),
            "freeze_mode": freeze_mode,
            "patch_size": [int(p) for p in patch_size],
            "settings": asdict(settings),
            "loss": loss_spec,
            "init": str(init) if init else None,
            "init_sha256": file_sha256(init) if init else None,
            "class_map": None if class_map is None else [int(c) for c in class_map],
            "sites": [s.site for s in sites],
            "validation_cases": [f"{v.site}/{v.case}" for v in validation],
        }
    )
    organs = output_organs(class_map)
    every = max(1, int(settings.validation_every))

    def fresh_trainer() -> Trainer:
        model = build_network(network, seed=seed)
        if init:
            load_initial_weights(model, Path(init), network)
        return Trainer(
            model=model,
            sites=sites,
            loss_spec=loss_spec,
            settings=settings,
            seed=seed,
            device=device,
            freeze_mode=freeze_mode,
            class_map=class_map,
            patch_size=patch_size,
            workers=workers,
        )

    trainer = fresh_trainer()
    resume_path = out_model.parent / RESUME_NAME
    history: list[dict[str, Any]] = []
    start = 0
    best: dict[str, Any] | None = None  # {"epoch", "score", "model"}: the best validated weights so far
    if resume_path.exists():
        try:
            resume = load_checkpoint(resume_path)
            if resume["meta"] != full_meta:
                raise CheckpointError(f"{resume_path}: written by a different training run")
            load_model_state(trainer.model, resume["model"], source=resume_path)
            trainer.load_state_dict(resume["trainer"])
            history, start = list(resume["history"]), int(resume["epoch"])
            if resume.get("best"):
                best = {**resume["best"], "model": resume["best_model"]}
            log.info("resuming from %s after epoch %d", resume_path, start)
        except (CheckpointError, TrainingError, KeyError) as error:
            # A partial restore may have touched the model or trainer: start over from scratch.
            log.warning("ignoring resume checkpoint %s: %s", resume_path, error)
            trainer, history, start, best = fresh_trainer(), [], 0, None
    try:
        for epoch in range(start, epochs):
            started = time.perf_counter()
            lr = trainer.lr
            loss = trainer.train_iterations(settings.iterations_per_epoch, progress=True)
            trainer.end_epoch(loss)
            seconds = time.perf_counter() - started
            score: float | None = None
            if validation and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
                score = score_on_validation(
                    trainer.model,
                    validation,
                    organs=organs,
                    patch_size=patch_size,
                    device=trainer.device,
                    precision=trainer.precision,
                )
                if (
                    best is None or score > best["score"]
                ):  # strictly better: the earliest best epoch wins ties
                    best = {
                        "epoch": epoch + 1,
                        "score": score,
                        "model": model_state_to_cpu(trainer.model.state_dict()),
                    }
            history.append(
                {"epoch": epoch + 1, "loss": loss, "lr": lr, "seconds": seconds, "validation_dice": score}
            )
            log.info(
                "epoch %d/%d loss %.5f lr %.4g %.1f s%s",
                epoch + 1,
                epochs,
                loss,
                lr,
                seconds,
                "" if score is None else f" validation Dice {score:.4f}",
            )
            snapshot: dict[str, Any] = {
                "model": model_state_to_cpu(trainer.model.state_dict()),
                "meta": full_meta,
                "trainer": trainer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
            }
            if best is not None:
                snapshot["best"] = {"epoch": best["epoch"], "score": best["score"]}
                snapshot["best_model"] = best["model"]
            save_checkpoint(resume_path, snapshot)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    finally:
        trainer.close()  # its batch workers, also when an epoch fails or is interrupted
    write_curve_csv(out_curve_csv, history)
    plot_curve(out_curve_png, history, title=str(meta.get("kind", "")))
    selection = {
        "selected_epoch": epochs if best is None else int(best["epoch"]),
        "validation_dice": [
            {"epoch": int(h["epoch"]), "dice": float(h["validation_dice"])}
            for h in history
            if h.get("validation_dice") is not None
        ],
    }
    weights = model_state_to_cpu(trainer.model.state_dict()) if best is None else best["model"]
    save_checkpoint(
        out_model,
        {
            "model": weights,
            "meta": {**full_meta, **selection, "precision": trainer.precision},
            "epoch": epochs,
            "history": history,
        },
    )
    resume_path.unlink(missing_ok=True)
