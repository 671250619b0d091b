"""A hostile action against the daemon's hardening, with the real daemon, engine and broker.

One daemon (host mode, the default: action containers on the shared bridge network
``invoker-actions`` with inter-container traffic off, no port published, each reached at its
address there) serves
every test here. Its ``/metrics`` listens on 0.0.0.0, as in compose, so that the host's address
on the action network (the gateway) does lead to it and only the ops endpoint's own refusal
keeps actions out.

Probes go only to loopback, to containers these tests started and to the gateway of the action
network (the host's address there).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import httpx
import pytest

from invoker.containers.pool import PoolConfig
from invoker.loadgen import activation_message, produce_messages, read_completions
from invoker.networks import LABEL_NETWORK
from tests.support.daemon import KAFKA, Daemon, Topics, settings_env, stored_records

NS = "isolation"
PYTHON_IMAGE = "invoker-action-python:latest"
ACTIONLOOP_IMAGE = "invoker-action-actionloop:latest"
NO_BINARY = "The action failed to generate or locate a binary. See logs for details."

PROBE = """
import socket

def main(args):
    out = {}
    for label, host, port in args["targets"]:
        if host == "self":
            host = socket.gethostbyname(socket.gethostname())
        sock = socket.socket()
        sock.settimeout(1.0)
        try:
            sock.connect((host, port))
            if label.endswith("ops"):
                sock.sendall(b"GET /healthz HTTP/1.0\\r\\n\\r\\n")
                out[label] = "answered" if sock.recv(64).startswith(b"HTTP") else "closed"
            else:
                out[label] = "connected"
        except OSError as exc:
            out[label] = type(exc).__name__
        finally:
            sock.close()
    return out
"""

LOOP_ACTION = """
import os, subprocess

def main(args):
    print("hello from", os.getcwd())
    try:
        with open("/tmp/x.sh", "w") as fh:
            fh.write("#!/bin/sh\\necho tmp exec\\n")
        os.chmod("/tmp/x.sh", 0o755)
        subprocess.run(["/tmp/x.sh"], check=True)
        tmp_exec = True
    except OSError:
        tmp_exec = False
    return {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
            "greeting": os.environ.get("LOOP_GREETING"), "name": args.get("name"),
            "tmp_exec": tmp_exec, "activation": os.environ.get("__OW_ACTIVATION_ID")}
