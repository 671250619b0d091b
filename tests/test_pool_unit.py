"""Pure-logic tests of the container pool and the runtime protocol (no Docker, no network)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.lowlevel

from invoker.docker_backend import CollectedLogs, ContainerState, LogLine, since_param
from invoker.metrics import Metrics
from invoker.model import Action, Activation, Limits, Status
from invoker.pool import ContainerPool, PoolConfig
from invoker.runtime_client import (
    RuntimeResponse,
    init_body,
    interpret_init,
    interpret_run,
    run_body,
)

IMAGE = "invoker-action-python:latest"


def make_action(name: str = "a", memory: int = 128, concurrency: int = 1,
                kind: str = "python:3") -> Action:
    return Action(name=name, version="0.0.1", kind=kind, image=IMAGE, code="def main(a): return a",
                  main="main", binary=False,
                  limits=Limits(timeout_ms=5000, memory_mb=memory, logs_kb=10,
                                concurrency=concurrency))


def make_activation(action: Action, n: int = 0) -> Activation:
    return Activation(activation_id=f"act{n}", namespace="guest", action=action,
                      params={"n": n}, blocking=True, transid=f"tid{n}", submitted_at_ms=None)


# ---------------------------------------------------------------- protocol rules
def test_interpret_run_success_and_application_error() -> None:
    assert interpret_run(RuntimeResponse(200, b'{"a":1}'), 100) == (Status.SUCCESS, {"a": 1})
    assert interpret_run(RuntimeResponse(200, b'{"error":"x","b":2}'), 100) == (
        Status.APPLICATION_ERROR, {"error": "x", "b": 2})


def test_interpret_run_developer_errors() -> None:
    assert interpret_run(RuntimeResponse(502, b'{"error":"boom","x":1}'), 100) == (
        Status.DEVELOPER_ERROR, {"error": "boom"})
    assert interpret_run(RuntimeResponse(500, b"oops"), 100) == (
        Status.DEVELOPER_ERROR, {"error": "The action did not produce a valid response: oops"})
    assert interpret_run(RuntimeResponse(502, b'{"x":1}'), 100) == (
        Status.DEVELOPER_ERROR,
        {"error": 'The action did not produce a valid response: {"x":1}'})
    assert interpret_run(RuntimeResponse(200, b"[1,2]"), 100) == (
        Status.DEVELOPER_ERROR,
        {"error": "The action did not produce a valid JSON response: [1,2]"})
    assert interpret_run(RuntimeResponse(200, b"nope"), 100) == (
        Status.DEVELOPER_ERROR,
        {"error": "The action did not produce a valid JSON response: nope"})


def test_interpret_run_truncated() -> None:
    assert interpret_run(RuntimeResponse(200, b"", True, 5000), 1000) == (
        Status.APPLICATION_ERROR,
        {"error": "The action produced a response that exceeded the allowed length: "
                  "5000 > 1000 bytes."})


def test_interpret_init() -> None:
    assert interpret_init(RuntimeResponse(200, b'{"ok":true}'), 100) is None
    assert interpret_init(RuntimeResponse(502, b'{"error":"bad code"}'), 100) == (
        Status.DEVELOPER_ERROR, {"error": "bad code"})
    assert interpret_init(RuntimeResponse(500, b"crash"), 100) == (
        Status.DEVELOPER_ERROR, {"error": "The action failed during initialization: crash"})


def test_bodies() -> None:
    action = make_action("hello")
    assert init_body(action, "https://api") == {"value": {
        "name": "hello", "main": "main", "binary": False, "code": "def main(a): return a",
        "env": {"__OW_API_HOST": "https://api"}}}
    assert init_body(action)["value"]["env"] == {}
    body = run_body(make_activation(action, 3), 1234)
    assert body == {"value": {"n": 3}, "namespace": "guest", "action_name": "/guest/hello",
                    "action_version": "0.0.1", "activation_id": "act3",
                    "transaction_id": "tid3", "deadline": "1234"}


def test_log_formatting() -> None:
    line = LogLine("2024-05-01T10:00:00.123456789Z", "stdout", "hi")
    assert line.formatted() == "2024-05-01T10:00:00.123456789Z stdout: hi"
    assert since_param(1_700_000_000_000_000_005) == "1700000000.000000005"


# ---------------------------------------------------------------- fakes
class FakeBackend:
    def __init__(self) -> None:
        self.n = 0
        self.created: list[Any] = []
        self.removed: list[str] = []
        self.updated: list[tuple[str, int]] = []
        self.leftovers: list[tuple[str, str]] = []

    async def create(self, spec: Any) -> str:
        await trio.lowlevel.checkpoint()
        self.n += 1
        self.created.append(spec)
        return f"id{self.n}"

    async def start(self, cid: str, network: str | None) -> str:
        await trio.lowlevel.checkpoint()
        return f"http://fake/{cid}"

    async def remove(self, cid: str) -> None:
        await trio.sleep(0.01)
        self.removed.append(cid)

    async def state(self, cid: str) -> ContainerState:
        return ContainerState(running=True)

    async def wait_stopped(self, cid: str, timeout_s: float) -> ContainerState:
        return ContainerState(running=False)

    async def update_memory(self, cid: str, memory_mb: int) -> None:
        self.updated.append((cid, memory_mb))

    async def list_labelled(self, invoker_id: str) -> list[tuple[str, str]]:
        return list(self.leftovers)

    async def collect_logs(self, cid: str, **kw: Any) -> CollectedLogs:
        return CollectedLogs(complete=True)

    async def aclose(self) -> None:
        pass


class FakeConnection:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def probe(self, timeout_s: float) -> bool:
        return True

    async def post(self, path: str, payload: dict[str, Any]) -> RuntimeResponse:
        await trio.lowlevel.checkpoint()
        if path == "/init":
            return RuntimeResponse(200, b'{"ok":true}')
        if payload["value"].get("hang"):
            await trio.sleep_forever()
        return RuntimeResponse(200, json.dumps({"url": self.base_url}).encode())

    async def aclose(self) -> None:
        pass


class FakeClient:
    max_result_bytes = 1000

    def connect(self, base_url: str) -> FakeConnection:
        return FakeConnection(base_url)

    async def aclose(self) -> None:
        pass


def open_pool(backend: FakeBackend, **kw: Any):
    cfg = PoolConfig(invoker_id="unit", **kw)
    return ContainerPool._open_with(cfg, Metrics(), backend, FakeClient())


async def wait_until(pool: ContainerPool, cond) -> None:
    with trio.fail_after(5):
        while not cond():
            with trio.move_on_after(0.01):  # cond may depend on test tasks, not only the pool
                await pool.wait_changed()


# ---------------------------------------------------------------- pool logic
async def test_cold_then_warm_and_metrics() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action()
        async with pool.lease(action) as lease:
            r1 = await lease.invoke(make_activation(action, 1))
        async with pool.lease(action) as lease:
            r2 = await lease.invoke(make_activation(action, 2))
        assert (r1.status, r1.start_kind, r2.start_kind) == (Status.SUCCESS, "cold", "warm")
        assert r1.init_time_ms is not None and r2.init_time_ms is None
        assert r1.result == r2.result == {"url": "http://fake/id1"}
        assert pool._metrics.containers._value.get() == 1
        assert pool._metrics.memory_used_mb._value.get() == 128
        assert pool._metrics.container_starts.labels(kind="cold")._value.get() == 1
        assert pool._metrics.container_starts.labels(kind="warm")._value.get() == 1
    assert backend.removed == ["id1"]


async def test_oversized_action_does_not_block() -> None:
    async with open_pool(FakeBackend(), user_memory_mb=256) as pool:
        action = make_action(memory=512)
        with trio.fail_after(1):
            async with pool.lease(action) as lease:
                r = await lease.invoke(make_activation(action))
        assert r.status == Status.DEVELOPER_ERROR
        assert r.start_kind == "none"
        assert r.result == {"error": "The action requires 512 MB of memory but this invoker has "
                                     "only 256 MB for actions."}


async def test_memory_bound_fifo() -> None:
    backend = FakeBackend()
    order: list[str] = []
    async with open_pool(backend, user_memory_mb=256) as pool:
        a = make_action("a")
        b = make_action("b")
        release = {name: trio.Event() for name in ("w3", "w4", "w5")}

        async def waiter(name: str, action: Action) -> None:
            async with pool.lease(action) as lease:
                order.append(name)
                await lease.invoke(make_activation(action))
                await release[name].wait()

        async with trio.open_nursery() as nursery:
            l1 = pool.lease(a)
            l2 = pool.lease(a)
            lease1 = await l1.__aenter__()
            lease2 = await l2.__aenter__()
            await lease1.invoke(make_activation(a, 1))
            await lease2.invoke(make_activation(a, 2))
            assert pool.used_memory_mb == 256
            nursery.start_soon(waiter, "w3", a)
            await wait_until(pool, lambda: pool.waiting == 1)
            nursery.start_soon(waiter, "w4", b)  # needs memory: waits behind w3
            await wait_until(pool, lambda: pool.waiting == 2)
            nursery.start_soon(waiter, "w5", a)  # could share nothing, queues behind (FIFO)
            await wait_until(pool, lambda: pool.waiting == 3)
            assert order == []
            await l1.__aexit__(None, None, None)  # w3 takes the idle warm container of a
            await wait_until(pool, lambda: order == ["w3"])
            assert pool.waiting == 2
            await l2.__aexit__(None, None, None)  # idle a container is evicted for w4 (b)
            await wait_until(pool, lambda: order == ["w3", "w4"])
            assert len(backend.removed) == 1
            assert pool.used_memory_mb == 256
            release["w3"].set()  # w5 gets w3's warm container
            await wait_until(pool, lambda: order == ["w3", "w4", "w5"])
            release["w4"].set()
            release["w5"].set()


async def test_lru_idle_eviction() -> None:
    backend = FakeBackend()
    async with open_pool(backend, user_memory_mb=256) as pool:
        a1, a2, b = make_action("a1"), make_action("a2"), make_action("b")
        for action in (a1, a2):
            async with pool.lease(action) as lease:
                await lease.invoke(make_activation(action))
        async with pool.lease(a1) as lease:  # a1 becomes most recently used
            assert (await lease.invoke(make_activation(a1))).start_kind == "warm"
        async with pool.lease(b) as lease:
            r = await lease.invoke(make_activation(b))
        assert r.start_kind == "cold"
        assert backend.removed == ["id2"]  # a2's container, the least recently used
        names = sorted(c["name"] for c in pool.snapshot())
        assert names == ["unit-1-a1", "unit-3-b"]


async def test_concurrency_shares_container() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action(concurrency=2)
        async with pool.lease(action) as l1, pool.lease(action) as l2:
            assert l1.container_name == l2.container_name
            results = []

            async def go(lease, n):
                results.append(await lease.invoke(make_activation(action, n)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go, l1, 1)
                nursery.start_soon(go, l2, 2)
        assert sorted(r.start_kind for r in results) == ["cold", "warm"]
        assert all(r.logs == ["Logs are not collected for actions with concurrency > 1."]
                   for r in results)
        assert len(backend.created) == 1


async def test_cancelled_waiter_leaves_queue() -> None:
    async with open_pool(FakeBackend(), user_memory_mb=128) as pool:
        a = make_action()
        async with pool.lease(a) as lease:
            await lease.invoke(make_activation(a))
            with trio.move_on_after(0.05):
                async with pool.lease(make_action("b")):
                    pytest.fail("must not be granted")
            assert pool.waiting == 0
        async with pool.lease(a) as lease:
            assert (await lease.invoke(make_activation(a))).start_kind == "warm"


async def test_prewarm_used_shrunk_and_replenished() -> None:
    backend = FakeBackend()
    async with open_pool(backend, prewarm={"python:3": 1}, prewarm_memory_mb=256,
                         reaper_interval_s=0.01) as pool:
        await wait_until(pool, lambda: [c["phase"] for c in pool.snapshot()] == ["stem"])
        action = make_action(memory=128)
        async with pool.lease(action) as lease:
            r = await lease.invoke(make_activation(action))
        assert r.start_kind == "prewarm"
        assert backend.updated == [("id1", 128)]
        await wait_until(pool, lambda: sorted(c["phase"] for c in pool.snapshot())
                         == ["ready", "stem"])
        assert pool.used_memory_mb == 128 + 256
        assert backend.created[0].labels["org.invoker.kind"] == "python:3"


async def test_idle_reaper() -> None:
    backend = FakeBackend()
    async with open_pool(backend, idle_timeout_s=0.05, reaper_interval_s=0.01) as pool:
        action = make_action()
        async with pool.lease(action) as lease:
            await lease.invoke(make_activation(action))
        await wait_until(pool, lambda: not pool.snapshot())
        assert backend.removed == ["id1"]
        assert pool.used_memory_mb == 0


async def test_leftovers_removed_on_open() -> None:
    backend = FakeBackend()
    backend.leftovers = [("old1", "unit-1-x"), ("old2", "unit-2-y")]
    async with open_pool(backend):
        assert sorted(backend.removed) == ["old1", "old2"]


async def test_cancelled_run_destroys_container() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action()
        async with pool.lease(action) as lease:
            activation = make_activation(action)
            hanging = Activation(activation_id="h", namespace="guest", action=action,
                                 params={"hang": True}, blocking=True, transid="t",
                                 submitted_at_ms=None)
            await lease.invoke(activation)
            with trio.move_on_after(0.05):
                await lease.invoke(hanging)
        await wait_until(pool, lambda: not pool.snapshot())
        assert backend.removed == ["id1"]
        async with pool.lease(action) as lease:
            assert (await lease.invoke(make_activation(action))).start_kind == "cold"
