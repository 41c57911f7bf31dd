"""Start a BEiT-3 backbone's vision pathway from a trained ViT image tower (a CLIP's `visual`).

VLMo (the Multiway Transformer BEiT-3 builds on) initialises its attention and vision experts from an image
model and then trains the language side; duomo does the same from any duomo CLIP image tower (a shipped
checkpoint, an OpenAI/OpenCLIP/HF CLIP loaded into duomo). The BEiT-3 config must have the tower's
architecture: `beit3_config_for_vit` makes one (pre-LN, an embedding LayerNorm in the place of CLIP's
`ln_pre`, no sub-LN, a final LayerNorm); the text side keeps the settings of a base config. After the copy,
the backbone's vision-only forward equals the tower's `forward_features` (tested to float precision).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.beit3.backbone import BEiT3
from duomo.models.beit3.config import BEiT3Config
from duomo.models.beit3.multiway import Multiway
from duomo.models.clip.config import VisionConfig
from duomo.models.clip.vit import VisionTransformer


def _tower_fields(vision: VisionConfig) -> dict:
    """The BEiT-3 config fields a ViT tower fixes: its sizes, stem, pre-LN layout and pixel normalisation."""
    return {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "in_chans": 3,
        "width": vision.width,
        "layers": vision.layers,
        "heads": vision.heads,
        "ffn_dim": int(vision.width * vision.mlp_ratio),
        "act": vision.act,
        "norm_eps": vision.norm_eps,
        "subln": False,
        "normalize_before": True,
        "deepnorm": False,
        "normalize_output": True,
        "layernorm_embedding": True,
        "scale_embedding": False,
        "stem": vision.stem,
        "mean": tuple(vision.mean),
        "std": tuple(vision.std),
    }


# only preprocessing reads these: a config may differ from the tower there and still hold its weights
_PREPROCESSING = ("mean", "std")


def beit3_config_for_vit(vision: VisionConfig, base: BEiT3Config) -> BEiT3Config:
    """A BEiT-3 config whose vision pathway has the architecture of `vision`; text settings from `base`."""
    if vision.pool != "tok":
        raise ConfigError("only a ViT that pools its class token ('tok') maps onto BEiT-3's class token")
    return dataclasses.replace(base, **_tower_fields(vision))


def _check_compatible(cfg: BEiT3Config, vision: VisionConfig) -> None:
    wrong = [
        f"{name}={getattr(cfg, name)!r} (the ViT needs {value!r})"
        for name, value in _tower_fields(vision).items()
        if name not in _PREPROCESSING and getattr(cfg, name) != value
    ]
    if wrong:
        raise ConfigError(
            "this BEiT-3 config cannot hold that image tower: "
            + ", ".join(wrong)
            + "; build the config with duomo.models.beit3.from_clip.beit3_config_for_vit"
        )


def _vision(module: nn.Module) -> nn.Module:
    """The vision copy of a Multiway module, or the module itself where it is shared."""
    return module.vision if isinstance(module, Multiway) else module


@torch.no_grad()
def load_vit_into_beit3(backbone: BEiT3, vit: VisionTransformer) -> BEiT3:
    """Copy a ViT image tower into the vision pathway of `backbone` (in place; returned for chaining).

    Copied: stem, class token, positions, `norm_pre` -> the vision embedding LayerNorm, every block's
    LayerNorms, q/k/v (split from the fused qkv), output projection and MLP -> the vision expert, the final
    LayerNorm. Shared attention (the paper's layout) takes the tower's attention for both modalities. Not
    copied: the tower's output projection (BEiT-3's heads have their own). The text side is untouched.
    """
    cfg = backbone.cfg
    _check_compatible(cfg, vit.cfg)
    stem = backbone.vision_embed.patch_embed
    if isinstance(stem, nn.Conv2d):  # patchify: torchscale's has a bias, CLIP's none (it stays 0)
        stem.weight.copy_(vit.patch_embed.weight)
        if stem.bias is not None:
            stem.bias.copy_(vit.patch_embed.bias if vit.patch_embed.bias is not None else 0.0)
    else:
        stem.load_state_dict(vit.patch_embed.state_dict())
    backbone.vision_embed.cls_token.copy_(vit.cls_token.view_as(backbone.vision_embed.cls_token))
    backbone.pos_embed.vision.weight[cfg.pos_offset :].copy_(vit.pos_embed)
    _vision(backbone.embed_norm).load_state_dict(vit.norm_pre.state_dict())
    for block, source in zip(backbone.encoder.blocks, vit.transformer.blocks, strict=True):
        _vision(block.norm1).load_state_dict(source.norm1.state_dict())
        _vision(block.norm2).load_state_dict(source.norm2.state_dict())
        attn, src = block.attn, source.attn
        for proj, w, b in zip(
            (attn.q, attn.k, attn.v), src.qkv.weight.chunk(3), src.qkv.bias.chunk(3), strict=True
        ):
            _vision(proj).weight.copy_(w)
            _vision(proj).bias.copy_(b)
        _vision(attn.proj).load_state_dict(src.proj.state_dict())
        mlp = _vision(block.mlp)
        mlp.fc1.load_state_dict(source.mlp.fc1.state_dict())
        mlp.fc2.load_state_dict(source.mlp.fc2.state_dict())
    _vision(backbone.encoder.norm).load_state_dict(vit.norm.state_dict())
    return backbone


def beit3_from_clip(clip: nn.Module, base: BEiT3Config) -> BEiT3:
    """A fresh BEiT-3 (text side from `base`) whose vision pathway is `clip.visual`, a duomo ViT tower."""
    vit = getattr(clip, "visual", clip)
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"cannot start BEiT-3 from a {type(vit).__name__} image tower: only duomo's ViT maps onto it"
        )
    backbone = BEiT3(beit3_config_for_vit(vit.cfg, base))
    return load_vit_into_beit3(backbone, vit)


def freeze_vision(model: nn.Module) -> int:
    """Stop training the parts of a BEiT-3 (or a task model around one) that only image tokens use: the
    stem, class/mask tokens, image positions and every vision copy of a Multiway module. Shared attention
    and the text side keep training (VLMo's second stage freezes the same vision expert). Returns how many
    parameters were frozen; 0 means the model has no vision-only part, which is an error."""
    frozen = 0
    for name, param in model.named_parameters():
        if _vision_only(name):
            param.requires_grad_(False)
            frozen += param.numel()
    if not frozen:
        raise ConfigError(f"{type(model).__name__} has no BEiT-3 vision parameters to freeze")
    for name, module in model.named_modules():
        frozen_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and _vision_only(name + ".")
        if frozen_bn and not getattr(module, "_duomo_frozen", False):
            # a frozen BatchNorm (the conv stem's) keeps normalising with its running statistics and never
            # updates them, in train mode too (as torchvision's FrozenBatchNorm2d); hooked once
            module.register_forward_pre_hook(_stay_in_eval)
            module._duomo_frozen = True
    return frozen


def _vision_only(name: str) -> bool:
    """Whether a parameter or module name of a BEiT-3 (or a task model around one) is vision-only."""
    bare = name.removeprefix("beit3.")
    return ".vision." in f".{bare}" or bare.startswith("vision_embed.")


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)
