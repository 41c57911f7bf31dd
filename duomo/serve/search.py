"""The image index behind /search and /images: searched by vector; the only files the server serves."""

from __future__ import annotations

import base64
import binascii
import logging
import mimetypes
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from duomo.errors import DuomoError

log = logging.getLogger("duomo.serve")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_TYPES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class NoIndexError(DuomoError):
    """The server has no usable index, so /search cannot answer."""

    status_code = 503


class ImageAccessError(DuomoError):
    """A requested file that is not in the index (404) or lies outside its roots (403)."""

    def __init__(self, message: str, status_code: int = 404) -> None:
        super().__init__(message)
        self.status_code = status_code


def image_id(path: str) -> str:
    """URL-safe id of an indexed path (base64url of its UTF-8, unpadded); /images/{id} serves it."""
    return base64.urlsafe_b64encode(os.fsencode(path)).decode("ascii").rstrip("=")


def path_from_id(ref: str) -> str | None:
    """The absolute path an id encodes, or None if `ref` is not an id."""
    if not _ID_RE.match(ref):
        return None
    try:
        raw = base64.urlsafe_b64decode(ref + "=" * (-len(ref) % 4))
        path = os.fsdecode(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return path if os.path.isabs(path) and "\x00" not in path else None


def media_type(path: Path) -> str:
    """Content type to serve a file with: image/* for known image suffixes, else a download."""
    if path.suffix.lower() in IMAGE_TYPES:
        return mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return "application/octet-stream"


class IndexService:
    """Owns one index (ImageIndex or ShardedIndex); every call runs in one dedicated thread (SQLite
    connections are per-thread)."""

    def __init__(self, index_dir: Path | None, pipeline: Any) -> None:
        """Open the index at `index_dir` (None: no index); if that fails, searches fail with the reason."""
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duomo-index")
        self.index: Any = None
        self.error: str | None = None
        try:
            if self.index_dir is None:
                raise NoIndexError("this server runs without an image index; start it with --index DIR")
            self.index = self._executor.submit(self._open, pipeline).result()
        except DuomoError as exc:
            self.error = str(exc)
        except (OSError, ValueError, ImportError) as exc:
            self.error = f"cannot open the index at {self.index_dir}: {exc}"
        if self.error:
            log.warning("no search: %s", self.error)
        self.model_name: str | None = None
        if self.index is not None:
            self.model_name = self._executor.submit(lambda: self.index.model_name).result()

    def _open(self, pipeline: Any) -> Any:
        from duomo.index.sharded import open_any_index

        assert self.index_dir is not None
        if not self.index_dir.exists():
            raise NoIndexError(
                f"no index at {self.index_dir}; build one with `duomo index DIR` or start with --index DIR"
            )
        return open_any_index(self.index_dir, pipeline)

    def roots(self) -> list[Path]:
        """Blocking: the indexed folders (read each time: another process may add one)."""
        if self.index is None:
            return []
        return [Path(r) for r in self._executor.submit(lambda: self.index.roots).result()]

    def size(self) -> int:
        """Number of indexed images (0 without an index)."""
        if self.index is None:
            return 0
        return int(self._executor.submit(len, self.index).result())

    def describe(self) -> dict | None:
        """What /healthz says about the index."""
        if self.index is None:
            where = str(self.index_dir) if self.index_dir else None
            return {"path": where, "ready": False, "error": self.error}
        return {
            "path": str(self.index_dir),
            "ready": True,
            "size": self.size(),
            "model": self.model_name,
            "roots": [str(r) for r in self.roots()],
        }

    def check_ready(self) -> None:
        """Raise NoIndexError (503, with the reason) unless searches can run.

        The model check is ImageIndex.open's: an index built with another model fails to open.
        """
        if self.index is None:
            raise NoIndexError(self.error or f"no index at {self.index_dir}")

    def search_vector(self, vector: np.ndarray, k: int) -> list[Any]:
        """Blocking: the k nearest indexed images (call via run_in_executor or a thread)."""
        return self._executor.submit(self.index.search_vector, np.asarray(vector, np.float32), k).result()

    def is_indexed(self, path: str) -> bool:
        """Blocking: whether the index holds this path."""
        if self.index is None:
            return False
        return bool(self._executor.submit(self.index.is_indexed, path).result())

    def resolve(self, ref: str) -> Path:
        """Blocking: real file behind /images/{ref} if indexed and inside a root, else ImageAccessError."""
        if self.index is None:
            raise ImageAccessError("no index is loaded, so no images are served", 404)
        if "\x00" in ref or "\\" in ref:
            raise ImageAccessError("invalid image reference", 404)
        candidates: list[str] = []
        decoded = path_from_id(ref)
        if decoded is not None:
            candidates.append(decoded)
        else:
            parts = ref.split("/")
            if ref.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ImageAccessError("image paths must be relative to an index root, without '..'", 403)
            candidates += [str(root / ref) for root in self.roots()]
        real_roots = [Path(os.path.realpath(r)) for r in self.roots()]
        for candidate in candidates:
            # "/root/link/../x.png" names one file textually and another through the symlink: only a path
            # with no "." or ".." parts is the file whose text was indexed
            if os.path.normpath(candidate) != candidate:
                raise ImageAccessError("image paths must be plain, without '.' or '..' parts", 403)
            if not self.is_indexed(candidate):
                continue
            real = Path(os.path.realpath(candidate))
            if not any(real == r or r in real.parents for r in real_roots):
                raise ImageAccessError("this file lies outside the indexed folders", 403)
            if not real.is_file():
                raise ImageAccessError("this indexed file no longer exists; re-index", 404)
            return real
        raise ImageAccessError("no indexed image with this id or path", 404)

    def close(self) -> None:
        """Stop the index thread."""
        close = getattr(self.index, "close", None)
        if callable(close):
            try:
                self._executor.submit(close).result(timeout=5)
            except Exception as exc:  # closing is best effort at shutdown
                log.debug("closing the index failed: %s", exc)
        self._executor.shutdown(wait=False)
