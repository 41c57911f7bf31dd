"""`duomo train`: contrastive training from a JSON config and/or flags (also under torchrun)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def train(
    config: Path = typer.Option(None, "--config", "-c", help="JSON file of training config fields."),
    task: str = typer.Option(
        None, "--task", help="contrastive (CLIP/SigLIP, the default), text-to-image (a generator) or chat."
    ),
    model: str = typer.Option(None, "--model", "-m", help="Model config name or JSON path (e.g. ViT-tiny)."),
    text_from: str = typer.Option(
        None, "--text-from", help="text-to-image: the CLIP whose frozen text tower conditions the generator."
    ),
    vision_from: str = typer.Option(
        None, "--vision-from", help="chat: the duomo CLIP whose image tower sees."
    ),
    lm_from: str = typer.Option(
        None, "--lm-from", help="chat: the language model (smollm2, a .gguf file, a transformers directory)."
    ),
    stage: int = typer.Option(None, "--stage", help="chat: 1 aligns the projector, 2 instruction-tunes."),
    lora_rank: int = typer.Option(None, "--lora-rank", min=0, help="chat: LoRA rank on the LM (0: none)."),
    lora_scope: str = typer.Option(
        None, "--lora-scope", help="chat: image (adapters at image tokens; text keeps the base LM) or all."
    ),
    train_lm: bool = typer.Option(None, "--train-lm/--no-train-lm", help="chat: stage 2 tunes the whole LM."),
    ema: float = typer.Option(None, "--ema", help="Export an exponential moving average with this decay."),
    caption_dropout: float = typer.Option(
        None, "--caption-dropout", help="text-to-image: share of empty captions (for guidance)."
    ),
    pretrained: str = typer.Option(
        None, "--pretrained", help="Checkpoint to start from (any format duomo reads)."
    ),
    data: str = typer.Option(
        None, "--data", "-d", help="shapes, digits, or a manifest / folder / shard glob."
    ),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps."),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", min=1, help="Pairs per process and micro-batch."
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    wd: float = typer.Option(
        None, "--wd", help="AdamW weight decay (not on biases, norms, embeddings, scales)."
    ),
    warmup: int = typer.Option(None, "--warmup", min=0, help="Linear warm-up steps."),
    accum: int = typer.Option(None, "--accum", min=1, help="Micro-batches per optimiser step."),
    precision: str = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (fp16: GPU only)."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Max gradient norm (0 disables)."),
    fsdp: bool = typer.Option(
        None, "--fsdp/--no-fsdp", help="Under torchrun: shard weights, gradients and optimiser state (FSDP2)."
    ),
    fsdp_save: str = typer.Option(
        None,
        "--fsdp-save",
        help="With --fsdp: full (one gathered file) or sharded (distributed checkpoint).",
    ),
    grad_checkpointing: bool = typer.Option(
        None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations to save memory."
    ),
    lock_image: bool = typer.Option(
        None, "--lock-image/--no-lock-image", help="LiT: freeze the image tower."
    ),
    lock_text: bool = typer.Option(None, "--lock-text/--no-lock-text", help="Freeze the text tower."),
    loss: str = typer.Option(None, "--loss", help="clip (InfoNCE) or siglip."),
    hard_negatives: int = typer.Option(None, "--hard-negatives", min=0, help="Negative captions per image."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, metrics, curves, model."),
    resume: str = typer.Option(None, "--resume", help="Checkpoint file, run folder, or 'latest' (in --out)."),
    save_every: int = typer.Option(None, "--save-every", min=1, help="Steps between checkpoints."),
    log_every: int = typer.Option(None, "--log-every", min=1, help="Steps between metric lines."),
    workers: int = typer.Option(None, "--workers", min=0, help="Data loader processes per training process."),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: the local GPU if any)."),
    quiet: bool = typer.Option(None, "--quiet/--progress", "-q", help="No progress bar."),
    cache_frozen: bool = typer.Option(
        None, "--cache-frozen/--no-cache-frozen", help="Compute a frozen (LiT) tower once per distinct input."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Train into an existing non-empty --out."),
) -> None:
    """Train (or fine-tune) a CLIP/SigLIP model, a text-to-image generator, or a chat model (images in a
    language model) on image-text pairs or conversations; flags override --config."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "overwrite")}
    from duomo.cli.paths import check_out_dir
    from duomo.train.config import TrainConfig
    from duomo.train.distributed import env_world
    from duomo.train.run import train as run_training

    cfg = TrainConfig.from_json(config) if config is not None else TrainConfig()
    cfg = cfg.replace(**flags)
    if env_world()[0] == 0:  # rank 0 only: under torchrun the others would see rank 0's first files
        check_out_dir(Path(cfg.out), overwrite or cfg.resume is not None)
    if not cfg.quiet:
        logging.getLogger("duomo.train").setLevel(logging.INFO)
    if cfg.task == "text-to-image":
        from duomo.tasks.diffusion.train import train_generator

        result = train_generator(cfg)
    elif cfg.task == "chat":
        from duomo.tasks.lm.train import train_chat

        result = train_chat(cfg)
    else:
        result = run_training(cfg)
    if result.get("model") is not None:
        metrics = result.get("metrics") or {}
        loss_text = f", final loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        console.print(f"trained {result['step']} steps{loss_text}; model written to {result['model']}")


def register(app: typer.Typer) -> None:
    """Add `duomo train` to the app."""
    app.command()(train)
