"""The daemon end to end: real Kafka, real Docker engine, real stores.

Each test runs ``invoker run`` as a subprocess on its own topics and consumer group, drives it
with the load generator's API and asserts exact outcomes.
"""

from __future__ import annotations

import json
import threading
import time

from invoker.loadgen import (
    activation_message,
    produce_messages,
    read_completions,
    run_load,
)
from invoker.status import fetch_status, status_url
from tests.support.daemon import (
    KAFKA,
    container_ids,
    group_lag,
    load_spec,
    read_topic,
    stored_records,
    wait_for,
)

NS = "itest"


def test_happy_path_records_completions_and_commits(daemons, topics, sqlite_url):
    daemon = daemons(sqlite_url)
    actions = ["echo", "sleep:50", "error", "raise", "noop"]
    window: list[tuple[str, float]] = []
    report = run_load(load_spec(topics, sqlite_url, [daemon], actions=actions, count=60,
                                on_window=lambda phase: window.append((phase, time.monotonic()))))
    assert (report.produced, report.completed, report.stored, report.lost) == (60, 60, 60, 0)
    # the load's window: once each way, spanning every produce -> completion
    assert [phase for phase, _ in window] == ["start", "end"]
    (_, start), (_, end) = window
    assert end - start >= max(report.latencies_ms.values()) / 1000
    assert report.duplicate_records == 0
    assert report.by_status == {"success": 36, "application error": 12,
                                "action developer error": 12}
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end of the topic")
    m = daemon.metrics()
    assert m["invoker_records_stored_total"] == 60
    assert m["invoker_container_starts_total{kind=cold}"] >= 1
    assert m["invoker_container_starts_total{kind=warm}"] >= 1


def test_record_content_and_blocking_completion(daemons, topics, sqlite_url):
    daemons(sqlite_url)
    message = activation_message("echo", NS, blocking=True)
    message["params"] = {"name": "x"}
    message["action"]["limits"] = {"timeout": 5000, "memory": 128}
    produce_messages(KAFKA, topics.feed, [message])
    aid = message["activationId"]
    completions = read_completions(KAFKA, topics.completions, {aid}, 60)
    (completion,) = completions[aid]
    assert completion["status"] == "success" and completion["statusCode"] == 0
    assert completion["result"] == {"name": "x"}
    records, _ = stored_records(sqlite_url, {aid: NS})
    record = records[aid]
    assert record["response"]["result"] == {"name": "x"} and record["name"] == message[
        "action"]["name"]
    annotations = {a["key"]: a["value"] for a in record["annotations"]}
    assert annotations["limits"] == {"timeout": 5000, "memory": 128, "logs": 10,
                                     "concurrency": 1}
    assert annotations["kind"] == "python:3" and "initTime" in annotations
    assert record["duration"] == record["end"] - record["start"] >= 0


def test_bad_messages_dead_letter_or_error_record_and_the_rest_flows(daemons, topics,
                                                                    sqlite_url):
    # Blackbox images are refused unless allow-listed: allow the missing one, so that both the
    # allow-list and a missing allowed image are exercised.
    daemon = daemons(sqlite_url, blackbox_images="invoker-no-such-*")
    good = [activation_message("echo", NS) for _ in range(5)]
    unknown_kind = activation_message("echo", NS)
    unknown_kind["action"]["kind"] = "cobol:85"
    missing_image = activation_message("echo", NS)
    missing_image["action"].update(image="invoker-no-such-image:1", kind=None, code=None)
    not_allowed = activation_message("echo", NS)
    not_allowed["action"].update(image="invoker-action-python:latest", kind=None)
    bad_limits = activation_message("echo", NS)
    bad_limits["action"]["limits"] = {"memory": 1 << 20}
    not_json = b'{"activationId": "oops'
    no_id = json.dumps({"namespace": NS, "action": {"name": "x"}}).encode()
    messages = [good[0], not_json, good[1], unknown_kind, good[2], missing_image, no_id,
                good[3], not_allowed, bad_limits, good[4]]
    produce_messages(KAFKA, topics.feed, messages)

    recorded = {m["activationId"]: NS
                for m in good + [unknown_kind, missing_image, not_allowed, bad_limits]}
    read_completions(KAFKA, topics.completions, set(recorded), 90)
    records, _ = stored_records(sqlite_url, recorded)
    assert len(records) == 9
    for m in good:
        assert records[m["activationId"]]["response"]["statusCode"] == 0
    for m, text in [(unknown_kind, "Unknown action kind"), (missing_image, "image"),
                    (not_allowed, "Blackbox image 'invoker-action-python:latest' is not "
                                  "allowed: it does not match any of blackbox_images "
                                  "(invoker-no-such-*)"),
                    (bad_limits, "memory limit")]:
        response = records[m["activationId"]]["response"]
        assert response["status"] == "action developer error", response
        assert text in response["result"]["error"]

    dead = read_topic(topics.dead_letters, expect=2)
    assert sorted(d.value for d in dead) == sorted([not_json, no_id])
    reasons = {d.value: dict(d.headers)["dlq.reason"].decode() for d in dead}
    assert "not valid JSON" in reasons[not_json] and "activationId" in reasons[no_id]
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets moved past the bad messages")
    assert daemon.metrics()["invoker_dead_letters_total"] == 2


