"""duomo's generator folder: `config.json` (a GeneratorConfig, format "duomo-generator") and
`model.safetensors` holding every part (text tower, denoiser, autoencoder). Written atomically, read safely
(sizes checked before allocating)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits
from duomo.io.files import load_weights, read_json, safetensors_keys, save_safetensors, write_json
from duomo.nn import skip_init

if TYPE_CHECKING:  # the model code loads when a generator does, not when a folder is only looked at
    from duomo.models.diffusion.text_to_image import TextToImage

FORMAT, VERSION = "duomo-generator", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def is_generator_folder(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json says it is a duomo generator."""
    config = Path(path) / CONFIG_FILE
    try:
        return config.is_file() and read_json(config).get("format") == FORMAT
    except Exception:  # unreadable JSON is some other folder's business
        return False


def save_generator(
    model: TextToImage, directory: str | os.PathLike, meta: dict[str, Any] | None = None
) -> Path:
    """Write `model` as a generator folder; weights first, then the config naming the same save id."""
    from duomo.models.diffusion.text_to_image import GeneratorConfig

    if not isinstance(getattr(model, "config", None), GeneratorConfig):
        raise CheckpointError("the model carries no GeneratorConfig; build it with build_text_to_image")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    save_safetensors(model.state_dict(), directory / WEIGHTS_FILE, {"duomo_save_id": save_id})
    config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), "save_id": save_id}
    if meta:
        config["meta"] = meta
    write_json(config, directory / CONFIG_FILE)
    return directory


def load_generator(directory: str | os.PathLike) -> tuple[TextToImage, dict[str, Any]]:
    """(generator in eval mode on the CPU, meta) from a generator folder."""
    from duomo.models.diffusion.text_to_image import GeneratorConfig, build_text_to_image

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{directory} is not a generator folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    data = read_json(config_path)
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_path} is not a duomo generator config (format={data.get('format')!r})"
        )
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise CheckpointError(
            f"{directory} has generator version {data.get('version')!r}; this duomo reads up to {VERSION}: "
            "upgrade duomo"
        )
    _, metadata = safetensors_keys(weights_path)
    if metadata.get("duomo_save_id") and data.get("save_id") and metadata["duomo_save_id"] != data["save_id"]:
        raise CheckpointError(
            f"{directory}: config.json and model.safetensors come from different saves (an interrupted save?)"
        )
    try:
        cfg = GeneratorConfig.from_dict(data.get("model") or {})
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    check_model_fits(lambda: build_text_to_image(cfg), [weights_path], str(directory))
    with skip_init():
        model = build_text_to_image(cfg)
    load_state(model, load_weights(weights_path), str(directory))
    return model.eval(), dict(data.get("meta") or {})


def load_state(model: nn.Module, state: dict, source: str) -> None:
    """Strict load with a one-line error naming what does not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{source}: the weights do not fit the config ({' '.join(first[:3])[:300]})"
        ) from exc
