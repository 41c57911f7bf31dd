"""One string names any dataset: "shapes:heldout", "digits:test", a manifest, shards, a folder, an export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from duomo.data.digits import DigitsDataset
from duomo.data.pairs import (
    MANIFEST_FORMATS,
    FolderPairs,
    ImageFolderDataset,
    ManifestPairs,
    WebDatasetPairs,
    expand_shards,
)
from duomo.data.shapes import ShapesDataset
from duomo.errors import InputError

BUILTINS: tuple[str, ...] = ("shapes", "digits")
KINDS: tuple[str, ...] = ("folder", "manifest", "wds", "imagefolder")
EXPORT_MARKER = "dataset.json"
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def builtin_dataset(
    name: str,
    split: str | None = None,
    size: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """A built-in dataset by name: "shapes" (default size 10,000) or "digits" (size: first N of a split)."""
    if name == "shapes":
        n = 10_000 if size is None else size
        return ShapesDataset(split=split or "train", size=n, image_size=image_size, seed=seed, **options)
    if name == "digits":
        return DigitsDataset(split=split or "train", image_size=image_size, seed=seed, size=size, **options)
    raise InputError(f"unknown built-in dataset {name!r}; choose one of {list(BUILTINS)}")


def read_export_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The dataset.json of a `duomo data export` folder, or None when there is none."""
    path = Path(root) / EXPORT_MARKER
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{str(path)!r} is not a readable duomo export description ({err})") from err
    if not isinstance(meta, dict) or "format" not in meta:
        raise InputError(f"{str(path)!r} is not a duomo export description (no 'format')")
    return meta


def open_export(root: str | os.PathLike, **options: Any) -> Dataset:
    """Read back a folder written by `duomo data export`, with its classes."""
    meta = read_export_meta(root)
    if meta is None:
        raise InputError(f"{str(root)!r} has no {EXPORT_MARKER}; it was not written by `duomo data export`")
    fmt, classes = meta["format"], meta.get("classes")
    if fmt == "folder":
        dataset: Any = FolderPairs(root, **options)
        dataset.classes = classes
        return dataset
    if fmt in ("csv", "tsv", "jsonl"):
        return ManifestPairs(Path(root) / meta["files"][0], classes=classes, **options)
    if fmt == "wds":
        return WebDatasetPairs([str(Path(root) / f) for f in meta["files"]], classes=classes, **options)
    raise InputError(f"{str(root)!r}: unknown export format {fmt!r} in {EXPORT_MARKER}")


def open_pairs(spec: str | os.PathLike, split: str | None = None, **options: Any) -> Dataset:
    """A dataset from a spec: "shapes[:split]", "digits[:split]", "KIND:PATH", or a path.

    KIND is folder, manifest, wds or imagefolder. A bare path is a manifest file, shards (.tar, glob, brace
    notation), a `duomo data export` folder, a folder of shards, or a caption folder.
    """
    text = os.fspath(spec)
    name, _, rest = text.partition(":")
    if name in BUILTINS:
        return builtin_dataset(name, split=rest or split, **options)
    if name in KINDS and rest:
        return _open_kind(name, rest, **options)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_FORMATS:
        return ManifestPairs(path, **options)
    if text.endswith(_SHARD_SUFFIXES) or "::" in text:
        return WebDatasetPairs(text, **options)
    if path.is_dir():
        if (path / EXPORT_MARKER).is_file():
            return open_export(path, **options)
        if any(p.name.endswith(_SHARD_SUFFIXES) for p in path.iterdir()):
            return WebDatasetPairs(expand_shards(path), **options)
        return FolderPairs(path, **options)
    raise InputError(
        f"cannot open dataset {text!r}: not a built-in ({', '.join(BUILTINS)}), an existing folder, "
        "a manifest (.csv/.tsv/.jsonl) or tar shards; prefix folder:, manifest:, wds: or imagefolder: "
        "to be explicit"
    )


def _open_kind(kind: str, target: str, **options: Any) -> Dataset:
    if kind == "folder":
        return FolderPairs(target, **options)
    if kind == "manifest":
        return ManifestPairs(target, **options)
    if kind == "wds":
        return WebDatasetPairs(target, **options)
    return ImageFolderDataset(target, **options)
