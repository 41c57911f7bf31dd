"""Does decoding concurrent chat requests together pay? Requests/s, tokens/s and latency of the server's chat
service with 1, 4 and 16 concurrent clients (their decode steps merged: continuous batching) against the same
requests one at a time, interleaved per round in one process. Greedy, a fixed reply length.

    python bench/serve_chat.py --model smollm2 --clients 1 4 16 --tokens 32 --rounds 2 \
        --json bench/results/serve_chat.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import duomo  # noqa: E402
from duomo.serve.batcher import model_executor  # noqa: E402
from duomo.serve.chat import ChatService  # noqa: E402
from duomo.tasks.lm.decode import Completion, DecodeSettings  # noqa: E402

QUESTIONS = ["What is a circle?", "Name a red fruit.", "What is rain?", "Say hello.", "What is a star?"]


async def one(service: ChatService, i: int, tokens: int) -> tuple[float, float, int]:
    """(latency, time to first piece, tokens) of one request."""
    start = time.perf_counter()
    first = None
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    settings = DecodeSettings(max_tokens=tokens, stop=())
    done = None
    async for item in service.complete(messages, [], settings):
        if first is None:
            first = time.perf_counter() - start
        if isinstance(item, Completion):
            done = item
    return time.perf_counter() - start, first or 0.0, len(done.tokens) if done else 0


async def run(service: ChatService, clients: int, tokens: int, together: bool) -> dict:
    calls = service.decode_calls
    start = time.perf_counter()
    if together:
        results = await asyncio.gather(*(one(service, i, tokens) for i in range(clients)))
    else:
        results = [await one(service, i, tokens) for i in range(clients)]
    seconds = time.perf_counter() - start
    return {
        "requests_per_s": clients / seconds,
        "tokens_per_s": sum(r[2] for r in results) / seconds,
        "latency_p50": statistics.median(r[0] for r in results),
        "first_piece_p50": statistics.median(r[1] for r in results),
        "decode_calls": service.decode_calls - calls,
    }


async def main_async(args: argparse.Namespace) -> dict:
    pipe = duomo.load(args.model)
    pipe.end_ids = ()  # every reply is exactly --tokens long: equal work in both modes
    service = ChatService(pipe, model_executor(), name=args.model, max_batch=max(args.clients), max_queue=256,
                          max_tokens=args.tokens)  # fmt: skip
    await service.start()
    await run(service, 2, 4, True)  # warm-up
    table: dict[str, dict[str, list[dict]]] = {}
    for _ in range(args.rounds):
        for clients in args.clients:
            for mode, together in (("one_at_a_time", False), ("together", True)):
                row = await run(service, clients, args.tokens, together)
                table.setdefault(str(clients), {}).setdefault(mode, []).append(row)
    await service.close()
    median = {
        c: {m: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for m, rows in modes.items()}
        for c, modes in table.items()
    }
    for modes in median.values():
        modes["speedup_requests_per_s"] = (
            modes["together"]["requests_per_s"] / modes["one_at_a_time"]["requests_per_s"]
        )
    return {"model": args.model, "tokens": args.tokens, "threads": torch.get_num_threads(), "median": median,
            "runs": table}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result["median"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
