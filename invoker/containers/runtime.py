"""Client of the OpenWhisk action runtime protocol (``POST /init``, ``POST /run``).

Also the pure functions that turn a runtime's answer into an OpenWhisk status and result, so
they can be tested without containers. A request's time limit is enforced by
:class:`Deadlines` (``timeout_s`` of :meth:`RuntimeConnection.post`), or by the caller's cancel
scope; this module never waits on its own except for the readiness probe.

HTTP is a lean HTTP/1.1 client: httptools (llhttp, Node.js's parser, in C) parses answers, we
write the two requests it ever makes, and non-blocking sockets are driven directly by trio's
I/O waits (``wait_readable`` / ``wait_writable``), because a general-purpose client's request
path (httpx: ~1 ms per ``/run``) was the largest cost on the daemon's trio thread, and h11
after it (~75 us of CPU per exchange here, against ~2 us with httptools). It
speaks only to the IP address of a container the daemon started, over keep-alive connections
with TCP_NODELAY, each request written in one send. It never sends a request twice: anything
that goes wrong once a request is under way is :class:`ConnectionLost`, and that connection is
closed. Bounds: an answer's status line and headers at most ``MAX_HEAD_BYTES``, its body at most
``max_result_bytes`` plus one read of ``_RECV_BYTES``.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import select
import socket
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import trio

from invoker.config import Config
from invoker.model import Action, Activation, RawJson, Status
from invoker.safejson import QUOTE_CHARS, JsonRejected, dumps, dumps_decoded, loads

# OpenWhisk's messages (common/scala/.../core/entity/ActivationResult.scala and Messages.scala)
MSG_TIMEOUT = "The action exceeded its time limits of {ms} milliseconds."
MSG_INIT_TIMEOUT = "The action exceeded its time limits of {ms} milliseconds during initialization."
MSG_OOM = "The action exhausted its memory and was aborted."
MSG_ABNORMAL = "The action did not produce a valid response and exited unexpectedly."
MSG_INVALID_RUN = "The action did not produce a valid response: {text}"
MSG_INVALID_JSON = "The action did not produce a valid JSON response: {text}"
MSG_INVALID_INIT = "The action failed during initialization: {text}"
MSG_TRUNCATED = (
    "The action produced a response that exceeded the allowed length: {n} > {max} bytes."
)
MSG_LOGS_TRUNCATED = (
    "Logs were truncated because the total bytes size exceeds the limit of {n} bytes."
)
MSG_LOGS_FAILED = "There was an issue while collecting your logs. Data might be missing."
MSG_LOGS_CONCURRENT = "Logs are not collected for actions with concurrency > 1."


MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one answer (more is refused)
_RECV_BYTES = 64 * 1024  # one read; what a body may hold beyond max_result_bytes when cut
# Any of these on an idle connection means the peer closed it or sent bytes nobody asked for.
_PEER_ACTIVITY = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class ConnectionLost(Exception):
    """The runtime could not be reached or closed the connection without a complete answer."""


class DeadlinePassed(Exception):
    """A request's ``timeout_s`` passed before its answer was read (its connection is closed)."""


@dataclass(frozen=True, slots=True)
class RuntimeResponse:
    status_code: int
    body: bytes  # at most max_bytes + one chunk; empty when truncated before reading
    truncated: bool = False
    length: int = 0  # Content-Length if announced, else the bytes seen


