"""The CouchDB record store against a real server (pouchdb-server 4.2 or Apache CouchDB 3).

The server is at INVOKER_TEST_COUCHDB_URL (default http://127.0.0.1:5984; deploy/pouchdb.sh
starts one there). If it is not reachable these tests FAIL: they never skip. Each test uses a
database of its own and deletes it afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
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
from store.couchdb import CouchStore, _status_detail
from tests.support.faultproxy import FaultProxy
from tests.support.records import record, rid
from tests.support.unencodable import unencodable_records

BASE_URL = os.environ.get("INVOKER_TEST_COUCHDB_URL", "http://127.0.0.1:5984").rstrip("/")
REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55word"


def with_netloc(url: str, host: str, port: int) -> str:
    """``url`` sent to host:port instead, keeping any user:password."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_server_checked = False


async def require_server() -> None:
    global _server_checked
    if _server_checked:
        return
    problem = None
    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            resp = await client.get(BASE_URL + "/")
            resp.raise_for_status()
            resp.json()
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:  # fail outside the except block: no chained traceback
        masked = CouchStore(BASE_URL + "/x").describe().removesuffix("/x")
        pytest.fail(
            f"No CouchDB-compatible server answers at {masked} ({problem}). "
            "Start one with deploy/pouchdb.sh or point INVOKER_TEST_COUCHDB_URL at one.",
            pytrace=False,
        )
    _server_checked = True


@pytest.fixture
async def db_url():
    """URL of a fresh, not yet existing database; deleted after the test."""
    await require_server()
    url = f"{BASE_URL}/invoker-test-{uuid.uuid4().hex[:16]}"
    try:
        yield url
    finally:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            resp = await client.delete(url)
            assert resp.status_code in (200, 202, 404), resp.text


@pytest.fixture
async def store(db_url: str):
    s = open_store(db_url, timeout_s=10)
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def target() -> tuple[str, int]:
    parts = urlsplit(BASE_URL)
    return parts.hostname or "127.0.0.1", parts.port or 5984


async def test_open_creates_its_database(db_url: str) -> None:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        assert (await client.get(db_url)).status_code == 404
        s = open_store(db_url, timeout_s=10)
        assert isinstance(s, CouchStore) and isinstance(s, Store)
        try:
            await s.open()
            assert (await client.get(db_url)).status_code == 200
            await s.open()  # already there: fine
            other = open_store(db_url, timeout_s=10)
            try:
                await other._create_db()  # type: ignore[attr-defined]  # 412 file_exists: fine
            finally:
                await other.aclose()
            assert await s.count() == 0
        finally:
            await s.aclose()


async def test_idempotent_writes_report_conflicts_per_document(store: Store) -> None:
    a, b = record(activation_id="a"), record(activation_id="b")
    assert await store.write_batch([a, b]) == [
        DocResult("guest/a", Outcome.STORED),
        DocResult("guest/b", Outcome.STORED),
    ]
    a2, c = record(activation_id="a", duration=1), record(activation_id="c")
    assert await store.write_batch([a2, c, b]) == [
        DocResult("guest/a", Outcome.ALREADY_STORED),
        DocResult("guest/c", Outcome.STORED),
        DocResult("guest/b", Outcome.ALREADY_STORED),
    ]
    # Same id twice in one batch: the first is stored, the second reported as already there.
    d, d2 = record(activation_id="d"), record(activation_id="d", duration=2)
    results = await store.write_batch([d, d2])
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.ALREADY_STORED]
    assert await store.get("guest/a") == a
    assert await store.get("guest/d") == d
    assert await store.count() == 4


async def test_a_stale_rev_does_not_hide_a_new_record(store: Store) -> None:
    # A caller's "_rev" must not make CouchDB see an update of a missing doc (a conflict).
    rec = record(activation_id="r", _rev="1-0123456789abcdef")
    assert (await store.write_batch([rec]))[0].outcome is Outcome.STORED
    assert await store.get("guest/r") == {k: v for k, v in rec.items() if k != "_rev"}


