"""`duomo generate`: images from a text prompt, as PNG files plus a grid, with a progress bar over steps."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt ("a purple star!" -> "a-purple-star")."""
    cleaned = re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower()
    return cleaned[:limit].rstrip("-") or "image"


def output_files(out: Path, prompts: list[str], n: int, seed: int) -> list[Path]:
    """One PNG per image, named by its index, prompt and seed (image i is seeded seed + i)."""
    return [out / f"{i:03d}-{slug(prompts[i // n])}-seed{seed + i}.png" for i in range(len(prompts) * n)]


def generate_command(
    prompts: list[str] = typer.Argument(..., help="One or more prompts (quote each)."),
    model: str = typer.Option(
        "shapes-gen", "--model", "-m", help="A shipped generator or a generator folder."
    ),
    n: int = typer.Option(1, "-n", "--n", min=1, help="Images per prompt."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", "-g", min=0, help="Classifier-free guidance scale."),
    sampler: str = typer.Option(None, "--sampler", help="dpm (DPM-Solver++ 2M), ddim, euler_a or ddpm."),
    seed: int = typer.Option(0, "--seed", min=0, help="Image i uses seed + i, whatever the batch size."),
    negative: str = typer.Option(None, "--negative", help="Negative prompt (what to steer away from)."),
    out: Path = typer.Option(Path("generated"), "--out", "-o", help="Folder for the PNG files and grid.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files already in --out."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: a GPU if any)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Create images from text with a diffusion generator (the embedded `shapes-gen` by default)."""
    from duomo.api import load
    from duomo.api.generate import GeneratorPipeline, grid
    from duomo.cli.paths import check_out_dir
    from duomo.errors import InputError

    files = output_files(out, prompts, n, seed)
    sheet = out / "grid.png"
    clash = [f for f in [*files, sheet] if f.exists()]
    if clash and not overwrite:
        raise InputError(f"{clash[0]} exists; pass --overwrite to replace it, or choose another --out")
    check_out_dir(out, keep=True)
    pipe = load(model, device=device)
    if not isinstance(pipe, GeneratorPipeline):
        raise InputError(
            f"{model!r} is not a generator; use shapes-gen or a `duomo train --task text-to-image` folder"
        )

    from tqdm import tqdm

    bar = tqdm(total=None, desc="generate", unit="step", disable=quiet, dynamic_ncols=True)

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    images = pipe.generate(
        prompts,
        n=n,
        negative=negative,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        on_step=on_step,
    )
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, files, strict=True):
        image.save(path)
    grid(images, columns=n if len(prompts) > 1 else None).save(sheet)
    console.print(f"wrote {len(images)} image(s) and {sheet.name} to {out}")


def register(app: typer.Typer) -> None:
    """Add `duomo generate` to the app."""
    app.command("generate")(generate_command)
