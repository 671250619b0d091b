"""``invoker status`` against a real daemon (real Kafka, Docker engine and store), run as the
operator runs it: a subprocess reading the daemon's ``GET /status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from invoker.loadgen import activation_message, produce_messages, run_load
from invoker.status import fetch_status, status_url
from tests.support.daemon import KAFKA, Daemon, group_lag, load_spec, wait_for

NS = "statustest"


def invoker_status(*args: str, env: dict[str, str] | None = None,
                   timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoker.cli", "status", *args],
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})


def status_of(daemon: Daemon) -> dict:
    return fetch_status(status_url(daemon.url("")))


def test_status_after_a_load_shows_slots_containers_and_committed_partitions(
        daemons, topics, sqlite_url):
    daemon = daemons(sqlite_url, max_activations=4)
    report = run_load(load_spec(topics, sqlite_url, [daemon], actions=["echo"], count=20,
                                namespace=NS))
    assert (report.completed, report.lost) == (20, 0)
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end of the topic")

    def all_committed() -> dict | None:
        doc = json.loads(invoker_status("--url", daemon.url(""), "--json").stdout)
        rows = doc["partitions"]
        done = sum(r["committed"] or 0 for r in rows) == 20 and all(
            r["position"] == r["committed"] == r["highwater"] for r in rows)
        return doc if done else None

    doc = wait_for(all_committed, 10, "the status to show every partition committed")
    assert doc["role"] == "invoker" and doc["id"] == daemon.invoker_id and doc["ok"]
    assert doc["slots"] == {"used": 0, "max": 4, "running": 0}
    assert not doc["feed"]["paused"] and doc["feed"]["held_back_by"] == []
    assert doc["read_ahead"]["depth"] == 0 and doc["record_channel"]["depth"] == 0
    (echo,) = [g for g in doc["containers"]["by_action"]
               if g["action"] == f"{NS}/loadgen-echo@0.0.1"]
    assert echo["idle"] >= 1 and echo["busy"] == echo["starting"] == echo["running"] == 0
    assert doc["containers"]["count"] >= echo["idle"]
    assert sorted((r["topic"], r["partition"]) for r in doc["partitions"]) == [
        (topics.feed, p) for p in range(4)]
    assert all(r["uncommitted"] == r["lag"] == r["in_flight"] == 0 for r in doc["partitions"])
    assert doc["activations"] == {"success": 20}
    assert doc["store"]["writes"] >= 1 and doc["store"]["recent"]["count"] >= 1
    assert doc["store"]["recent"]["p99_s"] >= doc["store"]["recent"]["p50_s"] > 0

    # The default URL comes from the daemon's own settings (as in compose: INVOKER_*).
    screen = invoker_status(env={"INVOKER_METRICS_PORT": str(daemon.port)})
    assert screen.returncode == 0, screen.stderr
    lines = screen.stdout.splitlines()
    assert lines[0].startswith(f"invoker {daemon.invoker_id}  http://127.0.0.1:{daemon.port}")
    assert lines[0].endswith("healthy")
    assert "slots        0 / 4 used, 0 running" in lines
    assert any(line.split()[0] == f"{NS}/loadgen-echo@0.0.1" for line in lines
               if line.startswith("  "))
    for p in range(4):
        (row,) = [line.split() for line in lines if line.startswith(f"  {topics.feed}-{p} ")]
        assert row[1] == row[2] == row[3] and row[4:] == ["0", "0", "0"]

    began = time.monotonic()
    watched = invoker_status("--url", daemon.url("/metrics"), "--watch", "0.3", "--count", "3")
    assert watched.returncode == 0, watched.stderr
    assert len([line for line in watched.stdout.splitlines()
                if line.startswith(f"invoker {daemon.invoker_id}  ")]) == 3
    assert time.monotonic() - began >= 0.6  # it waited between screens


def test_status_says_the_feed_is_paused_and_why(daemons, topics, sqlite_url):
    daemon = daemons(sqlite_url, max_activations=1, read_ahead=1, max_poll_records=1)
    # The assertions below (one in flight, nothing committed) hold until the first activation
    # ends: 30 s after it started, well past the few seconds the feed takes to pause, so the
    # reads below cannot race it. The test does not wait for it: the fixture kills the daemon
    # and removes its containers.
    produce_messages(KAFKA, topics.feed, [activation_message("sleep:30000", NS)
                                          for _ in range(6)], key="one partition")

    def paused_with_work_taken() -> dict | None:
        doc = status_of(daemon)  # (offsets are published every 0.5 s: wait for them too)
        taken = any((r["position"] or 0) >= 3 for r in doc["partitions"])
        return doc if doc["feed"]["paused"] and taken else None

    doc = wait_for(paused_with_work_taken, 60, "the feed to pause with work taken")
    # (held for hold_before_pause_s first: a full read-ahead pauses only if it stays full)
    assert doc["feed"]["reason"] == "read-ahead full" and doc["feed"]["pauses"] >= 1
    assert doc["slots"] == {"used": 1, "max": 1, "running": doc["slots"]["running"]}
    assert "all 1 slots busy" in doc["feed"]["held_back_by"]
    assert "read-ahead full (1)" in doc["feed"]["held_back_by"]
    (group,) = [g for g in doc["containers"]["by_action"]
                if g["action"] == f"{NS}/loadgen-sleep-30000@0.0.1"]
    assert group["busy"] + group["starting"] == 1
    (row,) = [r for r in doc["partitions"] if (r["position"] or 0) >= 3]
    # One running, one waiting for the slot, one in the read-ahead, one held by the feed.
    assert row["in_flight"] == 1 and row["committed"] == 0
    assert row["uncommitted"] == row["position"] >= 3
    assert row["lag"] == row["highwater"] >= row["position"]  # (as of the last fetch)

    screen = invoker_status("--url", daemon.url(""))
    assert screen.returncode == 0, screen.stderr
    feed_line = [line for line in screen.stdout.splitlines() if line.startswith("feed ")]
    assert feed_line and "PAUSED for" in feed_line[0] and "(read-ahead full)" in feed_line[0]
    assert "all 1 slots busy" in screen.stdout


def test_status_of_a_recorder_and_of_a_daemon_that_is_gone(daemons, sqlite_url):
    recorder = daemons(sqlite_url, command="recorder")
    screen = invoker_status("--recorder",
                            env={"INVOKER_RECORDER_METRICS_PORT": str(recorder.port)})
    assert screen.returncode == 0, screen.stderr
    assert screen.stdout.startswith(f"recorder {recorder.invoker_id}  ")
    assert "slots" not in screen.stdout and "containers" not in screen.stdout
    doc = wait_for(lambda: (d := status_of(recorder))["partitions"] and d, 20,
                   "the recorder's partitions")
    assert {r["topic"] for r in doc["partitions"]} == {recorder.topics.overflow}
    recorder.kill()
    gone = invoker_status("--url", recorder.url(""))
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith("invoker status: cannot read ") and (
        len(gone.stderr.splitlines()) == 1)
