"""/search and /images over a real index of generated images, including path-traversal attempts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import duomo
from duomo.serve.search import image_id
from tests.serve.helpers import COLORS, data_url, png_bytes


@pytest.fixture
def indexed(make_client: Callable[..., TestClient], image_index: tuple[Path, Path]) -> TestClient:
    """A client whose app serves the session's generated index."""
    index_dir, _ = image_index
    return make_client(use_index=True, index_dir=index_dir)


def test_text_search_returns_ranked_hits_with_fetchable_urls(
    indexed: TestClient, image_index: tuple[Path, Path], pipeline: duomo.Pipeline
) -> None:
    _, root = image_index
    r = indexed.get("/search", params={"q": "a red circle", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 4 and body["index_size"] == 9 and len(body["results"]) == 4
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    # same ranking as brute force with the Python API
    files = sorted(str(p) for p in root.rglob("*.png"))
    sims = pipeline.encode_image(files).numpy() @ pipeline.encode_text(["a red circle"])[0].numpy()
    assert [h["path"] for h in body["results"]] == [files[i] for i in np.argsort(-sims)[:4]]
    for hit in body["results"]:
        img = indexed.get(hit["url"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == Path(hit["path"]).read_bytes()
        assert img.headers["x-content-type-options"] == "nosniff"


def test_image_search_json_and_multipart(indexed: TestClient, image_index: tuple[Path, Path]) -> None:
    _, root = image_index
    query = (root / "blue_square.png").read_bytes()
    r = indexed.post("/search", json={"image": data_url(query), "k": 3})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["path"].endswith("blue_square.png") and top["score"] == pytest.approx(1.0, abs=1e-4)
    r = indexed.post("/search", data={"k": "2"}, files={"image": ("q.png", query, "image/png")})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2 and r.json()["results"][0]["path"].endswith("blue_square.png")
    r = indexed.post("/search", json={"query": "green", "k": 2})
    assert r.status_code == 200 and r.json()["query"] == "green"


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"q": ""}, "send a text query"),
        ({"q": "x", "k": 0}, "k must be"),
        ({"q": "x", "k": 10_000}, "k must be"),
    ],
)
def test_search_bad_parameters(indexed: TestClient, params: dict, fragment: str) -> None:
    r = indexed.get("/search", params=params)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_search_needs_exactly_one_query(indexed: TestClient) -> None:
    assert indexed.post("/search", json={"k": 3}).status_code == 400
    both = {"query": "x", "image": data_url(png_bytes())}
    assert indexed.post("/search", json=both).status_code == 400
    assert indexed.get("/search").status_code == 400


def test_images_by_relative_path(indexed: TestClient) -> None:
    assert indexed.get("/images/red_circle.png").status_code == 200
    assert indexed.get("/images/sub/nested.png").status_code == 200


@pytest.mark.parametrize(
    "ref",
    [
        "../index/vectors.db",
        "..%2Findex%2Fvectors.db",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e/%2e%2e/etc/passwd",
        "sub%5C..%5Cred_circle.png",
        "red_circle.png%00.txt",
        image_id("/etc/passwd"),
        image_id("/etc/hostname"),
    ],
)
def test_path_traversal_is_refused(indexed: TestClient, ref: str) -> None:
    r = indexed.get(f"/images/{ref}")
    assert r.status_code in (403, 404), (ref, r.status_code)
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    "ref",
    [
        "sub/../red_circle.png",
        "../photos/red_circle.png",
        "./red_circle.png",
        "sub//nested.png",
        "/etc/passwd",
    ],
)
def test_resolve_refuses_dot_segments_even_when_they_lead_to_indexed_files(
    indexed: TestClient, ref: str
) -> None:
    from duomo.serve.search import ImageAccessError

    with pytest.raises(ImageAccessError) as info:
        indexed.app.state.duomo.index.resolve(ref)
    assert info.value.status_code == 403


