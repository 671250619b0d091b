"""Figure 5: the slow-store memory comparison, bounded daemon vs. OpenWhisk-like unbounded.

A fault proxy in front of pouchdb-server delays every chunk sent to the store. The same load
(``count`` activations of ``big:32``: 32 KB results, produced as fast as possible) runs
against two daemons in turn, each on fresh topics and a fresh database:

- *bounded*: small bounds, so the record channel fills, the feed pauses and memory stays flat;
- *unbounded*: the same daemon configured as OpenWhisk behaves — an effectively unbounded
  record channel that never pauses the feed, 64 slots and a large read-ahead.

Both use the same store settings (batch size, writes in flight), so they store at the same
rate; only the buffering differs. Each daemon's RSS (``process_resident_memory_bytes`` from
its /metrics) is sampled every ``interval_s`` for a fixed ``window_s`` (window / interval + 1
samples); then the daemon is killed and its containers removed. Both RSS series go on one
chart with the bounded daemon's stated bound (bench/memory_plot.py), written to
``PLOT_TARGET``.png and .html (bench/results/memory.png; a plot that cannot be written is
reported as an error, the figures stand).

``memory-long`` (``run_long``, on request only) watches the bounded daemon alone for longer
(11 minutes; 3 with ``--quick``) under a steady store-bound load: ``rate`` activations/s of
``big:32`` offered while the proxy freezes the store 98 % of the time. It prints the RSS's
first- and last-minute means, its peak and its least-squares slope (all of it, and its second
half alone). ``MALLOC_*`` variables in the bench's environment reach the daemon (it inherits
it); ``BENCH_MEMTRACE=1`` runs it under tracemalloc (``bench/memtrace/sitecustomize.py``) and
prints what grew between the snapshot after the first minute and the last one.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import Figure, Results, fmt_value
from bench.infra import (
    delete_couch_db,
    launch,
    metric_samples,
    new_couch_db,
    sleep_until,
    stop_daemon,
    tag,
)
from bench.memory_plot import BoundLine, RssLine, paused_spans, write_memory_plot
from invoker.loadgen import Report, activation_message, run_load
from tests.support.daemon import COUCHDB, KAFKA, Topics, counter_total, load_spec
from tests.support.faultproxy import ProxyProcess

MiB = 1024 * 1024
PLOT_TARGET = Path(__file__).resolve().parent / "results" / "memory"  # .png and .html
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
            topics.delete()


def run(results: Results, params: MemoryParams, work: Path,
        plot_to: Path = PLOT_TARGET) -> None:
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
    write_plot(results, params, runs, plot_to)


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


def write_plot(results: Results, params: MemoryParams, runs: dict[str, Run],
               target: Path) -> None:
    """Both RSS series on one chart with the bounded daemon's stated bound, as target.png
    and target.html (the memory figures under the image); prints the paths. A failure
    (matplotlib missing, a file not writable) goes to ``results.errors``. Blocks: drawing
    (about a second of CPU) and writing the files."""
    lines = [RssLine(_label(name), [s["t"] for s in r.samples],
                     [s["rss"] / MiB for s in r.samples],
                     paused_spans([(s["t"], s["paused"], s["pauses"]) for s in r.samples]))
             for name, r in runs.items()]
    b = runs["bounded"]
    bound = None
    if b.first["worst_case_bytes"] > 0:
        bound = BoundLine((b.first["rss"] + b.first["worst_case_bytes"]) / MiB,
                          f"bounded's stated bound: RSS before the load + "
                          f"{b.first['worst_case_bytes'] / MiB:,.0f} MiB of buffered records")
    title = (f"Slow store (+{params.proxy_latency_s:g} s per chunk): daemon RSS, "
             f"{params.count} x {params.action} as fast as possible")
    rows = [(f.name, _figure_text(f)) for f in results.figures
            if f.name.startswith(("memory.", "ratio.memory."))]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        png, page = write_memory_plot(target, lines, bound, rows, title)
    except (ImportError, OSError) as exc:
        results.error("memory", f"plot not written: {type(exc).__name__}: {exc}")
        return
    print(f"memory: plot written to {png} (and {page}, offline)", file=results.out, flush=True)


def _label(name: str) -> str:
    settings = VARIANTS[name]
    like = ", as OpenWhisk" if name == "unbounded" else ""
    return (f"{name}{like}: {settings['max_activations']} slots, record channel "
            f"{settings['record_channel_size']:,}")


def _figure_text(figure: Figure) -> str:
    note = f"  ({figure.note})" if figure.note else ""
    return f"{fmt_value(figure.value)} {figure.unit}{note}"


# ---- memory-long ----------------------------------------------------------------------------

MEMTRACE_DIR = Path(__file__).resolve().parent / "memtrace"
# The daemon's environment as the figures' notes should show it (the allocator's settings)
ALLOCATOR_ENV = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "PYTHONMALLOC")


@dataclass(frozen=True)
class LongParams:
    duration_s: float = 660.0
    rate: float = 150.0  # activations offered per second: far more than the store takes
    action: str = "big:32"
    # The store is frozen but for the first 20 ms of every second (98 % of the time)
    freeze: tuple[float, float] = (1.0, 0.02)
    interval_s: float = 5.0
    memtrace_interval_s: float = 60.0  # with BENCH_MEMTRACE=1: a snapshot every minute

    @classmethod
    def quick(cls) -> LongParams:
        return cls(duration_s=180.0, interval_s=2.0, memtrace_interval_s=30.0)


def _proc_rss(pid: int) -> dict[str, float] | None:
    """VmRSS, RssAnon and RssFile (bytes) from /proc/<pid>/status; None once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    found[key] = float(rest.split()[0]) * 1024
    except OSError:
        return None
    return found if len(found) == 3 else None


