"""The batcher against a scripted store (the store is the boundary being faked)."""

import random

import pytest
import trio
import trio.testing

from invoker.batcher import Batcher, BatcherSettings, PendingRecord, backoff_delay
from invoker.metrics import Metrics
from store import DocResult, Outcome, StoreUnavailable, doc_id_for


class ScriptedStore:
    def __init__(self, fail_first=0, refuse=(), gate=None):
        self.fail_first = fail_first
        self.refuse = set(refuse)
        self.gate = gate  # a trio.Event the write waits for, to hold writes in flight
        self.docs = {}
        self.calls = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def write_batch(self, docs):
        self.calls.append(len(docs))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_first:
                self.fail_first -= 1
                raise StoreUnavailable("connection refused")
            results = []
            for d in docs:
                i = doc_id_for(d["namespace"], d["activationId"])
                if d["activationId"] in self.refuse:
                    results.append(DocResult(i, Outcome.FAILED, "document too large"))
                elif i in self.docs:
                    results.append(DocResult(i, Outcome.ALREADY_STORED))
                else:
                    self.docs[i] = d
                    results.append(DocResult(i, Outcome.STORED))
            return results
        finally:
            self.in_flight -= 1


def rec(n):
    return PendingRecord({"namespace": "ns", "activationId": f"{n:032x}"}, token=None,
                         blocking=False)


async def drain(store, records, settings, refused=None):
    stored, refused = [], [] if refused is None else refused

    async def on_stored(batch):
        stored.extend(p.record["activationId"] for p in batch)

    async def on_refused(pending, reason):
        refused.append((pending.record["activationId"], reason))

    tx, rx = trio.open_memory_channel(len(records) + 1)
    for r in records:
        tx.send_nowait(r)
    tx.close()
    await Batcher(store, settings, on_stored, on_refused, Metrics(), random.Random(1)).run(rx)
    return stored, refused


async def test_batches_are_bounded_and_everything_is_handed_on():
    store = ScriptedStore()
    stored, _ = await drain(store, [rec(i) for i in range(250)], BatcherSettings(batch_size=100))
    assert sorted(stored) == sorted(f"{i:032x}" for i in range(250))
    assert max(store.calls) <= 100 and sum(store.calls) == 250


async def test_outage_is_retried_until_stored(autojump_clock):
    store = ScriptedStore(fail_first=5)
    stored, _ = await drain(store, [rec(i) for i in range(10)],
                            BatcherSettings(batch_size=10, backoff_initial_s=0.1))
    assert len(stored) == 10 and len(store.docs) == 10 and len(store.calls) == 6


async def test_already_stored_counts_as_done_and_refused_goes_to_owner():
    store = ScriptedStore(refuse={f"{3:032x}"})
    store.docs[doc_id_for("ns", f"{1:032x}")] = {"first": True}
    stored, refused = await drain(store, [rec(i) for i in range(5)], BatcherSettings())
    assert sorted(stored) == [f"{i:032x}" for i in (0, 1, 2, 4)]
    assert refused == [(f"{3:032x}", "document too large")]
    assert store.docs[doc_id_for("ns", f"{1:032x}")] == {"first": True}


async def test_writes_in_flight_are_bounded_and_channel_is_not_drained_meanwhile():
    gate = trio.Event()
    store = ScriptedStore(gate=gate)
    settings = BatcherSettings(batch_size=5, linger_s=0, max_writes_in_flight=2)
    tx, rx = trio.open_memory_channel(100)
    for i in range(40):
        tx.send_nowait(rec(i))
    stored = []

    async def on_stored(batch):
        stored.extend(batch)

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    async with trio.open_nursery() as n:
        n.start_soon(Batcher(store, settings, on_stored, on_refused, Metrics()).run, rx)
        await trio.testing.wait_all_tasks_blocked()
        # Two writes of 5 are stuck in the store, a third batch is not taken yet: 30 wait.
        assert store.max_in_flight == 2
        assert rx.statistics().current_buffer_used == 30
        gate.set()
        tx.close()
    assert len(stored) == 40 and store.max_in_flight == 2


@pytest.mark.parametrize("attempt", range(8))
def test_backoff_grows_is_capped_and_jittered(attempt):
    rng = random.Random(attempt)
    step = min(2.0, 0.1 * 2**attempt)
    delays = [backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(50)]
    assert all(step / 2 <= d <= step for d in delays)
    assert len(set(delays)) > 1
