"""HTTP endpoints: thin handlers that validate input, call the model/index services, and shape responses."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from duomo.serve.errors import ApiError
from duomo.serve.schemas import (
    CaptionRequest,
    CaptionResponse,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    SearchRequest,
    SearchResponse,
    VQARequest,
    VQAResponse,
)
from duomo.serve.search import image_id, media_type
from duomo.serve.security import require_api_key
from duomo.serve.state import ServerState

M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 429, 503)
}
MAX_TEMPLATES = 32


def get_state(request: Request) -> ServerState:
    """The server's services, attached to the app by create_app."""
    return request.app.state.duomo


def _body_doc(model: type[BaseModel], multipart: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody for endpoints that take JSON or multipart/form-data."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema()},
                "multipart/form-data": {"schema": {"type": "object", "properties": multipart}},
            },
        }
    }


async def read_body(
    request: Request, model: type[M], from_form: Callable[[FormData], Awaitable[dict[str, Any]]] | None = None
) -> M:
    """Parse a JSON (or, given `from_form`, multipart) body into `model`; 400/415 with a clear message."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype in ("", "application/json") or ctype.endswith("+json"):
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "the request body is empty; send a JSON object")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    elif ctype == "multipart/form-data" and from_form is not None:
        settings = get_state(request).settings
        try:
            form = await request.form(
                max_files=settings.max_inputs, max_fields=settings.max_inputs + 16, max_part_size=1024 * 1024
            )
        except ApiError:
            raise
        except Exception as exc:  # MultiPartException or HTTPException from a malformed form
            detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
            raise ApiError(400, f"malformed multipart/form-data body: {detail}") from exc
        data = await from_form(form)
    else:
        accepted = "application/json or multipart/form-data" if from_form else "application/json"
        raise ApiError(415, f"unsupported content type {ctype!r}; send {accepted}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


async def _form_images(form: FormData, field: str) -> list[str | bytes]:
    """Uploaded files (bytes) and text values (base64 / data URLs) of one form field."""
    out: list[str | bytes] = []
    for value in form.getlist(field):
        out.append(await value.read() if isinstance(value, UploadFile) else value)
    return out


def _form_texts(form: FormData, field: str) -> list[str]:
    return [v for v in form.getlist(field) if isinstance(v, str)]


def check_texts(texts: list[str], state: ServerState, param: str) -> None:
    """Reject empty or overlong texts."""
    limit = state.settings.max_text_chars
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, f"{param}[{i}] is empty; send non-empty text", param=param)
        if len(text) > limit:
            raise ApiError(400, f"{param}[{i}] has {len(text)} characters; the limit is {limit}", param=param)


def check_count(n: int, state: ServerState, what: str) -> None:
    """Reject empty requests and requests with more inputs than allowed."""
    if n == 0:
        raise ApiError(400, f"no {what} given; send at least one")
    if n > state.settings.max_inputs:
        raise ApiError(400, f"{n} {what} in one request; the limit is {state.settings.max_inputs}")


def b64_floats(vec: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@protected.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    tags=["openai"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
        }
    },
)
async def embeddings(request: Request) -> JSONResponse:
    """OpenAI-compatible embeddings of texts and of images sent as data:image/... URLs."""
    state = get_state(request)
    body = await read_body(request, EmbeddingsRequest)
    service = state.model
    if body.model not in (None, "", "default", service.name):
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this server serves {service.name!r} or 'default'",
            code="model_not_found",
            param="model",
        )
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if items and not all(isinstance(x, str) for x in items):
        raise ApiError(400, "token-id inputs are not supported; send strings", param="input")
    check_count(len(items), state, "inputs")
    dims = body.dimensions
    if dims is not None and not 1 <= dims <= service.dim:
        raise ApiError(400, f"dimensions must be between 1 and {service.dim}", param="dimensions")
    image_at = [i for i, x in enumerate(items) if x[:11].lower() == "data:image/"]
    text_at = [i for i, x in enumerate(items) if x[:11].lower() != "data:image/"]
    texts = [items[i] for i in text_at]
    check_texts(texts, state, "input")
    (text_vecs, tokens), image_vecs = await asyncio.gather(
        service.embed_texts(texts), service.embed_images([items[i] for i in image_at], what="input image")
    )
    vectors = np.zeros((len(items), service.dim), np.float32)
    vectors[text_at] = text_vecs
    vectors[image_at] = image_vecs
    if dims is not None and dims < service.dim:
        vectors = vectors[:, :dims]
        vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True).clip(min=1e-12)
    encode = b64_floats if body.encoding_format == "base64" else (lambda v: v.tolist())
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


class _EmbedInput(EmbedRequest):
    """EmbedRequest whose images may also be raw bytes (multipart uploads)."""

    images: list[str | bytes] = []  # type: ignore[assignment]


@protected.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> JSONResponse:
    """OpenAI-compatible model list: the one served model."""
    name = get_state(request).model.name
    return JSONResponse(
        {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "duomo"}]}
    )


async def _embed_form(form: FormData) -> dict[str, Any]:
    return {"texts": _form_texts(form, "texts"), "images": await _form_images(form, "images")}


@protected.post(
    "/embed",
    response_model=EmbedResponse,
    openapi_extra=_body_doc(
        EmbedRequest,
        {
            "texts": {"type": "array", "items": {"type": "string"}},
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        },
    ),
)
async def embed(request: Request) -> JSONResponse:
    """Embed texts and images (JSON with base64 / data URLs, or multipart with files)."""
    state = get_state(request)
    body = await read_body(request, _EmbedInput, _embed_form)
    check_count(len(body.texts) + len(body.images), state, "texts or images")
    check_texts(body.texts, state, "texts")
    (text_vecs, _), image_vecs = await asyncio.gather(
        state.model.embed_texts(body.texts), state.model.embed_images(body.images)
    )
    return JSONResponse(
        {
            "model": state.model.name,
            "dim": state.model.dim,
            "text_embeddings": text_vecs.tolist(),
            "image_embeddings": image_vecs.tolist(),
        }
    )


async def _classify_form(form: FormData) -> dict[str, Any]:
    images = await _form_images(form, "image")
    labels = _form_texts(form, "labels")
    if len(labels) == 1 and "," in labels[0]:
        labels = [x.strip() for x in labels[0].split(",") if x.strip()]
    data: dict[str, Any] = {"labels": labels}
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    templates = _form_texts(form, "templates")
    if templates:
        data["templates"] = templates
    if form.get("top_k") not in (None, ""):
        data["top_k"] = form.get("top_k")
    return data


class _ClassifyInput(ClassifyRequest):
    image: str | bytes  # type: ignore[assignment]


@protected.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_body_doc(
        ClassifyRequest,
        {
            "image": {"type": "string", "format": "binary"},
            "labels": {"type": "array", "items": {"type": "string"}},
            "top_k": {"type": "integer"},
        },
    ),
)
async def classify(request: Request) -> JSONResponse:
    """Zero-shot: rank the given labels for one image, with probabilities."""
    state = get_state(request)
    body = await read_body(request, _ClassifyInput, _classify_form)
    if not body.labels:
        raise ApiError(400, "labels is empty; send at least one candidate label", param="labels")
    if len(body.labels) > state.settings.max_labels:
        raise ApiError(
            400, f"{len(body.labels)} labels; the limit is {state.settings.max_labels}", param="labels"
        )
    check_texts(body.labels, state, "labels")
    if body.templates is not None:
        if not body.templates or len(body.templates) > MAX_TEMPLATES:
            raise ApiError(400, f"templates must list 1 to {MAX_TEMPLATES} prompts", param="templates")
        check_texts(body.templates, state, "templates")
    ranked = await state.model.classify(body.image, body.labels, body.templates)
    if body.top_k is not None:
        ranked = ranked[: body.top_k]
    return JSONResponse(
        {"model": state.model.name, "labels": [{"label": lb, "probability": p} for lb, p in ranked]}
    )


def _single_image(data: dict[str, Any], images: list[str | bytes]) -> dict[str, Any]:
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    return data


async def _vqa_form(form: FormData) -> dict[str, Any]:
    data: dict[str, Any] = {}
    question = form.get("question")
    if isinstance(question, str):
        data["question"] = question
    return _single_image(data, await _form_images(form, "image"))


class _VQAInput(VQARequest):
    image: str | bytes  # type: ignore[assignment]


@protected.post(
    "/vqa",
    response_model=VQAResponse,
    openapi_extra=_body_doc(
        VQARequest, {"image": {"type": "string", "format": "binary"}, "question": {"type": "string"}}
    ),
)
async def vqa(request: Request) -> JSONResponse:
    """Answer a question about one image with the server's BEiT-3 VQA model (503 if it has none)."""
    state = get_state(request)
    name = state.tasks.require("vqa")
    body = await read_body(request, _VQAInput, _vqa_form)
    question, limit = body.question, state.settings.max_question_chars
    if not question.strip():
        example = "e.g. 'what color is the star?'"
        raise ApiError(400, f"question is empty; ask something about the image, {example}", param="question")
    if len(question) > limit:
        message = f"question has {len(question)} characters; the limit is {limit}"
        raise ApiError(400, message, param="question")
    text, score = await state.tasks.answer(body.image, question)
    return JSONResponse({"model": name, "answer": text, "score": score})


