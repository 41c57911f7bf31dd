"""Hugging Face `transformers` CLIPModel directories <-> duomo (config.json + model.safetensors)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits, shard_files
from duomo.io.files import StateDict, load_weights, read_json, save_safetensors, write_json
from duomo.io.native import model_config
from duomo.io.openclip import mlp_ratio
from duomo.models import CLIPConfig, TextConfig, create_model

# (HF name, duomo name) outside the encoder stacks.
TOP_LEVEL = [
    ("logit_scale", "logit_scale"),
    ("visual_projection.weight", "visual.proj.weight"),
    ("text_projection.weight", "text.proj.weight"),
    ("vision_model.embeddings.class_embedding", "visual.cls_token"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.patch_embed.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.pos_embed"),
    ("vision_model.pre_layrnorm.weight", "visual.norm_pre.weight"),  # sic: HF's spelling
    ("vision_model.pre_layrnorm.bias", "visual.norm_pre.bias"),
    ("vision_model.post_layernorm.weight", "visual.norm.weight"),
    ("vision_model.post_layernorm.bias", "visual.norm.bias"),
    ("text_model.embeddings.token_embedding.weight", "text.token_embed.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
    ("text_model.final_layer_norm.weight", "text.norm.weight"),
    ("text_model.final_layer_norm.bias", "text.norm.bias"),
]
STACKS = [
    ("vision_model.encoder.layers.", "visual.transformer.blocks."),
    ("text_model.encoder.layers.", "text.transformer.blocks."),
]
BLOCK = [
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.out_proj", "attn.proj"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
QKV = ("q_proj", "k_proj", "v_proj")
# HF's text pooling before transformers PR #24773: eos_token_id == 2 means "take the highest token id".
LEGACY_ARGMAX_EOS = 2
ACTS_FROM_HF = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACTS_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _split(key: str, stacks: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """(destination stack prefix, layer index, rest) for a key inside an encoder stack."""
    for src, dst in stacks:
        if key.startswith(src):
            index, _, rest = key[len(src) :].partition(".")
            return dst, index, rest
    return None


def hf_to_duomo(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers CLIPModel state dict -> duomo names (q/k/v fused into one qkv projection)."""
    top = dict(TOP_LEVEL)
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        parts = _split(key, STACKS)
        if key in top:
            out[top[key]] = value
        elif parts and (m := re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", parts[2])):
            qkv.setdefault(f"{parts[0]}{parts[1]}.attn.qkv.{m.group(2)}", {})[m.group(1)] = value
        elif parts:
            dst, index, rest = parts
            for src_name, dst_name in BLOCK:
                if rest.startswith(src_name + "."):
                    rest = dst_name + rest[len(src_name) :]
                    break
            out[f"{dst}{index}.{rest}"] = value
        else:
            out[key] = value
    for name, pieces in qkv.items():
        if set(pieces) != set(QKV):
            raise CheckpointError(
                f"{name}: HF checkpoint has {sorted(pieces)} of q/k/v projections, needs all three"
            )
        out[name] = torch.cat([pieces[p] for p in QKV])
    return out


def duomo_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """duomo state dict -> transformers CLIPModel names (qkv split into q/k/v projections)."""
    top = {d: h for h, d in TOP_LEVEL}
    stacks = [(d, h) for h, d in STACKS]
    out: StateDict = {}
    for key, value in sd.items():
        parts = _split(key, stacks)
        if key in top:
            out[top[key]] = value
        elif parts and parts[2].startswith("attn.qkv."):
            dst, index, rest = parts
            for proj, chunk in zip(QKV, value.chunk(3), strict=True):
                out[f"{dst}{index}.self_attn.{proj}.{rest.rsplit('.', 1)[1]}"] = chunk
        elif parts:
            dst, index, rest = parts
            for hf_name, duomo_name in BLOCK:
                if rest.startswith(duomo_name + "."):
                    rest = hf_name + rest[len(duomo_name) :]
                    break
            out[f"{dst}{index}.{rest}"] = value
        else:
            out[key] = value
    return out


def _act(name: str, tower: str) -> str:
    if name not in ACTS_FROM_HF:
        raise CheckpointError(
            f"HF {tower} hidden_act {name!r} is not supported; duomo has {sorted(ACTS_FROM_HF)}"
        )
    return ACTS_FROM_HF[name]


# transformers' CLIPVisionConfig defaults (ViT-B-32), for keys a config.json leaves out
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 32,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}


def hf_vision_fields(
    vc: Mapping[str, Any],
    preprocessor: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] = CLIP_VISION_DEFAULTS,
) -> dict[str, Any]:
    """duomo's `vision` section of a transformers CLIP-style vision config (CLIP, Chinese-CLIP and AltCLIP
    share it), with the mean/std of a preprocessor_config.json when there is one."""
    v = {**defaults, **vc}
    vision = {
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "width": v["hidden_size"],
        "layers": v["num_hidden_layers"],
        "heads": v["num_attention_heads"],
        "mlp_ratio": mlp_ratio(v["intermediate_size"], v["hidden_size"]),
        "act": _act(v.get("hidden_act", "quick_gelu"), "vision"),
        "norm_eps": v.get("layer_norm_eps", 1e-5),
    }
    if preprocessor and "image_mean" in preprocessor and "image_std" in preprocessor:
        vision["mean"], vision["std"] = preprocessor["image_mean"], preprocessor["image_std"]
    return vision


