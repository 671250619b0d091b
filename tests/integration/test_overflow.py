"""Overflow to Kafka and the recorder, on the real broker, Docker engine and store server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from kafka import KafkaProducer

from invoker.loadgen import activation_message, produce_messages, read_completions, run_load
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import build_record
from overflow.envelope import OverflowedRecord, encode
from tests.support.daemon import (
    KAFKA,
    counter_total,
    free_port,
    group_lag,
    load_spec,
    stored_records,
    wait_for,
)

NS = "otest"
PARTITIONS = 4  # of the test topics (Topics.create)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# Small bounds so a store slowed to ~1 s per bulk write saturates the record channel at once.
SMALL = dict(max_activations=8, read_ahead=4, max_poll_records=4, record_channel_size=8,
             record_channel_low_watermark=4, batch_size=4, max_writes_in_flight=1, linger_ms=5)


def proxied(couchdb_url: str, proxy) -> str:
    return f"http://127.0.0.1:{proxy.port}/{couchdb_url.rsplit('/', 1)[1]}"


def activation_rate(daemon, count: int, produce) -> float:
    """Activations/s the invoker finished (its own counter), while ``produce`` runs."""
    before = _finished(daemon)
    started = time.monotonic()
    loader = threading.Thread(target=produce)
    loader.start()
    wait_for(lambda: _finished(daemon) - before >= count, 180, f"{count} activations finished",
             interval_s=0.1)
    rate = count / (time.monotonic() - started)
    loader.join(timeout=240)
    return rate


def _finished(daemon) -> float:
    return counter_total(daemon.metrics(), "invoker_activations_total")


def overflow_envelopes(count: int) -> list[bytes]:
    """Real records as the invoker would overflow them, for driving recorders directly."""
    limits = Limits(timeout_ms=1000, memory_mb=128, logs_kb=10, concurrency=1)
    action = Action(name="rec", version="0.0.1", kind="python:3", image="img", code="x",
                    main="main", binary=False, limits=limits)
    out = []
    for i in range(count):
        activation = Activation(activation_id=f"{i:08x}" + "0" * 24, namespace=NS,
                                action=action, params={}, blocking=i % 2 == 0, transid="t",
                                submitted_at_ms=1)
        result = InvocationResult(status=Status.SUCCESS, result={"i": i}, start_ms=2, end_ms=3,
                                  logs=[f"2026-01-01T00:00:00Z stdout: line {i}"])
        out.append(encode(OverflowedRecord(build_record(activation, result, "inv-x", 1 << 20),
                                           activation.blocking, "inv-x")))
    return out


def envelope_ids(count: int) -> dict[str, str]:
    return {f"{i:08x}" + "0" * 24: NS for i in range(count)}


def test_slow_store_with_overflow_keeps_throughput_and_recorder_catches_up(
        daemons, topics, couchdb_url, couch_proxies):
    fast, slow = couch_proxies(), couch_proxies()
    count = 200

    # Reference: overflow off, store at full speed.
    reference = daemons(proxied(couchdb_url, fast), **SMALL)
    run_load(load_spec(topics, couchdb_url, [reference], actions=["noop"], count=20))  # warm
    fast_rate = activation_rate(reference, count, lambda: run_load(
        load_spec(topics, couchdb_url, [reference], actions=["noop"], count=count)))
    reference.terminate()

    # Overflow on, the store slowed to about 1 s per request, for the invoker and recorder.
    slow.set(latency=1.0, down=False)
    invoker = daemons(proxied(couchdb_url, slow), invoker_id=reference.invoker_id,
                      overflow_enabled="true", **SMALL)
    recorder = daemons(proxied(couchdb_url, slow), command="recorder", batch_size=100)
    result: dict = {}
    overflow_rate = activation_rate(invoker, count, lambda: result.update(report=run_load(
        load_spec(topics, couchdb_url, [invoker, recorder], actions=["noop"], count=count,
                  completion_timeout_s=180))))
    slow.set(latency=0.0, down=False)
    report = result["report"]
    print(f"overflow: {fast_rate:.1f} activations/s with overflow off and a fast store, "
          f"{overflow_rate:.1f} with overflow on and a slow store "
          f"(ratio {overflow_rate / fast_rate:.2f}); {report.overflowed} overflowed")

    assert overflow_rate >= 0.4 * fast_rate
    assert report.overflowed > count / 2
    assert (report.produced, report.completed, report.stored, report.lost,
            report.duplicate_records) == (count, count, count, 0, 0)
    assert report.repeated_completions == 0
    inv, rec = invoker.metrics(), recorder.metrics()
    assert inv["invoker_overflow_records_total"] == report.overflowed
    assert inv["invoker_records_stored_total"] + rec["invoker_records_stored_total"] == count
    assert rec["invoker_records_stored_total"] == report.overflowed
    assert len(invoker.log_events("record channel full: overflowing records to Kafka")) < 20
    wait_for(lambda: group_lag(topics) == 0, 30, "feed offsets committed")


def test_recorder_killed_mid_drain_then_restarted_loses_nothing(daemons, topics, couchdb_url,
                                                                couch_proxy):
    count = 300
    couch_proxy.set(latency=0.3, down=False)
    first = daemons(proxied(couchdb_url, couch_proxy), command="recorder", batch_size=10,
                    max_writes_in_flight=1)
    produce_messages(KAFKA, topics.overflow, overflow_envelopes(count))
    wait_for(lambda: first.metrics()["invoker_records_stored_total"] >= 40, 60, "drain started")
    first.kill()
    couch_proxy.set(latency=0.0, down=False)
    second = daemons(proxied(couchdb_url, couch_proxy), command="recorder",
                     invoker_id=first.invoker_id)
    ids = envelope_ids(count)
    completions = read_completions(KAFKA, topics.completions, set(ids), 120)
    records, total = stored_records(couchdb_url, ids)
    assert len(records) == count and total == count  # one record each, nothing else
    assert set(completions) == set(ids)
    assert completions[f"{0:08x}" + "0" * 24][0]["result"] == {"i": 0}  # blocking carries it
    assert completions[f"{0:08x}" + "0" * 24][0]["invoker"] == "inv-x"
    re_stored = second.metrics()["invoker_records_already_stored_total"]
    print(f"recorder crash: {re_stored:.0f} records written again after SIGKILL")


def test_two_recorders_share_the_topic_and_one_takes_over(daemons, topics, couchdb_url,
                                                          couch_proxy):
    first, later = 400, 200
    couch_proxy.set(latency=0.2, down=False)
    url = proxied(couchdb_url, couch_proxy)
    a = daemons(url, command="recorder", batch_size=10, max_writes_in_flight=1)
    b = daemons(url, command="recorder", batch_size=10, max_writes_in_flight=1)
    wait_for(lambda: _owns_partitions(a) and _owns_partitions(b), 60,
             "both recorders own partitions")
    envelopes = overflow_envelopes(first + later)
    produce_round_robin(topics.overflow, envelopes[:first])
    wait_for(lambda: a.metrics()["invoker_records_stored_total"] >= 20
             and b.metrics()["invoker_records_stored_total"] >= 20, 60, "both recorders storing")
    b_partitions = _partitions(b)
    assert b.terminate() == 0
    wait_for(lambda: _owns_partitions(a, count=4), 60, "the remaining recorder takes over")
    couch_proxy.set(latency=0.0, down=False)
    produce_round_robin(topics.overflow, envelopes[first:], start=first)
    ids = list(envelope_ids(first + later))
    completions = read_completions(KAFKA, topics.completions, set(ids), 120)
    records, total = stored_records(couchdb_url, dict.fromkeys(ids, NS))
    assert len(records) == first + later and total == first + later
    assert set(completions) == set(ids)
    repeats = {i: len(completions[id_]) - 1 for i, id_ in enumerate(ids)
               if len(completions[id_]) > 1}
    # b committed all it had completed before leaving: a read none of b's records again
    assert not [i for i in repeats if i % PARTITIONS in b_partitions], (b_partitions, repeats)
    # The rebalance also revoked and gave back a's own partitions (eager rebalancing): what a
    # had in flight for them was read again, found in the store and completed again.
    re_stored = a.metrics()["invoker_records_already_stored_total"]
    print(f"recorder hand-over: {sum(repeats.values())} completions repeated, "
          f"{re_stored:.0f} records already stored")
    assert sum(repeats.values()) == re_stored


class SecondBroker:
    """A second single-node Kafka (deploy/kafka.sh on other ports) to hold the overflow topic,
    so a test can make the overflow path unreachable while the feed's broker stays up."""

    def __init__(self, state_dir: Path) -> None:
        self.port = free_port_pair()
        self._env = {**os.environ, "INVOKER_STATE": str(state_dir),
                     "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.port + 1),
                     "KAFKA_HEAP": "384m"}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, action: str) -> None:
        subprocess.run([str(DEPLOY / "kafka.sh"), action], env=self._env, check=True,
                       timeout=180)


