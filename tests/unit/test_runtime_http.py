"""The runtime client's HTTP/1.1 (invoker.containers.runtime) against real local servers.

Each test starts trio TCP servers on 127.0.0.1 scripted for it: a well-behaved keep-alive h11
server, and servers that close, lie, stall or answer garbage. The client under test is the real
one, over real sockets.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import socket
import weakref
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio

from invoker.containers.runtime import (
    MAX_HEAD_BYTES,
    ConnectionLost,
    DeadlinePassed,
    RuntimeClient,
    RuntimeConnection,
    RuntimeResponse,
    _Http,
)

LIMIT = 4096  # max_result_bytes of the client in these tests

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


class Server:
    """Serves each accepted connection with ``handler(stream, n)``, n counting from 0; records
    every request it parsed as ``(connection number, method, target, headers, body)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.first_reads: list[bytes] = []  # what the first receive of each request returned
        self.closed_by_peer: set[int] = set()  # connections on which the client's EOF was seen
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> Server:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        n = self.connections
        self.connections += 1
        async with stream:
            try:
                await self.handler(stream, n)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def read_request(self, stream: trio.SocketStream, h: h11.Connection,
                           n: int) -> bytes | None:
        """Reads one request into ``requests`` and returns its body; None when the client
        closed the connection."""
        first: bytes | None = None
        request: h11.Request | None = None
        body = b""
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = await self._receive(stream, n)
                if first is None:
                    first = data
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None and first is not None
                self.first_reads.append(first)
                self.requests.append((n, request.method, request.target,
                                      dict(request.headers), body))
                return body
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def _receive(self, stream: trio.SocketStream, n: int) -> bytes:
        """What the client sent next; b"" (noted in ``closed_by_peer``) once it closed."""
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # closed with unread bytes: a reset
            data = b""
        if not data:
            self.closed_by_peer.add(n)
        return data

    async def wait_eof(self, stream: trio.SocketStream, n: int) -> None:
        """Waits until the client closes connection ``n`` (reading and ignoring anything)."""
        while await self._receive(stream, n):
            pass


def keep_alive_server(status: int = 200, delay: Callable[[], Awaitable[None]] | None = None,
                      ) -> Server:
    """Echoes each request body as ``{"echo": <body>}`` on keep-alive connections."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        while (request := await server.read_request(stream, h, n)) is not None:
            if delay is not None:
                await delay()
            body = json.dumps({"echo": json.loads(request)}).encode()
            await stream.send_all(h.send(h11.Response(
                status_code=status,
                headers=[("Content-Type", "application/json"),
                         ("Content-Length", str(len(body)))])) + h.send(h11.Data(data=body))
                + h.send(h11.EndOfMessage()))
            h.start_next_cycle()

    server = Server(handler)
    return server


def raw_server(answer: Callable[[int], bytes], then: str = "wait") -> Server:
    """Reads one request per connection, writes ``answer(n)`` in one send, then ``then``:
    "wait" for the client to close, "close" at once, "stall" forever (reading nothing)."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is None:
            return
        await stream.send_all(answer(n))
        if then == "wait":
            await server.wait_eof(stream, n)
        elif then == "stall":
            await trio.sleep_forever()

    server = Server(handler)
    return server


def ok(body: bytes = b'{"ok":true}', extra_headers: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def connect(server: Server, limit: int = LIMIT) -> RuntimeConnection:
    return RuntimeClient(limit).connect(server.url)


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Waits until ``predicate()`` holds (something the server sees on its own schedule)."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition not met in time")


# ---------------------------------------------------------------- normal operation
async def test_keep_alive_reuses_one_connection_and_writes_each_request_in_one_send(
        nursery: trio.Nursery) -> None:
    server = await keep_alive_server().start(nursery)
    conn = connect(server)
    for i in range(5):
        resp = await conn.post("/run", {"value": {"i": i}})
        assert resp == RuntimeResponse(200, b'{"echo": {"value": {"i": %d}}}' % i, False,
                                       len(resp.body))
    assert server.connections == 1
    _, method, target, headers, body = server.requests[0]
    assert (method, target, body) == (b"POST", b"/run", b'{"value":{"i":0}}')
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert headers[b"content-type"] == b"application/json"
    # head and body arrived together: one send, so no Nagle/delayed-ACK stall can split them
    assert all(first.endswith(b"\r\n\r\n" + req[4])
               for first, req in zip(server.first_reads, server.requests, strict=True))
    sock = conn._idle[0]._sock  # the connection's own socket: TCP_NODELAY is set
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await conn.aclose()


