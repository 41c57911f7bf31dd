"""Multi-process training: process-group set-up from torchrun's environment, DDP wrapping, rank-0 helpers.

`torchrun --nproc_per_node N -m duomo train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed` reads them and joins the group (gloo on CPU, nccl on GPU). Without them it
returns a single-process `DistInfo` and starts nothing, so the same code runs in both cases.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from duomo.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, rank on this machine, the number of processes, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """`device` as given, else this process's GPU when there is one, else the CPU."""
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment variables; (0, 0, 1) without them."""
    try:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError as exc:
        raise ConfigError(f"malformed torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {exc}") from exc


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    rank, local_rank, world = env_world()
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when several processes train; `model` itself otherwise.

    `find_unused`: some parameters get no gradient in some steps (a BEiT-3's image mask token outside masked
    image modelling, the text experts in an image-only batch); DDP then looks for them every step."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or torch.compile) wrapper."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over all processes (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


@contextlib.contextmanager
def process_group(device: str | None, info: DistInfo | None = None) -> Iterator[DistInfo]:
    """This process's `DistInfo`: the caller's, or a process group joined now (under torchrun) and left after;
    a caller's group is never torn down."""
    owns = info is None and not (dist.is_available() and dist.is_initialized())
    info = info or init_distributed(device)
    try:
        yield info
    finally:
        if owns:
            cleanup()
