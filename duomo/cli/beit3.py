"""BEiT-3 task commands: `duomo ask`, `duomo caption`, `duomo beit3-train` (MDM pretraining, fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
TRAIN_TASKS = ("pretrain", "vqa", "caption", "retrieval", "classify")

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
    from duomo.tasks.vqa import answer, load_vqa

    path = _image_path(image)
    vqa = load_vqa(model)
    text, prob = answer(vqa, path, question, spm)
    typer.echo(f"{text}\t{prob:.3f}")


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
    from duomo.tasks.caption import caption_image, load_caption

    path = _image_path(image)
    typer.echo(caption_image(load_caption(model), path, beam, max_len, spm, guide, guide_weight))


def train_command(
    task: str = typer.Argument(
        ..., help="pretrain (masked data modelling), vqa, caption, retrieval (dual encoder) or classify."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model."),
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
    size: int = typer.Option(2000, "--size", "-n", min=8, help="Shapes training images."),
    eval_size: int = typer.Option(200, "--eval-size", min=0, help="Images per eval split (0: no eval)."),
    freeze_vision: bool = typer.Option(
        False,
        "--freeze-vision",
        help="Keep the vision-only parameters fixed (with --vision-init or a pretrained --init): the image "
        "features stay as learned, fusion and text train. pretrain: MLM only (VLMo's second stage).",
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    loss: str = typer.Option("bce", "--loss", help="vqa: bce (unilm's) or ce (one right answer)."),
    label: str = typer.Option("shape", "--label", help="classify: the main object's shape, colour or pair."),
    spm: Path = SpmOpt,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an existing non-empty --out folder."
    ),
) -> None:
    """Pretrain (MDM) or fine-tune (VQA, captioning, retrieval, classification) a BEiT-3 on the shapes world;
    evals print as JSON."""
    import torch

    from duomo.errors import InputError
    from duomo.train import mdm

    if threads:
        torch.set_num_threads(threads)
    log_every = max(1, steps // 10)
    if task not in TRAIN_TASKS:
        raise InputError(f"unknown task {task!r}; choose {', '.join(TRAIN_TASKS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:  # fail before the work
        raise InputError(f"{out} exists and is not empty; pass --overwrite or choose another folder")
    if init is not None and vision_init is not None:
        raise InputError("--vision-init starts a fresh backbone; --init already brings one: drop one of them")
    if task == "pretrain" and freeze_vision and vision_init is None:
        raise InputError("pretrain --freeze-vision keeps a CLIP image tower fixed: add --vision-init MODEL")
    if task == "pretrain":
        if init is not None:
            raise InputError("pretrain starts from scratch (or --vision-init); drop --init")
        model, _ = mdm.pretrain_shapes(
            config, steps, batch_size, lr, size, seed, log_every, vision_init, freeze_vision
        )
        console.print(f"saved {mdm.save_mdm(model, out)}")
        return
    from duomo.models.beit3_init import freeze_vision as freeze
    from duomo.models.beit3_init import start_backbone

    pretrained = mdm.load_mdm(init) if init is not None else None
    torch.manual_seed(seed)
    backbone = pretrained.beit3 if pretrained else start_backbone(config, vision_init)
    if task == "vqa":
        from duomo.tasks import vqa

        model = vqa.new_vqa_model(config, backbone)
        if freeze_vision:
            freeze(model)
        train = vqa.ShapesVQA("train", size, model.beit3.cfg, model.answers, seed=seed, spm_path=spm)
        vqa.finetune_vqa(model, train, steps, batch_size, lr, seed, log_every, loss=loss)
        console.print(f"saved {vqa.save_vqa(model, out)}")
        if eval_size:
            for split, data in vqa.vqa_splits(model.beit3.cfg, eval_size, seed, spm_path=spm).items():
                typer.echo(json.dumps({"task": "vqa", "split": split, **vqa.evaluate_vqa(model, data)}))
        return
    if task == "caption":
        from duomo.tasks import caption

        train = caption.ShapesCaptions("train", size, backbone.cfg, seed=seed, spm_path=spm)
        torch.manual_seed(seed)
        model = caption.new_caption_model(backbone.cfg, pretrained, train.vocabulary(), backbone)
        if freeze_vision:
            freeze(model)
        caption.finetune_caption(model, train, steps, batch_size, lr, seed, log_every)
        console.print(f"saved {caption.save_caption(model, out)}")
        if eval_size:
            from duomo.tasks.caption_guide import resolve_guide

            guide = resolve_guide(model.beit3.vision_init)  # a --vision-init start: also eval guided decoding
            for split in ("val", "heldout"):
                data = caption.ShapesCaptions(split, eval_size, model.beit3.cfg, seed=seed + 1, spm_path=spm)
                for g in (None, guide) if guide is not None else (None,):
                    record = {"task": "caption", "split": split, "decoding": "guided" if g else "greedy"}
                    typer.echo(json.dumps(record | caption.evaluate_caption(model, data, guide=g)))
        return
    if task == "retrieval":
        from duomo.models.beit3 import BEiT3ForRetrieval
        from duomo.tasks import beit3_retrieval as retrieval
        from duomo.tasks.caption import ShapesCaptions

        torch.manual_seed(seed)
        model = BEiT3ForRetrieval(backbone)
        if freeze_vision:
            freeze(model)
        pairs = ShapesCaptions("train", size, backbone.cfg, seed=seed, spm_path=spm)
        retrieval.finetune_retrieval(model, pairs, steps, batch_size, lr, seed, log_every)
        console.print(f"saved {retrieval.save_retrieval(model, out)}")
        for split in ("val", "heldout") if eval_size else ():
            data = ShapesCaptions(split, eval_size, backbone.cfg, seed=seed + 1, spm_path=spm)
            typer.echo(
                json.dumps({"task": task, "split": split, **retrieval.evaluate_retrieval(model, data)})
            )
        return
    from duomo.tasks import beit3_classify as classify

    torch.manual_seed(seed)
    model = classify.ClassifyModel(backbone, label)
    if freeze_vision:
        freeze(model)
    labelled = classify.ShapesClassification("train", size, backbone.cfg, label, seed=seed)
    classify.finetune_classify(model, labelled, steps, batch_size, lr, seed, log_every)
    console.print(f"saved {classify.save_classify(model, out)}")
    for split in (("val", "heldout") if label != "pair" else ("val",)) if eval_size else ():
        data = classify.ShapesClassification(split, eval_size, backbone.cfg, label, seed=seed + 1)
        typer.echo(json.dumps({"task": task, "split": split, **classify.evaluate_classify(model, data)}))


def register(app: typer.Typer) -> None:
    """Add `duomo ask`, `duomo caption` and `duomo beit3-train` to the app."""
    app.command("ask")(ask_command)
    app.command("caption")(caption_command)
    app.command("beit3-train")(train_command)
