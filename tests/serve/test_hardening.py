"""Issue 11's reproductions against the server: thin images, deep JSON, symlinked folders, /healthz paths."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import duomo
from duomo.serve.search import image_id as id_for_path
from tests.serve.helpers import png_bytes


def thin_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(200000, 1), (1, 20000), (20000, 1), (3300, 100)])
def test_thin_images_are_refused_by_every_image_endpoint(make_client, size: tuple[int, int]) -> None:  # noqa: ANN001
    client = make_client()
    data = thin_png(*size)
    b64 = base64.b64encode(data).decode()
    requests = [
        ("/embed", {"json": {"images": [b64]}}),
        ("/v1/embeddings", {"json": {"input": f"data:image/png;base64,{b64}"}}),
        ("/classify", {"json": {"image": b64, "labels": ["a", "b"]}}),
        ("/embed", {"files": {"images": ("thin.png", data, "image/png")}}),
    ]
    for path, kwargs in requests:
        r = client.post(path, **kwargs)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "too thin" in r.json()["error"]["message"]


def test_ordinary_aspect_ratios_still_work(make_client) -> None:  # noqa: ANN001
    client = make_client()
    r = client.post("/embed", json={"images": [base64.b64encode(thin_png(640, 40)).decode()]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [70, 1000, 5000, 100_000])
def test_deeply_nested_json_is_400_and_the_connection_lives(make_client, depth: int) -> None:  # noqa: ANN001
    client = make_client()
    body = '{"texts": ' + "[" * depth + "]" * depth + "}"
    r = client.post("/embed", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nests deeper" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_healthz_shows_paths_to_key_holders_only(make_client, image_index) -> None:  # noqa: ANN001
    index_dir, root = image_index
    client = make_client(use_index=True, index_dir=index_dir, api_keys=["sekret"])
    anonymous = client.get("/healthz").json()
    assert (
        anonymous["index"]["ready"]
        and anonymous["index"]["path"] is None
        and "roots" not in anonymous["index"]
    )
    assert str(root) not in json.dumps(anonymous) and str(index_dir) not in json.dumps(anonymous)
    known = client.get("/healthz", headers={"Authorization": "Bearer sekret"}).json()
    assert known["index"]["path"] == str(index_dir) and known["index"]["roots"]
    open_server = make_client(use_index=True, index_dir=index_dir).get("/healthz").json()
    assert open_server["index"]["path"] == str(index_dir)  # no keys: nothing to hide


def test_a_symlinked_folder_does_not_expose_a_non_indexed_file(
    tmp_path: Path, make_client: Callable[..., TestClient], pipeline: duomo.Pipeline
) -> None:
    """ "/photos/link/../a.png" is textually the indexed /photos/a.png, but the file it names is
    /photos/sub/a.png (link -> sub/deeper), added after indexing: it must not be served."""
    from duomo.index import ImageIndex

    photos = tmp_path / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    (photos / "a.png").write_bytes(png_bytes())
    index_dir = tmp_path / "index"
    idx = ImageIndex.open(index_dir, pipeline)
    idx.update([photos], progress=False)
    idx.close()
    (photos / "sub" / "a.png").write_bytes(png_bytes((10, 200, 10)))  # never indexed
    os.symlink(photos / "sub" / "deeper", photos / "link")
    client = make_client(use_index=True, index_dir=index_dir)
    assert client.get(f"/images/{id_for_path(str(photos / 'a.png'))}").status_code == 200
    sneaky = str(photos / "link") + "/../a.png"
    r = client.get(f"/images/{id_for_path(sneaky)}")
    assert r.status_code == 403, r.status_code


def test_a_thin_image_in_a_folder_is_a_failed_row_of_the_index(
    tmp_path: Path, pipeline: duomo.Pipeline
) -> None:
    from duomo.index import ImageIndex

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "thin.png").write_bytes(thin_png(200000, 1))
    (photos / "ok.png").write_bytes(png_bytes())
    idx = ImageIndex.open(tmp_path / "index", pipeline)
    idx.update([photos], progress=False)
    failures = dict(idx.failures())
    idx.close()
    assert list(failures) == [str(photos / "thin.png")] and "too thin" in failures[str(photos / "thin.png")]


def test_the_schema_documents_what_the_server_answers(make_client) -> None:  # noqa: ANN001
    client = make_client()
    spec = client.get("/openapi.json").json()
    statuses = {
        (method, path): set(op["responses"])
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }
    assert not [k for k, v in statuses.items() if "422" in v]  # invalid parameters are 400 here
    assert "403" in statuses[("get", "/images/{ref}")]
    assert "504" in statuses[("post", "/vqa")] and "504" in statuses[("post", "/caption")]
    r = client.get("/search", params={"k": "many"})  # what a 422 would have been
    assert r.status_code in (400, 503)
