"""/metrics: Prometheus metrics of requests, batches and queues."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from duomo.serve.deps import State
from duomo.serve.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> PlainTextResponse:
    """Prometheus metrics (text format 0.0.4)."""
    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)
