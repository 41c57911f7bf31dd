"""The index database: one SQLite file in WAL mode holding file metadata and the vectors themselves.

Vectors live in SQLite (a float32 BLOB per distinct file content) so that a file row and its vector are
committed in the same transaction: whatever moment the indexer is killed, the database holds whole batches.
Every transaction that changes what a search can see bumps `meta.generation`; caches are keyed by it.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from duomo.index.errors import IndexCorruptError
from duomo.index.files import Stat, path_range

SCHEMA_VERSION = 1
DB_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, vec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    vector_id INTEGER REFERENCES vectors(id),
    CHECK ((status = 'ok') = (vector_id IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS files_vector ON files(vector_id);
"""

_UPSERT = """
INSERT INTO files (path, size, mtime_ns, hash, status, error, vector_id) VALUES (?, ?, ?, ?, ?, ?, {vector})
ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, hash = excluded.hash,
    status = excluded.status, error = excluded.error, vector_id = excluded.vector_id
"""
_UPSERT_OK = _UPSERT.format(vector="(SELECT id FROM vectors WHERE hash = ?)")
_UPSERT_FAILED = _UPSERT.format(vector="NULL")


class Store:
    """One connection to an index database; methods are single statements, `write()` makes them atomic."""

    def __init__(self, directory: Path) -> None:
        """Open (creating if needed) `directory/index.sqlite`, in WAL mode with durable commits."""
        self.path = directory / DB_NAME
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; one connection may serve several threads
            # because ImageIndex serialises every call on it with a lock.
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            if not self._has_schema():
                self._create_schema()
            version = int(self.meta()["schema_version"])
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(
                f"the index database {self.path} cannot be read ({exc}); "
                f"delete {directory} and re-run `duomo index`"
            ) from exc
        if version > SCHEMA_VERSION:
            raise IndexCorruptError(
                f"the index at {directory} was written by a newer duomo (schema {version}); upgrade duomo"
            )

    def _has_schema(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None

    def _create_schema(self) -> None:
        with self.write():
            for statement in _SCHEMA.split(";"):  # not executescript: it would commit the transaction
                if statement.strip():
                    self.conn.execute(statement)
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "generation": "0",
                "index_id": uuid.uuid4().hex,
            }
            self.conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", defaults.items())

    def close(self) -> None:
        """Close the connection (committed data is already on disk)."""
        self.conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: taken eagerly (BEGIN IMMEDIATE), committed whole or rolled back."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same committed state."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    # --- metadata -------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        """All meta entries (model, embed_dim, generation, schema_version, index_id)."""
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, delete) one meta entry; call inside write()."""
        if value is None:
            self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def generation(self) -> int:
        """Counter bumped by every transaction that changes the searchable content."""
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def bump_generation(self) -> None:
        """Mark the searchable content as changed; call inside write()."""
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def roots(self) -> list[str]:
        """The folders ever indexed into this index."""
        return [r for (r,) in self.conn.execute("SELECT path FROM roots ORDER BY path")]

    def add_roots(self, roots: Iterable[Path]) -> None:
        """Record folders as indexed; call inside write()."""
        self.conn.executemany("INSERT OR IGNORE INTO roots VALUES (?)", [(str(r),) for r in roots])

    # --- files and vectors ----------------------------------------------------------------------------------

    def files_in(self, root: Path) -> dict[str, Stat]:
        """Every recorded file under root (ok or failed) -> the (size, mtime_ns) it had when indexed."""
        lo, hi = path_range(root)
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns FROM files WHERE path > ? AND path < ?", (lo, hi)
        )
        return {path: (size, mtime) for path, size, mtime in rows}

    def forget_root(self, root: Path) -> int:
        """Drop a root and every file row under it; returns how many files. Call inside write()."""
        lo, hi = path_range(root)
        self.conn.execute("DELETE FROM roots WHERE path = ?", (str(root),))
        return self.conn.execute("DELETE FROM files WHERE path > ? AND path < ?", (lo, hi)).rowcount

    def vector_hashes(self) -> set[str]:
        """Content hashes that already have a vector."""
        return {h for (h,) in self.conn.execute("SELECT hash FROM vectors")}

    def insert_vectors(self, rows: Iterable[tuple[str, bytes]]) -> None:
        """Store (hash, float32 bytes) vectors; call inside write()."""
        self.conn.executemany("INSERT OR IGNORE INTO vectors (hash, vec) VALUES (?, ?)", rows)

    def upsert_ok(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        """Record (path, size, mtime_ns, hash) files as indexed, pointing at the vector of their hash."""
        self.conn.executemany(_UPSERT_OK, [(p, s, m, h, "ok", None, h) for p, s, m, h in rows])

    def upsert_failed(self, rows: Iterable[tuple[str, int, int, str | None, str]]) -> None:
        """Record (path, size, mtime_ns, hash, error) files as failed: skipped until they change."""
        self.conn.executemany(_UPSERT_FAILED, [(p, s, m, h, "failed", e) for p, s, m, h, e in rows])

    def remove_files(self, paths: Iterable[str]) -> None:
        """Delete file rows; call inside write()."""
        self.conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])

    def drop_orphan_vectors(self) -> int:
        """Delete vectors no file points at any more; returns how many. Call inside write()."""
        return self.conn.execute(
            "DELETE FROM vectors WHERE id NOT IN (SELECT vector_id FROM files WHERE vector_id IS NOT NULL)"
        ).rowcount

    def clear(self) -> None:
        """Forget every file and vector and the model (roots stay); call inside write()."""
        self.conn.execute("DELETE FROM files")
        self.conn.execute("DELETE FROM vectors")
        self.conn.execute("DELETE FROM meta WHERE key IN ('model', 'embed_dim')")

    # --- queries --------------------------------------------------------------------------------------------

    def count(self, status: str = "ok") -> int:
        """Number of files with this status."""
        return self.conn.execute("SELECT count(*) FROM files WHERE status = ?", (status,)).fetchone()[0]

    def is_indexed(self, path: str) -> bool:
        """Whether this exact path is searchable."""
        row = self.conn.execute("SELECT 1 FROM files WHERE path = ? AND status = 'ok'", (path,)).fetchone()
        return row is not None

    def vector_of(self, path: str) -> bytes | None:
        """The stored vector bytes of an indexed path, or None."""
        row = self.conn.execute(
            "SELECT v.vec FROM files f JOIN vectors v ON v.id = f.vector_id WHERE f.path = ?", (path,)
        ).fetchone()
        return None if row is None else row[0]

    def searchable(self) -> Iterator[tuple[str, bytes]]:
        """(path, vector bytes) of every indexed file, ordered by path."""
        yield from self.conn.execute(
            "SELECT f.path, v.vec FROM files f JOIN vectors v ON v.id = f.vector_id ORDER BY f.path"
        )

    def failures(self, limit: int = 100) -> list[tuple[str, str]]:
        """(path, reason) of files that could not be indexed."""
        rows = self.conn.execute(
            "SELECT path, error FROM files WHERE status = 'failed' ORDER BY path LIMIT ?", (limit,)
        )
        return [(p, e or "") for p, e in rows]

    def integrity_check(self) -> str:
        """SQLite's own consistency check: 'ok' when the file is sound."""
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]


def database_path(directory: str | os.PathLike) -> Path:
    """The SQLite file of the index in a directory."""
    return Path(directory) / DB_NAME
