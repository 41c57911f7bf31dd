"""/search: the image index, queried by text (GET or POST) or by an example image (POST)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from duomo.serve.deps import BodyParser, InputLimits, Limits, State, form_images, form_values, with_image
from duomo.serve.errors import ApiError
from duomo.serve.schemas import SearchRequest, SearchResponse
from duomo.serve.search import image_id
from duomo.serve.state import ServerState

router = APIRouter()


class SearchInput(SearchRequest):
    """SearchRequest whose image may also be raw bytes (a multipart upload)."""

    image: str | bytes | None = None  # type: ignore[assignment]


async def search_form(form: FormData) -> dict[str, Any]:
    """Fields `query` (or `q`), `image` and `k`."""
    query = form.get("query") or form.get("q")
    data: dict[str, Any] = {"query": query} if isinstance(query, str) and query else {}
    return with_image(data, await form_images(form, "image")) | form_values(form, "k")


search_body = BodyParser(
    SearchInput,
    search_form,
    schema=SearchRequest,
    form_fields={
        "query": {"type": "string"},
        "image": {"type": "string", "format": "binary"},
        "k": {"type": "integer"},
    },
)


async def run_search(
    state: ServerState, limits: InputLimits, query: str | None, image: str | bytes | None, k: int
) -> JSONResponse:
    """The `k` nearest indexed images to the text `query` or the example `image` (exactly one of them)."""
    if (query is None or not query.strip()) and image is None:
        raise ApiError(400, "send a text query (q / query) or an example image", param="query")
    if query is not None and query.strip() and image is not None:
        raise ApiError(400, "send either a text query or an example image, not both", param="query")
    if not 1 <= k <= state.settings.max_k:
        raise ApiError(400, f"k must be between 1 and {state.settings.max_k}", param="k")
    state.index.check_ready()
    if image is not None:
        vector = (await state.model.embed_images([image], what="image"))[0]
        query = None
    else:
        assert query is not None
        limits.texts([query], "query")
        vector = (await state.model.embed_texts([query]))[0][0]
    hits = await run_in_threadpool(state.index.search_vector, vector, k)
    results = [
        {"path": str(h.path), "score": float(h.score), "url": f"/images/{image_id(str(h.path))}"}
        for h in hits
    ]
    size = await run_in_threadpool(state.index.size)
    return JSONResponse(
        {"model": state.model.name, "query": query, "k": k, "index_size": size, "results": results}
    )


@router.get("/search", response_model=SearchResponse)
async def search_get(
    state: State,
    limits: Limits,
    q: str = Query(..., description="text to search for"),
    k: int = Query(12, description="number of results"),
) -> JSONResponse:
    """Search the index by text."""
    return await run_search(state, limits, q, None, k)


@router.post("/search", response_model=SearchResponse, openapi_extra=search_body.openapi)
async def search_post(
    state: State, limits: Limits, body: Annotated[SearchInput, Depends(search_body)]
) -> JSONResponse:
    """Search the index by text or by an example image (JSON or multipart upload)."""
    return await run_search(state, limits, body.query, body.image, body.k)