class Deadlines:
    """Ends the requests that pass their time limit, by closing their connection: one task
    and a dict entry per request in flight, instead of a trio cancel scope around each (at
    saturation, entering and leaving one per ``/run`` took ~5 % of the trio thread).

    :meth:`run` sleeps until the earliest deadline it knows of; a request that ends early
    leaves it to wake once for nothing, and only a request due sooner than that wakes it
    early. At most as many entries as requests in flight.
    """

    def __init__(self) -> None:
        self._due: dict[_Http, float] = {}
        self._wake_at = math.inf  # when run() wakes next, at the latest
        self._sooner = trio.Event()

    def watch(self, conn: _Http, deadline: float) -> None:
        self._due[conn] = deadline
        if deadline < self._wake_at:
            self._wake_at = deadline
            self._sooner.set()

    def unwatch(self, conn: _Http) -> None:
        self._due.pop(conn, None)

    async def run(self) -> None:
        """Enforces deadlines until cancelled."""
        while True:
            now = trio.current_time()
            for conn, deadline in list(self._due.items()):
                if deadline <= now:
                    del self._due[conn]
                    conn.expire()
            self._wake_at = min(self._due.values(), default=math.inf)
            self._sooner = trio.Event()
            with trio.move_on_at(self._wake_at):
                await self._sooner.wait()


class RuntimeClient:
    """Makes a :class:`RuntimeConnection` per container; holds no connection itself. Its
    :attr:`deadlines` must be running (:meth:`Deadlines.run`) for ``timeout_s`` to hold."""

    def __init__(self, max_result_bytes: int) -> None:
        self.max_result_bytes = max_result_bytes
        self.deadlines = Deadlines()

    def connect(self, base_url: str) -> RuntimeConnection:
        """``base_url`` is ``http://<IP address>:<port>``; anything else is a ValueError (a
        container is reached by its address, never through name resolution). Opens nothing
        yet: connections are made by the first request."""
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None or url.port is None:
            raise ValueError(f"not an http://<address>:<port> URL: {base_url!r}")
        address = ipaddress.ip_address(url.hostname)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return RuntimeConnection(family, (str(address), url.port), url.netloc,
                                 self.max_result_bytes, self.deadlines)

    async def aclose(self) -> None:
        """Nothing to close: each RuntimeConnection is closed by its owner."""


