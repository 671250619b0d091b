"""Producing: a run's stream of activation messages (paced or as fast as possible), and
:func:`produce_messages` for a given list.

A run's hot path costs little CPU per message (the daemon under test shares the machine): the
messages are encoded once per action (:class:`~invoker.loadgen.actions.MessageEncoder`),
activation ids come from one ``os.urandom`` call per ``ID_CHUNK``, partitions are chosen
round-robin here instead of by hashing the key in Python, and acknowledgements are read off
the send futures in bulk instead of through two callbacks per message.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from invoker.loadgen.actions import MessageEncoder, encode_message
from invoker.loadgen.clients import KAFKA_TIMEOUT_S, LINGER_MS, RUN_BATCH_BYTES, new_producer
from invoker.loadgen.spec import LoadgenError, LoadSpec

ID_CHUNK = 1024  # activation ids drawn per os.urandom call
HARVEST_EVERY = 1024  # sends between two looks at the oldest unacknowledged futures
# A paced run sleeps only once it is this far ahead of its rate: a message goes out at most
# this early, and the loop wakes up a few hundred times a second rather than once per message.
MIN_SLEEP_S = 0.002


class TokenBucket:
    """Pacing for ``rate`` messages per second, with a burst of ``burst`` messages.

    :meth:`reserve` takes one token and says how long to wait before using it; tokens may go
    negative (a reservation), so a caller that sleeps the returned time keeps the average
    rate exactly, and oversleeping is made up from the burst instead of being lost. Pure:
    the caller passes the clock.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        # Default: 50 ms worth of messages, at least one.
        self.burst = max(1.0, float(burst) if burst is not None else self.rate * 0.05)
        self.tokens = self.burst
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def activation_ids(chunk: int = ID_CHUNK) -> Iterator[str]:
    """Endless random activation ids (32 lower-case hex digits, 128 random bits)."""
    while True:
        digits = os.urandom(16 * chunk).hex()
        for start in range(0, len(digits), 32):
            yield digits[start:start + 32]


@dataclass
class Sending:
    """A run's producing phase, as far as it got. ``sent`` is read by the progress thread.

    Memory: an entry per message sent (the run's ``count``, or ``duration_s`` times its rate).
    """

    sent_at: dict[str, float] = field(default_factory=dict)  # id -> monotonic time of send
    acked: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # id -> why its send failed
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    start: float | None = None  # monotonic, the first send
    end: float | None = None  # monotonic, all acknowledged (or the flush gave up)

    def produced(self) -> set[str]:
        """The ids Kafka acknowledged."""
        return {i for i in self.sent_at if i in self.acked}


def produce_run(spec: LoadSpec, encoders: list[MessageEncoder], sending: Sending) -> None:
    """Produce the run's messages to ``spec.feed_topic`` and wait for their acknowledgements.

    Message ``i`` is ``encoders[i % len(encoders)]``'s, on partition ``i % partitions``, keyed
    by its activation id. Blocks for the whole phase: pacing, a full producer buffer (up to
    KAFKA_TIMEOUT_S per send), the final flush (up to KAFKA_TIMEOUT_S). Raises LoadgenError
    when no producer can be made or the topic has no partitions, before sending anything;
    later failures go to ``sending.errors``/``failed``.
    """
    from kafka.errors import KafkaError

    try:
        # Paced, each message goes at once (lingering would add to every latency measured);
        # as fast as possible, batches are what keep the producer's CPU down.
        producer = new_producer(spec.bootstrap, batch_bytes=RUN_BATCH_BYTES,
                                linger_ms=0 if spec.rate else LINGER_MS)
    except KafkaError as exc:
        raise LoadgenError(f"cannot produce to Kafka at {spec.bootstrap}: {exc!r}") from exc
    try:
        try:
            partitions = sorted(producer.partitions_for(spec.feed_topic))
        except KafkaError as exc:
            raise LoadgenError(f"no partitions for {spec.feed_topic!r}: {exc!r}") from exc
        if spec.on_window is not None:
            spec.on_window("start")
        unsettled = _send_all(producer, partitions, spec, encoders, sending)
        try:
            producer.flush(timeout=KAFKA_TIMEOUT_S)
        except KafkaError as exc:
            sending.errors.append(f"flush failed: {exc!r}")
        sending.end = time.monotonic()
        settle(unsettled, sending, only_leading=False)
    finally:
        producer.close(timeout=5)


