"""Resumable, distributed batches of image-text pairs for the trainer.

A loader factory `make(epoch, start)` returns the batches of `epoch` from micro-batch `start` on. The order
is a function of (seed, epoch) only (a `DistributedSampler`, one shard per rank), and every random choice made
for a sample (augmentation crops, generated hard negatives) is seeded by (seed, epoch, index), not by the
process's global RNG. So a resumed run sees exactly the batches the uninterrupted run would have seen, with
any number of loader workers.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from duomo.errors import InputError

Batch = dict[str, Any]
LoaderFactory = Callable[[int, int], Iterable[Batch]]

# Words that can replace each other to make a caption false but fluent ("a red circle" -> "a blue circle").
SWAP_GROUPS: list[tuple[str, ...]] = [
    ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "black", "white", "gray", "brown"),
    ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond"),
    ("small", "large"),
    ("left", "right"),
    ("top", "bottom"),
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
]
_WORD = re.compile(r"[A-Za-z0-9]+")


def sample_seed(seed: int, epoch: int, index: int | str) -> int:
    """A 63-bit seed for one sample of one epoch, independent of workers, ranks and resumption."""
    return random.Random(f"duomo-train/{seed}/{epoch}/{index}").getrandbits(63)


Bigrams = frozenset[tuple[str, str]]


def caption_bigrams(texts: Iterable[str]) -> Bigrams:
    """Adjacent lower-cased word pairs of captions, with "^" and "$" marking the start and the end."""
    pairs: set[tuple[str, str]] = set()
    for text in texts:
        words = ["^", *(w.lower() for w in _WORD.findall(text)), "$"]
        pairs.update(zip(words, words[1:], strict=False))
    return frozenset(pairs)


def _fits(words: list[re.Match], i: int, new: str, seen: Bigrams) -> bool:
    """Whether `new` in place of word i makes only word pairs that occur in `seen`."""
    left = words[i - 1].group().lower() if i > 0 else "^"
    right = words[i + 1].group().lower() if i + 1 < len(words) else "$"
    return (left, new) in seen and (new, right) in seen


def swap_negative(
    text: str, rng: random.Random, groups: Sequence[Sequence[str]] = SWAP_GROUPS, seen: Bigrams | None = None
) -> str:
    """A hard negative caption: an attribute word replaced by another of its group, else two words swapped.

    With `seen` (the training captions' `caption_bigrams`), a replacement is only made where every word pair
    it creates occurs in some training caption: a negative never names a combination the data has no positive
    for ("purple heart" when no caption has one), which would otherwise teach "this phrase is always false"
    and wreck zero-shot on exactly the unseen combinations (docs/benchmarks.md).
    """
    words = list(_WORD.finditer(text))
    options = []
    for i, m in enumerate(words):
        for group in groups:
            if m.group().lower() in group:
                word = m.group().lower()
                fits = [w for w in group if w != word and (seen is None or _fits(words, i, w, seen))]
                options.extend((m, w) for w in fits)
    if options:
        m, new = rng.choice(options)
        return text[: m.start()] + new + text[m.end() :]
    distinct = {m.group() for m in words}
    if len(distinct) < 2:
        return f"not {text}"
    while True:  # NegCLIP's "swap" negative: the same words in a wrong order
        a, b = rng.sample(words, 2)
        if a.group() != b.group():
            break
    a, b = sorted((a, b), key=lambda m: m.start())
    return text[: a.start()] + b.group() + text[a.end() : b.start()] + a.group() + text[b.end() :]


def hard_negatives(sample: dict, n: int, rng: random.Random, seen: Bigrams | None = None) -> list[str]:
    """`n` negative captions: the sample's own "negatives" if it has them (cycled), else generated swaps."""
    given = sample.get("negatives")
    if given:
        return [given[i % len(given)] for i in range(n)]
    return [swap_negative(sample["text"], rng, seen=seen) for _ in range(n)]


class PreparedPairs(Dataset):
    """Dataset view for one epoch: each sample's image transformed and negatives drawn under its own seed."""

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Any], torch.Tensor],
        seed: int,
        epoch: int,
        n_neg: int = 0,
        seen: Bigrams | None = None,
    ) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch
        self.n_neg, self.seen = n_neg, seen

    def __len__(self) -> int:
        """Number of samples of the underlying dataset."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"pixels", "text", "label"[, "negatives"]} of one sample."""
        sample = self.dataset[index]
        seed = sample_seed(self.seed, self.epoch, index)
        return prepare(sample, self.transform, seed, self.n_neg, self.seen)


def prepare(
    sample: dict, transform: Callable[[Any], torch.Tensor], seed: int, n_neg: int, seen: Bigrams | None = None
) -> dict[str, Any]:
    """Transform one sample under `seed`, leaving the caller's global torch RNG untouched."""
    rng = torch.default_generator  # torch.manual_seed costs ~0.4 ms a call; the generator's own is ~1 us
    state = rng.get_state()
    rng.manual_seed(seed)
    try:
        pixels = transform(sample["image"])
    finally:
        rng.set_state(state)
    out = {"pixels": pixels, "text": sample["text"], "label": sample.get("label")}
    if n_neg:
        out["negatives"] = hard_negatives(sample, n_neg, random.Random(seed), seen)
    return out


