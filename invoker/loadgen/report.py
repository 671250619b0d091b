"""The run's outcome (:class:`Report`, one :class:`DaemonFigures` per daemon read),
percentiles, and the progress bar."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

PROGRESS_INTERVAL_S = 0.2  # at most 5 refreshes a second


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p!r}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


@dataclass
class DaemonFigures:
    """One daemon read at the end of a run (see :mod:`invoker.loadgen.daemon_metrics`).

    ``address`` is the ``host:port`` read, ``source`` the metrics URL it was resolved from;
    ``id`` and ``role`` are what its /healthz said (None if it said nothing). The figures are
    the daemon's totals since it started, except ``activations_in_run`` (end minus start;
    None when it was not read at the start). A daemon that did not answer at the end has
    ``answered`` False and ``error`` says why.
    """

    address: str
    source: str
    id: str | None = None
    role: str | None = None
    resolved_at_start: bool = True
    resolved_at_end: bool = True
    answered: bool = False
    error: str | None = None
    activations_in_run: int | None = None
    activations_total: int = 0
    peak_rss_bytes: int = 0
    pauses: int = 0
    paused_seconds: float = 0.0
    overflowed: int = 0

    def describe(self) -> str:
        """One line: who it is, then its figures or why there are none."""
        who = self.id or "(no id)"
        if self.role:
            who += f" ({self.role})"
        changes = []
        if not self.resolved_at_start:
            changes.append("came up during the run")
        if not self.resolved_at_end:
            changes.append("gone at the end")
        if changes:
            who += " [" + ", ".join(changes) + "]"
        if not self.answered:
            return f"{who}: NOT ANSWERING ({self.error})"
        if self.activations_in_run is None:
            activations = f"{self.activations_total} activations (total; not read at start)"
        else:
            activations = f"{self.activations_in_run} activations in the run"
        return (f"{who}: {activations}, peak RSS {self.peak_rss_bytes / 2**20:.1f} MiB, "
                f"{self.pauses} pauses ({self.paused_seconds:.2f} s), "
                f"{self.overflowed} overflowed")


@dataclass
class Report:
    namespace: str = ""
    produced: int = 0  # acknowledged by Kafka
    produce_errors: int = 0  # sends that failed or were never acknowledged
    completed: int = 0  # distinct produced ids with at least one completion message
    completion_messages: int = 0  # all completion messages for produced ids, repeats included
    stored: int = 0  # distinct produced ids found in the store
    lost: int = 0  # produced but not in the store
    duplicate_records: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    daemon_peak_rss_bytes: int = 0
    daemon_pauses: int = 0
    daemon_paused_seconds: float = 0.0
    overflowed: int = 0
    wall_s: float = 0.0
    produce_s: float = 0.0  # first send → all acknowledged
    completion_wait_timed_out: bool = False
    store_count_before: int | None = None
    store_count_after: int | None = None
    store_checked: bool = False
    metrics_read: int = 0  # daemons whose /metrics were read at the end
    daemons: list[DaemonFigures] = field(default_factory=list)  # every daemon tried at the end
    plot_files: list[str] = field(default_factory=list)  # written by --plot
    errors: list[str] = field(default_factory=list)
    # produce → first completion per completed activation id, in ms; not part of
    # format()/to_dict()/to_json() (it is per activation), for benchmarks (bench/)
    latencies_ms: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def repeated_completions(self) -> int:
        """Completion messages beyond the first per activation (re-executed activations)."""
        return self.completion_messages - self.completed

    @property
    def missing_completions(self) -> int:
        return self.produced - self.completed

    @property
    def ok(self) -> bool:
        """Nothing lost, no duplicate, every message produced and the store checked.

        ``errors`` alone (a metrics URL that did not answer, a completions consumer that
        failed) do not fail a run: the store check is what decides.
        """
        return (self.lost == 0 and self.duplicate_records == 0 and self.produce_errors == 0
                and self.store_checked)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("latencies_ms", None)
        doc["repeated_completions"] = self.repeated_completions
        doc["daemon_activations_in_run"] = self.daemon_activations_in_run
        doc["missing_completions"] = self.missing_completions
        doc["ok"] = self.ok
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def daemon_activations_in_run(self) -> int:
        """Activations the answering daemons ran during the run (those read at both ends)."""
        return sum(d.activations_in_run or 0 for d in self.daemons)

    def format(self) -> str:
        rows = self.rows()
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)

    def rows(self) -> list[tuple[str, str]]:
        """The report as (label, value) lines, as :meth:`format` prints them."""
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}"

        status = ", ".join(f"{k}={v}" for k, v in sorted(self.by_status.items())) or "-"
        if self.metrics_read:
            rss = f"{self.daemon_peak_rss_bytes / 2**20:.1f} MiB"
            pauses = f"{self.daemon_pauses} ({self.daemon_paused_seconds:.2f} s paused)"
            overflowed = str(self.overflowed)
        else:
            rss = pauses = overflowed = "n/a (no metrics read)"
        if self.store_count_before is not None and self.store_count_after is not None:
            counts = f" (store count {self.store_count_before} -> {self.store_count_after})"
        else:
            counts = ""
        rows = [
            ("namespace", self.namespace),
            ("produced", f"{self.produced}  ({self.produce_errors} produce errors, "
                         f"{self.produce_s:.2f} s)"),
            ("completed", f"{self.completed}  ({self.completion_messages} completion messages, "
                          f"{self.repeated_completions} repeated, {self.missing_completions} "
                          "missing" + (", wait timed out" if self.completion_wait_timed_out
                                       else "") + ")"),
            ("stored", str(self.stored) if self.store_checked else f"{self.stored} (NOT CHECKED)"),
            ("lost", str(self.lost)),
            ("duplicate records", f"{self.duplicate_records}{counts}"),
            ("by status", status),
            ("throughput", f"{self.throughput_per_s:.1f} /s"),
            ("latency p50/p95/p99", f"{ms(self.latency_ms_p50)} / {ms(self.latency_ms_p95)} / "
                                    f"{ms(self.latency_ms_p99)} ms"),
            ("daemon peak RSS", rss),
            ("daemon pauses", pauses),
            ("overflowed", overflowed),
        ]
        if self.daemons:
            rows.append(("daemons", f"{self.metrics_read} of {len(self.daemons)} answered, "
                                    f"{self.daemon_activations_in_run} activations in the run"))
            rows += [(f"daemon {d.address}", d.describe()) for d in self.daemons]
        rows.append(("wall time", f"{self.wall_s:.2f} s"))
        if self.plot_files:
            rows.append(("plot", ", ".join(self.plot_files)))
        rows += [("error", e) for e in self.errors]
        rows.append(("result", "OK" if self.ok else "FAILED"))
        return rows


class Progress:
    """A one-line progress bar on ``stream``, redrawn by a thread at most 5 times a second."""

    def __init__(self, stream: TextIO, render: Callable[[], str]) -> None:
        self._stream = stream
        self._render = render
        self._stop = threading.Event()
        self._width = 0
        self._thread = threading.Thread(target=self._run, name="loadgen-progress", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        line = self._render()
        pad = max(0, self._width - len(line))
        self._width = len(line)
        try:
            self._stream.write("\r" + line + " " * pad)
            self._stream.flush()
        except (OSError, ValueError):
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            self._draw()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._draw()
        try:
            self._stream.write("\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def progress_line(produced: int, target: int | None, completed: int, elapsed_s: float,
                  duration_s: float | None = None, phase: str = "producing",
                  width: int = 24) -> str:
    """The text of the progress bar (pure, for tests)."""
    if phase == "producing":
        if duration_s:
            fraction = elapsed_s / duration_s
        else:
            fraction = produced / target if target else 1.0
    else:
        fraction = completed / produced if produced else 1.0
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    bar = "#" * filled + "." * (width - filled)
    total = f"/{target}" if target is not None and not duration_s else ""
    rate = completed / elapsed_s if elapsed_s > 0 else 0.0
    return (f"[{bar}] {phase}: produced {produced}{total}  completed {completed}  "
            f"{rate:.1f}/s  {elapsed_s:.1f}s")
