"""The sharded on-disk IVF-PQ index: recall against exact search, segments added without rebuilding what
exists, a killed build leaving the index as it was, and the user's path embed-collection -> build-index ->
`duomo search` / `duomo serve`."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from index_helpers import coloured_squares

import duomo
from duomo.cli import main
from duomo.errors import DuomoError
from duomo.index.collection import read_collection, run_collection_job
from duomo.index.errors import IndexCorruptError, ModelMismatchError
from duomo.index.sharded import (
    ShardedIndex,
    ShardedIndexBuilder,
    build_from_collection,
    choose_params,
    iter_chunks,
)

MODEL = "shapes-tiny"


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors near 50 centres of an 8-d latent space (like embeddings: low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    centres, projection = np.random.default_rng(99).standard_normal((2, 50, 8))[0], None
    projection = np.random.default_rng(98).standard_normal((8, dim))
    x = (centres[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, 8))) @ projection
    x += 0.05 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(folder: Path, vectors: np.ndarray, chunk: int = 500) -> ShardedIndexBuilder:
    builder = ShardedIndexBuilder(folder)
    builder.train(vectors, "synthetic", len(vectors))
    builder.add_segment(iter_chunks([f"k{i}" for i in range(len(vectors))], vectors, chunk), len(vectors))
    return builder


def digest(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_params_scale_with_size() -> None:
    assert choose_params(1_000_000, 512, 1_000_000).nlist == 1024
    assert choose_params(10_000_000, 512, 10_000_000).nlist == 4096
    small = choose_params(100, 24, 100)
    assert small.nlist == 2 and 24 % small.pq_m == 0 and small.pq_nbits == 1


def test_recall_against_exact_search(tmp_path: Path) -> None:
    x = clustered(4000)
    build(tmp_path / "idx", x)
    queries = clustered(40, seed=7)
    with ShardedIndex.open(tmp_path / "idx") as index:
        assert len(index) == 4000 and index.embed_dim == 32
        params = index.manifest["params"]
        assert params["pq_m"] == 4 and params["nlist"] == 64  # codes are 4 bytes: PQ alone cannot rank
        recalls = []
        for q in queries:
            ids, scores = index.search_ids(q, 10)
            truth = np.argsort(-(x @ q), kind="stable")[:10]
            recalls.append(len(set(ids.tolist()) & set(truth.tolist())) / 10)
            assert np.all(np.diff(scores) <= 0)
            exact_ids, exact_scores = index.search_ids(q, 10, exact=True)
            stored = x.astype(np.float16).astype(np.float32) @ q  # exact over the stored float16 vectors
            np.testing.assert_allclose(exact_scores, np.sort(stored)[::-1][:10], atol=1e-6)
        assert np.mean(recalls) >= 0.9
        index.rerank = 10  # without exact re-ranking the PQ codes alone find far fewer
        pq_only = np.mean([len(set(index.search_ids(q, 10)[0].tolist()) & set(np.argsort(-(x @ q))[:10])) / 10
                           for q in queries])  # fmt: skip
        assert pq_only < np.mean(recalls)
        index.rerank = 200
        hits = index.search_vector(x[123] * 3, k=2)  # not normalised: normalised for the caller
        assert hits[0].path == "k123" and hits[0].score == pytest.approx(1.0, abs=2e-3)


def test_a_new_segment_rebuilds_nothing_and_is_searched(tmp_path: Path) -> None:
    x = clustered(3000)
    folder = tmp_path / "idx"
    builder = build(folder, x[:2000])
    before = {p.name: digest(p) for p in folder.iterdir() if p.name.startswith(("segment-0000", "trained"))}
    builder.add_segment(iter_chunks([f"new{i}" for i in range(1000)], x[2000:], 300), 1000)
    after = {name: digest(folder / name) for name in before}
    assert after == before  # the trained quantisers and the first segment are untouched
    with ShardedIndex.open(folder) as index:
        assert len(index) == 3000 and len(index.segments) == 2
        assert index.search_vector(x[2500], k=1)[0].path == "new500"
        assert index.search_vector(x[10], k=1)[0].path == "k10"


def test_a_killed_build_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    x = clustered(2000)
    folder = tmp_path / "idx"
    builder = build(folder, x[:1000])

    def dying() -> Iterator[tuple[list[str], np.ndarray]]:
        yield [f"a{i}" for i in range(300)], x[1000:1300]
        raise KeyboardInterrupt  # the user's Ctrl-C (or a crash) mid-segment

    with pytest.raises(KeyboardInterrupt):
        builder.add_segment(dying(), 1000)
    assert not list(folder.glob("segment-0001*")) and not list(folder.glob(".segment-*"))
    with ShardedIndex.open(folder) as index:
        assert len(index) == 1000 and index.items.names([1000]) == {}
    builder = ShardedIndexBuilder(folder)  # a new process: from the manifest on disk
    builder.add_segment(iter_chunks([f"b{i}" for i in range(1000)], x[1000:], 400), 1000)
    with ShardedIndex.open(folder) as index:
        assert len(index) == 2000 and index.search_vector(x[1999], k=1)[0].path == "b999"


def test_bad_chunks_and_corrupt_manifests_give_one_line_errors(tmp_path: Path) -> None:
    x = clustered(600)
    folder = tmp_path / "idx"
    builder = build(folder, x[:300])
    with pytest.raises(DuomoError, match="this index holds 32-d vectors"):
        builder.add_segment(iter([(["a"], np.zeros((1, 16), np.float32))]), 1)
    with pytest.raises(DuomoError, match="more than the 10 rows announced"):
        builder.add_segment(iter_chunks([f"c{i}" for i in range(300)], x[300:], 100), 10)
    with ShardedIndex.open(folder) as index, pytest.raises(DuomoError, match="holds 32-d vectors"):
        index.search_vector(np.ones(5), k=3)
    with pytest.raises(DuomoError, match="rerank must be a positive integer"):
        builder.set_search(rerank=0)
    builder.set_search(nprobe=10_000, rerank=50)  # more probes than lists: all lists
    with ShardedIndex.open(folder) as index:
        assert index.nprobe == index.manifest["params"]["nlist"] and index.rerank == 50
    (folder / "sharded.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="cannot read"):
        ShardedIndex.open(folder)


# --- the user's path: embed-collection -> build-index -> search / serve ------------------------------------
@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(images, embeddings of the first 15 files (14 good), embeddings of all 23 good images): coloured
    squares embedded with shapes-tiny."""
    base = tmp_path_factory.mktemp("sharded")
    images = coloured_squares(base / "images")
    first = base / "first"
    shutil.copytree(images, first / "images")
    for extra in sorted((first / "images").rglob("*.png"))[15:]:
        extra.unlink()
    emb_first, emb_all = base / "emb-first", base / "emb-all"
    run_collection_job(first / "images", emb_first, MODEL, partition_size=4, use_ray=False)
    run_collection_job(images, emb_all, MODEL, partition_size=5, use_ray=False)
    return images, emb_first, emb_all


