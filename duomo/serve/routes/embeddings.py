"""/embed: duomo's own embeddings of texts and images (JSON with base64 / data URLs, or multipart files)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from duomo.serve.deps import BodyParser, Limits, State, form_images, form_texts
from duomo.serve.schemas import EmbedRequest, EmbedResponse

router = APIRouter()


class EmbedInput(EmbedRequest):
    """EmbedRequest whose images may also be raw bytes (multipart uploads)."""

    images: list[str | bytes] = []  # type: ignore[assignment]


async def embed_form(form: FormData) -> dict[str, Any]:
    """Fields `texts` and `images` (files or base64 strings), repeated once per input."""
    return {"texts": form_texts(form, "texts"), "images": await form_images(form, "images")}


embed_body = BodyParser(
    EmbedInput,
    embed_form,
    schema=EmbedRequest,
    form_fields={
        "texts": {"type": "array", "items": {"type": "string"}},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    },
)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=embed_body.openapi)
async def embed(
    state: State, limits: Limits, body: Annotated[EmbedInput, Depends(embed_body)]
) -> JSONResponse:
    """Embed texts and images (JSON with base64 / data URLs, or multipart with files)."""
    limits.count(len(body.texts) + len(body.images), "texts or images")
    limits.texts(body.texts, "texts")
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
