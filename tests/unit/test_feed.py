"""The feed thread's hand-off and commits, against a scripted consumer (Kafka is the boundary
being faked; the feed's turns run on a real worker thread, with the real trio hand-off)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import trio
import trio.testing
from kafka.structs import TopicPartition

from invoker.config import FETCH_IDLE_WAIT_MS
from invoker.feed import (
    FETCH_BATCH_MIN_BYTES,
    POLL_TIMEOUT_MS,
    Feed,
    FeedMessage,
    FeedSettings,
)
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
        self.end = records  # the high watermark
        self.paused: set[TopicPartition] = set()
        self.max_records: list[int] = []
        self.timeouts: list[int] = []  # of each poll
        # kafka-python's fetcher settings, which every fetch request is built from
        self._fetcher = SimpleNamespace(config={"fetch_min_bytes": 1, "fetch_max_wait_ms": 100})
        self.commits: list[tuple[float, dict[TopicPartition, int]]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.partitions)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self.max_records.append(max_records)
        self.timeouts.append(timeout_ms)
        if TP in self.paused or not self.waiting:
            time.sleep(min(timeout_ms, 5) / 1000)
            return {}
        return {TP: [self.waiting.popleft() for _ in range(min(max_records, len(self.waiting)))]}

    def commit(self, offsets, timeout_ms: int) -> None:
        self.commits.append((time.monotonic(), {tp: o.offset for tp, o in offsets.items()}))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.waiting[0].offset if self.waiting else self.end  # (what /status reports)

    def highwater(self, partition: TopicPartition) -> int:
        return self.end


class ScriptedGate:
    """Takes messages while it has room; saturated when full (as the record channel makes the
    real gate), unless ``saturates`` is False (as a full read-ahead alone)."""

    def __init__(self, room: int, saturates: bool = True) -> None:
        self.room = room
        self.saturates = saturates
        self.taken: list[FeedMessage] = []
        self.revoking_partitions: list[TopicPartition] = []
        self.revoked_partitions: list[TopicPartition] = []
        self.drained = threading.Event()  # set: nothing of a revoked partition runs
        self.drained.set()
        # what revoked() reports: partition -> (offset to commit, still in flight)
        self.reached: dict[TopicPartition, tuple[int | None, int]] = {}
        self.positions: dict[TopicPartition, int] = {}  # handed back: where to read from

    def offer(self, messages: Sequence[FeedMessage]) -> tuple[int, bool]:
        take = list(messages)[:max(self.room - len(self.taken), 0)]
        self.taken += take
        return len(take), self.saturated()

    def saturated(self) -> bool:
        return self.saturates and len(self.taken) >= self.room

    def assigned(self, partitions) -> dict[TopicPartition, int]:
        return {tp: self.positions[tp] for tp, _ in partitions if tp in self.positions}

    def revoking(self, partitions) -> threading.Event:
        self.revoking_partitions += partitions
        return self.drained

    def revoked(self, partitions) -> dict[TopicPartition, tuple[int | None, int]]:
        self.revoked_partitions += partitions
        return {tp: self.reached.get(tp, (None, 0)) for tp in partitions}


def make_feed(gate: ScriptedGate, metrics: Metrics | None = None, *, max_poll_records: int = 8,
              commit_interval_s: float = 0.2, revoke_wait_s: float = 5.0,
              hold_before_pause_s: float = 1.0, fetch_batch_wait_ms: int = 0) -> Feed:
    feed = Feed(FeedSettings(bootstrap="unused:9092", topic="feed", group_id="g", client_id="c",
                             max_poll_records=max_poll_records, fetch_max_bytes=1 << 20,
                             max_message_bytes=1 << 20, commit_interval_s=commit_interval_s,
                             revoke_wait_s=revoke_wait_s,
                             hold_before_pause_s=hold_before_pause_s,
                             fetch_batch_wait_ms=fetch_batch_wait_ms),
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


async def test_a_full_inbox_is_held_without_polling_and_pauses_only_after_the_hold():
    # A full read-ahead (a gate with no room that is not saturated): a pause would drop what
    # kafka-python fetched, so the thread holds its inbox and does not poll, for a while.
    gate = ScriptedGate(room=4, saturates=False)
    feed = make_feed(gate, max_poll_records=4, hold_before_pause_s=1.0)
    consumer = ScriptedConsumer(records=20)
    await turns(feed, consumer, 2)  # 4 polled and taken, then 4 polled and held
    assert len(gate.taken) == 4 and feed._held() == 4
    polls = len(consumer.max_records)
    await turns(feed, consumer, 3)  # each waits POLL_TIMEOUT_MS for room
    assert len(consumer.max_records) == polls  # held, nothing polled
    last_poll = feed._polled_at
    if time.monotonic() - last_poll < 0.9:  # (else a loaded machine rightly paused)
        assert not feed.paused
    with trio.fail_after(10):
        while not feed.paused:
            await turns(feed, consumer)
    # Paused once a second went by without a poll (the turn that paused polls, paused).
    assert feed._paused_since - last_poll >= 1.0 and len(consumer.max_records) == polls + 1
    assert feed.pause_reason == "read-ahead full" and consumer.paused == {TP}
    assert feed._held() == 4 and len(gate.taken) == 4
    gate.taken.clear()
    await turns(feed, consumer)  # the pump hands the inbox over; the next turn resumes
    await turns(feed, consumer)
    assert not feed.paused and consumer.paused == set()
    assert [m.offset for m in gate.taken] == [4, 5, 6, 7]


async def test_a_refill_hands_the_inbox_over_at_once_and_the_thread_polls_once_half_is_gone():
    gate = ScriptedGate(room=4, saturates=False)
    feed = make_feed(gate, max_poll_records=4, hold_before_pause_s=60)
    consumer = ScriptedConsumer(records=20)
    await turns(feed, consumer, 2)
    assert feed._held() == 4 and len(gate.taken) == 4
    polls = len(consumer.max_records)
    with trio.fail_after(5):  # not a timing assertion: a turn that never ends fails here
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, feed._turn, consumer)  # holds
            await trio.sleep(0.02)
            # The dispatcher took one from the read-ahead: its refill offers the inbox at once.
            del gate.taken[:1]
            feed.refill()
            assert [m.offset for m in gate.taken] == [1, 2, 3, 4] and feed._held() == 3
    # Three of four still held: the turn ended (at POLL_TIMEOUT_MS) without polling.
    assert len(consumer.max_records) == polls
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, feed._turn, consumer)
            await trio.sleep(0.02)
            del gate.taken[:1]
            feed.refill()
            assert feed._held() == 2
    # Half gone: the thread polled again, up to the limit.
    assert consumer.max_records[polls:] == [2] and feed._held() == 4


async def test_a_hold_ended_by_saturation_polls_nothing_and_the_next_turn_pauses():
    # The record channel fills while the thread holds a full inbox: it wakes to pause, and
    # must not poll first (the inbox holds at most max_poll_records).
    gate = ScriptedGate(room=4, saturates=False)
    feed = make_feed(gate, max_poll_records=4, hold_before_pause_s=60)
    consumer = ScriptedConsumer(records=20)
    await turns(feed, consumer, 2)
    assert feed._held() == 4
    polls = len(consumer.max_records)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, feed._turn, consumer)  # holds
            await trio.sleep(0.02)
            gate.saturates = True
            feed._pump()  # the gate now says saturated: the holding thread is woken
    assert feed._held() == 4 and len(consumer.max_records) == polls
    await turns(feed, consumer)
    assert feed.paused and feed.pause_reason == "pipeline saturated" and feed._held() == 4


async def test_a_steady_flow_through_a_full_read_ahead_never_pauses():
    # The dispatcher takes a message every 2 ms: the read-ahead is full all along, yet the
    # thread polls whenever half its inbox is gone, so it never goes hold_before_pause_s
    # without a poll (a pause would drop what kafka-python fetched).
    gate = ScriptedGate(room=8, saturates=False)
    feed = make_feed(gate, max_poll_records=8, hold_before_pause_s=0.3, commit_interval_s=100)
    consumer = ScriptedConsumer(records=100_000)
    stop = threading.Event()

    def turn_until_stopped() -> None:
        while not stop.is_set():
            feed._turn(consumer)

    taken = 0
    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, turn_until_stopped)
        began = time.monotonic()
        while time.monotonic() - began < 1.5:
            await trio.sleep(0.002)
            if gate.taken:
                del gate.taken[0]
                taken += 1
                feed.refill()
        stop.set()
    assert taken > 50 and not feed.paused and consumer.paused == set()
    assert feed._metrics.pauses._value.get() == 0


async def test_fetches_wait_to_gather_more_only_while_messages_flow():
    gate = ScriptedGate(room=100)
    feed = make_feed(gate, max_poll_records=4, fetch_batch_wait_ms=5)
    consumer = ScriptedConsumer(records=6)
    idle = {"fetch_min_bytes": 1, "fetch_max_wait_ms": FETCH_IDLE_WAIT_MS}
    batching = {"fetch_min_bytes": FETCH_BATCH_MIN_BYTES, "fetch_max_wait_ms": 5}
    await turns(feed, consumer)  # 4 messages in one poll: they come faster than fetches
    assert consumer._fetcher.config == batching
    await turns(feed, consumer)  # the last 2
    assert consumer._fetcher.config == batching
    await turns(feed, consumer)  # nothing: idle again, a fetch returns with the first message
    assert consumer._fetcher.config == idle
    # Polls while batching return to the idle fetch within two waits of nothing.
    assert consumer.timeouts == [POLL_TIMEOUT_MS, 10, 10]
    # One message a poll (a slow trickle) is no flow: batching would only add empty polls.
    consumer.waiting.append(Record(6, b"m6"))
    await turns(feed, consumer)
    assert consumer._fetcher.config == idle and consumer.timeouts[-1] == POLL_TIMEOUT_MS
    consumer.waiting.extend([Record(7, b"m7"), Record(8, b"m8")])
    await turns(feed, consumer)
    assert consumer._fetcher.config == batching
    assert [m.offset for m in gate.taken] == list(range(9))


async def test_with_no_batch_wait_every_fetch_returns_with_the_first_message():
    feed = make_feed(ScriptedGate(room=100), fetch_batch_wait_ms=0)
    consumer = ScriptedConsumer(records=6)
    await turns(feed, consumer, 3)
    assert consumer._fetcher.config == {"fetch_min_bytes": 1, "fetch_max_wait_ms": 100}
    assert consumer.timeouts == [POLL_TIMEOUT_MS] * 3


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


async def test_a_revocation_waits_for_the_work_in_flight_then_commits_what_it_reached():
    gate = ScriptedGate(room=100)
    gate.drained = threading.Event()  # work of TP still runs
    metrics = Metrics()
    feed = make_feed(gate, metrics, commit_interval_s=60)
    consumer = ScriptedConsumer(partitions=(TP, OTHER))
    feed.request_commit(TP, 3)  # asked for before the revocation began
    gate.reached = {TP: (5, 0)}  # what its work reached once done

    async def finish_later() -> None:
        await trio.sleep(0.3)
        assert consumer.commits == [], "nothing may be committed before the work is done"
        gate.drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        started = time.monotonic()
        await trio.to_thread.run_sync(feed._on_revoked, consumer, [TP])
        waited = time.monotonic() - started
    assert gate.revoking_partitions == [TP] and gate.revoked_partitions == [TP]
    assert [c for _, c in consumer.commits] == [{TP: 5}]
    assert 0.3 <= waited < 3
    assert metrics.registry.get_sample_value("invoker_revoke_seconds_count") == 1


async def test_a_revocation_waits_at_most_revoke_wait_then_commits_the_contiguous_part():
    gate = ScriptedGate(room=100)
    gate.drained = threading.Event()  # never set: an activation that does not end
    feed = make_feed(gate, commit_interval_s=60, revoke_wait_s=0.2)
    consumer = ScriptedConsumer(partitions=(TP,))
    gate.reached = {TP: (8, 2)}
    started = time.monotonic()
    await trio.to_thread.run_sync(feed._on_revoked, consumer, [TP])
    assert 0.2 <= time.monotonic() - started < 2
    assert [c for _, c in consumer.commits] == [{TP: 8}]


async def test_a_partition_handed_back_is_read_from_this_members_position():
    gate = ScriptedGate(room=100)
    metrics = Metrics()
    feed = make_feed(gate, metrics)
    consumer = ScriptedConsumer(partitions=(TP, OTHER))
    gate.positions = {TP: 42}  # OTHER was not ours: it reads from the committed offset
    await trio.to_thread.run_sync(feed._on_assigned, consumer, [TP, OTHER])
    assert consumer.seeks == [(TP, 42)]
    assert feed._epoch_of(TP) == feed._epoch_of(OTHER) == 1
    assert metrics.registry.get_sample_value("invoker_rebalances_total") == 1


async def test_status_keeps_a_handed_back_partitions_commit_and_forgets_one_given_away():
    gate = ScriptedGate(room=100)
    feed = make_feed(gate, commit_interval_s=60)
    consumer = ScriptedConsumer(records=3, partitions=(TP, OTHER))
    await trio.to_thread.run_sync(feed._on_assigned, consumer, [TP, OTHER])
    await turns(feed, consumer)  # polls offsets 0-2 of both
    feed.request_commit(TP, 2)
    feed.request_commit(OTHER, 1)
    feed._commit_requested(consumer)
    await trio.to_thread.run_sync(feed._on_revoked, consumer, [TP, OTHER])
    gate.positions = {TP: 3}  # TP comes back to this member; OTHER went elsewhere
    await trio.to_thread.run_sync(feed._on_assigned, consumer, [TP, OTHER])
    consumer.waiting.clear()  # nothing more to read: the next poll learns nothing new
    feed._publish_progress(consumer)
    assert feed.progress[TP].committed == 2  # this member's commit, not where it reads on
    assert feed.progress[OTHER].committed == consumer.end  # forgotten: the position again


async def test_the_services_gate_suspends_then_signals_drained_and_never_requests_a_stale_commit(
        tmp_path):
    # The real FeedService gate and tracker (its feed thread is not started: Kafka is the
    # boundary; request_commit only records what the thread would commit).
    from invoker.config import Config
    from invoker.service import FeedService

    service = FeedService(Config(store_url=f"sqlite:///{tmp_path}/r.sqlite3"), topic="feed",
                          group_id="g", client_id="c", metrics_port=0)
    gate = service.feed._gate
    assert gate.assigned([(TP, 1), (OTHER, 1)]) == {}
    tokens = [service.tracker.register(TP, 1, o) for o in (0, 1, 2)]
    other = service.tracker.register(OTHER, 1, 0)
    service.complete(tokens[0])
    assert service.feed._commits[TP][0] == 1  # owned: asked for at once
    drained = gate.revoking([TP, OTHER])
    assert not drained.is_set()
    service.complete(tokens[2])  # behind 1: nothing reached
    service.complete(tokens[1])  # 1 and 2: reached 3, but no commit requested any more
    service.complete(other)
    assert drained.is_set()
    assert service.feed._commits[TP][0] == 1 and OTHER not in service.feed._commits
    assert gate.revoked([TP, OTHER]) == {TP: (3, 0), OTHER: (1, 0)}
    # Handed back: TP reads on after offset 2, OTHER went elsewhere and is forgotten.
    assert gate.assigned([(TP, 2)]) == {TP: 3}
    assert service.tracker.partitions() == [TP]


async def test_work_still_in_flight_across_a_hand_back_commits_under_the_new_assignment(
        tmp_path):
    from invoker.config import Config
    from invoker.service import FeedService

    service = FeedService(Config(store_url=f"sqlite:///{tmp_path}/r.sqlite3"), topic="feed",
                          group_id="g", client_id="c", metrics_port=0)
    gate = service.feed._gate
    gate.assigned([(TP, 1)])
    slow = service.tracker.register(TP, 1, 7)
    drained = gate.revoking([TP])
    assert gate.revoked([TP]) == {TP: (None, 1)} and not drained.is_set()  # timed out
    assert gate.assigned([(TP, 2)]) == {TP: 8}
    service.complete(slow)
    assert service.feed._commits[TP][0] == 8


async def test_a_revocation_while_stopping_waits_for_the_records_still_being_written(tmp_path):
    # Stopping: no activation runs any more, but the writer still flushes records. Their
    # offsets must complete before the partition moves (else its next owner runs them again
    # and both publish a completion); once the writer is done, nothing can complete any more.
    from invoker.config import Config
    from invoker.service import FeedService

    service = FeedService(Config(store_url=f"sqlite:///{tmp_path}/r.sqlite3"), topic="feed",
                          group_id="g", client_id="c", metrics_port=0)
    gate = service.feed._gate
    gate.assigned([(TP, 1)])
    flushing = service.tracker.register(TP, 1, 4)
    service.work_finished.set()
    drained = gate.revoking([TP])
    assert not drained.is_set()
    service.complete(flushing)  # stored and its completion acknowledged
    assert drained.is_set()
    assert gate.revoked([TP]) == {TP: (5, 0)}

    gate.assigned([(TP, 2)])
    assert service.tracker.register(TP, 2, 5) is not None  # cut off: it never completes
    service.writing_finished.set()
    assert gate.revoking([TP]).is_set()  # the writer is done: nothing to wait for


async def test_the_services_read_ahead_refills_from_the_inbox_and_a_full_one_is_no_saturation(
        tmp_path):
    from invoker.config import Config
    from invoker.service import FeedService, ReadAhead

    service = FeedService(Config(store_url=f"sqlite:///{tmp_path}/r.sqlite3", read_ahead=2),
                          topic="feed", group_id="g", client_id="c", metrics_port=0)
    feed, gate = service.feed, service.feed._gate
    feed._inbox.extend(FeedMessage(TP, 1, offset, b"{}", 0.0) for offset in range(4))
    feed._pump()
    assert service.readahead_depth() == 2 and feed._held() == 2
    assert not gate.saturated() and not feed._saturated  # a full read-ahead does not pause
    assert gate.holding_back() == ["read-ahead full (2)"]
    read_ahead = ReadAhead(service.readahead_rx, feed.refill)
    assert read_ahead.receive_nowait().offset == 0
    assert service.readahead_depth() == 2 and feed._held() == 1  # refilled at once
    assert [(await read_ahead.receive()).offset for _ in range(3)] == [1, 2, 3]
    assert feed._held() == 0 and gate.holding_back() == []
