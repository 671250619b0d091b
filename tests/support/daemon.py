"""Running the real ``invoker run`` as a subprocess, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from kafka.admin import KafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from invoker.config import ENV_PREFIX
from invoker.loadgen import STORE_CHUNK, STORE_TIMEOUT_S, LoadSpec, store_session
from store import doc_id_for

KAFKA = os.environ.get("INVOKER_TEST_KAFKA", "127.0.0.1:9092")
COUCHDB = os.environ.get("INVOKER_TEST_COUCHDB_URL", "http://127.0.0.1:5984")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Topics:
    feed: str
    completions: str
    dead_letters: str
    overflow: str
    group: str
    recorder_group: str

    @classmethod
    def create(cls, partitions: int = 4) -> Topics:
        tag = uuid.uuid4().hex[:10]
        topics = cls(f"t-{tag}-feed", f"t-{tag}-done", f"t-{tag}-dlq", f"t-{tag}-overflow",
                     f"g-{tag}", f"g-{tag}-rec")
        admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
        try:
            admin.create_topics(
                [
                    NewTopic(t, partitions, 1)
                    for t in (topics.feed, topics.completions, topics.dead_letters,
                              topics.overflow)
                ]
            )
        finally:
            admin.close()
        return topics

    def delete(self) -> None:
        """Best effort: a broker that keeps every topic of every run slows down (3,000 left
        over on a development machine had it at 13 % of a core while idle)."""
        try:
            admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests",
                                     request_timeout_ms=10_000)
        except Exception:
            return
        try:
            admin.delete_topics([self.feed, self.completions, self.dead_letters, self.overflow],
                                timeout_ms=10_000)
        except Exception:  # noqa: BLE001 - gone already (a test deleted one), or Kafka is down
            pass
        finally:
            admin.close()

    def env(self) -> dict[str, str]:
        return {
            "INVOKER_FEED_TOPIC": self.feed,
            "INVOKER_COMPLETIONS_TOPIC": self.completions,
            "INVOKER_DEAD_LETTER_TOPIC": self.dead_letters,
            "INVOKER_GROUP_ID": self.group,
            "INVOKER_OVERFLOW_TOPIC": self.overflow,
            "INVOKER_RECORDER_GROUP_ID": self.recorder_group,
        }


@dataclass
class Daemon:
    """One ``invoker run`` (or ``invoker recorder``) process; its stderr (JSON logs) goes to
    ``log_path``."""

    topics: Topics
    store_url: str
    log_path: Path
    invoker_id: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:8])
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    command: str = "run"
    process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> Daemon:
        env = {
            **os.environ,
            **self.topics.env(),
            "INVOKER_KAFKA_BOOTSTRAP": KAFKA,
            "INVOKER_STORE_URL": self.store_url,
            "INVOKER_LOG_LEVEL": "debug",
            **self._identity(),
            **self.settings,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "invoker.cli", self.command], env=env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}:\n" + self.log_tail()
                )
            try:
                if httpx.get(self.url("/healthz"), timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("daemon did not become healthy:\n" + self.log_tail())

    def _identity(self) -> dict[str, str]:
        if self.command == "recorder":
            return {"INVOKER_RECORDER_ID": self.invoker_id,
                    "INVOKER_RECORDER_METRICS_PORT": str(self.port)}
        return {"INVOKER_INVOKER_ID": self.invoker_id, "INVOKER_METRICS_PORT": str(self.port)}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url("/metrics"))

    def terminate(self, timeout_s: float = 90.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop_quietly(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log_events(self, event: str) -> list[str]:
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if f'"event": "{event}"' in line
        ]


def settings_env(settings: dict[str, object]) -> dict[str, str]:
    """Daemon settings by Config field name as the INVOKER_* environment variables."""
    return {ENV_PREFIX + k.upper(): str(v) for k, v in settings.items()}


def read_metrics(url: str) -> dict[str, float]:
    """Prometheus samples at ``url`` by name (labels folded into the name as name{k=v})."""
    return parse_samples(httpx.get(url, timeout=5).text)


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus exposition ``text`` as samples by name (labels folded into the name as
    name{k=v,...}, sorted by label name)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def counter_total(samples: dict[str, float], name: str) -> float:
    """The sample ``name`` summed over its labels (``name`` itself and every ``name{...}``)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def group_lag(topics: Topics) -> int:
    """Messages on the feed topic beyond the group's committed offsets (0 = all committed)."""
    return topic_lag(topics.group, topics.feed)


