"""POST /v1/images/generations: OpenAI's images API on the served text-to-image generator."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from duomo.errors import InputError
from duomo.serve.deps import BodyParser, State
from duomo.serve.errors import ApiError
from duomo.serve.schemas import ImageGenerationRequest

router = APIRouter(tags=["openai"])
generation_body = BodyParser(ImageGenerationRequest)


@router.post("/v1/images/generations", openapi_extra=generation_body.openapi)
async def images_generations(
    request: Request, state: State, body: Annotated[ImageGenerationRequest, Depends(generation_body)]
) -> Response:
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
    work = service.generate(
        body.prompt,
        n=body.n,
        negative=body.negative_prompt,
        steps=body.steps,
        guidance=body.guidance,
        sampler=body.sampler,
        seed=body.seed,
        size=body.size,
    )
    try:
        pngs = await _while_wanted(request, work, state.settings.generate_timeout_s)
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    if pngs is None:  # the client hung up: its images were abandoned; nobody reads this
        return Response(status_code=499)
    encoded = [base64.b64encode(png).decode("ascii") for png in pngs]
    if body.response_format == "url":
        data = [{"url": f"data:image/png;base64,{b64}", "revised_prompt": body.prompt} for b64 in encoded]
    else:
        data = [{"b64_json": b64, "revised_prompt": body.prompt} for b64 in encoded]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png"})


async def _while_wanted(request: Request, work: Awaitable[Any], limit: float, poll: float = 0.2) -> Any:
    """`work`'s result, unless the client disconnects first (cancel it, return None) or `limit` seconds pass
    (cancel it, 504). Cancelling drops the request's images from the shared denoiser batch at its next
    step."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    try:
        while True:
            remaining = deadline - loop.time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(poll, remaining)))
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
            if loop.time() >= deadline:
                raise ApiError(
                    504,
                    f"the generation took longer than {limit:g} s (queue plus sampling); "
                    "ask for fewer steps or images",
                    code="timeout",
                )
    finally:
        if not task.done():
            task.cancel()
