"""The pool's scheduler alone: who gets which slot, what is started and evicted (no Docker)."""

from __future__ import annotations

import dataclasses

from hypothesis import example, given, settings
from hypothesis import strategies as st

from invoker.containers.scheduler import (
    GROWTH_EVICTS_IDLE_S,
    NEW,
    READY,
    REMOVING,
    RETIRING,
    SERVING,
    STEM,
    ContainerRecord,
    Scheduler,
    Waiter,
)
from invoker.model import Action, Limits


def action(name: str, memory: int = 128, concurrency: int = 1) -> Action:
    return Action(name=name, version="0.0.1", kind="python:3", image="img",
                  code="def main(a): return a", main="main", binary=False,
                  limits=Limits(timeout_ms=60_000, memory_mb=memory, logs_kb=10,
                                concurrency=concurrency))


class World:
    """A scheduler with a settable clock; evictions start a removal (phase REMOVING)."""

    def __init__(self, memory_mb: int) -> None:
        self.t = 0.0
        self.evicted: list[ContainerRecord] = []
        self.s = Scheduler(memory_mb, self._evict, now=lambda: self.t)

    def _evict(self, c: ContainerRecord) -> None:
        c.phase = REMOVING
        self.evicted.append(c)

    def wait(self, a: Action, namespace: str = "ns") -> Waiter:
        w = Waiter(a, a.pool_key(namespace))
        self.s.arrive(w)
        return w

    def ready(self, c: ContainerRecord, hold_s: float | None = None) -> ContainerRecord:
        c.phase = READY
        c.hold_s = hold_s
        return c

    def done(self, c: ContainerRecord) -> None:
        """The lease on c ends (the last one on a retiring container starts its removal)."""
        c.active -= 1
        if c.active == 0 and c.phase == RETIRING:
            c.phase = REMOVING
            self.evicted.append(c)
        self.s.release(c)

    def removed(self, c: ContainerRecord) -> None:
        self.s.forget(c)
        self.s.assign()


def test_one_cold_start_per_action_while_it_starts() -> None:
    w = World(1024)
    a = action("a")
    first = w.wait(a)
    assert first.container is not None and first.container.phase == NEW
    w.t = 0.11
    # The first container is expected ready in 0.39 s; each run then takes DEFAULT_HOLD_S:
    # four more waiters are served by it sooner than a cold start (0.5 s) would serve them.
    others = [w.wait(a) for _ in range(4)]
    assert all(o.container is None for o in others)
    assert len(w.s.records) == 1
    deeper = w.wait(a)  # would wait 0.39 + 5 * 0.025 > 0.5 s: gets a container of its own
    assert deeper.container is not None and len(w.s.records) == 2
    w.ready(first.container)
    w.done(first.container)  # the slot goes to the next waiter of a, in order
    assert others[0].container is first.container
    assert [o.container for o in others[1:]] == [None] * 3


def test_a_busy_ready_container_is_joined_by_a_new_one_while_memory_is_free() -> None:
    w = World(1024)
    a = action("a")
    first = w.wait(a)
    w.ready(first.container, hold_s=0.001)
    second = w.wait(a)
    assert second.container is not None and second.container is not first.container
    assert len(w.s.records) == 2


def test_evictions_for_several_actions_run_at_once() -> None:
    w = World(3 * 128)
    olds = [w.wait(action(f"old{i}")) for i in range(3)]
    for o in olds:
        w.ready(o.container)
        w.done(o.container)
    w.t = 1.0
    news = [w.wait(action(f"new{i}")) for i in range(3)]
    # all three removals started together, not one after another
    assert sorted(c.name for c in w.evicted) == sorted(o.container.name for o in olds)
    assert all(n.container is None for n in news)
    for o in olds:
        w.removed(o.container)
    assert all(n.container is not None and n.container.phase == NEW for n in news)
    assert w.s.used_memory_mb == 3 * 128


def test_least_recently_used_idle_container_is_evicted_first() -> None:
    w = World(2 * 128)
    a, b = w.wait(action("a")), w.wait(action("b"))
    for t, lease in ((1.0, a), (2.0, b)):
        w.t = t
        w.ready(lease.container)
        w.done(lease.container)
    w.t = 3.0
    w.wait(action("c"))
    assert w.evicted == [a.container]


def test_memory_waiter_is_not_starved_by_a_busy_action() -> None:
    w = World(2 * 128)
    a = action("a")
    a1, a2 = w.wait(a), w.wait(a)
    for lease in (a1, a2):
        w.ready(lease.container, hold_s=5.0)  # slow: waiting for a is not worth it
    b = w.wait(action("b"))  # needs memory: nothing idle to evict
    assert b.container is None and b.wants_memory
    a3 = w.wait(a)  # arrives after b
    w.done(a1.container)  # not handed to a3 (behind b): evicted for b
    assert w.evicted == [a1.container] and a3.container is None
    w.removed(a1.container)
    assert b.container is not None
    w.done(a2.container)
    assert a3.container is a2.container


def test_short_of_memory_an_action_waits_for_its_own_quick_container() -> None:
    w = World(2 * 128)
    a = action("a")
    first = w.wait(a)
    w.ready(first.container, hold_s=0.002)
    idle = w.wait(action("idle"))
    w.ready(idle.container)
    w.done(idle.container)
    second = w.wait(a)  # a's container frees up in ~2 ms: no eviction for a second one
    assert second.container is None and not w.evicted
    w.done(first.container)
    assert second.container is first.container


def test_stem_cell_before_waiting() -> None:
    w = World(1024)
    stem = w.s.new_record(image="img", kind="python:3", memory_mb=256, label="prewarm",
                          pool_key=None, phase=STEM)
    a = action("a")
    first = w.wait(a)
    assert first.container is stem and stem.pool_key == a.pool_key("ns")
    assert stem.concurrency == 1


