"""OpenAI-compatible endpoints: /v1/embeddings (texts and data:image/ URLs) and /v1/models."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from duomo.serve.deps import BodyParser, Limits, State
from duomo.serve.errors import ApiError
from duomo.serve.schemas import EmbeddingsRequest, EmbeddingsResponse

router = APIRouter(tags=["openai"])
embeddings_body = BodyParser(EmbeddingsRequest)


def b64_floats(vec: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, openapi_extra=embeddings_body.openapi)
async def embeddings(
    state: State, limits: Limits, body: Annotated[EmbeddingsRequest, Depends(embeddings_body)]
) -> JSONResponse:
    """OpenAI-compatible embeddings of texts and of images sent as data:image/... URLs."""
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
    limits.count(len(items), "inputs")
    dims = body.dimensions
    if dims is not None and not 1 <= dims <= service.dim:
        raise ApiError(400, f"dimensions must be between 1 and {service.dim}", param="dimensions")
    image_at = [i for i, x in enumerate(items) if x[:11].lower() == "data:image/"]
    text_at = [i for i, x in enumerate(items) if x[:11].lower() != "data:image/"]
    texts = [items[i] for i in text_at]
    limits.texts(texts, "input")
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


@router.get("/v1/models")
async def list_models(state: State) -> JSONResponse:
    """OpenAI-compatible model list: the embedding model, and the chat model and generator when served."""
    names = [state.model.name] + [s.name for s in (state.chat, state.generation) if s is not None]
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "duomo"} for n in names]
    return JSONResponse({"object": "list", "data": data})
