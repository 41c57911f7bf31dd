"""BEiT-3 task data: any source of samples -> in-memory tensors the trainer batches.

Sources are specs as for CLIP training: "shapes" (the built-in world; "shapes:val", "shapes:heldout"), a
VQA manifest for `vqa`, any caption pair source for `caption`/`retrieval` (manifest, caption folder,
WebDataset shards, a `duomo data export` folder), an ImageFolder tree or an `image,label` CSV for
`classify`. Each image is decoded and transformed once (questions of one image share it); tokens are
padded to a fixed length and trimmed per batch by the collate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from duomo.data.catalog import open_pairs, read_export_meta
from duomo.data.pairs import MANIFEST_FORMATS, ImageFolderDataset, ManifestPairs, RecordDataset
from duomo.data.shapes import COLOURS, SHAPES, ShapesDataset, class_names
from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform
from duomo.data.vqa import VQAData, VQARecord, build_answer_vocabulary, soft_scores
from duomo.errors import ImageError, InputError
from duomo.models.beit3 import BEiT3Config

TEXT_LENGTH = 32  # tokens, with start/end ids; shapes questions and captions use at most ~14
SHAPES_LABELS = ("shape", "colour", "pair")


@dataclass
class TaskTable(Dataset):
    """Rows of a task: row i is image `image_index[i]` with its text and target tensors."""

    pixels: torch.Tensor  # [images, 3, H, W]
    image_index: torch.Tensor  # [rows]
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # per row: tokens, padding_mask, ...
    texts: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. answers, classes, references
    skipped: int = 0

    def __len__(self) -> int:
        """Number of rows (questions, captions, labelled images)."""
        return len(self.image_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One row as tensors."""
        row = {"pixels": self.pixels[self.image_index[index]]}
        row.update({k: v[index] for k, v in self.columns.items()})
        return row

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `rows` as one batch (texts trimmed to the longest)."""
        from duomo.train.data import RowCollate

        return RowCollate()([self[int(i)] for i in rows])


def _key(sample: dict, index: int) -> str:
    return str(sample.get("key", index))


class ImageCache:
    """Decoded, transformed images by key, stacked once at the end."""

    def __init__(self, transform: Callable) -> None:
        self.transform, self.index, self.tensors = transform, {}, []

    def add(self, key: str, image: Any) -> int:
        """The row of `key`'s image, transforming it the first time."""
        if key not in self.index:
            self.index[key] = len(self.tensors)
            self.tensors.append(self.transform(image))
        return self.index[key]

    def stack(self) -> torch.Tensor:
        """All images [N, 3, H, W]."""
        return torch.stack(self.tensors)


def _iterate(dataset: Dataset) -> Any:
    """Samples of a map-style or streaming dataset, in order; a file dataset's unreadable samples are
    skipped and counted (not replaced by their neighbour, which would duplicate it)."""
    if isinstance(dataset, IterableDataset):
        yield from dataset
    elif isinstance(dataset, RecordDataset | VQAData):
        for i in range(len(dataset)):
            try:
                yield dataset.load(i)
            except (ImageError, OSError, ValueError) as err:
                record = dataset.records[i]
                dataset.skipped.add(getattr(record, "key", None) or record.image, str(err))
    else:
        for i in range(len(dataset)):
            yield dataset[i]


def _tokens(
    cfg: BEiT3Config, texts: list[str], spm_path: str | os.PathLike | None
) -> tuple[torch.Tensor, ...]:
    ids, pad = build_tokenizer(cfg, spm_path=spm_path).encode_with_padding(texts, TEXT_LENGTH)
    if ids.shape[1] < TEXT_LENGTH:  # fixed width, so rows stack; the collate trims per batch
        extra = TEXT_LENGTH - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, extra), value=0)
        pad = torch.nn.functional.pad(pad, (0, extra), value=True)
    return ids, pad


def _transform(cfg: BEiT3Config) -> Callable:
    return image_transform(cfg.image_size, cfg.mean, cfg.std)


