"""Helpers for the server tests: generated images, data URLs, and a live uvicorn server in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def png_bytes(color: tuple[int, int, int] = (200, 40, 40), size: int = 48, shape: str = "circle") -> bytes:
    """A small PNG of one colored shape on white."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """A data: URL of raw bytes."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def write_images(folder: Path) -> list[Path]:
    """Eight generated images (4 colors x circle/square) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, color in COLORS.items():
        for shape in ("circle", "square"):
            path = folder / f"{name}_{shape}.png"
            path.write_bytes(png_bytes(color, 48, shape))
            paths.append(path)
    return paths


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 at a free port in a thread; yield its base URL; stop it after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    app.state.uvicorn_server = server  # lets a test stop it early
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
