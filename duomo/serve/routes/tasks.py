"""/vqa and /caption: the server's optional BEiT-3 task models (503 where none is configured)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from duomo.serve.deps import BodyParser, State, form_images, form_values, require_task, with_image
from duomo.serve.errors import ApiError
from duomo.serve.schemas import CaptionRequest, CaptionResponse, VQARequest, VQAResponse

router = APIRouter()


class VQAInput(VQARequest):
    """VQARequest whose image may also be raw bytes (a multipart upload)."""

    image: str | bytes  # type: ignore[assignment]


class CaptionInput(CaptionRequest):
    """CaptionRequest whose image may also be raw bytes (a multipart upload)."""

    image: str | bytes  # type: ignore[assignment]


async def vqa_form(form: FormData) -> dict[str, Any]:
    """Fields `image` and `question`."""
    question = form.get("question")
    data: dict[str, Any] = {"question": question} if isinstance(question, str) else {}
    return with_image(data, await form_images(form, "image"))


async def caption_form(form: FormData) -> dict[str, Any]:
    """Fields `image`, `beam`, `max_length` and `guide`."""
    return with_image(form_values(form, "beam", "max_length", "guide"), await form_images(form, "image"))


vqa_body = BodyParser(
    VQAInput,
    vqa_form,
    schema=VQARequest,
    form_fields={"image": {"type": "string", "format": "binary"}, "question": {"type": "string"}},
)
caption_body = BodyParser(
    CaptionInput,
    caption_form,
    schema=CaptionRequest,
    form_fields={
        "image": {"type": "string", "format": "binary"},
        "beam": {"type": "integer"},
        "max_length": {"type": "integer"},
        "guide": {"type": "boolean"},
    },
)


@router.post("/vqa", response_model=VQAResponse, openapi_extra=vqa_body.openapi)
async def vqa(
    state: State,
    name: Annotated[str, Depends(require_task("vqa"))],
    body: Annotated[VQAInput, Depends(vqa_body)],
) -> JSONResponse:
    """Answer a question about one image with the server's BEiT-3 VQA model (503 if it has none)."""
    question, limit = body.question, state.settings.max_question_chars
    if not question.strip():
        example = "e.g. 'what color is the star?'"
        raise ApiError(400, f"question is empty; ask something about the image, {example}", param="question")
    if len(question) > limit:
        message = f"question has {len(question)} characters; the limit is {limit}"
        raise ApiError(400, message, param="question")
    text, score = await state.tasks.answer(body.image, question)
    return JSONResponse({"model": name, "answer": text, "score": score})


@router.post("/caption", response_model=CaptionResponse, openapi_extra=caption_body.openapi)
async def caption(
    state: State,
    name: Annotated[str, Depends(require_task("caption"))],
    body: Annotated[CaptionInput, Depends(caption_body)],
) -> JSONResponse:
    """Caption one image with the server's BEiT-3 captioning model (503 if it has none)."""
    text, guide = await state.tasks.caption(body.image, body.beam, body.max_length, body.guide)
    return JSONResponse({"model": name, "caption": text, "guide": guide})