def _skip_count(dataset: Any) -> int:
    skipped = getattr(dataset, "skipped", None)
    return int(skipped) if skipped is not None else 0


# --- VQA ----------------------------------------------------------------------------------------------
class ShapesQuestions(Dataset):
    """Every question of a shapes split as VQA items {"image", "question", "answers", "key"}."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0, max_objects: int = 2):
        self.world = ShapesDataset(
            split, size=size, image_size=image_size, seed=seed, max_objects=max_objects
        )
        self.rows = [(i, q, a) for i in range(size) for q, a in self.world.scene(i).metadata["qa"]]
        self.records = [VQARecord(str(i), q, (a,)) for i, q, a in self.rows]
        self._images: dict[int, Any] = {}

    def __len__(self) -> int:
        """Number of questions."""
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One question with its image (rendered once per image)."""
        i, q, a = self.rows[index]
        if i not in self._images:
            self._images = {i: self.world[i]["image"]}  # rows of one image are adjacent
        return {"image": self._images[i], "question": q, "answers": (a,), "key": str(i)}


def vqa_source(spec: str, cfg: BEiT3Config, size: int = 2000, seed: int = 0) -> Dataset:
    """VQA items of "shapes[:split]" or of a VQA manifest path."""
    name, _, split = spec.partition(":")
    if name == "shapes":
        return ShapesQuestions(split or "train", size, cfg.image_size, seed)
    folder = Path(spec).expanduser()
    if folder.is_dir():  # a `duomo data export --task vqa` folder: its manifest
        meta = read_export_meta(folder)
        if meta is None or not meta.get("files"):
            raise InputError(f"{spec!r} is a folder; give a VQA manifest or a `duomo data export` folder")
        return VQAData.from_manifest(folder / meta["files"][0])
    return VQAData.from_manifest(spec)


def vqa_table(
    source: Dataset,
    cfg: BEiT3Config,
    answers: Sequence[str] | None = None,
    spm_path: str | os.PathLike | None = None,
) -> TaskTable:
    """Questions as rows with soft "scores" over `answers` (built from these questions when None);
    questions none of whose answers is in the vocabulary are left out and counted."""
    records = getattr(source, "records", None)
    if answers is None:
        if records is None:
            raise InputError("the answer vocabulary is built from the training data; give it a manifest")
        answers = build_answer_vocabulary(records)
    index = {a: i for i, a in enumerate(answers)}
    cache = ImageCache(_transform(cfg))
    image_rows, questions, score_rows = [], [], []
    outside = 0
    for i, item in enumerate(_iterate(source)):
        scores = {index[a]: s for a, s in soft_scores(item["answers"]).items() if a in index}
        if not scores:
            outside += 1
            continue
        image_rows.append(cache.add(_key(item, i), item["image"]))
        questions.append(item["question"])
        score_rows.append(scores)
    if not questions:
        raise InputError("no question has an answer in the model's answer vocabulary")
    dense = torch.zeros(len(questions), len(answers))
    for r, scores in enumerate(score_rows):
        for a, s in scores.items():
            dense[r, a] = s
    ids, pad = _tokens(cfg, questions, spm_path)
    return TaskTable(
        cache.stack(),
        torch.tensor(image_rows),
        {"tokens": ids, "padding_mask": pad, "scores": dense},
        questions,
        {"answers": list(answers), "outside_vocabulary": outside},
        _skip_count(source) + outside,
    )


# --- captions and retrieval ------------------------------------------------------------------------------
def caption_source(spec: str, cfg: BEiT3Config, size: int = 2000, seed: int = 0) -> Dataset:
    """Image-caption pairs of "shapes[:split]" (scenes of up to 2 objects) or any pair source."""
    name, _, split = spec.partition(":")
    if name == "shapes":
        return ShapesDataset(split or "train", size=size, image_size=cfg.image_size, seed=seed, max_objects=2)
    return open_pairs(spec)


