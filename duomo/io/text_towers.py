"""The io side of the text-tower registry: per tower kind, how its pretrained weights reach a model.

`duomo.models.factory` maps a `TextConfig.kind` to the builder of its structure; a kind whose weights come
from an installed package (today "minilm", `duomo.io.minilm`) also has hooks here: `fill` reads them into a
freshly built model, `omit` leaves them out of a native checkpoint that did not change them, `restore` reads
them back when such a checkpoint loads. Generic code (native save/load, model building) calls these three and
knows no tower by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import duomo.io.minilm as minilm
from duomo.errors import CheckpointError, ConfigError
from duomo.models import create_model
from duomo.models.clip.config import CLIPConfig, TextConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PackageWeights:
    """The three hooks of a text tower whose pretrained weights come from a package."""

    fill: Callable[[nn.Module], None]
    omit: Callable[[nn.Module, State], tuple[State, dict[str, Any]]]
    restore: Callable[[TextConfig, State, dict[str, Any]], State]


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "minilm": PackageWeights(
        minilm.fill_package_weights, minilm.omit_package_weights, minilm.restore_package_weights
    ),
}


def _hooks(text_cfg: TextConfig | None) -> PackageWeights | None:
    return PACKAGE_WEIGHTS.get(getattr(text_cfg, "kind", None))


def build_model(config: str | CLIPConfig) -> nn.Module:
    """`create_model` plus the pretrained weights its text tower's config asks for (a LiT tower)."""
    model = create_model(config)
    hooks = _hooks(getattr(getattr(model, "config", None), "text", None))
    if hooks is not None:
        hooks.fill(model)
    return model


def omit_package_weights(model: nn.Module, state: State) -> tuple[State, dict[str, Any]]:
    """(state without package weights the model still has unchanged, meta recording that)."""
    hooks = _hooks(getattr(getattr(model, "config", None), "text", None))
    return hooks.omit(model, state) if hooks is not None else (dict(state), {})


def restore_package_weights(text_cfg: TextConfig, state: State, meta: dict[str, Any] | None) -> State:
    """`state` with what a checkpoint left to a package read back (nothing to do for other towers)."""
    info = (meta or {}).get(minilm.PACKAGE_META_KEY)
    hooks = _hooks(text_cfg)
    if hooks is None:
        if info:
            raise CheckpointError(
                f"the checkpoint leaves its text encoder to {info.get('package', 'a package')}, but its text "
                f"tower is {text_cfg.kind!r}"
            )
        return dict(state)
    return hooks.restore(text_cfg, state, meta or {})


def package_files(text_cfg: TextConfig, meta: dict[str, Any] | None) -> list[Path]:
    """The package weight files a checkpoint's meta says it left out (they count as its weights)."""
    if not (meta or {}).get(minilm.PACKAGE_META_KEY) or _hooks(text_cfg) is None:
        return []
    try:
        return [minilm.model_dir(text_cfg) / minilm.WEIGHTS_FILE]
    except ConfigError:
        return []  # restoring will say what is missing
