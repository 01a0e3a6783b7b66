"""The paper's learning-rate rule: decay on a training-loss plateau.

Paper Sec. 3 (docs/design.md "Training"): "the learning rate decays by 20% whenever the training loss fell
by less than 0.001 over 10 consecutive epochs". Made precise here: with ``loss[e]`` the mean training loss of
epoch ``e`` (0-based, in :meth:`PlateauDecay.step` call order), the rate is multiplied by ``factor`` at the
end of epoch ``e`` when

    e >= window,  e - window >= d,  and  loss[e - window] - loss[e] < min_decrease,

where ``d`` is the epoch of the last decay (none yet: no constraint). So the comparison spans exactly
``window`` epochs, and after a decay the rule waits until a whole window has passed at the new rate. A rising
loss counts as "fell by less". A non-finite loss never triggers a decay (the trainer refuses it anyway).
"""

from __future__ import annotations

import math
from typing import Any

import torch


class PlateauDecay:
    """Multiply every parameter group's lr by ``factor`` when the loss plateaus (see module docstring)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        window: int = 10,
        min_decrease: float = 1e-3,
        factor: float = 0.8,
    ) -> None:
        """Wrap ``optimizer``.

        Parameters
        ----------
        optimizer:
            the optimiser whose parameter groups' ``lr`` is decayed.
        window:
            number of epochs the loss decrease is measured over (paper: 10).
        min_decrease:
            smallest decrease over a window that avoids a decay (paper: 0.001).
        factor:
            multiplier applied at a decay (paper: 0.8, "decays by 20%").
        """
        if window < 1:
            raise ValueError(f"plateau window must be >= 1, got {window}")
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"plateau factor must be in (0, 1], got {factor}")
        self.optimizer = optimizer
        self.window = int(window)
        self.min_decrease = float(min_decrease)
        self.factor = float(factor)
        self.losses: list[float] = []
        self.last_decay: int | None = None
        self.decays = 0

    def step(self, loss: float) -> bool:
        """Record the loss of the epoch just finished; decay the lr if the plateau rule fires.

        Parameters
        ----------
        loss:
            the epoch's mean training loss.

        Returns whether the lr was decayed.
        """
        self.losses.append(float(loss))
        e = len(self.losses) - 1
        if e < self.window or (self.last_decay is not None and e - self.window < self.last_decay):
            return False
        before, now = self.losses[e - self.window], self.losses[e]
        if not (math.isfinite(before) and math.isfinite(now)) or before - now >= self.min_decrease:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor
        self.last_decay = e
        self.decays += 1
        return True

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (the lr itself lives in the optimiser's state)."""
        return {
            "window": self.window,
            "min_decrease": self.min_decrease,
            "factor": self.factor,
            "losses": list(self.losses),
            "last_decay": -1 if self.last_decay is None else self.last_decay,
            "decays": self.decays,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the rule's settings must match.

        Parameters
        ----------
        state:
            a saved state.
        """
        saved = (state["window"], state["min_decrease"], state["factor"])
        if saved != (self.window, self.min_decrease, self.factor):
            raise ValueError(
                f"plateau schedule state is for (window, min_decrease, factor) = {saved}, "
                f"not {(self.window, self.min_decrease, self.factor)}"
            )
        self.losses = [float(x) for x in state["losses"]]
        self.last_decay = None if state["last_decay"] < 0 else int(state["last_decay"])
        self.decays = int(state["decays"])