class RuntimeConnection:
    """HTTP to one container over keep-alive connections, which die with the container, so a
    stale connection can never reach a later container that got the same address.

    A request takes the most recently used idle connection (a stack) or opens one, so a
    container serving N requests at once has N connections, and idle ones are at most as many
    as were ever in use at once (a connection is only opened when none is idle); the pool bounds
    a container's concurrency. A connection goes back on the stack only after a complete answer
    that may be followed by another request (keep-alive, HTTP/1.1, nothing sent after it); any
    other outcome (error, truncated body,
    ``Connection: close``, cancellation) closes it.
    """

    def __init__(self, family: socket.AddressFamily, address: tuple[str, int], netloc: str,
                 max_result_bytes: int, deadlines: Deadlines) -> None:
        self.max_result_bytes = max_result_bytes
        self._deadlines = deadlines
        self._family = family
        self._address = address
        self._host = netloc.encode("ascii")
        self._idle: list[_Http] = []
        self._busy: set[_Http] = set()
        self._closed = False

    async def aclose(self) -> None:
        """Closes every connection, idle or in use (a request using one ends in ConnectionLost);
        later requests are refused with ConnectionLost. Does not block."""
        self._closed = True
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    async def probe(self, timeout_s: float) -> bool:
        """True once anything answers HTTP on the action port (any status). Uses a connection
        of its own, closed afterwards. Blocks at most ``timeout_s``."""
        if self._closed:
            return False
        with trio.move_on_after(timeout_s):
            try:
                conn = _Http(self._family)
            except ConnectionLost:
                return False
            try:
                await conn.connect(self._address)
                return await conn.answers_http(self._host)
            except ConnectionLost:
                return False
            finally:
                conn.close()
        return False

    async def post(self, path: str, payload: dict[str, Any], *,
                   timeout_s: float | None = None) -> RuntimeResponse:
        """POST JSON and read the answer, stopping past ``max_result_bytes`` (then the answer
        is ``truncated``). Blocks until the runtime answers, for at most ``timeout_s`` (then
        DeadlinePassed; see :class:`Deadlines`) or as long as the caller's cancel scope
        allows; either closes the connection used. Raises ConnectionLost when the runtime
        cannot be reached or does not give a complete HTTP/1.1 answer."""
        body = encode_body(payload)
        if self._closed:
            raise ConnectionLost("the connection to this runtime was closed")
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing is sent once the time is up
        conn = self._reusable_idle()
        fresh = conn is None
        if conn is None:
            conn = _Http(self._family)
        self._busy.add(conn)
        if timeout_s is not None:
            self._deadlines.watch(conn, trio.current_time() + timeout_s)
        reusable = False
        try:
            if fresh:
                await conn.connect(self._address)
            resp, reusable = await conn.exchange(_post(path.encode("ascii"), self._host, body),
                                                 self.max_result_bytes)
        except ConnectionLost:
            if conn.expired:
                raise DeadlinePassed(f"no answer within {timeout_s:g} s") from None
            raise
        finally:
            if timeout_s is not None:
                self._deadlines.unwatch(conn)
            self._busy.discard(conn)
            if reusable and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()
        return resp

    def _reusable_idle(self) -> _Http | None:
        """The most recently used idle connection the peer has not closed (one poll(2) each,
        no waiting); idle connections the peer closed or wrote to are closed."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.peer_active():
                return conn
            conn.close()
        return None


class _Http:
    """One HTTP/1.1 client connection: a non-blocking TCP socket with TCP_NODELAY, and an
    httptools (llhttp) parser of the answers, whose callbacks reach this object's ``on_*``
    methods (through :class:`_Callbacks`). Used by one task at a time. Every failure is raised
    as ConnectionLost."""

    __slots__ = ("_sock", "_poll", "_parser", "_received", "_status", "_head_done",
                 "_announced", "_chunked", "_refused", "_body", "_complete", "_extra",
                 "_keep_alive", "expired", "__weakref__")

    def __init__(self, family: socket.AddressFamily) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionLost(f"cannot open a socket: {exc}") from exc
        try:
            sock.setblocking(False)
            # Without it, Nagle's algorithm meets the peer's delayed ACK: ~40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._poll = select.poll()
            self._poll.register(sock, _PEER_ACTIVITY)
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot set up a socket: {exc}") from exc
        self._sock = sock
        self._parser = httptools.HttpResponseParser(_Callbacks(self))
        self.expired = False  # closed by Deadlines
        self._start_answer()

    def _start_answer(self) -> None:
        self._received = 0  # bytes read of the current answer, framing included
        self._status = 0
        self._head_done = False
        self._announced: int | None = None  # Content-Length
        self._chunked = False
        self._refused = ""  # why the head is refused, though llhttp took it
        self._body = bytearray()
        self._complete = False
        self._extra = False  # the peer sent more than one answer
        self._keep_alive = False

    # -- the parser's callbacks (one that raises ends the parse as invalid HTTP) --
    def on_message_begin(self) -> None:
        if self._head_done:
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra or self._head_done:  # a trailer (after a chunked body): ignored
            return
        name = name.lower()
        if name == b"content-length":  # llhttp has checked: digits, one value
            self._announced = int(value)
        elif name == b"transfer-encoding":
            # As h11: chunked only, said once. llhttp would read any other coding as a body
            # ending at EOF, and pass its framing on as the result.
            if self._chunked or value.strip().lower() != b"chunked":
                self._refused = "a Transfer-Encoding other than one chunked"
            self._chunked = True

    def on_headers_complete(self) -> None:
        if not self._extra:
            if self._refused:
                raise ValueError(self._refused)
            self._head_done = True
            self._status = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if not self._extra:
            self._body += data

    def on_message_complete(self) -> None:
        if not self._extra:
            self._complete = True
            # HTTP/1.0 keep-alive is not taken up (as h11): reused only over HTTP/1.1
            self._keep_alive = (self._parser.should_keep_alive()
                                and self._parser.get_http_version() == "1.1")

    # -- the connection --
    def close(self) -> None:
        """Idempotent; a task waiting on this socket gets ClosedResourceError (-> lost)."""
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def expire(self) -> None:
        """Its request's deadline passed: closed, so whatever waits on it ends."""
        self.expired = True
        self.close()

    def peer_active(self) -> bool:
        """True when the peer closed this idle connection or sent bytes nobody asked for."""
        return bool(self._poll.poll(0))

    async def connect(self, address: tuple[str, int]) -> None:
        """Blocks until connected (loopback and bridge: well under a millisecond)."""
        try:
            err = self._sock.connect_ex(address)
            if err == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(self._sock)
                err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (OSError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"cannot connect to {address[0]}:{address[1]}: {exc!r}") from exc
        if err:
            raise ConnectionLost(
                f"cannot connect to {address[0]}:{address[1]}: {os.strerror(err)}")

    async def answers_http(self, host: bytes) -> bool:
        """Sends ``GET /``; True when a status line with valid headers comes back."""
        try:
            await self._send_all(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            await self._read_head()
        except _FAILURES as exc:
            raise _lost(exc) from exc
        except ConnectionLost:
            if not self._head_done:  # what came after the head (its body) does not matter
                raise
        return True

    async def exchange(self, request: bytes, limit: int) -> tuple[RuntimeResponse, bool]:
        """Sends ``request`` (a whole request, see :func:`_post`) and reads the answer;
        returns it and whether this connection may carry another request. Blocks until the
        peer answers (or fails)."""
        self._start_answer()
        # What the answer may take on the wire: its body, its head, one read beyond, and as
        # much again for chunk framing (chunk sizes and extensions are not body).
        wire_limit = 2 * limit + MAX_HEAD_BYTES + _RECV_BYTES
        try:
            await self._send_all(request)
            # The runtime needs a while to answer: wait at once rather than try a read first.
            await trio.lowlevel.wait_readable(self._sock)
            await self._read_head()
            status = self._status
            if status < 200:
                raise ConnectionLost(
                    f"the runtime sent an unrequested {status} informational answer")
            if self._announced is not None and self._announced > limit:
                return RuntimeResponse(status, b"", True, self._announced), False
            body = self._body
            framing = 0  # bytes read since the body last grew: chunk framing and trailers
            while True:
                # chunked, or chunks of a byte in framing of kilobytes
                if len(body) > limit or self._received > wire_limit:
                    seen = len(body) if len(body) > limit else self._received
                    return RuntimeResponse(status, bytes(body), True, seen), False
                if self._complete:
                    break
                if framing > MAX_HEAD_BYTES:  # trailers build up in the parser: bounded so
                    raise ConnectionLost("the runtime's answer is not valid HTTP/1.1: "
                                         f"{framing} bytes of chunk framing or trailers")
                had, received = len(body), self._received
                more = await self._feed(_RECV_BYTES)
                framing = 0 if len(body) > had else framing + self._received - received
                if not more:
                    if self._announced is None and not self._chunked:
                        # delimited by the peer's close (HTTP/1.0 or no length): complete
                        return RuntimeResponse(status, bytes(body), False, len(body)), False
                    raise ConnectionLost(
                        "the runtime closed the connection before a complete answer")
        except _FAILURES as exc:
            raise _lost(exc) from exc
        finally:
            self._body = bytearray()  # an idle connection keeps no answer
        reusable = self._keep_alive and not self._extra
        return RuntimeResponse(status, bytes(body), False, len(body)), reusable

    async def _read_head(self) -> None:
        """Reads until the answer's status line and headers are parsed, at most
        ``MAX_HEAD_BYTES`` of them (each read is cut so as not to pass that bound)."""
        while not self._head_done:
            if self._received >= MAX_HEAD_BYTES:
                raise ConnectionLost("the runtime's answer is not valid HTTP/1.1: its status "
                                     f"line and headers pass {MAX_HEAD_BYTES} bytes")
            if not await self._feed(min(_RECV_BYTES, MAX_HEAD_BYTES - self._received)):
                raise ConnectionLost("the runtime closed the connection before a complete answer"
                                     if self._received else
                                     "the runtime closed the connection without answering")

    async def _send_all(self, data: bytes) -> None:
        """One send unless the socket buffer is full; then waits until the peer reads."""
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)

    async def _feed(self, size: int) -> bool:
        """Reads at most ``size`` bytes, waiting for some, and parses them; False at EOF."""
        if self._received:
            # A later read of one answer: let the other tasks (and the caller's timeout)
            # in, or a runtime sending without pause would hold the trio thread.
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = self._sock.recv(size)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
        if not data:
            return False
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._complete:
                why = self._refused or repr(exc)
                raise ConnectionLost(
                    f"the runtime's answer is not valid HTTP/1.1: {why}"[:300]) from exc
            self._extra = True  # bytes after the answer that are not HTTP: not reused
        return True