def test_slow_store_pauses_feed_bounds_memory_and_stores_everything_once(
        daemons, topics, couchdb_url, couch_proxy):
    db = couchdb_url.rsplit("/", 1)[1]
    proxied = f"http://127.0.0.1:{couch_proxy.port}/{db}"
    daemon = daemons(proxied, max_activations=4, read_ahead=4, max_poll_records=4,
                     record_channel_size=12, record_channel_low_watermark=4, batch_size=4,
                     max_writes_in_flight=1, linger_ms=5, max_result_bytes=65536,
                     max_logs_kb=64, max_message_bytes=65536, fetch_max_bytes=1048576)
    # Warm up every code path (containers, store client, producer) before taking the baseline:
    # the bound is about buffered records, not about the interpreter loading modules.
    warm = run_load(load_spec(topics, couchdb_url, [daemon], actions=["noop"], count=30))
    assert warm.lost == 0
    baseline_rss = daemon.metrics()["process_resident_memory_bytes"]
    bound = daemon.metrics()["invoker_worst_case_buffered_bytes"]
    # ~1 s per bulk write of 4: the store takes about 4 records/s, far below what even a
    # loaded machine executes, so the channel must fill and the feed must pause.
    couch_proxy.set(latency=1.0, down=False)

    samples: list[dict[str, float]] = []
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(report=run_load(
        load_spec(topics, couchdb_url, [daemon], actions=["noop"], count=150))))
    loader.start()
    started = time.monotonic()
    while time.monotonic() - started < 40:
        samples.append(daemon.metrics())
        if time.monotonic() - started > 12 and samples[-1]["invoker_feed_paused_seconds_total"]:
            break
        time.sleep(0.2)
    couch_proxy.set(latency=0.0, down=False)  # the slowness ends
    loader.join(timeout=180)
    assert not loader.is_alive()
    report = result["report"]

    assert any(s["invoker_feed_paused"] == 1 for s in samples), "feed never seen paused"
    assert samples[-1]["invoker_feed_pauses_total"] >= 1
    assert max(s["invoker_record_channel_depth"] for s in samples) <= 12
    peak_rss = max(s["process_resident_memory_bytes"] for s in samples + [daemon.metrics()])
    print(f"slow store: baseline RSS {baseline_rss / 2**20:.1f} MiB, peak {peak_rss / 2**20:.1f}"
          f" MiB, computed bound on buffered records {bound / 2**20:.1f} MiB")
    assert peak_rss <= baseline_rss + bound, (peak_rss, baseline_rss, bound)
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        150, 150, 0, 0)
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed")
    assert daemon.metrics()["invoker_records_stored_total"] == 180


def test_store_outage_pauses_retries_and_recovers(daemons, topics, couchdb_url, couch_proxy):
    db = couchdb_url.rsplit("/", 1)[1]
    daemon = daemons(f"http://127.0.0.1:{couch_proxy.port}/{db}", max_activations=4,
                     read_ahead=4, max_poll_records=4, record_channel_size=8,
                     record_channel_low_watermark=2, batch_size=4, max_writes_in_flight=1,
                     backoff_initial_ms=50, backoff_max_ms=1000, store_timeout_s=2)
    result: dict = {}
    # 200 ms actions at 30/s want 6 of the 4 slots: when the feed pauses, every slot holds an
    # activation, which then waits for the full channel. (No-op actions at 30/s left the slots
    # empty when the pause came between two messages, and the check below timed out.)
    loader = threading.Thread(target=lambda: result.update(report=run_load(
        load_spec(topics, couchdb_url, [daemon], actions=["sleep:200"], count=120, rate=30))))
    loader.start()
    wait_for(lambda: daemon.metrics()["invoker_records_stored_total"] >= 5, 60,
             "some records stored before the outage")
    couch_proxy.set(latency=0.0, down=True)
    wait_for(lambda: daemon.metrics()["invoker_feed_paused"] == 1, 60, "feed paused")

    def slots_wait_to_enqueue_holding_no_container() -> bool:
        doc = fetch_status(status_url(daemon.url("")))
        return doc["slots"]["used"] >= 1 and not any(
            g["busy"] for g in doc["containers"]["by_action"])

    # The feed is paused, so the slots in use hold records waiting for the full channel; the
    # containers were given back once their answers were read, so other work could use them.
    wait_for(slots_wait_to_enqueue_holding_no_container, 30, "slots used, no container busy")
    time.sleep(3)
    failures = daemon.metrics()["invoker_store_write_failures_total"]
    assert failures >= 2, "the batcher should keep retrying during the outage"
    couch_proxy.set(latency=0.0, down=False)
    loader.join(timeout=180)
    report = result["report"]
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        120, 120, 0, 0)
    m = daemon.metrics()
    assert m["invoker_feed_resumes_total"] >= 1 and m["invoker_feed_paused"] == 0
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed")


