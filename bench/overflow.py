"""Figures 6-8: overflow to Kafka and the recorder.

1. *Invoker throughput under a slow store, overflow off vs on.* A fault proxy in front of
   pouchdb-server delays every chunk sent to the store; the invoker has the small bounds of
   tests/integration/test_overflow.py (``SMALL``) and stores through the proxy. The same load
   (``count`` no-op activations as fast as possible, after a warm-up with the proxy at full
   speed) runs against a daemon with overflow off, then one with overflow on, each on fresh
   topics and a fresh database. The rate is the invoker's own: ``invoker_activations_total``
   polled from its /metrics, from the first activation finished to the ``count``-th (with
   overflow on, completions wait for the recorder, so they would measure the recorder). A
   recorder is started only once the invoker finished (so it takes no CPU from the measured
   daemon), against the store directly; the load's report then checks that every activation
   was stored once and completed.
2. *Recorder drain rate vs the store's own bulk-insert rate.* ``drain_records`` envelopes of
   real records (``invoker.records.build_record`` of a no-op activation, as the invoker
   overflows them, keyed by activation id) are produced to a fresh overflow topic; then a
   recorder (default settings) is started against a fresh database, directly (no proxy). Its
   drain rate is ``drain_records`` / (start of consumption — its first non-empty partition
   assignment, from its log — → the last completion it published, the completion message's
   Kafka timestamp). Then, on the same database, the store alone: ``write_batch`` of copies of
   the same record (new ids) in batches of the recorder's ``batch_size`` with its
   ``max_writes_in_flight`` writes at a time.
3. *1 vs 2 recorders.* The same records, fresh topic (4 partitions), group and database per
   measurement, but the recorders are started first, on the empty topic, and the envelopes
   are produced once the recorders split the partitions between them: the broker here has
   ``group.initial.rebalance.delay.ms=0``, so of two recorders started together on a pre-filled
   topic the first takes all partitions and drains alone until the second's join completes
   (about one heartbeat, 2.5 s, later). Timed from the first send to the last completion.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.figures import Results
from bench.infra import (
    delete_couch_db,
    launch,
    load_problems,
    metric_samples,
    new_couch_db,
    start_daemon,
    stop_daemon,
    store_rate,
    tag,
    wait_assigned,
    wait_topic_metadata,
)
from invoker.config import Config
from invoker.loadgen import Report, activation_message, produce_messages, run_load, store_session
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import build_record
from overflow.envelope import OverflowedRecord, encode
from store import EncodedRecord
from tests.support.daemon import COUCHDB, KAFKA, Daemon, Topics, counter_total, load_spec
from tests.support.faultproxy import ProxyProcess

ACTION = "noop"
# As tests/integration/test_overflow.py: the record channel saturates at once on a slow store.
SMALL: dict[str, Any] = dict(max_activations=8, read_ahead=4, max_poll_records=4,
                             record_channel_size=8, record_channel_low_watermark=4,
                             batch_size=4, max_writes_in_flight=1, linger_ms=5)
POLL_S = 0.1
RECORDER_BATCH = Config.__dataclass_fields__["batch_size"].default
RECORDER_IN_FLIGHT = Config.__dataclass_fields__["max_writes_in_flight"].default


@dataclass(frozen=True)
class OverflowParams:
    count: int = 300  # at a few activations/s with overflow off: about a minute
    warmup: int = 24
    proxy_latency_s: float = 0.5
    finish_timeout_s: float = 150.0  # bound on ``count`` activations finishing (overflow off)
    drain_records: int = 4000
    partitions: int = 4
    drain_timeout_s: float = 90.0
    store_records: int = 4000
    store_time_limit_s: float = 10.0

    @classmethod
    def quick(cls) -> OverflowParams:
        return cls(count=100, warmup=16, finish_timeout_s=60.0, drain_records=1000,
                   store_records=1000, store_time_limit_s=4.0)


@dataclass
class Throughput:
    rate: float
    note: str


@dataclass
class Drain:
    rate: float | None
    note: str
    template: Mapping[str, Any] = field(default_factory=dict)
    store_url: str = ""


# --- 1. invoker throughput, overflow off vs on -----------------------------------------------

def _finished(daemon: Daemon) -> float | None:
    m = metric_samples(daemon)
    if m is None:
        return None
    return counter_total(m, "invoker_activations_total")


def _wait_finished(daemon: Daemon, target: float, timeout_s: float, what: str
                   ) -> list[tuple[float, float]]:
    """Poll the invoker's activation counter until it reaches ``target``; the (time, count)
    samples. Raises RuntimeError on timeout or if the daemon died."""
    deadline = time.monotonic() + timeout_s
    samples: list[tuple[float, float]] = []
    while True:
        done = _finished(daemon)
        now = time.monotonic()
        if done is not None:
            samples.append((now, done))
            if done >= target:
                return samples
        if daemon.process is not None and daemon.process.poll() is not None:
            raise RuntimeError(f"{what}: the daemon exited ({daemon.process.returncode}); log "
                               f"{daemon.log_path}")
        if now >= deadline:
            last = samples[-1][1] if samples else "n/a"
            raise RuntimeError(f"{what}: the activation counter at {last} of {target:.0f} after "
                               f"{timeout_s:g} s; log {daemon.log_path}")
        time.sleep(POLL_S)


def _rate(samples: list[tuple[float, float]], before: float) -> tuple[float, float, int]:
    """(activations/s, seconds, activations counted) from the first poll that saw the counter
    move past ``before`` to the last sample."""
    first = next((t, c) for t, c in samples if c > before)
    t_end, c_end = samples[-1]
    counted = int(c_end - first[1])
    seconds = t_end - first[0]
    if seconds <= 0 or counted <= 0:
        raise RuntimeError("the run finished within one metrics poll: raise the count")
    return counted / seconds, seconds, counted


def _throughput(variant: str, params: OverflowParams, proxy: ProxyProcess, work: Path,
                errors: Callable[[str], None]) -> Throughput:
    overflow = variant == "on"
    db, direct_url = new_couch_db()
    proxied_url = f"http://127.0.0.1:{proxy.port}/{db}"
    daemon: Daemon | None = None
    recorder: Daemon | None = None
    topics: Topics | None = None
    loader: threading.Thread | None = None
    outcome: dict[str, Any] = {}
    try:
        proxy.set(latency=0.0, down=False)
        daemon, topics = launch(errors, proxied_url, work, f"overflow-{variant}",
                                overflow_enabled=str(overflow).lower(), **SMALL)
        # Warm-up at full store speed so the action's containers exist; completions are not
        # awaited (with overflow on, a record overflowed now would wait for the recorder).
        base = _finished(daemon) or 0.0
        produce_messages(KAFKA, topics.feed, [activation_message(ACTION, f"bench-warm-{tag()}")
                                              for _ in range(params.warmup)])
        _wait_finished(daemon, base + params.warmup, 60, f"overflow {variant}: warm-up")

        proxy.set(latency=params.proxy_latency_s, down=False)
        time.sleep(0.3)  # the proxy re-reads its control file every 100 ms
        before_m = metric_samples(daemon) or {}
        before = _finished(daemon) or 0.0
        spec = load_spec(topics, direct_url, actions=[ACTION], count=params.count,
                         completion_timeout_s=params.finish_timeout_s + 90)

        def load() -> None:
            try:
                outcome["report"] = run_load(spec)
            except Exception as exc:  # reported below
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        loader = threading.Thread(target=load, name=f"load-overflow-{variant}", daemon=True)
        loader.start()
        samples = _wait_finished(daemon, before + params.count, params.finish_timeout_s,
                                 f"overflow {variant}")
        after_m = metric_samples(daemon) or {}
        rate, seconds, counted = _rate(samples, before)
        proxy.set(latency=0.0, down=False)  # measured: let the rest be stored quickly

        drained = ""
        if overflow:
            t_rec = time.monotonic()
            recorder = start_daemon(topics, direct_url, work, "overflow-on", command="recorder")
        loader.join(timeout=params.finish_timeout_s + 150)
        if loader.is_alive():
            errors(f"overflow {variant}: the load did not finish in time")
        elif outcome.get("error"):
            errors(f"overflow {variant}: load failed: {outcome['error']}")
        report: Report | None = outcome.get("report")
        if report is not None:
            for problem in load_problems(report, f"overflow {variant}"):
                errors(problem)
            if recorder is not None:
                drained = (f"; a recorder started after the run had them all stored and "
                           f"completed {time.monotonic() - t_rec:.1f} s later")

        def delta(name: str) -> float:
            return after_m.get(name, 0.0) - before_m.get(name, 0.0)

        cpu = delta("process_cpu_seconds_total")
        note = (f"{params.count} noop activations, {counted} finished in {seconds:.1f} s after "
                f"the first poll that saw one; invoker CPU {cpu / seconds:.2f} cores")
        if overflow:
            note += (f"; overflowed {delta('invoker_overflow_records_total'):.0f}, stored by "
                     f"the invoker {delta('invoker_records_stored_total'):.0f}")
        else:
            note += (f"; stored {delta('invoker_records_stored_total'):.0f} meanwhile, feed "
                     f"paused {delta('invoker_feed_pauses_total'):.0f} times")
        if report is not None:
            note += (f"; load: completed {report.completed}, stored {report.stored}, lost "
                     f"{report.lost}, duplicates {report.duplicate_records}")
        return Throughput(rate, note + drained)
    finally:
        proxy.set(latency=0.0, down=False)
        try:
            try:
                if recorder is not None:
                    stop_daemon(recorder, graceful=False)
            finally:
                if daemon is not None:
                    stop_daemon(daemon, graceful=False)
        finally:
            if loader is not None:
                loader.join(timeout=30)
            delete_couch_db(direct_url)
            if topics is not None:
                topics.delete()


# --- 2./3. recorder drain --------------------------------------------------------------------

def _records(namespace: str, count: int) -> list[EncodedRecord]:
    """Records as the invoker builds them for a no-op activation (one log line)."""
    limits = Limits(timeout_ms=60_000, memory_mb=256, logs_kb=10, concurrency=1)
    action = Action(name="noop", version="0.0.1", kind="python:3",
                    image="invoker-action-python:latest", code="def main(p):\n    return {}\n",
                    main="main", binary=False, limits=limits)
    now = int(time.time() * 1000)
    out = []
    for i in range(count):
        activation = Activation(activation_id=uuid.uuid4().hex, namespace=namespace,
                                action=action, params={}, blocking=i % 2 == 0,
                                transid=uuid.uuid4().hex, submitted_at_ms=now)
        result = InvocationResult(status=Status.SUCCESS, result={}, start_ms=now + 5,
                                  end_ms=now + 8, logs=[f"2026-01-01T00:00:00Z stdout: {i}"],
                                  wait_time_ms=5)
        out.append(build_record(activation, result, "bench-invoker", 1 << 20))
    return out


def _produce(topic: str, envelopes: list[tuple[bytes, bytes]]) -> float:
    """Produce (key, value) pairs (acks=all) and wait for every ack; the seconds it took."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=KAFKA, client_id="bench-prefill", acks="all",
                             linger_ms=20, batch_size=256 * 1024, max_block_ms=30_000,
                             request_timeout_ms=30_000)
    try:
        t0 = time.monotonic()
        futures = [producer.send(topic, value=value, key=key) for key, value in envelopes]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=30)
        return time.monotonic() - t0
    finally:
        producer.close(timeout=5)


