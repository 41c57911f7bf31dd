"""The Quick start demo: what duomo does, on what ships inside the package, with no download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from duomo.api import Pipeline, list_pretrained, load
from duomo.errors import DuomoError
from duomo.io import export, load_into, read_checkpoint
from duomo.models import create_model
from duomo.version import __version__


def _reference_outputs(fmt: str, path: Path, images: torch.Tensor, texts: list[str]) -> tuple | None:
    """Embeddings computed by the original library (open_clip or transformers) from an exported checkpoint."""
    try:
        if fmt == "openclip":
            from duomo.tasks.clip.reference import openclip_embeddings

            return openclip_embeddings(path, images, texts)
        from duomo.tasks.clip.reference import hf_embeddings

        return hf_embeddings(path, images, texts)
    except ImportError:
        return None


def zero_shot_section(pipe: Pipeline, console: Console) -> None:
    """Classify freshly generated sample images with the embedded model and print the labels."""
    from duomo.data.shapes import demo_samples

    samples = demo_samples(pipe.config.vision.image_size)
    labels = sorted({s["label_name"] for s in samples} | set(pipe.meta.get("demo_labels", [])))
    ranked = pipe.zero_shot_classify([s["image"] for s in samples], labels, top_k=1)
    table = Table("sample image (truth)", "predicted", "p", title=f"zero-shot with {pipe.name}")
    correct = 0
    for sample, [(label, p)] in zip(samples, ranked, strict=True):
        ok = label == sample["label_name"]
        correct += ok
        table.add_row(sample["label_name"], f"[{'green' if ok else 'red'}]{label}[/]", f"{p:.2f}")
    console.print(table)
    console.print(f"{correct}/{len(samples)} correct: zero-shot, the labels are given as text at test time.")


def interop_section(pipe: Pipeline, out: Path, console: Console) -> None:
    """Export to OpenCLIP and Hugging Face formats, load back, and show the embeddings match."""
    torch.manual_seed(0)
    size = pipe.config.vision.image_size
    images = torch.randn(2, 3, size, size)
    texts = ["a photo of a cat", "two red circles on the left"]
    tokens = pipe.tokenizer(texts)
    with torch.inference_mode():
        ref_img = pipe.model.encode_image(images)
        ref_txt = pipe.model.encode_text(tokens)
    table = Table(
        "format", "written to", "reloaded by", "max |Δ| image", "max |Δ| text", title="format round trip"
    )
    for fmt, target in (
        ("openclip", out / "openclip.safetensors"),
        ("hf", out / "hf"),
        ("duomo", out / "duomo"),
    ):
        written = export(pipe.model, target, fmt)
        config, state = read_checkpoint(written)
        back = create_model(config)
        load_into(back, state)
        back.eval()
        with torch.inference_mode():
            d_img = (back.encode_image(images) - ref_img).abs().max().item()
            d_txt = (back.encode_text(tokens) - ref_txt).abs().max().item()
        table.add_row(fmt, written.name, "duomo", f"{d_img:.1e}", f"{d_txt:.1e}")
        if fmt != "duomo":
            ref = _reference_outputs(fmt, written, images, texts)
            if ref is not None:
                img, txt = ref
                lib = "open_clip" if fmt == "openclip" else "transformers"
                d_img, d_txt = (img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item()
                table.add_row(fmt, written.name, lib, f"{d_img:.1e}", f"{d_txt:.1e}")
    console.print(table)


# The zero-shot section prefers the LiT checkpoint (it tells shapes apart, docs/benchmarks.md); it needs the
# MiniLM package (the `train` extra), so without it the default checkpoint is used.
ZERO_SHOT_PREFERRED = "shapes-minilm"


def _zero_shot_pipe(default: Pipeline) -> Pipeline:
    """The shipped checkpoint the zero-shot section shows when no model is named."""
    if ZERO_SHOT_PREFERRED not in list_pretrained():
        return default
    try:
        return load(ZERO_SHOT_PREFERRED, device="cpu")
    except DuomoError:  # e.g. the MiniLM package is not installed
        return default


def run_demo(model: str | None, out: Path | None, console: Console) -> None:
    """Run both sections of the demo: zero-shot labels, then the format round trip."""
    pipe = load(model, device="cpu")
    shown = pipe if model is not None else _zero_shot_pipe(pipe)
    names = pipe.name if shown is pipe else f"{shown.name} (zero-shot), {pipe.name} (format round trip)"
    console.print(f"[bold]duomo {__version__}[/bold] — [cyan]{names}[/cyan]")
    if shown.name in list_pretrained():
        zero_shot_section(shown, console)
    else:
        console.print("[yellow]no trained checkpoint ships in this build; showing interop only[/yellow]")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        interop_section(pipe, out, console)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            interop_section(pipe, Path(tmp), console)
