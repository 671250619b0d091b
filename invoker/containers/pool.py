"""The container pool: concurrency slots backed by Docker containers, bounded by memory.

A *lease* is one concurrency slot in one container (existing, reserved, or a prewarmed stem
cell). It is held until the caller leaves ``lease()`` — after the activation record has been
enqueued — and only then can another activation use that slot.

Accounting: ``used memory`` is the sum of the memory limits of every container record the pool
holds: busy, idle, prewarm stem cells, containers being started, memory reserved for a
container not created yet, and containers being removed (until Docker confirms the removal).
It never exceeds ``user_memory_mb``; the physical sum of limits of live containers is always
at most the accounted sum.

Who is served first, what is started and what is evicted is decided by
:class:`~invoker.containers.scheduler.Scheduler` (pure; see its module docstring); the pool does
what it decides with Docker: it creates reserved containers on their first invoke, removes the
evicted ones, and serves a waiter once its slot or memory is there.

Reuse: a container serves only activations with its ``PoolKey`` (see ``invoker.model``): one
namespace, one action and version, the same code digest and limits. A container never serves
two tenants, and changed code under the same name and version gets a new container.

Destroying: after a timeout, an OOM kill, a lost connection, or status 2 or 3 from ``/init`` or
``/run`` (as OpenWhisk's ``ActivationResponse.isContainerError``: a runtime that failed may stay
broken, e.g. the Node.js one answers every later ``/run`` with 403) a container is never leased
again. It is removed once no activation uses it any more: other activations running in a
concurrent container finish first, and the activation that failed gives its slot back as soon
as its ``invoke`` returns. A removal Docker refuses is retried in the background with capped
backoff (one task per container) until Docker confirms it; the memory stays counted until then,
and closing the pool tries once more.

Leftovers: each container is labelled with the invoker id and with the process that created it
(host name, pid namespace, pid, start time; ``invoker.ownership``). Opening a pool removes the
containers labelled with its invoker id (an id set explicitly, e.g. by a restarted service
keeping its id) and those whose creating process, on this host and in this pid namespace, no
longer runs (a crashed predecessor with another id, e.g. the default ``invoker-<host>-<pid>``).
Other ids' containers of a process that still runs, of another host or of another pid namespace
are never touched, so two daemons on one host (distinct ids: the default one is unique per
process) never remove each other's containers. Setting one explicit id on two daemons that share
an engine breaks this, as it always did.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog
import trio

from invoker.containers.engine import (
    LABEL_ACTION,
    LABEL_HOST,
    LABEL_ID,
    LABEL_KIND,
    LABEL_MANAGED,
    LABEL_NAMESPACE,
    CollectedLogs,
    ContainerSpec,
    DockerBackend,
    DockerError,
    ImageNotFound,
    LabelledContainer,
)
from invoker.containers.logs import ContainerLog
from invoker.containers.runtime import (
    MSG_ABNORMAL,
    MSG_INIT_TIMEOUT,
    MSG_LOGS_CONCURRENT,
    MSG_LOGS_FAILED,
    MSG_LOGS_TRUNCATED,
    MSG_OOM,
    MSG_TIMEOUT,
    ConnectionLost,
    DeadlinePassed,
    RuntimeClient,
    init_body,
    interpret_init,
    interpret_run,
    run_body,
)
from invoker.containers.scheduler import (
    ASSIGNED,
    DESTROYED,
    INITIALIZING,
    NEW,
    READY,
    REMOVING,
    RETIRING,
    STARTING,
    STEM,
    ContainerRecord,
    Scheduler,
    Waiter,
)
from invoker.metrics import Metrics
from invoker.model import Action, Activation, InvocationResult, PoolKey, RawJson, Status, now_ms
from invoker.networks import LABEL_NETWORK, ActionNetworks
from invoker.ownership import ProcessOwner

logger = structlog.get_logger(__name__)

LOG_COLLECT_TIMEOUT_S = 2.0  # waiting for the sentinels after /run
LOG_GRAB_TIMEOUT_S = 1.0  # reading what a failed/killed container logged (no sentinels)
STOP_WAIT_S = 2.0  # after a lost connection, how long to wait for the container to stop
# A removal Docker refused is retried after 1 s, 2 s, 4 s ... at most 30 s apart, until it works.
REMOVE_RETRY_FIRST_S = 1.0
REMOVE_RETRY_MAX_S = 30.0
# At open another daemon may be removing the same leftover ("already in progress"): retried
# 0.5 s, then 1 s later.
LEFTOVER_REMOVE_ATTEMPTS = 3
LEFTOVER_RETRY_S = 0.5
# Stem cells are started one at a time (the next when one is ready): refilling the prewarm
# pool must not take the CPU from running actions in a burst of `docker run`s.
PREWARM_STARTS_AT_ONCE = 1
_PROBE_INTERVAL_MAX_S = 0.1
_STATE_CHECK_EVERY_S = 0.25


@dataclass(frozen=True)
class PoolConfig:
    invoker_id: str  # label value; containers are named/labelled with it
    user_memory_mb: int = 2048  # sum of container memory limits never exceeds this
    idle_timeout_s: float = 600.0  # idle containers removed after this
    prewarm: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    prewarm_memory_mb: int = 256
    kind_images: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"python:3": "invoker-action-python:latest"})
    )
    # Networks (invoker.networks): None: host mode, every container on shared_network
    # (inter-container traffic off), reached at its address there. A name: network mode,
    # each container on a network of its own (a /29 of subnet_pool), labelled with the name.
    network: str | None = None
    shared_network: str = "invoker-actions"
    subnet_pool: str = "10.213.0.0/16"
    pids_limit: int = 128
    cpus: float = 1.0  # nano_cpus per container
    max_result_bytes: int = 1_048_576
    max_json_depth: int = 64  # nesting of results; deeper is a developer error
    init_timeout_s: float = 30.0  # wait for a cold container to accept connections
    # How runtimes run: the uid:gid, the tmpfs paths it may write and exec from (ActionLoop
    # runtimes write the action under /action/<n>/ and exec it), and kind_runtime's overrides
    # of these per kind ("blackbox" for blackbox images), with extra env: see RuntimeSettings.
    user: str = "65534:65534"
    exec_tmpfs: tuple[str, ...] = ("/action",)
    kind_runtime: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))
    # Additions (defaults keep the behaviour described above):
    read_only_root: bool = True  # read-only root fs with a tmpfs /tmp
    tmpfs_mb: int = 64
    api_host: str | None = None  # __OW_API_HOST in the /init env, when set
    docker_threads: int = 8  # CapacityLimiter for blocking docker SDK calls
    reaper_interval_s: float | None = None  # default: min(1 s, idle_timeout_s / 4)

    def runtime(self, kind: str) -> RuntimeSettings:
        """The settings containers of ``kind`` run with (validated by the daemon's Config)."""
        override = self.kind_runtime.get(kind) or {}
        return RuntimeSettings(
            user=override.get("user", self.user),
            exec_tmpfs=tuple(override.get("exec_tmpfs", self.exec_tmpfs)),
            env=MappingProxyType(dict(override.get("env") or {})),
        )


@dataclass(frozen=True)
class RuntimeSettings:
    """How the containers of one kind run."""

    user: str  # "uid:gid"
    exec_tmpfs: tuple[str, ...]  # tmpfs paths owned by that uid, mounted exec
    env: Mapping[str, str]  # extra environment variables of the container


async def _say_how_logs_are_read(backend: DockerBackend) -> None:
    """Log at start whether activation logs come from the engine's json-file logs (one file
    read per activation) or, when those cannot be read, through the Docker API (a request per
    activation)."""
    try:
        directory = await backend.containers_dir()
    except DockerError as exc:
        logger.warning("engine info unavailable; container logs are read from their log files "
                       "where possible", error=str(exc))
        return
    if os.access(directory, os.R_OK | os.X_OK):
        logger.info("container logs read from their json-file logs", directory=directory)
    else:
        logger.warning("container logs read through the Docker API (slower): the engine's "
                       "containers directory cannot be read here; mount it read-only at the same "
                       "path to read their log files", directory=directory)


def _sanitize(name: str, max_len: int = 40) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9_.-]+", "_", name).strip("_.-")
    return (cleaned or "action")[:max_len]


