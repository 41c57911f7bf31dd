"""The dynamic batcher on its own: merging, routing, isolation of bad items, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from duomo.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError


class Recorder:
    """A batch function that squares numbers, records batch sizes and threads, and fails on negatives."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [i * i for i in items]


def run(coro):  # noqa: ANN001, ANN201 - tiny test helper
    return asyncio.run(coro)


def test_concurrent_submits_merge_into_fewer_calls_and_results_match_unbatched() -> None:
    fn = Recorder(delay=0.01)

    async def main() -> list[int]:
        b = DynamicBatcher(fn, max_batch=16, max_wait_ms=20, max_queue=100)
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(40)))
        await b.close()
        return out

    out = run(main())
    assert out == [i * i for i in range(40)]  # each caller gets its own result, in its own order
    assert len(fn.batches) < 40 / 4  # merged: far fewer calls than requests
    assert max(len(b) for b in fn.batches) <= 16  # never above max_batch
    assert sorted(x for b in fn.batches for x in b) == list(range(40))


def test_model_runs_off_the_event_loop_thread() -> None:
    fn = Recorder(delay=0.05)

    async def main() -> float:
        b = DynamicBatcher(fn, max_batch=4, max_wait_ms=0)
        await b.start()
        task = asyncio.ensure_future(b.submit(3))
        # while the batch sleeps in the worker, the loop keeps running other coroutines
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.005)
            ticks += 1
        await b.close()
        return ticks

    assert run(main()) >= 3
    assert fn.threads and threading.main_thread().name not in fn.threads


def test_max_wait_bounds_latency_of_a_lone_request() -> None:
    fn = Recorder()

    async def main() -> float:
        b = DynamicBatcher(fn, max_batch=64, max_wait_ms=30)
        await b.start()
        t = time.perf_counter()
        assert await b.submit(2) == 4
        elapsed = time.perf_counter() - t
        await b.close()
        return elapsed

    elapsed = run(main())
    assert 0.02 <= elapsed < 1.0  # waited for company, but not for a full batch


def test_a_full_batch_runs_without_waiting() -> None:
    fn = Recorder()

    async def main() -> float:
        b = DynamicBatcher(fn, max_batch=8, max_wait_ms=5000)
        await b.start()
        t = time.perf_counter()
        await b.submit_many(list(range(8)))
        elapsed = time.perf_counter() - t
        await b.close()
        return elapsed

    assert run(main()) < 2.0
    assert fn.batches == [list(range(8))]


def test_one_bad_item_does_not_poison_the_batch() -> None:
    fn = Recorder(delay=0.01)

    async def main() -> list:
        b = DynamicBatcher(fn, max_batch=8, max_wait_ms=30)
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in (1, 2, -3, 4)), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert out[0] == 1 and out[1] == 4 and out[3] == 16
    assert isinstance(out[2], ValueError)
    assert [1, 2, -3, 4] in fn.batches  # it was batched, then retried item by item


def test_queue_full_raises_with_retry_after_and_never_grows_past_the_bound() -> None:
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        b = DynamicBatcher(slow, max_batch=2, max_wait_ms=0, max_queue=4)
        await b.start()
        first = asyncio.ensure_future(b.submit_many([0, 1]))  # taken by the worker, which blocks
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit_many([2, 3, 4, 5]))  # fills the queue exactly
        await asyncio.sleep(0.01)
        assert b.depth == 4
        with pytest.raises(QueueFullError) as info:
            await b.submit(6)
        assert info.value.status_code == 429 and info.value.retry_after >= 1
        assert b.depth == 4
        gate.set()
        assert await first == [0, 1]
        assert await queued == [2, 3, 4, 5]
        assert await b.submit(7) == 7  # room again once drained
        await b.close()

    run(main())


def test_close_drains_pending_work_then_refuses_new_work() -> None:
    fn = Recorder(delay=0.02)

    async def main() -> None:
        b = DynamicBatcher(fn, max_batch=2, max_wait_ms=0, max_queue=64)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close(drain=True)
        assert [p.result() for p in pending] == [i * i for i in range(6)]
        with pytest.raises(BatcherClosedError):
            await b.submit(1)

    run(main())


def test_close_without_drain_fails_queued_futures() -> None:
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        b = DynamicBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=64)
        await b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close(drain=False, timeout=5))
        await asyncio.sleep(0.01)
        gate.set()
        await closing
        assert await running == 0  # the batch already running still completes
        for q in queued:
            with pytest.raises(BatcherClosedError):
                await q

    run(main())


def test_close_times_out_and_fails_stuck_work() -> None:
    gate = threading.Event()

    def stuck(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        b = DynamicBatcher(stuck, max_batch=1, max_wait_ms=0)
        await b.start()
        running = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        await b.close(drain=True, timeout=0.1)
        with pytest.raises(BatcherClosedError):
            await running
        gate.set()

    run(main())


def test_cancelled_callers_are_skipped() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        gate.wait(5)
        return items

    async def main() -> None:
        b = DynamicBatcher(fn, max_batch=4, max_wait_ms=0)
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(b.submit_many([1, 2]))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        assert await first == 0 and await kept == 3
        await b.close()

    run(main())
    assert seen == [[0], [3]]


def test_a_wrong_number_of_results_is_an_error_for_each_caller() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda items: [], max_batch=4, max_wait_ms=0)
        await b.start()
        with pytest.raises(RuntimeError, match="returned 0 results"):
            await b.submit(1)
        await b.close()

    run(main())


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_queue=0)


def test_submit_before_start_is_refused() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda x: x)
        with pytest.raises(BatcherClosedError):
            await b.submit(1)

    run(main())
