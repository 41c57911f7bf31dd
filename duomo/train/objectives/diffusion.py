"""The text-to-image denoising objective: noise an image at a random timestep, predict the schedule's target.

Captions are dropped (replaced by the empty caption) at `caption_dropout`, so one model learns both branches
of classifier-free guidance. The loss is the mean squared error to the schedule's target (noise, v or x0),
optionally weighted by min-SNR-gamma (Hang et al. 2023), which converges several times faster than the plain
mean by not letting the easy, low-noise timesteps dominate. With an autoencoder the image is first encoded to
latents (a frozen part: sampled from its Gaussian, times the scaling factor, as Stable Diffusion trains).
"""

from __future__ import annotations

import torch
from torch import nn

from duomo.train.trainer import Batch


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)


class DenoisingObjective:
    """batch {"pixels" [B, 3, H, W] in [-1, 1], "tokens" [B, T]} -> {"loss", "mse"}."""

    def __init__(self, empty_tokens: torch.Tensor, caption_dropout: float = 0.1, min_snr_gamma: float = 5.0):
        """`empty_tokens` [T]: the empty caption's ids (the unconditional branch)."""
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.empty_tokens = empty_tokens
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        inner = unwrap(model)
        schedule = inner.noise_schedule
        x0 = batch["pixels"]
        if inner.autoencoder is not None:
            with torch.no_grad():
                x0 = inner.autoencoder.encode(x0).sample() * inner.autoencoder.config.scaling_factor
        b = x0.shape[0]
        tokens = batch["tokens"]
        if self.caption_dropout:
            drop = torch.rand(b) < self.caption_dropout
            empty = self.empty_tokens.to(tokens.device)[: tokens.shape[1]]
            tokens = torch.where(drop.to(tokens.device)[:, None], empty[None], tokens)
        t = torch.randint(0, schedule.config.num_train_timesteps, (b,)).to(x0.device)
        noise = torch.randn(x0.shape).to(x0.device, x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.training_target(x0, noise, t)
        pred = model(x_t, t, tokens)
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        mse = per_sample.mean()
        loss = (per_sample * self.snr_weight(schedule, t)).mean() if self.min_snr_gamma else mse
        return {"loss": loss, "mse": mse.detach()}

    def snr_weight(self, schedule: object, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v), or min(SNR, gamma) (x0)."""
        snr = schedule.snr(t).float()
        clipped = snr.clamp(max=self.min_snr_gamma)
        kind = schedule.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1)
        return clipped
