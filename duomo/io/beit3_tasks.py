"""BEiT-3 task model folders: config.json ({"task", "beit3": backbone config, head settings, provenance}) and
model.safetensors, written by `duomo beit3-train` and read back by `duomo.load`, `duomo ask`, the server.

Provenance is data in the config, not state on a module: `vision_init` names the CLIP whose image tower
started the vision pathway (the caption guide reads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.bounds import check_model_fits
from duomo.io.files import load_weights, read_json, save_safetensors, write_json
from duomo.models.beit3 import (
    BEiT3,
    BEiT3Config,
    BEiT3ForCaptioning,
    BEiT3ForMDM,
    BEiT3ForRetrieval,
    ClassifyModel,
    VQAModel,
)
from duomo.nn import skip_init

TASKS = ("mdm", "vqa", "caption", "retrieval", "classify")


def is_task_folder(path: str | Path) -> bool:
    """Whether `path` is a folder with a config.json that names a BEiT-3 task."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("task") in TASKS
    except (CheckpointError, ConfigError, AttributeError):
        return False


def read_task_config(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """config.json of a task model folder, checked to be for `task` (any task when None)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no model folder at {path}; pass a folder written by `duomo beit3-train`")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it a duomo BEiT-3 task model?")
    data = read_json(path / "config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / 'config.json'} is not a JSON object")
    found = data.get("task")
    if found not in TASKS or (task is not None and found != task):
        what = f"a {found!r} model" if found else "not a BEiT-3 task model"
        wanted = f"a {task!r} model" if task else f"one of {', '.join(TASKS)}"
        raise CheckpointError(f"{path} is {what}, not {wanted}; pass a model fine-tuned for it")
    if not isinstance(data.get("beit3"), dict):
        raise CheckpointError(f"{path / 'config.json'} has no 'beit3' backbone config")
    return data


def head_settings(model: nn.Module, task: str) -> dict[str, Any]:
    """What a task folder records about its head, besides the weights."""
    if task == "mdm":
        return {"tie_lm_head": model.lm_head.tied}
    if task == "vqa":
        return {"answers": model.answers, "loss": model.loss}
    if task == "caption":
        return {
            "tie_lm_head": model.lm_head.tied,
            "sot_id": model.sot_id,
            "eot_id": model.eot_id,
            "vocab": model.vocab,
        }
    if task == "classify":
        return {"label": model.label, "classes": model.classes}
    return {}


def save_task(model: nn.Module, path: str | Path, task: str, **meta: Any) -> Path:
    """Write a task folder: config.json (task, backbone config, head settings, `meta` such as
    `vision_init`) and model.safetensors."""
    if task not in TASKS:
        raise ConfigError(f"unknown BEiT-3 task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"task": task, "beit3": model.beit3.cfg.to_dict(), **head_settings(model, task), **meta}
    write_json(config, path / "config.json")
    save_safetensors(model.state_dict(), path / "model.safetensors", {"task": task})
    return path


def build_task_model(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised task model shaped as a task folder's config says."""
    task = config["task"]
    try:
        backbone = BEiT3(BEiT3Config.from_dict(config["beit3"]))
        if task == "mdm":
            return BEiT3ForMDM(backbone, config.get("tie_lm_head", True))
        if task == "vqa":
            return VQAModel(backbone, list(config["answers"]), config.get("loss", "bce"))
        if task == "caption":
            return BEiT3ForCaptioning(
                backbone,
                int(config["sot_id"]),
                int(config["eot_id"]),
                config.get("tie_lm_head", True),
                config.get("vocab"),
            )
        if task == "retrieval":
            return BEiT3ForRetrieval(backbone)
        label = config.get("label", "shape")
        classes = config.get("classes") or _shapes_classes(label)  # folders written before classes were
        return ClassifyModel(backbone, list(classes), label)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed {task} config: {exc}") from exc


def _shapes_classes(label: str) -> list[str]:
    """The class names of a shapes classifier saved before folders recorded them."""
    from duomo.data.shapes import COLOURS, SHAPES, class_names

    names = {"shape": list(SHAPES), "colour": list(COLOURS)}
    return names[label] if label in names else class_names("train")


def load_task(path: str | Path, task: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its config) of a task folder; weights loaded strictly (named mismatches)."""
    path = Path(path)
    config = read_task_config(path, task)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} has no model.safetensors; is the folder complete?")
    check_model_fits(lambda: build_task_model(config), [path / "model.safetensors"], str(path))
    with skip_init():  # every weight is loaded next (strictly)
        model = build_task_model(config)
    state = load_weights(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), config
