"""The batcher against a scripted store (the store is the boundary being faked)."""

import random

import pytest
import trio
import trio.testing

from invoker.batcher import (
    Batcher,
    BatcherSettings,
    PendingRecord,
    backoff_delay,
)
from invoker.config import READ_BACK_CHUNK
from invoker.metrics import Metrics
from store import DocResult, EncodedRecord, Outcome, StoreUnavailable, doc_id_for


class ScriptedStore:
    def __init__(self, fail_first=0, refuse=(), gate=None, retry=None, fail_reads=0):
        self.fail_first = fail_first
        self.refuse = set(refuse)
        self.gate = gate  # a trio.Event the write waits for, to hold writes in flight
        self.retry = dict(retry or {})  # activation id -> how many writes answer RETRY for it
        self.fail_reads = fail_reads  # how many get_many calls fail first
        self.docs = {}
        self.calls = []
        self.reads = []  # the ids of each get_many call
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
                elif self.retry.get(d["activationId"], 0) > 0:
                    self.retry[d["activationId"]] -= 1
                    results.append(DocResult(i, Outcome.RETRY, "unknown_error: try again"))
                elif i in self.docs:
                    results.append(DocResult(i, Outcome.ALREADY_STORED))
                else:
                    self.docs[i] = d
                    results.append(DocResult(i, Outcome.STORED))
            return results
        finally:
            self.in_flight -= 1

    async def get_many(self, doc_ids):
        self.reads.append(list(doc_ids))
        if self.fail_reads:
            self.fail_reads -= 1
            raise StoreUnavailable("connection refused")
        return {i: self.docs[i] for i in doc_ids if i in self.docs}


def record(n, result=None, status="success"):
    return {"namespace": "ns", "activationId": f"{n:032x}",
            "response": {"status": status, "statusCode": 0 if status == "success" else 2,
                         "result": {"n": n} if result is None else result}}


def rec(n, **kw):
    return PendingRecord(record(n, **kw), token=None, blocking=True)


def key(n):
    return doc_id_for("ns", f"{n:032x}")


async def drain(store, records, settings, refused=None, handed=None, metrics=None):
    """Run a batcher over ``records``; the activation ids handed to on_stored, and the refused
    ones with their reasons. ``handed`` (a list) gets every PendingRecord handed on."""
    stored, refused = [], [] if refused is None else refused
    handed = [] if handed is None else handed

    async def on_stored(batch):
        stored.extend(p.record["activationId"] for p in batch)
        handed.extend(batch)

    async def on_refused(pending, reason):
        refused.append((pending.record["activationId"], reason))

    tx, rx = trio.open_memory_channel(len(records) + 1)
    for r in records:
        tx.send_nowait(r)
    tx.close()
    await Batcher(store, settings, on_stored, on_refused, metrics or Metrics(),
                  random.Random(1)).run(rx)
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
    first = record(1, result={"first": True})
    store.docs[key(1)] = first
    stored, refused = await drain(store, [rec(i) for i in range(5)], BatcherSettings())
    assert sorted(stored) == [f"{i:032x}" for i in (0, 1, 2, 4)]
    assert refused == [(f"{3:032x}", "document too large")]
    assert store.docs[key(1)] is first


async def test_a_re_execution_hands_on_the_stored_record_read_once_per_batch():
    # Records 1 and 3 ran before (with another outcome); this run's results must not be what
    # the completions tell.
    store = ScriptedStore()
    store.docs[key(1)] = record(1, result={"error": "first run"}, status="action developer error")
    store.docs[key(3)] = record(3, result={"first": 3})
    handed = []
    metrics = Metrics()
    stored, _ = await drain(store, [rec(i) for i in range(5)], BatcherSettings(batch_size=5),
                            handed=handed, metrics=metrics)
    assert sorted(stored) == [f"{i:032x}" for i in range(5)]
    by_id = {p.record["activationId"]: p for p in handed}
    assert by_id[f"{1:032x}"].record == store.docs[key(1)]
    assert by_id[f"{1:032x}"].record["response"]["status"] == "action developer error"
    assert by_id[f"{3:032x}"].record["response"]["result"] == {"first": 3}
    assert by_id[f"{0:032x}"].record == record(0)
    assert all(p.blocking for p in handed)  # the rest of the pending record is kept
    assert store.reads == [[key(1), key(3)]]  # one read for the batch, only those two
    count = metrics.registry.get_sample_value
    assert count("invoker_records_already_stored_total") == 2
    assert count("invoker_records_stored_total") == 3


async def test_a_failed_read_of_stored_records_is_retried_and_never_hands_on_the_re_run(
        autojump_clock):
    store = ScriptedStore(fail_reads=3)
    store.docs[key(1)] = record(1, result={"first": True})
    handed = []
    stored, _ = await drain(store, [rec(i) for i in range(3)],
                            BatcherSettings(batch_size=3, backoff_initial_s=0.1), handed=handed)
    assert sorted(stored) == [f"{i:032x}" for i in range(3)]
    assert [p.record["response"]["result"] for p in handed
            if p.record["activationId"] == f"{1:032x}"] == [{"first": True}]
    assert len(store.calls) == 1  # written once; only the read was repeated
    assert len(store.reads) == 4