async def test_any_status_and_a_body_of_exactly_the_limit_pass_through(
        nursery: trio.Nursery) -> None:
    body = b"x" * LIMIT
    server = await raw_server(lambda n: b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n"
                              % len(body) + body).start(nursery)
    resp = await connect(server).post("/run", {})
    assert resp == RuntimeResponse(502, body, False, LIMIT)


async def test_connection_close_answer_is_not_reused(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: ok(b'{"n":%d}' % n, b"Connection: close\r\n"),
                              then="close").start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {})).body == b'{"n":0}'
    assert (await conn.post("/run", {})).body == b'{"n":1}'
    assert server.connections == 2
    assert conn._idle == []


async def test_http_1_0_answer_delimited_by_close(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"HTTP/1.0 200 OK\r\n\r\n{}", then="close").start(
        nursery)
    conn = connect(server)
    assert await conn.post("/run", {}) == RuntimeResponse(200, b"{}", False, 2)
    assert conn._idle == []


async def test_bytes_after_the_answer_mean_the_connection_is_not_reused(
        nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: ok() + b"HTTP/1.1 200 OK\r\n").start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {})).body == b'{"ok":true}'
    await until(lambda: 0 in server.closed_by_peer)
    await conn.post("/run", {})
    assert server.connections == 2


async def test_garbage_after_a_complete_answer_keeps_the_answer_not_the_connection(
        nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: ok(b'{"n":%d}' % n) + b"\x00junk\r\n").start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {})).body == b'{"n":0}'
    assert conn._idle == []
    assert (await conn.post("/run", {})).body == b'{"n":1}'
    assert server.connections == 2


async def test_an_answer_sent_a_byte_at_a_time_is_read_whole(nursery: trio.Nursery) -> None:
    answer = ok(b'{"slow":true}', b"X-Long: " + b"v" * 300 + b"\r\n")

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        while await server.read_request(stream, h, n) is not None:
            for i in range(len(answer)):
                await stream.send_all(answer[i:i + 1])
            h = h11.Connection(h11.SERVER)

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    for _ in range(2):
        assert await conn.post("/run", {}) == RuntimeResponse(200, b'{"slow":true}', False, 13)
    assert server.connections == 1  # kept alive across both
    assert conn._idle[0]._body == b""  # an idle connection holds no answer (memory bound)


async def test_http_1_1_answer_without_a_length_ends_at_close(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 100000,
                              then="close").start(nursery)
    conn = connect(server, limit=200000)
    assert await conn.post("/run", {}) == RuntimeResponse(200, b"z" * 100000, False, 100000)
    assert conn._idle == []


async def test_an_empty_answer_keeps_the_connection(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"HTTP/1.1 204 No Content\r\n\r\n").start(nursery)
    conn = connect(server)
    assert await conn.post("/run", {}) == RuntimeResponse(204, b"", False, 0)
    assert len(conn._idle) == 1


# ---------------------------------------------------------------- stale idle connections
async def test_idle_connection_closed_by_the_server_is_replaced_without_resending(
        nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is not None:
            await stream.send_all(ok(b'{"n":%d}' % n))  # keep-alive, then close while idle
        await stream.aclose()
        closed.set()

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {"value": 1})).body == b'{"n":0}'
    await closed.wait()
    assert (await conn.post("/run", {"value": 2})).body == b'{"n":1}'
    # each request reached the server once, each on its own connection
    assert [(n, body) for n, _, _, _, body in server.requests] == [
        (0, b'{"value":1}'), (1, b'{"value":2}')]


async def test_idle_connection_with_stray_bytes_is_replaced(nursery: trio.Nursery) -> None:
    stray_sent = trio.Event()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is None:
            return
        await stream.send_all(ok())
        if n == 0:
            await trio.sleep(0.05)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            stray_sent.set()
        await server.wait_eof(stream, n)

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    await conn.post("/run", {})
    await stray_sent.wait()
    await trio.sleep(0.01)  # loopback delivers at once; a margin for a loaded machine
    assert (await conn.post("/run", {})).body == b'{"ok":true}'
    assert [n for n, *_ in server.requests] == [0, 1]
    await until(lambda: 0 in server.closed_by_peer)


