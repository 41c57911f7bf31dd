"""Multiway Transformer (VLMo, BEiT-3): self-attention over [image tokens ; text tokens], modality experts.

A sequence holds the image tokens first and the text tokens after them; `split` is the number of image tokens
(the whole length for images alone, 0 for text alone). A `Multiway` module keeps one copy of a sub-module per
modality and sends each token to its modality's copy. Two layouts are built from the same pieces:

- decoupled (torchscale, Microsoft's released BEiT-3 checkpoints): attention projections and every LayerNorm
  are per-modality copies too; only the attention itself (which token attends to which) is shared.
- shared attention (the BEiT-3 paper, VLMo): one LayerNorm + self-attention for all tokens, modality
  experts in the feed-forward only, and in the top layers a vision-language expert that takes all tokens
  of an image+text pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from duomo.nn import attend, make_activation, run_blocks, split_heads


@dataclass
class LayerCache:
    """One layer's cached keys/values [B, heads, L, head_dim]; `keep` of the next new tokens are appended
    (None: all of them), the rest attend but are not remembered (e.g. a [MASK] read out and dropped)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    keep: int | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values to attend over (cached, then new); remembers the first `keep` new ones."""
        keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        values = v if self.values is None else torch.cat([self.values, v], dim=2)
        n = k.shape[2] if self.keep is None else self.keep
        if n:
            kept_k, kept_v = k[:, :, :n], v[:, :, :n]
            self.keys = kept_k if self.keys is None else torch.cat([self.keys, kept_k], dim=2)
            self.values = kept_v if self.values is None else torch.cat([self.values, kept_v], dim=2)
        return keys, values


@dataclass
class KVCache:
    """Every layer's `LayerCache`, plus how many image and text tokens they hold."""

    layers: list[LayerCache] = field(default_factory=list)
    image_tokens: int = 0
    text_tokens: int = 0

    @classmethod
    def empty(cls, depth: int) -> KVCache:
        """A cache with nothing in it for a `depth`-layer stack."""
        return cls([LayerCache() for _ in range(depth)])

    def set_keep(self, keep: int | None) -> None:
        """How many of the next forward's new tokens every layer remembers (None: all)."""
        for layer in self.layers:
            layer.keep = keep

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of batch rows `rows` (beam search reorders and repeats rows)."""
        layers = [
            LayerCache(
                None if c.keys is None else c.keys[rows], None if c.values is None else c.values[rows], c.keep
            )
            for c in self.layers
        ]
        return KVCache(layers, self.image_tokens, self.text_tokens)


class Multiway(nn.Module):
    """Per-modality copies of one module: tokens [:split] go to `vision`, tokens [split:] to `text`.

    With a `vl` expert, a sequence holding both modalities goes through `vl` whole (the paper's top layers).
    """

    def __init__(self, vision: nn.Module, text: nn.Module, vl: nn.Module | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.vl = vl

    @classmethod
    def copies(cls, make: Callable[[], nn.Module], vl: bool = False) -> Multiway:
        """Independent experts built by `make()`: vision, text, and a vision-language one if `vl`."""
        return cls(make(), make(), make() if vl else None)

    def forward(self, x: torch.Tensor, split: int, pair: bool | None = None) -> torch.Tensor:
        """x [B, T, ...] with image tokens first; `split` image tokens. `pair`: the tokens belong to an
        image+text input (default: both modalities are in x); with a `vl` expert, such tokens all go to it,
        also when a cached decoder feeds only some of them."""
        length = x.shape[1]
        pair = 0 < split < length if pair is None else pair
        if pair and self.vl is not None:
            return self.vl(x)
        if split >= length:
            return self.vision(x)
        if split <= 0:
            return self.text(x)
        return torch.cat([self.vision(x[:, :split]), self.text(x[:, split:])], dim=1)


def route(module: nn.Module, x: torch.Tensor, split: int, pair: bool | None = None) -> torch.Tensor:
    """Apply `module` to x: a `Multiway` routes tokens by modality, anything else sees every token."""
    return module(x, split, pair) if isinstance(module, Multiway) else module(x)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class FeedForward(nn.Module):
    """Linear -> activation -> [LayerNorm (Magneto's sub-LN)] -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", subln: bool = False, eps: float = 1e-5):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.norm = nn.LayerNorm(hidden_dim, eps=eps) if subln else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class MultiwayAttention(nn.Module):
    """Self-attention over all tokens; q/k/v/output projections shared or one copy per modality."""

    def __init__(
        self, dim: int, num_heads: int, per_modality: bool = True, subln: bool = False, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fast = True  # False selects `reference_attention`; both must give the same numbers

        def linear() -> nn.Module:
            return nn.Linear(dim, dim)

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, eps=eps)

        def make(build: Callable[[], nn.Module]) -> nn.Module:
            return Multiway.copies(build) if per_modality else build()

        self.q, self.k, self.v = make(linear), make(linear), make(linear)
        # Magneto's sub-LN: a LayerNorm on the attention output, before the output projection
        self.inner_norm = make(norm) if subln else nn.Identity()
        self.proj = make(linear)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, heads, T, head_dim]."""
        return split_heads(x, self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        split: int,
        attn_mask: torch.Tensor | None = None,
        pair: bool | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, C]; `attn_mask` boolean (True = may attend), broadcastable to [B, heads, T, L] where L
        counts the cached tokens first; `cache`: keys/values of earlier tokens, extended with these."""
        b, t, c = x.shape
        q, k, v = (self.split_heads(route(proj, x, split, pair)) for proj in (self.q, self.k, self.v))
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attend(q, k, v, attn_mask, self.fast).transpose(1, 2).reshape(b, t, c)
        return route(self.proj, route(self.inner_norm, out, split, pair), split, pair)


class MultiwayBlock(nn.Module):
    """Attention then feed-forward, each residual: pre-LN x + f(LN(x)), or post-LN LN(alpha x + f(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        subln: bool = True,
        shared_attention: bool = False,
        vl_expert: bool = False,
        normalize_before: bool = True,
        alpha: float = 1.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalize_before = normalize_before
        self.alpha = alpha  # DeepNet's residual scale (1 unless deepnorm)
        self.drop_path = drop_path

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, eps=norm_eps)

        self.norm1 = norm() if shared_attention else Multiway.copies(norm)
        self.attn = MultiwayAttention(dim, num_heads, not shared_attention, subln, norm_eps)
        self.norm2 = Multiway.copies(norm, vl=vl_expert)
        self.mlp = Multiway.copies(lambda: FeedForward(dim, ffn_dim, act, subln, norm_eps), vl=vl_expert)

    def residual(
        self, x: torch.Tensor, branch: torch.Tensor, norm: nn.Module, split: int, pair: bool | None
    ) -> torch.Tensor:
        """alpha * x + branch, then the post-LN norm when not pre-LN."""
        x = x * self.alpha + drop_path(branch, self.drop_path, self.training)
        return x if self.normalize_before else route(norm, x, split, pair)

    def forward(
        self,
        x: torch.Tensor,
        split: int,
        attn_mask: torch.Tensor | None = None,
        pair: bool | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] with `split` image tokens first (see `Multiway` for `pair`, `MultiwayAttention`
        for `cache`)."""
        h = route(self.norm1, x, split, pair) if self.normalize_before else x
        x = self.residual(x, self.attn(h, split, attn_mask, pair, cache), self.norm1, split, pair)
        h = route(self.norm2, x, split, pair) if self.normalize_before else x
        return self.residual(x, route(self.mlp, h, split, pair), self.norm2, split, pair)


class MultiwayTransformer(nn.Module):
    """A stack of Multiway blocks, the top `vl_layers` with vision-language experts, and a final norm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        subln: bool = True,
        shared_attention: bool = False,
        vl_layers: int = 0,
        normalize_before: bool = True,
        normalize_output: bool = True,
        deepnorm: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= vl_layers <= depth:
            raise ValueError(f"vl_layers {vl_layers} must lie between 0 and the depth {depth}")
        alpha = (2.0 * depth) ** 0.25 if deepnorm else 1.0
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList(
            MultiwayBlock(
                dim,
                num_heads,
                ffn_dim,
                act=act,
                norm_eps=norm_eps,
                subln=subln,
                shared_attention=shared_attention,
                vl_expert=i >= depth - vl_layers,
                normalize_before=normalize_before,
                alpha=alpha,
                drop_path=rates[i],
            )
            for i in range(depth)
        )

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, eps=norm_eps)

        if normalize_before and normalize_output:
            self.norm: nn.Module = norm() if shared_attention else Multiway.copies(norm)
        else:
            self.norm = nn.Identity()  # post-LN blocks already end in a norm
        self.grad_checkpointing = False

    def set_fast_attention(self, fast: bool) -> None:
        """Switch every block between the fused and the reference attention kernel."""
        for block in self.blocks:
            block.attn.fast = fast

    def forward(
        self,
        x: torch.Tensor,
        split: int,
        attn_mask: torch.Tensor | None = None,
        pair: bool | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] with `split` image tokens first -> hidden states [B, T, C]; with a `cache`, x are the
        tokens after those cached (each layer attends to its cached keys/values first)."""
        if cache is None:
            checkpointing = self.grad_checkpointing and self.training
            x = run_blocks(self.blocks, x, split, attn_mask, pair, checkpointing=checkpointing)
        else:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(
                    f"a cache of {len(cache.layers)} layers for a {len(self.blocks)}-layer stack"
                )
            for block, layer in zip(self.blocks, cache.layers, strict=True):
                x = block(x, split, attn_mask, pair, layer)
        return route(self.norm, x, split, pair)
