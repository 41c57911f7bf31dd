"""`duomo convert ... --to onnx`: export a pipeline's towers for ONNX Runtime, optionally int8, checked on the
user's own images against fp32 duomo and refused below a cosine the user sets."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from duomo.data.files import iter_image_files
from duomo.data.images import load_image
from duomo.errors import ImageError, InputError
from duomo.io.onnx import OnnxCLIP, cosine_check, export_onnx, quantize_onnx

MAX_CHECK_IMAGES = 256


def check_pixels(pipe: Any, folder: str | os.PathLike, limit: int = MAX_CHECK_IMAGES) -> torch.Tensor:
    """The first `limit` readable images of a folder, preprocessed for the pipeline's model."""
    files = iter_image_files([str(folder)])[:limit]
    pixels = []
    for path in files:
        try:
            pixels.append(pipe.transform(load_image(path)))
        except ImageError:
            continue
    if not pixels:
        raise InputError(f"--check {folder}: no readable images to compare on")
    return torch.stack(pixels)


def export_for_onnxruntime(
    pipe: Any,
    out: str | os.PathLike,
    int8: bool = False,
    check: str | os.PathLike | None = None,
    min_cosine: float = 0.999,
) -> dict[str, Any]:
    """Write the ONNX folder; with `check`, measure it against fp32 duomo first and refuse (writing nothing)
    when any image's cosine is below `min_cosine`. Returns {"out", and the check's figures}."""
    if not 0 < min_cosine <= 1:
        raise InputError(f"--min-cosine must lie in (0, 1], got {min_cosine}")
    pixels = check_pixels(pipe, check) if check is not None else None  # before any work: bad folder fails
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".duomo-onnx-"))
    try:
        fp32 = export_onnx(pipe.model, staging / "fp32", pipe.meta)
        built = quantize_onnx(fp32, staging / "int8") if int8 else fp32
        result: dict[str, Any] = {}
        if pixels is not None:
            result = cosine_check(pipe.model, OnnxCLIP(built), pixels)
            if result["min_cosine"] < min_cosine:
                raise InputError(
                    f"the {'int8' if int8 else 'fp32'} export reaches cosine {result['min_cosine']:.5f} on "
                    f"{int(result['images'])} of your images, below --min-cosine {min_cosine}: not written"
                )
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), out)
        return {"out": out, **result}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
