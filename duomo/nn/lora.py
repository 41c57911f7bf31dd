"""LoRA: low-rank adapters on the attention projections, trained alone and merged back into plain weights.

A wrapped layer computes W x + b + (alpha / rank) * B A x, with A [rank, in] random and B [out, rank] zero, so
a freshly wrapped model computes exactly what it did before. `merge_lora` folds B A into W and puts plain
`nn.Linear` layers back: the merged model has the original state-dict keys and the adapted outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from duomo.nn.attention import MultiHeadAttention

DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "proj")


class PositionGate:
    """Which sequence positions a set of adapters applies to (CogVLM's "visual expert" idea, as LoRA): the
    model sets `positions` ([B, T], 1 where the update applies) before a forward pass; None means no position,
    so the layer computes exactly its base weights (text-only inputs keep the base model's behaviour)."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / rank) * B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate: PositionGate | None = None  # None: the update applies everywhere
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        """Input width, as nn.Linear's."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width, as nn.Linear's."""
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + (alpha / rank) B A (for code that reads `.weight`)."""
        return self.base.weight + self.scaling * (self.lora_b @ self.lora_a)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update (alpha / rank) B A, shaped like the base weight."""
        return self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank path, which never forms the full update matrix."""
        if self.gate is not None:
            where = self.gate.positions
            if where is None:
                return self.base(x)
            update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
            return self.base(x) + self.scaling * update * where[..., None].to(update.dtype)
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha / rank) B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        """Rank and alpha."""
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    freeze: bool = True,
) -> list[str]:
    """Wrap the `targets` Linear layers of every MultiHeadAttention in `model` with LoRA; returns their names.

    With freeze=True (the default) every other parameter of `model` stops requiring gradients, so only the
    adapters train. Unfreeze anything else (a classifier head) afterwards.
    """
    unknown = [t for t in targets if t not in DEFAULT_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; MultiHeadAttention has {list(DEFAULT_TARGETS)}")
    if freeze:
        model.requires_grad_(False)
    wrapped = []
    for name, module in model.named_modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        for target in targets:
            layer = getattr(module, target)
            if isinstance(layer, LoRALinear):
                raise ValueError(f"{name}.{target} already has a LoRA adapter; merge_lora first")
            setattr(module, target, LoRALinear(layer, rank, alpha, dropout))
            wrapped.append(f"{name}.{target}" if name else target)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention layers to adapt")
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRALinear) of `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by their names in `model` (small enough to ship on their own)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear layers; returns `model`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def apply_lora_by_name(
    model: nn.Module,
    names: Sequence[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    gate: PositionGate | None = None,
) -> list[str]:
    """Wrap every nn.Linear child called one of `names` (e.g. a language model's "q_proj", "v_proj") with
    LoRA; returns the wrapped layers' names. With a `gate`, the updates apply only at the positions it names.
    Nothing is frozen here: the caller decides what trains."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                layer = LoRALinear(child, rank, alpha, dropout)
                layer.gate = gate
                setattr(module, child_name, layer)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no Linear layers named {list(names)}")
    return wrapped
