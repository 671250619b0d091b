"""``invoker loadgen``: drive a running invoker with activations and check that none was lost.

One run:

1. counts the records already in the store (for the duplicate check);
2. makes sure the feed and completions topics exist, assigns every partition of the completions
   topic to a group-less consumer and seeks it to the current end, so only completions
   published from now on are seen; a thread consumes them while the run produces;
3. produces activation messages (keyed by activation id, ``acks="all"``) at ``rate`` per second
   or as fast as possible, for ``count`` messages or ``duration_s`` seconds, cycling through
   ``actions`` round-robin (list a spec several times to weight it);
4. waits up to ``completion_timeout_s`` (counted from the end of producing) for a completion of
   every produced activation — the daemon publishes a completion only once the record is
   durably stored, so produce → completion is produce → stored;
5. reads every produced id back from the store (``get_many``), counts the store again, reads
   the daemons' ``/metrics`` and returns a :class:`Report`.

All activations of a run use one namespace (``loadgen-<random hex>`` unless given) so the
checks only ever look at this run's records. Every wait is bounded by a timeout.

Action specs (``ACTIONS``; all ``python:3`` actions with inline code):

========== ==================================================================================
echo       returns its params
noop       returns ``{}``
sleep:MS   sleeps MS milliseconds (default 100)
cpu:MS     burns CPU in a busy loop for MS milliseconds of wall time (default 100)
error      returns ``{"error": ...}``: an *application error*
raise      raises: an *action developer error*
logs:N     prints N lines to stdout (default 10)
big:KB     returns ``{"data": "xxx..."}`` of KB KiB once JSON-encoded (default 64)
========== ==================================================================================

When no explicit limits are given, ``sleep``/``cpu`` ask for a timeout long enough to finish
and ``logs`` for a logs limit large enough to keep every line, but only when the daemon's
defaults (60 s, 10 KB) would not do; otherwise the message carries no limits at all.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from invoker.config import ENV_PREFIX, Config
from invoker.messages import NAME_RULE, valid_name
from store import doc_id_for

KIND = "python:3"
ACTION_VERSION = "0.0.1"
STORE_CHUNK = 500  # doc ids per get_many call
STORE_TIMEOUT_S = 60.0  # bound on each store session (count, or the whole read-back)
METRICS_TIMEOUT_S = 5.0
KAFKA_TIMEOUT_S = 30.0  # producer max_block / request timeout, flush, admin calls
TOPIC_METADATA_TIMEOUT_S = 15.0
PROGRESS_INTERVAL_S = 0.2  # at most 5 refreshes a second


class LoadgenError(RuntimeError):
    """The run could not be carried out (Kafka or the store unreachable at the start...)."""


# --- actions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActionTemplate:
    """A built-in action. ``source`` is Python code with ``{arg}`` for the spec's number."""

    description: str
    source: str
    arg_name: str | None = None  # "ms", "lines", "kb"; None: the spec takes no argument
    default_arg: int | None = None
    max_arg: int | None = None

    def code(self, arg: int | None) -> str:
        return self.source.replace("{arg}", str(arg)) if self.arg_name else self.source


ACTIONS: dict[str, ActionTemplate] = {
    "echo": ActionTemplate(
        "returns its params",
        "def main(params):\n"
        "    return dict(params)\n"),
    "noop": ActionTemplate(
        "returns {}",
        "def main(params):\n"
        "    return {}\n"),
    "sleep": ActionTemplate(
        "sleeps <ms> milliseconds",
        "import time\n\n\n"
        "def main(params):\n"
        "    time.sleep({arg} / 1000.0)\n"
        "    return {'slept_ms': {arg}}\n",
        arg_name="ms", default_arg=100, max_arg=300_000),
    "cpu": ActionTemplate(
        "burns CPU for <ms> milliseconds",
        "import time\n\n\n"
        "def main(params):\n"
        "    deadline = time.perf_counter() + {arg} / 1000.0\n"
        "    iterations, x = 0, 1\n"
        "    while time.perf_counter() < deadline:\n"
        "        for _ in range(1000):\n"
        "            x = (x * 1103515245 + 12345) % 2147483648\n"
        "        iterations += 1000\n"
        "    return {'burned_ms': {arg}, 'iterations': iterations}\n",
        arg_name="ms", default_arg=100, max_arg=300_000),
    "error": ActionTemplate(
        "returns {'error': ...} (application error)",
        "def main(params):\n"
        "    return {'error': 'loadgen: deliberate application error'}\n"),
    "raise": ActionTemplate(
        "raises (action developer error)",
        "def main(params):\n"
        "    raise RuntimeError('loadgen: deliberate developer error')\n"),
    "logs": ActionTemplate(
        "prints <lines> lines",
        "def main(params):\n"
        "    for i in range({arg}):\n"
        "        print('loadgen log line %d of {arg}' % (i + 1))\n"
        "    return {'lines': {arg}}\n",
        arg_name="lines", default_arg=10, max_arg=1_000_000),
    "big": ActionTemplate(
        "returns a result of about <kb> KB",
        "def main(params):\n"
        "    # {\"data\":\"...\"} is 11 bytes besides the payload\n"
        "    return {'data': 'x' * max(0, {arg} * 1024 - 11)}\n",
        arg_name="kb", default_arg=64, max_arg=64 * 1024),
}


