"""CLIP: two injected encoders mapped into one embedding space, plus a learnable temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CLIP(nn.Module):
    """Dual encoder. `visual` maps images and `text` maps token ids to vectors of the same size."""

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        init_logit_scale: float = 2.6592600369644043,  # log(1 / 0.07)
        init_logit_bias: float | None = None,
        config: object | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        )
        self.config = config

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> image embeddings [B, D]."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, T] -> text embeddings [B, D]."""
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalised embeddings of whichever inputs are given, with the temperature (and bias) for losses."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            out["image_embeds"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_embeds"] = self.encode_text(tokens, normalize=True)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def set_fast_attention(self, fast: bool) -> None:
        """Use the fused attention kernel (True) or the written-out reference (False) everywhere."""
        for module in self.modules():
            if hasattr(module, "qkv") and hasattr(module, "fast"):
                module.fast = fast

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in every Transformer stack."""
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable
