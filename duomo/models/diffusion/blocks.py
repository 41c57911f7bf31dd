"""The building blocks of Stable Diffusion's UNet and autoencoder, written out, with diffusers' parameter
names (so its checkpoints load with `load_state_dict(strict=True)`): ResNet blocks with a timestep
projection, spatial Transformers (self-attention, cross-attention to text, GEGLU), the autoencoder's
one-head attention, and 2x down/up sampling. Attention goes through duomo's one kernel (`nn.attend`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duomo.nn.attention import attend, split_heads


def sinusoidal_timesteps(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal timestep features [B, dim] as diffusers' `get_timestep_embedding` computes them."""
    half = dim // 2
    exponent = (
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    )
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal features."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep added in between (when given), a 1x1 shortcut if the width
    changes."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0); cross-attention when a
    context is given."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.fast = True  # False: the written-out reference attention (tests compare both)
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, dim] attends over context [B, T, context_dim] (or itself)."""
        b, n, _ = x.shape
        ctx = x if context is None else context
        q, k, v = (
            split_heads(f(y), self.heads) for f, y in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx))
        )
        out = attend(q, k, v, None, self.fast).transpose(1, 2).reshape(b, n, -1)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """x -> a * GELU(gate), the two halves of one projection."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU, dropout, Linear (diffusers' `ff.net.0/1/2`)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` on feature maps: GroupNorm, project in (1x1 conv or linear), blocks,
    project out, residual."""

    def __init__(
        self, channels: int, heads: int, context_dim: int, groups: int, linear: bool, depth: int = 1
    ) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        head_dim = channels // heads
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    """A stride-2 3x3 conv; the autoencoder's pads (0, 1, 0, 1) first and uses no padding in the conv."""

    def __init__(self, channels: int, asymmetric: bool = False) -> None:
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to a given size, matching a skip connection), then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class SelfAttention2d(nn.Module):
    """The autoencoder's mid-block attention: GroupNorm, one head over all pixels, biased projections."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.fast = True
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (f(y)[:, None] for f in (self.to_q, self.to_k, self.to_v))
        out = attend(q, k, v, None, self.fast)[:, 0]
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w) + x