def test_concurrent_container_packs_before_another_starts() -> None:
    w = World(1024)
    a = action("a", concurrency=3)
    leases = [w.wait(a) for _ in range(3)]
    assert len({id(lease.container) for lease in leases}) == 1
    assert leases[0].container.active == 3
    assert len(w.s.records) == 1


def test_cold_start_estimate_moves_towards_measurements() -> None:
    w = World(1024)
    before = w.s.cold_start_s
    for _ in range(20):
        w.s.cold_started(2.0)
    assert before < w.s.cold_start_s <= 2.0
    assert w.s.cold_start_s > 1.9


def test_a_growing_action_does_not_evict_others_warm_containers() -> None:
    w = World(2 * 128)
    a, b = action("a"), action("b")
    a1 = w.wait(a)
    w.ready(a1.container, hold_s=5.0)  # busy, and slow: waiting is not worth it
    b1 = w.wait(b)
    w.ready(b1.container)
    w.done(b1.container)  # b's container idle, used a moment ago
    w.t = 1.0
    a2 = w.wait(a)
    assert a2.container is None and not w.evicted and not a2.wants_memory
    b2 = w.wait(b)  # b still has its warm container
    assert b2.container is b1.container
    w.done(b1.container)
    w.t = 1.0 + GROWTH_EVICTS_IDLE_S
    w.s.assign()  # b's container unused for that long: a may grow into it
    assert w.evicted == [b1.container]
    w.removed(b1.container)
    assert a2.container is not None and a2.container.phase == NEW


def _queued(w: World, *actions: Action) -> list[Waiter]:
    """Waiters already queued when one pass looks at them (as after memory was short)."""
    waiters = [Waiter(a, a.pool_key("ns")) for a in actions]
    w.s.waiters.extend(waiters)
    w.s.assign()
    return waiters


def test_a_blackbox_waiter_does_not_hide_a_stem_cell_from_a_runtime_one() -> None:
    w = World(512)
    stem = w.s.new_record(image="img", kind="python:3", memory_mb=128, label="prewarm",
                          pool_key=None, phase=STEM)
    # A blackbox action naming the runtime's kind and image looks like it, but takes no stem.
    blackbox = dataclasses.replace(action("bb"), code=None, blackbox=True)
    boxed, plain = _queued(w, blackbox, action("a"))
    assert plain.container is stem
    assert boxed.container is not None and boxed.container.phase == NEW
    assert w.s.used_memory_mb == 256  # the stem cell and the blackbox one's new container


def test_one_pass_packs_a_stem_cell_given_to_a_concurrent_action() -> None:
    w = World(1024)
    stem = w.s.new_record(image="img", kind="python:3", memory_mb=256, label="prewarm",
                          pool_key=None, phase=STEM)
    a = action("a", concurrency=3)
    waiters = _queued(w, a, a, a, a)
    # The first takes the stem cell; the next two find its free slots in the same pass (the
    # key had none before); the fourth gets a new container.
    assert [x.container for x in waiters[:3]] == [stem] * 3
    assert waiters[3].container is not None and waiters[3].container is not stem
    assert stem.active == 3 and len(w.s.records) == 2


class _EveryArrivalPasses(Scheduler):
    """The scheduler without its arrival shortcut: a pass over the queue on every arrival."""

    def _nothing_to_give(self, waiter: Waiter) -> bool:
        return False


_MIX = (action("a"), action("b"), action("c", memory=256), action("d", concurrency=2))
_STEPS = st.lists(st.tuples(st.sampled_from(("wait", "ready", "done", "retire", "removed",
                                             "tick")),
                            st.integers(0, 7)), max_size=60)


@settings(max_examples=2000, deadline=None)
@given(memory=st.sampled_from((256, 512, 640)), steps=_STEPS)
# A second b waits for b's starting container; both containers turn ready (no pass); an
# arrival of c then finds 128 MB free, which that b can take.
@example(memory=512, steps=[("wait", 2), ("wait", 1), ("tick", 1), ("wait", 1), ("ready", 0),
                            ("ready", 0), ("wait", 2)])
def test_an_arrival_without_a_pass_ends_as_a_pass_would(memory: int, steps) -> None:
    worlds = [World(memory), World(memory)]
    worlds[1].s = _EveryArrivalPasses(memory, worlds[1]._evict, now=lambda: worlds[1].t)
    waiters: list[list[Waiter]] = [[], []]
    for op, n in steps:
        for world, queue in zip(worlds, waiters, strict=True):
            records = world.s.records
            if op == "wait":
                queue.append(world.wait(_MIX[n % len(_MIX)]))
            elif op == "ready" and (starting := [c for c in records if c.phase == NEW]):
                # Without a pass (the pool makes one; the shortcut must not depend on it).
                world.ready(starting[n % len(starting)], hold_s=(None, 0.01, 2.0)[n % 3])
            elif op == "done" and (busy := [c for c in records if c.active]):
                world.done(busy[n % len(busy)])
            elif op == "retire" and (busy := [c for c in records
                                             if c.active and c.phase in SERVING]):
                busy[n % len(busy)].phase = RETIRING  # as the pool's _destroy: no pass
            elif op == "removed" and (going := [c for c in records if c.phase == REMOVING]):
                world.removed(going[n % len(going)])
            elif op == "tick":
                world.t += n / 4
        shortcut, passing = (
            ([(x.container and x.container.seq, x.wants_memory) for x in queue],
             [(c.seq, c.phase, c.active, c.pool_key) for c in world.s.records],
             [c.seq for c in world.evicted])
            for world, queue in zip(worlds, waiters, strict=True))
        assert shortcut == passing
