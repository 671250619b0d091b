"""Reading the daemons' ``/metrics``: every replica behind each URL, bounded in size and time.

A metrics URL whose host is a name may stand for several daemons: a compose service scaled to
N replicas resolves to N addresses inside the compose network. Each URL is resolved
(:func:`resolve_endpoints`) at the start of a run and again at its end (replicas may come and
go), and every address is read as a daemon of its own (:class:`Endpoint`); an IP literal is one
daemon, and so is an ``https`` URL (TLS checks the name, so it is read as given). A name
resolves to its IPv4 addresses when it has any, else to its IPv6 ones, so ``localhost`` is one
daemon, not two. A daemon's id and role come from its ``/healthz``, read once, when the URL's
path ends in ``/metrics``.

Bounds: at most MAX_ENDPOINTS daemons per run; each resolution takes at most RESOLVE_TIMEOUT_S
and each read at most METRICS_TIMEOUT_S and MAX_METRICS_BYTES, with at most MAX_SAMPLES samples
of the figures wanted. Reads run concurrently, so a round (:class:`DaemonWatch`'s reads at the
start or the end) takes at most RESOLVE_TIMEOUT_S + METRICS_TIMEOUT_S whatever the number of
daemons; a daemon that does not answer in time is reported as such.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from invoker.config import Config
from invoker.loadgen.report import DaemonFigures, Report
from invoker.safejson import loads

if TYPE_CHECKING:
    import httpx

METRICS_TIMEOUT_S = 5.0  # one daemon's /metrics (and /healthz) read, connect to last byte
RESOLVE_TIMEOUT_S = 5.0
MAX_METRICS_BYTES = 4 * 2**20  # an idle daemon's page is ~20 KB
MAX_HEALTH_BYTES = 64 * 1024
MAX_SAMPLES = 1000  # samples of wanted figures in one page (a daemon has ~10)
MAX_ENDPOINTS = 64  # daemons per run, over all URLs
MAX_IDENTITY_CHARS = 100  # of a daemon's id or role, as shown

# Prometheus sample name -> figure; samples with labels are summed over them.
FIGURES = {
    "invoker_activations_total": "activations",
    "invoker_process_peak_rss_bytes": "peak_rss",
    "process_resident_memory_bytes": "rss",
    "invoker_feed_pauses_total": "pauses",
    "invoker_feed_paused_seconds_total": "paused_seconds",
    "invoker_feed_paused": "paused",
    "invoker_overflow_records_total": "overflowed",
    "invoker_record_channel_depth": "channel_depth",
    "invoker_record_channel_capacity": "channel_capacity",
    "invoker_readahead_depth": "readahead_depth",
    "invoker_worst_case_buffered_bytes": "worst_case_bytes",
}
_SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

# (host, port) -> the host's addresses. Blocks; the caller bounds it (RESOLVE_TIMEOUT_S).
Resolver = Callable[[str, int], Sequence[str]]


class MetricsReadError(Exception):
    """A daemon's page could not be read or used (too large, not Prometheus text...)."""


def parse_metrics(text: str) -> dict[str, float]:
    """The FIGURES found in one Prometheus text exposition (absent ones are left out).

    Only the lines of wanted samples are handed to the Prometheus parser (the whole page costs
    ~15 ms to parse; this ~1 ms). Raises ValueError for malformed lines among those and
    MetricsReadError beyond MAX_SAMPLES of them.
    """
    from prometheus_client.parser import text_string_to_metric_families

    lines = []
    for line in text.splitlines():
        name = _SAMPLE_NAME.match(line)
        if name is not None and name.group() in FIGURES:
            lines.append(line)
            if len(lines) > MAX_SAMPLES:
                raise MetricsReadError(f"more than {MAX_SAMPLES} samples of the figures read")
    found: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            key = FIGURES.get(sample.name)
            if key is not None and math.isfinite(sample.value):  # NaN, Inf: not a figure
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


def check_metrics_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a host."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid metrics URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid metrics URL {url!r}: http(s)://HOST[:PORT]/PATH expected")


