"""Integration tests of the container pool against the real Docker engine and runtime image.

Needs a running Docker engine and the image ``invoker-action-python:latest`` (deploy/images.sh).
Nothing here is skipped: without the engine or the image the tests fail.

Every test uses its own invoker id; the ``invoker_id`` fixture removes whatever is still labelled
with it at the end and fails the test if the pool left anything behind.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import docker
import docker.errors
import pytest
import trio

from invoker.containers.engine import LINE_OVERHEAD_BYTES
from invoker.containers.pool import ContainerPool, PoolConfig
from invoker.metrics import Metrics
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.networks import LABEL_NETWORK
from invoker.ownership import ProcessOwner

pytestmark = pytest.mark.integration

IMAGE = "invoker-action-python:latest"
NAMESPACE = "guest"
NETWORK = os.environ.get("INVOKER_TEST_NETWORK") or None  # set when the tests run in a container
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr): (.*)$")
TIMINGS: dict[str, list[float]] = {"cold": [], "warm": [], "prewarm": []}


@pytest.fixture(scope="session", autouse=True)
def _report_timings():
    """Prints the cold/warm/prewarm latencies observed (lease + invoke; run with -s)."""
    yield
    for kind, values in TIMINGS.items():
        if values:
            values = sorted(values)
            print(f"\n{kind}: n={len(values)} min={values[0] * 1000:.1f} ms "
                  f"median={values[len(values) // 2] * 1000:.1f} ms "
                  f"max={values[-1] * 1000:.1f} ms", end="")


@pytest.fixture(scope="session")
def dclient() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()
    client.images.get(IMAGE)  # fails (does not skip) when the image is missing
    return client


@pytest.fixture
def invoker_id(dclient: docker.DockerClient):
    iid = f"test{uuid.uuid4().hex[:8]}"
    yield iid
    left = labelled(dclient, iid)
    for c in left:
        c.remove(force=True)
    assert [c.name for c in left] == [], "the pool left containers behind"


def labelled(dclient: docker.DockerClient, iid: str) -> list[Any]:
    return dclient.containers.list(all=True, filters={"label": f"org.invoker.id={iid}"})


def exists(dclient: docker.DockerClient, name: str) -> bool:
    try:
        dclient.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


def ended_pid() -> int:
    """The pid of a process that has just ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def make_action(name: str, code: str | None, *, memory: int = 128, timeout_ms: int = 5000,
                logs_kb: int = 10, concurrency: int = 1, image: str = IMAGE,
                kind: str = "python:3", blackbox: bool = False) -> Action:
    return Action(name=name, version="0.0.1", kind=kind, image=image, code=code, main="main",
                  binary=False, blackbox=blackbox,
                  limits=Limits(timeout_ms=timeout_ms, memory_mb=memory, logs_kb=logs_kb,
                                concurrency=concurrency))


def make_activation(action: Action, params: dict[str, Any] | None = None) -> Activation:
    return Activation(activation_id=uuid.uuid4().hex, namespace=NAMESPACE, action=action,
                      params=params or {}, blocking=True, transid=uuid.uuid4().hex,
                      submitted_at_ms=None)


@asynccontextmanager
async def open_pool(invoker_id: str, **kw: Any) -> AsyncIterator[ContainerPool]:
    kw.setdefault("network", NETWORK)
    config = PoolConfig(invoker_id=invoker_id, **kw)
    async with ContainerPool.open(config, Metrics()) as pool:
        yield pool


async def invoke(pool: ContainerPool, action: Action,
                 params: dict[str, Any] | None = None) -> tuple[InvocationResult, str | None]:
    t0 = time.perf_counter()
    async with pool.lease(action, NAMESPACE) as lease:
        result = await lease.invoke(make_activation(action, params))
        name = lease.container_name
    if result.start_kind in TIMINGS:
        TIMINGS[result.start_kind].append(time.perf_counter() - t0)
    return result, name


async def wait_until(pool: ContainerPool, cond) -> None:
    with trio.fail_after(15):
        while not cond():
            with trio.move_on_after(0.02):
                await pool.wait_changed()