def _produce_paced(topic: str, action: str, rate: float, duration_s: float,
                   stop: threading.Event, sent: list[int]) -> None:
    """Produce ``rate`` activations/s of ``action`` (one namespace, so containers are reused)
    for ``duration_s`` or until ``stop``; ``sent[0]`` counts them. Not loadgen's run_load: it
    would read every record back (hundreds of MB of 32 KB results) at the end."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=KAFKA, client_id="bench-memory-long",
                             linger_ms=5, max_block_ms=30_000, request_timeout_ms=30_000)
    namespace = f"bench-{tag()}"
    start = time.monotonic()
    try:
        while not stop.is_set() and (elapsed := time.monotonic() - start) < duration_s:
            while sent[0] < int(elapsed * rate) + 1:
                message = activation_message(action, namespace)
                producer.send(topic, value=json.dumps(message).encode(),
                              key=message["activationId"].encode())
                sent[0] += 1
            stop.wait(0.05)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)


def _memtrace_env(params: LongParams, work: Path) -> tuple[dict[str, str], Path | None]:
    """The daemon's extra environment for BENCH_MEMTRACE=1, and where its snapshots go."""
    if os.environ.get("BENCH_MEMTRACE") != "1":
        return {}, None
    out = work / f"memtrace-{tag()}"
    path = os.pathsep.join(p for p in (str(MEMTRACE_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "BENCH_MEMTRACE_DIR": str(out),
            "BENCH_MEMTRACE_INTERVAL_S": str(params.memtrace_interval_s)}, out


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var * 60 / MiB


def run_long(results: Results, params: LongParams, work: Path) -> None:
    target = COUCHDB.split("//", 1)[1].rstrip("/")
    proxy = ProxyProcess(target, work)
    db, direct_url = new_couch_db()
    env, trace_dir = _memtrace_env(params, work)
    topics: Topics | None = None
    daemon = None
    stop = threading.Event()
    sent = [0]
    producer = None
    samples: list[dict[str, float]] = []
    try:
        proxy.set(latency=0.0, down=False, freeze=params.freeze)
        time.sleep(0.3)  # the proxy re-reads its control file every 100 ms
        daemon, topics = launch(lambda m: results.error("memory-long", m),
                                f"http://127.0.0.1:{proxy.port}/{db}", work, "memory-long",
                                env=env, **VARIANTS["bounded"])
        assert daemon.process is not None
        pid = daemon.process.pid
        producer = threading.Thread(
            target=_produce_paced, name="memory-long-load", daemon=True,
            args=(topics.feed, params.action, params.rate, params.duration_s, stop, sent))
        start = time.monotonic()
        producer.start()
        steps = int(params.duration_s // params.interval_s)
        for k in range(steps + 1):
            sleep_until(start + k * params.interval_s)
            rss = _proc_rss(pid)
            if rss is None:
                raise RuntimeError(f"the daemon exited: {daemon.log_tail(5)}")
            sample = {"t": k * params.interval_s, "rss": rss["VmRSS"], "anon": rss["RssAnon"],
                      "file": rss["RssFile"]}
            m = _sample(daemon, sample["t"])
            if m is not None:
                sample.update({key: m[key] for key in ("depth", "pauses", "stored",
                                                       "executed")})
            samples.append(sample)
        stop.set()
        producer.join(timeout=60)
    finally:
        stop.set()
        if daemon is not None:
            stop_daemon(daemon, graceful=False)
        proxy.close()
        delete_couch_db(direct_url)
        if topics is not None:
            topics.delete()
    _report_long(results, params, samples, sent[0])
    if trace_dir is not None:
        _report_memtrace(results, trace_dir)


def _report_long(results: Results, params: LongParams, samples: list[dict[str, float]],
                 offered: int) -> None:
    out = results.out
    allocator = " ".join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if k in os.environ)
    period, open_s = params.freeze
    print(f"memory-long: RSS every {params.interval_s:g} s for {params.duration_s:g} s, "
          f"{params.rate:g}/s of {params.action} offered, store frozen but for {open_s:g} s of "
          f"every {period:g} s; daemon environment: {allocator or 'default allocator'}", file=out)
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'anon MiB':>9} {'file MiB':>9} {'executed':>9} "
          f"{'stored':>7} {'depth':>6}", file=out)
    for s in samples:
        if s["t"] % 60 < params.interval_s or s is samples[-1]:  # one line a minute
            print(f"{s['t']:7.0f} {s['rss'] / MiB:8.1f} {s['anon'] / MiB:9.1f} "
                  f"{s['file'] / MiB:9.1f} {_int(s.get('executed')):>9} "
                  f"{_int(s.get('stored')):>7} {_int(s.get('depth')):>6}", file=out)
    results.series["memory_long_rss"] = samples
    end = samples[-1]["t"] if samples else 0.0

    def mean(window: list[dict[str, float]]) -> float | None:
        return sum(s["rss"] for s in window) / len(window) / MiB if window else None

    note = allocator or "default allocator"
    results.add("memory_long.rss_first_minute", mean([s for s in samples if s["t"] < 60]),
                "MiB", f"mean RSS over the first minute of the load; {note}")
    results.add("memory_long.rss_last_minute", mean([s for s in samples if s["t"] > end - 60]),
                "MiB", f"mean RSS over the last minute ({end:.0f} s in all)")
    peak = max(samples, key=lambda s: s["rss"]) if samples else None
    results.add("memory_long.peak_rss", peak and peak["rss"] / MiB, "MiB",
                f"at t={peak['t']:.0f} s" if peak else "")
    results.add("memory_long.rss_slope", slope_mib_per_min([(s["t"], s["rss"]) for s in samples]),
                "MiB/min", "least squares over the whole run")
    second_half = [s for s in samples if s["t"] >= end / 2]
    anon_slope = slope_mib_per_min([(s["t"], s["anon"]) for s in second_half])
    results.add("memory_long.rss_slope_second_half",
                slope_mib_per_min([(s["t"], s["rss"]) for s in second_half]), "MiB/min",
                f"least squares over t >= {end / 2:.0f} s (RssAnon alone: "
                f"{fmt_value(anon_slope)} MiB/min)")
    # The last sample /metrics answered for (a memtrace snapshot can hold it up for a second)
    last = next((s for s in reversed(samples) if "executed" in s), {})
    executed, stored, at = last.get("executed"), last.get("stored"), last.get("t")
    results.add("memory_long.executed", executed, "activations",
                f"of {offered} offered; stored {_int(stored)} "
                f"({(stored or 0) / at if at else 0:.1f}/s), feed pauses "
                f"{_int(last.get('pauses'))}")


