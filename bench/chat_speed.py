"""Decoding speed of SmolLM2-135M-Instruct: duomo against transformers `generate`, both reading the same GGUF
file, greedy with a KV cache, the same prompts, interleaved A/B per round in one process.

    python bench/chat_speed.py --rounds 3 --tokens 64 --json bench/results/chat_speed.json

Time to first token: the prompt through the model and one token out. Tokens/s: `--tokens` new tokens
(end-of-turn ignored on both sides so the counts are equal), divided by the whole call's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from duomo.io.chat import packaged_gguf, read_lm  # noqa: E402
from duomo.tasks.lm.decode import DecodeSettings, complete  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about cats.",
    "Explain what a computer is.",
    "Name three colours of the rainbow.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    model, tok = read_lm("smollm2")
    path = packaged_gguf("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    prompts = [tok.encode(tok.render([{"role": "user", "content": p}])) for p in PROMPTS]

    def ours(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        out = complete(model, tok, ids, DecodeSettings(max_tokens=n))
        assert len(out.tokens) == n
        return time.perf_counter() - start

    def theirs(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - start

    for ids in prompts[:1]:  # warm-up
        ours(ids, 4), theirs(ids, 4)
    rows = {"duomo": {"ttft": [], "tps": []}, "transformers": {"ttft": [], "tps": []}}
    for _ in range(args.rounds):
        for ids in prompts:
            for name, fn in (("duomo", ours), ("transformers", theirs)):
                rows[name]["ttft"].append(fn(ids, 1))
                rows[name]["tps"].append(args.tokens / fn(ids, args.tokens))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    result = {
        "median": med,
        "ratio_tokens_per_s": med["duomo"]["tps"] / med["transformers"]["tps"],
        "ratio_ttft": med["transformers"]["ttft"] / med["duomo"]["ttft"],
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"machine": machine(), **result, "runs": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
