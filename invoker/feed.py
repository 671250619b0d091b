"""The feed: a kafka-python consumer on its own thread, handing messages to trio.

kafka-python's consumer is not thread-safe, so every consumer call (poll, pause, resume, commit,
close) happens on the feed thread. The trio side talks to it only through:

- the inbox: the thread appends what it polled (at most ``max_poll_records`` messages are ever
  in it) and asks trio, without waiting, to run the *pump* (``TrioToken.run_sync_soon``, one
  pending call at most). The pump, on the trio thread, offers the inbox to the
  :class:`FeedGate`, removes what the gate took and notes whether the gate is saturated. So the
  thread never waits for trio to schedule a hand-off; it waits only while more than half of
  ``max_poll_records`` is in the inbox (the read-ahead had no room for it), and then at most
  ``POLL_TIMEOUT_MS`` per turn. The trio side also runs the pump as it takes messages
  (:meth:`Feed.refill`): the room it makes is filled at once, and the thread, waiting, polls
  again (up to the limit) once no more than half is left;
- other :class:`FeedGate` methods, which the thread calls with ``trio.from_thread.run_sync``
  (they run on the trio thread and never block) when a wait does not matter: while paused
  (to decide whether to resume) and on rebalances (see below);
- :meth:`Feed.request_commit`, which records the offset to commit under a lock (one entry per
  partition, so it is bounded) for the thread to commit at most every ``commit_interval_s``,
  and always on revocation and close. A commit is synchronous (up to ``COMMIT_TIMEOUT_MS``), so
  the interval keeps it off most turns.

For ``GET /status`` the thread publishes, every ``PROGRESS_INTERVAL_S``, each assigned
partition's position, last commit and high watermark (:attr:`Feed.progress`, a dict replaced
whole and never changed, so the trio side reads it without a lock); only calls that do not
block (``position`` with timeout 0, ``highwater``).

When the gate says the pipeline is saturated (the record channel reached its bound), the
thread pauses every assigned partition and keeps polling (so the consumer stays in its group),
holding at most ``max_poll_records`` messages, and resumes when its inbox is empty and the gate
says the pipeline drained below its low watermark. A full read-ahead alone does not pause at
once: the thread holds its inbox without polling, which fetches nothing more either, while a
pause costs a fetch (kafka-python drops what it fetched for paused partitions, up to
``fetch_max_bytes``, and fetches it again on resume; at ~90 pauses in 10 s of full load,
allocating and copying those fetches was most of the feed thread's work). Only a hold that
left the thread without a poll for ``hold_before_pause_s`` pauses, so that the consumer polls
(and takes part in rebalances) again.

While messages flow (a poll returned more than one), each fetch may wait at the broker
``fetch_batch_wait_ms`` to gather more (:func:`set_fetch_wait`): a fetch round trip costs
kafka-python ~0.4 ms of CPU however little it carries, and at a few hundred per second one or
two per fetch made the feed thread the daemon's second largest. A poll that returns at most
one (within two such waits) switches back to fetches that return with the first message.
Each switch takes effect one fetch late (kafka-python sends the next fetch before ``poll()``
returns): the first message after a pause in the flow may still wait up to
``fetch_batch_wait_ms``; a trickle, or a feed idle for longer, adds no wait.

Rebalances (kafka-python 2.x is eager: every group change revokes all partitions, then assigns)
run inside ``poll()`` on this thread, which is what lets the revocation block poll, as Kafka
expects. A revocation, in this order: drops the revoked partitions' messages from the inbox;
has the gate suspend them (the read-ahead's messages of them are skipped, not started; their
completions ask for no commit any more); waits, at most ``revoke_wait_s``, on a
``threading.Event`` the trio side sets once none of their work is in flight; takes from the
gate what their finished work lets commit and commits it (with what was requested before). No
commit of them can be requested after the suspension, so none is left to be sent once they are
owned elsewhere. An assignment has the gate track the partitions; one handed back to this
member keeps its tracking (work still in flight counts) and is read on from after the last
message taken (a seek), not from the committed offset: nothing is read twice. The rest read
from the committed offset (so a revocation that timed out with work in flight costs at most
that work's re-execution, on whichever member gets the partition).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, TypeVarTuple

import structlog
import trio
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from invoker.config import FETCH_IDLE_WAIT_MS
from invoker.metrics import Metrics

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

POLL_TIMEOUT_MS = 100
# While messages flow, a fetch waits at the broker for this much data or fetch_batch_wait_ms:
# with a backlog it returns at once, at moderate rates after the wait with what came meanwhile.
FETCH_BATCH_MIN_BYTES = 64 * 1024
PAUSED_POLL_TIMEOUT_MS = 10
COMMIT_TIMEOUT_MS = 2000
TOPIC_METADATA_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.5  # how often the thread publishes per-partition offsets (/status)


@dataclass(frozen=True, slots=True)
class FeedMessage:
    partition: TopicPartition
    epoch: int
    offset: int
    value: bytes
    received_at: float  # time.time() when the consumer returned it


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    """One partition's offsets as the feed thread last saw them (next to read; None:
    unknown). ``committed``: the last offset this member committed, or before its first commit
    where it began reading (the group's committed offset); ``highwater``: as of the last
    fetch."""

    position: int | None
    committed: int | None
    highwater: int | None


class FeedGate(Protocol):
    """The trio side of the feed. Every method runs on the trio thread and must not block (nor
    raise: the pump runs as a trio system callback)."""

    def offer(self, messages: Sequence[FeedMessage]) -> tuple[int, bool]:
        """Take a prefix of ``messages``; return (how many were taken, whether to pause).
        Called by the pump with the inbox locked."""

    def saturated(self) -> bool:
        """Whether the pipeline is full (with hysteresis: until it drained below its low
        watermarks)."""

    def assigned(self, partitions: Sequence[tuple[TopicPartition, int]]
                 ) -> dict[TopicPartition, int]:
        """Partitions (with their new epoch) now owned by this consumer; returns the offset to
        read from for those handed back (the others: the committed offset)."""

    def revoking(self, partitions: Sequence[TopicPartition]) -> threading.Event:
        """A revocation began: hand nothing more of them on, request no commit of them; the
        event is set once none of their work is in flight."""

    def revoked(self, partitions: Sequence[TopicPartition]
                ) -> dict[TopicPartition, tuple[int | None, int]]:
        """The wait is over: per partition, the offset to commit (None: nothing to commit) and
        how many taken offsets are still not committable."""


@dataclass(frozen=True)
class FeedSettings:
    bootstrap: str
    topic: str
    group_id: str
    client_id: str
    max_poll_records: int
    fetch_max_bytes: int
    max_message_bytes: int
    commit_interval_s: float = 0.2
    fetch_batch_wait_ms: int = 0  # 0: every fetch returns with the first message
    revoke_wait_s: float = 5.0  # well below max_poll_interval_ms, the rebalance timeout
    # How long the thread may hold its inbox without polling before it pauses to poll again:
    # a rebalance that begins meanwhile waits for the next poll.
    hold_before_pause_s: float = 1.0
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000


class Feed:
    def __init__(self, settings: FeedSettings, gate: FeedGate, metrics: Metrics) -> None:
        self._settings = settings
        self._gate = gate
        self._metrics = metrics
        self._token: trio.lowlevel.TrioToken | None = None
        self._commit_lock = threading.Lock()
        # partition -> (offset to commit, when the oldest request it includes was made)
        self._commits: dict[TopicPartition, tuple[int, float]] = {}
        self._next_commit = 0.0  # time.monotonic() from which the thread commits again
        self._stop_fetching = threading.Event()
        self._close = threading.Event()
        self._paused = False
        self._paused_since = 0.0
        self._pause_reason = ""
        # Feed thread only: per partition of the assignment, the first offset polled and the
        # last committed, published with the position and high watermark in ``progress``.
        self._read_from: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._next_progress = 0.0
        # Replaced whole every PROGRESS_INTERVAL_S, never changed: the trio side reads it
        # without a lock (GET /status).
        self.progress: dict[TopicPartition, PartitionProgress] = {}
        self._epoch = 0
        self._epochs: dict[TopicPartition, int] = {}
        self._awaiting_assignment = False  # between a revocation and the next assignment
        # Polled, not yet taken by the gate: at most max_poll_records. The lock is held for
        # list operations only (and by the pump while the gate takes messages).
        self._inbox_changed = threading.Condition()
        self._inbox: deque[FeedMessage] = deque()
        self._saturated = False  # what the gate said at the pump's last hand-off
        self._polled_at = time.monotonic()  # feed thread: its last poll
        self._fetching_batches = False  # feed thread: see _fetch_in_batches
        self.ready = trio.Event()

    # --- trio side -----------------------------------------------------------------------

    async def run(self) -> None:
        """Run the consumer thread until :meth:`close` (or cancellation) and it has committed.

        Blocks for the life of the feed. Cancellation asks the thread to close and waits for it.
        """
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_on_cancel)
            try:
                await trio.to_thread.run_sync(self._thread_main)
            finally:
                nursery.cancel_scope.cancel()

    async def _close_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop_fetching()
            self._close.set()

    @property
    def paused(self) -> bool:
        """Whether the consumer is paused (read without locking: a bool, for reporting)."""
        return self._paused

    @property
    def pause_reason(self) -> str:
        """Why the consumer was last paused (read without locking, for reporting)."""
        return self._pause_reason

    def paused_for(self) -> float:
        """Seconds the consumer has been paused so far (0.0 while it is not). Never blocks."""
        return time.monotonic() - self._paused_since if self._paused else 0.0

    def request_commit(self, partition: TopicPartition, offset: int,
                       requested_at: float | None = None) -> None:
        """Ask the thread to commit ``offset`` (the next offset to read). Never blocks.
        ``requested_at`` (time.monotonic()) is for a request made earlier, and retried."""
        at = time.monotonic() if requested_at is None else requested_at
        with self._commit_lock:
            current = self._commits.get(partition)
            if current is None:
                self._commits[partition] = (offset, at)
            elif offset > current[0]:
                self._commits[partition] = (offset, min(current[1], at))

    def stop_fetching(self) -> None:
        """Hand over nothing more; messages not yet handed over are left to be redelivered."""
        self._stop_fetching.set()

    def refill(self) -> None:
        """The trio side took from the read-ahead: hand over what the thread holds, if anything,
        now rather than at the thread's next turn. Trio thread; blocks only as :meth:`_pump`."""
        if self._inbox:
            self._pump()

    def _pump(self) -> None:
        """Offer the inbox to the gate (on the trio thread, scheduled by the feed thread with
        ``run_sync_soon``, or by :meth:`refill`). Blocks only while the thread holds the inbox
        lock for a list operation."""
        with self._inbox_changed:
            if self._stop_fetching.is_set():
                return
            if self._inbox:
                taken, self._saturated = self._gate.offer(self._inbox)
                for _ in range(taken):
                    self._inbox.popleft()
            else:
                # Nothing to hand over (e.g. the broker is unreachable): still pause when the
                # pipeline is full, so fetching does not restart before it drained.
                self._saturated = self._gate.saturated()
            if self._hold_over():
                # Only then: a refill runs for every message taken, and waking the thread for
                # each one (to wait again) cost more than the refill itself.
                self._inbox_changed.notify()

    def close(self) -> None:
        """Commit what was requested, leave the group and end the thread."""
        self._close.set()

    # --- feed thread ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        s = self._settings
        consumer = KafkaConsumer(  # type: ignore[call-arg]  # see receive_message_max_bytes
            bootstrap_servers=s.bootstrap.split(","),
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.max_poll_records,
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=min(s.fetch_max_bytes, max(s.max_message_bytes, 1 << 20)),
            # kafka-python refuses responses above receive_message_max_bytes (1 MB by default)
            # even when it asked for more; leave room for a full fetch plus protocol overhead.
            # (types-kafka-python's consumer settings lack it: hence the type: ignore above)
            receive_message_max_bytes=s.fetch_max_bytes + (1 << 20),
            # A fetch that finds no data waits this long at the broker, and kafka-python sends
            # no new fetch meanwhile: keep it short so resumed partitions get data quickly.
            # While messages flow, _fetch_in_batches makes fetches wait for more.
            fetch_max_wait_ms=FETCH_IDLE_WAIT_MS,
            fetch_min_bytes=1,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(s.session_timeout_ms // 4, 500),
            max_poll_interval_ms=s.max_poll_interval_ms,
            metrics_enabled=False,  # never read; recording them costs CPU on every fetch
        )
        if s.fetch_batch_wait_ms:
            # The settings it starts with; fails here, at start, not mid-flow, should a
            # kafka-python upgrade move what set_fetch_wait changes.
            set_fetch_wait(consumer, None)
        self._wait_for_topic(consumer)
        consumer.subscribe([s.topic], listener=_Listener(self, consumer))
        self._call(self.ready.set)
        try:
            while not self._close.is_set():
                self._turn(consumer)
            self._commit_requested(consumer)
        finally:
            if self._paused:
                self._note_resumed()
            consumer.close(autocommit=False)
            log.info("feed closed")

    def _wait_for_topic(self, consumer: KafkaConsumer) -> None:
        """Join the group only once this consumer's metadata has the topic's partitions.

        A topic created moments ago may not be in the broker's metadata yet; a consumer that
        joins then is assigned nothing and must rebalance again at once (and kafka-python was
        seen to hang in such a rejoin).
        """
        deadline = time.monotonic() + TOPIC_METADATA_TIMEOUT_S
        while not self._close.is_set():
            if consumer.partitions_for_topic(self._settings.topic):
                return
            if time.monotonic() > deadline:
                log.warning("topic has no partitions in metadata yet; joining anyway",
                            topic=self._settings.topic)
                return
            time.sleep(0.2)

    def _turn(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        if now >= self._next_commit:
            self._commit_requested(consumer)
            # from the commit's end: a slow commit is not followed by another at once
            self._next_commit = time.monotonic() + self._settings.commit_interval_s
        if self._awaiting_assignment and finish_abandoned_join(consumer):
            log.warning("group join left unfinished by kafka-python; finishing it")
        limit = self._settings.max_poll_records
        if self._stop_fetching.is_set():
            with self._inbox_changed:
                self._inbox.clear()
            if not self._paused:
                self._pause(consumer, "stopping")
        elif self._paused:
            if not self._held() and not self._call(self._gate.saturated):
                with self._inbox_changed:
                    self._saturated = False  # the pump's last word is older than this one
                self._resume(consumer)
        elif self._saturated:
            self._pause(consumer, "pipeline saturated")
        elif not self._room_to_poll():
            self._hold(consumer)
        if self._paused or self._room_to_poll():
            # While paused, poll only briefly: it returns nothing, and resuming waits for it.
            timeout_ms = PAUSED_POLL_TIMEOUT_MS if self._paused else POLL_TIMEOUT_MS
            if self._fetching_batches:  # an empty poll then returns to idle fetches soon
                timeout_ms = min(timeout_ms, 2 * self._settings.fetch_batch_wait_ms)
            polled = consumer.poll(timeout_ms=timeout_ms,
                                   max_records=max(limit - self._held(), 1))
            self._polled_at = time.monotonic()
            now_s = time.time()
            messages = [FeedMessage(partition, self._epoch_of(partition), record.offset,
                                    record.value or b"", now_s)
                        for partition, records in polled.items() for record in records]
            self._fetch_in_batches(consumer, len(messages) > 1)
            if messages:
                with self._inbox_changed:
                    self._inbox.extend(messages)
                for partition, records in polled.items():
                    self._read_from.setdefault(partition, records[0].offset)
        if now >= self._next_progress:
            self._publish_progress(consumer)
            self._next_progress = now + PROGRESS_INTERVAL_S
        if not self._stop_fetching.is_set():
            assert self._token is not None
            self._token.run_sync_soon(self._pump, idempotent=True)

    def _fetch_in_batches(self, consumer: KafkaConsumer, flowing: bool) -> None:
        """While messages flow (the last poll returned more than one: they come faster than
        fetches), let the broker hold each fetch for up to ``fetch_batch_wait_ms`` to gather
        more: a fetch then carries several messages instead of one or two, and each costs
        kafka-python ~0.4 ms of CPU (at 400/s the feed thread's CPU per message was 15 times
        the saturated rate's). A trickle of one message a poll, and an idle feed, fetch with
        the first message, as before: batching them only added empty polls (at 50/s it
        tripled the feed thread's CPU)."""
        if flowing == self._fetching_batches or not self._settings.fetch_batch_wait_ms:
            return
        self._fetching_batches = flowing
        if flowing:
            # The broker counts at most a fetch's worth towards the minimum.
            set_fetch_wait(consumer, self._settings.fetch_batch_wait_ms,
                           min(FETCH_BATCH_MIN_BYTES, self._settings.fetch_max_bytes))
        else:
            set_fetch_wait(consumer, None)

    def _publish_progress(self, consumer: KafkaConsumer) -> None:
        """Publish the assigned partitions' offsets in ``progress``. Never blocks: a position
        not known yet is not fetched (timeout 0), the high watermark is the last fetch's."""
        progress = {}
        for tp in consumer.assignment():
            position = consumer.position(tp, timeout_ms=0)
            committed = self._committed.get(tp, self._read_from.get(tp, position))
            progress[tp] = PartitionProgress(position, committed, consumer.highwater(tp))
        self.progress = progress

    def _hold(self, consumer: KafkaConsumer) -> None:
        """More than half the inbox is held: wait (not polling, so fetching nothing more) until
        the trio side took enough, or the gate says the pipeline is saturated, at most
        POLL_TIMEOUT_MS. Once the thread has not polled for ``hold_before_pause_s``, pause
        instead."""
        if time.monotonic() - self._polled_at >= self._settings.hold_before_pause_s:
            self._pause(consumer, "read-ahead full")
            return
        with self._inbox_changed:
            self._inbox_changed.wait_for(self._hold_over, POLL_TIMEOUT_MS / 1000)

    def _hold_over(self) -> bool:
        """What a holding thread waits for: room to poll, or the gate saturated (to pause,
        without polling). Either thread, with the inbox lock held."""
        return self._room_to_poll() or self._saturated

    def _room_to_poll(self) -> bool:
        """At most half of ``max_poll_records`` held. Either thread; takes the inbox lock,
        which is reentrant."""
        with self._inbox_changed:
            return len(self._inbox) <= self._settings.max_poll_records // 2

    def _held(self) -> int:
        with self._inbox_changed:
            return len(self._inbox)

    def _epoch_of(self, partition: TopicPartition) -> int:
        return self._epochs.get(partition, 0)

    def _call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _pause(self, consumer: KafkaConsumer, reason: str) -> None:
        consumer.pause(*consumer.assignment())
        self._paused_since = time.monotonic()  # first: /healthz reads both from the trio thread
        self._pause_reason = reason
        self._paused = True
        self._metrics.paused.set(1)
        self._metrics.pauses.inc()
        log.info("feed paused", reason=reason, held=self._held())

    def _resume(self, consumer: KafkaConsumer) -> None:
        consumer.resume(*consumer.assignment())
        paused_for = self._note_resumed()
        self._metrics.resumes.inc()
        log.info("feed resumed", paused_s=round(paused_for, 3))

    def _note_resumed(self) -> float:
        paused_for = time.monotonic() - self._paused_since
        self._paused = False
        self._metrics.paused.set(0)
        self._metrics.paused_seconds.inc(paused_for)
        return paused_for

    def _commit_requested(self, consumer: KafkaConsumer,
                          only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the requested offsets, waiting at most COMMIT_TIMEOUT_MS so the thread keeps
        polling; offsets of partitions still owned are retried on the next commit. Each
        committed partition's wait since its oldest request counts in the ``commit_lag``
        stage."""
        with self._commit_lock:
            if only is None:
                todo, self._commits = self._commits, {}
            else:
                todo = {tp: self._commits.pop(tp) for tp in only if tp in self._commits}
        if not todo:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, (offset, _) in todo.items()}
        try:
            consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except KafkaError as exc:
            retry = {} if only is not None else {
                tp: request for tp, request in todo.items() if tp in consumer.assignment()}
            for tp, (offset, requested_at) in retry.items():
                self.request_commit(tp, offset, requested_at)
            # Offsets not retried belong to partitions this consumer lost: their new owner
            # re-reads from the last commit and the store's idempotency absorbs the repeats.
            log.warning("commit failed", error=str(exc), retrying=len(retry),
                        dropped=len(todo) - len(retry))
            return
        committed = time.monotonic()
        lag = self._metrics.stage["commit_lag"]
        for tp, (offset, requested_at) in todo.items():
            lag.observe(committed - requested_at)
            self._committed[tp] = offset

    def _on_revoked(self, consumer: KafkaConsumer, revoked: Sequence[TopicPartition]) -> None:
        """Blocks (inside poll) up to ``revoke_wait_s`` for the revoked partitions' work in
        flight, then up to ``COMMIT_TIMEOUT_MS`` for their commit."""
        self._awaiting_assignment = True  # a join began (kafka-python revokes before each)
        if not revoked:
            return
        started = time.monotonic()
        gone = set(revoked)
        with self._inbox_changed:
            kept = [m for m in self._inbox if m.partition not in gone]
            self._inbox.clear()
            self._inbox.extend(kept)
        drained = self._call(self._gate.revoking, list(revoked))
        finished = drained.wait(self._settings.revoke_wait_s)
        reached = self._call(self._gate.revoked, list(revoked))
        for tp, (offset, _) in reached.items():
            if offset is not None:
                self.request_commit(tp, offset)
        self._commit_requested(consumer, only=revoked)
        for tp in revoked:
            self._epochs.pop(tp, None)
        took = time.monotonic() - started
        self._metrics.revoke_seconds.observe(took)
        log.info("partitions revoked", partitions=[f"{tp.topic}-{tp.partition}" for tp in revoked],
                 waited_s=round(took, 3), in_flight_drained=finished,
                 still_in_flight=sum(left for _, left in reached.values()))

    def _on_assigned(self, consumer: KafkaConsumer, assigned: Sequence[TopicPartition]) -> None:
        self._awaiting_assignment = False
        self._epoch += 1
        self._metrics.rebalances.inc()
        for tp in assigned:
            self._epochs[tp] = self._epoch
        positions = self._call(self._gate.assigned, [(tp, self._epoch) for tp in assigned])
        for tp, offset in positions.items():
            consumer.seek(tp, offset)  # this member's own position: nothing is read twice
        # A partition handed back keeps what /status says of its commits; the others read from
        # the group's commit, learnt again at their first poll.
        for tp in set(self._committed) | set(self._read_from):
            if tp not in positions:
                self._committed.pop(tp, None)
                self._read_from.pop(tp, None)
        if self._paused and assigned:
            # A rebalance hands partitions over un-paused; the pause still holds.
            consumer.pause(*assigned)
        log.info("partitions assigned",
                 partitions=[f"{tp.topic}-{tp.partition}" for tp in assigned],
                 resumed={tp.partition: offset for tp, offset in positions.items()})


def finish_abandoned_join(consumer: KafkaConsumer) -> bool:
    """Have the next ``poll()`` finish a group join kafka-python began and then forgot; call
    it only between a revocation and the assignment that should follow. Returns whether the
    join had been forgotten. Never blocks.

    kafka-python 2.x (2.3.3 here) rejoins as group leader when a subscribed topic's metadata
    changed (partitions added; another member's topic created) without asking itself for a
    rejoin: the pending change is the only reason. Computing the new assignment clears it, so
    when ``poll()`` times out between the JoinGroup and the SyncGroup answers, no later
    ``poll()`` goes back to the join: the member stays in the group (heartbeats resume) with
    its partitions revoked and never assigned again. Asking for a rejoin makes the next
    ``poll()`` finish that same join (its future is kept), with no new rebalance. Uses the
    consumer's private coordinator: kafka-python is pinned below 3.
    """
    coordinator = consumer._coordinator  # type: ignore[attr-defined]  # private: not in the stubs
    if coordinator.need_rejoin():
        return False  # still joining, as it should
    coordinator.request_rejoin()
    return True


def set_fetch_wait(consumer: KafkaConsumer, wait_ms: int | None,
                   min_bytes: int = FETCH_BATCH_MIN_BYTES) -> None:
    """Have the consumer's next fetches wait at the broker for up to ``wait_ms`` to gather
    ``min_bytes``, or (None) return with the first message, waiting at most
    ``FETCH_IDLE_WAIT_MS`` for one. Never blocks; a fetch already sent keeps its own.

    kafka-python has no setter: it builds every fetch request from its fetcher's settings,
    which this changes (private; kafka-python is pinned below 3, and an integration test
    checks that the broker is asked to wait).
    """
    settings = consumer._fetcher.config  # type: ignore[attr-defined]  # private: not in the stubs
    settings["fetch_min_bytes"] = 1 if wait_ms is None else min_bytes
    settings["fetch_max_wait_ms"] = FETCH_IDLE_WAIT_MS if wait_ms is None else wait_ms


class _Listener(ConsumerRebalanceListener):
    """Runs inside ``poll()`` on the feed thread."""

    def __init__(self, feed: Feed, consumer: KafkaConsumer) -> None:
        self._feed = feed
        self._consumer = consumer

    def on_partitions_revoked(self, revoked):  # type: ignore[no-untyped-def]
        self._feed._on_revoked(self._consumer, list(revoked))

    def on_partitions_assigned(self, assigned):  # type: ignore[no-untyped-def]
        self._feed._on_assigned(self._consumer, list(assigned))
