"""A text-conditioned diffusion Transformer (PixArt-style DiT), written out.

The image (pixels, or autoencoder latents) is cut into patches; each Transformer block modulates its two
LayerNorms with shift/scale/gate vectors computed from the timestep (adaLN, zero-initialised so every block
starts as the identity), attends over the patches, cross-attends to the text tower's token states, and runs an
MLP. A pooled text embedding, when given, is added to the timestep's conditioning vector (as SDXL and Imagen
do): a small model learns "which colour, which shape" from it much faster than from cross-attention alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.validate import check_fields
from duomo.nn.attention import CrossAttention, MultiHeadAttention
from duomo.nn.transformer import MLP


@dataclass
class DiTConfig:
    """The denoiser's shape: input size and channels, patches, width, depth, heads, conditioning sizes."""

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 2
    width: int = 192
    layers: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: int = 512  # width of the text tower's token states
    pooled_dim: int = 0  # size of a pooled text embedding added to the timestep conditioning; 0: none
    frequency_dim: int = 256  # sinusoidal timestep features before the MLP
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_fields(self, "denoiser")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"denoiser.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.frequency_dim % 2:
            raise ConfigError(f"denoiser.frequency_dim must be even, got {self.frequency_dim}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Build from JSON, naming unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown denoiser config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (fractional) timesteps [B]: cosines, then sines (DiT's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [grid*grid, width] (half the channels per axis)."""
    if width % 4:
        raise ConfigError(f"denoiser.width must be a multiple of 4 for 2-D positions, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a per-sample affine transform of normalised tokens x [B, T, C] by shift/scale [B, C]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-zero self-attention, cross-attention to the text, MLP."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = MultiHeadAttention(w, cfg.heads)
        self.norm_cross = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.cross = CrossAttention(w, cfg.context_dim, cfg.heads)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = MLP(w, round(w * cfg.mlp_ratio), "gelu_tanh")
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] patches, c [B, C] conditioning, context [B, T, D] text token states."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its patch's pixels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Predicts the noise (or v, or x0: the schedule decides) of a noisy image given a timestep and text."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_2d(cfg.width, self.grid), persistent=False)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.frequency_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width)
        )
        self.pooled_proj = nn.Linear(cfg.pooled_dim, cfg.width) if cfg.pooled_dim else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.final = FinalLayer(cfg)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation: Xavier linears, small timestep MLP, zero adaLN and output (identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
            nn.init.zeros_(block.cross.proj.weight)  # cross-attention too starts as the identity
            nn.init.zeros_(block.cross.proj.bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
        self.grad_checkpointing = enabled

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        b, p, c, g = x.shape[0], self.cfg.patch_size, self.cfg.in_channels, self.grid
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, H, W] noisy input, t timesteps (scalar or [B]), context [B, T, D], pooled [B, P]."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected input shaped [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                f"got {tuple(x.shape)}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"expected text states shaped [B, T, {cfg.context_dim}], got {tuple(context.shape)}"
            )
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        c = self.time_mlp(timestep_embedding(t, cfg.frequency_dim).to(x.dtype))
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError("this denoiser is conditioned on a pooled text embedding: pass pooled=")
            c = c + self.pooled_proj(pooled)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, c, context, use_reentrant=False)
            else:
                h = block(h, c, context)
        return self.unpatchify(self.final(h, c))
