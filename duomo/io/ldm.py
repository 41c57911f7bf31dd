"""Single-file Stable Diffusion 1.x / 2.x checkpoints (the CompVis/LDM key names), read and written.

An LDM file holds the whole pipeline in one state dict: the UNet under `model.diffusion_model.` (input_blocks,
middle_block, output_blocks), the KL autoencoder under `first_stage_model.` (encoder.down.*, mid.attn_1 as
1x1 convolutions) and the text encoder under `cond_stage_model.`: SD 1.x keeps transformers' CLIPTextModel
(`transformer.text_model.*`, conditioned on the last layer), SD 2.x OpenCLIP's text transformer
(`model.transformer.resblocks.*`, conditioned on the penultimate layer then the final LayerNorm).

The mapping to duomo's (= diffusers') names is built from the model's structure, one table per module kind,
and used both ways; the shapes of the file decide the config (stages, channels, layers, attention placement,
projection kind), and what weights cannot tell (heads, image size, prediction type) takes the released models'
values unless overridden.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits
from duomo.io.diffusers import load_parts, text_tower_state
from duomo.io.files import load_weights, save_safetensors
from duomo.io.hf import duomo_to_hf, hf_text_fields
from duomo.io.openclip import duomo_to_openclip, openclip_to_duomo
from duomo.models.clip.config import TextConfig
from duomo.models.diffusion.autoencoder import AutoencoderConfig
from duomo.models.diffusion.schedule import ScheduleConfig
from duomo.models.diffusion.text_to_image import GeneratorConfig, TextToImage, build_text_to_image
from duomo.models.diffusion.unet import UNetConfig
from duomo.nn import skip_init

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_HF = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel
CLIP_OPEN = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text transformer
SD_PAD = {"sd1": 49407, "sd2": 0}  # SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!"

# sub-module renames inside one block: (LDM suffix, diffusers suffix)
UNET_RESNET = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
]
VAE_RESNET = [("nin_shortcut.", "conv_shortcut.")]
VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]
KINDS = {"plain": [], "unet_resnet": UNET_RESNET, "vae_resnet": VAE_RESNET, "vae_attention": VAE_ATTENTION}

Prefixes = list[tuple[str, str, str]]  # (LDM prefix, diffusers prefix, kind)


def unet_prefixes(cfg: UNetConfig) -> Prefixes:
    """Every UNet module's LDM prefix and diffusers prefix, for this config's stages and layers."""
    out: Prefixes = [
        ("time_embed.0.", "time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "time_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "conv_in.", "plain"),
        ("out.0.", "conv_norm_out.", "plain"),
        ("out.2.", "conv_out.", "plain"),
        ("middle_block.0.", "mid_block.resnets.0.", "unet_resnet"),
        ("middle_block.1.", "mid_block.attentions.0.", "plain"),
        ("middle_block.2.", "mid_block.resnets.1.", "unet_resnet"),
    ]
    stages, layers = len(cfg.block_out_channels), cfg.layers_per_block
    i = 1
    for s, kind in enumerate(cfg.down_block_types):
        for layer in range(layers):
            out.append((f"input_blocks.{i}.0.", f"down_blocks.{s}.resnets.{layer}.", "unet_resnet"))
            if kind.startswith("CrossAttn"):
                out.append((f"input_blocks.{i}.1.", f"down_blocks.{s}.attentions.{layer}.", "plain"))
            i += 1
        if s < stages - 1:
            out.append((f"input_blocks.{i}.0.op.", f"down_blocks.{s}.downsamplers.0.conv.", "plain"))
            i += 1
    i = 0
    for s, kind in enumerate(cfg.up_block_types):
        for layer in range(layers + 1):
            out.append((f"output_blocks.{i}.0.", f"up_blocks.{s}.resnets.{layer}.", "unet_resnet"))
            j = 1
            if kind.startswith("CrossAttn"):
                out.append((f"output_blocks.{i}.1.", f"up_blocks.{s}.attentions.{layer}.", "plain"))
                j = 2
            if layer == layers and s < stages - 1:
                out.append((f"output_blocks.{i}.{j}.conv.", f"up_blocks.{s}.upsamplers.0.conv.", "plain"))
            i += 1
    return out


def vae_prefixes(cfg: AutoencoderConfig) -> Prefixes:
    """Every autoencoder module's LDM prefix and diffusers prefix."""
    out: Prefixes = [
        ("quant_conv.", "quant_conv.", "plain"),
        ("post_quant_conv.", "post_quant_conv.", "plain"),
    ]
    stages, layers = len(cfg.block_out_channels), cfg.layers_per_block
    for part in ("encoder", "decoder"):
        out += [
            (f"{part}.conv_in.", f"{part}.conv_in.", "plain"),
            (f"{part}.conv_out.", f"{part}.conv_out.", "plain"),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", "plain"),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vae_resnet"),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vae_resnet"),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vae_attention"),
        ]
    for s in range(stages):
        for layer in range(layers):
            out.append(
                (
                    f"encoder.down.{s}.block.{layer}.",
                    f"encoder.down_blocks.{s}.resnets.{layer}.",
                    "vae_resnet",
                )
            )
        if s < stages - 1:
            out.append(
                (
                    f"encoder.down.{s}.downsample.conv.",
                    f"encoder.down_blocks.{s}.downsamplers.0.conv.",
                    "plain",
                )
            )
        ldm = stages - 1 - s  # LDM numbers the decoder's stages from the smallest resolution up
        for layer in range(layers + 1):
            out.append(
                (f"decoder.up.{ldm}.block.{layer}.", f"decoder.up_blocks.{s}.resnets.{layer}.", "vae_resnet")
            )
        if s < stages - 1:
            out.append(
                (f"decoder.up.{ldm}.upsample.conv.", f"decoder.up_blocks.{s}.upsamplers.0.conv.", "plain")
            )
    return out


