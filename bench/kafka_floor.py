"""Kafka alone: produce → consume latency at a given rate, with the load generator's producer
(``linger_ms`` 0, ``acks="all"``, as its paced runs use) and consumer settings.

The invoker-added latency holds two such legs (the activation in, the completion out); this is
the floor under each, measured on the same broker with nothing else running.
"""

from __future__ import annotations

import struct
import threading
import time

from invoker.loadgen.clients import assign_all, new_consumer, new_producer
from tests.support.daemon import KAFKA

_STAMP = struct.Struct("!d")
PAYLOAD_BYTES = 400  # about a no-op activation message


def roundtrip_ms(topic: str, rate: float, count: int, timeout_s: float) -> list[float]:
    """Produce ``count`` messages to ``topic`` (which must exist; what it holds is skipped) at
    ``rate`` per second and return each one's produce → consumed time in ms. Blocks for about
    ``count / rate`` seconds, at most ``timeout_s`` more; messages not seen by then are left
    out."""
    consumer = new_consumer(KAFKA)
    partitions = assign_all(consumer, topic, timeout_s)
    consumer.seek_to_end(*partitions)
    for tp in partitions:
        consumer.position(tp)  # resolved now, before anything is produced
    latencies: list[float] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set() and len(latencies) < count:
            for records in consumer.poll(timeout_ms=100).values():
                now = time.monotonic()
                latencies.extend((now - _STAMP.unpack_from(r.value)[0]) * 1000
                                 for r in records)

    reader = threading.Thread(target=consume, name="kafka-floor-consumer", daemon=True)
    reader.start()
    try:
        _produce(topic, rate, count, timeout_s)
        reader.join(timeout_s)  # until it saw them all, or gave up
    finally:
        stop.set()
        reader.join(timeout=5)
        if not reader.is_alive():  # kafka-python's consumer is not thread-safe
            consumer.close()
    return latencies[:count]


def _produce(topic: str, rate: float, count: int, timeout_s: float) -> None:
    """``count`` time-stamped messages at ``rate`` per second, then a flush."""
    producer = new_producer(KAFKA, linger_ms=0)
    try:
        padding = b"x" * (PAYLOAD_BYTES - _STAMP.size)
        began = time.monotonic()
        for i in range(count):
            wait = began + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            producer.send(topic, _STAMP.pack(time.monotonic()) + padding, key=b"%d" % i)
        producer.flush(timeout=timeout_s)
    finally:
        producer.close(timeout=5)
