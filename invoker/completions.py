"""The completion stage: a completion message for every stored record, off the write path.

The batcher hands each batch of stored records to :meth:`CompletionStage.submit` and lets its
write slot go as soon as the stage took the batch: the store never waits on Kafka. The stage
publishes up to ``max_in_flight`` batches at a time (acks=all; the producer batches whatever
accumulates meanwhile) and completes each record's offset once Kafka acknowledged its
completion, so a completion still means the record is stored, and an offset still commits only
after its completion.

Bound: at most ``max_in_flight`` batches, each of at most ``batch_size`` completions, are held
until acknowledged. A batch keeps its completion messages (a few fields, and the result when
the activation was blocking: at most a record's size) and offset tokens, not the records.
:meth:`CompletionStage.submit` blocks while that many batches wait, holding the submitting
write's slot, so a slow Kafka backs up into the record channel and pauses the feed, as a slow
store does.

Kafka's refusals never wedge a partition. A completion too large for the completions topic is
published without its result, with ``resultOmitted`` saying why (the stored record has the
result). One that Kafka can never take for another reason (see :mod:`invoker.kafka_io`) is
logged in one line and its offset completes all the same: the record is stored, and losing a
completion notice is better than stopping the partition. Failures that may pass are retried
for as long as it takes, and ``/healthz`` fails once a publish has been unfinished for
``health_stuck_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from invoker.batcher import PendingRecord
from invoker.kafka_io import OutgoingMessage, Publisher, Refusal, Unpublishable
from invoker.metrics import Metrics
from invoker.offsets import OffsetToken
from invoker.records import completion_message, completion_value
from invoker.safejson import dumps_escaped

if TYPE_CHECKING:
    from kafka.structs import TopicPartition

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Completion:
    token: OffsetToken[TopicPartition] | None
    message: OutgoingMessage
    # A blocking activation's completion without its result, to send instead when the one with
    # its result is too large for the topic; None: the message carries no result.
    summary: dict[str, Any] | None

    @property
    def key(self) -> bytes:
        """The activation id (every completion is keyed by it)."""
        assert self.message.key is not None
        return self.message.key


class CompletionStage:
    def __init__(self, publisher: Publisher, topic: str, invoker_id: str, max_in_flight: int,
                 complete: Callable[[OffsetToken[TopicPartition]], None], metrics: Metrics
                 ) -> None:
        self._publisher = publisher
        self._topic = topic
        self._invoker_id = invoker_id
        self._complete = complete
        self._metrics = metrics
        self._places = trio.Semaphore(max_in_flight)
        # Unbuffered: a batch is taken only when a place is free (run acquires one first).
        self._tx, self._rx = trio.open_memory_channel[list[_Completion]](0)

    async def submit(self, stored: Sequence[PendingRecord]) -> None:
        """Publish completions of ``stored`` (durable records) and complete their offsets once
        Kafka acknowledged them. Encodes the completions now (the result of an EncodedRecord is
        spliced from its bytes), then blocks while ``max_in_flight`` batches await acks."""
        await self._tx.send([self._completion(pending) for pending in stored])

    def close(self) -> None:
        """No more batches: :meth:`run` returns once those submitted are acknowledged."""
        self._tx.close()

    async def run(self) -> None:
        """Publish what is submitted until :meth:`close`, then wait for the last acks.
        Blocks for the life of the stage."""
        async with trio.open_nursery() as publishing:
            while True:
                await self._places.acquire()
                try:
                    batch = await self._rx.receive()
                except trio.EndOfChannel:
                    return
                publishing.start_soon(self._publish, batch)

    def _completion(self, pending: PendingRecord) -> _Completion:
        record = pending.record
        summary = completion_message(record, pending.invoker_id or self._invoker_id,
                                     blocking=False)
        key = record["activationId"].encode()
        if not pending.blocking:
            return _Completion(pending.token, self._message(key, _encoded(summary)), None)
        try:
            value = completion_value(summary, record)
        except ValueError as exc:  # NaN or a lone surrogate (a record read back may hold)
            summary["resultOmitted"] = f"not encodable as UTF-8 JSON: {exc}"[:200]
            value = _encoded(summary)
        return _Completion(pending.token, self._message(key, value), summary)

    def _message(self, key: bytes, value: bytes) -> OutgoingMessage:
        return OutgoingMessage(self._topic, value, key=key)

    async def _publish(self, batch: list[_Completion]) -> None:
        """Blocks until Kafka acknowledged every completion of ``batch`` (retrying while it
        fails) or refused it; then completes their offsets."""
        try:
            started = time.perf_counter()
            try:
                await self._publisher.publish_until_acked([c.message for c in batch])
            except Unpublishable as exc:
                for refusal in exc.refused:
                    await self._refused(batch[refusal.index], refusal)
            # Once per batch: every completion of it waited about as long.
            self._metrics.stage["completion_publish"].observe(time.perf_counter() - started)
            for completion in batch:
                if completion.token is not None:
                    self._complete(completion.token)
        finally:
            self._places.release()

    async def _refused(self, completion: _Completion, refusal: Refusal) -> None:
        """Kafka will never take this completion: without its result if that is why (blocking
        ones only carry one), else logged and skipped."""
        if not (refusal.too_large and completion.summary is not None):
            self._skipped(completion, refusal)
            return
        omitted = (f"too large for the completions topic "
                   f"({len(refusal.message.value)} bytes > {refusal.room})")
        smaller = self._message(completion.key,
                                _encoded({**completion.summary, "resultOmitted": omitted}))
        try:
            await self._publisher.publish_until_acked([smaller])
        except Unpublishable as again:
            self._skipped(completion, again.refused[0])
        else:
            self._metrics.kafka_refused.labels(instead="result_omitted").inc()

    def _skipped(self, completion: _Completion, refusal: Refusal) -> None:
        self._metrics.kafka_refused.labels(instead="dropped").inc()
        log.error("completion cannot be published; its offset completes without it",
                  activation_id=completion.key.decode(), reason=refusal.reason)


def _encoded(summary: dict[str, Any]) -> bytes:
    """``summary`` as compact JSON: UTF-8, or with non-ASCII escaped if a field (the status of
    a record read back from the store) holds a lone surrogate, which UTF-8 cannot."""
    try:
        return completion_value(summary)
    except ValueError:
        return dumps_escaped(summary)