"""


def docker_json(*args: str) -> Any:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True,
                         timeout=30)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    d = Daemon(Topics.create(), f"sqlite:///{tmp}/records.sqlite3", tmp / "run.log",
               settings=settings_env({
                   "metrics_host": "0.0.0.0",
                   "kind_images": json.dumps({"python:3": PYTHON_IMAGE,
                                              "loop:test": ACTIONLOOP_IMAGE,
                                              "loop:old": ACTIONLOOP_IMAGE}),
                   "kind_runtime": json.dumps({
                       "loop:test": {"env": {"LOOP_GREETING": "hi from kind_runtime"}},
                       # the settings before issue 8: no writable, exec-able /action
                       "loop:old": {"exec_tmpfs": []},
                   }),
               }))
    d.start()
    yield d
    status = d.terminate()
    d.topics.delete()
    print("--- daemon log (non-debug tail) ---")
    print("\n".join([line for line in d.log_path.read_text(errors="replace").splitlines()
                     if '"level": "debug"' not in line][-30:]))
    assert status == 0
    left = subprocess.run(["docker", "ps", "-aq", "--filter",
                           f"label=org.invoker.id={d.invoker_id}"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    assert left == [], "the daemon left action containers behind"


def activate(daemon: Daemon, name: str, kind: str, code: str,
             params: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """Run one blocking activation; its completion and its stored record."""
    message = activation_message("echo", NS, blocking=True,
                                 limits={"timeout": 20000, "memory": 128})
    message["action"].update(name=name, kind=kind, code=code)
    message["params"] = params or {}
    aid = message["activationId"]
    produce_messages(KAFKA, daemon.topics.feed, [message])
    completions = read_completions(KAFKA, daemon.topics.completions, {aid}, 60)
    assert aid in completions, f"no completion for {name}:\n{daemon.log_tail()}"
    records, _ = stored_records(daemon.store_url, {aid: NS})
    return completions[aid][0], records[aid]


def container_of(daemon: Daemon, kind: str) -> dict:
    (cid,) = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=org.invoker.id={daemon.invoker_id}",
         "--filter", f"label=org.invoker.kind={kind}"],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    (info,) = docker_json("inspect", cid)
    return info


def test_actionloop_runtime_runs_hardened(daemon):
    completion, record = activate(daemon, "loop-hello", "loop:test", LOOP_ACTION, {"name": "x"})
    assert completion["status"] == "success", completion
    result = completion["result"]
    assert result["uid"] == 65534 and result["gid"] == 65534
    assert result["cwd"] == "/action/1"  # the proxy wrote and exec'd /action/1/bin/exec
    assert result["greeting"] == "hi from kind_runtime"  # kind_runtime's env
    assert result["name"] == "x" and result["activation"] == completion["activationId"]
    assert result["tmp_exec"] is False  # /tmp stays noexec
    assert any("hello from /action/1" in line for line in record["logs"]), record["logs"]

    info = container_of(daemon, "loop:test")
    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
    assert host["PidsLimit"] == PoolConfig(invoker_id="x").pids_limit
    assert info["Config"]["User"] == "65534:65534"
    action_tmpfs = host["Tmpfs"]["/action"].split(",")
    assert {"rw", "exec", "nosuid", "nodev", "uid=65534", "gid=65534", "mode=0700"} <= set(
        action_tmpfs)
    assert "noexec" in host["Tmpfs"]["/tmp"].split(",")
    assert list(info["NetworkSettings"]["Networks"]) == ["invoker-actions"]
    assert not host["PortBindings"]  # reached at its address: nothing listens on the host


def test_actionloop_runtime_fails_under_the_old_settings(daemon):
    """Without an exec-able /action (container_exec_tmpfs [] for this kind) /init fails."""
    completion, record = activate(daemon, "loop-old", "loop:old", LOOP_ACTION)
    assert completion["status"] == "action developer error", completion
    assert completion["result"] == {"error": NO_BINARY}
    assert any("Read-only file system: '/action/1'" in line for line in record["logs"]), (
        record["logs"])


def test_actions_reach_neither_each_other_nor_the_ops_endpoint(daemon):
    first, _ = activate(daemon, "target", "python:3", "def main(a):\n    return {'ok': 1}")
    assert first["status"] == "success", first
    target = container_of(daemon, "python:3")
    target_ip = target["NetworkSettings"]["Networks"]["invoker-actions"]["IPAddress"]
    # nothing of it listens on the host (a published port would be open on the gateway too)
    ports = target["NetworkSettings"]["Ports"] or {}
    assert not any(ports.values()), target["NetworkSettings"]
    (network,) = docker_json("network", "inspect", "invoker-actions")
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert LABEL_NETWORK not in network["Labels"]  # the shared one, not a per-container one
    gateway = network["IPAM"]["Config"][0]["Gateway"]
    assert httpx.get(daemon.url("/healthz"), timeout=5).status_code == 200  # loopback: served

    targets = [["self", "self", 8080],  # control: the probe itself can connect
               ["other action", target_ip, 8080],
               ["gateway ops", gateway, daemon.port]]
    completion, _ = activate(daemon, f"probe-{uuid.uuid4().hex[:6]}", "python:3", PROBE,
                             {"targets": targets})
    assert completion["status"] == "success", completion
    reached = completion["result"]
    print(f"probe from an action container: {reached}")
    assert reached["self"] == "connected"
    assert reached["other action"] in ("TimeoutError", "ConnectionRefusedError")
    assert reached["gateway ops"] != "answered"
