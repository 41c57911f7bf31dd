"""Vision Transformer: patch embedding, class token, learned positions, pre-LN encoder, projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duomo.models.clip.config import VisionConfig
from duomo.nn import Transformer
from duomo.nn.transformer import run_blocks


def interpolate_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize learned [1 + g*g, C] positions to [1 + grid*grid, C] (bicubic over the patch grid)."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    old = int(patch_pos.shape[0] ** 0.5)
    if old == grid:
        return pos
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """A convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").

    log2(patch_size) stride-2 3x3 convs (BatchNorm, ReLU), channels doubling up to `width`, then a 1x1 conv:
    the same token grid as patchify, but local shape is seen before attention, which makes small ViTs learn
    shapes in far fewer steps (docs/benchmarks.md).
    """
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"the conv stem needs a power-of-two patch_size >= 2, got {patch_size}")
    layers: list[nn.Module] = []
    channels_in = 3
    for i in range(n):
        channels = max(width // 2 ** (n - 1 - i), 8)
        layers += [nn.Conv2d(channels_in, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        channels_in = channels
    layers.append(nn.Conv2d(channels_in, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """ViT image encoder returning one embedding per image (before L2 normalisation)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.pool not in ("tok", "avg"):
            raise ValueError(f"unknown vision pooling {cfg.pool!r}; choose 'tok' or 'avg'")
        if cfg.stem not in ("patch", "conv"):
            raise ValueError(f"unknown vision stem {cfg.stem!r}; choose 'patch' or 'conv'")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        if cfg.stem == "conv":
            self.patch_embed: nn.Module = conv_stem(cfg.width, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.grid**2 + 1, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> normalised tokens [B, 1 + patches, width]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped [B, 3, H, W], got {tuple(images.shape)}")
        x = self.patch_embed(images)  # [B, C, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if h != self.grid or w != self.grid:
            if h != w:
                raise ValueError(f"non-square patch grid {h}x{w}: resize images to a square first")
            pos = interpolate_positions(pos, h)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        x = self.transformer(self.norm_pre(x))
        return self.norm(x)

    def layer_states(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """Token states [B, 1 + patches, width] after `layer` blocks, counted as transformers' `hidden_states`
        are (0: the embeddings after the pre-norm; -1: the last block's output, before the final norm; -2: the
        layer LLaVA reads). The blocks after it are not run."""
        depth = len(self.transformer.blocks)
        index = layer if layer >= 0 else depth + 1 + layer
        if not 0 <= index <= depth:
            raise ValueError(f"vision layer {layer} is outside this tower's {depth} blocks")
        x = self.patch_embed(images)
        h = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed if h == self.grid else interpolate_positions(self.pos_embed, h)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.norm_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        blocks = self.transformer.blocks[:index]
        return run_blocks(
            blocks, x, None, checkpointing=self.transformer.grad_checkpointing and self.training
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embed_dim]."""
        tokens = self.forward_features(images)
        pooled = tokens[:, 0] if self.cfg.pool == "tok" else tokens[:, 1:].mean(dim=1)
        return self.proj(pooled)
