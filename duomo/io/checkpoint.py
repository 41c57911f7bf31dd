"""One entry point for checkpoints: find the format, read it into duomo names, check it fits, export it."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.altclip import is_hf_altclip, read_hf_altclip
from duomo.io.cnclip import cnclip_config, cnclip_to_duomo, is_hf_chinese_clip, read_hf_chinese_clip
from duomo.io.files import (
    TORCH_SUFFIXES,
    StateDict,
    is_torchscript,
    load_weights,
    read_json,
    safetensors_keys,
    save_safetensors,
    save_torch,
    write_json,
)
from duomo.io.hf import export_hf, hf_to_duomo, is_hf_dir, read_hf
from duomo.io.native import is_native, load_native, model_config, save_native
from duomo.io.openai import read_torchscript
from duomo.io.openclip import (
    duomo_config_to_openclip,
    duomo_to_openclip,
    infer_openclip_config,
    is_openai,
    openclip_config_to_duomo,
    openclip_to_duomo,
    warn_unknown_activation,
)
from duomo.models import CLIP, CLIPConfig, create_model
from duomo.nn import skip_init

FORMATS = ("duomo", "hf", "openclip", "openai-jit")
EXPORT_FORMATS = ("duomo", "hf", "openclip", "cnclip")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
OPENCLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_MESSAGE = "cannot reach the Hugging Face hub; download it where a network exists and pass the local path"


def resolve_hub(name: str | os.PathLike) -> Path:
    """A local path as is; `hf-hub:org/repo` or `org/repo` fetched with huggingface_hub.snapshot_download."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    repo = text.removeprefix("hf-hub:")
    if not (text.startswith("hf-hub:") or HUB_ID.fullmatch(text)):
        raise CheckpointError(f"no such checkpoint file or directory: {text}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{text}: install huggingface_hub to download hub checkpoints") from exc
    try:
        local = Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not any(local.glob("*.safetensors")):  # older repos ship pickled torch weights only
            local = Path(snapshot_download(repo, allow_patterns=["*.json", "*.bin"]))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise CheckpointError(
            f"{text}: no such local path, and the hub has no repo {repo} you can access"
        ) from exc
    except ValueError as exc:  # huggingface_hub's HFValidationError
        raise CheckpointError(f"{text}: no such local path, and not a valid hub repo id ({exc})") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{text}: no such local path, and duomo {HUB_MESSAGE}") from exc
    return local


def _layout(keys: list[str], source: str) -> str:
    """Which naming a state dict uses: "duomo", "hf", "cnclip" or "openclip"."""
    if (
        "text_projection" in keys
        and "visual.conv1.weight" in keys
        and any(k.startswith("bert.") for k in keys)
    ):
        return "cnclip"
    if any(k.startswith(("visual.patch_embed.", "text.token_embed.")) for k in keys):
        return "duomo"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.endswith(("visual.conv1.weight", "token_embedding.weight")) for k in keys):
        return "openclip"
    raise CheckpointError(f"{source} is not a CLIP checkpoint duomo knows (first keys: {keys[:5]})")


def _weights_in(directory: Path) -> Path:
    """The one weight file of an OpenCLIP-style directory."""
    for name in OPENCLIP_HUB_FILES:
        if (directory / name).is_file():
            return directory / name
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(files) != 1:
        raise CheckpointError(
            f"{directory} is no checkpoint directory duomo knows: no duomo/HF config.json and "
            f"{len(files)} weight files; pass the weight file itself"
        )
    return files[0]


def detect_format(path: str | os.PathLike) -> str:
    """The format of a local checkpoint: "duomo", "hf", "openclip" or "openai-jit"."""
    path = Path(path)
    if path.is_dir():
        if is_native(path):
            return "duomo"
        if is_hf_dir(path):
            return "hf"
        _weights_in(path)
        return "openclip"
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file or directory: {path}")
    if is_torchscript(path):
        return "openai-jit"
    keys = safetensors_keys(path)[0] if path.suffix == ".safetensors" else list(load_weights(path))
    return _layout(keys, str(path))


def _sidecar_config(weights: Path) -> CLIPConfig | None:
    """The model config saved beside a weight file: `<stem>.json` or `open_clip_config.json`."""
    for candidate in (weights.with_suffix(".json"), weights.parent / "open_clip_config.json"):
        if not candidate.is_file():
            continue
        data = read_json(candidate)
        if data.get("format") == "duomo":
            return CLIPConfig.from_dict(data.get("model") or {})
        if "vision_cfg" in data or "model_cfg" in data:
            return openclip_config_to_duomo(data)
    return None


