"""POST /v1/chat/completions: OpenAI's chat API on the served chat model, images as image_url parts
(data: URLs; http(s) URLs only when the operator allows fetching), streaming as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from duomo.data.conversations import IMAGE_PLACEHOLDER
from duomo.errors import DuomoError, InputError
from duomo.serve.deps import BodyParser, State
from duomo.serve.errors import ApiError
from duomo.serve.schemas import ChatCompletionRequest
from duomo.serve.service import image_bytes
from duomo.tasks.lm.decode import Completion, DecodeSettings

router = APIRouter(tags=["openai"])
chat_body = BodyParser(ChatCompletionRequest)


def _text_of(content: Any, role: str) -> tuple[str, list[str]]:
    """A message's text (an "<image>" where each image part was) and its image URLs."""
    if isinstance(content, str):
        if IMAGE_PLACEHOLDER in content:
            raise InputError(f"send images as image_url parts, not as {IMAGE_PLACEHOLDER} in text")
        return content, []
    if not isinstance(content, list):
        raise InputError("message content must be a string or a list of parts")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_PLACEHOLDER in part["text"]:
                raise InputError(f"send images as image_url parts, not as {IMAGE_PLACEHOLDER} in text")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise InputError("images belong in user messages")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise InputError("an image_url part needs a url")
            texts.append(IMAGE_PLACEHOLDER)
            urls.append(url)
        else:
            raise InputError(f"unknown content part {kind!r}; use text or image_url")
    return "\n".join(texts), urls


def parse_messages(raw: list[dict[str, Any]], max_images: int) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> duomo messages (text with placeholders) and the image URLs in order."""
    if not raw:
        raise InputError("messages is empty; send at least one user message")
    messages, urls = [], []
    for m in raw:
        role = m.get("role") if isinstance(m, dict) else None
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise InputError(f"unknown role {role!r}; use system, user or assistant")
        text, found = _text_of(m.get("content", ""), role)
        messages.append({"role": role, "content": text})
        urls += found
    if len(urls) > max_images:
        raise InputError(f"{len(urls)} images in one request; at most {max_images}")
    return messages, urls


async def fetch_image(url: str, state: Any) -> bytes | str:
    """A data: URL as is; an http(s) URL fetched within the size and time limits when allowed."""
    if url.startswith("data:"):
        return image_bytes(url, "image_url")
    if not url.startswith(("http://", "https://")):
        raise InputError("image_url must be a data:image/... URL")
    settings = state.settings
    if not settings.chat_fetch_urls:
        raise InputError(
            "this server does not fetch image URLs; send the image as a data:image/...;base64 URL "
            "(operators: duomo serve --chat-fetch-urls)"
        )
    import httpx

    limit = settings.max_body_bytes
    try:
        client = httpx.AsyncClient(timeout=settings.chat_fetch_timeout_s, follow_redirects=False)
        async with client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise InputError(f"fetching {url} gave HTTP {response.status_code}")
            data = b""
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise InputError(f"the image at {url} is larger than {limit} bytes")
    except httpx.HTTPError as exc:
        raise InputError(f"could not fetch {url}: {type(exc).__name__}") from exc
    return data


def _settings(body: ChatCompletionRequest, service: Any) -> DecodeSettings:
    if body.n != 1:
        raise InputError("n must be 1 on this server")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise InputError("at most 4 stop strings")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, service.max_tokens)
    if not 1 <= max_tokens <= service.max_tokens:
        raise InputError(f"max_tokens must be between 1 and {service.max_tokens}")
    return DecodeSettings(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        repetition_penalty=body.repetition_penalty, stop=tuple(stops), seed=body.seed,
    )  # fmt: skip


def _usage(done: Completion) -> dict[str, int]:
    prompt = int(getattr(done, "prompt_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(done.tokens),
        "total_tokens": prompt + len(done.tokens),
    }


@router.post("/v1/chat/completions", openapi_extra=chat_body.openapi)
async def chat_completions(
    request: Request, state: State, body: Annotated[ChatCompletionRequest, Depends(chat_body)]
) -> Response:
    """A reply to a conversation (with images), compatible with `client.chat.completions.create`."""
    service = state.chat
    if service is None:
        raise ApiError(
            404, "this server has no chat model; start it with `duomo serve --chat shapes-chat`",
            code="model_not_found", param="model",
        )  # fmt: skip
    if body.model not in (None, "", "default", service.name):
        raise ApiError(
            404, f"model {body.model!r} is not served here; this server chats with {service.name!r} "
            "or 'default'",
            code="model_not_found", param="model",
        )  # fmt: skip
    try:
        settings = _settings(body, service)
        messages, urls = parse_messages(body.messages, state.settings.max_chat_images)
        images = [await fetch_image(u, state) for u in urls]
        pieces = service.complete(messages, images, settings)
        first = await asyncio.wait_for(anext(pieces), state.settings.chat_timeout_s)
    except TimeoutError as exc:
        raise ApiError(504, "the chat model did not start answering in time", code="timeout") from exc
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    ident, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), service.name
    if not body.stream:
        text_parts, done = [], first
        try:
            while not isinstance(done, Completion):
                text_parts.append(done)
                done = await asyncio.wait_for(anext(pieces), state.settings.chat_timeout_s)
        except TimeoutError as exc:
            await pieces.aclose()
            raise ApiError(504, "the reply took too long", code="timeout") from exc
        return JSONResponse(
            {
                "id": ident, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": _usage(done),
            }
        )  # fmt: skip
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return event({**head, "choices": [choice]})

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"

    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}

    async def events() -> AsyncIterator[str]:
        item: Any = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if isinstance(item, Completion):
                    yield chunk({}, item.finish_reason)
                    if include_usage:
                        yield event({**head, "choices": [], "usage": _usage(item)})
                    yield "data: [DONE]\n\n"
                    return
                yield chunk({"content": item})
                if await request.is_disconnected():
                    return
                item = await asyncio.wait_for(anext(pieces), state.settings.chat_timeout_s)
        except (DuomoError, TimeoutError) as exc:
            yield event({"error": {"message": str(exc) or "timed out", "type": "server_error"}})
        finally:
            await pieces.aclose()  # frees the request's row in the decode batch

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
