"""Python API for generators: `duomo.load("shapes-gen").generate("a purple star", n=4)` -> PIL images.

gen = duomo.load("shapes-gen")    # shipped; or a folder from `duomo train --task text-to-image`
images = gen.generate(["a red circle"], n=4, steps=25, guidance=4, sampler="dpm", seed=0, negative="blurry")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from duomo.io.generator import load_generator
from duomo.models.diffusion.text_to_image import TextToImage
from duomo.tasks.diffusion.generate import GenerateOptions, StepCallback, generate_tensors


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in array]


def grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side in rows of `columns` (default: about square), for a contact sheet."""
    if not images:
        raise ValueError("no images to lay out")
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


class GeneratorPipeline:
    """A text-to-image model on a device, with its defaults (sampler, steps, guidance) and provenance."""

    def __init__(self, model: TextToImage, device: torch.device, name: str = "", meta: dict | None = None):
        self.model = model.to(device).eval()
        self.device = device
        self.name = name
        self.meta = meta or {}

    @property
    def image_size(self) -> int:
        """Side of the generated images, in pixels."""
        return self.model.config.image_size

    def generate(
        self,
        prompts: str | Sequence[str],
        n: int = 1,
        negative: str | Sequence[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        eta: float = 0.0,
        batch_size: int = 16,
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        """`n` images per prompt (prompt-major order); image i is seeded `seed + i`, whatever the batch."""
        return to_pil(
            self.generate_tensors(
                prompts, n, negative, steps, guidance, sampler, seed, eta, batch_size, on_step
            )
        )

    def generate_tensors(
        self,
        prompts: str | Sequence[str],
        n: int = 1,
        negative: str | Sequence[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        eta: float = 0.0,
        batch_size: int = 16,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """As `generate`, as a tensor [N, 3, H, W] in [0, 1]."""
        options = GenerateOptions(steps=steps, guidance=guidance, sampler=sampler, seed=seed, eta=eta)
        return generate_tensors(self.model, prompts, n, negative, options, batch_size, on_step)

    def to(self, device: str | torch.device) -> GeneratorPipeline:
        """Move to a device."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


def load_generator_pipeline(
    path: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> GeneratorPipeline:
    """A generator folder on a device."""
    model, meta = load_generator(path)
    return GeneratorPipeline(model.to(device, dtype), device, name=str(path), meta=meta)


def describe(pipe: GeneratorPipeline) -> dict[str, Any]:
    """What a generator is, for `duomo models` and the server's model list."""
    cfg = pipe.model.config
    return {
        "name": pipe.name,
        "denoiser": cfg.denoiser_kind,
        "image_size": cfg.image_size,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
    }
