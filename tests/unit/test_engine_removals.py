"""DockerBackend removes containers one at a time (Docker 20.10 can deadlock when endpoints
leave a network at once, see DockerBackend.__init__), while its other calls, disconnects
included, still run side by side."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace

import trio

from invoker.containers.engine import DockerBackend


class SlowApi:
    """The docker SDK's low-level calls the test makes, each taking 50 ms; counts how many of
    each kind run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    def _take_a_while(self, kind: str) -> None:
        with self._lock:
            self._now[kind] += 1
            self.most[kind] = max(self.most[kind], self._now[kind])
        time.sleep(0.05)
        with self._lock:
            self._now[kind] -= 1

    def remove_container(self, container_id: str, force: bool, v: bool) -> None:
        self._take_a_while("removal")

    def disconnect_container_from_network(self, container_id: str, network: str,
                                          force: bool) -> None:
        self._take_a_while("other")

    def inspect_container(self, container_id: str) -> dict:
        self._take_a_while("other")
        return {"State": {"Running": True}}


async def test_removals_go_one_at_a_time_other_calls_do_not_wait():
    api = SlowApi()
    backend = DockerBackend(SimpleNamespace(api=api), threads=8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(backend.remove, f"c{i}")
            nursery.start_soon(backend.disconnect_network, f"net{i}", "daemon")
            nursery.start_soon(backend.state, f"c{i}")
    assert api.most["removal"] == 1
    assert api.most["other"] > 1
