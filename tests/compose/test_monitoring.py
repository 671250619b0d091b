"""The "monitoring" compose profile: Prometheus finds every invoker and recorder replica by DNS,
scrapes them, and evaluates the alerting rules of deploy/monitoring on what it scrapes.

Runs on the shared stack with two recorders (so discovery has to find more than one replica)
and leaves it as it found it: Prometheus and its volume removed, one recorder.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.compose import PROJECT, Stack
from tests.support.daemon import wait_for

PROMETHEUS_PORT = 39090
PROMETHEUS = f"http://127.0.0.1:{PROMETHEUS_PORT}"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "rules.yml"
METRICS_PORTS = {"invoker": 9180, "recorder": 9181}


def api(path: str, **params: str) -> dict | list:
    """``data`` of a Prometheus API answer (bounded: 5 s)."""
    answer = httpx.get(f"{PROMETHEUS}/api/v1/{path}", params=params, timeout=5)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def metrics_address(container: str, service: str) -> str:
    """ip:port of the container's metrics endpoint on the stack's network: the target's
    instance label (DNS discovery gives addresses)."""
    networks = json.loads(docker("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                                 container))
    return f"{networks[f'{PROJECT}_default']['IPAddress']}:{METRICS_PORTS[service]}"


def replica_addresses(stack: Stack, service: str) -> set[str]:
    return {metrics_address(container, service)
            for container in stack.compose("ps", "--quiet", service).stdout.split()}


def alerting(alertname: str) -> set[str]:
    """Instances ``alertname`` is pending or firing for."""
    return {alert["labels"]["instance"] for alert in api("alerts")["alerts"]
            if alert["labels"]["alertname"] == alertname}


def active_targets() -> list[dict]:
    try:
        return api("targets", state="active")["activeTargets"]
    except httpx.HTTPError:
        return []


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[Stack]:
    stack.env["PROMETHEUS_HOST_PORT"] = str(PROMETHEUS_PORT)
    profile = ("--profile", "monitoring")
    stack.up("--scale", "recorder=2")
    try:
        stack.compose(*profile, "up", "--detach", "--wait", "--wait-timeout", "240",
                      "prometheus", timeout_s=420)
        yield stack
    finally:
        stack.compose(*profile, "rm", "--stop", "--force", "prometheus", timeout_s=120)
        docker("volume", "rm", "--force", f"{PROJECT}_prometheus-data")
        stack.up("--scale", "recorder=1")


def test_every_invoker_and_recorder_replica_is_scraped(prometheus: Stack) -> None:
    expected = {service: replica_addresses(prometheus, service) for service in METRICS_PORTS}
    assert len(expected["invoker"]) == 1 and len(expected["recorder"]) == 2, expected

    def all_up() -> dict[str, set[str]] | None:
        up: dict[str, set[str]] = {}
        for target in active_targets():
            if target["health"] == "up":
                up.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
        return up if up == expected else None

    # discovery at start, then the first scrape: within a scrape interval (15 s) or two
    wait_for(all_up, 90, f"Prometheus scraping {expected}", interval_s=2)
    # what it scraped is the daemons' metrics, one series per replica
    slots = api("query", query='invoker_slots_total{job="invoker"}')["result"]
    assert {s["metric"]["instance"] for s in slots} == expected["invoker"]
    depth = api("query", query='invoker_record_channel_depth{job="recorder"}')["result"]
    assert {s["metric"]["instance"] for s in depth} == expected["recorder"]


def test_the_alerting_rules_are_loaded_and_evaluate(prometheus: Stack) -> None:
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))

    def evaluated() -> dict[str, dict] | None:
        rules = {rule["name"]: rule for group in api("rules", type="alert")["groups"]
                 for rule in group["rules"]}
        # "unknown" until the first evaluation (every 15 s)
        return rules if all(r["health"] != "unknown" for r in rules.values()) else None

    rules = wait_for(evaluated, 60, "every alerting rule evaluated once", interval_s=2)
    assert set(rules) == alerts
    # "err" would be a query that fails on the real series (e.g. a vector matching error)
    assert {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"} == {}


def test_a_replica_that_stops_answering_raises_its_alert(prometheus: Stack) -> None:
    """A frozen recorder stays in DNS but its scrapes time out: up == 0, so
    InvokerDaemonDown is pending for that replica alone (it fires after 2 minutes)."""
    container = prometheus.compose("ps", "--quiet", "recorder").stdout.split()[-1]
    frozen = metrics_address(container, "recorder")
    docker("pause", container)
    try:
        # one scrape to fail (15 s + 5 s timeout), then one evaluation (15 s)
        assert wait_for(lambda: alerting("InvokerDaemonDown"), 90,
                        f"InvokerDaemonDown for {frozen}", interval_s=2) == {frozen}
    finally:
        docker("unpause", container)
    wait_for(lambda: not alerting("InvokerDaemonDown"), 90,
             "InvokerDaemonDown resolved after the unpause", interval_s=2)
