"""The training config: one flat dataclass, read from a JSON file and overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duomo.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_NAMES = ("clip", "siglip")
SCHEDULES = ("cosine", "const")
TASKS = ("contrastive", "text-to-image", "chat")


@dataclass
class TrainConfig:
    """Everything a training run needs; batch sizes are per process and per micro-batch."""

    # what to train on
    task: str = "contrastive"  # "contrastive" (CLIP/SigLIP towers) or "text-to-image" (a generator)
    model: str = "ViT-tiny"  # a model config name or JSON path
    pretrained: str | None = None  # a checkpoint to start from (any format duomo.io reads)
    data: str = "shapes"  # "shapes", "digits", or a path (manifest, folder, WebDataset glob)
    data_size: int = 2048  # samples of a built-in world (shapes)
    data_language: str = "en"  # the built-in shapes world's texts: en, zh or both
    init_image_from: str | None = None  # start the image tower from this model's (a name or folder)
    # optimisation
    steps: int = 1000  # optimiser steps
    batch_size: int = 64  # per process and micro-batch; one step sees batch_size * accum * world_size pairs
    accum: int = 1  # micro-batches per optimiser step
    lr: float = 5e-4
    min_lr: float = 0.0
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 100  # steps of linear warm-up
    schedule: str = "cosine"  # "cosine" or "const" (after the warm-up)
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 disables
    precision: str = "fp32"  # "fp32", "bf16" (autocast), "fp16" (autocast + GradScaler, GPU only)
    grad_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimiser state (FSDP2) instead of DDP
    fsdp_save: str = "full"  # "full": one gathered file; "sharded": a distributed-checkpoint folder
    lock_image: bool = False  # LiT: freeze the image tower
    lock_text: bool = False  # freeze the text tower
    cache_frozen: bool = True  # compute a frozen (LiT) tower's features once per distinct input
    head_lr_weight: float = 1.0  # task heads (parameters outside the trainer's `body`) learn this much faster
    ema: float = 0.0  # decay of an exponential moving average of the weights, exported instead (0: off)
    # objective
    loss: str = "clip"  # "clip" (InfoNCE) or "siglip"
    hard_negatives: int = 0  # extra negative captions per image (NegCLIP)
    local_loss: bool = True
    gather_with_grad: bool = True
    max_logit_scale: float = 100.0  # the temperature is clamped to <= ln(this) after each step
    # text-to-image objective
    text_from: str | None = None  # the CLIP whose (frozen) text tower conditions the generator
    caption_dropout: float = 0.1  # captions replaced by the empty one, for classifier-free guidance
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (0: plain mean squared error)
    # chat (vision-language) objective
    vision_from: str | None = None  # the duomo CLIP whose image tower reads the images
    lm_from: str | None = None  # the language model: "smollm2", a .gguf file or a transformers directory
    stage: int = 2  # 1: align the projector (descriptions); 2: instruction-tune projector + LoRA (or the LM)
    lora_rank: int = 8  # LoRA on the LM's attention projections in stage 2 (0: none)
    lora_scope: str = "image"  # "image": adapters act at image tokens only (text keeps the base LM); "all"
    train_lm: bool = False  # stage 2 trains the whole language model instead of LoRA adapters
    max_length: int = 512  # conversations longer than this many tokens are skipped
    # bookkeeping
    out: str = "runs/train"
    resume: str | None = None  # a checkpoint file, a run folder, or "latest" (this run's --out)
    save_every: int = 500  # steps between checkpoints (also saved at the end)
    keep_checkpoints: int = 2  # the newest checkpoints kept on disk; 0 keeps all
    log_every: int = 10  # steps between metric lines
    workers: int = 2
    seed: int = 0
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    quiet: bool = False  # no progress bar
    plot: bool = True  # draw curves.png from metrics.jsonl at the end (matplotlib)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        checks = [
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.loss in LOSS_NAMES, f"loss must be one of {LOSS_NAMES}, got {self.loss!r}"),
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.min_snr_gamma >= 0, f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}"),
            (
                self.stage in (1, 2),
                f"stage must be 1 (align the projector) or 2 (instruction-tune), got {self.stage}",
            ),
            (self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}"),
            (
                self.lora_scope in ("image", "all"),
                f"lora_scope must be image or all, got {self.lora_scope!r}",
            ),
            (
                self.fsdp_save in ("full", "sharded"),
                f"fsdp_save must be full or sharded, got {self.fsdp_save!r}",
            ),
            (
                not (self.fsdp and self.ema),
                "ema with fsdp is not built: train without --ema, or without --fsdp",
            ),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.accum >= 1, f"accum must be >= 1, got {self.accum}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.wd >= 0, f"wd must be >= 0, got {self.wd}"),
            (self.head_lr_weight > 0, f"head_lr_weight must be > 0, got {self.head_lr_weight}"),
            (0 <= self.ema < 1, f"ema must be in [0, 1) (0: off), got {self.ema}"),
            (self.hard_negatives >= 0, f"hard_negatives must be >= 0, got {self.hard_negatives}"),
            (self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (
                not (self.lock_image and self.lock_text),
                "lock_image and lock_text together leave nothing to train",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    def replace(self, skip_none: bool = True, **overrides: Any) -> TrainConfig:
        """A copy with fields changed; None means "not given" (an unset flag) unless skip_none=False."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - fields
        if unknown:
            raise ConfigError(f"unknown training config fields {sorted(unknown)}; known: {sorted(fields)}")
        return dataclasses.replace(
            self, **{k: v for k, v in overrides.items() if v is not None or not skip_none}
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a JSON null sets a field to None), naming unknown fields."""
        return cls().replace(skip_none=False, **data)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a JSON file of config fields."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"training config {path} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"training config {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"training config {path} must hold a JSON object of fields")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write as JSON (readable back with from_json)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
