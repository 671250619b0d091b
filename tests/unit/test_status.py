"""``invoker status``: the screen from a document, the helpers that build the document, the
``GET /status`` route, the feed's published offsets, and the command's answers to a daemon that
is not there or answers garbage (real HTTP servers, real sockets)."""

from __future__ import annotations

import copy
import http.server
import json
import socket
import threading
from collections.abc import Iterator

import pytest
import trio
from kafka.structs import TopicPartition

import invoker.feed
from invoker.cli import main
from invoker.feed import PartitionProgress
from invoker.metrics import Metrics
from invoker.model import PoolKey
from invoker.ops import serve_ops
from invoker.status import MAX_STATUS_BYTES, render, status_url
from invoker.status_report import RecentDurations, containers_status, partition_rows
from tests.unit.test_feed import TP, ScriptedConsumer, ScriptedGate, make_feed, turns

ECHO = PoolKey("guest", "echo", "0.0.1", "d1", 256, 1)
SLEEP = PoolKey("guest", "sleep", "0.0.2", "d2", 256, 1)

DOC = {
    "version": 1, "role": "invoker", "id": "invoker-a-1", "uptime_s": 3725.0, "ok": False,
    "reasons": ["feed paused for 700.0 s"],
    "feed": {"paused": True, "paused_for_s": 700.0, "reason": "pipeline saturated",
             "pauses": 3, "held_back_by": ["read-ahead full (64)",
                                           "all 2 slots busy"]},
    "read_ahead": {"depth": 64, "capacity": 64},
    "record_channel": {"depth": 256, "capacity": 256, "low_watermark": 128},
    "uncommitted_offsets": {"count": 70, "max": 10000},
    "store": {"writes_in_flight": 2, "max_writes_in_flight": 2,
              "recent": {"window_s": 60.0, "count": 40, "p50_s": 0.0041, "p99_s": 0.25,
                         "max_s": 12.5},
              "writes": 1234, "mean_s": 0.0123, "failures": 5},
    "oldest_unfinished": {"what": "store write of 100 records", "seconds": 12.5,
                          "error": "connection refused"},
    "partitions": [
        {"topic": "feed", "partition": 0, "position": 1_000_070, "committed": 1_000_000,
         "highwater": 1_000_500, "uncommitted": 70, "lag": 500, "in_flight": 2},
        {"topic": "feed", "partition": 1, "position": None, "committed": None,
         "highwater": 7, "uncommitted": None, "lag": None, "in_flight": 0}],
    "partitions_omitted": 0,
    "activations": {"success": 900, "application error": 4},
    "slots": {"used": 2, "max": 2, "running": 2},
    "overflow": {"enabled": True, "in_flight": 1, "max_in_flight": 32, "records": 17,
                 "bytes": 3 * 1024 * 1024},
    "containers": {"count": 4, "memory_used_mb": 1024, "memory_mb": 2048, "waiting": 5,
                   "by_action": [
                       {"action": "guest/echo@0.0.1", "starting": 1, "busy": 2, "idle": 0,
                        "prewarmed": 0, "removing": 0, "running": 2},
                       {"action": "prewarm python:3", "starting": 0, "busy": 0, "idle": 0,
                        "prewarmed": 1, "removing": 0, "running": 0}],
                   "more_actions": 2, "more_containers": 3},
}


