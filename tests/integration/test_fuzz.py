"""Fuzz (issue 8): over a thousand hostile feed messages, interleaved with valid ones, through one
running daemon on the real Kafka broker, Docker engine and CouchDB-API store.

The corpus comes from ``tests/support/hostile.py`` (seeded: ``INVOKER_FUZZ_SEED`` picks another
one; the seed is printed). Every message is accounted for afterwards:

- by where it landed on the feed (``dlq.partition``/``dlq.offset`` of its dead letter), so
  messages without any usable id are traced too;
- by activation id in the store (every record of the test's database is read, so a record filed
  under a mangled id or namespace shows up as well) and on the completions topic.

Why the CouchDB API and not SQLite: the issue found its bugs there, and it is the store hostile
input can hurt most — the namespace becomes part of a document id in a URL (``_design/...`` ids
are special), every document goes through a second, different JSON parser (JavaScript's: lone
surrogates, huge integers, non-finite numbers, deep nesting), and the bulk API answers per
document, so one bad record must fail alone.

Memory: the daemon exports ``invoker_worst_case_buffered_bytes``, its README's bound on what it
buffers ("Worst-case memory": messages, running activations, records, completions, the fetch
buffer and one parse; tens of MiB with SETTINGS, printed by the test). The baseline is
the daemon's RSS after a warm-up of every valid action (the peak so far if higher): the formula
bounds buffered data, not the interpreter and the clients that load on first use (first
container, store write, publish), as in test_daemon's slow-store test. Its peak RSS over the
whole run (sampled, and the kernel's high-water mark at the end) must stay within baseline +
bound: what hostile input makes it hold has to fit the stated bound.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import TopicPartition

from invoker.loadgen import read_completions
from tests.support.daemon import KAFKA, Daemon, Topics, group_lag, wait_for
from tests.support.hostile import (
    CLASSES,
    DEAD_LETTER,
    EDGE,
    RECORD_DEAD_LETTER,
    VALID,
    VALID_ACTIONS,
    FuzzMessage,
    HostileCorpus,
    status,
)

NS = "fuzz-tenant"
SEED = int(os.environ.get("INVOKER_FUZZ_SEED", "8"))
PARTITIONS = 4
MAX_MESSAGE_BYTES = 64 * 1024  # small, so oversized messages stay cheap
# max.message.bytes of every test topic; kept small because kafka-python checksums every byte
# in pure Python (CRC32C, ~1.6 s per MB on this machine) when producing and consuming
TOPIC_MESSAGE_BYTES = 128 * 1024
SETTINGS: dict[str, object] = {
    "max_message_bytes": MAX_MESSAGE_BYTES,
    "kafka_max_message_bytes": TOPIC_MESSAGE_BYTES,
    "max_activations": 8,
    "user_memory_mb": 4096,
    "read_ahead": 16,
    "max_poll_records": 8,
    "fetch_max_bytes": 1024 * 1024,
    "record_channel_size": 64,
    "record_channel_low_watermark": 32,
    "batch_size": 25,
    "max_writes_in_flight": 2,
    "linger_ms": 10,
    "max_result_bytes": 256 * 1024,
    "max_logs_kb": 16,
}
VALID_COUNT = 240
# How long processing the corpus may take before the test says where it is stuck. Not a speed
# check: a healthy run takes well under a minute; this is room for a loaded 2-core machine.
PROCESSING_TIMEOUT_S = 240.0
TRUNCATION_HINT = "truncat"  # a dead letter cut to fit says so in a header named like this
EXAMPLES_PER_PROBLEM = 4


@pytest.fixture
def topics():
    """Like the conftest's, but every topic takes values up to TOPIC_MESSAGE_BYTES (the daemon
    is told so through kafka_max_message_bytes): oversized feed messages get onto the feed, and
    their dead letters have to fit under the same limit."""
    tag = uuid.uuid4().hex[:10]
    created = Topics(f"t-{tag}-feed", f"t-{tag}-done", f"t-{tag}-dlq", f"t-{tag}-overflow",
                     f"g-{tag}", f"g-{tag}-rec")
    admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
    try:
        admin.create_topics([
            NewTopic(name, PARTITIONS, 1,
                     topic_configs={"max.message.bytes": str(TOPIC_MESSAGE_BYTES)})
            for name in (created.feed, created.completions, created.dead_letters,
                         created.overflow)])
    finally:
        admin.close()
    yield created
    created.delete()


def test_hostile_messages_are_each_accounted_for_and_the_daemon_keeps_going(
        daemons, topics, couchdb_url):
    began = time.monotonic()
    daemon = daemons(couchdb_url, **SETTINGS)
    started_rss = daemon.metrics()["process_resident_memory_bytes"]
    corpus = HostileCorpus(SEED, NS, MAX_MESSAGE_BYTES, TOPIC_MESSAGE_BYTES)

    warm_up = [corpus.valid(spec) for spec in dict.fromkeys(VALID_ACTIONS) for _ in range(3)]
    placed = _produce(topics.feed, warm_up)
    warm_ids = {m.activation_id for m in warm_up}
    wait_for(lambda: len(read_completions(KAFKA, topics.completions, warm_ids, 5)) == len(
        warm_ids), 90, "the warm-up activations' completions")
    warm = daemon.metrics()
    baseline = max(warm["process_resident_memory_bytes"], warm["invoker_process_peak_rss_bytes"])
    bound = warm["invoker_worst_case_buffered_bytes"]

    messages = corpus.build(VALID_COUNT)
    hostile = sum(m.hostile for m in messages)
    sent = _sent_summary(messages, warm_up, SEED)
    print("\n" + sent)
    assert hostile >= 1000, sent
    started = time.monotonic()
    placed.update(_produce(topics.feed, messages))
    produced = time.monotonic()
    everything = warm_up + messages

    samples = _run_until_committed(daemon, topics, placed, sent)
    committed = time.monotonic()

    records = _all_records(couchdb_url)
    dead_letters = _read_topic(topics.dead_letters)
    recorded_ids = {r["activationId"] for r in records if isinstance(r.get("activationId"), str)}
    completions = read_completions(KAFKA, topics.completions, recorded_ids, 30)
    outcomes, problems = _account(everything, placed, records, dead_letters, completions,
                                  topics.feed)
    table = _outcome_table(everything, outcomes, problems)
    print(table)
    truncated = sum(any(TRUNCATION_HINT in key for key, _ in d.headers) for d in dead_letters)
    print(f"fuzz: {len(dead_letters)} dead letters ({truncated} truncated to fit the topic), "
          f"{len(records)} records")
    print(f"fuzz: start and warm-up {started - began:.1f} s, {len(everything)} messages produced"
          f" in {produced - started:.1f} s, all processed and committed after "
          f"{committed - started:.1f} s, read back and accounted for in "
          f"{time.monotonic() - committed:.1f} s")

    assert daemon.process is not None and daemon.process.poll() is None, (
        f"the daemon exited ({daemon.process.returncode if daemon.process else '?'})\n{table}")
    end = daemon.metrics()
    print("fuzz: daemon counters: " + ", ".join(
        f"{name.removeprefix('invoker_')}={value:g}" for name, value in sorted(end.items())
        if name.startswith(("invoker_activations_total", "invoker_dead_letters_total",
                            "invoker_container_starts_total", "invoker_records_"))
        and not name.endswith("_created")))
    peak = max([end["invoker_process_peak_rss_bytes"]]
               + [s["process_resident_memory_bytes"] for s in samples])
    memory = (f"peak RSS {peak / 2**20:.1f} MiB; baseline after warm-up {baseline / 2**20:.1f}"
              f" MiB (at start {started_rss / 2**20:.1f} MiB) + stated worst case "
              f"{bound / 2**20:.1f} MiB = {(baseline + bound) / 2**20:.1f} MiB")
    print(f"fuzz: {memory}")
    health = httpx.get(daemon.url("/healthz"), timeout=5)
    assert health.status_code == 200, f"/healthz: {health.status_code} {health.text[:300]}"
    assert not problems, _format_problems(problems) + "\n" + table
    assert peak <= baseline + bound, f"{memory}\n{table}"


# --- producing and waiting -------------------------------------------------------------------

def _produce(topic: str, messages: list[FuzzMessage]) -> dict[tuple[int, int], FuzzMessage]:
    """Send ``messages`` in order, acks=all; the message at each (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=KAFKA, client_id="fuzz", acks="all",
                             linger_ms=5, max_request_size=2 * TOPIC_MESSAGE_BYTES,
                             request_timeout_ms=60_000)
    try:
        futures = [
            producer.send(topic, value=m.value, key=m.key,
                          partition=None if m.activation_id else index % PARTITIONS)
            for index, m in enumerate(messages)
        ]
        producer.flush(timeout=60)
        metadata = [f.get(timeout=60) for f in futures]
    finally:
        producer.close(timeout=5)
    return {(md.partition, md.offset): m for md, m in zip(metadata, messages, strict=True)}


