"""Stable Diffusion pipeline folders in diffusers' layout: read into a duomo generator, and write back.

A folder holds `model_index.json` and one sub-folder per part: `unet/`, `vae/` (config.json +
diffusion_pytorch_model.safetensors), `text_encoder/` (a transformers CLIPTextModel: config.json +
model.safetensors), `tokenizer/` (vocab.json, merges.txt, special tokens) and `scheduler/`
(scheduler_config.json). The text encoder becomes duomo's own CLIP `TextTransformer` (an identity projection:
SD conditions on token states, not on the pooled vector); SD 1.x conditions on its last layer, SD 2.x on the
penultimate one (`clip_skip=1`), both after the final LayerNorm. Weights are read safely (safetensors, or
`torch.load(weights_only=True)`), and sizes are checked before anything is allocated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers.clip import EOT_TOKEN, SOT_TOKEN, build_bpe_tokenizer, read_merges
from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits
from duomo.io.files import load_weights, read_json, save_safetensors, write_json
from duomo.io.hf import duomo_to_hf, hf_text_config, hf_text_fields, hf_to_duomo
from duomo.models.clip.config import TextConfig
from duomo.models.diffusion.autoencoder import AutoencoderConfig
from duomo.models.diffusion.schedule import ScheduleConfig
from duomo.models.diffusion.text_to_image import GeneratorConfig, TextToImage, build_text_to_image
from duomo.models.diffusion.unet import UNetConfig
from duomo.nn import skip_init

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"  # OpenAI's spelling of duomo's SOT/EOT tokens
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with a model_index.json and a unet/ sub-folder."""
    p = Path(path)
    return (p / "model_index.json").is_file() and (p / "unet").is_dir()


def _weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_NAMES[:2])})")


def _config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}: not a diffusers pipeline part")
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def read_pad_token(folder: Path) -> int | None:
    """The pad token id of a CLIP tokenizer folder: the end token (SD 1.x), "!" = 0 (SD 2.x), or None."""
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            value = read_json(folder / name).get("pad_token", pad)
            pad = value.get("content") if isinstance(value, dict) else value
            if pad is not None:
                break
    if pad is None:
        return None
    vocab = clip_vocabulary()
    key = pad if pad in vocab else f"{pad}</w>" if f"{pad}</w>" in vocab else None
    if key is None:
        raise CheckpointError(f"{folder}: pad token {pad!r} is not in the CLIP vocabulary")
    return vocab[key]


def clip_vocabulary() -> dict[str, int]:
    """CLIP's vocabulary with the special tokens spelled as OpenAI/Hugging Face spell them."""
    vocab = build_bpe_tokenizer().get_vocab()
    names = {SOT_TOKEN: HF_SOT, EOT_TOKEN: HF_EOT}
    return {names.get(token, token): i for token, i in vocab.items()}


def check_vocabulary(folder: Path) -> None:
    """The folder's vocabulary (vocab.json, or tokenizer.json's) must be CLIP's: duomo's built-in BPE
    tokenizer then encodes exactly as the folder's tokenizer does."""
    if (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    elif (folder / "tokenizer.json").is_file():
        vocab = (json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}).get(
            "vocab"
        )
    else:
        raise CheckpointError(f"{folder} has neither vocab.json nor tokenizer.json")
    if vocab != clip_vocabulary():
        raise CheckpointError(
            f"{folder}'s vocabulary is not CLIP's 49,408 tokens; duomo's generators use CLIP's BPE tokenizer"
        )


def text_tower_state(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> a duomo TextTransformer's (identity projection added)."""
    # transformers < 5 names them text_model.*, newer versions save them without the prefix
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    mapped = hf_to_duomo(state)
    tower = {k.removeprefix("text."): v for k, v in mapped.items() if k.startswith("text.")}
    tower["proj.weight"] = torch.eye(width)
    return tower


def load_parts(model: TextToImage, parts: dict[str, dict[str, torch.Tensor]], source: str) -> None:
    """Load each part's weights (denoiser, autoencoder, text) strictly; a misfit is one CheckpointError."""
    for name, state in parts.items():
        try:
            getattr(model, name).load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).splitlines()[:2])[:300]
            raise CheckpointError(f"{source}: the {name} weights do not fit its config ({detail})") from exc