def _completions(topic: str) -> tuple[int, float | None]:
    """(messages on ``topic``, the latest timestamp among each partition's last message, s)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=KAFKA, client_id="bench", group_id=None,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        beginnings = consumer.beginning_offsets(tps)
        total = sum(ends[tp] - beginnings[tp] for tp in tps)
        wanted = {tp for tp in tps if ends[tp] > beginnings[tp]}
        for tp in wanted:
            consumer.seek(tp, ends[tp] - 1)
        latest: float | None = None
        deadline = time.monotonic() + 15
        while wanted and time.monotonic() < deadline:
            for tp, msgs in consumer.poll(timeout_ms=500).items():
                for msg in msgs:
                    if msg.offset == ends[tp] - 1:
                        wanted.discard(tp)
                        latest = max(latest or 0.0, msg.timestamp / 1000)
        return total, latest if not wanted else None
    finally:
        consumer.close()


def _first_assignment(daemon: Daemon) -> tuple[float | None, int]:
    """(epoch seconds of the daemon's first non-empty partition assignment, how many
    assignments it logged)."""
    first: float | None = None
    events = 0
    for line in daemon.log_events("partitions assigned"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not event.get("partitions") or "timestamp" not in event:
            continue
        events += 1
        if first is None:
            first = datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
    return first, events


def _pouchdb_pid() -> int | None:
    """The pid of the pouchdb-server serving COUCHDB (for its CPU use), if it is visible."""
    port = COUCHDB.rstrip("/").rsplit(":", 1)[-1]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any("pouchdb-server" in a for a in text) and "127.0.0.1" in text and port in text:
            return int(entry.name)
    return None


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _owned(daemon: Daemon) -> list[str] | None:
    """The partitions the daemon's /healthz says it owns (None: it did not answer)."""
    try:
        return list(httpx.get(daemon.url("/healthz"), timeout=2, trust_env=False)
                    .json().get("partitions") or [])
    except (httpx.HTTPError, ValueError):
        return None


