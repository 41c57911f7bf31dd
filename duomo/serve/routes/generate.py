"""POST /v1/images/generations: OpenAI's images API on the served text-to-image generator."""

from __future__ import annotations

import base64
import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from duomo.errors import InputError
from duomo.serve.deps import BodyParser, State
from duomo.serve.errors import ApiError
from duomo.serve.schemas import ImageGenerationRequest

router = APIRouter(tags=["openai"])
generation_body = BodyParser(ImageGenerationRequest)


@router.post("/v1/images/generations", openapi_extra=generation_body.openapi)
async def images_generations(
    state: State, body: Annotated[ImageGenerationRequest, Depends(generation_body)]
) -> JSONResponse:
    """Images from a prompt, as base64 PNGs (or data: URLs), compatible with `client.images.generate`."""
    service = state.generation
    if service is None:
        raise ApiError(
            404,
            "this server has no image generator; start it with `duomo serve --generator shapes-gen`",
            code="model_not_found",
            param="model",
        )
    if body.model not in (None, "", "default", service.name):
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this server generates with {service.name!r} "
            "or 'default'",
            code="model_not_found",
            param="model",
        )
    try:
        pngs = await service.generate(
            body.prompt,
            n=body.n,
            negative=body.negative_prompt,
            steps=body.steps,
            guidance=body.guidance,
            sampler=body.sampler,
            seed=body.seed,
            size=body.size,
        )
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    encoded = [base64.b64encode(png).decode("ascii") for png in pngs]
    if body.response_format == "url":
        data = [{"url": f"data:image/png;base64,{b64}", "revised_prompt": body.prompt} for b64 in encoded]
    else:
        data = [{"b64_json": b64, "revised_prompt": body.prompt} for b64 in encoded]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png"})
