"""The HTTP endpoints through FastAPI's TestClient: shapes, values and the OpenAI response format."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import duomo
from tests.serve.helpers import COLORS, data_url, png_bytes


def test_embeddings_match_the_python_api(client: TestClient, pipeline: duomo.Pipeline) -> None:
    texts = ["a red circle", "a photo of a dog", "z"]
    r = client.post("/v1/embeddings", json={"input": texts, "model": pipeline.name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == pipeline.name
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    want = pipeline.encode_text(texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 6


def test_embeddings_single_string_base64_and_dimensions(client: TestClient, pipeline: duomo.Pipeline) -> None:
    r = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64", "dimensions": 16})
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (16,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    full = pipeline.encode_text(["hello"])[0, :16].numpy()
    np.testing.assert_allclose(vec, full / np.linalg.norm(full), atol=1e-5)


def test_embeddings_of_images_as_data_urls(client: TestClient, pipeline: duomo.Pipeline) -> None:
    img = png_bytes(COLORS["blue"])
    r = client.post("/v1/embeddings", json={"input": ["a blue circle", data_url(img)], "model": "default"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    np.testing.assert_allclose(data[1]["embedding"], pipeline.encode_image([img])[0].numpy(), atol=1e-5)
    want_text = pipeline.encode_text(["a blue circle"])[0].numpy()
    np.testing.assert_allclose(data[0]["embedding"], want_text, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"input": [], "model": "default"}, 400, "no inputs"),
        ({"input": ["ok", ""]}, 400, "input[1] is empty"),
        ({"input": [1, 2, 3]}, 400, "token-id inputs"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "not served"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"input": "x", "dimensions": 100000}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": "default"}, 400, "input"),
        ({"input": "data:image/png;base64,AAAA"}, 400, "not a recognised image"),
        ({"input": "data:image/png;base64,@@@"}, 400, "image"),
    ],
)
def test_embeddings_errors_are_clear_4xx(client: TestClient, body: dict, status: int, fragment: str) -> None:
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_too_many_and_too_long_texts(make_client) -> None:  # noqa: ANN001
    c = make_client(max_inputs=4, max_text_chars=50)
    r = c.post("/v1/embeddings", json={"input": ["a"] * 5})
    assert r.status_code == 400 and "limit is 4" in r.json()["error"]["message"]
    r = c.post("/v1/embeddings", json={"input": "a" * 51})
    assert r.status_code == 400 and "51 characters" in r.json()["error"]["message"]
    r = c.post("/embed", json={"texts": ["a"] * 3, "images": [base64.b64encode(png_bytes()).decode()] * 2})
    assert r.status_code == 400


def test_embed_json_texts_and_base64_images(client: TestClient, pipeline: duomo.Pipeline) -> None:
    img = png_bytes(COLORS["green"], shape="square")
    payload = {"texts": ["a green square"], "images": [base64.b64encode(img).decode(), data_url(img)]}
    r = client.post("/embed", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == pipeline.embed_dim and body["model"] == pipeline.name
    assert len(body["text_embeddings"]) == 1 and len(body["image_embeddings"]) == 2
    np.testing.assert_allclose(body["image_embeddings"][0], body["image_embeddings"][1], atol=1e-6)
    want = pipeline.encode_image([img])[0].numpy()
    np.testing.assert_allclose(body["image_embeddings"][0], want, atol=1e-5)


def test_embed_multipart_files(client: TestClient, pipeline: duomo.Pipeline) -> None:
    red, blue = png_bytes(COLORS["red"]), png_bytes(COLORS["blue"])
    files = [("images", ("red.png", red, "image/png")), ("images", ("blue.png", blue, "image/png"))]
    r = client.post("/embed", data={"texts": ["one", "two"]}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["text_embeddings"]) == 2
    want = pipeline.encode_image([red, blue]).numpy()
    np.testing.assert_allclose(np.array(body["image_embeddings"]), want, atol=1e-5)


def test_embed_never_reads_server_files(client: TestClient, tmp_path) -> None:  # noqa: ANN001
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    r = client.post("/embed", json={"images": [str(secret)]})
    assert r.status_code == 400  # a plain string is base64, never a path


def test_classify_json_and_multipart(client: TestClient, pipeline: duomo.Pipeline) -> None:
    img = png_bytes(COLORS["yellow"])
    labels = ["cat", "dog", "yellow circle"]
    r = client.post("/classify", json={"image": data_url(img), "labels": labels})
    assert r.status_code == 200, r.text
    ranked = r.json()["labels"]
    probs = [x["probability"] for x in ranked]
    assert sorted(x["label"] for x in ranked) == sorted(labels)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    want = pipeline.zero_shot_probs([img], labels)[0]
    got = {x["label"]: x["probability"] for x in ranked}
    for i, label in enumerate(labels):
        assert got[label] == pytest.approx(float(want[i]), abs=1e-4)
    r = client.post(
        "/classify", data={"labels": "cat, dog, yellow circle", "top_k": "2"}, files={"image": ("y.png", img)}
    )
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["labels"]] == [x["label"] for x in ranked[:2]]


def test_classify_errors(client: TestClient) -> None:
    img = data_url(png_bytes())
    assert client.post("/classify", json={"image": img, "labels": []}).status_code == 400
    assert client.post("/classify", json={"labels": ["a"]}).status_code == 400
    r = client.post("/classify", json={"image": img, "labels": ["a"], "templates": ["no placeholder"]})
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]


def test_label_cache_is_used_and_bounded(client: TestClient) -> None:
    service = client.app.state.duomo.model
    img = data_url(png_bytes())
    client.post("/classify", json={"image": img, "labels": ["a", "b"]})
    calls = service.text.forward_calls
    client.post("/classify", json={"image": img, "labels": ["b", "a"]})
    assert service.text.forward_calls == calls  # labels came from the cache


def test_healthz_and_metrics(client: TestClient) -> None:
    client.post("/v1/embeddings", json={"input": ["a", "b"]})
    client.post("/v1/embeddings", json={"input": []})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queues"]["text"]["running"]
    assert health["index"]["ready"] is False
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'duomo_requests_total{endpoint="/v1/embeddings",method="POST",status="200"} 1' in text
    assert 'duomo_requests_total{endpoint="/v1/embeddings",method="POST",status="400"} 1' in text
    assert 'duomo_batch_size_bucket{queue="text",le="2"}' in text
    assert 'duomo_queue_depth{queue="text"} 0' in text
    assert "duomo_request_duration_seconds_count" in text


def test_search_without_index_is_503_with_reason(client: TestClient) -> None:
    r = client.get("/search", params={"q": "cat"})
    assert r.status_code == 503 and "index" in r.json()["error"]["message"]
    assert r.headers.get("retry-after")
    assert client.get("/images/anything.png").status_code == 404


def test_web_page_and_static_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/static/app.js">' in r.text and "http" not in r.text.split("<body>")[0]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_openapi_schema_lists_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/embeddings", "/embed", "/classify", "/search", "/images/{ref}", "/healthz", "/metrics"):
        assert p in paths


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/embeddings")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_batching_happens_inside_the_app(make_client) -> None:  # noqa: ANN001
    import concurrent.futures

    c = make_client(max_batch=32, max_wait_ms=50)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: c.post("/v1/embeddings", json={"input": f"text {i}"}), range(16)))
    assert all(r.status_code == 200 for r in rs)
    assert c.app.state.duomo.model.text.forward_calls < 16
    assert torch.get_num_threads() >= 1
