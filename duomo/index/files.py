"""Where the index lives and which files on disk it covers: image extensions, recursive scanning."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from duomo.errors import InputError

log = logging.getLogger("duomo.index")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

Stat = tuple[int, int]  # (size in bytes, mtime in ns): what decides whether a file changed


def default_index_dir() -> Path:
    """`$DUOMO_INDEX`, else `$XDG_CACHE_HOME/duomo/index`, else `~/.cache/duomo/index`."""
    if os.environ.get("DUOMO_INDEX"):
        return Path(os.environ["DUOMO_INDEX"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "duomo" / "index"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file name has one of the indexed image extensions."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def normalize_root(root: str | os.PathLike) -> Path:
    """An existing folder as an absolute, symlink-free path; InputError otherwise."""
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(f"{os.fspath(root)!r} does not exist; pass a folder of images")
    if not path.is_dir():
        raise InputError(f"{os.fspath(root)!r} is not a folder; pass the folder that holds the images")
    return path.resolve()


def scan(roots: Iterable[Path]) -> dict[str, Stat]:
    """Every image file under the roots (recursively, hidden entries skipped) -> (size, mtime_ns)."""
    found: dict[str, Stat] = {}
    for root in roots:
        for path in _walk(str(root)):
            try:
                st = os.stat(path)  # follows a symlinked file; a broken link is skipped below
            except OSError:
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def _walk(folder: str) -> Iterator[str]:
    """Image file paths under folder, depth first; unreadable folders and symlinked folders are skipped."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path)
            elif is_image_file(entry.name) and entry.is_file() and _storable(entry.path):
                yield entry.path
        except OSError:
            continue


def _storable(path: str) -> bool:
    """Whether a path can be stored as text: names that are not valid UTF-8 are skipped with a warning."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("skipping %r: its name is not valid UTF-8; rename the file to index it", path)
        return False
    return True


def path_range(root: Path) -> tuple[str, str]:
    """Bounds (lo, hi) such that lo < p < hi exactly for the path strings p inside root (a range scan)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    return prefix, prefix[:-1] + chr(ord(os.sep) + 1)
