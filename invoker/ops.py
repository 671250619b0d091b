"""The operations endpoint: ``GET /metrics`` (Prometheus text), ``GET /healthz`` and
``GET /status`` (JSON for ``invoker status``, see invoker.status_report).

A deliberately small HTTP/1.0-style server on trio: one request per connection, the whole
response written in one send (see the Nagle note in ENVIRONMENT.md), request heads capped.

Connections from the action containers' networks are closed unanswered: the container pool
registers each address range its containers live on (``refuse_peers_from``; see
invoker.networks), so an action cannot read the daemon's metrics or health even where the
endpoint listens on an address the action can route to (e.g. ``metrics_host = 0.0.0.0``).
Loopback peers are always served.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from invoker.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_REQUEST_HEAD = 8192
Report = Callable[[], dict[str, Any]]  # a JSON document, made on the trio thread
READ_TIMEOUT_S = 5.0

# Address ranges of action networks, process-wide: every ops endpoint of the process refuses
# them (the pool and the endpoint are wired independently; a range stays refused for good).
_refused_networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()


def refuse_peers_from(network: str) -> None:
    """Close connections from addresses in ``network`` (CIDR) unanswered from now on."""
    _refused_networks.add(ipaddress.ip_network(network, strict=False))


def peer_refused(address: str) -> bool:
    """True for a peer address inside a refused range; loopback is never refused."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # not an IP peer (e.g. a unix socket): not from an action network
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_loopback and any(ip in net for net in _refused_networks)


async def serve_ops(host: str, port: int, metrics: Metrics, health: Report,
                    status: Report | None = None,
                    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound port through ``task_status``. ``health`` and
    ``status`` run on the trio thread and must not block (without ``status``: 404)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("ops endpoint listening", host=host, port=bound)
    task_status.started(bound)
    await trio.serve_listeners(partial(_handle, metrics=metrics, health=health, status=status),
                               listeners)


async def _handle(stream: trio.SocketStream, *, metrics: Metrics,
                  health: Report, status: Report | None = None) -> None:
    async with stream:
        peer = _peer_address(stream)
        if peer_refused(peer):
            log.debug("ops connection from an action network refused", peer=peer)
            return
        head = b""
        with trio.move_on_after(READ_TIMEOUT_S):
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        parts = head.split(b" ", 2)
        path = parts[1].decode("latin-1") if len(parts) > 2 else ""
        if parts[0] != b"GET":
            code, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path.split("?")[0] == "/metrics":
            code, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
        elif path.split("?")[0] == "/healthz":
            state = health()
            code = "200 OK" if state.get("ok") else "503 Service Unavailable"
            ctype, body = "application/json", json.dumps(state).encode()
        elif path.split("?")[0] == "/status" and status is not None:
            try:
                code, ctype, body = "200 OK", "application/json", json.dumps(status()).encode()
            except Exception:  # a report must never take the daemon down
                log.exception("GET /status failed")
                code, ctype, body = "500 Internal Server Error", "text/plain", b"failed\n"
        else:
            code, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        response = (f"HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    return peer[0] if isinstance(peer, tuple) else str(peer)
