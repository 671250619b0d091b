"""The feed thread's hand-off and commits, against a scripted consumer (Kafka is the boundary
being faked; the feed's turns run on a real worker thread, with the real trio hand-off)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import trio
import trio.testing
from kafka.structs import TopicPartition

from invoker.feed import Feed, FeedMessage, FeedSettings
from invoker.metrics import Metrics

TP = TopicPartition("feed", 0)
OTHER = TopicPartition("feed", 1)


@dataclass
class Record:
    offset: int
    value: bytes


class ScriptedConsumer:
    """What the feed calls of a KafkaConsumer: records to return, pauses, commits."""

    def __init__(self, records: int = 0, partitions: Sequence[TopicPartition] = (TP,)) -> None:
        self.partitions = set(partitions)
        self.waiting = deque(Record(i, b"m%d" % i) for i in range(records))
        self.paused: set[TopicPartition] = set()
        self.max_records: list[int] = []
        self.commits: list[tuple[float, dict[TopicPartition, int]]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.partitions)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self.max_records.append(max_records)
        if TP in self.paused or not self.waiting:
            time.sleep(min(timeout_ms, 5) / 1000)
            return {}
        return {TP: [self.waiting.popleft() for _ in range(min(max_records, len(self.waiting)))]}

    def commit(self, offsets, timeout_ms: int) -> None:
        self.commits.append((time.monotonic(), {tp: o.offset for tp, o in offsets.items()}))


class ScriptedGate:
    """Takes messages while it has room; saturated when full (until drain())."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken: list[FeedMessage] = []
        self.revoked_partitions: list[TopicPartition] = []

    def offer(self, messages: Sequence[FeedMessage]) -> tuple[int, bool]:
        take = list(messages)[:max(self.room - len(self.taken), 0)]
        self.taken += take
        return len(take), self.saturated()

    def saturated(self) -> bool:
        return len(self.taken) >= self.room

    def assigned(self, partitions) -> None:
        pass

    def revoked(self, partitions) -> None:
        self.revoked_partitions += partitions


def make_feed(gate: ScriptedGate, metrics: Metrics | None = None, *, max_poll_records: int = 8,
              commit_interval_s: float = 0.2) -> Feed:
    feed = Feed(FeedSettings(bootstrap="unused:9092", topic="feed", group_id="g", client_id="c",
                             max_poll_records=max_poll_records, fetch_max_bytes=1 << 20,
                             max_message_bytes=1 << 20, commit_interval_s=commit_interval_s),
                gate, metrics or Metrics())
    feed._token = trio.lowlevel.current_trio_token()
    return feed


async def turns(feed: Feed, consumer: ScriptedConsumer, count: int = 1) -> None:
    for _ in range(count):
        await trio.to_thread.run_sync(feed._turn, consumer)
        await trio.testing.wait_all_tasks_blocked()  # the pump has run


async def test_the_feed_thread_hands_over_without_waiting_for_trio():
    gate = ScriptedGate(room=100)
    feed = make_feed(gate)
    consumer = ScriptedConsumer(records=5)
    go, turned = threading.Event(), threading.Event()

    def turn_once() -> None:
        go.wait()
        feed._turn(consumer)
        turned.set()

    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, turn_once)
        await trio.sleep(0.05)  # the thread waits for go
        go.set()
        time.sleep(0.5)  # noqa: ASYNC251 - the trio thread is busy: the hand-off must not wait
        assert turned.is_set(), "the feed thread waited for the trio thread"
        assert gate.taken == [] and feed._held() == 5  # in the inbox, for the pump
    await trio.testing.wait_all_tasks_blocked()
    assert [m.offset for m in gate.taken] == [0, 1, 2, 3, 4] and feed._held() == 0


async def test_it_holds_at_most_max_poll_records_pauses_when_refused_and_resumes_once_drained():
    gate = ScriptedGate(room=6)
    feed = make_feed(gate, max_poll_records=4)
    consumer = ScriptedConsumer(records=20)
    await turns(feed, consumer)  # 4 polled, 4 taken
    await turns(feed, consumer)  # 4 polled, 2 taken: the gate is full
    assert len(gate.taken) == 6 and feed._held() == 2 and not feed.paused
    await turns(feed, consumer, 3)
    assert feed.paused and consumer.paused == {TP} and feed._held() == 2
    assert max(consumer.max_records) <= 4 and len(gate.taken) == 6
    gate.taken.clear()
    await turns(feed, consumer)  # the pump hands over the two held; still paused meanwhile
    assert feed.paused and feed._held() == 0 and [m.offset for m in gate.taken] == [6, 7]
    await turns(feed, consumer)
    assert not feed.paused and consumer.paused == set()
    # Every poll asked for no more than there was room for in the inbox.
    assert all(1 <= n <= 4 for n in consumer.max_records)


async def test_commits_at_most_every_interval_then_on_close_and_times_the_lag():
    metrics = Metrics()
    feed = make_feed(ScriptedGate(room=100), metrics, commit_interval_s=0.2)
    consumer = ScriptedConsumer()

    def run(seconds: float) -> int:
        offset = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            offset += 1
            feed.request_commit(TP, offset)
            feed._turn(consumer)
        return offset

    last = await trio.to_thread.run_sync(run, 1.0)
    times = [t for t, _ in consumer.commits]
    assert 4 <= len(times) <= 7, times
    assert all(b - a >= 0.2 for a, b in zip(times, times[1:], strict=False))
    offsets = [c[TP] for _, c in consumer.commits]
    assert offsets == sorted(offsets) and offsets[-1] < last
    feed._commit_requested(consumer)  # what the thread does on close
    assert consumer.commits[-1][1] == {TP: last}
    lag = metrics.registry.get_sample_value("invoker_stage_seconds_count",
                                            {"stage": "commit_lag"})
    assert lag == len(consumer.commits)  # once per committed partition offset
    lag_sum = metrics.registry.get_sample_value("invoker_stage_seconds_sum",
                                                {"stage": "commit_lag"})
    assert 0 < lag_sum <= 0.25 * len(consumer.commits)


async def test_a_revoked_partition_is_committed_at_once_and_its_messages_dropped():
    gate = ScriptedGate(room=0)  # takes nothing: polled messages stay in the inbox
    feed = make_feed(gate, commit_interval_s=60)
    consumer = ScriptedConsumer(records=3, partitions=(TP, OTHER))
    await turns(feed, consumer)  # the first commit turn (nothing requested yet)
    feed.request_commit(TP, 7)
    feed.request_commit(OTHER, 9)
    await turns(feed, consumer)
    assert consumer.commits == [] and feed._held() == 3
    await trio.to_thread.run_sync(feed._on_revoked, consumer, [TP])
    assert [c for _, c in consumer.commits] == [{TP: 7}]
    assert feed._held() == 0 and gate.revoked_partitions == [TP]
    feed._commit_requested(consumer)
    assert [c for _, c in consumer.commits] == [{TP: 7}, {OTHER: 9}]


async def test_a_lower_offset_never_replaces_a_requested_one():
    feed = make_feed(ScriptedGate(room=1))
    consumer = ScriptedConsumer()
    feed.request_commit(TP, 10)
    feed.request_commit(TP, 4)
    feed._commit_requested(consumer)
    assert [c for _, c in consumer.commits] == [{TP: 10}]
