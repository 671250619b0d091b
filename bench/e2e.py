"""Figures 1-3: end-to-end throughput, the store's own bulk-insert rate, invoker-added latency.

One daemon subprocess (default bounds, info logging) on fresh topics and a fresh store:

1. a warm-up run so the no-op action's containers exist;
2. the throughput run: ``count`` no-op activations as fast as possible (``throughput_per_s``);
   its per-activation latencies give the *saturated* invoker-added latency, and the daemon's
   ``invoker_stage_seconds`` histogram (sampled before and after) the per-stage p50/p99;
3. a paced run at half the measured throughput, whose latencies give the invoker-added
   latency at half of max load (and the histogram, its per-stage p50/p99), then one at a
   quarter; for each, how busy the whole machine was from its first message sent until its
   completions were in (every process spends more per activation at a lower rate, so half
   the rate takes more than half the machine);
4. the daemon is stopped; Kafka alone is timed at the half rate (:mod:`bench.kafka_floor`),
   then the store's own bulk-insert rate is measured on the same database with copies of a
   real record of the run, in batches of the daemon's batch size.
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import Results
from bench.infra import (
    delete_couch_db,
    launch,
    load_problems,
    metric_samples,
    new_couch_db,
    stop_daemon,
    store_rate,
)
from bench.kafka_floor import roundtrip_ms
from bench.machine_cpu import STEAL, CpuSplit, LoadWindow
from bench.stages import stage_figures
from invoker.config import Config
from invoker.loadgen import LoadSpec, Report, percentile, run_load
from tests.support.daemon import Topics, load_spec, stored_records

ACTION = "noop"
CORES = os.cpu_count() or 1
# Where the pipeline holds its work during the throughput run (sampled from /metrics): what
# is full while the rest waits shows the stage that bounds throughput.
# Gauge -> (label, its bound: the gauge that gives it, or the default setting, or None).
OCCUPANCY: dict[str, tuple[str, str | int | None]] = {
    "invoker_readahead_depth": ("read-ahead", Config().read_ahead),
    "invoker_slots_used": ("slots used", "invoker_slots_total"),
    "invoker_in_flight": ("in /run", None),
    "invoker_record_channel_depth": ("record channel", "invoker_record_channel_capacity"),
}
OCCUPANCY_INTERVAL_S = 0.5
OCCUPANCY_MAX_SAMPLES = 2000  # the newest kept: 1000 s of a run


@dataclass(frozen=True)
class E2EParams:
    warmup: int = 300
    count: int = 10_000
    paced_s: float = 10.0  # how long each paced run lasts (at half and a quarter of max)
    kafka_floor_s: float = 5.0  # how long Kafka alone is timed (at the half-load rate)
    store_records: int = 5000
    store_time_limit_s: float = 20.0
    completion_timeout_s: float = 90.0

    @classmethod
    def quick(cls) -> E2EParams:
        return cls(warmup=100, count=2000, paced_s=4.0, kafka_floor_s=2.0, store_records=1000,
                   store_time_limit_s=8.0, completion_timeout_s=60.0)


def _spec(topics: Topics, store_url: str, **kw: Any) -> LoadSpec:
    # One namespace for the warm-up and the measured runs: containers serve one namespace, and
    # each loadgen run would otherwise pick a new one (and start cold).
    return load_spec(topics, store_url, actions=[ACTION], namespace=f"bench-{topics.group}",
                     **kw)


def _records(url: str, report: Report) -> dict[str, dict]:
    """The run's records by activation id (only those present)."""
    ids = dict.fromkeys(report.latencies_ms, report.namespace)
    return stored_records(url, ids, timeout_s=120.0)[0]


def _added_latencies(report: Report, records: dict[str, dict]) -> list[float]:
    """produce → completion minus the record's duration (the action's own run time)."""
    added = []
    for activation_id, latency in report.latencies_ms.items():
        record = records.get(activation_id)
        if record is not None and isinstance(record.get("duration"), int | float):
            added.append(latency - record["duration"])
    return added


