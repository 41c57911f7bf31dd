"""Fine-tuning and pretraining BEiT-3 through the one `Trainer`: a task table, an objective, an export.

Every BEiT-3 run gets what CLIP training has: accumulation, bf16/fp16, `torchrun` DDP, atomic checkpoints in
OUT/checkpoints, exact resume (`resume="latest"`), metrics.jsonl and curves.png. The model folder (config.json
+ model.safetensors, `duomo.io.beit3_tasks`) is written to OUT itself at the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from duomo.io.beit3_tasks import save_task
from duomo.train.config import TrainConfig
from duomo.train.data import LoaderFactory, map_loader_factory
from duomo.train.distributed import DistInfo, cleanup, init_distributed
from duomo.train.trainer import Objective, Trainer

# unilm's fine-tuning settings where the CLIP recipe's differ: AdamW (0.9, 0.98), eps 1e-8, decay 0.05
BEIT3_DEFAULTS: dict[str, Any] = {"wd": 0.05, "eps": 1e-8, "beta2": 0.98, "grad_clip": 1.0}


def beit3_train_config(**fields: Any) -> TrainConfig:
    """A TrainConfig with BEiT-3's defaults (10% warm-up unless given) and the given fields."""
    steps = fields.get("steps", TrainConfig.steps)
    merged = {**BEIT3_DEFAULTS, "warmup": steps // 10, "plot": True, **fields}
    return TrainConfig.from_dict(merged)


def task_exporter(task: str, **meta: Any) -> Callable[[nn.Module, Path], Path]:
    """An `export(model, out)` that writes the task folder into OUT, recording `meta` (e.g. vision_init)."""

    def export(model: nn.Module, out: Path) -> Path:
        return save_task(model, out, task, **meta)

    return export


def fit_task(
    model: nn.Module,
    objective: Objective,
    data: Dataset | Callable[[DistInfo], LoaderFactory],
    cfg: TrainConfig,
    task: str,
    meta: dict[str, Any] | None = None,
    info: DistInfo | None = None,
    until: int | None = None,
) -> dict[str, Any]:
    """Train `model` on `data` (a dataset of ready rows, or a function of the rank giving a loader
    factory) with the one trainer; returns `Trainer.fit`'s result ("model": the task folder). `until`
    stops early with a checkpoint (as a killed run would), to be continued with `resume="latest"`."""
    owns_group = info is None and not torch.distributed.is_initialized()  # leave a caller's group alone
    info = info or init_distributed(cfg.device)
    try:
        if callable(data) and not isinstance(data, Dataset):
            loaders = data(info)
        else:
            loaders = map_loader_factory(
                data,
                cfg.batch_size,
                rank=info.rank,
                world_size=info.world_size,
                workers=cfg.workers,
                seed=cfg.seed,
            )
        trainer = Trainer(
            model,
            objective,
            loaders,
            cfg,
            info,
            freeze=[],
            body="beit3.",
            export=task_exporter(task, **(meta or {})),
            find_unused=True,
        )
        return trainer.fit(until)
    finally:
        if owns_group:
            cleanup()
