"""``invoker status``: one screen on a running daemon, from its ``GET /status``.

The document it reads (what it holds, its bounds) and the daemon-side helpers that build it
are in :mod:`invoker.status_report`; this module fetches the document and renders it.

The command: ``invoker status [--url URL] [--watch [SECONDS] [--count N]] [--json]``. What may
block: it waits for the daemon's answer, at most :data:`FETCH_TIMEOUT_S` per read and about
twice that in all, and reads at most :data:`MAX_STATUS_BYTES`. A daemon that cannot be
reached, refuses, or answers something else gives one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import trio

from invoker.config import Config, load_config
from invoker.loadgen.daemon_metrics import MetricsReadError, fetch_bounded, new_client
from invoker.safejson import loads
from invoker.status_report import CONTAINER_STATES, STATUS_VERSION

FETCH_TIMEOUT_S = 5.0
MAX_STATUS_BYTES = 1 << 20
SHOW_UNFINISHED_S = 1.0  # a write or publish unfinished this long is shown
DEFAULT_WATCH_S = 2.0
MIN_WATCH_S = 0.1
MAX_WATCH_S = 3600.0
_NAME_WIDTH = 48  # action and partition names are cut to this on screen
# health and pause reasons, what holds the feed back: they may carry a store's error text
_REASON_WIDTH = 300


# --- rendering ---------------------------------------------------------------------------

def render(doc: Mapping[str, Any], source: str, now: float | None = None) -> str:
    """The screen for a status document. Raises KeyError, TypeError or ValueError on a
    document of another shape."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    health = "healthy" if doc["ok"] else "UNHEALTHY: " + "; ".join(
        _cut(str(reason), _REASON_WIDTH) for reason in doc["reasons"])
    lines = [f"{doc['role']} {_cut(str(doc['id']))}  {source}  up {_duration(doc['uptime_s'])}"
             f"  {stamp}  {health}"]

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<13}{text}")

    slots = doc.get("slots")
    if slots:
        row("slots", f"{slots['used']} / {slots['max']} used, {_num(slots['running'])} running")
    feed = doc["feed"]
    if feed["paused"]:
        state = (f"PAUSED for {_duration(feed['paused_for_s'])} "
                 f"({_cut(str(feed['reason']), _REASON_WIDTH)})")
    else:
        state = "fetching"
    row("feed", f"{state}; {_num(feed['pauses'])} pauses since start")
    if feed["held_back_by"]:
        row("", "held back by: " + "; ".join(_cut(str(why), _REASON_WIDTH)
                                             for why in feed["held_back_by"]))
    ahead, channel = doc["read_ahead"], doc["record_channel"]
    row("read-ahead", f"{ahead['depth']} / {ahead['capacity']}")
    overflowing = (doc.get("overflow") or {}).get("enabled")  # then full means overflow
    row("records", f"{channel['depth']} / {channel['capacity']} in the record channel " + (
        "(when full, records overflow to Kafka)" if overflowing
        else f"(resumes at <= {channel['low_watermark']})"))
    offsets = doc["uncommitted_offsets"]
    row("offsets", f"{offsets['count']} taken, not yet committable (bound {offsets['max']})")
    lines.extend(_store_lines(doc["store"]))
    oldest = doc.get("oldest_unfinished")
    if oldest and oldest["seconds"] >= SHOW_UNFINISHED_S:
        row("unfinished", f"{oldest['what']} for {_duration(oldest['seconds'])}"
                          + (f": {_cut(str(oldest['error']), 200)}" if oldest["error"] else ""))
    overflow = doc.get("overflow")
    if overflow and overflow["enabled"]:
        row("overflow", f"{_num(overflow['in_flight'])} / {overflow['max_in_flight']} awaiting "
                        f"Kafka; {_num(overflow['records'])} records, "
                        f"{_size(overflow['bytes'])} overflowed since start")
    elif overflow:
        row("overflow", "off")
    containers = doc.get("containers")
    if containers is not None:
        lines.extend(_container_lines(containers))
    lines.extend(_partition_lines(doc["partitions"], doc.get("partitions_omitted", 0)))
    activations = doc.get("activations") or {}
    if activations:
        row("activations", ", ".join(f"{_num(count)} {status}"
                                     for status, count in sorted(activations.items())))
    # Whatever the daemon sent (names, errors, numbers of a forged document) reaches the
    # terminal as printable characters only: no escape sequences.
    return "\n".join(_printable(line) for line in lines)


