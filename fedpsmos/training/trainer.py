"""The trainer: SGD with Nesterov momentum, the plateau lr rule, patch sampling, a resumable state.

docs/design.md "Training" (paper Sec. 3): SGD with Nesterov momentum 0.99, weight decay 3e-5, initial lr 0.01,
lr x0.8 when the training loss fell by less than 0.001 over 10 epochs (:mod:`fedpsmos.training.schedule`),
2 patches per iteration, 250 iterations an epoch, the loss combination of :func:`fedpsmos.losses.build_loss`
wrapped in deep supervision. Gradients are clipped to norm 12 as nnU-Net v2 does.

:class:`Trainer` is the unit the federated rounds reuse (a round is ``train_iterations(local_iterations)``
then ``end_epoch``); :func:`fedpsmos.training.epochs.train_model` runs whole epochs with it for pretraining,
central, site-alone and adapted models (resumable, with best-epoch selection on validation cases).

Determinism: batch ``i`` (its sites, rows and augmentation) is a function of ``(seed, i)``
(:mod:`fedpsmos.training.sampler`), so the trainer state records the iteration counter with the optimiser and
schedule, and a resumed run draws the same batches whether they are made in the training thread or by any
number of background workers (:mod:`fedpsmos.training.loader`, ``workers``: config ``training.workers``,
default on a GPU the job's threads minus one, on the CPU none); initialisation is seeded without touching the
global generator. On CUDA the batch is augmented on the device with the same generator. The CPU kernels used
are deterministic for a given thread count, so no global ``torch.use_deterministic_algorithms`` switch is set
(it would also affect other code in the process). On CUDA, cuDNN may pick non-deterministic kernels, so a
resumed GPU run matches only to floating-point tolerance.
Precision (config ``training.precision``, the rule in :mod:`fedpsmos.precision`): forward pass and loss under
autocast (``auto``: bf16 on a CUDA GPU that has it, fp16 with a GradScaler, saved with the trainer state, on
older GPUs, fp32 on the CPU); the model's meta records it. On CUDA ``cudnn.benchmark`` is on, as in nnU-Net.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedpsmos.io import resolve_device
from fedpsmos.losses import DeepSupervisionLoss, build_loss
from fedpsmos.network import freeze
from fedpsmos.precision import autocast, check_precision, grad_scaler, resolve_precision
from fedpsmos.training.checkpoint import to_cpu
from fedpsmos.training.loader import BatchFeed, BatchLoader, training_sampler
from fedpsmos.training.sampler import PatchSampler
from fedpsmos.training.schedule import PlateauDecay
from fedpsmos.training.site_data import SiteData

log = logging.getLogger(__name__)

GRAD_CLIP_NORM = 12.0  # nnU-Net v2's nnUNetTrainer.train_step


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
