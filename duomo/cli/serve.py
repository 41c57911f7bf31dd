"""`duomo serve`: run the HTTP API and web page with uvicorn."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model name, checkpoint or path (default: the index's model, else duomo's).",
    ),
    index: Path = typer.Option(None, "--index", help="Image index for /search (default: duomo's index dir)."),
    no_index: bool = typer.Option(False, "--no-index", help="Serve embeddings only: no /search, no /images."),
    vqa_model: Path = typer.Option(
        None, "--vqa-model", help="BEiT-3 VQA model folder (duomo beit3-train vqa --out) to serve at /vqa."
    ),
    caption_model: Path = typer.Option(
        None, "--caption-model", help="BEiT-3 captioning model folder to serve at /caption."
    ),
    caption_guide: str = typer.Option(
        "auto",
        "--caption-guide",
        help="CLIP guiding /caption's beam search: auto (the one the captioner's image tower came from), "
        "none, or a duomo model name or folder.",
    ),
    generator: str = typer.Option(
        None, "--generator", help="Text-to-image generator for /v1/images/generations (e.g. shapes-gen)."
    ),
    chat: str = typer.Option(
        None, "--chat", help="Chat model for /v1/chat/completions (e.g. shapes-chat, smollm2, a .gguf)."
    ),
    chat_fetch_urls: bool = typer.Option(
        False,
        "--chat-fetch-urls",
        help="Fetch http(s) image URLs in chat requests (default: data: URLs only).",
    ),
    task_timeout: float = typer.Option(
        60.0, "--task-timeout", min=0.001, help="Seconds a /vqa or /caption request may take before a 504."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all interfaces)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
    backend: str = typer.Option(
        "torch", "--backend", help="torch, onnxruntime or onnxruntime-int8 (exported once, cached)."
    ),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most items in one model call."),
    max_wait_ms: float = typer.Option(0.0, "--max-wait-ms", min=0, help="Longest an item waits for a batch."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Items waiting per queue before 429s."),
    api_key: list[str] = typer.Option(
        None, "--api-key", help="Accepted Bearer key (repeatable; also $DUOMO_API_KEYS, comma-separated)."
    ),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.01, help="Largest request body, in MiB."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve embeddings, chat and images (OpenAI-compatible), zero-shot labels, search, VQA and captions."""
    import uvicorn

    from duomo.serve import ServeSettings, create_app
    from duomo.serve.security import api_keys_from_env

    keys = list(dict.fromkeys([*(api_key or []), *api_keys_from_env()]))
    settings = ServeSettings(
        model=model,
        device=device,
        backend=backend,
        index_dir=index,
        use_index=not no_index,
        vqa_model=vqa_model,
        caption_model=caption_model,
        caption_guide=caption_guide,
        generator=generator,
        chat=chat,
        chat_fetch_urls=chat_fetch_urls,
        task_timeout_s=task_timeout,
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        api_keys=keys,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
    )
    app = create_app(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        typer.echo(
            f"warning: listening on {host} without API keys: anyone who can reach it can use it", err=True
        )
    typer.echo(f"duomo serve: http://{host}:{port}/  (model {app.state.duomo.model.name})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=15)


def register(app: typer.Typer) -> None:
    """Add the `serve` command."""
    app.command("serve")(serve)
