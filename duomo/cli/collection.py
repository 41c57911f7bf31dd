"""`duomo embed-collection`: a collection's embeddings as parquet partitions, on Ray or in this process;
started again after a crash, it embeds only the partitions that are missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)


class PartitionBar:
    """A tqdm bar over partitions, drawn from the first progress report on (an early error prints alone)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="partitions", unit="part", dynamic_ncols=True)
        self.bar.total, self.bar.n = total, done
        self.bar.refresh()

    def __enter__(self) -> PartitionBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


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
    from duomo.index.collection import run_collection_job

    bar = PartitionBar()

    with bar:
        result = run_collection_job(
            source, out, model=model, partition_size=partition_size, batch_size=batch_size, use_ray=ray,
            address=address, actors=actors, num_gpus=num_gpus, backend=backend, progress=bar.update,
        )  # fmt: skip
    failed = len(result["failed"])
    console.print(
        f"{result['vectors']} vectors ({result['dim']}-d), {len(result['partitions'])} partitions in {out}; "
        f"{len(result['computed'])} embedded now, the rest were already there; {failed} images failed"
        + (" (listed in manifest.json)" if failed else "")
    )


def build_index_command(
    embeddings: Path = typer.Argument(..., help="A finished `duomo embed-collection` output folder."),
    out: Path = typer.Argument(..., help="The sharded index folder (created, or added to)."),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Threads quantising partitions."),
    train_size: int = typer.Option(
        None, "--train-size", min=2, help="Vectors to train the quantisers on (default: 64 per list)."
    ),
    expected: int = typer.Option(
        None, "--expected", min=1, help="Vectors the index will hold in the end (sizes the lists)."
    ),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="Lists probed per segment (default 32)."),
    rerank: int = typer.Option(
        None,
        "--rerank",
        min=1,
        help="Candidates scored exactly per query (default 200; more: higher recall).",
    ),
) -> None:
    """Build (or add to) a sharded on-disk IVF-PQ index from embedding partitions; search it with
    `duomo search QUERY --index OUT` or `duomo serve --index OUT`."""
    from duomo.index.sharded import build_from_collection

    bar = PartitionBar()

    with bar:
        result = build_from_collection(
            embeddings, out, workers=workers, train_size=train_size, expected=expected,
            progress=bar.update, nprobe=nprobe, rerank=rerank,
        )  # fmt: skip
    manifest = result["manifest"]
    total = sum(s["rows"] for s in manifest["segments"])
    params = manifest["params"]
    searched = f"searched with {params['nprobe']} probes and {params['rerank']} re-ranked candidates"
    if result["segment"] is None:
        console.print(
            f"nothing to add: {out} already holds every partition of {embeddings} ({total} vectors); "
            f"{searched}",
            highlight=False,
        )
        return
    seg = result["segment"]
    console.print(
        f"added {result['added']} vectors as {seg['name']} ({seg['add_seconds']:.1f} s quantising, "
        f"{seg['merge_seconds']:.1f} s merging); {out} holds {total} vectors in "
        f"{len(manifest['segments'])} segment(s) of {manifest['model']}; {searched}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add `duomo embed-collection` and `duomo build-index` to the app."""
    app.command("embed-collection")(embed_collection_command)
    app.command("build-index")(build_index_command)
