"""Pure-logic tests of the container pool and the runtime protocol (no Docker, no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import structlog.testing
import trio
import trio.lowlevel

from invoker.containers import pool as pool_module
from invoker.containers.engine import (
    CollectedLogs,
    ContainerState,
    DockerError,
    LabelledContainer,
    LogLine,
    StartedContainer,
    since_param,
)
from invoker.containers.pool import ContainerPool, PoolConfig
from invoker.containers.runtime import (
    MSG_ABNORMAL,
    Deadlines,
    RuntimeResponse,
    encode_body,
    init_body,
    interpret_init,
    interpret_run,
    run_body,
    truncated_result,
)
from invoker.metrics import Metrics
from invoker.model import Action, Activation, Limits, RawJson, Status
from invoker.ownership import ProcessOwner

IMAGE = "invoker-action-python:latest"
NAMESPACE = "guest"


def make_action(name: str = "a", memory: int = 128, concurrency: int = 1,
                kind: str = "python:3", code: str = "def main(a): return a") -> Action:
    return Action(name=name, version="0.0.1", kind=kind, image=IMAGE, code=code,
                  main="main", binary=False,
                  limits=Limits(timeout_ms=5000, memory_mb=memory, logs_kb=10,
                                concurrency=concurrency))


def make_activation(action: Action, n: int = 0, namespace: str = NAMESPACE,
                    **params: Any) -> Activation:
    return Activation(activation_id=f"act{n}", namespace=namespace, action=action,
                      params={"n": n, **params}, blocking=True, transid=f"tid{n}",
                      submitted_at_ms=None)


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
    # Params kept encoded go into the body as they are.
    raw = {**body, "value": RawJson('{"n":3,"s":"é"}'.encode())}
    assert json.loads(encode_body(raw)) == {**body, "value": {"n": 3, "s": "é"}}
    assert encode_body({"value": RawJson(b"{}")}) == b'{"value":{}}'
    assert encode_body(body) == json.dumps(body, separators=(",", ":")).encode()


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
        self.leftovers: list[LabelledContainer] = []
        self.refuse_removal = False  # Docker answers every removal with an error
        self.remove_calls = 0

    async def create(self, spec: Any) -> str:
        await trio.lowlevel.checkpoint()
        self.n += 1
        self.created.append(spec)
        return f"id{self.n}"

    async def start(self, cid: str, network: str | None) -> StartedContainer:
        await trio.lowlevel.checkpoint()
        return StartedContainer(f"http://fake/{cid}", log_path="")  # logs: collect_logs

    async def remove(self, cid: str) -> None:
        await trio.sleep(0.01)
        self.remove_calls += 1
        if self.refuse_removal:
            raise DockerError("removal refused")
        self.removed.append(cid)

    async def state(self, cid: str) -> ContainerState:
        return ContainerState(running=True)

    async def wait_stopped(self, cid: str, timeout_s: float) -> ContainerState:
        return ContainerState(running=False)

    async def update_memory(self, cid: str, memory_mb: int) -> None:
        self.updated.append((cid, memory_mb))

    async def list_labelled(self, label: str, value: str) -> list[LabelledContainer]:
        return [c for c in self.leftovers if c.labels.get(label) == value]

    async def collect_logs(self, cid: str, **kw: Any) -> CollectedLogs:
        return CollectedLogs(complete=True)

    async def aclose(self) -> None:
        pass


class FakeConnection:
    def __init__(self, base_url: str, init_gates: dict[str, trio.Event]) -> None:
        self.base_url = base_url
        self._init_gates = init_gates

    async def probe(self, timeout_s: float) -> bool:
        return True

    async def post(self, path: str, payload: dict[str, Any], *,
                   timeout_s: float | None = None) -> RuntimeResponse:
        await trio.lowlevel.checkpoint()
        if path == "/init":
            if (gate := self._init_gates.get(payload["value"]["code"])) is not None:
                await gate.wait()  # /init runs until the test sets it
            if "init fails" in payload["value"]["code"]:
                return RuntimeResponse(502, b'{"error":"bad code"}')
            return RuntimeResponse(200, b'{"ok":true}')
        params = payload["value"]
        if params.get("hang"):
            await trio.sleep_forever()
        if "gate" in params:  # a trio.Event: runs until the test sets it
            await params["gate"].wait()
        if "respond" in params:  # [HTTP status, body]
            return RuntimeResponse(params["respond"][0], params["respond"][1].encode())
        return RuntimeResponse(200, json.dumps({"url": self.base_url}).encode())

    async def aclose(self) -> None:
        pass


class FakeClient:
    max_result_bytes = 1000

    def __init__(self) -> None:
        self.deadlines = Deadlines()  # never given a request: the fake's have no time limit
        self.init_gates: dict[str, trio.Event] = {}  # by action code

    def connect(self, base_url: str) -> FakeConnection:
        return FakeConnection(base_url, self.init_gates)

    async def aclose(self) -> None:
        pass


def open_pool(backend: FakeBackend, client: FakeClient | None = None, **kw: Any):
    cfg = PoolConfig(invoker_id="unit", **kw)
    return ContainerPool._open_with(cfg, Metrics(), backend, client or FakeClient())


def gauge(g: Any) -> float:
    """A gauge's value as scraped (pool gauges are computed then)."""
    return g.collect()[0].samples[0].value


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
        async with pool.lease(action, NAMESPACE) as lease:
            r1 = await lease.invoke(make_activation(action, 1))
        async with pool.lease(action, NAMESPACE) as lease:
            r2 = await lease.invoke(make_activation(action, 2))
        assert (r1.status, r1.start_kind, r2.start_kind) == (Status.SUCCESS, "cold", "warm")
        assert r1.init_time_ms is not None and r2.init_time_ms is None
        assert r1.result == r2.result == {"url": "http://fake/id1"}
        assert gauge(pool._metrics.containers) == 1
        assert gauge(pool._metrics.memory_used_mb) == 128
        assert pool._metrics.container_starts.labels(kind="cold")._value.get() == 1
        assert pool._metrics.container_starts.labels(kind="warm")._value.get() == 1
    assert backend.removed == ["id1"]