def texts(logs: list[str]) -> list[tuple[str, str]]:
    out = []
    for line in logs:
        m = LOG_LINE.match(line)
        assert m, f"not an OpenWhisk log line: {line!r}"
        out.append((m.group(1), m.group(2)))
    return out


# Docker timestamps each stream's lines as its own copier reads them: under a loaded machine a
# line printed at /init could be stamped after one printed to the other stream at /run a few ms
# later (the full suite saw it twice). The pause keeps the order the tests check the pool keeps.
HELLO = """
import os, sys, time
print("module loaded")
time.sleep(0.1)
def main(args):
    print("hello stdout", args.get("name"))
    print("hello stderr", args.get("name"), file=sys.stderr)
    return {"greeting": "Hello " + args.get("name", "world"),
            "activation_id": os.environ["__OW_ACTIVATION_ID"],
            "action_name": os.environ["__OW_ACTION_NAME"],
            "namespace": os.environ["__OW_NAMESPACE"],
            "deadline": os.environ["__OW_DEADLINE"]}
"""

SLEEPY = """
import os, socket, time
def main(args):
    time.sleep(args.get("sleep", 0))
    return {"host": socket.gethostname(), "pid": os.getpid()}
"""


# ----------------------------------------------------------------------------- tests
async def test_hello_world_cold_then_warm(dclient, invoker_id) -> None:
    async with open_pool(invoker_id) as pool:
        action = make_action("hello", HELLO)
        activation = make_activation(action, {"name": "Ann"})
        async with pool.lease(action, NAMESPACE) as lease:
            r1 = await lease.invoke(activation)
            name1 = lease.container_name
        assert r1.status == Status.SUCCESS, r1.result
        assert r1.result == {
            "greeting": "Hello Ann",
            "activation_id": activation.activation_id,
            "action_name": "/guest/hello",
            "namespace": "guest",
            "deadline": str(r1.start_ms + 5000),
        }
        assert r1.start_kind == "cold"
        assert isinstance(r1.init_time_ms, int) and r1.init_time_ms >= 0
        assert r1.end_ms >= r1.start_ms
        # init output belongs to the first activation; the sentinels are removed
        assert sorted(texts(r1.logs)) == [("stderr", "hello stderr Ann"),
                                          ("stdout", "hello stdout Ann"),
                                          ("stdout", "module loaded")]
        assert texts(r1.logs)[0] == ("stdout", "module loaded")
        times = [line.split(" ", 1)[0] for line in r1.logs]
        assert times == sorted(times)

        r2, name2 = await invoke(pool, action, {"name": "Bob"})
        assert r2.status == Status.SUCCESS
        assert r2.result["greeting"] == "Hello Bob"
        assert (r2.start_kind, r2.init_time_ms) == ("warm", None)
        assert name2 == name1
        assert sorted(texts(r2.logs)) == [("stderr", "hello stderr Bob"),
                                          ("stdout", "hello stdout Bob")]
        r3, _ = await invoke(pool, action, {"name": "Cy"})
        assert r3.start_kind == "warm"
        metrics = pool._metrics
        assert metrics.container_starts.labels(kind="cold")._value.get() == 1
        assert metrics.container_starts.labels(kind="warm")._value.get() == 2
        assert metrics.containers.collect()[0].samples[0].value == 1
        assert metrics.memory_used_mb.collect()[0].samples[0].value == 128
        assert [c.name for c in labelled(dclient, invoker_id)] == [name1]


async def test_init_failure(dclient, invoker_id) -> None:
    async with open_pool(invoker_id) as pool:
        action = make_action("broken", "def main(args):\n    return {\n")
        r, name = await invoke(pool, action)
        assert r.status == Status.DEVELOPER_ERROR
        error = r.result["error"]
        assert error.startswith("Initialization has failed due to: "), error
        assert "SyntaxError: '{' was never closed" in error
        assert r.start_kind == "cold"
        await wait_until(pool, lambda: pool.snapshot() == [])
        assert not exists(dclient, name)


