"""Per-stage timings of a run, from the daemon's ``invoker_stage_seconds`` histogram.

Two /metrics samples (before and after a run) give the run's own observations per stage; a
quantile is interpolated linearly inside the bucket it falls in (Prometheus's
``histogram_quantile``), so it is as precise as the buckets (see invoker.metrics).
"""

from __future__ import annotations

import math
import re

from invoker.metrics import STAGES

_BUCKET = re.compile(r"^invoker_stage_seconds_bucket\{le=([^,]+),stage=(\w+)\}$")


def _buckets(samples: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """Cumulative (upper bound, count) per stage, sorted by bound."""
    found: dict[str, list[tuple[float, float]]] = {}
    for name, value in samples.items():
        m = _BUCKET.match(name)
        if m:
            found.setdefault(m.group(2), []).append((float(m.group(1)), value))
    return {stage: sorted(pairs) for stage, pairs in found.items()}


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of cumulative ``buckets``; None without observations."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def stage_figures(before: dict[str, float], after: dict[str, float]
                  ) -> dict[str, tuple[float | None, float | None, int]]:
    """Per stage (in pipeline order): p50 and p99 in ms, and how many observations the run
    added."""
    old, new = _buckets(before), _buckets(after)
    figures = {}
    for stage in STAGES:
        start = dict(old.get(stage, []))
        delta = [(bound, count - start.get(bound, 0.0)) for bound, count in new.get(stage, [])]
        p50, p99 = quantile(delta, 0.5), quantile(delta, 0.99)
        figures[stage] = (None if p50 is None else p50 * 1000,
                          None if p99 is None else p99 * 1000,
                          int(delta[-1][1]) if delta else 0)
    return figures
