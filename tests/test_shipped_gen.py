"""The shipped generator: a UNet trained by recipes/shapes-gen.json on close-ups of the shapes world; it draws
one object in the colour the prompt names (the pixel colour check of bench/generate_quality.py), and a star
where a star is asked for (the solidity of the drawn blob: a star's points leave its hull half empty)."""

from __future__ import annotations

import torch

import duomo
from duomo.data.shapes import COLOURS
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors
from duomo.tasks.diffusion.quality import dominant_colour, object_solidity


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


def test_shapes_gen_draws_stars_and_circles() -> None:
    gen = duomo.load("shapes-gen")
    assert gen.meta["data"] == "shapes-objects"
    stars = generate_tensors(gen.model, ["a purple star"], n=8, options=GenerateOptions(seed=0))
    circles = generate_tensors(gen.model, ["a red circle"], n=8, options=GenerateOptions(seed=0))
    star_solidity = [object_solidity(im, COLOURS["purple"]) for im in stars]
    circle_solidity = [object_solidity(im, COLOURS["red"]) for im in circles]
    # rendered close-ups: stars 0.52-0.64, circles 0.95-0.98
    assert sum(s < 0.75 for s in star_solidity) >= 6, star_solidity
    assert sum(s > 0.9 for s in circle_solidity) >= 7, circle_solidity