async def test_server_closing_after_reading_the_request_is_lost_and_not_retried(
        nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"", then="close").start(nursery)
    conn = connect(server)
    with pytest.raises(ConnectionLost, match="closed the connection"):
        await conn.post("/run", {"value": 1})
    await trio.sleep(0.05)
    assert len(server.requests) == 1 and server.connections == 1


# ---------------------------------------------------------------- bounds
async def test_announced_length_above_the_limit_is_not_read(nursery: trio.Nursery) -> None:
    server = await raw_server(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100,
        then="wait").start(nursery)
    conn = connect(server)
    with trio.fail_after(5):  # the server never sends the rest: the client must not wait for it
        resp = await conn.post("/run", {})
    assert resp == RuntimeResponse(200, b"", True, 10_000_000)
    await until(lambda: 0 in server.closed_by_peer)  # a truncated answer closes the connection
    assert conn._idle == []


async def test_chunked_body_past_the_limit_is_cut(nursery: trio.Nursery) -> None:
    chunk = b"y" * 1000

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is None:
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(1000):  # far more than the limit; the client stops early
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await trio.sleep_forever()

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    with trio.fail_after(5):
        resp = await conn.post("/run", {})
    assert resp.truncated and resp.status_code == 200
    assert LIMIT < resp.length == len(resp.body) <= LIMIT + 65536
    assert set(resp.body) == {ord("y")}
    assert conn._idle == []


async def test_eof_mid_body_is_lost(nursery: trio.Nursery) -> None:
    server = await raw_server(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        then="close").start(nursery)
    with pytest.raises(ConnectionLost, match="closed the connection before a complete answer"):
        await connect(server).post("/run", {})


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x00\xff\x10binary junk\r\n\r\n",
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
])
async def test_garbage_instead_of_http_is_lost(nursery: trio.Nursery, garbage: bytes) -> None:
    server = await raw_server(lambda n: garbage, then="close").start(nursery)
    conn = connect(server)
    with pytest.raises(ConnectionLost):
        await conn.post("/run", {})
    assert not await conn.probe(1.0)


