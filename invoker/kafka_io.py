"""Producing to Kafka from trio, and making sure the daemon's topics exist.

kafka-python's producer is thread-safe; ``send`` blocks only while it lacks the topic's
metadata, and acks arrive on futures, completed on the producer's network thread. So a message
to a topic whose metadata (and size limit) is known is sent from the trio thread, and the
futures' callbacks wake trio (no worker thread on the hot path: two thread hops less per
publish); anything else (a topic not seen yet, making and closing a producer: all talk to the
brokers) runs on a worker thread. kafka-python has no ``buffer_memory`` bound of its own:
what it buffers is bounded by its callers, each of which has a bounded number of bounded
batches awaiting acks.

**Only what can succeed is retried.** Every message is size-checked before it is sent, against
the smaller of the producer's ``max_request_size`` and its topic's ``max.message.bytes``
(learnt from the brokers once per topic), with the record batch framing counted as
kafka-python's own batch builder counts it. A message that is too large, or that Kafka refuses
for a reason that holds for this message whenever it is sent (invalid or forbidden topic,
invalid record), is *refused*: it is never retried, every other message of its call is still
delivered, and the call then raises :class:`Unpublishable` naming the refused ones. Everything
else (broker or network trouble, timeouts, errors about the producer or the cluster rather than
the message) is retried until acknowledged: dropping such a message would not help the next
one, and :attr:`Publisher.stuck` lets ``/healthz`` say that publishing is stuck.
"""

from __future__ import annotations

import math
import random
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
import trio
from kafka import KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.util import size_of_varint

from invoker.batcher import backoff_delay
from invoker.config import Config
from invoker.stuck import StuckWatch

log = structlog.get_logger(__name__)

# How long one worker-thread call waits for acks before handing back to trio (so a stuck publish
# stays cancellable and its failures are reported while it lasts).
WAIT_SLICE_S = 1.0
# After the brokers could not tell a topic's max.message.bytes, ask again no sooner than this.
DESCRIBE_RETRY_S = 60.0
TOPIC_LIMIT_CONFIG = "max.message.bytes"

# Failures that hold for the message itself: sending it again can never succeed. Size errors
# are among them and are told apart (the caller may send a smaller message instead).
_TOO_LARGE = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
_NEVER_SUCCEED = (*_TOO_LARGE, kafka_errors.InvalidTopicError,
                  kafka_errors.TopicAuthorizationFailedError, kafka_errors.InvalidRecordError,
                  kafka_errors.CorruptRecordError, kafka_errors.InvalidTimestampError,
                  kafka_errors.UnsupportedForMessageFormatError,
                  kafka_errors.UnsupportedVersionError)


_MURMUR2_M = 0x5BD1E995


