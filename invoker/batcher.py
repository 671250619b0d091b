"""The batcher: drains the bounded record channel into bulk store writes.

Contract: a record is handed to ``on_stored`` once the store has it (newly stored or already
there from an earlier execution), never before, and never dropped: writes that fail as a whole,
and single records the store did not take this time (``Outcome.RETRY``), are retried with
exponential backoff and jitter until they succeed or the batcher is cancelled. A record the
store refuses on its own for good (``Outcome.FAILED``), or keeps not taking for longer than
``doc_retry_limit_s`` while it takes the others, goes to ``on_refused`` with the store's
reason, so its owner can dead-letter it instead of stalling the partition (and holding a write
slot) forever.

Stored truth: when the store already had a record (a re-execution after a crash or a
rebalance), what is handed to ``on_stored`` is the stored record, read back with ``get_many``
(``READ_BACK_CHUNK`` records at a time) and kept encoded, not the re-run's: the completion
then tells what the store says. A failed read is retried like a failed write (and counted among
``store_write_failures``) for up to ``doc_retry_limit_s``; past it the re-runs are handed on
(the records are stored; what is lost is only which run the completion tells). While the read
returns, a batch holds both the re-runs and the stored records, encoded (at most twice
``batch_size`` records per write slot); then only the stored.

Latency: a record that finds the batcher idle (no write in flight, nothing else waiting) is
written at once. Only while a write is in flight does the next batch linger, up to
``linger_s``, to fill up; it is written as soon as no write is in flight any more (or it is
full). Under load the writes thus carry what accumulated during the previous one.

What may block: :meth:`Batcher.run` waits on the channel, on the store, and on the in-flight
write limit. While ``max_writes_in_flight`` writes are outstanding it stops receiving, so the
record channel fills up; that is the signal the feed pauses on. A write holds its slot until
``on_stored`` (and ``on_refused``) returned: what they wait for (the completion stage's bound)
counts as the write's.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from invoker.config import READ_BACK_CHUNK
from invoker.metrics import Metrics
from invoker.offsets import OffsetToken
from invoker.records import encode
from invoker.status_report import RecentDurations
from invoker.stuck import StuckWatch
from store import (
    DocResult,
    EncodedRecord,
    Outcome,
    Store,
    StoreUnavailable,
    UnencodableRecord,
)

if TYPE_CHECKING:
    from kafka.structs import TopicPartition

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PendingRecord:
    """A finished activation's record on its way to the store."""

    # An EncodedRecord as the invoker and the recorder make them (the stores write its bytes),
    # or as the batcher keeps the record it read back from the store (already stored)
    record: Mapping[str, Any]
    token: OffsetToken[TopicPartition] | None  # the feed message whose offset waits for it
    blocking: bool
    invoker_id: str | None = None  # who ran it, when not the service storing it (recorder)


@dataclass(frozen=True)
class BatcherSettings:
    # A record the store answers RETRY for (while the write as a whole works) is refused after
    # this long: what fails for one record only that long is most likely about the record.
    doc_retry_limit_s: float = 300.0
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
    step = min(max_s, initial_s * (2.0 ** min(attempt, 30)))  # 2 ** int is typed Any
    return step / 2 + rng.uniform(0, step / 2)


OnStored = Callable[[Sequence[PendingRecord]], Awaitable[None]]
OnRefused = Callable[[PendingRecord, str], Awaitable[None]]


