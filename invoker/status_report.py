"""What ``GET /status`` answers: the daemon side of ``invoker status`` (the command, which
fetches and renders it, is :mod:`invoker.status`).

:meth:`invoker.service.FeedService.status` builds the document (JSON, :data:`STATUS_VERSION`)
with the helpers here. None of them blocks or does I/O: they read in-memory state (metrics,
the pool's snapshot, the feed's published progress) on the trio thread. The document's size is
bounded: containers are counted per action and state (at most :data:`MAX_ACTIONS` actions, the
rest summed up), partitions listed up to :data:`MAX_PARTITIONS` (those furthest behind first).
:class:`RecentDurations` keeps the last :data:`RECENT_KEPT` store writes' durations for recent
quantiles over :data:`RECENT_WINDOW_S`.

The document (every ``*_s`` in seconds; offsets are "next to read", as Kafka counts them)::

    version, role ("invoker"|"recorder"), id, uptime_s, ok, reasons (as /healthz)
    feed: paused, paused_for_s, reason (why it paused), pauses, held_back_by [texts]
    read_ahead, record_channel: depth, capacity (+ low_watermark)
    uncommitted_offsets: count, max
    store: writes_in_flight, max_writes_in_flight, recent {window_s, count, p50_s, p99_s,
           max_s}, writes, mean_s (since start), failures
    oldest_unfinished: the oldest store write or Kafka publish not finished {what, seconds,
           error} (as /healthz sees them), or null
    partitions: [{topic, partition, position, committed, highwater, uncommitted, lag,
                  in_flight}], partitions_omitted
    activations: {status: count}
    invoker only: slots {used, max, running}, containers {count, memory_used_mb, memory_mb,
                  waiting, by_action [{action, starting, busy, idle, prewarmed, removing,
                  running}], more_actions, more_containers}, overflow {enabled, ...}

Per partition: ``position`` is the next offset the feed reads (what it read, handed on or
not), ``committed`` the last offset this member committed (before its first commit: where it
began reading, the group's committed offset), ``uncommitted`` = position - committed (read,
not yet committed), ``lag`` = highwater - committed (to the partition's end as of the last
fetch), ``in_flight`` = taken and not yet committable. Unknown values are null.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

from invoker.containers.scheduler import (
    ASSIGNED,
    INITIALIZING,
    NEW,
    READY,
    REMOVING,
    RETIRING,
    STARTING,
    STEM,
)

STATUS_VERSION = 1
MAX_ACTIONS = 50  # container groups listed; the rest are summed in more_actions
MAX_PARTITIONS = 64  # partitions listed; those furthest behind are kept
RECENT_WINDOW_S = 60.0  # store write quantiles over this window (of the last RECENT_KEPT)
RECENT_KEPT = 1024
CONTAINER_STATES = ("starting", "busy", "idle", "prewarmed", "removing")
_STATE_OF_PHASE = {NEW: "starting", ASSIGNED: "starting", INITIALIZING: "starting",
                   STARTING: "starting", STEM: "prewarmed", RETIRING: "removing",
                   REMOVING: "removing"}


class RecentDurations:
    """The last ``keep`` durations and when they were added, for recent quantiles.

    Bounded (``keep`` entries); used from one thread (the trio thread); never blocks.
    """

    def __init__(self, keep: int = RECENT_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self._samples.append((self._clock(), seconds))

    def summary(self, window_s: float = RECENT_WINDOW_S) -> dict[str, Any]:
        """Count, p50, p99 and max of those added in the last ``window_s`` (nearest rank)."""
        since = self._clock() - window_s
        values = sorted(seconds for at, seconds in self._samples if at >= since)
        summary: dict[str, Any] = {"window_s": window_s, "count": len(values)}
        if values:
            summary.update(p50_s=_nearest_rank(values, 0.5), p99_s=_nearest_rank(values, 0.99),
                           max_s=values[-1])
        return summary


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def containers_status(snapshot: Iterable[Mapping[str, Any]], *, waiting: int,
                      memory_used_mb: int, memory_mb: int,
                      max_groups: int = MAX_ACTIONS) -> dict[str, Any]:
    """The pool's containers (``ContainerPool.snapshot()``) counted per action and state:
    ``namespace/name@version`` (stem cells: ``prewarm <kind>``), states :data:`CONTAINER_STATES`,
    ``running`` the activations in them. The ``max_groups`` largest groups are listed."""
    groups: dict[str, dict[str, Any]] = {}
    count = 0
    for c in snapshot:
        count += 1
        key = c["pool_key"]
        name = f"prewarm {c['kind']}" if key is None else (
            f"{key.namespace}/{key.name}@{key.version}")
        group = groups.get(name)
        if group is None:
            group = groups[name] = {"action": name, **dict.fromkeys(CONTAINER_STATES, 0),
                                    "running": 0}
        phase = c["phase"]
        if phase == READY:
            state = "busy" if c["active"] else "idle"
        else:
            state = _STATE_OF_PHASE.get(phase, "removing")
        group[state] += 1
        group["running"] += c["active"]
    ordered = sorted(groups.values(),
                     key=lambda g: (-sum(g[s] for s in CONTAINER_STATES), g["action"]))
    listed, rest = ordered[:max_groups], ordered[max_groups:]
    return {"count": count, "memory_used_mb": memory_used_mb, "memory_mb": memory_mb,
            "waiting": waiting, "by_action": listed, "more_actions": len(rest),
            "more_containers": sum(g[s] for g in rest for s in CONTAINER_STATES)}


class Progress(Protocol):
    """What the feed thread last published about one partition (see invoker.feed)."""

    @property
    def position(self) -> int | None: ...
    @property
    def committed(self) -> int | None: ...
    @property
    def highwater(self) -> int | None: ...


def partition_rows(progress: Mapping[Any, Progress], in_flight: Callable[[Any], int],
                   max_rows: int = MAX_PARTITIONS) -> tuple[list[dict[str, Any]], int]:
    """One row per partition of ``progress`` (keys: TopicPartitions), and how many were left
    out: past ``max_rows`` only those with the most read and not committed (then the largest
    lag) are kept. Rows are ordered by topic and partition."""
    rows = []
    for tp, p in progress.items():
        committed = p.committed
        rows.append({
            "topic": tp.topic, "partition": tp.partition, "position": p.position,
            "committed": committed, "highwater": p.highwater,
            "uncommitted": _minus(p.position, committed), "lag": _minus(p.highwater, committed),
            "in_flight": in_flight(tp)})
    omitted = max(len(rows) - max_rows, 0)
    if omitted:
        rows.sort(key=lambda r: (-(r["uncommitted"] or 0), -(r["lag"] or 0)))
        del rows[max_rows:]
    rows.sort(key=lambda r: (r["topic"], r["partition"]))
    return rows, omitted


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a - b, 0)


class _Metric(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def metric_count(metric: _Metric) -> int:
    """A counter's or gauge's value, summed over its labels (prometheus_client's collect()),
    as a whole number (what counts things)."""
    return int(sum(sample.value for family in metric.collect() for sample in family.samples
                   if not sample.name.endswith("_created")))


def metric_by_label(metric: _Metric, label: str) -> dict[str, int]:
    """A labelled counter's values by ``label``."""
    return {sample.labels[label]: int(sample.value) for family in metric.collect()
            for sample in family.samples if sample.name.endswith("_total")}


def histogram_count_mean(histogram: _Metric) -> tuple[int, float | None]:
    """How many observations a histogram has and their mean (None: none yet)."""
    count = total = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return int(count), (total / count if count else None)
