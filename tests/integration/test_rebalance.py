"""Group changes under load re-run nothing that finished (real Kafka, Docker, CouchDB API).

kafka-python rebalances eagerly: every member loses all its partitions on every group change.
A revocation gives the revoked partitions' work in flight ``revoke_wait_ms`` to be stored and
committed; a partition handed back to the member that had it is read on from that member's own
position. The figures these tests print are what README's guarantees section quotes.
"""

from __future__ import annotations

import threading
import time

from kafka import KafkaConsumer

from invoker.loadgen import run_load
from tests.support.daemon import KAFKA, group_lag, load_spec, wait_for

MAX_ACTIVATIONS = 8


def _loaded(topics, store_url, result: dict, **kw) -> threading.Thread:
    loader = threading.Thread(target=lambda: result.update(report=run_load(
        load_spec(topics, store_url, [], completion_timeout_s=180, **kw))))
    loader.start()
    return loader


def _stored(daemon) -> float:
    return daemon.metrics()["invoker_records_stored_total"]


def _again(daemons) -> float:
    """Records the store already had (re-executed activations), summed over ``daemons``."""
    return sum(d.metrics()["invoker_records_already_stored_total"] for d in daemons)


def test_a_member_joining_then_one_leaving_under_load_re_executes_nothing(
        daemons, topics, couchdb_url):
    a = daemons(couchdb_url, max_activations=MAX_ACTIVATIONS)
    b = daemons(couchdb_url, max_activations=MAX_ACTIVATIONS)
    result: dict = {}
    loader = _loaded(topics, couchdb_url, result, actions=["sleep:100", "echo"], count=800,
                     rate=40)
    wait_for(lambda: _stored(a) + _stored(b) >= 120, 90, "load under way on two members")
    c = daemons(couchdb_url, max_activations=MAX_ACTIVATIONS)  # joins: a rebalance
    wait_for(lambda: _stored(c) >= 40, 90, "the third member executing")
    # b's counts before it stops: stopping, it reads nothing more, so they do not change.
    b_already = _again([b])
    assert b.terminate() == 0  # a rolling restart's stop: another rebalance
    loader.join(timeout=300)
    report = result["report"]
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        800, 800, 0, 0)
    already = _again([a, c]) + b_already
    revokes = [line for d in (a, b, c) for line in d.log_events("partitions revoked")]
    waits = [float(line.split('"waited_s": ')[1].split(",")[0]) for line in revokes]
    print(f"rolling rebalance: {already:.0f} of 800 activations re-executed "
          f"({report.repeated_completions} repeated completions, {len(revokes)} revocations "
          f"taking {min(waits):.3f}-{max(waits):.3f} s)")
    # Each revocation waits for the revoked partitions' work (100 ms actions, well within
    # revoke_wait_ms), commits it, and hands nothing over half done: nothing that finished,
    # nor anything in flight, runs again.
    assert already == 0 and report.repeated_completions == 0
    assert all('"in_flight_drained": true' in line for line in revokes), revokes
    m = a.metrics()
    assert m["invoker_rebalances_total"] >= 3  # its join, c's join, b's leave
    assert m["invoker_revoke_seconds_count"] >= 2
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end")


def _foreign_member(group: str, topic: str, stop: threading.Event) -> threading.Thread:
    """A consumer in ``group`` subscribed to another ``topic``: its joining and leaving make the
    daemon's partitions be revoked and handed straight back to it."""

    def run() -> None:
        consumer = KafkaConsumer(topic, bootstrap_servers=KAFKA, group_id=group,
                                 enable_auto_commit=False, client_id="foreign")
        try:
            while not stop.is_set():
                consumer.poll(timeout_ms=100)
        finally:
            consumer.close(autocommit=False)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_partitions_revoked_and_handed_back_are_read_on_not_read_again(
        daemons, topics, couchdb_url):
    # revoke_wait_ms=0: the revocation never waits, so work is still in flight (300 ms
    # actions) when the partitions come back; the hand-back keeps it and reads on after it.
    a = daemons(couchdb_url, max_activations=MAX_ACTIVATIONS, revoke_wait_ms=0)
    result: dict = {}
    loader = _loaded(topics, couchdb_url, result, actions=["sleep:300"], count=300, rate=30)
    wait_for(lambda: _stored(a) >= 30, 90, "load under way")
    for _ in range(2):  # a member joining, then leaving: two hand-backs
        stop = threading.Event()
        member = _foreign_member(topics.group, topics.dead_letters, stop)
        assigned_before = len(a.log_events("partitions assigned"))
        wait_for(lambda n=assigned_before: len(a.log_events("partitions assigned")) > n, 60,
                 "the daemon's partitions handed back")
        time.sleep(1)
        stop.set()
        member.join(timeout=60)
    loader.join(timeout=300)
    report = result["report"]
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        300, 300, 0, 0)
    resumed = [line for line in a.log_events("partitions assigned")
               if '"resumed": {}' not in line]
    already = _again([a])
    print(f"hand-back: {already:.0f} of 300 activations re-executed, {len(resumed)} "
          f"assignments read on from the daemon's own position")
    assert resumed, "a hand-back with work in flight seeks to the daemon's own position"
    assert already == 0 and report.repeated_completions == 0
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end")
