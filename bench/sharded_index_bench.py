"""The sharded on-disk index at 1M and 10M vectors: build time, peak memory, size on disk, recall@10 against
exact search and single-query latency (p50/p99), through duomo's own builder and searcher.

    python bench/sharded_index_bench.py --sizes 1000000 10000000 --out bench/results/sharded_index.json

Vectors are generated chunk by chunk (never all in RAM): 512-d, clustered with a low intrinsic dimension like
real image embeddings (4,096 centres in a 64-d latent space, mapped to 512-d by a fixed random matrix, plus
isotropic noise; rows L2-normalised). Queries are fresh draws from the same distribution (not in the index).
The exact top 10 of every query is kept while the chunks stream past (float32, the original vectors), so
recall@10 = |approximate top 10 ∩ exact top 10| / 10, averaged over the queries.

Each size is built in one child process and searched in another, so each phase's peak memory (ru_maxrss)
is its own. Search latency is per query (what the server does), after a warm-up pass over the queries, on
this 2-core machine with the page cache as the build left it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM, LATENT, CENTRES, CHUNK = 512, 64, 4096, 100_000


def _generator() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, LATENT)).astype(np.float32)
    projection = (rng.standard_normal((LATENT, DIM)) / np.sqrt(LATENT)).astype(np.float32)
    return centres, projection


def draw(seed: int, rows: int) -> np.ndarray:
    """`rows` vectors of the clustered distribution, a function of `seed` only."""
    centres, projection = _generator()
    rng = np.random.default_rng(10_000 + seed)
    latent = centres[rng.integers(0, CENTRES, rows)] + 0.5 * rng.standard_normal((rows, LATENT), np.float32)
    x = latent @ projection + 0.1 * rng.standard_normal((rows, DIM), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> dict[str, int]:
    """This process's resident memory now: anonymous (heap) and file-backed (mapped files, page cache)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024)
    return fields


def disk_mb(folder: Path) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for path in folder.iterdir():
        kind = path.name.split(".", 1)[-1]
        sizes[kind] = sizes.get(kind, 0.0) + path.stat().st_size / 1e6
    return {k: round(v, 1) for k, v in sorted(sizes.items())}


def build(n: int, folder: Path, queries: int, workers: int) -> dict:
    """Child process: train, add all chunks as one segment, keep the exact top 10 of each query."""
    from duomo.index.sharded import ShardedIndexBuilder, choose_params

    baseline = peak_rss_mb()
    shutil.rmtree(folder, ignore_errors=True)
    qs = draw(-1, queries)
    best_scores = np.full((queries, 10), -np.inf, np.float32)
    best_ids = np.zeros((queries, 10), np.int64)
    nlist = choose_params(n, DIM, n).nlist
    train_rows = min(n, max(20_000, 64 * nlist))
    t0 = time.perf_counter()
    builder = ShardedIndexBuilder(folder, workers=workers)
    builder.train(draw(-2, train_rows), "synthetic-512", n)
    t_train = time.perf_counter() - t0
    after_train = peak_rss_mb()
    gen_seconds = 0.0

    def chunks():
        nonlocal best_scores, best_ids, gen_seconds
        for c, start in enumerate(range(0, n, CHUNK)):
            g = time.perf_counter()
            x = draw(c, min(CHUNK, n - start))
            scores = qs @ x.T  # exact ground truth as the data streams past
            ids = np.arange(start, start + len(x))
            all_s = np.concatenate([best_scores, scores], axis=1)
            all_i = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
            top = np.argsort(-all_s, axis=1, kind="stable")[:, :10]
            best_scores = np.take_along_axis(all_s, top, 1)
            best_ids = np.take_along_axis(all_i, top, 1)
            gen_seconds += time.perf_counter() - g
            yield [f"v{start + i}" for i in range(len(x))], x

    t1 = time.perf_counter()
    entry = builder.add_segment(chunks(), n)
    t_add = time.perf_counter() - t1  # wall time, including drawing the data (in the main thread)
    np.save(folder / "bench-queries.npy", qs)
    np.save(folder / "bench-truth.npy", best_ids)
    return {
        "n": n, "params": builder.manifest["params"], "train_rows": train_rows,
        "train_s": round(t_train, 1), "add_and_merge_wall_s": round(t_add, 1),
        "merge_s": entry["merge_seconds"], "of_which_drawing_data_and_truth_s": round(gen_seconds, 1),
        "rss_after_imports_mb": round(baseline), "peak_rss_train_mb": round(after_train),
        "peak_rss_build_mb": round(peak_rss_mb()), "rss_end_of_build_mb": rss_now_mb(),
        "raw_float32_mb": round(n * DIM * 4 / 1e6),
        "disk_mb": disk_mb(folder),
    }  # fmt: skip


def search(folder: Path, settings: list[tuple[int, int]]) -> dict:
    """Child process: open the index, run every query at each (nprobe, rerank), time and score it."""
    from duomo.index.sharded import ShardedIndex

    baseline = peak_rss_mb()  # the interpreter with numpy, faiss and duomo imported
    t0 = time.perf_counter()
    index = ShardedIndex.open(folder)
    open_s = time.perf_counter() - t0
    qs, truth = np.load(folder / "bench-queries.npy"), np.load(folder / "bench-truth.npy")
    rows = []
    for nprobe, rerank in settings:
        index.nprobe, index.rerank = nprobe, rerank
        for q in qs[:20]:  # warm-up: the first touch of a list reads it from disk
            index.search_ids(q, 10)
        times, recalls = [], []
        for q, t in zip(qs, truth, strict=True):
            start = time.perf_counter()
            ids, _ = index.search_ids(q, 10)
            times.append(time.perf_counter() - start)
            recalls.append(len(set(ids.tolist()) & set(t.tolist())) / 10)
        ms = np.asarray(times) * 1000
        rows.append({
            "nprobe": nprobe, "rerank": rerank, "recall_at_10": round(float(np.mean(recalls)), 4),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "open_s": round(open_s, 2), "rss_after_imports_mb": round(baseline),
        "peak_rss_search_mb": round(peak_rss_mb()), "rss_end_of_search_mb": rss_now_mb(), "settings": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="runs/sharded-bench", help="where the indexes are built")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--out", default="bench/results/sharded_index.json")
    ap.add_argument("--phase", choices=["build", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = [(8, 100), (16, 100), (16, 200), (32, 200), (32, 400), (64, 400), (32, 10)]
    if args.phase:  # a child: one phase of one size, JSON on stdout
        folder = Path(args.work) / f"n{args.n}"
        result = (
            build(args.n, folder, args.queries, args.workers)
            if args.phase == "build"
            else search(folder, settings)
        )
        print(json.dumps(result))
        return
    results = []
    for n in args.sizes:
        row = {}
        for phase in ("build", "search"):
            cmd = [sys.executable, __file__, "--phase", phase, "--n", str(n), "--queries", str(args.queries),
                   "--workers", str(args.workers), "--work", args.work]  # fmt: skip
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            row.update(json.loads(out.strip().splitlines()[-1]))
            print(f"n={n} {phase}: {json.dumps(row)}", flush=True)
        results.append(row)
        if not args.keep:
            shutil.rmtree(Path(args.work) / f"n{n}", ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"machine": machine, "dim": DIM, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
