"""OpenCLIP / OpenAI CLIP state dicts and model configs <-> duomo's names and `CLIPConfig`."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from duomo.errors import CheckpointError
from duomo.io.files import StateDict, clean_state_dict
from duomo.models import CLIPConfig

# (OpenCLIP name, duomo name); the two projections are stored transposed ([W, E] vs nn.Linear's [E, W]).
TOP_LEVEL = [
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
    ("visual.conv1.weight", "visual.patch_embed.weight"),
    ("visual.class_embedding", "visual.cls_token"),
    ("visual.positional_embedding", "visual.pos_embed"),
    ("visual.ln_pre.weight", "visual.norm_pre.weight"),
    ("visual.ln_pre.bias", "visual.norm_pre.bias"),
    ("visual.ln_post.weight", "visual.norm.weight"),
    ("visual.ln_post.bias", "visual.norm.bias"),
    ("visual.proj", "visual.proj.weight"),
    ("token_embedding.weight", "text.token_embed.weight"),
    ("positional_embedding", "text.pos_embed"),
    ("ln_final.weight", "text.norm.weight"),
    ("ln_final.bias", "text.norm.bias"),
    ("text_projection", "text.proj.weight"),
]
BLOCK = [
    ("ln_1", "norm1"),
    ("ln_2", "norm2"),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
STACKS = [
    ("visual.transformer.resblocks.", "visual.transformer.blocks."),
    ("transformer.resblocks.", "text.transformer.blocks."),
]
TRANSPOSED = {"visual.proj", "text_projection"}
# Not weights: the causal mask, and the ints OpenAI's TorchScript models keep as buffers.
IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids)$|^(input_resolution|context_length|vocab_size)$")
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


def _rename(
    key: str, top: dict[str, str], stacks: list[tuple[str, str]], block: list[tuple[str, str]]
) -> str:
    """Translate one name with the given tables; names they do not cover pass through unchanged."""
    if key in top:
        return top[key]
    for src, dst in stacks:
        if key.startswith(src):
            index, _, rest = key[len(src) :].partition(".")
            for b_src, b_dst in block:
                if rest == b_src or rest.startswith(b_src + "."):
                    return f"{dst}{index}.{b_dst}{rest[len(b_src) :]}"
    return key


def openclip_to_duomo(sd: Mapping[str, Any]) -> StateDict:
    """OpenCLIP/OpenAI state dict (DDP prefixes and `{"state_dict": ...}` wrappers allowed) -> duomo names."""
    top = dict(TOP_LEVEL)
    out: StateDict = {}
    for key, value in clean_state_dict(sd).items():
        if IGNORED.search(key):
            continue
        out[_rename(key, top, STACKS, BLOCK)] = value.t() if key in TRANSPOSED else value
    return out


def duomo_to_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """duomo state dict -> OpenCLIP/OpenAI names (loadable by `open_clip.model.CLIP.load_state_dict`)."""
    top = {d: o for o, d in TOP_LEVEL}
    stacks = [(d, o) for o, d in STACKS]
    block = [(d, o) for o, d in BLOCK]
    out: StateDict = {}
    for key, value in sd.items():
        name = _rename(key, top, stacks, block)
        out[name] = value.t() if name in TRANSPOSED else value
    return out


def _count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def mlp_ratio(hidden: int, width: int) -> float:
    """hidden / width, nudged up one ulp where int(width * ratio) would round below `hidden`."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else math.nextafter(ratio, math.inf)


def is_openai(sd: Mapping[str, Any]) -> bool:
    """True for state dicts of OpenAI's original CLIP models (they carry int buffers like `vocab_size`)."""
    return any(k in sd for k in OPENAI_MARKERS)


def infer_openclip_config(sd: Mapping[str, torch.Tensor], quick_gelu: bool = False) -> CLIPConfig:
    """The architecture of an OpenCLIP/OpenAI ViT CLIP, read from weight shapes (as OpenAI's build_model)."""
    sd = clean_state_dict(sd)
    if "visual.layer1.0.conv1.weight" in sd or "visual.trunk.patch_embed.proj.weight" in sd:
        raise CheckpointError(
            "ResNet and timm image towers are not supported: duomo's CLIP has a ViT image tower"
        )
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection"]
    needed += ["token_embedding.weight", "positional_embedding", "ln_final.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(
            f"not an OpenCLIP/OpenAI ViT CLIP state dict: missing {missing}; "
            f"its first keys are {list(sd)[:5]}. Pass the model config explicitly if it is another layout"
        )
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = sd["ln_final.weight"].shape[0]
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": v_width,
        "layers": _count_layers(sd, "visual.transformer.resblocks."),
        "heads": v_width // 64,
        "mlp_ratio": mlp_ratio(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], v_width),
        "act": act,
    }
    text = {
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "context_length": sd["positional_embedding"].shape[0],
        "width": t_width,
        "layers": _count_layers(sd, "transformer.resblocks."),
        "heads": t_width // 64,
        "mlp_ratio": mlp_ratio(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], t_width),
        "act": act,
    }
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    embed_dim = sd["text_projection"].shape[1]
    return CLIPConfig.from_dict(
        {"embed_dim": embed_dim, "vision": vision, "text": text, "init_logit_bias": bias}
    )


