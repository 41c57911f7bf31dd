"""Core commands: models, embed, classify, convert, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:  # piped or captured: wide lines rather than cut-off paths
    console = Console(width=240)


def make_table(*headers: str, title: str | None = None, key_width: int = 0) -> Table:
    """A rich table whose cells wrap instead of being cut off; the key column is at least `key_width` wide."""
    table = Table(title=title)
    table.add_column(headers[0], overflow="fold", min_width=key_width)
    for header in headers[1:]:
        table.add_column(header, overflow="fold")
    return table


ModelOpt = typer.Option(None, "--model", "-m", help="Config name, shipped checkpoint, path or hub id.")
WeightsOpt = typer.Option(None, "--weights", "-w", help="Checkpoint to load into a named config.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available).")
BackendOpt = typer.Option(
    "torch", "--backend", help="torch, onnxruntime or onnxruntime-int8 (exported once, cached)."
)


def models() -> None:
    """List the built-in model configs and the checkpoints shipped with duomo."""
    from duomo.api import list_generators, list_pretrained
    from duomo.io.resolve import list_chat_models
    from duomo.models import get_model_config, list_models, model_architecture

    names = list_pretrained() + list_generators() + list_chat_models() + list_models()
    width = max(map(len, names))
    headers = ("name", "kind", "embed", "image", "patch", "vision w×l", "text w×l", "act")
    table = make_table(*headers, key_width=width)
    for name in list_pretrained():
        table.add_row(name, "trained checkpoint", "", "", "", "", "", "")
    for name in list_generators():
        table.add_row(name, "trained generator", "", "", "", "", "", "")
    for name in list_chat_models():
        table.add_row(name, "trained chat model", "", "", "", "", "", "")
    for name in list_models():
        arch = model_architecture(name)
        if arch != "clip":
            table.add_row(name, f"{arch} config", *[""] * 6)
            continue
        c = get_model_config(name)
        v, t = c.vision, c.text
        text_size = f"{t.width}×{t.layers}" if t.kind == "transformer" else t.kind
        table.add_row(
            name, "clip config", str(c.embed_dim), str(v.image_size), str(v.patch_size),
            f"{v.width}×{v.layers}", text_size, v.act,
        )  # fmt: skip
    console.print(table)


def embed(
    inputs: list[str] = typer.Argument(..., help="Image files or folders (or texts with --text)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .npy (plus .keys.json) or .parquet."),
    text: bool = typer.Option(False, "--text", help="Treat the inputs as texts, not paths."),
    model: str = ModelOpt,
    weights: str = WeightsOpt,
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    layout: str = typer.Option(
        "auto", "--layout", help="Model calls over the CPU cores: auto (measured, remembered) or WxT (2x1)."
    ),
) -> None:
    """Embed image files/folders or texts and write L2-normalised vectors to .npy or .parquet."""
    from duomo.api import load
    from duomo.cli.paths import check_out_file
    from duomo.data.files import iter_image_files
    from duomo.errors import InputError
    from duomo.tasks.clip.embed import embed_image_files, write_embeddings

    if out.exists() and not overwrite:  # fail before the work, not after it
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    check_out_file(out)
    from duomo.tasks.layout import parse_layout

    parse_layout(layout)  # a bad spelling fails before the model loads
    pipe = load(model, weights=weights, device=device, backend=backend)
    if text:
        keys, vectors, failures = list(inputs), pipe.encode_text(list(inputs), batch_size).numpy(), {}
    else:
        files = iter_image_files(inputs)
        if not files:
            raise InputError("no image files found in the given paths")
        with tqdm(total=len(files), unit="img", desc="embedding", disable=None) as bar:
            result = embed_image_files(pipe, files, batch_size, on_batch=bar.update, layout=layout)
        keys, vectors, failures = result.paths, result.embeddings, result.failures
        if result.layout and len(files) > batch_size:
            err_console.print(result.layout, highlight=False)
    for path, reason in failures.items():
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)
    if not keys:  # nothing to write: say so and exit 1, leaving any earlier output alone
        raise InputError(f"none of the {len(failures)} images could be read; nothing written to {out}")
    written = write_embeddings(out, keys, vectors, overwrite=overwrite)
    console.print(f"wrote {len(keys)} × {vectors.shape[1]} embeddings to {', '.join(map(str, written))}")


def classify(
    images: list[str] = typer.Argument(..., help="Image files or folders."),
    labels: str = typer.Option(
        ..., "--labels", "-l", help="Comma-separated labels, or @file with one per line."
    ),
    templates: str = typer.Option(None, "--templates", help="Comma-separated prompt templates with {}."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON records instead of a table."),
    model: str = ModelOpt,
    weights: str = WeightsOpt,
    device: str = DeviceOpt,
) -> None:
    """Zero-shot classify images against the given labels and print the best labels per image."""
    from duomo.api import load
    from duomo.data.files import iter_image_files
    from duomo.errors import InputError

    label_list = _read_list(labels)
    template_list = [t.strip() for t in templates.split(",")] if templates else None
    files = iter_image_files(images)
    if not files:
        raise InputError("no image files found in the given paths")
    pipe = load(model, weights=weights, device=device)
    ranked = pipe.zero_shot_classify([str(f) for f in files], label_list, template_list, top_k=top_k)
    if as_json:
        records = [
            {"image": str(f), "labels": [{"label": lab, "score": round(p, 6)} for lab, p in r]}
            for f, r in zip(files, ranked, strict=True)
        ]
        print(json.dumps(records, ensure_ascii=False, indent=2))
        return
    headers = [f"#{i + 1}" for i in range(min(top_k, len(label_list)))]
    table = make_table("image", *headers, title=f"model {pipe.name}")
    for f, r in zip(files, ranked, strict=True):
        table.add_row(str(f), *[f"{lab} ({p:.2f})" for lab, p in r])
    console.print(table)


def convert(
    src: str = typer.Argument(
        ..., help="Checkpoint: duomo dir, HF CLIPModel dir, OpenCLIP/OpenAI file, hub id, or a config name."
    ),
    dst: Path = typer.Argument(
        ..., help="Output directory (duomo, hf, onnx) or file (.safetensors/.pt for openclip)."
    ),
    to: str = typer.Option(
        "duomo", "--to", "-t", help="Target format: duomo, hf, openclip, cnclip (Chinese-CLIP .pt) or onnx."
    ),
    model: str = typer.Option(None, "--model", "-m", help="Config name for raw state dicts (else inferred)."),
    quick_gelu: bool = typer.Option(
        None, "--quick-gelu/--no-quick-gelu", help="Activation of raw OpenCLIP dicts."
    ),
    int8: bool = typer.Option(False, "--int8", help="onnx: quantise both towers to int8 (u8, per channel)."),
    check: Path = typer.Option(
        None, "--check", help="onnx: compare image embeddings with fp32 duomo on the images in this folder."
    ),
    min_cosine: float = typer.Option(
        0.999, "--min-cosine", help="onnx --check: refuse the export if any image's cosine is below this."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Convert a checkpoint between formats (duomo, Hugging Face CLIPModel, OpenCLIP state dict, ONNX)."""
    from duomo.errors import InputError

    if dst.exists() and any(dst.iterdir() if dst.is_dir() else [dst]) and not overwrite:
        raise InputError(f"{dst} exists; pass --overwrite to replace it")
    if to != "onnx":
        if int8 or check is not None:
            raise InputError("--int8 and --check are for --to onnx")
        from duomo.io.convert import convert_checkpoint

        written = convert_checkpoint(src, dst, to, config=model, quick_gelu=quick_gelu)
        console.print(f"wrote {to} checkpoint to {written}")
        return
    from duomo.api import load
    from duomo.tasks.clip.onnx_export import export_for_onnxruntime

    pipe = load(src, device="cpu")
    result = export_for_onnxruntime(pipe, dst, int8=int8, check=check, min_cosine=min_cosine)
    console.print(f"wrote {'int8' if int8 else 'fp32'} ONNX towers to {result['out']}")
    if "min_cosine" in result:
        console.print(
            f"checked on {int(result['images'])} images: cosine to fp32 min {result['min_cosine']:.5f}, "
            f"mean {result['mean_cosine']:.5f}"
        )


def demo(
    model: str = ModelOpt,
    out: Path = typer.Option(
        None, "--out", help="Keep the converted checkpoints here (default: a temp dir)."
    ),
) -> None:
    """The Quick start demo: zero-shot labels from the embedded model and an exact format round trip."""
    from duomo.api.demo import run_demo

    run_demo(model, out, console)


def _read_list(spec: str) -> list[str]:
    """Comma-separated items, or one item per line of @file."""
    from duomo.errors import InputError

    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise InputError(f"label file {path} does not exist")
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        items = [item.strip() for item in spec.split(",")]
    items = [i for i in items if i]
    if not items:
        raise InputError("no labels given")
    return items


def register(app: typer.Typer) -> None:
    """Add the core commands to the `duomo` app."""
    for command in (models, embed, classify, convert, demo):
        app.command()(command)