def test_build_index_then_duomo_search(
    embeddings: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, _, emb = embeddings
    out = tmp_path / "big"
    assert main(["build-index", str(emb), str(out)]) == 0
    assert "added 23 vectors as segment-0000" in " ".join(capsys.readouterr().err.split())
    assert main(["build-index", str(emb), str(out), "--rerank", "300", "--nprobe", "4"]) == 0  # nothing new
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to add" in err and "searched with 1 probes and 300 re-ranked candidates" in err
    with ShardedIndex.open(out) as index:  # the new search settings are what a search uses (1 list here)
        assert (index.nprobe, index.rerank) == (1, 300)
    assert main(["search", "a red square", "--index", str(out), "-k", "5", "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)  # stdout holds the JSON only (faiss's printfs are silenced)
    assert body["model"] == MODEL and len(body["results"]) == 5
    keys, vectors = read_collection(emb)
    query = duomo.load(MODEL).encode_text(["a red square"]).numpy()[0]
    want = [str(images / keys[i]) for i in np.argsort(-(vectors @ query), kind="stable")[:5]]
    assert [r["path"] for r in body["results"]] == want  # 23 vectors: every one is re-ranked exactly
    assert all(Path(r["path"]).is_file() for r in body["results"])
    exact = ["search", "a red square", "--index", str(out), "--exact", "-k", "5", "--format", "paths"]
    assert main(exact) == 0
    assert capsys.readouterr().out.split() == want


def test_adding_a_later_job_adds_only_new_partitions(
    embeddings: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, emb_first, emb_all = embeddings
    out = tmp_path / "big"
    first = build_from_collection(emb_first, out)
    assert first["added"] == 14 and first["segment"]["name"] == "segment-0000"
    second = build_from_collection(emb_all, out)
    assert second["added"] == 23 and second["segment"]["name"] == "segment-0001"
    assert build_from_collection(emb_all, out)["added"] == 0
    with ShardedIndex.open(out) as index:
        assert len(index) == 37 and len(index.roots) == 2


def test_build_index_refuses_bad_sources(
    embeddings: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, emb_first, _ = embeddings
    assert main(["build-index", str(images), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is not a finished embedding job" in err and len(err.splitlines()) == 1
    out = tmp_path / "big"
    build_from_collection(emb_first, out)
    other = tmp_path / "other-model"
    shutil.copytree(emb_first, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "model": "shapes-minilm"}))
    with pytest.raises(
        ModelMismatchError, match="holds 64-d vectors of shapes-minilm|vectors of shapes-minilm"
    ):
        build_from_collection(other, out)
    assert main(["index", str(images), "--index", str(out)]) == 1
    assert "is a sharded index" in capsys.readouterr().err
    with pytest.raises(ModelMismatchError, match="search it with --model shapes-tiny"):
        ShardedIndex.open(out, duomo.load("ViT-micro"))


def test_serve_searches_a_sharded_index(embeddings: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from duomo.serve import ServeSettings, create_app

    images, _, emb = embeddings
    out = tmp_path / "big"
    build_from_collection(emb, out)
    app = create_app(ServeSettings(use_index=True, index_dir=out), pipeline=duomo.load(MODEL))
    with TestClient(app) as client:
        r = client.get("/search", params={"q": "a blue square", "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index_size"] == 23 and len(body["results"]) == 3
        image = client.get(body["results"][0]["url"])
        assert image.status_code == 200 and image.content == Path(body["results"][0]["path"]).read_bytes()
        assert client.get("/healthz").json()["index"]["ready"] is True


def test_training_reads_only_enough_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    from duomo.index import sharded

    parts = [{"file": f"part-{i:05d}", "rows": 100, "size": 1} for i in range(50)]
    read: list[str] = []

    def fake_read(file: str, dim: int) -> tuple[list[str], np.ndarray]:
        read.append(file)
        return [f"{file}/{j}" for j in range(100)], np.full((100, dim), len(read), np.float32)

    monkeypatch.setattr(sharded, "_read_part", fake_read)
    sample = sharded._training_sample(parts, 8, 300)
    assert len(read) == 6 and len(set(read)) == 6  # 2 x 300 rows = 6 parts of 100, not all 50
    assert 290 <= len(sample) <= 310 and sample.shape[1] == 8
