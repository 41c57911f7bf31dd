"""Crash safety: SIGKILL `duomo index` midway, re-run it, and get exactly what a clean run gives."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import make_folder

import duomo
from duomo.cli import main
from duomo.index import ImageIndex
from duomo.index.store import database_path

N_IMAGES = 100
REPO = Path(__file__).resolve().parents[2]


def vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(database_path(index_dir)) as db:
        rows = db.execute("SELECT f.path, v.vec FROM files f JOIN vectors v ON v.id = f.vector_id")
        return {path: np.frombuffer(blob, dtype=np.float32) for path, blob in rows}


def integrity(index_dir: Path) -> str:
    with sqlite3.connect(database_path(index_dir)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def count_ok(db: sqlite3.Connection) -> int:
    """Searchable rows committed so far (0 while the schema is still being created)."""
    try:
        return db.execute("SELECT count(*) FROM files WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def kill_midway(cmd: list[str], index_dir: Path, env: dict[str, str]) -> int:
    """Start the indexer, SIGKILL it once some batches are committed; return how many rows survived."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db_file = database_path(index_dir)
    deadline = time.monotonic() + 120
    try:
        while not db_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.closing(sqlite3.connect(db_file, timeout=5)) as db:
            while proc.poll() is None and time.monotonic() < deadline and count_ok(db) < N_IMAGES // 5:
                time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), err.decode()
    with contextlib.closing(sqlite3.connect(db_file)) as db:
        return count_ok(db)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_a_clean_run(
    tmp_path: Path, micro: duomo.Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    make_folder(photos, N_IMAGES)
    checkpoint = micro.save(tmp_path / "model")  # fixed weights, so that every process embeds alike
    index_dir = tmp_path / "index"
    cmd = [sys.executable, "-m", "duomo", "index", str(photos), "--index", str(index_dir)]
    cmd += ["--model", str(checkpoint), "--batch-size", "1", "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    survived = kill_midway(cmd, index_dir, env)
    assert 0 < survived < N_IMAGES, "the indexer was not killed midway"
    assert integrity(index_dir) == "ok"

    assert main(cmd[3:]) == 0  # the re-run: same command, in this process (a second start-up costs seconds)
    added = int(re.search(r"(\d+) added", capsys.readouterr().out).group(1))
    assert added == N_IMAGES - survived  # nothing committed before the kill was embedded again
    assert integrity(index_dir) == "ok"

    pipe = duomo.load(str(checkpoint))
    with ImageIndex.open(tmp_path / "clean", pipe) as clean:
        clean.update([photos], progress=False, batch_size=1)
    with ImageIndex.open(index_dir, pipe) as resumed:
        assert len(resumed) == N_IMAGES and resumed.failures() == []
        assert resumed.update(progress=False).embedded == 0
    expected, got = vectors_by_path(tmp_path / "clean"), vectors_by_path(index_dir)
    assert sorted(got) == sorted(expected) == sorted(str(p) for p in photos.rglob("img*"))
    for path, vector in expected.items():
        np.testing.assert_allclose(got[path], vector, atol=1e-6, err_msg=path)
    with sqlite3.connect(database_path(index_dir)) as db:
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == N_IMAGES  # no orphans
