"""Embedding a large collection as a resumable job, on Ray Data or in this process.

The collection (image folders, image/caption manifests, parquet files with a path column, or WebDataset
shards) is listed in a fixed order and cut into partitions of `partition_size` images: the partition is the
unit of work. Each is embedded by a worker that holds the model once (a Ray actor, `num_gpus` each where GPUs
exist) and written atomically as OUT/part-NNNNN.parquet (key, embedding; the model, the dimension and the
images that failed to decode in its metadata). A job killed at any moment and started again embeds only the
partitions that are not on disk; the result equals an uninterrupted run and the in-process path. At the end
OUT/manifest.json lists the partitions, counts and failures.

    duomo embed-collection ~/Pictures runs/emb --model shapes-tiny --partition-size 1000 --ray
    duomo embed-collection shards/ runs/emb --ray --address ray://head:10001 --actors 16 --num-gpus 1
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from duomo.errors import DuomoError, InputError

PLAN = "plan.json"
MANIFEST = "manifest.json"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# --- listing ------------------------------------------------------------------------------------------------
def list_items(source: str | os.PathLike) -> list[dict[str, str]]:
    """The collection's images in a fixed order: {"key", "path"} (files), {"key", "shard", "member"} (tar)."""
    from duomo.data.files import iter_image_files
    from duomo.data.pairs import MANIFEST_FORMATS, WDS_IMAGE_EXTENSIONS

    path = Path(source).expanduser()
    if path.is_dir() and any(p.suffix in (".tar",) for p in path.iterdir()):
        return _tar_items(sorted(p for p in path.iterdir() if p.suffix == ".tar"), WDS_IMAGE_EXTENSIONS)
    if path.suffix == ".tar" and path.is_file():
        return _tar_items([path], WDS_IMAGE_EXTENSIONS)
    if path.is_dir():
        return [{"key": str(p.relative_to(path)), "path": str(p)} for p in iter_image_files([path])]
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = next((c for c in ("path", "image", "file") if c in table.column_names), None)
        if column is None:
            raise InputError(f"{path} has no path/image/file column of image paths")
        return [{"key": v, "path": str(path.parent / v)} for v in table.column(column).to_pylist() if v]
    if path.is_file() and path.suffix.lower().lstrip(".") in {f.lstrip(".") for f in MANIFEST_FORMATS}:
        from duomo.data.pairs import _manifest_format, read_manifest

        _, rows = read_manifest(path, _manifest_format(path))
        items = []
        for _, row in rows:
            value = row.get("image") or row.get("path") or row.get("file")
            if value:
                items.append({"key": str(value), "path": str(path.parent / str(value))})
        return items
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    raise InputError(
        f"{path}: use an image folder, a manifest (.csv/.tsv/.jsonl), a .parquet or WebDataset .tar shards"
    )


def _tar_items(shards: list[Path], extensions: Sequence[str]) -> list[dict[str, str]]:
    items = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                names = sorted(m.name for m in tar.getmembers() if m.isfile())
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{shard} is not a readable tar shard ({exc})") from exc
        for name in names:
            if name.rsplit(".", 1)[-1].lower() in extensions:
                items.append({"key": f"{shard.name}/{name}", "shard": str(shard), "member": name})
    return items


