"""Does stepping concurrent image requests together pay? Requests/s of the server's generation service with K
concurrent clients (their denoiser calls merged, iteration-level batching) against the same K requests one
at a time, interleaved A/B/A/B in one process; the images are the same either way.

    python bench/serve_generate.py --model shapes-gen --clients 8 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

import duomo
from duomo.serve.batcher import model_executor
from duomo.serve.generation import GenerationService


async def run(service: GenerationService, clients: int, steps: int, together: bool) -> tuple[float, int]:
    """(seconds, denoiser calls) for `clients` one-image requests, concurrent or one after another."""
    calls = service.denoiser_calls
    start = time.perf_counter()
    prompts = [f"a {c} star" for c in ("red", "blue", "green", "pink", "cyan", "purple", "orange", "yellow")]
    jobs = [(prompts[i % len(prompts)], i) for i in range(clients)]
    if together:
        await asyncio.gather(*(service.generate(p, n=1, steps=steps, seed=s) for p, s in jobs))
    else:
        for p, s in jobs:
            await service.generate(p, n=1, steps=steps, seed=s)
    return time.perf_counter() - start, service.denoiser_calls - calls


async def main_async(args: argparse.Namespace) -> dict:
    pipe = duomo.load(args.model)
    service = GenerationService(
        pipe, model_executor(), name=args.model, max_batch=args.clients, max_queue=256
    )
    await service.start()
    await run(service, 2, 2, True)  # warm-up
    rows = {"together": [], "one_at_a_time": []}
    calls = {}
    for _ in range(args.rounds):
        for mode, together in (("one_at_a_time", False), ("together", True)):
            seconds, n_calls = await run(service, args.clients, args.steps, together)
            rows[mode].append(args.clients / seconds)
            calls[mode] = n_calls
    await service.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": args.model,
        "clients": args.clients,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "requests_per_s": rows,
        "median_requests_per_s": med,
        "denoiser_calls": calls,
        "speedup": med["together"] / med["one_at_a_time"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes-gen")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/serve_generate.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
