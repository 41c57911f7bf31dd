"""FSDP2 for the one trainer: each Transformer block sharded on its own, then the root (`fully_shard`, the
public API), so a rank holds 1/world of every weight, gradient and optimiser state.

Scalar parameters (CLIP's temperature, SigLIP's bias) cannot be sharded: they stay whole on every rank
(`ignored_params`), their gradients averaged by hand, so exported checkpoints keep their shapes. Full state
dicts are gathered for checkpoints and export (every rank takes part, rank 0 writes); a sharded save writes a
torch.distributed.checkpoint directory instead, each rank its own shards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from duomo.train.distributed import DistInfo


def block_types() -> tuple[type, ...]:
    """The modules that become their own FSDP unit: the Transformer blocks of every family."""
    from duomo.models.beit3.multiway import MultiwayBlock
    from duomo.models.clip.minilm import BertLayer
    from duomo.models.diffusion.blocks import BasicTransformerBlock, ResnetBlock
    from duomo.models.diffusion.dit import DiTBlock
    from duomo.models.lm.model import LMBlock
    from duomo.nn.transformer import TransformerBlock

    return (TransformerBlock, LMBlock, MultiwayBlock, BertLayer, DiTBlock, BasicTransformerBlock, ResnetBlock)


def shard(model: nn.Module, info: DistInfo, precision: str = "fp32") -> list[nn.Parameter]:
    """Shard `model` in place (blocks, then the root) over all ranks; returns the parameters left whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = (
        MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    )
    whole = [p for p in model.parameters() if p.ndim == 0]
    keep = set(whole)
    kinds = block_types()
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    for block in blocks:  # innermost first is not needed: blocks of these kinds never nest
        trainable = [p for p in block.parameters() if p.requires_grad]
        if trainable:
            fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=keep & set(block.parameters()))
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=keep)
    return whole


def average_whole_grads(params: Iterable[nn.Parameter], world_size: int) -> None:
    """Average the gradients of unsharded parameters across ranks (FSDP reduces only its own)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over sharded (DTensor) and whole parameters, clipped to `max_norm`; returns the
    norm before clipping. Each shard counts once, and so does a whole parameter's gradient (equal on all
    ranks)."""
    from torch.distributed.tensor import DTensor

    sharded, whole = [], []
    for p in params:
        if p.grad is None:
            continue
        (sharded if isinstance(p.grad, DTensor) else whole).append(p.grad)
    local = [g.to_local() for g in sharded]
    device = (local or whole)[0].device if (local or whole) else torch.device("cpu")
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g in local:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq)
    for g in whole:
        sq += g.float().pow(2).sum()
    total = float(sq.sqrt())
    if math.isfinite(max_norm) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in local + whole:
            g.mul_(scale)
    return total


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU), {} elsewhere; every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a full checkpoint (every rank read the same file) back into the model and optimiser."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its shards of the model and optimiser to a distributed-checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Read a distributed-checkpoint directory back into the sharded model and optimiser."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def meta_shell(model: nn.Module) -> nn.Module:
    """An unsharded copy of `model` with no storage (taken before sharding, costing no memory: every tensor
    is a meta tensor, ties kept), filled at export."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def filled_shell(shell: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The shell with real CPU tensors holding `state` (the gathered full state dict)."""
    module = copy.deepcopy(shell).to_empty(device="cpu")
    module.load_state_dict(state, strict=True)
    return module.eval()
