"""Request safety: optional Bearer API keys, and a hard limit on request body size."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from duomo.serve.errors import ApiError, error_type

API_KEYS_ENV = "DUOMO_API_KEYS"


def api_keys_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Keys from $DUOMO_API_KEYS (comma-separated; blanks ignored)."""
    raw = (environ if environ is not None else os.environ).get(API_KEYS_ENV, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every accepted key."""
    given_b = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_b, key.encode())
    return found


def is_authorized(request: Request) -> bool:
    """Whether a request may see what only key holders see: no keys set, or it sends a valid one."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip()) and key_matches(token.strip(), keys)


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: when the server has API keys, the request must send `Authorization: Bearer KEY`."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(token.strip(), keys):
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BodyTooLarge(ApiError):
    """Raised from `receive` when a body passes the limit; FastAPI re-raises HTTP exceptions as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes; send smaller or fewer images")


class BodySizeLimitMiddleware:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, 413, BodyTooLarge(self.max_bytes).message)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_error(send, 413, exc.message)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": error_type(status), "param": None, "code": None}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