class Batcher:
    def __init__(self, store: Store, settings: BatcherSettings, on_stored: OnStored,
                 on_refused: OnRefused, metrics: Metrics,
                 rng: random.Random | None = None, stuck: StuckWatch | None = None) -> None:
        self._store = store
        self._settings = settings
        self._on_stored = on_stored
        self._on_refused = on_refused
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._write_slots = trio.Semaphore(settings.max_writes_in_flight)
        self._writes_in_flight = 0
        self._linger: trio.CancelScope | None = None  # of the batch lingering, if one is
        # Every batch the store has not taken yet, for /healthz (see invoker.stuck).
        self.stuck = stuck or StuckWatch()
        self.recent_writes = RecentDurations()  # bulk writes that worked, for GET /status

    @property
    def writes_in_flight(self) -> int:
        return self._writes_in_flight

    async def run(self, records: trio.MemoryReceiveChannel[PendingRecord]) -> None:
        """Write everything received until the channel is closed and drained, then return."""
        async with trio.open_nursery() as writes:
            while True:
                await self._write_slots.acquire()
                batch = await self._collect(records)
                if not batch:
                    self._write_slots.release()
                    break
                self._writes_in_flight += 1
                writes.start_soon(self._write, batch)

    async def _collect(self, records: trio.MemoryReceiveChannel[PendingRecord]
                       ) -> list[PendingRecord]:
        """One batch: wait for a first record, take what is waiting, then, while a write is in
        flight, linger to fill up (see the module docstring)."""
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
        if len(batch) == size or not self._writes_in_flight:
            return batch
        # Cancelled early by the last write in flight ending (_write).
        with trio.move_on_after(self._settings.linger_s) as self._linger:
            while len(batch) < size:
                try:
                    batch.append(await records.receive())
                except trio.EndOfChannel:
                    break
        self._linger = None
        return batch

    async def _write(self, batch: list[PendingRecord]) -> None:
        """Write ``batch`` until every record is handed on; holds its write slot meanwhile, so
        records retried one by one stay within ``max_writes_in_flight`` × ``batch_size``.
        Registered with ``stuck`` until the store has taken every record (or refused it)."""
        token = self.stuck.begin(f"store write of {len(batch)} records")
        try:
            left = _Left(to_write=batch)
            attempt = 0
            while True:
                outcome = await self._attempt(token, left)
                left = outcome.left
                if not left:
                    self.stuck.end(token)
                for pending, reason in outcome.refused:
                    await self._on_refused(pending, reason)
                if outcome.done:
                    await self._on_stored(outcome.done)
                if not left:
                    return
                delay = backoff_delay(attempt, self._settings.backoff_initial_s,
                                      self._settings.backoff_max_s, self._rng)
                attempt += 1
                await trio.sleep(delay)
        finally:
            self.stuck.end(token)
            self._writes_in_flight -= 1
            if not self._writes_in_flight and self._linger is not None:
                self._linger.cancel()  # the store is idle: write what lingers now
            self._write_slots.release()

    async def _attempt(self, token: int, left: _Left) -> _Attempt:
        """Write what is left to write and read back what was already stored, once."""
        outcome = _Attempt(left=_Left(retrying_since=left.retrying_since,
                                      read_failing_since=left.read_failing_since))
        to_read = left.to_read
        if left.to_write:
            results = await self._write_once(token, left.to_write)
            if results is None:
                outcome.left.to_write = left.to_write
            else:
                for pending, result in zip(left.to_write, results, strict=True):
                    if result.outcome is Outcome.STORED:
                        self._metrics.records_stored.inc()
                        outcome.done.append(pending)
                    elif result.outcome is Outcome.ALREADY_STORED:
                        self._metrics.records_already_stored.inc()
                        to_read.append((pending, result.doc_id))
                    elif result.outcome is Outcome.RETRY:
                        now = trio.current_time()
                        since = left.retrying_since.setdefault(result.doc_id, now)
                        if now - since > self._settings.doc_retry_limit_s:
                            self._metrics.records_refused.inc()
                            log.error("store kept not taking a record; giving up",
                                      doc_id=result.doc_id, reason=result.reason,
                                      for_s=round(now - since, 1))
                            outcome.refused.append((pending, (
                                f"not taken for {now - since:.0f} s: {result.reason}")))
                            continue
                        log.warning("store did not take a record; will retry",
                                    doc_id=result.doc_id, reason=result.reason)
                        self.stuck.failed(token, f"{result.doc_id}: {result.reason}")
                        outcome.left.to_write.append(pending)
                    else:
                        self._metrics.records_refused.inc()
                        log.error("store refused a record", doc_id=result.doc_id,
                                  reason=result.reason)
                        outcome.refused.append((pending,
                                                result.reason or "refused by the store"))
        if to_read:
            stored = await self._read_once(token, [doc_id for _, doc_id in to_read])
            if stored is None:
                now = trio.current_time()
                if outcome.left.read_failing_since is None:
                    outcome.left.read_failing_since = now
                since = outcome.left.read_failing_since
                if now - since <= self._settings.doc_retry_limit_s:
                    outcome.left.to_read = to_read
                else:
                    # The records are stored; only the first run's outcome is unknown. A store
                    # that keeps failing this read (or an answer no parser takes) must not hold
                    # the partition for good: the completion tells the re-run's.
                    log.error("could not read back already stored records; completing them "
                              "with the re-run's", records=len(to_read),
                              for_s=round(now - since, 1))
                    outcome.done.extend(pending for pending, _ in to_read)
                    outcome.left.read_failing_since = None  # a later read gets its own time
            else:
                outcome.left.read_failing_since = None
                for pending, doc_id in to_read:
                    if doc_id not in stored:
                        # Reported as there, but gone (deleted meanwhile): write it again.
                        log.warning("already stored record not found; writing it again",
                                    doc_id=doc_id)
                        outcome.left.to_write.append(pending)
                    elif ((record := stored[doc_id]) is not None
                          and _same_activation(record, pending.record)):
                        outcome.done.append(dataclasses.replace(pending, record=record))
                    else:
                        log.error("stored record is not an activation record of this id; "
                                  "keeping the re-run's", doc_id=doc_id)
                        outcome.done.append(pending)
        return outcome

    async def _write_once(self, token: int, batch: list[PendingRecord]
                          ) -> list[DocResult] | None:
        """One bulk write; None if it failed as a whole (retry it)."""
        started = time.monotonic()
        try:
            results = await self._store.write_batch([p.record for p in batch])
        except StoreUnavailable as exc:
            self._metrics.store_write_failures.inc()
            self.stuck.failed(token, str(exc))
            log.warning("store write failed; will retry", error=str(exc), records=len(batch))
            return None
        elapsed = time.monotonic() - started
        self._metrics.store_write_seconds.observe(elapsed)
        self.recent_writes.add(elapsed)
        self._metrics.stage["store_write"].observe(elapsed)  # once per batch, not per record
        self._metrics.store_batch_size.observe(len(batch))
        return results

    async def _read_once(self, token: int, doc_ids: list[str]
                         ) -> dict[str, EncodedRecord | None] | None:
        """The stored records of ``doc_ids`` (those present), kept encoded (None for one no
        encoder can write: a lone surrogate the store kept); None if the read failed. Reads
        ``READ_BACK_CHUNK`` at a time: a record parsed takes up to ``PARSED_JSON_FACTOR`` times
        its size until it is encoded again, here, at once."""
        found: dict[str, EncodedRecord | None] = {}
        try:
            for start in range(0, len(doc_ids), READ_BACK_CHUNK):
                chunk = await self._store.get_many(doc_ids[start:start + READ_BACK_CHUNK])
                found.update((doc_id, _kept_encoded(doc)) for doc_id, doc in chunk.items())
                del chunk  # before the next read: one chunk parsed at a time
            return found
        except StoreUnavailable as exc:
            self._metrics.store_write_failures.inc()
            self.stuck.failed(token, str(exc))
            log.warning("reading already stored records failed; will retry", error=str(exc),
                        records=len(doc_ids))
            return None