def _store_lines(store: Mapping[str, Any]) -> list[str]:
    recent = store["recent"]
    if recent["count"]:
        latency = (f"p50 {_ms(recent['p50_s'])}, p99 {_ms(recent['p99_s'])}, max "
                   f"{_ms(recent['max_s'])} over the last {recent['count']} writes "
                   f"({recent['window_s']:g} s)")
    else:
        latency = f"no write in the last {recent['window_s']:g} s"
    mean = store.get("mean_s")
    lines = [f"{'store':<13}{latency}",
             f"{'':<13}{store['writes_in_flight']} / {store['max_writes_in_flight']} writes in "
             f"flight; {store['writes']} writes since start"
             + (f", mean {_ms(mean)}" if mean is not None else "")
             + f"; {_num(store['failures'])} failed"]
    return lines


def _container_lines(containers: Mapping[str, Any]) -> list[str]:
    lines = [f"{'containers':<13}{containers['count']} using {containers['memory_used_mb']} / "
             f"{containers['memory_mb']} MiB; {containers['waiting']} activations waiting "
             "for one"]
    columns = (*CONTAINER_STATES, "running")
    lines.extend(_table(("action", *columns),
                        [(g["action"], *(g[c] for c in columns)) for g in containers["by_action"]]))
    if containers.get("more_actions"):
        lines.append(f"  ... and {containers['more_containers']} containers of "
                     f"{containers['more_actions']} more actions")
    return lines


def _partition_lines(rows: Sequence[Mapping[str, Any]], omitted: int) -> list[str]:
    if not rows:
        return [f"{'partitions':<13}none owned"]
    columns = ("position", "committed", "highwater", "uncommitted", "lag", "in_flight")
    lines = [f"{'partitions':<13}{len(rows) + omitted} owned"]
    lines.extend(_table(("partition", *(c.replace("_", " ") for c in columns)),
                        [(f"{r['topic']}-{r['partition']}", *(r[c] for c in columns))
                         for r in rows]))
    if omitted:
        lines.append(f"  ... and {omitted} more (those with less read and not committed)")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Indented columns as wide as their widest cell: the first (a name, cut to
    ``_NAME_WIDTH``) left-aligned, the others (numbers; None as "-") right-aligned."""
    if not rows:
        return []
    cells = [list(header)] + [[_cut(str(row[0])), *map(_num, row[1:])] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return ["  " + line[0].ljust(widths[0]) + "".join(
        "  " + cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
            for line in cells]


def _num(value: float | None) -> str:
    """A count or offset as digits (None: "-"); a fraction with one decimal."""
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"


def _cut(text: str, width: int = _NAME_WIDTH) -> str:
    text = _printable(text)  # before cutting: a cut counts the characters shown
    return text if len(text) <= width else text[:width - 3] + "..."


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


# --- the command -------------------------------------------------------------------------

class StatusUnavailable(Exception):
    """No status document from the daemon; the message is one line saying why."""


def status_url(base: str) -> str:
    """``base`` (``http://host:port``, or one of the endpoint's URLs) → its ``/status``."""
    url = base.strip().rstrip("/")
    for path in ("/status", "/metrics", "/healthz"):
        if url.endswith(path):
            url = url[:-len(path)]
    return url + "/status"


def default_base_url(args: argparse.Namespace) -> str:
    """The ops endpoint from the daemon's own settings (``--config``, ``INVOKER_*``): the
    invoker's ``metrics_port``, or the recorder's ``recorder_metrics_port``. A wildcard bind
    address is reached on loopback."""
    config = load_config(args)
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(
        config.metrics_host, config.metrics_host)
    if ":" in host:
        host = f"[{host}]"
    port = config.recorder_metrics_port if args.recorder else config.metrics_port
    return f"http://{host}:{port}"


def fetch_status(url: str, timeout_s: float = FETCH_TIMEOUT_S) -> dict[str, Any]:
    """The document at ``url``. Blocks at most ``2 * timeout_s`` in all (connecting, a
    server that drips its answer); raises StatusUnavailable."""

    async def read() -> bytes:
        # the load generator's bounded read of a daemon: no compression, size checked as sent
        async with new_client() as client:
            with trio.fail_after(2 * timeout_s):
                return await fetch_bounded(client, url, MAX_STATUS_BYTES)

    try:
        body = trio.run(read)
    except trio.TooSlowError:
        raise StatusUnavailable(f"{url} took more than {2 * timeout_s:g} s to answer") from None
    except httpx.HTTPStatusError as exc:
        raise StatusUnavailable(f"{url} answered HTTP {exc.response.status_code} "
                                "(is this an invoker's ops endpoint?)") from None
    except MetricsReadError:
        raise StatusUnavailable(f"{url} answered more than {MAX_STATUS_BYTES} bytes") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as exc:
        raise StatusUnavailable(f"cannot read {url}: {_why(exc)}") from None
    try:
        doc = loads(body, Config.max_json_depth)  # NaN, Infinity, deep nesting: refused
    except ValueError:
        raise StatusUnavailable(f"{url} did not answer JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != STATUS_VERSION:
        raise StatusUnavailable(f"{url} answered JSON that is not a status document of "
                                f"version {STATUS_VERSION}")
    return doc


def _why(exc: BaseException) -> str:
    """One line: the first OS error with an errno among the causes of ``exc`` ("[Errno 111]
    Connection refused" rather than trio's "all attempts to connect ... failed"), else
    ``exc``."""
    todo: list[BaseException] = [exc]
    for _ in range(32):  # a bounded walk: causes may form a long chain
        if not todo:
            break
        current = todo.pop(0)
        if isinstance(current, OSError) and current.errno is not None:
            return f"[Errno {current.errno}] {os.strerror(current.errno)}"
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "status", help="show one screen on a running daemon",
        description="Show a running invoker's (or recorder's) state from its ops endpoint's "
                    "GET /status: slots, containers by action and state, record channel and "
                    "read-ahead, whether the feed is paused and why, store write latency, "
                    "committed lag per partition, overflow. Exit status 1 when the daemon "
                    "cannot be read (with --watch: when the last read failed).")
    parser.add_argument("--url", metavar="URL",
                        help="the daemon's ops endpoint, e.g. http://127.0.0.1:9180 (default: "
                             "metrics_host and metrics_port from the same --config / INVOKER_* "
                             "settings as the daemon)")
    parser.add_argument("--recorder", action="store_true",
                        help="default URL on recorder_metrics_port: a recorder's endpoint")
    parser.add_argument("--config", metavar="FILE", help="the daemon's TOML configuration file")
    parser.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH_S,
                        metavar="SECONDS", help="redraw every SECONDS (default "
                        f"{DEFAULT_WATCH_S:g}) until Ctrl-C; a failed read shows its reason "
                        "and the watch goes on")
    parser.add_argument("--count", type=int, metavar="N",
                        help="with --watch: stop after N screens")
    parser.add_argument("--json", action="store_true",
                        help="print the document as JSON (with --watch: one line per read)")
    parser.set_defaults(handler=_handle)
    return parser


