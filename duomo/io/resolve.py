"""Which checkpoint a model name means: the shipped weights, named configs, paths and hub ids.

`read_model(name)` gives the built model and its metadata; `duomo.load` wraps it in a `Pipeline`, and task
code that needs a CLIP as a part (a BEiT-3 vision pathway, a caption guide) calls it directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from duomo.errors import InputError, UnknownModelError
from duomo.io.checkpoint import load_into, resolve_hub
from duomo.io.convert import read_with_meta
from duomo.io.onnx import is_onnx_folder, load_onnx
from duomo.io.text_towers import build_model
from duomo.models import create_model, list_models
from duomo.models.factory import model_architecture
from duomo.nn import skip_init

log = logging.getLogger("duomo")

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def list_pretrained() -> list[str]:
    """Names of the duomo-trained CLIP checkpoints shipped inside the package."""
    if not WEIGHTS_DIR.is_dir():
        return []
    from duomo.io.chat import is_chat_dir  # chat models: list_chat_models
    from duomo.io.generator import is_generator_folder  # generators are listed by duomo.api.generate

    return sorted(
        p.name
        for p in WEIGHTS_DIR.iterdir()
        if (p / "config.json").is_file() and not is_generator_folder(p) and not is_chat_dir(p)
    )


def list_chat_models() -> list[str]:
    """Names of the chat models shipped inside the package (projector/LoRA weights over named parts)."""
    from duomo.io.chat import is_chat_dir

    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if is_chat_dir(p))


def default_model_name() -> str:
    """The embedded model used when none is named: the first shipped checkpoint, else a random tiny config."""
    shipped = list_pretrained()
    return "shapes-tiny" if "shapes-tiny" in shipped else (shipped[0] if shipped else "ViT-tiny")


# The pretrained CLIP that `duomo index`, `search` and `serve` use when no model is named and the Hugging Face
# hub is reachable or already has it cached (~600 MB, downloaded once with a progress bar).
REAL_MODEL = os.environ.get("DUOMO_DEFAULT_MODEL", "openai/clip-vit-base-patch32")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


def real_model_available(repo: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the real default model is in the local hub cache, or the hub answers within `timeout`."""
    repo = repo or REAL_MODEL
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    try:
        snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True)
        return True
    except Exception:  # not cached (huggingface_hub raises several types for that)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        HfApi().model_info(repo, timeout=timeout)
        return True
    except Exception:  # offline, blocked, or no such repo: the embedded model it is
        return False


def choose_default_model() -> tuple[str, str | None]:
    """(the model to use when none is named, a one-line notice when it is the embedded toy model)."""
    if real_model_available():
        return REAL_MODEL, None
    fallback = default_model_name()
    return fallback, (
        f"no --model given and {REAL_MODEL} is neither cached nor reachable: using the embedded {fallback}, "
        "which only knows the built-in shapes world; for real photos pass --model with a CLIP checkpoint "
        f"(a hub id such as {REAL_MODEL} where the hub is reachable, or a local folder)"
    )


def read_model(
    name: str,
    weights: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """(model on the CPU in fp32, metadata) of a shipped checkpoint name, a config name (random weights
    unless `weights`), a local path in any supported format, or a hub id."""
    meta: dict = {}
    if name in list_pretrained():
        config, state, meta = read_with_meta(WEIGHTS_DIR / name)
    elif name in list_models() or name.endswith(".json"):
        config = None
        if model_architecture(name) == "text-to-image":
            raise InputError(
                f"{name} is a generator config; train one with `duomo train --task text-to-image --model "
                f"{name} --text-from shapes-tiny`, then duomo.load(its folder) or `duomo generate`"
            )
        if model_architecture(name) == "beit3":
            raise InputError(
                f"{name} is a BEiT-3 config; duomo.load builds CLIP pipelines and loads BEiT-3 task "
                "folders. Build a BEiT-3 with duomo.models.beit3.create_beit3, train its tasks with "
                "`duomo beit3-train`"
            )
        model = build_model(name)  # a LiT config: its package text tower is pretrained
        if weights is None:
            log.warning("model %s has random weights: pass weights=PATH to load a checkpoint", name)
            state = None
        else:
            config, state, meta = read_with_meta(weights, config=model.config, quick_gelu=quick_gelu)
    elif is_onnx_folder(name):  # the ONNX Runtime backend: the same Pipeline API
        return load_onnx(name)
    elif Path(name).exists():
        config, state, meta = read_with_meta(name, quick_gelu=quick_gelu)
    elif "/" in name and not name.startswith((".", "/")):
        config, state, meta = read_with_meta(resolve_hub(name), quick_gelu=quick_gelu)
    else:
        known = ", ".join(list_pretrained() + list_models())
        raise UnknownModelError(
            f"unknown model {name!r}: not a model name, an existing path, or a hub id. Known names: {known}"
        )
    if config is not None:
        with skip_init() if state is not None else contextlib.nullcontext():  # the weights follow
            model = create_model(config)
    if state is not None:
        load_into(model, state)
    return model, meta


def provenance(name: str) -> str:
    """How a model name is recorded in a config that refers to it: a shipped model by its name, a folder
    by its absolute path (so the record stays valid from another working directory)."""
    folder = Path(name).expanduser()
    if name in list_pretrained() or not folder.exists():
        return name
    return str(folder.resolve())
