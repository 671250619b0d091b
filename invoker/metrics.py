"""Prometheus metrics of one daemon process.

Each process (invoker or recorder) has its own registry so tests can run several daemons' code
in one interpreter without clashing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Per-stage timings of one activation (see STAGES): finer at the low end, where warm work is.
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1, 2.5, 5, 10, 30)
# Where an activation's time goes, in order: waiting for a container slot, making its container
# ready (cold: create, start and /init; prewarm: /init), /run, reading its logs, waiting for
# room in the record channel, the store write of its batch, publishing its batch's
# completions, and from the record being stored to its offset being committed.
STAGES = ("queue_wait", "init", "run", "log_read", "enqueue_wait", "store_write",
          "completion_publish", "commit_lag")
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        ProcessCollector(registry=r)
        self.activations = Counter(
            "invoker_activations", "Activations finished, by status", ["status"], registry=r
        )
        self.in_flight = Gauge(
            "invoker_in_flight", "Activations running in a container (/init, /run, logs)",
            registry=r,
        )
        self.slots_used = Gauge("invoker_slots_used", "Execution slots in use", registry=r)
        self.slots_total = Gauge("invoker_slots_total", "Execution slots configured", registry=r)
        self.channel_depth = Gauge(
            "invoker_record_channel_depth", "Records waiting in the record channel", registry=r
        )
        self.readahead_depth = Gauge(
            "invoker_readahead_depth", "Messages handed over by the feed, not yet dispatched",
            registry=r,
        )
        self.channel_capacity = Gauge(
            "invoker_record_channel_capacity", "Bound of the record channel", registry=r
        )
        self.paused = Gauge("invoker_feed_paused", "1 while the feed is paused", registry=r)
        self.paused_seconds = Counter(
            "invoker_feed_paused_seconds", "Total seconds the feed was paused", registry=r
        )
        self.pauses = Counter("invoker_feed_pauses", "Times the feed was paused", registry=r)
        self.resumes = Counter("invoker_feed_resumes", "Times the feed was resumed", registry=r)
        self.dead_letters = Counter(
            "invoker_dead_letters", "Messages sent to the dead-letter topic", registry=r
        )
        self.store_write_seconds = Histogram(
            "invoker_store_write_seconds", "Latency of one bulk write", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_batch_size = Histogram(
            "invoker_store_batch_size", "Records per bulk write", buckets=_BATCH_BUCKETS, registry=r
        )
        self.store_write_failures = Counter(
            "invoker_store_write_failures", "Bulk writes that failed and were retried", registry=r
        )
        self.oldest_unfinished_seconds = Gauge(
            "invoker_oldest_unfinished_seconds",
            "Seconds the oldest unfinished store write or Kafka publish has been going; 0 when "
            "none (what /healthz fails on past health_stuck_s)",
            registry=r,
        )
        self.records_stored = Counter(
            "invoker_records_stored", "Records newly stored", registry=r
        )
        self.records_already_stored = Counter(
            "invoker_records_already_stored",
            "Records the store already had: activations re-executed (the recorder: records "
            "written again) after a rebalance or a restart",
            registry=r,
        )
        self.rebalances = Counter(
            "invoker_rebalances", "Partition assignments received (the first join included)",
            registry=r,
        )
        self.revoke_seconds = Histogram(
            "invoker_revoke_seconds",
            "Time a revocation took: waiting for the revoked partitions' work, then committing",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.records_refused = Counter(
            "invoker_records_refused", "Records the store refused; dead-lettered", registry=r
        )
        self.overflow_records = Counter(
            "invoker_overflow_records", "Records written to the overflow topic", registry=r
        )
        self.overflow_bytes = Counter(
            "invoker_overflow_bytes", "Bytes of records written to the overflow topic", registry=r
        )
        self.overflow_in_flight = Gauge(
            "invoker_overflow_in_flight", "Overflow writes awaiting Kafka's ack", registry=r
        )
        self.container_starts = Counter(
            "invoker_container_starts", "Activations by how their container was obtained",
            ["kind"], registry=r,
        )
        self.containers = Gauge("invoker_containers", "Action containers alive", registry=r)
        self.stem_cells = Gauge(
            "invoker_prewarmed_containers",
            "Prewarmed containers ready and not given to an action yet", registry=r,
        )
        self.memory_used_mb = Gauge(
            "invoker_pool_memory_used_mb", "Memory reserved by action containers", registry=r
        )
        self.peak_rss_bytes = Gauge(
            "invoker_process_peak_rss_bytes", "Peak resident set size of the process", registry=r
        )
        self.worst_case_records = Gauge(
            "invoker_worst_case_buffered_records", "Bound on records buffered in memory", registry=r
        )
        self.worst_case_bytes = Gauge(
            "invoker_worst_case_buffered_bytes", "Bound on bytes of records buffered", registry=r
        )
        self.stage = {name: StageTiming() for name in STAGES}
        r.register(_StageCollector(self.stage))
        # One child per status, resolved once: labels() costs more than inc() itself.
        self.activations_by_status = _LabelledCounter(self.activations)
        self.kafka_refused = Counter(
            "invoker_kafka_refused",
            "Messages Kafka can never take (too large, invalid or forbidden topic), by what "
            "was done instead: result_omitted, truncated, stored_instead, dropped",
            ["instead"], registry=r,
        )


class StageTiming:
    """One stage's share of ``invoker_stage_seconds``: bucket counts and a sum, observed without
    a lock. Five are observed per activation on the trio thread, where prometheus_client's
    Histogram takes a lock for its bucket and one for its sum: 1.4 us an observation here,
    against 0.2. Each stage is observed from one thread only (``commit_lag`` from the feed
    thread, the others from the trio thread), so nothing races; a scrape may read a bucket
    count one observation ahead of the sum, as it may with prometheus_client's histograms
    (which also export a ``_created`` series per stage; these do not)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_STAGE_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_STAGE_BUCKETS, seconds)] += 1  # le: a bound counts as within
        self.sum += seconds


# the bounds as prometheus_client writes them ("0.0001", "1.0", "+Inf")
_STAGE_LE = tuple(floatToGoString(b)  # type: ignore[no-untyped-call]
                  for b in (*_STAGE_BUCKETS, float("inf")))


class _StageCollector(Collector):
    def __init__(self, stages: dict[str, StageTiming]) -> None:
        self._stages = stages

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "invoker_stage_seconds",
            "Time an activation spends in each stage (see STAGES); store_write and "
            "completion_publish are observed once per batch, commit_lag once per committed "
            "partition offset (from committable to committed)",
            labels=["stage"])
        for name, stage in self._stages.items():
            counts, total = list(stage.counts), stage.sum
            cumulative, buckets = 0, []
            for le, count in zip(_STAGE_LE, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric([name], buckets, total)
        yield family


class _LabelledCounter:
    """The children of a counter labelled by one label, each resolved on first use."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[str, Counter] = {}

    def __getitem__(self, value: str) -> Counter:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._counter.labels(value)
        return child