def _read_weights_file(
    path: Path, quick_gelu: bool | None, config: CLIPConfig | None
) -> tuple[CLIPConfig, StateDict]:
    """A single weight file in any of the three namings; its config given, from a sidecar, or from shapes."""
    raw = read_torchscript(path) if is_torchscript(path) else load_weights(path)
    layout = _layout(list(raw), str(path))
    if layout == "cnclip":  # Chinese-CLIP: a BERT text tower; its architecture is read from the shapes
        return config or cnclip_config(raw), cnclip_to_duomo(raw)
    sd = {"duomo": dict, "hf": hf_to_duomo, "openclip": openclip_to_duomo}[layout](raw)
    cfg = config or _sidecar_config(path)
    if cfg is None:
        openai = is_torchscript(path) or is_openai(raw)
        if quick_gelu is None and not openai:
            warn_unknown_activation(str(path))
        quick = openai if quick_gelu is None else quick_gelu
        cfg = infer_openclip_config(duomo_to_openclip(sd), quick_gelu=quick)
    return cfg, sd


def with_activation(cfg: CLIPConfig, act: str) -> CLIPConfig:
    """A copy of `cfg` with both towers using activation `act`."""
    vision, text = dataclasses.replace(cfg.vision, act=act), dataclasses.replace(cfg.text, act=act)
    return dataclasses.replace(cfg, vision=vision, text=text)


def read_checkpoint(
    path: str | os.PathLike, config: CLIPConfig | None = None, quick_gelu: bool | None = None
) -> tuple[CLIPConfig, StateDict]:
    """Read any supported checkpoint (path or hub id) -> (config, state dict in duomo names).

    `config` replaces the stored or inferred architecture; `quick_gelu` forces the activation, which
    weights alone cannot reveal (None: from the checkpoint's config, else QuickGELU only for OpenAI's).
    """
    path = resolve_hub(path)
    try:
        if path.is_dir() and is_native(path):
            cfg, sd, _ = load_native(path)
        elif path.is_dir() and is_hf_altclip(path):
            cfg, sd = read_hf_altclip(path)
        elif path.is_dir() and is_hf_chinese_clip(path):
            cfg, sd = read_hf_chinese_clip(path)
        elif path.is_dir() and is_hf_dir(path):
            cfg, sd = read_hf(path)
        elif path.is_dir():
            cfg, sd = _read_weights_file(_weights_in(path), quick_gelu, config)
        else:
            cfg, sd = _read_weights_file(path, quick_gelu, config)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if config is not None:
        cfg = config
    if quick_gelu is not None:
        cfg = with_activation(cfg, "quick_gelu" if quick_gelu else "gelu")
    return cfg, sd


def _listing(items: list[str], what: str) -> str:
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''} ({shown})"


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a duomo-named state dict strictly, naming missing keys, unexpected keys and shape differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = [
        _listing(items, what)
        for items, what in (
            (missing, "missing key"),
            (unexpected, "unexpected key"),
            (shapes, "shape difference"),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            "checkpoint does not fit the model: "
            + "; ".join(problems)
            + ". Check that the model config matches "
            "the checkpoint (read_checkpoint infers it when no config is given)"
        )
    model.load_state_dict(dict(sd), strict=True)
    return model


def load_model(
    path: str | os.PathLike, config: CLIPConfig | None = None, quick_gelu: bool | None = None
) -> CLIP:
    """Build a duomo CLIP from any supported checkpoint, in eval mode."""
    cfg, sd = read_checkpoint(path, config=config, quick_gelu=quick_gelu)
    with skip_init():  # every weight is loaded next (strictly)
        model = create_model(cfg)
    load_into(model, sd)
    return model.eval()


def export(model: nn.Module, path: str | os.PathLike, fmt: str = "duomo") -> Path:
    """Write `model` as a duomo directory, a transformers directory, or an OpenCLIP state dict + JSON."""
    path = Path(path)
    if fmt == "duomo":
        return save_native(model, path)
    text_kind = model_config(model).text.kind
    if fmt == "cnclip":  # Chinese-CLIP in the cn_clip package's own layout
        from duomo.io.cnclip import export_cnclip

        return export_cnclip(model, path)
    if fmt == "hf" and text_kind == "bert":  # Chinese-CLIP: transformers' ChineseCLIPModel
        from duomo.io.cnclip import export_hf_chinese_clip

        return export_hf_chinese_clip(model, path)
    if fmt in ("hf", "openclip") and text_kind != "transformer":
        raise CheckpointError(
            f"the {fmt} format has no place for a {text_kind!r} text tower; export this model with --to duomo"
        )
    if fmt == "hf":
        return export_hf(model, path)
    if fmt != "openclip":
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"name the OpenCLIP export file .safetensors or .pt, not {path.name!r}")
    openclip_config = duomo_config_to_openclip(model_config(model))  # fails before anything is written
    sd = duomo_to_openclip(model.state_dict())
    (save_safetensors if path.suffix == ".safetensors" else save_torch)(sd, path)
    write_json(openclip_config, path.with_suffix(".json"))
    return path