def caption_table(source: Dataset, cfg: BEiT3Config, spm_path: str | os.PathLike | None = None) -> TaskTable:
    """Image-caption pairs as rows of tokens (one row per caption; captions of one image share it)."""
    cache = ImageCache(_transform(cfg))
    image_rows, texts = [], []
    for i, item in enumerate(_iterate(source)):
        if not str(item.get("text") or "").strip():
            continue
        image_rows.append(cache.add(_key(item, i), item["image"]))
        texts.append(item["text"])
    if not texts:
        raise InputError(f"{source!r} gave no image-caption pairs")
    ids, pad = _tokens(cfg, texts, spm_path)
    return TaskTable(
        cache.stack(),
        torch.tensor(image_rows),
        {"tokens": ids, "padding_mask": pad},
        texts,
        {},
        _skip_count(source),
    )


def caption_vocabulary(table: TaskTable, sot_id: int) -> list[int]:
    """The distinct token ids of a caption table outside padding, without the start id."""
    used = set(table.columns["tokens"][~table.columns["padding_mask"]].tolist())
    used.discard(sot_id)
    return sorted(used)


# --- classification --------------------------------------------------------------------------------------
def classify_source(
    spec: str, cfg: BEiT3Config, label: str = "shape", size: int = 2000, seed: int = 0
) -> tuple[Dataset, list[str]]:
    """(labelled images, class names) of "shapes[:split]" (labelled by the main object's `label`), an
    ImageFolder tree (one folder per class) or an `image,label` manifest."""
    name, _, split = spec.partition(":")
    if name == "shapes":
        if label not in SHAPES_LABELS:
            raise InputError(f"unknown label {label!r}; choose one of {', '.join(SHAPES_LABELS)}")
        if label == "pair" and split == "heldout":
            raise InputError("held-out images show pairs that are no class of a 'pair' classifier; use val")
        world = ShapesDataset(
            split or "train", size=size, image_size=cfg.image_size, seed=seed, max_objects=2
        )
        names = {"shape": list(SHAPES), "colour": list(COLOURS), "pair": class_names("train")}[label]
        return ShapesLabels(world, label, names), names
    path = Path(spec).expanduser()
    if path.is_dir():
        data = ImageFolderDataset(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_FORMATS:
        data = ManifestPairs(path, text_column="label")
    else:
        raise InputError(f"--data {spec!r}: give 'shapes', an ImageFolder tree or an image,label CSV/JSONL")
    classes = list(getattr(data, "classes", None) or [])
    if len(classes) < 2:
        raise InputError(f"{spec!r} has {len(classes)} classes; a classifier needs at least 2")
    return data, classes


class ShapesLabels(Dataset):
    """Shapes scenes labelled by their main object's shape, colour or pair."""

    def __init__(self, world: ShapesDataset, label: str, names: list[str]) -> None:
        self.world, self.label, self.index = world, label, {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        """Number of images."""
        return len(self.world)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image", "label", "key"}."""
        main = self.world.scene(index).main
        value = {"shape": main.shape, "colour": main.colour, "pair": main.name}[self.label]
        return {"image": self.world[index]["image"], "label": self.index[value], "key": str(index)}


def classify_table(source: Dataset, cfg: BEiT3Config) -> TaskTable:
    """Labelled images as rows of "labels"; unlabelled samples are left out and counted."""
    cache = ImageCache(_transform(cfg))
    image_rows, labels, unlabelled = [], [], 0
    for i, item in enumerate(_iterate(source)):
        if item.get("label") is None:
            unlabelled += 1
            continue
        image_rows.append(cache.add(_key(item, i), item["image"]))
        labels.append(int(item["label"]))
    if not labels:
        raise InputError(f"{source!r} has no labelled images")
    return TaskTable(
        cache.stack(),
        torch.tensor(image_rows),
        {"labels": torch.tensor(labels)},
        [],
        {},
        _skip_count(source) + unlabelled,
    )
