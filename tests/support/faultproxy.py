"""A fault-injecting TCP proxy for tests, written with trio.

In a trio test::

    async with FaultProxy("127.0.0.1", 5984) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/db"
        proxy.latency = 0.3   # each chunk from client to server waits 0.3 s first
        proxy.request_latency = 0.2  # the first chunk of each request waits 0.2 s (see below)
        proxy.freeze = (5.0, 0.1)  # bytes pass only in the first 0.1 s of every 5 s
        proxy.down = True     # drop live connections; accept new ones and close them at once
        proxy.down = False    # back to normal
        proxy.connections     # how many client connections were accepted so far

``request_latency`` delays a client's chunk when it starts a new burst: the first chunk on a
connection, or the first after the server sent something. Over HTTP/1.1 without pipelining
that is once per request whatever its size, unlike ``latency`` (once per chunk received).
``freeze`` = (period_s, open_s) models a server that stalls (GC, compaction...): no byte is
passed on, in either direction, outside the first ``open_s`` of each ``period_s`` (on trio's
clock); a pump holds at most one received chunk (64 KiB) meanwhile.

From a test that does not run trio, as a separate process::

    python -m tests.support.faultproxy --target 127.0.0.1:5984 --listen 127.0.0.1:0 \
        --control-file PATH

prints its bound port as the first line of stdout, then re-reads PATH (JSON such as
``{"latency": 0.2, "down": false}``, optionally with ``"request_latency": s`` and
``"freeze": [period_s, open_s]``) every 100 ms; write it atomically (write a temporary file,
then rename). SIGTERM or SIGINT stops it. ``ProxyProcess`` runs it so and steers it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

_BUFSIZE = 65536


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.latency: float = 0.0
        self.request_latency: float = 0.0
        self.freeze: tuple[float, float] | None = None  # (period_s, open_s)
        self.connections = 0  # client connections accepted (including ones closed while down)
        self._down = False
        self._live: set[trio.CancelScope] = set()  # one per proxied connection
        self._listener: trio.SocketListener | None = None
        self._port: int | None = None
        self._nursery_manager: Any = None  # what trio.open_nursery() returns
        self._nursery: trio.Nursery | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started (use it as `async with`)")
        return self._port

    @property
    def active(self) -> int:
        """Connections being proxied right now (not counting ones that `down` cut)."""
        return len(self._live)

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = bool(value)
        if self._down:
            for scope in self._live:
                scope.cancel()  # its task closes both sockets when it next runs
            self._live.clear()

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        self._listener = listeners[0]
        self._port = self._listener.socket.getsockname()[1]
        for extra in listeners[1:]:
            extra.socket.close()
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._serve, self._listener)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            if isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
                # A plain error in the `async with` body (a failed assert, say): let it
                # propagate as it is instead of wrapped in an ExceptionGroup by the nursery.
                await self._nursery_manager.__aexit__(None, None, None)
            else:
                # Cancelled, KeyboardInterrupt, groups: the nursery must see them.
                await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            if self._listener is not None:
                self._listener.socket.close()
            self._nursery = None

    # ---- proxying --------------------------------------------------------------------

    async def _serve(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        nursery = self._nursery
        async with listener:
            while True:
                try:
                    client = await listener.accept()
                except OSError:  # e.g. EMFILE: back off a little, as trio.serve_listeners does
                    await trio.sleep(0.1)
                    continue
                self.connections += 1
                if self._down:
                    await trio.aclose_forcefully(client)
                    continue
                nursery.start_soon(self._handle, client)

    async def _handle(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._live.add(scope)
        try:
            with scope:
                if self._down:  # went down after the accept, before this task ran
                    return
                try:
                    server = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    return  # target down: the client sees its connection closed
                # Set by the server's pump, cleared by the client's: a new request is due
                answered = [True]
                async with server, trio.open_nursery() as nursery:
                    conn = nursery.cancel_scope
                    nursery.start_soon(self._pump, client, server, True, conn, answered)
                    nursery.start_soon(self._pump, server, client, False, conn, answered)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)

    async def _pump(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        to_server: bool,
        conn: trio.CancelScope,
        answered: list[bool],
    ) -> None:
        try:
            while data := await src.receive_some(_BUFSIZE):
                if to_server:
                    delay = self.latency + (self.request_latency if answered[0] else 0.0)
                    answered[0] = False
                    if delay > 0:
                        await trio.sleep(delay)
                else:
                    answered[0] = True
                await self._until_unfrozen()
                await dst.send_all(data)
            # EOF from src: pass the half-close on and let the other direction finish.
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.cancel()  # a reset on either side ends the whole connection

    async def _until_unfrozen(self) -> None:
        """Sleep until the current freeze period's open part, if the proxy freezes now."""
        if self.freeze is None:
            return
        period, open_s = self.freeze
        phase = trio.current_time() % period
        if phase >= open_s:
            await trio.sleep(period - phase)


