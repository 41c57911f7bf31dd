"""Outputs of a frozen tower computed once per distinct input, as the LiT paper precomputes its frozen side.

A LiT text tower (`duomo.models.clip.minilm.MiniLMTextTower` with a locked encoder) turns the same caption
into the same sentence embedding every time it sees it; captions repeat across epochs and within the built-in
worlds. `cache_frozen_features(model)` wraps each such tower's frozen feature function so a batch computes
only the rows not seen before and reads the others from memory. When the data can list its captions, they are
all computed up front in a fixed order (`prefill`); rows met later are computed one at a time. Either way a
row's features never depend on the batch it first came in, so a resumed run sees the same values; they equal
a batched recomputation to float rounding (about 1e-6). A tower opts in by naming the
function (`frozen_features`) and saying when it is frozen (`features_frozen()`); nothing else changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

MAX_ENTRIES = 200_000  # least recently used rows beyond this are dropped (~300 MB of 384-d features)


class FeatureCache:
    """`fn(tokens [B, T]) -> features [B, D]` per distinct row of token ids (padding 0 trimmed), memoised."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_entries: int = MAX_ENTRIES) -> None:
        self.fn = fn
        self.max_entries = max_entries
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        """A row's ids without its trailing padding."""
        real = (row != 0).nonzero()
        return row[: int(real.max()) + 1 if len(real) else 0].numpy().tobytes()

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, batch_size: int = 256) -> None:
        """Compute every distinct row of `tokens` [N, T] up front, in a fixed order and fixed batches (the
        LiT paper's precomputation): the values then depend only on the data, not on the training order."""
        rows = tokens.detach().cpu()
        unique = sorted({self.key(r): i for i, r in enumerate(rows)}.items())
        todo = [i for k, i in unique if k not in self.store][: self.max_entries]
        for start in range(0, len(todo), batch_size):
            index = torch.tensor(todo[start : start + batch_size])
            computed = self.fn(tokens.index_select(0, index.to(tokens.device))).detach()
            for i, value in zip(index.tolist(), computed, strict=True):
                self.store[self.key(rows[i])] = value

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of each row: cached ones read, new ones computed one at a time (batch-independent)."""
        rows = tokens.detach().cpu()
        keys = [self.key(row) for row in rows]
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self.store))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            with torch.no_grad():
                for key in missing:
                    self.store[key] = self.fn(tokens[first[key] : first[key] + 1]).detach()[0]
            while len(self.store) > self.max_entries:
                self.store.popitem(last=False)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key in keys:
            self.store.move_to_end(key)
        return torch.stack([self.store[k] for k in keys]).to(tokens.device)


def cache_frozen_features(model: nn.Module, max_entries: int = MAX_ENTRIES) -> list[FeatureCache]:
    """Wrap every frozen tower's feature function in a `FeatureCache`; returns the caches (empty: none)."""
    caches = []
    for module in model.modules():
        name = getattr(module, "frozen_features", None)
        frozen = getattr(module, "features_frozen", None)
        if name is None or frozen is None or not frozen():
            continue
        cache = FeatureCache(getattr(module, name), max_entries)
        setattr(module, name, cache)  # the instance attribute shadows the method
        caches.append(cache)
    return caches
