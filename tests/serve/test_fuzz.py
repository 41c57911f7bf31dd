"""Fuzzing: random and schema-shaped requests to each operation of the app's OpenAPI schema never give 5xx."""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import png_bytes

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _thin(width: int, height: int) -> bytes:
    """A tiny PNG far longer than wide (issue 11: resizing its short side up cost gigabytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


json_scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
) | st.integers(60, 400).map(lambda depth: json.loads("[" * depth + "]" * depth))  # deep nesting
image_strings = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=64).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.sampled_from(
        ["data:image/png;base64," + base64.b64encode(png_bytes(size=20)).decode(), "data:,", "data:image/"]
    ),
    st.sampled_from([base64.b64encode(_thin(w, h)).decode() for w, h in ((20000, 1), (1, 20000), (700, 3))]),
    st.text(max_size=30),
)
texts = st.one_of(
    st.text(max_size=60), st.sampled_from(["", " ", "a cat", "data:image/png;base64,AAAA", "x" * 9000])
)

FORM_FIELDS = ["texts", "labels", "query", "q", "k", "top_k", "templates"]
FORM_FIELDS += ["question", "beam", "max_length", "x"]  # /vqa and /caption fields, and one nobody knows


@pytest.fixture(scope="module")
def fuzz_client(
    tmp_path_factory: pytest.TempPathFactory, task_models: tuple[Path, Path]
) -> Iterator[TestClient]:
    """An app with a small index (so /search answers), task models and low limits (so limits are hit)."""
    from duomo.index import ImageIndex
    from tests.serve.helpers import write_images

    pipeline = duomo.load("ViT-micro")
    base = tmp_path_factory.mktemp("fuzz")
    write_images(base / "imgs")
    with ImageIndex.open(base / "idx", pipeline) as idx:
        idx.update([base / "imgs"], progress=False)
    cfg = ServeSettings(
        index_dir=base / "idx",
        max_inputs=16,
        max_body_bytes=64 * 1024,
        max_labels=16,
        vqa_model=task_models[0],
        caption_model=task_models[1],
    )
    with TestClient(create_app(cfg, pipeline=pipeline), raise_server_exceptions=False) as client:
        yield client


def operations(client: TestClient) -> list[tuple[str, str, dict]]:
    """(method, path, operation) for every operation in the app's OpenAPI schema."""
    spec = client.app.openapi()
    return [(m.upper(), p, op) for p, item in spec["paths"].items() for m, op in item.items()]


def value_for(schema: dict[str, Any], name: str) -> st.SearchStrategy:
    """A strategy roughly shaped like a JSON-schema property (often wrong on purpose)."""
    kinds = {s.get("type") for s in schema.get("anyOf", [schema])}
    options: list[st.SearchStrategy] = [json_values]
    if name in ("image", "images"):
        options.append(image_strings if "array" not in kinds else st.lists(image_strings, max_size=3))
    if "string" in kinds:
        options.append(texts)
    if "integer" in kinds:
        options.append(st.integers(-5, 300))
    if "array" in kinds:
        options.append(st.lists(texts, max_size=20))
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    return st.one_of(options)


def body_for(operation: dict[str, Any]) -> st.SearchStrategy:
    """A JSON body for an operation: schema-shaped objects, or any JSON at all."""
    content = operation.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    props = schema.get("properties", {})
    if not props:
        return json_values
    shaped = st.fixed_dictionaries({}, optional={k: value_for(v, k) for k, v in props.items()})
    return st.one_of(shaped, shaped, json_values)


def check(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        assert response.json()["error"]["message"], what


def test_schema_covers_the_api(fuzz_client: TestClient) -> None:
    ops = {(m, p) for m, p, _ in operations(fuzz_client)}
    assert {("POST", "/v1/embeddings"), ("POST", "/embed"), ("POST", "/classify"), ("GET", "/search")} <= ops
    assert {("POST", "/vqa"), ("POST", "/caption")} <= ops


@FUZZ
@given(data=st.data())
def test_json_bodies_never_5xx(fuzz_client: TestClient, data: st.DataObject) -> None:
    ops = [(m, p, op) for m, p, op in operations(fuzz_client) if m == "POST"]
    method, path, op = data.draw(st.sampled_from(ops))
    body = data.draw(body_for(op))
    r = fuzz_client.request(
        method, path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    check(r, f"{method} {path} {body!r:.200}")


@FUZZ
@given(data=st.data())
def test_raw_bodies_and_content_types_never_5xx(fuzz_client: TestClient, data: st.DataObject) -> None:
    path = data.draw(
        st.sampled_from(["/v1/embeddings", "/embed", "/classify", "/search", "/vqa", "/caption"])
    )
    ctype = data.draw(
        st.sampled_from(
            [
                "application/json",
                "multipart/form-data; boundary=b",
                "multipart/form-data",
                "text/plain",
                "",
                "x/y",
            ]
        )
    )
    raw = data.draw(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
    r = fuzz_client.post(path, content=raw, headers={"content-type": ctype} if ctype else {})
    check(r, f"POST {path} {ctype} {raw!r:.100}")


@FUZZ
@given(
    fields=st.lists(
        st.tuples(st.sampled_from(FORM_FIELDS), texts),
        max_size=6,
    ),
    files=st.lists(
        st.tuples(
            st.sampled_from(["images", "image", "texts"]),
            st.binary(max_size=200) | st.just(png_bytes(size=24)),
            st.sampled_from(["image/png", "text/plain", "application/octet-stream"]),
        ),
        max_size=3,
    ),
    path=st.sampled_from(["/embed", "/classify", "/search", "/vqa", "/caption"]),
)
def test_multipart_forms_never_5xx(
    fuzz_client: TestClient, fields: list[tuple[str, str]], files: list[tuple[str, bytes, str]], path: str
) -> None:
    multipart = [(name, (f"f{i}.png", blob, ctype)) for i, (name, blob, ctype) in enumerate(files)]
    r = fuzz_client.post(path, data=dict(fields), files=multipart or None)
    check(r, f"POST {path} {fields!r:.100} files={len(files)}")


@FUZZ
@given(
    q=st.text(max_size=50), k=st.text(max_size=6) | st.integers(-3, 500).map(str), ref=st.text(max_size=40)
)
def test_query_strings_and_image_refs_never_5xx(fuzz_client: TestClient, q: str, k: str, ref: str) -> None:
    check(fuzz_client.get("/search", params={"q": q, "k": k}), f"GET /search q={q!r} k={k!r}")
    r = fuzz_client.get("/images/" + urllib.parse.quote(ref, safe="/%"))
    assert r.status_code < 500, (ref, r.status_code)
    if r.status_code == 200:  # only indexed files come back
        assert Path(fuzz_client.app.state.duomo.index.resolve(ref)).suffix == ".png"