class ProxyProcess:
    """The fault proxy in its own process (``python -m tests.support.faultproxy``), steered
    through its control file in ``workdir``; ``.port`` to connect. ``quiet``: discard its
    stderr (where it logs each change of settings)."""

    def __init__(self, target: str, workdir: Path, *, quiet: bool = True) -> None:
        self.control = workdir / f"proxy-control-{uuid.uuid4().hex[:10]}.json"
        self.set(latency=0.0, down=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.faultproxy", "--target", target,
             "--listen", "127.0.0.1:0", "--control-file", str(self.control)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.close()
            raise RuntimeError(f"fault proxy did not start (said {line!r})")
        self.port = int(line)

    def set(self, *, latency: float, down: bool, request_latency: float = 0.0,
            freeze: tuple[float, float] | None = None) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"latency": latency, "down": down,
                                   "request_latency": request_latency, "freeze": freeze}))
        tmp.rename(self.control)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ---- command line --------------------------------------------------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_control(data: Any) -> tuple[float, bool, float, tuple[float, float] | None]:
    """(latency, down, request_latency, freeze) from the control file's JSON; ValueError or
    TypeError if it is not such an object."""
    freeze = data.get("freeze")
    if freeze is not None:
        period, open_s = (float(x) for x in freeze)
        if not 0 < open_s < period:
            raise ValueError(f"freeze needs 0 < open_s < period_s, got {freeze}")
        freeze = (period, open_s)
    return (float(data.get("latency", 0) or 0), bool(data.get("down", False)),
            float(data.get("request_latency", 0) or 0), freeze)


async def _follow_control_file(proxy: FaultProxy, path: trio.Path) -> None:
    seen: tuple[float, bool, float, tuple[float, float] | None] | None = None
    while True:
        try:
            wanted = _parse_control(json.loads(await path.read_text()))
        except (OSError, ValueError, TypeError, AttributeError):
            wanted = None  # missing or half-written file: keep the current settings
        if wanted is not None and wanted != seen:
            seen = wanted
            proxy.latency, proxy.down, proxy.request_latency, proxy.freeze = wanted
            print(f"faultproxy: latency={wanted[0]:g} down={wanted[1]} "
                  f"request_latency={wanted[2]:g} freeze={wanted[3]}", file=sys.stderr)
        await trio.sleep(0.1)


async def _main(args: argparse.Namespace) -> None:
    target_host, target_port = args.target
    listen_host, listen_port = args.listen
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with FaultProxy(target_host, target_port, listen_host, listen_port) as proxy:
            print(proxy.port, flush=True)
            async with trio.open_nursery() as nursery:
                if args.control_file:
                    nursery.start_soon(_follow_control_file, proxy, trio.Path(args.control_file))
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faultproxy")
    parser.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument(
        "--control-file", help='JSON {"latency": s, "down": bool, "request_latency": s, '
        '"freeze": [period_s, open_s]}, read every 0.1 s'
    )
    trio.run(_main, parser.parse_args(argv))


if __name__ == "__main__":
    main()
