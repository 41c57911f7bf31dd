"""Generating images: seeds independent of batching, guidance and negative prompts, CLIP guidance, the
generator folder round trip, and one-line errors for bad requests."""

from __future__ import annotations

import json

import pytest
import torch
from generate_helpers import tiny_generator

from duomo.errors import CheckpointError, InputError, UnknownModelError
from duomo.io.generator import is_generator_folder, load_generator, save_generator
from duomo.models.clip.config import CLIPConfig, TextConfig, VisionConfig
from duomo.models.factory import create_model
from duomo.tasks.diffusion.clip_guidance import from_eps, to_eps_x0
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors, tokenize


@pytest.fixture(scope="module")
def model():
    return tiny_generator()


def test_images_in_range_and_seeded(model) -> None:
    a = generate_tensors(model, ["a red circle", "a blue star"], n=2)
    assert a.shape == (4, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, generate_tensors(model, ["a red circle", "a blue star"], n=2))
    other = generate_tensors(model, ["a red circle"], n=1, options=GenerateOptions(seed=5))
    assert not torch.allclose(a[0], other[0])


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "euler_a", "ddpm"])
def test_a_seed_gives_the_same_image_whatever_the_batch(model, sampler: str) -> None:
    opts = GenerateOptions(sampler=sampler, seed=3)
    together = generate_tensors(model, ["a red circle", "a blue star"], n=2, options=opts, batch_size=4)
    one_by_one = generate_tensors(model, ["a red circle", "a blue star"], n=2, options=opts, batch_size=1)
    assert (together - one_by_one).abs().max() < 1e-5


def test_guidance_and_negative_prompts(model) -> None:
    base = generate_tensors(model, ["a red circle"], options=GenerateOptions(guidance=3.0))
    negative = generate_tensors(
        model, ["a red circle"], negative="a blue star", options=GenerateOptions(guidance=3.0)
    )
    assert not torch.allclose(base, negative)
    # guidance 1: the conditional prediction alone, whatever the negative prompt says
    plain = generate_tensors(model, ["a red circle"], options=GenerateOptions(guidance=1.0))
    plain_neg = generate_tensors(model, ["a red circle"], negative="x", options=GenerateOptions(guidance=1.0))
    assert torch.allclose(plain, plain_neg)


def test_prompts_are_padded_to_the_full_context(model) -> None:
    ids = tokenize(model, ["a", "a much longer prompt than the other one"])
    assert ids.shape == (2, model.config.text.context_length)


def test_bad_requests_are_one_line_errors(model) -> None:
    with pytest.raises(InputError, match="n must"):
        generate_tensors(model, ["x"], n=0)
    with pytest.raises(InputError, match="steps must"):
        generate_tensors(model, ["x"], options=GenerateOptions(steps=0))
    with pytest.raises(InputError, match="guidance must"):
        generate_tensors(model, ["x"], options=GenerateOptions(guidance=-1))
    with pytest.raises((InputError, UnknownModelError), match="dpm"):
        generate_tensors(model, ["x"], options=GenerateOptions(sampler="dpn"))
    with pytest.raises(InputError, match="characters"):
        generate_tensors(model, ["x" * 5000])
    with pytest.raises(InputError, match="at least one"):
        generate_tensors(model, [])
    with pytest.raises(InputError, match="one negative prompt or one per prompt"):
        generate_tensors(model, ["a", "b", "c"], negative=["x", "y"])
    with pytest.raises(InputError, match="clip_guidance needs"):
        generate_tensors(model, ["x"], options=GenerateOptions(clip_guidance=10))


def test_prediction_conversions_round_trip() -> None:
    x_t, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    abar = torch.tensor([0.3, 0.9]).view(2, 1, 1, 1)
    for kind in ("epsilon", "v_prediction", "sample"):
        eps, x0 = to_eps_x0(out, x_t, abar, kind)
        assert torch.allclose(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, x_t, atol=1e-5)
        assert torch.allclose(from_eps(eps, x_t, abar, kind), out, atol=1e-5)


def test_clip_guidance_steers_toward_the_prompt(model) -> None:
    torch.manual_seed(0)
    clip = create_model(
        CLIPConfig(
            embed_dim=8,
            vision=VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2),
            text=TextConfig(context_length=16, width=16, layers=1, heads=2),
        )
    ).eval()
    from duomo.tasks.diffusion.clip_guidance import clip_image_embeds
    from duomo.tasks.diffusion.generate import clip_text_embeds

    prompts = ["a red circle", "a blue star", "a green heart", "a pink cross"]
    text = clip_text_embeds(clip, prompts, torch.device("cpu"))

    def similarity(scale: float) -> float:
        opts = GenerateOptions(clip_guidance=scale, seed=1)
        images = generate_tensors(model, prompts, options=opts, clip=clip)
        with torch.no_grad():
            return float((clip_image_embeds(clip, images * 2 - 1) * text).sum(-1).mean())

    assert similarity(200.0) > similarity(0.0) + 1e-3


def test_generator_folder_round_trip_and_errors(model, tmp_path) -> None:
    folder = save_generator(model, tmp_path / "gen", {"note": "test"})
    assert is_generator_folder(folder)
    loaded, meta = load_generator(folder)
    assert meta == {"note": "test"}
    assert torch.equal(generate_tensors(model, ["a red circle"]), generate_tensors(loaded, ["a red circle"]))

    import duomo

    pipe = duomo.load(str(folder))
    assert pipe.generate("a red circle")[0].size == (8, 8)

    config = json.loads((folder / "config.json").read_text())
    config["model"]["denoiser"]["width"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_generator(folder)
    config["model"]["denoiser"]["widht"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown denoiser config fields"):
        load_generator(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_generator(folder)
    with pytest.raises(CheckpointError, match="not a generator folder"):
        load_generator(tmp_path / "missing")
