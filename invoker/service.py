"""What the invoker and the recorder share: feed → handle → record channel → batcher → store.

A :class:`FeedService` owns one consumer (the feed), the bounded record channel, the batcher,
the Kafka publisher for completions and dead letters, the ops endpoint and signal handling.
Subclasses decide what happens to a message between the feed and the record channel
(:meth:`FeedService.dispatch`).

Offsets: every message taken from the feed is registered with the offset tracker; it is
completed when its record is stored and its completion acknowledged (by the completion stage,
:mod:`invoker.completions`), when it was dead-lettered, or when the subclass says so (e.g.
after an overflow write was acknowledged). Only then can its offset be committed; the feed
commits what may be every ``commit_interval_ms``.

Kafka's refusals never wedge a partition (completions: see :mod:`invoker.completions`). A dead
letter too large for the dead-letter topic carries the first bytes of its payload and the
header ``dlq.truncated: <original size>``; one that Kafka can never take for another reason
(see :mod:`invoker.kafka_io`) is logged in one line and its offset completes all the same.
Failures that may pass are retried for as long as it takes, and ``/healthz`` fails once a
publish (or a store write) has been unfinished for ``health_stuck_s``.
"""

from __future__ import annotations

import math
import random
import resource
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
import trio
from kafka.structs import TopicPartition

from invoker.batcher import Batcher, BatcherSettings, PendingRecord, backoff_delay
from invoker.completions import CompletionStage
from invoker.config import Config
from invoker.feed import Feed, FeedMessage, FeedSettings
from invoker.kafka_io import (
    OutgoingMessage,
    Publisher,
    Unpublishable,
    ensure_topics,
    header_text,
    value_room,
)
from invoker.metrics import Metrics
from invoker.offsets import OffsetToken, OffsetTracker
from invoker.ops import serve_ops
from invoker.safejson import dumps_escaped
from invoker.status_report import (
    RECENT_WINDOW_S,
    STATUS_VERSION,
    histogram_count_mean,
    metric_by_label,
    metric_count,
    partition_rows,
)
from invoker.stuck import StuckWatch
from invoker.watermark import Hysteresis
from store import (
    Store,
    StoreUnavailable,
    UnencodableRecord,
    encode_record,
    open_store,
)

log = structlog.get_logger(__name__)

# Of the shutdown deadline, what in-flight work leaves for the last writes, their completions
# and removing containers (at most a quarter of the grace period).
_SHUTDOWN_RESERVE_S = 5.0


