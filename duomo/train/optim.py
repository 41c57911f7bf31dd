"""AdamW with weight-decay exclusions, and the per-step learning-rate schedule (linear warm-up, cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Modules whose weights are gains, offsets or lookup tables: decaying them towards zero only hurts.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = tuple(
    m
    for m in (
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.Embedding,
        nn.modules.batchnorm._BatchNorm,
    )
    if m is not None
)
# Parameters held directly by a model rather than by a layer: tokens, positions, temperatures.
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "cls_token", "pos_embed", "position", "mask_token")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: biases, norms, embeddings, tokens, temperatures."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                param.ndim < 2
                or param_name == "bias"
                or isinstance(module, NO_DECAY_MODULES)
                or any(key in param_name for key in NO_DECAY_NAMES)
            ):
                names.add(full)
        if hasattr(module, "no_weight_decay"):  # timm's convention for a module to name its own
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name in module.no_weight_decay())
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    head_lr_weight: float = 1.0,
    body: str | None = None,
) -> list[dict]:
    """AdamW groups over the trainable parameters: decayed weights and everything else (decay 0); with a
    `body` prefix (e.g. "beit3."), parameters outside it (task heads) learn at `lr * head_lr_weight`
    (unilm's task_head_lr_weight)."""
    skip = no_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            head = body is not None and head_lr_weight != 1.0 and not name.startswith(body)
            groups.setdefault((head, name not in skip), []).append(param)
    out = []
    for (head, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        group: dict = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if head and lr is not None:
            group["lr"] = lr * head_lr_weight
        out.append(group)
    return out


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    head_lr_weight: float = 1.0,
    body: str | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (frozen ones are left out) with weight-decay exclusions; see
    `param_groups` for `head_lr_weight` and `body`."""
    groups = [g for g in param_groups(model, weight_decay, lr, head_lr_weight, body) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """The learning rate of optimiser step `step` (0-based) as a fraction of the base rate.

    Warm-up is linear from 1/warmup to 1 over `warmup` steps (OpenCLIP's `(step + 1) / warmup`); then the
    rate stays constant, or follows half a cosine from 1 down to `min_ratio` at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "const":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler (call `.step()` after every optimiser step) with a saveable state."""
    base = optimizer.param_groups[0]["lr"]
    min_ratio = min_lr / base if base else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, schedule, min_ratio)
    )
