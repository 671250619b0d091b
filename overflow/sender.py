"""The invoker's side of overflow: records the record channel cannot take go to Kafka.

What may block: :meth:`OverflowSender.send` waits for one of ``max_in_flight`` places and then
for Kafka's acknowledgement (retrying while Kafka is unreachable). The caller holds its
execution slot meanwhile, so when Kafka is slow or down the slots fill up and the feed pauses:
nothing is dropped and nothing is buffered beyond the bound. A record the overflow topic can
never take (larger than it allows) is not retried: ``send`` raises
:class:`~invoker.kafka_io.Unpublishable` and the caller stores it the usual way.
"""

from __future__ import annotations

import time

import structlog
import trio

from invoker.kafka_io import OutgoingMessage, Publisher
from invoker.metrics import Metrics
from overflow.envelope import OverflowedRecord, encode

log = structlog.get_logger(__name__)


class OverflowSender:
    def __init__(self, publisher: Publisher, topic: str, max_in_flight: int,
                 metrics: Metrics) -> None:
        self._publisher = publisher
        self._topic = topic
        self._places = trio.Semaphore(max_in_flight)
        self._metrics = metrics
        self._burst_records = 0
        self._burst_bytes = 0
        self._burst_started = 0.0

    async def send(self, item: OverflowedRecord) -> None:
        """Produce ``item`` and return once Kafka acknowledged it (acks=all); raises
        Unpublishable, without retrying, if the overflow topic can never take it."""
        value = encode(item)
        if not self._burst_records:
            self._burst_started = time.monotonic()
            log.info("record channel full: overflowing records to Kafka", topic=self._topic)
        self._burst_records += 1  # (a record the topic refuses counts too: it was tried)
        self._burst_bytes += len(value)
        async with self._places:
            self._metrics.overflow_in_flight.inc()
            try:
                await self._publisher.publish_until_acked([OutgoingMessage(
                    self._topic, value, key=item.record["activationId"].encode())])
            finally:
                self._metrics.overflow_in_flight.dec()
        self._metrics.overflow_records.inc()
        self._metrics.overflow_bytes.inc(len(value))

    def channel_took_one(self) -> None:
        """A record went to the channel again: an overflow burst, if any, is over."""
        if self._burst_records:
            log.info("overflow burst ended", records=self._burst_records,
                     bytes=self._burst_bytes,
                     seconds=round(time.monotonic() - self._burst_started, 3))
            self._burst_records = self._burst_bytes = 0
