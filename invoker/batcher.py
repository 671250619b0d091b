"""The batcher: drains the bounded record channel into bulk store writes.

Contract: a record is handed to ``on_stored`` once the store has it (newly stored or already
there from an earlier execution), never before, and never dropped: writes that fail as a whole
are retried with exponential backoff and jitter until they succeed or the batcher is cancelled.
A record the store refuses on its own (retrying cannot help) goes to ``on_refused`` with the
store's reason, so its owner can dead-letter it instead of stalling the partition forever.

What may block: :meth:`Batcher.run` waits on the channel, on the store, and on the in-flight
write limit. While ``max_writes_in_flight`` writes are outstanding it stops receiving, so the
record channel fills up; that is the signal the feed pauses on.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from invoker.metrics import Metrics
from invoker.offsets import OffsetToken
from store import Outcome, Store, StoreUnavailable

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PendingRecord:
    """A finished activation's record on its way to the store."""

    record: dict[str, Any]
    token: OffsetToken | None  # the feed message whose offset waits for this record
    blocking: bool
    invoker_id: str | None = None  # who ran it, when not the service storing it (recorder)


@dataclass(frozen=True)
class BatcherSettings:
    batch_size: int = 100
    linger_s: float = 0.02
    max_writes_in_flight: int = 2
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half the step fixed, half random.

    The fixed half keeps retries from hammering a struggling store; the random half keeps many
    invokers from retrying in lockstep.
    """
    step = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return step / 2 + rng.uniform(0, step / 2)


OnStored = Callable[[Sequence[PendingRecord]], Awaitable[None]]
OnRefused = Callable[[PendingRecord, str], Awaitable[None]]


class Batcher:
    def __init__(self, store: Store, settings: BatcherSettings, on_stored: OnStored,
                 on_refused: OnRefused, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        self._store = store
        self._settings = settings
        self._on_stored = on_stored
        self._on_refused = on_refused
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._write_slots = trio.Semaphore(settings.max_writes_in_flight)

    async def run(self, records: trio.MemoryReceiveChannel[PendingRecord]) -> None:
        """Write everything received until the channel is closed and drained, then return."""
        async with trio.open_nursery() as writes:
            while True:
                await self._write_slots.acquire()
                batch = await self._collect(records)
                if not batch:
                    self._write_slots.release()
                    break
                writes.start_soon(self._write, batch)

    async def _collect(self, records: trio.MemoryReceiveChannel[PendingRecord]
                       ) -> list[PendingRecord]:
        """One batch: wait for a first record, take what is waiting, then linger to fill up."""
        try:
            batch = [await records.receive()]
        except trio.EndOfChannel:
            return []
        size = self._settings.batch_size
        while len(batch) < size:  # whatever is already waiting, without lingering
            try:
                batch.append(records.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if len(batch) == size:
            return batch
        with trio.move_on_after(self._settings.linger_s):
            while len(batch) < self._settings.batch_size:
                try:
                    batch.append(await records.receive())
                except trio.EndOfChannel:
                    break
        return batch

    async def _write(self, batch: list[PendingRecord]) -> None:
        try:
            remaining = batch
            attempt = 0
            while remaining:
                remaining = await self._attempt(remaining)
                if remaining:
                    delay = backoff_delay(attempt, self._settings.backoff_initial_s,
                                          self._settings.backoff_max_s, self._rng)
                    attempt += 1
                    await trio.sleep(delay)
        finally:
            self._write_slots.release()

    async def _attempt(self, batch: list[PendingRecord]) -> list[PendingRecord]:
        """Write ``batch`` once; hand every record on; return the batch if it must be retried."""
        started = time.monotonic()
        try:
            results = await self._store.write_batch([p.record for p in batch])
        except StoreUnavailable as exc:
            self._metrics.store_write_failures.inc()
            log.warning("store write failed; will retry", error=str(exc), records=len(batch))
            return batch
        self._metrics.store_write_seconds.observe(time.monotonic() - started)
        self._metrics.store_batch_size.observe(len(batch))
        done: list[PendingRecord] = []
        for pending, result in zip(batch, results, strict=True):
            if result.outcome is Outcome.STORED:
                self._metrics.records_stored.inc()
                done.append(pending)
            elif result.outcome is Outcome.ALREADY_STORED:
                self._metrics.records_already_stored.inc()
                done.append(pending)
            else:
                self._metrics.records_refused.inc()
                log.error("store refused a record", doc_id=result.doc_id, reason=result.reason)
                await self._on_refused(pending, result.reason or "refused by the store")
        if done:
            await self._on_stored(done)
        return []
