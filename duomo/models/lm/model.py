"""A decoder-only (GPT-style) Transformer written out: the Llama layout and the GPT-2 layout in one module.

    tokens (or embeddings, e.g. images projected into the sequence) -> [+ learned positions (gpt2)]
      -> N x [ norm -> causal self-attention (rotary q/k in llama; grouped-query) -> + ]
             [ norm -> MLP (SwiGLU in llama, GELU in gpt2)                       -> + ]
      -> final norm -> head (tied to the embedding or not) -> logits

Attention goes through `duomo.nn.attend`, the kernel every duomo model uses. `LMCache` keeps each layer's keys
and values so that decoding one token costs one token's work; rows may be left-padded (a key mask and a count
of real tokens per row), so prompts of different lengths decode together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from duomo.models.lm.config import LMConfig
from duomo.nn.attention import attend


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg: LMConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2], with the config's scaling (linear or Llama 3's)."""
    dim = cfg.dim_per_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on [B, heads, T, d] (halves rotated, the layout of Hugging Face checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerKV:
    """One layer's cached keys and values [B, kv_heads, S, d]."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


@dataclass
class LMCache:
    """Keys/values of every layer, which cached positions are real (left padding is not) and how many real
    tokens each row has seen (its next position)."""

    layers: list[LayerKV] = field(default_factory=list)
    key_mask: torch.Tensor | None = None  # [B, S] bool
    seen: torch.Tensor | None = None  # [B] long

    @classmethod
    def empty(cls, depth: int) -> LMCache:
        return cls([LayerKV() for _ in range(depth)])

    @property
    def length(self) -> int:
        """Cached positions per row (padding included)."""
        return 0 if self.key_mask is None else int(self.key_mask.shape[1])

    def select(self, rows: torch.Tensor) -> LMCache:
        """The cache of batch rows `rows` (a finished request leaves a batch)."""
        layers = [LayerKV(c.keys[rows], c.values[rows]) for c in self.layers if c.keys is not None]
        if self.key_mask is None:
            return LMCache.empty(len(self.layers))
        return LMCache(layers, self.key_mask[rows], self.seen[rows])

    @staticmethod
    def concat(caches: list[LMCache]) -> LMCache:
        """Rows of several caches in one batch, shorter ones padded on the left (a request joins a batch)."""
        length = max(c.length for c in caches)
        layers = []
        for i in range(len(caches[0].layers)):
            ks, vs = [], []
            for c in caches:
                pad = length - c.length
                k, v = c.layers[i].keys, c.layers[i].values
                ks.append(F.pad(k, (0, 0, pad, 0)))
                vs.append(F.pad(v, (0, 0, pad, 0)))
            layers.append(LayerKV(torch.cat(ks), torch.cat(vs)))
        masks = [F.pad(c.key_mask, (length - c.length, 0), value=False) for c in caches]
        return LMCache(layers, torch.cat(masks), torch.cat([c.seen for c in caches]))


class LMAttention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections and grouped-query key/value heads."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.dim_per_head
        bias = cfg.attention_bias or cfg.layout == "gpt2"
        self.q_proj = nn.Linear(cfg.width, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.width, bias=cfg.layout == "gpt2")
        self.rotary = cfg.layout == "llama"
        self.fast = True

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv: LayerKV | None,
    ) -> torch.Tensor:
        """`mask` [B, 1, T, S] (True: may attend), or None: causal over a fresh sequence (T == S), or every
        key when decoding one token."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary and rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if kv is not None:
            k, v = kv.extend(k, v)
        if self.kv_heads != self.heads:  # each key/value head serves heads // kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = attend(q, k, v, mask, fast=self.fast, causal=mask is None and t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class LMFeedForward(nn.Module):
    """SwiGLU (llama: down(silu(gate(x)) * up(x))) or GELU-tanh (gpt2: down(gelu(up(x))))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gated = cfg.layout == "llama"
        bias = not self.gated
        if self.gated:
            self.gate_proj = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_width, bias=bias)
        self.down_proj = nn.Linear(cfg.mlp_width, cfg.width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def _norm(cfg: LMConfig) -> nn.Module:
    return (
        RMSNorm(cfg.width, cfg.norm_eps) if cfg.layout == "llama" else nn.LayerNorm(cfg.width, cfg.norm_eps)
    )


class LMBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = LMAttention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = LMFeedForward(cfg)

    def forward(self, x, mask, rope, kv):  # noqa: ANN001, ANN201 - the types of LMAttention.forward
        x = x + self.attn(self.attn_norm(x), mask, rope, kv)
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    """The language model: `forward(ids | embeds, mask, cache)` -> logits [B, T, vocab]."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        if cfg.layout == "gpt2":
            self.embed_positions = nn.Embedding(cfg.max_positions, cfg.width)
        self.blocks = nn.ModuleList(LMBlock(cfg) for _ in range(cfg.layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, width] (images join the sequence at this level)."""
        return self.embed_tokens(ids)

    def hidden_states(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LMCache | None = None,
    ) -> torch.Tensor:
        """Final-norm states [B, T, width] of new inputs `embeds`; `mask` [B, T] marks real (not padding)
        positions; `cache` holds what came before and is extended in place."""
        b, t, _ = embeds.shape
        device = embeds.device
        mask = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask.bool()
        past_mask = cache.key_mask if cache is not None and cache.key_mask is not None else None
        past = 0 if past_mask is None else past_mask.shape[1]
        seen = cache.seen if past_mask is not None else torch.zeros(b, dtype=torch.long, device=device)
        positions = (seen[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
        if positions.max() >= self.config.max_positions and self.config.layout == "gpt2":
            raise ValueError(f"sequence longer than the model's {self.config.max_positions} positions")
        keys = mask if past_mask is None else torch.cat([past_mask, mask], dim=1)
        causal = torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past)
        allowed = causal[None] & keys[:, None, :]
        own = torch.arange(t, device=device)
        allowed[:, own, past + own] = True  # a padding query sees itself: no row is empty (no NaN)
        allowed = allowed[:, None]  # [B, 1, T, S]
        if bool(keys.all()) and (t == 1 or past == 0):  # no padding: let the kernel do causality itself
            allowed = None
        if cache is not None:
            cache.key_mask, cache.seen = keys, seen + mask.long().sum(1)
        x = embeds
        rope = None
        if self.config.layout == "gpt2":
            x = x + self.embed_positions(positions)
        else:
            freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, d/2]
            angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, d]
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training and kv is None:
                x = torch.utils.checkpoint.checkpoint(block, x, allowed, rope, None, use_reentrant=False)
            else:
                x = block(x, allowed, rope, kv)
        return self.norm(x)

    def forward(
        self,
        ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: LMCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for ids [B, T] (or input embeddings [B, T, width]); `last_only`: the last position's."""
        if embeds is None:
            if ids is None:
                raise ValueError("CausalLM needs ids or embeds")
            embeds = self.embed(ids)
        h = self.hidden_states(embeds, mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def new_cache(self) -> LMCache:
        return LMCache.empty(self.config.layers)
