"""A sharded on-disk index for collections too big for RAM: faiss IVF-PQ with on-disk inverted lists,
re-ranked exactly from half-precision vectors read from disk.

Built from the parquet partitions of `duomo embed-collection` (or from any stream of (keys, vectors) chunks):

1. **train** the coarse quantiser (k-means, `nlist` lists) and the product quantiser (`m` sub-vectors of
   `nbits` bits) on a sample, once: `trained.faiss`;
2. **add** chunks in parallel threads (faiss releases the GIL), each into its own small IVF-PQ shard
   file, while their vectors go to a float16 file (`segment-NNNN.f16.npy`) and their keys to SQLite
   (`items.sqlite`);
3. **merge** the shards' inverted lists into one memory-mapped file (`segment-NNNN.ivfdata`, faiss's
   `OnDiskInvertedLists`), then delete the shards.

Steps 2-3 make one *segment*. Adding partitions later makes a new segment with the same trained quantisers:
nothing that exists is rebuilt (`compact` is not needed for correctness; each segment is searched and the
candidates merged). A search probes `nprobe` lists of every segment for `rerank` candidates by their PQ
codes, then scores those candidates exactly (float16 vectors, float32 arithmetic) and keeps the best k.

Memory: the quantisers, the list offsets and the pages the search touches; codes and vectors stay on disk.
`sharded.json` is replaced atomically after each segment, so a build killed at any point leaves the index
as it was before that segment (its partial files are removed on the next build).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duomo.errors import DuomoError, InputError
from duomo.index.errors import IndexCorruptError, ModelMismatchError
from duomo.index.query import compose_query, find_image_file
from duomo.io.files import write_json

log = logging.getLogger("duomo.index")

FORMAT = "duomo-sharded-ivfpq/1"
MANIFEST = "sharded.json"
TRAINED = "trained.faiss"
ITEMS = "items.sqlite"

Chunk = tuple[list[str], np.ndarray]  # keys, vectors [n, dim] (rows L2-normalised)


def is_sharded_index(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a sharded index (its manifest)."""
    return (Path(directory).expanduser() / MANIFEST).is_file()


@dataclass(frozen=True)
class ShardedParams:
    """How the index quantises and searches: chosen from the expected size by `choose_params`."""

    nlist: int  # coarse lists (k-means centroids)
    pq_m: int  # PQ sub-vectors; each vector's code is pq_m * pq_nbits bits
    pq_nbits: int
    nprobe: int  # lists searched per segment
    rerank: int  # candidates scored exactly per query

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def choose_params(expected: int, dim: int, train_rows: int) -> ShardedParams:
    """Parameters for about `expected` vectors trained on `train_rows`: nlist the power of two nearest
    sqrt(n) (and at most train_rows / 39, faiss's minimum per centroid), dim/8 sub-vectors of 8 bits
    (fewer bits when the sample is too small to train 256 centroids each), 32 probes, 200 exact re-rank
    candidates (recall@10 measured in docs/benchmarks.md, "Sharded on-disk index")."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(expected)))))
    nlist = max(1, min(nlist, 65536, train_rows // 39))
    pq_m = max(1, dim // 8)
    while dim % pq_m:
        pq_m -= 1
    nbits = 8 if train_rows >= 39 * 256 else max(1, min(8, int(math.log2(max(2, train_rows // 39)))))
    return ShardedParams(nlist=nlist, pq_m=pq_m, pq_nbits=nbits, nprobe=min(nlist, 32), rerank=200)


# --- files --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """Silence faiss's C++ printf()s to stdout (on-disk list resizing, file re-pointing), which would
    otherwise corrupt `duomo search --format json`; Python's own stdout is flushed around it."""
    import sys

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a daemon): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _create_f16(path: Path, rows: int, dim: int) -> int:
    """Create an empty float16 .npy of [rows, dim] (sparse on disk); return its data offset."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    offset = int(array.offset)
    del array
    return offset


class _Items:
    """id -> (key, path) in SQLite; `path` is the image file when the collection was a folder."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, key TEXT, path TEXT)")
        self.db.execute("CREATE INDEX IF NOT EXISTS items_path ON items(path)")
        self.lock = threading.Lock()

    def add(self, start: int, keys: Sequence[str], paths: Sequence[str | None]) -> None:
        with self.lock, self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?)",
                zip(range(start, start + len(keys)), keys, paths, strict=True),
            )

    def drop_from(self, first_id: int) -> None:
        """Forget rows of a segment that never finished."""
        with self.lock, self.db:
            self.db.execute("DELETE FROM items WHERE id >= ?", (first_id,))

    def names(self, ids: Sequence[int]) -> dict[int, str]:
        """id -> the path (or the key where there is no file) of each id."""
        if not len(ids):
            return {}
        marks = ",".join("?" * len(ids))
        with self.lock:
            rows = self.db.execute(
                f"SELECT id, COALESCE(path, key) FROM items WHERE id IN ({marks})", [int(i) for i in ids]
            ).fetchall()
        return dict(rows)

    def has_path(self, path: str) -> bool:
        with self.lock:
            return (
                self.db.execute("SELECT 1 FROM items WHERE path = ? LIMIT 1", (path,)).fetchone() is not None
            )

    def close(self) -> None:
        self.db.close()