def murmur2(key: bytes) -> int:
    """Kafka's murmur2 hash of ``key`` (``Utils.murmur2`` of the Java client), as
    ``kafka.partitioner.default.murmur2`` computes it, a word at a time: 2.4 us for an
    activation id against 5.2 (kafka-python assembles each word from bytes and masks after
    every step). As the producers' partitioner it took kafka-python's ``send()`` on the trio
    thread from 33-36 to 26-30 us per completion."""
    length = len(key)
    h = 0x9747B28C ^ length
    for k in struct.unpack_from(f"<{length >> 2}I", key):  # its little-endian words
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _MURMUR2_M) & 0xFFFFFFFF
        h = ((h * _MURMUR2_M) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail:
        at = length - tail
        if tail == 3:
            h ^= key[at + 2] << 16
        if tail >= 2:
            h ^= key[at + 1] << 8
        h = ((h ^ key[at]) * _MURMUR2_M) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * _MURMUR2_M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def key_partition(key: bytes | None, all_partitions: Sequence[int],
                  available: Sequence[int]) -> int:
    """kafka-python's ``DefaultPartitioner`` (the Java client's for a key: murmur2 of the key
    modulo the partitions) with :func:`murmur2`: a message lands where the Java client would
    put it. A message without a key goes to a random available partition."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def record_batch_bytes(key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]
                       ) -> int:
    """Bytes of a record batch holding just this record, at most.

    This is kafka-python's own estimate (the one its producer checks ``max_request_size``
    with): the v2 batch header (61 bytes, which includes the offset and length fields the
    broker counts against ``max.message.bytes``), 21 bytes for the record's varint framing at
    their widest, and the key, value and headers with their length varints. It is an upper
    bound: the framing of a lone record is 3 to 8 bytes, not 21.

    Checking each record alone is enough: kafka-python's accumulator adds a record to an open
    batch only while that stays within ``batch_size`` (16 KiB), else starts a batch of its own
    for it, so no batch is larger than max(16 KiB, its largest record's estimate).
    """
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
    return size


def value_room(limit: int, key: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """The longest value that fits in ``limit`` bytes with this key and these headers
    (negative when not even an empty value fits)."""
    # record_batch_bytes grows by len(value) + size_of_varint(len(value)) - 1 over an empty one
    budget = limit - record_batch_bytes(key, b"", headers) + 1
    room = budget - 1
    while room > 0 and room + size_of_varint(room) > budget:
        room -= 1
    return room


def never_succeeds(error: BaseException) -> bool:
    """Whether sending the same message again can never succeed.

    ``send`` raises ValueError/TypeError/AssertionError for arguments it will never take (a
    malformed topic name, wrong types) and KafkaTimeoutError when the topic's metadata did not
    arrive in time (the topic may yet be created: retried). Of Kafka's errors only those about
    the message itself count, whatever their ``retriable`` flag: an error about the producer or
    the cluster (e.g. OutOfOrderSequenceNumber, BrokerNotAvailable, ClusterAuthorizationFailed)
    would hit the next message just the same, so dropping this one would only lose it.
    """
    return isinstance(error, (ValueError, TypeError, AssertionError, *_NEVER_SUCCEED))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message Kafka will never take, and why."""

    index: int  # its position in the sequence given to publish_until_acked
    message: OutgoingMessage
    reason: str
    # When it was too large: the largest record batch its topic takes (it is smaller than this
    # message's), so the caller can send a smaller one instead. None: refused for another reason.
    limit: int | None = None

    @property
    def too_large(self) -> bool:
        return self.limit is not None

    @property
    def room(self) -> int:
        """The longest value this message's key and headers leave room for (too large only)."""
        assert self.limit is not None
        return value_room(self.limit, self.message.key, self.message.headers)


class Unpublishable(Exception):
    """Messages Kafka will never take; every other message of the same call was acknowledged."""

    def __init__(self, refused: Sequence[Refusal]) -> None:
        self.refused = list(refused)
        super().__init__("; ".join(f"to {r.message.topic}: {r.reason}" for r in self.refused))


class _Delivery:
    """One message of a publish_until_acked call, until it is acknowledged or refused."""

    __slots__ = ("message", "future", "finished")

    def __init__(self, message: OutgoingMessage) -> None:
        self.message = message
        self.future: FutureRecordMetadata | None = None  # None: (re)send it
        self.finished = False


def _answered(deliveries: list[_Delivery]) -> list[tuple[int, _Delivery]]:
    """The deliveries (with their index) that Kafka answered and that are not finished."""
    return [(index, d) for index, d in enumerate(deliveries)
            if not d.finished and d.future is not None and d.future.is_done]


def _failed_too_large(future: FutureRecordMetadata | None) -> bool:
    return future is not None and future.failed() and isinstance(future.exception, _TOO_LARGE)


class _Answers:
    """Waits on the trio thread until every one of some produce futures is answered, or one
    of them failed (its retry need not wait for the others). Their callbacks run on the
    producer's network thread (or at once, for a future already answered) and count there;
    only the answer that ends the wait hands over to trio (a hand-over per answer cost a
    wake-up of trio's loop each: a write to its wake-up socket, a turn of its entry queue).
    One that comes after the wait ended (cancelled) changes nothing."""

    __slots__ = ("_left", "_lock", "_answered", "_token", "_over")

    def __init__(self, futures: list[FutureRecordMetadata]) -> None:
        self._left = len(futures)
        self._lock = threading.Lock()  # the network thread's callbacks, and the trio thread's
        self._answered = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._over = False  # the wait ended, or its end was handed over: no more hand-overs
        for future in futures:
            future.add_both(self._on_answer)

    async def wait(self) -> None:
        try:
            await self._answered.wait()
        finally:
            with self._lock:
                self._over = True

    def _on_answer(self, value: object) -> None:
        """Any thread."""
        with self._lock:
            self._left -= 1
            if self._over or (self._left and not isinstance(value, BaseException)):
                return
            self._over = True
        try:
            self._token.run_sync_soon(self._answered.set)
        except trio.RunFinishedError:
            pass  # the daemon is gone: nobody waits


HEADER_TEXT_CHARS = 1000  # of a text header (a dead letter's reason)


def header_text(text: str, limit: int = HEADER_TEXT_CHARS) -> bytes:
    """``text`` as a Kafka header value: ASCII (non-ASCII escaped, so a lone surrogate in a
    store's or an exception's text cannot make encoding raise), at most ``limit`` characters."""
    escaped = text.encode("ascii", "backslashreplace")
    return escaped if len(escaped) <= limit else escaped[:limit - 3] + b"..."


class Publisher:
    """Publishes batches of messages and waits until Kafka acknowledged all of them.

    ``max_message_bytes`` is the producer's ``max_request_size``: no message larger than that is
    sent, whatever its topic takes. :attr:`stuck` has every publish that is not finished yet.
    """

    def __init__(self, bootstrap: str, client_id: str, *,
                 max_message_bytes: int = Config.kafka_max_message_bytes,
                 ack_timeout_s: float = 30.0, linger_ms: int = 2,
                 stuck: StuckWatch | None = None) -> None:
        """Blocks on the brokers (the producer's first metadata): call it on a worker thread.
        ``linger_ms`` 0 sends at once when idle; under load the producer still batches what
        accumulates while its requests are in flight."""
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            partitioner=key_partition,
            max_request_size=max_message_bytes,
            # A missing topic is waited for (and reported stuck), not created by the brokers
            # with their defaults (such as a smaller max.message.bytes than ensure_topics sets).
            allow_auto_create_topics=False,
            max_block_ms=int(ack_timeout_s * 1000),
            request_timeout_ms=int(ack_timeout_s * 1000),
            metrics_enabled=False,  # never read; recording them costs CPU on every request
        )
        self._limits = _TopicLimits(bootstrap, client_id + "-admin", max_message_bytes)
        self._rng = random.Random()
        self.stuck = stuck or StuckWatch()

    async def publish_until_acked(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send ``messages`` and wait until Kafka acknowledged each one.

        A message that failed for a reason that may pass is sent again (only that one: what was
        acknowledged is not re-sent), with backoff, for as long as it takes; one that was never
        answered is waited for (the producer retries it itself until its delivery timeout).
        Messages that can never be sent are refused; once all others are acknowledged, raises
        :class:`Unpublishable` with them. Blocks; while a topic's metadata or size limit is
        not known yet, the sending and waiting happen on worker threads in slices of at most
        WAIT_SLICE_S (up to the ack timeout while metadata is missing), which a cancellation
        abandons at once (what they still do concerns nobody any more); otherwise on the trio
        thread, waiting on the futures' callbacks.
        """
        if not messages:
            return
        deliveries = [_Delivery(m) for m in messages]
        refused: list[Refusal] = []
        token = self.stuck.begin(
            "publish to " + ", ".join(sorted({m.topic for m in messages})))
        attempt = 0
        try:
            while True:
                limits = self._limits_here(deliveries)
                if limits is not None:
                    errors = await self._advance_here(deliveries, refused, limits)
                else:
                    errors = await trio.to_thread.run_sync(self._advance, deliveries, refused,
                                                           abandon_on_cancel=True)
                if all(d.finished for d in deliveries):
                    break
                if errors:
                    delay = backoff_delay(attempt, 0.2, 5.0, self._rng)
                    attempt += 1
                    self.stuck.failed(token, errors[0])
                    log.warning("publish failed; will retry", error=errors[0], failed=len(errors),
                                retry_in_s=round(delay, 2))
                    await trio.sleep(delay)
        finally:
            self.stuck.end(token)
        if refused:
            raise Unpublishable(sorted(refused, key=lambda r: r.index))

    def _limits_here(self, deliveries: list[_Delivery]) -> dict[str, int] | None:
        """The size limits of the topics of what waits to be sent, if each is known with the
        topic's partitions, so that sending cannot block; else None. Never blocks.
        (kafka-python's send() would still wait for metadata should its network thread drop a
        topic from it between this check and a send of the same round: a window of the
        round's sends, never seen.)"""
        metadata = self._producer._metadata  # type: ignore[attr-defined]  # noqa: SLF001
        limits: dict[str, int] = {}
        for topic in {d.message.topic for d in deliveries
                      if not d.finished and d.future is None}:
            limit = self._limits.known(topic)
            if limit is None or not metadata.partitions_for_topic(topic):
                return None
            limits[topic] = limit
        return limits

    async def _advance_here(self, deliveries: list[_Delivery], refused: list[Refusal],
                            limits: dict[str, int]) -> list[str]:
        """One round on the trio thread, with the ``limits`` of :meth:`_limits_here`: send
        what waits to be sent, wait until every message sent is answered or one failed,
        settle what was answered by then. Returns the failures that are worth a retry."""
        errors = self._send_waiting(deliveries, refused, limits.__getitem__, relearn=False)
        waiting = [d.future for d in deliveries
                   if not d.finished and d.future is not None and not d.future.is_done]
        if waiting:
            await _Answers(waiting).wait()
        answered = _answered(deliveries)  # what comes later is settled by the next round
        if any(_failed_too_large(d.future) for _, d in answered):
            # Its topic's limit is learnt again, from the brokers: not on the trio thread.
            return errors + await trio.to_thread.run_sync(self._settle, answered, refused,
                                                          abandon_on_cancel=True)
        return errors + self._settle(answered, refused)

    def _advance(self, deliveries: list[_Delivery], refused: list[Refusal]) -> list[str]:
        """One round on a worker thread: send what waits to be sent, wait for acks (one slice),
        settle what was answered. Returns the failures that are worth a retry."""
        errors = self._send_waiting(deliveries, refused, self._limits.limit, relearn=True)
        deadline = time.monotonic() + WAIT_SLICE_S
        for delivery in deliveries:
            if delivery.future is not None and not delivery.future.is_done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    delivery.future.get(timeout=remaining)
                except Exception:  # noqa: BLE001 - inspected below (timeouts leave it pending)
                    pass
        return errors + self._settle(_answered(deliveries), refused)

    def _send_waiting(self, deliveries: list[_Delivery], refused: list[Refusal],
                      limit_of: Callable[[str], int], *, relearn: bool) -> list[str]:
        """Send every message not sent yet, size-checked against ``limit_of(topic)``; stops
        at the first failure worth a retry (the rest would fare the same) and returns it.
        ``relearn``: see :meth:`_refusal` (False on the trio thread)."""
        for index, delivery in enumerate(deliveries):
            if delivery.finished or delivery.future is not None:
                continue
            outcome = self._send(index, delivery, limit_of(delivery.message.topic),
                                 relearn=relearn)
            if isinstance(outcome, Refusal):
                refused.append(outcome)
                delivery.finished = True
            elif outcome is not None:
                return [outcome]
        return []

    def _settle(self, answered: list[tuple[int, _Delivery]], refused: list[Refusal]
                ) -> list[str]:
        """Finish the ``answered`` messages (see :func:`_answered`); those that failed for a
        reason that may pass are to be sent again, and their failures are returned. Blocks on
        the brokers when one was too large (see :meth:`_refusal`)."""
        errors: list[str] = []
        for index, delivery in answered:
            future = delivery.future
            assert future is not None
            if future.succeeded():
                delivery.finished = True
            elif never_succeeds(future.exception):
                refused.append(self._refusal(index, delivery.message, future.exception,
                                             relearn=True))
                delivery.finished = True
            else:
                errors.append(_error_text(future.exception))
                delivery.future = None
        return errors

    def _send(self, index: int, delivery: _Delivery, limit: int, *,
              relearn: bool) -> Refusal | str | None:
        """Size-check (against ``limit``, its topic's) and send one message: None when sent
        (its future is set), a refusal, or the error text when sending failed for a reason
        that may pass."""
        m = delivery.message
        size = record_batch_bytes(m.key, m.value, m.headers)
        if size > limit:
            return Refusal(index, m, f"too large: {size} bytes > {limit} bytes", limit)
        try:
            delivery.future = self._producer.send(m.topic, value=m.value, key=m.key,
                                                  headers=list(m.headers))
        except (KafkaError, ValueError, TypeError, AssertionError) as exc:
            if never_succeeds(exc):
                return self._refusal(index, m, exc, relearn=relearn)
            return _error_text(exc)
        return None

    def _refusal(self, index: int, message: OutgoingMessage, error: BaseException, *,
                 relearn: bool) -> Refusal:
        """Why ``message`` can never be sent. When too large, the topic takes less than we
        knew: its limit is forgotten and, if ``relearn`` (not on the trio thread: it asks the
        brokers), learnt again now, else by the next publish to it (on a worker thread). The
        limit is below this message's size in any case, which bounds it should the brokers
        not tell."""
        if not isinstance(error, _TOO_LARGE):
            return Refusal(index, message, f"cannot be sent: {_error_text(error)}")
        self._limits.forget(message.topic)
        size = record_batch_bytes(message.key, message.value, message.headers)
        limit = min(self._limits.limit(message.topic), size - 1) if relearn else size - 1
        return Refusal(index, message, f"too large: {_error_text(error)}", limit)

    def close(self) -> None:
        """Blocks up to 5 s for what is still unsent: call it on a worker thread."""
        self._producer.close(timeout=5)
        self._limits.close()


class _TopicLimits:
    """The largest record batch each topic takes: its ``max.message.bytes``, capped by the
    producer's ``max_request_size`` (``ceiling``).

    Learnt once per topic with a DescribeConfigs request. For a topic without an override the
    brokers report their own ``message.max.bytes`` as the topic's value, so that is what a topic
    without an override gets. When the brokers cannot tell (unreachable, topic missing, no
    permission) the ceiling is used and they are asked again after DESCRIBE_RETRY_S. Blocks on
    the brokers: call it on worker threads only.
    """

    def __init__(self, bootstrap: str, client_id: str, ceiling: int) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._ceiling = ceiling
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, float]] = {}  # topic -> (limit, valid until)
        self._admin: KafkaAdminClient | None = None

    def limit(self, topic: str) -> int:
        """Blocks on the brokers unless :meth:`known`."""
        known = self.known(topic)
        if known is not None:
            return known
        with self._lock:
            known = self.known(topic)  # learnt meanwhile by the thread that held the lock
            if known is not None:
                return known
            configured = self._describe(topic)
            if configured is None:
                self._known[topic] = (self._ceiling, time.monotonic() + DESCRIBE_RETRY_S)
                return self._ceiling
            limit = min(configured, self._ceiling)
            self._known[topic] = (limit, math.inf)
            log.info("topic size limit", topic=topic, max_message_bytes=configured,
                     max_request_size=self._ceiling)
            return limit

    def known(self, topic: str) -> int | None:
        """The limit :meth:`limit` would answer without asking the brokers, if it would.
        Never blocks (a lone dict read: the lock may be held by a describe under way)."""
        known = self._known.get(topic)
        return known[0] if known is not None and known[1] > time.monotonic() else None

    def forget(self, topic: str) -> None:
        """Never blocks (a lone dict operation), as :meth:`known`."""
        self._known.pop(topic, None)

    def close(self) -> None:
        with self._lock:
            self._close_admin()

    def _close_admin(self) -> None:
        """Close the admin client (a new one is made when needed); the caller holds the lock."""
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception as exc:  # noqa: BLE001 - a broken client is dropped all the same
                log.debug("closing the admin client failed", error=_error_text(exc))

    def _describe(self, topic: str) -> int | None:
        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self._bootstrap.split(","),
                                               client_id=self._client_id)
            responses = self._admin.describe_configs([ConfigResource(
                # the stubs want str values; describe_configs reads only the keys
                ConfigResourceType.TOPIC, topic,
                configs={TOPIC_LIMIT_CONFIG: None})])  # type: ignore[dict-item]
        except Exception as exc:  # noqa: BLE001 - advisory: the ceiling is a safe answer
            log.warning("cannot learn the topic's size limit; using max_request_size",
                        topic=topic, error=_error_text(exc), retry_in_s=DESCRIBE_RETRY_S)
            self._close_admin()
            return None
        for response in responses:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            for error_code, _message, _type, name, entries in response.resources:
                if name != topic:
                    continue
                for entry in entries if error_code == 0 else ():
                    if entry[0] == TOPIC_LIMIT_CONFIG:
                        return int(entry[1])
                log.warning("cannot learn the topic's size limit; using max_request_size",
                            topic=topic, error=kafka_errors.for_code(error_code).__name__,
                            retry_in_s=DESCRIBE_RETRY_S)
        return None


def _error_text(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int,
                  max_message_bytes: int = Config.kafka_max_message_bytes) -> None:
    """Create missing topics (blocking) taking records up to ``max_message_bytes`` (their
    ``max.message.bytes``). Existing topics are left as they are; the publisher learns what
    they take."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="invoker-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            configs = {TOPIC_LIMIT_CONFIG: str(max_message_bytes)}
            try:
                admin.create_topics([NewTopic(t, partitions, 1, topic_configs=configs)
                                     for t in missing])
            except TopicAlreadyExistsError:
                pass  # another invoker won the race
            log.info("created topics", topics=missing, partitions=partitions,
                     max_message_bytes=max_message_bytes)
    finally:
        admin.close()