def _send_all(producer: Any, partitions: list[int], spec: LoadSpec,
              encoders: list[MessageEncoder], sending: Sending) -> deque[tuple[str, Any]]:
    """The sending loop of :func:`produce_run`; returns the sends not yet settled."""
    from kafka.errors import KafkaError

    send, topic = producer.send, spec.feed_topic
    monotonic, wall_clock = time.monotonic, time.time
    sent_at = sending.sent_at
    # (id, future) of sends not yet seen acknowledged, oldest first; its length is bounded
    # by what is sent while the oldest one is in flight (at most a request timeout)
    unsettled: deque[tuple[str, Any]] = deque()
    ids = activation_ids()
    bucket = TokenBucket(spec.rate) if spec.rate else None
    count = spec.count or 0  # with a duration, stop_at ends the run instead
    start = sending.start = monotonic()
    stop_at = start + spec.duration_s if spec.duration_s else None
    index = 0
    while True:
        now = monotonic()
        if stop_at is not None:
            if now >= stop_at:
                break
        elif index >= count:
            break
        if bucket is not None:
            delay = bucket.reserve(now)
            if delay > 0:
                if stop_at is not None and now + delay >= stop_at:
                    break
                if delay >= MIN_SLEEP_S:
                    time.sleep(delay)
        activation_id = next(ids)
        key = activation_id.encode()
        value = encoders[index % len(encoders)].encode(key, int(wall_clock() * 1000))
        sent_at[activation_id] = monotonic()
        try:
            future = send(topic, value=value, key=key,
                          partition=partitions[index % len(partitions)])
        except KafkaError as exc:
            sending.failed[activation_id] = f"{type(exc).__name__}: {exc}"
            sending.errors.append(f"producing stopped after {index} messages: {exc!r}")
            break
        unsettled.append((activation_id, future))
        index += 1
        sending.sent = index
        if index % HARVEST_EVERY == 0:
            settle(unsettled, sending, only_leading=True)
    return unsettled


def settle(unsettled: deque[tuple[str, Any]], sending: Sending, *, only_leading: bool) -> None:
    """Move finished sends to ``acked``/``failed``: the leading run of finished ones, or
    (after the flush) all, dropping unfinished ones: never acknowledged, so not produced."""
    while unsettled:
        activation_id, future = unsettled[0]
        if not future.is_done:
            if only_leading:
                return
        elif future.succeeded():
            sending.acked.add(activation_id)
        else:
            exc = future.exception
            sending.failed[activation_id] = f"{type(exc).__name__}: {exc}"
        unsettled.popleft()


def produce_messages(bootstrap: str, topic: str, messages: list[bytes | dict[str, Any]],
                     key: bytes | str | None = None, *, timeout_s: float = KAFKA_TIMEOUT_S) -> None:
    """Send ``messages`` to ``topic`` and wait until Kafka acknowledged every one.

    Dicts are JSON-encoded; bytes are sent as they are (for malformed messages). ``key`` is
    used for every message; None keys each dict by its ``activationId`` (if it has a string
    one) and sends bytes unkeyed. Raises kafka.errors.KafkaError on failure.
    """
    fixed_key = key.encode() if isinstance(key, str) else key
    producer = new_producer(bootstrap)
    try:
        futures = []
        for message in messages:
            message_key = fixed_key
            if message_key is None and isinstance(message, dict):
                activation_id = message.get("activationId")
                if isinstance(activation_id, str):
                    message_key = activation_id.encode()
            futures.append(producer.send(topic, value=encode_message(message), key=message_key))
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
    finally:
        producer.close(timeout=5)
