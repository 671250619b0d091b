"""Daemon configuration: flags > ``INVOKER_*`` environment > TOML file > defaults.

Every field of :class:`Config` is settable in all three places under the same name
(``--record-channel-size``, ``INVOKER_RECORD_CHANNEL_SIZE``, ``record_channel_size = ...``).
Mapping fields take JSON in flags and environment variables and a table in TOML.
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
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from invoker.model import Limits
from store import mask_url  # noqa: F401 (part of this module's surface: masks store_url)

ENV_PREFIX = "INVOKER_"
# Room for everything in a record besides its result and logs (ids, annotations, JSON syntax).
RECORD_OVERHEAD_BYTES = 16 * 1024
# Bound of revoke_wait_ms: a fifth of the group's rebalance timeout (max_poll_interval_ms).
REVOKE_WAIT_MAX_MS = 60_000


def _default_invoker_id() -> str:
    """``invoker-<host>-<pid>``: unique per process, so two daemons on one host never take
    each other's containers for their own leftovers; stable across restarts of a container
    whose daemon is its pid 1 (compose), so such a restart removes the previous run's."""
    return f"invoker-{socket.gethostname().split('.')[0].lower()}-{os.getpid()}"


@dataclass
class Config:
    # Identity and Kafka
    invoker_id: str = field(default_factory=_default_invoker_id)
    kafka_bootstrap: str = "127.0.0.1:9092"
    feed_topic: str = "invoker-activations"
    group_id: str = "invoker"
    completions_topic: str = "invoker-completions"
    dead_letter_topic: str = "invoker-dead-letters"
    topic_partitions: int = 4  # used when the daemon has to create its topics
    # max.message.bytes of the topics the daemon creates, and the producer's max_request_size;
    # a message larger than a topic allows is never sent (see invoker.kafka_io)
    kafka_max_message_bytes: int = 4 * 1024 * 1024
    # Overflow (records the record channel cannot take go to Kafka; a recorder stores them)
    overflow_enabled: bool = False
    overflow_topic: str = "invoker-overflow"
    overflow_bootstrap: str = ""  # brokers of the overflow topic; empty: kafka_bootstrap
    overflow_wait_ms: int = 0  # how long a record may wait for the channel before overflowing
    overflow_max_in_flight: int = 32  # overflow writes awaiting Kafka's ack
    recorder_id: str = field(default_factory=lambda: _default_invoker_id().replace(
        "invoker-", "recorder-", 1))
    recorder_group_id: str = "invoker-recorder"
    recorder_metrics_port: int = 9181
    # Store
    store_url: str = "sqlite:///./invoker-records.sqlite3"
    store_timeout_s: float = 30.0
    # Bounds of the pipeline
    read_ahead: int = 64  # messages handed from the consumer thread, not yet dispatched
    max_poll_records: int = 64  # messages taken per poll(); they wait in the thread if trio is full
    fetch_max_bytes: int = 4 * 1024 * 1024  # the consumer's own fetch buffer
    max_message_bytes: int = 1024 * 1024  # largest activation message accepted
    max_json_depth: int = 64  # nesting depth of params and results (deeper: refused)
    max_activations: int = 32  # execution slots
    # Offsets taken but not yet committable. One slow activation holds back its partition's
    # commit while later ones finish; this bounds the offsets remembered meanwhile.
    max_uncommitted_offsets: int = 10_000
    record_channel_size: int = 256
    record_channel_low_watermark: int = 128  # the feed resumes at or below this depth
    batch_size: int = 100
    linger_ms: int = 20  # only while a write is in flight: an idle store gets a record at once
    max_writes_in_flight: int = 2
    # Batches of completions (each at most batch_size) published and not yet acknowledged; the
    # store's writes do not wait for them unless this many are
    max_publishes_in_flight: int = 4
    # The feed commits the offsets it may at most this often (and always on revocation and close)
    commit_interval_ms: int = 200
    # On a rebalance, how long the revoked partitions' work in flight gets to be stored (and
    # committed) before the revocation goes on; the whole group's rebalance waits for it. At
    # most REVOKE_WAIT_MAX_MS, well within the group's rebalance timeout (the consumer's
    # max_poll_interval_ms, 300 s)
    revoke_wait_ms: int = 5000
    backoff_initial_ms: int = 100
    backoff_max_ms: int = 5000
    # Containers
    user_memory_mb: int = 2048
    kind_images: dict[str, str] = field(
        default_factory=lambda: {"python:3": "invoker-action-python:latest"}
    )
    prewarm: dict[str, int] = field(default_factory=dict)
    prewarm_memory_mb: int = 256
    idle_timeout_s: float = 600.0
    # Action containers never reach each other. Empty: they share the bridge network
    # "invoker-actions" (inter-container traffic off) and publish their port on 127.0.0.1.
    # A name (the daemon runs in a container): each action container gets a bridge network of
    # its own, which the daemon's container joins; the name labels them ("org.invoker.network")
    container_network: str = ""
    # where those per-container networks get their /29 subnets (network mode only)
    container_subnet_pool: str = "10.213.0.0/16"
    container_pids_limit: int = 128
    container_cpus: float = 1.0
    init_timeout_s: float = 30.0
    max_result_bytes: int = 1024 * 1024
    # Runtime settings for every kind (kind_runtime overrides them per kind): the uid:gid the
    # runtime runs as, and tmpfs paths it may write *and exec* from (ActionLoop runtimes write
    # the action under /action/<n>/ and exec it); /tmp is a noexec tmpfs in every container.
    container_user: str = "65534:65534"
    container_exec_tmpfs: list[str] = field(default_factory=lambda: ["/action"])
    # {kind: {"user": "uid:gid", "exec_tmpfs": [paths], "env": {NAME: value}}}
    kind_runtime: dict[str, dict] = field(default_factory=dict)
    # Image patterns (fnmatch) a blackbox action may name; empty: blackbox actions are refused
    blackbox_images: list[str] = field(default_factory=list)
    # Action limits: defaults for missing ones, and the allowed ranges
    default_timeout_ms: int = 60_000
    default_memory_mb: int = 256
    default_logs_kb: int = 10
    default_concurrency: int = 1
    min_timeout_ms: int = 100
    max_timeout_ms: int = 300_000
    min_memory_mb: int = 128
    max_memory_mb: int = 512
    max_logs_kb: int = 1024
    max_concurrency: int = 100
    # Operations
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9180
    grace_period_s: float = 30.0
    # /healthz fails when a store write or a Kafka publish has been retried for longer than
    # this, or when the feed has been paused for longer than health_paused_s
    health_stuck_s: float = 120.0
    health_paused_s: float = 600.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        for name in ("read_ahead", "max_poll_records", "max_activations", "record_channel_size",
                     "batch_size", "max_writes_in_flight", "user_memory_mb",
                     "overflow_max_in_flight", "max_uncommitted_offsets", "max_json_depth",
                     "max_publishes_in_flight"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
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
        check, and keeps its params encoded. A record counts twice ``max_record_bytes``: it
        carries its encoding (made once, when built) besides its objects. A completion is at
        most a record's size (its result and a few fields).
        """
        waiting = self.max_poll_records + self.read_ahead  # messages only
        running = self.max_activations  # a message and, at the end, its record
        writing = self.record_channel_size + self.max_writes_in_flight * self.batch_size
        publishing = self.max_publishes_in_flight * self.batch_size  # completions
        size = (waiting * max(self.max_message_bytes, self.kafka_max_message_bytes)
                + running * (self.max_message_bytes + 2 * self.max_record_bytes)
                + writing * 2 * self.max_record_bytes + publishing * self.max_record_bytes
                + self.fetch_max_bytes)
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per configuration field, defaulting to None so unset flags are detectable."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    group = parser.add_argument_group("configuration (also INVOKER_<NAME> or TOML <name>)")
    for f in dataclasses.fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                           metavar=f.name.upper())


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
