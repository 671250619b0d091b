"""Figure: a round-robin load over five times more actions than the daemon has memory for.

One daemon (default settings: ``user_memory_mb`` 2048 and 256 MB actions, so 8 containers) on
fresh topics and a SQLite store; ``count`` no-op activations produced as fast as possible,
spread round-robin over ``5 × 8`` distinct actions of one namespace (loadgen's ``copies``).
Nearly every activation needs a container its predecessor on that slot does not have: the
figure is how fast the pool evicts, creates and initializes containers, several at once.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.figures import Results
from bench.infra import launch, load_problems, metric_samples, stop_daemon
from invoker.config import Config
from invoker.loadgen import percentile, run_load
from tests.support.daemon import load_spec


@dataclass(frozen=True)
class RoundRobinParams:
    count: int = 400
    completion_timeout_s: float = 180.0

    @classmethod
    def quick(cls) -> RoundRobinParams:
        return cls(count=160, completion_timeout_s=120.0)


def run(results: Results, params: RoundRobinParams, work: Path) -> None:
    fields = Config.__dataclass_fields__
    slots = fields["user_memory_mb"].default // fields["default_memory_mb"].default
    actions = 5 * slots
    sqlite_dir = tempfile.mkdtemp(prefix="sqlite-", dir=work)
    store_url = f"sqlite:///{sqlite_dir}/records.sqlite3"
    daemon, topics = launch(lambda m: results.error("roundrobin", m), store_url, work,
                            "roundrobin")
    try:
        before = metric_samples(daemon) or {}
        report = run_load(load_spec(topics, store_url, daemons=[daemon], actions=["noop"],
                                    copies=actions, count=params.count,
                                    namespace=f"rr-{topics.group}",
                                    completion_timeout_s=params.completion_timeout_s))
        after = metric_samples(daemon) or {}
        for problem in load_problems(report, "round-robin run"):
            results.error("roundrobin", problem)
        cold = (after.get("invoker_container_starts_total{kind=cold}", 0)
                - before.get("invoker_container_starts_total{kind=cold}", 0))
        latencies = list(report.latencies_ms.values())
        results.add("roundrobin.throughput", report.throughput_per_s, "activations/s",
                    f"{report.completed} of {report.produced} no-op activations over {actions} "
                    f"actions, {slots} containers' memory; {cold:.0f} cold starts; latency p50 "
                    f"{percentile(latencies, 50) or 0:.0f} ms, p99 "
                    f"{percentile(latencies, 99) or 0:.0f} ms")
    finally:
        stop_daemon(daemon, graceful=False)
        topics.delete()
        for path in Path(sqlite_dir).glob("*"):
            path.unlink(missing_ok=True)
        Path(sqlite_dir).rmdir()
