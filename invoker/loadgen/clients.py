"""The load generator's Kafka clients: settings, topic creation, partition assignment.

Every call here blocks (network I/O), each bounded by ``KAFKA_TIMEOUT_S`` or the timeout given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from invoker.loadgen.spec import LoadgenError

KAFKA_TIMEOUT_S = 30.0  # producer max_block / request timeout, flush, admin calls
TOPIC_METADATA_TIMEOUT_S = 15.0
CLIENT_ID = "invoker-loadgen"
# A run's producer: one batch holds ~1,000 no-op messages, so the sender thread builds and
# sends few requests; linger stays short as every message's latency includes it.
RUN_BATCH_BYTES = 256 * 1024
LINGER_MS = 5
# The completions consumer: records per poll, bytes per fetch response and per partition in
# it (a larger record still comes alone: Kafka returns at least one batch per fetch).
MAX_POLL_RECORDS = 5000
FETCH_MAX_BYTES = 16 * 1024 * 1024
PARTITION_FETCH_BYTES = 1024 * 1024
# A fetch returns as soon as any completion is there (fetch_min_bytes 1): the collector's
# arrival times are the latencies' end points, so fetches are not held back to batch them.
# With nothing there the broker holds it this long: each fetch costs ~1-2 ms of CPU here.
FETCH_MAX_WAIT_MS = 500


def servers(bootstrap: str) -> list[str]:
    return [s.strip() for s in bootstrap.split(",") if s.strip()]


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    """Create the missing ones of ``topics`` (as the daemon would); existing ones are kept."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=servers(bootstrap), client_id=CLIENT_ID,
                             request_timeout_ms=10_000)
    try:
        missing = [t for t in dict.fromkeys(topics) if t not in set(admin.list_topics())]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def assign_all(consumer: Any, topic: str, timeout_s: float) -> list[Any]:
    """Assign every partition of ``topic``, waiting (bounded) for its metadata."""
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            break
        if time.monotonic() >= deadline:
            raise LoadgenError(f"topic {topic!r} has no partitions (does it exist?)")
        time.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


def new_consumer(bootstrap: str) -> Any:
    """A group-less consumer (nothing committed), assigned partitions by the caller."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=servers(bootstrap),
        client_id=CLIENT_ID,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        max_poll_records=MAX_POLL_RECORDS,
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000) + 5000,
        metrics_enabled=False,  # never read; recording them costs CPU on every fetch
    )


def new_producer(bootstrap: str, *, batch_bytes: int = 16 * 1024,
                 linger_ms: int = LINGER_MS) -> Any:
    """A producer that waits for every in-sync replica (``acks="all"``); its buffer is
    kafka-python's default 32 MiB, and ``send`` blocks up to KAFKA_TIMEOUT_S when it is full.
    """
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=servers(bootstrap),
        client_id=CLIENT_ID,
        acks="all",
        linger_ms=linger_ms,
        batch_size=batch_bytes,
        max_block_ms=int(KAFKA_TIMEOUT_S * 1000),
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000),
        metrics_enabled=False,  # never read; recording them costs CPU on every request
    )
