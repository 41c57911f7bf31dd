"""Converting a checkpoint from any readable format to any writable one."""

from __future__ import annotations

import os
from pathlib import Path

from duomo.io.checkpoint import export, load_into, read_checkpoint, with_activation
from duomo.io.native import is_native, load_native, save_native
from duomo.models import CLIPConfig, create_model, get_model_config
from duomo.nn import skip_init

StateDict = dict


def read_with_meta(
    path: str | os.PathLike, config: CLIPConfig | None = None, quick_gelu: bool | None = None
) -> tuple[CLIPConfig, StateDict, dict]:
    """`read_checkpoint`, plus the metadata that duomo's own format carries (templates, provenance)."""
    if Path(path).is_dir() and is_native(path):
        cfg, sd, meta = load_native(path)
        cfg = config or cfg
        if quick_gelu is not None:
            cfg = with_activation(cfg, "quick_gelu" if quick_gelu else "gelu")
        return cfg, sd, meta
    cfg, sd = read_checkpoint(path, config=config, quick_gelu=quick_gelu)
    return cfg, sd, {}


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str,
    config: str | None = None,
    quick_gelu: bool | None = None,
) -> Path:
    """Read `src` (any supported format or hub id), build the model, check it loads, and write it as `fmt`."""
    cfg, sd, meta = read_with_meta(src, get_model_config(config) if config else None, quick_gelu)
    with skip_init():  # every weight is loaded next (strictly)
        model = create_model(cfg)
    load_into(model, sd)
    if fmt == "duomo":
        return save_native(model, dst, meta=meta or None)
    return export(model, dst, fmt)
