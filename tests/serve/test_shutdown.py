"""Graceful shutdown of a real server: requests already queued finish, then the batchers stop."""

from __future__ import annotations

import threading
import time

import httpx

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import live_server


def test_shutdown_drains_queued_requests(pipeline: duomo.Pipeline) -> None:
    app = create_app(ServeSettings(use_index=False, max_batch=2, max_wait_ms=0), pipeline=pipeline)
    gate = threading.Event()
    statuses: list[int] = []
    with live_server(app) as url:
        service = app.state.duomo.model
        real = service.text.fn

        def held(texts: list[str]) -> list:
            gate.wait(10)
            return real(texts)

        service.text.fn = held

        def post(i: int) -> None:
            r = httpx.post(f"{url}/v1/embeddings", json={"input": f"text {i}"}, timeout=30)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10

        def waiting() -> int:  # items held in the running batch plus items queued
            return len(service.text._inflight) + service.text.depth

        while waiting() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting() == 5 and service.text.depth >= 3
        app.state.uvicorn_server.should_exit = True  # like Ctrl-C: stop accepting, finish what is open
        time.sleep(0.2)
        gate.set()
        for t in threads:
            t.join(30)
    assert statuses == [200] * 5
    assert not service.text.running and not service.image.running
