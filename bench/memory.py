"""Figure 5: the slow-store memory comparison, bounded daemon vs. OpenWhisk-like unbounded.

A fault proxy in front of pouchdb-server delays every chunk sent to the store. The same load
(``count`` activations of ``big:32``: 32 KB results, produced as fast as possible) runs
against two daemons in turn, each on fresh topics and a fresh database:

- *bounded*: small bounds, so the record channel fills, the feed pauses and memory stays flat;
- *unbounded*: the same daemon configured as OpenWhisk behaves — an effectively unbounded
  record channel that never pauses the feed, 64 slots and a large read-ahead.

Both use the same store settings (batch size, writes in flight), so they store at the same
rate; only the buffering differs. Each daemon's RSS (``process_resident_memory_bytes`` from
its /metrics) is sampled every ``interval_s`` for a fixed ``window_s``; then the daemon is
killed and its containers removed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import Results, fmt_value
from bench.infra import (
    delete_couch_db,
    delete_topics,
    launch,
    metric_samples,
    new_couch_db,
    sleep_until,
    stop_daemon,
)
from invoker.loadgen import Report, run_load
from tests.support.daemon import COUCHDB, Topics, counter_total, load_spec
from tests.support.faultproxy import ProxyProcess

MiB = 1024 * 1024
STORE = {"batch_size": 50, "max_writes_in_flight": 1}
VARIANTS: dict[str, dict[str, Any]] = {
    "bounded": {"max_activations": 8, "record_channel_size": 64,
                "record_channel_low_watermark": 32, **STORE},
    "unbounded": {"record_channel_size": 10_000_000, "record_channel_low_watermark": 9_999_999,
                  "max_activations": 64, "read_ahead": 1000, "max_poll_records": 500, **STORE},
}


@dataclass(frozen=True)
class MemoryParams:
    # More than either daemon can run in the window, so the unbounded one keeps taking work
    count: int = 3000
    action: str = "big:32"
    proxy_latency_s: float = 0.2
    window_s: float = 30.0
    interval_s: float = 0.5

    @classmethod
    def quick(cls) -> MemoryParams:
        return cls(count=400, window_s=10.0)


@dataclass
class Run:
    samples: list[dict[str, float]]  # t, rss, depth, paused, stored, executed
    report: Report | None
    first: dict[str, float]
    last: dict[str, float]
    load_error: str | None = None


def _sample(daemon: Any, t: float) -> dict[str, float] | None:
    m = metric_samples(daemon)
    if m is None:
        return None
    return {
        "t": t,
        "rss": m.get("process_resident_memory_bytes", 0.0),
        "depth": m.get("invoker_record_channel_depth", 0.0),
        "paused": m.get("invoker_feed_paused", 0.0),
        "pauses": m.get("invoker_feed_pauses_total", 0.0),
        "stored": m.get("invoker_records_stored_total", 0.0),
        "executed": counter_total(m, "invoker_activations_total"),
        "worst_case_bytes": m.get("invoker_worst_case_buffered_bytes", 0.0),
        "peak_rss": m.get("invoker_process_peak_rss_bytes", 0.0),
    }


def _run_one(name: str, params: MemoryParams, proxy: ProxyProcess, work: Path,
             errors: Callable[[str], None]) -> Run:
    topics: Topics | None = None
    db, direct_url = new_couch_db()
    proxied_url = f"http://127.0.0.1:{proxy.port}/{db}"
    daemon = None
    outcome: dict[str, Any] = {}
    loader = None
    try:
        daemon, topics = launch(errors, proxied_url, work, f"memory-{name}", **VARIANTS[name])
        first = _sample(daemon, 0.0)
        if first is None:
            raise RuntimeError(f"{name} daemon: /metrics did not answer")
        spec = load_spec(topics, direct_url, actions=[params.action], count=params.count,
                         completion_timeout_s=params.window_s)

        def load() -> None:
            try:
                outcome["report"] = run_load(spec)
            except Exception as exc:  # reported below
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        loader = threading.Thread(target=load, name=f"load-{name}", daemon=True)
        start = time.monotonic()
        loader.start()
        samples: list[dict[str, float]] = []
        steps = int(round(params.window_s / params.interval_s))
        for k in range(steps + 1):
            sleep_until(start + k * params.interval_s)
            s = _sample(daemon, k * params.interval_s)
            if s is not None:
                samples.append(s)
        last = samples[-1] if samples else first
        stop_daemon(daemon, graceful=False)  # the window is over: kill it
        daemon = None
        loader.join(timeout=params.window_s + 120)
        if loader.is_alive():
            outcome.setdefault("error", "the load did not finish in time")
        return Run(samples, outcome.get("report"), first, last, outcome.get("error"))
    finally:
        if daemon is not None:
            stop_daemon(daemon, graceful=False)
        delete_couch_db(direct_url)
        if topics is not None:
            delete_topics(topics)


def run(results: Results, params: MemoryParams, work: Path) -> None:
    target = COUCHDB.split("//", 1)[1].rstrip("/")
    proxy = ProxyProcess(target, work)
    try:
        proxy.set(latency=params.proxy_latency_s, down=False)
        time.sleep(0.3)  # the proxy re-reads its control file every 100 ms
        runs = {name: _run_one(name, params, proxy, work, lambda m: results.error("memory", m))
                for name in VARIANTS}
    finally:
        proxy.close()
    _report(results, params, runs)


def _report(results: Results, params: MemoryParams, runs: dict[str, Run]) -> None:
    b, u = runs["bounded"], runs["unbounded"]
    for name, r in runs.items():
        if r.load_error:
            results.error("memory", f"{name}: load failed: {r.load_error}")
    out = results.out
    print(f"memory: RSS every {params.interval_s:g} s, {params.count} x {params.action} as fast "
          f"as possible, store behind a proxy adding {params.proxy_latency_s:g} s per chunk",
          file=out)
    print(f"{'t (s)':>7} {'bounded MiB':>12} {'unbounded MiB':>14}   "
          f"{'bounded depth':>13} {'unbounded depth':>15}", file=out)
    series = []
    for k in range(max(len(b.samples), len(u.samples))):
        sb = b.samples[k] if k < len(b.samples) else None
        su = u.samples[k] if k < len(u.samples) else None
        t = (sb or su)["t"]  # type: ignore[index]
        row = {"t": t, "bounded_rss_mib": sb and sb["rss"] / MiB,
               "unbounded_rss_mib": su and su["rss"] / MiB,
               "bounded_depth": sb and sb["depth"], "unbounded_depth": su and su["depth"]}
        series.append(row)
        print(f"{t:7.1f} {fmt_value(row['bounded_rss_mib']):>12} "
              f"{fmt_value(row['unbounded_rss_mib']):>14}   "
              f"{_int(row['bounded_depth']):>13} {_int(row['unbounded_depth']):>15}", file=out,
              flush=True)
    results.series["memory_rss"] = series

    for name, r in runs.items():
        peak = max((s["rss"] for s in r.samples), default=None)
        results.add(f"memory.{name}.peak_rss", peak and peak / MiB, "MiB",
                    f"RSS at t=0 {r.first['rss'] / MiB:.1f} MiB; ru_maxrss "
                    f"{r.last['peak_rss'] / MiB:.1f} MiB")
    results.ratio("ratio.memory.unbounded_over_bounded_peak_rss", "memory.unbounded.peak_rss",
                  "memory.bounded.peak_rss")
    for name, r in runs.items():
        growth = max((s["rss"] for s in r.samples), default=r.first["rss"]) - r.first["rss"]
        results.add(f"memory.{name}.rss_growth", growth / MiB, "MiB", "peak sampled RSS - RSS "
                    "before the load")
    results.add("memory.bounded.worst_case_buffered", b.first["worst_case_bytes"] / MiB, "MiB",
                "invoker_worst_case_buffered_bytes, the stated bound")
    for name, r in runs.items():
        report = r.report
        completed = report.completed if report is not None else None
        results.add(f"memory.{name}.completed_in_window", completed, "activations",
                    f"of {params.count} in {params.window_s:g} s; executed "
                    f"{r.last['executed']:.0f}, stored {r.last['stored']:.0f}, max channel "
                    f"depth {max((s['depth'] for s in r.samples), default=0):.0f}")
    results.add("memory.bounded.pauses", b.last["pauses"], "pauses",
                "invoker_feed_pauses_total at the end of the window")
    results.add("memory.unbounded.pauses", u.last["pauses"], "pauses",
                "read-ahead full (1000 messages); its record channel never fills")


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