def test_crash_mid_load_then_restart_stores_each_activation_once(daemons, topics, sqlite_url):
    first = daemons(sqlite_url, max_activations=8)
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(report=run_load(
        load_spec(topics, sqlite_url, [], actions=["sleep:100", "echo"], count=200, rate=40,
             completion_timeout_s=180))))
    loader.start()
    wait_for(lambda: first.metrics()["invoker_records_stored_total"] >= 40, 90,
             "load under way")
    first.kill()
    second = daemons(sqlite_url, invoker_id=first.invoker_id, max_activations=8)
    loader.join(timeout=240)
    report = result["report"]
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        200, 200, 0, 0)
    re_executed = second.metrics()["invoker_records_already_stored_total"]
    print(f"crash test: {re_executed:.0f} of 200 activations were re-executed after SIGKILL "
          f"({report.repeated_completions} repeated completions)")
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed after restart")


def test_sigterm_drains_and_restart_re_executes_nothing(daemons, topics, sqlite_url):
    first = daemons(sqlite_url, max_activations=8)
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(report=run_load(
        load_spec(topics, sqlite_url, [], actions=["sleep:200", "echo"], count=150, rate=30,
             completion_timeout_s=180))))
    loader.start()
    wait_for(lambda: first.metrics()["invoker_records_stored_total"] >= 30, 90,
             "load under way")
    assert first.terminate() == 0
    assert first.log_events("record channel flushed")
    assert container_ids(first.invoker_id) == [], "a clean stop removes its containers"
    second = daemons(sqlite_url, invoker_id=first.invoker_id, max_activations=8)
    loader.join(timeout=240)
    report = result["report"]
    assert (report.produced, report.stored, report.lost, report.duplicate_records) == (
        150, 150, 0, 0)
    assert second.metrics()["invoker_records_already_stored_total"] == 0
    assert report.repeated_completions == 0
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed")


def test_action_faults_end_in_correct_records_and_the_daemon_keeps_going(daemons, topics,
                                                                         sqlite_url):
    daemon = daemons(sqlite_url, max_result_bytes=100_000)

    def action(code: str, **limits):
        m = activation_message("echo", NS)
        m["action"].update(name=f"fault-{m['activationId'][:6]}", code=code,
                           limits={"timeout": 5000, "memory": 128, **limits})
        return m

    cases = {
        "timeout": action("import time\ndef main(a):\n    time.sleep(30)\n    return {}",
                          timeout=1000),
        "oom": action("def main(a):\n    b = []\n    while True:\n"
                      "        b.append(bytearray(16 << 20))\n"),
        "not_json": action("def main(a):\n    return 42"),
        "huge_result": action("def main(a):\n    return {'x': 'y' * 500000}"),
        "huge_logs": action("def main(a):\n    for i in range(100000):\n"
                            "        print('line', i, 'x' * 80)\n    return {'ok': 1}", logs=4,
                            # 9 MB through Docker's log driver: seconds on a loaded machine
                            timeout=60_000),
        "init_fails": action("def main(a) syntax error"),
    }
    after = [activation_message("echo", NS) for _ in range(3)]
    produce_messages(KAFKA, topics.feed, list(cases.values()) + after)
    ids = {m["activationId"]: NS for m in list(cases.values()) + after}
    read_completions(KAFKA, topics.completions, set(ids), 120)
    records, _ = stored_records(sqlite_url, ids)
    response = {name: records[m["activationId"]]["response"] for name, m in cases.items()}

    assert response["timeout"]["statusCode"] == 2
    assert "exceeded its time limits of 1000 milliseconds" in response["timeout"]["result"][
        "error"]
    assert response["oom"]["statusCode"] == 2
    assert "exhausted its memory" in response["oom"]["result"]["error"]
    assert response["not_json"]["statusCode"] == 2
    assert response["huge_result"]["statusCode"] == 1
    assert "exceeded the allowed length" in response["huge_result"]["result"]["error"]
    assert response["init_fails"]["statusCode"] == 2
    logs = records[cases["huge_logs"]["activationId"]]["logs"]
    assert response["huge_logs"]["statusCode"] == 0
    assert "truncated" in logs[-1] and len(logs) > 10
    assert sum(len(line.split(": ", 1)[1]) + 1 for line in logs[:-1]) <= 4 * 1024
    for m in after:
        assert records[m["activationId"]]["response"]["statusCode"] == 0
    assert daemon.metrics()["invoker_feed_paused"] in (0, 1)  # still serving metrics
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets moved on")
