"""Which container slot serves which activation: the pool's decisions, without Docker or I/O.

The :class:`Scheduler` keeps the pool's container records and the activations waiting for a
slot (``Waiter``). It never blocks and never calls Docker: it changes records (a stem cell given
to an action, memory reserved for a new container) and tells the pool what to do (wake a waiter,
evict a container). ``invoker.containers.pool`` does the Docker side.

Accounting: used memory is the sum of the memory limits of every record held: busy, idle, stem
cells, containers being started or removed, and memory reserved for a container not created
yet. It never exceeds ``user_memory_mb``.

How a waiter is served, in arrival order:

1. a free slot in a container of its key (its namespace, action, version, code and limits);
2. a prewarmed stem cell of its kind and image with enough memory (smallest first);
3. waiting, when a container of its key is being started, or (memory being short) its key's
   busy containers are expected to free a slot sooner than a cold start takes: the expected
   wait is the waiters of that key ahead of it divided among its containers, times the average
   time a lease holds one (measured per container), plus what a starting one still needs
   (from the measured cold start time). This avoids a burst of cold starts for one action
   whose first container is almost ready, and evicting others' containers for an action that
   is about to have a free slot anyway;
4. memory for a new container, if free;
5. evicting idle containers, least recently used first (action containers before stem cells),
   when that makes enough room. Several waiters evict at once, so cold starts run
   concurrently; memory being freed is promised to the earliest waiters first. An action
   that already has containers (all busy) evicts only containers idle for
   ``GROWTH_EVICTS_IDLE_S``; otherwise it waits for its own: under a mixed load that fills
   memory, actions then keep their warm containers instead of evicting each other's.

A waiter whose action has no container and that needs memory nobody can free yet blocks later
waiters from taking *memory* (so a busy tenant cannot starve another's cold start), but not
from taking free slots in their own containers. A slot given back goes to the earliest waiter
of its key that arrived before any waiter blocked on memory; otherwise the container turns
idle, and may be evicted for them.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from invoker.model import Action, InvocationResult, PoolKey

if TYPE_CHECKING:
    from invoker.containers.logs import ContainerLog

logger = structlog.get_logger(__name__)

# Container phases
NEW = "new"  # memory reserved for a container the first invoke will create
STARTING = "starting"  # stem cell being created
STEM = "stem"  # started stem cell, not given to any action
ASSIGNED = "assigned"  # stem cell given to an action, not initialized yet
INITIALIZING = "initializing"
READY = "ready"
RETIRING = "retiring"  # never leased again; removed once no activation uses it
REMOVING = "removing"
REMOVED = "removed"
DESTROYED = (RETIRING, REMOVING, REMOVED)
SERVING = (NEW, ASSIGNED, INITIALIZING, READY)  # leased to activations of its key
_BEING_STARTED = (NEW, ASSIGNED, INITIALIZING)

# Until measured: how long a lease holds a container, and a cold start (create, start, /init).
DEFAULT_HOLD_S = 0.025
DEFAULT_COLD_START_S = 0.5
_SMOOTHING = 0.2  # weight of the newest sample in the moving averages
# An action that has containers (all busy) grows only into free memory, or by evicting
# containers nobody used for this long: evicting other actions' warm containers for it would
# only make them start new ones in turn (the churn of a mixed load).
GROWTH_EVICTS_IDLE_S = 10.0


@dataclass(eq=False)
class ContainerRecord:
    """One container the pool holds (or memory reserved for one)."""

    seq: int
    name: str
    image: str
    kind: str
    memory_mb: int
    pool_key: PoolKey | None  # None: an unassigned stem cell
    labels: dict[str, str]  # besides the ones every container has
    concurrency: int = 1
    phase: str = NEW
    docker_id: str | None = None
    base_url: str | None = None
    conn: Any = None  # RuntimeConnection once started
    log: ContainerLog | None = None  # when its json-file log can be read directly
    active: int = 0
    last_used: float = 0.0
    serving_since: float = 0.0  # when it was reserved or assigned to its key (trio clock)
    hold_s: float | None = None  # moving average of how long a lease holds it
    init_done: trio.Event = field(default_factory=trio.Event)
    init_failure: InvocationResult | None = None
    action_label: str = ""
    destroy_reason: str = ""

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.phase in (READY, ASSIGNED, STEM)

    def held(self, seconds: float) -> None:
        """A lease on it lasted ``seconds``."""
        self.hold_s = seconds if self.hold_s is None else (
            self.hold_s + _SMOOTHING * (seconds - self.hold_s))


@dataclass(eq=False)
class Waiter:
    action: Action
    key: PoolKey
    event: trio.Event = field(default_factory=trio.Event)
    container: ContainerRecord | None = None
    wants_memory: bool = False  # decided it needs a new container and has none yet


class Scheduler:
    """The records and the queue; every method is synchronous and cheap.

    ``evict`` is called with a container to remove (it is idle); ``now`` is the clock.
    ``name_for(seq, label)`` and ``labels_for(pool_key)`` name and label new records.
    """

    def __init__(self, user_memory_mb: int, evict: Callable[[ContainerRecord], None], *,
                 name_for: Callable[[int, str], str] = lambda seq, label: f"c-{seq}-{label}",
                 labels_for: Callable[[PoolKey | None], dict[str, str]] = lambda key: {},
                 now: Callable[[], float] = trio.current_time) -> None:
        self.user_memory_mb = user_memory_mb
        # How the pool names (by sequence number and label) and labels containers.
        self.name_for = name_for
        self.labels_for = labels_for
        self.records: list[ContainerRecord] = []
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.cold_start_s = DEFAULT_COLD_START_S  # moving average, see cold_started
        self._evict = evict
        self._now = now
        self._seq = itertools.count(1)
        self._assigning = False

    # ------------------------------------------------------------------ accounting
    @property
    def used_memory_mb(self) -> int:
        return sum(c.memory_mb for c in self.records)

    @property
    def free_memory_mb(self) -> int:
        return self.user_memory_mb - self.used_memory_mb

    def new_record(self, *, image: str, kind: str, memory_mb: int, label: str,
                   pool_key: PoolKey | None, phase: str) -> ContainerRecord:
        """A record holding ``memory_mb`` (the caller checked it is free)."""
        seq = next(self._seq)
        now = self._now()
        c = ContainerRecord(seq=seq, name=self.name_for(seq, label), image=image,
                            kind=kind, memory_mb=memory_mb, pool_key=pool_key,
                            labels=self.labels_for(pool_key), phase=phase,
                            last_used=now, serving_since=now, action_label=label,
                            concurrency=pool_key.concurrency if pool_key else 1)
        self.records.append(c)
        return c

    def forget(self, c: ContainerRecord) -> None:
        """``c`` is gone: its memory is free."""
        if c in self.records:
            self.records.remove(c)
        c.phase = REMOVED

    def cold_started(self, seconds: float) -> None:
        """A container was created, started and initialized in ``seconds``."""
        self.cold_start_s += _SMOOTHING * (seconds - self.cold_start_s)

    def _of_key(self, key: PoolKey) -> Iterator[ContainerRecord]:
        return (c for c in self.records if c.pool_key == key and c.phase in SERVING)

    # ---------------------------------------------------------------------- grants
    def arrive(self, waiter: Waiter) -> bool:
        """Queue ``waiter``; True if it was served at once (a free slot of its key)."""
        c = self._free_slot(waiter.key)
        if c is not None:
            self._grant(waiter, c)
            return True
        self.waiters.append(waiter)
        if not self._nothing_to_give(waiter):
            self.assign()
        return waiter.container is not None

    def _nothing_to_give(self, waiter: Waiter) -> bool:
        """Whether a pass would leave every waiter as it is, ``waiter`` (queued last) waiting
        for its key's containers: each container is ready with every slot busy (no slot, stem
        cell or idle container to give, nothing starting, retiring or being removed), the free
        memory is less than any waiter needs, and ``waiter``'s key has containers. Decided
        from the state alone, not from what earlier passes saw. Saturated, a pass over the
        queue on each arrival was half of the time spent leasing."""
        used = 0
        has_own = False
        for c in self.records:
            if c.phase != READY or c.active < c.concurrency:
                return False
            used += c.memory_mb
            has_own = has_own or c.pool_key == waiter.key
        free = self.user_memory_mb - used
        return has_own and all(w.action.limits.memory_mb > free for w in self.waiters)

    def leave(self, waiter: Waiter) -> None:
        """A waiter gave up (cancelled) before it was served."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            self.assign()

    def release(self, c: ContainerRecord) -> None:
        """A lease on ``c`` ended (the caller already took it off ``c.active``). Its slot goes
        to the earliest waiter of its key ahead of any waiter blocked on memory; if there is
        none, the queue is looked at again (``c`` may now be evicted for someone)."""
        now = self._now()
        c.last_used = now
        if c.phase in SERVING and c.active < c.concurrency:
            for waiter in self.waiters:
                if waiter.key == c.pool_key:
                    self.waiters.remove(waiter)
                    self._grant(waiter, c)
                    return
                if waiter.wants_memory:
                    break
        if self.waiters:
            self.assign()

    def _grant(self, waiter: Waiter, c: ContainerRecord) -> None:
        c.active += 1
        waiter.container = c
        waiter.wants_memory = False
        waiter.event.set()

    def _free_slot(self, key: PoolKey) -> ContainerRecord | None:
        """A container of ``key`` with a free slot: the fullest, then ready, then the most
        recently used (packs concurrent containers, keeps the others idle to be reaped)."""
        best = None
        for c in self._of_key(key):
            if c.active < c.concurrency and (best is None or (
                    (c.active, c.phase == READY, c.last_used)
                    > (best.active, best.phase == READY, best.last_used))):
                best = c
        return best

    def assign(self) -> None:
        """Serve what can be served now, in arrival order (see the module docstring)."""
        if self._assigning:  # called again from an eviction: the running pass goes on
            return
        self._assigning = True
        try:
            self._assign()
        finally:
            self._assigning = False

    def _assign(self) -> None:
        now = self._now()
        free = self.free_memory_mb
        # Memory of containers being removed, not yet promised to an earlier waiter.
        coming = sum(c.memory_mb for c in self.records if c.phase == REMOVING)
        memory_blocked = False
        ahead_of_key: collections.Counter[PoolKey] = collections.Counter()
        # What this pass learnt per key and per stem cell shape. A pass is run on every arrival
        # and its waiters are mostly of a few keys: without it, a queue of 30 waiters made the
        # scheduler a quarter of the trio thread's time (each waiter scanned every record).
        no_free_slot: set[PoolKey] = set()  # slots are only taken in a pass (until changed)
        # Stem cells are only taken in a pass; blackbox actions never take one (their kind and
        # image may still look like a runtime's), so they never mark a shape as having none.
        no_stem: set[tuple[str, str, int]] = set()
        outlooks: dict[PoolKey, _Outlook] = {}
        for waiter in list(self.waiters):
            key = waiter.key
            c = None if key in no_free_slot else self._free_slot(key)
            if c is None:
                no_free_slot.add(key)
                action = waiter.action
                shape = (action.kind, action.image, action.limits.memory_mb)
                if not action.blackbox and shape not in no_stem:
                    c = self._stem_for(action)
                    if c is None:
                        no_stem.add(shape)
            if c is not None:
                if c.phase == STEM:
                    self._assign_stem(c, waiter)
                    no_free_slot.discard(key)  # key has one more container: slots may be free
                    outlooks.pop(key, None)
                self.waiters.remove(waiter)
                self._grant(waiter, c)
                continue
            ahead = ahead_of_key[key]
            ahead_of_key[key] += 1
            need = waiter.action.limits.memory_mb
            outlook = outlooks.get(key)
            if outlook is None:
                outlook = outlooks[key] = self._outlook(key, now)
            if outlook.worth_waiting(ahead, self.cold_start_s, short_of_memory=need > free):
                waiter.wants_memory = False
                continue
            # Growing: its action has containers, all busy (or it would have waited).
            grow = outlook.slots > 0
            if memory_blocked:
                waiter.wants_memory = not grow
                continue
            if free >= need:
                self.waiters.remove(waiter)
                self._grant(waiter, self._reserve(waiter))
                no_free_slot.discard(key)
                outlooks.pop(key, None)
                free -= need
                continue
            missing = need - max(free, 0)
            if coming >= missing:  # removals under way free enough
                coming -= missing
                free = 0  # what is free now is this waiter's, with what comes
                waiter.wants_memory = True
                continue
            victims = self._victims(missing - coming,
                                    idle_before=now - GROWTH_EVICTS_IDLE_S if grow else None)
            if victims is None:
                if grow:  # waits for its own containers, taking nothing from others
                    waiter.wants_memory = False
                    continue
                memory_blocked = True
                waiter.wants_memory = True
                continue
            for victim in victims:
                logger.debug("evicting idle container", container=victim.name,
                             for_action=waiter.action.name)
                if victim.pool_key is not None:
                    outlooks.pop(victim.pool_key, None)
                self._evict(victim)
            coming = sum(v.memory_mb for v in victims) - (missing - coming)
            free = 0
            waiter.wants_memory = True

    def _outlook(self, key: PoolKey, now: float) -> _Outlook:
        """What the containers of ``key`` offer its waiters (see :meth:`_Outlook.worth_waiting`)."""
        slots = 0
        starting_left: float | None = None
        holds = []
        for c in self._of_key(key):
            slots += c.concurrency
            if c.hold_s is not None:
                holds.append(c.hold_s)
            if c.phase in _BEING_STARTED:
                left = max(self.cold_start_s - (now - c.serving_since), 0.0)
                starting_left = left if starting_left is None else min(starting_left, left)
        hold = sum(holds) / len(holds) if holds else DEFAULT_HOLD_S
        return _Outlook(slots, hold, starting_left)

    def _stem_for(self, action: Action) -> ContainerRecord | None:
        if action.blackbox:
            return None
        need = action.limits.memory_mb
        best = None
        for c in self.records:
            if (c.phase == STEM and c.kind == action.kind and c.image == action.image
                    and c.memory_mb >= need
                    and (best is None or (c.memory_mb, c.seq) < (best.memory_mb, best.seq))):
                best = c
        return best

    def _assign_stem(self, c: ContainerRecord, waiter: Waiter) -> None:
        c.phase = ASSIGNED
        c.pool_key = waiter.key
        c.concurrency = waiter.key.concurrency
        c.action_label = waiter.action.name
        c.serving_since = self._now()
        logger.debug("stem cell assigned", container=c.name, action=waiter.action.name)

    def _reserve(self, waiter: Waiter) -> ContainerRecord:
        action = waiter.action
        kind = "blackbox" if action.blackbox else action.kind
        return self.new_record(image=action.image, kind=kind, memory_mb=action.limits.memory_mb,
                               label=action.name, pool_key=waiter.key, phase=NEW)

    def _victims(self, missing_mb: int, idle_before: float | None = None
                  ) -> list[ContainerRecord] | None:
        """Idle containers whose memory covers ``missing_mb``, least recently used first
        (action containers before stem cells), only those last used before ``idle_before``
        if given; None if they are not enough."""
        candidates = sorted((c for c in self.records if c.idle and (
                                idle_before is None or c.last_used <= idle_before)),
                            key=lambda c: (c.phase == STEM, c.last_used))
        victims = []
        for c in candidates:
            if missing_mb <= 0:
                break
            victims.append(c)
            missing_mb -= c.memory_mb
        return victims if missing_mb <= 0 else None


@dataclass(frozen=True, slots=True)
class _Outlook:
    """The containers of one key: their slots, the average time a lease holds one, and how
    long the soonest one being started still needs (None: none is being started)."""

    slots: int
    hold_s: float
    starting_left_s: float | None

    def worth_waiting(self, ahead: int, cold_start_s: float, *, short_of_memory: bool) -> bool:
        """Whether these containers are expected to serve a waiter with ``ahead`` waiters of
        its key before it sooner than a new container could (see the module docstring).
        Without a shortage of memory, only a container being started is waited for: a busy
        ready one is joined by a new one."""
        if self.slots == 0 or (self.starting_left_s is None and not short_of_memory):
            return False
        expected = (self.starting_left_s or 0.0) + (ahead // self.slots + 1) * self.hold_s
        return expected <= cold_start_s
