"""The Kafka publisher's pure parts: the size check, what is retried, the stuck watch (and
what /metrics and /healthz make of it)."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kafka import errors as kafka_errors
from kafka.future import Future
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_murmur2
from kafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from invoker import service
from invoker.config import Config
from invoker.daemon import Invoker
from invoker.kafka_io import (
    OutgoingMessage,
    Refusal,
    Unpublishable,
    _Answers,
    header_text,
    key_partition,
    murmur2,
    never_succeeds,
    record_batch_bytes,
    value_room,
)
from invoker.stuck import MAX_ERROR_CHARS, StuckWatch
from overflow.recorder import Recorder

SHAPES = [
    (None, ()),
    (b"0123456789abcdef0123456789abcdef", ()),
    (b"k", (("dlq.reason", b"not valid JSON: " + b"x" * 90), ("dlq.source", b"invoker-a"),
            ("dlq.topic", b"feed"), ("dlq.partition", b"3"), ("dlq.offset", b"123456789"))),
    (None, (("\u00e9t\u00e9", b"\xff" * 200),)),
]


def built_batch_bytes(key, value, headers) -> int:
    """The real v2 record batch kafka-python's producer would send for this one record."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=123456789, producer_epoch=3,
                                        base_sequence=1000, batch_size=1 << 24)
    builder.append(0, timestamp=1_764_290_000_000, key=key, value=value, headers=list(headers))
    return len(builder.build())


@pytest.mark.parametrize(("key", "headers"), SHAPES)
@pytest.mark.parametrize("value_len", [0, 1, 63, 64, 8191, 8192, 300_000])
def test_size_check_is_an_upper_bound_of_the_real_batch(key, headers, value_len):
    value = b"v" * value_len
    real = built_batch_bytes(key, value, headers)
    estimate = record_batch_bytes(key, value, headers)
    # The 21 bytes kafka-python reserves for a record's framing vs. 3 to 8 really used.
    assert real <= estimate <= real + 18


@pytest.mark.parametrize(("key", "headers"), SHAPES)
@pytest.mark.parametrize("limit", [400, 500, 8_300, 8_400, 204_800, 1_048_588, 4 << 20])
def test_value_room_is_the_longest_value_that_fits(key, headers, limit):
    room = value_room(limit, key, headers)
    if room < 0:
        assert record_batch_bytes(key, b"", headers) > limit
        return
    assert record_batch_bytes(key, b"v" * room, headers) <= limit
    assert record_batch_bytes(key, b"v" * (room + 1), headers) > limit
    if limit < 300_000:  # kafka-python's pure-Python CRC makes big batches slow to build
        assert built_batch_bytes(key, b"v" * room, headers) <= limit


def test_value_room_when_the_headers_alone_are_too_large():
    headers = (("dlq.reason", b"r" * 1000),)
    assert value_room(500, None, headers) < 0


def test_refusal_room_is_what_its_key_and_headers_leave():
    message = OutgoingMessage("t", b"x" * 5000, key=b"k" * 32, headers=(("h", b"v"),))
    refusal = Refusal(0, message, "too large", limit=1000)
    assert refusal.too_large
    assert refusal.room == value_room(1000, message.key, message.headers)
    assert not Refusal(0, message, "forbidden").too_large


def test_unpublishable_names_each_refused_message():
    a = Refusal(0, OutgoingMessage("done", b"1"), "too large: 9 bytes > 8 bytes", 8)
    b = Refusal(2, OutgoingMessage("dlq", b"2"), "cannot be sent: InvalidTopicError")
    exc = Unpublishable([a, b])
    assert exc.refused == [a, b]
    assert str(exc) == ("to done: too large: 9 bytes > 8 bytes; "
                        "to dlq: cannot be sent: InvalidTopicError")


@pytest.mark.parametrize("error", [
    kafka_errors.MessageSizeTooLargeError(), kafka_errors.RecordListTooLargeError(),
    kafka_errors.InvalidTopicError(), kafka_errors.TopicAuthorizationFailedError(),
    kafka_errors.InvalidRecordError(), kafka_errors.CorruptRecordError(),
    kafka_errors.UnsupportedVersionError(), kafka_errors.InvalidTimestampError(),
    kafka_errors.UnsupportedForMessageFormatError(),
    ValueError("Topic name is illegal"), TypeError("topic must be str"),
    AssertionError("Need at least one: key or value"),
])
def test_errors_about_the_message_are_never_retried(error):
    assert never_succeeds(error)


@pytest.mark.parametrize("error", [
    # retriable by Kafka's own flag
    kafka_errors.NotEnoughReplicasError(), kafka_errors.NotEnoughReplicasAfterAppendError(),
    kafka_errors.NotLeaderForPartitionError(), kafka_errors.RequestTimedOutError(),
    kafka_errors.UnknownTopicOrPartitionError(), kafka_errors.KafkaConnectionError(),
    kafka_errors.NoBrokersAvailable(),
    # the producer's delivery timeout and send()'s metadata timeout
    kafka_errors.KafkaTimeoutError("Failed to update metadata after 30.0 secs."),
    # not flagged retriable, but about the producer or the cluster, not this message
    kafka_errors.OutOfOrderSequenceNumberError(), kafka_errors.UnknownProducerIdError(),
    kafka_errors.BrokerNotAvailableError(), kafka_errors.ClusterAuthorizationFailedError(),
    kafka_errors.UnknownError(), kafka_errors.IllegalStateError(),
])
def test_errors_about_the_producer_or_the_cluster_are_retried(error):
    assert not never_succeeds(error)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peers_error_text_is_kept_short():
    watch = StuckWatch(Clock())
    token = watch.begin("store write")
    watch.failed(token, "x" * 1_000_000)  # e.g. a store's error member, megabytes of it
    oldest = watch.oldest()
    assert oldest is not None and len(oldest.error) == MAX_ERROR_CHARS


