"""Finding image files on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from duomo.errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    """True for a file whose extension is a known image type."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into image file paths."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(
                    Path(root) / f for f in sorted(files) if not f.startswith(".") and is_image_file(Path(f))
                )
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    return found
