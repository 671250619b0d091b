"""Networks of the action containers: an action reaches neither another action nor the daemon.

Host mode (no ``container_network``; the daemon runs on the host): every action container
joins one shared bridge network (``invoker-actions``) created with inter-container traffic off
(``com.docker.network.bridge.enable_icc=false``), and the daemon reaches it at its address
there (the host routes to its bridges). No port is published: a published port is served by a
docker-proxy process that copies every request and answer, which cost 0.12-0.15 ms of CPU
per activation on this project's 2-core machine. The host must route to its bridges: rootful
Docker on Linux does; with rootless Docker, Docker Desktop or a remote engine, run the daemon
in a container (network mode).

Network mode (``container_network`` set; the daemon runs in a container): on a shared network
with that option the daemon could not reach the actions either. So each action container gets
two networks:

- a *link* network of its own, ``internal`` (no gateway, nothing beyond its subnet), on a /29 of
  ``container_subnet_pool``, which the daemon's container joins (a daemon on the host reaches
  every bridge directly): the daemon reaches the action there, and nothing else is on it. Being
  internal, it never becomes the daemon container's default route (Docker gives that, and the
  container's published ports, to the first network by name that has a gateway).
- the *egress* network named ``container_network``, shared, created if missing with
  inter-container traffic off, which the daemon does not join: the action's way out (NAT).

The engine drops traffic between bridges, so an action reaches no other action and no other
service of the deployment. Per-container networks and the egress network are labelled
``org.invoker.network=<container_network>`` so that a deployment can find them
(``deploy/compose/compose.sh down``).

In both modes the address ranges of the action networks are registered with the ops endpoint
(``invoker.ops.refuse_peers_from``), which closes connections from them unanswered: where the
daemon's ``/metrics`` listens on 0.0.0.0 (compose), an action could otherwise reach it on the
daemon's address on its link network, or on the host's address on its gateway.

A link network carries the invoker id and the creating process like its container
(``invoker.ownership``). It is removed once its container is gone (``gone`` / ``release``,
driven by the pool), when the pool closes, and as a leftover when a pool opens: labelled with
its invoker id, or created by a process of this host that has ended. Shared networks stay.

Cost per cold start (measured on this project's 2-core machine, quiet, medians of 12 interleaved
runs, container create + start until the runtime answers): Docker's default bridge 0.47 s; the
shared network of host mode 0.55 s (a user-defined network sets up Docker's embedded DNS);
network mode 0.68 s, of which 0.11 s for the link network, the daemon's connect and the egress
connect. Removing a link network adds ~0.19 s after its container's removal, off the
activation path.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from invoker.containers.engine import LABEL_ID, LABEL_MANAGED, DockerError, SubnetTaken
from invoker.ops import refuse_peers_from
from invoker.ownership import ProcessOwner

logger = structlog.get_logger(__name__)

LABEL_NETWORK = "org.invoker.network"  # on per-container networks: the container_network name
SUBNET_PREFIX = 29  # network, gateway, action, daemon, broadcast: 5 of its 8 addresses
SUBNET_ATTEMPTS = 64  # subnets tried for one network (other invokers may hold some)
RELEASE_RETRY_S = 5.0  # a network Docker refused to remove is tried again after this ...
RELEASE_ATTEMPTS = 5  # ... this many times in all; then it is left (a leftover at next open)


@dataclass(eq=False)
class _Network:
    subnet: ipaddress.IPv4Network
    container_id: str | None = None  # set once its container exists
    releasing: bool = False
    failures: int = 0
    retry_at: float = 0.0


class ActionNetworks:
    """The networks of one pool's containers. Methods that talk to Docker raise DockerError."""

    def __init__(self, backend: Any, *, invoker_id: str, owner: ProcessOwner,
                 group: str | None, shared_name: str, subnet_pool: str) -> None:
        self._backend = backend
        self._invoker_id = invoker_id
        self._owner = owner
        self._group = group  # None: host mode
        self._shared_name = shared_name
        self._pool = ipaddress.IPv4Network(subnet_pool)
        self._pool_size = 2 ** (SUBNET_PREFIX - self._pool.prefixlen)
        self._next = random.randrange(self._pool_size)  # invokers sharing the pool start apart
        self._own_id: str | None = None  # this process's container, in network mode
        self._networks: dict[str, _Network] = {}  # per-container networks by name

    @property
    def per_container(self) -> bool:
        return self._group is not None

    async def open(self) -> None:
        """Host mode: the shared network, created if missing. Network mode: finds this
        process's container and removes leftover networks."""
        if self._group is None:
            subnet = await self._backend.ensure_network(self._shared_name,
                                                        {LABEL_MANAGED: "true"})
            refuse_peers_from(subnet)
            logger.debug("action network", network=self._shared_name, subnet=subnet)
            return
        egress = await self._backend.ensure_network(
            self._group, {LABEL_MANAGED: "true", LABEL_NETWORK: self._group})
        refuse_peers_from(egress)
        refuse_peers_from(str(self._pool))
        self._own_id = await self._backend.own_container_id()
        leftovers = [  # link networks (the egress network has neither label)
            name for name, labels in await self._backend.list_networks(LABEL_NETWORK)
            if labels.get(LABEL_ID) == self._invoker_id or self._owner.left_behind(labels)
        ]
        for name in leftovers:
            try:
                await self._detach_and_remove(name)
                logger.info("leftover action network removed", network=name)
            except DockerError as exc:  # holds no memory: not worth failing the start for
                logger.warning("removing a leftover action network failed", network=name,
                               error=str(exc)[:200])
        logger.debug("per-container action networks", pool=str(self._pool),
                     daemon_container=self._own_id[:12] if self._own_id else "none (host)")

    async def create(self, container_name: str) -> str:
        """The network a new container is created on, where the daemon reaches it: the shared
        one, or (network mode) a new link network, named like the container, which this
        process's container joins."""
        if self._group is None:
            return self._shared_name
        name = container_name
        labels = {LABEL_MANAGED: "true", LABEL_ID: self._invoker_id, LABEL_NETWORK: self._group,
                  **self._owner.labels()}
        for _ in range(SUBNET_ATTEMPTS):
            # Recorded before the call: whatever fails from here on, discard removes it.
            self._networks[name] = _Network(self._take_subnet())
            try:
                await self._backend.create_network(name, str(self._networks[name].subnet),
                                                   labels, internal=True)
                break
            except SubnetTaken:
                del self._networks[name]  # another network has it: try the next one
            except BaseException:
                await self.discard(name)
                raise
        else:
            raise DockerError(f"no free /{SUBNET_PREFIX} in container_subnet_pool {self._pool} "
                              f"after {SUBNET_ATTEMPTS} attempts")
        if self._own_id is not None:
            try:
                await self._backend.connect_network(name, self._own_id)
            except BaseException:
                await self.discard(name)
                raise
        return name

    async def attach(self, name: str | None, container_id: str) -> None:
        """The container of network ``name`` exists (not started yet): the network lives
        until it is gone. Network mode: the container joins the egress network too."""
        network = self._networks.get(name or "")
        if network is not None:
            assert self._group is not None  # link networks exist in network mode only
            network.container_id = container_id
            await self._backend.connect_network(self._group, container_id)

    async def discard(self, name: str | None) -> None:
        """A network whose container was never created: removed at once (shielded)."""
        if name in self._networks:
            with trio.CancelScope(shield=True):
                await self.release(name)

    def gone(self, live_ids: set[str]) -> list[str]:
        """Networks whose container is no longer in ``live_ids`` and that are due for removal."""
        now = trio.current_time()
        return [name for name, n in self._networks.items()
                if n.container_id is not None and n.container_id not in live_ids
                and not n.releasing and n.retry_at <= now]

    async def release(self, name: str) -> None:
        """Detach this process's container from network ``name`` and remove it. When Docker
        refuses, it is logged and kept for a later try (``gone``, ``release_all``)."""
        network = self._networks.get(name)
        if network is None or network.releasing:
            return
        network.releasing = True
        try:
            await self._detach_and_remove(name)
        except BaseException as exc:
            network.releasing = False
            if not isinstance(exc, DockerError):
                raise
            network.failures += 1
            if network.failures >= RELEASE_ATTEMPTS:
                # e.g. an endpoint Docker still counts though no container has it
                logger.error("giving up removing an action network", network=name,
                             error=str(exc)[:200], attempts=network.failures)
                del self._networks[name]
                return
            logger.warning("removing an action network failed", network=name,
                           error=str(exc)[:200])
            network.retry_at = trio.current_time() + RELEASE_RETRY_S
            return
        del self._networks[name]
        logger.debug("action network removed", network=name)

    async def release_all(self) -> None:
        """Every per-container network left (the pool closes; its containers are removed)."""
        async with trio.open_nursery() as nursery:
            for name in list(self._networks):
                nursery.start_soon(self.release, name)

    async def _detach_and_remove(self, name: str) -> None:
        if self._own_id is not None:
            await self._backend.disconnect_network(name, self._own_id)
        await self._backend.remove_network(name)

    def _take_subnet(self) -> ipaddress.IPv4Network:
        taken = {n.subnet for n in self._networks.values()}
        size = 2 ** (32 - SUBNET_PREFIX)
        for _ in range(self._pool_size):
            index, self._next = self._next, (self._next + 1) % self._pool_size
            subnet = ipaddress.IPv4Network(
                (int(self._pool.network_address) + index * size, SUBNET_PREFIX))
            if subnet not in taken:
                return subnet
        raise DockerError(f"container_subnet_pool {self._pool} is used up")