def _run_until_committed(daemon: Daemon, topics: Topics,
                         placed: dict[tuple[int, int], FuzzMessage], sent: str
                         ) -> list[dict[str, float]]:
    """Poll until the group committed the feed to its end; fail at once if the daemon exits,
    or after PROCESSING_TIMEOUT_S, naming the messages each partition is stuck at. Returns the
    metrics sampled meanwhile."""
    assert daemon.process is not None
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + PROCESSING_TIMEOUT_S
    while True:
        if daemon.process.poll() is not None:
            pytest.fail(f"the daemon exited with {daemon.process.returncode} while taking the "
                        f"corpus\n{_stuck_at(topics, placed)}\n{sent}\n--- daemon log ---\n"
                        + _log_tail(daemon))
        try:
            samples.append(daemon.metrics())
        except httpx.HTTPError:
            pass  # it may just have exited: the next check says
        else:
            if group_lag(topics) == 0:
                return samples
        if time.monotonic() > deadline:
            pytest.fail(f"offsets not committed to the end after {PROCESSING_TIMEOUT_S:.0f} s "
                        f"(lag {group_lag(topics)})\n{_stuck_at(topics, placed)}\n{sent}\n"
                        f"--- daemon log ---\n" + _log_tail(daemon))
        time.sleep(1.0)


