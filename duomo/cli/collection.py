"""`duomo embed-collection`: a collection's embeddings as parquet partitions, on Ray or in this process;
started again after a crash, it embeds only the partitions that are missing."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def embed_collection_command(
    source: str = typer.Argument(
        ..., help="Image folder, manifest (.csv/.tsv/.jsonl), .parquet, or .tar shards."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: part-NNNNN.parquet files, plan.json, manifest.json."
    ),
    model: str = typer.Option(
        "shapes-tiny", "--model", "-m", help="Model name or path (loaded once per worker)."
    ),
    partition_size: int = typer.Option(
        1000, "--partition-size", min=1, help="Images per partition (unit of work)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per model call."),
    ray: bool = typer.Option(
        False, "--ray/--no-ray", help="Run on Ray Data (a pool of actors) or in this process."
    ),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: start a local one)."),
    actors: int = typer.Option(2, "--actors", min=1, help="Ray actors, each holding the model once."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", min=0, help="GPUs per actor (0 on CPU machines)."),
    backend: str = typer.Option("torch", "--backend", help="torch, onnxruntime or onnxruntime-int8."),
) -> None:
    """Embed a collection as resumable parquet partitions (the model and dimension in their metadata)."""
    from tqdm import tqdm

    from duomo.index.collection import run_collection_job

    bar = tqdm(total=0, desc="partitions", unit="part", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    result = run_collection_job(
        source, out, model=model, partition_size=partition_size, batch_size=batch_size, use_ray=ray,
        address=address, actors=actors, num_gpus=num_gpus, backend=backend, progress=progress,
    )  # fmt: skip
    bar.close()
    failed = len(result["failed"])
    console.print(
        f"{result['vectors']} vectors ({result['dim']}-d), {len(result['partitions'])} partitions in {out}; "
        f"{len(result['computed'])} embedded now, the rest were already there; {failed} images failed"
        + (" (listed in manifest.json)" if failed else "")
    )


def register(app: typer.Typer) -> None:
    """Add `duomo embed-collection` to the app."""
    app.command("embed-collection")(embed_collection_command)
