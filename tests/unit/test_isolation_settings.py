"""Runtime settings per kind, container tmpfs options, the ops endpoint's peer filter, and the
per-container networks' bookkeeping (against a fake Docker backend)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
import trio

from invoker.config import Config, load_config
from invoker.containers.engine import ContainerSpec, DockerBackend, DockerError, SubnetTaken
from invoker.daemon import pool_config
from invoker.networks import LABEL_NETWORK, RELEASE_ATTEMPTS, SUBNET_ATTEMPTS, ActionNetworks
from invoker.ops import peer_refused, refuse_peers_from
from invoker.ownership import ProcessOwner


# ------------------------------------------------------------------ settings
def test_kind_runtime_from_env_json_overrides_per_kind():
    kind_runtime = {"nodejs:20": {"user": "1000:1000", "exec_tmpfs": [], "env": {"A": "1"}},
                    "blackbox": {"exec_tmpfs": ["/action", "/opt/work"]}}
    cfg = load_config(None, {"INVOKER_KIND_RUNTIME": json.dumps(kind_runtime),
                             "INVOKER_CONTAINER_EXEC_TMPFS": "/action,/srv"})
    pool = pool_config(cfg)
    node = pool.runtime("nodejs:20")
    assert (node.user, node.exec_tmpfs, dict(node.env)) == ("1000:1000", (), {"A": "1"})
    blackbox = pool.runtime("blackbox")
    assert (blackbox.user, blackbox.exec_tmpfs) == ("65534:65534", ("/action", "/opt/work"))
    other = pool.runtime("python:3")
    assert (other.user, other.exec_tmpfs, dict(other.env)) == (
        "65534:65534", ("/action", "/srv"), {})


@pytest.mark.parametrize("kind_runtime, problem", [
    ({"go:1": {"usr": "1:1"}}, "unknown key 'usr'"),
    ({"go:1": "65534"}, "must be a table/object"),
    ({"go:1": {"user": "nobody"}}, 'must be "uid:gid"'),
    ({"go:1": {"user": 65534}}, 'must be "uid:gid"'),
    ({"go:1": {"exec_tmpfs": "/action"}}, "must be a list of paths"),
    ({"go:1": {"exec_tmpfs": ["action"]}}, "not an absolute normalized path"),
    ({"go:1": {"exec_tmpfs": ["/tmp"]}}, "not an absolute normalized path"),
    ({"go:1": {"exec_tmpfs": ["/action/../etc"]}}, "not an absolute normalized path"),
    ({"go:1": {"exec_tmpfs": ["/proc/x"]}}, "not an absolute normalized path"),
    ({"go:1": {"env": {"A": 1}}}, "must map variable names to strings"),
    ({"go:1": {"env": {"A-B": "1"}}}, "must map variable names to strings"),
    ({"go:1": {"env": ["A=1"]}}, "must map variable names to strings"),
])
def test_bad_kind_runtime_is_refused_with_the_reason(kind_runtime, problem):
    with pytest.raises(ValueError, match="kind_runtime") as err:
        Config(kind_runtime=kind_runtime)
    assert problem in str(err.value)


def test_bad_defaults_and_subnet_pool_are_refused():
    with pytest.raises(ValueError, match="container_user"):
        Config(container_user="root")
    with pytest.raises(ValueError, match="container_exec_tmpfs"):
        Config(container_exec_tmpfs=["/"])
    for pool in ("10.213.0.0/30", "fd00::/64", "10.213.0.1/16", "nonsense"):
        with pytest.raises(ValueError, match="container_subnet_pool"):
            Config(container_subnet_pool=pool)


def test_quoted_input_is_cut():
    with pytest.raises(ValueError) as err:
        Config(kind_runtime={"k": {"user": "9" * 5000}})
    assert len(str(err.value)) < 400


def test_container_tmpfs_options():
    spec = ContainerSpec(name="n", image="i", memory_mb=128, labels={}, user="65534:65534",
                         tmpfs_mb=32, exec_tmpfs=("/action",))
    assert spec.tmpfs() == {
        "/tmp": "rw,noexec,nosuid,nodev,size=32m,mode=1777",
        "/action": "rw,exec,nosuid,nodev,size=32m,uid=65534,gid=65534,mode=0700",
    }
    writable_root = ContainerSpec(name="n", image="i", memory_mb=128, labels={},
                                  read_only=False)
    assert writable_root.tmpfs() == {}


# ------------------------------------------------------------- ops peer filter
def test_ops_refuses_peers_of_action_networks_but_never_loopback():
    refuse_peers_from("198.18.7.0/24")
    assert peer_refused("198.18.7.9")
    assert peer_refused("::ffff:198.18.7.9")  # IPv4-mapped, from a dual-stack listener
    assert not peer_refused("198.18.8.9")
    assert not peer_refused("127.0.0.1") and not peer_refused("::1")
    assert not peer_refused("")  # not an IP peer


# ------------------------------------------------------------------- networks
class FakeNetworkBackend:
    """The network calls of DockerBackend; ``taken`` subnets overlap other networks."""

    def __init__(self, own_id: str | None = None) -> None:
        self.own_id = own_id
        self.networks: dict[str, tuple[str, dict[str, str]]] = {}
        self.internal: set[str] = set()
        self.connected: set[tuple[str, str]] = set()  # (network, container)
        self.taken: set[str] = set()
        self.refuse_removal = False

    async def own_container_id(self) -> str | None:
        return self.own_id

    async def ensure_network(self, name: str, labels: dict[str, str]) -> str:
        self.networks.setdefault(name, ("198.18.100.0/24", dict(labels)))
        return self.networks[name][0]

    async def list_networks(self, label: str) -> list[tuple[str, dict[str, str]]]:
        return [(n, labels) for n, (_, labels) in self.networks.items() if label in labels]

    async def create_network(self, name: str, subnet: str, labels: dict[str, str], *,
                             internal: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        if subnet in self.taken:
            raise SubnetTaken(subnet)
        self.networks[name] = (subnet, dict(labels))
        if internal:
            self.internal.add(name)

    async def connect_network(self, name: str, container_id: str) -> None:
        self.connected.add((name, container_id))

    async def disconnect_network(self, name: str, container_id: str) -> None:
        self.connected.discard((name, container_id))

    async def remove_network(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.refuse_removal:
            raise DockerError("network has active endpoints")
        self.networks.pop(name, None)


def networks_for(backend: Any, pool: str = "10.213.0.0/16", invoker_id: str = "inv"
                 ) -> ActionNetworks:
    return ActionNetworks(backend, invoker_id=invoker_id, owner=ProcessOwner.current(),
                          group="grp", shared_name="invoker-actions", subnet_pool=pool)


async def test_each_container_gets_a_link_network_on_a_free_29_that_goes_with_it():
    backend = FakeNetworkBackend(own_id="self")
    networks = networks_for(backend, pool="10.213.0.0/27")  # four /29s
    await networks.open()
    assert backend.networks["grp"][1][LABEL_NETWORK] == "grp"  # the shared egress network
    names = [await networks.create(f"c{i}") for i in range(3)]
    subnets = {backend.networks[n][0] for n in names}
    assert len(subnets) == 3
    assert all(ipaddress.ip_network(s).subnet_of(ipaddress.ip_network("10.213.0.0/27"))
               for s in subnets)
    assert backend.internal == set(names)
    assert backend.connected == {(n, "self") for n in names}  # this process joined each
    assert backend.networks["c0"][1][LABEL_NETWORK] == "grp"
    for i, name in enumerate(names):
        await networks.attach(name, f"id{i}")
    assert {("grp", f"id{i}") for i in range(3)} <= backend.connected  # egress
    assert networks.gone({"id0", "id1", "id2"}) == []
    assert networks.gone({"id0", "id2"}) == ["c1"]
    await networks.release("c1")
    assert "c1" not in backend.networks and ("c1", "self") not in backend.connected
    await networks.release_all()
    assert set(backend.networks) == {"grp"}  # shared: stays
    assert not {n for n, c in backend.connected if c == "self"}


async def test_a_subnet_held_elsewhere_is_skipped_and_exhaustion_is_an_error():
    backend = FakeNetworkBackend()
    networks = networks_for(backend, pool="10.213.0.0/28")  # two /29s
    backend.taken = {"10.213.0.0/29"}
    name = await networks.create("c0")
    assert backend.networks[name][0] == "10.213.0.8/29"
    with pytest.raises(DockerError, match=f"after {SUBNET_ATTEMPTS} attempts"):
        await networks.create("c1")  # the other one is taken by another network
    assert set(backend.networks) == {"c0"}


async def test_a_refused_removal_is_retried_later_and_leftovers_are_removed_at_open():
    backend = FakeNetworkBackend()
    owner = ProcessOwner.current()
    backend.networks["mine-old"] = ("10.213.9.0/29", {LABEL_NETWORK: "grp",
                                                      "org.invoker.id": "inv"})
    backend.networks["other-live"] = ("10.213.9.8/29", {LABEL_NETWORK: "grp",
                                                        "org.invoker.id": "other",
                                                        **owner.labels()})
    networks = networks_for(backend)
    await networks.open()
    assert set(backend.networks) == {"other-live", "grp"}
    name = await networks.create("c0")
    await networks.attach(name, "id0")
    backend.refuse_removal = True
    await networks.release(name)
    assert name in backend.networks and networks.gone(set()) == []  # not due yet
    backend.refuse_removal = False
    await networks.release_all()
    assert set(backend.networks) == {"other-live", "grp"}
    # one Docker never lets go of is given up after RELEASE_ATTEMPTS tries
    name = await networks.create("c1")
    await networks.attach(name, "id1")
    backend.refuse_removal = True
    for _ in range(RELEASE_ATTEMPTS):
        await networks.release(name)
    assert networks.gone(set()) == [] and name in backend.networks
    await networks.release_all()  # no longer tracked: nothing to try
    assert name in backend.networks


async def test_host_mode_uses_the_shared_network():
    class Shared:
        async def ensure_network(self, name: str, labels: dict[str, str]) -> str:
            assert name == "invoker-actions"
            return "198.18.99.0/24"

    networks = ActionNetworks(Shared(), invoker_id="inv", owner=ProcessOwner.current(),
                              group=None, shared_name="invoker-actions",
                              subnet_pool="10.213.0.0/16")
    await networks.open()
    assert not networks.per_container
    assert await networks.create("c0") == "invoker-actions"
    assert peer_refused("198.18.99.20")  # the ops endpoint now refuses that network


def test_the_fakes_have_the_real_backend_s_methods():
    for name in [*vars(FakeNetworkBackend), "ensure_network"]:
        if not name.startswith("_"):
            assert callable(getattr(DockerBackend, name, None)), name
