"""/classify: zero-shot classification of one image over the labels sent."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from duomo.serve.deps import BodyParser, Limits, State, form_images, form_texts, form_values, with_image
from duomo.serve.errors import ApiError
from duomo.serve.schemas import ClassifyRequest, ClassifyResponse

router = APIRouter()
MAX_TEMPLATES = 32


class ClassifyInput(ClassifyRequest):
    """ClassifyRequest whose image may also be raw bytes (a multipart upload)."""

    image: str | bytes  # type: ignore[assignment]


async def classify_form(form: FormData) -> dict[str, Any]:
    """Fields `image`, `labels` (repeated, or one comma-separated value), `templates` and `top_k`."""
    labels = form_texts(form, "labels")
    if len(labels) == 1 and "," in labels[0]:
        labels = [x.strip() for x in labels[0].split(",") if x.strip()]
    data = with_image({"labels": labels}, await form_images(form, "image"))
    templates = form_texts(form, "templates")
    if templates:
        data["templates"] = templates
    return data | form_values(form, "top_k")


classify_body = BodyParser(
    ClassifyInput,
    classify_form,
    schema=ClassifyRequest,
    form_fields={
        "image": {"type": "string", "format": "binary"},
        "labels": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer"},
    },
)


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=classify_body.openapi)
async def classify(
    state: State, limits: Limits, body: Annotated[ClassifyInput, Depends(classify_body)]
) -> JSONResponse:
    """Zero-shot: rank the given labels for one image, with probabilities."""
    if not body.labels:
        raise ApiError(400, "labels is empty; send at least one candidate label", param="labels")
    if len(body.labels) > state.settings.max_labels:
        raise ApiError(
            400, f"{len(body.labels)} labels; the limit is {state.settings.max_labels}", param="labels"
        )
    limits.texts(body.labels, "labels")
    if body.templates is not None:
        if not body.templates or len(body.templates) > MAX_TEMPLATES:
            raise ApiError(400, f"templates must list 1 to {MAX_TEMPLATES} prompts", param="templates")
        limits.texts(body.templates, "templates")
    ranked = await state.model.classify(body.image, body.labels, body.templates)
    if body.top_k is not None:
        ranked = ranked[: body.top_k]
    return JSONResponse(
        {"model": state.model.name, "labels": [{"label": lb, "probability": p} for lb, p in ranked]}
    )