def _handle(args: argparse.Namespace) -> int:
    if args.watch is not None and not MIN_WATCH_S <= args.watch <= MAX_WATCH_S:
        raise ValueError(f"--watch must be between {MIN_WATCH_S:g} and {MAX_WATCH_S:g} seconds")
    if args.count is not None and (args.count < 1 or args.watch is None):
        raise ValueError("--count needs --watch and must be at least 1")
    base = args.url or default_base_url(args)  # ValueError (bad settings): the CLI exits 2
    url = status_url(base)
    try:
        if args.watch is None:
            return _show(url, base, args.json, clear=False)
        return _watch(url, base, args, clear=sys.stdout.isatty() and not args.json)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 0 if args.watch is not None else 130


def _show(url: str, base: str, as_json: bool, *, clear: bool) -> int:
    """Read and print one screen (or one line of JSON); 1 if the daemon could not be read."""
    try:
        doc = fetch_status(url)
        text = json.dumps(doc) if as_json else render(doc, base)
    except StatusUnavailable as exc:
        text, status = f"invoker status: {exc}", 1
    except (KeyError, TypeError, ValueError, AttributeError):
        text, status = f"invoker status: {url} answered a status document of another shape", 1
    else:
        status = 0
    if clear:
        sys.stdout.write("\x1b[H\x1b[J")
    stream = sys.stderr if status and not clear else sys.stdout
    stream.write(text + "\n")
    stream.flush()
    return status


def _watch(url: str, base: str, args: argparse.Namespace, *, clear: bool) -> int:
    """Redraw every ``args.watch`` seconds until Ctrl-C or ``args.count`` screens."""
    shown = 0
    while True:
        started = time.monotonic()
        status = _show(url, base, args.json, clear=clear)
        shown += 1
        if args.count is not None and shown >= args.count:
            return status
        if not clear and not args.json:
            sys.stdout.write("\n")
        time.sleep(max(args.watch - (time.monotonic() - started), 0.0))