def run(results: Results, kind: str, params: E2EParams, work: Path) -> None:
    scenario = f"e2e-{kind}"
    prefix = f"e2e.{kind}"
    topics: Topics | None = None
    sqlite_dir = None
    if kind == "sqlite":
        sqlite_dir = tempfile.mkdtemp(prefix="sqlite-", dir=work)
        store_url = f"sqlite:///{sqlite_dir}/records.sqlite3"
    else:
        _, store_url = new_couch_db()
    batch_size = Config.__dataclass_fields__["batch_size"].default
    daemon = None
    try:
        daemon, topics = launch(lambda m: results.error(scenario, m), store_url, work, scenario)
        warm = run_load(_spec(topics, store_url, count=params.warmup,
                              completion_timeout_s=params.completion_timeout_s))
        for problem in load_problems(warm, "warm-up run"):
            results.error(scenario, problem)
        if warm.completed == 0:
            raise RuntimeError(f"the warm-up run completed nothing; see {daemon.log_path}")

        before = metric_samples(daemon) or {}
        window = LoadWindow(daemon_pid=daemon.process.pid)
        with _Occupancy(daemon) as occupancy:
            report = run_load(_spec(topics, store_url, count=params.count,
                                    completion_timeout_s=params.completion_timeout_s,
                                    daemons=[daemon], on_window=window))
        after = metric_samples(daemon) or {}
        cpu_before = before.get("process_cpu_seconds_total")
        cpu_after = after.get("process_cpu_seconds_total")
        for problem in load_problems(report, "throughput run"):
            results.error(scenario, problem)
        cpu = ""
        if cpu_before is not None and cpu_after is not None and report.wall_s > 0:
            cpu = (f"; daemon CPU {(cpu_after - cpu_before) / report.wall_s:.2f} cores, "
                   f"{(cpu_after - cpu_before) * 1000 / max(report.completed, 1):.2f} ms "
                   "per activation")
        results.add(f"{prefix}.throughput", report.throughput_per_s, "activations/s",
                    f"{report.completed} of {report.produced} no-op activations, "
                    f"lost {report.lost}, duplicates {report.duplicate_records}{cpu}; feed "
                    f"paused {report.daemon_pauses} times, {report.daemon_paused_seconds:.1f} s "
                    f"in all; p50 while busy: {occupancy.describe(before)}")
        if cpu_before is not None and cpu_after is not None and report.completed:
            results.add(f"{prefix}.cpu_per_activation",
                        (cpu_after - cpu_before) * 1000 / report.completed, "ms",
                        "daemon CPU (all threads) over the throughput run / activations")
        # run_load returned: on_window saw the load's start and end
        assert window.split is not None
        saturated_ms = None
        if report.completed:
            per = window.split.per_activation_ms(report.completed)
            _add_machine_split(results, prefix, per, window.split.describe(report.completed))
            saturated_ms = _machine_ms(per)
        for stage, (p50, p99, n) in stage_figures(before, after).items():
            results.add(f"{prefix}.stage.{stage}", p50, "ms p50",
                        f"p99 {_fmt(p99)} ms; {n} observations")
        records = _records(store_url, report)
        if not records:
            raise RuntimeError("no record of the throughput run found in the store")
        saturated = _added_latencies(report, records)

        # Each paced run's figures as soon as it is over: a later failure keeps them.
        paced_rate = max(report.throughput_per_s / 2, 1.0)
        half = _paced_run(results, scenario, daemon, topics, store_url, paced_rate,
                          params, "half-load run")
        half.add(results, prefix, "", "half the throughput", saturated_ms)
        half.add_stages(results, f"{prefix}.half_load_stage")
        quarter = _paced_run(results, scenario, daemon, topics, store_url,
                             max(report.throughput_per_s / 4, 1.0), params, "quarter-load run")
        quarter.add(results, prefix, "quarter_load_", "a quarter of the throughput",
                    saturated_ms)
        quarter.add_stages(results, f"{prefix}.quarter_load_stage")

        stop_daemon(daemon)
        daemon = None
        # On the run's overflow topic, which the daemon (overflow off) never used.
        kafka_alone = roundtrip_ms(topics.overflow, paced_rate,
                                   max(int(paced_rate * params.kafka_floor_s), 50),
                                   params.completion_timeout_s)
        results.add(f"{prefix}.kafka_alone_p50", percentile(kafka_alone, 50), "ms",
                    f"Kafka alone, produce -> consumed, {len(kafka_alone)} messages at "
                    f"{paced_rate:.0f}/s with the load generator's clients, the daemon "
                    f"stopped; p99 {_fmt(percentile(kafka_alone, 99))} ms: the floor under "
                    "each of the two Kafka legs of the added latency")

        written, seconds = store_rate(store_url, next(iter(records.values())), batch_size,
                                      params.store_records, params.store_time_limit_s)
        results.add(f"store.{kind}.bulk_insert_rate", written / seconds if seconds else None,
                    "records/s", f"{written} records in batches of {batch_size}, "
                    "one write at a time")
        results.ratio(f"ratio.{kind}.invoker_over_store", f"{prefix}.throughput",
                      f"store.{kind}.bulk_insert_rate")
        note = f"{len(saturated)} activations of the throughput run (includes queueing)"
        results.add(f"{prefix}.saturated_added_latency_p50", percentile(saturated, 50), "ms",
                    note)
        results.add(f"{prefix}.saturated_added_latency_p99", percentile(saturated, 99), "ms")
    finally:
        if daemon is not None:
            stop_daemon(daemon, graceful=False)
        if kind == "couchdb":
            delete_couch_db(store_url)
        elif sqlite_dir is not None:
            for path in Path(sqlite_dir).glob("*"):
                path.unlink(missing_ok=True)
            Path(sqlite_dir).rmdir()
        if topics is not None:
            topics.delete()


