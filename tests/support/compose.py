"""Driving the docker compose stack (deploy/docker-compose.yml) from tests.

Everything goes through deploy/compose/compose.sh, the wrapper a user runs: Compose v2, the
offline override. The stack gets its own project name and host ports, so a stack a
developer runs with the defaults is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.daemon import read_metrics, topic_lag, wait_for
from tests.support.engine import stuck_engine_report

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SH = REPO / "deploy" / "compose" / "compose.sh"
PROJECT = "invoker-test"
KAFKA_PORT = 39092
COUCHDB_PORT = 35984
COUCHDB_PASSWORD = "invoker-test-only"
STORE_URL = f"http://admin:{COUCHDB_PASSWORD}@127.0.0.1:{COUCHDB_PORT}/activations"
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
# the stack's default topic and group names (deploy/docker-compose.yml sets none)
FEED_TOPIC, INVOKER_GROUP = "invoker-activations", "invoker"
OVERFLOW_TOPIC, RECORDER_GROUP = "invoker-overflow", "invoker-recorder"
LOGS_DIR = Path(os.environ.get("INVOKER_STATE", "/tmp/invoker-state")) / "compose-test"


class Stack:
    """One compose project. ``env`` is the environment of every compose command: change it
    (e.g. INVOKER_OVERFLOW_ENABLED) and ``up`` recreates the services it concerns."""

    def __init__(self) -> None:
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "KAFKA_HOST_PORT": str(KAFKA_PORT),
            "COUCHDB_HOST_PORT": str(COUCHDB_PORT),
            "COUCHDB_PASSWORD": COUCHDB_PASSWORD,
            "INVOKER_METRICS_HOST_PORTS": "39180-39189",
            "RECORDER_METRICS_HOST_PORTS": "39190-39199",
        }
        self.engine_stuck = ""  # why compose commands are no longer run, once they are not

    def compose(self, *args: str, timeout_s: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        if self.engine_stuck:  # every later command would wait out its timeout too
            raise AssertionError(f"compose {' '.join(args)} not run, as the Docker engine "
                                 f"stopped answering earlier: {self.engine_stuck}")
        try:
            result = subprocess.run([str(COMPOSE_SH), *args], env=self.env, text=True,
                                    capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            try:
                stuck = stuck_engine_report()
            except Exception as report_failed:  # the failure to report is the timeout
                stuck = f"the Docker engine's state is unknown ({report_failed!r})"
            self.engine_stuck = stuck or ""
            stderr = exc.stderr if isinstance(exc.stderr, str) else (
                (exc.stderr or b"").decode(errors="replace"))
            raise AssertionError(
                f"compose {' '.join(args)} did not end within {timeout_s:.0f} s; "
                f"{stuck or 'the Docker engine answers'}\n{stderr[-3000:]}") from exc
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stderr[-3000:]}")
        return result

    def up(self, *args: str) -> None:
        self.compose("up", "--detach", "--wait", "--wait-timeout", "240", *args, timeout_s=420)

    def down(self) -> None:
        """Containers (action containers included), networks and volumes."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "60", timeout_s=300)

    def save_logs(self) -> Path:
        LOGS_DIR.mkdir(parents=True, exist_ok=True)
        path = LOGS_DIR / "compose.log"
        logs = self.compose("logs", "--no-color", "--timestamps", check=False, timeout_s=120)
        path.write_text(logs.stdout + logs.stderr)
        return path

    def leftovers(self) -> dict[str, list[str]]:
        """What the project still has on the engine: containers (its own and action containers
        on its network), networks, volumes. Empty lists when it is all gone."""
        def ids(*cmd: str) -> list[str]:
            out = subprocess.run(["docker", *cmd], capture_output=True, text=True, timeout=60)
            return out.stdout.split()

        label = f"label=com.docker.compose.project={PROJECT}"
        actions = f"label=org.invoker.network={PROJECT}-net"
        # The shared egress network is left out: Docker 20.10 was seen to keep one "with active
        # endpoints" after every container on it was gone (compose.sh down warns about it).
        egress = set(ids("network", "ls", "-q", "--filter", f"name=^{PROJECT}-net$"))
        return {
            "containers": ids("ps", "-aq", "--filter", label),
            "action containers": ids("ps", "-aq", "--filter", actions),
            "networks": ids("network", "ls", "-q", "--filter", label),
            "action networks": [n for n in ids("network", "ls", "-q", "--filter", actions)
                                if n not in egress],
            "volumes": ids("volume", "ls", "-q", "--filter", label),
        }

    # ------------------------------------------------------------------ services
    def metrics_urls(self, service: str) -> list[str]:
        """/metrics of every running replica of ``service`` (invoker or recorder)."""
        port = {"invoker": "9180", "recorder": "9181"}[service]
        count = len(self.compose("ps", "--quiet", service).stdout.split())
        urls = []
        for index in range(1, count + 1):
            address = self.compose("port", "--index", str(index), service, port).stdout.strip()
            urls.append(f"http://{address}/metrics")
        return urls

    def metrics(self, service: str = "invoker") -> dict[str, float]:
        """Samples of the single replica of ``service``."""
        (url,) = self.metrics_urls(service)
        return read_metrics(url)

    def healthz(self, metrics_url: str) -> dict:
        return httpx.get(metrics_url.replace("/metrics", "/healthz"), timeout=5).json()

    def wait_owning_partitions(self, replicas: int, timeout_s: float = 120) -> list[dict]:
        """Until ``replicas`` invokers answer /healthz and together own every feed partition.
        On a timeout the error says what was last seen (each replica's partitions and health,
        or why /healthz did not answer)."""
        seen = "nothing yet"

        def settled():
            nonlocal seen
            try:
                states = [self.healthz(url) for url in self.metrics_urls("invoker")]
            except (httpx.HTTPError, ValueError) as exc:
                seen = f"/healthz: {type(exc).__name__}: {exc}"
                return None
            owned = [p for s in states for p in s["partitions"]]
            if len(states) == replicas and len(owned) == 4 and len(set(owned)) == 4:
                return states
            seen = "; ".join(f"{s.get('id')}: partitions {s.get('partitions')}, ok "
                                f"{s.get('ok')} {s.get('reasons')}" for s in states) or "none"
            return None

        try:
            return wait_for(settled, timeout_s,
                            f"{replicas} invoker(s) owning the 4 feed partitions", interval_s=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen}") from None

    def wait_offsets_committed(self, timeout_s: float = 60) -> None:
        wait_for(lambda: topic_lag(INVOKER_GROUP, FEED_TOPIC, BOOTSTRAP) == 0, timeout_s,
                 "the invokers' offsets committed to the end of the feed", interval_s=1)

    def wait_overflow_drained(self, timeout_s: float = 60) -> None:
        wait_for(lambda: topic_lag(RECORDER_GROUP, OVERFLOW_TOPIC, BOOTSTRAP) == 0, timeout_s,
                 "the recorders' offsets committed to the end of the overflow topic",
                 interval_s=1)