_FAILURES = (OSError, trio.ClosedResourceError)


class _Callbacks:
    """The protocol object of an :class:`_Http`'s parser: passes each callback on through a
    weak reference. The parser holds its protocol; were that the connection itself, a closed
    connection (with what its parser holds) would wait for the cyclic garbage collector
    instead of being freed at once."""

    __slots__ = ("_http",)

    def __init__(self, http: _Http) -> None:
        self._http = weakref.ref(http)

    def on_message_begin(self) -> None:
        if http := self._http():
            http.on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if http := self._http():
            http.on_header(name, value)

    def on_headers_complete(self) -> None:
        if http := self._http():
            http.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        if http := self._http():
            http.on_body(data)

    def on_message_complete(self) -> None:
        if http := self._http():
            http.on_message_complete()


def _post(path: bytes, host: bytes, body: bytes) -> bytes:
    """The whole POST, head and body, as one buffer to be written in one send. ``path`` and
    ``host`` are the daemon's own (a container's ``address:port``), never a message's."""
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            # identity: the body is passed on as it comes
            b"Accept-Encoding: identity\r\nContent-Length: %d\r\n\r\n%s"
            % (path, host, len(body), body))


def _lost(exc: BaseException) -> ConnectionLost:
    if isinstance(exc, trio.ClosedResourceError):
        return ConnectionLost("the connection was closed while in use")
    return ConnectionLost(f"connection to the runtime failed: {exc!r}")


