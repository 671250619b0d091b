"""Docker containers for actions: the blocking docker SDK behind trio worker threads.

Every SDK call runs in ``trio.to_thread.run_sync`` under a ``CapacityLimiter``. Calls that
create or remove containers are never abandoned on cancellation (the thread finishes and the
caller learns the container id), so a cancelled pool cannot leak a container it does not know.

Log collection reads Docker's multiplexed log stream itself (the SDK's stream helpers drop the
stdout/stderr distinction) and keeps at most ``limit_bytes`` of log text in memory.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, TypeVarTuple

import docker
import docker.errors
import docker.types
import requests
import structlog
import trio
from docker.types import LogConfig

logger = structlog.get_logger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

SENTINEL = b"XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
LABEL_MANAGED = "org.invoker.managed"
LABEL_ID = "org.invoker.id"
LABEL_ACTION = "org.invoker.action"
LABEL_KIND = "org.invoker.kind"
LABEL_NAMESPACE = "org.invoker.namespace"  # the tenant whose action it runs (not on stem cells)
# The process that created it (invoker.ownership): found again when that process has ended.
LABEL_HOST = "org.invoker.host"
LABEL_PID_NAMESPACE = "org.invoker.pid-namespace"
LABEL_PID = "org.invoker.pid"
LABEL_PID_START = "org.invoker.pid-start"
ACTION_PORT = 8080
ICC_OPTION = "com.docker.network.bridge.enable_icc"  # "false": containers cannot reach each other
_CONTAINER_PATH = re.compile(r"/containers/([0-9a-f]{64})/")

_STREAMS = {1: "stdout", 2: "stderr"}
_MAX_FRAME = 1 << 20  # Docker splits log messages at 16 KiB; anything larger is discarded
# What Docker's json-file driver writes around a line's text ({"log":"<text>\n","stream":
# "stdout","time":"<30 characters>"} and a newline). A kept line is charged it besides its text,
# as OpenWhisk charges a line its json-file entry: a flood of short or empty lines is bounded in
# lines (at most limit // 71), hence in the objects that hold them.
LINE_OVERHEAD_BYTES = 71


class DockerError(Exception):
    """The Docker engine failed or could not be reached."""


class SubnetTaken(DockerError):
    def __init__(self, subnet: str) -> None:
        super().__init__(f"subnet {subnet} overlaps another network")
        self.subnet = subnet


class ImageNotFound(DockerError):
    def __init__(self, image: str) -> None:
        super().__init__(f"image {image} not found")
        self.image = image


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to create one hardened action container."""

    name: str
    image: str
    memory_mb: int
    labels: Mapping[str, str]
    network: str | None = None  # the network it joins (and is reached on); None: Docker's bridge
    pids_limit: int = 128
    cpus: float = 1.0
    user: str | None = None  # "uid:gid"; None keeps the image's user
    read_only: bool = True  # read-only root with a noexec tmpfs /tmp
    tmpfs_mb: int = 64  # size of each tmpfs (they count against the memory limit)
    # tmpfs paths the run uid may write and exec from (ActionLoop runtimes exec /action/<n>/)
    exec_tmpfs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_max_size: str = "16m"

    def tmpfs(self) -> dict[str, str]:
        """Docker's tmpfs map: /tmp (noexec) with a read-only root, and the exec paths owned
        by the run uid (mode 0700: no other uid in the container may touch them)."""
        mounts = {}
        if self.read_only:
            mounts["/tmp"] = f"rw,noexec,nosuid,nodev,size={self.tmpfs_mb}m,mode=1777"
        owner = ""
        if self.user is not None:
            uid, _, gid = self.user.partition(":")
            owner = f",uid={uid},gid={gid or uid}"
        for path in self.exec_tmpfs:
            mounts[path] = f"rw,exec,nosuid,nodev,size={self.tmpfs_mb}m{owner},mode=0700"
        return mounts


@dataclass(frozen=True, slots=True)
class StartedContainer:
    base_url: str  # of its action port
    log_path: str  # its json-file log on the engine's host ("" if the engine does not say)


