"""Bounds on what a checkpoint may make duomo allocate, checked before the allocation (duomo.limits)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from duomo.errors import CheckpointError
from duomo.limits import MAX_CONFIG_SLACK_BYTES, MAX_CONFIG_TO_WEIGHTS


def parameter_bytes(build: Any) -> int:
    """fp32 bytes of the model `build()` makes, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters()) * 4


def check_model_fits(build: Any, weight_files: Iterable[str | os.PathLike], source: str) -> None:
    """Refuse a config whose model would be far larger than the weights that come with it (a config.json
    with a hidden size of 10^7 beside a small file): at most MAX_CONFIG_TO_WEIGHTS times their size plus
    MAX_CONFIG_SLACK_BYTES (room for towers whose weights come from a package)."""
    have = sum(Path(f).stat().st_size for f in weight_files)
    need = parameter_bytes(build)
    if need > MAX_CONFIG_TO_WEIGHTS * have + MAX_CONFIG_SLACK_BYTES:
        raise CheckpointError(
            f"{source}: its config describes a model of {need / 2**20:,.0f} MiB but the weights hold "
            f"{have / 2**20:,.1f} MiB; the config does not belong to these weights"
        )


def shard_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each checked to be a plain file name inside its folder."""
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index} is not a readable JSON shard index ({exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' of tensor names to shard files")
    folder = index.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values()), key=str):
        if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in the checkpoint folder")
        path = (folder / name).resolve()
        if path.parent != folder:
            raise CheckpointError(
                f"{index}: shard {name!r} points outside the checkpoint folder; refusing it"
            )
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {name!r} is missing from {folder}")
        shards.append(path)
    return shards