def test_raw_dot_dot_paths_over_a_real_socket(
    image_index: tuple[Path, Path], pipeline: duomo.Pipeline
) -> None:
    import http.client

    from duomo.serve import ServeSettings, create_app
    from tests.serve.helpers import live_server

    index_dir, _ = image_index
    app = create_app(ServeSettings(index_dir=index_dir), pipeline=pipeline)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for raw in (
            "/images/../../../../etc/passwd",
            "/images/sub/../red_circle.png",
            "/images/..%2f..%2fetc%2fpasswd",
        ):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", raw)  # http.client sends the path as is, without normalising it
            status = conn.getresponse().status
            conn.close()
            assert status in (403, 404), (raw, status)


def test_files_in_root_but_not_indexed_are_404(indexed: TestClient, image_index: tuple[Path, Path]) -> None:
    _, root = image_index
    stray = root / "not_indexed.txt"
    stray.write_text("secret")
    try:
        assert indexed.get("/images/not_indexed.txt").status_code == 404
        assert indexed.get(f"/images/{image_id(str(stray))}").status_code == 404
    finally:
        stray.unlink()


def test_symlink_out_of_the_root_is_403(
    make_client: Callable[..., TestClient], tmp_path: Path, pipeline: duomo.Pipeline
) -> None:
    from duomo.index import ImageIndex

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.png").write_bytes(png_bytes(COLORS["green"]))
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes(COLORS["red"]))
    os.symlink(outside / "private.png", root / "link.png")  # the indexer follows file links
    with ImageIndex.open(tmp_path / "idx", pipeline) as idx:
        idx.update([root], progress=False)
        assert idx.is_indexed(root / "link.png")
    c = make_client(use_index=True, index_dir=tmp_path / "idx")
    assert c.get("/images/ok.png").status_code == 200
    assert c.get("/images/link.png").status_code == 403
    assert c.get(f"/images/{image_id(str(root / 'link.png'))}").status_code == 403
    # an indexed file later swapped for a link to outside is refused too
    (root / "ok.png").unlink()
    os.symlink(outside / "private.png", root / "ok.png")
    assert c.get("/images/ok.png").status_code == 403


def test_missing_index_dir_is_not_created_and_search_says_why(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    c = make_client(use_index=True, index_dir=tmp_path / "nope")
    r = c.get("/search", params={"q": "x"})
    assert r.status_code == 503 and "duomo index" in r.json()["error"]["message"]
    assert not (tmp_path / "nope").exists()
    assert c.get("/healthz").json()["index"]["ready"] is False


def test_index_built_with_another_model_is_refused(
    make_client: Callable[..., TestClient], image_index: tuple[Path, Path]
) -> None:
    index_dir, _ = image_index
    other = duomo.load("ViT-tiny")
    from duomo.serve import ServeSettings, create_app

    app = create_app(ServeSettings(index_dir=index_dir), pipeline=other)
    with TestClient(app) as c:
        r = c.get("/search", params={"q": "x"})
        assert r.status_code == 503 and "built with" in r.json()["error"]["message"]


def test_without_a_model_the_server_uses_the_index_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline: duomo.Pipeline
) -> None:
    from duomo.index import ImageIndex
    from duomo.serve import app as app_module

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    with ImageIndex.open(tmp_path / "idx", pipeline) as idx:
        idx.update([root], progress=False)
    assert app_module.index_model(tmp_path / "idx") == "ViT-micro"
    assert app_module.index_model(tmp_path / "missing") is None
    loaded: list = []
    monkeypatch.setattr(duomo.api, "load", lambda name, device=None, **kw: loaded.append(name) or pipeline)
    app_module.create_app(app_module.ServeSettings(index_dir=tmp_path / "idx"))
    app_module.create_app(app_module.ServeSettings(index_dir=tmp_path / "idx", model="ViT-tiny"))
    assert loaded == ["ViT-micro", "ViT-tiny"]
