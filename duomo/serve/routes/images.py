"""/images/{ref}: the indexed image files that /search links to."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from duomo.serve.deps import State
from duomo.serve.search import media_type

router = APIRouter()
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}


@router.get("/images/{ref:path}", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
async def image_file(ref: str, state: State) -> FileResponse:
    """An indexed image, by the id /search returns or by its path relative to an index root."""
    path = await run_in_threadpool(state.index.resolve, ref)
    return FileResponse(path, media_type=media_type(path), headers=HEADERS)
