"""The training loop: any model, any objective, any resumable loader; one process or many (DDP).

    trainer = Trainer(model, ContrastiveObjective(ClipLoss()), loader_factory, TrainConfig(...))

Objectives live per family in `duomo.train.objectives` (CLIP/SigLIP contrastive; BEiT-3's masked data
modelling, VQA, captioning, retrieval, classification); fine-tuning heads bring their own.
    trainer.fit()

One optimiser step = `accum` micro-batches. For contrastive objectives (those with `embed` + `loss`) the
micro-batches are combined exactly as one big batch (OpenCLIP's feature-cache accumulation: a no-grad pass
collects every micro-batch's embeddings, then each micro-batch is re-embedded with gradients and scored
against all of them); other objectives average their per-micro-batch losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from duomo.errors import CheckpointError, ConfigError
from duomo.nn.precision import faster_than_fp32
from duomo.train import checkpoint as ckpt
from duomo.train.config import TrainConfig
from duomo.train.data import Batch, LoaderFactory
from duomo.train.distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    mean_over_ranks,
    resolve_device,
    wrap_ddp,
)
from duomo.train.ema import EMA
from duomo.train.metrics import MetricsLog, plot_curves
from duomo.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("duomo.train")


class Objective(Protocol):
    """What the trainer minimises: `objective(model, batch)` -> {"loss": scalar tensor, other scalars...}."""

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_rows(batch: Batch) -> int:
    """The number of samples in a batch: the length of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    return 0


