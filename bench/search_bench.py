"""Search latency and recall@10: exact (numpy) vs approximate (faiss IVF) search, as ImageIndex runs them.

    python bench/search_bench.py                      # 10k, 100k, 1M vectors of D=512
    python bench/search_bench.py --sizes 10000 --queries 20 --out results.json

Two data sets per size: uniform random unit vectors (the worst case for any approximate index: no structure)
and a clustered set (n/100 centres, points at cosine ~0.75 from their centre; queries near data points),
closer to real photo embeddings. Latency is per single query (what the server does), the median over the
queries, and the median of `--repeats` such runs. Recall@10 is measured against the exact top 10.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duomo.index.store import Store  # noqa: E402
from duomo.index.vectors import Snapshot, build_ivf, ivf_params, load_snapshot  # noqa: E402


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_data(n: int, dim: int, kind: str, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(matrix [n, dim], queries [n_queries, dim]), rows L2-normalised, generated in chunks."""
    rng = np.random.default_rng(seed)
    matrix = np.empty((n, dim), dtype=np.float32)
    centres = unit_rows(rng.standard_normal((max(1, n // 100), dim), dtype=np.float32))
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "uniform":
            matrix[start : start + m] = unit_rows(noise)
        else:
            matrix[start : start + m] = unit_rows(centres[rng.integers(0, len(centres), m)] + 0.04 * noise)
    if kind == "uniform":
        queries = unit_rows(rng.standard_normal((n_queries, dim), dtype=np.float32))
    else:
        near = matrix[rng.choice(n, n_queries, replace=False)]
        queries = unit_rows(near + 0.04 * rng.standard_normal((n_queries, dim), dtype=np.float32))
    return matrix, queries


def latency_ms(search, queries: np.ndarray, repeats: int) -> float:
    """Median over repeats of the median single-query latency."""
    search(queries[0])  # warm-up
    runs = []
    for _ in range(repeats):
        times = []
        for q in queries:
            start = time.perf_counter()
            search(q)
            times.append(time.perf_counter() - start)
        runs.append(statistics.median(times))
    return 1000 * statistics.median(runs)


def bench_size(n: int, dim: int, kind: str, n_queries: int, repeats: int) -> dict:
    matrix, queries = make_data(n, dim, kind, n_queries, seed=n)
    snap = Snapshot(f"bench-{n}", [str(i) for i in range(n)], matrix)
    truth = [{p for p, _ in snap.search_exact(q, 10)} for q in queries]
    exact_ms = latency_ms(lambda q: snap.search_exact(q, 10), queries, repeats)
    start = time.perf_counter()
    snap._ann = build_ivf(matrix)
    build_s = time.perf_counter() - start
    approx_ms = latency_ms(lambda q: snap.search_approx(q, 10), queries, repeats)
    recall = statistics.mean(
        len(truth[i] & {p for p, _ in snap.search_approx(q, 10)}) / 10 for i, q in enumerate(queries)
    )
    nlist, nprobe = ivf_params(n)
    row = {
        "n": n, "dim": dim, "data": kind, "exact_ms": round(exact_ms, 2), "approx_ms": round(approx_ms, 2),
        "speedup": round(exact_ms / approx_ms, 1), "recall@10": round(recall, 3),
        "ivf_build_s": round(build_s, 1),
        "nlist": nlist, "nprobe": nprobe,
    }  # fmt: skip
    return row


def bench_load(n: int, dim: int) -> dict:
    """Seconds to build a search snapshot from SQLite (first search after a change) and from the cache."""
    import duomo.index.vectors as vectors

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        with store.write():
            store.set_meta("embed_dim", str(dim))
            for start in range(0, n, 10_000):
                rows = unit_rows(rng.standard_normal((min(10_000, n - start), dim), dtype=np.float32))
                hashes = [f"h{start + i}" for i in range(len(rows))]
                store.insert_vectors(zip(hashes, (r.tobytes() for r in rows), strict=True))
                store.upsert_ok([(f"/photos/{h}.jpg", 1, 1, h) for h in hashes])
            store.bump_generation()
        vectors.CACHE_MIN_ROWS = 1
        start = time.perf_counter()
        load_snapshot(store, Path(tmp) / "cache", dim, use_cache=True)  # reads SQLite, writes the cache
        cold = time.perf_counter() - start
        start = time.perf_counter()
        load_snapshot(store, Path(tmp) / "cache", dim, use_cache=True)
        cached = time.perf_counter() - start
        store.close()
    return {"n": n, "from_sqlite_s": round(cold, 2), "from_cache_s": round(cached, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-size", type=int, default=100_000, help="rows for the snapshot-load timing")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import faiss

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}")
    rows = []
    for n in args.sizes:
        for kind in ("uniform", "clustered"):
            rows.append(bench_size(n, args.dim, kind, args.queries, args.repeats))
            gc.collect()  # free this size's matrix and IVF index before the next
            print(json.dumps(rows[-1]), flush=True)
    load = bench_load(args.load_size, args.dim) if args.load_size else None
    if load:
        print(json.dumps(load), flush=True)
    print("\n| n | data | exact ms | approx ms | speed-up | recall@10 | IVF build s | nlist / nprobe |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['data']} | {r['exact_ms']} | {r['approx_ms']} | {r['speedup']}× | "
            f"{r['recall@10']} | {r['ivf_build_s']} | {r['nlist']} / {r['nprobe']} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"search": rows, "load": load}, indent=2))


if __name__ == "__main__":
    main()
