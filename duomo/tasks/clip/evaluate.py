"""Benchmark a model: zero-shot classification, image<->text retrieval and linear probes, as JSON records.

Every result is one record, `{"dataset", "split", "model", "task", "metrics": {...}, "n"[, "templates"]}`,
metrics as fractions in [0, 1]. `evaluate` runs the asked tasks on built-in worlds ("shapes": the seen-class
`val` split and the unseen-combination `heldout` split; "digits": `test`) or on user data (manifests,
caption folders, WebDataset shards, ImageFolder class folders).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from duomo.errors import InputError
from duomo.tasks.clip.zero_shot import DEFAULT_TEMPLATES, build_classifier
from duomo.tasks.metrics import retrieval_metrics

if TYPE_CHECKING:
    from duomo.tasks.clip.probe import ProbeResult

log = logging.getLogger("duomo.eval")

TASKS: tuple[str, ...] = ("zeroshot", "retrieval", "probe")
SHAPES_EVAL_SIZE = 1000  # samples per shapes split when --size is not given
_COPY_SUFFIX = re.compile(r"#\d+$")  # ManifestPairs keys of further captions of one image: "img#1"


# ---- metrics ----


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (k is capped at the number of classes)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in `labels` of the fraction of their samples predicted right."""
    recalls = [float((predictions[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return sum(recalls) / len(recalls)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 and mean per-class recall of class scores [N, C] against integer labels [N]."""
    if scores.shape[0] == 0:
        raise InputError("no labelled samples to score")
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(scores.argmax(dim=1), labels),
    }


# ---- features ----


@dataclass
class Features:
    """What the tasks need from one dataset: image embeddings, labels, and captions mapped to their images."""

    images: torch.Tensor  # [N_images, D], L2-normalised, one row per distinct image
    labels: torch.Tensor  # [N_images], -1 where a sample has no label
    texts: list[str]  # every caption
    text_image: torch.Tensor  # [N_texts]: the row in `images` each caption describes
    keys: list[str] = field(default_factory=list)  # one per image

    @property
    def labelled(self) -> torch.Tensor:
        """Boolean mask [N_images] of the images with a label."""
        return self.labels >= 0


class EvalCollate:
    """Samples -> (pixels [B, 3, H, W], labels [B], texts, keys), the eval transform applied in the worker."""

    def __init__(self, transform: Callable) -> None:
        """Keep the image transform."""
        self.transform = transform

    def __call__(self, samples: list[dict | None]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Stack one batch."""
        kept = [s for s in samples if s is not None]
        pixels = torch.stack([self.transform(s["image"]) for s in kept])
        labels = torch.tensor([-1 if s.get("label") is None else int(s["label"]) for s in kept])
        return pixels, labels, [str(s.get("text") or "") for s in kept], [str(s["key"]) for s in kept]


def image_group(key: str) -> str:
    """The image a sample's key names: further captions of one image carry a "#n" suffix (ManifestPairs)."""
    return _COPY_SUFFIX.sub("", key)


def extract_features(
    pipe: Any,
    dataset: Dataset | Iterable[dict],
    batch_size: int = 64,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Embed every image of a dataset once (samples sharing an image key share one row) and keep captions."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=EvalCollate(pipe.transform),
    )
    rows: dict[str, int] = {}
    images, labels, texts, text_image, keys = [], [], [], [], []
    for pixels, batch_labels, batch_texts, batch_keys in loader:
        if len(batch_keys) == 0:
            continue
        embeds = pipe.encode_pixels(pixels)
        for i, key in enumerate(batch_keys):
            group = image_group(key)
            if group not in rows:
                rows[group] = len(keys)
                keys.append(group)
                images.append(embeds[i])
                labels.append(int(batch_labels[i]))
            texts.append(batch_texts[i])
            text_image.append(rows[group])
        if on_batch is not None:
            on_batch(len(batch_keys))
    if not keys:
        raise InputError("the dataset yielded no samples to evaluate")
    return Features(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.long),
        texts=texts,
        text_image=torch.tensor(text_image, dtype=torch.long),
        keys=keys,
    )


# ---- data ----


@dataclass
class EvalData:
    """One evaluation set: the data to score, the data a probe trains on, class names and prompt templates."""

    name: str  # "shapes", "digits" or the path given
    split: str
    test: Dataset
    train: Dataset | None = None  # None: the probe splits `test` itself
    classes: list[str] | None = None
    templates: list[str] | None = None  # the dataset's own evaluation prompts, if it has any
    tasks: tuple[str, ...] | None = None  # the tasks that mean something on this set (None: all)


def limit(dataset: Dataset, size: int | None) -> Dataset:
    """The first `size` samples of a dataset (all of them when size is None)."""
    if size is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return _Head(dataset, size)
    return Subset(dataset, range(min(size, len(dataset))))


class _Head(IterableDataset):
    """The first n samples of a streaming dataset."""

    def __init__(self, dataset: IterableDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.n)


def is_image_folder(path: Path) -> bool:
    """A folder of class sub-folders holding images, with no caption files: the ImageFolder layout."""
    from duomo.data.pairs import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS

    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not subdirs or any(p.suffix.lower() in CAPTION_EXTENSIONS for p in path.rglob("*")):
        return False
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for d in subdirs for p in d.rglob("*"))


def open_eval_data(
    spec: str | os.PathLike,
    split: str | None = None,
    size: int | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> list[EvalData]:
    """Evaluation sets of a data spec: shapes (val and heldout, or `split`), digits (test) or user data."""
    from duomo.data.catalog import open_pairs
    from duomo.data.digits import EVAL_TEMPLATES, DigitsDataset
    from duomo.data.pairs import ImageFolderDataset
    from duomo.data.shapes import EVAL_TEMPLATES as SHAPES_TEMPLATES
    from duomo.data.shapes import ShapesDataset

    text = os.fspath(spec)
    name, _, given = text.partition(":")
    if name == "shapes":
        splits = [given or split] if (given or split) else ["val", "heldout", "heldout-all"]
        n = size or SHAPES_EVAL_SIZE
        out = []
        for s in splits:
            if s == "heldout-all":  # held-out images, labels over all 64 combinations, seen ones included
                test = ShapesDataset("heldout", size=n, image_size=image_size, seed=seed, label_space="all")
                # only the label space differs from heldout: its retrieval and probe would repeat heldout's
                classes, prompts = list(test.classes), list(SHAPES_TEMPLATES)
                out.append(EvalData("shapes", s, test, None, classes, prompts, tasks=("zeroshot",)))
                continue
            test = ShapesDataset(s, size=n, image_size=image_size, seed=seed)
            # the probe trains on other scenes of the same classes: the train split, or more held-out scenes
            train = ShapesDataset(
                "train" if s != "heldout" else "heldout", size=n, image_size=image_size, seed=seed + 1
            )
            out.append(EvalData("shapes", s, test, train, list(test.classes), list(SHAPES_TEMPLATES)))
        return out
    if name == "digits":
        s = given or split or "test"
        test = DigitsDataset(s, image_size=image_size, seed=seed, size=size)
        train = DigitsDataset("train", image_size=image_size, seed=seed, size=size) if s == "test" else None
        return [EvalData("digits", s, test, train, list(test.classes), list(EVAL_TEMPLATES))]
    path = Path(text).expanduser()
    if path.is_dir() and is_image_folder(path):
        dataset: Dataset = ImageFolderDataset(path)
    else:
        dataset = open_pairs(text)
    classes = getattr(dataset, "classes", None)
    return [EvalData(text, split or "all", limit(dataset, size), None, list(classes) if classes else None)]


def resolve_templates(given: Sequence[str] | None, data: EvalData, pipe: Any) -> list[str]:
    """Prompt templates: the given ones, else the dataset's eval set, the model's, or duomo's default."""
    for candidate in (given, data.templates, getattr(pipe, "meta", {}).get("templates"), DEFAULT_TEMPLATES):
        if candidate:
            return list(candidate)
    return list(DEFAULT_TEMPLATES)


# ---- tasks ----


def zero_shot_metrics(
    pipe: Any, features: Features, classes: Sequence[str], templates: Sequence[str]
) -> dict[str, float]:
    """top1 / top5 / mean per-class recall of the prompt-ensembled zero-shot classifier."""
    try:
        classifier = build_classifier(list(classes), list(templates), pipe.encode_text)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    mask = features.labelled
    return classification_metrics(features.images[mask] @ classifier.T, features.labels[mask])


def make_record(
    data: EvalData, model: str, task: str, metrics: dict[str, float], n: int, **extra: Any
) -> dict[str, Any]:
    """One result record (metrics rounded to 6 digits)."""
    record = {
        "dataset": data.name,
        "split": data.split,
        "model": model,
        "task": task,
        "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
        "n": int(n),
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def evaluate(
    pipe: Any,
    data: str | os.PathLike | Sequence[EvalData],
    tasks: Sequence[str] = TASKS,
    model_name: str | None = None,
    templates: Sequence[str] | None = None,
    split: str | None = None,
    size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    k_shot: int | None = None,
    seed: int = 0,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `tasks` (zeroshot, retrieval, probe) of a `duomo.Pipeline` on a data spec; returns the records."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown eval task(s) {unknown}; choose from {list(TASKS)} or 'all'")
    sets = (
        open_eval_data(data, split, size, pipe.config.vision.image_size, seed)
        if isinstance(data, str | os.PathLike)
        else list(data)
    )
    model = model_name or getattr(pipe, "name", "") or "model"
    records = []
    for ds in sets:
        feats = extract_features(pipe, ds.test, batch_size, workers)
        for task in tasks:
            if ds.tasks is not None and task not in ds.tasks:
                continue
            why = _unsupported(task, ds, feats)
            if why:
                message = f"cannot run {task} on {ds.name} ({ds.split}): {why}"
                if len(tasks) == 1:
                    raise InputError(message)
                log.warning("%s; skipped", message)
                continue
            if task == "zeroshot":
                used = resolve_templates(templates, ds, pipe)
                metrics = zero_shot_metrics(pipe, feats, ds.classes, used)
                record = make_record(ds, model, task, metrics, int(feats.labelled.sum()), templates=used)
            elif task == "retrieval":
                similarity = feats.images @ pipe.encode_text(feats.texts).T
                metrics = retrieval_metrics(similarity, feats.text_image)
                record = make_record(ds, model, task, metrics, len(feats.keys), n_texts=len(feats.texts))
            else:
                train = (
                    extract_features(pipe, ds.train, batch_size, workers) if ds.train is not None else None
                )
                result = probe_features(feats, train, len(ds.classes), k_shot, seed)
                record = make_record(ds, model, task, result.metrics, result.n_test, probe=result.settings())
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records


def _unsupported(task: str, data: EvalData, features: Features) -> str | None:
    """Why a dataset cannot support a task (None when it can)."""
    if task in ("zeroshot", "probe") and (not data.classes or not bool(features.labelled.any())):
        return "it has no class labels"
    if task == "retrieval" and not any(features.texts):
        return "it has no captions"
    return None


def probe_features(
    test: Features, train: Features | None, num_classes: int, k_shot: int | None, seed: int
) -> ProbeResult:
    """A linear probe fit on `train` and scored on `test` (no `train`: a stratified 70/30 split of test)."""
    from duomo.tasks.clip.probe import linear_probe, stratified_split

    x, y = test.images[test.labelled], test.labels[test.labelled]
    if train is not None:
        train_x, train_y = train.images[train.labelled], train.labels[train.labelled]
        return linear_probe(train_x, train_y, x, y, num_classes, k_shot, seed=seed)
    train_idx, test_idx = stratified_split(y, 0.3, seed)
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise InputError("too few labelled images for a linear probe: need at least 2 per class")
    return linear_probe(x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes, k_shot, seed=seed)


def write_records(records: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Append records to a JSONL file (one JSON object per line), creating it and its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