async def test_already_stored_but_gone_when_read_is_written_again():
    store = ScriptedStore()
    store.docs[key(2)] = record(2, result={"first": True})
    original_get_many = store.get_many

    async def get_many_after_a_deletion(doc_ids):
        store.docs.pop(key(2), None)  # deleted between the write and the read
        return await original_get_many(doc_ids)

    store.get_many = get_many_after_a_deletion
    handed = []
    stored, _ = await drain(store, [rec(2)], BatcherSettings(backoff_initial_s=0.001),
                            handed=handed)
    assert stored == [f"{2:032x}"] and handed[0].record == record(2)
    assert store.docs[key(2)] == record(2) and len(store.calls) == 2


async def test_a_stored_doc_that_is_no_record_of_this_activation_keeps_the_re_run():
    store = ScriptedStore()
    store.docs[key(4)] = {"namespace": "ns", "activationId": f"{4:032x}", "note": "no response"}
    handed = []
    await drain(store, [rec(4)], BatcherSettings(), handed=handed)
    assert [p.record for p in handed] == [record(4)]


async def test_a_record_the_store_did_not_take_this_time_is_retried_alone(autojump_clock):
    store = ScriptedStore(retry={f"{2:032x}": 3})
    settings = BatcherSettings(batch_size=5, backoff_initial_s=0.1)
    stored, refused = await drain(store, [rec(i) for i in range(5)], settings)
    assert sorted(stored) == [f"{i:032x}" for i in range(5)] and refused == []
    assert store.calls == [5, 1, 1, 1]  # the other four were written by the first call
    assert set(store.docs) == {key(i) for i in range(5)}


async def test_a_record_the_store_never_takes_is_refused_after_the_retry_limit(autojump_clock):
    store = ScriptedStore(retry={f"{2:032x}": 10**9})
    settings = BatcherSettings(batch_size=5, backoff_initial_s=1, backoff_max_s=4,
                               doc_retry_limit_s=60)
    started = trio.current_time()
    stored, refused = await drain(store, [rec(i) for i in range(5)], settings)
    assert sorted(stored) == [f"{i:032x}" for i in (0, 1, 3, 4)]
    ((aid, reason),) = refused
    assert aid == f"{2:032x}" and reason.startswith("not taken for 6")
    assert reason.endswith("unknown_error: try again")
    assert 60 < trio.current_time() - started < 70
    assert key(2) not in store.docs


async def test_a_record_retried_alone_keeps_its_write_slot(autojump_clock):
    # One write slot: while a record of the first batch is retried, no other batch is taken
    # from the channel (the in-memory bound max_writes_in_flight x batch_size holds).
    store = ScriptedStore(retry={f"{0:032x}": 10**9})
    settings = BatcherSettings(batch_size=2, linger_s=0, max_writes_in_flight=1,
                               backoff_initial_s=0.1, backoff_max_s=0.1)
    tx, rx = trio.open_memory_channel(10)
    for i in range(6):
        tx.send_nowait(rec(i))
    stored = []

    async def on_stored(batch):
        stored.extend(p.record["activationId"] for p in batch)

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    async with trio.open_nursery() as n:
        n.start_soon(Batcher(store, settings, on_stored, on_refused, Metrics()).run, rx)
        await trio.sleep(1)  # about fifteen retries
        assert len(store.calls) > 5
        assert stored == [f"{1:032x}"] and rx.statistics().current_buffer_used == 4
        store.retry.clear()
        tx.close()
    assert sorted(stored) == [f"{i:032x}" for i in range(6)]


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


async def test_a_batch_the_store_has_not_taken_is_reported_stuck_until_it_is(autojump_clock):
    store = ScriptedStore(fail_first=10**9)
    settings = BatcherSettings(batch_size=3, backoff_initial_s=0.1, backoff_max_s=0.1)
    tx, rx = trio.open_memory_channel(10)
    for i in range(3):
        tx.send_nowait(rec(i))

    async def on_stored(batch):
        assert batcher.stuck.oldest() is None  # the store part is over before handing on

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    batcher = Batcher(store, settings, on_stored, on_refused, Metrics())
    assert batcher.stuck.oldest() is None
    async with trio.open_nursery() as n:
        n.start_soon(batcher.run, rx)
        await trio.sleep(1)
        assert len(store.calls) > 3
        stuck = batcher.stuck.oldest()
        assert stuck is not None and stuck.what == "store write of 3 records"
        assert stuck.error == "connection refused"
        store.fail_first = 0
        tx.close()
    assert batcher.stuck.oldest() is None and len(store.docs) == 3


