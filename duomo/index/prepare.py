"""The indexer's input side: read, hash, decode and preprocess files on worker threads, ahead of the model.

Files are read once: the bytes are hashed (blake2b) and, unless another file with the same content already
has (or is getting) a vector, decoded and preprocessed into model pixels. Results come back in input order
through a bounded window of futures, so at most `ahead` preprocessed images wait in memory.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from duomo.errors import DuomoError

Preprocess = Callable[[io.BytesIO], torch.Tensor]


@dataclass
class Prepared:
    """One file after the worker: pixels to embed, or a hash to reuse, or an error."""

    path: str
    size: int
    mtime_ns: int
    hash: str | None = None
    pixels: torch.Tensor | None = None
    error: str | None = None
    owner: bool = False  # this file claimed its hash: it (and only it) is decoded and embedded


class Claims:
    """Thread-safe set of content hashes that have, or are getting, a vector."""

    def __init__(self, known: Iterable[str]) -> None:
        """Start from the hashes already stored in the index."""
        self._seen = set(known)
        self._lock = threading.Lock()

    def claim(self, digest: str) -> bool:
        """True for the first caller with this hash (it must produce the vector), False for later ones."""
        with self._lock:
            if digest in self._seen:
                return False
            self._seen.add(digest)
            return True


def content_hash(data: bytes) -> str:
    """The hash that identifies a file's content (blake2b, 160 bits, hex)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def prepare_file(path: str, size: int, mtime_ns: int, claims: Claims, preprocess: Preprocess) -> Prepared:
    """Read, hash and (if its content is new) decode one file; a failure sets `error`, never raises."""
    item = Prepared(path, size, mtime_ns)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        item.error = f"cannot read the file ({exc.strerror or exc})"
        return item
    item.hash = content_hash(data)
    if not claims.claim(item.hash):
        return item  # same bytes as a file that has or will have a vector: reuse it
    item.owner = True
    try:
        named = io.BytesIO(data)
        named.name = path  # so that decoding errors name the file
        item.pixels = preprocess(named)
    except DuomoError as exc:
        item.error = str(exc)
    except Exception as exc:  # a decoder bug on one odd file must not stop the whole run
        item.error = f"cannot decode the image ({type(exc).__name__}: {exc})"
    return item


def prepare_all(
    jobs: Iterable[tuple[str, int, int]], claims: Claims, preprocess: Preprocess, workers: int, ahead: int
) -> Iterator[Prepared]:
    """Prepared files in job order, computed by `workers` threads at most `ahead` files in advance."""
    if workers <= 0:
        for path, size, mtime in jobs:
            yield prepare_file(path, size, mtime, claims, preprocess)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="duomo-prepare")
    window: deque[Future[Prepared]] = deque()
    try:
        for path, size, mtime in jobs:
            window.append(pool.submit(prepare_file, path, size, mtime, claims, preprocess))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