def free_port_pair() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def test_overflow_kafka_unreachable_pauses_and_loses_nothing(daemons, topics, couchdb_url,
                                                             couch_proxy, tmp_path):
    count = 200
    broker = SecondBroker(tmp_path / "overflow-kafka")
    broker.run("up")
    try:
        couch_proxy.set(latency=1.0, down=False)
        invoker = daemons(proxied(couchdb_url, couch_proxy), overflow_enabled="true",
                          overflow_bootstrap=broker.bootstrap, overflow_max_in_flight=4,
                          **SMALL)
        recorder = daemons(couchdb_url, command="recorder", overflow_bootstrap=broker.bootstrap)
        messages = [activation_message("noop", NS) for _ in range(count)]
        produce_messages(KAFKA, topics.feed, messages)
        wait_for(lambda: invoker.metrics()["invoker_overflow_records_total"] >= 10, 60,
                 "records overflowing")
        broker.run("down")
        # The feed's broker is up and has a backlog: the invoker must pause, not drop records
        # and not take more messages than its slots and read-ahead hold.
        wait_for(lambda: invoker.metrics()["invoker_feed_paused"] == 1, 60,
                 "invoker paused while the overflow topic is unreachable")
        stalled = invoker.metrics()["invoker_activations_total{status=success}"]
        time.sleep(3)
        m = invoker.metrics()
        assert m["invoker_feed_paused"] == 1
        assert m["invoker_overflow_in_flight"] <= 4 and m["invoker_slots_used"] <= 8
        assert m["invoker_readahead_depth"] <= 4
        assert m["invoker_activations_total{status=success}"] - stalled <= 8 + 4
        broker.run("up")
        couch_proxy.set(latency=0.0, down=False)
        ids = {m["activationId"]: NS for m in messages}
        completions = read_completions(KAFKA, topics.completions, set(ids), 180)
        records, total = stored_records(couchdb_url, ids)
        assert len(records) == count and total == count
        assert set(completions) == set(ids)
        assert recorder.metrics()["invoker_records_stored_total"] > 0
        wait_for(lambda: group_lag(topics) == 0, 60, "feed offsets committed")
    finally:
        broker.run("down")


