"""FastAPI dependencies shared by the routes: the server state, its input limits, parsed request bodies."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from duomo.limits import MAX_JSON_DEPTH
from duomo.serve.errors import ApiError
from duomo.serve.settings import ServeSettings
from duomo.serve.state import ServerState

M = TypeVar("M", bound=BaseModel)
FormReader = Callable[[FormData], Awaitable[dict[str, Any]]]
"""Turns a multipart form into the dict a body model validates (a JSON body's equivalent)."""

MAX_FORM_PART = 1024 * 1024  # bytes of one non-file form field


def get_state(request: Request) -> ServerState:
    """The server's services, attached to the app by create_app."""
    return request.app.state.duomo


State = Annotated[ServerState, Depends(get_state)]


class InputLimits:
    """The settings' limits on texts and inputs per request, as checks that raise 400."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    def count(self, n: int, what: str) -> None:
        """Reject empty requests and requests with more inputs than allowed."""
        if n == 0:
            raise ApiError(400, f"no {what} given; send at least one")
        if n > self.settings.max_inputs:
            raise ApiError(400, f"{n} {what} in one request; the limit is {self.settings.max_inputs}")

    def texts(self, texts: list[str], param: str) -> None:
        """Reject empty or overlong texts."""
        limit = self.settings.max_text_chars
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(400, f"{param}[{i}] is empty; send non-empty text", param=param)
            if len(text) > limit:
                raise ApiError(
                    400, f"{param}[{i}] has {len(text)} characters; the limit is {limit}", param=param
                )


def get_limits(state: State) -> InputLimits:
    """The server's input limits."""
    return InputLimits(state.settings)


Limits = Annotated[InputLimits, Depends(get_limits)]


def require_task(task: str) -> Callable[[ServerState], str]:
    """Dependency factory: the name of the model serving `task` ('vqa', 'caption'); 503 if there is none."""

    def task_model(state: State) -> str:
        """The task's model name (503 from TaskService.require when it has none)."""
        return state.tasks.require(task)

    return task_model


class BodyParser(Generic[M]):
    """Dependency: the JSON object or (given `from_form`) multipart form body, validated as `model`.

    Errors: 400 for an empty, malformed or invalid body, 415 for another content type. `schema` (default:
    `model`) and `form_fields` document the body in OpenAPI via `openapi`, as the route declares no body.
    """

    def __init__(
        self,
        model: type[M],
        from_form: FormReader | None = None,
        *,
        schema: type[BaseModel] | None = None,
        form_fields: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.from_form = from_form
        self.schema = schema or model
        self.form_fields = form_fields or {}

    @property
    def openapi(self) -> dict[str, Any]:
        """The route's `openapi_extra`: a required JSON body and, where accepted, multipart/form-data."""
        content: dict[str, Any] = {"application/json": {"schema": self.schema.model_json_schema()}}
        if self.from_form is not None:
            content["multipart/form-data"] = {"schema": {"type": "object", "properties": self.form_fields}}
        return {"requestBody": {"required": True, "content": content}}

    async def __call__(self, request: Request, state: State) -> M:
        """The parsed, validated body of `request`."""
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype in ("", "application/json") or ctype.endswith("+json"):
            data = await read_json(request)
        elif ctype == "multipart/form-data" and self.from_form is not None:
            data = await self.from_form(await read_form(request, state.settings))
        else:
            accepted = "application/json or multipart/form-data" if self.from_form else "application/json"
            raise ApiError(415, f"unsupported content type {ctype!r}; send {accepted}")
        try:
            return self.model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 400 if it is empty, not JSON, or not an object."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError as exc:  # the C parser gives up near 1000 levels; a 500 before this
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def read_form(request: Request, settings: ServeSettings) -> FormData:
    """The body as a multipart form within the input limits; 400 if it is malformed."""
    try:
        return await request.form(
            max_files=settings.max_inputs, max_fields=settings.max_inputs + 16, max_part_size=MAX_FORM_PART
        )
    except ApiError:
        raise
    except Exception as exc:  # MultiPartException or HTTPException from a malformed form
        detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
        raise ApiError(400, f"malformed multipart/form-data body: {detail}") from exc


async def form_images(form: FormData, field: str) -> list[str | bytes]:
    """Uploaded files (bytes) and text values (base64 / data URLs) of one form field."""
    out: list[str | bytes] = []
    for value in form.getlist(field):
        out.append(await value.read() if isinstance(value, UploadFile) else value)
    return out


def form_texts(form: FormData, field: str) -> list[str]:
    """The text values of one form field (uploaded files left out)."""
    return [v for v in form.getlist(field) if isinstance(v, str)]


def form_values(form: FormData, *fields: str) -> dict[str, Any]:
    """The given fields that are present and not blank, as sent (the body model converts them)."""
    return {field: form.get(field) for field in fields if form.get(field) not in (None, "")}


def with_image(data: dict[str, Any], images: list[str | bytes]) -> dict[str, Any]:
    """`data` with `image` set: the one image sent, or the list (which the body model rejects) if several."""
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    return data
