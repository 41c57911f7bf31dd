"""Every error the server returns has OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from duomo.errors import DuomoError

log = logging.getLogger("duomo.serve")

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with an OpenAI-style body; raise it anywhere in a request."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.message = message
        self.type = type
        self.code = code
        self.param = param


def error_type(status: int) -> str:
    """The OpenAI-style `type` for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response."""
    body = {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON; send application/json", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{where}: {msg}{more}" if where else f"{msg}{more}"), (where or None)


def install_error_handlers(app: FastAPI) -> None:
    """Map ApiError, DuomoError, validation errors, HTTP errors and crashes to JSON error bodies."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status_code, exc.message, type=exc.type, code=exc.code, param=exc.param, headers=exc.headers
        )

    @app.exception_handler(DuomoError)
    async def _duomo_error(request: Request, exc: DuomoError) -> JSONResponse:
        status = int(getattr(exc, "status_code", 400))
        headers = None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(retry_after)}
        elif status == 503:
            headers = {"Retry-After": "5"}
        code = "model_not_found" if type(exc).__name__ == "UnknownModelError" else None
        return error_response(status, str(exc) or type(exc).__name__, code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the server log", type="server_error")
