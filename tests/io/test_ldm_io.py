"""Single-file (LDM/CompVis) Stable Diffusion checkpoints: duomo writes SD 1.x and 2.x layouts whose names
diffusers' own single-file converters read back into exactly the original modules' weights, and reads them
into a generator that makes the diffusers pipeline's images; broken files are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import duomo
from duomo.errors import CheckpointError
from duomo.io.diffusers import read_diffusers
from duomo.io.ldm import export_ldm, read_ldm
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors
from tests.io.test_diffusers_io import reference_images, tiny_pipeline

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")


def tiny_overrides(sd2: bool, scheduler: str) -> dict:
    """What the tiny test weights cannot tell (released SD models need none of this)."""
    return {
        "unet": {"attention_head_dim": [2, 4] if sd2 else 4, "norm_num_groups": 8},
        "autoencoder": {"norm_num_groups": 8},
        "text": {"heads": 4},
        "schedule": {"timestep_spacing": "linspace" if scheduler == "euler_a" else "leading"},
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheduler,sd2", [("ddim", False), ("euler_a", True)], ids=["sd1-ddim", "sd2-v-euler-a"]
)
def test_single_file_matches_diffusers(tmp_path: Path, scheduler: str, sd2: bool) -> None:
    folder = tiny_pipeline(tmp_path, scheduler, sd2)
    model, _ = read_diffusers(folder)
    file = export_ldm(model, tmp_path / "sd.safetensors")
    ckpt = load_file(file)

    # diffusers' own converters turn our LDM names into the original modules' exact weights
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert_same(single_file.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)), pipe.unet.state_dict())
    assert_same(single_file.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)), pipe.vae.state_dict())
    want_text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    want_text.pop("embeddings.position_ids", None)
    if sd2:  # OpenCLIP layout: 2 used layers + the unused top one LDM's penultimate-layer conditioning skips
        assert any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in ckpt)
        text = single_file.convert_open_clip_checkpoint(pipe.text_encoder, ckpt)
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
        text = {
            k: v for k, v in text.items() if not k.startswith("encoder.layers.2.") and "projection" not in k
        }
    else:
        text = {
            k.removeprefix("text_model."): v for k, v in single_file.convert_ldm_clip_checkpoint(ckpt).items()
        }
    assert_same(text, want_text)

    # and the file read back makes the diffusers pipeline's images
    loaded, meta = read_ldm(file, image_size=16, overrides=tiny_overrides(sd2, scheduler))
    assert meta["version"] == ("sd2" if sd2 else "sd1")
    assert meta["prediction_type"] == ("v_prediction" if sd2 else "epsilon")
    negative = "a blurry photo" if sd2 else None
    opts = GenerateOptions(steps=4, guidance=5.0, seed=3, sampler=scheduler)
    ours = generate_tensors(loaded, ["a red circle"], n=2, negative=negative, options=opts)
    want = reference_images(folder, "a red circle", negative, 4, 5.0, 3)
    assert (ours - want).abs().max() <= 1e-4

    # a second export of what was read is the same file
    again = load_file(export_ldm(loaded, tmp_path / "again.safetensors"))
    assert_same(again, ckpt)


def test_broken_single_files_are_one_line_errors(tmp_path: Path) -> None:
    folder = tiny_pipeline(tmp_path, "ddim", False)
    model, _ = read_diffusers(folder)
    file = export_ldm(model, tmp_path / "sd.safetensors")
    ckpt = load_file(file)
    overrides = tiny_overrides(False, "ddim")

    not_sd = tmp_path / "clip.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, not_sd)
    with pytest.raises(CheckpointError, match="not a single-file Stable Diffusion"):
        read_ldm(not_sd)

    missing = dict(ckpt)
    missing.pop("model.diffusion_model.out.2.weight")
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks .*out\.2\.weight"):
        read_ldm(tmp_path / "missing.safetensors", overrides=overrides)

    extra = dict(ckpt)
    extra["model.diffusion_model.input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="mystery"):
        read_ldm(tmp_path / "extra.safetensors", overrides=overrides)

    no_text = {k: v for k, v in ckpt.items() if not k.startswith("cond_stage_model.")}
    save_file(no_text, tmp_path / "no-text.safetensors")
    with pytest.raises(CheckpointError, match="no text encoder"):
        read_ldm(tmp_path / "no-text.safetensors", overrides=overrides)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_ldm(truncated)

    with pytest.raises(CheckpointError, match="unknown parts"):
        read_ldm(file, overrides={"vae": {}})

    # duomo.load takes the single-file path (with released SD's defaults, which these tiny weights do not fit)
    with pytest.raises(CheckpointError, match="sd.safetensors: .*groups"):
        duomo.load(str(file))


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_duomo_load_reads_a_released_layout_with_no_overrides(tmp_path: Path, sd2: bool) -> None:
    """A file whose shapes follow the released models' rules (64-channel heads, 32 norm groups) loads by
    name alone; SD 2.x is read as OpenCLIP text conditioned on the penultimate layer, v-prediction."""
    from duomo.api.generate import GeneratorPipeline
    from duomo.models.clip.config import TextConfig
    from duomo.models.diffusion.text_to_image import GeneratorConfig, build_text_to_image

    unet = {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": [1, 1] if sd2 else 8,
        "use_linear_projection": sd2,
    }
    vae = {
        "block_out_channels": [32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
    }
    text = TextConfig(width=64, heads=1, layers=3, act="gelu" if sd2 else "quick_gelu")
    cfg = GeneratorConfig(
        denoiser_kind="unet",
        denoiser=unet,
        text=text,
        text_embed_dim=64,
        text_skip=1 if sd2 else 0,
        pad_token_id=0 if sd2 else 49407,
        autoencoder=vae,
        image_size=16,
    )
    torch.manual_seed(0)
    model = build_text_to_image(cfg)
    file = export_ldm(model, tmp_path / "model.safetensors")
    pipe = duomo.load(str(file))
    assert isinstance(pipe, GeneratorPipeline)
    assert pipe.meta["version"] == ("sd2" if sd2 else "sd1")
    loaded = pipe.model.config
    assert loaded.schedule.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert loaded.text_skip == cfg.text_skip and loaded.image_size == (768 if sd2 else 512)
    for part in ("denoiser", "autoencoder", "text"):
        got, want = getattr(pipe.model, part).state_dict(), getattr(model, part).state_dict()
        if part == "text":  # the contrastive projection is not part of SD (conditioning uses token states)
            got.pop("proj.weight"), want.pop("proj.weight")
        assert_same(got, want)