def lines_with(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_the_screen_shows_every_section_of_the_document():
    text = render(DOC, "http://127.0.0.1:9180")
    first = text.splitlines()[0]
    assert first.startswith("invoker invoker-a-1  http://127.0.0.1:9180  up 1h02m05s")
    assert first.endswith("UNHEALTHY: feed paused for 700.0 s")
    assert lines_with(text, "slots") == ["slots        2 / 2 used, 2 running"]
    assert lines_with(text, "feed") == [
        "feed         PAUSED for 11m40s (pipeline saturated); 3 pauses since start"]
    assert ("             held back by: read-ahead full (64); all 2 slots busy"
            in text.splitlines())
    assert lines_with(text, "read-ahead") == ["read-ahead   64 / 64"]
    assert lines_with(text, "records") == [
        "records      256 / 256 in the record channel (when full, records overflow to Kafka)"]
    assert lines_with(text, "store") == [
        "store        p50 4.1 ms, p99 250.0 ms, max 12.5 s over the last 40 writes (60 s)"]
    assert ("             2 / 2 writes in flight; 1234 writes since start, mean 12.3 ms; 5 failed"
            in text.splitlines())
    assert lines_with(text, "unfinished") == [
        "unfinished   store write of 100 records for 12.5 s: connection refused"]
    assert lines_with(text, "overflow") == [
        "overflow     1 / 32 awaiting Kafka; 17 records, 3.0 MiB overflowed since start"]
    assert lines_with(text, "containers") == [
        "containers   4 using 1024 / 2048 MiB; 5 activations waiting for one"]
    assert lines_with(text, "  guest/echo@0.0.1")[0].split() == [
        "guest/echo@0.0.1", "1", "2", "0", "0", "0", "2"]
    assert lines_with(text, "  prewarm python:3")[0].split()[2:] == ["0", "0", "0", "1", "0", "0"]
    assert "  ... and 3 containers of 2 more actions" in text.splitlines()
    assert lines_with(text, "partitions") == ["partitions   2 owned"]
    assert lines_with(text, "  feed-0")[0].split() == [
        "feed-0", "1000070", "1000000", "1000500", "70", "500", "2"]
    assert lines_with(text, "  feed-1")[0].split() == ["feed-1", "-", "-", "7", "-", "-", "0"]
    assert lines_with(text, "activations") == ["activations  4 application error, 900 success"]


def test_a_recorder_has_no_slots_containers_nor_overflow_and_short_waits_are_not_shown():
    doc = copy.deepcopy(DOC)
    for section in ("slots", "containers", "overflow"):
        del doc[section]
    doc.update(role="recorder", ok=True, reasons=[], partitions=[], activations={})
    doc["feed"].update(paused=False, held_back_by=[])
    doc["store"]["recent"] = {"window_s": 60.0, "count": 0}
    doc["oldest_unfinished"]["seconds"] = 0.2  # an ordinary write in flight
    text = render(doc, "http://recorder:9181")
    assert text.splitlines()[0].endswith("healthy") and "recorder invoker-a-1" in text
    assert not lines_with(text, "slots") and not lines_with(text, "containers")
    assert not lines_with(text, "overflow") and not lines_with(text, "unfinished")
    assert not lines_with(text, "activations") and "held back" not in text
    assert lines_with(text, "feed") == ["feed         fetching; 3 pauses since start"]
    assert lines_with(text, "store") == ["store        no write in the last 60 s"]
    assert lines_with(text, "partitions") == ["partitions   none owned"]
    assert lines_with(text, "records") == [  # without overflow the feed pauses on the channel
        "records      256 / 256 in the record channel (resumes at <= 128)"]


def test_names_are_cut_and_made_printable():
    doc = copy.deepcopy(DOC)
    doc["containers"]["by_action"][0]["action"] = "ns/\x1b[2J" + "x" * 100
    text = render(doc, "u")
    assert "\x1b" not in text
    row = [line for line in text.splitlines() if line.startswith("  ns/")][0]
    assert row.split()[0] == "ns/?[2J" + "x" * 38 + "..."


def test_reasons_are_cut_and_made_printable():
    """Health and pause reasons and what holds the feed back may carry a store's error text."""
    long_error = "store unavailable: \x1b[2J" + "e" * 1000
    doc = copy.deepcopy(DOC)
    doc["reasons"] = [long_error]
    doc["feed"].update(reason=long_error, held_back_by=[long_error, "all 2 slots busy"])
    text = render(doc, "u")
    assert "\x1b" not in text and "e" * 300 not in text
    cut = "store unavailable: ?[2J" + "e" * (297 - 23) + "..."
    assert text.splitlines()[0].endswith("UNHEALTHY: " + cut)
    assert lines_with(text, "feed") == [
        f"feed         PAUSED for 11m40s ({cut}); 3 pauses since start"]
    assert f"             held back by: {cut}; all 2 slots busy" in text.splitlines()


def test_nothing_a_forged_document_holds_reaches_the_terminal_as_an_escape_sequence():
    doc = copy.deepcopy(DOC)
    doc["role"] = "\x1b]0;owned\x07invoker"
    doc["read_ahead"]["depth"] = "\x1b[2J"
    doc["oldest_unfinished"]["what"] = "\x1b[31mstore write"
    text = render(doc, "u")
    assert "\x1b" not in text and "\x07" not in text
    assert lines_with(text, "read-ahead") == ["read-ahead   ?[2J / 64"]


@pytest.mark.parametrize("broken", [
    {"feed": None}, {"partitions": [{"topic": "t"}]}, {"slots": {"used": "many"}},
    {"store": {"recent": {"count": 3}}},
])
def test_a_document_of_another_shape_raises_what_the_command_reports(broken):
    doc = {**copy.deepcopy(DOC), **broken}
    with pytest.raises((KeyError, TypeError, ValueError)):
        render(doc, "u")


def record(key, phase, active=0, kind="python:3"):
    return {"name": "c", "phase": phase, "memory_mb": 256, "active": active, "pool_key": key,
            "kind": kind, "docker_id": "x"}


def test_containers_are_counted_per_action_and_state():
    snapshot = [record(ECHO, "ready", 1), record(ECHO, "ready", 0), record(ECHO, "new", 1),
                record(ECHO, "initializing", 1), record(ECHO, "retiring", 1),
                record(SLEEP, "removing"), record(SLEEP, "assigned", 1),
                record(None, "stem"), record(None, "starting")]
    status = containers_status(snapshot, waiting=3, memory_used_mb=2304, memory_mb=4096)
    assert status["count"] == 9 and status["waiting"] == 3
    assert status["by_action"] == [
        {"action": "guest/echo@0.0.1", "starting": 2, "busy": 1, "idle": 1, "prewarmed": 0,
         "removing": 1, "running": 4},
        {"action": "guest/sleep@0.0.2", "starting": 1, "busy": 0, "idle": 0, "prewarmed": 0,
         "removing": 1, "running": 1},
        {"action": "prewarm python:3", "starting": 1, "busy": 0, "idle": 0, "prewarmed": 1,
         "removing": 0, "running": 0}]
    assert (status["more_actions"], status["more_containers"]) == (0, 0)


def test_only_the_largest_container_groups_are_listed():
    snapshot = [record(PoolKey("ns", f"a{i}", "1", "d", 128, 1), "ready") for i in range(10)
                for _ in range(i + 1)]
    status = containers_status(snapshot, waiting=0, memory_used_mb=0, memory_mb=0, max_groups=3)
    assert [g["action"] for g in status["by_action"]] == ["ns/a9@1", "ns/a8@1", "ns/a7@1"]
    assert status["more_actions"] == 7 and status["more_containers"] == sum(range(1, 8))
    assert status["count"] == 55


def test_partition_rows_keep_the_furthest_behind_and_order_by_partition():
    progress = {TopicPartition("t", p): PartitionProgress(100 + p, 100, 100 + 2 * p)
                for p in range(10)}
    progress[TopicPartition("t", 10)] = PartitionProgress(None, None, 5)
    in_flight = {TopicPartition("t", 9): 4}
    rows, omitted = partition_rows(progress, lambda tp: in_flight.get(tp, 0), max_rows=3)
    assert omitted == 8
    assert [(r["partition"], r["uncommitted"], r["lag"], r["in_flight"]) for r in rows] == [
        (7, 7, 14, 0), (8, 8, 16, 0), (9, 9, 18, 4)]
    rows, omitted = partition_rows(progress, lambda tp: 0)
    assert omitted == 0 and [r["partition"] for r in rows] == list(range(11))
    assert rows[10] == {"topic": "t", "partition": 10, "position": None, "committed": None,
                        "highwater": 5, "uncommitted": None, "lag": None, "in_flight": 0}


def test_recent_durations_are_bounded_and_windowed():
    now = [0.0]
    recent = RecentDurations(keep=100, clock=lambda: now[0])
    for i in range(150):  # the first 50 are dropped: only 100 kept
        now[0] = float(i)
        recent.add(1000.0 if i < 50 else (i - 49) / 1000)
    now[0] = 150.0
    summary = recent.summary(window_s=200)
    assert summary == {"window_s": 200, "count": 100, "p50_s": 0.05, "p99_s": 0.099,
                       "max_s": 0.1}
    assert recent.summary(window_s=10.5)["count"] == 10
    now[0] = 1000.0
    assert recent.summary(window_s=60) == {"window_s": 60, "count": 0}


@pytest.mark.parametrize(("given", "expected"), [
    ("http://h:9180", "http://h:9180/status"), ("http://h:9180/", "http://h:9180/status"),
    ("http://h:9180/metrics", "http://h:9180/status"),
    ("http://h:9180/healthz", "http://h:9180/status"),
    ("http://h:9180/status", "http://h:9180/status")])
def test_status_url_takes_the_endpoint_or_any_of_its_urls(given, expected):
    assert status_url(given) == expected


# --- the feed's published offsets -----------------------------------------------------

async def test_the_feed_thread_publishes_positions_commits_and_high_watermarks(monkeypatch):
    monkeypatch.setattr(invoker.feed, "PROGRESS_INTERVAL_S", 0.0)
    feed = make_feed(ScriptedGate(room=100), max_poll_records=4, commit_interval_s=0.0)
    consumer = ScriptedConsumer(records=10)
    assert feed.progress == {}
    await turns(feed, consumer)  # nothing committed yet: committed is where reading began
    assert feed.progress == {TP: PartitionProgress(4, 0, 10)}
    published = feed.progress
    await turns(feed, consumer)
    assert feed.progress == {TP: PartitionProgress(8, 0, 10)}
    assert published == {TP: PartitionProgress(4, 0, 10)}  # replaced whole, never changed
    feed.request_commit(TP, 3)
    await turns(feed, consumer)
    assert feed.progress == {TP: PartitionProgress(10, 3, 10)}
    await trio.to_thread.run_sync(feed._on_revoked, consumer, [TP])
    consumer.partitions = set()
    await trio.to_thread.run_sync(feed._publish_progress, consumer)
    assert feed.progress == {}
    consumer.partitions = {TP}  # assigned again, not handed back (the gate has no position
    # for it): what this member committed before is forgotten
    await trio.to_thread.run_sync(feed._on_assigned, consumer, [TP])
    await trio.to_thread.run_sync(feed._publish_progress, consumer)
    assert feed.progress == {TP: PartitionProgress(10, 10, 10)}


# --- the route -------------------------------------------------------------------------

async def http_get(port: int, path: str) -> tuple[str, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def test_get_status_answers_json_and_a_failing_report_does_not_stop_the_endpoint():
    answers = [{"version": 1, "x": [1, 2]}]

    def status() -> dict:
        if not answers:
            raise RuntimeError("a bug")
        return answers.pop()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_ops, "127.0.0.1", 0, Metrics(), lambda: {"ok": True},
                                   status)
        line, body = await http_get(port, "/status")
        assert line == "HTTP/1.1 200 OK" and json.loads(body) == {"version": 1, "x": [1, 2]}
        line, _ = await http_get(port, "/status")
        assert line == "HTTP/1.1 500 Internal Server Error"
        line, _ = await http_get(port, "/healthz")
        assert line == "HTTP/1.1 200 OK"
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_ops, "127.0.0.1", 0, Metrics(), lambda: {"ok": True})
        line, _ = await http_get(port, "/status")
        assert line == "HTTP/1.1 404 Not Found"
        nursery.cancel_scope.cancel()