@dataclass(frozen=True)
class ParsedAction:
    spec: str
    kind: str  # key of ACTIONS
    arg: int | None
    name: str  # the action name in messages; distinct per spec so containers are not shared
    code: str


@functools.lru_cache(maxsize=256)
def parse_action_spec(spec: str) -> ParsedAction:
    """``"sleep:250"`` → ParsedAction. Raises ValueError for an unknown or malformed spec."""
    if not isinstance(spec, str):
        raise ValueError(f"action spec must be a string, got {spec!r}")
    kind, sep, raw_arg = spec.strip().partition(":")
    template = ACTIONS.get(kind)
    if template is None:
        raise ValueError(f"unknown action spec {spec!r} (known: {', '.join(action_spec_help())})")
    if template.arg_name is None:
        if sep:
            raise ValueError(f"action {kind!r} takes no argument: {spec!r}")
        return ParsedAction(spec, kind, None, f"loadgen-{kind}", template.code(None))
    if sep:
        if not re.fullmatch(r"\d{1,9}", raw_arg):
            raise ValueError(f"action spec {spec!r}: <{template.arg_name}> must be a "
                             "non-negative integer")
        arg = int(raw_arg)
    else:
        assert template.default_arg is not None
        arg = template.default_arg
    if template.max_arg is not None and arg > template.max_arg:
        raise ValueError(f"action spec {spec!r}: <{template.arg_name}> is at most "
                         f"{template.max_arg}")
    return ParsedAction(spec, kind, arg, f"loadgen-{kind}-{arg}", template.code(arg))


def action_spec_help() -> list[str]:
    return [f"{k}:<{t.arg_name}>" if t.arg_name else k for k, t in ACTIONS.items()]


def _auto_limits(action: ParsedAction) -> dict[str, int] | None:
    """Limits an action needs beyond the daemon's defaults, or None when the defaults do."""
    defaults = Config.__dataclass_fields__
    if action.kind in ("sleep", "cpu") and action.arg is not None:
        default_timeout = defaults["default_timeout_ms"].default
        needed = action.arg + 5_000
        if needed > default_timeout:
            return {"timeout": min(needed, defaults["max_timeout_ms"].default)}
    if action.kind == "logs" and action.arg is not None:
        default_kb = defaults["default_logs_kb"].default
        # "loadgen log line N of M" plus the daemon's timestamp/stream prefix, per line
        needed = math.ceil(action.arg * (64 + 2 * len(str(action.arg))) / 1024) + 1
        if needed > default_kb:
            return {"logs": min(needed, defaults["max_logs_kb"].default)}
    return None


def check_namespace(namespace: str) -> str:
    if not valid_name(namespace):
        raise ValueError(f"invalid namespace {namespace!r} ({NAME_RULE})")
    return namespace


def activation_message(action_spec: str, namespace: str, *, activation_id: str | None = None,
                       blocking: bool = False, limits: dict | None = None) -> dict:
    """An activation message the daemon accepts (see :mod:`invoker.messages`).

    ``limits`` None: the action's automatic limits, if any (see the module docstring);
    ``{}`` or a dict: exactly those (OpenWhisk keys ``timeout``, ``memory``, ``logs``,
    ``concurrency``).
    """
    action = parse_action_spec(action_spec)
    check_namespace(namespace)
    activation_id = activation_id or uuid.uuid4().hex
    action_doc: dict[str, Any] = {
        "name": action.name,
        "version": ACTION_VERSION,
        "kind": KIND,
        "code": action.code,
        "main": "main",
        "binary": False,
    }
    chosen = _auto_limits(action) if limits is None else dict(limits)
    if chosen:
        action_doc["limits"] = chosen
    return {
        "activationId": activation_id,
        "namespace": namespace,
        "action": action_doc,
        "params": {"loadgen": action.spec},
        "blocking": bool(blocking),
        "transid": f"loadgen-{activation_id[:12]}",
        "submittedAt": int(time.time() * 1000),
    }


