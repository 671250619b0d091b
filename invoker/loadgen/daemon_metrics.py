"""Reading the daemons' ``/metrics``: peak RSS, feed pauses, overflowed records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from invoker.loadgen.report import Report

METRICS_TIMEOUT_S = 5.0


def parse_metrics(text: str) -> dict[str, float]:
    """The daemon figures from one Prometheus text exposition (absent ones are left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "invoker_process_peak_rss_bytes": "peak_rss",
        "invoker_feed_pauses_total": "pauses",
        "invoker_feed_paused_seconds_total": "paused_seconds",
        "invoker_overflow_records_total": "overflowed",
    }
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + float(sample.value)
    return found


def combine_metrics(per_daemon: Iterable[dict[str, float]]) -> dict[str, float]:
    """Peak RSS: the max over daemons; pauses, paused seconds, overflowed: sums."""
    total = {"peak_rss": 0.0, "pauses": 0.0, "paused_seconds": 0.0, "overflowed": 0.0}
    for figures in per_daemon:
        total["peak_rss"] = max(total["peak_rss"], figures.get("peak_rss", 0.0))
        for key in ("pauses", "paused_seconds", "overflowed"):
            total[key] += figures.get(key, 0.0)
    return total


def read_daemon_metrics(urls: Sequence[str], report: Report) -> None:
    """Fill the report's daemon figures from every URL that answers; the others go to
    ``report.errors``. Blocks: up to METRICS_TIMEOUT_S per URL."""
    import httpx

    figures = []
    for url in urls:
        try:
            response = httpx.get(url, timeout=METRICS_TIMEOUT_S)
            response.raise_for_status()
            figures.append(parse_metrics(response.text))
        except Exception as exc:
            report.errors.append(f"metrics {url}: {type(exc).__name__}: {exc}")
    if figures:
        total = combine_metrics(figures)
        report.daemon_peak_rss_bytes = int(total["peak_rss"])
        report.daemon_pauses = int(total["pauses"])
        report.daemon_paused_seconds = total["paused_seconds"]
        report.overflowed = int(total["overflowed"])
        report.metrics_read = len(figures)