async def test_a_record_finding_the_batcher_idle_is_written_at_once(autojump_clock):
    store = ScriptedStore()
    settings = BatcherSettings(batch_size=100, linger_s=10, max_writes_in_flight=2)
    tx, rx = trio.open_memory_channel(10)
    written_at = []

    async def on_stored(batch):
        written_at.append(trio.current_time())

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    async with trio.open_nursery() as n:
        n.start_soon(Batcher(store, settings, on_stored, on_refused, Metrics()).run, rx)
        for i in range(3):
            sent = trio.current_time()
            await tx.send(rec(i))
            await trio.testing.wait_all_tasks_blocked()
            assert written_at[-1] == sent  # no linger: nothing was in flight
            await trio.sleep(1)
        tx.close()
    assert store.calls == [1, 1, 1]


async def test_while_a_write_is_in_flight_the_next_batch_lingers_until_it_ends(autojump_clock):
    gate = trio.Event()
    store = ScriptedStore(gate=gate)
    settings = BatcherSettings(batch_size=100, linger_s=10, max_writes_in_flight=2)
    tx, rx = trio.open_memory_channel(100)
    stored = []

    async def on_stored(batch):
        stored.append(len(batch))

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    async with trio.open_nursery() as n:
        n.start_soon(Batcher(store, settings, on_stored, on_refused, Metrics()).run, rx)
        await tx.send(rec(0))
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls == [1]  # written at once, and held in the store
        for i in range(1, 6):
            await tx.send(rec(i))
            await trio.sleep(0.5)
        # The second batch collects while the first is in flight (not yet written).
        assert store.calls == [1] and rx.statistics().current_buffer_used == 0
        released = trio.current_time()
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        # The first write ended: the lingering batch is written then, not after linger_s.
        assert store.calls == [1, 5] and stored == [1, 5]
        assert trio.current_time() == released
        tx.close()


async def test_a_write_holds_its_slot_until_on_stored_returned(autojump_clock):
    # on_stored is where the completion stage applies its bound: while it blocks, the write
    # keeps its slot, so no more than max_writes_in_flight batches are held.
    store = ScriptedStore()
    settings = BatcherSettings(batch_size=2, linger_s=0, max_writes_in_flight=1)
    tx, rx = trio.open_memory_channel(10)
    for i in range(6):
        tx.send_nowait(rec(i))
    tx.close()
    release = trio.Event()
    handed = []

    async def on_stored(batch):
        handed.append(len(batch))
        await release.wait()

    async def on_refused(pending, reason):
        raise AssertionError(reason)

    async with trio.open_nursery() as n:
        n.start_soon(Batcher(store, settings, on_stored, on_refused, Metrics()).run, rx)
        await trio.sleep(5)
        assert store.calls == [2] and handed == [2] and rx.statistics().current_buffer_used == 4
        release.set()
    assert store.calls == [2, 2, 2]


async def test_each_batch_write_is_timed_once_in_the_store_write_stage():
    metrics = Metrics()
    store = ScriptedStore()
    await drain(store, [rec(i) for i in range(25)], BatcherSettings(batch_size=10),
                metrics=metrics)
    count = metrics.registry.get_sample_value(
        "invoker_stage_seconds_count", {"stage": "store_write"})
    assert count == len(store.calls) == 3


async def test_a_read_back_that_keeps_failing_hands_on_the_re_run_after_the_retry_limit(
        autojump_clock):
    """The records are stored: a store that cannot answer the read back (or answers what no
    parser takes) must not hold the partition for good."""
    store = ScriptedStore(fail_reads=10**9)
    store.docs[key(1)] = record(1, result={"first": True})
    handed = []
    started = trio.current_time()
    with trio.fail_after(600):  # virtual time: retrying for good fails rather than hangs
        stored, refused = await drain(
            store, [rec(i) for i in range(3)],
            BatcherSettings(batch_size=3, backoff_initial_s=1, backoff_max_s=4,
                            doc_retry_limit_s=60),
            handed=handed)
    assert sorted(stored) == [f"{i:032x}" for i in range(3)] and refused == []
    assert [p.record for p in handed if p.record["activationId"] == f"{1:032x}"] == [record(1)]
    assert 60 < trio.current_time() - started < 70
    assert len(store.calls) == 1  # never written twice


async def test_records_read_back_are_read_in_chunks_and_kept_encoded():
    store = ScriptedStore()
    count = 2 * READ_BACK_CHUNK + 1
    for i in range(count):
        store.docs[key(i)] = record(i, result={"first": i})
    handed = []
    await drain(store, [rec(i) for i in range(count)], BatcherSettings(batch_size=count),
                handed=handed)
    assert [len(ids) for ids in store.reads] == [READ_BACK_CHUNK, READ_BACK_CHUNK, 1]
    assert all(isinstance(p.record, EncodedRecord) for p in handed)
    assert sorted(p.record["response"]["result"]["first"] for p in handed) == list(range(count))