async def test_an_encoded_record_is_sent_as_its_bytes_with_its_id_spliced_in(
        store: Store, db_url: str) -> None:
    rec = record(activation_id="enc")
    # Bytes that differ from their dict: the store must send the bytes, not encode the dict.
    other = record(activation_id="enc2")
    marked = EncodedRecord(other, encode_json({**other, "marker": "bytes"}), None)
    # A caller's _id/_rev (a hostile overflowed record may have them) are still dropped.
    stale = encode(record(activation_id="enc3", _id="elsewhere", _rev="1-0123456789abcdef"))
    results = await store.write_batch([encode(rec), marked, stale])
    assert [r.outcome for r in results] == [Outcome.STORED] * 3
    assert await store.get("guest/enc") == rec
    assert await store.get("guest/enc2") == {**other, "marker": "bytes"}
    assert await store.get("guest/enc3") == {
        k: v for k, v in stale.items() if k not in ("_id", "_rev")}
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        raw = (await client.get(f"{db_url}/{quote('guest/enc', safe='')}")).json()
    assert raw["_id"] == "guest/enc" and raw["activationId"] == "enc"


async def test_bad_records_fail_alone(store: Store) -> None:
    good = record()
    results = await store.write_batch(
        [
            {"namespace": "guest", "name": "no activation id"},
            good,
            record(activation_id="s", response={"result": {1, 2}}),  # not JSON
            record(activation_id="u", _attachments={}),  # reserved by CouchDB
            record(namespace="_users", activation_id="v"),  # id may not start with "_"
        ]
    )
    assert [r.outcome for r in results] == [
        Outcome.FAILED,
        Outcome.STORED,
        Outcome.FAILED,
        Outcome.FAILED,
        Outcome.FAILED,
    ]
    assert all(r.reason for r in results if r.outcome is Outcome.FAILED)
    assert await store.count() == 1


async def test_records_that_cannot_be_encoded_fail_alone(store: Store) -> None:
    bad = unencodable_records()
    good = [record() for _ in range(3)]
    results = await store.write_batch([good[0], *bad.values(), good[1], good[2]])
    assert [r.outcome for r in results] == (
        [Outcome.STORED] + [Outcome.FAILED] * len(bad) + [Outcome.STORED] * 2)
    for what, result in zip(bad, results[1:-2], strict=True):
        assert result.reason and result.reason.startswith("record is not JSON"), what
    assert await store.count() == 3
    assert await store.get_many([rid(r) for r in good]) == {rid(r): r for r in good}


