"""The invoker daemon: feed → slots and container pool → record channel → batcher → store.

Backpressure runs backwards along that line. A slow store keeps bulk writes in flight, so the
batcher stops draining the bounded record channel; activations then wait to enqueue their
records while still holding their execution slots; the dispatcher waits for a slot, the
read-ahead channel fills, and the feed thread pauses the consumer (and keeps polling). Nothing
on the way is unbounded, and nothing is committed before the store (and the completions
topic) has it.
"""

from __future__ import annotations

import json
import resource
import signal
import time
from collections.abc import Sequence
from typing import Any

import structlog
import trio
from kafka.structs import TopicPartition

from invoker.batcher import Batcher, BatcherSettings, PendingRecord
from invoker.config import Config
from invoker.feed import Feed, FeedMessage, FeedSettings
from invoker.kafka_io import OutgoingMessage, Publisher, ensure_topics
from invoker.messages import InvalidMessage, Rejection, decode_activation
from invoker.metrics import Metrics
from invoker.model import Activation
from invoker.offsets import OffsetToken, OffsetTracker
from invoker.ops import serve_ops
from invoker.pool import ContainerPool, PoolConfig
from invoker.records import build_record, build_rejection_record, completion_message
from invoker.watermark import Hysteresis
from store import Store, open_store

log = structlog.get_logger(__name__)


def pool_config(config: Config) -> PoolConfig:
    return PoolConfig(
        invoker_id=config.invoker_id,
        user_memory_mb=config.user_memory_mb,
        idle_timeout_s=config.idle_timeout_s,
        prewarm=dict(config.prewarm),
        prewarm_memory_mb=config.prewarm_memory_mb,
        kind_images=dict(config.kind_images),
        network=config.container_network or None,
        pids_limit=config.container_pids_limit,
        cpus=config.container_cpus,
        max_result_bytes=config.max_result_bytes,
        init_timeout_s=config.init_timeout_s,
    )


