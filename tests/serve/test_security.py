"""Safety: API keys, body and pixel limits, bad images and bodies, backpressure, error mapping."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomo.errors import DuomoError
from duomo.serve.security import api_keys_from_env, key_matches
from tests.serve.helpers import data_url, png_bytes


def test_api_keys_protect_the_api_but_not_health_or_the_page(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_keys=["k1", "k2"])
    body = {"input": "hello"}
    r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.post("/v1/embeddings", json=body, headers={"Authorization": "Basic azE="}).status_code == 401
    assert c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert c.post("/v1/embeddings", json=body, headers={"Authorization": "bearer k1"}).status_code == 200
    for path in ("/embed", "/classify", "/search"):
        assert c.post(path, json={}).status_code == 401
    assert c.get("/images/x.png").status_code == 401
    assert c.get("/healthz").json()["auth_required"] is True
    assert c.get("/").status_code == 200 and c.get("/metrics").status_code == 200


def test_api_keys_from_env_and_comparison() -> None:
    assert api_keys_from_env({"DUOMO_API_KEYS": " a, ,b ,"}) == ["a", "b"]
    assert api_keys_from_env({}) == []
    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"]) and not key_matches("", ["a"])


def test_body_size_limit_by_content_length(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_body_bytes=4096)
    r = c.post("/v1/embeddings", json={"input": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    files = {"images": ("big.png", b"\0" * 10_000, "image/png")}
    assert c.post("/embed", files=files).status_code == 413


def test_body_size_limit_on_streamed_bodies_without_content_length(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(max_body_bytes=4096)

    def chunks():  # noqa: ANN202 - a generator body is sent chunked, with no Content-Length
        for _ in range(10):
            yield b'{"input": "' + b"x" * 1000

    r = c.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_bad_content_length_is_400(make_client: Callable[..., TestClient]) -> None:
    from duomo.serve.security import BodySizeLimitMiddleware

    sent: list[dict] = []

    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        raise AssertionError("must not be reached")

    async def send(message):  # noqa: ANN001, ANN202
        sent.append(message)

    mw = BodySizeLimitMiddleware(app, 100)
    scope = {"type": "http", "headers": [(b"content-length", b"abc")]}
    asyncio.run(mw(scope, None, send))
    assert sent[0]["status"] == 400


def test_decompression_bomb_is_4xx(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_image_pixels=1_000_000)
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")  # 4 MP of zeros compress to a few KB
    assert len(buf.getvalue()) < 50_000
    r = c.post("/embed", json={"images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]
    r = c.post("/v1/embeddings", json={"input": data_url(buf.getvalue())})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "image",
    [
        base64.b64encode(b"GIF89a this is not really a gif").decode(),
        base64.b64encode(png_bytes()[:60]).decode(),  # truncated PNG
        "not base64 at all!",
        "",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png;base64,",
        "data:image/png,notbase64",
    ],
)
def test_corrupt_or_wrong_images_are_400(client: TestClient, image: str) -> None:
    r = client.post("/embed", json={"images": [image]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]


def test_a_corrupt_upload_fails_only_its_request(client: TestClient) -> None:
    ok = {"images": [base64.b64encode(png_bytes()).decode()]}
    bad = {"images": [base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()]}
    results: dict[str, int] = {}

    def post(name: str, body: dict) -> None:
        results[name] = client.post("/embed", json=body).status_code

    threads = [
        threading.Thread(target=post, args=(f"{k}{i}", b))
        for i in range(3)
        for k, b in (("ok", ok), ("bad", bad))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == 200 for k, v in results.items() if k.startswith("ok"))
    assert all(v == 400 for k, v in results.items() if k.startswith("bad"))


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"texts=a", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
        ({"json": {"texts": ["a"], "extra": 1}}, 400),
        ({"json": {"texts": "not a list"}}, 400),
        ({"json": {"texts": [1, 2]}}, 400),
        ({"json": {}}, 400),
    ],
)
def test_malformed_bodies_are_clear_4xx(client: TestClient, kwargs: dict, status: int) -> None:
    r = client.post("/embed", **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type"}


def test_malformed_json_on_the_openai_endpoint(client: TestClient) -> None:
    r = client.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_queue=2, max_batch=1, max_wait_ms=0)
    service = c.app.state.duomo.model
    gate = threading.Event()
    real = service.text.fn

    def blocked(texts: list[str]) -> list:
        gate.wait(10)
        return real(texts)

    service.text.fn = blocked
    statuses: list[int] = []

    def post() -> None:
        statuses.append(c.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code)

    first = threading.Thread(target=post)
    first.start()  # its first item runs (blocked); the second waits in the queue
    for _ in range(200):
        if service.text.depth >= 1:
            break
        threading.Event().wait(0.01)
    r = c.post("/v1/embeddings", json={"input": ["c", "d"]})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    gate.set()
    first.join(20)
    assert statuses == [200]
    assert 'duomo_queue_rejected_total{queue="text"} 1' in c.get("/metrics").text


def test_duomo_errors_map_to_their_status(client: TestClient) -> None:
    class Teapot(DuomoError):
        status_code = 418

    service = client.app.state.duomo.model

    async def boom(texts):  # noqa: ANN001, ANN202
        raise Teapot("short and stout")

    service.embed_texts = boom
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 418 and r.json()["error"]["message"] == "short and stout"


def test_unexpected_errors_are_500_json_without_details(make_client: Callable[..., TestClient]) -> None:
    from duomo.serve import ServeSettings, create_app

    c = make_client()
    app = create_app(ServeSettings(use_index=False), pipeline=c.app.state.duomo.model.pipeline)
    with TestClient(app, raise_server_exceptions=False) as tc:
        service = app.state.duomo.model

        async def crash(texts):  # noqa: ANN001, ANN202
            raise RuntimeError("secret internals")

        service.embed_texts = crash
        r = tc.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"


def test_image_decoding_is_bounded() -> None:
    from duomo.serve.batcher import QueueFullError
    from duomo.serve.service import DecodeLimiter

    gate = threading.Event()
    active: list[int] = []
    peak: list[int] = []

    def work() -> int:
        active.append(1)
        peak.append(len(active))
        gate.wait(5)
        active.pop()
        return 1

    async def main() -> None:
        limiter = DecodeLimiter(slots=2, max_waiting=3)
        tasks = [asyncio.ensure_future(limiter.run(work)) for _ in range(3)]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFullError):
            await limiter.run(work)
        gate.set()
        assert await asyncio.gather(*tasks) == [1, 1, 1]

    asyncio.run(main())
    assert max(peak) == 2
