"""/healthz: liveness, and what the server serves within which limits."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from duomo.serve.deps import State
from duomo.serve.schemas import HealthResponse
from duomo.serve.settings import ServeSettings

router = APIRouter()


def limits(s: ServeSettings) -> dict[str, int]:
    """The request limits a client should know about."""
    return {
        "max_body_bytes": s.max_body_bytes,
        "max_image_pixels": s.max_image_pixels,
        "max_inputs": s.max_inputs,
        "max_text_chars": s.max_text_chars,
        "max_labels": s.max_labels,
        "max_question_chars": s.max_question_chars,
        "max_k": s.max_k,
    }


@router.get("/healthz", response_model=HealthResponse)
async def healthz(state: State) -> JSONResponse:
    """Liveness: model, index, queues and limits."""
    model = state.model
    queues = {
        b.name: {"depth": b.depth, "max_queue": b.max_queue, "running": b.running}
        for b in (model.text, model.image, *state.tasks.queues.values())
    }
    return JSONResponse(
        {
            "status": "draining" if state.draining else "ok",
            "model": model.name,
            "embed_dim": model.dim,
            "auth_required": bool(state.settings.api_keys),
            "index": await run_in_threadpool(state.index.describe),
            "tasks": state.tasks.describe(),
            "queues": queues,
            "limits": limits(state.settings),
        }
    )