# ------------------------------------------------------------------ protocol bodies
def init_body(action: Action, api_host: str | None = None) -> dict[str, Any]:
    env: dict[str, str] = {}
    if api_host:
        env["__OW_API_HOST"] = api_host
    value: dict[str, Any] = {
        "name": action.name,
        "main": action.main,
        "binary": action.binary,
        "env": env,
    }
    if action.code is not None:
        value["code"] = action.code
    return {"value": value}


def encode_body(payload: dict[str, Any]) -> bytes:
    """``payload`` as compact UTF-8 JSON; a :class:`RawJson` ``value`` goes in as it is."""
    value = payload.get("value")
    if not isinstance(value, RawJson):
        return dumps(payload)
    rest = dumps({k: v for k, v in payload.items() if k != "value"})
    return b'{"value":' + value.data + (b"," + rest[1:] if len(rest) > 2 else b"}")


def run_body(activation: Activation, deadline_ms: int) -> dict[str, Any]:
    action = activation.action
    return {
        "value": activation.params,
        "namespace": activation.namespace,
        "action_name": f"/{activation.namespace}/{action.name}",
        "action_version": action.version,
        "activation_id": activation.activation_id,
        "transaction_id": activation.transid,
        "deadline": str(deadline_ms),
    }


# ------------------------------------------------------------------ interpretation
def _text(body: bytes) -> str:
    """The start of an answer for an error text: at most ``QUOTE_CHARS`` characters, saying how
    long it was when cut (the whole answer is the action's to log, not the record's)."""
    text = body[:4 * QUOTE_CHARS].decode("utf-8", "replace")  # a character is at most 4 bytes
    if len(text) <= QUOTE_CHARS and len(body) <= 4 * QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(body)} bytes)"


