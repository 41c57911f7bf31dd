"""BEiT-3 task commands: `duomo ask`, `duomo caption`, `duomo beit3-train` (MDM pretraining, fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)

ModelDirOpt = typer.Option(..., "--model", "-m", help="A fine-tuned model folder (duomo beit3-train --out).")
SpmOpt = typer.Option(
    None,
    "--spm",
    help="unilm's beit3.spm, for a config with tokenizer 'beit3-spm' (default: $DUOMO_BEIT3_SPM).",
)


def _image_path(image: str) -> str:
    """The image argument, checked to exist so the error names the file."""
    from duomo.errors import ImageError

    if not Path(image).is_file():
        raise ImageError(f"no such image file: {image}")
    return image


def ask_command(
    image: str = typer.Argument(..., help="Image file."),
    question: str = typer.Argument(..., help='Question, e.g. "what color is the star?".'),
    model: Path = ModelDirOpt,
    spm: Path = SpmOpt,
) -> None:
    """Answer a question about an image with a BEiT-3 VQA model; prints the answer and its probability."""
    path = _image_path(image)
    vqa = _pipeline(model, "vqa", spm)
    text, prob = vqa.ask([path], [question])[0]
    typer.echo(f"{text}\t{prob:.3f}")


def _pipeline(model: Path, task: str, spm: Path | None):  # noqa: ANN202 - a TaskPipeline of that task
    """The task pipeline of a folder, refused (before its weights are read) unless it is a `task` model."""
    from duomo.api.beit3 import load_task_pipeline
    from duomo.io.beit3_tasks import read_task_config

    read_task_config(model, task)
    pipe = load_task_pipeline(model)
    pipe.spm_path = spm
    return pipe


def caption_command(
    image: str = typer.Argument(..., help="Image file."),
    model: Path = ModelDirOpt,
    beam: int = typer.Option(None, "--beam", min=1, help="Beam width (default: 8 guided, 1 (greedy) not)."),
    max_len: int = typer.Option(32, "--max-len", min=1, help="Most tokens to generate."),
    guide: str = typer.Option(
        "auto",
        "--guide",
        help="CLIP that re-ranks the beam's candidates: auto (the one the model's image tower came from, if "
        "any), none, or a duomo model name or folder.",
    ),
    guide_weight: float = typer.Option(0.5, "--guide-weight", min=0.0, help="Weight of the CLIP's score."),
    spm: Path = SpmOpt,
) -> None:
    """Caption an image with a BEiT-3 captioning model."""
    path = _image_path(image)
    pipe = _pipeline(model, "caption", spm)
    typer.echo(pipe.caption([path], beam, max_len, guide, guide_weight)[0])


def train_command(
    task: str = typer.Argument(
        ..., help="pretrain (masked data modelling), vqa, caption, retrieval (dual encoder) or classify."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model (and its checkpoints)."),
    data: str = typer.Option(
        "shapes",
        "--data",
        help="Training data: 'shapes' (built-in), a VQA manifest (vqa), caption pairs (pretrain, caption, "
        "retrieval: manifest, caption folder, WebDataset), an ImageFolder tree or image,label CSV "
        "(classify).",
    ),
    eval_data: list[str] = typer.Option(
        None, "--eval-data", help="NAME=DATA, repeatable (default for shapes: val and heldout splits)."
    ),
    init: Path = typer.Option(None, "--init", help="Start from a pretrained folder (beit3-train pretrain)."),
    config: str = typer.Option("beit3-tiny", "--config", help="BEiT-3 config name or JSON (fresh start)."),
    vision_init: str = typer.Option(
        None,
        "--vision-init",
        help="Fresh start only: take the vision pathway from this duomo CLIP's image tower (a name such as "
        "shapes-minilm, or a folder); --config then sets the text side.",
    ),
    steps: int = typer.Option(300, "--steps", min=1),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    accum: int = typer.Option(1, "--accum", min=1, help="Micro-batches per optimiser step."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (GPU)."),
    size: int = typer.Option(2000, "--size", "-n", min=8, help="Shapes training images."),
    eval_size: int = typer.Option(200, "--eval-size", min=0, help="Images per shapes eval split (0: none)."),
    freeze_vision: bool = typer.Option(
        False,
        "--freeze-vision",
        help="Keep the vision-only parameters fixed (with --vision-init or a pretrained --init): the image "
        "features stay as learned, fusion and text train. pretrain: MLM only (VLMo's second stage).",
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    loss: str = typer.Option("bce", "--loss", help="vqa: bce (unilm's) or ce (one right answer)."),
    label: str = typer.Option(
        "shape", "--label", help="classify on shapes: main object's shape, colour or pair."
    ),
    head_lr_weight: float = typer.Option(
        1.0, "--head-lr-weight", min=0.0, help="Task heads' learning-rate factor."
    ),
    save_every: int = typer.Option(500, "--save-every", min=1, help="Steps between checkpoints."),
    resume: str = typer.Option(
        None, "--resume", help="'latest' (in --out), a checkpoint file or run folder."
    ),
    spm: Path = SpmOpt,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an existing non-empty --out folder."
    ),
) -> None:
    """Pretrain (MDM) or fine-tune (VQA, captioning, retrieval, classification) a BEiT-3 on the shapes world
    or your own data, through the one trainer (checkpoints, --resume, torchrun); evals print as JSON."""
    import torch

    from duomo.cli.paths import check_out_dir
    from duomo.tasks.beit3.run import BEiT3Run, train_beit3
    from duomo.train.distributed import env_world

    if threads:
        torch.set_num_threads(threads)
    run = BEiT3Run(
        task,
        out,
        data,
        list(eval_data or []),
        init,
        config,
        vision_init,
        freeze_vision,
        size,
        eval_size,
        loss,
        label,
        spm,
        train={
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "accum": accum,
            "precision": precision,
            "seed": seed,
            "head_lr_weight": head_lr_weight,
            "save_every": save_every,
            "resume": resume,
            "log_every": max(1, steps // 10),
            "workers": 0,
            "model": config,
            "data": data,
        },
    )
    run.check()
    if env_world()[0] == 0:  # rank 0 only: under torchrun the others would see rank 0's first files
        check_out_dir(out, overwrite or resume is not None)
    for record in train_beit3(run, log=console.print):
        typer.echo(json.dumps(record))


def register(app: typer.Typer) -> None:
    """Add `duomo ask`, `duomo caption` and `duomo beit3-train` to the app."""
    app.command("ask")(ask_command)
    app.command("caption")(caption_command)
    app.command("beit3-train")(train_command)
