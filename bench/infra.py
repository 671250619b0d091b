"""Helpers shared by the scenarios: daemons, stores, topics, the fault proxy, sampling."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from invoker.loadgen import Report, store_session
from store import Outcome
from tests.support import daemon as support
from tests.support.daemon import COUCHDB, KAFKA, Daemon, Topics, parse_samples, settings_env

DOCKER_TIMEOUT_S = 60.0


def remove_containers(invoker_id: str, timeout_s: float = DOCKER_TIMEOUT_S) -> int:
    """Remove the containers labelled with ``invoker_id`` (tests.support.daemon's), but
    bounded: a wedged Docker engine (``docker rm -f`` hanging) raises RuntimeError after
    ``timeout_s`` instead of hanging the bench."""
    return support.remove_containers(invoker_id, timeout_s)


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
                 timeout_s: float = 60.0, command: str = "run",
                 env: dict[str, str] | None = None, **settings: Any) -> Daemon:
    """A started ``invoker run`` (or ``invoker recorder``: ``command="recorder"``) subprocess
    (info logging unless ``log_level`` is given); ``env``: more environment variables for it."""
    settings.setdefault("log_level", "info")
    prefix = "daemon" if command == "run" else command
    daemon = Daemon(topics, store_url, log_dir / f"{prefix}-{name}.log",
                    invoker_id=f"bench{tag()[:8]}",
                    settings={**settings_env(settings), **(env or {})}, command=command)
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
           attempts: int = 2, assign_timeout_s: float = 30.0, env: dict[str, str] | None = None,
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
            daemon = start_daemon(topics, store_url, log_dir, suffix, env=env, **settings)
        except BaseException:
            topics.delete()
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
        topics.delete()
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


def new_couch_db() -> tuple[str, str]:
    """(database name, URL) of a fresh, not yet created database on pouchdb-server."""
    name = f"bench-{tag()}"
    return name, f"{COUCHDB.rstrip('/')}/{name}"


def delete_couch_db(url: str) -> None:
    try:
        httpx.delete(url, timeout=30)
    except httpx.HTTPError:
        pass


def load_problems(report: Report, what: str) -> list[str]:
    """What went wrong in a load run (``what`` names it): an activation not completed or not
    stored once, and the report's errors."""
    problems = []
    if (report.completed < report.produced or report.stored < report.produced or report.lost
            or report.duplicate_records):
        problems.append(f"{what}: produced {report.produced}, completed {report.completed}, "
                        f"stored {report.stored}, lost {report.lost}, duplicates "
                        f"{report.duplicate_records}")
    problems += [f"{what}: {e}" for e in report.errors]
    return problems


def store_rate(url: str, template: Mapping[str, Any], batch_size: int, total: int,
               time_limit_s: float, writers: int = 1) -> tuple[int, float]:
    """(records written, seconds): copies of ``template`` (new ids, fresh namespace) written
    with store.write_batch in batches of ``batch_size``, ``writers`` writes at a time, until
    ``total`` records or ``time_limit_s`` (a batch is not started after it)."""
    import trio

    namespace = f"bench-store-{uuid.uuid4().hex[:8]}"
    base = {k: v for k, v in template.items() if k not in ("_id", "_rev")}
    batches = iter([
        [dict(base, namespace=namespace, activationId=uuid.uuid4().hex)
         for _ in range(batch_size)]
        for _ in range(max(1, total // batch_size))
    ])

    async def body(store: Any) -> tuple[int, float]:
        written = 0
        t0 = trio.current_time()

        async def writer() -> None:
            nonlocal written
            for batch in batches:
                if trio.current_time() - t0 >= time_limit_s:
                    return
                results = await store.write_batch(batch)
                bad = [r for r in results if r.outcome is not Outcome.STORED]
                if bad:
                    raise RuntimeError(f"{len(bad)} records not newly stored, e.g. {bad[0]}")
                written += len(batch)

        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(writer)
        return written, trio.current_time() - t0

    return store_session(url, body, time_limit_s + 60)


_metrics_client: httpx.Client | None = None


def metric_samples(daemon: Daemon, timeout_s: float = 2.0) -> dict[str, float] | None:
    """The daemon's /metrics as name → value (labels folded in), or None if it did not answer."""
    global _metrics_client
    if _metrics_client is None:  # one client: a new one per request costs tens of ms
        _metrics_client = httpx.Client(trust_env=False)
    try:
        text = _metrics_client.get(daemon.url("/metrics"), timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    return parse_samples(text)


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
