"""The trainer: SGD with Nesterov momentum, the plateau lr rule, patch sampling, resumable epochs.

docs/design.md "Training" (paper Sec. 3): SGD with Nesterov momentum 0.99, weight decay 3e-5, initial lr 0.01,
lr x0.8 when the training loss fell by less than 0.001 over 10 epochs (:mod:`fedpsmos.training.schedule`),
2 patches per iteration, 250 iterations an epoch, the loss combination of :func:`fedpsmos.losses.build_loss`
wrapped in deep supervision. Gradients are clipped to norm 12 as nnU-Net v2 does.

:class:`Trainer` is the unit the federated rounds reuse (a round is ``train_iterations(local_iterations)``
then ``end_epoch``); :func:`train_model` runs whole epochs for pretraining, central, site-alone and adapted
models, writing a resume checkpoint after each epoch so that a killed job, rerun, ends with the same weights
as an uninterrupted run (bit-identical on the CPU for the same seed).

Best-epoch selection: when the trained sites hold local validation cases (the manifest's ``validation``
list, config ``split.validation_cases``), the model is scored on them after every ``validation_every``
epochs and after the last one (:func:`fedpsmos.training.selection.score_on_validation`: mean Dice over each
case's labelled organs that the model outputs, sliding window on the preprocessed grid). The best-scoring
weights (the earliest on a tie) are kept and become the written model; its meta records ``selected_epoch``
and the ``validation_dice`` history, and the curve gains a ``validation_dice`` column. The best weights and
score live in the resume checkpoint too, so a resumed run selects exactly as an uninterrupted one. Without
validation cases nothing is scored and the last epoch's weights are written, as before.

Determinism: batch ``i`` (its sites, rows and augmentation) is a function of ``(seed, i)``
(:mod:`fedpsmos.training.sampler`), so the trainer state records the iteration counter with the optimiser and
schedule, and a resumed run draws the same batches whether they are made in the training thread or by any
number of background workers (:mod:`fedpsmos.training.loader`, ``workers``: config ``training.workers``,
default the job's threads minus one); initialisation is seeded without touching the global generator. On
CUDA the batch is augmented on the device with the same generator. The CPU kernels used are deterministic
for a given thread count, so no global ``torch.use_deterministic_algorithms`` switch is set (it would also
affect other code in the process). On CUDA, cuDNN may pick non-deterministic kernels, so a resumed GPU run
matches only to floating-point tolerance.
Precision (config ``training.precision``, the rule in :mod:`fedpsmos.precision`): forward pass and loss under
autocast (``auto``: bf16 on a CUDA GPU that has it, fp16 with a GradScaler, saved with the trainer state, on
older GPUs, fp32 on the CPU); the model's meta records it. On CUDA ``cudnn.benchmark`` is on, as in nnU-Net.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedpsmos.io import file_sha256, resolve_device
from fedpsmos.losses import DeepSupervisionLoss, build_loss
from fedpsmos.network import NetworkSpec, build_network, freeze
from fedpsmos.precision import autocast, check_precision, grad_scaler, resolve_precision
from fedpsmos.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    model_state_to_cpu,
    save_checkpoint,
    to_cpu,
)
from fedpsmos.training.curves import plot_curve, write_curve_csv
from fedpsmos.training.loader import BatchFeed, BatchLoader, training_sampler
from fedpsmos.training.sampler import PatchSampler, SiteData
from fedpsmos.training.schedule import PlateauDecay
from fedpsmos.training.selection import ValidationCase, output_organs, score_on_validation

log = logging.getLogger(__name__)

GRAD_CLIP_NORM = 12.0  # nnU-Net v2's nnUNetTrainer.train_step
RESUME_NAME = "resume.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, incompatible state or initial weights)."""


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Optimiser, schedule and sampling settings (config.yaml ``training`` section)."""

    patches_per_iteration: int
    iterations_per_epoch: int
    lr: float
    momentum: float
    weight_decay: float
    plateau_window: int
    plateau_min_decrease: float
    plateau_factor: float
    augmentation: bool
    validation_every: int = 1
    site_sampling: str = "proportional"
    precision: str = "auto"
    extended_augmentation: str | bool = "auto"

    @classmethod
    def from_config(cls, training: Mapping[str, Any]) -> TrainSettings:
        """Settings from config.yaml's ``training`` section.

        Parameters
        ----------
        training:
            the section: patches_per_iteration, iterations_per_epoch, lr, momentum, weight_decay,
            plateau {window, min_decrease, factor}, augmentation, optional validation_every (default 1),
            site_sampling, precision and extended_augmentation (both default ``auto``; other keys, e.g.
            epochs, are ignored).
        """
        try:
            plateau = training["plateau"]
            return cls(
                patches_per_iteration=int(training["patches_per_iteration"]),
                iterations_per_epoch=int(training["iterations_per_epoch"]),
                lr=float(training["lr"]),
                momentum=float(training["momentum"]),
                weight_decay=float(training["weight_decay"]),
                plateau_window=int(plateau["window"]),
                plateau_min_decrease=float(plateau["min_decrease"]),
                plateau_factor=float(plateau["factor"]),
                augmentation=bool(training["augmentation"]),
                validation_every=int(training.get("validation_every", 1)),
                site_sampling=str(training.get("site_sampling", "proportional")),
                precision=check_precision(str(training.get("precision", "auto"))),
                extended_augmentation=training.get("extended_augmentation", "auto"),
            )
        except KeyError as error:
            raise KeyError(f"config training: missing key {error.args[0]!r}") from None


class Trainer:
    """Trains a model on patches of the given sites; holds the optimiser, schedule and sampler state."""

    def __init__(
        self,
        *,
        model: nn.Module,
        sites: Sequence[SiteData],
        loss_spec: Mapping[str, Any],
        settings: TrainSettings,
        seed: int,
        device: str | torch.device | None = None,
        freeze_mode: str = "full",
        class_map: np.ndarray | None = None,
        patch_size: Sequence[int],
        workers: int = 0,
        loader: BatchLoader | None = None,
    ) -> None:
        """Set up training of ``model`` (moved to ``device``) on ``sites``; :meth:`close` it after use.

        Parameters
        ----------
        model:
            a network from :func:`fedpsmos.network.build_network`.
        sites:
            the training data (only these sites' files are read).
        loss_spec:
            ``{"marginal": {...}, "exclusion": {...}}`` for :func:`fedpsmos.losses.build_loss`.
        settings:
            optimiser, schedule and sampling settings.
        seed:
            seeds patch sampling and augmentation.
        device:
            ``None``: CUDA if available, else CPU.
        freeze_mode:
            ``full``, ``decoder`` (encoder frozen) or ``encoder`` (decoder frozen).
        class_map:
            global class -> model class (site-alone models), see :class:`PatchSampler`.
        patch_size:
            (z, y, x) voxels.
        workers:
            background processes making the batches (:mod:`~fedpsmos.training.loader`; 0: in this thread).
        loader:
            a running :class:`~fedpsmos.training.loader.BatchLoader` over the same data to share instead.
        """
        self.device = resolve_device(device)
        self.precision = resolve_precision(settings.precision, self.device)  # bf16, fp16 or fp32
        self.scaler = grad_scaler(self.precision, self.device)  # fp16 only; a pass-through otherwise
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # nnU-Net v2: one patch shape, let cuDNN time its kernels
        self.model = model.to(self.device)
        self.settings = settings
        self.freeze_mode = freeze_mode
        trainable = freeze(self.model, freeze_mode)
        self.optimizer = torch.optim.SGD(
            trainable,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=True,
        )
        self.scheduler = PlateauDecay(
            self.optimizer,
            window=settings.plateau_window,
            min_decrease=settings.plateau_min_decrease,
            factor=settings.plateau_factor,
        )
        self.sampler: PatchSampler = training_sampler(
            sites,
            settings=settings,
            seed=seed,
            device=self.device,
            patch_size=patch_size,
            class_map=class_map,
        )
        self.batches = BatchFeed(
            self.sampler,
            device=self.device,
            augment_on_device=settings.augmentation and not self.sampler.augment,
            workers=workers,
            loader=loader,
        )
        loss = build_loss(loss_spec)
        deep = bool(getattr(getattr(self.model, "decoder", None), "deep_supervision", False))
        self.loss: nn.Module = DeepSupervisionLoss(loss) if deep else loss
        self._params = trainable

    @property
    def lr(self) -> float:
        """The current learning rate."""
        return self.scheduler.lr

    def train_iterations(self, n: int, *, progress: bool = False) -> float:
        """Run ``n`` training iterations and return their mean loss.

        Parameters
        ----------
        n:
            iterations (each one batch of ``patches_per_iteration`` patches).
        progress:
            show a tqdm bar on stderr.
        """
        if n < 1:
            raise ValueError(f"need at least one iteration, got {n}")
        self.model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in tqdm(range(n), disable=not progress, file=sys.stderr, leave=False, unit="it"):
            image, target, labelled = self.batches.next()  # on the device, augmented
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.precision, self.device):
                loss = self.loss(self.model(image), target, labelled)
            # nnU-Net v2's train_step: clip the unscaled gradients; a step with inf/NaN gradients is skipped
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, GRAD_CLIP_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.detach()  # stays on the device: one synchronisation per call, not per iteration
        mean = float(total.item()) / n
        if not math.isfinite(mean):
            raise TrainingError(f"training loss is {mean} (diverged)")
        return mean

    def end_epoch(self, mean_loss: float) -> None:
        """Feed an epoch's mean loss to the plateau lr rule.

        Parameters
        ----------
        mean_loss:
            the epoch's mean training loss.
        """
        if self.scheduler.step(mean_loss):
            log.info("plateau: lr decayed to %.3g", self.lr)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, schedule and random-generator state (not the model weights), on the CPU."""
        rng: dict[str, Any] = {"sampler": self.sampler.state_dict(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "freeze_mode": self.freeze_mode,
            "grad_scaler": self.scaler.state_dict(),  # {} unless fp16
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; without an ``rng`` entry the generators keep their seed.

        Parameters
        ----------
        state:
            a saved state (optimiser state must be for the same trainable parameters).
        """
        if state.get("freeze_mode", self.freeze_mode) != self.freeze_mode:
            raise TrainingError(
                f"trainer state is for freeze mode {state['freeze_mode']!r}, not {self.freeze_mode!r}"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError) as error:
            raise TrainingError(f"trainer state does not fit this trainer ({error})") from None
        # The optimiser's own check only counts parameters: also check every buffer's shape.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None and buf.shape != p.shape:
                    raise TrainingError(
                        f"trainer state does not fit this model: momentum of shape {list(buf.shape)} "
                        f"for a parameter of shape {list(p.shape)}"
                    )
        if state.get("grad_scaler") and self.scaler.is_enabled():  # another precision's state: a fresh scaler
            self.scaler.load_state_dict(state["grad_scaler"])
        rng = state.get("rng")
        if rng:
            try:
                self.sampler.load_state_dict(rng["sampler"])  # the iteration counter
            except (KeyError, ValueError) as error:
                raise TrainingError(f"trainer state does not fit this trainer ({error})") from None
            self.batches.restart()
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def close(self) -> None:
        """Shut down the trainer's batch workers (a shared loader stays up)."""
        self.batches.close()


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
