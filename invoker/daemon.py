"""The invoker daemon: feed → slots and container pool → record channel → batcher → store.

Backpressure runs backwards along that line. A slow store keeps bulk writes in flight, so the
batcher stops draining the bounded record channel; once the channel is at its bound the feed
pauses the consumer (and keeps polling). Activations then wait to enqueue their records while
still holding their execution slots, the dispatcher waits for a slot, and the read-ahead fills
(which alone only has the feed thread hold its poll). Nothing on the way is unbounded, and
nothing is committed before the store (and the completions topic) has it. (The container
is given back as soon as its answer and logs are read: the slot, not the container, is what
bounds the records waiting to be enqueued.)

With overflow on, a record the channel cannot take goes to the overflow topic instead, and the
slot is held until Kafka acknowledged it; the feed then pauses only when that path is saturated
too (all slots waiting on overflow acks).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import structlog
import trio
from kafka.structs import TopicPartition

from invoker.batcher import PendingRecord
from invoker.config import Config
from invoker.containers.pool import ContainerPool, PoolConfig
from invoker.feed import FeedMessage
from invoker.kafka_io import Publisher, Unpublishable
from invoker.lastresort import HandOff, dead_letter_unexpected
from invoker.messages import InvalidMessage, Rejection, decode_activation
from invoker.metrics import Metrics
from invoker.model import Activation, now_ms
from invoker.offsets import OffsetToken
from invoker.records import build_record, build_rejection_record
from invoker.service import FeedService, ReadAhead, in_thread
from invoker.status_report import containers_status, metric_count
from overflow.envelope import OverflowedRecord
from overflow.sender import OverflowSender
from store import Store

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
        subnet_pool=config.container_subnet_pool,
        pids_limit=config.container_pids_limit,
        cpus=config.container_cpus,
        max_result_bytes=config.max_result_bytes,
        max_json_depth=config.max_json_depth,
        init_timeout_s=config.init_timeout_s,
        user=config.container_user,
        exec_tmpfs=tuple(config.container_exec_tmpfs),
        kind_runtime=dict(config.kind_runtime),
    )


class Invoker(FeedService):
    role = "invoker"

    def __init__(self, config: Config, metrics: Metrics | None = None,
                 store: Store | None = None) -> None:
        super().__init__(config, topic=config.feed_topic, group_id=config.group_id,
                         client_id=config.invoker_id, metrics_port=config.metrics_port,
                         metrics=metrics, store=store,
                         pause_on_record_channel=not config.overflow_enabled)
        self._slots = trio.Semaphore(config.max_activations)
        # Tested once here: building the call of a line the logger drops cost 2 % of the trio
        # thread, one per activation.
        self._log_each_activation = config.log_level.lower() == "debug"
        self._pool: ContainerPool | None = None
        self._overflow: OverflowSender | None = None
        self._worst_case = config.worst_case_buffered()
        self.metrics.worst_case_records.set(self._worst_case[0])
        self.metrics.worst_case_bytes.set(self._worst_case[1])
        self.metrics.slots_total.set(config.max_activations)
        self.metrics.slots_used.set_function(
            lambda: config.max_activations - self._slots.value)
        # Read when scraped: a Gauge's inc() and dec() take a lock, twice per activation.
        self._running = 0
        self.metrics.in_flight.set_function(lambda: self._running)

    def topics_to_ensure(self) -> dict[str, list[str]]:
        topics = super().topics_to_ensure()
        if self.config.overflow_enabled:
            topics.setdefault(self.config.overflow_brokers, []).append(self.config.overflow_topic)
        return topics

    def started_fields(self) -> dict[str, Any]:
        records, size = self._worst_case
        return {"worst_case_buffered_records": records, "worst_case_buffered_bytes": size,
                "overflow": self.config.overflow_enabled}

    def status_fields(self) -> dict[str, Any]:
        """Slots, containers by action and state, overflow (GET /status). Never blocks."""
        cfg, m = self.config, self.metrics
        fields: dict[str, Any] = {
            "slots": {"used": cfg.max_activations - self._slots.value,
                      "max": cfg.max_activations, "running": metric_count(m.in_flight)},
            "overflow": {"enabled": cfg.overflow_enabled}}
        if self._pool is not None:
            fields["containers"] = containers_status(
                self._pool.snapshot(), waiting=self._pool.waiting,
                memory_used_mb=self._pool.used_memory_mb, memory_mb=cfg.user_memory_mb)
        if cfg.overflow_enabled:
            fields["overflow"].update(
                in_flight=metric_count(m.overflow_in_flight),
                max_in_flight=cfg.overflow_max_in_flight,
                records=metric_count(m.overflow_records), bytes=metric_count(m.overflow_bytes))
        return fields

    def holding_back(self) -> list[str]:
        reasons = super().holding_back()
        if self._slots.value == 0:
            reasons.append(f"all {self.config.max_activations} slots busy")
        if (self.config.overflow_enabled and metric_count(self.metrics.overflow_in_flight)
                >= self.config.overflow_max_in_flight):
            reasons.append(f"all {self.config.overflow_max_in_flight} overflow writes await "
                           "Kafka's ack")
        return reasons

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`FeedService.run` with the container pool (and the overflow producer) around
        it. On a stop the containers are removed as soon as no activation runs any more, while
        the last records are still being written: both within the one shutdown deadline."""
        cfg = self.config
        async with trio.open_nursery() as service, AsyncExitStack() as stack:
            self._pool = await stack.enter_async_context(
                ContainerPool.open(pool_config(cfg), self.metrics))
            if cfg.overflow_enabled:
                publisher = await in_thread(partial(
                    Publisher, cfg.overflow_brokers, cfg.invoker_id + "-overflow",
                    max_message_bytes=cfg.kafka_max_message_bytes, stuck=self.stuck))
                stack.push_async_callback(in_thread, publisher.close)
                self._overflow = OverflowSender(publisher, cfg.overflow_topic,
                                                cfg.overflow_max_in_flight, self.metrics)
            # The service runs in a task of its own so that this task, which opened the pool,
            # can close it before the service is done (the nursery then waits for the rest).
            await service.start(super().run)
            task_status.started()
            await self.work_finished.wait()
            self._pool.close_deadline = self.shutdown_deadline

    async def dispatch(self, messages: ReadAhead, work: trio.Nursery) -> None:
        """Blocks for a slot, then to register the message (see :meth:`FeedService.register`).

        The slot comes first: a message taken (registered) starts at once, so a revocation
        waits only for work that runs, and one waiting for a slot when its partition is revoked
        is skipped (the partition's next reader, perhaps this member again, reads it).

        Whatever else already waits in the read-ahead starts in the same turn of the scheduler,
        while slots are free: every await is a checkpoint, and at one message per turn the
        dispatcher, not the slots, bounded throughput (read-ahead full, 2 of 32 slots used).
        The handlers of one turn reach the container pool in the order trio runs them, which
        may be reversed: within a batch, activations are not served first come, first served
        (offsets still commit in order, as the tracker commits only a contiguous prefix)."""
        async for message in messages:
            if not self.tracker.accepts(message.partition, message.epoch):
                continue  # its partition was revoked: skipped without waiting for a slot
            await self._slots.acquire()
            self._start(message, await self.register(message), work)
            while self._slots.value and not self.registering_waits():
                try:
                    message = messages.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._slots.acquire_nowait()
                self._start(message, self.tracker.register(message.partition, message.epoch,
                                                           message.offset), work)

    def _start(self, message: FeedMessage, token: OffsetToken[TopicPartition] | None,
               work: trio.Nursery) -> None:
        """Run ``message`` in the slot just taken; None: its partition was revoked (its next
        owner reads it), the slot is given back."""
        if token is None:
            self._slots.release()
            return
        work.start_soon(self._handle, message, token)

    async def _handle(self, message: FeedMessage, token: OffsetToken[TopicPartition]) -> None:
        """One activation, holding its slot until its record is enqueued (or overflowed).

        Whatever else goes wrong with this one message, it is dead-lettered and the daemon
        goes on (:mod:`invoker.lastresort`). Blocks on the pool, the record channel and Kafka.
        """
        handoff = HandOff()  # set once the outcome is handed on (dead letter, record delivered)
        try:
            try:
                decoded = decode_activation(message.value, self.config)
            except InvalidMessage as exc:
                await self.dead_letter(message, str(exc))
                handoff.done = True
                self.complete(token)
                return
            if isinstance(decoded, Rejection):
                record = build_rejection_record(decoded, self.config.invoker_id, now_ms(),
                                                self.config.max_record_bytes)
                self.metrics.activations_by_status[decoded.status.label].inc()
                await self._deliver(PendingRecord(record, token, decoded.blocking), handoff)
                return
            await self._execute(decoded, message, token, handoff)
        except MemoryError:
            raise
        except Exception as exc:
            await dead_letter_unexpected(self, message, token, exc, handoff)
        finally:
            self._slots.release()

    async def _execute(self, activation: Activation, message: FeedMessage,
                       token: OffsetToken[TopicPartition], handoff: HandOff) -> None:
        assert self._pool is not None
        async with self._pool.lease(activation.action, activation.namespace) as lease:
            self._running += 1
            try:
                outcome = await lease.invoke(activation)
            finally:
                self._running -= 1
        # The container serves the next activation meanwhile: held to here, it sat idle
        # through the record's building and enqueueing (at half of max load, the wait for a
        # container was then p50 26 ms with 3 of 8 containers in /run; 0.07 ms given back).
        # From arrival to the container starting work on it (init time excluded).
        arrived_ms = activation.submitted_at_ms or int(message.received_at * 1000)
        first_ms = outcome.start_ms - (outcome.init_time_ms or 0)
        outcome.wait_time_ms = max(first_ms - arrived_ms, 0)
        record = build_record(activation, outcome, self.config.invoker_id,
                              self.config.max_record_bytes)
        self.metrics.activations_by_status[outcome.status.label].inc()
        if self._log_each_activation:
            log.debug("activation finished", activation_id=activation.activation_id,
                      action=activation.action.name, status=outcome.status.label,
                      duration_ms=outcome.end_ms - outcome.start_ms, start=outcome.start_kind)
        await self._deliver(PendingRecord(record, token, activation.blocking), handoff)

    async def _deliver(self, pending: PendingRecord, handoff: HandOff) -> None:
        """Into the record channel; with overflow on, to Kafka if the channel cannot take it.

        A record the overflow topic can never take (too large) waits for the channel instead,
        holding its slot, and is never retried against Kafka. Blocks until one took it; then
        sets ``handoff``: the record's path completes its offset from there on.
        """
        if self._overflow is None:
            await self.enqueue(pending)
            handoff.done = True
            return
        if await self.enqueue(pending, timeout_s=self.config.overflow_wait_ms / 1000):
            handoff.done = True
            self._overflow.channel_took_one()
            return
        try:
            await self._overflow.send(OverflowedRecord(pending.record, pending.blocking,
                                                       self.config.invoker_id))
        except Unpublishable as exc:
            self.metrics.kafka_refused.labels(instead="stored_instead").inc()
            log.warning("record cannot be overflowed; waiting for the record channel",
                        activation_id=pending.record["activationId"],
                        reason=exc.refused[0].reason)
            await self.enqueue(pending)
            handoff.done = True
            return
        handoff.done = True
        if pending.token is not None:
            self.complete(pending.token)  # the recorder publishes its completion once stored