async def test_a_waiter_for_a_starting_container_gets_free_memory_once_it_is_ready() -> None:
    client = FakeClient()
    a, b = make_action("a", memory=256, code="code of a"), make_action("b", code="code of b")
    starting = trio.Event(), trio.Event()
    client.init_gates.update({a.code: starting[0], b.code: starting[1]})
    running = trio.Event()

    async def run(action: Action, n: int) -> None:
        async with pool.lease(action, NAMESPACE) as lease:
            await lease.invoke(make_activation(action, n, gate=running))

    async with open_pool(FakeBackend(), client, user_memory_mb=512) as pool, \
            trio.open_nursery() as nursery:
        nursery.start_soon(run, a, 1)
        nursery.start_soon(run, b, 2)
        await wait_until(pool, lambda: len(pool._scheduler.records) == 2)
        await trio.sleep(0.15)  # b's container is expected ready before a new one would be
        nursery.start_soon(run, b, 3)
        await wait_until(pool, lambda: pool.waiting == 1)
        for init in starting:
            init.set()
        # Both ready and busy, 128 MB free: the second b gets a container of its own, with no
        # other arrival or release needed to look at the queue again.
        await wait_until(pool, lambda: len(pool._scheduler.records) == 3)
        assert pool.waiting == 0
        running.set()