@dataclass
class _Paced:
    """A paced run's figures."""

    rate: float
    added: list[float]  # invoker-added latency per activation, ms
    durations: list[float]  # the action's own run time per activation, ms
    waits: list[float]  # produce -> start of /run per activation, ms
    stages: dict[str, tuple[float | None, float | None, int]]
    machine: CpuSplit  # over the load's span, wall_s long
    wall_s: float
    completed: int
    timed_out: bool  # waiting for the completions: the span holds that wait

    def add(self, results: Results, prefix: str, name: str, what: str,
            saturated_ms: float | None) -> None:
        """Latency figures ``{prefix}.{name}added_latency_p50``/``_p99``, and how busy the
        machine was meanwhile (``{prefix}.{name}machine_busy``), with its CPU per activation
        beside the throughput run's (``saturated_ms``): at a lower rate every process on the
        machine spends more per activation, so half the rate takes more than half of it."""
        note = (f"{len(self.added)} activations at {self.rate:.0f}/s ({what}); action run "
                f"time p50 {_fmt(percentile(self.durations, 50))} ms; produce -> /run start "
                f"(waitTime) p50 {_fmt(percentile(self.waits, 50))} ms")
        results.add(f"{prefix}.{name}added_latency_p50", percentile(self.added, 50), "ms",
                    note)
        results.add(f"{prefix}.{name}added_latency_p99", percentile(self.added, 99), "ms")
        if self.timed_out or not self.wall_s or not self.completed:
            return
        machine = _machine_ms(self.machine.per_activation_ms(self.completed))
        busy = machine * self.completed / 1000 / (self.wall_s * CORES)
        note = (f"of all {CORES} cores, every process, during the run at {self.rate:.0f}/s: "
                f"{machine:.2f} ms of CPU per activation (the throughput run's "
                f"{_fmt(saturated_ms, 2)}): {self.machine.describe(self.completed)}")
        results.add(f"{prefix}.{name}machine_busy", busy * 100, "%", note)

    def add_stages(self, results: Results, name: str) -> None:
        """The daemon's per-stage p50 (p99 in the note) over the run, as ``{name}.<stage>``."""
        for stage, (p50, p99, n) in self.stages.items():
            results.add(f"{name}.{stage}", p50, "ms p50",
                        f"p99 {_fmt(p99)} ms; {n} observations (the paced run at "
                        f"{self.rate:.0f}/s)")