def _json_object(body: bytes, max_depth: int) -> tuple[dict[str, Any] | None, str]:
    """The answer as a JSON object, or None and why not (empty when the reason is plain to see
    in the answer's text: not JSON at all, or JSON but not an object)."""
    try:
        value = loads(body, max_depth)
    except JsonRejected as exc:
        return None, "" if exc.syntax else str(exc)
    return (value, "") if isinstance(value, dict) else (None, "")


def _invalid_json(body: bytes, why: str) -> str:
    text = _text(body)
    return MSG_INVALID_JSON.format(text=f"{text} ({why})" if why else text)


def _error_kept(error: object, max_bytes: int) -> dict[str, Any] | RawJson:
    """The result of a runtime's error answer: its ``error`` member, kept encoded (cut like a
    long answer when encoded again it passes ``max_bytes``)."""
    data = dumps_decoded({"error": error})
    if len(data) > max_bytes:
        return {"error": MSG_TRUNCATED.format(n=len(data), max=max_bytes)}
    return RawJson(data)


def truncated_result(length: int, max_bytes: int) -> tuple[Status, dict[str, Any]]:
    return Status.APPLICATION_ERROR, {"error": MSG_TRUNCATED.format(n=length, max=max_bytes)}


def interpret_run(resp: RuntimeResponse, max_bytes: int, max_depth: int = Config.max_json_depth,
                  ) -> tuple[Status, dict[str, Any] | RawJson]:
    """OpenWhisk's rules for a /run answer. A result that is not JSON as
    :func:`invoker.safejson.loads` takes it (NaN, nested deeper than ``max_depth``, an
    integer of thousands of digits, invalid UTF-8...) is a developer error saying why.

    What the action answered comes back encoded again (:class:`RawJson`): its parsed objects
    live only during this call, which does not yield, so at most one answer's are alive. Encoded
    again it may be longer (``1e15`` is written ``1000000000000000.0``): past ``max_bytes`` it
    is truncated like an answer that long."""
    if resp.truncated:
        return truncated_result(resp.length, max_bytes)
    obj, why = _json_object(resp.body, max_depth)
    if resp.status_code == 200:
        if obj is None:
            return Status.DEVELOPER_ERROR, {"error": _invalid_json(resp.body, why)}
        data = dumps_decoded(obj)
        if len(data) > max_bytes:
            return truncated_result(len(data), max_bytes)
        return (Status.APPLICATION_ERROR if "error" in obj else Status.SUCCESS), RawJson(data)
    if obj is not None and "error" in obj:
        return Status.DEVELOPER_ERROR, _error_kept(obj["error"], max_bytes)
    return Status.DEVELOPER_ERROR, {"error": MSG_INVALID_RUN.format(text=_text(resp.body))}


def interpret_init(resp: RuntimeResponse, max_bytes: int,
                   max_depth: int = Config.max_json_depth,
                   ) -> tuple[Status, dict[str, Any] | RawJson] | None:
    """None when /init succeeded, else the DEVELOPER_ERROR status and result."""
    if resp.status_code == 200 and not resp.truncated:
        return None
    if resp.truncated:
        return Status.DEVELOPER_ERROR, {
            "error": MSG_INVALID_INIT.format(
                text=MSG_TRUNCATED.format(n=resp.length, max=max_bytes)
            )
        }
    obj, _ = _json_object(resp.body, max_depth)
    if obj is not None and "error" in obj:
        return Status.DEVELOPER_ERROR, _error_kept(obj["error"], max_bytes)
    return Status.DEVELOPER_ERROR, {"error": MSG_INVALID_INIT.format(text=_text(resp.body))}