async def _caption_form(form: FormData) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field in ("beam", "max_length", "guide"):
        if form.get(field) not in (None, ""):
            data[field] = form.get(field)
    return _single_image(data, await _form_images(form, "image"))


class _CaptionInput(CaptionRequest):
    image: str | bytes  # type: ignore[assignment]


@protected.post(
    "/caption",
    response_model=CaptionResponse,
    openapi_extra=_body_doc(
        CaptionRequest,
        {
            "image": {"type": "string", "format": "binary"},
            "beam": {"type": "integer"},
            "max_length": {"type": "integer"},
            "guide": {"type": "boolean"},
        },
    ),
)
async def caption(request: Request) -> JSONResponse:
    """Caption one image with the server's BEiT-3 captioning model (503 if it has none)."""
    state = get_state(request)
    name = state.tasks.require("caption")
    body = await read_body(request, _CaptionInput, _caption_form)
    text, guide = await state.tasks.caption(body.image, body.beam, body.max_length, body.guide)
    return JSONResponse({"model": name, "caption": text, "guide": guide})


async def _run_search(
    state: ServerState, query: str | None, image: str | bytes | None, k: int
) -> JSONResponse:
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
        check_texts([query], state, "query")
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


@protected.get("/search", response_model=SearchResponse)
async def search_get(
    request: Request,
    q: str = Query(..., description="text to search for"),
    k: int = Query(12, description="number of results"),
) -> JSONResponse:
    """Search the index by text."""
    return await _run_search(get_state(request), q, None, k)