async def test_raise_is_developer_error(dclient, invoker_id) -> None:
    code = "def main(args):\n    raise ValueError('boom')\n"
    async with open_pool(invoker_id) as pool:
        action = make_action("raiser", code)
        r, name = await invoke(pool, action)
        assert r.status == Status.DEVELOPER_ERROR
        assert r.result == {"error": "An error has occurred: ValueError: boom"}
        stderr = [t for s, t in texts(r.logs) if s == "stderr"]
        assert stderr[0] == "Traceback (most recent call last):"
        assert stderr[-1] == "ValueError: boom"
        # status 2: the runtime may be broken (as OpenWhisk), so the container is not reused
        r2, name2 = await invoke(pool, action)
        assert (r2.status, r2.start_kind) == (Status.DEVELOPER_ERROR, "cold")
        assert name2 != name
        await wait_until(pool, lambda: not exists(dclient, name))


async def test_error_field_is_application_error(dclient, invoker_id) -> None:
    code = "def main(args):\n    return {'error': 'nope', 'code': 7}\n"
    async with open_pool(invoker_id) as pool:
        r, _ = await invoke(pool, make_action("apperr", code))
        assert r.status == Status.APPLICATION_ERROR
        assert r.result == {"error": "nope", "code": 7}
        assert r.logs == []


async def test_timeout_destroys_container(dclient, invoker_id) -> None:
    async with open_pool(invoker_id) as pool:
        action = make_action("sleepy", SLEEPY, timeout_ms=1000)
        r0, name0 = await invoke(pool, action)  # warm it up so the timeout is about /run
        assert r0.status == Status.SUCCESS
        r1, name1 = await invoke(pool, action, {"sleep": 5})
        assert r1.status == Status.DEVELOPER_ERROR
        assert r1.result == {"error": "The action exceeded its time limits of 1000 milliseconds."}
        assert (r1.start_kind, name1) == ("warm", name0)
        assert 1000 <= r1.end_ms - r1.start_ms < 3000
        await wait_until(pool, lambda: pool.snapshot() == [])
        assert not exists(dclient, name1)
        r2, name2 = await invoke(pool, action)
        assert (r2.status, r2.start_kind) == (Status.SUCCESS, "cold")
        assert name2 != name1
        assert r2.result["host"] != r0.result["host"]


async def test_init_timeout_destroys_container(dclient, invoker_id) -> None:
    code = "import time\ntime.sleep(5)\ndef main(args):\n    return {}\n"
    async with open_pool(invoker_id) as pool:
        r, name = await invoke(pool, make_action("slowinit", code, timeout_ms=1000))
        assert r.status == Status.DEVELOPER_ERROR
        assert r.result == {"error": "The action exceeded its time limits of 1000 milliseconds "
                                     "during initialization."}
        assert r.start_kind == "cold" and 1000 <= r.init_time_ms < 3000
        await wait_until(pool, lambda: pool.snapshot() == [])
        assert not exists(dclient, name)


async def test_oom_killed(dclient, invoker_id) -> None:
    code = "def main(args):\n    x = bytearray(1024 * 1024 * 1024)\n    return {'n': len(x)}\n"
    async with open_pool(invoker_id) as pool:
        r, name = await invoke(pool, make_action("hog", code, memory=128, timeout_ms=20000))
        assert r.status == Status.DEVELOPER_ERROR
        assert r.result == {"error": "The action exhausted its memory and was aborted."}
        await wait_until(pool, lambda: pool.snapshot() == [])
        assert not exists(dclient, name)


async def test_result_too_large(dclient, invoker_id) -> None:
    code = "def main(args):\n    return {'x': 'a' * 300000}\n"
    async with open_pool(invoker_id, max_result_bytes=100_000) as pool:
        action = make_action("big", code)
        r, name = await invoke(pool, action)
        size = len(json.dumps({"x": "a" * 300000}, separators=(",", ":")))
        assert r.status == Status.APPLICATION_ERROR
        assert r.result == {"error": "The action produced a response that exceeded the allowed "
                                     f"length: {size} > 100000 bytes."}
        r2, name2 = await invoke(pool, action)  # the container is still usable
        assert (r2.status, r2.start_kind, name2) == (Status.APPLICATION_ERROR, "warm", name)


