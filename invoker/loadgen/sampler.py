"""The run over time, for ``--plot``: the daemons' ``/metrics`` sampled during the run
(:class:`MetricsSampler`), and the run's own produced, completed and latency figures per time
bin (:func:`run_series`).

Bounds: a daemon keeps at most MAX_SAMPLES samples. When it has that many, every other one is
dropped and its sampling interval doubles (0.5 s, 1 s, 2 s...), so a run of hours keeps a
whole, evenly spaced picture at a coarser resolution. Likewise the run's figures go into at
most MAX_BINS bins: 1 s each, or 2, 4... s for a longer run. A feed pause between two samples
is not lost when samples are dropped: the pause counter is cumulative (see
:meth:`DaemonSeries.paused_spans`).

The sampler reads each daemon on its own trio task in one thread: a daemon that does not
answer delays only its own samples (each read bounded by METRICS_TIMEOUT_S).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from invoker.loadgen.daemon_metrics import METRICS_TIMEOUT_S, Endpoint, new_client, read_endpoint
from invoker.loadgen.report import percentile

if TYPE_CHECKING:
    import httpx

SAMPLE_INTERVAL_S = 0.5
MAX_SAMPLES = 1000  # per daemon
MAX_BINS = 1000


class Sample(NamedTuple):
    """One reading of a daemon; ``t`` in seconds since the run's start (NaN: not reported)."""

    t: float
    rss: float
    paused: float  # 1 while the feed is paused
    pauses: float  # cumulative count
    channel_depth: float
    readahead_depth: float


@dataclass
class DaemonSeries:
    """One daemon's samples, oldest first, at most ``max_samples`` (see the module doc)."""

    endpoint: Endpoint
    interval_s: float = SAMPLE_INTERVAL_S
    max_samples: int = MAX_SAMPLES
    samples: list[Sample] = field(default_factory=list)
    worst_case_bytes: float | None = None  # the daemon's stated bound on buffered records
    channel_capacity: float | None = None
    failed: int = 0  # reads that got no figures
    last_error: str | None = None
    label: str = ""  # as the plot names it; the endpoint's address unless set

    def __post_init__(self) -> None:
        self.label = self.label or self.endpoint.address

    def add(self, t: float, figures: dict[str, float]) -> None:
        nan = float("nan")
        self.samples.append(Sample(t, figures.get("rss", nan), figures.get("paused", 0.0),
                                   figures.get("pauses", 0.0), figures.get("channel_depth", nan),
                                   figures.get("readahead_depth", nan)))
        self.worst_case_bytes = figures.get("worst_case_bytes", self.worst_case_bytes)
        self.channel_capacity = figures.get("channel_capacity", self.channel_capacity)
        if len(self.samples) >= self.max_samples:
            del self.samples[1::2]
            self.interval_s *= 2

    def paused_spans(self) -> list[tuple[float, float]]:
        """When the feed was paused (see :func:`paused_spans`)."""
        return paused_spans([(s.t, s.paused, s.pauses) for s in self.samples])


def paused_spans(samples: Sequence[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """Of (t, paused, pauses) samples (``paused`` 1 while the feed is paused, ``pauses`` the
    cumulative count): (from, to) between consecutive samples when the feed was paused at
    either end or a pause began in between, adjacent spans merged."""
    spans: list[tuple[float, float]] = []
    for (t0, paused0, pauses0), (t1, paused1, pauses1) in zip(samples, samples[1:],
                                                            strict=False):
        if paused0 or paused1 or pauses1 > pauses0:
            if spans and spans[-1][1] == t0:
                spans[-1] = (spans[-1][0], t1)
            else:
                spans.append((t0, t1))
    return spans


class MetricsSampler:
    """Samples every endpoint's /metrics every ``interval_s`` on a thread of its own, from
    :meth:`start` to :meth:`stop`; ``series`` holds the results (read them after stop()).
    Times are seconds since ``t0`` (``time.monotonic()``)."""

    def __init__(self, endpoints: Iterable[Endpoint], t0: float,
                 interval_s: float = SAMPLE_INTERVAL_S, max_samples: int = MAX_SAMPLES) -> None:
        import trio

        self.series = [DaemonSeries(e, interval_s, max_samples) for e in endpoints]
        self.error: str | None = None  # set when the sampler itself failed
        self._t0 = t0
        self._scope = trio.CancelScope()
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadgen-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling. Blocks until the sampler's trio run is up (at most 5 s)."""
        self._thread.start()
        self._ready.wait(5.0)

    def stop(self) -> None:
        """Stop sampling; waits for reads in progress to be cancelled (at most a few s)."""
        import trio

        if self._thread.ident is None:
            return  # never started
        if self._token is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=METRICS_TIMEOUT_S)

    def _run(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except Exception as exc:  # reported with the run's errors; sampling just stops
            self.error = f"metrics sampler failed: {type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    async def _main(self) -> None:
        import trio

        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        with self._scope:
            async with new_client() as client, trio.open_nursery() as nursery:
                for series in self.series:
                    nursery.start_soon(self._sample, client, series)

    async def _sample(self, client: httpx.AsyncClient, series: DaemonSeries) -> None:
        import trio

        next_at = trio.current_time()
        while True:
            figures, error, _ = await read_endpoint(client, series.endpoint, identity=False)
            if figures is None:
                series.failed += 1
                series.last_error = error
            else:
                series.add(time.monotonic() - self._t0, figures)
            # the next tick, or now when a slow read made us miss it
            next_at = max(next_at + series.interval_s, trio.current_time())
            await trio.sleep_until(next_at)


@dataclass
class RunSeries:
    """The run's own figures per bin of ``bin_s`` seconds; bin i starts at ``i * bin_s``
    seconds since the run's start. Latencies are those of the completions seen in the bin."""

    bin_s: float
    produced_per_s: list[float]
    completed_per_s: list[float]
    latency_p50_ms: list[float | None]
    latency_p99_ms: list[float | None]

    @property
    def starts(self) -> list[float]:
        return [i * self.bin_s for i in range(len(self.produced_per_s))]


def run_series(t0: float, produced_at: Iterable[float],
               completions: Iterable[tuple[float, float]], max_bins: int = MAX_BINS
               ) -> RunSeries:
    """Bin the run: ``produced_at`` monotonic send times, ``completions`` (monotonic time
    seen, latency in ms). Bins of 1 s, doubled until at most ``max_bins`` cover the run."""
    sends = [t - t0 for t in produced_at]
    done = [(t - t0, latency) for t, latency in completions]
    end = max([0.0, *sends, *(t for t, _ in done)])
    bin_s = 1.0
    while end / bin_s >= max_bins:
        bin_s *= 2
    bins = int(end / bin_s) + 1

    def index(t: float) -> int:
        return min(max(int(t / bin_s), 0), bins - 1)

    produced = [0] * bins
    for t in sends:
        produced[index(t)] += 1
    completed = [0] * bins
    latencies: list[list[float]] = [[] for _ in range(bins)]
    for t, latency in done:
        completed[index(t)] += 1
        latencies[index(t)].append(latency)
    return RunSeries(bin_s, [n / bin_s for n in produced], [n / bin_s for n in completed],
                     [percentile(values, 50) for values in latencies],
                     [percentile(values, 99) for values in latencies])