@dataclass(frozen=True, slots=True)
class ContainerState:
    running: bool
    oom_killed: bool = False


@dataclass(frozen=True, slots=True)
class LabelledContainer:
    id: str
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class LogLine:
    time: str  # Docker's RFC 3339 timestamp with nanoseconds, e.g. 2024-05-01T10:00:00.123456789Z
    stream: str  # "stdout" | "stderr"
    text: str

    def formatted(self) -> str:
        """The line as OpenWhisk stores it in an activation record."""
        return f"{self.time} {self.stream}: {self.text}"


@dataclass(slots=True)
class CollectedLogs:
    lines: list[LogLine] = field(default_factory=list)
    truncated: bool = False  # stopped keeping lines because of the byte limit
    complete: bool = False  # the sentinel was seen on both streams (or not waited for)
    kept_bytes: int = 0  # charged against the limit: text (UTF-8) and LINE_OVERHEAD_BYTES a line

    def keep(self, time: str, stream: str, text: str, size: int, limit: int) -> None:
        """Keep a line of ``size`` bytes of text, charged ``size + LINE_OVERHEAD_BYTES``,
        unless the charges would pass ``limit`` bytes: the logs are then truncated."""
        charge = size + LINE_OVERHEAD_BYTES
        if self.kept_bytes + charge > limit:
            self.truncated = True
            return
        self.kept_bytes += charge
        self.lines.append(LogLine(time, stream, text))


def since_param(epoch_ns: int) -> str:
    """Docker's ``since`` with nanosecond precision ("seconds.nanoseconds")."""
    return f"{epoch_ns // 1_000_000_000}.{epoch_ns % 1_000_000_000:09d}"


def _wrap(exc: BaseException) -> DockerError:
    if isinstance(exc, DockerError):
        return exc
    return DockerError(f"{type(exc).__name__}: {exc}")


