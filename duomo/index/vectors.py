"""The search side: an immutable snapshot of (paths, vector matrix) per index generation, searched exactly
(one matrix-vector product) or approximately (a faiss IVF index), both cached as files keyed by generation.

The caches are only an optimisation: they are written atomically, checked against the database on load,
and rebuilt from SQLite whenever they are missing, stale or unreadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from duomo.index.errors import IndexCorruptError
from duomo.index.store import Store

log = logging.getLogger("duomo.index")

CACHE_MIN_ROWS = 10_000  # smaller indexes load from SQLite in well under a second: no cache files


def exact_topk(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the k largest inner products, best first (ties: lower row first)."""
    scores = matrix @ query
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = np.lexsort((top, -scores[top]))
    return top[order], scores[top[order]]


def ivf_params(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for n vectors: about sqrt(n) lists, of which 1/8 (at least 8) are searched."""
    nlist = max(1, min(65536, round(math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    return nlist, min(nlist, max(8, nlist // 8))


def build_ivf(matrix: np.ndarray, seed: int = 0) -> Any:
    """A faiss IVF-Flat inner-product index over the rows (k-means trained on at most 64 points per list)."""
    import faiss

    n, dim = matrix.shape
    nlist, nprobe = ivf_params(n)
    if nlist < 2:  # too few vectors to cluster: a flat index is exact and just as fast
        flat = faiss.IndexFlatIP(dim)
        flat.add(np.ascontiguousarray(matrix, dtype=np.float32))
        return flat
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.arange(n)
    if n > 64 * nlist:  # k-means cost grows with the sample; 64 points per centroid train it well enough
        sample = np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))
    index.cp.max_points_per_centroid = 64
    index.train(np.ascontiguousarray(matrix[sample], dtype=np.float32))
    for start in range(0, n, 100_000):  # in chunks: a memory-mapped matrix is never copied whole
        index.add(np.ascontiguousarray(matrix[start : start + 100_000], dtype=np.float32))
    index.nprobe = nprobe
    return index


def faiss_available() -> bool:
    """Whether the optional faiss package (duomo[serve]) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Snapshot:
    """What one generation of the index can find: paths[i] has vector matrix[i] (rows L2-normalised)."""

    key: str
    paths: list[str]
    matrix: np.ndarray
    cache_dir: Path | None = None
    _ann: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _building: bool = False

    def __len__(self) -> int:
        return len(self.paths)

    def search_exact(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """(path, cosine) of the k best rows by brute force."""
        rows, scores = exact_topk(self.matrix, query, k)
        return [(self.paths[r], float(s)) for r, s in zip(rows, scores, strict=True)]

    def search_approx(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """(path, cosine) of about the k best rows, from the IVF index (built on first use)."""
        scores, rows = self.ann().search(query[None].astype(np.float32), min(k, len(self.paths)))
        return [(self.paths[r], float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]

    def ann(self) -> Any:
        """The approximate index of this snapshot: from memory, the cache file, or built now."""
        with self._lock:
            if self._ann is None:
                self._ann = self._read_ann() or self._build_ann()
            return self._ann

    def ann_ready(self) -> bool:
        """Whether the approximate index is in memory or in a cache file (so using it costs no build)."""
        path = self._ann_path()
        return self._ann is not None or (path is not None and path.is_file())

    def build_ann_in_background(self) -> None:
        """Start building the approximate index on a daemon thread (once); searches stay exact meanwhile."""
        with self._lock:
            if self._building or self._ann is not None:
                return
            self._building = True
        threading.Thread(target=self.ann, name="duomo-index-ann", daemon=True).start()

    def _ann_path(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.key}.ivf.faiss"

    def _read_ann(self) -> Any:
        import faiss

        path = self._ann_path()
        if path is None or not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            log.warning("ignoring unreadable search cache %s: %s", path, exc)
            return None
        if index.ntotal != len(self.paths) or index.d != self.matrix.shape[1]:
            return None
        if hasattr(index, "nprobe"):
            index.nprobe = ivf_params(len(self.paths))[1]
        return index

    def _build_ann(self) -> Any:
        import faiss

        log.info("building the approximate search index over %d vectors", len(self.paths))
        index = build_ivf(self.matrix)
        path = self._ann_path()
        if path is not None:
            try:
                with _atomic(path) as tmp:
                    faiss.write_index(index, str(tmp))
            except (OSError, RuntimeError) as exc:  # a read-only or full disk only costs speed
                log.warning("cannot write the search cache %s: %s", path, exc)
        return index


def load_snapshot(store: Store, cache_dir: Path, dim: int, use_cache: bool) -> Snapshot:
    """The current generation's snapshot: from cache files if valid, else read from SQLite (and cached)."""
    with store.read():  # one read transaction: generation, count and rows all describe the same state
        meta = store.meta()
        key = f"{meta['index_id']}-{meta['generation']}"
        count = store.count()
        use_cache = use_cache and count >= CACHE_MIN_ROWS
        cached = _read_cache(cache_dir, key, count, dim) if use_cache else None
        if cached is not None:
            return cached
        paths, matrix = _read_rows(store, count, dim)
    if use_cache:
        _write_cache(cache_dir, key, paths, matrix)
    return Snapshot(key, paths, matrix, cache_dir if use_cache else None)


def _read_rows(store: Store, count: int, dim: int) -> tuple[list[str], np.ndarray]:
    """All (path, vector) rows of the database into a list and a matrix."""
    matrix = np.empty((count, dim), dtype=np.float32)
    paths: list[str] = []
    for i, (path, blob) in enumerate(store.searchable()):
        if len(blob) != 4 * dim or i >= count:
            raise IndexCorruptError(
                f"the index at {store.path.parent} holds a vector of {len(blob) // 4} values for {path!r} "
                f"where {dim} were expected; re-run `duomo index --reindex`"
            )
        matrix[i] = np.frombuffer(blob, dtype=np.float32)
        paths.append(path)
    return paths, matrix[: len(paths)]


def _read_cache(cache_dir: Path, key: str, count: int, dim: int) -> Snapshot | None:
    """A snapshot from the cache files of this key, or None if they are missing or do not fit."""
    paths_file, matrix_file = cache_dir / f"{key}.paths.json", cache_dir / f"{key}.vectors.npy"
    if not (paths_file.is_file() and matrix_file.is_file()):
        return None
    try:
        paths = json.loads(paths_file.read_text(encoding="utf-8"))
        matrix = np.load(matrix_file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable search cache in %s: %s", cache_dir, exc)
        return None
    if len(paths) != count or matrix.shape != (count, dim) or matrix.dtype != np.float32:
        return None
    return Snapshot(key, paths, matrix, cache_dir)


def _write_cache(cache_dir: Path, key: str, paths: list[str], matrix: np.ndarray) -> None:
    """Write this snapshot's cache files (atomically) and delete those of other generations."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache_dir, key)
        with _atomic(cache_dir / f"{key}.vectors.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, matrix, allow_pickle=False)
        with _atomic(cache_dir / f"{key}.paths.json") as tmp:
            tmp.write_text(json.dumps(paths), encoding="utf-8")
    except OSError as exc:  # a read-only or full disk only costs speed
        log.warning("cannot write the search cache in %s: %s", cache_dir, exc)


def _remove_stale(cache_dir: Path, key: str) -> None:
    """Delete cache files of other generations, and temporary files left behind by a killed writer."""
    now = time.time()
    for entry in cache_dir.iterdir():
        with contextlib.suppress(OSError):
            if entry.name.startswith("."):
                if now - entry.stat().st_mtime > 3600:
                    entry.unlink()
            elif not entry.name.startswith(f"{key}."):
                entry.unlink()


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
