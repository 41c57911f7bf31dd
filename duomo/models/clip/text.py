"""Causal text Transformer (CLIP style): token + position embeddings, causal mask, pooling at end-of-text."""

from __future__ import annotations

import torch
from torch import nn

from duomo.models.clip.config import TextConfig
from duomo.nn import Transformer, causal_mask


def pool_index(tokens: torch.Tensor, how: str, eos_token_id: int) -> torch.Tensor:
    """Each sequence's pooling position: the highest id ("argmax", CLIP's end token) or the first eos."""
    if how == "argmax":
        return tokens.argmax(dim=-1)
    if how == "eos":
        return (tokens == eos_token_id).int().argmax(dim=-1)
    if how == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    raise ValueError(f"unknown text pooling {how!r}")


class TextTransformer(nn.Module):
    """Text encoder returning one embedding per token sequence (before L2 normalisation)."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.register_buffer("attn_mask", causal_mask(cfg.context_length), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """OpenCLIP's initialisation: small embeddings, depth-scaled residual projections."""
        width, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    trim_padding = True  # False: keep every column (a fixed-shape graph for ONNX export)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T<=context_length] -> embeddings [B, embed_dim]."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.context_length:
            raise ValueError(f"sequence length {t} exceeds the context length {self.context_length}")
        index = pool_index(tokens, self.cfg.pool, self.cfg.eos_token_id)
        if self.trim_padding:  # causal: positions after the last pooled token cannot change the result
            t = int(index.max()) + 1
        x = self.token_embed(tokens[:, :t]) + self.pos_embed[:t]
        x = self.transformer(x, self.attn_mask[:t, :t])
        x = self.norm(x)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), index])

    def token_states(self, tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """Per-token states [B, T, width] after the final LayerNorm, for conditioning a generator.

        `skip=0` is the last layer's output (Stable Diffusion 1.x); `skip=1` stops one layer early, as SD 2.x
        and diffusers' `clip_skip=1` do, and still applies the final LayerNorm. Every column is computed: a
        cross-attending model sees the padding positions too.
        """
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.context_length:
            raise ValueError(f"sequence length {t} exceeds the context length {self.context_length}")
        if not 0 <= skip < len(self.transformer.blocks):
            raise ValueError(f"skip must be in [0, {len(self.transformer.blocks) - 1}], got {skip}")
        x = self.token_embed(tokens) + self.pos_embed[:t]
        mask = self.attn_mask[:t, :t]
        for block in self.transformer.blocks[: len(self.transformer.blocks) - skip]:
            x = block(x, mask)
        return self.norm(x)
