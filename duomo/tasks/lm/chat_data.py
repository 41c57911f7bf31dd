"""Conversations -> model inputs: the chat template rendered turn by turn, image placeholders expanded to the
model's image-token runs, and labels on the assistant's tokens only (the rest is -100)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from duomo.data.conversations import IMAGE_PLACEHOLDER
from duomo.data.tokenizers.lm import LMTokenizer
from duomo.errors import InputError

IGNORE = -100


def encode_text(tokenizer: LMTokenizer, text: str, image_token_id: int, tokens_per_image: int) -> list[int]:
    """Ids of `text` with each "<image>" replaced by `tokens_per_image` placeholder ids."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids += [image_token_id] * tokens_per_image
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def encode_conversation(
    tokenizer: LMTokenizer,
    messages: Sequence[dict[str, str]],
    image_token_id: int,
    tokens_per_image: int,
    system: str | None = None,
    generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation; labels are the ids of assistant replies (and their end-of-turn
    marker), -100 elsewhere. With `generation_prompt`, the assistant header is appended (for decoding)."""
    messages = list(messages)
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"unknown role {m.get('role')!r}; use system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise InputError("every message needs text content")
    ids: list[int] = []
    labels: list[int] = []
    done = ""

    def add(text: str, learn: bool) -> None:
        piece = encode_text(tokenizer, text, image_token_id, tokens_per_image)
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))

    def render(upto: int, prompt: bool) -> str:
        text = tokenizer.render(messages[:upto], add_generation_prompt=prompt) if upto else ""
        if not text.startswith(done):
            raise InputError(
                "this chat template does not render conversations turn by turn; cannot train on it"
            )
        return text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = render(i, True)
            add(head[len(done) :], False)
            done = head
            full = render(i + 1, False)
            add(full[len(done) :], True)
        else:
            full = render(i + 1, False)
            add(full[len(done) :], False)
        done = full
    if generation_prompt:
        head = render(len(messages), True)
        add(head[len(done) :], False)
    return ids, labels


def collate_conversations(
    tokenizer: LMTokenizer,
    image_transform: Callable[[Any], torch.Tensor],
    image_token_id: int,
    tokens_per_image: int,
    system: str | None,
    max_length: int,
    pad_id: int,
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A DataLoader collate: samples {"images": [PIL], "messages": [...]} -> ids, labels, mask (right-padded),
    images [N, 3, H, W] in order. Samples whose image failed to load or that are longer than `max_length` are
    dropped (the batch shrinks)."""

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, images = [], []
        for s in samples:
            if "error" in s:
                continue
            ids, labels = encode_conversation(
                tokenizer, s["messages"], image_token_id, tokens_per_image, system
            )
            if len(ids) > max_length or all(x == IGNORE for x in labels):
                continue
            rows.append((ids, labels))
            images += [image_transform(im) for im in s["images"]]
        if not rows:
            raise InputError("a batch held no usable conversation (all images failed or all too long)")
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a)], labels[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), True
        batch = {"ids": ids, "labels": labels, "mask": mask}
        batch["images"] = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
        return batch

    return collate
