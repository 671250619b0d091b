"""``invoker loadgen`` reading every daemon behind its metrics URLs, against real local HTTP
servers (several ports, and several loopback addresses on one port for a name that resolves
to several replicas; only the name resolution is injected)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import generate_latest

from invoker.loadgen import LoadSpec, Report, daemon_metrics
from invoker.loadgen.daemon_metrics import (
    MAX_METRICS_BYTES,
    DaemonWatch,
    Endpoint,
    endpoints_of,
    parse_metrics,
    resolve_endpoints,
    system_resolver,
)
from invoker.loadgen.sampler import DaemonSeries, MetricsSampler, Sample, run_series
from invoker.metrics import Metrics


class Replica:
    """A real HTTP server standing in for one daemon's ops endpoint: /metrics from a real
    daemon registry, /healthz with its id. ``respond`` replaces the /metrics handling."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, daemon_id: str = "d",
                 role: str = "invoker") -> None:
        self.metrics = Metrics()
        self.health = {"ok": True, "id": daemon_id, "role": role}
        self.respond: Callable[[BaseHTTPRequestHandler], None] | None = None
        self.requests = 0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                replica.requests += 1
                if self.path == "/metrics" and replica.respond is not None:
                    replica.respond(self)
                    return
                if self.path == "/metrics":
                    body = generate_latest(replica.metrics.registry)
                elif self.path == "/healthz":
                    body = json.dumps(replica.health).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(*args, **kwargs) -> Replica:
        made.append(Replica(*args, **kwargs))
        return made[-1]

    yield make
    for replica in made:
        replica.close()


def free_port_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (tried a few times)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def watch_run(watch: DaemonWatch, during: Callable[[], None] = lambda: None) -> Report:
    report = Report(namespace="ns")
    watch.read_start(report)
    during()
    watch.read_end(report)
    return report


def test_several_urls_are_read_each_and_combined(replicas) -> None:
    a, b = replicas(daemon_id="inv-a"), replicas(daemon_id="inv-b")
    a.metrics.activations.labels(status="success").inc(5)  # before the run: not counted
    a.metrics.peak_rss_bytes.set(100 * 2**20)
    b.metrics.peak_rss_bytes.set(300 * 2**20)
    b.metrics.pauses.inc(2)
    b.metrics.paused_seconds.inc(1.5)

    def run() -> None:
        a.metrics.activations.labels(status="success").inc(7)
        a.metrics.activations.labels(status="application error").inc(1)
        b.metrics.activations.labels(status="success").inc(4)

    report = watch_run(DaemonWatch([a.url, b.url, a.url]), run)  # a given twice: read once
    assert report.errors == []
    by_id = {d.id: d for d in report.daemons}
    assert set(by_id) == {"inv-a", "inv-b"} and report.metrics_read == 2
    assert by_id["inv-a"].activations_in_run == 8 and by_id["inv-a"].activations_total == 13
    assert by_id["inv-b"].activations_in_run == 4 and by_id["inv-b"].pauses == 2
    assert by_id["inv-a"].address == f"127.0.0.1:{a.port}" and by_id["inv-a"].role == "invoker"
    assert report.daemon_activations_in_run == 12
    assert report.daemon_peak_rss_bytes == 300 * 2**20  # the max, not the sum
    assert report.daemon_pauses == 2 and report.daemon_paused_seconds == 1.5
    text = report.format()
    assert f"daemon 127.0.0.1:{a.port}" in text and "inv-a (invoker): 8 activations" in text
    assert "2 of 2 answered, 12 activations in the run" in text
    doc = json.loads(report.to_json())
    assert doc["daemon_activations_in_run"] == 12 and len(doc["daemons"]) == 2


def test_a_name_resolving_to_several_addresses_is_one_daemon_each(replicas) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    port = free_port_on(*hosts)
    for n, host in enumerate(hosts):
        replica = replicas(host, port, daemon_id=f"replica-{n}")
        replica.metrics.activations.labels(status="success").inc(n)
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.3", "127.0.0.1", "127.0.0.2", "127.0.0.1", "not an address"]

    report = watch_run(DaemonWatch([f"http://invoker:{port}/metrics"], resolver))
    assert asked == [("invoker", port)] * 2  # at the start and at the end
    assert report.errors == []
    assert [d.address for d in report.daemons] == [f"{h}:{port}" for h in hosts]
    assert [d.id for d in report.daemons] == ["replica-0", "replica-1", "replica-2"]
    assert [d.activations_total for d in report.daemons] == [0, 1, 2]
    assert {d.source for d in report.daemons} == {f"http://invoker:{port}/metrics"}