def _report_memtrace(results: Results, trace_dir: Path) -> None:
    """What grew, from the daemon's tracemalloc snapshots and malloc statistics."""
    out = results.out
    try:
        stats = [json.loads(line) for line in (trace_dir / "stats.jsonl").read_text().splitlines()]
    except OSError as exc:
        results.error("memory-long", f"no memtrace statistics: {exc}")
        return
    print(f"memtrace ({trace_dir}): RSS by mapping, tracemalloc's traced bytes, glibc "
          "in use / free (MiB)", file=out)
    print(f"{'t (s)':>7} {'heap':>6} {'thr.ar':>6} {'pymal':>6} {'anon':>6} {'file':>6} "
          f"{'traced':>7} {'tm ovh':>7} {'inuse':>6} {'free':>6} {'mmap':>6}", file=out)
    for st in stats:
        rss = st["rss_kb"]
        mi = st.get("mallinfo2", {})
        print(f"{st['t']:7.0f} " + " ".join(
            f"{rss.get(k, 0) / 1024:6.1f}" for k in ("heap", "thread_arenas", "pymalloc_arenas",
                                                     "anon", "file"))
              + f" {st['traced'] / MiB:7.1f} {st['tracemalloc_overhead'] / MiB:7.1f}"
              + f" {mi.get('uordblks', 0) / MiB:6.1f} {mi.get('fordblks', 0) / MiB:6.1f}"
              + f" {mi.get('hblkhd', 0) / MiB:6.1f}", file=out)
    results.series["memtrace"] = stats
    snaps = sorted(trace_dir.glob("snap-*.pickle"))
    if len(snaps) < 3:
        return
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__),
               tracemalloc.Filter(False, str(MEMTRACE_DIR / "*")),
               tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    with open(snaps[1], "rb") as f:  # after the first interval: warm containers, full channel
        early = pickle.load(f).filter_traces(exclude)
    with open(snaps[-1], "rb") as f:
        late = pickle.load(f).filter_traces(exclude)
    print(f"tracemalloc: largest growth from {snaps[1].name} to {snaps[-1].name}, by line",
          file=out)
    for stat in late.compare_to(early, "lineno")[:15]:
        print(f"  {stat}", file=out)
    print("tracemalloc: largest growth by traceback", file=out)
    for stat in late.compare_to(early, "traceback")[:5]:
        print(f"  {stat.size_diff / 1024:+.0f} KiB, {stat.count_diff:+d} blocks:", file=out)
        for line in stat.traceback.format(limit=6):
            print(f"    {line}", file=out)