# --- pure helpers --------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p!r}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


class TokenBucket:
    """Pacing for ``rate`` messages per second, with a burst of ``burst`` messages.

    :meth:`reserve` takes one token and says how long to wait before using it; tokens may go
    negative (a reservation), so a caller that sleeps the returned time keeps the average
    rate exactly, and oversleeping is made up from the burst instead of being lost. Pure:
    the caller passes the clock.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        # Default: 50 ms worth of messages, at least one.
        self.burst = max(1.0, float(burst) if burst is not None else self.rate * 0.05)
        self.tokens = self.burst
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def parse_metrics(text: str) -> dict[str, float]:
    """The daemon figures from one Prometheus text exposition (absent ones are left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "invoker_process_peak_rss_bytes": "peak_rss",
        "invoker_feed_pauses_total": "pauses",
        "invoker_feed_paused_seconds_total": "paused_seconds",
        "invoker_overflow_records_total": "overflowed",
    }
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + float(sample.value)
    return found


def combine_metrics(per_daemon: Iterable[dict[str, float]]) -> dict[str, float]:
    """Peak RSS: the max over daemons; pauses, paused seconds, overflowed: sums."""
    total = {"peak_rss": 0.0, "pauses": 0.0, "paused_seconds": 0.0, "overflowed": 0.0}
    for figures in per_daemon:
        total["peak_rss"] = max(total["peak_rss"], figures.get("peak_rss", 0.0))
        for key in ("pauses", "paused_seconds", "overflowed"):
            total[key] += figures.get(key, 0.0)
    return total


# --- spec and report -----------------------------------------------------------------------

def _default_namespace() -> str:
    return f"loadgen-{secrets.token_hex(4)}"


@dataclass
class LoadSpec:
    """What to run. ``duration_s``, when set, governs and ``count`` is ignored.

    ``actions`` are used round-robin (message i gets ``actions[i % len(actions)]``); repeat a
    spec to weight it. ``rate`` None: as fast as possible. ``completion_timeout_s`` counts
    from the end of producing. ``progress``: draw a progress bar on stderr when stderr is a
    terminal; ``force_progress`` also when it is not. ``store_url`` None: the daemon default
    (SQLite ``./invoker-records.sqlite3``).
    """

    bootstrap: str = "127.0.0.1:9092"
    feed_topic: str = "invoker-activations"
    completions_topic: str = "invoker-completions"
    store_url: str | None = None
    actions: list[str] = field(default_factory=lambda: ["echo"])
    count: int | None = 100
    duration_s: float | None = None
    rate: float | None = None
    namespace: str = field(default_factory=_default_namespace)
    metrics_urls: list[str] = field(default_factory=list)
    completion_timeout_s: float = 120.0
    progress: bool = True
    blocking: bool = False
    force_progress: bool = False
    topic_partitions: int = 4  # only used when loadgen has to create a missing topic
    limits: dict | None = None  # passed to activation_message for every message

    def validate(self) -> None:
        """Raise ValueError for anything that makes the spec unusable."""
        if not self.actions:
            raise ValueError("at least one action spec is needed")
        for spec in self.actions:
            parse_action_spec(spec)
        check_namespace(self.namespace)
        if self.duration_s is None:
            if self.count is None:
                raise ValueError("set count or duration_s")
            if self.count < 0:
                raise ValueError(f"count must be >= 0, got {self.count}")
        elif not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if not self.completion_timeout_s >= 0:
            raise ValueError("completion_timeout_s must be >= 0")
        if not self.bootstrap:
            raise ValueError("bootstrap servers are required")