async def test_oversized_action_does_not_block() -> None:
    async with open_pool(FakeBackend(), user_memory_mb=256) as pool:
        action = make_action(memory=512)
        with trio.fail_after(1):
            async with pool.lease(action, NAMESPACE) as lease:
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
            async with pool.lease(action, NAMESPACE) as lease:
                order.append(name)
                await lease.invoke(make_activation(action))
                await release[name].wait()

        async with trio.open_nursery() as nursery:
            l1 = pool.lease(a, NAMESPACE)
            l2 = pool.lease(a, NAMESPACE)
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
            async with pool.lease(action, NAMESPACE) as lease:
                await lease.invoke(make_activation(action))
        async with pool.lease(a1, NAMESPACE) as lease:  # a1 becomes most recently used
            assert (await lease.invoke(make_activation(a1))).start_kind == "warm"
        async with pool.lease(b, NAMESPACE) as lease:
            r = await lease.invoke(make_activation(b))
        assert r.start_kind == "cold"
        assert backend.removed == ["id2"]  # a2's container, the least recently used
        names = sorted(c["name"] for c in pool.snapshot())
        assert names == ["unit-1-a1", "unit-3-b"]


async def test_concurrency_shares_container() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action(concurrency=2)
        async with pool.lease(action, NAMESPACE) as l1, pool.lease(action, NAMESPACE) as l2:
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
        async with pool.lease(a, NAMESPACE) as lease:
            await lease.invoke(make_activation(a))
            with trio.move_on_after(0.05):
                async with pool.lease(make_action("b"), NAMESPACE):
                    pytest.fail("must not be granted")
            assert pool.waiting == 0
        async with pool.lease(a, NAMESPACE) as lease:
            assert (await lease.invoke(make_activation(a))).start_kind == "warm"


async def test_prewarm_used_shrunk_and_replenished() -> None:
    backend = FakeBackend()
    async with open_pool(backend, prewarm={"python:3": 1}, prewarm_memory_mb=256,
                         reaper_interval_s=0.01) as pool:
        await wait_until(pool, lambda: [c["phase"] for c in pool.snapshot()] == ["stem"])
        action = make_action(memory=128)
        async with pool.lease(action, NAMESPACE) as lease:
            r = await lease.invoke(make_activation(action))
        assert r.start_kind == "prewarm"
        assert backend.updated == [("id1", 128)]
        await wait_until(pool, lambda: sorted(c["phase"] for c in pool.snapshot())
                         == ["ready", "stem"])
        assert pool.used_memory_mb == 128 + 256
        assert backend.created[0].labels["org.invoker.kind"] == "python:3"


async def test_stem_cells_are_started_one_at_a_time() -> None:
    backend = FakeBackend()
    gate = trio.Event()
    create = backend.create

    async def slow_create(spec: Any) -> str:
        await gate.wait()
        return await create(spec)

    backend.create = slow_create  # type: ignore[method-assign]
    async with open_pool(backend, prewarm={"python:3": 3}, prewarm_memory_mb=128,
                         reaper_interval_s=0.01) as pool:
        await trio.sleep(0.1)  # ten reaper turns
        assert [c["phase"] for c in pool.snapshot()] == ["starting"]
        gate.set()
        await wait_until(pool, lambda: [c["phase"] for c in pool.snapshot()] == ["stem"] * 3)
        assert backend.n == 3


async def test_idle_reaper() -> None:
    backend = FakeBackend()
    async with open_pool(backend, idle_timeout_s=0.05, reaper_interval_s=0.01) as pool:
        action = make_action()
        async with pool.lease(action, NAMESPACE) as lease:
            await lease.invoke(make_activation(action))
        await wait_until(pool, lambda: not pool.snapshot())
        assert backend.removed == ["id1"]
        assert pool.used_memory_mb == 0


