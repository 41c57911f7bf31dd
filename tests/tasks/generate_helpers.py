"""Tiny random generators for the generation tests: a 1-layer CLIP text tower and a 1-block DiT."""

from __future__ import annotations

import torch

from duomo.models.clip.config import TextConfig
from duomo.models.diffusion.text_to_image import GeneratorConfig, TextToImage, build_text_to_image

TEXT = TextConfig(context_length=16, width=16, layers=2, heads=2)
EMBED = 8


def tiny_generator_config(**overrides: object) -> GeneratorConfig:
    """A pixel-space DiT generator at 8 px conditioned on a 16-wide text tower, pooled text on."""
    fields = {
        "denoiser_kind": "dit",
        "denoiser": {
            "image_size": 8,
            "in_channels": 3,
            "patch_size": 2,
            "width": 16,
            "layers": 1,
            "heads": 2,
            "context_dim": TEXT.width,
            "pooled_dim": EMBED,
            "frequency_dim": 16,
        },
        "text": TEXT,
        "text_embed_dim": EMBED,
        "pooled": True,
        "image_size": 8,
        "steps": 4,
        "guidance": 2.0,
        "sampler": "ddim",
    }
    fields.update(overrides)
    return GeneratorConfig(**fields)


def tiny_generator(seed: int = 0, **overrides: object) -> TextToImage:
    """The tiny generator with every weight random (zero-initialised layers too), in eval mode."""
    torch.manual_seed(seed)
    model = build_text_to_image(tiny_generator_config(**overrides))
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()