def _rename(key: str, prefixes: Prefixes, to_ldm: bool) -> tuple[str, str] | None:
    """(new name, module kind) of one key, by the longest matching prefix and its kind's sub-renames
    (None: no prefix matches)."""
    best = None
    for ldm, diff, kind in prefixes:
        src = diff if to_ldm else ldm
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, ldm if to_ldm else diff, kind)
    if best is None:
        return None
    src, dst, kind = best
    rest = key[len(src) :]
    for ldm_sub, diff_sub in KINDS[kind]:
        sub_src, sub_dst = (diff_sub, ldm_sub) if to_ldm else (ldm_sub, diff_sub)
        if rest.startswith(sub_src):
            rest = sub_dst + rest[len(sub_src) :]
            break
    return dst + rest, kind


def rename_state(
    state: Mapping[str, torch.Tensor], prefixes: Prefixes, to_ldm: bool, source: str
) -> dict[str, torch.Tensor]:
    """A whole module's state dict renamed; keys no prefix covers are named in the error."""
    out, unknown = {}, []
    for key, value in state.items():
        renamed = _rename(key, prefixes, to_ldm)
        if renamed is None:
            unknown.append(key)
            continue
        name, kind = renamed
        out[name] = _attention_weight(value, to_ldm) if kind == "vae_attention" else value
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise CheckpointError(f"{source}: {len(unknown)} unexpected keys for this layout ({shown})")
    return out


def _attention_weight(value: torch.Tensor, to_ldm: bool) -> torch.Tensor:
    """LDM's autoencoder attention projects with 1x1 convolutions, diffusers' with linear layers."""
    if to_ldm and value.ndim == 2:
        return value[:, :, None, None]
    if not to_ldm and value.ndim == 4:
        return value[:, :, 0, 0]
    return value


# --- reading ------------------------------------------------------------------------------------------------
def is_ldm_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a single-file SD checkpoint."""
    return any(k.startswith(UNET) for k in state) and any(k.startswith(VAE) for k in state)


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children `prefix<i>.` has."""
    found = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return len([f for f in found if f.isdigit()])


