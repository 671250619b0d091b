"""Helpers shared by the scenarios: daemons, stores, topics, the fault proxy, sampling."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from invoker.loadgen import store_session
from store import doc_id_for
from tests.support.daemon import COUCHDB, KAFKA, Daemon, Topics

__all__ = ["COUCHDB", "KAFKA", "Daemon", "Topics", "remove_containers"]

DOCKER_TIMEOUT_S = 60.0


def remove_containers(invoker_id: str, timeout_s: float = DOCKER_TIMEOUT_S) -> int:
    """Remove the containers labelled with ``invoker_id`` (as tests.support.daemon does), but
    bounded: a wedged Docker engine (``docker rm -f`` hanging) raises RuntimeError after
    ``timeout_s`` instead of hanging the bench."""
    try:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=org.invoker.id={invoker_id}"],
            capture_output=True, text=True, check=True, timeout=timeout_s).stdout.split()
        if ids:  # some may be gone already
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"docker did not answer within {timeout_s:g} s removing the "
                           f"containers of {invoker_id} ({' '.join(exc.cmd[:3])})") from None
    return len(ids)


def _reachable(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def wait_services(timeout_s: float) -> None:
    """Wait (bounded) until Kafka and pouchdb-server accept connections: on a shared machine
    someone may be restarting them. Raises RuntimeError naming what stayed down."""
    couch = urlsplit(COUCHDB).netloc
    deadline = time.monotonic() + timeout_s
    while True:
        down = [name for name, hostport in (("Kafka", KAFKA), ("pouchdb-server", couch))
                if not _reachable(hostport)]
        if not down:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{' and '.join(down)} not reachable for {timeout_s:g} s "
                               "(make services)")
        time.sleep(1)


def tag() -> str:
    return uuid.uuid4().hex[:10]


def start_daemon(topics: Topics, store_url: str, log_dir: Path, name: str,
                 timeout_s: float = 60.0, command: str = "run", **settings: Any) -> Daemon:
    """A started ``invoker run`` (or ``invoker recorder``: ``command="recorder"``) subprocess
    (info logging unless ``log_level`` is given)."""
    settings.setdefault("log_level", "info")
    env = {"INVOKER_" + k.upper(): str(v) for k, v in settings.items()}
    prefix = "daemon" if command == "run" else command
    daemon = Daemon(topics, store_url, log_dir / f"{prefix}-{name}.log",
                    invoker_id=f"bench{tag()[:8]}", settings=env, command=command)
    try:
        return daemon.start(timeout_s=timeout_s)
    except BaseException:
        daemon.stop_quietly()
        remove_containers(daemon.invoker_id)
        raise


def wait_assigned(daemon: Daemon, timeout_s: float) -> bool:
    """Wait (bounded) until the daemon's log shows a non-empty partition assignment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in daemon.log_events("partitions assigned"):
            try:
                if json.loads(line).get("partitions"):
                    return True
            except ValueError:
                continue
        if daemon.process is not None and daemon.process.poll() is not None:
            return False
        time.sleep(0.25)
    return False


def wait_topic_metadata(topic: str, timeout_s: float = 15.0) -> None:
    """Wait (bounded) until a client sees the topic's partitions."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=KAFKA, client_id="bench")
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        consumer.close()


def launch(errors: Callable[[str], None], store_url: str, log_dir: Path, name: str,
           attempts: int = 2, assign_timeout_s: float = 30.0,
           **settings: Any) -> tuple[Daemon, Topics]:
    """Fresh topics and a started daemon that owns the feed's partitions.

    A daemon that does not get partitions within ``assign_timeout_s`` is reported through
    ``errors`` (with its CPU use and log tail as evidence), killed, and replaced once, on new
    topics.
    """
    for attempt in range(1, attempts + 1):
        topics = Topics.create()
        wait_topic_metadata(topics.feed)
        suffix = name if attempt == 1 else f"{name}-retry{attempt - 1}"
        try:
            daemon = start_daemon(topics, store_url, log_dir, suffix, **settings)
        except BaseException:
            delete_topics(topics)
            raise
        if wait_assigned(daemon, assign_timeout_s):
            return daemon, topics
        before = metric_samples(daemon)
        time.sleep(2)
        after = metric_samples(daemon)
        cpu = "n/a"
        if before and after:
            used = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
            cpu = f"{used / 2:.2f} cores"
        tail = " | ".join(line[:160] for line in daemon.log_tail(6).splitlines())
        errors(f"daemon {daemon.invoker_id} ({suffix}) got no partitions within "
               f"{assign_timeout_s:g} s (CPU while idle: {cpu}); log {daemon.log_path}: {tail}")
        stop_daemon(daemon, graceful=False)
        delete_topics(topics)
    raise RuntimeError(f"no daemon got partitions in {attempts} attempts")


def stop_daemon(daemon: Daemon, *, graceful: bool = True) -> int | None:
    """SIGTERM (bounded wait, then SIGKILL) or SIGKILL; then remove its containers."""
    code = None
    try:
        if daemon.process is not None and daemon.process.poll() is None:
            if graceful:
                try:
                    code = daemon.terminate(timeout_s=45)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            else:
                daemon.kill()
    finally:
        remove_containers(daemon.invoker_id)
    return code


def delete_topics(topics: Topics) -> None:
    """Best effort: the bench leaves no topics behind."""
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="bench",
                                 request_timeout_ms=10_000)
    except Exception:
        return
    try:
        names = [getattr(topics, attr) for attr in ("feed", "completions", "dead_letters",
                                                     "overflow") if hasattr(topics, attr)]
        admin.delete_topics(names, timeout_ms=10_000)
    except Exception:
        pass
    finally:
        admin.close()


def new_couch_db() -> tuple[str, str]:
    """(database name, URL) of a fresh, not yet created database on pouchdb-server."""
    name = f"bench-{tag()}"
    return name, f"{COUCHDB.rstrip('/')}/{name}"


def delete_couch_db(url: str) -> None:
    try:
        httpx.delete(url, timeout=30)
    except httpx.HTTPError:
        pass


def read_records(url: str, namespace: str, activation_ids: list[str],
                 timeout_s: float = 120.0) -> dict[str, dict]:
    """Records by activation id (only those present)."""

    async def body(store: Any) -> dict[str, dict]:
        found: dict[str, dict] = {}
        ids = [doc_id_for(namespace, a) for a in activation_ids]
        for start in range(0, len(ids), 500):
            found.update(await store.get_many(ids[start:start + 500]))
        return {doc["activationId"]: doc for doc in found.values()}

    return store_session(url, body, timeout_s)


class ProxyProcess:
    """The fault proxy (tests/support/faultproxy.py) in its own process, steered through its
    control file (as tests/integration/conftest.py does)."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.control = workdir / f"proxy-control-{tag()}.json"
        self.set(latency=0.0, down=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.faultproxy", "--target", target,
             "--listen", "127.0.0.1:0", "--control-file", str(self.control)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.close()
            raise RuntimeError(f"fault proxy did not start (said {line!r})")
        self.port = int(line)

    def set(self, *, latency: float, down: bool) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"latency": latency, "down": down}))
        tmp.rename(self.control)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


_metrics_client: httpx.Client | None = None


def metric_samples(daemon: Daemon, timeout_s: float = 2.0) -> dict[str, float] | None:
    """The daemon's /metrics as name → value (labels folded in), or None if it did not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    global _metrics_client
    if _metrics_client is None:  # one client: a new one per request costs tens of ms
        _metrics_client = httpx.Client(trust_env=False)
    try:
        text = _metrics_client.get(daemon.url("/metrics"), timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