def _wait_stable(daemons: list[Daemon], partitions: int, timeout_s: float, what: str) -> None:
    """Wait (bounded) until every recorder owns partitions and together they own all of them,
    twice in a row 0.5 s apart (so a rebalance in progress is not taken for its end)."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while True:
        owned = [_owned(d) for d in daemons]
        ok = all(owned) and len({p for o in owned for p in o or ()}) == partitions
        streak = streak + 1 if ok else 0
        if streak >= 2:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: partitions not split between the recorders within "
                               f"{timeout_s:g} s (owned: {owned})")
        time.sleep(0.5)


def _drain(recorders: int, prefill: bool, params: OverflowParams, work: Path,
           errors: Callable[[str], None], keep_db: bool = False) -> Drain:
    """Drain ``drain_records`` envelopes with ``recorders`` recorders (fresh topics, group and
    database). ``prefill``: produce them all, then start the recorder(s), timed from the first
    partition assignment; otherwise start the recorders, wait until they split the partitions,
    then produce, timed from the first send. Until the last completion's timestamp either way.
    """
    what = f"drain with {recorders} recorder{'s' if recorders > 1 else ''}"
    name = f"drain{recorders}{'-prefilled' if prefill else ''}"
    topics = Topics.create(partitions=params.partitions)
    _, url = new_couch_db()
    started: list[Daemon] = []
    try:
        wait_topic_metadata(topics.overflow)
        records = _records(f"bench-ovf-{tag()}", params.drain_records)
        envelopes = [(r["activationId"].encode(),
                      encode(OverflowedRecord(r, i % 2 == 0, "bench-invoker")))
                     for i, r in enumerate(records)]
        if prefill:
            fill_s = _produce(topics.overflow, envelopes)
        pouch = _pouchdb_pid()
        failures: list[BaseException] = []
        lock = threading.Lock()

        def start(k: int) -> None:
            try:
                d = start_daemon(topics, url, work, f"{name}-{k}", command="recorder")
                with lock:
                    started.append(d)
            except BaseException as exc:  # re-raised below
                failures.append(exc)

        threads = [threading.Thread(target=start, args=(k,)) for k in range(recorders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        if failures:
            raise failures[0]
        if len(started) < recorders:
            raise RuntimeError(f"{what}: recorders did not start within 90 s")
        if prefill:
            pouch_cpu0 = _cpu_s(pouch)
            for d in started:
                if not wait_assigned(d, 30):
                    errors(f"{what}: recorder {d.invoker_id} got no partitions within 30 s")
        else:
            _wait_stable(started, params.partitions, 60, what)
            cpu0 = [(metric_samples(d) or {}).get("process_cpu_seconds_total", 0.0)
                    for d in started]
            pouch_cpu0 = _cpu_s(pouch)
            t_fill = time.time()
            fill_s = _produce(topics.overflow, envelopes)

        deadline = time.monotonic() + params.drain_timeout_s
        while True:
            samples = [metric_samples(d) or {} for d in started]
            stored = sum(m.get("invoker_records_stored_total", 0.0) for m in samples)
            if stored >= params.drain_records:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: {stored:.0f} of {params.drain_records} stored "
                                   f"after {params.drain_timeout_s:g} s")
            if any(d.process is not None and d.process.poll() is not None for d in started):
                raise RuntimeError(f"{what}: a recorder exited; logs in {work}")
            time.sleep(POLL_S)
        pouch_cpu1 = _cpu_s(pouch)
        # Each stored batch's completions follow it: wait (bounded) for the last ones.
        deadline = time.monotonic() + 15
        while True:
            messages, last = _completions(topics.completions)
            if messages >= params.drain_records or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        firsts = [_first_assignment(d) for d in started]
        if prefill:
            starts = [t for t, _ in firsts if t is not None]
            if not starts:
                raise RuntimeError(f"{what}: no partition assignment in the recorders' logs")
            t0 = min(starts)
            cpu0 = [0.0] * len(started)  # from the process start
        else:
            t0 = t_fill
        if last is None:
            raise RuntimeError(f"{what}: no completion timestamp")
        seconds = last - t0
        again = sum(m.get("invoker_records_already_stored_total", 0.0) for m in samples)
        cpu = [m.get("process_cpu_seconds_total", 0.0) - c
               for m, c in zip(samples, cpu0, strict=True)]
        pauses = [m.get("invoker_feed_pauses_total", 0.0) for m in samples]
        for d in started:
            stop_daemon(d)
        started.clear()

        count = store_session(url, lambda store: store.count(), 60)
        if count != params.drain_records or messages < params.drain_records:
            errors(f"{what}: {count} records in the store, {messages} completion messages, "
                   f"for {params.drain_records} envelopes")
        record_bytes = len(records[0].data)
        pouch_note = ("n/a" if pouch_cpu0 is None or pouch_cpu1 is None or seconds <= 0
                      else f"{(pouch_cpu1 - pouch_cpu0) / seconds:.2f} cores")
        per = "/".join
        note = (f"{params.drain_records} records of {record_bytes} B on {params.partitions} "
                + (f"partitions, pre-filled in {fill_s:.1f} s; first assignment"
                   if prefill else
                   f"partitions, produced in {fill_s:.1f} s once the recorders owned them; "
                   "first send")
                + f" -> last completion {seconds:.1f} s; assignments "
                f"{per(str(n) for _, n in firsts)}; stored again {again:.0f}; feed pauses "
                f"{per(f'{p:.0f}' for p in pauses)}; recorder CPU "
                f"{per(f'{c / seconds:.2f}' for c in cpu)} cores"
                + (" (incl. start-up)" if prefill else "")
                + f", pouchdb-server {pouch_note}")
        return Drain(params.drain_records / seconds if seconds > 0 else None, note, records[0],
                     url)
    finally:
        for d in started:
            stop_daemon(d, graceful=False)
        if not keep_db:
            delete_couch_db(url)
        topics.delete()


def run(results: Results, params: OverflowParams, work: Path) -> None:
    def errors(message: str) -> None:
        results.error("overflow", message)

    target = COUCHDB.split("//", 1)[1].rstrip("/")
    proxy = ProxyProcess(target, work)
    try:
        runs = {variant: _throughput(variant, params, proxy, work, errors)
                for variant in ("off", "on")}
    finally:
        proxy.close()
    for variant, t in runs.items():
        results.add(f"overflow.{variant}.throughput", t.rate, "activations/s",
                    f"overflow {variant}, store +{params.proxy_latency_s:g} s per chunk; "
                    + t.note)
    results.ratio("ratio.overflow.on_over_off_throughput", "overflow.on.throughput",
                  "overflow.off.throughput")

    one = _drain(1, True, params, work, errors, keep_db=True)
    try:
        results.add("overflow.drain.prefilled", one.rate, "records/s", one.note)
        written, seconds = store_rate(one.store_url, one.template, RECORDER_BATCH,
                                      params.store_records, params.store_time_limit_s,
                                      writers=RECORDER_IN_FLIGHT)
    finally:
        delete_couch_db(one.store_url)
    results.add("store.overflow.bulk_insert_rate", written / seconds if seconds else None,
                "records/s", f"{written} copies of the drained record, batches of "
                f"{RECORDER_BATCH}, {RECORDER_IN_FLIGHT} writes at a time (as the recorder), "
                "same database, after the recorder stopped")
    results.ratio("ratio.overflow.recorder_over_store", "overflow.drain.prefilled",
                  "store.overflow.bulk_insert_rate")

    for n in (1, 2):
        drain = _drain(n, False, params, work, errors)
        results.add(f"overflow.drain.{n}_recorder{'s' if n > 1 else ''}", drain.rate,
                    "records/s", drain.note)
    results.ratio("ratio.overflow.2_over_1_recorders", "overflow.drain.2_recorders",
                  "overflow.drain.1_recorder")