def test_replicas_that_come_and_go_are_reported(replicas) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    port = free_port_on(*hosts)
    leaving = replicas(hosts[0], port, "leaving")
    replicas(hosts[1], port, "staying")
    answers = [hosts[:2]]

    def resolver(host: str, port: int) -> list[str]:
        return answers[-1]

    def run() -> None:
        leaving.close()
        replicas(hosts[2], port, "joining").metrics.activations.labels(status="success").inc(3)
        answers.append(hosts[1:])

    started = time.monotonic()
    report = watch_run(DaemonWatch([f"http://invoker:{port}/metrics"], resolver), run)
    assert time.monotonic() - started < daemon_metrics.METRICS_TIMEOUT_S
    gone, stayed, joined = report.daemons
    assert (gone.resolved_at_start, gone.resolved_at_end, gone.answered) == (True, False, False)
    assert gone.id == "leaving" and "ConnectError" in gone.error
    assert "NOT ANSWERING" in gone.describe() and "gone at the end" in gone.describe()
    assert stayed.answered and stayed.activations_in_run == 0
    assert (joined.resolved_at_start, joined.answered, joined.id) == (False, True, "joining")
    assert joined.activations_in_run is None and joined.activations_total == 3
    assert "came up during the run" in joined.describe()
    assert report.metrics_read == 2
    assert [e for e in report.errors if f"{hosts[0]}:{port}" in e]


