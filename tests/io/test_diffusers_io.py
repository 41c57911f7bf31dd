"""Stable Diffusion pipeline folders: a tiny random diffusers StableDiffusionPipeline saved with
`save_pretrained` loads into duomo and makes the same images (same prompt, seed, scheduler, steps, guidance);
duomo writes the folder back and diffusers loads it; broken folders are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import duomo
from duomo.errors import CheckpointError
from duomo.io.diffusers import export_diffusers, read_diffusers, write_tokenizer
from duomo.models.diffusion.samplers import per_image_generators
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_pipeline(folder: Path, scheduler: str, sd2: bool) -> Path:
    """Random tiny SD parts, saved by diffusers itself."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=[2, 4] if sd2 else 4,
        use_linear_projection=sd2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    with torch.no_grad():  # random everywhere, zero-initialised layers too
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            eos_token_id=2,
        )
    )
    write_tokenizer(folder / "tok-src", None if not sd2 else 0, 77)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tok-src")
    sched_cls = {"ddim": diffusers.DDIMScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler}[
        scheduler
    ]
    sched = sched_cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction" if sd2 else "epsilon",
        steps_offset=1,
        **({"clip_sample": False, "set_alpha_to_one": False} if scheduler == "ddim" else {}),
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def reference_images(folder: Path, prompt: str, negative: str | None, steps: int, guidance: float, seed: int):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        [prompt] * 2,
        negative_prompt=[negative] * 2 if negative else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=per_image_generators(seed, 2),
        output_type="pt",
    )
    return out.images


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheduler,sd2", [("ddim", False), ("euler_a", True)], ids=["sd1-ddim", "sd2-v-euler-a"]
)
def test_whole_pipeline_equals_diffusers(tmp_path: Path, scheduler: str, sd2: bool) -> None:
    folder = tiny_pipeline(tmp_path, scheduler, sd2)
    model, meta = read_diffusers(folder)
    assert meta["pipeline"] == "StableDiffusionPipeline" and model.config.sampler == scheduler
    assert model.config.pad_token_id == (0 if sd2 else 49407)
    negative = "a blurry photo" if sd2 else None
    opts = GenerateOptions(steps=4, guidance=5.0, seed=3)
    ours = generate_tensors(model, ["a red circle"], n=2, negative=negative, options=opts)
    want = reference_images(folder, "a red circle", negative, 4, 5.0, 3)
    assert ours.shape == want.shape == (2, 3, 16, 16)
    assert (ours - want).abs().max() <= 1e-4

    # and back: duomo writes the folder, diffusers reads it and makes the same images again
    out = export_diffusers(model, tmp_path / "exported")
    again = reference_images(out, "a red circle", negative, 4, 5.0, 3)
    assert (again - want).abs().max() <= 1e-5
    pipe = duomo.load(str(out))
    assert np.array(pipe.generate("a red circle", steps=2)[0]).shape == (16, 16, 3)


def test_clip_skip_conditions_on_an_earlier_layer(tmp_path: Path) -> None:
    folder = tiny_pipeline(tmp_path, "ddim", False)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        # diffusers' clip_skip: hidden_states[-(clip_skip + 1)] through the final LayerNorm (computed here
        # directly: diffusers reaches text_encoder.text_model, which transformers 5 no longer has)
        encoder = pipe.text_encoder
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        want = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        model, _ = read_diffusers(folder, clip_skip=1)
        from duomo.tasks.diffusion.generate import tokenize

        assert torch.equal(tokenize(model, ["a cat"]), ids)
        got = model.text_states(ids)
    assert (got - want).abs().max() <= 1e-5


def test_broken_folders_are_one_line_errors(tmp_path: Path) -> None:
    folder = tiny_pipeline(tmp_path, "ddim", False)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match="lacks vae"):
        read_diffusers(bad)
    shutil.copytree(folder / "vae", bad / "vae")
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        read_diffusers(bad)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", bad / "unet")
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["layers_per_block"] = "two"
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="whole number"):
        read_diffusers(bad)
    config["layers_per_block"] = 2
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        read_diffusers(bad)
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        read_diffusers(tmp_path / "nowhere")