def _paced_run(results: Results, scenario: str, daemon: Any, topics: Topics, store_url: str,
               rate: float, params: E2EParams, what: str) -> _Paced:
    """``params.paced_s`` seconds of no-op activations at ``rate``, with the machine's CPU
    split over the load's span and the daemon's stage histograms sampled around the run."""
    before = metric_samples(daemon) or {}
    window = LoadWindow(daemon_pid=daemon.process.pid)
    report = run_load(_spec(topics, store_url, count=max(int(rate * params.paced_s), 50),
                            rate=rate, completion_timeout_s=params.completion_timeout_s,
                            on_window=window))
    for problem in load_problems(report, what):
        results.error(scenario, problem)
    stages = stage_figures(before, metric_samples(daemon) or {})
    records = _records(store_url, report)
    assert window.split is not None  # run_load returned: on_window saw the load's end
    return _Paced(rate, _added_latencies(report, records),
                  [r["duration"] for r in records.values()],
                  [w for w in (_wait_time(r) for r in records.values()) if w is not None],
                  stages, window.split, window.wall_s, report.completed,
                  report.completion_wait_timed_out)


def _add_machine_split(results: Results, prefix: str, per: dict[str, float],
                       described: str) -> None:
    """The machine's CPU per activation over the throughput run (what the hypervisor gave
    other guests meanwhile, steal, only in the note), and the throughput this host could reach
    if the daemon cost nothing and everything else stayed as it is."""
    machine = _machine_ms(per)
    results.add(f"{prefix}.machine_cpu_per_activation", machine, "ms",
                f"all {CORES} cores, every process: {described}")
    results.add(f"{prefix}.steal_per_activation", per.get(STEAL), "ms",
                "what the hypervisor gave other guests while this VM had work (/proc/stat): "
                "where it is large, the run's figures are a busy host's")
    rest = machine - per["daemon"]
    results.add(f"{prefix}.ceiling_without_daemon_cost",
                CORES * 1000 / rest if rest > 0 else None, "activations/s",
                f"{CORES} cores / the {rest:.2f} ms per activation that is not the daemon's")


class _Occupancy:
    """Samples the daemon's OCCUPANCY gauges every OCCUPANCY_INTERVAL_S on a thread, for as
    long as the ``with`` block lasts."""

    def __init__(self, daemon: Any) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-occupancy",
                                        daemon=True)
        self.samples: collections.deque[dict[str, float]] = collections.deque(
            maxlen=OCCUPANCY_MAX_SAMPLES)  # the OCCUPANCY gauges only

    def __enter__(self) -> _Occupancy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.wait(OCCUPANCY_INTERVAL_S):
            figures = metric_samples(self._daemon)
            if figures:
                self.samples.append({name: figures.get(name, 0.0) for name in OCCUPANCY})

    def describe(self, limits: dict[str, float]) -> str:
        """p50 of each gauge over the samples taken while something ran, with its bound."""
        busy = [s for s in self.samples if s["invoker_slots_used"]]
        if not busy:
            return "no samples"
        parts = []
        for name, (label, limit) in OCCUPANCY.items():
            p50 = percentile([s[name] for s in busy], 50) or 0.0
            bound = limits.get(limit) if isinstance(limit, str) else limit
            parts.append(f"{label} {p50:.0f}" + (f" of {bound:.0f}" if bound else ""))
        return ", ".join(parts) + f" ({len(busy)} samples)"


def _machine_ms(per_activation: dict[str, float]) -> float:
    """The machine's CPU per activation, all processes, without the hypervisor's steal."""
    return sum(ms for group, ms in per_activation.items() if group != STEAL)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"



def _wait_time(record: dict) -> float | None:
    """The record's waitTime annotation: submittedAt → start of /run, in ms."""
    for annotation in record.get("annotations") or ():
        if annotation.get("key") == "waitTime":
            return annotation.get("value")
    return None