class _Gate:
    """The trio side of the feed (see :class:`invoker.feed.FeedGate`). Never blocks."""

    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker
        cfg = invoker.config
        self._readahead = Hysteresis(high=cfg.read_ahead, low=cfg.read_ahead // 2)
        self._channel = Hysteresis(high=cfg.record_channel_size,
                                   low=cfg.record_channel_low_watermark)

    def offer(self, messages: Sequence[FeedMessage]) -> tuple[int, bool]:
        taken = 0
        for message in messages:
            try:
                self._invoker.readahead_tx.send_nowait(message)
            except trio.WouldBlock:
                break
            taken += 1
        saturated = self._update()
        return taken, saturated or taken < len(messages)

    def should_resume(self) -> bool:
        return not self._update()

    def _update(self) -> bool:
        inv = self._invoker
        readahead = self._readahead.update(inv.readahead_tx.statistics().current_buffer_used)
        channel = self._channel.update(inv.record_depth())
        return readahead or channel

    def assigned(self, partitions: Sequence[tuple[TopicPartition, int]]) -> None:
        for partition, epoch in partitions:
            self._invoker.tracker.assign(partition, epoch)

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            self._invoker.tracker.revoke(partition)


class Invoker:
    def __init__(self, config: Config, metrics: Metrics | None = None,
                 store: Store | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store or open_store(config.store_url, timeout_s=config.store_timeout_s)
        self.tracker = OffsetTracker()
        self.readahead_tx, self._readahead_rx = trio.open_memory_channel[FeedMessage](
            config.read_ahead)
        self._record_tx, self._record_rx = trio.open_memory_channel[PendingRecord](
            config.record_channel_size)
        self._slots = trio.Semaphore(config.max_activations)
        self._stop = trio.Event()
        self._dispatch_scope = trio.CancelScope()
        self._started = False
        self._feed = Feed(
            FeedSettings(bootstrap=config.kafka_bootstrap, topic=config.feed_topic,
                         group_id=config.group_id, client_id=config.invoker_id,
                         max_poll_records=config.max_poll_records,
                         fetch_max_bytes=config.fetch_max_bytes,
                         max_message_bytes=config.max_message_bytes),
            _Gate(self), self.metrics)
        self._publisher: Publisher | None = None
        self._pool: ContainerPool | None = None
        self.ops_port: int | None = None
        self._record_metrics()

    def _record_metrics(self) -> None:
        m, cfg = self.metrics, self.config
        records, size = cfg.worst_case_buffered()
        m.worst_case_records.set(records)
        m.worst_case_bytes.set(size)
        m.slots_total.set(cfg.max_activations)
        m.channel_capacity.set(cfg.record_channel_size)
        m.peak_rss_bytes.set_function(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        m.channel_depth.set_function(self.record_depth)

    def record_depth(self) -> int:
        return self._record_tx.statistics().current_buffer_used

    def stop(self) -> None:
        """Begin a graceful stop (as SIGTERM does)."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        return {"ok": self._started and not self._stop.is_set(), "invoker": self.config.invoker_id,
                "paused": bool(self.metrics.paused._value.get())}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop`, SIGTERM or SIGINT, then drain and return."""
        cfg = self.config
        records, size = cfg.worst_case_buffered()
        log.info("invoker starting", invoker=cfg.invoker_id, store=self.store.describe(),
                 worst_case_buffered_records=records, worst_case_buffered_bytes=size)
        await trio.to_thread.run_sync(
            ensure_topics, cfg.kafka_bootstrap,
            [cfg.feed_topic, cfg.completions_topic, cfg.dead_letter_topic], cfg.topic_partitions)
        await self.store.open()
        self._publisher = Publisher(cfg.kafka_bootstrap, cfg.invoker_id)
        try:
            async with ContainerPool.open(pool_config(cfg), self.metrics) as pool:
                self._pool = pool
                async with trio.open_nursery() as services:
                    self.ops_port = await services.start(
                        serve_ops, cfg.metrics_host, cfg.metrics_port, self.metrics, self.health)
                    services.start_soon(self._watch_signals)
                    services.start_soon(self._feed.run)
                    await self._feed.ready.wait()
                    self._started = True
                    task_status.started()
                    await self._process()
                    self._feed.close()
                    services.cancel_scope.cancel()
        finally:
            self._publisher.close()
            await self.store.aclose()
            log.info("invoker stopped")

    async def _process(self) -> None:
        """Run the pipeline until asked to stop; then finish in-flight work and flush."""
        cfg = self.config
        batcher = Batcher(self.store, BatcherSettings(
            batch_size=cfg.batch_size, linger_s=cfg.linger_ms / 1000,
            max_writes_in_flight=cfg.max_writes_in_flight,
            backoff_initial_s=cfg.backoff_initial_ms / 1000,
            backoff_max_s=cfg.backoff_max_ms / 1000), self._on_stored, self._on_refused,
            self.metrics)
        async with trio.open_nursery() as writing:
            writing.start_soon(batcher.run, self._record_rx)
            async with self._record_tx:
                async with trio.open_nursery() as activations:
                    activations.start_soon(self._dispatch, activations)
                    await self._stop.wait()
                    log.info("stopping: no new activations; finishing in-flight ones",
                             grace_s=cfg.grace_period_s)
                    self._feed.stop_fetching()
                    # In-flight activations get the grace period; those cut off are not
                    # committed and run again after a restart.
                    activations.cancel_scope.deadline = trio.current_time() + cfg.grace_period_s
                    self._dispatch_scope.cancel()
            writing.cancel_scope.deadline = trio.current_time() + cfg.grace_period_s
        log.info("record channel flushed")

    async def _dispatch(self, activations: trio.Nursery) -> None:
        with self._dispatch_scope:
            async for message in self._readahead_rx:
                token = self.tracker.register(message.partition, message.epoch, message.offset)
                if token is None:
                    continue  # its partition was revoked; the new owner processes it
                await self._slots.acquire()
                self.metrics.slots_used.inc()
                activations.start_soon(self._handle, message, token)

    async def _handle(self, message: FeedMessage, token: OffsetToken) -> None:
        """One activation, holding its slot until its record is enqueued."""
        self.metrics.in_flight.inc()
        try:
            try:
                decoded = decode_activation(message.value, self.config)
            except InvalidMessage as exc:
                await self._dead_letter(message, str(exc))
                self._complete(token)
                return
            if isinstance(decoded, Rejection):
                record = build_rejection_record(decoded, self.config.invoker_id, _now_ms())
                self.metrics.activations.labels(status=decoded.status.label).inc()
                await self._record_tx.send(PendingRecord(record, token, blocking=False))
                return
            await self._execute(decoded, message, token)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.slots_used.dec()
            self._slots.release()

    async def _execute(self, activation: Activation, message: FeedMessage,
                       token: OffsetToken) -> None:
        assert self._pool is not None
        async with self._pool.lease(activation.action) as lease:
            outcome = await lease.invoke(activation)
            arrived_ms = activation.submitted_at_ms or int(message.received_at * 1000)
            outcome.wait_time_ms = max(outcome.start_ms - arrived_ms, 0)
            record = build_record(activation, outcome, self.config.invoker_id,
                                  self.config.max_record_bytes)
            self.metrics.activations.labels(status=outcome.status.label).inc()
            log.debug("activation finished", activation_id=activation.activation_id,
                      action=activation.action.name, status=outcome.status.label,
                      duration_ms=outcome.end_ms - outcome.start_ms, start=outcome.start_kind)
            # The lease (slot) is released only after this send returns.
            await self._record_tx.send(PendingRecord(record, token, activation.blocking))

    async def _dead_letter(self, message: FeedMessage, reason: str) -> None:
        """Park an unreadable message, verbatim, with why and where it came from."""
        tp = message.partition
        log.warning("dead-lettered message", reason=reason, topic=tp.topic,
                    partition=tp.partition, offset=message.offset)
        await self._publish_dead_letter(message.value, reason, (
            ("dlq.topic", tp.topic.encode()), ("dlq.partition", str(tp.partition).encode()),
            ("dlq.offset", str(message.offset).encode())))

    async def _on_refused(self, pending: PendingRecord, reason: str) -> None:
        """The store will never take this record: park it rather than stall its partition."""
        await self._publish_dead_letter(json.dumps(pending.record).encode(),
                                        f"store refused the record: {reason}",
                                        (("dlq.kind", b"record"),))
        if pending.token is not None:
            self._complete(pending.token)

    async def _publish_dead_letter(self, value: bytes, reason: str,
                                   extra: tuple[tuple[str, bytes], ...]) -> None:
        assert self._publisher is not None
        headers = (("dlq.reason", reason.encode()),
                   ("dlq.invoker", self.config.invoker_id.encode()), *extra)
        await self._publisher.publish_until_acked(
            [OutgoingMessage(self.config.dead_letter_topic, value, headers=headers)])
        self.metrics.dead_letters.inc()

    async def _on_stored(self, stored: Sequence[PendingRecord]) -> None:
        """Records are durable: publish their completions, then let their offsets commit."""
        assert self._publisher is not None
        completions = [
            OutgoingMessage(
                self.config.completions_topic,
                json.dumps(completion_message(p.record, self.config.invoker_id,
                                              p.blocking)).encode(),
                key=p.record["activationId"].encode())
            for p in stored
        ]
        await self._publisher.publish_until_acked(completions)
        for pending in stored:
            if pending.token is not None:
                self._complete(pending.token)

    def _complete(self, token: OffsetToken) -> None:
        offset = self.tracker.complete(token)
        if offset is not None:
            self._feed.request_commit(token.partition, offset)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self._stop.is_set():
                    log.warning("second signal: stopping now", signal=signum)
                    raise KeyboardInterrupt
                log.info("signal received: draining", signal=signal.Signals(signum).name)
                self.stop()


def _now_ms() -> int:
    return int(time.time() * 1000)

