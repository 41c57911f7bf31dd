"""The routes package: one router module per resource, and the same route table as before the split."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from duomo.serve.routes import protected, public

# (method, path) of every route duomo itself serves; FastAPI's /docs and /openapi.json are left out.
ROUTES_BY_MODULE = {
    "openai": {("POST", "/v1/embeddings"), ("GET", "/v1/models")},
    "chat": {("POST", "/v1/chat/completions")},
    "generate": {("POST", "/v1/images/generations")},
    "embeddings": {("POST", "/embed")},
    "classify": {("POST", "/classify")},
    "tasks": {("POST", "/vqa"), ("POST", "/caption")},
    "search": {("GET", "/search"), ("POST", "/search")},
    "images": {("GET", "/images/{ref:path}")},
    "health": {("GET", "/healthz")},
    "metrics": {("GET", "/metrics")},
}
APP_ROUTES = {
    ("GET", "/"),
    ("MOUNT", "/static"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/images/generations"),
    ("POST", "/embed"),
    ("POST", "/classify"),
    ("POST", "/vqa"),
    ("POST", "/caption"),
    ("GET", "/search"),
    ("POST", "/search"),
    ("GET", "/images/{ref:path}"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
}
# operationId (from the handler's name) of each documented operation, as before the split.
OPERATION_IDS = {
    ("post", "/v1/embeddings"): "embeddings_v1_embeddings_post",
    ("get", "/v1/models"): "list_models_v1_models_get",
    ("post", "/v1/chat/completions"): "chat_completions_v1_chat_completions_post",
    ("post", "/v1/images/generations"): "images_generations_v1_images_generations_post",
    ("post", "/embed"): "embed_embed_post",
    ("post", "/classify"): "classify_classify_post",
    ("post", "/vqa"): "vqa_vqa_post",
    ("post", "/caption"): "caption_caption_post",
    ("get", "/search"): "search_get_search_get",
    ("post", "/search"): "search_post_search_post",
    ("get", "/images/{ref}"): "image_file_images__ref__get",
    ("get", "/healthz"): "healthz_healthz_get",
    ("get", "/metrics"): "metrics_metrics_get",
}


def route_table(routes: Iterable[Any]) -> set[tuple[str, str]]:
    """(method, path) of each route, looking inside included routers; ('MOUNT', path) for mounts."""
    table: set[tuple[str, str]] = set()
    for route in routes:
        nested = getattr(route, "effective_route_contexts", None)  # newer FastAPI keeps included routers
        if callable(nested):
            table |= route_table(nested())
        else:
            table |= {(method, route.path) for method in getattr(route, "methods", None) or {"MOUNT"}}
    return table - {("HEAD", path) for _, path in table}


@pytest.mark.parametrize("name", sorted(ROUTES_BY_MODULE))
def test_each_resource_has_its_own_router_module(name: str) -> None:
    module = importlib.import_module(f"duomo.serve.routes.{name}")
    assert isinstance(module.router, APIRouter)
    assert route_table(module.router.routes) == ROUTES_BY_MODULE[name]


def test_public_and_protected_routers_split_the_api() -> None:
    assert route_table(public.routes) == ROUTES_BY_MODULE["health"] | ROUTES_BY_MODULE["metrics"]
    assert route_table(protected.routes) == set().union(
        *(routes for name, routes in ROUTES_BY_MODULE.items() if name not in ("health", "metrics"))
    )


def test_the_app_route_table_is_unchanged(client: TestClient) -> None:
    app = client.app
    framework = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url}
    assert {(m, p) for m, p in route_table(app.routes) if p not in framework} == APP_ROUTES


def test_the_documented_operations_are_unchanged(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    got = {(m, p): op["operationId"] for p, item in paths.items() for m, op in item.items()}
    assert got == OPERATION_IDS
    for method, path in OPERATION_IDS:
        content = paths[path][method].get("requestBody", {}).get("content", {})
        if method == "post":
            multipart = path not in ("/v1/embeddings", "/v1/images/generations", "/v1/chat/completions")
            assert set(content) == {"application/json"} | ({"multipart/form-data"} if multipart else set())
