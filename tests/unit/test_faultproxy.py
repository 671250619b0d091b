"""The fault proxy's timing modes (tests/support/faultproxy.py), against a real TCP server:
``request_latency`` delays each request once whatever its chunks, ``freeze`` passes bytes only
in the open part of each period."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from tests.support.faultproxy import FaultProxy, _parse_control


async def _answer_lines(stream: trio.SocketStream) -> None:
    """A request/response server: each line received is answered with ``ok\\n``."""
    buffered = b""
    async with stream:
        while data := await stream.receive_some(1024):
            buffered += data
            while b"\n" in buffered:
                _, buffered = buffered.split(b"\n", 1)
                await stream.send_all(b"ok\n")


@asynccontextmanager
async def _proxied_stream() -> AsyncIterator[tuple[FaultProxy, trio.SocketStream]]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _answer_lines, 0,
                                                host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with FaultProxy("127.0.0.1", port) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                yield proxy, stream
        nursery.cancel_scope.cancel()


async def _read_answer(stream: trio.SocketStream) -> None:
    with trio.fail_after(10):
        assert await stream.receive_some(1024) == b"ok\n"


async def test_request_latency_delays_each_request_once_not_each_chunk() -> None:
    async with _proxied_stream() as (proxy, stream):
        proxy.request_latency = 0.3
        for _ in range(2):  # the second request is delayed again: the server answered between
            start = trio.current_time()
            for part in (b"pa", b"rt", b"s\n"):  # three chunks: 0.9 s if delayed per chunk
                await stream.send_all(part)
                await trio.sleep(0.05)
            await _read_answer(stream)
            elapsed = trio.current_time() - start
            assert 0.3 <= elapsed < 0.6


async def test_freeze_passes_bytes_only_in_the_open_part_of_each_period() -> None:
    period, open_s = 1.0, 0.2
    async with _proxied_stream() as (proxy, stream):
        proxy.freeze = (period, open_s)
        waits = []
        for _ in range(4):
            await trio.sleep(0.35)  # start at different phases of the period
            start = trio.current_time()
            await stream.send_all(b"ping\n")
            await _read_answer(stream)
            answered = trio.current_time()
            waits.append(answered - start)
            assert answered % period < open_s + 0.05  # (+ scheduling slack)
        assert max(waits) > 0.3  # some request arrived while frozen and waited for the opening
        proxy.freeze = None
        start = trio.current_time()
        await stream.send_all(b"ping\n")
        await _read_answer(stream)
        assert trio.current_time() - start < 0.3  # a frozen period would hold it 0.8 s


@pytest.mark.parametrize("freeze", [[1.0, 1.0], [1.0, 0.0], [2.0], "ab"])
def test_control_file_rejects_a_freeze_that_never_opens_or_closes(freeze: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        _parse_control({"latency": 0, "down": False, "freeze": freeze})


def test_control_file_settings() -> None:
    assert _parse_control({"latency": 0.5, "down": True}) == (0.5, True, 0.0, None)
    assert _parse_control({"request_latency": 0.2, "freeze": [5, 0.1]}) == (
        0.0, False, 0.2, (5.0, 0.1))
