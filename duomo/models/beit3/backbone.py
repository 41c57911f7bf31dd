"""BEiT-3: image patches and text tokens embedded into one Multiway Transformer.

The default layout is torchscale's (Microsoft's released checkpoints): per-modality attention projections
and LayerNorms, Magneto's sub-LN, fairseq positions that start at row 2 of each position table.
`shared_attention=True` with `vl_layers > 0` gives the paper's layout instead (see `multiway`).

`BEiT3.forward` is the one forward pass every head uses: images, texts or pairs; text ids that may hold the
virtual [MASK] id (`vocab_size`, read from a head's mask token); and an optional `KVCache` for decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import ConfigError, InputError
from duomo.models.beit3.config import BEiT3Config, get_beit3_config
from duomo.models.beit3.multiway import KVCache, Multiway, MultiwayTransformer, route
from duomo.models.clip.vit import conv_stem, interpolate_positions


class VisionEmbedding(nn.Module):
    """Conv patch embedding with a class token prepended and a mask token for masked image modelling."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        if cfg.stem == "conv":
            if cfg.in_chans != 3:
                raise ConfigError(f"the conv stem takes RGB images, not in_chans={cfg.in_chans}")
            try:
                self.patch_embed: nn.Module = conv_stem(cfg.width, cfg.patch_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        else:
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))

    def forward(self, images: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> [B, 1 + patches, width]; `masked` [B, patches] marks patches to hide."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if masked is not None:
            w = masked.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class BEiT3(nn.Module):
    """The BEiT-3 backbone: images, texts, or image+text pairs -> hidden states [B, T, width]."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.vision_embed = VisionEmbedding(cfg)
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = Multiway(  # one table per modality; rows [offset:] hold [cls, patches] or text
            nn.Embedding(cfg.pos_offset + 1 + cfg.num_patches, cfg.width),
            nn.Embedding(cfg.max_text_positions, cfg.width),
        )
        self.embed_norm = (
            Multiway.copies(lambda: nn.LayerNorm(cfg.width, eps=cfg.norm_eps))
            if cfg.layernorm_embedding
            else nn.Identity()
        )
        self.encoder = MultiwayTransformer(
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.ffn_dim,
            act=cfg.act,
            norm_eps=cfg.norm_eps,
            subln=cfg.subln,
            shared_attention=cfg.shared_attention,
            vl_layers=cfg.vl_layers,
            normalize_before=cfg.normalize_before,
            normalize_output=cfg.normalize_output,
            deepnorm=cfg.deepnorm,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.embed_scale = math.sqrt(cfg.width) if cfg.scale_embedding else 1.0
        self.init_weights()

    def init_weights(self) -> None:
        """unilm's fine-tuning init: truncated normal(0.02) Linears, unit LayerNorms, small embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.text_embed.weight, std=self.cfg.width**-0.5)
        for table in (self.pos_embed.vision, self.pos_embed.text):
            nn.init.trunc_normal_(table.weight, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.mask_token, std=0.02)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image at the configured size: the class token and the patches."""
        return 1 + self.cfg.num_patches

    def embed_images(self, images: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> patch embeddings plus positions [B, 1 + patches, width]."""
        if images.ndim != 4 or images.shape[1] != self.cfg.in_chans:
            raise InputError(
                f"expected images shaped [B, {self.cfg.in_chans}, H, W], got {tuple(images.shape)}"
            )
        x = self.vision_embed(images, masked) * self.embed_scale
        pos = self.pos_embed.vision.weight[self.cfg.pos_offset :]
        grid = math.isqrt(x.shape[1] - 1)
        if grid * grid != x.shape[1] - 1:
            raise InputError(f"non-square patch grid from images {tuple(images.shape)}: resize to a square")
        if grid != self.grid:
            pos = interpolate_positions(pos, grid)
        return x + pos.to(x.dtype)

    def embed_text(
        self, tokens: torch.Tensor, start: int = 0, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [B, T] at text positions start.. -> token embeddings plus positions [B, T, width].

        With a `mask_token` [1, 1, width], the virtual id `vocab_size` reads it instead of a table row.
        """
        if tokens.ndim != 2:
            raise InputError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        offset, t = self.cfg.pos_offset + start, tokens.shape[1]
        if offset + t > self.cfg.max_text_positions:
            longest = self.cfg.max_text_positions - self.cfg.pos_offset
            raise InputError(f"text of {start + t} tokens is longer than this model's {longest}; truncate it")
        if mask_token is None:
            x = self.text_embed(tokens)
        else:
            masked = tokens == self.cfg.vocab_size
            x = self.text_embed(tokens.masked_fill(masked, 0))
            x = torch.where(masked.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = x * self.embed_scale
        return x + self.pos_embed.text.weight[offset : offset + t].to(x.dtype)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for decoding with `forward(..., cache=...)`."""
        return KVCache.empty(len(self.encoder.blocks))

    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        text_mask_token: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pair: bool | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, width] of images, texts, or image+text pairs (image tokens first).

        `text_padding_mask` [B, T_text]: True (or 1) at padding, as unilm's `padding_mask`.
        `attn_mask` [T, L] or [B, T, L]: True where a token may attend (e.g. captioning's causal text part);
        L counts the cached tokens first.
        `vision_mask` [B, patches]: True at patches replaced by the mask token (masked image modelling).
        `text_mask_token`: the [MASK] embedding that text id `vocab_size` reads (masked language modelling).
        `cache`: keys/values of the tokens fed before (`new_cache`); these tokens attend to them first and
        are appended (as many as `cache.set_keep` says). Text positions continue after the cached text.
        `pair`: the tokens belong to an image+text input (default: both are given, or the cache holds an
        image): in the paper's layout their top layers use the vision-language expert.
        """
        if images is None and text is None:
            raise InputError("BEiT3 needs images, text, or both")
        parts = []
        if images is not None:
            parts.append(self.embed_images(images, vision_mask))
        if text is not None:
            start = cache.text_tokens if cache is not None else 0
            parts.append(self.embed_text(text, start, text_mask_token))
        split = parts[0].shape[1] if images is not None else 0  # number of image tokens
        if pair is None:
            pair = (images is not None and text is not None) or (cache is not None and cache.image_tokens > 0)
        x = route(self.embed_norm, torch.cat(parts, dim=1), split, pair)

        mask = None
        if text_padding_mask is not None and text is not None:
            if text_padding_mask.shape != text.shape:
                raise InputError(
                    f"text_padding_mask {tuple(text_padding_mask.shape)} must match text {tuple(text.shape)}"
                )
            if cache is not None:
                raise InputError("padding masks are for whole sequences; decode with a cache without padding")
            pad = F.pad(text_padding_mask.bool(), (split, 0), value=False)  # image tokens are never padding
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
            mask = ~pad[:, None, None, :]  # every token may attend to every non-padding token
        if attn_mask is not None:
            allowed = attn_mask.bool()
            allowed = allowed.unsqueeze(1) if allowed.ndim == 3 else allowed
            mask = allowed if mask is None else mask & allowed
        x = self.encoder(x, split, mask, pair, cache)
        if cache is not None:
            keep = cache.layers[0].keep if cache.layers else None
            n_text = x.shape[1] - split
            cache.image_tokens += split
            cache.text_tokens += n_text if keep is None else max(0, min(keep - split, n_text))
        return x


def create_beit3(config: str | BEiT3Config) -> BEiT3:
    """Build a randomly initialised BEiT-3 backbone from a config name, JSON path or `BEiT3Config`."""
    cfg = config if isinstance(config, BEiT3Config) else get_beit3_config(config)
    return BEiT3(cfg)