@dataclass
class Report:
    namespace: str = ""
    produced: int = 0  # acknowledged by Kafka
    produce_errors: int = 0  # sends that failed or were never acknowledged
    completed: int = 0  # distinct produced ids with at least one completion message
    completion_messages: int = 0  # all completion messages for produced ids, repeats included
    stored: int = 0  # distinct produced ids found in the store
    lost: int = 0  # produced but not in the store
    duplicate_records: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    daemon_peak_rss_bytes: int = 0
    daemon_pauses: int = 0
    daemon_paused_seconds: float = 0.0
    overflowed: int = 0
    wall_s: float = 0.0
    produce_s: float = 0.0  # first send → all acknowledged
    completion_wait_timed_out: bool = False
    store_count_before: int | None = None
    store_count_after: int | None = None
    store_checked: bool = False
    metrics_read: int = 0  # metrics URLs read successfully
    errors: list[str] = field(default_factory=list)
    # produce → first completion per completed activation id, in ms; not part of
    # format()/to_dict()/to_json() (it is per activation), for benchmarks (bench/)
    latencies_ms: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def repeated_completions(self) -> int:
        """Completion messages beyond the first per activation (re-executed activations)."""
        return self.completion_messages - self.completed

    @property
    def missing_completions(self) -> int:
        return self.produced - self.completed

    @property
    def ok(self) -> bool:
        """Nothing lost, no duplicate, every message produced and the store checked.

        ``errors`` alone (a metrics URL that did not answer, a completions consumer that
        failed) do not fail a run: the store check is what decides.
        """
        return (self.lost == 0 and self.duplicate_records == 0 and self.produce_errors == 0
                and self.store_checked)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("latencies_ms", None)
        doc["repeated_completions"] = self.repeated_completions
        doc["missing_completions"] = self.missing_completions
        doc["ok"] = self.ok
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def format(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}"

        status = ", ".join(f"{k}={v}" for k, v in sorted(self.by_status.items())) or "-"
        if self.metrics_read:
            rss = f"{self.daemon_peak_rss_bytes / 2**20:.1f} MiB"
            pauses = f"{self.daemon_pauses} ({self.daemon_paused_seconds:.2f} s paused)"
            overflowed = str(self.overflowed)
        else:
            rss = pauses = overflowed = "n/a (no metrics read)"
        if self.store_count_before is not None and self.store_count_after is not None:
            counts = f" (store count {self.store_count_before} -> {self.store_count_after})"
        else:
            counts = ""
        rows = [
            ("namespace", self.namespace),
            ("produced", f"{self.produced}  ({self.produce_errors} produce errors, "
                         f"{self.produce_s:.2f} s)"),
            ("completed", f"{self.completed}  ({self.completion_messages} completion messages, "
                          f"{self.repeated_completions} repeated, {self.missing_completions} "
                          "missing" + (", wait timed out" if self.completion_wait_timed_out
                                       else "") + ")"),
            ("stored", str(self.stored) if self.store_checked else f"{self.stored} (NOT CHECKED)"),
            ("lost", str(self.lost)),
            ("duplicate records", f"{self.duplicate_records}{counts}"),
            ("by status", status),
            ("throughput", f"{self.throughput_per_s:.1f} /s"),
            ("latency p50/p95/p99", f"{ms(self.latency_ms_p50)} / {ms(self.latency_ms_p95)} / "
                                    f"{ms(self.latency_ms_p99)} ms"),
            ("daemon peak RSS", rss),
            ("daemon pauses", pauses),
            ("overflowed", overflowed),
            ("wall time", f"{self.wall_s:.2f} s"),
        ]
        rows += [("error", e) for e in self.errors]
        rows.append(("result", "OK" if self.ok else "FAILED"))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


# --- Kafka helpers -------------------------------------------------------------------------

def _servers(bootstrap: str) -> list[str]:
    return [s.strip() for s in bootstrap.split(",") if s.strip()]