async def put_validator(db_url: str, body: str) -> None:
    """Install (or replace) a validate_doc_update function: the server then answers some
    documents of a _bulk_docs request with an error of their own."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        current = await client.get(f"{db_url}/_design/check")
        doc = {"validate_doc_update": f"function(doc, old, user) {{ {body} }}"}
        if current.status_code == 200:
            doc["_rev"] = current.json()["_rev"]
        resp = await client.put(f"{db_url}/_design/check", json=doc)
        assert resp.status_code in (200, 201), resp.text


async def test_per_document_errors_are_permanent_or_retried(store: Store, db_url: str) -> None:
    await put_validator(db_url, """
        if (doc.name === "deny") throw({forbidden: "not this one"});
        if (doc.name === "nobody") throw({unauthorized: "who are you"});
        if (doc.name === "flaky") throw new Error("validator crashed" + "x".repeat(500));
    """)
    ok, deny, nobody, flaky = (record(name=n) for n in ("ok", "deny", "nobody", "flaky"))
    results = await store.write_batch([ok, deny, nobody, flaky, flaky])
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.FAILED, Outcome.FAILED,
                                            Outcome.RETRY, Outcome.RETRY]
    assert results[1].reason == "forbidden: not this one"
    assert results[2].reason is not None and results[2].reason.startswith("unauthorized")
    assert results[3].reason is not None and len(results[3].reason) < 200
    # What failed for a passing reason is written once that reason is gone.
    await put_validator(db_url, "")
    assert [r.outcome for r in await store.write_batch([flaky, ok])] == [
        Outcome.STORED, Outcome.ALREADY_STORED]
    assert await store.get(rid(flaky)) == flaky


async def test_get_get_many_count(store: Store) -> None:
    recs = [record(activation_id=f"m{i:04d}") for i in range(1000)]
    for start in range(0, 1000, 500):
        results = await store.write_batch(recs[start : start + 500])
        assert all(r.outcome is Outcome.STORED for r in results)
    assert await store.count() == 1000
    assert await store.get("guest/m0007") == recs[7]
    assert await store.get("guest/missing") is None
    wanted = [rid(r) for r in recs[::3]] + ["guest/missing-1", "other/missing-2"]
    got = await store.get_many(wanted)
    assert set(got) == {rid(r) for r in recs[::3]}
    assert got["guest/m0003"] == recs[3]
    assert "_id" not in got["guest/m0003"] and "_rev" not in got["guest/m0003"]
    assert len(await store.get_many([rid(r) for r in recs])) == 1000
    assert await store.get_many([]) == {}


async def test_ids_with_slashes_round_trip(store: Store, db_url: str) -> None:
    recs = [
        record(namespace="guest", activation_id="plain"),
        record(namespace="org_space/sub", activation_id="nested"),
        record(namespace="we+ird ns", activation_id="a%2Fb?c#d&e"),
    ]
    assert [r.outcome for r in await store.write_batch(recs)] == [Outcome.STORED] * 3
    for rec in recs:
        assert await store.get(rid(rec)) == rec
    assert set(await store.get_many([rid(r) for r in recs])) == {rid(r) for r in recs}
    # On the server the id is exactly "<namespace>/<activationId>".
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        resp = await client.get(f"{db_url}/{quote('org_space/sub/nested', safe='')}")
        assert resp.status_code == 200
        assert resp.json()["_id"] == "org_space/sub/nested"
    assert (await store.write_batch([recs[1]]))[0].outcome is Outcome.ALREADY_STORED


async def test_password_is_masked() -> None:
    url = f"http://admin:{SECRET}@127.0.0.1:{closed_port()}/activations"
    s = open_store(url, timeout_s=5)
    try:
        assert s.describe() == f"http://***@127.0.0.1:{urlsplit(url).port}/activations"
        with pytest.raises(StoreUnavailable) as info:
            await s.open()
        assert "http://***@127.0.0.1" in str(info.value)
        chain: BaseException | None = info.value
        while chain is not None:  # nor anywhere in the chained causes
            assert SECRET not in str(chain) and SECRET not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        with pytest.raises(StoreUnavailable) as info:
            await s.write_batch([record()])
        assert SECRET not in str(info.value)
    finally:
        await s.aclose()
    assert CouchStore("http://127.0.0.1:5984/db").describe() == "http://127.0.0.1:5984/db"
    with pytest.raises(ValueError) as bad:
        open_store(f"http://admin:{SECRET}@127.0.0.1:5984/")
    assert SECRET not in str(bad.value)


async def test_wrong_credentials_give_a_clear_error(db_url: str) -> None:
    # CouchDB 3, and pouchdb-server even without admins, answer 401 to a wrong password.
    parts = urlsplit(db_url)
    hostport = parts.netloc.rpartition("@")[2]
    bad = open_store(urlunsplit(parts._replace(netloc=f"nobody:{SECRET}@{hostport}")), timeout_s=5)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await bad.open()
        assert "HTTP 401" in str(info.value) and "http://***@" in str(info.value)
        assert SECRET not in str(info.value)
    finally:
        await bad.aclose()


async def test_unreachable_server_is_store_unavailable() -> None:
    s = open_store(f"http://127.0.0.1:{closed_port()}/activations", timeout_s=5)
    try:
        with trio.fail_after(5):
            for call in (s.open, s.count, lambda: s.write_batch([record()])):
                with pytest.raises(StoreUnavailable, match="ConnectError"):
                    await call()
            with pytest.raises(StoreUnavailable):
                await s.get("guest/x")
            with pytest.raises(StoreUnavailable):
                await s.get_many(["guest/x"])
    finally:
        await s.aclose()


async def test_proxy_down_then_up(db_url: str, target: tuple[str, int]) -> None:
    async with FaultProxy(*target) as proxy:
        s = open_store(with_netloc(db_url, "127.0.0.1", proxy.port), timeout_s=5)
        try:
            await s.open()
            first = record()
            assert (await s.write_batch([first]))[0].outcome is Outcome.STORED
            assert proxy.connections >= 1

            proxy.down = True  # also drops the keep-alive connection the store holds
            assert proxy.active == 0
            with trio.fail_after(5):
                with pytest.raises(StoreUnavailable):
                    await s.write_batch([record()])
                with pytest.raises(StoreUnavailable):
                    await s.count()

            proxy.down = False
            rec = record()
            assert (await s.write_batch([rec, first]))[0].outcome is Outcome.STORED
            assert await s.get(rid(rec)) == rec
            assert await s.count() == 2
        finally:
            await s.aclose()


async def test_slow_store_still_writes(db_url: str, target: tuple[str, int]) -> None:
    async with FaultProxy(*target) as proxy:
        s = open_store(with_netloc(db_url, "127.0.0.1", proxy.port), timeout_s=10)
        try:
            await s.open()
            proxy.latency = 0.3
            recs = [record() for _ in range(50)]
            started = trio.current_time()
            results = await s.write_batch(recs)
            elapsed = trio.current_time() - started
            assert [r.outcome for r in results] == [Outcome.STORED] * 50
            assert elapsed >= 0.3
            proxy.latency = 0
            assert await s.count() == 50
        finally:
            await s.aclose()


async def test_timeout_is_store_unavailable_and_retry_is_idempotent(
    db_url: str, target: tuple[str, int]
) -> None:
    async with FaultProxy(*target) as proxy:
        s = open_store(with_netloc(db_url, "127.0.0.1", proxy.port), timeout_s=0.5)
        try:
            await s.open()
            recs = [record() for _ in range(5)]
            proxy.latency = 1.0
            started = trio.current_time()
            with pytest.raises(StoreUnavailable, match="within 0.5 s"):
                await s.write_batch(recs)
            assert trio.current_time() - started < 1.5  # a total deadline, not per read
            proxy.latency = 0
            # Whether or not the timed-out request reached the server, the retry stores each
            # record exactly once.
            await trio.sleep(1.2)
            results = await s.write_batch(recs)
            assert {r.outcome for r in results} <= {Outcome.STORED, Outcome.ALREADY_STORED}
            assert await s.count() == 5
        finally:
            await s.aclose()


async def test_proxy_process_driven_by_control_file(
    db_url: str, target: tuple[str, int], tmp_path: Path
) -> None:
    control = tmp_path / "proxy.json"

    async def set_control(**settings: object) -> None:
        tmp = tmp_path / "proxy.json.tmp"
        await trio.Path(tmp).write_text(json.dumps(settings))
        await trio.Path(tmp).rename(control)
        await trio.sleep(0.3)  # the proxy re-reads every 0.1 s

    await set_control(latency=0, down=False)
    cmd = [
        sys.executable,
        "-m",
        "tests.support.faultproxy",
        "--target",
        f"{target[0]}:{target[1]}",
        "--control-file",
        str(control),
    ]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, cmd, cwd=REPO, stdout=subprocess.PIPE, check=False)
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(10):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1)
                    assert chunk, "faultproxy exited before printing its port"
                    line += chunk
            port = int(line)
            s = open_store(with_netloc(db_url, "127.0.0.1", port), timeout_s=5)
            try:
                await s.open()
                assert (await s.write_batch([record()]))[0].outcome is Outcome.STORED
                await set_control(latency=0, down=True)
                with pytest.raises(StoreUnavailable):
                    await s.write_batch([record()])
                await set_control(latency=0.3, down=False)
                started = trio.current_time()
                assert (await s.write_batch([record()]))[0].outcome is Outcome.STORED
                assert trio.current_time() - started >= 0.3
                assert await s.count() == 2
            finally:
                await s.aclose()
        finally:
            proc.terminate()  # SIGTERM: the proxy exits cleanly, with status 0
            with trio.fail_after(10):
                assert await proc.wait() == 0


def test_an_error_answer_nested_past_pythons_stack_is_described_not_raised():
    resp = httpx.Response(500, content=b"[" * 100_000)
    assert _status_detail(resp) == "HTTP 500"
    huge = httpx.Response(500, json={"error": "e" * 1_000_000, "reason": "r"})
    assert len(_status_detail(huge)) < 500