async def test_logs_truncated(dclient, invoker_id) -> None:
    code = """
import sys
def main(args):
    line = "y" * 99
    for _ in range(args.get("lines", 0)):
        print(line)
    print("after", args.get("lines"))
    return {}
"""
    async with open_pool(invoker_id) as pool:
        action = make_action("chatty", code, logs_kb=10, timeout_ms=20000)
        r, name = await invoke(pool, action, {"lines": 52_429})  # 5 MiB
        assert r.status == Status.SUCCESS
        assert r.logs[-1] == ("Logs were truncated because the total bytes size exceeds the "
                              "limit of 10240 bytes.")
        kept = texts(r.logs[:-1])
        assert kept == [("stdout", "y" * 99)] * (10240 // (99 + LINE_OVERHEAD_BYTES))
        # the next activation in the same container sees only its own lines
        r2, name2 = await invoke(pool, action, {"lines": 0})
        assert (r2.start_kind, name2) == ("warm", name)
        assert texts(r2.logs) == [("stdout", "after 0")]


async def test_missing_images(dclient, invoker_id) -> None:
    async with open_pool(invoker_id) as pool:
        blackbox = make_action("bb", None, image="invoker-test-no-such-image:nope",
                               kind="blackbox", blackbox=True)
        r, name = await invoke(pool, blackbox)
        assert r.status == Status.DEVELOPER_ERROR
        assert r.result == {
            "error": "Failed to start container: image invoker-test-no-such-image:nope not found"
        }
        runtime = make_action("rt", "def main(a): return a", image="invoker-test-no-runtime:x")
        r2, _ = await invoke(pool, runtime)
        assert r2.status == Status.INTERNAL_ERROR
        assert r2.result == {
            "error": "Failed to start container: image invoker-test-no-runtime:x not found"
        }
        assert pool.snapshot() == []
        assert pool.used_memory_mb == 0
        # a blackbox action whose image exists runs like any other
        present = make_action("bb2", "def main(a):\n    return {'bb': True}\n", image=IMAGE,
                              kind="blackbox", blackbox=True)
        r3, _ = await invoke(pool, present)
        assert (r3.status, r3.result, r3.start_kind) == (Status.SUCCESS, {"bb": True}, "cold")


async def test_concurrency_two_share_a_container(dclient, invoker_id) -> None:
    async with open_pool(invoker_id) as pool:
        action = make_action("shared", SLEEPY, concurrency=2)
        results: list[InvocationResult] = []
        async with pool.lease(action, NAMESPACE) as l1, pool.lease(action, NAMESPACE) as l2:
            assert l1.container_name == l2.container_name
            running = 0
            peak = 0

            async def go(lease) -> None:
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                results.append(await lease.invoke(make_activation(action, {"sleep": 0.5})))
                running -= 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go, l1)
                nursery.start_soon(go, l2)
        assert peak == 2
        assert [r.status for r in results] == [Status.SUCCESS, Status.SUCCESS], results
        assert results[0].result == results[1].result  # same host, same process
        assert sorted(r.start_kind for r in results) == ["cold", "warm"]
        assert [r.logs for r in results] == [
            ["Logs are not collected for actions with concurrency > 1."]] * 2
        # the two /run calls overlapped inside the one container
        first, second = sorted(results, key=lambda r: r.start_ms)
        assert second.start_ms < first.end_ms
        assert len(labelled(dclient, invoker_id)) == 1


