"""Write any pair dataset to disk as a caption folder, a CSV/TSV/JSONL manifest, or WebDataset tar shards.

The layouts are exactly what duomo.data.pairs reads back (FolderPairs, ManifestPairs, WebDatasetPairs), and
`open_pairs(OUT)` opens them via the `dataset.json` written alongside. Everything is written into a hidden
temporary folder next to OUT and renamed into place at the end, so OUT never holds a half-written export; an
existing non-empty OUT is only replaced with overwrite=True, and only when it is itself a duomo export.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shutil
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch.utils.data import Dataset, IterableDataset

from duomo.data.catalog import EXPORT_MARKER
from duomo.errors import InputError

FORMATS: tuple[str, ...] = ("folder", "csv", "tsv", "jsonl", "wds")  # image-caption pairs, read back by duomo
CONVERSATIONS = "conversations"  # LLaVA's conversation JSON (`duomo train --task chat` reads it)
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")
MANIFEST_NAME = "manifest"
CONVERSATIONS_NAME = "conversations.json"


@dataclass
class ExportResult:
    """What an export wrote."""

    out: Path
    format: str
    count: int
    files: list[str] = field(default_factory=list)  # the manifest, or the shards, relative to out
    seconds: float = 0.0


def iterate_samples(dataset: Dataset, limit: int | None = None) -> Iterator[dict]:
    """The samples of a map-style or streaming dataset, in order, at most `limit`, None samples left out."""
    if isinstance(dataset, IterableDataset):
        samples: Iterator = iter(dataset)
    else:
        samples = (dataset[i] for i in range(len(dataset)))  # type: ignore[arg-type]
    samples = (s for s in samples if s is not None)
    return itertools.islice(samples, limit) if limit is not None else samples


def image_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    """An image encoded as PNG (lossless) or JPEG (quality 95)."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _safe_key(key: str) -> str:
    """A key usable as a relative file path and a WebDataset key: no dots, no '..', no odd characters."""
    parts = [
        re.sub(r"[^A-Za-z0-9_\-]", "_", part) for part in str(key).split("/") if part not in ("", ".", "..")
    ]
    return "/".join(parts) or "sample"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Writer:
    """Shared bookkeeping: unique keys, shard numbering, the list of written files."""

    def __init__(self, root: Path, shard_size: int, image_format: str) -> None:
        self.root, self.shard_size, self.image_format = root, shard_size, image_format
        self.count = 0
        self.files: list[str] = []
        self._keys: dict[str, int] = {}

    def key(self, sample: dict) -> str:
        key = _safe_key(sample.get("key") or f"{self.count:08d}")
        n = self._keys.get(key, 0)
        self._keys[key] = n + 1
        return key if n == 0 else f"{key}_{n}"

    def part(self) -> str:
        return f"part-{self.count // self.shard_size:05d}"

    def write_file(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def add(self, sample: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FolderWriter(_Writer):
    """part-00000/key.png + key.txt (+ key.cls label, + key.json with QA pairs)."""

    def add(self, sample: dict) -> None:
        stem = f"{self.part()}/{self.key(sample)}"
        self.write_file(f"{stem}.{self.image_format}", image_bytes(sample["image"], self.image_format))
        self.write_file(f"{stem}.txt", (_one_line(sample["text"]) + "\n").encode("utf-8"))
        if sample.get("label") is not None:
            self.write_file(f"{stem}.cls", f"{int(sample['label'])}\n".encode())
        if sample.get("qa"):
            self.write_file(f"{stem}.json", json.dumps({"qa": sample["qa"]}).encode("utf-8"))
        self.count += 1


class _ManifestWriter(_Writer):
    """images/part-00000/key.png, listed with caption, label and key in manifest.csv / .tsv / .jsonl."""

    def __init__(self, root: Path, shard_size: int, image_format: str, fmt: str) -> None:
        super().__init__(root, shard_size, image_format)
        self.fmt = fmt
        name = f"{MANIFEST_NAME}.{fmt}"
        self.files = [name]
        self.handle = open(root / name, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
        if fmt == "csv":
            self.csv = csv.writer(self.handle)
            self.csv.writerow(["image", "caption", "label", "key"])
        elif fmt == "tsv":
            self.handle.write("image\tcaption\tlabel\tkey\n")

    def add(self, sample: dict) -> None:
        key = self.key(sample)
        image = f"images/{self.part()}/{key}.{self.image_format}"
        self.write_file(image, image_bytes(sample["image"], self.image_format))
        text, label = _one_line(sample["text"]), sample.get("label")
        if self.fmt == "csv":
            self.csv.writerow([image, text, "" if label is None else int(label), key])
        elif self.fmt == "tsv":
            self.handle.write(f"{image}\t{text}\t{'' if label is None else int(label)}\t{key}\n")
        else:
            label = None if label is None else int(label)
            row: dict[str, Any] = {"image": image, "caption": text, "label": label, "key": key}
            if sample.get("qa"):
                row["qa"] = sample["qa"]
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self.handle.close()


class _ShardWriter(_Writer):
    """shard-000000.tar, ...: key.png, key.txt, key.cls, key.json per sample, shard_size samples per shard."""

    def __init__(self, root: Path, shard_size: int, image_format: str) -> None:
        super().__init__(root, shard_size, image_format)
        self.tar: tarfile.TarFile | None = None

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: byte-identical reruns
        info.uname = info.gname = "duomo"
        self.tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def add(self, sample: dict) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            name = f"shard-{self.count // self.shard_size:06d}.tar"
            self.files.append(name)
            self.tar = tarfile.open(self.root / name, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        key = self.key(sample)
        self._member(f"{key}.{self.image_format}", image_bytes(sample["image"], self.image_format))
        self._member(f"{key}.txt", _one_line(sample["text"]).encode("utf-8"))
        if sample.get("label") is not None:
            self._member(f"{key}.cls", str(int(sample["label"])).encode())
        if sample.get("qa"):
            self._member(f"{key}.json", json.dumps({"qa": sample["qa"]}).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


class _ConversationWriter(_Writer):
    """images/part-00000/key.png and conversations.json: LLaVA's format, one conversation per image (a
    description or a question first, then follow-ups), as `duomo train --task chat --data` reads it."""

    def __init__(self, root: Path, shard_size: int, image_format: str, seed: int = 0) -> None:
        super().__init__(root, shard_size, image_format)
        self.records: list[dict[str, Any]] = []
        self.seed = seed
        self.files = [CONVERSATIONS_NAME]

    def add(self, sample: dict) -> None:
        import random

        from duomo.data.conversations import shapes_conversation

        key = self.key(sample)
        image = f"images/{self.part()}/{key}.{self.image_format}"
        self.write_file(image, image_bytes(sample["image"], self.image_format))
        turns = shapes_conversation(sample, random.Random(f"{self.seed}/{key}"))
        who = {"user": "human", "assistant": "gpt"}
        self.records.append(
            {"id": key, "image": image, "conversations": [{"from": who[r], "value": t} for r, t in turns]}
        )
        self.count += 1

    def close(self) -> None:
        (self.root / CONVERSATIONS_NAME).write_text(
            json.dumps(self.records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty folder (unless overwrite and it is a previous export)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{str(out)!r} exists and is not a folder; choose a folder path for the export")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{str(out)!r} is not empty; choose an empty or new folder, or pass --overwrite")
        if not (out / EXPORT_MARKER).is_file():
            raise InputError(
                f"{str(out)!r} is not empty and is not a duomo export (no {EXPORT_MARKER}), so --overwrite "
                "will not replace it; remove it yourself or choose another folder"
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to OUT, replacing an empty OUT or a previous export."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_dataset(
    dataset: Dataset,
    out: str | os.PathLike,
    fmt: str = "folder",
    shard_size: int = 1000,
    overwrite: bool = False,
    image_format: str = "png",
    limit: int | None = None,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write a dataset's samples to OUT in one of FORMATS, atomically; returns what was written."""
    if fmt not in (*FORMATS, CONVERSATIONS):
        raise InputError(f"unknown export format {fmt!r}; choose one of {[*FORMATS, CONVERSATIONS]}")
    image_format = "jpg" if image_format == "jpeg" else image_format
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"unknown image format {image_format!r}; choose one of {list(IMAGE_FORMATS)}")
    if shard_size < 1:
        raise InputError(f"shard_size must be at least 1, got {shard_size}")
    target = Path(out).expanduser()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        writer: _Writer
        if fmt == "conversations":
            writer = _ConversationWriter(tmp, shard_size, image_format)
        elif fmt == "folder":
            writer = _FolderWriter(tmp, shard_size, image_format)
        elif fmt == "wds":
            writer = _ShardWriter(tmp, shard_size, image_format)
        else:
            writer = _ManifestWriter(tmp, shard_size, image_format, fmt)
        try:
            for sample in iterate_samples(dataset, limit):
                writer.add(sample)
                if progress is not None:
                    progress(writer.count)
        finally:
            writer.close()
        if writer.count == 0:
            raise InputError("the dataset yielded no samples; nothing to export")
        description = {
            "duomo_export": 1,
            "format": fmt,
            "count": writer.count,
            "image_format": image_format,
            "files": writer.files,
            "classes": getattr(dataset, "classes", None),
            "source": repr(dataset),
            **(meta or {}),
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(target, fmt, writer.count, writer.files, time.perf_counter() - start)


def contact_sheet(samples: list[dict], columns: int = 8, caption_lines: int = 0) -> Image.Image:
    """A grid of sample images (all resized to the first one's size), optionally with captions under each."""
    if not samples:
        raise InputError("no samples to draw")
    w, h = samples[0]["image"].size
    pad, text_h = 2, 11 * caption_lines
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + text_h + pad)
        sheet.paste(sample["image"].convert("RGB").resize((w, h)), (x, y))
        if caption_lines:
            lines = textwrap.wrap(str(sample.get("text", "")), width=max(4, w // 6))
            for j, line in enumerate(lines[:caption_lines]):
                draw.text((x, y + h + 11 * j), line, fill="black")
    return sheet
