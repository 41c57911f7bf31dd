"""Stable Diffusion's conditional UNet (the layout of diffusers' `UNet2DConditionModel`), written out.

Down stages (ResNet blocks, with spatial Transformers in the cross-attention stages, then a stride-2 conv)
collect skip connections; a middle stage (ResNet, Transformer, ResNet); up stages concatenate the skips back
in reverse order. Every ResNet block adds the timestep embedding; every Transformer cross-attends to the text.
Parameter names equal diffusers', so `unet/diffusion_pytorch_model.safetensors` loads as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.diffusion.blocks import (
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    sinusoidal_timesteps,
)
from duomo.models.validate import check_fields

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# diffusers config keys that change nothing here (bookkeeping, or options at the value SD uses)
IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "center_input_sample", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "upcast_attention", "dual_cross_attention", "num_class_embeds",
    "class_embed_type", "resnet_time_scale_shift", "time_embedding_type", "conv_in_kernel", "conv_out_kernel",
    "mid_block_type", "only_cross_attention", "dropout", "encoder_hid_dim", "encoder_hid_dim_type",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
    "class_embeddings_concat", "mid_block_only_cross_attention", "cross_attention_norm",
    "addition_embed_type_num_heads", "resnet_skip_time_act", "resnet_out_scale_factor",
    "attention_type", "reverse_transformer_layers_per_block", "num_attention_heads",
}  # fmt: skip
# the value each ignored option must have (anything else is an architecture duomo does not build)
REQUIRED = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "dual_cross_attention": False, "num_class_embeds": None, "class_embed_type": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "encoder_hid_dim": None, "addition_embed_type": None, "time_embedding_dim": None,
    "time_cond_proj_dim": None, "timestep_post_act": None, "num_attention_heads": None,
    "attention_type": "default", "reverse_transformer_layers_per_block": None,
}  # fmt: skip


@dataclass
class UNetConfig:
    """diffusers' UNet2DConditionModel fields, for the Stable Diffusion 1.x / 2.x layouts."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    )
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: int | list[int] = 8  # diffusers' quirk: this is the number of HEADS per stage
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "unet")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                "unet: down_block_types, up_block_types and block_out_channels need one entry per stage"
            )
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + [
            t for t in self.up_block_types if t not in UP_TYPES
        ]
        if bad:
            raise ConfigError(f"unet: block types {bad} are not built; use {list(DOWN_TYPES + UP_TYPES)}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"unet: every block_out_channels must divide into {self.norm_num_groups} groups"
            )
        heads = self.heads()
        if any(c % h for c, h in zip(self.block_out_channels, heads, strict=True)):
            raise ConfigError(f"unet: channels {self.block_out_channels} do not divide into heads {heads}")

    def heads(self) -> list[int]:
        """Attention heads per stage."""
        h = self.attention_head_dim
        return list(h) if isinstance(h, list | tuple) else [h] * len(self.block_out_channels)

    def to_dict(self) -> dict[str, Any]:
        """diffusers-compatible dict (loads with `UNet2DConditionModel.from_config`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """From duomo's JSON or a diffusers unet/config.json; architectures it does not build are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k for k in set(data) - known - IGNORED if not k.startswith("_")}  # "_x": bookkeeping
        if unknown:
            raise ConfigError(f"unknown unet config fields {sorted(unknown)}")
        for key, want in REQUIRED.items():
            if (
                key in data
                and data[key] != want
                and not (key == "mid_block_scale_factor" and data[key] == 1.0)
            ):
                raise ConfigError(f"unet config {key}={data[key]!r} is not supported (only {want!r})")
        values = {k: v for k, v in data.items() if k in known}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = list(values[key])
        if isinstance(values.get("attention_head_dim"), tuple):
            values["attention_head_dim"] = list(values["attention_head_dim"])
        if isinstance(values.get("transformer_layers_per_block"), list | tuple):
            layers = set(values["transformer_layers_per_block"])
            if len(layers) != 1:
                raise ConfigError("unet: per-stage transformer_layers_per_block is not supported")
            values["transformer_layers_per_block"] = layers.pop()
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"malformed unet config: {exc}") from exc