def hf_text_fields(tc: Mapping[str, Any]) -> dict[str, Any]:
    """duomo TextConfig fields of a transformers CLIPTextConfig dict (a CLIPModel's text_config, or the
    config.json of a CLIPTextModel such as Stable Diffusion's text encoder)."""
    width = tc.get("hidden_size", 512)
    eos = tc.get("eos_token_id", 49407)
    return {
        "vocab_size": tc.get("vocab_size", 49408),
        "context_length": tc.get("max_position_embeddings", 77),
        "width": width,
        "layers": tc.get("num_hidden_layers", 12),
        "heads": tc.get("num_attention_heads", 8),
        "mlp_ratio": mlp_ratio(tc.get("intermediate_size", 2048), width),
        "act": _act(tc.get("hidden_act", "quick_gelu"), "text"),
        "norm_eps": tc.get("layer_norm_eps", 1e-5),
        "pool": "argmax" if eos == LEGACY_ARGMAX_EOS else "eos",
        "eos_token_id": TextConfig.eos_token_id if eos == LEGACY_ARGMAX_EOS else eos,
    }


def hf_text_config(t: TextConfig, projection_dim: int) -> dict[str, Any]:
    """A transformers CLIPTextConfig dict of a duomo text tower."""
    if t.kind != "transformer" or t.pool not in ("argmax", "eos"):
        raise CheckpointError(
            f"text tower {t.kind!r} with pooling {t.pool!r} has no transformers CLIP equivalent"
        )
    if t.act not in ACTS_TO_HF:
        raise CheckpointError(f"activation {t.act!r} has no transformers equivalent")
    text = {
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": int(t.width * t.mlp_ratio),
        "projection_dim": projection_dim,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": ACTS_TO_HF[t.act],
        "layer_norm_eps": t.norm_eps,
        "eos_token_id": LEGACY_ARGMAX_EOS if t.pool == "argmax" else t.eos_token_id,
    }
    if t.pool == "argmax":
        text.update(bos_token_id=0, pad_token_id=1)  # as in OpenAI's original HF configs
    return text


def hf_config_to_duomo(
    config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
) -> CLIPConfig:
    """transformers CLIPConfig dict (and optional preprocessor_config.json) -> `CLIPConfig`."""
    if config.get("model_type") not in (None, "clip") or "vision_config" not in config:
        raise CheckpointError(
            f"HF config of model_type {config.get('model_type')!r} is not a CLIP dual encoder"
        )
    # Configs from older transformers keep the real values in *_config_dict, which wins over *_config.
    vc = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    tc = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
    try:
        vision = hf_vision_fields(vc, preprocessor)
        text = hf_text_fields(tc)
        return CLIPConfig.from_dict(
            {
                "embed_dim": config.get("projection_dim", 512),
                "vision": vision,
                "text": text,
                "init_logit_scale": config.get("logit_scale_init_value", 2.6592),
            }
        )
    except (ConfigError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"malformed HF CLIP config: {exc}") from exc


def duomo_config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """`CLIPConfig` -> transformers CLIPConfig dict (config.json of a CLIPModel directory)."""
    v, t = cfg.vision, cfg.text
    if v.pool != "tok":
        raise CheckpointError(
            f"vision pooling {v.pool!r} has no transformers CLIP equivalent (it uses the class token)"
        )
    if v.stem != "patch":
        raise CheckpointError(f"vision stem {v.stem!r} has no transformers CLIP equivalent")
    if v.act not in ACTS_TO_HF:
        raise CheckpointError(f"activation {v.act!r} has no transformers equivalent")
    text = hf_text_config(t, cfg.embed_dim)
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": int(v.width * v.mlp_ratio),
        "projection_dim": cfg.embed_dim,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": ACTS_TO_HF[v.act],
        "layer_norm_eps": v.norm_eps,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
    }


def preprocessor_config(cfg: CLIPConfig) -> dict[str, Any]:
    """A CLIPImageProcessor config with the model's input size and normalisation."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.vision.mean),
        "image_std": list(cfg.vision.std),
        "do_convert_rgb": True,
    }


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a transformers CLIP config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = read_json(config)
    return data.get("model_type") == "clip" or ("vision_config" in data and "text_config" in data)


def _hf_weight_files(directory: Path) -> list[Path]:
    """model.safetensors, its shards (model.safetensors.index.json, kept inside the folder), or
    pytorch_model.bin."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if index.is_file():
        return shard_files(index)
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    raise CheckpointError(
        f"{directory} has no model.safetensors or pytorch_model.bin next to its config.json"
    )


def read_hf_weights(directory: Path, cfg: CLIPConfig) -> StateDict:
    """The raw state dict of a transformers model folder (one file or shards), once its config is known to
    fit the weights' size (checked before any weight is read)."""
    files = _hf_weight_files(directory)
    check_model_fits(lambda: create_model(cfg), files, str(directory))
    return {k: v for f in files for k, v in load_weights(f).items()}


def read_preprocessor(directory: Path) -> dict[str, Any] | None:
    """preprocessor_config.json of a transformers folder, if it has one."""
    path = directory / "preprocessor_config.json"
    return read_json(path) if path.is_file() else None


def read_hf(directory: str | os.PathLike) -> tuple[CLIPConfig, StateDict]:
    """Read a transformers CLIPModel directory -> (config, duomo state dict)."""
    directory = Path(directory)
    cfg = hf_config_to_duomo(read_json(directory / "config.json"), read_preprocessor(directory))
    return cfg, hf_to_duomo(read_hf_weights(directory, cfg))


def export_hf(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a directory that `transformers.CLIPModel.from_pretrained(out_dir)` loads."""
    cfg = model_config(model)
    out_dir = Path(out_dir)
    config = duomo_config_to_hf(cfg)
    save_safetensors(duomo_to_hf(model.state_dict()), out_dir / "model.safetensors")
    write_json(preprocessor_config(cfg), out_dir / "preprocessor_config.json")
    write_json(config, out_dir / "config.json")
    return out_dir
