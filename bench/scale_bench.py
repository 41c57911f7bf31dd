"""1 worker vs 2 on this machine: training (one process with 2 threads vs `torchrun --nproc_per_node 2`, one
thread each, DDP and FSDP2) and collection embedding (in-process with 2 threads vs 2 Ray actors of 1 thread).

    python bench/scale_bench.py --steps 40 --images 400 --json bench/results/scale.json

Training: `recipes/shapes-tiny.json`'s model on the shapes world, the same global batch either way; the
samples/s of steps 11..N from metrics.jsonl. Embedding: `duomo embed-collection` of generated PNGs with
shapes-tiny, images/s of the whole job (Ray: cluster start excluded, actor start included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def train_rate(out: Path, steps: int, procs: int, fsdp: bool = False) -> float:
    config = out.with_suffix(".json")
    fields = {"model": "shapes-tiny", "data": "shapes", "data_size": 4000, "steps": steps, "workers": 0,
              "batch_size": 64 // procs, "log_every": 1, "quiet": True, "plot": False}  # fmt: skip
    config.write_text(json.dumps(fields))
    args = ["train", "-c", str(config), "--out", str(out), "--overwrite"]
    if fsdp:
        args.append("--fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs), "CI": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "duomo", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "duomo", *args]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    rates = [json.loads(x)["samples_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()][10:]
    return statistics.median(rates)


def embed_rate(images: Path, out: Path, ray_address: str | None) -> float:
    from duomo.index.collection import run_collection_job

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = run_collection_job(images, out, "shapes-tiny", partition_size=50, batch_size=32,
                                use_ray=ray_address is not None, address=ray_address, actors=2)  # fmt: skip
    return result["vectors"] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="duomo-scale-"))
    result: dict = {"cpus": os.cpu_count()}
    result["train_1x2threads"] = train_rate(work / "t1", args.steps, 1)
    result["train_ddp_2x1thread"] = train_rate(work / "t2", args.steps, 2)
    result["train_fsdp_2x1thread"] = train_rate(work / "t3", args.steps, 2, fsdp=True)
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    import torch

    torch.set_num_threads(2)
    result["embed_1x2threads"] = embed_rate(images, work / "e1", None)
    port = "6398"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    start = [ray_bin, "start", "--head", "--num-cpus", "2", "--port", port, "--include-dashboard", "false"]
    subprocess.run([*start, "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        result["embed_ray_2x1thread"] = embed_rate(images, work / "e2", f"127.0.0.1:{port}")
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