def never_answering_listener() -> tuple[socket.socket, str]:
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """A head, then one byte a tenth of a second: every single read is quick."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(200):
            handler.wfile.write(b"#")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


def test_a_daemon_that_does_not_answer_is_bounded_in_time(replicas, monkeypatch) -> None:
    monkeypatch.setattr(daemon_metrics, "METRICS_TIMEOUT_S", 1.0)
    listener, silent_url = never_answering_listener()
    slow = replicas(daemon_id="slow")
    fine = replicas(daemon_id="fine")
    try:
        report = Report()
        watch = DaemonWatch([silent_url, slow.url, fine.url])
        watch.read_start(report)
        slow.respond = trickle
        started = time.monotonic()
        watch.read_end(report)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert elapsed < 2.5, elapsed  # both read concurrently, each within 1 s
    silent, trickling, answering = report.daemons
    assert not silent.answered and silent.error == "no answer within 1 s"
    assert not trickling.answered and trickling.error == "no answer within 1 s"
    assert trickling.id == "slow"  # read at the start
    assert answering.answered and report.metrics_read == 1


@pytest.mark.parametrize("declared", [True, False])
def test_a_page_beyond_the_size_bound_is_refused(replicas, declared: bool) -> None:
    huge = replicas()
    chunk = b"# padding padding padding padding padding padding padding padding\n" * 1024

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(MAX_METRICS_BYTES + 1))
        else:
            handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            sent = 0
            while sent <= MAX_METRICS_BYTES:
                handler.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass
        handler.close_connection = True

    huge.respond = respond
    report = Report()
    DaemonWatch([huge.url]).read_end(report)
    (daemon,) = report.daemons
    assert not daemon.answered and "MetricsReadError" in daemon.error
    assert str(MAX_METRICS_BYTES) in daemon.error


def test_what_a_daemon_says_is_made_safe_to_show(replicas) -> None:
    odd = replicas()
    odd.health = {"id": "evil\x1b[2J\nid" + "x" * 500, "role": ["not", "text"]}
    report = Report()
    DaemonWatch([odd.url]).read_end(report)
    (daemon,) = report.daemons
    assert daemon.id.startswith("evil?[2J?id") and len(daemon.id) == 100
    assert daemon.role is None and daemon.answered


@pytest.mark.parametrize("page", ["invoker_feed_paused{a=\"b\" 1\n",  # malformed
                                  "invoker_feed_paused 1\n" * 1001])  # too many samples
def test_a_page_that_is_not_usable_is_an_error(replicas, page: str) -> None:
    bad = replicas()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        body = page.encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    bad.respond = respond
    report = Report()
    DaemonWatch([bad.url]).read_end(report)
    assert not report.daemons[0].answered and report.metrics_read == 0
    assert report.errors and report.errors[0].startswith(f"metrics 127.0.0.1:{bad.port}")


def test_resolution_failures_are_reported_and_bounded(replicas, monkeypatch) -> None:
    monkeypatch.setattr(daemon_metrics, "RESOLVE_TIMEOUT_S", 0.3)
    fine = replicas(daemon_id="fine")

    def resolver(host: str, port: int) -> list[str]:
        if host == "hangs":
            time.sleep(3)
            return ["127.0.0.1"]
        if host == "nothing":
            return []
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    report = Report()
    started = time.monotonic()
    DaemonWatch(["http://hangs:1/metrics", "http://nxdomain:1/metrics",
                 "http://nothing:1/metrics", fine.url], resolver).read_end(report)
    assert time.monotonic() - started < 2.0
    assert [d.id for d in report.daemons] == ["fine"]
    errors = "\n".join(report.errors)
    assert "'hangs' not resolved within 0.3 s" in errors
    assert "cannot resolve 'nxdomain'" in errors and "'nothing' resolved to no address" in errors


def test_daemons_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(daemon_metrics, "MAX_ENDPOINTS", 3)
    port = free_port_on("127.0.0.1")  # nobody listens: refused at once
    report = Report()
    DaemonWatch([f"http://many:{port}/metrics"],
                lambda host, port: [f"127.0.0.{n}" for n in range(1, 11)]).read_end(report)
    assert len(report.daemons) == 3
    assert any("10 daemons" in e and "only 3 read" in e for e in report.errors)


def test_the_system_resolver_keeps_one_family(monkeypatch) -> None:
    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))
        return [v6, v4] if host == "both" else [v6]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert system_resolver("both", 80) == ["127.0.0.1"]  # localhost is one daemon, not two
    assert system_resolver("v6only", 80) == ["::1"]


def test_endpoints_of_a_name() -> None:
    endpoints = endpoints_of("https://svc/x/metrics?q=1", ["::1", "10.0.0.2", "10.0.0.10"])
    assert [e.address for e in endpoints] == ["10.0.0.2:443", "10.0.0.10:443", "[::1]:443"]
    assert endpoints[2].url == "https://[::1]/x/metrics?q=1"
    assert endpoints[0].health_url == "https://10.0.0.2/x/healthz"
    assert Endpoint("u", "http://10.0.0.1/stats", "a").health_url is None


async def test_https_names_and_ip_literals_are_not_resolved() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} resolved")

    errors: list[str] = []
    endpoints = await resolve_endpoints(
        ["https://svc:9443/metrics", "http://10.1.2.3:9180/metrics", "http://[::1]/metrics"],
        resolver, errors)
    assert errors == []
    assert [(e.url, e.address) for e in endpoints] == [
        ("https://svc:9443/metrics", "svc:9443"),  # TLS checks the name: read as given
        ("http://10.1.2.3:9180/metrics", "10.1.2.3:9180"),
        ("http://[::1]/metrics", "[::1]:80")]


@pytest.mark.parametrize("url", ["ftp://h/metrics", "h:9180/metrics", "http:///metrics"])
def test_a_metrics_url_must_be_http(url: str) -> None:
    with pytest.raises(ValueError):
        LoadSpec(metrics_urls=[url]).validate()


def test_parse_metrics_takes_only_the_figures() -> None:
    metrics = Metrics()
    metrics.activations.labels(status="success").inc(3)
    metrics.activations.labels(status="whisk internal error").inc(1)
    metrics.paused.set(1)
    metrics.channel_depth.set(17)
    metrics.worst_case_bytes.set(5e8)
    figures = parse_metrics(generate_latest(metrics.registry).decode())
    assert figures["activations"] == 4 and figures["paused"] == 1
    assert figures["channel_depth"] == 17 and figures["worst_case_bytes"] == 5e8
    assert figures["rss"] > 0  # the process collector's current RSS
    assert "paused_seconds" in figures and "invoker_feed_paused_seconds" not in figures


# --- sampling ----------------------------------------------------------------------------------

def test_the_sampler_samples_each_daemon_and_keeps_a_bounded_series(replicas) -> None:
    busy, idle = replicas(daemon_id="busy"), replicas(daemon_id="idle")
    busy.metrics.worst_case_bytes.set(2**30)
    busy.metrics.channel_capacity.set(4096)
    listener, silent_url = never_answering_listener()
    endpoints = [*endpoints_of(busy.url, ["127.0.0.1"]), *endpoints_of(idle.url, ["127.0.0.1"]),
                 *endpoints_of(silent_url, ["127.0.0.1"])]
    t0 = time.monotonic()
    sampler = MetricsSampler(endpoints, t0, interval_s=0.02, max_samples=8)
    try:
        sampler.start()
        for depth in range(30):
            busy.metrics.channel_depth.set(depth)
            time.sleep(0.05)
        stopping = time.monotonic()
        sampler.stop()
        assert time.monotonic() - stopping < 1.0  # a read in progress is cancelled
    finally:
        listener.close()
    busy_series, idle_series, silent_series = sampler.series
    assert sampler.error is None
    for series in (busy_series, idle_series):
        times = [s.t for s in series.samples]
        assert 2 <= len(times) < 8 and times == sorted(times)
        assert series.interval_s > 0.02  # halved at least once: 1.5 s at 0.02 s > 8 samples
        assert 0 <= times[0] < 0.5 and times[-1] <= stopping - t0 + 0.5
    depths = [s.channel_depth for s in busy_series.samples]
    assert depths == sorted(depths) and depths[-1] > depths[0]
    assert busy_series.worst_case_bytes == 2**30 and busy_series.channel_capacity == 4096
    # the daemon that never answers got no sample and held up no one else's
    assert busy_series.failed == 0 and not silent_series.samples


def sample(t: float, paused: float = 0.0, pauses: float = 0.0) -> Sample:
    return Sample(t, 1.0, paused, pauses, 0.0, 0.0)


def test_paused_spans_survive_dropped_samples() -> None:
    series = DaemonSeries(Endpoint("u", "u", "a"))
    series.samples = [sample(0), sample(1, paused=1, pauses=1), sample(2, pauses=1),
                      sample(3, pauses=1), sample(4, pauses=2), sample(5, pauses=2)]
    # paused at 1 (shaded 0-2), a pause begun and ended between 3 and 4 (counter only)
    assert series.paused_spans() == [(0, 2), (3, 4)]
    series = DaemonSeries(Endpoint("u", "u", "a"), max_samples=4)
    for t, (paused, pauses) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1)]):
        series.add(float(t), {"paused": paused, "pauses": pauses})
    assert [s.t for s in series.samples] == [0, 2] and series.interval_s == 1.0
    assert series.paused_spans() == [(0, 2)]  # the pause between 1 and 2 is still seen


def test_run_series_bins_rates_and_latencies() -> None:
    t0 = 100.0
    sends = [100.1, 100.2, 100.9, 101.5, 102.2]
    done = [(100.5, 10.0), (100.6, 30.0), (101.1, 20.0), (102.5, 5.0), (102.6, 7.0)]
    run = run_series(t0, sends, done)
    assert run.bin_s == 1.0 and run.starts == [0.0, 1.0, 2.0]
    assert run.produced_per_s == [3, 1, 1] and run.completed_per_s == [2, 1, 2]
    assert run.latency_p50_ms == [20.0, 20.0, 6.0]
    assert run.latency_p99_ms[0] == pytest.approx(29.8)
    long = run_series(0.0, [0.0, 3599.0], [(3600.5, 1.0)], max_bins=1000)
    assert long.bin_s == 4.0 and len(long.produced_per_s) <= 1000
    assert long.produced_per_s[0] == 0.25 and long.latency_p50_ms[0] is None
    assert sum(long.completed_per_s) * long.bin_s == 1
    empty = run_series(0.0, [], [])
    assert empty.produced_per_s == [0.0] and empty.latency_p99_ms == [None]