class Stage(nn.Module):
    """One down or up stage: ResNet blocks, optional spatial Transformers, optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions: nn.ModuleList | None = None


class UNet(nn.Module):
    """Noise (or v) prediction for latents [B, C, H, W] at timesteps, cross-attending to text states."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        heads = cfg.heads()
        temb = ch[0] * 4
        groups, eps, ctx = cfg.norm_num_groups, cfg.norm_eps, cfg.cross_attention_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        def transformer(c: int, h: int) -> SpatialTransformer:
            return SpatialTransformer(
                c, h, ctx, groups, cfg.use_linear_projection, cfg.transformer_layers_per_block
            )

        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            stage, inp, out = Stage(), out, ch[i]
            for j in range(cfg.layers_per_block):
                stage.resnets.append(ResnetBlock(inp if j == 0 else out, out, temb, groups, eps))
            if kind == "CrossAttnDownBlock2D":
                stage.attentions = nn.ModuleList(
                    transformer(out, heads[i]) for _ in range(cfg.layers_per_block)
                )
            if i < len(ch) - 1:
                stage.downsamplers = nn.ModuleList([Downsample(out)])
            self.down_blocks.append(stage)

        self.mid_block = Stage()
        self.mid_block.resnets.extend(ResnetBlock(ch[-1], ch[-1], temb, groups, eps) for _ in range(2))
        self.mid_block.attentions = nn.ModuleList([transformer(ch[-1], heads[-1])])

        self.up_blocks = nn.ModuleList()
        rev, rev_heads = list(reversed(ch)), list(reversed(heads))
        out = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            stage, prev, out = Stage(), out, rev[i]
            skip_in = rev[min(i + 1, len(ch) - 1)]
            n = cfg.layers_per_block + 1
            for j in range(n):
                skip = skip_in if j == n - 1 else out
                stage.resnets.append(ResnetBlock((prev if j == 0 else out) + skip, out, temb, groups, eps))
            if kind == "CrossAttnUpBlock2D":
                stage.attentions = nn.ModuleList(transformer(out, rev_heads[i]) for _ in range(n))
            if i < len(ch) - 1:
                stage.upsamplers = nn.ModuleList([Upsample(out)])
            self.up_blocks.append(stage)

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet/Transformer block in the backward pass."""
        self.grad_checkpointing = enabled

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """sample [B, C, H, W], timestep (scalar or [B]), encoder_hidden_states [B, T, cross_attn_dim]."""
        cfg = self.cfg
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected latents shaped [B, {cfg.in_channels}, H, W], got {tuple(sample.shape)}"
            )
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"expected text states of width {cfg.cross_attention_dim}, "
                f"got {encoder_hidden_states.shape[-1]}"
            )
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        features = sinusoidal_timesteps(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(features.to(sample.dtype))
        ctx = encoder_hidden_states

        h = self.conv_in(sample)
        skips = [h]
        for stage in self.down_blocks:
            for j, resnet in enumerate(stage.resnets):
                h = self._run(resnet, h, temb)
                if stage.attentions is not None:
                    h = self._run(stage.attentions[j], h, ctx)
                skips.append(h)
            if hasattr(stage, "downsamplers"):
                h = stage.downsamplers[0](h)
                skips.append(h)

        h = self._run(self.mid_block.resnets[0], h, temb)
        h = self._run(self.mid_block.attentions[0], h, ctx)
        h = self._run(self.mid_block.resnets[1], h, temb)

        for stage in self.up_blocks:
            for j, resnet in enumerate(stage.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), temb)
                if stage.attentions is not None:
                    h = self._run(stage.attentions[j], h, ctx)
            if hasattr(stage, "upsamplers"):
                size = tuple(skips[-1].shape[-2:]) if skips else None
                h = stage.upsamplers[0](h, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
