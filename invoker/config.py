"""Daemon configuration: flags > ``INVOKER_*`` environment > TOML file > defaults.

Every field of :class:`Config` is settable in all three places under the same name
(``--record-channel-size``, ``INVOKER_RECORD_CHANNEL_SIZE``, ``record_channel_size = ...``).
Mapping fields take JSON in flags and environment variables and a table in TOML.

Each field is declared with :func:`setting`, which carries its one-line help, unit, group and
the commands that read it: ``invoker run --help``, ``invoker recorder --help`` and the README's
settings table (``python -m invoker.config --readme README.md``, which ``make docs`` runs) are
all made from that, so a setting is documented once.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import posixpath
import re
import socket
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from invoker.model import Limits
from store import mask_url

ENV_PREFIX = "INVOKER_"
# Room for everything in a record besides its result and logs (ids, annotations, JSON syntax).
RECORD_OVERHEAD_BYTES = 16 * 1024
# What a built record keeps as objects besides its JSON (store.EncodedRecord: its scalars; ~0.8
# KiB measured, tests/unit/test_records.py holds it to this).
RECORD_OBJECT_BYTES = 2048
# A running activation's collected log lines (objects and their formatted text) over its log
# limit, at most: 3.8 measured for ASCII, 7.9 for lines that one emoji makes Python keep at 4
# bytes a character (tests/unit/test_container_log.py holds it to this).
LOG_OBJECTS_FACTOR = 9
# Parsed JSON's size over its text at worst, while it is parsed: objects of one empty key
# nested ({"":{"":{}}}..., 48.6x measured with orjson); with the standard parser nested empty
# lists, 44.5x, 47.5x when one emoji makes its copy of the text 4 bytes a character
# (tests/unit/test_safejson.py holds shapes to it on both). One message or answer is parsed at
# a time (on the trio thread), and only its JSON is kept.
PARSED_JSON_FACTOR = 50
# Records already stored that the batcher reads back at once (re-executions): each is parsed
# whole before it is kept encoded.
READ_BACK_CHUNK = 8
# Bound of revoke_wait_ms: a fifth of the group's rebalance timeout (max_poll_interval_ms).
REVOKE_WAIT_MAX_MS = 60_000
# How long the broker holds a fetch of an idle feed (min_bytes 1: the first message returns it).
FETCH_IDLE_WAIT_MS = 100

# The commands that read settings; a setting names those that read it (see `setting`).
RUN, RECORDER = "run", "recorder"
COMMANDS = (RUN, RECORDER)
# Setting groups, in the order --help and the README show them, with what they are about.
GROUPS: dict[str, str] = {
    "identity": "Who this process is.",
    "Kafka": "Brokers and topics of the feed, completions and dead letters.",
    "store": "Where activation records go.",
    "pipeline bounds": "How much may wait at each stage between the feed and the store: what "
                       "bounds memory (invoker_worst_case_buffered_bytes adds it up).",
    "containers": "The action containers: images, resources, isolation.",
    "action limits": "Limits of an action that sets none, and the ranges an action's own limits "
                     "must fall in.",
    "overflow": "Records the record channel cannot take go to a Kafka topic; recorders store "
                "them.",
    "operations": "/metrics, /healthz and /status, stopping, logging.",
}
# The README's settings tables sit between these lines (see write_readme).
MARKDOWN_BEGIN = ("<!-- settings:begin (generated from invoker/config.py by `make docs`: "
                  "edit the settings there) -->")
MARKDOWN_END = "<!-- settings:end -->"

_T = TypeVar("_T")


@overload
def setting(default: _T, *, group: str, help: str, unit: str = "",
            commands: tuple[str, ...] = COMMANDS, metavar: str = "",
            secret: bool = False) -> _T: ...


@overload
def setting(*, factory: Callable[[], _T], group: str, help: str, unit: str = "",
            commands: tuple[str, ...] = COMMANDS, metavar: str = "",
            shown_default: str = "") -> _T: ...


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            group: str, help: str, unit: str = "", commands: tuple[str, ...] = COMMANDS,
            metavar: str = "", secret: bool = False, shown_default: str = "") -> Any:
    """A :class:`Config` field with its documentation: a one-line ``help`` (no final period),
    its ``unit`` (empty for names and text), its ``group`` (a key of GROUPS) and the
    ``commands`` that read it. ``factory`` makes a default per instance; ``shown_default``
    says what it makes where the value depends on the process (its pid); ``secret`` defaults
    are shown through :func:`mask_url`."""
    if group not in GROUPS or not help or not commands or not set(commands) <= set(COMMANDS):
        raise ValueError(f"setting({help!r}, group={group!r}, commands={commands!r}) needs a "
                         f"help, a group of {list(GROUPS)} and commands of {COMMANDS}")
    commands = tuple(command for command in COMMANDS if command in commands)  # one spelling
    metadata = {"help": help, "unit": unit, "group": group, "commands": commands,
                "metavar": metavar, "secret": secret, "shown_default": shown_default}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def _default_invoker_id() -> str:
    """``invoker-<host>-<pid>``: unique per process, so two daemons on one host never take
    each other's containers for their own leftovers; stable across restarts of a container
    whose daemon is its pid 1 (compose), so such a restart removes the previous run's."""
    return f"invoker-{socket.gethostname().split('.')[0].lower()}-{os.getpid()}"


