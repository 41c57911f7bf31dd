"""Multi-head self-attention: a reference path written out, and the fused fast path checked against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention from first principles: softmax(QK^T / sqrt(d) + mask) V over [B, heads, T, d] tensors.

    `attn_mask` is either boolean (True = may attend, as in `F.scaled_dot_product_attention`)
    or additive float (0 = attend, -inf = blocked), broadcastable to [B, heads, T_q, T_k].
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    return weights @ v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    fast: bool = True,
    causal: bool = False,
) -> torch.Tensor:
    """The one attention kernel every duomo model calls: the fused `F.scaled_dot_product_attention`, or
    `reference_attention` with `fast=False` (tests check that both give the same numbers). `causal` (without a
    mask, queries and keys of one length): position i attends to positions <= i, which the fused kernel does
    without materialising a mask (several times faster than an explicit one on the CPU)."""
    if fast:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    if causal:
        attn_mask = causal_mask(q.shape[-2], q.device)
    return reference_attention(q, k, v, attn_mask)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, C] -> [B, heads, T, C // heads]."""
    b, t, c = x.shape
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [T, T] mask where position i may attend to positions <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class MultiHeadAttention(nn.Module):
    """Self-attention with fused QKV projection, an output projection and two interchangeable kernels."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, fast: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fast = fast  # False selects `reference_attention`; both must give the same numbers
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, heads, T, head_dim]."""
        return split_heads(x, self.num_heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence x [B, T, C]; `attn_mask` as in `reference_attention`."""
        b, t, c = x.shape
        q, k, v = (self.split_heads(part) for part in self.qkv(x).split(c, dim=-1))
        out = attend(q, k, v, attn_mask, self.fast).transpose(1, 2).reshape(b, t, c)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Queries from one sequence attend to another (image patches to text tokens), same two kernels."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, bias: bool = True, fast: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.fast = fast
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, N, C] attends over context [B, T, D]; `attn_mask` [B, 1, N or 1, T] as in `attend`."""
        b, n, c = x.shape
        q = split_heads(self.q(x), self.num_heads)
        k, v = (split_heads(part, self.num_heads) for part in self.kv(context).split(c, dim=-1))
        out = attend(q, k, v, attn_mask, self.fast).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)