def test_broker_restart_under_overflow_loses_nothing(daemons, topics, couchdb_url,
                                                     couch_proxy):
    """The single broker itself stops mid-load: nothing can move; after it returns, every
    activation is stored once and completed."""
    count = 150
    couch_proxy.set(latency=1.0, down=False)
    invoker = daemons(proxied(couchdb_url, couch_proxy), overflow_enabled="true", **SMALL)
    daemons(couchdb_url, command="recorder")
    messages = [activation_message("noop", NS) for _ in range(count)]
    produce_messages(KAFKA, topics.feed, messages)
    wait_for(lambda: invoker.metrics()["invoker_overflow_records_total"] >= 10, 60,
             "records overflowing")
    _kafka("down")
    try:
        time.sleep(3)
        m = invoker.metrics()
        assert m["invoker_slots_used"] <= 8 and m["invoker_readahead_depth"] <= 4
    finally:
        _kafka("up")
    couch_proxy.set(latency=0.0, down=False)
    ids = {m["activationId"]: NS for m in messages}
    completions = read_completions(KAFKA, topics.completions, set(ids), 180)
    records, total = stored_records(couchdb_url, ids)
    assert len(records) == count and total == count
    assert set(completions) == set(ids)
    wait_for(lambda: group_lag(topics) == 0, 60, "feed offsets committed")


def _kafka(action: str) -> None:
    subprocess.run([str(DEPLOY / "kafka.sh"), action], check=True, timeout=180)


def _partitions(daemon) -> set[int]:
    """The overflow partitions ``daemon`` was last assigned."""
    (line,) = daemon.log_events("partitions assigned")[-1:]
    return {int(p.rsplit("-", 1)[1]) for p in json.loads(line)["partitions"]}


def produce_round_robin(topic: str, envelopes: list[bytes], start: int = 0) -> None:
    """Envelope number i goes to partition i % PARTITIONS, so a test knows where each one is."""
    producer = KafkaProducer(bootstrap_servers=KAFKA, acks="all")
    try:
        sent = [producer.send(topic, value=envelope, partition=i % PARTITIONS)
                for i, envelope in enumerate(envelopes, start)]
        producer.flush(timeout=30)
        for future in sent:
            future.get(timeout=30)
    finally:
        producer.close(timeout=5)


def _owns_partitions(daemon, count: int | None = None) -> bool:
    lines = daemon.log_events("partitions assigned")
    if not lines:
        return False
    owned = lines[-1].count("-overflow-")
    return owned == count if count is not None else owned > 0