def endless_server(start: bytes) -> Server:
    """Reads one request, then sends ``start`` and a run of bytes after it that never ends
    (4 MiB, far past every bound), and stalls."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is None:
            return
        await stream.send_all(start)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(1024):
                await stream.send_all(b"a" * 4096)
        await trio.sleep_forever()

    server = Server(handler)
    return server


async def test_header_larger_than_the_bound_is_lost(nursery: trio.Nursery) -> None:
    server = await endless_server(b"HTTP/1.1 200 OK\r\nX-Bomb: ").start(nursery)
    with trio.fail_after(5), pytest.raises(ConnectionLost, match="not valid HTTP/1.1"):
        await connect(server).post("/run", {})


def head_of(size: int) -> bytes:
    """A status line and headers of exactly ``size`` bytes, announcing a 2-byte body."""
    start, end = b"HTTP/1.1 200 OK\r\nX-Pad: ", b"\r\nContent-Length: 2\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


async def test_a_head_of_exactly_the_bound_passes_and_one_byte_more_does_not(
        nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: head_of(MAX_HEAD_BYTES + n) + b"{}",
                              then="close").start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {})).body == b"{}"
    await until(lambda: conn._idle[0].peer_active())  # the second post takes a new connection
    with pytest.raises(ConnectionLost, match="headers pass 65536 bytes"):
        await conn.post("/run", {})


async def test_trailers_without_end_are_lost_before_the_wire_limit(
        nursery: trio.Nursery) -> None:
    server = await endless_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"2\r\nok\r\n0\r\nX-Trailer: ").start(nursery)
    with trio.fail_after(5), pytest.raises(ConnectionLost, match="chunk framing or trailers"):
        await connect(server).post("/run", {})


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"gzip, chunked",
                                    b"chunked\r\nTransfer-Encoding: chunked"])
async def test_transfer_codings_other_than_one_chunked_are_lost(
        nursery: trio.Nursery, coding: bytes) -> None:
    server = await raw_server(
        lambda n: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        % coding, then="close").start(nursery)
    with pytest.raises(ConnectionLost, match="not valid HTTP/1.1"):
        await connect(server).post("/run", {})


async def test_http_1_0_keep_alive_is_not_taken_up(nursery: trio.Nursery) -> None:
    server = await raw_server(
        lambda n: b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
    ).start(nursery)
    conn = connect(server)
    assert (await conn.post("/run", {})).body == b"{}"
    assert conn._idle == []


async def test_probe_takes_a_valid_head_whatever_follows(nursery: trio.Nursery) -> None:
    server = await raw_server(
        lambda n: b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\nzz").start(
        nursery)
    assert await connect(server).probe(1.0)


async def test_a_dropped_connection_is_freed_without_the_cyclic_collector() -> None:
    gc.disable()
    try:
        http = _Http(socket.AF_INET)
        ref = weakref.ref(http)
        http.close()
        del http
        assert ref() is None
    finally:
        gc.enable()


async def test_informational_answers_are_lost(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" + ok()).start(nursery)
    with pytest.raises(ConnectionLost, match="informational"):
        await connect(server).post("/run", {})


async def test_eof_before_any_answer_is_lost(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        pass  # accepts and closes at once, as Docker's port proxy does before the runtime runs

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    with pytest.raises(ConnectionLost):
        await conn.post("/run", {})
    assert not await conn.probe(1.0)


# ---------------------------------------------------------------- cancellation
async def test_cancelled_request_closes_its_connection(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow() -> None:
        await release.wait()

    server = await keep_alive_server(delay=slow).start(nursery)
    conn = connect(server)
    with trio.move_on_after(0.2) as scope:
        await conn.post("/run", {"value": "slow"})
    assert scope.cancelled_caught
    release.set()
    await until(lambda: 0 in server.closed_by_peer)  # the cancelled connection was closed
    assert (await conn.post("/run", {"value": "next"})).body == b'{"echo": {"value": "next"}}'
    assert server.connections == 2
    assert [body for *_, body in server.requests] == [b'{"value":"slow"}', b'{"value":"next"}']


# ---------------------------------------------------------------- time limits
def connect_with_deadlines(server: Server, nursery: trio.Nursery) -> RuntimeConnection:
    """A connection of a client whose Deadlines task runs in ``nursery``."""
    client = RuntimeClient(LIMIT)
    nursery.start_soon(client.deadlines.run)
    return client.connect(server.url)


async def test_a_request_past_its_time_limit_ends_and_closes_its_connection(
        nursery: trio.Nursery) -> None:
    release = trio.Event()
    server = await keep_alive_server(delay=release.wait).start(nursery)
    conn = connect_with_deadlines(server, nursery)
    began = trio.current_time()
    with pytest.raises(DeadlinePassed):
        await conn.post("/run", {"value": "slow"}, timeout_s=0.2)
    assert 0.2 <= trio.current_time() - began < 2
    release.set()
    await until(lambda: 0 in server.closed_by_peer)  # closed: the answer found nobody
    assert (await conn.post("/run", {"value": "next"}, timeout_s=5)).body == (
        b'{"echo": {"value": "next"}}')
    assert server.connections == 2


async def test_an_answer_that_stops_midway_ends_at_the_time_limit(
        nursery: trio.Nursery) -> None:
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    server = await raw_server(lambda n: partial, then="stall").start(nursery)
    with pytest.raises(DeadlinePassed):
        await connect_with_deadlines(server, nursery).post("/run", {}, timeout_s=0.2)


async def test_a_request_due_sooner_than_one_in_flight_ends_first(
        nursery: trio.Nursery) -> None:
    release = trio.Event()
    server = await keep_alive_server(delay=release.wait).start(nursery)
    conn = connect_with_deadlines(server, nursery)
    ended: list[str] = []

    async def post(name: str, timeout_s: float) -> None:
        try:
            await conn.post("/run", {"value": name}, timeout_s=timeout_s)
        except DeadlinePassed:
            ended.append(name)

    began = trio.current_time()
    async with trio.open_nursery() as posts:
        posts.start_soon(post, "later", 30)
        await until(lambda: server.connections == 1)
        posts.start_soon(post, "sooner", 0.2)  # the deadlines' task sleeps until 30 s
        await until(lambda: ended == ["sooner"])
        assert trio.current_time() - began < 5
        release.set()
    assert ended == ["sooner"]  # the first got its answer


async def test_an_answered_request_leaves_its_connection_to_the_next(
        nursery: trio.Nursery) -> None:
    server = await keep_alive_server().start(nursery)
    conn = connect_with_deadlines(server, nursery)
    await conn.post("/run", {"value": 1}, timeout_s=0.1)
    await trio.sleep(0.3)  # past the first request's deadline: nothing is closed
    await conn.post("/run", {"value": 2}, timeout_s=0.1)
    assert server.connections == 1 and not server.closed_by_peer


async def test_a_cancelled_scope_sends_nothing(nursery: trio.Nursery) -> None:
    server = await keep_alive_server().start(nursery)
    conn = connect(server)
    with trio.CancelScope() as scope:
        scope.cancel()
        await conn.post("/run", {})
    await trio.sleep(0.05)
    assert server.connections == 0


# ---------------------------------------------------------------- concurrency
async def test_concurrent_posts_use_several_connections_then_reuse_them(
        nursery: trio.Nursery) -> None:
    in_flight = 0
    all_in = trio.Event()
    width = 4

    async def barrier() -> None:
        nonlocal in_flight
        in_flight += 1
        if in_flight == width:
            all_in.set()
        await all_in.wait()

    server = await keep_alive_server(delay=barrier).start(nursery)
    conn = connect(server)
    results: list[bytes] = []

    async def one(i: int) -> None:
        results.append((await conn.post("/run", {"value": i})).body)

    with trio.fail_after(5):
        async with trio.open_nursery() as posts:
            for i in range(width):
                posts.start_soon(one, i)
    assert sorted(results) == sorted(b'{"echo": {"value": %d}}' % i for i in range(width))
    assert server.connections == width and len(conn._idle) == width
    for i in range(10):  # sequential requests take the most recently used connection
        await conn.post("/run", {"value": i})
    assert server.connections == width and len(conn._idle) == width
    assert len({n for n, *_ in server.requests[width:]}) == 1


# ---------------------------------------------------------------- closing and probing
async def test_aclose_closes_idle_and_busy_connections_and_refuses_posts(
        nursery: trio.Nursery) -> None:
    release = trio.Event()
    hold = False

    async def maybe_hold() -> None:
        if hold:
            await release.wait()

    server = await keep_alive_server(delay=maybe_hold).start(nursery)
    conn = connect(server)
    await conn.post("/run", {})  # leaves one idle connection
    hold = True
    lost: list[ConnectionLost] = []

    async def busy() -> None:
        try:
            await conn.post("/run", {})
        except ConnectionLost as exc:
            lost.append(exc)

    async with trio.open_nursery() as posts:
        posts.start_soon(busy)
        posts.start_soon(busy)
        await until(lambda: len(server.requests) == 3)
        await conn.aclose()
    assert len(lost) == 2
    release.set()
    await until(lambda: server.closed_by_peer == {0, 1})
    with pytest.raises(ConnectionLost, match="closed"):
        await conn.post("/run", {})


async def test_probe(nursery: trio.Nursery) -> None:
    server = await raw_server(lambda n: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                              ).start(nursery)
    assert await connect(server).probe(1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    assert not await RuntimeClient(LIMIT).connect(f"http://127.0.0.1:{free_port}").probe(1.0)
    silent = await raw_server(lambda n: b"", then="stall").start(nursery)
    with trio.fail_after(2):
        assert not await connect(silent).probe(0.2)


def test_connect_takes_only_an_address() -> None:
    client = RuntimeClient(LIMIT)
    client.connect("http://10.213.0.2:8080")
    client.connect("http://[::1]:8080")
    for url in ("http://localhost:8080", "https://127.0.0.1:8080", "http://127.0.0.1"):
        with pytest.raises(ValueError):
            client.connect(url)


async def test_a_body_of_one_byte_chunks_in_long_framing_is_cut_by_its_wire_size(
        nursery: trio.Nursery) -> None:
    framing = b";" + b"x" * 4000  # a chunk extension: framing h11 does not count as body

    async def handler(stream: trio.SocketStream, n: int) -> None:
        h = h11.Connection(h11.SERVER)
        if await server.read_request(stream, h, n) is None:
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(b"1%s\r\nA\r\n" % framing * 16)

    server = Server(handler)
    await server.start(nursery)
    conn = connect(server)
    with trio.fail_after(10):
        resp = await conn.post("/run", {})
    assert resp.truncated and len(resp.body) <= LIMIT
    assert resp.length > 2 * LIMIT  # what came on the wire
