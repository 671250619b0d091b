"""The embedded SQLite record store, on real database files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from invoker.records import encode
from store import (
    DocResult,
    EncodedRecord,
    Outcome,
    Store,
    StoreUnavailable,
    encode_json,
    open_store,
)
from store.sqlite import SqliteStore
from tests.support.records import record, rid
from tests.support.unencodable import unencodable_records


@pytest.fixture
async def store(tmp_path: Path):
    s = open_store(f"sqlite://{tmp_path}/records.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def test_store_get_count(store: Store) -> None:
    assert isinstance(store, Store)
    assert await store.count() == 0
    recs = [record() for _ in range(3)]
    results = await store.write_batch(recs)
    assert results == [DocResult(rid(r), Outcome.STORED) for r in recs]
    assert await store.count() == 3
    for r in recs:
        assert await store.get(rid(r)) == r
    assert await store.get("guest/nope") is None
    assert await store.write_batch([]) == []


async def test_same_id_twice_in_one_batch_keeps_the_first(store: Store) -> None:
    first = record(activation_id="a1")
    second = record(activation_id="a1", duration=999)
    results = await store.write_batch([first, second])
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.ALREADY_STORED]
    assert {r.doc_id for r in results} == {"guest/a1"}
    assert await store.get("guest/a1") == first
    assert await store.count() == 1


async def test_same_id_across_batches_keeps_the_first(store: Store) -> None:
    a, b = record(activation_id="a"), record(activation_id="b")
    assert [r.outcome for r in await store.write_batch([a, b])] == [Outcome.STORED] * 2
    a2 = record(activation_id="a", duration=1)
    c = record(activation_id="c")
    results = await store.write_batch([a2, c, b])
    assert results == [
        DocResult("guest/a", Outcome.ALREADY_STORED),
        DocResult("guest/c", Outcome.STORED),
        DocResult("guest/b", Outcome.ALREADY_STORED),
    ]
    assert await store.get("guest/a") == a
    assert await store.count() == 3


async def test_bad_records_fail_alone(store: Store) -> None:
    good = record()
    no_id = {"namespace": "guest", "name": "x"}
    not_json = record(response={"result": {1, 2}})
    results = await store.write_batch([no_id, good, not_json])
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.STORED, Outcome.FAILED]
    assert results[0].reason and results[2].reason
    assert results[2].doc_id == rid(not_json)
    assert await store.count() == 1


async def test_records_that_cannot_be_encoded_fail_alone(store: Store) -> None:
    bad = unencodable_records()
    good = [record() for _ in range(3)]
    batch = [good[0], *bad.values(), good[1], good[2]]
    results = await store.write_batch(batch)
    assert [r.outcome for r in results] == (
        [Outcome.STORED] + [Outcome.FAILED] * len(bad) + [Outcome.STORED] * 2)
    for what, result in zip(bad, results[1:-2], strict=True):
        assert result.reason and result.reason.startswith("record is not JSON"), what
        assert len(result.reason) < 200, what
    assert await store.count() == 3
    assert await store.get_many([rid(r) for r in good]) == {rid(r): r for r in good}


async def test_records_are_stored_as_utf8_text(store: Store) -> None:
    rec = record(activation_id="utf8")
    await store.write_batch([rec])
    conn = store._conn  # type: ignore[attr-defined]
    text = conn.execute("SELECT doc FROM activations WHERE doc_id = 'guest/utf8'").fetchone()[0]
    assert isinstance(text, str) and "héllo ☃" in text  # not \u escapes
    assert await store.get("guest/utf8") == rec


async def test_an_encoded_record_is_written_as_its_bytes_not_encoded_again(store: Store) -> None:
    rec = record(activation_id="enc")
    encoded = encode(rec)
    assert encoded.data == encode_json(rec)  # what the store wrote for the dict before
    # Bytes that differ from their dict: the store must write the bytes, not encode the dict.
    other = record(activation_id="enc2")
    marked = EncodedRecord(other, encode_json({**other, "marker": "bytes"}), None)
    results = await store.write_batch([encoded, marked])
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.STORED]
    conn = store._conn  # type: ignore[attr-defined]
    text = conn.execute("SELECT doc FROM activations WHERE doc_id = 'guest/enc'").fetchone()[0]
    assert text == encoded.data.decode()
    assert await store.get("guest/enc") == rec
    assert await store.get("guest/enc2") == {**other, "marker": "bytes"}


async def test_a_record_sqlite_refuses_fails_alone(store: Store) -> None:
    conn = store._conn  # type: ignore[attr-defined]
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4096)  # "string or blob too big" above it
    small = [record() for _ in range(2)]
    big = record(response={"statusCode": 0, "result": {"x": "y" * 8192}})
    results = await store.write_batch([small[0], big, small[1]])
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.FAILED, Outcome.STORED]
    assert results[1].doc_id == rid(big) and "too big" in (results[1].reason or "")
    assert await store.count() == 2


async def test_two_stores_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    a = open_store(f"sqlite://{path}")
    b = open_store(f"sqlite://{path}")
    await a.open()
    await b.open()
    try:
        r1 = record(activation_id="one")
        assert (await a.write_batch([r1]))[0].outcome is Outcome.STORED
        # The other connection sees the committed write and cannot duplicate it.
        assert await b.get("guest/one") == r1
        assert (await b.write_batch([record(activation_id="one", duration=7)]))[
            0
        ].outcome is Outcome.ALREADY_STORED
        assert await a.get("guest/one") == r1

        # Both write at the same time, overlapping ids: each id is STORED exactly once.
        ids = [f"c{i}" for i in range(200)]
        outcomes: dict[str, list[Outcome]] = {}

        async def writer(s: Store) -> None:
            for start in range(0, len(ids), 20):
                batch = [record(activation_id=i) for i in ids[start : start + 20]]
                for res in await s.write_batch(batch):
                    outcomes.setdefault(res.doc_id, []).append(res.outcome)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, a)
            nursery.start_soon(writer, b)
        for i in ids:
            assert sorted(outcomes[f"guest/{i}"], key=lambda o: o.value) == [
                Outcome.ALREADY_STORED,
                Outcome.STORED,
            ]
        assert await a.count() == await b.count() == 201
    finally:
        await a.aclose()
        await b.aclose()


async def test_get_many_with_missing_ids(store: Store) -> None:
    recs = [record(activation_id=f"m{i:04d}") for i in range(1000)]
    for start in range(0, 1000, 250):
        await store.write_batch(recs[start : start + 250])
    wanted = [rid(r) for r in recs[::2]] + ["guest/missing-1", "other/missing-2"]
    got = await store.get_many(wanted)
    assert set(got) == {rid(r) for r in recs[::2]}
    assert got["guest/m0010"] == recs[10]
    # 1000 ids in one call (more than SQLite's classic 999 host parameters).
    assert len(await store.get_many([rid(r) for r in recs])) == 1000
    assert await store.get_many([]) == {}
    assert await store.get_many(["guest/missing"]) == {}


async def test_describe_and_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(f"sqlite://{tmp_path}/a/b/records.sqlite3")
    assert s.describe() == f"sqlite://{tmp_path}/a/b/records.sqlite3"
    monkeypatch.chdir(tmp_path)
    rel = open_store("sqlite://rel/dir/r.sqlite3")
    assert isinstance(rel, SqliteStore)
    assert rel.describe() == f"sqlite://{tmp_path}/rel/dir/r.sqlite3"
    for default in (None, ""):
        d = open_store(default)
        assert isinstance(d, SqliteStore)
        assert d.describe() == f"sqlite://{tmp_path}/invoker-records.sqlite3"
    assert not (tmp_path / "invoker-records.sqlite3").exists()  # nothing made before open()
    with pytest.raises(ValueError):
        open_store("ftp://example/x")


async def test_open_makes_parent_directories_and_uses_wal_full(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "records.sqlite3"
    s = open_store(f"sqlite://{path}")
    await s.open()
    try:
        await s.write_batch([record()])
        assert path.exists()
        conn = s._conn  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await s.aclose()
    # Survives a reopen.
    s2 = open_store(f"sqlite://{path}")
    await s2.open()
    try:
        assert await s2.count() == 1
    finally:
        await s2.aclose()


async def test_locked_database_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    s = open_store(f"sqlite://{path}", timeout_s=0.2)
    await s.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with trio.fail_after(5):
            with pytest.raises(StoreUnavailable, match="locked"):
                await s.write_batch([record(activation_id="x")])
        blocker.execute("ROLLBACK")
        # Nothing half-written; works once the lock is gone.
        assert await s.count() == 0
        assert (await s.write_batch([record(activation_id="x")]))[0].outcome is Outcome.STORED
    finally:
        blocker.close()
        await s.aclose()


async def test_unopenable_path_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    s = open_store(f"sqlite://{tmp_path}/file/records.sqlite3")
    with pytest.raises(StoreUnavailable):
        await s.open()


@pytest.mark.parametrize("stored", ['{"n":' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000,
                                    "[1,2]", "not json"])
async def test_a_stored_record_no_parser_takes_is_the_store_failing_not_a_crash(
        tmp_path: Path, stored: str) -> None:
    """Written by something else into the file: reading it back (what the batcher does for a
    re-execution) says the store failed, which the batcher retries for a while and gives up."""
    path = tmp_path / "records.sqlite3"
    s = open_store(f"sqlite://{path}")
    await s.open()
    try:
        r = record()
        await s.write_batch([r])
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE activations SET doc = ?", (stored,))
        for read in (lambda: s.get(rid(r)), lambda: s.get_many([rid(r)])):
            with pytest.raises(StoreUnavailable, match="stored record"):
                await read()
    finally:
        await s.aclose()
