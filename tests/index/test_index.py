"""ImageIndex: incremental updates, vector reuse, failures, model checks, search, caches, concurrency."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import CountingPipeline, make_folder, write_image

from duomo.errors import DuomoError, InputError
from duomo.index import (
    ImageIndex,
    IndexBusyError,
    IndexCorruptError,
    ModelMismatchError,
    QueryError,
    SearchHit,
    default_index_dir,
)
from duomo.index import vectors as vectors_module
from duomo.index.store import database_path
from duomo.index.vectors import Snapshot


def stored_vector(index_dir: Path, path: Path) -> np.ndarray:
    with sqlite3.connect(database_path(index_dir)) as db:
        row = db.execute(
            "SELECT v.vec FROM files f JOIN vectors v ON v.id = f.vector_id WHERE f.path = ?", (str(path),)
        ).fetchone()
    assert row is not None, f"{path} has no vector"
    return np.frombuffer(row[0], dtype=np.float32)


def table_count(index_dir: Path, table: str) -> int:
    with sqlite3.connect(database_path(index_dir)) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, 12)
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "secret.png", 99)
    write_image(root / ".dotfile.png", 98)
    return root


@pytest.fixture
def index(tmp_path: Path, pipe: CountingPipeline):
    idx = ImageIndex.open(tmp_path / "index", pipe)
    yield idx
    idx.close()


def test_first_update_indexes_every_image(index: ImageIndex, photos: Path, pipe: CountingPipeline) -> None:
    # one worker: under "auto" a 2-thread process may split a batch over two 1-thread workers (two calls)
    report = index.update([photos], progress=False, batch_size=5, layout="1x1")
    assert (report.added, report.updated, report.removed, report.failed) == (12, 0, 0, 0)
    assert report.embedded == pipe.embedded == 12 and report.total == len(index) == 12
    assert pipe.calls == 3  # batches of 5, 5, 2
    assert index.roots == [photos.resolve()] and index.model_name == "ViT-micro"
    assert index.is_indexed(photos / "img001.jpg") and index.is_indexed(photos / "sub" / "img000.png")
    assert not index.is_indexed(photos / "notes.txt")
    assert not index.is_indexed(photos / ".hidden" / "secret.png") and not index.is_indexed(
        photos / ".dotfile.png"
    )
    assert not index.is_indexed(photos / "nope.png")
    assert index.is_indexed(os.path.relpath(photos / "img001.jpg"))  # relative paths are made absolute
    with sqlite3.connect(database_path(index.directory)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(db.execute("SELECT key, value FROM meta"))
    assert meta["model"] == "ViT-micro" and meta["embed_dim"] == "64" and meta["schema_version"] == "1"


def test_rerun_changes_nothing(index: ImageIndex, photos: Path, pipe: CountingPipeline) -> None:
    index.update([photos], progress=False)
    pipe.embedded = 0
    report = index.update(progress=False)  # no roots: the recorded ones
    assert (report.added, report.updated, report.removed, report.embedded, report.unchanged) == (
        0,
        0,
        0,
        0,
        12,
    )
    assert pipe.embedded == 0


def test_changed_file_is_reembedded(index: ImageIndex, photos: Path, pipe: CountingPipeline) -> None:
    index.update([photos], progress=False)
    target = photos / "img004.gif"
    before = stored_vector(index.directory, target)
    write_image(target, 12345, size=(30, 30))
    bump_mtime(target)
    pipe.embedded = 0
    report = index.update([photos], progress=False)
    assert (report.added, report.updated, report.embedded, report.reused) == (0, 1, 1, 0)
    assert pipe.embedded == 1
    assert not np.allclose(before, stored_vector(index.directory, target))
    assert table_count(index.directory, "vectors") == 12  # the old vector was dropped


def test_touched_file_keeps_its_vector(index: ImageIndex, photos: Path, pipe: CountingPipeline) -> None:
    index.update([photos], progress=False)
    bump_mtime(photos / "img004.gif")
    pipe.embedded = 0
    report = index.update([photos], progress=False)
    assert (report.updated, report.reused, report.embedded, pipe.embedded) == (1, 1, 0, 0)


def test_deleted_file_is_removed(index: ImageIndex, photos: Path) -> None:
    index.update([photos], progress=False)
    gone = photos / "img004.gif"
    query = stored_vector(index.directory, gone).copy()
    gone.unlink()
    report = index.update([photos], progress=False)
    assert (report.removed, report.total) == (1, 11)
    assert not index.is_indexed(gone)
    assert str(gone) not in [h.path for h in index.search_vector(query, k=20)]
    assert table_count(index.directory, "vectors") == 11


def test_renamed_file_reuses_its_vector(index: ImageIndex, photos: Path, pipe: CountingPipeline) -> None:
    index.update([photos], progress=False)
    old, new = photos / "img004.gif", photos / "sub" / "renamed.png"
    vector = stored_vector(index.directory, old).copy()
    old.rename(new)
    pipe.embedded = pipe.calls = 0
    report = index.update([photos], progress=False)
    assert (report.added, report.removed, report.reused, report.embedded) == (1, 1, 1, 0)
    assert pipe.embedded == 0 and pipe.calls == 0  # no model call at all
    assert index.is_indexed(new) and not index.is_indexed(old)
    np.testing.assert_array_equal(stored_vector(index.directory, new), vector)


def test_duplicate_files_are_embedded_once(tmp_path: Path, index: ImageIndex, pipe: CountingPipeline) -> None:
    root = tmp_path / "dups"
    originals = make_folder(root, 4)
    copies = [shutil.copy(p, root / f"copy{i}{p.suffix}") for i, p in enumerate(originals)]
    shutil.copy(originals[0], root / "sub" / "another copy.png")
    report = index.update([root], progress=False, batch_size=2, workers=3)
    assert (report.added, report.embedded, report.reused, report.total) == (9, 4, 5, 9)
    assert pipe.embedded == 4
    assert table_count(index.directory, "vectors") == 4
    hits = index.search(str(originals[0]), k=3)
    assert {h.path for h in hits} == {
        str(originals[0]),
        str(copies[0]),
        str(root / "sub" / "another copy.png"),
    }
    assert all(h.score == pytest.approx(1.0, abs=1e-5) for h in hits)
    os.remove(originals[0])  # the shared vector stays while a copy uses it
    assert index.update([root], progress=False).removed == 1
    assert index.search(str(copies[0]), k=1)[0] == SearchHit(str(copies[0]), pytest.approx(1.0, abs=1e-5))


def test_corrupt_images_are_counted_and_skipped(
    tmp_path: Path, index: ImageIndex, pipe: CountingPipeline
) -> None:
    root = tmp_path / "mixed"
    make_folder(root, 3)
    (root / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    (root / "empty.png").write_bytes(b"")
    good = write_image(root / "truncated.png", 7, size=(64, 64)).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    report = index.update([root], progress=False, batch_size=2)
    assert (report.added, report.failed, report.total) == (3, 3, 3)
    assert {p for p, _ in report.failures} == {
        str(root / n) for n in ("garbage.jpg", "empty.png", "truncated.png")
    }
    assert all(str(root) in reason for _, reason in report.failures)  # each reason names its file
    assert [p for p, _ in index.failures()] == sorted(p for p, _ in report.failures)
    assert not index.is_indexed(root / "garbage.jpg")
    again = index.update([root], progress=False)  # failed files are not retried until they change
    assert (again.failed, again.embedded, again.unchanged) == (0, 0, 6)
    write_image(root / "garbage.jpg", 8)
    bump_mtime(root / "garbage.jpg")
    fixed = index.update([root], progress=False)
    assert (fixed.updated, fixed.failed, fixed.total) == (1, 0, 4)
    assert index.is_indexed(root / "garbage.jpg")


def test_duplicates_of_a_corrupt_file_fail_together(tmp_path: Path, index: ImageIndex) -> None:
    root = tmp_path / "bad"
    for i in range(5):
        (root / f"bad{i}.png").parent.mkdir(exist_ok=True)
        (root / f"bad{i}.png").write_bytes(b"same broken bytes")
    report = index.update([root], progress=False, workers=3)
    assert (report.failed, report.total) == (5, 0)


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path: Path, index: ImageIndex) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read anything")
    root = tmp_path / "locked"
    make_folder(root, 2)
    locked = write_image(root / "locked.png", 5)
    locked.chmod(0)
    try:
        report = index.update([root], progress=False)
    finally:
        locked.chmod(0o644)
    assert (report.added, report.failed) == (2, 1)
    assert "cannot read" in report.failures[0][1]


def test_model_mismatch_is_a_clear_error(tmp_path: Path, photos: Path, micro) -> None:
    directory = tmp_path / "index"
    with ImageIndex.open(directory, CountingPipeline(micro)) as idx:
        idx.update([photos], progress=False)
    with pytest.raises(ModelMismatchError) as info:
        ImageIndex.open(directory, CountingPipeline(micro, name="ViT-other"))
    message = str(info.value)
    assert "built with ViT-micro" in message and "--reindex" in message and "--model ViT-micro" in message
    assert isinstance(info.value, DuomoError)
    with ImageIndex.open(directory) as idx:  # no pipeline: read-only use is fine
        assert idx.model_name == "ViT-micro" and len(idx) == 12
    other = CountingPipeline(micro, name="ViT-other")
    with ImageIndex.open(directory, other, reindex=True) as idx:
        assert len(idx) == 0 and idx.roots == [photos.resolve()]
        report = idx.update(progress=False)
        assert (report.added, report.embedded, other.embedded) == (12, 12, 12)
        assert idx.model_name == "ViT-other"


def test_empty_index_adopts_a_new_model(tmp_path: Path, micro) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with ImageIndex.open(tmp_path / "index", CountingPipeline(micro)) as idx:
        idx.update([empty], progress=False)
    with ImageIndex.open(tmp_path / "index", CountingPipeline(micro, name="ViT-other")) as idx:
        assert idx.model_name == "ViT-other"


def test_image_query_returns_itself_first(tmp_path: Path, index: ImageIndex, photos: Path) -> None:
    index.update([photos], progress=False)
    for path in sorted(photos.rglob("img*")):
        hits = index.search(str(path), k=3)
        assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[1].score < hits[0].score
    outside = tmp_path / "elsewhere.png"  # not indexed: embedded through the model, same pixels
    shutil.copy(photos / "img002.webp", outside)
    hit = index.search(str(outside), k=1)[0]
    assert hit.path == str(photos / "img002.webp") and hit.score > 0.999


def test_combined_queries(index: ImageIndex, photos: Path) -> None:
    index.update([photos], progress=False)
    a, b = photos / "img001.jpg", photos / "img002.webp"
    va, vb = stored_vector(index.directory, a), stored_vector(index.directory, b)
    expected = 2 * va - vb
    np.testing.assert_allclose(
        index.query_vector(f"2:{a} - {b}"), expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6
    )
    assert index.search(f"{a} + 0.01:a red car", k=1)[0].path == str(a)
    assert len(index.search("a photo of a dog", k=5)) == 5
    with pytest.raises(QueryError, match="cancel out"):
        index.search(f"{a} - {a}")
    with pytest.raises(QueryError, match="does not exist"):
        index.search("./no/such/file.jpg")


def test_image_terms_can_be_restricted(tmp_path: Path, index: ImageIndex, photos: Path) -> None:
    index.update([photos], progress=False)
    outside = write_image(tmp_path / "outside.png", 3)
    indexed = photos / "img001.jpg"
    assert index.search(str(indexed), k=1, images="indexed")[0].path == str(indexed)
    # a file outside the index is just text to a server that passes images="indexed": never opened
    np.testing.assert_allclose(
        index.query_vector(str(outside), images="indexed"), index.query_vector(f'"{outside}"', images="none")
    )
    with pytest.raises(InputError):
        index.search("dog", images="all")


def test_search_needs_a_pipeline_only_for_text(tmp_path: Path, photos: Path, pipe: CountingPipeline) -> None:
    with ImageIndex.open(tmp_path / "index", pipe) as idx:
        idx.update([photos], progress=False)
    with ImageIndex.open(tmp_path / "index") as idx:
        assert idx.search(str(photos / "img001.jpg"), k=1)[0].path == str(photos / "img001.jpg")
        with pytest.raises(InputError, match="needs a model"):
            idx.search("a dog")
        with pytest.raises(InputError, match="needs a model"):
            idx.update(progress=False)


def test_search_vector_checks_its_input(index: ImageIndex, photos: Path) -> None:
    assert index.search_vector(np.ones(64), k=3) == []  # empty index
    index.update([photos], progress=False)
    assert len(index.search_vector(np.ones(64), k=100)) == 12
    assert len(index.search_vector(np.ones((1, 64)), k=2)) == 2
    for bad, message in [(np.ones(63), "shape"), (np.zeros(64), "zero"), (np.full(64, np.nan), "finite")]:
        with pytest.raises(InputError, match=message):
            index.search_vector(bad)
    with pytest.raises(InputError, match="positive"):
        index.search_vector(np.ones(64), k=0)


def test_exact_and_approximate_agree_on_top1(tmp_path: Path, photos: Path, pipe: CountingPipeline) -> None:
    pytest.importorskip("faiss")  # without it the search is exact and no approximate index exists
    make_folder(photos / "more", 40, seed=3)
    with ImageIndex.open(tmp_path / "index", pipe, approx_threshold=10) as idx:
        idx.update([photos], progress=False)
        snap = idx.snapshot()
        for i in range(0, len(snap), 4):
            query = np.asarray(snap.matrix[i])
            approx = idx.search_vector(query, k=5)  # above the threshold: approximate
            exact = idx.search_vector(query, k=5, exact=True)
            assert approx[0].path == exact[0].path == snap.paths[i]
            assert approx[0].score == pytest.approx(exact[0].score, abs=1e-5)
        assert snap._ann is not None  # the approximate index was really used


def test_ivf_is_built_in_the_background_when_missing(
    tmp_path: Path, photos: Path, pipe: CountingPipeline
) -> None:
    pytest.importorskip("faiss")
    make_folder(photos / "more", 40, seed=3)
    with ImageIndex.open(tmp_path / "index", pipe) as idx:  # default threshold: update builds no IVF
        idx.update([photos], progress=False)
    with ImageIndex.open(tmp_path / "index", approx_threshold=10) as idx:
        snap = idx.snapshot()
        assert not snap.ann_ready()
        assert idx.search_vector(snap.matrix[7], k=3)[0].path == snap.paths[7]  # exact meanwhile
        deadline = time.monotonic() + 60
        while not snap.ann_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert snap.ann_ready()
        assert idx.search_vector(snap.matrix[7], k=3)[0].path == snap.paths[7]


def test_ivf_finds_the_exact_top1_on_a_larger_set() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4000, 32)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    snap = Snapshot("test", [f"p{i}" for i in range(len(matrix))], matrix)
    assert snap.ann().nlist > 1
    for i in range(0, 4000, 97):
        query = matrix[i] + 0.05 * rng.standard_normal(32).astype(np.float32)
        query /= np.linalg.norm(query)
        (approx_path, approx_score), (exact_path, exact_score) = (
            snap.search_approx(query, 3)[0],
            snap.search_exact(query, 3)[0],
        )
        assert approx_path == exact_path == f"p{i}" and approx_score == pytest.approx(exact_score, abs=1e-5)


def test_search_caches_are_used_and_rebuilt(
    tmp_path: Path, photos: Path, pipe: CountingPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("faiss")  # the cache holds the faiss IVF file
    monkeypatch.setattr(vectors_module, "CACHE_MIN_ROWS", 1)
    directory = tmp_path / "index"
    with ImageIndex.open(directory, pipe, approx_threshold=1) as idx:
        idx.update([photos], progress=False)
        query = stored_vector(directory, photos / "img004.gif").copy()
        expected = idx.search_vector(query, k=5)
    names = sorted(p.name.split(".", 1)[1] for p in (directory / "cache").iterdir())
    assert names == ["ivf.faiss", "paths.json", "vectors.npy"]

    def no_sqlite(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    with monkeypatch.context() as m:  # a fresh process reads the cache files, not SQLite
        m.setattr(vectors_module, "_read_rows", no_sqlite)
        m.setattr(vectors_module, "build_ivf", no_sqlite)
        with ImageIndex.open(directory, approx_threshold=1) as idx:
            assert idx.search_vector(query, k=5) == expected
    for cached in (directory / "cache").iterdir():  # corrupt caches are ignored and rewritten
        cached.write_bytes(cached.read_bytes()[:100])
    with ImageIndex.open(directory, approx_threshold=1) as idx:
        assert idx.search_vector(query, k=5) == expected
    with ImageIndex.open(directory, approx_threshold=1) as idx:
        assert idx.search_vector(query, k=5) == expected
    (photos / "img005.tiff").unlink()  # a new generation replaces the old cache files
    with ImageIndex.open(directory, pipe) as idx:
        idx.update(progress=False)
        assert idx.search_vector(query, k=20, exact=True)[0].path == str(photos / "img004.gif")
    assert len(list((directory / "cache").iterdir())) == 2  # matrix and paths of the new generation


def test_concurrent_searches_during_an_update(tmp_path: Path, photos: Path, micro) -> None:
    directory = tmp_path / "index"
    with ImageIndex.open(directory, CountingPipeline(micro)) as idx:
        idx.update([photos], progress=False)
    make_folder(photos / "new", 40, seed=5)
    reader = ImageIndex.open(directory, CountingPipeline(micro))
    errors: list[BaseException] = []
    done = threading.Event()

    def search_loop() -> None:
        try:
            while not done.is_set():
                for hit in reader.search("a dog", k=5):
                    assert reader.is_indexed(hit.path) or not Path(hit.path).exists()
                assert len(reader) >= 12
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=search_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with ImageIndex.open(directory, CountingPipeline(micro)) as writer:
            report = writer.update(progress=False, batch_size=4)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert report.added == 40 and len(reader) == 52
    assert len(reader.search("a dog", k=100)) == 52
    reader.close()


def test_one_updater_at_a_time(index: ImageIndex, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index, "lock_wait_seconds", 0.2)
    with open(index.directory / "update.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(IndexBusyError, match="another process"):
            index.update([photos], progress=False)
    assert index.update([photos], progress=False).added == 12


def test_forget_a_folder(tmp_path: Path, index: ImageIndex, photos: Path) -> None:
    other = tmp_path / "other"
    make_folder(other, 3, seed=9)
    index.update([photos, other], progress=False)
    assert len(index) == 15 and len(index.roots) == 2
    assert index.forget(other) == 3
    assert len(index) == 12 and index.roots == [photos.resolve()]
    assert table_count(index.directory, "vectors") == 12
    with pytest.raises(InputError, match="not an indexed folder"):
        index.forget(other)


def test_missing_recorded_folder_keeps_its_files(tmp_path: Path, index: ImageIndex) -> None:
    root = tmp_path / "usb"
    make_folder(root, 3)
    index.update([root], progress=False)
    root.rename(tmp_path / "unplugged")
    report = index.update(progress=False)
    assert (report.removed, len(index)) == (0, 3)


def test_bad_roots(tmp_path: Path, index: ImageIndex) -> None:
    with pytest.raises(InputError, match="does not exist"):
        index.update([tmp_path / "nope"], progress=False)
    file = write_image(tmp_path / "a.png", 1)
    with pytest.raises(InputError, match="not a folder"):
        index.update([file], progress=False)
    with pytest.raises(InputError, match="no folders yet"):
        index.update(progress=False)


def test_unreadable_database(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    directory.mkdir()
    database_path(directory).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexCorruptError, match="cannot be read"):
        ImageIndex.open(directory)


def test_default_index_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DUOMO_INDEX", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_index_dir() == tmp_path / "xdg" / "duomo" / "index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_index_dir() == tmp_path / ".cache" / "duomo" / "index"
    monkeypatch.setenv("DUOMO_INDEX", str(tmp_path / "mine"))
    assert default_index_dir() == tmp_path / "mine"


def test_undecodable_file_names_are_skipped(tmp_path: Path, index: ImageIndex) -> None:
    root = tmp_path / "names"
    make_folder(root, 2)
    try:
        shutil.copy(root / "img001.jpg", os.fsdecode(os.fsencode(str(root)) + b"/bad\xff.jpg"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    write_image(root / "ünïcödé 写真.png", 4)
    report = index.update([root], progress=False)
    assert (report.added, report.failed) == (3, 0)
    assert index.is_indexed(root / "ünïcödé 写真.png")


def test_noop_update_keeps_the_generation(index: ImageIndex, photos: Path) -> None:
    index.update([photos], progress=False)
    key = index.snapshot().key
    index.update([photos], progress=False)
    assert index.snapshot().key == key