class LoadRun:
    """``invoker loadgen`` on this machine against the stack, in the background."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "invoker.cli", "loadgen", "--bootstrap", BOOTSTRAP,
             "--store-url", STORE_URL, "--json", "--no-progress", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.process.poll() is None

    def report(self, timeout_s: float = 400) -> dict:
        """The JSON report once it exits (it exits 1 when something was lost)."""
        out, err = self.process.communicate(timeout=timeout_s)
        if not out.strip():
            raise AssertionError(f"loadgen exited {self.process.returncode} with no report:\n"
                                 f"{err[-3000:]}")
        return json.loads(out)

    def stop(self) -> None:
        if self.running():
            self.process.kill()
            self.process.communicate()


def assert_nothing_lost(report: dict) -> None:
    """Every activation produced, stored exactly once and completed."""
    summary = {k: report[k] for k in ("produced", "stored", "completed", "lost",
                                      "duplicate_records", "produce_errors", "missing_completions",
                                      "repeated_completions", "store_checked", "errors")}
    print(f"loadgen: {summary} {report['throughput_per_s']:.1f}/s in {report['wall_s']:.1f} s")
    assert report["produced"] > 0, summary
    assert report["produce_errors"] == 0, summary
    assert report["store_checked"], summary
    assert report["lost"] == 0, summary
    assert report["duplicate_records"] == 0, summary
    assert report["stored"] == report["produced"], summary
    assert report["completed"] == report["produced"], summary
    assert report["ok"], summary
