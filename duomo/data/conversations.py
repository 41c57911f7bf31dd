"""Conversations about images, in LLaVA's JSON format, and the shapes world written in it.

    [{"id": "0", "image": "images/0.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the star?"},
                        {"from": "gpt", "value": "purple"}, ...]}, ...]

`image` may also be a list (several images; one "<image>" placeholder each, anywhere in the human turns) or
absent (a text-only conversation). Roles: human/user, gpt/assistant, system. Rows that break these rules are
skipped and counted, never half-read.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from duomo.data.images import load_image
from duomo.data.pairs import SkipStats
from duomo.errors import ImageError, InputError

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    """Images (paths) and turns [(role, text)], roles spelled as chat templates spell them."""

    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": text} for role, text in self.turns]


def check_turns(turns: list[tuple[str, str]], n_images: int, where: str = "the conversation") -> None:
    """Roles known, an assistant turn to learn from, one placeholder per image (and none elsewhere)."""
    if not turns:
        raise InputError(f"{where} has no messages")
    if not any(role == "assistant" for role, _ in turns):
        raise InputError(f"{where} has no assistant turn")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role != "user"):
        raise InputError(f"{where}: image placeholders belong in user turns")
    if placeholders != n_images:
        raise InputError(
            f"{where} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) and {n_images} image(s); "
            "each image needs exactly one placeholder"
        )


def parse_row(row: Any, root: Path, where: str) -> Conversation:
    """One LLaVA record -> Conversation (image paths resolved against `root`)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: a record must be an object")
    images = row.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise InputError(f"{where}: image must be a path or a list of paths")
    turns_in = row.get("conversations")
    if not isinstance(turns_in, list):
        raise InputError(f"{where}: conversations must be a list")
    turns = []
    for turn in turns_in:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InputError(f"{where}: each turn needs a string value")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise InputError(f"{where}: unknown role {turn.get('from')!r}; use human, gpt or system")
        turns.append((role, turn["value"]))
    check_turns(turns, len(images), where)
    return Conversation(tuple(str(root / i) for i in images), tuple(turns))


def read_conversations(path: str | os.PathLike, stats: SkipStats | None = None) -> list[Conversation]:
    """A LLaVA JSON file (a list) or JSONL file (one record per line); bad records skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such conversation file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON{'L' if path.suffix != '.json' else ''}: {exc}") from exc
    if not isinstance(rows, list):
        raise InputError(f"{path} must hold a JSON list of conversations")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(parse_row(row, path.parent, f"record {i} of {path}"))
        except InputError as exc:
            if stats is not None:
                stats.add("record", str(exc))
    if not out:
        raise InputError(f"{path} holds no usable conversation")
    return out


class ConversationDataset(Dataset):
    """Conversations with their images decoded (RGB PIL); a missing or corrupt image is an ImageError the
    collate step skips."""

    def __init__(self, conversations: list[Conversation]) -> None:
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conv = self.conversations[index]
        try:
            images = [load_image(p) for p in conv.images]
        except ImageError as exc:
            return {"error": str(exc), "key": str(index)}
        return {"images": images, "messages": conv.messages(), "key": str(index)}


# --- the shapes world as conversations ---------------------------------------------------------------------

DESCRIBE = [
    "Describe the picture.",
    "What is in this picture?",
    "Describe the image briefly.",
    "What do you see?",
]


def describe_scene(objects: list[Any]) -> str:
    """One sentence naming every object: size, colour, shape, where."""
    from duomo.data.shapes import POSITION_PHRASES

    parts = [f"a {o['size']} {o['colour']} {o['shape']} {POSITION_PHRASES[o['position']]}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There is {listed}."


def shapes_conversation(
    sample: dict[str, Any], rng: random.Random, max_turns: int = 3, describe_only: bool = False
) -> list[tuple[str, str]]:
    """A conversation about one shapes sample: a description or a first question, then follow-ups."""
    qa = [] if describe_only else list(sample.get("qa") or [])
    rng.shuffle(qa)
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.3 or not qa:
        turns += [("user", rng.choice(DESCRIBE)), ("assistant", describe_scene(list(sample["objects"])))]
    for question, answer in qa[: max(0, max_turns - len(turns) // 2)]:
        turns += [("user", question[:1].upper() + question[1:]), ("assistant", answer)]
    first_role, first_text = turns[0]
    turns[0] = (first_role, f"{IMAGE_PLACEHOLDER}\n{first_text}")
    return turns


class PairConversations(Dataset):
    """Conversations made from an image dataset, on the fly: the shapes world (descriptions, questions and
    follow-ups; `describe_only` for projector alignment) or caption pairs ("describe" -> the caption)."""

    def __init__(
        self, dataset: Dataset, seed: int = 0, describe_only: bool = False, max_turns: int = 3
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.describe_only = describe_only
        self.max_turns = max_turns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        rng = random.Random(f"{self.seed}/{index}")
        if "objects" in sample:
            turns = shapes_conversation(sample, rng, self.max_turns, self.describe_only)
        else:
            turns = [
                ("user", f"{IMAGE_PLACEHOLDER}\n{rng.choice(DESCRIBE)}"),
                ("assistant", str(sample["text"])),
            ]
        messages = [{"role": role, "content": text} for role, text in turns]
        return {"images": [sample["image"]], "messages": messages, "key": str(sample.get("key", index))}