async def test_memory_bound_fifo_and_lru_eviction(dclient, invoker_id) -> None:
    order: list[str] = []
    async with open_pool(invoker_id, user_memory_mb=256) as pool:
        a = make_action("a", SLEEPY)
        b = make_action("b", SLEEPY)
        done = {"w3": trio.Event(), "w4": trio.Event()}
        used: dict[str, str | None] = {}

        async def waiter(name: str) -> None:
            async with pool.lease(a, NAMESPACE) as lease:
                order.append(f"{name} got")
                used[name] = lease.container_name
                r = await lease.invoke(make_activation(a))
                assert (r.status, r.start_kind) == (Status.SUCCESS, "warm")
                await done[name].wait()
            order.append(f"{name} released")

        async with trio.open_nursery() as nursery:
            l1, l2 = pool.lease(a, NAMESPACE), pool.lease(a, NAMESPACE)
            lease1 = await l1.__aenter__()
            lease2 = await l2.__aenter__()
            ra = await lease1.invoke(make_activation(a))
            rb = await lease2.invoke(make_activation(a))
            assert (ra.start_kind, rb.start_kind) == ("cold", "cold")
            assert pool.used_memory_mb == 256
            nursery.start_soon(waiter, "w3")
            await wait_until(pool, lambda: pool.waiting == 1)
            nursery.start_soon(waiter, "w4")
            await wait_until(pool, lambda: pool.waiting == 2)
            assert order == []
            assert len(labelled(dclient, invoker_id)) == 2
            order.append("release 1")
            await l1.__aexit__(None, None, None)
            await wait_until(pool, lambda: len(order) == 2)
            assert pool.waiting == 1
            order.append("release 2")
            await l2.__aexit__(None, None, None)
            await wait_until(pool, lambda: len(order) == 4)
            assert order == ["release 1", "w3 got", "release 2", "w4 got"]
            assert used == {"w3": lease1.container_name, "w4": lease2.container_name}
            done["w3"].set()
            await wait_until(pool, lambda: order[-1] == "w3 released")
            done["w4"].set()
        assert len(labelled(dclient, invoker_id)) == 2

        # Both 'a' containers are idle now; w4's (lease2's) was released last. A different
        # action evicts the least recently used one and the other stays warm.
        assert len(pool.snapshot()) == 2
        lru = lease1.container_name
        mru = lease2.container_name
        rb, name_b = await invoke(pool, b)
        assert (rb.status, rb.start_kind) == (Status.SUCCESS, "cold")
        assert not exists(dclient, lru)
        assert exists(dclient, mru)
        assert sorted(c.name for c in labelled(dclient, invoker_id)) == sorted([mru, name_b])
        assert pool.used_memory_mb == 256


async def test_leftovers_removed_on_open(dclient, invoker_id) -> None:
    leftover = dclient.containers.create(
        IMAGE, name=f"{invoker_id}-0-leftover",
        labels={"org.invoker.managed": "true", "org.invoker.id": invoker_id,
                "org.invoker.action": "old"},
        **({"network": NETWORK} if NETWORK else {}),
    )
    leftover.start()
    other_id = f"{invoker_id}x"
    other = dclient.containers.create(
        IMAGE, name=f"{other_id}-0-other",
        labels={"org.invoker.managed": "true", "org.invoker.id": other_id},
    )
    # Other ids on this host: a live process's containers stay, an ended one's are removed.
    me = ProcessOwner.current()
    live, dead = (
        dclient.containers.create(
            IMAGE, name=f"{other_id}-{n}-{what}",
            labels={"org.invoker.managed": "true", "org.invoker.id": f"{other_id}{n}",
                    **dataclasses.replace(me, pid=pid).labels()})
        for n, what, pid in ((1, "live", me.pid), (2, "dead", ended_pid()))
    )
    try:
        async with open_pool(invoker_id):
            assert not exists(dclient, leftover.name)
            assert exists(dclient, other.name)  # another invoker's containers are not ours
            assert exists(dclient, live.name)
            assert not exists(dclient, dead.name)
    finally:
        for c in (other, live, dead):
            if exists(dclient, c.name):
                c.remove(force=True)


async def test_prewarm_and_exit_removes_everything(dclient, invoker_id) -> None:
    async with open_pool(invoker_id, prewarm={"python:3": 1}, prewarm_memory_mb=256,
                         reaper_interval_s=0.05) as pool:
        await wait_until(pool, lambda: [c["phase"] for c in pool.snapshot()] == ["stem"])
        action = make_action("hello", HELLO, memory=128)
        r, name = await invoke(pool, action, {"name": "Pre"})
        assert (r.status, r.start_kind) == (Status.SUCCESS, "prewarm")
        assert isinstance(r.init_time_ms, int)
        assert sorted(texts(r.logs)) == [("stderr", "hello stderr Pre"),
                                         ("stdout", "hello stdout Pre"),
                                         ("stdout", "module loaded")]
        # the stem cell got the action's memory limit, and a new stem cell replaces it
        host = dclient.containers.get(name).attrs["HostConfig"]
        assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
        await wait_until(pool, lambda: sorted(c["phase"] for c in pool.snapshot())
                         == ["ready", "stem"])
        assert pool.used_memory_mb == 128 + 256
        r2, _ = await invoke(pool, make_action("other", SLEEPY))
        assert r2.start_kind == "prewarm"
        names = {c.name for c in labelled(dclient, invoker_id)}
        assert len(names) >= 2
    assert labelled(dclient, invoker_id) == []
    assert not any(exists(dclient, n) for n in names)