# --- the command against endpoints that are not a daemon ---------------------------------

@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    """A real HTTP server answering each path with (status, body) from the dict yielded."""
    answers: dict[str, tuple[int, bytes]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            code, body = answers.get(self.path, (404, b"no"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except ConnectionError:
                pass  # the client stopped reading (an answer over its limit): the test's stderr
                # is the command's, not this server's

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


def run_command(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_daemon_that_is_not_there_is_one_line_and_exit_1(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run_command(capsys, "--url", f"http://127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err == (f"invoker status: cannot read http://127.0.0.1:{port}/status: "
                   "[Errno 111] Connection refused\n")


@pytest.mark.parametrize(("answer", "says"), [
    ((200, b"<html>hello</html>"), "did not answer JSON"),
    ((200, b'{"version": 99}'), "not a status document of version 1"),
    ((200, b"[1, 2]"), "not a status document of version 1"),
    ((200, b'{"version": 1, "role": "x"}'), "a status document of another shape"),
    ((200, b"0" * (MAX_STATUS_BYTES + 1)), f"more than {MAX_STATUS_BYTES} bytes"),
    ((503, b"{}"), "answered HTTP 503"),
    ((200, b"[" * 100_000), "did not answer JSON"),  # nested past the parser's stack
    ((200, b'{"version": 1, "uptime_s": Infinity}'), "did not answer JSON"),
])
def test_a_garbage_answer_is_one_line_and_exit_1(capsys, endpoint, answer, says):
    url, answers = endpoint
    answers["/status"] = answer
    code, out, err = run_command(capsys, "--url", url)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err


def test_the_document_as_json_and_watch_with_a_count(capsys, endpoint):
    url, answers = endpoint
    answers["/status"] = (200, json.dumps(DOC).encode())
    code, out, err = run_command(capsys, "--url", url + "/metrics", "--json")
    assert (code, err) == (0, "") and json.loads(out) == DOC
    code, out, err = run_command(capsys, "--url", url, "--watch", "0.1", "--count", "3")
    assert (code, err) == (0, "")
    assert len([line for line in out.splitlines() if line.startswith("invoker ")]) == 3
    answers["/status"] = (200, b"garbage")  # the last read failed: exit 1
    code, out, err = run_command(capsys, "--url", url, "--watch", "0.1", "--count", "2",
                                 "--json")
    assert code == 1 and out.strip() == "" and len(err.splitlines()) == 2


@pytest.mark.parametrize("args", [["--count", "2"], ["--watch", "0"], ["--watch", "1",
                                                                       "--count", "0"]])
def test_bad_watch_arguments_are_usage_errors(capsys, args):
    with pytest.raises(SystemExit) as exited:
        main(["status", "--url", "http://127.0.0.1:1", *args])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("invoker: error: ")


@pytest.mark.parametrize(("env", "expected"), [
    ({"INVOKER_METRICS_HOST": "0.0.0.0", "INVOKER_METRICS_PORT": "1"}, "http://127.0.0.1:1"),
    ({"INVOKER_METRICS_HOST": "::", "INVOKER_METRICS_PORT": "2"}, "http://[::1]:2"),
    ({"INVOKER_METRICS_HOST": "127.0.0.2", "INVOKER_RECORDER_METRICS_PORT": "3",
      "RECORDER": "1"}, "http://127.0.0.2:3"),
])
def test_the_default_url_comes_from_the_daemons_settings(capsys, monkeypatch, env, expected):
    recorder = ["--recorder"] if env.pop("RECORDER", None) else []
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_command(capsys, *recorder)
    assert code == 1 and err.startswith(f"invoker status: cannot read {expected}/status: ")
