"""The shipped generator: a UNet trained by recipes/shapes-gen.json on the shapes world; it draws one object
in the colour the prompt names (the pixel colour check of bench/generate_quality.py)."""

from __future__ import annotations

import torch

import duomo
from duomo.data.shapes import COLOURS
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors
from duomo.tasks.diffusion.quality import dominant_colour


def test_shapes_gen_draws_the_named_colours() -> None:
    gen = duomo.load("shapes-gen")
    assert gen.model.config.denoiser_kind == "unet" and gen.image_size == 32
    right = 0
    prompts = ["a red circle", "a yellow square", "a green triangle", "a blue heart"]
    for prompt in prompts:
        images = generate_tensors(gen.model, [prompt], n=4, options=GenerateOptions(seed=0))
        assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
        right += sum(dominant_colour(im, COLOURS) == prompt.split()[1] for im in images)
    assert right >= 13, f"{right} of 16 images in the named colour"