async def test_idle_containers_reaped(dclient, invoker_id) -> None:
    async with open_pool(invoker_id, idle_timeout_s=0.3, reaper_interval_s=0.05) as pool:
        r, name = await invoke(pool, make_action("brief", SLEEPY))
        assert r.status == Status.SUCCESS
        await wait_until(pool, lambda: pool.snapshot() == [])
        assert not exists(dclient, name)
        assert pool._metrics.containers.collect()[0].samples[0].value == 0
        assert pool._metrics.memory_used_mb.collect()[0].samples[0].value == 0


async def test_hardening(dclient, invoker_id) -> None:
    code = """
import os
def main(args):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    try:
        open("/etc/owned", "w").close()
        root_writable = True
    except OSError:
        root_writable = False
    with open("/tmp/scratch", "w") as fh:
        fh.write("ok")
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
            "no_new_privs": status["NoNewPrivs"].strip(), "root_writable": root_writable}
"""
    async with open_pool(invoker_id, pids_limit=64, cpus=0.5) as pool:
        r, name = await invoke(pool, make_action("probe/me", code, memory=128))
        assert r.status == Status.SUCCESS, r.result
        assert r.result["uid"] != 0 and r.result["euid"] != 0
        assert r.result["cap_eff"] == "0000000000000000"
        assert r.result["cap_bnd"] == "0000000000000000"
        assert r.result["no_new_privs"] == "1"
        assert r.result["root_writable"] is False
        attrs = dclient.containers.get(name).attrs
        host = attrs["HostConfig"]
        assert not host.get("CapAdd")
        assert host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
        assert host["PidsLimit"] == 64
        assert host["NanoCpus"] == 500_000_000
        assert host["Privileged"] is False
        assert host["ReadonlyRootfs"] is True
        assert not host.get("Binds")
        assert attrs["Mounts"] == []
        assert not host["PortBindings"]  # reached at its address, never through the host
        labels = attrs["Config"]["Labels"]
        assert labels["org.invoker.managed"] == "true"
        assert labels["org.invoker.id"] == invoker_id
        assert labels["org.invoker.action"] == "probe/me"
        assert re.fullmatch(rf"{invoker_id}-\d+-probe_me", name)


REACH = """
import os, socket
def main(args):
    with open(os.path.join(os.environ["HOME"], "scratch"), "w") as fh:
        fh.write("home is writable")
    out = {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ["HOME"]}
    for label, host in args.get("targets", []):
        if host == "self":
            host = socket.gethostbyname(socket.gethostname())
        sock = socket.socket()
        sock.settimeout(1.0)
        try:
            sock.connect((host, 8080))
            out[label] = "connected"
        except OSError as exc:
            out[label] = type(exc).__name__
        finally:
            sock.close()
    return out
"""


def action_networks(dclient: docker.DockerClient, iid: str) -> dict[str, Any]:
    """The per-container networks labelled with invoker id ``iid``, by name."""
    found = dclient.networks.list(filters={"label": [f"org.invoker.id={iid}",
                                                     LABEL_NETWORK]})
    return {n.name: n for n in found}


