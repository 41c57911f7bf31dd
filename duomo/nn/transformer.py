"""Pre-LN Transformer blocks and encoder stacks, as used by the vision and text towers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from duomo.nn.attention import MultiHeadAttention


def run_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, *args: Any, checkpointing: bool = False, **kwargs: Any
) -> torch.Tensor:
    """x through each block in turn (`block(x, *args, **kwargs)`); with `checkpointing`, each block's
    activations are recomputed in the backward pass instead of kept (the one gradient-checkpointing loop)."""
    for block in blocks:
        if checkpointing:
            x = checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        else:
            x = block(x, *args, **kwargs)
    return x


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def make_activation(name: str) -> nn.Module:
    """Build an activation module from its config name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, round(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks with optional gradient checkpointing."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, act, norm_eps) for _ in range(depth)
        )
        self.grad_checkpointing = False

    def set_fast_attention(self, fast: bool) -> None:
        """Switch every block between the fused and the reference attention kernel."""
        for block in self.blocks:
            block.attn.fast = fast

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_blocks(self.blocks, x, attn_mask, checkpointing=self.grad_checkpointing and self.training)
