"""ImageIndex: an incremental, crash-safe index of image folders, searchable by text, image or vector."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duomo.errors import InputError
from duomo.index.errors import IndexBusyError, ModelMismatchError
from duomo.index.files import default_index_dir, normalize_root, scan
from duomo.index.indexer import BatchWriter, IndexReport
from duomo.index.prepare import Claims, prepare_all
from duomo.index.query import compose_query, find_image_file
from duomo.index.store import Store
from duomo.index.vectors import Snapshot, faiss_available, load_snapshot

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent updates are then the user's to avoid
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("duomo.index")

DEFAULT_APPROX_THRESHOLD = 250_000  # below it exact search is fast enough (see docs/index.md)
IMAGE_TERMS = ("any", "indexed", "none")


@dataclass(frozen=True)
class SearchHit:
    """One search result: an indexed file and its cosine similarity to the query."""

    path: str
    score: float


def model_id(pipeline: Any) -> str:
    """The name an index records for a pipeline's model: its name, or the absolute path it was loaded from."""
    name = str(pipeline.name)
    return str(Path(name).resolve()) if name and Path(name).exists() else name


class ImageIndex:
    """A folder-of-images index: metadata and vectors in SQLite in `directory`, search caches beside it."""

    lock_wait_seconds = 2.0  # how long an update waits for the update lock before IndexBusyError

    def __init__(self, directory: Path, store: Store, pipeline: Any | None, approx_threshold: int) -> None:
        """Use `ImageIndex.open`."""
        self.directory = directory
        self.store = store
        self.pipeline = pipeline
        self.approx_threshold = approx_threshold
        self._lock = threading.RLock()  # one SQLite connection, shared by the threads of a server
        self._snapshot: Snapshot | None = None

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike | None = None,
        pipeline: Any | None = None,
        *,
        reindex: bool = False,
        approx_threshold: int | None = None,
    ) -> ImageIndex:
        """Open (creating if needed) the index in `index_dir`; with a pipeline, check it is the index's model.

        `reindex=True` forgets every vector (the folders stay recorded) so the next update re-embeds all files
        with this pipeline. Searches above `approx_threshold` images use the approximate index.
        """
        directory = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create the index folder {directory} ({exc.strerror}); pick another"
            ) from exc
        if approx_threshold is None:
            approx_threshold = int(os.environ.get("DUOMO_APPROX_THRESHOLD", DEFAULT_APPROX_THRESHOLD))
        index = cls(directory, Store(directory), pipeline, approx_threshold)
        try:
            if reindex:
                index._require_pipeline("re-indexing")
                with index._update_lock(), index._lock, index.store.write():
                    index.store.clear()
                    index.store.bump_generation()
            index._check_model()
        except BaseException:
            index.close()
            raise
        return index

    # --- properties -----------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str | None:
        """The model the index was built with (or will be, if still empty)."""
        with self._lock:
            recorded = self.store.meta().get("model")
        return recorded or (model_id(self.pipeline) if self.pipeline is not None else None)

    @property
    def embed_dim(self) -> int | None:
        """Size of the stored vectors."""
        with self._lock:
            recorded = self.store.meta().get("embed_dim")
        if recorded:
            return int(recorded)
        return int(self.pipeline.embed_dim) if self.pipeline is not None else None

    @property
    def roots(self) -> list[Path]:
        """The folders indexed into this index."""
        with self._lock:
            return [Path(r) for r in self.store.roots()]

    def __len__(self) -> int:
        """Number of searchable images."""
        with self._lock:
            return self.store.count()

    def is_indexed(self, path: str | os.PathLike) -> bool:
        """Whether this file is in the index and searchable (the server serves only such files)."""
        with self._lock:
            return self.store.is_indexed(os.path.abspath(os.path.expanduser(os.fspath(path))))

    def failures(self, limit: int = 100) -> list[tuple[str, str]]:
        """(path, reason) of recorded files that could not be indexed."""
        with self._lock:
            return self.store.failures(limit)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- updating -------------------------------------------------------------------------------------------

    def update(
        self,
        roots: Sequence[str | os.PathLike] | None = None,
        progress: bool = True,
        batch_size: int = 32,
        workers: int = 2,
        layout: str | None = "auto",
    ) -> IndexReport:
        """Bring the index up to date with the image files under `roots` (default: every recorded root).

        New and changed files (by size and mtime) are hashed; contents seen before reuse their vector, others
        are decoded by `workers` threads and embedded `batch_size` at a time, each batch committed at once.
        Files gone from disk are dropped. Unreadable images are recorded as failed and skipped.
        `layout` spreads model calls over the cores: "auto" (measured), or "WxT" (see duomo.tasks.layout).
        """
        from duomo.tasks.layout import layout_encoder

        pipeline = self._require_pipeline("indexing")
        start = time.perf_counter()
        folders = [normalize_root(r) for r in roots] if roots else self._recorded_roots()
        with self._update_lock():
            self._check_model()
            with self._lock, self.store.write():
                self.store.add_roots(folders)
                if not self.store.meta().get("model"):
                    self.store.set_meta("model", model_id(pipeline))
                    self.store.set_meta("embed_dim", str(int(pipeline.embed_dim)))
            on_disk = scan(folders)
            with self._lock:
                recorded = {p: st for root in folders for p, st in self.store.files_in(root).items()}
            todo = sorted(p for p, st in on_disk.items() if recorded.get(p) != st)
            gone = sorted(p for p in recorded if p not in on_disk)
            with self._lock:
                stored_hashes = self.store.vector_hashes() if todo else set()
            report = IndexReport(unchanged=len(on_disk) - len(todo))
            encode = layout_encoder(pipeline, layout, batch_size)
            writer = BatchWriter(
                self.store,
                self._lock,
                encode,
                batch_size,
                stored_hashes,
                set(recorded),
                report,
            )
            jobs = ((p, *on_disk[p]) for p in todo)
            prepared = prepare_all(
                jobs,
                Claims(stored_hashes),
                pipeline.preprocess,
                workers,
                ahead=max(2 * batch_size, 4 * workers),
            )
            with _progress(len(todo), progress) as bar, contextlib.closing(prepared), encode:  # stop workers
                for item in prepared:
                    writer.add(item)
                    bar.update(1)
                writer.finish()
            report.layout = encode.describe()
            with self._lock, self.store.write():
                self.store.remove_files(gone)
                if self.store.drop_orphan_vectors() or gone:  # a no-op run keeps the search caches valid
                    self.store.bump_generation()
            report.removed = len(gone)
        report.total = len(self)
        if report.total >= self.approx_threshold and faiss_available():
            self.snapshot().ann()  # build the approximate index now, so the first search need not
        report.seconds = time.perf_counter() - start
        return report

    def forget(self, root: str | os.PathLike) -> int:
        """Drop a recorded folder and its files from the index (the files on disk are untouched)."""
        folder = Path(root).expanduser().resolve()
        with self._update_lock(), self._lock, self.store.write():
            if str(folder) not in self.store.roots():
                raise InputError(
                    f"{folder} is not an indexed folder; indexed: {', '.join(self.store.roots())}"
                )
            dropped = self.store.forget_root(folder)
            self.store.drop_orphan_vectors()
            self.store.bump_generation()
        return dropped

    def _recorded_roots(self) -> list[Path]:
        roots = self.roots
        if not roots:
            raise InputError("this index has no folders yet; pass one, e.g. `duomo index ~/Pictures`")
        present = [r for r in roots if r.is_dir()]
        for missing in set(roots) - set(present):  # an unmounted drive must not empty the index
            log.warning("indexed folder %s is missing; its files stay in the index (see --forget)", missing)
        return present

    @contextlib.contextmanager
    def _update_lock(self) -> Iterator[None]:
        """Hold the index's update lock (a file lock: released by the OS even if the process is killed)."""
        if fcntl is None:
            yield
            return
        with open(self.directory / "update.lock", "a+b") as f:
            deadline = time.monotonic() + self.lock_wait_seconds  # searchers hold it shared for microseconds
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() > deadline:
                        raise IndexBusyError(
                            f"another process is updating the index at {self.directory}; "
                            "wait for it to finish"
                        ) from exc
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _updating(self) -> bool:
        """Whether some process holds the update lock right now."""
        if fcntl is None:
            return False
        try:
            with open(self.directory / "update.lock", "a+b") as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _require_pipeline(self, what: str) -> Any:
        if self.pipeline is None:
            raise InputError(f"{what} needs a model: open the index with a pipeline, e.g. duomo.load()")
        return self.pipeline

    def _check_model(self) -> None:
        """Raise ModelMismatchError if the pipeline is not the model the index was built with."""
        if self.pipeline is None:
            return
        with self._lock:
            meta = self.store.meta()
            has_vectors = self.store.count() > 0
        recorded, dim, mine = meta.get("model"), meta.get("embed_dim"), model_id(self.pipeline)
        if not recorded:
            return
        if not has_vectors:  # nothing was embedded with the recorded model: adopt the new one
            with self._lock, self.store.write():
                self.store.set_meta("model", mine)
                self.store.set_meta("embed_dim", str(int(self.pipeline.embed_dim)))
            return
        if recorded != mine or (dim and int(dim) != int(self.pipeline.embed_dim)):
            raise ModelMismatchError(
                f"the index at {self.directory} was built with {recorded}, not {mine}; "
                f"re-run `duomo index --reindex --model {mine}` or pass --model {recorded}"
            )

    # --- searching ------------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The searchable state of the current generation (reloaded only after the index changed)."""
        with self._lock:
            meta = self.store.meta()
            key = f"{meta['index_id']}-{meta['generation']}"
            if self._snapshot is None or self._snapshot.key != key:
                dim = self.embed_dim or 0
                self._snapshot = load_snapshot(
                    self.store, self.directory / "cache", dim, not self._updating()
                )
            return self._snapshot

    def search_vector(self, vec: np.ndarray, k: int = 10, exact: bool | None = None) -> list[SearchHit]:
        """The k indexed images most similar (cosine) to a query vector [D], best first.

        exact=None searches exactly below `approx_threshold` images and approximately (faiss IVF) above it,
        once the IVF index is built (`update` builds it; else it is built in the background meanwhile).
        """
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        query = np.asarray(vec, dtype=np.float32)
        if query.ndim == 2 and query.shape[0] == 1:
            query = query[0]
        snap = self.snapshot()
        if len(snap) == 0:
            return []
        dim = snap.matrix.shape[1]
        if query.shape != (dim,):
            raise InputError(
                f"the query vector has shape {tuple(query.shape)}; this index holds {dim}-d vectors "
                f"of {self.model_name}"
            )
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm) or norm == 0:
            raise InputError("the query vector is zero or not finite; it cannot be compared with images")
        query = query / norm
        approx = len(snap) >= self.approx_threshold if exact is None else not exact
        if approx and not faiss_available():
            log.warning("approximate search needs faiss (pip install 'duomo[serve]'); searching exactly")
            approx = False
        if approx and exact is None and not snap.ann_ready():
            snap.build_ann_in_background()  # minutes on a big index: answer exactly until it is there
            approx = False
        found = snap.search_approx(query, k) if approx else snap.search_exact(query, k)
        return [SearchHit(path, score) for path, score in found]

    def query_vector(self, query: str, images: str = "any") -> np.ndarray:
        """The normalised vector of a query string (see `parse_query`); images='indexed' or 'none' restricts
        which terms may name image files (a server should not open arbitrary paths)."""
        if images not in IMAGE_TERMS:
            raise InputError(f"images must be one of {IMAGE_TERMS}, got {images!r}")
        lookup = {"any": find_image_file, "indexed": self._indexed_file, "none": None}[images]

        def encode_text(texts: list[str]) -> Any:
            return self._require_pipeline("a text query").encode_text(texts).numpy()

        return compose_query(query, encode_text, self._image_vector, lookup)

    def search(
        self, query: str, k: int = 10, exact: bool | None = None, images: str = "any"
    ) -> list[SearchHit]:
        """Search by a query string: text, image paths, weighted combinations like `"2:dog" + a.jpg - b`."""
        return self.search_vector(self.query_vector(query, images), k=k, exact=exact)

    def _indexed_file(self, text: str) -> Path | None:
        path = os.path.abspath(os.path.expanduser(text))
        return Path(path) if self.is_indexed(path) else None

    def _image_vector(self, path: str) -> np.ndarray:
        """An image term's vector: the stored one if the file is indexed, else embedded now."""
        with self._lock:
            blob = self.store.vector_of(path)
        if blob is not None:
            return np.frombuffer(blob, dtype=np.float32)
        return self._require_pipeline("an image query").encode_image(path).numpy()[0]


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on stderr (a no-op one when disabled or there is nothing to do)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="indexing", disable=not enabled or total == 0, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
