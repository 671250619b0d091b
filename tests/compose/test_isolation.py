"""Actions in the compose stack reach neither each other nor the invoker's /metrics.

The invoker runs in a container, so each action container gets an internal link network of its
own that only the invoker joins, and the shared egress network with inter-container traffic off
(invoker.networks). Probes go only to containers of the stack and to the egress network's
gateway (the host's address there).
Runs before test_stack.py (file order) and leaves the stack as it found it.
"""

import json
import subprocess
import uuid

from invoker.loadgen import activation_message, produce_messages, read_completions
from invoker.networks import LABEL_NETWORK
from tests.support.compose import BOOTSTRAP, PROJECT

NS = "isolation"
COMPLETIONS_TOPIC = "invoker-completions"
FEED_TOPIC = "invoker-activations"
EGRESS = f"{PROJECT}-net"  # the stack's INVOKER_NETWORK: the action containers' way out

PROBE = """
import socket

def outcome(host, port, http):
    sock = socket.socket()
    sock.settimeout(1.0)
    try:
        sock.connect((host, port))
    except OSError as exc:
        return type(exc).__name__
    try:
        if not http:
            return "connected"
        sock.sendall(b"GET /healthz HTTP/1.0\\r\\n\\r\\n")
        return "answered" if sock.recv(64).startswith(b"HTTP") else "closed"
    except OSError:
        return "closed"
    finally:
        sock.close()

def main(args):
    return {label: outcome(host, port, http) for label, host, port, http in args["targets"]}
"""


def activate(name: str, code: str, params: dict) -> dict:
    message = activation_message("echo", NS, blocking=True,
                                 limits={"timeout": 30000, "memory": 128})
    message["action"].update(name=name, code=code)
    message["params"] = params
    aid = message["activationId"]
    produce_messages(BOOTSTRAP, FEED_TOPIC, [message])
    completions = read_completions(BOOTSTRAP, COMPLETIONS_TOPIC, {aid}, 120)
    assert aid in completions, f"no completion for {name}"
    return completions[aid][0]


def docker_json(*args: str):
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True,
                         timeout=60)
    return json.loads(out.stdout)


def container_of(invoker_id: str, action: str) -> dict:
    (cid,) = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=org.invoker.id={invoker_id}",
         "--filter", f"label=org.invoker.action={action}"],
        capture_output=True, text=True, check=True, timeout=60).stdout.split()
    (info,) = docker_json("inspect", cid)
    return info


def addresses(info: dict) -> tuple[str, str, str]:
    """(link network name, address there, address on the egress network) of a container."""
    networks = info["NetworkSettings"]["Networks"]
    (link,) = set(networks) - {EGRESS}
    return link, networks[link]["IPAddress"], networks[EGRESS]["IPAddress"]


def test_actions_reach_neither_each_other_nor_the_invoker(stack):
    (health,) = stack.wait_owning_partitions(1)
    tag = uuid.uuid4().hex[:6]
    assert activate(f"target-{tag}", "def main(a):\n    return {}", {})["status"] == "success"
    target = container_of(health["id"], f"target-{tag}")
    _, target_link_ip, target_egress_ip = addresses(target)
    first = activate(f"probe-{tag}", PROBE, {"targets": []})  # creates the probe's container
    assert first["status"] == "success", first
    probe_link, _, _ = addresses(container_of(health["id"], f"probe-{tag}"))

    (link,) = docker_json("network", "inspect", probe_link)
    assert link["Internal"] is True and link["Labels"][LABEL_NETWORK] == EGRESS
    members = {c["Name"]: c["IPv4Address"].split("/")[0] for c in link["Containers"].values()}
    invoker_ip = members.pop(f"{PROJECT}-invoker-1")  # the invoker joined it ...
    assert list(members) == [container_of(health["id"], f"probe-{tag}")["Name"].lstrip("/")]
    (egress,) = docker_json("network", "inspect", EGRESS)
    assert egress["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    egress_members = {c["Name"] for c in egress["Containers"].values()}
    assert f"{PROJECT}-invoker-1" not in egress_members  # ... and only that one
    egress_gateway = egress["IPAM"]["Config"][0]["Gateway"]
    ops_host_port = int(stack.metrics_urls("invoker")[0].split(":")[2].split("/")[0])

    probe = activate(f"probe-{tag}", PROBE, {"targets": [
        ["other action", target_link_ip, 8080, False],
        ["other action, egress", target_egress_ip, 8080, False],
        ["invoker ops", invoker_ip, 9180, True],
        ["gateway ops", egress_gateway, 9180, True],
        ["gateway, published ops", egress_gateway, ops_host_port, True],
    ]})
    assert probe["status"] == "success", probe
    reached = probe["result"]
    print(f"probe from an action container: {reached}")
    assert reached["other action"] in ("TimeoutError", "ConnectionRefusedError")
    assert reached["other action, egress"] in ("TimeoutError", "ConnectionRefusedError")
    # the invoker accepts the connection on the probe's link network: only the ops
    # endpoint's refusal keeps its /metrics from the action
    assert reached["invoker ops"] == "closed"
    assert "answered" not in reached.values()
    # the invoker's published ops port still leads to it (its default route and port
    # mappings stayed on the stack's network)
    assert stack.healthz(stack.metrics_urls("invoker")[0])["ok"]
