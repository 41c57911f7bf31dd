"""/healthz: liveness, and what the server serves within which limits."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from duomo.serve.deps import State
from duomo.serve.schemas import HealthResponse
from duomo.serve.security import is_authorized
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


def _index_view(index: dict | None, authorized: bool) -> dict | None:
    """The index description, without server paths for an unauthenticated caller."""
    if index is None or authorized:
        return index
    return {k: (None if k == "path" else v) for k, v in index.items() if k != "roots"}


@router.get("/healthz", response_model=HealthResponse)
async def healthz(request: Request, state: State) -> JSONResponse:
    """Liveness: model, index, queues and limits. With API keys on, where the index and the indexed folders
    lie (paths on the server's disk) is shown to callers that send a key only."""
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
            "index": _index_view(await run_in_threadpool(state.index.describe), is_authorized(request)),
            "tasks": state.tasks.describe(),
            "generator": None if state.generation is None else state.generation.name,
            "chat": None if state.chat is None else state.chat.name,
            "queues": queues,
            "limits": limits(state.settings),
        }
    )