def read_diffusers(
    directory: str | os.PathLike, clip_skip: int | None = None
) -> tuple[TextToImage, dict[str, Any]]:
    """(generator in eval mode, meta) from a diffusers Stable Diffusion folder.

    `clip_skip`: condition on the text states this many layers before the last (diffusers' `clip_skip`);
    None: 0, the text encoder's last layer (SD 1.x; an SD 2.x folder's text encoder already ends one layer
    early, as diffusers ships it)."""
    root = Path(directory)
    if not is_diffusers_folder(root):
        raise CheckpointError(f"{root} is not a diffusers pipeline folder (model_index.json and unet/)")
    index = read_json(root / "model_index.json")
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise CheckpointError(f"{root} lacks {', '.join(missing)}: duomo reads complete SD pipeline folders")
    try:
        unet_cfg = UNetConfig.from_dict(_config(root / "unet"))
        vae_cfg = AutoencoderConfig.from_dict(_config(root / "vae"))
        text_fields = hf_text_fields(_config(root / "text_encoder"))
        schedule, sampler = ScheduleConfig.from_diffusers(
            _config(root / "scheduler", "scheduler_config.json")
        )
        check_vocabulary(root / "tokenizer")
        downscale = 2 ** (len(vae_cfg.block_out_channels) - 1)
        gen_cfg = GeneratorConfig(
            denoiser_kind="unet",
            denoiser=unet_cfg.to_dict(),
            text=TextConfig(**text_fields),
            text_embed_dim=text_fields["width"],
            text_skip=clip_skip or 0,
            pooled=False,
            pad_token_id=read_pad_token(root / "tokenizer"),
            autoencoder=vae_cfg.to_dict(),
            schedule=schedule,
            image_size=unet_cfg.sample_size * downscale,
            sampler=sampler,
            steps=25,
            guidance=7.5,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{root}: {exc}") from exc
    files = [_weights(root / p) for p in ("unet", "vae", "text_encoder")]
    check_model_fits(lambda: build_text_to_image(gen_cfg), files, str(root))
    with skip_init():
        model = build_text_to_image(gen_cfg)
    parts = {
        "denoiser": load_weights(files[0]),
        "autoencoder": load_weights(files[1]),
        "text": text_tower_state(load_weights(files[2]), text_fields["width"]),
    }
    load_parts(model, parts, str(root))
    meta = {"source": "diffusers", "pipeline": index.get("_class_name"), "path": str(root)}
    return model.eval(), meta


def write_tokenizer(folder: Path, pad_token_id: int | None, context_length: int) -> None:
    """CLIP's vocab.json and merges.txt, and special tokens with the generator's padding (transformers'
    CLIPTokenizer reads the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocabulary()
    write_json(vocab, folder / "vocab.json")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in read_merges())
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    by_id = {i: t for t, i in vocab.items()}
    pad = HF_EOT if pad_token_id is None else by_id[pad_token_id].removesuffix("</w>")
    special = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": pad}
    write_json(special, folder / "special_tokens_map.json")
    settings = {"model_max_length": context_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    write_json({**special, **settings}, folder / "tokenizer_config.json")


def export_diffusers(model: TextToImage, directory: str | os.PathLike) -> Path:
    """A UNet+VAE generator as a diffusers folder (read by `StableDiffusionPipeline.from_pretrained`)."""
    cfg = model.config
    if cfg.denoiser_kind != "unet" or model.autoencoder is None or cfg.pooled:
        raise CheckpointError(
            "only UNet + autoencoder generators without pooled conditioning have a diffusers layout; "
            "keep DiT generators as duomo folders"
        )
    root = Path(directory)
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(parents=True, exist_ok=True)
    write_json(
        {**model.denoiser.cfg.to_dict(), "_class_name": "UNet2DConditionModel"}, root / "unet" / "config.json"
    )
    save_safetensors(model.denoiser.state_dict(), root / "unet" / "diffusion_pytorch_model.safetensors")
    write_json(
        {**model.autoencoder.config.to_dict(), "_class_name": "AutoencoderKL"}, root / "vae" / "config.json"
    )
    save_safetensors(model.autoencoder.state_dict(), root / "vae" / "diffusion_pytorch_model.safetensors")
    text_cfg = hf_text_config(cfg.text, cfg.text.width)
    text_cfg["architectures"] = ["CLIPTextModel"]
    write_json(text_cfg, root / "text_encoder" / "config.json")
    text_state = {f"text.{k}": v for k, v in model.text.state_dict().items() if k != "proj.weight"}
    text_state = duomo_to_hf(text_state)
    save_safetensors(text_state, root / "text_encoder" / "model.safetensors")
    write_tokenizer(root / "tokenizer", cfg.pad_token_id, cfg.text.context_length)
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler_class = {
        "ddim": "DDIMScheduler",
        "ddpm": "DDPMScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
    }
    write_json(
        cfg.schedule.to_diffusers(scheduler_class.get(cfg.sampler, "DPMSolverMultistepScheduler")),
        root / "scheduler" / "scheduler_config.json",
    )
    write_json(
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler_class.get(cfg.sampler, "DPMSolverMultistepScheduler")],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        root / "model_index.json",
    )
    return root
