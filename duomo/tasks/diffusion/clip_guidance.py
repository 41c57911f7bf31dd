"""CLIP guidance: steer sampling along the gradient of a CLIP image-text similarity (CLIP-guided diffusion).

At each step the denoiser's prediction gives an estimate of the clean image x0(x_t); a CLIP scores it against
the prompt's text embedding; the gradient of that cosine with respect to x_t (through the denoiser) shifts the
predicted noise as classifier guidance does (Dhariwal & Nichol 2021):
eps' = eps - scale * sqrt(1 - abar_t) * grad.
The shifted noise is turned back into the denoiser's own parameterisation (epsilon, v or x0), so every sampler
uses it unchanged. It composes with classifier-free guidance (the wrapped `denoise` may already be guided).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _abar(schedule: object, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t broadcast to x's shape."""
    abar = schedule.alphas_cumprod.to(like.device, torch.float64)[t.reshape(-1).long().to(like.device)]
    return abar.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_eps_x0(
    output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted noise, predicted clean image) from a model output of parameterisation `kind`."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "epsilon":
        eps = output
        return eps, (x_t - s * eps) / a
    if kind == "v_prediction":
        x0 = a * x_t - s * output
        return a * output + s * x_t, x0
    x0 = output
    return (x_t - a * x0) / s, x0


def from_eps(eps: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    """The model output of parameterisation `kind` that corresponds to noise `eps` at x_t."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0 = (x_t - s * eps) / a
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    return x0


def clip_image_embeds(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP embeddings of images [B, 3, H, W] in [-1, 1], differentiably resized and normalised."""
    vision = clip.config.vision
    x = (images + 1) / 2
    if x.shape[-1] != vision.image_size:
        x = nn.functional.interpolate(x, size=(vision.image_size,) * 2, mode="bilinear", align_corners=False)
    mean = torch.tensor(vision.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(vision.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return clip.encode_image((x - mean) / std, normalize=True)


def clip_guided(
    denoise: Denoise,
    schedule: object,
    clip: nn.Module,
    text_embeds: torch.Tensor,
    scale: float,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Denoise:
    """`denoise` whose noise prediction is pushed toward higher CLIP similarity with `text_embeds` [B, D].

    `decode` maps the sampler's space to pixels in [-1, 1] (an autoencoder's decoder); None: pixel space.
    """
    kind = schedule.config.prediction_type

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            output = denoise(x_in, t)
            abar = _abar(schedule, t.expand(x.shape[0]) if t.numel() == 1 else t, x_in)
            eps, x0 = to_eps_x0(output, x_in, abar, kind)
            pixels = decode(x0) if decode is not None else x0.clamp(-1, 1)
            similarity = (clip_image_embeds(clip, pixels) * text_embeds).sum()
            (grad,) = torch.autograd.grad(similarity, x_in)
        eps = eps.detach() - scale * (1 - abar).sqrt() * grad
        return from_eps(eps, x, abar, kind).detach()

    return guided
