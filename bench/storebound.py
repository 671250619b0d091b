"""Store-bound throughput: does the invoker keep a slow store busy?

The fault proxy in front of pouchdb-server delays every request (each bulk write is one) by
``request_latency_s``, so the store, not the invoker, limits the rate: a few hundred records/s
with the daemon's default batch size and writes in flight. One daemon with default settings
stores through the proxy:

1. a warm-up (``warmup`` no-op activations, the proxy at full speed) so the containers exist;
2. the unthrottled run: ``count`` no-op activations as fast as possible, the proxy at full
   speed: what this daemon does here when the store is not slowed;
3. the throughput run: the same, the proxy delaying every request (loadgen's
   ``throughput_per_s``: first produce → last completion received);
4. the daemon is stopped; then the slowed store alone, on the same database through the same
   proxy: ``write_batch`` of copies of a record of the run in batches of the daemon's
   ``batch_size``, ``max_writes_in_flight`` writes at a time.

The ratio of 3 to 4 is how much of the slowed store's capacity the invoker uses (goal ≥ 0.9);
the ratio of 2 to 4 whether the store was the bottleneck at all (only if it is above 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from invoker.config import Config
from invoker.loadgen import Report, run_load
from tests.support.daemon import COUCHDB, Topics, load_spec, stored_records
from tests.support.faultproxy import ProxyProcess

ACTION = "noop"


@dataclass(frozen=True)
class StoreBoundParams:
    request_latency_s: float = 0.5
    warmup: int = 300  # enough that the measured runs start no container
    count: int = 3000
    store_records: int = 3000
    store_time_limit_s: float = 30.0
    completion_timeout_s: float = 90.0

    @classmethod
    def quick(cls) -> StoreBoundParams:
        return cls(warmup=100, count=1000, store_records=1000, store_time_limit_s=15.0,
                   completion_timeout_s=60.0)


def _defaults(*names: str) -> list[Any]:
    return [Config.__dataclass_fields__[name].default for name in names]


def run(results: Results, params: StoreBoundParams, work: Path) -> None:
    def errors(message: str) -> None:
        results.error("storebound", message)

    batch_size, in_flight = _defaults("batch_size", "max_writes_in_flight")
    target = COUCHDB.split("//", 1)[1].rstrip("/")
    proxy = ProxyProcess(target, work)
    db, direct_url = new_couch_db()
    proxied_url = f"http://127.0.0.1:{proxy.port}/{db}"
    topics: Topics | None = None
    daemon = None
    try:
        daemon, topics = launch(errors, proxied_url, work, "storebound")
        # One namespace for all runs: containers serve one namespace
        namespace = f"bench-{topics.group}"

        def load(count: int, what: str, figure: str | None) -> Report:
            assert daemon is not None and topics is not None
            before = metric_samples(daemon)
            report = run_load(load_spec(topics, direct_url, actions=[ACTION],
                                        namespace=namespace, count=count, daemons=[daemon],
                                        completion_timeout_s=params.completion_timeout_s))
            after = metric_samples(daemon)
            for problem in load_problems(report, what):
                errors(problem)
            if figure is not None:
                results.add(figure, report.throughput_per_s, "activations/s",
                            _note(report, before, after))
            return report

        if load(params.warmup, "warm-up run", None).completed == 0:
            raise RuntimeError(f"the warm-up run completed nothing; see {daemon.log_path}")
        load(params.count, "unthrottled run", "storebound.invoker.unthrottled_throughput")
        proxy.set(latency=0.0, down=False, request_latency=params.request_latency_s)
        time.sleep(0.3)  # the proxy re-reads its control file every 100 ms
        report = load(params.count, "throughput run", "storebound.invoker.throughput")
        stop_daemon(daemon)
        daemon = None

        template = _one_record(direct_url, report.namespace, report.latencies_ms)
        written, seconds = store_rate(proxied_url, template, batch_size, params.store_records,
                                      params.store_time_limit_s, writers=in_flight)
        results.add("storebound.store.bulk_insert_rate", written / seconds if seconds else None,
                    "records/s", f"{written} records in batches of {batch_size}, {in_flight} "
                    f"writes at a time, each request delayed {params.request_latency_s:g} s by "
                    "the proxy")
        results.ratio("ratio.storebound.invoker_over_store", "storebound.invoker.throughput",
                      "storebound.store.bulk_insert_rate", "goal >= 0.9")
        results.ratio("ratio.storebound.unthrottled_over_store",
                      "storebound.invoker.unthrottled_throughput",
                      "storebound.store.bulk_insert_rate",
                      "below 1: the invoker, not the slowed store, is the bottleneck")
    finally:
        if daemon is not None:
            stop_daemon(daemon, graceful=False)
        proxy.close()
        delete_couch_db(direct_url)
        if topics is not None:
            topics.delete()


def _note(report: Report, before: dict[str, float] | None,
          after: dict[str, float] | None) -> str:
    """The run's counts, the daemon's CPU use and bulk writes (whether it kept the store busy:
    full batches, back to back), and its feed pauses."""
    daemon_side = ""
    if before and after and report.wall_s > 0:
        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        used = delta("process_cpu_seconds_total")
        writes = delta("invoker_store_batch_size_count")
        daemon_side = (f"; daemon CPU {used / report.wall_s:.2f} cores, "
                       f"{used * 1000 / max(report.completed, 1):.2f} ms per activation; "
                       f"{writes:.0f} bulk writes of {_mean(delta, 'batch_size', writes)} "
                       f"records, {_mean(delta, 'write_seconds', writes)} s each")
    return (f"{report.completed} of {report.produced} no-op activations, lost {report.lost}, "
            f"duplicates {report.duplicate_records}{daemon_side}; feed paused "
            f"{report.daemon_pauses} times, {report.daemon_paused_seconds:.1f} s in all")


def _mean(delta: Callable[[str], float], histogram: str, count: float) -> str:
    """The mean of an ``invoker_store_<histogram>`` over the run, formatted."""
    return f"{delta(f'invoker_store_{histogram}_sum') / count:.2f}" if count else "n/a"


def _one_record(url: str, namespace: str, completed: dict[str, float]) -> dict[str, Any]:
    """A record of the run, read directly from the store (not through the proxy)."""
    found = stored_records(url, dict.fromkeys(list(completed)[:10], namespace))[0]
    if not found:
        raise RuntimeError("no record of the throughput run found in the store")
    return next(iter(found.values()))
