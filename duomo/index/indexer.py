"""The indexer's write side: embed prepared files in batches and commit each batch in one transaction.

A batch transaction stores the new vectors and every file row that points at them (including files whose
content turned out to be a duplicate), so a killed run leaves whole batches behind and nothing half-done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from duomo.index.prepare import Prepared
from duomo.index.store import Store

MAX_REPORTED_FAILURES = 1000  # the report lists this many; the database records all of them
Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class IndexReport:
    """What one `ImageIndex.update` did."""

    added: int = 0  # new files now searchable (including reused ones)
    updated: int = 0  # changed files re-indexed (including reused ones)
    removed: int = 0  # files gone from disk, dropped from the index
    reused: int = 0  # added/updated files whose content already had a vector: no model call
    failed: int = 0  # files that could not be read or decoded this run (recorded, skipped until they change)
    seconds: float = 0.0
    embedded: int = 0  # images that went through the model
    unchanged: int = 0  # files skipped because size and mtime are as indexed
    total: int = 0  # searchable files in the index afterwards
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) for this run's failures
    layout: str = ""  # how model calls were spread over the cores (duomo.tasks.layout), when any were made


class BatchWriter:
    """Collects prepared files, embeds owners in batches, and commits rows batch by batch."""

    def __init__(
        self,
        store: Store,
        lock: threading.RLock,
        embed: Embed,
        batch_size: int,
        stored_hashes: set[str],
        previously_indexed: set[str],
        report: IndexReport,
    ) -> None:
        """Write through `store` (under `lock`); `stored_hashes` are contents that already have vectors."""
        self.store, self.lock, self.embed, self.batch_size = store, lock, embed, max(1, batch_size)
        self.stored = stored_hashes
        self.previously_indexed = previously_indexed
        self.report = report
        self.to_embed: list[Prepared] = []
        self.to_link: list[Prepared] = []  # reuse a stored vector
        self.to_fail: list[tuple[Prepared, str]] = []
        self.waiting: dict[str, list[Prepared]] = {}  # duplicates of content still being embedded
        self.failed_hashes: dict[str, str] = {}

    def add(self, item: Prepared) -> None:
        """Route one prepared file; commits a batch when enough work has piled up."""
        if item.error is not None:
            self.to_fail.append((item, item.error))
            if item.owner and item.hash is not None:
                self.failed_hashes[item.hash] = item.error
                self.to_fail += [(dup, item.error) for dup in self.waiting.pop(item.hash, [])]
        elif item.pixels is not None:
            self.to_embed.append(item)
        elif item.hash in self.stored:
            self.to_link.append(item)
        elif item.hash in self.failed_hashes:
            self.to_fail.append((item, self.failed_hashes[item.hash]))
        else:
            self.waiting.setdefault(item.hash or "", []).append(item)
        if (
            len(self.to_embed) >= self.batch_size
            or len(self.to_link) + len(self.to_fail) >= 8 * self.batch_size
        ):
            self.flush()

    def finish(self) -> None:
        """Commit whatever is left."""
        for (
            items
        ) in self.waiting.values():  # cannot happen (every hash has an owner); never lose a file silently
            self.to_fail += [
                (item, "internal error: its content was never embedded; re-run") for item in items
            ]
        self.waiting.clear()
        self.flush()

    def flush(self) -> None:
        """Embed pending owners; commit them, their duplicates, reuses and failures in one transaction."""
        owners, self.to_embed = self.to_embed, []
        linked, self.to_link = self.to_link, []
        failed, self.to_fail = self.to_fail, []
        if not (owners or linked or failed):
            return
        vectors = np.zeros((0, 0), np.float32)
        if owners:
            pixels = torch.stack([item.pixels for item in owners])
            vectors = np.ascontiguousarray(self.embed(pixels).float().numpy(), dtype=np.float32)
            for item in owners:
                item.pixels = None  # free memory early
        duplicates = [dup for item in owners for dup in self.waiting.pop(item.hash or "", [])]
        ok = owners + duplicates + linked
        with self.lock, self.store.write():
            self.store.insert_vectors(
                (item.hash, vec.tobytes()) for item, vec in zip(owners, vectors, strict=True)
            )
            self.store.upsert_ok([(i.path, i.size, i.mtime_ns, i.hash) for i in ok])
            self.store.upsert_failed([(i.path, i.size, i.mtime_ns, i.hash, err) for i, err in failed])
            self.store.bump_generation()
        self.stored.update(item.hash for item in owners if item.hash)
        self._count(owners, duplicates + linked, failed)

    def _count(
        self, owners: list[Prepared], reused: list[Prepared], failed: list[tuple[Prepared, str]]
    ) -> None:
        report = self.report
        for item in owners + reused:
            if item.path in self.previously_indexed:
                report.updated += 1
            else:
                report.added += 1
        report.embedded += len(owners)
        report.reused += len(reused)
        report.failed += len(failed)
        room = max(0, MAX_REPORTED_FAILURES - len(report.failures))
        report.failures += [(item.path, err) for item, err in failed[:room]]