def fingerprint(items: list[dict[str, str]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        digest.update(item["key"].encode() + b"\0")
    return digest.hexdigest()


# --- one partition ------------------------------------------------------------------------------------------
def _read(item: dict[str, str]) -> Any:
    if "member" in item:
        with tarfile.open(item["shard"]) as tar:
            member = tar.extractfile(item["member"])
            if member is None:
                raise InputError(f"{item['key']} is not a file in its shard")
            return member.read()
    return item["path"]


def embed_partition(
    pipeline: Any, items: list[dict[str, str]], batch_size: int
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(keys, vectors [n, dim], failures {key: reason}) of one partition's images."""
    import torch

    keys, chunks, failures, batch, batch_keys = [], [], {}, [], []

    def flush() -> None:
        if batch:
            chunks.append(pipeline.encode_pixels(torch.stack(batch)).numpy())
            keys.extend(batch_keys)
            batch.clear()
            batch_keys.clear()

    for item in items:
        try:
            source = _read(item)
            batch.append(pipeline.preprocess(io.BytesIO(source) if isinstance(source, bytes) else source))
            batch_keys.append(item["key"])
        except (DuomoError, OSError, tarfile.TarError) as exc:
            failures[item["key"]] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    dim = pipeline.embed_dim
    vectors = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
    return keys, vectors, failures


def write_partition(
    out: Path, index: int, keys: list[str], vectors: np.ndarray, failures: dict[str, str], model: str
) -> Path:
    """OUT/part-NNNNN.parquet, atomically (a temporary sibling renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    table = pa.table({"key": keys, "embedding": pa.array(list(vectors), type=pa.list_(pa.float32()))})
    meta = {"duomo_model": model, "duomo_dim": str(dim), "duomo_failures": json.dumps(failures)}
    table = table.replace_schema_metadata(meta)
    target = out / part_name(index)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class PartitionEmbedder:
    """A worker holding the model once: embeds whole partitions and writes each to disk (a Ray Data actor)."""

    def __init__(self, model: str, backend: str, out: str, batch_size: int, threads: int = 1) -> None:
        import torch

        from duomo.api import load

        torch.set_num_threads(max(1, threads))
        self.pipeline = load(model, backend=backend)
        self.model, self.out, self.batch_size = model, Path(out), batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = {"index": [], "count": [], "failed": []}
        for index, items in zip(batch["index"], batch["items"], strict=True):
            keys, vectors, failures = embed_partition(self.pipeline, json.loads(items), self.batch_size)
            write_partition(self.out, int(index), keys, vectors, failures, self.model)
            done["index"].append(int(index))
            done["count"].append(len(keys))
            done["failed"].append(len(failures))
        return {k: np.asarray(v) for k, v in done.items()}


# --- the job ------------------------------------------------------------------------------------------------
def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write the plan on the first run; on a restart it must be the same job (source, model, partitions)."""
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan.get(k))
            raise InputError(
                f"{out} holds another embedding job (different {', '.join(changed)}); use a new output folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1) + "\n")


def missing_partitions(out: Path, count: int) -> list[int]:
    return [i for i in range(count) if not (out / part_name(i)).is_file()]


def run_collection_job(
    source: str | os.PathLike,
    out: str | os.PathLike,
    model: str = "shapes-tiny",
    partition_size: int = 1000,
    batch_size: int = 32,
    use_ray: bool = True,
    address: str | None = None,
    actors: int = 2,
    num_gpus: float = 0.0,
    backend: str = "torch",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Embed every image of `source` into OUT/part-*.parquet (skipping partitions already there) and write
    OUT/manifest.json; returns the manifest plus "computed": the partitions this run embedded."""
    if partition_size < 1 or batch_size < 1 or actors < 1:
        raise InputError("partition_size, batch_size and actors must be at least 1")
    out = Path(out).expanduser()
    items = list_items(source)
    if not items:
        raise InputError(f"no images found in {source}")
    partitions = [items[i : i + partition_size] for i in range(0, len(items), partition_size)]
    plan = {
        "source": str(Path(source).expanduser().resolve()),
        "model": model,
        "backend": backend,
        "partition_size": partition_size,
        "images": len(items),
        "fingerprint": fingerprint(items),
    }
    check_plan(out, plan)
    for stale in out.glob(".part-*.tmp"):  # a write cut off by a crash: its partition counts as missing
        stale.unlink(missing_ok=True)
    todo = missing_partitions(out, len(partitions))
    started = time.perf_counter()
    if todo and use_ray:
        _run_on_ray(partitions, todo, out, model, backend, batch_size, address, actors, num_gpus, progress)
    elif todo:
        import torch

        threads = torch.get_num_threads()  # the worker takes every core; the caller gets its setting back
        try:
            worker = PartitionEmbedder(model, backend, str(out), batch_size, threads=os.cpu_count() or 1)
            for n, i in enumerate(todo, 1):
                worker({"index": [i], "items": [json.dumps(partitions[i])]})
                if progress:
                    progress(n, len(todo))
        finally:
            torch.set_num_threads(threads)
    manifest = write_manifest(out, len(partitions), model)
    return {**manifest, "computed": todo, "seconds": time.perf_counter() - started}


def _run_on_ray(
    partitions: list[list[dict]], todo: list[int], out: Path, model: str, backend: str, batch_size: int,
    address: str | None, actors: int, num_gpus: float, progress: Callable[[int, int], None] | None,
) -> None:  # fmt: skip
    try:
        import ray
    except ImportError as exc:
        raise InputError("the Ray path needs Ray: pip install 'duomo[ray]' (or run without --ray)") from exc
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    rows = [{"index": i, "items": json.dumps(partitions[i])} for i in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    done = ds.map_batches(
        PartitionEmbedder,
        fn_constructor_kwargs={"model": model, "backend": backend, "out": str(out), "batch_size": batch_size},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=num_gpus or None,
    )
    for n, _ in enumerate(done.iter_rows(), 1):
        if progress:
            progress(n, len(todo))


def write_manifest(out: Path, count: int, model: str) -> dict[str, Any]:
    """OUT/manifest.json from the partition files' metadata (every partition must be there)."""
    import pyarrow.parquet as pq

    missing = missing_partitions(out, count)
    if missing:
        raise DuomoError(f"{len(missing)} partitions are missing (first: {part_name(missing[0])}); run again")
    parts, failures, total, dim = [], {}, 0, 0
    for i in range(count):
        meta = pq.read_metadata(out / part_name(i))
        extra = {k.decode(): v.decode() for k, v in (meta.schema.to_arrow_schema().metadata or {}).items()}
        rows = meta.num_rows
        dim = max(dim, int(extra.get("duomo_dim", 0)))
        failures.update(json.loads(extra.get("duomo_failures", "{}")))
        parts.append({"file": part_name(i), "rows": rows})
        total += rows
    manifest = {"model": model, "dim": dim, "vectors": total, "partitions": parts, "failed": failures}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_collection(out: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(keys, vectors) of a finished job, in partition order."""
    import pyarrow.parquet as pq

    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    keys, chunks = [], []
    for part in manifest["partitions"]:
        table = pq.read_table(out / part["file"])
        keys += table.column("key").to_pylist()
        emb = table.column("embedding").to_pylist()
        chunks.append(np.asarray(emb, dtype=np.float32).reshape(len(emb), manifest["dim"]))
    return keys, np.concatenate(chunks) if chunks else np.zeros((0, manifest["dim"]), np.float32)
