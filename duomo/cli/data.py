"""`duomo data ...`: export built-in datasets, preview any dataset as a contact sheet, describe one."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated

import typer

from duomo.data.catalog import BUILTINS, builtin_dataset, open_pairs
from duomo.data.export import FORMATS, contact_sheet, export_dataset, iterate_samples
from duomo.errors import InputError


def export_command(
    name: Annotated[str, typer.Argument(help=f"built-in dataset: {' or '.join(BUILTINS)}")],
    out: Annotated[Path, typer.Argument(help="output folder (new or empty)")],
    format: Annotated[str, typer.Option("--format", "-f", help=f"one of {', '.join(FORMATS)}")] = "folder",  # noqa: A002
    size: Annotated[
        int | None, typer.Option(help="number of samples (shapes: 10000; digits: the whole split)")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="shapes: train|val|heldout; digits: train|test|all")
    ] = None,
    seed: Annotated[int, typer.Option(help="generation / split seed")] = 0,
    image_size: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    shard_size: Annotated[int, typer.Option(help="samples per tar shard or per sub-folder")] = 1000,
    image_format: Annotated[str, typer.Option(help="png (lossless) or jpg")] = "png",
    max_objects: Annotated[int, typer.Option(help="shapes: objects per scene, 1..5")] = 1,
    caption_style: Annotated[str, typer.Option(help="shapes: 'mixed' or one caption style")] = "mixed",
    coloured: Annotated[bool, typer.Option(help="digits: random pale paper and dark ink colours")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it holds a previous export")] = False,
    task: Annotated[
        str,
        typer.Option(
            help="pairs (image-caption); vqa: a JSONL manifest with each image's questions; chat: LLaVA "
            "conversations (conversations.json)"
        ),
    ] = "pairs",
    language: Annotated[str, typer.Option(help="shapes: en, zh (Chinese texts) or both")] = "en",
) -> None:
    """Write a built-in dataset as a caption folder, a csv/tsv/jsonl manifest, or WebDataset shards; with
    --task vqa, as the VQA manifest `duomo beit3-train vqa --data` reads; with --task chat, as LLaVA's
    conversation JSON `duomo train --task chat --data OUT/conversations.json` reads."""
    if task not in ("pairs", "vqa", "chat"):
        raise InputError(f"unknown --task {task!r}; choose pairs, vqa or chat")
    if task == "chat":
        if name != "shapes":
            raise InputError("--task chat needs questions: only the shapes world has them")
        if format not in ("folder", "conversations"):
            raise InputError(f"--task chat writes LLaVA's conversations.json, not {format!r}; drop --format")
        format = "conversations"  # noqa: A001
    if task == "vqa":
        if name != "shapes":
            raise InputError("--task vqa needs questions: only the shapes world has them")
        if format not in ("folder", "jsonl"):
            raise InputError(f"--task vqa writes a JSONL manifest, not {format!r}; drop --format")
        format = "jsonl"  # noqa: A001
    if name == "shapes":
        options: dict = {"max_objects": max_objects, "caption_style": caption_style, "language": language}
    elif name == "digits":
        options = {"coloured": coloured}
    else:
        raise InputError(f"unknown built-in dataset {name!r}; choose one of {list(BUILTINS)}")
    dataset = builtin_dataset(name, split=split, size=size, image_size=image_size, seed=seed, **options)
    meta = {
        "dataset": name,
        "split": getattr(dataset, "split", split),
        "seed": seed,
        "image_size": image_size,
        "task": task,
    }
    result = export_dataset(
        dataset, out, format, shard_size=shard_size, overwrite=overwrite, image_format=image_format, meta=meta
    )
    typer.echo(
        f"wrote {result.count} {name} samples to {result.out} ({format}, {len(result.files) or 'no'} "
        f"{'shards' if format == 'wds' else 'index files'}) in {result.seconds:.1f} s"
    )


def preview_command(
    spec: Annotated[
        str, typer.Argument(help="dataset: shapes[:split], digits[:split], a path, or KIND:PATH")
    ],
    out: Annotated[Path, typer.Argument(help="PNG file to write")],
    n: Annotated[int, typer.Option(help="number of samples")] = 32,
    columns: Annotated[int, typer.Option(help="images per row")] = 8,
    captions: Annotated[int, typer.Option(help="caption lines under each image (0: none)")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    """Draw the first N samples of a dataset as a contact sheet, and print their captions."""
    if out.exists() and not overwrite:
        raise InputError(f"{str(out)!r} exists; pass --overwrite or choose another file")
    samples = list(iterate_samples(open_pairs(spec), n))
    sheet = contact_sheet(samples, columns=columns, caption_lines=captions)
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(out)
    for sample in samples:
        typer.echo(f"{sample['key']}\t{sample['text']}")
    typer.echo(f"wrote {out} ({len(samples)} samples)")


def info_command(
    spec: Annotated[
        str, typer.Argument(help="dataset: shapes[:split], digits[:split], a path, or KIND:PATH")
    ],
    n: Annotated[int, typer.Option(help="samples to show")] = 3,
) -> None:
    """Describe a dataset: its type, size, classes and first few samples."""
    dataset = open_pairs(spec)
    typer.echo(repr(dataset))
    if hasattr(dataset, "__len__"):
        typer.echo(f"samples: {len(dataset)}")
    classes = getattr(dataset, "classes", None)
    if classes:
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        typer.echo(f"classes ({len(classes)}): {shown}")
    for sample in itertools.islice(iterate_samples(dataset), n):
        size = "x".join(map(str, sample["image"].size))
        typer.echo(f"{sample['key']}\t{size}\tlabel={sample['label']}\t{sample['text']}")
    skipped = getattr(dataset, "skipped", None)
    if skipped is not None and skipped.count:
        typer.echo(f"skipped so far: {skipped.count}")


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the duomo app."""
    data_app = typer.Typer(help="Built-in datasets and on-disk data formats.", no_args_is_help=True)
    data_app.command("export")(export_command)
    data_app.command("preview")(preview_command)
    data_app.command("info")(info_command)
    app.add_typer(data_app, name="data")