def topic_lag(group: str, topic: str, bootstrap: str = KAFKA, retry_s: float = 30.0) -> int:
    """Messages on ``topic`` beyond ``group``'s committed offsets (0 = all committed).

    Retries for up to ``retry_s`` on errors Kafka marks retriable: just after a broker restart
    the group's coordinator answers NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS for a while,
    which says nothing about the lag."""
    from kafka.errors import KafkaError

    deadline = time.monotonic() + retry_s
    while True:
        try:
            return _topic_lag_once(group, topic, bootstrap)
        except KafkaError as error:
            if not error.retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _topic_lag_once(group: str, topic: str, bootstrap: str) -> int:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="tests")
    try:
        committed = admin.list_consumer_group_offsets(group)
        partitions = [
            TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
        ]
        ends = consumer.end_offsets(partitions)
        lag = 0
        for tp, end in ends.items():
            meta = committed.get(tp)
            lag += end - (meta.offset if meta is not None and meta.offset >= 0 else 0)
        return lag
    finally:
        consumer.close()
        admin.close()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def container_ids(invoker_id: str, timeout_s: float | None = None) -> list[str]:
    """Ids of the containers (running or not) labelled with ``invoker_id``, as docker lists
    them. ``timeout_s``: bound on the docker call (subprocess.TimeoutExpired past it)."""
    return subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=org.invoker.id={invoker_id}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout_s,
    ).stdout.split()


def remove_containers(invoker_id: str, timeout_s: float | None = None) -> int:
    """Remove action containers a test's daemon left (e.g. after SIGKILL). ``timeout_s``
    bounds each docker call: a wedged Docker engine then raises RuntimeError instead of
    hanging."""
    try:
        ids = container_ids(invoker_id, timeout_s)
        for cid in ids:  # some may be gone already; one at a time, as the daemon removes
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"docker did not answer within {timeout_s:g} s removing the "
                           f"containers of {invoker_id} ({' '.join(exc.cmd[:3])})") from None
    return len(ids)


def load_spec(topics, store_url, daemons=(), **kw) -> LoadSpec:
    kw.setdefault("progress", False)
    kw.setdefault("completion_timeout_s", 120)
    return LoadSpec(bootstrap=KAFKA, feed_topic=topics.feed, completions_topic=topics.completions,
                    store_url=store_url, metrics_urls=[d.url("/metrics") for d in daemons], **kw)


def stored_records(store_url: str, ids: dict[str, str], timeout_s: float = STORE_TIMEOUT_S
                   ) -> tuple[dict[str, dict], int]:
    """Records by activation id for ``ids`` (activation id → namespace; only those present),
    and the store count. Read ``STORE_CHUNK`` ids at a time, all within ``timeout_s``."""
    doc_ids = [doc_id_for(ns, aid) for aid, ns in ids.items()]

    async def read(store):
        found: dict[str, dict] = {}
        for start in range(0, len(doc_ids), STORE_CHUNK):
            found.update(await store.get_many(doc_ids[start:start + STORE_CHUNK]))
        return {doc["activationId"]: doc for doc in found.values()}, await store.count()

    return store_session(store_url, read, timeout_s)


def read_topic(topic: str, expect: int, timeout_s: float = 30.0) -> list:
    """Every message on ``topic`` once ``expect`` arrived (or ``timeout_s`` passed), and one
    more second for extras: nothing beyond what was expected may be there."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=KAFKA, auto_offset_reset="earliest",
                             group_id=None, consumer_timeout_ms=1000)
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
        time.sleep(1)
        for batch in consumer.poll(timeout_ms=500).values():
            got.extend(batch)
    finally:
        consumer.close()
    return got
