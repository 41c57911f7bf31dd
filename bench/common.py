"""Helpers the training benchmarks share."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """Where the numbers were taken: torch version, threads, CPUs, load average, Python."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def write_json(path: str | Path, recipe: dict[str, Any], runs: list[dict], median: Any) -> None:
    """Write a benchmark's machine, recipe, runs and medians as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "recipe": recipe, "runs": runs, "median": median}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def ship(run: str | Path, target: Path, meta: dict[str, Any], half: bool) -> Path:
    """Copy a training run's final model into `target` (package weights) with extra `meta`, fp16 if `half`."""
    from duomo.io import load_into, read_checkpoint, save_native
    from duomo.io.native import load_native
    from duomo.models import create_model

    src = Path(run)
    src = src / "model" if (src / "model").is_dir() else src
    config, state, old_meta = load_native(src)
    model = create_model(config)
    load_into(model, state)
    meta = {**old_meta, **meta, **({"weights_dtype": "float16"} if half else {})}
    if half:  # fp16 halves the file (duomo.load casts back to fp32); a frozen package tower stays as shipped
        from duomo.io.minilm import package_weight_keys

        keep = set(package_weight_keys(model))
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name not in keep and tensor.is_floating_point():
                tensor.data = tensor.data.half()
    save_native(model, target, meta)
    read_checkpoint(target)  # it reads back
    for path in target.iterdir():
        path.chmod(0o644)  # package data must be readable by every user
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target} ({size / 1e6:.2f} MB)")
    return target
