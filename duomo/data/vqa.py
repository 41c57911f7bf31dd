"""VQA data: (image, question, answers) from a manifest, answer vocabularies, soft scores.

A VQA manifest is a JSONL, CSV or TSV file (image paths relative to it) with, per row, either one question:

    {"image": "img/1.png", "question": "what color is the star?", "answer": "red"}
    {"image": "img/2.png", "question": "how many dogs?", "answers": ["2", "2", "3", "2"]}

(CSV/TSV: columns image, question, answer; several answers joined by "|"), or every question of an image at
once, as `duomo data export shapes --task vqa` writes: {"image": ..., "qa": [["question", "answer"], ...]}.
A question's soft score for an answer is VQAv2's: min(1, annotators giving it / min(3, annotators)); a single
answer scores 1. Rows with an empty question, no answer or no image are skipped and counted; images that
turn out missing or corrupt are skipped (and counted) when loaded.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from duomo.data.images import load_image
from duomo.data.pairs import SkipStats, _manifest_format, read_manifest
from duomo.errors import ImageError, InputError

ANSWER_SEPARATOR = "|"


@dataclass(frozen=True)
class VQARecord:
    """One question about one image, with its annotators' answers."""

    image: str
    question: str
    answers: tuple[str, ...]


def normalize_answer(answer: Any) -> str:
    """An answer as compared and stored: lower case, single spaces."""
    return " ".join(str(answer).lower().split())


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQAv2-style score of each distinct answer: min(1, count / min(3, annotators))."""
    counts = Counter(answers)
    full = min(3, max(1, len(answers)))
    return {a: min(1.0, n / full) for a, n in counts.items()}


def build_answer_vocabulary(records: Sequence[VQARecord], min_count: int = 1) -> list[str]:
    """Answers given at least `min_count` times in `records`, most frequent first (ties alphabetical)."""
    counts = Counter(a for r in records for a in set(r.answers))
    kept = [a for a, n in counts.items() if n >= min_count]
    if not kept:
        raise InputError(f"no answer occurs {min_count} times in the training questions; lower min_count")
    return sorted(kept, key=lambda a: (-counts[a], a))


def _answers_of(row: dict, line_no: int, where: str) -> tuple[str, ...]:
    """The answers of one row: `answers` (a list, or "|"-joined) or `answer`."""
    value = row.get("answers")
    if value in (None, ""):
        value = row.get("answer")
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        value = value.split(ANSWER_SEPARATOR) if ANSWER_SEPARATOR in value else [value]
    if isinstance(value, dict):  # {"answer": ...} entries as in VQAv2's annotation files
        value = [value.get("answer", "")]
    if not isinstance(value, list):
        raise InputError(f"line {line_no} of {where}: answers must be a list or a string, got {value!r}")
    out = []
    for a in value:
        a = a.get("answer", "") if isinstance(a, dict) else a
        if isinstance(a, (list, dict)) or a is None:
            raise InputError(f"line {line_no} of {where}: an answer must be a string, got {a!r}")
        if normalize_answer(a):
            out.append(normalize_answer(a))
    return tuple(out)


def read_vqa_manifest(
    path: str | os.PathLike, root: str | os.PathLike | None = None, skipped: SkipStats | None = None
) -> list[VQARecord]:
    """Every usable question of a VQA manifest; bad rows are counted in `skipped` and left out."""
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise InputError(f"VQA manifest {str(manifest)!r} does not exist or is not a file; check the path")
    fmt = _manifest_format(manifest, None)
    base = Path(root) if root is not None else manifest.parent
    where = f"VQA manifest {str(manifest)!r}"
    header, rows = read_manifest(manifest, fmt)
    if header is not None and ("image" not in header or "question" not in header):
        raise InputError(f"{where} needs columns image, question, answer (its header has {header})")
    skipped = skipped if skipped is not None else SkipStats(where)
    records: list[VQARecord] = []
    bad: list[int] = []
    for line_no, row in rows:
        image = str(row.get("image") or "").strip()
        if "image" not in row:
            raise InputError(f"line {line_no} of {where} has no 'image' key (it has {sorted(row)})")
        pairs: list[tuple[Any, tuple[str, ...]]]
        if row.get("qa") is not None:
            if not isinstance(row["qa"], list):
                raise InputError(f"line {line_no} of {where}: 'qa' must be a list of [question, answer]")
            pairs = []
            for item in row["qa"]:
                if not (isinstance(item, (list, tuple)) and len(item) == 2):
                    raise InputError(f"line {line_no} of {where}: each 'qa' entry is [question, answer]")
                pairs.append((item[0], _answers_of({"answer": item[1]}, line_no, where)))
        elif "question" in row:
            pairs = [(row.get("question"), _answers_of(row, line_no, where))]
        else:
            raise InputError(
                f"line {line_no} of {where} has no 'question' (or 'qa') key (it has {sorted(row)})"
            )
        image_path = Path(image) if Path(image).is_absolute() else base / image
        for question, answers in pairs:
            question = " ".join(str(question or "").split())
            if not image or not question or not answers:
                bad.append(line_no)
                continue
            records.append(VQARecord(str(image_path), question, answers))
    if bad:
        skipped.add(f"{len(bad)} questions with no image, question or answer", f"lines {bad[:5]}", len(bad))
    if not records:
        raise InputError(f"{where} lists no usable questions")
    return records


class VQAData(Dataset):
    """VQA records whose images are decoded on access: {"image", "question", "answers", "key"}.

    An unreadable image is skipped (counted in `skipped`) for the next readable record, as for CLIP pairs.
    """

    max_retries = 16

    def __init__(self, records: list[VQARecord], source: str, skipped: SkipStats | None = None) -> None:
        if not records:
            raise InputError(f"{source}: no questions")
        self.records = records
        self.source = source
        self.skipped = skipped if skipped is not None else SkipStats(f"VQAData({source})")

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> VQAData:
        """The questions of a VQA manifest (`read_vqa_manifest`)."""
        skipped = SkipStats(f"VQAData({path})")
        return cls(read_vqa_manifest(path, skipped=skipped), str(path), skipped)

    def __len__(self) -> int:
        """Number of questions."""
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        """One question with its decoded image; ImageError when the image is unreadable."""
        rec = self.records[index]
        return {
            "image": load_image(rec.image),
            "question": rec.question,
            "answers": rec.answers,
            "key": rec.image,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One question with its decoded image, or the next readable one."""
        n = len(self.records)
        last: Exception | None = None
        for step in range(min(self.max_retries, n)):
            i = (index + step) % n
            rec = self.records[i]
            try:
                image = load_image(rec.image)
            except (ImageError, OSError, ValueError) as err:
                self.skipped.add(rec.image, str(err))
                last = err
                continue
            return {"image": image, "question": rec.question, "answers": rec.answers, "key": rec.image}
        raise ImageError(
            f"{self.max_retries} images in a row from {self.source} could not be read (last: {last})"
        )

    def __repr__(self) -> str:
        """Class, source and size."""
        return f"VQAData({self.source!r}, n={len(self)})"