# OpenCLIP config keys that change nothing at inference with these values (_ANY: with any value).
_NEUTRAL = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "proj_type": "linear",
    "custom_text": False,
    "nonscalar_logit_scale": False,
}
_ANY = {
    "patch_dropout",
    "output_tokens",
    "pad_id",
    "timm_model_pretrained",
    "hf_model_pretrained",
    "cast_dtype",
}
_TOWER_KEYS = {"image_size", "patch_size", "width", "layers", "heads", "head_width", "mlp_ratio"}
_TOWER_KEYS |= {"context_length", "vocab_size"}


def _tower_from_openclip(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in _TOWER_KEYS:
            out[key] = value
        elif key == "pool_type":
            out["pool"] = value
        elif key == "global_average_pool":
            if value:
                out["pool"] = "avg"
        elif key == "eos_id":
            out["eos_token_id"] = value
        elif key == "norm_kwargs" and value and set(value) <= {"eps"}:
            out["norm_eps"] = value["eps"]
        elif key == "act_kwargs" and value == {"approximate": "tanh"}:
            out["act"] = "gelu_tanh"
        elif (
            key in _ANY
            or (key in _NEUTRAL and value == _NEUTRAL[key])
            or (key.endswith("_kwargs") and not value)
        ):
            continue
        else:
            raise CheckpointError(f"OpenCLIP {name} option {key}={value!r} is not supported by duomo's CLIP")
    if out.get("pool") not in (None, "tok", "avg", "argmax", "eos", "first"):
        raise CheckpointError(f"OpenCLIP {name} pool_type {out['pool']!r} is not supported by duomo's CLIP")
    return out


def openclip_config_to_duomo(cfg: Mapping[str, Any]) -> CLIPConfig:
    """An OpenCLIP model config (the JSON beside `open_clip.create_model`) -> `CLIPConfig`."""
    preprocess = (
        cfg.get("preprocess_cfg") or {}
    )  # hub repos: open_clip_config.json {"model_cfg", "preprocess_cfg"}
    cfg = dict(cfg.get("model_cfg", cfg))
    quick_gelu = bool(cfg.pop("quick_gelu", False))
    vision = _tower_from_openclip(cfg.pop("vision_cfg", {}) or {}, "vision_cfg")
    text = _tower_from_openclip(cfg.pop("text_cfg", {}) or {}, "text_cfg")
    for tower in (vision, text):
        if quick_gelu:
            if tower.get("act") == "gelu_tanh":
                raise CheckpointError("OpenCLIP config combines quick_gelu with act_kwargs; duomo cannot")
            tower["act"] = "quick_gelu"
    if "mean" in preprocess and "std" in preprocess:
        vision["mean"], vision["std"] = preprocess["mean"], preprocess["std"]
    top = {k: v for k, v in cfg.items() if k in ("embed_dim", "init_logit_scale", "init_logit_bias")}
    for key, value in cfg.items():
        if key not in top and not (key in _ANY or _NEUTRAL.get(key, object()) == value):
            raise CheckpointError(f"OpenCLIP model option {key}={value!r} is not supported by duomo's CLIP")
    return CLIPConfig.from_dict({**top, "vision_cfg": vision, "text_cfg": text})


def duomo_config_to_openclip(cfg: CLIPConfig) -> dict[str, Any]:
    """`CLIPConfig` -> an OpenCLIP model config dict (usable with `open_clip.add_model_config`)."""
    v, t = cfg.vision, cfg.text
    acts = {v.act, t.act}
    if t.kind != "transformer":
        raise CheckpointError(
            f"text tower kind {t.kind!r} has no OpenCLIP equivalent; export to duomo format"
        )
    if v.stem != "patch":
        raise CheckpointError(f"vision stem {v.stem!r} has no OpenCLIP equivalent; export to duomo format")
    if len(acts) > 1 and "quick_gelu" in acts:
        raise CheckpointError(f"OpenCLIP needs one activation family for both towers, got {sorted(acts)}")
    if not acts <= {"gelu", "quick_gelu", "gelu_tanh"}:
        raise CheckpointError(f"activations {sorted(acts)} have no OpenCLIP equivalent")
    if v.width % v.heads:
        raise CheckpointError(f"vision width {v.width} is not divisible by {v.heads} heads")
    vision: dict[str, Any] = {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "width": v.width,
        "layers": v.layers,
        "head_width": v.width // v.heads,
        "mlp_ratio": v.mlp_ratio,
        "pool_type": v.pool,
    }
    text: dict[str, Any] = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
        "pool_type": t.pool,
    }
    if t.pool == "eos":
        text["eos_id"] = t.eos_token_id
    for tower, section in ((vision, v), (text, t)):
        if section.norm_eps != 1e-5:
            tower["norm_kwargs"] = {"eps": section.norm_eps}
        if section.act == "gelu_tanh":
            tower["act_kwargs"] = {"approximate": "tanh"}
    out: dict[str, Any] = {"embed_dim": cfg.embed_dim, "quick_gelu": "quick_gelu" in acts}
    out.update({"vision_cfg": vision, "text_cfg": text})
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    return out


def warn_unknown_activation(source: str) -> None:
    """Say once that GELU was assumed for weights whose activation cannot be read from their shapes."""
    warnings.warn(
        f"{source}: the activation cannot be read from weights; assuming GELU. "
        "Pass quick_gelu=True for OpenAI-trained weights (and OpenCLIP '-quickgelu' models)",
        stacklevel=3,
    )
