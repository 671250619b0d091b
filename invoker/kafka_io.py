"""Producing to Kafka from trio, and making sure the daemon's topics exist.

kafka-python's producer is thread-safe but ``send`` can block (metadata) and acks arrive on
futures, so every call runs on a worker thread. kafka-python 3 has no ``buffer_memory`` bound of
its own: what it buffers is bounded by its callers, each of which waits for the acks of one
bounded batch before sending more.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import trio
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from invoker.batcher import backoff_delay

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


class Publisher:
    """Publishes batches of messages and waits until Kafka acknowledged all of them."""

    def __init__(self, bootstrap: str, client_id: str, ack_timeout_s: float = 30.0) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_block_ms=int(ack_timeout_s * 1000),
            request_timeout_ms=int(ack_timeout_s * 1000),
        )
        self._ack_timeout_s = ack_timeout_s
        self._rng = random.Random()

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send ``messages`` and wait for every ack; raises KafkaError on failure. Blocks."""
        await trio.to_thread.run_sync(self._publish_blocking, list(messages))

    async def publish_until_acked(self, messages: Sequence[OutgoingMessage]) -> None:
        """Like :meth:`publish`, retrying with backoff while Kafka is unreachable."""
        attempt = 0
        while True:
            try:
                await self.publish(messages)
                return
            except KafkaError as exc:
                delay = backoff_delay(attempt, 0.2, 5.0, self._rng)
                attempt += 1
                log.warning("publish failed; will retry", error=str(exc), retry_in_s=delay)
                await trio.sleep(delay)

    def _publish_blocking(self, messages: list[OutgoingMessage]) -> None:
        futures = [
            self._producer.send(m.topic, value=m.value, key=m.key, headers=list(m.headers))
            for m in messages
        ]
        for future in futures:
            future.get(timeout=self._ack_timeout_s)

    def close(self) -> None:
        self._producer.close(timeout=5)


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    """Create missing topics (blocking). Existing topics are left as they are."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="invoker-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass  # another invoker won the race
            log.info("created topics", topics=missing, partitions=partitions)
    finally:
        admin.close()
