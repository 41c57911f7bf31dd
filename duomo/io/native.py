"""duomo's own checkpoint: a directory with `config.json` and `model.safetensors`, written atomically."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits
from duomo.io.files import StateDict, load_weights, read_json, safetensors_keys, save_safetensors, write_json
from duomo.models import CLIPConfig, create_model

FORMAT, VERSION = "duomo", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def model_config(model: nn.Module) -> CLIPConfig:
    """The `CLIPConfig` a duomo model was built from."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, CLIPConfig):
        raise CheckpointError("the model carries no CLIPConfig; build it with duomo.models.create_model")
    return cfg


def is_native(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json says it is a duomo checkpoint."""
    config = Path(path) / CONFIG_FILE
    return config.is_file() and read_json(config).get("format") == FORMAT


def save_native(model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write `model` as a duomo checkpoint directory; each file is replaced atomically, weights first.

    config.json and the weights share a random save id, so a crash between the two renames (new weights,
    old config) is detected on load instead of silently pairing mismatched files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    from duomo.io.text_towers import omit_package_weights

    state, package_meta = omit_package_weights(model, model.state_dict())  # frozen pretrained towers stay out
    meta = {**(meta or {}), **package_meta} if (meta or package_meta) else None
    save_safetensors(state, directory / WEIGHTS_FILE, {"duomo_save_id": save_id})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_config(model).to_dict(),
        "save_id": save_id,
    }
    if meta is not None:
        config["meta"] = meta
    write_json(config, directory / CONFIG_FILE)
    return directory


def load_native(directory: str | os.PathLike) -> tuple[CLIPConfig, StateDict, dict[str, Any]]:
    """Read a duomo checkpoint directory -> (config, state dict, meta)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{directory} is not a duomo checkpoint: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    data = read_json(config_path)
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_path} is not a duomo checkpoint config (format={data.get('format')!r})"
        )
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint version {data.get('version')!r}; this duomo reads up to {VERSION}: "
            "upgrade duomo"
        )
    _, metadata = safetensors_keys(weights_path)
    saved = metadata.get("duomo_save_id")
    if saved and data.get("save_id") and saved != data["save_id"]:
        raise CheckpointError(
            f"{directory}: config.json and model.safetensors come from different saves "
            "(an interrupted save?); "
            "save the model again"
        )
    try:
        cfg = CLIPConfig.from_dict(data.get("model") or {})
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    from duomo.io.text_towers import package_files, restore_package_weights

    meta = dict(data.get("meta") or {})
    files = [weights_path, *package_files(cfg.text, meta)]  # a LiT tower's encoder comes from its package
    check_model_fits(lambda: create_model(cfg), files, str(directory))  # before allocating
    return cfg, restore_package_weights(cfg.text, load_weights(weights_path), meta), meta