def merge_features(cached: list[dict], live: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    """All micro-batches' features with micro-batch j's live (gradient-carrying) ones in place.

    0-d outputs (temperature, bias) are shared by all passes: their value is kept and their gradient scaled by
    1/accum, so that summed over the accum passes it is counted once, as in one big batch.
    """
    merged = {}
    for key, value in live.items():
        if value.ndim == 0:
            merged[key] = value.detach() + (value - value.detach()) / len(cached)
        else:
            merged[key] = torch.cat([value if i == j else c[key] for i, c in enumerate(cached)])
    return merged


class Trainer:
    """Optimises `model` for `cfg.steps` steps of `objective` over the batches `loader_factory` makes."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        loader_factory: LoaderFactory,
        cfg: TrainConfig,
        info: DistInfo | None = None,
        freeze: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
        body: str | None = None,
        export: Callable[[nn.Module, Path], Path] | None = None,
        find_unused: bool = False,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        """`freeze`: submodules kept fixed and in eval mode (default: the towers `cfg.lock_*` names);
        `body`: the parameter-name prefix of the pretrained body (e.g. "beit3."), outside which parameters
        learn at `cfg.head_lr_weight` times the rate; `export(model, out)`: writes the final model (default:
        duomo's native CLIP folder OUT/model); `find_unused`: see `wrap_ddp`; `on_step(step, stats)`: called
        after every optimiser step (per-epoch validation of fine-tuning, say), on every rank."""
        self.cfg = cfg
        self.info = info or DistInfo(device=resolve_device(cfg.device))
        self.device = self.info.device
        self.objective = objective
        self.loader_factory = loader_factory
        self.meta = meta or {}
        self.export_fn = export
        self.on_step = on_step
        self.out = Path(cfg.out)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "precision fp16 needs a CUDA GPU (it uses a GradScaler); on the CPU use bf16 or fp32"
            )
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        if self.amp_dtype is not None and not faster_than_fp32(self.device, self.amp_dtype):
            log.warning(
                "%s is slower than fp32 on this %s (no native support, measured): training in fp32",
                cfg.precision,
                self.device.type,
            )
            self.amp_dtype = None

        self.model = model.to(self.device)
        if freeze is None:
            freeze = [name for name, on in (("visual", cfg.lock_image), ("text", cfg.lock_text)) if on]
        self.frozen = [self._freeze(name) for name in freeze]
        if cfg.grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ConfigError(f"{type(self.model).__name__} does not support gradient checkpointing")
            self.model.set_grad_checkpointing(True)

        # FSDP2 under torchrun (`cfg.fsdp`): shard before the optimiser sees the parameters
        self.fsdp = cfg.fsdp and self.info.distributed
        self.whole_params: list[nn.Parameter] = []
        self.shell: nn.Module | None = None
        if self.fsdp:
            from duomo.train import fsdp

            self.shell = fsdp.meta_shell(self.model) if self.info.is_main else None
            self.whole_params = [
                p for p in fsdp.shard(self.model, self.info, cfg.precision) if p.requires_grad
            ]
        self.optimizer = build_optimizer(
            self.model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps, cfg.head_lr_weight, body
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup, cfg.steps, cfg.schedule, cfg.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None  # of the trainable weights; exported when on
        # forward through self.ddp; save and inspect self.model
        self.ddp = self.model if self.fsdp else wrap_ddp(self.model, self.info, find_unused)

        self.step = 0  # optimiser steps done
        self.epoch = 0  # data position: the next micro-batch is batch `batch_in_epoch` of `epoch`
        self.batch_in_epoch = 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl")

    # --- set-up -------------------------------------------------------------------------------------------
    def _freeze(self, name: str) -> nn.Module:
        """Freeze a submodule (LiT): no gradients, not in the optimiser, always in eval mode."""
        try:
            module = self.model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(
                f"cannot lock {name!r}: {type(self.model).__name__} has no such submodule"
            ) from exc
        module.requires_grad_(False)
        return module

    def train_mode(self) -> None:
        """model.train(), except frozen towers, which stay in eval mode (dropout and norms as pretrained)."""
        self.model.train()
        for module in self.frozen:
            module.eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (and the loss), or a no-op in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- one step -----------------------------------------------------------------------------------------
    def ddp_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last backward of a step only (no_sync() for the others)."""
        if sync or not self.info.distributed:
            if self.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:  # accumulate locally; the last micro-batch reduces
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def micro_loss(self, batch: Batch, j: int, cached: list[dict] | None) -> dict[str, torch.Tensor]:
        """The objective on micro-batch j; with a cache, the full-batch loss with gradients through j only."""
        if cached is None:
            return self.objective(self.ddp, batch)
        return self.objective.loss(merge_features(cached, self.objective.embed(self.ddp, batch), j))

    def forward_backward(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Accumulate the gradients of one optimiser step over its micro-batches; returns its metrics."""
        micro_batches = [to_device(b, self.device) for b in micro_batches]
        n = len(micro_batches)
        cached = None
        if n > 1 and hasattr(self.objective, "embed") and hasattr(self.objective, "loss"):
            with (
                torch.no_grad(),
                self.autocast(),
            ):  # every micro-batch's embeddings, to score each against all
                cached = [self.objective.embed(self.ddp, b) for b in micro_batches]
        outputs = []
        for j, batch in enumerate(micro_batches):
            with self.ddp_sync(j == n - 1):
                with self.autocast():
                    out = self.micro_loss(batch, j, cached)
                # with a cache, every pass computes the full-batch loss; their gradients add up to its own
                loss = out["loss"] if cached is not None else out["loss"] / n
                self.scaler.scale(loss).backward()
            outputs.append(
                {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
            )
        if cached is not None:
            outputs = outputs[-1:]
        stats = {k: float(torch.stack([o[k] for o in outputs]).mean()) for k in outputs[0]}
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}: lower --lr or use fp32")
        return stats

    def optimizer_step(self) -> float:
        """Clip, step, schedule, clamp the temperature; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else math.inf
        if self.fsdp:
            from duomo.train import fsdp

            fsdp.average_whole_grads(self.whole_params, self.info.world_size)
            grad_norm = fsdp.clip_grad_norm(self.params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        logit_scale = getattr(self.model, "logit_scale", None)
        if isinstance(logit_scale, nn.Parameter):  # OpenCLIP's clamp: temperature stays >= 1/100
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
        return float(grad_norm)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimiser step over `accum` micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self.forward_backward(micro_batches)
        stats["grad_norm"] = self.optimizer_step()
        if self.ema is not None:
            self.ema.update(self.model)
        stats["lr"] = lr
        self.step += 1
        return stats

    # --- data ---------------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[Batch]:
        """Endless micro-batches from the current data position, advancing (epoch, batch_in_epoch)."""
        while True:
            empty = True
            for batch in self.loader_factory(self.epoch, self.batch_in_epoch):
                empty = False
                self.batch_in_epoch += 1
                yield batch
            if empty and self.batch_in_epoch == 0:
                raise ConfigError(
                    "the training data gave no batch: it needs at least batch_size * world_size samples"
                )
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # --- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (RNG states of this rank only; see save)."""
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict() if not self.fsdp else None,
            "optimizer": self.optimizer.state_dict() if not self.fsdp else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": [ckpt.rng_state()],
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.fsdp and self.cfg.fsdp_save == "full":  # gathered on rank 0 (every rank takes part)
            from duomo.train import fsdp

            state["model"] = fsdp.full_model_state(self.model)
            state["optimizer"] = fsdp.full_optimizer_state(self.model, self.optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (on any rank; each takes its own RNG state when it can)."""
        try:
            if self.fsdp:
                from duomo.train import fsdp

                if state.get("sharded"):
                    fsdp.load_sharded(self.model, self.optimizer, Path(state["sharded"]))
                else:
                    fsdp.load_full_state(self.model, self.optimizer, state)
            else:
                if state.get("model") is None:
                    raise CheckpointError(
                        "this checkpoint is sharded (--fsdp-save sharded): resume it under torchrun, --fsdp"
                    )
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this model and config: {exc}") from exc
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if state.get("world_size", 1) != self.info.world_size:
            log.warning(
                "resuming a %d-process run with %d processes: training continues, but not bit-exactly",
                state.get("world_size", 1),
                self.info.world_size,
            )
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call this)."""
        state = self.state_dict()
        state["rng"] = all_gather_object(state["rng"][0])
        path = None
        if self.fsdp and self.cfg.fsdp_save == "sharded":  # every rank writes its own shards
            from duomo.train import fsdp

            shards = ckpt.checkpoint_path(self.out, self.step).with_suffix(".dcp")
            fsdp.save_sharded(self.model, self.optimizer, shards)
            state["sharded"] = str(shards.resolve())
        if self.info.is_main:
            path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(self.out, self.step))
            ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        barrier()
        return path

    def resume(self, resume: str) -> bool:
        """Load the checkpoint `resume` names; False when "latest" finds none (a fresh start)."""
        path = ckpt.find_checkpoint(resume, self.out)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.out)
            return False
        self.load_state_dict(ckpt.load_checkpoint(path))
        if self.info.is_main:
            self.metrics.truncate(self.step)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )
        return True

    def export(self) -> Path | None:
        """Write the final model (its EMA weights when `cfg.ema` is on) in duomo's native format to OUT/model
        (rank 0)."""
        if (
            self.fsdp
        ):  # gather the whole model (every rank takes part), rank 0 writes it from an unsharded copy
            from duomo.train import fsdp

            state = fsdp.full_model_state(self.model)
            if not self.info.is_main:
                return None
            assert self.shell is not None
            module = fsdp.filled_shell(self.shell, state)
            if self.export_fn is not None:
                return self.export_fn(module, self.out)
            from duomo.io import save_native

            return save_native(module, self.out / "model", self.meta)
        if not self.info.is_main:
            return None
        if self.ema is not None:
            with self.ema.applied(self.model):
                return self._export()
        return self._export()

    def _export(self) -> Path:
        if self.export_fn is not None:
            return self.export_fn(self.model, self.out)
        from duomo.io import save_native

        try:
            return save_native(self.model, self.out / "model", self.meta)
        except CheckpointError as exc:  # a model without a CLIPConfig: keep the weights at least
            log.warning("%s; writing only the weights to %s", exc, self.out / "model.safetensors")
            from duomo.io.files import save_safetensors

            save_safetensors(self.model.state_dict(), self.out / "model.safetensors")
            return self.out / "model.safetensors"

    # --- the loop -----------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (resuming first if asked), or stop early at step `until` with a checkpoint.

        Returns the last metrics record and the output paths ("model" is None until the last step is done).
        """
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        resumed = bool(cfg.resume) and self.resume(cfg.resume)
        if not resumed:
            ckpt.seed_everything(cfg.seed + self.info.rank)
            if self.info.is_main:
                self.metrics.truncate(0)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "train_config.json")
        self.train_mode()
        quiet = cfg.quiet or bool(os.environ.get("CI")) or not self.info.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, disable=quiet, desc="train", dynamic_ncols=True)
        batches = self.micro_batches()
        record: dict[str, Any] = {}
        saved = None
        while self.step < end:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.accum)]
            stats = self.train_step(micro)
            if self.on_step is not None:
                self.on_step(self.step, stats)
            seconds = time.perf_counter() - start
            if self.step % cfg.log_every == 0 or self.step == end:
                record = self.log(stats, micro, seconds)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
            if self.step % cfg.save_every == 0 or self.step == end:
                saved = self.save()
        bar.close()
        if cfg.plot and self.info.is_main:
            plot_curves(self.metrics.read(), self.out / "curves.png")
        model_path = self.export() if self.step == cfg.steps else None
        barrier()
        return {
            "step": self.step,
            "metrics": record,
            "model": model_path,
            "checkpoint": saved,
            "out": self.out,
        }

    def log(self, stats: dict[str, float], micro: list[Batch], seconds: float) -> dict[str, Any]:
        """Average the step's metrics over ranks, append them to metrics.jsonl (every rank must call this)."""
        stats = mean_over_ranks(stats, self.device)
        samples = sum(batch_rows(b) for b in micro) * self.info.world_size
        record = {
            "step": self.step,
            "epoch": self.epoch,
            **stats,
            "logit_scale": self._logit_scale(),
            "samples_per_s": samples / seconds,
        }
        if self.info.is_main:
            self.metrics.write(record)
        return record

    def _logit_scale(self) -> float | None:
        """The current temperature (exp of the parameter), or None for models without one."""
        logit_scale = getattr(self.model, "logit_scale", None)
        return float(logit_scale.detach().exp()) if isinstance(logit_scale, torch.Tensor) else None