def _stuck_at(topics: Topics, placed: dict[tuple[int, int], FuzzMessage]) -> str:
    """The first uncommitted message of each partition (the one holding its commit back)."""
    admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
    try:
        committed = admin.list_consumer_group_offsets(topics.group)
    finally:
        admin.close()
    lines = ["first uncommitted message per partition:"]
    for partition in range(PARTITIONS):
        meta = committed.get(TopicPartition(topics.feed, partition))
        offset = meta.offset if meta is not None and meta.offset >= 0 else 0
        message = placed.get((partition, offset))
        what = (f"{message.kind} / {message.detail[:80]}: {message.preview()}" if message
                else "none (all committed)")
        lines.append(f"  partition {partition} offset {offset}: {what}")
    return "\n".join(lines)


def _log_tail(daemon: Daemon, lines: int = 30) -> str:
    text = daemon.log_path.read_text(errors="replace").splitlines()
    return "\n".join([line[:400] for line in text if '"level": "debug"' not in line][-lines:])


# --- reading back ----------------------------------------------------------------------------

def _all_records(couchdb_url: str) -> list[dict[str, Any]]:
    """Every document of the test's database (it holds only this test's records)."""
    response = httpx.get(f"{couchdb_url}/_all_docs", params={"include_docs": "true"},
                         timeout=120)
    response.raise_for_status()
    return [row["doc"] for row in response.json()["rows"] if not row["id"].startswith("_")]