@dataclass
class Config:
    # --- identity
    invoker_id: str = setting(
        factory=_default_invoker_id, shown_default="invoker-<host>-<pid>", group="identity",
        commands=(RUN,),
        help="this daemon's id: labels its containers and records, names its Kafka clients; at "
             "start it removes containers with its id and those of ended processes on this host")
    recorder_id: str = setting(
        factory=lambda: _default_invoker_id().replace("invoker-", "recorder-", 1),
        shown_default="recorder-<host>-<pid>", group="identity", commands=(RECORDER,),
        help="this recorder's id: its Kafka client id and the id /healthz reports")
    # --- Kafka
    kafka_bootstrap: str = setting(
        "127.0.0.1:9092", group="Kafka", metavar="HOST:PORT,...",
        help="Kafka brokers of the feed, completion and dead-letter topics (comma-separated)")
    feed_topic: str = setting(
        "invoker-activations", group="Kafka", commands=(RUN,),
        help="topic activations are read from")
    group_id: str = setting(
        "invoker", group="Kafka", commands=(RUN,),
        help="consumer group of the invokers: invokers in one group share the feed's partitions")
    completions_topic: str = setting(
        "invoker-completions", group="Kafka",
        help="topic a completion is published to once its record is stored")
    dead_letter_topic: str = setting(
        "invoker-dead-letters", group="Kafka",
        help="topic of messages that cannot be handled: original bytes, reason in the "
             "dlq.reason header")
    topic_partitions: int = setting(
        4, group="Kafka", unit="partitions",
        help="partitions of the topics the daemon creates when they are missing")
    # A message larger than its topic allows is never sent (see invoker.kafka_io).
    kafka_max_message_bytes: int = setting(
        4 * 1024 * 1024, group="Kafka", unit="bytes",
        help="max.message.bytes of the topics the daemon creates, and the producer's "
             "max_request_size")
    # --- overflow
    overflow_enabled: bool = setting(
        False, group="overflow", commands=(RUN,),
        help="records the record channel cannot take (see overflow_wait_ms) go to "
             "overflow_topic; recorders store them")
    overflow_topic: str = setting(
        "invoker-overflow", group="overflow",
        help="topic overflowed records go to (invoker) and are taken from (recorder)")
    overflow_bootstrap: str = setting(
        "", group="overflow", metavar="HOST:PORT,...",
        help="brokers of the overflow topic; empty: kafka_bootstrap")
    overflow_wait_ms: int = setting(
        0, group="overflow", unit="ms", commands=(RUN,),
        help="how long a finished record may wait for room in the record channel before it "
             "overflows (0: as soon as the channel is full)")
    overflow_max_in_flight: int = setting(
        32, group="overflow", unit="records", commands=(RUN,),
        help="overflow writes awaiting Kafka's ack; at the bound the next one waits, holding "
             "its slot")
    recorder_group_id: str = setting(
        "invoker-recorder", group="overflow", commands=(RECORDER,),
        help="consumer group of the recorders: recorders in one group share the overflow "
             "topic's partitions")
    recorder_metrics_port: int = setting(
        9181, group="overflow", commands=(RECORDER,), metavar="PORT",
        help="port of the recorder's /metrics, /healthz and /status (on metrics_host)")
    # --- store
    store_url: str = setting(
        "sqlite:///./invoker-records.sqlite3", group="store", metavar="URL", secret=True,
        help="sqlite:///PATH, or http(s)://USER:PASSWORD@HOST:5984/DB for a CouchDB-API store")
    store_timeout_s: float = setting(
        30.0, group="store", unit="s",
        help="CouchDB: total deadline of one store request; SQLite: how long a write waits "
             "for another process's lock (busy timeout). A failed bulk write is retried")
    # --- pipeline bounds
    read_ahead: int = setting(
        64, group="pipeline bounds", unit="messages",
        help="messages handed over by the consumer thread and not yet dispatched; while it is "
             "full the consumer thread holds its poll and fetches no more (it pauses, dropping "
             "what kafka-python had fetched, only if that leaves it without a poll for a "
             "second)")
    max_poll_records: int = setting(
        64, group="pipeline bounds", unit="messages",
        help="messages taken per poll(); they wait in the consumer thread while the read-ahead "
             "is full")
    fetch_max_bytes: int = setting(
        4 * 1024 * 1024, group="pipeline bounds", unit="bytes",
        help="the Kafka consumer's own fetch buffer")
    max_message_bytes: int = setting(
        1024 * 1024, group="pipeline bounds", unit="bytes",
        help="largest activation message the invoker accepts (larger ones are dead-lettered); "
             "also sizes the feed's fetch per partition, invoker and recorder (at least 1 MiB, "
             "at most fetch_max_bytes)")
    max_json_depth: int = setting(
        64, group="pipeline bounds", unit="levels",
        help="nesting depth of params and results; deeper ones are refused")
    max_activations: int = setting(
        32, group="pipeline bounds", unit="activations", commands=(RUN,),
        help="execution slots: activations running at once")
    # One slow activation holds back its partition's commit while later ones finish.
    max_uncommitted_offsets: int = setting(
        10_000, group="pipeline bounds", unit="offsets",
        help="offsets taken but not yet committable; at the bound the dispatcher waits and the "
             "feed pauses")
    record_channel_size: int = setting(
        256, group="pipeline bounds", unit="records",
        help="the bounded channel of records on their way to the store; the feed pauses when "
             "it is full (unless overflow_enabled: the invoker then sends the records it cannot "
             "take to overflow_topic)")
    record_channel_low_watermark: int = setting(
        128, group="pipeline bounds", unit="records",
        help="a paused feed resumes when the record channel is at or below this depth (and the "
             "consumer thread has handed over what it held); unused by the invoker with "
             "overflow_enabled")
    batch_size: int = setting(
        100, group="pipeline bounds", unit="records",
        help="records per bulk store write, and completions per published batch")
    # Lingering only while a write is in flight: an idle store gets a record at once.
    linger_ms: int = setting(
        20, group="pipeline bounds", unit="ms",
        help="while a bulk write is in flight, how long the next batch may wait to fill")
    max_writes_in_flight: int = setting(
        2, group="pipeline bounds", unit="writes",
        help="bulk store writes at once")
    max_publishes_in_flight: int = setting(
        4, group="pipeline bounds", unit="batches",
        help="batches of completions published and not yet acknowledged; store writes wait for "
             "them only when this many are")
    # A fetch round trip costs kafka-python ~0.4 ms of CPU however little it carries.
    fetch_batch_wait_ms: int = setting(
        5, group="pipeline bounds", unit="ms",
        help="while messages flow (more than one a poll), how long the broker may hold the "
             "feed's fetch to gather more (fewer, fuller fetches at a few hundred per second; a "
             "message may wait up to this long more); a fetch of a trickle or an idle feed "
             f"returns with the first message. 0: every fetch does (0 to {FETCH_IDLE_WAIT_MS})")
    commit_interval_ms: int = setting(
        200, group="pipeline bounds", unit="ms",
        help="the feed commits what it may at most this often (and always on revocation and "
             "close)")
    # The whole group's rebalance waits for it: at most REVOKE_WAIT_MAX_MS, well within the
    # group's rebalance timeout (the consumer's max_poll_interval_ms, 300 s).
    revoke_wait_ms: int = setting(
        5000, group="pipeline bounds", unit="ms",
        help=f"on a rebalance, how long the revoked partitions' work in flight gets to be "
             f"stored and committed before they go (0 to {REVOKE_WAIT_MAX_MS})")
    backoff_initial_ms: int = setting(
        100, group="pipeline bounds", unit="ms",
        help="first delay before a failed bulk write is retried (then doubling, jittered)")
    backoff_max_ms: int = setting(
        5000, group="pipeline bounds", unit="ms",
        help="longest delay between retries of a failed bulk write")
    # --- containers
    user_memory_mb: int = setting(
        2048, group="containers", unit="MiB", commands=(RUN,),
        help="sum of the memory limits of all action containers")
    kind_images: dict[str, str] = setting(
        factory=lambda: {"python:3": "invoker-action-python:latest"}, group="containers",
        commands=(RUN,), help="runtime image of each kind: {kind: image}")
    prewarm: dict[str, int] = setting(
        factory=dict, group="containers", unit="containers", commands=(RUN,),
        help="prewarmed stem cells kept per kind: {kind: count}")
    prewarm_memory_mb: int = setting(
        256, group="containers", unit="MiB", commands=(RUN,),
        help="memory limit of a stem cell")
    idle_timeout_s: float = setting(
        600.0, group="containers", unit="s", commands=(RUN,),
        help="an idle container is removed after this")
    # Action containers never reach each other. A name is for a daemon in a container: the
    # per-container networks carry that name in the label "org.invoker.network".
    container_network: str = setting(
        "", group="containers", commands=(RUN,),
        help="empty: action containers share the bridge network invoker-actions (no "
             "inter-container traffic), where the daemon on the host reaches them by address; a "
             "name (the daemon runs in a container): each gets a link network of its own that the "
             "daemon joins, and that named network for egress")
    container_subnet_pool: str = setting(
        "10.213.0.0/16", group="containers", commands=(RUN,), metavar="CIDR",
        help="IPv4 network the link networks take their /29 subnets from (when "
             "container_network is set)")
    container_pids_limit: int = setting(
        128, group="containers", unit="processes", commands=(RUN,),
        help="processes per action container")
    container_cpus: float = setting(
        1.0, group="containers", unit="CPUs", commands=(RUN,),
        help="CPUs per action container")
    init_timeout_s: float = setting(
        30.0, group="containers", unit="s", commands=(RUN,),
        help="a new container must accept connections within this")
    max_result_bytes: int = setting(
        1024 * 1024, group="containers", unit="bytes",
        help="largest action result; a larger one makes an application error (the recorder "
             "refuses a record larger than an invoker with these limits builds)")
    # ActionLoop runtimes write the action under /action/<n>/ and exec it, hence exec tmpfs.
    container_user: str = setting(
        "65534:65534", group="containers", commands=(RUN,), metavar="UID:GID",
        help="uid:gid the runtime runs as (kind_runtime may override it per kind)")
    container_exec_tmpfs: list[str] = setting(
        factory=lambda: ["/action"], group="containers", commands=(RUN,),
        help="tmpfs paths the runtime may write and exec from (kind_runtime may override them "
             "per kind); /tmp is a noexec tmpfs in every container")
    kind_runtime: dict[str, dict[str, Any]] = setting(
        factory=dict, group="containers", commands=(RUN,),
        help='per kind: {kind: {"user": "uid:gid", "exec_tmpfs": [paths], '
             '"env": {NAME: value}}}, overriding container_user and container_exec_tmpfs')
    blackbox_images: list[str] = setting(
        factory=list, group="containers", commands=(RUN,),
        help="fnmatch patterns a blackbox action's image must match; empty: blackbox actions "
             "are refused")
    # --- action limits
    default_timeout_ms: int = setting(
        60_000, group="action limits", unit="ms", commands=(RUN,),
        help="timeout of an action that sets none")
    default_memory_mb: int = setting(
        256, group="action limits", unit="MiB", commands=(RUN,),
        help="memory limit of an action that sets none")
    default_logs_kb: int = setting(
        10, group="action limits", unit="KiB", commands=(RUN,),
        help="log limit of an action that sets none")
    default_concurrency: int = setting(
        1, group="action limits", unit="activations", commands=(RUN,),
        help="activations at once in one container of an action that sets none")
    min_timeout_ms: int = setting(
        100, group="action limits", unit="ms", commands=(RUN,),
        help="smallest timeout an action may set")
    max_timeout_ms: int = setting(
        300_000, group="action limits", unit="ms", commands=(RUN,),
        help="largest timeout an action may set")
    min_memory_mb: int = setting(
        128, group="action limits", unit="MiB", commands=(RUN,),
        help="smallest memory limit an action may set")
    max_memory_mb: int = setting(
        512, group="action limits", unit="MiB", commands=(RUN,),
        help="largest memory limit an action may set")
    max_logs_kb: int = setting(
        1024, group="action limits", unit="KiB",
        help="largest log limit an action may set (with max_result_bytes, the recorder's "
             "largest record)")
    max_concurrency: int = setting(
        100, group="action limits", unit="activations", commands=(RUN,),
        help="largest concurrency an action may set")
    # --- operations
    metrics_host: str = setting(
        "127.0.0.1", group="operations", metavar="ADDRESS",
        help="address /metrics, /healthz and /status listen on")
    metrics_port: int = setting(
        9180, group="operations", commands=(RUN,), metavar="PORT",
        help="port of the daemon's /metrics, /healthz and /status")
    grace_period_s: float = setting(
        30.0, group="operations", unit="s",
        help="the one deadline of a graceful stop (first SIGTERM/SIGINT): in-flight work, last "
             "writes and completions, container removal")
    health_stuck_s: float = setting(
        120.0, group="operations", unit="s",
        help="/healthz fails when a store write or a Kafka publish has been unfinished for "
             "longer than this")
    health_paused_s: float = setting(
        600.0, group="operations", unit="s",
        help="/healthz fails when the feed has been paused for longer than this")
    log_level: str = setting(
        "info", group="operations", metavar="LEVEL",
        help="debug, info, warning or error (debug: one line per activation)")

    def __post_init__(self) -> None:
        problems = []
        for name in ("read_ahead", "max_poll_records", "max_activations", "record_channel_size",
                     "batch_size", "max_writes_in_flight", "user_memory_mb",
                     "overflow_max_in_flight", "max_uncommitted_offsets", "max_json_depth",
                     "max_publishes_in_flight"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0 <= self.fetch_batch_wait_ms <= FETCH_IDLE_WAIT_MS:
            problems.append(f"fetch_batch_wait_ms must be between 0 and {FETCH_IDLE_WAIT_MS}")
        if self.commit_interval_ms < 0:
            problems.append("commit_interval_ms must not be negative")
        if not 0 <= self.revoke_wait_ms <= REVOKE_WAIT_MAX_MS:
            problems.append(f"revoke_wait_ms must be in [0, {REVOKE_WAIT_MAX_MS}]")
        if not 0 <= self.record_channel_low_watermark < self.record_channel_size:
            problems.append("record_channel_low_watermark must be in [0, record_channel_size)")
        if problem := self.default_limits_problem():
            problems.append(problem)
        problems.extend(self.runtime_problems())
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    def runtime_problems(self) -> list[str]:
        """What is wrong in the container runtime settings: container_user,
        container_exec_tmpfs, kind_runtime, container_subnet_pool."""
        problems: list[str] = []

        def check_user(where: str, value: object) -> None:
            if not isinstance(value, str) or not re.fullmatch(r"\d{1,10}:\d{1,10}", value):
                problems.append(f'{where} must be "uid:gid" (numbers), not {value!r:.100}')

        def check_tmpfs(where: str, value: object) -> None:
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                problems.append(f"{where} must be a list of paths, not {value!r:.100}")
                return
            for path in value:
                top = path.split("/")[1] if path.startswith("/") else ""
                if (not top or posixpath.normpath(path) != path or path == "/tmp"
                        or top in ("proc", "sys", "dev") or "," in path):
                    problems.append(f"{where}: {path!r:.100} is not an absolute normalized path "
                                    "other than /, /tmp, /proc, /sys, /dev")

        def check_env(where: str, value: object) -> None:
            if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", k)
                    and isinstance(v, str) for k, v in value.items()):
                problems.append(f"{where} must map variable names to strings, "
                                f"not {value!r:.100}")

        check_user("container_user", self.container_user)
        check_tmpfs("container_exec_tmpfs", self.container_exec_tmpfs)
        checks = {"user": check_user, "exec_tmpfs": check_tmpfs, "env": check_env}
        for kind, settings in self.kind_runtime.items():
            where = f"kind_runtime[{kind!r:.100}]"
            if not isinstance(settings, Mapping):
                problems.append(f"{where} must be a table/object, not {settings!r:.100}")
                continue
            for key, value in settings.items():
                if key not in checks:
                    problems.append(f"{where}: unknown key {key!r:.100} "
                                    "(known: user, exec_tmpfs, env)")
                else:
                    checks[key](f"{where}.{key}", value)
        try:
            pool = ipaddress.ip_network(self.container_subnet_pool)
            if pool.version != 4 or pool.prefixlen > 29:
                raise ValueError("not an IPv4 network of /29 or larger")
        except ValueError as exc:
            problems.append(f"container_subnet_pool {self.container_subnet_pool!r:.100}: {exc}")
        return problems

    def default_limits_problem(self) -> str:
        d = self.default_limits
        bad = limits_problem(d, self)
        return f"default limits out of range: {bad}" if bad else ""

    @property
    def default_limits(self) -> Limits:
        return Limits(
            timeout_ms=self.default_timeout_ms,
            memory_mb=self.default_memory_mb,
            logs_kb=self.default_logs_kb,
            concurrency=self.default_concurrency,
        )

    @property
    def max_record_bytes(self) -> int:
        """Cap on one encoded activation record; the record builder enforces it."""
        return self.max_result_bytes + self.max_logs_kb * 1024 + RECORD_OVERHEAD_BYTES

    def worst_case_buffered(self) -> tuple[int, int]:
        """Upper bound on (records, bytes) this daemon holds in memory at any time.

        Messages count from the moment the consumer returns them (waiting in the consumer thread,
        in the read-ahead channel, in execution slots) until their record leaves the last bulk
        write, and then as a completion until Kafka acknowledged it; the consumer's fetch
        buffer is added in bytes. A message waits whole before it is decoded, so a waiting one
        may be as large as its topic allows (assumed at most ``kafka_max_message_bytes``, as
        on the topics the daemon creates); one that runs has passed the ``max_message_bytes``
        check and is held three times (as consumed, its params kept encoded, the ``/run``
        body made of them); at its end it holds the runtime's answer and its
        result encoded again, its collected log lines (as objects, at most
        ``LOG_OBJECTS_FACTOR`` times the log limit) and its record. A record counts its
        encoding (made once, when built) and ``RECORD_OBJECT_BYTES``: it keeps no object an
        action controls. A completion is at most a record's size (its result and a few
        fields). A write of re-executions also holds the stored records it read back, encoded;
        a CouchDB bulk write its documents and its request body (a copy each).
        One parse runs at a time (a message, an answer, or ``READ_BACK_CHUNK`` records read
        back), costing up to ``PARSED_JSON_FACTOR`` times its size while it lasts.
        """
        waiting = self.max_poll_records + self.read_ahead  # messages only
        running = self.max_activations  # a message and, at the end, its record
        writing = self.record_channel_size + self.max_writes_in_flight * self.batch_size
        read_back = self.max_writes_in_flight * self.batch_size  # copies: bytes only
        # A CouchDB bulk write holds its documents (a record with its _id) and its request body.
        bulk_bodies = self.max_writes_in_flight * self.batch_size * 2 * self.max_record_bytes
        publishing = self.max_publishes_in_flight * self.batch_size  # completions
        size = (waiting * max(self.max_message_bytes, self.kafka_max_message_bytes)
                + running * (3 * self.max_message_bytes  # as consumed, params, /run body
                             + 2 * self.max_result_bytes  # the answer, and its result encoded
                             + LOG_OBJECTS_FACTOR * self.max_logs_kb * 1024
                             + self.max_record_bytes + RECORD_OBJECT_BYTES)
                + (writing + read_back) * (self.max_record_bytes + RECORD_OBJECT_BYTES)
                + publishing * self.max_record_bytes + self.fetch_max_bytes + bulk_bodies
                + PARSED_JSON_FACTOR * max(self.max_message_bytes, self.max_result_bytes,
                                           READ_BACK_CHUNK * self.max_record_bytes))
        return waiting + running + writing + publishing, size

    @property
    def overflow_brokers(self) -> str:
        return self.overflow_bootstrap or self.kafka_bootstrap

    def masked(self) -> dict[str, Any]:
        """The effective configuration with credentials replaced by ``***``."""
        values = dataclasses.asdict(self)
        values["store_url"] = mask_url(self.store_url)
        return values


