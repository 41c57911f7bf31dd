"""`create_app(settings)`: the FastAPI application behind `duomo serve`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from duomo.api import Pipeline
from duomo.errors import DuomoError
from duomo.serve.errors import install_error_handlers
from duomo.serve.metrics import ServerMetrics
from duomo.serve.routes import protected, public
from duomo.serve.search import IndexService
from duomo.serve.security import BodySizeLimitMiddleware
from duomo.serve.service import ModelService
from duomo.serve.settings import ServeSettings
from duomo.serve.state import ServerState
from duomo.serve.tasks import TaskService

log = logging.getLogger("duomo.serve")

STATIC_DIR = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request(endpoint, scope.get("method", ""), status, time.perf_counter() - started)


def resolve_index_dir(settings: ServeSettings) -> Path | None:
    """The index directory to open: the configured one, else duomo's default, else none."""
    if not settings.use_index:
        return None
    if settings.index_dir is not None:
        return Path(settings.index_dir).expanduser()
    try:
        from duomo.index import default_index_dir
    except ImportError:  # an install without the index module: serve embeddings only
        return None
    return Path(default_index_dir())


def index_model(index_dir: Path | None) -> str | None:
    """The model an existing index was built with (None if there is no index or it records none)."""
    if index_dir is None or not index_dir.is_dir() or not any(index_dir.iterdir()):
        return None  # opening would create an index: leave that to `duomo index`
    try:
        from duomo.index.sharded import open_any_index

        with open_any_index(index_dir, None) as idx:
            return idx.model_name
    except (ImportError, DuomoError, OSError) as exc:
        log.warning("cannot read the model of the index at %s: %s", index_dir, exc)
        return None


def create_app(settings: ServeSettings | None = None, *, pipeline: Pipeline | None = None) -> FastAPI:
    """Build the app: load the model (unless `pipeline` is given), the index and the VQA/caption models.

    Without a model in the settings, the server uses the index's own model (as `duomo index` does), else
    duomo's default model.
    """
    settings = settings or ServeSettings()
    index_dir = resolve_index_dir(settings)
    if pipeline is None:
        from duomo.api import load
        from duomo.io.resolve import choose_default_model

        name = settings.model or index_model(index_dir)
        if name is None:
            name, notice = choose_default_model()
            if notice:
                log.warning("%s", notice)
        pipeline = load(name, device=settings.device, backend=settings.backend)
    metrics = ServerMetrics()
    model = ModelService(pipeline, settings, observer=metrics)
    index = IndexService(index_dir, pipeline)
    tasks = TaskService(settings, model.executor, model.decoder, observer=metrics, device=pipeline.device)
    generation = None
    if settings.generator:
        from duomo.api import load
        from duomo.api.generate import GeneratorPipeline
        from duomo.errors import InputError
        from duomo.serve.generation import GenerationService

        generator = load(settings.generator, device=settings.device)
        if not isinstance(generator, GeneratorPipeline):
            raise InputError(f"--generator {settings.generator!r} is not a text-to-image generator")
        generation = GenerationService(
            generator,
            model.executor,
            name=Path(settings.generator).name,
            max_batch=settings.generate_batch,
            max_queue=max(settings.max_generate_n, settings.max_queue // 4),
            max_n=settings.max_generate_n,
            max_steps=settings.max_generate_steps,
            max_side=settings.max_generate_side,
            observer=metrics,
        )
    chat = None
    if settings.chat:
        from duomo.api import load
        from duomo.api.chat import ChatPipeline
        from duomo.errors import InputError
        from duomo.serve.chat import ChatService

        bot = load(settings.chat, device=settings.device)
        if not isinstance(bot, ChatPipeline):
            raise InputError(f"--chat {settings.chat!r} is not a chat model (shapes-chat, smollm2, a .gguf)")
        chat = ChatService(
            bot,
            model.executor,
            name=Path(settings.chat).name,
            max_batch=settings.chat_batch,
            max_queue=max(4, settings.max_queue // 4),
            max_tokens=settings.max_chat_tokens,
            observer=metrics,
        )
    state = ServerState(
        settings=settings,
        metrics=metrics,
        model=model,
        index=index,
        tasks=tasks,
        generation=generation,
        chat=chat,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await model.start()
        await tasks.start()
        if generation is not None:
            await generation.start()
        if chat is not None:
            await chat.start()
        log.info("duomo serve: model %s (dim %d), index %s", model.name, model.dim, index.index_dir)
        for task, name in tasks.names.items():
            log.info("duomo serve: /%s model %s", task, name)
        try:
            yield
        finally:
            state.draining = True
            if generation is not None:
                await generation.close(drain=True, timeout=settings.drain_timeout_s)
            if chat is not None:
                await chat.close(drain=True, timeout=settings.drain_timeout_s)
            await tasks.close(drain=True)  # before the model service stops the model thread they share
            await model.close(drain=True)
            index.close()

    from duomo.version import __version__

    app = FastAPI(
        title="duomo",
        version=__version__,
        description=(
            "Image+text embeddings (OpenAI-compatible), zero-shot classification, image search, and (with "
            "BEiT-3 task models) visual question answering and captioning."
        ),
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.duomo = state
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: schema_as_served(app)  # type: ignore[method-assign]
    return app


# Statuses a route answers besides the shared ones (routes.ERRORS), so the schema says what really happens.
EXTRA_STATUSES = {"/images/{ref}": (403,), "/vqa": (504,), "/caption": (504,)}


def schema_as_served(app: FastAPI) -> dict:
    """FastAPI's OpenAPI schema, corrected to what the server does: invalid parameters are 400 (the error
    handlers turn FastAPI's 422 into 400), /images answers 403 for paths outside the index, /vqa and
    /caption 504 past their time limit."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            invalid = responses.pop("422", None)
            if invalid is not None and "400" not in responses:
                responses["400"] = {
                    "description": "Bad Request",
                    "content": {"application/json": {"schema": error}},
                }
            for status in EXTRA_STATUSES.get(path, ()):
                responses.setdefault(
                    str(status), {"description": "Error", "content": {"application/json": {"schema": error}}}
                )
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
