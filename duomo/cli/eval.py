"""`duomo eval` (zero-shot, retrieval, linear probe: JSON records) and `duomo finetune` (labelled sets)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)  # stdout carries only the JSON records

ModelOpt = typer.Option(None, "--model", "-m", help="Config name, shipped checkpoint, path or hub id.")
WeightsOpt = typer.Option(None, "--weights", "-w", help="Checkpoint to load into a named config.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available).")
TemplatesOpt = typer.Option(
    None, "--templates", help="Prompt templates with {}: comma-separated, or @file with one per line."
)


def _templates(spec: str | None) -> list[str] | None:
    """Comma-separated templates, or one per line of @file; None when not given."""
    if not spec:
        return None
    from duomo.errors import InputError

    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise InputError(f"template file {path} does not exist")
        items = path.read_text(encoding="utf-8").splitlines()
    else:
        items = spec.split(",")
    templates = [t.strip() for t in items if t.strip()]
    if not templates:
        raise InputError("--templates is empty; give templates like 'a photo of a {}.'")
    return templates


def _tasks(spec: str) -> list[str]:
    """`all` or a comma-separated list of tasks."""
    from duomo.tasks.clip.evaluate import TASKS

    return list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]


def eval_command(
    data: str = typer.Option(
        ..., "--data", "-d", help="shapes[:split], digits[:split], a folder, manifest or shards."
    ),
    task: str = typer.Option("all", "--task", "-t", help="zeroshot, retrieval, probe, a comma list, or all."),
    model: str = ModelOpt,
    weights: str = WeightsOpt,
    device: str = DeviceOpt,
    split: str = typer.Option(
        None, "--split", help="shapes: val|heldout|heldout-all (default all three); digits: test|train|all."
    ),
    size: int = typer.Option(None, "--size", "-n", min=1, help="Samples per split (shapes default 1000)."),
    templates: str = TemplatesOpt,
    k_shot: int = typer.Option(None, "--k-shot", min=1, help="Linear probe on k training images per class."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="Data loader processes."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", "-o", help="Append the records to this JSONL file."),
) -> None:
    """Evaluate a model: zero-shot top-1/5, retrieval R@1/5/10, linear probe; one JSON record per result."""
    from duomo.api import load
    from duomo.tasks.clip.evaluate import evaluate, write_records

    pipe = load(model, weights=weights, device=device)
    name = model or pipe.name

    def show(record: dict) -> None:
        if weights:
            record["weights"] = str(weights)
        typer.echo(json.dumps(record, ensure_ascii=False))

    records = evaluate(
        pipe,
        data,
        _tasks(task),
        name,
        _templates(templates),
        split,
        size,
        batch_size,
        workers,
        k_shot,
        seed,
        on_record=show,
    )
    if out is not None:
        write_records(records, out)
        console.print(f"appended {len(records)} records to {out}", highlight=False)


def finetune_command(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Labelled images: an ImageFolder (root/class/*.jpg), a labelled manifest, or digits / shapes.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: a duomo checkpoint plus classifier head."
    ),
    mode: str = typer.Option("full", "--mode", help="probe (head only), full (image tower + head) or lora."),
    model: str = ModelOpt,
    weights: str = WeightsOpt,
    device: str = DeviceOpt,
    epochs: int = typer.Option(10, "--epochs", min=1),
    lr: float = typer.Option(
        None, "--lr", help="Image tower / probe rate (default: probe 1e-3, full 1e-5, lora 1e-4)."
    ),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="Head learning rate (full, lora)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Held out per class to validate on."),
    size: int = typer.Option(None, "--size", "-n", min=1, help="Use only the first N images."),
    lora_rank: int = typer.Option(8, "--lora-rank", min=1),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    wise_alpha: float = typer.Option(
        None, "--wise-alpha", help="WiSE-FT: mix zero-shot and fine-tuned weights."
    ),
    templates: str = TemplatesOpt,
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random resized crops while training."),
    workers: int = typer.Option(0, "--workers", min=0),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing non-empty folder."),
) -> None:
    """Fine-tune a classifier (head initialised zero-shot) on labelled images; save it as a duomo model."""
    from duomo.api import load
    from duomo.errors import InputError
    from duomo.tasks.clip.finetune import FinetuneConfig, finetune, open_labelled, save_finetuned

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty; pass --overwrite or choose another folder")
    cfg = FinetuneConfig(
        mode=mode,
        epochs=epochs,
        lr=lr,
        head_lr=head_lr,
        batch_size=batch_size,
        val_fraction=val_fraction,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        wise_alpha=wise_alpha,
        augment=augment,
        templates=_templates(templates),
        seed=seed,
        workers=workers,
    )
    cfg.check()
    pipe = load(model, weights=weights, device=device)
    dataset = open_labelled(data, size, pipe.config.vision.image_size, seed)

    def show(record: dict) -> None:
        console.print(
            " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        )

    result = finetune(pipe, dataset, cfg, on_epoch=show)
    written = save_finetuned(result, pipe, out)
    before, after = result.before.get("top1"), result.after.get("top1")
    if before is not None:
        console.print(
            f"validation top-1: zero-shot {before:.4f} -> fine-tuned {after:.4f} ({result.n_val} images)"
        )
    typer.echo(
        json.dumps(
            {
                "task": "finetune",
                "model": model or pipe.name,
                "data": data,
                "out": str(written),
                **result.summary(),
            },
            ensure_ascii=False,
        )
    )


def register(app: typer.Typer) -> None:
    """Add `duomo eval` and `duomo finetune` to the app."""
    app.command("eval")(eval_command)
    app.command("finetune")(finetune_command)