def infer_unet(state: Mapping[str, torch.Tensor], version: str) -> dict[str, Any]:
    """UNetConfig fields from LDM UNet weights (heads: SD 1.x's 8 per stage, SD 2.x's 64 channels each)."""
    inputs = _count(state, "input_blocks.")
    ops = sorted(
        int(k.split(".")[1]) for k in state if k.startswith("input_blocks.") and k.endswith(".0.op.weight")
    )
    layers = (ops[0] - 1) if ops else inputs - 1
    channels, down, linear, cross, depth = [], [], False, None, 1
    i = 1
    while i < inputs:
        channels.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        attn = f"input_blocks.{i}.1.proj_in.weight"
        down.append("CrossAttnDownBlock2D" if attn in state else "DownBlock2D")
        if attn in state:
            linear = state[attn].ndim == 2
            cross = state[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
            depth = _count(state, f"input_blocks.{i}.1.transformer_blocks.")
        i += layers + 1
    if cross is None:
        cross = state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    heads: int | list[int] = 8 if version == "sd1" else [max(1, c // 64) for c in channels]
    up = [t.replace("Down", "Up") for t in reversed(down)]
    return {
        "in_channels": state["input_blocks.0.0.weight"].shape[1],
        "out_channels": state["out.2.weight"].shape[0],
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
    }


def infer_autoencoder(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderConfig fields from LDM autoencoder weights."""
    stages = _count(state, "encoder.down.")
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "block_out_channels": [
            state[f"encoder.down.{s}.block.0.conv1.weight"].shape[0] for s in range(stages)
        ],
        "down_block_types": ["DownEncoderBlock2D"] * stages,
        "up_block_types": ["UpDecoderBlock2D"] * stages,
        "layers_per_block": _count(state, "encoder.down.0.block."),
        "latent_channels": state["quant_conv.weight"].shape[0] // 2,
    }


def read_text(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, Any]
) -> tuple[str, TextConfig, dict]:
    """(version, text config, duomo text-tower weights) of the file's text encoder."""
    if any(k.startswith(CLIP_OPEN) for k in state):
        mapped = openclip_to_duomo(_part(state, CLIP_OPEN))
        tower = {k.removeprefix("text."): v for k, v in mapped.items() if k.startswith("text.")}
        tower.pop("proj.weight", None)  # the contrastive projection: generation never uses it
        width = tower["token_embed.weight"].shape[1]
        fields = {
            "vocab_size": tower["token_embed.weight"].shape[0],
            "context_length": tower["pos_embed"].shape[0],
            "width": width,
            "layers": _count(tower, "transformer.blocks."),
            "heads": max(1, width // 64),
            "mlp_ratio": tower["transformer.blocks.0.mlp.fc1.weight"].shape[0] / width,
            "act": "gelu",
            "pool": "argmax",
        }
        version = "sd2"
    elif any(k.startswith(CLIP_HF) for k in state):
        hf = _part(state, CLIP_HF)
        hf = {k.removeprefix("text_model."): v for k, v in hf.items() if not k.endswith("position_ids")}
        width = hf["embeddings.token_embedding.weight"].shape[1]
        fields = hf_text_fields(
            {
                "vocab_size": hf["embeddings.token_embedding.weight"].shape[0],
                "max_position_embeddings": hf["embeddings.position_embedding.weight"].shape[0],
                "hidden_size": width,
                "num_hidden_layers": _count(hf, "encoder.layers."),
                "num_attention_heads": max(1, width // 64),
                "intermediate_size": hf["encoder.layers.0.mlp.fc1.weight"].shape[0],
                "hidden_act": "quick_gelu",
            }
        )
        tower = None
        version = "sd1"
    else:
        raise CheckpointError(
            "the checkpoint has no text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)"
        )
    cfg = TextConfig(**{**fields, **overrides})
    if tower is None:
        tower = text_tower_state(hf, cfg.width)
    else:
        tower["proj.weight"] = torch.eye(cfg.width)
    return version, cfg, tower


def read_ldm(
    path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    image_size: int | None = None,
    clip_skip: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TextToImage, dict[str, Any]]:
    """(generator in eval mode, meta) from a single-file SD 1.x / 2.x checkpoint (.safetensors or .ckpt).

    `prediction_type`: "epsilon" or "v_prediction" (default: epsilon for SD 1.x, v for SD 2.x, as the
    768 px 2.x releases); `image_size`: 512 (SD 1.x) / 768 (SD 2.x) by default; `overrides`: config fields
    the weights cannot tell, by part ("unet", "autoencoder", "text", "schedule"), e.g.
    {"unet": {"attention_head_dim": 4}}. The schedule is SD's (scaled linear 0.00085-0.012, leading).
    `state`: the file's weights when already read (`ldm_state`), so they are not read twice."""
    path = Path(path)
    state = load_weights(path) if state is None else state
    if not is_ldm_checkpoint(state):
        raise CheckpointError(
            f"{path} is not a single-file Stable Diffusion checkpoint (no model.diffusion_model.* and "
            "first_stage_model.* weights)"
        )
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"unet", "autoencoder", "text", "schedule"}
    if unknown:
        raise CheckpointError(
            f"overrides for unknown parts {sorted(unknown)}; use unet, autoencoder, text, schedule"
        )
    unet_state, vae_state = _part(state, UNET), _part(state, VAE)
    try:
        version, text_cfg, text_state = read_text(state, overrides.get("text", {}))
        unet_cfg = UNetConfig(**{**infer_unet(unet_state, version), **overrides.get("unet", {})})
        vae_cfg = AutoencoderConfig(**{**infer_autoencoder(vae_state), **overrides.get("autoencoder", {})})
    except KeyError as exc:
        raise CheckpointError(f"{path}: the checkpoint lacks {exc.args[0]}; is it complete?") from exc
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    v = version == "sd2"
    prediction = prediction_type or ("v_prediction" if v else "epsilon")
    size = image_size or (768 if v else 512)
    try:
        schedule = ScheduleConfig(**{"prediction_type": prediction, **overrides.get("schedule", {})})
        gen_cfg = GeneratorConfig(
            denoiser_kind="unet",
            denoiser={
                **unet_cfg.to_dict(),
                "sample_size": size // 2 ** (len(vae_cfg.block_out_channels) - 1),
            },
            text=text_cfg,
            text_embed_dim=text_cfg.width,
            text_skip=clip_skip + (1 if v else 0),  # SD 2.x conditions on the penultimate layer
            pooled=False,
            pad_token_id=SD_PAD[version],
            autoencoder=vae_cfg.to_dict(),
            schedule=schedule,
            image_size=size,
            sampler="dpm",
            steps=25,
            guidance=7.5,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    check_model_fits(lambda: build_text_to_image(gen_cfg), [path], str(path))
    with skip_init():
        model = build_text_to_image(gen_cfg)
    parts = {
        "denoiser": rename_state(unet_state, unet_prefixes(unet_cfg), False, f"{path} (unet)"),
        "autoencoder": rename_state(vae_state, vae_prefixes(vae_cfg), False, f"{path} (autoencoder)"),
        "text": text_state,
    }
    load_parts(model, parts, str(path))
    meta = {
        "source": "ldm",
        "version": version,
        "path": str(path),
        "prediction_type": gen_cfg.schedule.prediction_type,
    }
    return model.eval(), meta


# --- writing ------------------------------------------------------------------------------------------------
def _text_for_ldm(model: TextToImage) -> dict[str, torch.Tensor]:
    """The text tower under LDM's names: OpenCLIP (penultimate layer) for a GELU tower padded with "!", else
    transformers' CLIPTextModel (last layer). Layers above the ones conditioning uses are left out; an SD 2.x
    layout that conditions on its last layer gets one unused layer on top (LDM always skips the last)."""
    cfg = model.config
    used = cfg.text.layers - cfg.text_skip
    tower = {k: v for k, v in model.text.state_dict().items() if k != "proj.weight"}
    keep = {k: v for k, v in tower.items() if not _layer_above(k, used)}
    if cfg.pad_token_id == 0:
        if cfg.text_skip == 0:
            src = f"transformer.blocks.{used - 1}."
            keep.update(
                {
                    f"transformer.blocks.{used}.{k[len(src) :]}": torch.zeros_like(v)
                    for k, v in tower.items()
                    if k.startswith(src)
                }
            )
        else:
            src = f"transformer.blocks.{used}."
            keep.update({k: v for k, v in tower.items() if k.startswith(src)})
        keep["proj.weight"] = torch.eye(cfg.text.width)
        named = duomo_to_openclip({f"text.{k}": v for k, v in keep.items()})
        return {CLIP_OPEN + k: v for k, v in named.items()}
    named = duomo_to_hf({f"text.{k}": v for k, v in keep.items()})
    return {CLIP_HF + k: v for k, v in named.items() if k.startswith("text_model.")}


def _layer_above(key: str, used: int) -> bool:
    prefix = "transformer.blocks."
    return key.startswith(prefix) and int(key[len(prefix) :].split(".")[0]) >= used


def export_ldm(model: TextToImage, path: str | os.PathLike) -> Path:
    """A UNet + autoencoder generator as one LDM-layout .safetensors file (read by `read_ldm`, diffusers'
    `from_single_file` and the CompVis/A1111-style tools)."""
    cfg = model.config
    if cfg.denoiser_kind != "unet" or model.autoencoder is None or cfg.pooled:
        raise CheckpointError("only UNet + autoencoder generators have an LDM single-file layout")
    if cfg.pad_token_id == 0 and cfg.text_skip > 1:
        raise CheckpointError(
            "an SD 2.x layout conditions on the penultimate text layer; this model skips more"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: write single-file checkpoints as .safetensors")
    unet = rename_state(model.denoiser.state_dict(), unet_prefixes(model.denoiser.cfg), True, "unet")
    vae = rename_state(model.autoencoder.state_dict(), vae_prefixes(model.autoencoder.config), True, "vae")
    state = {UNET + k: v for k, v in unet.items()}
    state.update({VAE + k: v for k, v in vae.items()})
    state.update(_text_for_ldm(model))
    save_safetensors({k: v.contiguous() for k, v in state.items()}, path)
    return path


def ldm_state(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The weights of a single-file SD checkpoint, or None when the file is not one (.safetensors: told by
    the key names without reading tensors; .ckpt, SD's pickle convention: read once, safely)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".safetensors", ".ckpt"):
        return None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if not is_ldm_checkpoint(dict.fromkeys(f.keys())):
                    return None
        except (SafetensorError, OSError, ValueError):
            return None
    state = load_weights(path)
    return state if is_ldm_checkpoint(state) else None