# --- building -----------------------------------------------------------------------------------------------
class ShardedIndexBuilder:
    """Creates a sharded index (`train`) and adds segments to it (`add_segment`)."""

    def __init__(self, directory: str | os.PathLike, workers: int = 2) -> None:
        self.directory = Path(directory).expanduser()
        self.workers = max(1, workers)
        self.manifest: dict[str, Any] | None = None
        if is_sharded_index(self.directory):
            self.manifest = _read_manifest(self.directory)

    @property
    def exists(self) -> bool:
        return self.manifest is not None

    def train(
        self, sample: np.ndarray, model: str, expected: int, params: ShardedParams | None = None
    ) -> None:
        """Train the quantisers on `sample` [n, dim] and write an empty index for about `expected` vectors."""
        import faiss

        if self.exists:
            raise InputError(f"{self.directory} already holds a sharded index; add segments to it instead")
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if sample.ndim != 2 or len(sample) < 2:
            raise InputError(f"training needs at least 2 vectors [n, dim], got shape {tuple(sample.shape)}")
        dim = sample.shape[1]
        params = params or choose_params(expected, dim, len(sample))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_nbits,
                                 faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.own_fields = True
        quantizer.this.disown()
        index.cp.max_points_per_centroid = 256
        index.cp.min_points_per_centroid = 1  # no warnings on small sets: any sample trains
        index.pq.cp.min_points_per_centroid = 1
        index.train(sample)
        self.directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(self.directory / TRAINED))
        self.manifest = {
            "format": FORMAT, "model": model, "dim": dim, "params": params.as_dict(),
            "trained_on": len(sample), "segments": [], "sources": [], "roots": [],
        }  # fmt: skip
        write_json(self.manifest, self.directory / MANIFEST)

    def set_search(self, nprobe: int | None = None, rerank: int | None = None) -> None:
        """Change how searches run (lists probed per segment, candidates re-ranked exactly); the quantisers
        stay as trained. Recorded in the manifest, so `duomo search` and `duomo serve` use it."""
        if self.manifest is None:
            raise InputError(f"{self.directory} holds no trained index yet")
        for name, value in (("nprobe", nprobe), ("rerank", rerank)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        params = self.manifest["params"]
        if nprobe is not None:
            params["nprobe"] = min(nprobe, params["nlist"])
        if rerank is not None:
            params["rerank"] = rerank
        write_json(self.manifest, self.directory / MANIFEST)

    def add_segment(
        self,
        chunks: Iterable[Chunk],
        rows: int,
        paths_of: Callable[[list[str]], list[str | None]] | None = None,
        sources: Sequence[dict[str, Any]] = (),
        roots: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Add `rows` vectors, given as chunks, as one new segment; returns the segment's manifest entry.

        Chunks are quantised in `workers` threads (at most workers + 1 chunks in memory at once);
        `paths_of(keys)` gives each key's image file (None: the key names no file).
        """
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        if self.manifest is None:
            raise InputError(f"{self.directory} holds no trained index yet")
        if rows < 1:
            raise InputError("a segment needs at least one vector")
        manifest, dim = self.manifest, self.manifest["dim"]
        number = len(manifest["segments"])
        name = f"segment-{number:04d}"
        first_id = sum(s["rows"] for s in manifest["segments"])
        self._clean_partial(first_id)
        work = self.directory / f".{name}.shards"
        work.mkdir()
        vectors_file = self.directory / f"{name}.f16.npy"
        offset = _create_f16(vectors_file, rows, dim)
        trained = faiss.read_index(str(self.directory / TRAINED))
        items = _Items(self.directory / ITEMS)
        started = time.perf_counter()
        shard_files: list[str] = []
        try:
            with open(vectors_file, "r+b") as vf, ThreadPoolExecutor(self.workers) as pool:
                pending: list[Future] = []
                position = 0
                for number_in_segment, (keys, vectors) in enumerate(chunks):
                    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
                    if vectors.ndim != 2 or vectors.shape[1] != dim or len(keys) != len(vectors):
                        raise InputError(
                            f"chunk {number_in_segment} has {len(keys)} keys and vectors of shape "
                            f"{tuple(vectors.shape)}; this index holds {dim}-d vectors"
                        )
                    if position + len(keys) > rows:
                        raise InputError(f"the chunks hold more than the {rows} rows announced")
                    shard = work / f"shard-{number_in_segment:06d}.faiss"
                    shard_files.append(str(shard))
                    pending.append(pool.submit(
                        _add_shard, trained, vectors, first_id + position, shard, vf.fileno(),
                        offset + position * dim * 2,
                    ))  # fmt: skip
                    items.add(first_id + position, keys, paths_of(keys) if paths_of else [None] * len(keys))
                    position += len(keys)
                    while len(pending) >= self.workers:
                        pending.pop(0).result()
                        if progress:
                            progress(len(shard_files) - len(pending))
                for future in pending:
                    future.result()
                if position != rows:
                    raise InputError(f"the chunks held {position} rows, {rows} were announced")
            added = time.perf_counter()
            with _quiet_c_stdout():
                merge_ondisk(trained, shard_files, str(self.directory / f"{name}.ivfdata"))
            faiss.write_index(trained, str(self.directory / f"{name}.faiss"))
        except BaseException:
            items.drop_from(first_id)
            items.close()
            self._remove_segment_files(name)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        items.close()
        entry = {
            "name": name, "first_id": first_id, "rows": rows,
            "add_seconds": round(added - started, 2), "merge_seconds": round(time.perf_counter() - added, 2),
        }  # fmt: skip
        manifest["segments"].append(entry)
        manifest["sources"].extend(sources)
        manifest["roots"] = sorted(set(manifest["roots"]) | set(roots))
        write_json(manifest, self.directory / MANIFEST)
        return entry

    def _remove_segment_files(self, name: str) -> None:
        for suffix in (".faiss", ".ivfdata", ".f16.npy"):
            (self.directory / f"{name}{suffix}").unlink(missing_ok=True)

    def _clean_partial(self, first_id: int) -> None:
        """Remove what a killed build of this segment left behind (files and item rows)."""
        assert self.manifest is not None
        name = f"segment-{len(self.manifest['segments']):04d}"
        shutil.rmtree(self.directory / f".{name}.shards", ignore_errors=True)
        self._remove_segment_files(name)
        if (self.directory / ITEMS).is_file():
            items = _Items(self.directory / ITEMS)
            items.drop_from(first_id)
            items.close()


def _add_shard(trained: Any, vectors: np.ndarray, first_id: int, shard: Path, fd: int, offset: int) -> None:
    """Quantise one chunk into its own IVF-PQ shard file and write its float16 vectors at `offset`."""
    import faiss

    index = faiss.clone_index(trained)
    index.add_with_ids(vectors, np.arange(first_id, first_id + len(vectors), dtype=np.int64))
    faiss.write_index(index, str(shard))
    os.pwrite(fd, vectors.astype(np.float16).tobytes(), offset)


# --- building from embed-collection output -----------------------------------------------------------------
def collection_parts(embeddings: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, parts) of a finished `duomo embed-collection` folder; each part has file, rows, size."""
    from duomo.index.collection import MANIFEST as COLLECTION_MANIFEST

    folder = Path(embeddings).expanduser().resolve()
    path = folder / COLLECTION_MANIFEST
    if not path.is_file():
        raise InputError(
            f"{folder} is not a finished embedding job (no {COLLECTION_MANIFEST}); "
            "run `duomo embed-collection SOURCE OUT` first"
        )
    try:
        manifest = json.loads(path.read_text())
        parts = [
            {
                "file": str(folder / p["file"]),
                "rows": int(p["rows"]),
                "size": (folder / p["file"]).stat().st_size,
            }
            for p in manifest["partitions"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the embedding job in {folder}: {exc}") from exc
    return manifest, parts


def _read_part(file: str, dim: int) -> Chunk:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file, columns=["key", "embedding"])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {file}: {exc}") from exc
    keys = table.column("key").to_pylist()
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return keys, np.asarray(flat, dtype=np.float32).reshape(len(keys), dim)


def _training_sample(parts: list[dict[str, Any]], dim: int, size: int, seed: int = 0) -> np.ndarray:
    """About `size` vectors drawn evenly from a random subset of the parts big enough to hold twice that
    many (one part in memory at a time): a 10M collection trains without reading every partition."""
    rng = np.random.default_rng(seed)
    parts = [p for p in parts if p["rows"]]
    order = rng.permutation(len(parts))
    chosen, rows = [], 0
    for i in order:  # whole parts until they hold 2 x size rows
        chosen.append(parts[i])
        rows += parts[i]["rows"]
        if rows >= 2 * size:
            break
    picked = []
    for part in sorted(chosen, key=lambda p: p["file"]):
        take = min(part["rows"], max(1, round(size * part["rows"] / rows)))
        _, vectors = _read_part(part["file"], dim)
        picked.append(vectors[np.sort(rng.choice(len(vectors), take, replace=False))])
    return np.concatenate(picked)


def build_from_collection(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 2,
    train_size: int | None = None,
    expected: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    nprobe: int | None = None,
    rerank: int | None = None,
) -> dict[str, Any]:
    """Index the partitions of an embedding job into OUT: trains OUT on first use, then adds the partitions
    OUT does not hold yet as one new segment; `nprobe`/`rerank` change how OUT is searched.
    Returns {"added": rows, "segment": entry or None, "manifest": ...}."""
    coll, parts = collection_parts(embeddings)
    model, dim = coll.get("model"), int(coll.get("dim") or 0)
    if not dim:
        raise InputError(f"{embeddings} holds no vectors")
    builder = ShardedIndexBuilder(out, workers)
    if builder.exists:
        assert builder.manifest is not None
        if builder.manifest["model"] != model or builder.manifest["dim"] != dim:
            raise ModelMismatchError(
                f"{out} indexes {builder.manifest['dim']}-d vectors of {builder.manifest['model']}; "
                f"{embeddings} holds {dim}-d vectors of {model}"
            )
        known = {(s["file"], s["size"]) for s in builder.manifest["sources"]}
        parts = [p for p in parts if (p["file"], p["size"]) not in known]
    else:
        total = sum(p["rows"] for p in parts)
        train_size = train_size or min(
            total, max(20_000, 64 * choose_params(expected or total, dim, total).nlist)
        )
        builder.train(_training_sample(parts, dim, train_size), model, expected or total)
    if nprobe is not None or rerank is not None:
        builder.set_search(nprobe, rerank)
    parts = [p for p in parts if p["rows"]]
    rows = sum(p["rows"] for p in parts)
    if not rows:
        return {"added": 0, "segment": None, "manifest": builder.manifest}
    plan_file = Path(embeddings).expanduser().resolve() / "plan.json"
    root = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        source = Path(json.loads(plan_file.read_text())["source"])
        root = str(source) if source.is_dir() else None

    def paths_of(keys: list[str]) -> list[str | None]:
        if root is None:
            return [None] * len(keys)
        return [str(Path(root) / k) if "/" not in k or not k.split("/")[0].endswith(".tar") else None
                for k in keys]  # fmt: skip

    chunks = (_read_part(p["file"], dim) for p in parts)
    entry = builder.add_segment(
        chunks, rows, paths_of=paths_of, sources=parts, roots=[root] if root else [],
        progress=(lambda done: progress(done, len(parts))) if progress else None,
    )  # fmt: skip
    return {"added": rows, "segment": entry, "manifest": builder.manifest}


# --- searching ----------------------------------------------------------------------------------------------
def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read {directory / MANIFEST}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{directory} holds a sharded index of format {manifest.get('format')!r}; "
                                f"this duomo reads {FORMAT!r}")  # fmt: skip
    return manifest


class _VectorFile:
    """A float16 .npy read with pread: rows land in this process's memory only while scored (a memory map
    would keep every row a search ever touched resident in the process)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                read_header = np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.float16 or fortran or len(shape) != 2:
            raise ValueError(f"{path.name} is not a [rows, dim] float16 array")
        self.shape: tuple[int, int] = shape
        self.row_bytes = 2 * shape[1]
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at these positions."""
        buf = bytearray(self.row_bytes * len(positions))
        view = memoryview(buf)
        for n, row in enumerate(positions.tolist()):
            view[n * self.row_bytes : (n + 1) * self.row_bytes] = os.pread(
                self.fd, self.row_bytes, self.offset + row * self.row_bytes
            )
        return np.frombuffer(buf, np.float16).reshape(len(positions), self.shape[1]).astype(np.float32)

    def block(self, start: int, count: int) -> np.ndarray:
        """float32 rows start .. start + count."""
        data = os.pread(self.fd, self.row_bytes * count, self.offset + start * self.row_bytes)
        return np.frombuffer(data, np.float16).reshape(-1, self.shape[1]).astype(np.float32)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Segment:
    first_id: int
    rows: int
    index: Any  # faiss IVF-PQ with on-disk lists
    vectors: _VectorFile  # float16 [rows, dim]


class ShardedIndex:
    """A read-only sharded index: the same search surface as `ImageIndex` (search, search_vector, len)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], pipeline: Any | None) -> None:
        """Use `ShardedIndex.open`."""
        import faiss

        self.directory, self.manifest, self.pipeline = directory, manifest, pipeline
        params = manifest["params"]
        self.nprobe, self.rerank = int(params["nprobe"]), int(params["rerank"])
        self.segments: list[_Segment] = []
        for seg in manifest["segments"]:
            try:
                with _quiet_c_stdout():
                    index = faiss.read_index(
                        str(directory / f"{seg['name']}.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR
                    )
                vectors = _VectorFile(directory / f"{seg['name']}.f16.npy")
            except (OSError, RuntimeError, ValueError) as exc:
                raise IndexCorruptError(f"cannot read segment {seg['name']} of {directory}: {exc}") from exc
            if index.ntotal != seg["rows"] or vectors.shape != (seg["rows"], manifest["dim"]):
                raise IndexCorruptError(f"segment {seg['name']} of {directory} does not match its manifest")
            self.segments.append(_Segment(seg["first_id"], seg["rows"], index, vectors))
        self.items = _Items(directory / ITEMS)

    @classmethod
    def open(cls, directory: str | os.PathLike, pipeline: Any | None = None) -> ShardedIndex:
        """Open the index in `directory`; with a pipeline, check it is the model the vectors came from."""
        from duomo.index.core import model_id

        directory = Path(directory).expanduser()
        manifest = _read_manifest(directory)
        if pipeline is not None and manifest["model"] not in (model_id(pipeline), pipeline.name):
            raise ModelMismatchError(
                f"the index at {directory} holds vectors of {manifest['model']}, not {pipeline.name}; "
                f"search it with --model {manifest['model']}"
            )
        return cls(directory, manifest, pipeline)

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.items.close()
        for seg in self.segments:
            seg.vectors.close()

    def __len__(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def roots(self) -> list[str]:
        return list(self.manifest.get("roots", []))

    def is_indexed(self, path: str) -> bool:
        return self.items.has_path(os.fspath(path))

    def search_ids(self, query: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosines) of the k best vectors for a normalised query [dim], best first."""
        if exact:
            return self._exact(query, k)
        candidates = []
        for seg in self.segments:
            seg.index.nprobe = min(self.nprobe, seg.index.nlist)
            _, ids = seg.index.search(query[None], min(self.rerank, seg.rows))
            candidates.append(ids[0][ids[0] >= 0])
        ids = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
        scores = self._vectors(ids) @ query
        order = np.lexsort((ids, -scores))[:k]
        return ids[order], scores[order]

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of these (sorted) ids, read from the segments' files."""
        out = np.empty((len(ids), self.embed_dim), dtype=np.float32)
        for seg in self.segments:
            mask = (ids >= seg.first_id) & (ids < seg.first_id + seg.rows)
            if mask.any():
                out[mask] = seg.vectors.rows(ids[mask] - seg.first_id)
        return out

    def _exact(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over every stored vector, one block at a time."""
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for seg in self.segments:
            for start in range(0, seg.rows, 262_144):
                block = seg.vectors.block(start, min(262_144, seg.rows - start)) @ query
                ids = np.arange(seg.first_id + start, seg.first_id + start + len(block))
                best_ids = np.concatenate([best_ids, ids])
                best_scores = np.concatenate([best_scores, block])
                keep = np.lexsort((best_ids, -best_scores))[:k]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
        return best_ids, best_scores

    def search_vector(self, vec: np.ndarray, k: int = 10, exact: bool | None = None) -> list[Any]:
        """The k stored images most similar (cosine) to a query vector [dim], best first."""
        from duomo.index.core import SearchHit

        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        query = np.asarray(vec, dtype=np.float32).reshape(-1)
        if query.shape != (self.embed_dim,):
            raise InputError(f"the query vector has {query.size} values; this index holds {self.embed_dim}-d "
                             f"vectors of {self.model_name}")  # fmt: skip
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm) or norm == 0:
            raise InputError("the query vector is zero or not finite; it cannot be compared with images")
        ids, scores = self.search_ids(query / norm, k, exact=bool(exact))
        names = self.items.names(ids)
        return [
            SearchHit(names.get(int(i), f"#{int(i)}"), float(s)) for i, s in zip(ids, scores, strict=True)
        ]

    def query_vector(self, query: str, images: str = "any") -> np.ndarray:
        """The normalised vector of a query string (text and image terms, as `ImageIndex.query_vector`)."""
        if self.pipeline is None:
            raise DuomoError("a text query needs the index's model; open the index with a pipeline")
        lookup = {"any": find_image_file, "indexed": None, "none": None}[images]
        return compose_query(
            query,
            lambda texts: self.pipeline.encode_text(texts).numpy(),
            lambda path: self.pipeline.encode_image(path).numpy()[0],
            lookup,
        )

    def search(self, query: str, k: int = 10, exact: bool | None = None, images: str = "any") -> list[Any]:
        """Search by a query string: text, image paths, weighted combinations like `"2:dog" + a.jpg - b`."""
        return self.search_vector(self.query_vector(query, images), k=k, exact=exact)


def open_any_index(directory: str | os.PathLike, pipeline: Any | None = None) -> Any:
    """A sharded index if `directory` holds one, else the folder index (`ImageIndex`) there."""
    if is_sharded_index(directory):
        return ShardedIndex.open(directory, pipeline)
    from duomo.index.core import ImageIndex

    return ImageIndex.open(directory, pipeline)


def iter_chunks(keys: Sequence[str], vectors: np.ndarray, size: int) -> Iterator[Chunk]:
    """Cut in-memory (keys, vectors) into chunks of `size` rows (for tests and small builds)."""
    for start in range(0, len(keys), size):
        yield list(keys[start : start + size]), vectors[start : start + size]