_DOCKER_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class DockerBackend:
    """Thin async facade over one ``docker.DockerClient``."""

    def __init__(self, client: docker.DockerClient, *, threads: int = 8, log_threads: int = 16):
        self._client = client
        self._api = client.api
        self._limiter = trio.CapacityLimiter(threads)
        self._log_limiter = trio.CapacityLimiter(log_threads)
        # Docker 20.10 (Debian 12's docker.io) can deadlock when two endpoints leave one
        # network at about the same time: libnetwork's sbLeave and processEndpointDelete take
        # the network's and the controller's locks in opposite orders (moby/moby#46661; fixed
        # after 20.10.24, Debian's), and from then on container and network calls hang. Our
        # action containers share a network, so removals go one at a time. That narrows the
        # window to an endpoint's processEndpointDelete (run on its own once its removal is
        # under way, microseconds) against the next removal's kill and exit: it does not close
        # it, nor order containers that exit on their own or other clients of the engine.
        self._removal_limiter = trio.CapacityLimiter(1)

    @classmethod
    async def connect(cls, *, threads: int = 8, log_threads: int = 16) -> DockerBackend:
        def _make() -> docker.DockerClient:
            client = docker.from_env(max_pool_size=threads + log_threads + 4)
            client.ping()
            return client

        try:
            client = await trio.to_thread.run_sync(_make)
        except _DOCKER_FAILURES as exc:
            raise _wrap(exc) from exc
        return cls(client, threads=threads, log_threads=log_threads)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._client.close)

    async def _call(self, fn: Callable[[*_Ts], _T], *args: *_Ts, abandon: bool = False,
                    removal: bool = False) -> _T:
        """``removal``: one at a time with other removals (see ``_removal_limiter``)."""
        limiter = self._removal_limiter if removal else self._limiter
        try:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=limiter, abandon_on_cancel=abandon
            )
        except docker.errors.ImageNotFound as exc:
            raise DockerError(str(exc)) from exc
        except _DOCKER_FAILURES as exc:
            raise _wrap(exc) from exc

    # ---------------------------------------------------------------- lifecycle
    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; returns its id. Raises ImageNotFound, DockerError."""
        api = self._api
        host_config = api.create_host_config(
            mem_limit=f"{spec.memory_mb}m",
            memswap_limit=f"{spec.memory_mb}m",  # equal to the memory limit: no swap
            pids_limit=spec.pids_limit,
            nano_cpus=int(spec.cpus * 1_000_000_000),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=spec.read_only,
            tmpfs=spec.tmpfs() or None,
            network_mode=spec.network or "bridge",
            log_config=LogConfig(
                type="json-file", config={"max-size": spec.log_max_size, "max-file": "2"}
            ),
        )

        def _create() -> str:
            try:
                resp = api.create_container(
                    spec.image,
                    name=spec.name,
                    labels=dict(spec.labels),
                    host_config=host_config,
                    user=spec.user,
                    environment=dict(spec.env) or None,
                    detach=True,
                )
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(spec.image) from exc
            container_id: str = resp["Id"]
            return container_id

        try:
            return await trio.to_thread.run_sync(_create, limiter=self._limiter)
        except ImageNotFound:
            raise
        except _DOCKER_FAILURES as exc:
            raise _wrap(exc) from exc

    async def start(self, container_id: str, network: str | None) -> StartedContainer:
        """Start the container; return the base URL of its action port (its address on
        ``network``: no port is published) and the path of its json-file log."""
        api = self._api

        def _start() -> StartedContainer:
            api.start(container_id)
            info = api.inspect_container(container_id)
            log_path = info.get("LogPath") or ""
            settings = info.get("NetworkSettings") or {}
            net = (settings.get("Networks") or {}).get(network or "bridge") or {}
            ip = net.get("IPAddress")
            if not ip:
                raise DockerError(
                    f"container {container_id[:12]} has no address on network {network}")
            return StartedContainer(f"http://{ip}:{ACTION_PORT}", log_path)

        return await self._call(_start)

    async def containers_dir(self) -> str:
        """Where the engine keeps its containers' files (json-file logs among them)."""
        info = await self._call(self._api.info)
        return posixpath.join(info.get("DockerRootDir") or "/var/lib/docker", "containers")

    async def remove(self, container_id: str) -> None:
        """Kill and remove; returns once Docker says the container is gone (already gone is
        fine). Raises DockerError otherwise, e.g. while a removal started elsewhere is still
        in progress."""
        api = self._api

        def _remove() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container_id, force=True, v=True)

        await self._call(_remove, removal=True)

    async def update_memory(self, container_id: str, memory_mb: int) -> None:
        api = self._api

        def _update() -> None:
            api.update_container(
                container_id, mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m"
            )

        await self._call(_update)

    async def state(self, container_id: str) -> ContainerState:
        api = self._api

        def _state() -> ContainerState:
            try:
                info = api.inspect_container(container_id)
            except docker.errors.NotFound:
                return ContainerState(running=False)
            st = info.get("State") or {}
            return ContainerState(running=bool(st.get("Running")),
                                  oom_killed=bool(st.get("OOMKilled")))

        return await self._call(_state, abandon=True)

    async def wait_stopped(self, container_id: str, timeout_s: float) -> ContainerState:
        """Poll until the container is not running (or ``timeout_s``); returns the last state."""
        deadline = trio.current_time() + timeout_s
        while True:
            st = await self.state(container_id)
            if not st.running or trio.current_time() >= deadline:
                return st
            await trio.sleep(0.05)

    async def list_labelled(self, label: str, value: str) -> list[LabelledContainer]:
        """Every managed container, running or not, whose ``label`` is ``value``."""
        api = self._api

        def _list() -> list[LabelledContainer]:
            found = api.containers(
                all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{label}={value}"]}
            )
            return [LabelledContainer(c["Id"], (c.get("Names") or ["?"])[0].lstrip("/"),
                                      c.get("Labels") or {}) for c in found]

        return await self._call(_list)

    # ----------------------------------------------------------------- networks
    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> str:
        """The subnet of the bridge network ``name`` on which containers cannot reach each
        other (``enable_icc=false``), created if missing. An existing network of that name
        without that option is refused (DockerError), never used."""
        api = self._api

        def _ensure() -> str:
            try:
                info = api.inspect_network(name)
            except docker.errors.NotFound:
                try:
                    api.create_network(name, driver="bridge", options={ICC_OPTION: "false"},
                                       labels=dict(labels), check_duplicate=True)
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: another invoker created it meanwhile
                        raise
                info = api.inspect_network(name)
            if (info.get("Options") or {}).get(ICC_OPTION) != "false":
                raise DockerError(f"network {name} exists with inter-container traffic on; "
                                  "remove it or name another one")
            configs = (info.get("IPAM") or {}).get("Config") or []
            if not configs or not configs[0].get("Subnet"):
                raise DockerError(f"network {name} has no IPv4 subnet")
            subnet: str = configs[0]["Subnet"]
            return subnet

        return await self._call(_ensure)

    async def create_network(self, name: str, subnet: str, labels: Mapping[str, str], *,
                             internal: bool = False) -> None:
        """Create a bridge network on ``subnet``; ``internal``: no gateway, no traffic beyond
        the subnet. Raises SubnetTaken when another network of the engine overlaps it, else
        DockerError."""
        api = self._api

        def _create() -> None:
            pool = docker.types.IPAMPool(subnet=subnet)
            try:
                api.create_network(name, driver="bridge", labels=dict(labels),
                                   ipam=docker.types.IPAMConfig(pool_configs=[pool]),
                                   internal=internal, check_duplicate=True)
            except docker.errors.APIError as exc:
                if "overlap" in str(exc.explanation or exc):
                    raise SubnetTaken(subnet) from exc
                raise

        try:
            # not abandoned on cancellation: the caller must learn whether the network exists
            await trio.to_thread.run_sync(_create, limiter=self._limiter)
        except SubnetTaken:
            raise
        except _DOCKER_FAILURES as exc:
            raise _wrap(exc) from exc

    async def remove_network(self, name: str) -> None:
        """Remove a network; one that is already gone is not an error."""
        api = self._api

        def _remove() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_network(name)

        await self._call(_remove)

    async def connect_network(self, network: str, container_id: str) -> None:
        await self._call(self._api.connect_container_to_network, container_id, network)

    async def disconnect_network(self, network: str, container_id: str) -> None:
        """Force-disconnect; a network or container that is gone is not an error. Not one at a
        time like removals: the daemon leaves only a link network whose container is gone, so
        no other endpoint leaves that network then."""
        api = self._api

        def _disconnect() -> None:
            try:
                api.disconnect_container_from_network(container_id, network, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if "is not connected" not in str(exc.explanation or exc):
                    raise

        await self._call(_disconnect)

    async def list_networks(self, label: str) -> list[tuple[str, dict[str, str]]]:
        """(name, labels) of every network that has the label ``label`` (any value)."""
        api = self._api

        def _list() -> list[tuple[str, dict[str, str]]]:
            found = api.networks(filters={"label": [label]})
            return sorted((n["Name"], dict(n.get("Labels") or {})) for n in found)

        return await self._call(_list)

    async def own_container_id(self) -> str | None:
        """This process's container id on this engine, or None when it runs on the host.

        Docker bind-mounts /etc/hostname, /etc/hosts and /etc/resolv.conf from
        ``.../containers/<id>/``, which /proc/self/mountinfo shows; the id counts only if this
        engine knows a running container with it.
        """
        api = self._api

        def _own() -> str | None:
            try:
                with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                    found = _CONTAINER_PATH.search(fh.read())
            except OSError:
                return None
            if found is None:
                return None
            try:
                info = api.inspect_container(found.group(1))
            except docker.errors.NotFound:
                return None
            return info["Id"] if (info.get("State") or {}).get("Running") else None

        return await self._call(_own)

    # --------------------------------------------------------------------- logs
    async def collect_logs(
        self,
        container_id: str,
        *,
        since_ns: int,
        limit_bytes: int,
        wait_sentinels: bool,
        timeout_s: float,
    ) -> CollectedLogs:
        """Read the container's stdout+stderr written since ``since_ns`` (epoch ns).

        With ``wait_sentinels`` the log stream is followed until the sentinel line has been seen
        on both streams, or ``timeout_s`` passes, or the container is gone. Without it, whatever
        is already logged is read (still bounded by ``timeout_s``). Lines past ``limit_bytes``
        of text are read and dropped, so memory stays bounded whatever the action printed.
        """
        deadline = time.monotonic() + timeout_s
        try:
            return await trio.to_thread.run_sync(
                self._collect_logs_sync,
                container_id,
                since_ns,
                limit_bytes,
                wait_sentinels,
                deadline,
                limiter=self._log_limiter,
                abandon_on_cancel=True,  # the thread ends by itself at the deadline
            )
        except _DOCKER_FAILURES as exc:
            raise _wrap(exc) from exc

    def _collect_logs_sync(
        self, container_id: str, since_ns: int, limit: int, wait: bool, deadline: float
    ) -> CollectedLogs:
        api = self._api
        out = CollectedLogs()
        params = {
            "stdout": 1,
            "stderr": 1,
            "timestamps": 1,
            "follow": 1 if wait else 0,
            "tail": "all",
            "since": since_param(since_ns),
        }
        try:
            # the SDK's private helpers (its logs() drops which stream a line came from); the
            # stubs leave private methods out
            url = api._url("/containers/{0}/logs", container_id)  # type: ignore[attr-defined]
            res = api._get(url, params=params, stream=True)  # type: ignore[attr-defined]
        except requests.exceptions.RequestException as exc:
            raise DockerError(f"reading logs: {exc}") from exc
        try:
            if res.status_code == 404:
                return out  # the container is gone
            api._raise_for_status(res)  # type: ignore[attr-defined]
            sock = api._get_raw_response_socket(res)  # type: ignore[attr-defined]
            raw = res.raw
            seen: set[str] = set()

            def read_exact(n: int) -> bytes | None:
                chunks = []
                while n > 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    _set_timeout(sock, remaining)
                    try:
                        chunk = raw.read(n)
                    except Exception:  # noqa: BLE001 - a read timeout or a closed stream
                        return None
                    if not chunk:
                        return None
                    chunks.append(chunk)
                    n -= len(chunk)
                return b"".join(chunks)

            while True:
                header = read_exact(8)
                if header is None:
                    # End of the stream: without follow, or the container stopped
                    out.complete = out.complete or not wait
                    break
                stream_id, length = struct.unpack(">BxxxL", header)
                if length > _MAX_FRAME:
                    if not self._discard(read_exact, length):
                        break
                    continue
                payload = read_exact(length) if length else b""
                if payload is None:
                    break
                stream = _STREAMS.get(stream_id)
                if stream is None:
                    continue
                ts, _, text = payload.partition(b" ")
                text = text.rstrip(b"\r\n")
                if text == SENTINEL:
                    seen.add(stream)
                    if wait and len(seen) == 2:
                        out.complete = True
                        break
                    continue
                if out.truncated:
                    continue  # draining up to the sentinels, keeping nothing
                out.keep(ts.decode("ascii", "replace"), stream,
                         text.decode("utf-8", "replace").rstrip(), len(text), limit)
        finally:
            res.close()
        out.lines.sort(key=lambda line: line.time)  # stable: keeps stream order on ties
        return out

    @staticmethod
    def _discard(read_exact: Any, length: int) -> bool:
        while length > 0:
            n = min(length, 65536)
            if read_exact(n) is None:
                return False
            length -= n
        return True


def _set_timeout(sock: Any, timeout: float) -> None:
    for s in (sock, getattr(sock, "_sock", None)):
        if s is not None and (isinstance(s, socket.socket) or hasattr(s, "settimeout")):
            with contextlib.suppress(OSError, AttributeError):
                s.settimeout(timeout)
