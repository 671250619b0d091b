"""One load run, :func:`run_load`: the steps in the docstring of :mod:`invoker.loadgen`."""

from __future__ import annotations

import sys
import time

from invoker.loadgen.actions import message_encoders
from invoker.loadgen.check import check_store, count_store
from invoker.loadgen.clients import ensure_topics
from invoker.loadgen.collect import CompletionCollector
from invoker.loadgen.daemon_metrics import DaemonWatch
from invoker.loadgen.produce import Sending, produce_run
from invoker.loadgen.report import Progress, Report, percentile, progress_line
from invoker.loadgen.sampler import MetricsSampler, run_series
from invoker.loadgen.spec import LoadgenError, LoadSpec


def run_load(spec: LoadSpec) -> Report:
    """Run one load test (blocking; safe to call from a worker thread). See the module doc.

    Raises ValueError for an invalid spec or store URL and LoadgenError when Kafka or the store
    is unusable before anything was produced, or a plot was asked for and cannot be made (no
    matplotlib, no writable directory); later failures end up in ``Report.errors``.
    """
    spec.validate()
    from kafka.errors import KafkaError

    if spec.plot is not None:
        from invoker.loadgen import plot

        plot.require_matplotlib()
        plot.check_target(spec.plot)

    wall_start = time.monotonic()
    report = Report(namespace=spec.namespace)
    try:
        report.store_count_before = count_store(spec.store_url)
    except ValueError:
        raise
    except Exception as exc:
        raise LoadgenError(f"store unusable before the run: {type(exc).__name__}: {exc}") from exc
    try:
        ensure_topics(spec.bootstrap, [spec.feed_topic, spec.completions_topic],
                      spec.topic_partitions)
    except KafkaError as exc:
        raise LoadgenError(f"cannot reach Kafka at {spec.bootstrap}: {exc!r}") from exc

    daemons = DaemonWatch(spec.metrics_urls)
    daemons.read_start(report)  # their activations so far; who they are
    # Encoded before the clock starts: each message then only gets its id and time spliced in.
    encoders = message_encoders(spec.actions, spec.namespace, copies=spec.copies,
                                blocking=spec.blocking, limits=spec.limits)
    sending = Sending()
    try:
        collector = CompletionCollector(spec.bootstrap, spec.completions_topic, spec.namespace,
                                        sending.sent_at)
    except KafkaError as exc:
        raise LoadgenError(f"cannot read {spec.completions_topic!r}: {exc!r}") from exc
    progress = _progress(spec, sending, collector)
    t0 = time.monotonic()
    sampler = MetricsSampler(daemons.start_endpoints, t0) if spec.plot is not None else None
    produced: set[str] = set()
    try:
        if sampler is not None:
            sampler.start()
        produce_run(spec, encoders, sending)
        report.errors.extend(sending.errors)
        produced = sending.produced()
        _count_produced(report, sending, produced)
        if progress is not None:
            progress.phase = "waiting"
        assert sending.end is not None
        all_done = collector.wait_for(produced, sending.end + spec.completion_timeout_s)
        if spec.on_window is not None:
            spec.on_window("end")
        report.completion_wait_timed_out = not all_done and collector.error is None
        if collector.error is not None:
            report.errors.append(collector.error)
    finally:
        collector.close()
        if sampler is not None:
            sampler.stop()
        if progress is not None:
            progress.close()

    _count_completions(report, collector, sending, produced)
    check_store(spec.store_url, spec.namespace, sending.sent_at, produced, report)
    daemons.read_end(report)
    report.wall_s = time.monotonic() - wall_start
    if sampler is not None:
        _plot(spec, report, daemons, sampler, t0, sending, collector, produced)
    return report


def _plot(spec: LoadSpec, report: Report, daemons: DaemonWatch, sampler: MetricsSampler,
          t0: float, sending: Sending, collector: CompletionCollector, produced: set[str]
          ) -> None:
    """Write the run's plot files; a failure goes to ``report.errors``."""
    from invoker.loadgen import plot

    assert spec.plot is not None
    if sampler.error is not None:
        report.errors.append(sampler.error)
    for series in sampler.series:
        series.label = daemons.name(series.endpoint)
        if series.failed or not series.samples:
            report.errors.append(f"metrics {series.endpoint.address}: {len(series.samples)} "
                                 f"samples taken, {series.failed} missed (last: "
                                 f"{series.last_error})")
    with collector.cond:
        first_seen = {i: t for i, t in collector.first_seen.items() if i in produced}
    run = run_series(t0, (sending.sent_at[i] for i in produced),
                     ((t, report.latencies_ms[i]) for i, t in first_seen.items()))
    try:
        paths = plot.write_plot(spec.plot, run, sampler.series, report.rows(),
                                f"invoker loadgen {spec.namespace}")
    except Exception as exc:  # the run's figures stand without their picture
        report.errors.append(f"plot failed: {type(exc).__name__}: {exc}")
        return
    report.plot_files = [str(path) for path in paths]


class _RunProgress(Progress):
    """The progress bar of one run: producing, then waiting for completions."""

    def __init__(self, spec: LoadSpec, sending: Sending, collector: CompletionCollector) -> None:
        self.phase = "producing"
        target = None if spec.duration_s else spec.count

        def render() -> str:
            elapsed = time.monotonic() - sending.start if sending.start is not None else 0.0
            return progress_line(sending.sent, target, collector.completed_count(), elapsed,
                                 spec.duration_s, self.phase)

        super().__init__(sys.stderr, render)


def _progress(spec: LoadSpec, sending: Sending, collector: CompletionCollector
              ) -> _RunProgress | None:
    if spec.progress and (spec.force_progress or sys.stderr.isatty()):
        return _RunProgress(spec, sending, collector)
    return None


def _count_produced(report: Report, sending: Sending, produced: set[str]) -> None:
    assert sending.start is not None and sending.end is not None
    report.produce_s = sending.end - sending.start
    report.produced = len(produced)
    report.produce_errors = len(sending.sent_at) - len(produced)
    if report.produce_errors:
        example = next(iter(sending.failed.values()), "not acknowledged in time")
        report.errors.append(f"{report.produce_errors} messages not acknowledged by Kafka "
                             f"(e.g. {example})")


def _count_completions(report: Report, collector: CompletionCollector, sending: Sending,
                       produced: set[str]) -> None:
    """Completions, latencies (produce → first completion) and throughput of the run."""
    with collector.cond:
        first_seen = {i: t for i, t in collector.first_seen.items() if i in produced}
        report.completion_messages = sum(collector.message_counts.get(i, 0) for i in produced)
    report.completed = len(first_seen)
    report.latencies_ms = {i: (t - sending.sent_at[i]) * 1000.0 for i, t in first_seen.items()}
    latencies = list(report.latencies_ms.values())
    report.latency_ms_p50 = percentile(latencies, 50)
    report.latency_ms_p95 = percentile(latencies, 95)
    report.latency_ms_p99 = percentile(latencies, 99)
    if first_seen and sending.start is not None:
        span = max(first_seen.values()) - sending.start
        report.throughput_per_s = len(first_seen) / span if span > 0 else 0.0