async def test_network_mode_gives_each_container_a_network_of_its_own(dclient, invoker_id):
    """The daemon-in-a-container set-up (the pool's process joins each link network when it
    runs in a container; on the host, as here, it reaches every bridge directly): no published
    ports; each container on an internal link network of its own and on the shared egress
    network (inter-container traffic off); an action cannot reach another one on either; a
    link network goes with its container. The Python runtime runs as 65534 with HOME=/action,
    a tmpfs of that uid."""
    group = f"invoker-test-{uuid.uuid4().hex[:8]}"
    try:
        async with open_pool(invoker_id, network=group) as pool:
            target_result, target = await invoke(pool, make_action("target", REACH))
            assert target_result.status is Status.SUCCESS, target_result.result
            assert target_result.result == {"uid": 65534, "gid": 65534, "home": "/action"}
            attrs = dclient.containers.get(target).attrs
            assert sorted(attrs["NetworkSettings"]["Networks"]) == sorted([target, group])
            assert not attrs["HostConfig"].get("PortBindings")
            target_ip = attrs["NetworkSettings"]["Networks"][target]["IPAddress"]
            target_egress_ip = attrs["NetworkSettings"]["Networks"][group]["IPAddress"]
            link = dclient.networks.get(target).attrs
            assert link["Internal"] is True
            assert link["Labels"][LABEL_NETWORK] == group
            assert link["Labels"]["org.invoker.id"] == invoker_id
            subnet = ipaddress.ip_network(link["IPAM"]["Config"][0]["Subnet"])
            assert subnet.prefixlen == 29
            assert subnet.subnet_of(ipaddress.ip_network(PoolConfig("x").subnet_pool))
            assert ipaddress.ip_address(target_ip) in subnet
            egress = dclient.networks.get(group).attrs
            assert egress["Options"]["com.docker.network.bridge.enable_icc"] == "false"

            probe, prober = await invoke(pool, make_action("prober", REACH), {
                "targets": [["self", "self"], ["other action", target_ip],
                            ["other action, egress", target_egress_ip]]})
            assert probe.status is Status.SUCCESS, probe.result
            assert probe.result["self"] == "connected"  # the probe itself works
            for way in ("other action", "other action, egress"):
                assert probe.result[way] in ("TimeoutError", "ConnectionRefusedError"), way
            assert exists(dclient, target)  # not reaped meanwhile: it was there to be reached
            assert set(action_networks(dclient, invoker_id)) == {target, prober}

            # a timeout destroys the container; its network follows
            slow, victim = await invoke(pool, make_action("slow", SLEEPY, timeout_ms=300),
                                        {"sleep": 5})
            assert slow.status is Status.DEVELOPER_ERROR
            await wait_until(pool, lambda: victim not in action_networks(dclient, invoker_id))
            assert set(action_networks(dclient, invoker_id)) == {target, prober}
        assert action_networks(dclient, invoker_id) == {}  # closing removed the rest
    finally:
        for network in [*action_networks(dclient, invoker_id).values(),
                        *dclient.networks.list(names=[group])]:
            network.remove()


async def test_network_mode_removes_leftover_networks(dclient, invoker_id):
    """Per-container networks of an earlier run with this invoker id, or of a process of this
    host that has ended, are removed at open; another live invoker's are kept."""
    owner = ProcessOwner.current()
    tag = uuid.uuid4().hex[:8]
    labels = {"org.invoker.managed": "true", LABEL_NETWORK: f"invoker-test-{tag}"}
    ours = dclient.networks.create(f"test-{tag}-ours", labels={
        **labels, "org.invoker.id": invoker_id})
    ended = dclient.networks.create(f"test-{tag}-ended", labels={
        **labels, "org.invoker.id": f"ended{tag}",
        **dataclasses.replace(owner, pid=ended_pid(), start="").labels()})
    alive = dclient.networks.create(f"test-{tag}-alive", labels={
        **labels, "org.invoker.id": f"alive{tag}", **owner.labels()})
    group = f"invoker-test-{tag}"
    try:
        async with open_pool(invoker_id, network=group):
            names = {n.name for n in dclient.networks.list(filters={"label": LABEL_NETWORK})}
            assert ours.name not in names and ended.name not in names
            assert alive.name in names
    finally:
        for network in (ours, ended, alive, *dclient.networks.list(names=[group])):
            try:
                network.remove()
            except docker.errors.NotFound:
                pass  # removed by the pool, as it should be