def ended_pid() -> int:
    """The pid of a process that has just ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_leftovers_removed_on_open() -> None:
    backend = FakeBackend()
    me = ProcessOwner.current()
    ours = {"org.invoker.managed": "true", "org.invoker.id": "unit"}

    def owned_by(**changes: Any) -> dict[str, str]:
        return dataclasses.replace(me, **changes).labels()

    backend.leftovers = [
        LabelledContainer("old1", "unit-1-x", ours),
        LabelledContainer("old2", "unit-2-y", {**ours, **owned_by()}),  # our id: removed
        # another invoker id on this host: removed only when its process has ended
        LabelledContainer("dead", "other-1-x", owned_by(pid=ended_pid())),
        LabelledContainer("reused", "other-2-x", owned_by(start=me.start + "0")),
        LabelledContainer("alive", "other-3-x", owned_by()),
        LabelledContainer("parent", "other-4-x", owned_by(pid=os.getppid(), start="")),
        LabelledContainer("elsewhere", "other-5-x", owned_by(host=me.host + "x",
                                                              pid=ended_pid())),
        LabelledContainer("other-ns", "other-6-x", owned_by(pid_namespace="pid:[1]",
                                                             pid=ended_pid())),
    ]
    async with open_pool(backend):
        assert sorted(backend.removed) == ["dead", "old1", "old2", "reused"]


async def test_leftover_removal_retried_then_fails_open(monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "LEFTOVER_RETRY_S", 0.01)
    backend = FakeBackend()
    backend.leftovers = [LabelledContainer("old1", "unit-1-x", {"org.invoker.id": "unit"})]
    backend.refuse_removal = True  # e.g. another daemon removing it: "already in progress"
    with pytest.raises(DockerError, match="1 leftover container.s. not removed: unit-1-x: "
                                          "removal refused"):
        async with open_pool(backend):
            pytest.fail("must not open")
    assert backend.remove_calls == pool_module.LEFTOVER_REMOVE_ATTEMPTS


def test_process_owner() -> None:
    me = ProcessOwner.current()
    assert me.pid == os.getpid() and me.host and me.start
    assert me.pid_namespace.startswith("pid:[")
    assert not me.left_behind(me.labels())
    assert not me.left_behind({})
    for pid in ("0", "-1", "x", str(2**70)):  # never a process group, never an error
        labels = {**me.labels(), "org.invoker.pid": pid, "org.invoker.pid-start": ""}
        assert not me.left_behind(labels)


async def test_cancelled_run_destroys_container() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action()
        async with pool.lease(action, NAMESPACE) as lease:
            activation = make_activation(action)
            hanging = Activation(activation_id="h", namespace=NAMESPACE, action=action,
                                 params={"hang": True}, blocking=True, transid="t",
                                 submitted_at_ms=None)
            await lease.invoke(activation)
            with trio.move_on_after(0.05):
                await lease.invoke(hanging)
        await wait_until(pool, lambda: not pool.snapshot())
        assert backend.removed == ["id1"]
        async with pool.lease(action, NAMESPACE) as lease:
            assert (await lease.invoke(make_activation(action))).start_kind == "cold"


# ------------------------------------------------- tenants, code, failed containers
async def run_once(pool: ContainerPool, action: Action, namespace: str = NAMESPACE,
                   **params: Any) -> tuple[Any, str | None]:
    async with pool.lease(action, namespace) as lease:
        result = await lease.invoke(make_activation(action, namespace=namespace, **params))
        return result, lease.container_name


async def test_containers_per_namespace_and_code() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action("shared-name")
        ra, name_a = await run_once(pool, action, "tenanta")
        rb, name_b = await run_once(pool, action, "tenantb")
        assert (ra.start_kind, rb.start_kind) == ("cold", "cold")
        assert name_a != name_b  # same action name, version and code: still not shared
        assert [spec.labels["org.invoker.namespace"] for spec in backend.created] == [
            "tenanta", "tenantb"]
        # an equal action (a new object, as each message decodes one) reuses the container
        again, name = await run_once(pool, make_action("shared-name"), "tenanta")
        assert (again.start_kind, name) == ("warm", name_a)
        # new code under the same name and version: a new container
        changed = make_action("shared-name", code="def main(a): return {'v': 2}")
        rc, name_c = await run_once(pool, changed, "tenanta")
        assert rc.start_kind == "cold" and name_c not in (name_a, name_b)
        # so does a new memory limit (fixed per container)
        bigger, name_d = await run_once(pool, make_action("shared-name", memory=256), "tenanta")
        assert bigger.start_kind == "cold" and name_d not in (name_a, name_b, name_c)
        assert len(backend.created) == 4
        labels = backend.created[0].labels
        assert labels["org.invoker.pid"] == str(os.getpid())
        assert labels["org.invoker.host"] == ProcessOwner.current().host


async def test_code_digest_covers_what_init_receives() -> None:
    action = make_action()
    same = make_action()
    assert action.code_digest == same.code_digest and len(action.code_digest) == 64
    variants = [dataclasses.replace(action, **change) for change in (
        {"code": "def main(a): return {}"}, {"main": "other"}, {"binary": True},
        {"image": "other:1"}, {"kind": "python:3.12"}, {"code": None}, {"code": ""})]
    digests = {v.code_digest for v in variants} | {action.code_digest}
    assert len(digests) == len(variants) + 1
    assert make_action(code="x\ud800").code_digest  # a lone surrogate from JSON still hashes
    assert action.pool_key("a") != action.pool_key("b")
    assert action.pool_key("a") == same.pool_key("a")


@pytest.mark.parametrize(("respond", "status", "reused"), [
    ([200, '{"error": "app says no"}'], Status.APPLICATION_ERROR, True),
    ([502, '{"error": "runtime says no"}'], Status.DEVELOPER_ERROR, False),
    ([200, "not json"], Status.DEVELOPER_ERROR, False),
    ([403, '{"error": "System not ready"}'], Status.DEVELOPER_ERROR, False),
])
async def test_container_destroyed_after_developer_error(respond, status, reused) -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action()
        failed, name1 = await run_once(pool, action, respond=respond)
        assert failed.status == status
        after, name2 = await run_once(pool, action)
        assert after.status == Status.SUCCESS
        if reused:
            assert (after.start_kind, name2, backend.removed) == ("warm", name1, [])
        else:
            assert after.start_kind == "cold" and name2 != name1
            await wait_until(pool, lambda: backend.removed == ["id1"])
            assert [c["name"] for c in pool.snapshot()] == [name2]


async def test_init_failure_destroys_container() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action(code="init fails")
        r, name = await run_once(pool, action)
        assert (r.status, r.result) == (Status.DEVELOPER_ERROR, {"error": "bad code"})
        await wait_until(pool, lambda: backend.removed == ["id1"])
        assert pool.snapshot() == [] and pool.used_memory_mb == 0


async def test_concurrent_container_removed_after_its_other_activations() -> None:
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        action = make_action(concurrency=3)
        gate = trio.Event()
        results: dict[str, Any] = {}

        async def slow(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with pool.lease(action, NAMESPACE) as lease:
                task_status.started(lease.container_name)
                results["slow"] = await lease.invoke(make_activation(action, 1, gate=gate))
                results["slow given back"] = pool.snapshot()[0]["active"]

        async with trio.open_nursery() as nursery:
            container = await nursery.start(slow)
            await wait_until(pool, lambda: pool.snapshot()[0]["phase"] == "ready")
            failed, name = await run_once(pool, action,
                                          respond=[502, '{"error": "broken"}'])
            assert (failed.status, name) == (Status.DEVELOPER_ERROR, container)
            # not leasable any more, but not removed while "slow" still runs in it
            assert [(c["name"], c["phase"], c["active"]) for c in pool.snapshot()] == [
                (container, "retiring", 1)]
            fresh, fresh_name = await run_once(pool, action)
            assert fresh.start_kind == "cold" and fresh_name != container
            await trio.sleep(0.05)
            assert backend.removed == []
            gate.set()
        assert results["slow"].status == Status.SUCCESS
        assert results["slow"].result == {"url": "http://fake/id1"}
        assert results["slow given back"] == 0  # at once after invoke, before leaving lease()
        await wait_until(pool, lambda: backend.removed == ["id1"])
        assert [c["name"] for c in pool.snapshot()] == [fresh_name]


async def test_lease_reused_after_its_container_was_destroyed() -> None:
    async with open_pool(FakeBackend()) as pool:
        action = make_action()
        async with pool.lease(action, NAMESPACE) as lease:
            r1 = await lease.invoke(make_activation(action, respond=[502, '{"error": "x"}']))
            r2 = await lease.invoke(make_activation(action))
        assert r1.status == r2.status == Status.DEVELOPER_ERROR
        # its slot went back with the destroyed container: no second run in it
        assert (r2.result, r2.start_kind) == ({"error": MSG_ABNORMAL}, "none")


async def test_memory_counted_until_removal_confirmed(monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "REMOVE_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(pool_module, "REMOVE_RETRY_MAX_S", 0.02)
    backend = FakeBackend()
    async with open_pool(backend, user_memory_mb=128) as pool:
        a, b = make_action("a"), make_action("b")
        backend.refuse_removal = True
        failed, _ = await run_once(pool, a, respond=[502, '{"error": "x"}'])
        assert failed.status == Status.DEVELOPER_ERROR
        granted = trio.Event()

        async def other() -> None:
            async with pool.lease(b, NAMESPACE) as lease:
                granted.set()
                assert (await lease.invoke(make_activation(b))).status == Status.SUCCESS

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await wait_until(pool, lambda: backend.remove_calls >= 5)
            # removal keeps failing: the container may still run, its memory stays counted
            assert [c["phase"] for c in pool.snapshot()] == ["removing"]
            assert pool.used_memory_mb == 128 and pool.waiting == 1
            assert not granted.is_set()
            backend.refuse_removal = False
            await wait_until(pool, granted.is_set)
        assert backend.removed[0] == "id1"


async def test_closing_tries_a_refused_removal_once_more(monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "REMOVE_RETRY_FIRST_S", 3600.0)
    backend = FakeBackend()
    async with open_pool(backend) as pool:
        backend.refuse_removal = True
        await run_once(pool, make_action(), respond=[502, '{"error": "x"}'])
        await wait_until(pool, lambda: backend.remove_calls == 1)
        assert pool.used_memory_mb == 128
        backend.refuse_removal = False
    assert backend.removed == ["id1"]


def test_default_invoker_id_is_unique_per_process() -> None:
    from invoker.config import Config

    mine = Config().invoker_id
    other = subprocess.run(
        [sys.executable, "-c", "from invoker.config import Config; print(Config().invoker_id)"],
        check=True, capture_output=True, text=True).stdout.strip()
    assert mine.endswith(f"-{os.getpid()}") and other.startswith("invoker-")
    assert mine != other and mine.rsplit("-", 1)[0] == other.rsplit("-", 1)[0]


def test_an_answer_longer_once_encoded_again_is_truncated_at_the_limit() -> None:
    """What is kept is the answer encoded again; 1e15 becomes 1000000000000000.0 (4.5 times
    longer), so a body under the limit may not be under it any more."""
    body = b'{"a":[' + b",".join([b"1e15"] * 100) + b"]}"
    encoded_length = len(b'{"a":[' + b",".join([b"1000000000000000.0"] * 100) + b"]}")
    assert len(body) < 1000 < encoded_length
    assert interpret_run(RuntimeResponse(200, body), 1000) == truncated_result(encoded_length,
                                                                               1000)
    status, result = interpret_run(RuntimeResponse(200, body), encoded_length)
    assert status is Status.SUCCESS and result["a"] == [1e15] * 100
    status, result = interpret_run(RuntimeResponse(502, b'{"error":[' + body + b"]}"), 1000)
    assert status is Status.DEVELOPER_ERROR and "exceeded the allowed length" in result["error"]


async def test_a_shutdown_deadline_that_cuts_removals_short_says_what_is_left() -> None:
    class SlowRemovals(FakeBackend):
        async def remove(self, cid: str) -> None:
            await trio.sleep(10)
            await super().remove(cid)

    backend = SlowRemovals()
    with structlog.testing.capture_logs() as logs:
        async with open_pool(backend) as pool:
            action = make_action()
            async with pool.lease(action, NAMESPACE) as lease:
                await lease.invoke(make_activation(action, 1))
            pool.close_deadline = trio.current_time() + 0.1
    assert backend.removed == []
    (warning,) = [e for e in logs if e["event"].startswith("the shutdown deadline passed")]
    assert (warning["log_level"], warning["containers_left"]) == ("warning", 1)