def _read_topic(topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every message of ``topic`` (all partitions, up to their current end). Checksums are
    not verified: the broker did, and kafka-python's pure-Python CRC32C costs seconds here."""
    consumer = KafkaConsumer(bootstrap_servers=KAFKA, client_id="fuzz", group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=100, check_crcs=False,
                             max_partition_fetch_bytes=2 * TOPIC_MESSAGE_BYTES,
                             fetch_max_bytes=4 * TOPIC_MESSAGE_BYTES,
                             receive_message_max_bytes=16 * TOPIC_MESSAGE_BYTES)
    try:
        partitions = wait_for(lambda: consumer.partitions_for_topic(topic), 30,
                              f"partitions of {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
        return got
    finally:
        consumer.close()


# --- accounting ------------------------------------------------------------------------------

Problems = dict[tuple[str, str], list[str]]  # (problem, class) -> examples


def _account(messages: list[FuzzMessage], placed: dict[tuple[int, int], FuzzMessage],
             records: list[dict[str, Any]], dead_letters: list[Any],
             completions: dict[str, list[dict]], feed_topic: str
             ) -> tuple[list[set[str]], Problems]:
    """Each message's outcomes (same order as ``messages``) and every problem found."""
    problems: Problems = defaultdict(list)

    def problem(what: str, message: FuzzMessage | None, example: str) -> None:
        problems[(what, message.kind if message else "-")].append(example)

    place_of = {id(m): place for place, m in placed.items()}
    by_place: dict[tuple[int, int], list[Any]] = defaultdict(list)
    record_letters: dict[str, list[Any]] = defaultdict(list)
    for letter in dead_letters:
        headers = {k: v for k, v in letter.headers}
        if not headers.get("dlq.reason"):
            problem("dead letter without dlq.reason", None, repr(headers)[:200])
        if headers.get("dlq.kind") == b"record":
            record_letters[_activation_id_in(letter.value)].append(letter)
            continue
        try:
            assert headers["dlq.topic"].decode() == feed_topic
            place = (int(headers["dlq.partition"]), int(headers["dlq.offset"]))
        except (KeyError, ValueError, AssertionError):
            problem("dead letter that names no feed message", None, repr(headers)[:200])
            continue
        by_place[place].append(letter)

    records_by_id: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        records_by_id[str(record.get("activationId"))].append(record)
    traced = {m.activation_id or m.claimed_id for m in messages} - {None}
    for activation_id, found in records_by_id.items():
        if activation_id not in traced:
            problem("record of no message sent", None, repr(found[0])[:200])

    outcomes: list[set[str]] = []
    for message in messages:
        got: set[str] = set()
        letters = by_place.get(place_of[id(message)], [])
        if letters:
            got.add(DEAD_LETTER)
            if len(letters) > 1:
                problem("dead-lettered more than once", message, message.detail)
            _check_dead_letter(message, letters[0], problem)
        activation_id = message.activation_id or message.claimed_id
        stored = records_by_id.get(activation_id or "", [])
        got.update(status(r.get("response", {}).get("statusCode")) for r in stored)
        if activation_id in record_letters:
            got.add(RECORD_DEAD_LETTER)
        outcomes.append(got)
        example = f"{message.detail[:100]}: {message.preview()}"
        if not got:
            problem("lost: neither dead-lettered nor recorded", message, example)
        elif len(got) > 1:
            problem(f"more than one outcome {sorted(got)}", message, example)
        elif not got <= message.allowed:
            problem(f"{next(iter(got))}, expected {' or '.join(sorted(message.allowed))}",
                    message, example + _record_error(stored))
        if len(stored) > 1:
            problem("stored more than once", message, example)
        for record in stored:
            _check_record(message, record, completions.get(activation_id or "", []), problem)
    return outcomes, problems


def _check_dead_letter(message: FuzzMessage, letter: Any, problem: Any) -> None:
    original = message.value or b""
    value = letter.value or b""
    if value == original:
        return
    truncated = any(TRUNCATION_HINT in key for key, _ in letter.headers)
    if not (truncated and len(value) < len(original) and original.startswith(value)):
        problem("dead letter is not the original bytes (nor a prefix marked truncated)",
                message, f"{message.detail[:100]}: sent {len(original)} bytes, dead letter "
                f"{len(value)} bytes, headers {[k for k, _ in letter.headers]}")


def _check_record(message: FuzzMessage, record: dict[str, Any], completions: list[dict],
                  problem: Any) -> None:
    example = f"{message.detail[:100]}: {message.preview()}"
    if message.namespace is not None and record.get("namespace") != message.namespace:
        problem("record under another namespace", message,
                f"{example}: {str(record.get('namespace'))[:100]!r}")
    response = record.get("response", {})
    if message.check_result and response.get("statusCode") == 0 and (
            response.get("result") != message.expected_result):
        problem("stored result differs from the expected one", message,
                f"{example}: {str(response.get('result'))[:200]}")
    if not completions:
        problem("stored, but no completion", message, example)
    for completion in completions:
        if completion.get("statusCode") != response.get("statusCode"):
            problem("completion status differs from the stored one", message,
                    f"{example}: {completion.get('statusCode')} vs {response.get('statusCode')}")
        if message.blocking and message.check_result and response.get("statusCode") == 0 and (
                completion.get("result") != message.expected_result):
            problem("blocking completion without the stored result", message,
                    f"{example}: {str(completion)[:200]}")


def _record_error(records: list[dict]) -> str:
    for record in records:
        result = record.get("response", {}).get("result")
        if isinstance(result, dict) and "error" in result:
            return f" -> record error: {str(result['error'])[:120]!r}"
    return ""


def _activation_id_in(value: bytes | None) -> str:
    """The activation id of a dead-lettered record (its JSON may be truncated)."""
    text = (value or b"")[:4096].decode(errors="replace")
    marker = '"activationId":'
    start = text.find(marker)
    if start < 0:
        return ""
    rest = text[start + len(marker):].lstrip().lstrip('"')
    return rest[:32]


# --- reporting -------------------------------------------------------------------------------

def _kinds(messages: Iterable[FuzzMessage]) -> list[str]:
    present = {m.kind for m in messages}
    return [k for k in (VALID, EDGE, *CLASSES) if k in present]


def _sent_summary(messages: list[FuzzMessage], warm_up: list[FuzzMessage], seed: int) -> str:
    counts = Counter(m.kind for m in messages)
    hostile = sum(m.hostile for m in messages)
    size = sum(len(m.value or b"") for m in messages + warm_up)
    lines = [f"fuzz corpus (seed {seed}): {hostile} hostile, {counts[VALID]} valid, "
             f"{counts[EDGE]} valid edge cases, plus {len(warm_up)} warm-up; "
             f"{len(messages) + len(warm_up)} messages, {size / 2**20:.1f} MiB sent"]
    for kind in _kinds(messages):
        lines.append(f"  {kind:<20} {counts[kind]:>5}  {CLASSES.get(kind, '')}")
    return "\n".join(lines)


def _outcome_table(messages: list[FuzzMessage], outcomes: list[set[str]],
                   problems: Problems) -> str:
    columns = [DEAD_LETTER, *(status(c) for c in range(4)), RECORD_DEAD_LETTER]
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for message, got in zip(messages, outcomes, strict=True):
        per_kind[message.kind]["sent"] += 1
        for outcome in got or {"lost"}:
            per_kind[message.kind][outcome] += 1
    for (_, kind), examples in problems.items():
        per_kind[kind]["problems"] += len(examples)
    header = ["class", "sent", *columns, "lost", "problems"]
    rows = [header] + [[kind] + [str(per_kind[kind][c]) for c in header[1:]]
                       for kind in _kinds(messages)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "outcomes per class:\n" + "\n".join(
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows)


def _format_problems(problems: Problems) -> str:
    lines = [f"{sum(len(v) for v in problems.values())} problems:"]
    for (what, kind), examples in sorted(problems.items()):
        lines.append(f"- {what} [{kind}] × {len(examples)}")
        lines += [f"    {example}" for example in examples[:EXAMPLES_PER_PROBLEM]]
    return "\n".join(lines)