def system_resolver(host: str, port: int) -> list[str]:
    """``host``'s IPv4 addresses, or its IPv6 ones when it has none. Blocks (the system
    resolver, unbounded: callers bound it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family: dict[int, list[str]] = {}
    for family, _, _, _, sockaddr in infos:
        by_family.setdefault(family, []).append(str(sockaddr[0]))
    return by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or []


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class Endpoint:
    """One daemon: ``url`` is ``source`` (a metrics URL given) with its host replaced by one
    of the addresses it resolved to; ``address`` is ``host:port`` as shown in reports."""

    source: str
    url: str
    address: str

    @property
    def health_url(self) -> str | None:
        """Its ``/healthz`` (the daemon's id and role), when ``url``'s path ends in /metrics."""
        import httpx

        parsed = httpx.URL(self.url)
        if not parsed.path.endswith("/metrics"):
            return None
        return str(parsed.copy_with(path=parsed.path[:-len("metrics")] + "healthz", query=None))


def endpoints_of(source: str, addresses: Iterable[str]) -> list[Endpoint]:
    """One Endpoint per valid IP address in ``addresses`` (sorted, duplicates dropped)."""
    import httpx

    parsed = httpx.URL(source)
    port = parsed.port or _default_port(parsed.scheme)
    ips = set()
    for address in addresses:
        try:
            ips.add(ipaddress.ip_address(address))
        except ValueError:
            continue  # not an address: a resolver's garbage is not a daemon
    endpoints = []
    for ip in sorted(ips, key=lambda ip: (ip.version, ip)):
        shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        endpoints.append(Endpoint(source, str(parsed.copy_with(host=str(ip))), shown))
    return endpoints


async def resolve_endpoints(urls: Sequence[str], resolver: Resolver, errors: list[str]
                            ) -> list[Endpoint]:
    """The daemons behind ``urls``: an IP literal is one, a name one per address it resolves
    to. Names are resolved concurrently, each bounded by RESOLVE_TIMEOUT_S; failures go to
    ``errors``. Duplicates (the same URL to read) are dropped; the caller caps the number."""
    import httpx
    import trio

    resolved: dict[str, list[Endpoint]] = {}

    async def resolve(url: str) -> None:
        parsed = httpx.URL(url)
        host = parsed.host
        try:
            ipaddress.ip_address(host)
            resolved[url] = endpoints_of(url, [host])
            return
        except ValueError:
            pass
        port = parsed.port or _default_port(parsed.scheme)
        if parsed.scheme == "https":  # TLS checks the name: read as given, one daemon
            resolved[url] = [Endpoint(url, url, f"{host}:{port}")]
            return
        with trio.move_on_after(RESOLVE_TIMEOUT_S) as scope:
            try:
                addresses = await trio.to_thread.run_sync(resolver, host, port,
                                                          abandon_on_cancel=True)
            except (OSError, UnicodeError) as exc:
                errors.append(f"metrics {url}: cannot resolve {host!r}: {exc}")
                return
        if scope.cancelled_caught:
            errors.append(f"metrics {url}: {host!r} not resolved within {RESOLVE_TIMEOUT_S:g} s")
            return
        resolved[url] = endpoints_of(url, addresses)
        if not resolved[url]:
            errors.append(f"metrics {url}: {host!r} resolved to no address")

    async with trio.open_nursery() as nursery:
        for url in dict.fromkeys(urls):
            nursery.start_soon(resolve, url)
    return _union(*(resolved.get(url, []) for url in dict.fromkeys(urls)))


def new_client() -> httpx.AsyncClient:
    """The client for reading daemons: no compression (a page's size is bounded as sent)."""
    import httpx

    # trust_env off: a daemon is reached directly, never through a proxy of the environment
    return httpx.AsyncClient(timeout=METRICS_TIMEOUT_S, follow_redirects=False,
                             headers={"Accept-Encoding": "identity"}, trust_env=False)


async def fetch_bounded(client: httpx.AsyncClient, url: str, limit: int) -> bytes:
    """The body at ``url``, at most ``limit`` bytes (MetricsReadError beyond); any status but
    a 2xx is an httpx.HTTPStatusError. Blocks: network I/O, bounded by the caller."""
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MetricsReadError(f"{declared} bytes, more than the {limit} read")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise MetricsReadError(f"more than the {limit} bytes read")
        return bytes(body)


async def fetch_identity(client: httpx.AsyncClient, endpoint: Endpoint
                         ) -> tuple[str | None, str | None]:
    """The daemon's ``id`` and ``role`` from its /healthz (None for what it does not say; a
    503 body counts too: an unhealthy daemon still says who it is)."""
    import httpx

    url = endpoint.health_url
    if url is None:
        return None, None
    try:
        async with client.stream("GET", url) as response:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_HEALTH_BYTES:
                    return None, None
        doc = loads(bytes(body), Config.max_json_depth)
    except (httpx.HTTPError, httpx.StreamError, ValueError):  # JsonRejected is a ValueError
        return None, None
    if not isinstance(doc, dict):
        return None, None
    return _shown(doc.get("id")), _shown(doc.get("role"))


def _shown(value: object) -> str | None:
    """A string a daemon sent, safe to print: printable characters only, length capped."""
    if not isinstance(value, str):
        return None
    text = "".join(c if c.isprintable() else "?" for c in value[:MAX_IDENTITY_CHARS])
    return text or None


async def read_figures(client: httpx.AsyncClient, endpoint: Endpoint) -> dict[str, float]:
    """The daemon's FIGURES. Raises httpx.HTTPError, httpx.StreamError or MetricsReadError;
    time bounded by the caller."""
    body = await fetch_bounded(client, endpoint.url, MAX_METRICS_BYTES)
    try:
        return parse_metrics(body.decode("utf-8", errors="replace"))
    except MetricsReadError:
        raise
    except Exception as exc:  # whatever the parser makes of a hostile page is that page's fault
        raise MetricsReadError(f"not Prometheus text: {type(exc).__name__}: {exc}") from None


async def read_endpoint(client: httpx.AsyncClient, endpoint: Endpoint, *, identity: bool
                        ) -> tuple[dict[str, float] | None, str | None,
                                   tuple[str | None, str | None]]:
    """(figures or None, why not, (id, role) when ``identity``), within METRICS_TIMEOUT_S."""
    import httpx
    import trio

    figures: dict[str, float] | None = None
    error: str | None = None
    who: tuple[str | None, str | None] = (None, None)

    async def read_who() -> None:
        nonlocal who
        who = await fetch_identity(client, endpoint)

    with trio.move_on_after(METRICS_TIMEOUT_S) as scope:
        async with trio.open_nursery() as nursery:
            if identity:
                nursery.start_soon(read_who)
            try:
                figures = await read_figures(client, endpoint)
            except (httpx.HTTPError, httpx.StreamError, MetricsReadError) as exc:
                error = f"{type(exc).__name__}: {exc}"
    if scope.cancelled_caught and figures is None and error is None:
        error = f"no answer within {METRICS_TIMEOUT_S:g} s"
    return figures, error, who


# (figures or None, why not, the daemon read)
_Reading = tuple[dict[str, float] | None, str | None, Endpoint]


class DaemonWatch:
    """The daemons behind a run's metrics URLs, read at the start and at the end of the run.

    :meth:`read_start` resolves the URLs and reads every daemon once (its activations so far,
    its id and role); :meth:`read_end` resolves them again and reads every daemon seen at
    either time, then fills the report: one :class:`DaemonFigures` each and the combined
    figures of those that answered. Each blocks for at most RESOLVE_TIMEOUT_S +
    METRICS_TIMEOUT_S (a private trio run).
    """

    def __init__(self, urls: Sequence[str], resolver: Resolver = system_resolver) -> None:
        self.urls = list(urls)
        self._resolver = resolver
        self.start_endpoints: list[Endpoint] = []
        self._at_start: dict[str, dict[str, float]] = {}  # figures by endpoint URL
        self._who: dict[str, tuple[str | None, str | None]] = {}  # (id, role) by endpoint URL

    def read_start(self, report: Report) -> None:
        if not self.urls:
            return
        self.start_endpoints, readings = self._round([], report)
        self._at_start = {url: figures for url, (figures, _, _) in readings.items()
                          if figures is not None}

    def name(self, endpoint: Endpoint) -> str:
        """``id (address)`` when the daemon said its id, else its address."""
        daemon_id = self._who.get(endpoint.url, (None, None))[0]
        return f"{daemon_id} ({endpoint.address})" if daemon_id else endpoint.address

    def read_end(self, report: Report) -> None:
        if not self.urls:
            return
        end_endpoints, readings = self._round(self.start_endpoints, report)
        at_start = {e.url for e in self.start_endpoints}
        at_end = {e.url for e in end_endpoints}
        answered = []
        for url, (figures, error, endpoint) in readings.items():
            report.daemons.append(self._figures(endpoint, figures, error, url in at_start,
                                                url in at_end))
            if figures is None:
                report.errors.append(f"metrics {endpoint.address} (from {endpoint.source}): "
                                     f"{error}")
            else:
                answered.append(figures)
        if answered:
            total = combine_metrics(answered)
            report.daemon_peak_rss_bytes = int(total["peak_rss"])
            report.daemon_pauses = int(total["pauses"])
            report.daemon_paused_seconds = total["paused_seconds"]
            report.overflowed = int(total["overflowed"])
            report.metrics_read = len(answered)

    def _figures(self, endpoint: Endpoint, figures: dict[str, float] | None, error: str | None,
                 resolved_at_start: bool, resolved_at_end: bool) -> DaemonFigures:
        daemon_id, role = self._who.get(endpoint.url, (None, None))
        shown = DaemonFigures(address=endpoint.address, source=endpoint.source, id=daemon_id,
                              role=role, resolved_at_start=resolved_at_start,
                              resolved_at_end=resolved_at_end, error=error)
        if figures is not None:
            shown.answered = True
            shown.activations_total = int(figures.get("activations", 0))
            start = self._at_start.get(endpoint.url)
            if start is not None:
                shown.activations_in_run = (shown.activations_total
                                            - int(start.get("activations", 0)))
            shown.peak_rss_bytes = int(figures.get("peak_rss", 0))
            shown.pauses = int(figures.get("pauses", 0))
            shown.paused_seconds = figures.get("paused_seconds", 0.0)
            shown.overflowed = int(figures.get("overflowed", 0))
        return shown

    def _round(self, also: Sequence[Endpoint], report: Report
               ) -> tuple[list[Endpoint], dict[str, _Reading]]:
        """Resolve the URLs, then read those daemons and ``also`` (at most MAX_ENDPOINTS in
        all): (the daemons resolved, the readings by endpoint URL in reading order)."""
        import trio

        readings: dict[str, _Reading] = {}

        async def read(client: httpx.AsyncClient, endpoint: Endpoint) -> None:
            figures, error, who = await read_endpoint(
                client, endpoint, identity=endpoint.url not in self._who)
            readings[endpoint.url] = (figures, error, endpoint)
            if who != (None, None):
                self._who[endpoint.url] = who

        async def main() -> tuple[list[Endpoint], list[Endpoint]]:
            resolved = await resolve_endpoints(self.urls, self._resolver, report.errors)
            every = _union(also, resolved)
            if len(every) > MAX_ENDPOINTS:
                report.errors.append(f"metrics: {len(every)} daemons, only {MAX_ENDPOINTS} "
                                     "read")
                every = every[:MAX_ENDPOINTS]
            async with new_client() as client, trio.open_nursery() as nursery:
                for endpoint in every:
                    nursery.start_soon(read, client, endpoint)
            return resolved, every

        resolved, every = trio.run(main)
        return resolved, {e.url: readings[e.url] for e in every}


def _union(*lists: Iterable[Endpoint]) -> list[Endpoint]:
    """The endpoints of all lists, once each (by URL), in order of first appearance."""
    union: dict[str, Endpoint] = {}
    for endpoints in lists:
        for endpoint in endpoints:
            union.setdefault(endpoint.url, endpoint)
    return list(union.values())
