"""Serving benchmark: dynamic batching vs one-request-one-forward (max_batch=1), same machine, same run.

Starts two `duomo serve` processes on 127.0.0.1 (one with dynamic batching, one with --max-batch 1), then, for
each kind of request and each number of concurrent clients, alternates between them `--repeats` times,
each time for `--seconds`. Every client sends one embedding request at a time (one text, or one small image
as a data URL) to /v1/embeddings and waits for the answer. Prints requests/s (median over repeats) and p50/p99
latency (over all requests) per setting, and the batched/unbatched throughput ratio.

    python bench/serve_bench.py                      # text and image, 1/4/16/64 clients
    python bench/serve_bench.py --kinds text --seconds 3 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = [
    "red",
    "green",
    "blue",
    "small",
    "large",
    "photo",
    "drawing",
    "cat",
    "dog",
    "boat",
    "car",
    "tree",
    "house",
    "sky",
    "river",
    "city",
    "night",
]


@dataclass
class Server:
    """One `duomo serve` subprocess."""

    name: str
    max_batch: int
    max_wait_ms: float
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Result:
    """Measurements of one (server, kind, clients) setting over all repeats."""

    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def free_port() -> int:
    """A port that is free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: Server, args: argparse.Namespace) -> None:
    """Launch the server process and wait until /healthz answers."""
    server.port = free_port()
    cmd = [sys.executable, "-m", "duomo", "serve", "--no-index", "--port", str(server.port)]
    cmd += ["--max-batch", str(server.max_batch), "--max-wait-ms", str(server.max_wait_ms)]
    cmd += ["--max-queue", "1024", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    server.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} server exited with code {server.proc.returncode}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{server.name} server did not start")


def stop(server: Server) -> None:
    """Ask the server to shut down (SIGINT, like Ctrl-C) and wait."""
    if server.proc and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def image_payload(seed: int) -> str:
    """A 64x64 PNG with random rectangles, as a data URL."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(48), rng.randrange(48)
        draw.rectangle((x, y, x + 16, y + 16), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the load generator must cost little CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: bytes) -> int:
        """POST a JSON body and read the whole response; returns the status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        """Close the socket."""
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, kind: str, clients: int, seconds: float, images: list[str]
) -> tuple[int, list[float], int]:
    """`clients` closed-loop clients for `seconds`: (completed requests, latencies in s, errors)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").split(":")

    async def client(cid: int) -> None:
        nonlocal errors
        rng = random.Random(cid)
        conn = Connection(host, int(port))
        n = 0
        try:
            while time.perf_counter() < stop_at:
                if kind == "text":
                    payload = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
                else:
                    payload = images[(cid + n) % len(images)]
                n += 1
                body = json.dumps(
                    {"input": payload, "model": "default", "encoding_format": "base64"}
                ).encode()
                t = time.perf_counter()
                status = await conn.post_json("/v1/embeddings", body)
                if status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return len(latencies), latencies, errors


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values, or nan."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> None:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model name (default: duomo's default model)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--kinds", default="text,image", help="text, image or both")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (alternating servers)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS for the servers (0: default)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    servers = [Server("batched", args.max_batch, args.max_wait_ms), Server("max_batch=1", 1, 0.0)]
    images = [image_payload(i) for i in range(32)]
    results: dict[tuple[str, str, int], Result] = {}
    try:
        for s in servers:
            start(s, args)
        for s in servers:  # warm up: first calls allocate
            asyncio.run(load(s.url, "text", 4, 1.0, images))
            if "image" in kinds:
                asyncio.run(load(s.url, "image", 4, 1.0, images))
        for kind in kinds:
            for clients in levels:
                for _ in range(args.repeats):
                    for s in servers:
                        done, lat, err = asyncio.run(load(s.url, kind, clients, args.seconds, images))
                        res = results.setdefault((s.name, kind, clients), Result())
                        res.rates.append(done / args.seconds)
                        res.latencies += lat
                        res.errors += err
                        print(
                            f"  {kind:5} {clients:3} clients {s.name:12} {done / args.seconds:8.1f} req/s",
                            flush=True,
                        )
    finally:
        for s in servers:
            stop(s)

    model = args.model or "default"
    print(f"\nmodel: {model} · CPUs: {os.cpu_count()} · {args.seconds:g} s x {args.repeats} runs per setting")
    print(f"batched = --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}\n")
    cols = f"| {'kind':5} | {'clients':>7} | {'server':12} | {'req/s':>8} | "
    header = cols + f"{'p50 ms':>8} | {'p99 ms':>8} | errors |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for kind in kinds:
        for clients in levels:
            for s in servers:
                r = results[(s.name, kind, clients)]
                print(
                    f"| {kind:5} | {clients:>7} | {s.name:12} | {statistics.median(r.rates):8.1f} | "
                    f"{percentile(r.latencies, 50) * 1000:8.1f} | "
                    f"{percentile(r.latencies, 99) * 1000:8.1f} | {r.errors:>6} |"
                )
    print()
    for kind in kinds:
        ratios = []
        for clients in levels:
            b = statistics.median(results[("batched", kind, clients)].rates)
            u = statistics.median(results[("max_batch=1", kind, clients)].rates)
            ratios.append(f"{clients} clients {b / u:.2f}x")
        print(f"{kind}: batched / max_batch=1 throughput: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
