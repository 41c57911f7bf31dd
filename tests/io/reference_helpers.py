"""What the parity tests against transformers and cn_clip share."""

from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Add small random noise to every weight (a fresh init has zeros and ones that hide mapping mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def features(out: object) -> torch.Tensor:
    """The embeddings of a transformers `get_*_features` call (transformers 5 may wrap them in an output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