def limits_problem(limits: Limits, config: Config) -> str | None:
    """Why ``limits`` are outside the configured ranges, or None when they are fine."""
    checks = [
        ("timeout", limits.timeout_ms, config.min_timeout_ms, config.max_timeout_ms),
        ("memory", limits.memory_mb, config.min_memory_mb, config.max_memory_mb),
        ("logs", limits.logs_kb, 0, config.max_logs_kb),
        ("concurrency", limits.concurrency, 1, config.max_concurrency),
    ]
    for name, value, low, high in checks:
        if not low <= value <= high:
            return f"{name} limit {value} is outside the allowed range [{low}, {high}]"
    return None


# --- loading -------------------------------------------------------------------------------

def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _convert(name: str, raw: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is list or kind is list:
        if isinstance(raw, str):
            text = raw.strip()
            value = json.loads(text) if text.startswith("[") else [
                part.strip() for part in text.split(",") if part.strip()]
        else:
            value = raw
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings (JSON array or a,b,c)")
        return value
    if origin is dict or kind is dict:
        value = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a JSON object / TOML table")
        return dict(value)
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        return str(raw).lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind.__name__}") from exc


def add_config_arguments(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """``--config`` and one ``--flag`` per setting that ``command`` reads (every setting when
    None), grouped as GROUPS, each with its meaning, unit, default and environment variable.
    Flags default to None so unset ones are detectable. Settings a command does not read get
    no flag, but the environment and the file may still hold them: one file serves the daemon
    and the recorder."""
    parser.add_argument(
        "--config", metavar="FILE",
        help=f"TOML file of settings by name (also {ENV_PREFIX}CONFIG); it may hold settings "
             "this command does not read")
    kinds = _field_types()
    for group, fields in settings_by_group(command).items():
        arguments = parser.add_argument_group(f"{group} settings", GROUPS[group])
        for f in fields:
            arguments.add_argument(
                "--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                metavar=f.metadata["metavar"] or _metavar(kinds[f.name]),
                help=help_line(f).replace("%", "%%"))  # argparse %-formats help


SOURCES_HELP = (f"Every setting is also read from the environment ({ENV_PREFIX}<NAME>) and from "
                "the --config TOML file (<name> = value); flags win over the environment, which "
                "wins over the file. Lists take a JSON array or a,b,c and maps a JSON object in "
                "flags and the environment, a table in TOML.")


def load_config(args: argparse.Namespace | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    kinds = _field_types()
    values: dict[str, Any] = {}
    path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
        unknown = set(table) - set(kinds)
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        values.update({k: _convert(k, v, kinds[k]) for k, v in table.items()})
    for name, kind in kinds.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _convert(name, raw, kind)
    if args is not None:
        for name, kind in kinds.items():
            raw = getattr(args, "cfg_" + name, None)
            if raw is not None:
                values[name] = _convert(name, raw, kind)
    return Config(**values)


# --- documentation: --help, the README's settings tables ------------------------------------

def settings_by_group(command: str | None = None) -> dict[str, list[dataclasses.Field[Any]]]:
    """The settings ``command`` reads (all when None) by group, in GROUPS order; groups with
    none are left out."""
    grouped: dict[str, list[dataclasses.Field[Any]]] = {group: [] for group in GROUPS}
    for f in dataclasses.fields(Config):
        if command is None or command in f.metadata["commands"]:
            grouped[f.metadata["group"]].append(f)
    return {group: fields for group, fields in grouped.items() if fields}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def default_text(f: dataclasses.Field[Any], *, with_unit: bool = False) -> str:
    """A setting's default as a user would write it (TOML/JSON spelling, secrets masked);
    sizes in bytes also in KiB/MiB; ``with_unit`` puts a number's unit after it."""
    if f.metadata["shown_default"]:
        return str(f.metadata["shown_default"])
    value: Any = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    unit = f.metadata["unit"]
    if f.metadata["secret"]:
        return mask_url(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        text = f"{value} {unit}" if with_unit and unit else str(value)
        return text + (f" ({_binary_size(value)})" if unit == "bytes" and value >= 1024 else "")
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)


def _binary_size(size: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size:g} bytes"


def help_line(f: dataclasses.Field[Any]) -> str:
    """What ``--help`` says of a setting: meaning, unit, default, environment variable."""
    value = default_text(f, with_unit=True)
    unit = f.metadata["unit"]
    unit_text = f" Unit: {unit}." if unit and not value.split(" ")[1:2] == [unit] else ""
    return f"{f.metadata['help']}.{unit_text} Default: {value}. Env: {env_name(f.name)}."


def _metavar(kind: Any) -> str:
    kind = typing.get_origin(kind) or kind
    return {bool: "BOOL", int: "N", float: "N", list: "A,B,...", dict: "JSON"}.get(kind, "TEXT")


def markdown() -> str:
    """The README's settings tables: one per group, and which command reads what."""
    lines: list[str] = []
    for group, fields in settings_by_group().items():
        readers = {f.metadata["commands"] for f in fields}
        shared = next(iter(readers)) if len(readers) == 1 else None
        read_by = _readers(shared) + " only" if shared and len(shared) == 1 else (
            _readers(COMMANDS) + ("" if shared else " unless marked"))
        lines += [f"**{group[:1].upper()}{group[1:]}.** {GROUPS[group]} Read by {read_by}.", "",
                  "| setting | env | default | unit | meaning |", "|---|---|---|---|---|"]
        for f in fields:
            commands = f.metadata["commands"]
            mark = f" — {_readers(commands)} only" if not shared and len(commands) == 1 else ""
            cells = [f"`{f.name}`", f"`{env_name(f.name)}`", f"`{default_text(f)}`",
                     f.metadata["unit"], f.metadata["help"] + mark]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"  # a blank line ends the last table before the end marker


def _readers(commands: tuple[str, ...]) -> str:
    return " and ".join(f"`invoker {command}`" for command in commands)


def readme_section(text: str) -> tuple[int, int]:
    """Where the generated tables sit in ``text`` (between MARKDOWN_BEGIN and MARKDOWN_END)."""
    begin, end = text.find(MARKDOWN_BEGIN), text.find(MARKDOWN_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {MARKDOWN_BEGIN!r} ... {MARKDOWN_END!r} section")
    return begin + len(MARKDOWN_BEGIN) + 1, end


def write_readme(path: Path) -> bool:
    """Put :func:`markdown` between the markers in ``path``; True if that changed it."""
    text = path.read_text()
    begin, end = readme_section(text)
    updated = text[:begin] + markdown() + text[end:]
    if updated == text:
        return False
    path.write_text(updated)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m invoker.config --markdown`` prints the settings tables;
    ``--readme README.md`` rewrites them there (``make docs``)."""
    parser = argparse.ArgumentParser(prog="python -m invoker.config",
                                     description="The settings' documentation.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the settings tables")
    action.add_argument("--readme", metavar="FILE", type=Path,
                        help="rewrite the tables between the settings markers in FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    try:
        changed = write_readme(args.readme)
    except (OSError, ValueError) as exc:
        parser.exit(1, f"{parser.prog}: {args.readme}: {exc}\n")
    print(f"{args.readme}: settings tables {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
