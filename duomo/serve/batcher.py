"""Dynamic batching: concurrent requests merge into one model call, and each caller gets its own result back.

One `DynamicBatcher` per kind of work (texts, images). Callers `await submit(...)` from the event loop; a
collector task takes the first waiting item, waits at most `max_wait_ms` (counted from that item's arrival)
for more, up to `max_batch`, and runs the batch function in the model's worker thread, so the event loop never
blocks on torch.
While a batch runs, new items queue up and form the next batch: the busier the server, the bigger the batches.

The queue is bounded (`max_queue` items): a submit that does not fit raises `QueueFullError` (HTTP 429 with
Retry-After) instead of growing memory. `close()` stops intake and drains or fails what is still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from duomo.errors import DuomoError

log = logging.getLogger("duomo.serve")

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(DuomoError):
    """The batcher's queue has no room for the request: retry after `retry_after` seconds."""

    status_code = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosedError(DuomoError):
    """The server is shutting down and takes no new work."""

    status_code = 503


class BatchObserver(Protocol):
    """What a batcher reports to (metrics): queue depth, batch sizes, forward times, rejections."""

    def queue_depth(self, queue: str, depth: int) -> None: ...

    def batch(self, queue: str, size: int, seconds: float) -> None: ...

    def rejected(self, queue: str) -> None: ...


@dataclass
class _Item(Generic[T]):
    value: T
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


def model_executor() -> ThreadPoolExecutor:
    """The single worker thread every batcher of one model shares: the model runs one batch at a time."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="duomo-model")


class DynamicBatcher(Generic[T, R]):
    """Merges concurrent `submit` calls into bounded calls of `fn(list_of_items) -> list_of_results`."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        name: str = "batch",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        """`fn` runs in `executor` (default: a private worker thread) on lists of at most `max_batch`."""
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._own_executor = executor is None
        self._executor = executor or model_executor()
        self._observer = observer
        self._queue: deque[_Item[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._idle = False  # the collector waits for a first item (only then must a submit wake it)
        self._inflight: list[_Item[T]] = []
        self.forward_calls = 0  # number of times fn ran (batches, plus per-item retries)

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether the collector task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the collector task on the running event loop (idempotent)."""
        if self.running:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"duomo-batcher-{self.name}")

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result; raises QueueFullError / BatcherClosedError / fn's error."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue several items at once (all or none) and wait for all results, in order."""
        if self._closing or not self.running:
            raise BatcherClosedError("the server is shutting down and takes no new requests; retry elsewhere")
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            if self._observer:
                self._observer.rejected(self.name)
            raise QueueFullError(
                f"the {self.name} queue is full ({len(self._queue)} of {self.max_queue} items waiting); "
                "retry after a moment",
                retry_after=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        queued = [_Item(value, loop.create_future()) for value in items]
        self._queue.extend(queued)
        self._report_depth()
        assert self._wakeup is not None
        # wake the collector only if it waits for a first item or the batch is full; else its deadline will
        if self._idle or len(self._queue) >= self.max_batch:
            self._wakeup.set()
        try:
            return list(await asyncio.gather(*(q.future for q in queued)))
        except BaseException:
            for q in queued:  # a caller that gave up (error, cancellation): its other items need not run
                q.future.cancel()
            raise

    def _retry_after(self) -> int:
        """Seconds a rejected client should wait: about the time to clear the queue, at least 1."""
        return max(1, min(30, round(len(self._queue) / max(self.max_batch, 1) * 0.05 + 0.5)))

    def _report_depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(self.name, len(self._queue))

    async def _run(self) -> None:
        """Collector loop: form a batch, run it in the worker thread, route results; until closed, empty."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                self._idle = True
                await self._wakeup.wait()
                self._idle = False
                continue
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            self._inflight = batch
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [b.value for b in batch]
                )
            except Exception as exc:  # the executor failed (e.g. shut down): fail this batch, go on
                results = [(False, exc)] * len(batch)
            self._inflight = []  # not on cancellation: close() must still fail these
            if self._observer:
                self._observer.batch(self.name, len(batch), time.perf_counter() - started)
            for item, (ok, value) in zip(batch, results, strict=True):
                if item.future.done():  # cancelled by its caller meanwhile
                    continue
                if ok:
                    item.future.set_result(value)
                else:
                    item.future.set_exception(value)

    async def _collect(self) -> list[_Item[T]]:
        """Take up to max_batch live items, waiting until the oldest has waited max_wait for company."""
        assert self._wakeup is not None
        deadline = self._queue[0].arrived + self.max_wait
        while len(self._queue) < self.max_batch and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        batch: list[_Item[T]] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if not item.future.done():  # skip items whose callers were cancelled
                batch.append(item)
        self._report_depth()
        return batch

    def _run_batch(self, values: list[T]) -> list[tuple[bool, Any]]:
        """Worker thread: run fn on the batch; if it fails, run each item alone so a bad item fails alone."""
        try:
            self.forward_calls += 1
            out = list(self.fn(values))
            if len(out) != len(values):
                raise RuntimeError(f"batch function returned {len(out)} results for {len(values)} items")
            return [(True, r) for r in out]
        except Exception as batch_error:
            if len(values) == 1:
                return [(False, batch_error)]
        results: list[tuple[bool, Any]] = []
        for value in values:
            try:
                self.forward_calls += 1
                results.append((True, self.fn([value])[0]))
            except Exception as item_error:
                results.append((False, item_error))
        return results

    async def close(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop taking work; finish what is queued (drain) within `timeout` s, then fail whatever is left."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            if not drain:
                self._fail_pending(include_running=False)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning(
                    "batcher %s: %d items not done after %.1f s; failing them", self.name, self.depth, timeout
                )
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._fail_pending()
        if self._own_executor:
            self._executor.shutdown(wait=False)

    def _fail_pending(self, include_running: bool = True) -> None:
        stranded: list[_Item[T]] = []
        if include_running:
            stranded, self._inflight = self._inflight, []
        while self._queue:
            stranded.append(self._queue.popleft())
        for item in stranded:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the server shut down before this request ran"))
        self._report_depth()
