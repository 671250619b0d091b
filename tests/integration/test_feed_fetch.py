"""The feed's batching fetches reach the broker (real Kafka broker).

kafka-python has no setter for a consumer's fetch wait: :func:`invoker.feed.set_fetch_wait`
changes the fetcher's private settings, which every fetch request is built from. This drives a
real consumer through both modes, so a kafka-python that stops reading them fails here.
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from invoker.feed import set_fetch_wait
from tests.support.daemon import KAFKA, Topics

BATCH_WAIT_MS = 5000  # far longer than the checks below look, so a slow machine cannot pass them
LOOK_S = 2.0
ARRIVAL_TIMEOUT_S = 20.0


def _poll_for(consumer: KafkaConsumer, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while not got and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            got += [r.value for r in records]
    return got


def test_a_batching_fetch_is_held_by_the_broker_and_an_idle_one_returns_with_the_first_message():
    topics = Topics.create(partitions=1)
    topic = topics.feed
    consumer = KafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=100,
                             fetch_min_bytes=1)
    producer = KafkaProducer(bootstrap_servers=KAFKA, linger_ms=0)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        producer.send(topic, b"first").get(timeout=10)
        assert _poll_for(consumer, ARRIVAL_TIMEOUT_S) == [b"first"]  # idle: at once

        set_fetch_wait(consumer, BATCH_WAIT_MS)
        # The fetch sent with the idle settings returns empty within 100 ms; then one asking
        # the broker to wait is in flight.
        assert _poll_for(consumer, 0.5) == []
        producer.send(topic, b"second").get(timeout=10)
        assert _poll_for(consumer, LOOK_S) == [], "the broker did not hold the fetch"
        assert _poll_for(consumer, ARRIVAL_TIMEOUT_S) == [b"second"]

        set_fetch_wait(consumer, None)
        assert _poll_for(consumer, BATCH_WAIT_MS / 1000 + 1) == []  # the held fetch ends empty
        producer.send(topic, b"third").get(timeout=10)
        started = time.monotonic()
        assert _poll_for(consumer, ARRIVAL_TIMEOUT_S) == [b"third"]
        # Not a speed limit: only that it did not wait out a batching fetch's BATCH_WAIT_MS.
        assert time.monotonic() - started < BATCH_WAIT_MS / 1000
    finally:
        producer.close()
        consumer.close()
        topics.delete()