async def _search_form(form: FormData) -> dict[str, Any]:
    images = await _form_images(form, "image")
    data: dict[str, Any] = {}
    query = form.get("query") or form.get("q")
    if isinstance(query, str) and query:
        data["query"] = query
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    if form.get("k") not in (None, ""):
        data["k"] = form.get("k")
    return data


class _SearchInput(SearchRequest):
    image: str | bytes | None = None  # type: ignore[assignment]


@protected.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_body_doc(
        SearchRequest,
        {
            "query": {"type": "string"},
            "image": {"type": "string", "format": "binary"},
            "k": {"type": "integer"},
        },
    ),
)
async def search_post(request: Request) -> JSONResponse:
    """Search the index by text or by an example image (JSON or multipart upload)."""
    state = get_state(request)
    body = await read_body(request, _SearchInput, _search_form)
    return await _run_search(state, body.query, body.image, body.k)


@protected.get(
    "/images/{ref:path}", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}}
)
async def image_file(ref: str, request: Request) -> FileResponse:
    """An indexed image, by the id /search returns or by its path relative to an index root."""
    state = get_state(request)
    path = await run_in_threadpool(state.index.resolve, ref)
    return FileResponse(
        path,
        media_type=media_type(path),
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
    )


@public.get("/healthz", response_model=HealthResponse)
async def healthz(request: Request) -> JSONResponse:
    """Liveness: model, index, queues and limits."""
    state = get_state(request)
    model = state.model
    queues = {
        b.name: {"depth": b.depth, "max_queue": b.max_queue, "running": b.running}
        for b in (model.text, model.image, *state.tasks.queues.values())
    }
    s = state.settings
    return JSONResponse(
        {
            "status": "draining" if state.draining else "ok",
            "model": model.name,
            "embed_dim": model.dim,
            "auth_required": bool(s.api_keys),
            "index": await run_in_threadpool(state.index.describe),
            "tasks": state.tasks.describe(),
            "queues": queues,
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_image_pixels": s.max_image_pixels,
                "max_inputs": s.max_inputs,
                "max_text_chars": s.max_text_chars,
                "max_labels": s.max_labels,
                "max_question_chars": s.max_question_chars,
                "max_k": s.max_k,
            },
        }
    )


@public.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics (text format 0.0.4)."""
    from duomo.serve.metrics import CONTENT_TYPE

    return PlainTextResponse(get_state(request).metrics.render(), media_type=CONTENT_TYPE)
