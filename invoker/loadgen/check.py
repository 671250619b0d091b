"""The store checks of a run: counting records before, reading every sent id back after.

Each store session runs in a private trio run and blocks the calling thread, bounded by its
timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from invoker.loadgen.report import Report
from store import Store, doc_id_for

STORE_CHUNK = 500  # doc ids per get_many call
STORE_TIMEOUT_S = 60.0  # bound on each store session (count, or the whole read-back)

_T = TypeVar("_T")


def store_session(url: str | None, body: Callable[[Store], Awaitable[_T]],
                  timeout_s: float = STORE_TIMEOUT_S) -> _T:
    """Open the store, run ``await body(store)``, close it — in a private trio run (bounded)."""
    import trio

    from store import open_store

    async def main() -> _T:
        with trio.fail_after(timeout_s):
            store = open_store(url)
            await store.open()
            try:
                return await body(store)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await store.aclose()

    return trio.run(main)


def count_store(url: str | None) -> int:
    async def body(store: Store) -> int:
        return await store.count()

    return store_session(url, body)


def read_store(url: str | None, doc_ids: list[str]
               ) -> tuple[dict[str, dict[str, Any]], int]:
    """The records found for ``doc_ids`` (by doc id) and the store's count, in one session."""
    async def body(store: Store) -> tuple[dict[str, dict[str, Any]], int]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(doc_ids), STORE_CHUNK):
            found.update(await store.get_many(doc_ids[start:start + STORE_CHUNK]))
        return found, await store.count()

    # 60 s, plus 10 s per 50,000 ids
    return store_session(url, body, STORE_TIMEOUT_S + len(doc_ids) / 50_000 * 10)


def check_store(url: str | None, namespace: str, sent: Iterable[str], produced: set[str],
                report: Report) -> None:
    """Fill the report's store figures: stored, lost, by status, duplicate records.

    ``sent``: every id that was sent, acknowledged or not: an unacknowledged message may still
    have reached the daemon, and its record must not count as a duplicate. A failing read is
    recorded in ``report.errors`` and counts every produced activation as lost.
    """
    all_doc_ids = [doc_id_for(namespace, i) for i in sent]
    try:
        found, count_after = read_store(url, all_doc_ids)
    except Exception as exc:
        report.errors.append(f"store check failed: {type(exc).__name__}: {exc}")
        report.lost = report.produced
        return
    report.store_checked = True
    report.store_count_after = count_after
    by_status: dict[str, int] = {}
    stored = 0
    for activation_id in produced:
        record = found.get(doc_id_for(namespace, activation_id))
        if record is None:
            continue
        stored += 1
        response = record.get("response") if isinstance(record, dict) else None
        status = response.get("status") if isinstance(response, dict) else None
        label = status if isinstance(status, str) else "unknown"
        by_status[label] = by_status.get(label, 0) + 1
    report.stored = stored
    report.lost = report.produced - stored
    report.by_status = by_status
    assert report.store_count_before is not None
    # Valid only while nothing else writes to the store: the store is keyed by
    # "<namespace>/<activationId>", so growth beyond our own ids means a second copy.
    growth = count_after - report.store_count_before
    report.duplicate_records = max(0, growth - len(found))
