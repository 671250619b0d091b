"""Embedded SQLite record store (the default backend).

The stdlib ``sqlite3`` module blocks, so every database call runs in a worker thread via
``trio.to_thread.run_sync``, one at a time (CapacityLimiter(1)) on one connection. Those
thread calls are not abandoned on cancellation: a transaction that has started always commits
or rolls back before the caller sees the Cancelled.

Each record is encoded on its own (:func:`store.encode_record`: an
:class:`~store.EncodedRecord`'s bytes as they are) and inserted on its own in the batch's
transaction: one that cannot be encoded, or that SQLite refuses (``string or blob too big``),
is FAILED and the others are written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from store import (
    DocResult,
    Outcome,
    StoreUnavailable,
    UnencodableRecord,
    encode_record,
    fallback_doc_id,
    record_doc_id,
)

T = TypeVar("T")

# Stay well below SQLite's host-parameter limit (999 before 3.32) in one IN (...) query.
_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS activations (
    doc_id TEXT PRIMARY KEY,
    namespace TEXT,
    activation_id TEXT,
    doc TEXT NOT NULL,
    stored_at REAL
)
"""


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 30.0) -> None:
        self._path = Path(path).absolute()  # fixed at construction, not at open()
        self._timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    @property
    def path(self) -> Path:
        return self._path

    def describe(self) -> str:
        return "sqlite:///" + str(self._path).lstrip("/")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.Error as exc:
            # "database is locked" (busy_timeout ran out), disk I/O error, disk full, cannot
            # open, not a database... none of them is about one document: retry later.
            raise StoreUnavailable(
                f"SQLite store {self.describe()} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except OSError as exc:  # making the parent directory
            raise StoreUnavailable(f"SQLite store {self.describe()} failed: {exc}") from exc

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is None:
            await self._run(self._open_sync)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path,
            timeout=self._timeout_s,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN/COMMIT
            check_same_thread=False,  # used from trio's worker threads, one at a time
        )
        try:
            # Another process (a checker) may hold a lock: wait for it up to timeout_s.
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode synchronous=NORMAL does not fsync the WAL at commit, so a commit
            # can be lost on power failure or OS crash (the database stays consistent, but
            # the last transactions vanish). The batcher acknowledges records once
            # write_batch returns, so "stored" must mean on disk: FULL fsyncs the WAL at
            # every commit.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"SQLite store {self.describe()} is not open (call open() first)")
        return self._conn

    # ---- writes ----------------------------------------------------------------------

    async def write_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[DocResult]:
        conn = self._require()
        # Serialize outside the worker thread's critical path; bad docs fail alone.
        rows: list[tuple[str, str, str, bytes] | DocResult] = []
        for doc in docs:
            doc_id = record_doc_id(doc)
            if doc_id is None:
                rows.append(
                    DocResult(
                        fallback_doc_id(doc),
                        Outcome.FAILED,
                        "record has no string namespace/activationId",
                    )
                )
                continue
            try:
                # Valid UTF-8 (a lone surrogate fails here, not at bind time); made text one
                # row at a time in the worker: as a str it can take 4 bytes a character.
                data = encode_record(doc)
            except UnencodableRecord as exc:
                rows.append(DocResult(doc_id, Outcome.FAILED, str(exc)))
                continue
            rows.append((doc_id, doc["namespace"], doc["activationId"], data))
        if not any(isinstance(r, tuple) for r in rows):
            return [r for r in rows if isinstance(r, DocResult)]
        return await self._run(self._write_sync, conn, rows)

    @staticmethod
    def _write_sync(
        conn: sqlite3.Connection, rows: list[tuple[str, str, str, bytes] | DocResult]
    ) -> list[DocResult]:
        results: list[DocResult] = []
        now = time.time()
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so the
        # transaction cannot fail half-way with SQLITE_BUSY on lock upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.cursor()
            for row in rows:
                if isinstance(row, DocResult):
                    results.append(row)
                    continue
                doc_id, namespace, activation_id, data = row
                try:
                    cur.execute(
                        "INSERT INTO activations (doc_id, namespace, activation_id, doc,"
                        " stored_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (doc_id) DO NOTHING",
                        (doc_id, namespace, activation_id, data.decode(), now),
                    )
                except sqlite3.DataError as exc:
                    # This row only (e.g. longer than SQLite's length limit); the statement
                    # did nothing and the transaction goes on with the others.
                    results.append(DocResult(doc_id, Outcome.FAILED,
                                             f"SQLite refused the record: {exc}"))
                    continue
                outcome = Outcome.STORED if cur.rowcount == 1 else Outcome.ALREADY_STORED
                results.append(DocResult(doc_id, outcome))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # ---- reads -----------------------------------------------------------------------

    async def get(self, doc_id: str) -> dict[str, Any] | None:
        conn = self._require()
        row = await self._run(self._get_sync, conn, doc_id)
        return None if row is None else self._parsed(doc_id, row)

    @staticmethod
    def _get_sync(conn: sqlite3.Connection, doc_id: str) -> str | None:
        row = conn.execute("SELECT doc FROM activations WHERE doc_id = ?", (doc_id,)).fetchone()
        return None if row is None else row[0]

    async def get_many(self, doc_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        conn = self._require()
        ids = list(dict.fromkeys(doc_ids))
        if not ids:
            return {}
        rows = await self._run(self._get_many_sync, conn, ids)
        return {doc_id: self._parsed(doc_id, text) for doc_id, text in rows}

    def _parsed(self, doc_id: str, text: str) -> dict[str, Any]:
        """A stored record as written; StoreUnavailable when the file holds what no parser
        takes (written by something else: an integer of thousands of digits, nesting past the
        interpreter's stack, not an object), like a store answering what it cannot mean."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise StoreUnavailable(f"SQLite store {self.describe()}: the stored record "
                                   f"{doc_id[:100]!r} is not JSON ({type(exc).__name__})") from None
        if not isinstance(doc, dict):
            raise StoreUnavailable(f"SQLite store {self.describe()}: the stored record "
                                   f"{doc_id[:100]!r} is not a JSON object")
        return doc

    @staticmethod
    def _get_many_sync(conn: sqlite3.Connection, ids: list[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            out.extend(
                conn.execute(
                    f"SELECT doc_id, doc FROM activations WHERE doc_id IN ({marks})", chunk
                ).fetchall()
            )
        return out

    async def count(self) -> int:
        conn = self._require()
        return await self._run(self._count_sync, conn)

    @staticmethod
    def _count_sync(conn: sqlite3.Connection) -> int:
        (count,) = conn.execute("SELECT COUNT(*) FROM activations").fetchone()
        return int(count)