def _ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    """Create the missing ones of ``topics`` (as the daemon would); existing ones are kept."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=_servers(bootstrap), client_id="invoker-loadgen",
                             request_timeout_ms=10_000)
    try:
        missing = [t for t in dict.fromkeys(topics) if t not in set(admin.list_topics())]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def _assign_all(consumer: Any, topic: str, timeout_s: float) -> list[Any]:
    """Assign every partition of ``topic``, waiting (bounded) for its metadata."""
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            break
        if time.monotonic() >= deadline:
            raise LoadgenError(f"topic {topic!r} has no partitions (does it exist?)")
        time.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


def _new_consumer(bootstrap: str) -> Any:
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=_servers(bootstrap),
        client_id="invoker-loadgen",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000) + 5000,
    )


def _new_producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=_servers(bootstrap),
        client_id="invoker-loadgen",
        acks="all",
        linger_ms=5,
        max_block_ms=int(KAFKA_TIMEOUT_S * 1000),
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000),
    )


def _encode_message(message: bytes | bytearray | dict) -> bytes:
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return json.dumps(message, separators=(",", ":")).encode()


def produce_messages(bootstrap: str, topic: str, messages: list[bytes | dict],
                     key: bytes | str | None = None, *, timeout_s: float = KAFKA_TIMEOUT_S) -> None:
    """Send ``messages`` to ``topic`` and wait until Kafka acknowledged every one.

    Dicts are JSON-encoded; bytes are sent as they are (for malformed messages). ``key`` is
    used for every message; None keys each dict by its ``activationId`` (if it has a string
    one) and sends bytes unkeyed. Raises kafka.errors.KafkaError on failure.
    """
    fixed_key = key.encode() if isinstance(key, str) else key
    producer = _new_producer(bootstrap)
    try:
        futures = []
        for message in messages:
            message_key = fixed_key
            if message_key is None and isinstance(message, dict):
                activation_id = message.get("activationId")
                if isinstance(activation_id, str):
                    message_key = activation_id.encode()
            futures.append(producer.send(topic, value=_encode_message(message), key=message_key))
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
    finally:
        producer.close(timeout=5)


def read_completions(bootstrap: str, topic: str, ids: set[str], timeout_s: float
                     ) -> dict[str, list[dict]]:
    """Completion messages on ``topic`` for ``ids``, waiting until each id has at least one or
    ``timeout_s`` passed. Reads the topic from its beginning. The result has only the ids that
    got a completion (so ``ids - result.keys()`` are the missing ones); each maps to all its
    messages, in order.
    """
    wanted = set(ids)
    found: dict[str, list[dict]] = {}
    if not wanted:
        return found
    deadline = time.monotonic() + timeout_s
    consumer = _new_consumer(bootstrap)
    try:
        try:
            tps = _assign_all(consumer, topic, max(0.0, timeout_s))
        except LoadgenError:
            return found
        consumer.seek_to_beginning(*tps)
        while len(found) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batches = consumer.poll(timeout_ms=int(min(left, 0.5) * 1000) or 1)
            for records in batches.values():
                for record in records:
                    doc = _decode_completion(record.value)
                    if doc is not None and doc["activationId"] in wanted:
                        found.setdefault(doc["activationId"], []).append(doc)
    finally:
        consumer.close()
    return found


def _decode_completion(raw: bytes | None) -> dict | None:
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("activationId"), str):
        return None
    return doc


class _CompletionCollector:
    """Consumes the completions topic on a thread, from the end it had when started."""

    def __init__(self, bootstrap: str, topic: str, namespace: str,
                 expected: dict[str, float]) -> None:
        self._namespace = namespace
        self._expected = expected  # activation id -> send time; filled before each send
        self.cond = threading.Condition()
        self.first_seen: dict[str, float] = {}  # guarded by cond
        self._arrivals: list[str] = []  # ids in first-seen order, guarded by cond
        self.messages: dict[str, list[dict]] = {}  # guarded by cond
        self.error: str | None = None
        self._stop = threading.Event()
        self._consumer = _new_consumer(bootstrap)
        try:
            tps = _assign_all(self._consumer, topic, TOPIC_METADATA_TIMEOUT_S)
            # Explicit end offsets (not a lazy seek_to_end): everything published after this
            # point is read, however late the first poll happens.
            ends = self._consumer.end_offsets(tps)
            for tp in tps:
                self._consumer.seek(tp, ends[tp])
        except Exception:
            self._consumer.close()
            raise
        self._thread = threading.Thread(target=self._run, name="loadgen-completions",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batches = self._consumer.poll(timeout_ms=100)
                now = time.monotonic()
                for records in batches.values():
                    for record in records:
                        self._take(_decode_completion(record.value), now)
        except Exception as exc:  # reported, and the waiters stop waiting
            with self.cond:
                self.error = f"completions consumer failed: {type(exc).__name__}: {exc}"
                self.cond.notify_all()

    def _take(self, doc: dict | None, now: float) -> None:
        if doc is None or doc.get("namespace", self._namespace) != self._namespace:
            return
        activation_id = doc["activationId"]
        if activation_id not in self._expected:
            return  # a foreign id
        with self.cond:
            self.messages.setdefault(activation_id, []).append(doc)
            if activation_id not in self.first_seen:
                self.first_seen[activation_id] = now
                self._arrivals.append(activation_id)
            self.cond.notify_all()

    def completed_count(self) -> int:
        return len(self.first_seen)

    def wait_for(self, ids: set[str], deadline: float) -> bool:
        """Wait until every id in ``ids`` completed or ``deadline`` (monotonic); True if all.

        Linear overall: each wake-up only looks at the arrivals since the previous one.
        """
        with self.cond:
            remaining = {i for i in ids if i not in self.first_seen}
            seen = len(self._arrivals)
            while True:
                remaining.difference_update(self._arrivals[seen:])
                seen = len(self._arrivals)
                if not remaining:
                    return True
                if self.error is not None:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        try:
            self._consumer.close()
        except Exception:
            pass


# --- progress ------------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on ``stream``, redrawn by a thread at most 5 times a second."""

    def __init__(self, stream: TextIO, render: Callable[[], str]) -> None:
        self._stream = stream
        self._render = render
        self._stop = threading.Event()
        self._width = 0
        self._thread = threading.Thread(target=self._run, name="loadgen-progress", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        line = self._render()
        pad = max(0, self._width - len(line))
        self._width = len(line)
        try:
            self._stream.write("\r" + line + " " * pad)
            self._stream.flush()
        except (OSError, ValueError):
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            self._draw()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._draw()
        try:
            self._stream.write("\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def progress_line(produced: int, target: int | None, completed: int, elapsed_s: float,
                  duration_s: float | None = None, phase: str = "producing",
                  width: int = 24) -> str:
    """The text of the progress bar (pure, for tests)."""
    if phase == "producing":
        if duration_s:
            fraction = elapsed_s / duration_s
        else:
            fraction = produced / target if target else 1.0
    else:
        fraction = completed / produced if produced else 1.0
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    bar = "#" * filled + "." * (width - filled)
    total = f"/{target}" if target is not None and not duration_s else ""
    rate = completed / elapsed_s if elapsed_s > 0 else 0.0
    return (f"[{bar}] {phase}: produced {produced}{total}  completed {completed}  "
            f"{rate:.1f}/s  {elapsed_s:.1f}s")


# --- the run -------------------------------------------------------------------------------

def store_session(url: str | None, body: Callable[[Any], Any],
                  timeout_s: float = STORE_TIMEOUT_S) -> Any:
    """Open the store, run ``await body(store)``, close it — in a private trio run (bounded)."""
    import trio

    from store import open_store

    async def main() -> Any:
        with trio.fail_after(timeout_s):
            store = open_store(url)
            await store.open()
            try:
                return await body(store)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await store.aclose()

    return trio.run(main)


def _read_store(url: str | None, doc_ids: list[str]) -> tuple[dict[str, dict], int]:
    async def body(store: Any) -> tuple[dict[str, dict], int]:
        found: dict[str, dict] = {}
        for start in range(0, len(doc_ids), STORE_CHUNK):
            found.update(await store.get_many(doc_ids[start:start + STORE_CHUNK]))
        return found, await store.count()

    # 60 s, plus 10 s per 50,000 ids
    return store_session(url, body, STORE_TIMEOUT_S + len(doc_ids) / 50_000 * 10)


def _count_store(url: str | None) -> int:
    async def body(store: Any) -> int:
        return await store.count()

    return store_session(url, body)


def _read_daemon_metrics(urls: Sequence[str], report: Report) -> None:
    import httpx

    figures = []
    for url in urls:
        try:
            response = httpx.get(url, timeout=METRICS_TIMEOUT_S)
            response.raise_for_status()
            figures.append(parse_metrics(response.text))
        except Exception as exc:
            report.errors.append(f"metrics {url}: {type(exc).__name__}: {exc}")
    if figures:
        total = combine_metrics(figures)
        report.daemon_peak_rss_bytes = int(total["peak_rss"])
        report.daemon_pauses = int(total["pauses"])
        report.daemon_paused_seconds = total["paused_seconds"]
        report.overflowed = int(total["overflowed"])
        report.metrics_read = len(figures)


def run_load(spec: LoadSpec) -> Report:
    """Run one load test (blocking; safe to call from a worker thread). See the module doc.

    Raises ValueError for an invalid spec or store URL and LoadgenError when Kafka or the store
    is unusable before anything was produced; later failures end up in ``Report.errors``.
    """
    spec.validate()
    from kafka.errors import KafkaError

    wall_start = time.monotonic()
    report = Report(namespace=spec.namespace)
    try:
        report.store_count_before = _count_store(spec.store_url)
    except ValueError:
        raise
    except Exception as exc:
        raise LoadgenError(f"store unusable before the run: {type(exc).__name__}: {exc}") from exc

    try:
        _ensure_topics(spec.bootstrap, [spec.feed_topic, spec.completions_topic],
                       spec.topic_partitions)
    except KafkaError as exc:
        raise LoadgenError(f"cannot reach Kafka at {spec.bootstrap}: {exc!r}") from exc

    sent_at: dict[str, float] = {}  # activation id -> monotonic send time (set before send)
    acked: set[str] = set()
    failed: dict[str, str] = {}
    state = {"phase": "producing", "produced": 0, "first_send": None}
    try:
        collector = _CompletionCollector(spec.bootstrap, spec.completions_topic, spec.namespace,
                                         sent_at)
    except KafkaError as exc:
        raise LoadgenError(f"cannot read {spec.completions_topic!r}: {exc!r}") from exc

    progress = None
    if spec.progress and (spec.force_progress or sys.stderr.isatty()):
        target = None if spec.duration_s else spec.count

        def render() -> str:
            first = state["first_send"]
            elapsed = time.monotonic() - first if first is not None else 0.0
            return progress_line(state["produced"], target, collector.completed_count(),
                                 elapsed, spec.duration_s, state["phase"])

        progress = _Progress(sys.stderr, render)

    producer = None
    try:
        try:
            producer = _new_producer(spec.bootstrap)
        except KafkaError as exc:
            raise LoadgenError(f"cannot produce to Kafka at {spec.bootstrap}: {exc!r}") from exc

        def on_ack(activation_id: str, _metadata: Any) -> None:
            acked.add(activation_id)

        def on_error(activation_id: str, exc: BaseException) -> None:
            failed[activation_id] = f"{type(exc).__name__}: {exc}"

        bucket = TokenBucket(spec.rate) if spec.rate else None
        start = time.monotonic()
        state["first_send"] = start
        stop_at = start + spec.duration_s if spec.duration_s else None
        actions = list(spec.actions)
        index = 0
        while True:
            now = time.monotonic()
            if stop_at is not None:
                if now >= stop_at:
                    break
            elif index >= (spec.count or 0):
                break
            if bucket is not None:
                delay = bucket.reserve(now)
                if delay > 0:
                    if stop_at is not None and now + delay >= stop_at:
                        break
                    time.sleep(delay)
            message = activation_message(actions[index % len(actions)], spec.namespace,
                                         blocking=spec.blocking, limits=spec.limits)
            activation_id = message["activationId"]
            sent_at[activation_id] = time.monotonic()
            try:
                future = producer.send(spec.feed_topic, value=_encode_message(message),
                                       key=activation_id.encode())
            except KafkaError as exc:
                failed[activation_id] = f"{type(exc).__name__}: {exc}"
                report.errors.append(f"producing stopped after {index} messages: {exc!r}")
                break
            future.add_callback(functools.partial(on_ack, activation_id))
            future.add_errback(functools.partial(on_error, activation_id))
            index += 1
            state["produced"] = index
        try:
            producer.flush(timeout=KAFKA_TIMEOUT_S)
        except KafkaError as exc:
            report.errors.append(f"flush failed: {exc!r}")
        produce_end = time.monotonic()
        report.produce_s = produce_end - start

        produced = {i for i in sent_at if i in acked}
        report.produced = len(produced)
        report.produce_errors = len(sent_at) - len(produced)
        if report.produce_errors:
            example = next(iter(failed.values()), "not acknowledged in time")
            report.errors.append(f"{report.produce_errors} messages not acknowledged by Kafka "
                                 f"(e.g. {example})")
        state["phase"] = "waiting"
        all_done = collector.wait_for(produced, produce_end + spec.completion_timeout_s)
        report.completion_wait_timed_out = not all_done and collector.error is None
        if collector.error is not None:
            report.errors.append(collector.error)
    finally:
        if producer is not None:
            producer.close(timeout=5)
        collector.close()
        if progress is not None:
            progress.close()

    with collector.cond:
        first_seen = {i: t for i, t in collector.first_seen.items() if i in produced}
        report.completion_messages = sum(len(collector.messages.get(i, ())) for i in produced)
    report.completed = len(first_seen)
    report.latencies_ms = {i: (t - sent_at[i]) * 1000.0 for i, t in first_seen.items()}
    latencies = list(report.latencies_ms.values())
    report.latency_ms_p50 = percentile(latencies, 50)
    report.latency_ms_p95 = percentile(latencies, 95)
    report.latency_ms_p99 = percentile(latencies, 99)
    if first_seen:
        span = max(first_seen.values()) - start
        report.throughput_per_s = len(first_seen) / span if span > 0 else 0.0

    # Every id that was sent, acknowledged or not: an unacknowledged message may still have
    # reached the daemon, and its record must not count as a duplicate.
    all_doc_ids = [doc_id_for(spec.namespace, i) for i in sent_at]
    try:
        found, count_after = _read_store(spec.store_url, all_doc_ids)
    except Exception as exc:
        report.errors.append(f"store check failed: {type(exc).__name__}: {exc}")
        report.lost = report.produced
    else:
        report.store_checked = True
        report.store_count_after = count_after
        by_status: dict[str, int] = {}
        stored = 0
        for activation_id in produced:
            record = found.get(doc_id_for(spec.namespace, activation_id))
            if record is None:
                continue
            stored += 1
            response = record.get("response") if isinstance(record, dict) else None
            status = response.get("status") if isinstance(response, dict) else None
            label = status if isinstance(status, str) else "unknown"
            by_status[label] = by_status.get(label, 0) + 1
        report.stored = stored
        report.lost = report.produced - stored
        report.by_status = by_status
        assert report.store_count_before is not None
        # Valid only while nothing else writes to the store: the store is keyed by
        # "<namespace>/<activationId>", so growth beyond our own ids means a second copy.
        growth = count_after - report.store_count_before
        report.duplicate_records = max(0, growth - len(found))

    _read_daemon_metrics(spec.metrics_urls, report)
    report.wall_s = time.monotonic() - wall_start
    return report


# --- CLI -----------------------------------------------------------------------------------

def add_parser(commands: Any) -> argparse.ArgumentParser:
    defaults = Config.__dataclass_fields__
    parser = commands.add_parser(
        "loadgen", help="produce activations and check that every one was stored",
        description="Produce activations to the feed topic at a rate or as fast as possible, "
                    "wait for their completions, check the store and print a report. Exits 0 "
                    "when nothing was lost or duplicated, 1 otherwise, 2 on usage errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="action specs (round-robin; repeat one to weight it):\n" + "\n".join(
            f"  {name:<14}{t.description}"
            + (f" (default {t.default_arg})" if t.default_arg is not None else "")
            for name, t in zip(action_spec_help(), ACTIONS.values(), strict=True)))
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap servers (env INVOKER_KAFKA_BOOTSTRAP, default "
                             f"{defaults['kafka_bootstrap'].default})")
    parser.add_argument("--feed-topic", metavar="TOPIC",
                        help="env INVOKER_FEED_TOPIC, default "
                             f"{defaults['feed_topic'].default}")
    parser.add_argument("--completions-topic", metavar="TOPIC",
                        help="env INVOKER_COMPLETIONS_TOPIC, default "
                             f"{defaults['completions_topic'].default}")
    parser.add_argument("--store-url", metavar="URL",
                        help="the daemon's store (env INVOKER_STORE_URL, default "
                             f"{defaults['store_url'].default})")
    parser.add_argument("--action", dest="actions", action="append", metavar="SPEC",
                        help="action spec, repeatable (default: echo)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, metavar="N", help="activations to produce "
                        "(default 100)")
    amount.add_argument("--duration", type=float, metavar="SECONDS",
                        help="produce for this long instead of a count")
    parser.add_argument("--rate", type=float, metavar="PER_SECOND",
                        help="activations per second (default: as fast as possible)")
    parser.add_argument("--namespace", help="namespace of the activations (default: "
                        "loadgen-<random hex>, unique per run)")
    parser.add_argument("--metrics-url", dest="metrics_urls", action="append", default=[],
                        metavar="URL", help="a daemon's /metrics URL, repeatable")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for completions after producing (default 120)")
    parser.add_argument("--blocking", action="store_true",
                        help="mark activations blocking (completions then carry results)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true",
                       help="no progress bar (by default it is drawn when stderr is a terminal)")
    shown.add_argument("--progress", action="store_true",
                       help="draw the progress bar even when stderr is not a terminal")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_handle)
    return parser