@dataclass(slots=True)
class _Left:
    """What a batch still needs from the store."""

    to_write: list[PendingRecord] = field(default_factory=list)
    to_read: list[tuple[PendingRecord, str]] = field(default_factory=list)  # with store ids
    retrying_since: dict[str, float] = field(default_factory=dict)  # store id -> first RETRY
    read_failing_since: float | None = None  # the read back has failed since

    def __bool__(self) -> bool:
        return bool(self.to_write or self.to_read)


@dataclass(slots=True)
class _Attempt:
    """One attempt's outcome: records to hand on, records refused for good, what is left."""

    done: list[PendingRecord] = field(default_factory=list)
    refused: list[tuple[PendingRecord, str]] = field(default_factory=list)  # with the reason
    left: _Left = field(default_factory=_Left)


def _kept_encoded(doc: dict[str, Any]) -> EncodedRecord | None:
    """A record read back, as an EncodedRecord (its JSON and a few scalars); None for one no
    encoder can write."""
    try:
        return encode(doc)
    except UnencodableRecord:
        return None


def _same_activation(stored: EncodedRecord, record: Mapping[str, Any]) -> bool:
    """Whether ``stored`` is an activation record of ``record``'s activation, complete enough
    for a completion message (a status text, an integer code and a result); reads its head
    only, nothing decoded."""
    head = stored.response_head
    return (stored.get("activationId") == record.get("activationId")
            and stored.get("namespace") == record.get("namespace")
            and isinstance(head.get("status"), str)
            and type(head.get("statusCode")) is int
            and stored.result is not None)