async def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a worker thread, shielded from cancellation: for making and closing Kafka
    clients, which block on the brokers (closing must happen even while shutting down)."""
    with trio.CancelScope(shield=True):
        return await trio.to_thread.run_sync(fn)


class ReadAhead:
    """The dispatcher's end of the read-ahead. Each message taken makes room that the feed's
    inbox fills at once (:meth:`invoker.feed.Feed.refill`), not at the feed thread's next turn:
    a full read-ahead then never waits on the thread while the thread holds messages."""

    def __init__(self, channel: trio.MemoryReceiveChannel[FeedMessage],
                 refill: Callable[[], None]) -> None:
        self._channel = channel
        self._refill = refill

    def receive_nowait(self) -> FeedMessage:
        """The next message; raises trio.WouldBlock if none waits (or trio.EndOfChannel)."""
        message = self._channel.receive_nowait()
        self._refill()
        return message

    async def receive(self) -> FeedMessage:
        """Blocks until a message comes."""
        message = await self._channel.receive()
        self._refill()
        return message

    def __aiter__(self) -> ReadAhead:
        return self

    async def __anext__(self) -> FeedMessage:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class _Gate:
    """The trio side of the feed (see :class:`invoker.feed.FeedGate`). Never blocks.

    Saturated means — unless overflow takes over — the record channel reached its bound and has
    not yet drained to its low watermark. A full read-ahead is not saturation: the feed thread
    holds what it polled (and fetches nothing more) until the dispatcher takes messages.
    """

    def __init__(self, service: FeedService, pause_on_record_channel: bool) -> None:
        self._service = service
        cfg = service.config
        self._channel = (Hysteresis(high=cfg.record_channel_size,
                                    low=cfg.record_channel_low_watermark)
                         if pause_on_record_channel else None)

    def offer(self, messages: Sequence[FeedMessage]) -> tuple[int, bool]:
        taken = 0
        for message in messages:
            try:
                self._service.readahead_tx.send_nowait(message)
            except trio.WouldBlock:
                break
            taken += 1
        return taken, self.saturated()

    def holding_back(self) -> list[str]:
        """What holds the feed back now, for GET /status. Never blocks."""
        cfg = self._service.config
        reasons = []
        if self._service.readahead_depth() >= cfg.read_ahead:
            reasons.append(f"read-ahead full ({cfg.read_ahead})")
        if self._channel is not None and self._channel.saturated:
            reasons.append(f"record channel reached {cfg.record_channel_size} until it drains "
                           f"to {cfg.record_channel_low_watermark}")
        return reasons

    def saturated(self) -> bool:
        return self._channel.update(self._service.record_depth()) if self._channel else False

    def assigned(self, partitions: Sequence[tuple[TopicPartition, int]]
                 ) -> dict[TopicPartition, int]:
        """Track ``partitions``; those handed back to this member keep their tracking and
        their finished work's commit is asked for again. Returns where to read them from (the
        others read from the committed offset). Suspended partitions not among them are
        forgotten."""
        service = self._service
        positions = {}
        for partition, epoch in partitions:
            resumed = service.tracker.assign(partition, epoch)
            if resumed is not None:
                positions[partition] = resumed.position
                if resumed.committable is not None:
                    service.feed.request_commit(partition, resumed.committable)
        service.tracker.forget_suspended()
        service.offsets_moved()
        return positions

    def revoking(self, partitions: Sequence[TopicPartition]) -> threading.Event:
        """A revocation began: take no more of ``partitions`` (what the read-ahead holds of
        them is skipped), stop asking for their commits. The event returned is set (on the trio
        thread) once none of their work is in flight any more."""
        service = self._service
        for partition in partitions:
            service.tracker.suspend(partition)
        drained = threading.Event()
        service.revocation = _Revocation(frozenset(partitions), drained)
        service.revocation.check(service.tracker)
        # Stopping, once the records are flushed: nothing in flight will finish any more. (Not
        # as soon as no activation runs: records still being written and their completions
        # would complete offsets the partition's next owner runs again.)
        if service.writing_finished.is_set():
            drained.set()
        service.offsets_moved()  # a dispatcher waiting to register may skip its message now
        return drained

    def revoked(self, partitions: Sequence[TopicPartition]
                ) -> dict[TopicPartition, tuple[int | None, int]]:
        """The revocation's wait ended: per partition, the offset its finished work lets commit
        (None: nothing finished) and how many taken offsets are still not committable."""
        service = self._service
        service.revocation = None
        return {partition: (service.tracker.committable(partition),
                            service.tracker.outstanding(partition))
                for partition in partitions}


@dataclass(slots=True)
class _Revocation:
    """Partitions being revoked, and the event the feed thread waits on for their work."""

    partitions: frozenset[TopicPartition]
    drained: threading.Event

    def check(self, tracker: OffsetTracker[TopicPartition]) -> None:
        """Set ``drained`` once none of the partitions has work in flight. Never blocks."""
        if not any(tracker.outstanding(p) for p in self.partitions):
            self.drained.set()


class FeedService:
    """Base of the invoker and the recorder. Subclasses implement :meth:`dispatch`."""

    role = "service"

    def __init__(self, config: Config, *, topic: str, group_id: str, client_id: str,
                 metrics_port: int, feed_bootstrap: str | None = None,
                 metrics: Metrics | None = None, store: Store | None = None,
                 pause_on_record_channel: bool = True) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store or open_store(config.store_url, timeout_s=config.store_timeout_s)
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.revocation: _Revocation | None = None  # while the feed thread waits on one
        self._offsets_moved = trio.Event()  # set (and replaced) when outstanding offsets shrink
        self.readahead_tx, self.readahead_rx = trio.open_memory_channel[FeedMessage](
            config.read_ahead)
        self.record_tx, self._record_rx = trio.open_memory_channel[PendingRecord](
            config.record_channel_size)
        self.client_id = client_id
        self._topic = topic
        self._feed_bootstrap = feed_bootstrap or config.kafka_bootstrap
        self._metrics_port = metrics_port
        self._stop = trio.Event()
        # One deadline (trio clock) for the whole graceful stop, set when it begins: in-flight
        # work, the last writes and completions, removing containers (see _process).
        self.shutdown_deadline = math.inf
        self.work_finished = trio.Event()  # no activation runs any more (set when stopping)
        self.writing_finished = trio.Event()  # no record is written any more (set when stopping)
        # Every publish (completions, dead letters, overflow) and store write not finished yet:
        # /healthz names the oldest once it is older than health_stuck_s.
        self.stuck = StuckWatch()
        # Read at scrape time, on the trio thread as StuckWatch requires: invoker.ops renders
        # /metrics in a trio task (nothing else collects the registry).
        self.metrics.oldest_unfinished_seconds.set_function(self.stuck.stuck_for)
        self._started = False
        self._started_at = time.monotonic()
        self._batcher: Batcher | None = None  # while the pipeline runs (GET /status)
        self.dispatch_scope = trio.CancelScope()
        self._gate = _Gate(self, pause_on_record_channel)
        self.feed = Feed(
            FeedSettings(bootstrap=self._feed_bootstrap, topic=topic, group_id=group_id,
                         client_id=client_id, max_poll_records=config.max_poll_records,
                         fetch_max_bytes=config.fetch_max_bytes,
                         max_message_bytes=config.max_message_bytes,
                         commit_interval_s=config.commit_interval_ms / 1000,
                         fetch_batch_wait_ms=config.fetch_batch_wait_ms,
                         revoke_wait_s=config.revoke_wait_ms / 1000),
            self._gate, self.metrics)
        self.publisher: Publisher | None = None
        self.ops_port: int | None = None
        self._rng = random.Random()
        m = self.metrics
        m.channel_capacity.set(config.record_channel_size)
        m.channel_depth.set_function(self.record_depth)
        m.readahead_depth.set_function(self.readahead_depth)
        m.peak_rss_bytes.set_function(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    # --- to be provided by subclasses ----------------------------------------------------

    async def dispatch(self, messages: ReadAhead, work: trio.Nursery) -> None:
        """Take messages until cancelled; start per-message work in ``work`` if it may wait.

        Every message must end in :meth:`enqueue`, :meth:`dead_letter` or :meth:`complete`.
        """
        raise NotImplementedError

    def topics_to_ensure(self) -> dict[str, list[str]]:
        """Topics to create if missing, by the brokers they live on."""
        cfg = self.config
        topics = {cfg.kafka_bootstrap: [cfg.completions_topic, cfg.dead_letter_topic]}
        topics.setdefault(self._feed_bootstrap, []).append(self._topic)
        return topics

    def started_fields(self) -> dict[str, Any]:
        """Extra fields for the start-up log line."""
        return {}

    def status_fields(self) -> dict[str, Any]:
        """Extra sections of GET /status (see invoker.status_report). Must not block."""
        return {}

    def holding_back(self) -> list[str]:
        """What holds the pipeline back now, for GET /status. Must not block."""
        reasons = self._gate.holding_back()
        if self.tracker.outstanding() >= self.config.max_uncommitted_offsets:
            reasons.append(f"{self.config.max_uncommitted_offsets} offsets wait for a slow one "
                           "before them to be committed")
        return reasons

    # --- public --------------------------------------------------------------------------

    def record_depth(self) -> int:
        return self.record_tx.statistics().current_buffer_used

    def readahead_depth(self) -> int:
        return self.readahead_tx.statistics().current_buffer_used

    def stop(self) -> None:
        """Begin a graceful stop (as SIGTERM does)."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """``ok``, or the reasons it is not: starting, stopping, a publish or store write
        unfinished for longer than ``health_stuck_s`` (the oldest), the feed paused for longer
        than ``health_paused_s``."""
        cfg = self.config
        reasons = []
        if not self._started:
            reasons.append("starting")
        if self._stop.is_set():
            reasons.append("stopping")
        stuck = self.stuck.oldest()
        if stuck is not None and stuck.seconds > cfg.health_stuck_s:
            reasons.append(stuck.describe())
        paused_for = self.feed.paused_for()
        if paused_for > cfg.health_paused_s:
            reasons.append(f"feed paused for {paused_for:.1f} s")
        # Owning no partitions is not unhealthy (a group may have more members than
        # partitions), but it is what an operator looks for first, so it is reported.
        return {"ok": not reasons, "reasons": reasons, "role": self.role,
                "id": self.client_id, "paused": self.feed.paused,
                "partitions": sorted(f"{tp.topic}-{tp.partition}"
                                    for tp in self.tracker.partitions())}

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` answers (see invoker.status_report for the fields). Never
        blocks: it reads what the trio thread owns and the feed thread's last published
        offsets; its size is bounded (partitions and container groups are capped)."""
        cfg, m = self.config, self.metrics
        health = self.health()
        feed = self.feed
        batcher = self._batcher
        writes, mean_s = histogram_count_mean(m.store_write_seconds)
        oldest = self.stuck.oldest()
        partitions, omitted = partition_rows(feed.progress, self.tracker.outstanding)
        return {
            "version": STATUS_VERSION, "role": self.role, "id": self.client_id,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "ok": health["ok"], "reasons": health["reasons"],
            "feed": {"paused": feed.paused, "paused_for_s": round(feed.paused_for(), 1),
                     "reason": feed.pause_reason if feed.paused else "",
                     "pauses": metric_count(m.pauses), "held_back_by": self.holding_back()},
            "read_ahead": {"depth": self.readahead_depth(), "capacity": cfg.read_ahead},
            "record_channel": {"depth": self.record_depth(), "capacity": cfg.record_channel_size,
                               "low_watermark": cfg.record_channel_low_watermark},
            "uncommitted_offsets": {"count": self.tracker.outstanding(),
                                    "max": cfg.max_uncommitted_offsets},
            "store": {"writes_in_flight": batcher.writes_in_flight if batcher else 0,
                      "max_writes_in_flight": cfg.max_writes_in_flight,
                      "recent": batcher.recent_writes.summary() if batcher else {
                          "window_s": RECENT_WINDOW_S, "count": 0},
                      "writes": writes, "mean_s": mean_s,
                      "failures": metric_count(m.store_write_failures)},
            "oldest_unfinished": None if oldest is None else {
                "what": oldest.what, "seconds": round(oldest.seconds, 1),
                "error": oldest.error},  # cut by StuckWatch
            "partitions": partitions, "partitions_omitted": omitted,
            "activations": metric_by_label(m.activations, "status"),
            **self.status_fields(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` (:meth:`watch_signals` calls it on SIGTERM/SIGINT); then
        drain, commit and return. A stop while the store cannot be opened yet returns at once
        (``task_status`` then reports started all the same)."""
        cfg = self.config
        log.info(f"{self.role} starting", id=self.client_id, store=self.store.describe(),
                 **self.started_fields())
        for brokers, topics in self.topics_to_ensure().items():
            await trio.to_thread.run_sync(ensure_topics, brokers, topics, cfg.topic_partitions,
                                          cfg.kafka_max_message_bytes)
        if not await self._open_store():
            self.work_finished.set()
            self.writing_finished.set()
            await self.store.aclose()
            log.info(f"{self.role} stopped before it started")
            task_status.started()
            return
        # Completions and dead letters: linger_ms=0, so an idle daemon sends each at once.
        self.publisher = await in_thread(partial(
            Publisher, cfg.kafka_bootstrap, self.client_id,
            max_message_bytes=cfg.kafka_max_message_bytes, linger_ms=0, stuck=self.stuck))
        try:
            async with trio.open_nursery() as services:
                self.ops_port = await services.start(
                    serve_ops, cfg.metrics_host, self._metrics_port, self.metrics, self.health,
                    self.status)
                services.start_soon(self.feed.run)
                await self.feed.ready.wait()
                self._started = True
                task_status.started()
                await self._process()
                self.writing_finished.set()
                if self.revocation is not None:  # nothing in flight will finish any more
                    self.revocation.drained.set()
                self.feed.close()
                services.cancel_scope.cancel()
        finally:
            self.work_finished.set()
            self.writing_finished.set()
            await in_thread(self.publisher.close)
            await self.store.aclose()
            log.info(f"{self.role} stopped")

    async def _open_store(self) -> bool:
        """Open the store, retrying while it is unavailable; False if a stop came first."""
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.store.open()
                return True
            except StoreUnavailable as exc:
                delay = backoff_delay(attempt, 0.5, 10.0, self._rng)
                attempt += 1
                log.warning("store unavailable at start; retrying", error=str(exc),
                            retry_in_s=round(delay, 2))
                with trio.move_on_after(delay):
                    await self._stop.wait()
        return False

    async def _process(self) -> None:
        """The pipeline until asked to stop; then finish in-flight work and flush.

        The stop has one deadline, ``grace_period_s`` after it (:attr:`shutdown_deadline`).
        In-flight work is cut off ``_SHUTDOWN_RESERVE_S`` (at most a quarter of the grace
        period) before it, so the last records can still be written and their completions
        published, and the invoker's containers removed, by the deadline; the flush is cut off
        at the deadline. What was cut off is not committed: it runs again later.
        """
        cfg = self.config
        assert self.publisher is not None
        completions = CompletionStage(self.publisher, cfg.completions_topic, self.client_id,
                                      cfg.max_publishes_in_flight, self.complete, self.metrics)
        batcher = Batcher(self.store, BatcherSettings(
            batch_size=cfg.batch_size, linger_s=cfg.linger_ms / 1000,
            max_writes_in_flight=cfg.max_writes_in_flight,
            backoff_initial_s=cfg.backoff_initial_ms / 1000,
            backoff_max_s=cfg.backoff_max_ms / 1000), completions.submit,
            self._on_refused,
            self.metrics, stuck=self.stuck)
        self._batcher = batcher

        async def write() -> None:
            try:
                await batcher.run(self._record_rx)
            finally:
                completions.close()

        async with trio.open_nursery() as writing:
            writing.start_soon(completions.run)
            writing.start_soon(write)
            async with self.record_tx:
                async with trio.open_nursery() as work:
                    work.start_soon(self._dispatch_until_stopped, work)
                    await self._stop.wait()
                    self.shutdown_deadline = trio.current_time() + cfg.grace_period_s
                    reserve = min(_SHUTDOWN_RESERVE_S, cfg.grace_period_s / 4)
                    log.info("stopping: taking no new messages; finishing in-flight work",
                             grace_s=cfg.grace_period_s,
                             work_cut_off_in_s=round(cfg.grace_period_s - reserve, 3))
                    self.feed.stop_fetching()
                    work.cancel_scope.deadline = self.shutdown_deadline - reserve
                    self.dispatch_scope.cancel()
                if work.cancel_scope.cancelled_caught:
                    log.warning("shutdown: in-flight work cut off; it runs again after a restart")
            self.work_finished.set()
            writing.cancel_scope.deadline = self.shutdown_deadline
        if writing.cancel_scope.cancelled_caught:
            log.warning("shutdown deadline passed before every record was written; those not "
                        "written are not committed and run again after a restart")
        else:
            log.info("record channel flushed")

    async def _dispatch_until_stopped(self, work: trio.Nursery) -> None:
        with self.dispatch_scope:
            await self.dispatch(ReadAhead(self.readahead_rx, self.feed.refill), work)

    # --- for subclasses ------------------------------------------------------------------

    async def register(self, message: FeedMessage) -> OffsetToken[TopicPartition] | None:
        """Track ``message``'s offset; None if its partition was revoked meanwhile (skip it).

        Blocks while ``max_uncommitted_offsets`` offsets wait for their commit (a slow message
        at the head of a partition), which backs up into the read-ahead and pauses the feed.
        """
        while (self.tracker.accepts(message.partition, message.epoch)
               and self.registering_waits()):
            await self._offsets_moved.wait()
        return self.tracker.register(message.partition, message.epoch, message.offset)

    def registering_waits(self) -> bool:
        """Whether :meth:`register` would wait (``max_uncommitted_offsets`` reached)."""
        return self.tracker.outstanding() >= self.config.max_uncommitted_offsets

    def offsets_moved(self) -> None:
        self._offsets_moved.set()
        self._offsets_moved = trio.Event()

    async def enqueue(self, pending: PendingRecord, timeout_s: float | None = None) -> bool:
        """Put a record into the bounded record channel. Blocks while the channel is full, at
        most ``timeout_s`` if given (0: not at all); False if it did not get in. How long it
        waited counts in the ``enqueue_wait`` stage when it got in.

        With room in the channel it takes no checkpoint: the caller's task ends next, and a
        turn of the scheduler per activation for nothing cost a task step (~5 us here)."""
        started = time.perf_counter()
        try:
            self.record_tx.send_nowait(pending)
        except trio.WouldBlock:
            if timeout_s is None:
                await self.record_tx.send(pending)
            else:
                with trio.move_on_after(timeout_s) as waited:
                    await self.record_tx.send(pending)
                if waited.cancelled_caught:
                    return False
        self.metrics.stage["enqueue_wait"].observe(time.perf_counter() - started)
        return True

    def complete(self, token: OffsetToken[TopicPartition]) -> None:
        """This message's work is durable: let its offset commit once all before it are."""
        offset = self.tracker.complete(token)
        if offset is None:
            return
        # A partition being revoked (or gone) asks for no commit: the feed thread commits
        # what it reached itself before the revocation ends, and never after.
        if self.tracker.owns(token.partition):
            self.feed.request_commit(token.partition, offset)
        elif self.revocation is not None and token.partition in self.revocation.partitions:
            self.revocation.check(self.tracker)
        self.offsets_moved()

    async def dead_letter(self, message: FeedMessage, reason: str) -> None:
        """Park an unreadable message, verbatim, with why and where it came from."""
        tp = message.partition
        log.warning("dead-lettered message", reason=reason, topic=tp.topic,
                    partition=tp.partition, offset=message.offset)
        await self._publish_dead_letter(message.value, reason, (
            ("dlq.topic", tp.topic.encode()), ("dlq.partition", str(tp.partition).encode()),
            ("dlq.offset", str(message.offset).encode())))

    # --- internals -----------------------------------------------------------------------

    async def _on_refused(self, pending: PendingRecord, reason: str) -> None:
        """The store will never take this record: park it rather than stall its partition."""
        try:
            value = encode_record(pending.record)
        except UnencodableRecord:  # a lone surrogate has no UTF-8 form: escape non-ASCII instead
            value = dumps_escaped(pending.record)
        await self._publish_dead_letter(value, f"store refused the record: {reason}",
                                        (("dlq.kind", b"record"),))
        if pending.token is not None:
            self.complete(pending.token)

    async def _publish_dead_letter(self, value: bytes, reason: str,
                                   extra: tuple[tuple[str, bytes], ...]) -> None:
        """Blocks until Kafka acknowledged it (retrying while it fails); too large: truncated,
        with ``dlq.truncated``; never taken for another reason: logged, dropped."""
        assert self.publisher is not None
        topic = self.config.dead_letter_topic
        headers = (("dlq.reason", header_text(reason)), ("dlq.source", header_text(self.client_id)),
                   *extra)
        try:
            await self.publisher.publish_until_acked([OutgoingMessage(topic, value,
                                                                      headers=headers)])
        except Unpublishable as exc:
            (refusal,) = exc.refused
            if refusal.limit is None:
                self.metrics.kafka_refused.labels(instead="dropped").inc()
                log.error("dead letter cannot be published; dropped", problem=refusal.reason,
                          reason=reason[:100])
                return
            headers += (("dlq.truncated", str(len(value)).encode()),)
            room = value_room(refusal.limit, None, headers)
            try:  # (headers too large on their own: nothing fits, refused again)
                await self.publisher.publish_until_acked(
                    [OutgoingMessage(topic, value[:max(room, 0)], headers=headers)])
            except Unpublishable as again:
                self.metrics.kafka_refused.labels(instead="dropped").inc()
                log.error("dead letter cannot be published; dropped", problem=str(again),
                          reason=reason[:100])
                return
            self.metrics.kafka_refused.labels(instead="truncated").inc()
        self.metrics.dead_letters.inc()

    async def watch_signals(self) -> None:
        """The first SIGTERM/SIGINT begins a graceful stop (:meth:`stop`); returns at the
        second, which asks to stop at once (the caller ends the process). Blocks until then;
        call it from the main thread, for the whole life of the service."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._stop.is_set():
                    log.warning("second signal: stopping at once", signal=name)
                    return
                log.info("signal received: draining", signal=name)
                self.stop()
