"""User data as image-text pairs: caption folders, manifests (CSV/TSV/JSONL), WebDataset shards, ImageFolder.

Every dataset yields the sample dicts the trainer consumes: {"image": PIL RGB image, "text": str,
"label": int | None, "key": str}; classification sets also expose `classes`.

Bad samples never stop a run. A missing, corrupt or undecodable image (or caption) is skipped and counted in
`dataset.skipped` (a SkipStats, shared across DataLoader worker processes) and logged:
- map-style datasets (FolderPairs, ManifestPairs, ImageFolderDataset) substitute the next readable index, so
  batches stay full (equal batch sizes matter for DDP's all-gather); a substitute repeats a neighbour;
- WebDatasetPairs streams past the bad sample.
`collate` also drops None samples (from other datasets) and reports how many in batch["skipped"].
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from duomo.data.images import load_image
from duomo.errors import ImageError, InputError

log = logging.getLogger("duomo.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
WDS_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
WDS_TEXT_EXTENSIONS: tuple[str, ...] = ("txt", "caption")
MANIFEST_FORMATS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_COLUMNS: tuple[str, ...] = ("caption", "text")


class SkipStats:
    """How many samples a dataset skipped, summed over the main process and its DataLoader workers."""

    def __init__(self, name: str, slots: int = 65, log_first: int = 5) -> None:
        """A counter in shared memory with one slot per worker process, so increments never race."""
        self.name = name
        self.log_first = log_first
        self._counts = torch.zeros(slots, dtype=torch.int64)
        try:
            self._counts.share_memory_()
        except (RuntimeError, OSError):  # no shared memory: worker counts then stay in the workers
            log.debug("shared memory unavailable; %s counts skips per process", name)
        self._logged = 0

    def add(self, what: str, reason: str, n: int = 1) -> None:
        """Count n skipped samples; the first few (then every 1000th) are logged as warnings."""
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self._counts) - 1)
        self._counts[slot] += n
        self._logged += 1
        if self._logged <= self.log_first or self._logged % 1000 == 0:
            log.warning("%s: skipped %s: %s (%d skipped so far)", self.name, what, reason, self.count)

    @property
    def count(self) -> int:
        """Total samples skipped so far, in every process that shares this counter."""
        return int(self._counts.sum())

    def reset(self) -> None:
        """Set the count back to zero."""
        self._counts.zero_()

    def __int__(self) -> int:
        """The count."""
        return self.count

    def __repr__(self) -> str:
        """ "SkipStats(name, count)"."""
        return f"SkipStats({self.name!r}, count={self.count})"


@dataclass(frozen=True)
class PairRecord:
    """One sample of a map-style file dataset before loading: where its image and caption are."""

    image: str
    text: str | None  # None: read from caption_file when loaded
    label: int | None
    key: str
    caption_file: str | None = None
    label_file: str | None = None


class RecordDataset(Dataset):
    """Map-style base: PairRecords loaded on access; a bad sample is replaced by the next good one."""

    max_retries: int = 16

    def __init__(self, records: list[PairRecord], source: str, classes: list[str] | None = None) -> None:
        """Wrap records; `source` (a path) appears in log lines and errors."""
        self.records = records
        self.source = source
        self.name = f"{type(self).__name__}({source})"
        self.classes = classes
        self.skipped = SkipStats(self.name)

    def __len__(self) -> int:
        """Number of records (including any that will turn out unreadable)."""
        return len(self.records)

    def load(self, index: int) -> dict:
        """Read one record; raises ImageError, OSError or ValueError when its image or caption is unusable."""
        rec = self.records[index]
        text = rec.text if rec.text is not None else read_caption(rec.caption_file)
        label = rec.label
        if rec.label_file is not None:
            label = read_label(rec.label_file)
        return {"image": load_image(rec.image), "text": text, "label": label, "key": rec.key}

    def texts(self) -> list[str]:
        """Every readable caption (caption files are read; unreadable ones are left out), without images."""
        out = []
        for rec in self.records:
            try:
                out.append(rec.text if rec.text is not None else read_caption(rec.caption_file))
            except (OSError, ValueError):
                continue
        return out

    def __getitem__(self, index: int) -> dict:
        """The sample at index, or (when unreadable: counted and logged) the next readable one after it."""
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        last: Exception | None = None
        tries = min(self.max_retries, n)
        for step in range(tries):
            i = (index + step) % n
            try:
                return self.load(i)
            except (ImageError, OSError, ValueError) as err:
                self.skipped.add(self.records[i].key, str(err))
                last = err
        raise ImageError(
            f"{tries} samples in a row from index {index} of {self.name} could not be read (last: {last}); "
            "check that the dataset's image files exist and are images"
        )

    def __repr__(self) -> str:
        """Class, name and size."""
        return f"{type(self).__name__}({self.source!r}, n={len(self)})"


def read_caption(path: str | None) -> str:
    """A caption file's text, whitespace runs (newlines too) collapsed; an empty caption raises ValueError."""
    if path is None:
        raise ValueError("no caption")
    with open(path, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    if not text:
        raise ValueError(f"caption file {path} is empty")
    return text


def read_label(path: str) -> int:
    """An integer class label from a sidecar file (WebDataset's .cls)."""
    with open(path, encoding="utf-8") as f:
        return int(f.read().strip())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files under root, recursively, sorted, hidden files and folders left out."""
    exts = {e.lower() for e in extensions}
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file() and not _is_hidden(p, root)
    )


def _check_dir(root: str | os.PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist; check the path")
    if not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is not a directory")
    return path


class FolderPairs(RecordDataset):
    """Images with caption sidecars under a folder, recursively: `a/img.jpg` + `a/img.txt` (or `.caption`).

    An optional `img.cls` sidecar holds an integer label. Images without a caption file are skipped, counted.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        """Index the folder (captions are read when a sample is loaded)."""
        base = _check_dir(root, "caption folder")
        records: list[PairRecord] = []
        uncaptioned: list[str] = []
        for image in _image_files(base, extensions):
            key = image.relative_to(base).with_suffix("").as_posix()
            caption = next(
                (c for c in (image.with_suffix(e) for e in CAPTION_EXTENSIONS) if c.is_file()), None
            )
            if caption is None:
                uncaptioned.append(key)
                continue
            cls = image.with_suffix(".cls")
            records.append(
                PairRecord(str(image), None, None, key, str(caption), str(cls) if cls.is_file() else None)
            )
        if not records:
            raise InputError(
                f"no images with caption files under {str(base)!r}; put a caption in `name.txt` next to each "
                f"`name.jpg` (image types: {', '.join(extensions)})"
            )
        super().__init__(records, str(base))
        if uncaptioned:
            self.skipped.add(
                f"{len(uncaptioned)} images without a .txt/.caption file",
                f"e.g. {uncaptioned[0]}",
                len(uncaptioned),
            )


class ImageFolderDataset(RecordDataset):
    """Classification set in the ImageFolder layout, root/class_name/**/*.jpg; text: templated class name."""

    def __init__(
        self,
        root: str | os.PathLike,
        templates: Sequence[str] = ("a photo of a {}.",),
        seed: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        """Classes are the sorted sub-folder names, with "_" read as a space ("golden_retriever")."""
        base = _check_dir(root, "image folder")
        if not templates or any("{}" not in t for t in templates):
            raise InputError("templates must be a non-empty list of strings with a '{}' for the class name")
        folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = [name.replace("_", " ") for name in folders]
        rng = random.Random(f"duomo-imagefolder/{seed}")
        records = []
        for label, folder in enumerate(folders):
            for image in _image_files(base / folder, extensions):
                key = image.relative_to(base).with_suffix("").as_posix()
                text = rng.choice(list(templates)).format(classes[label])
                records.append(PairRecord(str(image), text, label, key))
        if not records:
            raise InputError(
                f"no images found in class folders under {str(base)!r}; expected root/class_name/image.jpg"
            )
        super().__init__(records, str(base), classes)
        self.folders = folders


def _manifest_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in set(MANIFEST_FORMATS.values()):
            raise InputError(f"unknown manifest format {fmt!r}; choose csv, tsv or jsonl")
        return fmt
    if path.suffix.lower() not in MANIFEST_FORMATS:
        raise InputError(
            f"cannot tell the format of manifest {str(path)!r} from its extension; "
            "name it .csv, .tsv or .jsonl, or pass format="
        )
    return MANIFEST_FORMATS[path.suffix.lower()]


def read_manifest(path: Path, fmt: str) -> tuple[list[str] | None, Iterator[tuple[int, dict[str, Any]]]]:
    """(column names or None for JSONL, iterator of (line number, row dict)) of a manifest file."""
    f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed by the generator below

    if fmt == "jsonl":

        def rows_jsonl() -> Iterator[tuple[int, dict[str, Any]]]:
            with f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise InputError(
                            f"line {line_no} of {str(path)!r} is not valid JSON ({err.msg})"
                        ) from err
                    if not isinstance(row, dict):
                        raise InputError(
                            f"line {line_no} of {str(path)!r} is not a JSON object: {line.strip()[:60]}"
                        )
                    yield line_no, row

        return None, rows_jsonl()
    # TSV fields are never quoted: captions may hold quote marks, never tabs or newlines
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
    header = next(reader, None)
    if header is None:
        f.close()
        raise InputError(
            f"manifest {str(path)!r} is empty; its first line must name the columns (image,caption)"
        )
    header = [h.strip() for h in header]

    def rows_csv() -> Iterator[tuple[int, dict[str, Any]]]:
        with f:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                yield reader.line_num, dict(zip(header, row, strict=False))

    return header, rows_csv()


class ManifestPairs(RecordDataset):
    """Pairs listed in a CSV, TSV or JSONL manifest: an image path (relative to the manifest) and a caption.

    Columns: `image`; `caption` or `text`; optional `label` (an int, or a class name: classes are then the
    sorted names) and `key` (default: the image path without its extension). A missing column or malformed
    line raises InputError naming it; rows with an empty caption or image path are skipped and counted, as
    are images that turn out missing or corrupt when loaded.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "image",
        text_column: str | None = None,
        label_column: str = "label",
        key_column: str = "key",
        root: str | os.PathLike | None = None,
        format: str | None = None,  # noqa: A002 - the natural name for users
        classes: Sequence[str] | None = None,
    ) -> None:
        """Read and check the whole manifest now, so that format errors surface before any training."""
        manifest = Path(path).expanduser()
        if not manifest.is_file():
            raise InputError(f"manifest {str(manifest)!r} does not exist or is not a file; check the path")
        fmt = _manifest_format(manifest, format)
        base = Path(root) if root is not None else manifest.parent
        header, rows = read_manifest(manifest, fmt)
        where = f"manifest {str(manifest)!r}"
        if header is not None:
            text_column = self._check_header(header, image_column, text_column, where)
        raw: list[tuple[int, str, str, Any]] = []
        keys: list[str | None] = []
        empty: list[int] = []
        for line_no, row in rows:
            if header is None:
                text_column = self._check_row(row, image_column, text_column, line_no, where)
            image, text = (
                str(row.get(image_column) or "").strip(),
                " ".join(str(row.get(text_column) or "").split()),
            )
            if not image or not text:
                empty.append(line_no)
                continue
            raw.append((line_no, image, text, row.get(label_column)))
            keys.append(str(row[key_column]) if row.get(key_column) not in (None, "") else None)
        labels, class_list = self._labels(raw, classes, label_column, where)
        records = []
        seen: dict[str, int] = {}
        for (_, image, text, _), label, given_key in zip(raw, labels, keys, strict=True):
            image_path = Path(image) if Path(image).is_absolute() else base / image
            key = given_key or Path(image).with_suffix("").as_posix()
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:  # the same image with another caption (COCO-style): keys stay unique
                key = f"{key}#{seen[key] - 1}"
            records.append(PairRecord(str(image_path), text, label, key))
        super().__init__(records, str(manifest), class_list)
        self.path, self.format = manifest, fmt
        if empty:
            self.skipped.add(
                f"{len(empty)} rows with an empty image or caption", f"lines {empty[:5]}", len(empty)
            )
        if not records:
            raise InputError(f"{where} lists no usable image-caption pairs")

    @staticmethod
    def _check_header(header: list[str], image_column: str, text_column: str | None, where: str) -> str:
        """The text column to use; InputError naming what is missing and what is there."""
        if image_column not in header:
            raise InputError(
                f"{where} has no {image_column!r} column (its header line 1 has {header}); "
                f"name the image-path column {image_column!r} or pass image_column="
            )
        if text_column is not None:
            if text_column not in header:
                raise InputError(f"{where} has no {text_column!r} column (its header line 1 has {header})")
            return text_column
        for name in TEXT_COLUMNS:
            if name in header:
                return name
        raise InputError(
            f"{where} has no caption column: expected 'caption' or 'text' (its header line 1 has {header}); "
            "rename the column or pass text_column="
        )

    @staticmethod
    def _check_row(row: dict, image_column: str, text_column: str | None, line_no: int, where: str) -> str:
        """The same checks for one JSONL line."""
        if image_column not in row:
            raise InputError(f"line {line_no} of {where} has no {image_column!r} key (it has {sorted(row)})")
        if text_column is not None:
            if text_column not in row:
                raise InputError(
                    f"line {line_no} of {where} has no {text_column!r} key (it has {sorted(row)})"
                )
            return text_column
        for name in TEXT_COLUMNS:
            if name in row:
                return name
        raise InputError(f"line {line_no} of {where} has no 'caption' or 'text' key (it has {sorted(row)})")

    @staticmethod
    def _labels(
        raw: list[tuple[int, str, str, Any]], classes: Sequence[str] | None, column: str, where: str
    ) -> tuple[list[int | None], list[str] | None]:
        """Integer labels and the class list: ints stay, names index into `classes` (or their sorted set)."""
        values = [v if not isinstance(v, str) else v.strip() for _, _, _, v in raw]
        named = [v for v in values if isinstance(v, str) and v and not re.fullmatch(r"-?\d+", v)]
        if named and classes is None:
            classes = sorted(set(named))
        index = {c: i for i, c in enumerate(classes)} if classes is not None else {}
        labels: list[int | None] = []
        for (line_no, _, _, _), v in zip(raw, values, strict=True):
            if v is None or v == "":
                labels.append(None)
            elif isinstance(v, bool) or not isinstance(v, (int, str)):
                raise InputError(
                    f"line {line_no} of {where}: {column!r} must be an int or a class name, got {v!r}"
                )
            elif isinstance(v, int) or re.fullmatch(r"-?\d+", v):
                labels.append(int(v))
            elif v in index:
                labels.append(index[v])
            else:
                raise InputError(f"line {line_no} of {where}: label {v!r} is not one of the given classes")
        if classes is None and any(label is not None for label in labels):
            classes = [str(i) for i in range(max(label for label in labels if label is not None) + 1)]
        return labels, (list(classes) if classes is not None else None)


# ---- WebDataset shards ----

_BRACE = re.compile(r"\{([^{}]*)\}")


def braceexpand(pattern: str) -> list[str]:
    """WebDataset's shard notation: "s-{000..003}.tar" -> s-000.tar ... s-003.tar; "{a,b}" alternatives."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in braceexpand(head + item + tail)]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list of a spec: a list, a directory (its *.tar), a glob, brace notation, or "::"-joined specs."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shards(item)]
    text = os.fspath(spec)
    if "::" in text:
        return [url for part in text.split("::") for url in expand_shards(part)]
    urls: list[str] = []
    for item in braceexpand(text):
        if _is_remote(item):
            urls.append(item)
        elif Path(item).is_dir():
            urls += sorted(
                str(p) for p in Path(item).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz"))
            )
        elif any(ch in item for ch in "*?["):
            urls += sorted(glob.glob(item))
        else:
            urls.append(item)
    return urls


def _open_shard(url: str) -> Any:
    """A binary stream of a shard: a local file, or (with the webdataset library) a URL / pipe: command."""
    if not _is_remote(url):
        return open(url, "rb")  # noqa: SIM115 - closed by the caller
    try:
        from webdataset.gopen import gopen
    except ImportError as err:
        raise InputError(
            f"shard {url!r} is remote: install `webdataset` to stream it, or download it"
        ) from err
    return gopen(url, "rb")


def _split_key(name: str) -> tuple[str | None, str | None]:
    """WebDataset's member naming: "dir/key.ext.ext2" -> ("dir/key", "ext.ext2")."""
    match = re.match(r"^((?:.*/|)[^./]+)[.]([^/]*)$", name.removeprefix("./"))
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def tar_samples(url: str, on_error: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples of a tar shard, in order: {"__key__", "__url__", ext: bytes, ...}; read errors reported."""
    current: dict[str, Any] | None = None
    try:
        with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key is None or Path(key).name.startswith("__"):  # "__index__" and friends: metadata
                    continue
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        # a truncated or corrupt shard: its partial last sample and the rest are lost, counted as one skip
        on_error(f"the rest of shard {url}", f"unreadable tar data ({err or type(err).__name__})")
        current = None
    if current is not None:
        yield current


def decode_sample(raw: dict[str, Any]) -> dict:
    """A raw WebDataset sample -> {"image", "text", "label", "key"} (+ "qa" from json); raises on bad data."""
    meta: dict = {}
    if "json" in raw:
        meta = json.loads(raw["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            meta = {}
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None:
        raise ValueError(f"no image member (.{', .'.join(WDS_IMAGE_EXTENSIONS)}); it has {sorted(raw)}")
    text_ext = next((e for e in WDS_TEXT_EXTENSIONS if e in raw), None)
    text = raw[text_ext].decode("utf-8") if text_ext else meta.get("caption", meta.get("text"))
    text = " ".join(str(text or "").split())
    if not text:
        raise ValueError("no caption (.txt member, or 'caption' in .json)")
    label = meta.get("label")
    if "cls" in raw:
        label = int(raw["cls"].decode("utf-8").strip())
    sample = {
        "image": load_image(raw[image_ext]),
        "text": text,
        "label": None if label is None else int(label),
        "key": raw["__key__"],
    }
    if "qa" in meta:
        sample["qa"] = [tuple(pair) for pair in meta["qa"]]
    return sample


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetPairs(IterableDataset):
    """Streams WebDataset tar shards (key.jpg/png/webp + key.txt/json/cls), split across ranks and workers.

    Without resampling, one pass visits every sample exactly once over all ranks x workers: shards are dealt
    out round-robin (or, with fewer shards than readers, every reader scans all shards and keeps every n-th
    sample). Shard order and a per-reader shuffle buffer change each epoch (`set_epoch`, or each new pass of a
    persistent worker). With resample=True each reader draws shards with replacement, forever.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        shuffle_buffer: int = 1000,
        resample: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        """Expand and check the shard list; rank/world_size default to torch.distributed's."""
        self.urls = expand_shards(urls)
        if not self.urls:
            raise InputError(
                f"no shards found for {urls!r}; pass tar files, a directory, a glob or s-{{000..009}}.tar"
            )
        missing = [u for u in self.urls if not _is_remote(u) and not Path(u).is_file()]
        if missing:
            raise InputError(
                f"shard {missing[0]!r} does not exist ({len(missing)} of {len(self.urls)} missing)"
            )
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise InputError(
                f"rank and world_size go together, with 0 <= rank < world_size; got {rank}, {world_size}"
            )
        self.shuffle_buffer, self.resample, self.seed = int(shuffle_buffer), bool(resample), int(seed)
        self.rank, self.world_size = rank, world_size
        self.classes = list(classes) if classes is not None else None
        self.epoch = 0
        self._passes = 0  # passes made by this copy: advances the shuffle in persistent workers
        self.skipped = SkipStats(f"WebDatasetPairs({len(self.urls)} shards)")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (reaches workers when a non-persistent DataLoader next starts them)."""
        self.epoch = int(epoch)

    def reader(self) -> tuple[int, int]:
        """(this reader's id, number of readers) over distributed ranks x DataLoader workers."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None else dist_rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _raw(self, reader: int, readers: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Raw samples for this reader: its share of one pass, or an endless resampled stream."""
        if self.resample:
            rng = random.Random(f"duomo-wds/{self.seed}/{epoch}/{reader}/resample")
            while True:
                yield from tar_samples(rng.choice(self.urls), self.skipped.add)
        order = list(self.urls)
        if self.shuffle_buffer > 1:  # the same order in every reader: they must agree on who reads what
            random.Random(f"duomo-wds/{self.seed}/{epoch}/shards").shuffle(order)
        if len(order) >= readers:
            for url in order[reader::readers]:
                yield from tar_samples(url, self.skipped.add)
            return
        if reader == 0 and self._passes <= 1:
            log.warning(
                "%d shards for %d readers: every reader scans every shard; write more shards",
                len(order),
                readers,
            )
        count = 0
        for url in order:
            for raw in tar_samples(url, self.skipped.add):
                if count % readers == reader:
                    yield raw
                count += 1

    def __iter__(self) -> Iterator[dict]:
        """Decoded samples; bad ones are skipped and counted."""
        reader, readers = self.reader()
        epoch = self.epoch + self._passes
        self._passes += 1
        samples = self._decoded(self._raw(reader, readers, epoch))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"duomo-wds/{self.seed}/{epoch}/{reader}/buffer")
            samples = shuffled(samples, self.shuffle_buffer, rng)
        return samples

    def _decoded(self, raws: Iterable[dict[str, Any]]) -> Iterator[dict]:
        for raw in raws:
            try:
                yield decode_sample(raw)
            except (ImageError, ValueError, UnicodeDecodeError, TypeError) as err:
                self.skipped.add(f"sample {raw.get('__key__')} of {raw.get('__url__')}", str(err))

    def __repr__(self) -> str:
        """Shards and settings, one line."""
        return (
            f"WebDatasetPairs({len(self.urls)} shards, shuffle_buffer={self.shuffle_buffer}, "
            f"resample={self.resample}, seed={self.seed})"
        )


def shuffled(items: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Approximate streaming shuffle: keep `buffer` items, emit a random one as each new item arrives."""
    pool: list[Any] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(len(pool))
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool


# ---- batching ----


def collate(
    samples: Sequence[dict | None], transform: Callable[[Image.Image], torch.Tensor], tokenizer: Callable
) -> dict | None:
    """Samples -> {"pixels" [B,3,H,W], "tokens" [B,T], "labels" [B] (-1: none), "keys", "texts", "skipped"}.

    None samples are dropped (and counted in "skipped"); a batch of only None gives None.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    texts = [s["text"] for s in kept]
    return {
        "pixels": torch.stack([transform(s["image"]) for s in kept]),
        "tokens": tokenizer(texts),
        "labels": torch.tensor(
            [-1 if s.get("label") is None else int(s["label"]) for s in kept], dtype=torch.long
        ),
        "keys": [s["key"] for s in kept],
        "texts": texts,
        "skipped": len(samples) - len(kept),
    }


class PairCollate:
    """A picklable collate_fn (for DataLoader worker processes) bound to a transform and a tokenizer."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], tokenizer: Callable) -> None:
        """Keep the transform and the tokenizer."""
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, samples: Sequence[dict | None]) -> dict | None:
        """collate(samples, transform, tokenizer)."""
        return collate(samples, self.transform, self.tokenizer)


def make_collate(transform: Callable[[Image.Image], torch.Tensor], tokenizer: Callable) -> PairCollate:
    """A collate_fn for DataLoader: see `collate`."""
    return PairCollate(transform, tokenizer)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable,
    workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of collated batches: seeded, persistent decoding workers, a DistributedSampler under DDP.

    Streaming datasets shuffle themselves (a shuffle buffer) and split themselves across ranks and workers.
    Under DDP call `loader.sampler.set_epoch(epoch)` (map-style) or `dataset.set_epoch(epoch)` each epoch.
    """
    if batch_size < 1 or workers < 0:
        raise InputError(f"need batch_size >= 1 and workers >= 0, got {batch_size} and {workers}")
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "collate_fn": make_collate(transform, tokenizer),
        "drop_last": drop_last,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "persistent_workers": workers > 0,
        "worker_init_fn": seed_worker if workers > 0 else None,
        "generator": torch.Generator().manual_seed(seed),
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **options)
    rank, world = dist_rank_world()
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        return DataLoader(dataset, sampler=sampler, **options)
    return DataLoader(dataset, shuffle=shuffle, **options)
