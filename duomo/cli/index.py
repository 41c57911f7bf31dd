"""`duomo index` and `duomo search`: thin wrappers over duomo.index.ImageIndex (search also reads a
sharded index built by `duomo build-index`)."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

IndexOpt = typer.Option(
    None,
    "--index",
    help="Index folder (default: $DUOMO_INDEX, else $XDG_CACHE_HOME or ~/.cache, /duomo/index).",
)
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available).")
LayoutOpt = typer.Option(
    "auto",
    "--layout",
    help="Model calls over the CPU cores: auto (measured on the first batches, then remembered), "
    "or WORKERSxTHREADS like 2x1 or 1x2.",
)
BackendOpt = typer.Option(
    "torch", "--backend", help="torch, onnxruntime or onnxruntime-int8 (exported once, cached)."
)


class OutputFormat(StrEnum):
    """How `duomo search` prints its results."""

    table = "table"
    paths = "paths"
    json = "json"


def index(
    paths: list[Path] = typer.Argument(
        None, help="Folders of images (default: the folders already indexed)."
    ),
    index_dir: Path = IndexOpt,
    model: str = typer.Option(
        None, "--model", "-m", help="Model to embed with (default: the index's own, else duomo's default)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per model call and commit."),
    workers: int = typer.Option(
        2, "--workers", "-j", min=0, help="Threads decoding images ahead of the model."
    ),
    reindex: bool = typer.Option(
        False, "--reindex", help="Re-embed every file (with --model: switch models)."
    ),
    forget: list[Path] = typer.Option(
        None, "--forget", help="Drop an indexed folder and its files (repeatable)."
    ),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    layout: str = LayoutOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index image folders (recursively): new, changed and deleted files are picked up incrementally."""
    from duomo.api import load
    from duomo.errors import InputError
    from duomo.index import ImageIndex, default_index_dir
    from duomo.index.sharded import is_sharded_index
    from duomo.io.resolve import choose_default_model

    directory = index_dir or default_index_dir()
    if is_sharded_index(directory):
        raise InputError(
            f"{directory} is a sharded index; add embedding jobs to it with "
            f"`duomo build-index EMBEDDINGS {directory}`"
        )
    if forget:
        with ImageIndex.open(directory) as idx:
            for root in forget:
                console.print(
                    f"forgot {root}: {idx.forget(root)} files dropped from the index",
                    highlight=False,
                    soft_wrap=True,
                )
        if not paths and not reindex:
            return
    if model is None:
        with ImageIndex.open(directory) as idx:
            model = idx.model_name  # an existing index keeps its model
    if model is None:
        model, notice = choose_default_model()
        if notice:
            err_console.print(f"[yellow]note:[/yellow] {notice}", highlight=False, soft_wrap=True)
    from duomo.tasks.layout import parse_layout

    parse_layout(layout)  # a bad spelling fails before the model loads
    pipe = load(model, device=device, backend=backend)
    with ImageIndex.open(directory, pipe, reindex=reindex) as idx:
        progress = not quiet and sys.stderr.isatty()
        report = idx.update(
            paths or None, progress=progress, batch_size=batch_size, workers=workers, layout=layout
        )
        if report.layout and report.embedded and not quiet:
            err_console.print(report.layout, highlight=False, soft_wrap=True)
        for path, reason in report.failures[:20]:
            err_console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False, soft_wrap=True)
        if report.failed > 20:
            err_console.print(
                f"... and {report.failed - 20} more failed files", highlight=False, soft_wrap=True
            )
        console.print(
            f"indexed in {report.seconds:.1f}s: {report.added} added, {report.updated} updated, "
            f"{report.removed} removed, {report.reused} reused without re-embedding, {report.failed} failed, "
            f"{report.unchanged} unchanged; {report.total} images searchable in {directory} "
            f"({idx.model_name})",
            highlight=False,
            soft_wrap=True,
        )
    if report.failed and not report.total:  # asked to index images and none could be: say so in the exit code
        raise typer.Exit(1)


def search(
    query: list[str] = typer.Argument(
        ..., help='Text, an image file, or a mix: "2:beach" + ./a.jpg - people'
    ),
    index_dir: Path = IndexOpt,
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    fmt: OutputFormat = typer.Option(
        OutputFormat.table, "--format", "-f", help="table, paths (one per line) or json."
    ),
    exact: bool = typer.Option(False, "--exact", help="Exhaustive search even on a large index."),
    model: str = typer.Option(None, "--model", "-m", help="Model for the query (default: the index's own)."),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
) -> None:
    """Search the index by text, by image, or by a weighted combination of both."""
    from duomo.api import load
    from duomo.errors import InputError
    from duomo.index import default_index_dir, parse_query
    from duomo.index.sharded import is_sharded_index, open_any_index
    from duomo.index.store import database_path

    directory = index_dir or default_index_dir()
    if not is_sharded_index(directory) and not database_path(directory).exists():
        raise InputError(f"there is no index at {directory}; build one with `duomo index FOLDER`")
    text = join_query(query)
    parse_query(text)  # a malformed query fails before the model loads
    with open_any_index(directory) as idx:
        if len(idx) == 0:
            raise InputError(f"the index at {directory} holds no images; run `duomo index FOLDER` first")
        model = model or idx.model_name
    pipe = load(model, device=device, backend=backend)
    with open_any_index(directory, pipe) as idx:
        hits = idx.search(text, k=k, exact=True if exact else None)
        model_name = idx.model_name
    if fmt is OutputFormat.paths:
        for hit in hits:
            typer.echo(hit.path)
    elif fmt is OutputFormat.json:
        results = [{"rank": i, "score": round(h.score, 6), "path": h.path} for i, h in enumerate(hits, 1)]
        payload = {"query": text, "model": model_name, "index": str(directory), "results": results}
        typer.echo(json.dumps(payload, ensure_ascii=False))
    else:
        table = Table("#", "score", "path", title=Text(text), title_justify="left")
        for i, hit in enumerate(hits, 1):
            table.add_row(str(i), f"{hit.score:.3f}", Text(hit.path))
        console.print(table)


def join_query(args: list[str]) -> str:
    """One query string from shell words; a word holding spaces was quoted in the shell, so quote it again."""
    if len(args) == 1:
        return args[0]
    return " ".join(f'"{a}"' if any(c.isspace() for c in a) and '"' not in a else a for a in args)


def register(app: typer.Typer) -> None:
    """Add the `index` and `search` commands to the duomo CLI."""
    app.command("index")(index)
    app.command("search")(search)