class PairCollate:
    """Samples -> {"pixels" [B,3,H,W], "tokens" [B,T], "labels" [B] (-1: none)[, "neg_tokens" [B,n,T]]}."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        """Stack pixels, tokenize captions (and negatives)."""
        batch: Batch = {
            "pixels": torch.stack([it["pixels"] for it in items]),
            "tokens": self.tokenizer([it["text"] for it in items]),
            "labels": torch.tensor([-1 if it["label"] is None else int(it["label"]) for it in items]),
        }
        if "negatives" in items[0]:
            n = len(items[0]["negatives"])
            neg = self.tokenizer([t for it in items for t in it["negatives"]])
            batch["neg_tokens"] = neg.reshape(len(items), n, -1)
        return batch


class SkipBatches(Sampler[list[int]]):
    """A batch sampler that starts `start` batches into another one (resuming mid-epoch)."""

    def __init__(self, batches: BatchSampler, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


class _IterablePrepared(IterableDataset):
    """A streaming dataset's samples prepared under per-key seeds; it splits itself over ranks and workers."""

    def __init__(
        self,
        dataset: IterableDataset,
        transform: Callable,
        seed: int,
        epoch: int,
        n_neg: int,
        seen: Bigrams | None = None,
    ) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch
        self.n_neg, self.seen = n_neg, seen

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, sample in enumerate(self.dataset):
            key = sample.get("key", i)
            seed = sample_seed(self.seed, self.epoch, key)
            yield prepare(sample, self.transform, seed, self.n_neg, self.seen)


def pair_loader_factory(
    dataset: Dataset,
    transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    hard_negatives: int = 0,
    shuffle: bool = True,
    pin_memory: bool = False,
    seen: Bigrams | None = None,
) -> LoaderFactory:
    """`make(epoch, start)`: this rank's batches of `epoch` from batch `start` on (full batches only).

    `seen`: word pairs of the training captions that generated hard negatives must keep to (`swap_negative`).
    """
    collate = PairCollate(tokenizer)

    def make(epoch: int, start: int) -> Iterable[Batch]:
        loader_rng = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))  # keeps global RNG out of it
        common = {
            "num_workers": workers,
            "collate_fn": collate,
            "pin_memory": pin_memory,
            "generator": loader_rng,
            "persistent_workers": False,
        }
        if isinstance(dataset, IterableDataset):
            stream = copy.copy(dataset)  # a fresh pass per epoch, whatever the original has iterated
            if hasattr(stream, "set_epoch"):
                stream.set_epoch(epoch)
            prepared = _IterablePrepared(stream, transform, seed, epoch, hard_negatives, seen)
            loader = DataLoader(prepared, batch_size=batch_size, drop_last=True, **common)
            return itertools.islice(loader, start, None)  # no random access: read and drop what was seen
        if not hasattr(dataset, "__len__"):
            raise InputError("training data must be a map-style dataset (with len) or an IterableDataset")
        prepared = PreparedPairs(dataset, transform, seed, epoch, hard_negatives, seen)
        sampler = DistributedSampler(
            prepared, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        batches = SkipBatches(BatchSampler(sampler, batch_size, drop_last=True), start)
        return DataLoader(prepared, batch_sampler=batches, **common)

    return make


class RowCollate:
    """Per-sample dicts of tensors -> one batch: stacked, with "tokens"/"padding_mask" trimmed to the
    longest text of the batch (padding is True at padding)."""

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        """Stack every key; trim token columns."""
        batch: Batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        if "padding_mask" in batch:
            length = max(1, int((~batch["padding_mask"]).sum(1).max()))
            batch["tokens"] = batch["tokens"][:, :length]
            batch["padding_mask"] = batch["padding_mask"][:, :length]
        return batch


def map_loader_factory(
    dataset: Dataset,
    batch_size: int,
    collate: Callable[[list[Any]], Batch] | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> LoaderFactory:
    """`make(epoch, start)` over a map-style dataset of ready samples: this rank's full batches of `epoch`
    from batch `start` on, each with a "seed" of its own (seed, epoch, rank, batch) for objectives that draw
    random masks, so a resumed run draws exactly what the uninterrupted one did."""
    collate = collate or RowCollate()
    if len(dataset) < batch_size * world_size:
        raise InputError(
            f"{len(dataset)} training samples are fewer than one batch of {batch_size} x {world_size} ranks"
        )

    def make(epoch: int, start: int) -> Iterable[Batch]:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        batches = SkipBatches(BatchSampler(sampler, batch_size, drop_last=True), start)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)
        for i, batch in enumerate(loader, start):
            batch["seed"] = torch.tensor(sample_seed(seed, epoch, f"batch/{rank}/{i}"))
            yield batch

    return make
