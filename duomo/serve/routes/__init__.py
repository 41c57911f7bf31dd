"""The HTTP API: `public` (health, metrics) and `protected` (API-key) routers, one module per resource."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from duomo.serve.routes import (
    chat,
    classify,
    embeddings,
    generate,
    health,
    images,
    metrics,
    openai,
    search,
    tasks,
)
from duomo.serve.schemas import ErrorResponse
from duomo.serve.security import require_api_key

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 429, 503)
}
PUBLIC = (health, metrics)
# in this order in the OpenAPI schema
PROTECTED = (openai, chat, generate, embeddings, classify, tasks, search, images)

public = APIRouter()
for _module in PUBLIC:
    public.include_router(_module.router)

protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
for _module in PROTECTED:
    protected.include_router(_module.router)

__all__ = ["ERRORS", "protected", "public"]
