"""Stable Diffusion's KL autoencoder (the layout of diffusers' `AutoencoderKL`), written out.

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents (8x smaller per side for SD); the
decoder maps latents back. Latents are multiplied by `scaling_factor` before the denoiser sees them (SD:
0.18215) and divided by it before decoding. Parameter names equal diffusers'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.diffusion.blocks import Downsample, ResnetBlock, SelfAttention2d, Upsample
from duomo.models.validate import check_fields

IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "act_fn", "force_upcast", "shift_factor",
    "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}  # fmt: skip


@dataclass
class AutoencoderConfig:
    """diffusers' AutoencoderKL fields."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] = field(default_factory=lambda: ["DownEncoderBlock2D"] * 4)
    up_block_types: list[str] = field(default_factory=lambda: ["UpDecoderBlock2D"] * 4)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        check_fields(self, "autoencoder")
        n = len(self.block_out_channels)
        if (
            self.down_block_types != ["DownEncoderBlock2D"] * n
            or self.up_block_types != ["UpDecoderBlock2D"] * n
        ):
            raise ConfigError("autoencoder: only DownEncoderBlock2D / UpDecoderBlock2D stages are built")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"autoencoder: every block_out_channels must divide into {self.norm_num_groups} groups"
            )

    def to_dict(self) -> dict[str, Any]:
        """diffusers-compatible dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        """From duomo's JSON or a diffusers vae/config.json."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k for k in set(data) - known - IGNORED if not k.startswith("_")}  # "_x": bookkeeping
        if unknown:
            raise ConfigError(f"unknown autoencoder config fields {sorted(unknown)}")
        for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
            if data.get(key, want) != want:
                raise ConfigError(f"autoencoder config {key}={data[key]!r} is not supported (only {want!r})")
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"malformed autoencoder config: {exc}") from exc


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, logvar clamped to [-30, 20] as in diffusers."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw (noise from `generator` when given, on the CPU, so a seed means the same on any device)."""
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The mean."""
        return self.mean


class MidBlock(nn.Module):
    """ResNet, one-head attention, ResNet."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(ch, ch, None, groups, 1e-6), ResnetBlock(ch, ch, None, groups, 1e-6)]
        )
        self.attentions = nn.ModuleList([SelfAttention2d(ch, groups, 1e-6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class CoderStage(nn.Module):
    """ResNet blocks then an optional 2x resampler."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, down: bool | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, None, groups, 1e-6) for j in range(n)
        )
        if down is True:
            self.downsamplers = nn.ModuleList([Downsample(out_ch, asymmetric=True)])
        elif down is False:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            CoderStage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, True if i < len(ch) - 1 else None)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents -> image."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        rev, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList(
            CoderStage(
                rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, False if i < len(rev) - 1 else None
            )
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x` (z unscaled: divide by scaling_factor first)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downscale(self) -> int:
        """Pixels per latent along a side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> the latent distribution."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images shaped [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent_channels, h, w] -> images in (about) [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents shaped [B, {self.config.latent_channels}, h, w], got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))