def _result_without_run(message: str) -> InvocationResult:
    """A developer error for an activation that never reached a usable container."""
    now = now_ms()
    return InvocationResult(status=Status.DEVELOPER_ERROR, result={"error": message},
                            start_ms=now, end_ms=now, start_kind="none")


class Lease:
    """One concurrency slot. ``invoke`` never raises for action faults.

    The slot is given back when ``lease()`` is left, or as soon as ``invoke`` returns if the
    container was destroyed meanwhile: its removal then waits only for the activations still
    running in it, not for this one's record to be delivered.
    """

    def __init__(self, pool: ContainerPool, action: Action, container: ContainerRecord | None,
                 granted: float = 0.0):
        self._pool = pool
        self.action = action
        self._container = container
        self._granted = granted  # trio clock
        self._holds_slot = container is not None

    @property
    def container_name(self) -> str | None:
        return self._container.name if self._container else None

    def _give_back(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            assert self._container is not None
            self._pool._release(self._container, self._granted)

    async def invoke(self, activation: Activation) -> InvocationResult:
        pool = self._pool
        c = self._container
        try:
            if c is not None and not self._holds_slot:
                result = _result_without_run(MSG_ABNORMAL)  # destroyed by an earlier invoke
            else:
                result = await pool._invoke(c, activation)
                if c is not None and c.phase in DESTROYED:
                    self._give_back()
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - never raise for an activation
            logger.exception("invoke failed", activation_id=activation.activation_id)
            now = now_ms()
            result = InvocationResult(
                status=Status.INTERNAL_ERROR,
                result={"error": f"Internal error: {type(exc).__name__}: {exc}"},
                start_ms=now,
                end_ms=now,
                start_kind="none",
            )
        pool._starts[result.start_kind].inc()
        return result


class Leasing:
    """What :meth:`ContainerPool.lease` returns. A class rather than an async generator
    (``asynccontextmanager``), whose machinery cost more than the lease itself on every
    activation."""

    __slots__ = ("_pool", "_action", "_namespace", "_lease")

    def __init__(self, pool: ContainerPool, action: Action, namespace: str) -> None:
        self._pool = pool
        self._action = action
        self._namespace = namespace
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._pool._acquire(self._action, self._namespace)
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lease is not None:
            self._lease._give_back()


class ContainerPool:
    def __init__(
        self,
        config: PoolConfig,
        metrics: Metrics,
        backend: DockerBackend,
        client: RuntimeClient,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._backend = backend
        self._client = client
        self._owner = ProcessOwner.current()  # labels every container (see _labels_for)
        self._scheduler = Scheduler(
            config.user_memory_mb, self._evict,
            name_for=lambda seq, label: f"{config.invoker_id}-{seq}-{_sanitize(label)}",
            labels_for=self._labels_for)
        self._docker_ids: set[str] = set()  # created by this pool and not yet removed
        self._nursery: trio.Nursery | None = None
        self._networks: ActionNetworks | None = None  # set by _open_with (None: unmanaged)
        self._closed = False
        self._changed = trio.Event()  # set (and replaced) on every state change; for tests
        self._stages = metrics.stage
        self._starts = {kind: metrics.container_starts.labels(kind=kind)
                        for kind in ("cold", "prewarm", "warm", "none")}
        records = self._scheduler.records
        metrics.containers.set_function(lambda: sum(1 for c in records if c.docker_id))
        metrics.stem_cells.set_function(lambda: sum(1 for c in records if c.phase == STEM))
        metrics.memory_used_mb.set_function(lambda: self._scheduler.used_memory_mb)
        self._warned_log_files = False  # a container's log file could not be opened
        # When closing must be done (trio clock): the daemon sets its shutdown deadline here.
        self.close_deadline = math.inf

    # ------------------------------------------------------------------ opening
    @classmethod
    @asynccontextmanager
    async def open(cls, config: PoolConfig, metrics: Metrics) -> AsyncIterator[ContainerPool]:
        backend = await DockerBackend.connect(threads=config.docker_threads)
        await _say_how_logs_are_read(backend)
        client = RuntimeClient(config.max_result_bytes)
        async with cls._open_with(config, metrics, backend, client,
                                  manage_networks=True) as pool:
            yield pool

    @classmethod
    @asynccontextmanager
    async def _open_with(
        cls, config: PoolConfig, metrics: Metrics, backend: Any, client: Any,
        *, manage_networks: bool = False,
    ) -> AsyncIterator[ContainerPool]:
        """``open`` with the Docker backend and runtime client given (unit tests use fakes).
        Without ``manage_networks`` containers join ``config.network`` (None: Docker's
        default bridge) as it is, and nothing isolates them (the fakes have no networks)."""
        pool = cls(config, metrics, backend, client)
        networks = pool._networks = ActionNetworks(
            backend, invoker_id=config.invoker_id, owner=pool._owner, group=config.network,
            shared_name=config.shared_network, subnet_pool=config.subnet_pool,
        ) if manage_networks else None
        try:
            await pool._remove_leftovers()
            if networks is not None:
                await networks.open()  # after the leftover containers: frees their networks
            async with trio.open_nursery() as nursery:
                pool._nursery = nursery
                pool._replenish_stems()
                nursery.start_soon(pool._reaper)
                nursery.start_soon(client.deadlines.run)
                if networks is not None and networks.per_container:
                    nursery.start_soon(pool._release_networks, networks)
                try:
                    yield pool
                finally:
                    pool._closed = True
                    nursery.cancel_scope.cancel()
        finally:
            pool._closed = True
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = min(pool.close_deadline, trio.current_time() + 60)
                await pool._remove_all()
                if networks is not None:
                    await networks.release_all()
                await client.aclose()
                await backend.aclose()
            if scope.cancelled_caught:  # the next start removes what is left, as leftovers
                logger.warning("the shutdown deadline passed before the action containers and "
                               "their networks were all removed",
                               containers_left=len(pool._docker_ids))

    async def _release_networks(self, networks: ActionNetworks) -> None:
        """Removes each per-container network once its container is gone: looked at after
        every change of the pool, and every second (to retry what Docker refused)."""
        assert self._nursery is not None
        while True:
            with trio.move_on_after(1.0):
                await self.wait_changed()
            for name in networks.gone(self._docker_ids):
                self._nursery.start_soon(networks.release, name)

    async def _remove_leftovers(self) -> None:
        """Remove what an earlier run left (see the module docstring). Raises DockerError."""
        leftovers: dict[str, tuple[LabelledContainer, str]] = {}
        for c in await self._backend.list_labelled(LABEL_HOST, self._owner.host):
            if self._owner.left_behind(c.labels):
                leftovers[c.id] = (c, "its process has ended")
        for c in await self._backend.list_labelled(LABEL_ID, self.config.invoker_id):
            leftovers[c.id] = (c, "our invoker id")
        if not leftovers:
            return
        failures: list[str] = []
        async with trio.open_nursery() as nursery:
            for c, why in leftovers.values():
                logger.info("removing leftover container", container=c.name, id=c.id[:12],
                            because=why)
                nursery.start_soon(self._remove_leftover, c, failures)
        if failures:
            # Not ours to count, maybe running: starting anyway could overcommit memory.
            raise DockerError(f"{len(failures)} leftover container(s) not removed: "
                              f"{failures[0]}")
        logger.info("leftover containers removed", count=len(leftovers),
                    invoker_id=self.config.invoker_id)

    async def _remove_leftover(self, c: LabelledContainer, failures: list[str]) -> None:
        for attempt in range(1, LEFTOVER_REMOVE_ATTEMPTS + 1):
            try:
                await self._backend.remove(c.id)
                return
            except DockerError as exc:
                if attempt == LEFTOVER_REMOVE_ATTEMPTS:
                    failures.append(f"{c.name}: {str(exc)[:200]}")
                    return
            await trio.sleep(LEFTOVER_RETRY_S * attempt)

    async def _remove_all(self) -> None:
        ids = set(self._docker_ids)  # every container created and not yet removed

        async def rm(cid: str) -> None:
            try:
                await self._backend.remove(cid)
            except DockerError as exc:
                logger.warning("removing container failed; a pool opened later removes it "
                               "as a leftover", id=cid[:12], error=str(exc)[:200])
            self._docker_ids.discard(cid)

        async with trio.open_nursery() as nursery:
            for cid in ids:
                nursery.start_soon(rm, cid)
            for c in self._scheduler.records:
                nursery.start_soon(self._close_conn, c)
        for c in list(self._scheduler.records):
            self._scheduler.forget(c)
            c.init_done.set()
        self._update_gauges()
        logger.debug("pool closed", removed=len(ids))

    # ---------------------------------------------------------------- accounting
    @property
    def used_memory_mb(self) -> int:
        return self._scheduler.used_memory_mb

    @property
    def free_memory_mb(self) -> int:
        return self._scheduler.free_memory_mb

    def snapshot(self) -> list[dict[str, Any]]:
        """What the pool holds (GET /status groups it by action; tests). Never blocks."""
        return [
            {"name": c.name, "phase": c.phase, "memory_mb": c.memory_mb, "active": c.active,
             "pool_key": c.pool_key, "kind": c.kind, "docker_id": c.docker_id}
            for c in self._scheduler.records
        ]

    @property
    def waiting(self) -> int:
        return len(self._scheduler.waiters)

    def _update_gauges(self) -> None:
        """Wake whoever waits for a change (the gauges are computed when scraped)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _labels_for(self, pool_key: PoolKey | None) -> dict[str, str]:
        labels = self._owner.labels()
        if pool_key is not None:  # for operators: whose code it runs
            labels[LABEL_NAMESPACE] = pool_key.namespace
        return labels

    def _drop(self, c: ContainerRecord) -> None:
        """``c`` is gone (or was never created): its memory is free for waiters."""
        self._scheduler.forget(c)
        c.init_done.set()
        self._changed_state()

    def _changed_state(self) -> None:
        """Memory or containers changed: serve whom that lets in, update the gauges."""
        if not self._closed:
            self._scheduler.assign()
        self._update_gauges()

    # -------------------------------------------------------------------- leases
    def lease(self, action: Action, namespace: str) -> Leasing:
        """``async with pool.lease(action, namespace) as lease``: a slot in a container that
        serves only ``action`` run for ``namespace``, given back when the block is left.

        Entering waits until a slot is free (see :mod:`invoker.containers.scheduler` for who is
        served first; cancel to give up). The wait is observed as the ``queue_wait`` stage.
        """
        return Leasing(self, action, namespace)

    async def _acquire(self, action: Action, namespace: str) -> Lease:
        if self._closed:
            raise RuntimeError("the container pool is closed")
        if action.limits.memory_mb > self.config.user_memory_mb:
            return Lease(self, action, None)
        waiter = Waiter(action, action.pool_key(namespace))
        began = trio.current_time()
        if not self._scheduler.arrive(waiter):
            self._update_gauges()
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.container is not None:
                    self._release(waiter.container, began)
                else:
                    self._scheduler.leave(waiter)
                    self._update_gauges()
                raise
        granted = trio.current_time()
        self._stages["queue_wait"].observe(granted - began)
        container = waiter.container
        assert container is not None
        return Lease(self, action, container, granted)

    def _release(self, c: ContainerRecord, granted: float) -> None:
        c.active -= 1
        if c.phase == READY:
            c.held(trio.current_time() - granted)
        if c.active == 0 and c.phase == NEW:
            self._drop(c)  # reserved but never invoked: give the memory back
            return
        if c.active == 0 and c.phase == RETIRING:
            self._start_removal(c)  # destroyed while in use: the last user has left
        if not self._closed:
            self._scheduler.release(c)
        self._update_gauges()

    # ----------------------------------------------------------- removal, reaper
    def _evict(self, c: ContainerRecord) -> None:
        self._destroy(c, reason="evicted")

    def _destroy(self, c: ContainerRecord, reason: str) -> None:
        """Never lease ``c`` again; remove it once no activation uses it (at once when idle).

        Activations holding a slot in it keep running undisturbed (see Lease); its memory
        counts until Docker confirms the removal.
        """
        if c.phase in DESTROYED:
            return
        c.phase = RETIRING
        c.destroy_reason = reason
        if c.active == 0:
            self._start_removal(c)
        else:
            logger.debug("container retiring", container=c.name, reason=reason, active=c.active)
        self._update_gauges()

    def _start_removal(self, c: ContainerRecord) -> None:
        if c.docker_id is None:
            self._drop(c)
            return
        c.phase = REMOVING
        try:
            assert self._nursery is not None
            self._nursery.start_soon(self._remove_task, c)
        except (AssertionError, RuntimeError):
            # The pool is closing: _remove_all removes every container it created.
            self._drop(c)

    async def _remove_task(self, c: ContainerRecord) -> None:
        """Remove c's container, retrying with capped backoff until Docker confirms it is gone.

        Until then it may still run, so its memory stays counted. One such task per container;
        cancelled when the pool closes, whose _remove_all tries once more.
        """
        assert c.docker_id is not None
        await self._close_conn(c)
        delay = REMOVE_RETRY_FIRST_S
        attempt = 1
        while True:
            try:
                await self._backend.remove(c.docker_id)
                break
            except DockerError as exc:
                logger.warning("removing container failed; its memory stays counted",
                               container=c.name, error=str(exc)[:200], attempt=attempt,
                               retry_in_s=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, REMOVE_RETRY_MAX_S)
            attempt += 1
        self._docker_ids.discard(c.docker_id)
        logger.debug("container removed", container=c.name, reason=c.destroy_reason)
        self._drop(c)

    @staticmethod
    async def _close_conn(c: ContainerRecord) -> None:
        """Close c's connection and its log file."""
        log, c.log = c.log, None
        if log is not None:
            log.close()
        conn, c.conn = c.conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _reaper(self) -> None:
        cfg = self.config
        interval = cfg.reaper_interval_s or min(1.0, max(0.05, cfg.idle_timeout_s / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for c in list(self._scheduler.records):
                if c.idle and c.phase != STEM and now - c.last_used >= cfg.idle_timeout_s:
                    logger.debug("removing idle container", container=c.name,
                                 idle_s=round(now - c.last_used, 1))
                    self._destroy(c, reason="idle")
            self._replenish_stems()

    def _replenish_stems(self) -> None:
        cfg = self.config
        if self._closed or self._nursery is None:
            return
        for kind, wanted in cfg.prewarm.items():
            image = cfg.kind_images.get(kind)
            if image is None:
                logger.warning("no image for prewarm kind", kind=kind)
                continue
            have = sum(
                1 for c in self._scheduler.records
                if c.pool_key is None and c.kind == kind and c.phase in (STARTING, STEM)
            )
            starting = sum(1 for c in self._scheduler.records if c.phase == STARTING)
            while (have < wanted and starting < PREWARM_STARTS_AT_ONCE
                   and not self._scheduler.waiters
                   and self.free_memory_mb >= cfg.prewarm_memory_mb):
                c = self._scheduler.new_record(image=image, kind=kind,
                                               memory_mb=cfg.prewarm_memory_mb,
                                               label=f"prewarm-{kind}", pool_key=None,
                                               phase=STARTING)
                self._nursery.start_soon(self._start_stem, c)
                have += 1
                starting += 1
        self._update_gauges()

    async def _start_stem(self, c: ContainerRecord) -> None:
        try:
            await self._create_and_start(c)
            deadline = trio.current_time() + self.config.init_timeout_s
            outcome = await self._wait_ready(c, deadline)
            if outcome is not None:
                raise DockerError(f"stem cell not ready: {outcome}")
        except (DockerError, ImageNotFound) as exc:
            log = logger.debug if self._closed else logger.warning
            log("prewarm container failed", container=c.name, error=str(exc))
            self._destroy(c, reason="prewarm failed")
            return
        if c.phase == STARTING:
            c.phase = STEM
            c.last_used = trio.current_time()
            logger.debug("stem cell ready", container=c.name, kind=c.kind)
        self._changed_state()
        self._replenish_stems()  # the next one, if any is missing

    # ---------------------------------------------------------------- containers
    def _spec(self, c: ContainerRecord, network: str | None) -> ContainerSpec:
        cfg = self.config
        runtime = cfg.runtime(c.kind)
        return ContainerSpec(
            name=c.name,
            image=c.image,
            memory_mb=c.memory_mb,
            labels={
                LABEL_MANAGED: "true",
                LABEL_ID: cfg.invoker_id,
                LABEL_ACTION: c.action_label,
                LABEL_KIND: c.kind,
                **c.labels,
                # network mode: how a deployment finds the containers (compose.sh down)
                **({LABEL_NETWORK: cfg.network} if cfg.network else {}),
            },
            network=network,
            pids_limit=cfg.pids_limit,
            cpus=cfg.cpus,
            user=runtime.user,
            read_only=cfg.read_only_root,
            tmpfs_mb=cfg.tmpfs_mb,
            exec_tmpfs=runtime.exec_tmpfs,
            env=runtime.env,
        )

    async def _create_and_start(self, c: ContainerRecord) -> None:
        """Create c's network (see invoker.networks) and container, start it and learn its
        address. Raises DockerError."""
        t0 = trio.current_time()
        networks = self._networks
        if networks is None:  # unmanaged (see _open_with)
            network = self.config.network
        else:
            network = await networks.create(c.name)
        network_s = trio.current_time() - t0
        try:
            cid = await self._backend.create(self._spec(c, network))
        except BaseException:
            if networks is not None:
                await networks.discard(network)
            raise
        c.docker_id = cid
        self._docker_ids.add(cid)
        self._update_gauges()
        if networks is not None:
            t1 = trio.current_time()
            await networks.attach(network, cid)
            network_s += trio.current_time() - t1
        if self._closed:
            raise DockerError("the container pool is closed")
        started = await self._backend.start(cid, network)
        c.base_url = started.base_url
        c.conn = self._client.connect(c.base_url)
        c.log = self._open_log(c, started.log_path)
        logger.debug("container started", container=c.name, id=cid[:12], url=c.base_url,
                     seconds=round(trio.current_time() - t0, 3),
                     network_seconds=round(network_s, 3))

    def _open_log(self, c: ContainerRecord, path: str) -> ContainerLog | None:
        """c's json-file log, or None: its logs are then read through the Docker API."""
        if not path:
            return None
        try:
            return ContainerLog.open(path)
        except OSError as exc:
            log = logger.debug if self._warned_log_files else logger.warning
            self._warned_log_files = True
            log("container log file unreadable; its logs are read through the Docker API",
                container=c.name, path=path, error=str(exc))
            return None

    async def _wait_ready(self, c: ContainerRecord, deadline: float) -> str | None:
        """None once the runtime answers HTTP; else "timeout" / "oom" / "exited"."""
        assert c.conn is not None and c.docker_id
        delay = 0.005
        next_check = trio.current_time() + _STATE_CHECK_EVERY_S
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return "timeout"
            if await c.conn.probe(timeout_s=min(1.0, remaining)):
                return None
            if trio.current_time() >= next_check:
                st = await self._backend.state(c.docker_id)
                if not st.running:
                    return "oom" if st.oom_killed else "exited"
                next_check = trio.current_time() + _STATE_CHECK_EVERY_S
            await trio.sleep(delay)
            delay = min(delay * 1.5, _PROBE_INTERVAL_MAX_S)

    async def _crash_message(self, c: ContainerRecord) -> str:
        """After a lost connection: OOM-killed or otherwise dead."""
        if c.docker_id is None:
            return MSG_ABNORMAL
        try:
            st = await self._backend.wait_stopped(c.docker_id, STOP_WAIT_S)
        except DockerError:
            return MSG_ABNORMAL
        return MSG_OOM if st.oom_killed else MSG_ABNORMAL

    async def _grab_logs(self, c: ContainerRecord, since_ns: int, limit: int,
                         wait: bool) -> CollectedLogs | None:
        """What c logged since the last activation (its log file) or since ``since_ns`` (the
        Docker API); None if that could not be read."""
        if c.docker_id is None:
            return None
        timeout_s = LOG_COLLECT_TIMEOUT_S if wait else LOG_GRAB_TIMEOUT_S
        if c.log is not None:
            try:
                return await c.log.collect(limit_bytes=limit, wait_sentinels=wait,
                                           timeout_s=timeout_s)
            except (OSError, RuntimeError) as exc:
                logger.warning("reading the container's log file failed", container=c.name,
                               error=str(exc))
                return None
        try:
            return await self._backend.collect_logs(
                c.docker_id,
                since_ns=since_ns,
                limit_bytes=limit,
                wait_sentinels=wait,
                timeout_s=timeout_s,
            )
        except DockerError as exc:
            logger.warning("reading logs failed", container=c.name, error=str(exc))
            return None

    @staticmethod
    def _format_logs(logs: CollectedLogs | None, limit: int, wait: bool) -> list[str]:
        if logs is None:
            return [MSG_LOGS_FAILED] if wait else []
        lines = [line.formatted() for line in logs.lines]
        if logs.truncated:
            lines.append(MSG_LOGS_TRUNCATED.format(n=limit))
        elif wait and not logs.complete:
            lines.append(MSG_LOGS_FAILED)
        return lines

    # ------------------------------------------------------------------- invoke
    async def _invoke(self, c: ContainerRecord | None, activation: Activation) -> InvocationResult:
        action = activation.action
        limits = action.limits
        if c is None:
            return _result_without_run(
                f"The action requires {limits.memory_mb} MB of memory but this invoker "
                f"has only {self.config.user_memory_mb} MB for actions."
            )
        start_kind = "warm"
        init_time_ms: int | None = None
        logs_since_ns: int | None = None
        if c.phase in (NEW, ASSIGNED):
            start_kind = "cold" if c.phase == NEW else "prewarm"
            logs_since_ns = time.time_ns()
            failure, init_time_ms = await self._initialize(c, action, start_kind)
            if failure is not None:
                return failure
        elif c.phase == INITIALIZING:
            await c.init_done.wait()
        if c.init_failure is not None:
            f = c.init_failure
            return InvocationResult(status=f.status, result=f.result, start_ms=f.start_ms,
                                    end_ms=f.end_ms, logs=[], start_kind=f.start_kind)
        # A container destroyed after this activation got its slot still serves it (_destroy).
        if c.phase not in (READY, RETIRING) or c.conn is None:
            return _result_without_run(MSG_ABNORMAL)
        return await self._run(c, activation, start_kind, init_time_ms, logs_since_ns)

    async def _initialize(self, c: ContainerRecord, action: Action,
                          start_kind: str) -> tuple[InvocationResult | None, int | None]:
        """Create (cold) and /init the container. Returns (failure or None, init_time_ms)."""
        c.phase = INITIALIZING
        limits = action.limits
        started_ns = time.time_ns()
        start_ms = started_ns // 1_000_000
        failure: InvocationResult | None = None
        init_time_ms: int | None = None
        destroy = True

        def fail(status: Status, error: str | dict[str, Any] | RawJson,
                 logs: list[str] | None = None) -> InvocationResult:
            result = {"error": error} if isinstance(error, str) else error
            return InvocationResult(status=status, result=result, start_ms=start_ms,
                                    end_ms=now_ms(), logs=logs or [], start_kind=start_kind,
                                    init_time_ms=init_time_ms)

        try:
            if c.docker_id is None:
                runtime_fault = Status.DEVELOPER_ERROR if action.blackbox else Status.INTERNAL_ERROR
                try:
                    await self._create_and_start(c)
                except ImageNotFound as exc:
                    failure = fail(runtime_fault, f"Failed to start container: image {exc.image} "
                                   "not found")
                    return failure, None
                except DockerError as exc:
                    failure = fail(Status.INTERNAL_ERROR, f"Failed to start container: {exc}")
                    return failure, None
                deadline = trio.current_time() + self.config.init_timeout_s
                outcome = await self._wait_ready(c, deadline)
                if outcome == "timeout":
                    failure = fail(runtime_fault, (
                        "The action container did not accept connections within "
                        f"{self.config.init_timeout_s:g} seconds."
                    ))
                elif outcome is not None:
                    logs = await self._grab_logs(c, started_ns, limits.logs_kb * 1024, False)
                    failure = fail(Status.DEVELOPER_ERROR,
                                   MSG_OOM if outcome == "oom" else MSG_ABNORMAL,
                                   self._format_logs(logs, limits.logs_kb * 1024, False))
                if failure is not None:
                    return failure, None
            else:  # a stem cell: what it logged before belongs to no activation
                if c.log is not None:
                    try:
                        c.log.skip_to_end()
                    except OSError:
                        pass  # then collect fails too, and says so
                if c.memory_mb > limits.memory_mb:
                    await self._shrink(c, limits.memory_mb)

            assert c.conn is not None
            t0 = trio.current_time()
            lost: ConnectionLost | None = None
            timed_out = False
            resp = None
            try:
                resp = await c.conn.post("/init", init_body(action, self.config.api_host),
                                         timeout_s=limits.timeout_ms / 1000)
            except ConnectionLost as exc:
                lost = exc
            except DeadlinePassed:
                timed_out = True
            init_time_ms = round((trio.current_time() - t0) * 1000)
            if timed_out:
                failure = fail(Status.DEVELOPER_ERROR,
                               MSG_INIT_TIMEOUT.format(ms=limits.timeout_ms))
            elif lost is not None:
                logger.debug("connection lost during /init", container=c.name, error=str(lost))
                failure = fail(Status.DEVELOPER_ERROR, await self._crash_message(c))
            else:
                assert resp is not None
                bad = interpret_init(resp, self.config.max_result_bytes,
                                     self.config.max_json_depth)
                if bad is not None:
                    failure = fail(*bad)
            if failure is not None:
                logs = await self._grab_logs(c, started_ns, limits.logs_kb * 1024, False)
                failure.logs = self._format_logs(logs, limits.logs_kb * 1024, False)
                return failure, init_time_ms
            destroy = False
            c.phase = READY
            made_s = trio.current_time() - c.serving_since
            self._stages["init"].observe(made_s)
            if start_kind == "cold":
                self._scheduler.cold_started(made_s)
            # Waiters that chose to wait for it while it started may do better now (memory
            # free for a container of their own).
            self._changed_state()
            logger.debug("container initialized", container=c.name, action=action.name,
                         start_kind=start_kind, init_ms=init_time_ms)
            return None, init_time_ms
        except BaseException:
            failure = fail(Status.INTERNAL_ERROR,
                           "The activation was cancelled during initialization.")
            raise
        finally:
            if destroy:
                c.init_failure = failure
                self._destroy(c, reason="init failed")
            c.init_done.set()

    async def _shrink(self, c: ContainerRecord, memory_mb: int) -> None:
        """A stem cell larger than the action needs gets the action's exact memory limit."""
        assert c.docker_id is not None
        try:
            await self._backend.update_memory(c.docker_id, memory_mb)
        except DockerError as exc:
            logger.debug("could not lower the memory limit", container=c.name, error=str(exc))
            return
        c.memory_mb = memory_mb
        self._changed_state()

    async def _run(self, c: ContainerRecord, activation: Activation, start_kind: str,
                   init_time_ms: int | None, logs_since_ns: int | None) -> InvocationResult:
        limits = activation.action.limits
        log_limit = limits.logs_kb * 1024
        assert c.conn is not None
        run_start_ns = time.time_ns()
        start_ms = run_start_ns // 1_000_000
        body = run_body(activation, start_ms + limits.timeout_ms)
        lost: ConnectionLost | None = None
        timed_out = False
        resp = None
        run_began = trio.current_time()
        try:
            try:
                resp = await c.conn.post("/run", body, timeout_s=limits.timeout_ms / 1000)
            except ConnectionLost as exc:
                lost = exc
            except DeadlinePassed:
                timed_out = True
        except BaseException:
            # Cancelled from outside while the action runs: it may still be running, so the
            # container must not serve another activation.
            self._destroy(c, reason="cancelled during /run")
            raise
        end_ms = now_ms()
        self._stages["run"].observe(trio.current_time() - run_began)
        since_ns = logs_since_ns or run_start_ns
        concurrent = c.concurrency > 1

        if timed_out or lost is not None:
            if timed_out:
                status, message = Status.DEVELOPER_ERROR, MSG_TIMEOUT.format(ms=limits.timeout_ms)
                logger.debug("activation timed out", container=c.name,
                             activation_id=activation.activation_id)
            else:
                logger.debug("connection lost during /run", container=c.name, error=str(lost))
                status, message = Status.DEVELOPER_ERROR, await self._crash_message(c)
            if concurrent:
                logs = [MSG_LOGS_CONCURRENT]
            else:
                grabbed = await self._grab_logs(c, since_ns, log_limit, False)
                logs = self._format_logs(grabbed, log_limit, False)
            self._destroy(c, reason="timeout" if timed_out else "crashed")
            return InvocationResult(status=status, result={"error": message}, start_ms=start_ms,
                                    end_ms=end_ms, logs=logs, init_time_ms=init_time_ms,
                                    start_kind=start_kind)

        assert resp is not None
        status, result = interpret_run(resp, self.config.max_result_bytes,
                                       self.config.max_json_depth)
        if concurrent:
            logs = [MSG_LOGS_CONCURRENT]
        else:
            logs_began = trio.current_time()
            collected = await self._grab_logs(c, since_ns, log_limit, True)
            self._stages["log_read"].observe(trio.current_time() - logs_began)
            logs = self._format_logs(collected, log_limit, True)
            if collected is None or not collected.complete:
                # The runtime's sentinels were not reached (truncated logs drain to them): the
                # log file's next read would start in this activation's lines.
                logger.debug("log sentinels missing; container not reused", container=c.name)
                self._destroy(c, reason="log sentinels missing")
        if status in (Status.DEVELOPER_ERROR, Status.INTERNAL_ERROR):
            # As OpenWhisk's isContainerError: a runtime that failed may stay broken (the
            # Node.js one answers every later /run with 403), so the container is not reused.
            self._destroy(c, reason=f"status {int(status)} from /run")
        c.last_used = trio.current_time()
        return InvocationResult(status=status, result=result, start_ms=start_ms, end_ms=end_ms,
                                logs=logs, init_time_ms=init_time_ms, start_kind=start_kind)
