"""An exponential moving average of the trainable weights, as diffusion models (and many others) are exported.

The average starts equal to the weights and moves toward them after each optimiser step with decay
min(decay, (1 + step) / (10 + step)): the warm-up keeps early, random weights from lingering. It is part of
the trainer's checkpoint (so a resumed run continues it exactly) and, when on, what the trainer exports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copies of `model`'s trainable parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {name: params[name].detach().clone().float() for name in self.names}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update, warmed up over the first steps."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward the model's current weights."""
        decay = self.current_decay()
        params = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights restored after."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])

    def state_dict(self) -> dict[str, object]:
        """For the trainer's checkpoint."""
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from `state_dict`; the parameter names must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self.names):
            differ = sorted(set(shadow) ^ set(self.names))[:5]
            raise KeyError(f"EMA state has parameters {differ} that differ from the model's")
        self.shadow = {k: v.clone().float() for k, v in shadow.items()}
        self.updates = int(state["updates"])