def test_stuck_watch_reports_the_oldest_unfinished_operation():
    clock = Clock()
    watch = StuckWatch(clock)
    assert watch.oldest() is None and watch.stuck_for() == 0.0
    first = watch.begin("publish to done")
    clock.now += 5
    second = watch.begin("store write")
    clock.now += 2
    watch.failed(first, "NotEnoughReplicasError")
    oldest = watch.oldest()
    assert oldest is not None and oldest.what == "publish to done" and oldest.seconds == 7
    assert oldest.describe() == "publish to done unfinished for 7.0 s: NotEnoughReplicasError"
    watch.end(first)
    assert watch.stuck_for() == 2
    assert watch.oldest().describe() == "store write unfinished for 2.0 s"
    watch.end(second)
    watch.end(second)  # ending twice (success after cancellation paths) is harmless
    watch.failed(second, "late")  # so is a failure reported after the end
    assert watch.oldest() is None and watch.stuck_for() == 0.0


def scraped_oldest_unfinished(daemon: service.FeedService) -> float:
    """invoker_oldest_unfinished_seconds as GET /metrics renders it (invoker.ops)."""
    text = generate_latest(daemon.metrics.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "invoker_oldest_unfinished_seconds"]
    (sample,) = family.samples
    return sample.value


@pytest.mark.parametrize("daemon_class", [Invoker, Recorder])
def test_the_oldest_unfinished_operation_is_exported_as_healthz_sees_it(
        daemon_class, tmp_path, monkeypatch):
    clock = Clock()
    # The daemon's own watch, on a clock the test moves (the feed thread is never started).
    monkeypatch.setattr(service, "StuckWatch", partial(StuckWatch, clock))
    daemon = daemon_class(Config(store_url=f"sqlite:///{tmp_path}/r.sqlite3"))
    assert scraped_oldest_unfinished(daemon) == 0
    write = daemon.stuck.begin("store write of 3 records")
    clock.now += 100
    publish = daemon.stuck.begin("publish to invoker-completions")
    clock.now += 21
    daemon.stuck.failed(write, "store unavailable")
    assert scraped_oldest_unfinished(daemon) == 121
    # the same age /healthz fails on past health_stuck_s (120 s)
    assert ("store write of 3 records unfinished for 121.0 s: store unavailable"
            in daemon.health()["reasons"])
    daemon.stuck.end(write)
    assert scraped_oldest_unfinished(daemon) == 21
    daemon.stuck.end(publish)
    assert scraped_oldest_unfinished(daemon) == 0


def test_header_text_never_raises_and_is_bounded():
    # A store's per-document reason is parsed JSON: "\ud800" in it is a lone surrogate, which
    # str.encode() refuses; as a dead letter's reason header that once meant an exception.
    assert header_text("conflict \ud800 é") == b"conflict \\ud800 \\xe9"
    long = header_text("x" * 5000)
    assert len(long) == 1000 and long.endswith(b"...")
    assert header_text("y" * 50, limit=20) == b"y" * 17 + b"..."


class _CountingToken:
    """Stands for trio's token: counts the hand-overs to trio, then makes them."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.handovers = 0

    def run_sync_soon(self, fn, *args) -> None:  # noqa: ANN001
        self.handovers += 1
        self.token.run_sync_soon(fn, *args)


def _answers(futures: list[Future]) -> tuple[_Answers, _CountingToken]:
    """_Answers over kafka-python's own Futures (it uses their add_both, as of a produce
    future's), with its hand-overs to trio counted."""
    answers = _Answers(futures)  # type: ignore[arg-type]
    token = _CountingToken()
    answers._token = token  # type: ignore[assignment]  # noqa: SLF001
    return answers, token


async def test_answers_wait_for_every_future_and_hand_over_once():
    """The wait ends once the last answer came (each from another thread, as kafka-python's
    network thread answers), not at the first, and only that answer wakes trio."""
    futures = [Future() for _ in range(3)]
    answers, token = _answers(futures)
    done: list[bool] = []

    async def wait() -> None:
        await answers.wait()
        done.append(True)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            for future in futures[:2]:
                await trio.to_thread.run_sync(future.success, "ack")
                await trio.sleep(0.01)
                assert not done
            await trio.to_thread.run_sync(futures[2].success, "ack")
    assert done and token.handovers == 1


async def test_answers_end_at_the_first_failure_and_ignore_what_comes_later():
    futures = [Future() for _ in range(3)]
    futures[0].success("already answered")  # answered before the wait: counted at once
    answers, token = _answers(futures)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answers.wait)
            await trio.to_thread.run_sync(futures[1].failure, kafka_errors.KafkaTimeoutError())
    await trio.to_thread.run_sync(futures[2].success, "late")
    assert token.handovers == 1

    late = Future()
    cancelled, token = _answers([late])
    with trio.move_on_after(0.01):
        await cancelled.wait()
    await trio.to_thread.run_sync(late.success, "after the wait was cancelled")
    assert token.handovers == 0


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
@example(b"", 1)
@example(b"\xff" * 7, 3)
@example(b"0123456789abcdef0123456789abcdef", 8)  # an activation id
def test_a_keyed_message_goes_where_kafka_pythons_default_partitioner_puts_it(key, count):
    assert murmur2(key) == kafka_murmur2(key)
    partitions = list(range(count))
    assert key_partition(key, partitions, partitions) == DefaultPartitioner()(
        key, partitions, partitions)


def test_a_message_without_a_key_goes_to_an_available_partition():
    assert {key_partition(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert key_partition(None, [5], []) == 5  # none available: any of them