def spec_from_args(args: argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> LoadSpec:
    """Flags > INVOKER_* environment > defaults. Raises ValueError on bad values."""
    env = os.environ if environ is None else environ
    defaults = Config.__dataclass_fields__

    def pick(flag: str | None, field_name: str) -> str:
        """The flag, else INVOKER_<FIELD_NAME>, else the Config default."""
        if flag:
            return flag
        return env.get(ENV_PREFIX + field_name.upper()) or defaults[field_name].default

    spec = LoadSpec(
        bootstrap=pick(args.bootstrap, "kafka_bootstrap"),
        feed_topic=pick(args.feed_topic, "feed_topic"),
        completions_topic=pick(args.completions_topic, "completions_topic"),
        store_url=pick(args.store_url, "store_url"),
        actions=list(args.actions or ["echo"]),
        count=args.count if args.count is not None else 100,
        duration_s=args.duration,
        rate=args.rate,
        metrics_urls=list(args.metrics_urls or []),
        completion_timeout_s=args.timeout,
        progress=not args.no_progress,
        force_progress=bool(args.progress),
        blocking=bool(args.blocking),
    )
    if args.namespace:
        spec.namespace = args.namespace
    spec.validate()
    return spec


def _handle(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)  # ValueError: the CLI exits 2
    try:
        report = run_load(spec)
    except ValueError:
        raise
    except KeyboardInterrupt:
        print("invoker loadgen: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"invoker loadgen: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        sys.stdout.write(report.format() + "\n")
    return 0 if report.ok else 1
