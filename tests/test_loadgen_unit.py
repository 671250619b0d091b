"""Pure tests of ``invoker loadgen`` (no Kafka, no store, no Docker)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections import deque

import pytest
from prometheus_client import generate_latest

from invoker import loadgen
from invoker.cli import build_parser
from invoker.cli import main as cli_main
from invoker.config import Config
from invoker.loadgen import (
    ACTIONS,
    MAX_COPIES,
    LoadSpec,
    MessageEncoder,
    Report,
    TokenBucket,
    activation_message,
    combine_metrics,
    message_encoders,
    parse_action_spec,
    parse_metrics,
    percentile,
    progress_line,
    spec_from_args,
)
from invoker.loadgen.collect import CompletionMatcher
from invoker.loadgen.produce import Sending, activation_ids, settle
from invoker.messages import decode_activation
from invoker.metrics import Metrics
from invoker.model import Activation

ALL_SPECS = ["echo", "noop", "sleep:5", "cpu:5", "error", "raise", "logs:3", "big:4",
             "sleep", "cpu", "logs", "big"]


def decode(message: dict) -> Activation:
    result = decode_activation(json.dumps(message).encode(), Config())
    assert isinstance(result, Activation), result
    return result


def load_main(message: dict):
    code = message["action"]["code"]
    namespace: dict = {}
    exec(compile(code, f"<{message['action']['name']}>", "exec"), namespace)
    return namespace[message["action"].get("main", "main")]


# --- messages ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_spec_makes_a_valid_message(spec: str) -> None:
    before = int(time.time() * 1000)
    message = activation_message(spec, "loadgen-test")
    activation = decode(message)
    assert re.fullmatch(r"[0-9a-f]{32}", activation.activation_id)
    assert activation.namespace == "loadgen-test"
    assert activation.action.kind == "python:3"
    assert activation.action.code == message["action"]["code"]
    assert activation.blocking is False
    assert before <= activation.submitted_at_ms <= int(time.time() * 1000)
    compile(activation.action.code, "<action>", "exec")


def test_every_template_is_covered() -> None:
    assert {s.partition(":")[0] for s in ALL_SPECS} == set(ACTIONS)


def test_message_options() -> None:
    message = activation_message("echo", "ns", activation_id="ab" * 16, blocking=True,
                                 limits={"timeout": 1000, "memory": 128})
    activation = decode(message)
    assert activation.activation_id == "ab" * 16
    assert activation.blocking is True
    assert activation.action.limits.timeout_ms == 1000
    assert activation.action.limits.memory_mb == 128


def test_ids_are_unique_and_specs_get_distinct_action_names() -> None:
    ids = {activation_message("echo", "ns")["activationId"] for _ in range(200)}
    assert len(ids) == 200
    names = {activation_message(s, "ns")["action"]["name"]
             for s in ["echo", "sleep:1", "sleep:2", "big:1"]}
    assert len(names) == 4


def test_default_limits_are_left_to_the_daemon() -> None:
    for spec in ["echo", "sleep:100", "cpu:100", "logs:10", "big:64"]:
        assert "limits" not in activation_message(spec, "ns")["action"]
    assert "limits" not in activation_message("sleep:100000", "ns", limits={})["action"]


def test_long_actions_ask_for_a_long_enough_timeout() -> None:
    activation = decode(activation_message("sleep:100000", "ns"))
    assert activation.action.limits.timeout_ms >= 100_000
    activation = decode(activation_message("cpu:299000", "ns"))
    assert activation.action.limits.timeout_ms == Config().max_timeout_ms


def test_many_log_lines_ask_for_a_large_enough_logs_limit() -> None:
    message = activation_message("logs:5000", "ns")
    activation = decode(message)
    main = load_main(message)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main({})
    assert activation.action.limits.logs_kb * 1024 >= len(out.getvalue().encode()) * 1.5


@pytest.mark.parametrize("spec", ["nope", "", "echo:3", "noop:1", "sleep:", "sleep:abc",
                                  "sleep:-1", "sleep:1.5", "big:999999999", "logs:x", "ECHO"])
def test_unknown_or_malformed_spec_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError):
        activation_message(spec, "ns")


@pytest.mark.parametrize("namespace", ["", "a/b", "x" * 257, "bad\nname"])
def test_invalid_namespace_is_a_value_error(namespace: str) -> None:
    with pytest.raises(ValueError):
        activation_message("echo", namespace)


def test_parse_defaults() -> None:
    assert parse_action_spec("sleep").arg == 100
    assert parse_action_spec("sleep:250").arg == 250
    assert parse_action_spec("echo").arg is None


# --- what the actions do -------------------------------------------------------------------

def test_echo_echoes() -> None:
    main = load_main(activation_message("echo", "ns"))
    params = {"a": 1, "nested": {"b": [1, 2]}}
    assert main(params) == params


def test_noop_returns_empty() -> None:
    assert load_main(activation_message("noop", "ns"))({"a": 1}) == {}


def test_error_returns_an_error() -> None:
    result = load_main(activation_message("error", "ns"))({})
    assert set(result) == {"error"}


def test_raise_raises() -> None:
    with pytest.raises(RuntimeError):
        load_main(activation_message("raise", "ns"))({})


def test_sleep_sleeps() -> None:
    main = load_main(activation_message("sleep:50", "ns"))
    start = time.monotonic()
    assert main({}) == {"slept_ms": 50}
    assert time.monotonic() - start >= 0.045


def test_cpu_burns_for_about_the_time() -> None:
    main = load_main(activation_message("cpu:50", "ns"))
    start = time.monotonic()
    result = main({})
    elapsed = time.monotonic() - start
    assert 0.045 <= elapsed < 2.0
    assert result["burned_ms"] == 50 and result["iterations"] > 0


@pytest.mark.parametrize("kb", [1, 4, 100])
def test_big_returns_about_n_kb(kb: int) -> None:
    result = load_main(activation_message(f"big:{kb}", "ns"))({})
    size = len(json.dumps(result, separators=(",", ":")).encode())
    assert abs(size - kb * 1024) <= 16


def test_big_zero() -> None:
    result = load_main(activation_message("big:0", "ns"))({})
    assert result == {"data": ""}


@pytest.mark.parametrize("lines", [0, 1, 7])
def test_logs_prints_n_lines(lines: int) -> None:
    main = load_main(activation_message(f"logs:{lines}", "ns"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main({})
    assert out.getvalue().splitlines() == [f"loadgen log line {i} of {lines}"
                                           for i in range(1, lines + 1)]
    assert result == {"lines": lines}


# --- percentiles, pacing, progress -----------------------------------------------------------

def test_percentile() -> None:
    values = list(range(1, 101))  # 1..100, shuffled order must not matter
    values.reverse()
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 3], 50) == 2.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def _simulate(bucket: TokenBucket, messages: int, oversleep: float = 0.0) -> list[float]:
    """Send times when each reservation's delay is slept (plus ``oversleep``)."""
    now, times = 1000.0, []
    for _ in range(messages):
        delay = bucket.reserve(now)
        if delay > 0:
            now += delay + oversleep
        times.append(now)
    return times


def test_token_bucket_keeps_the_rate() -> None:
    times = _simulate(TokenBucket(rate=100, burst=1), 501)
    assert times[-1] - times[0] == pytest.approx(5.0)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.01)


def test_token_bucket_makes_up_for_oversleeping_within_the_burst() -> None:
    # Sleeping 2 ms too long every time (as time.sleep does) must not lower the rate.
    times = _simulate(TokenBucket(rate=1000, burst=50), 5001, oversleep=0.002)
    rate = 5000 / (times[-1] - times[0])
    assert rate == pytest.approx(1000, rel=0.02)


def test_token_bucket_burst_after_idle_is_bounded() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert bucket.reserve(0.0) == 0  # the bucket starts full
    # Idle for a long time: at most `burst` messages go out at once.
    free = sum(1 for _ in range(10) if bucket.reserve(100.0) == 0)
    assert free == 3
    assert bucket.reserve(100.0) > 0


def test_token_bucket_default_burst_and_validation() -> None:
    assert TokenBucket(rate=2).burst == 1.0
    assert TokenBucket(rate=10_000).burst == pytest.approx(500)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


def test_progress_line() -> None:
    line = progress_line(50, 100, 25, 5.0)
    assert "produced 50/100" in line and "completed 25" in line and "5.0/s" in line
    assert line.count("#") == 12
    line = progress_line(10, None, 4, 2.0, duration_s=4.0)
    assert "produced 10 " in line and line.count("#") == 12
    line = progress_line(100, 100, 100, 10.0, phase="waiting")
    assert line.startswith("[" + "#" * 24 + "]") and "waiting" in line


# --- report and metrics --------------------------------------------------------------------

def sample_report(**changes) -> Report:
    report = Report(namespace="loadgen-abc", produced=1000, completed=998,
                    completion_messages=1003, stored=997, lost=3, duplicate_records=0,
                    by_status={"success": 900, "application error": 97},
                    throughput_per_s=123.456, latency_ms_p50=12.34, latency_ms_p95=56.78,
                    latency_ms_p99=91.01, daemon_peak_rss_bytes=150 * 2**20, daemon_pauses=4,
                    daemon_paused_seconds=1.5, overflowed=2, wall_s=9.87, metrics_read=1,
                    store_checked=True, store_count_before=10, store_count_after=1007)
    for key, value in changes.items():
        setattr(report, key, value)
    return report


def test_report_format_has_the_key_figures() -> None:
    report = sample_report()
    text = report.format()
    for needle in ["1000", "998", "1003", "997", "5 repeated", "success=900",
                   "application error=97", "123.5 /s", "12.3 / 56.8 / 91.0 ms", "150.0 MiB",
                   "4 (1.50 s paused)", "9.87 s", "loadgen-abc", "FAILED"]:
        assert needle in text, (needle, text)
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert re.search(r"lost\s+3$", lines["lost"])
    assert re.search(r"overflowed\s+2$", lines["overflowed"])
    # aligned: every value starts in the same column
    columns = {len(re.match(r"^(\S+( \S+)*\s+)", line).group(1)) for line in text.splitlines()}
    assert len(columns) == 1


def test_report_ok_and_json() -> None:
    report = sample_report(lost=0, stored=998, produced=998)
    assert report.ok
    assert report.format().splitlines()[-1].endswith("OK")
    assert not sample_report(duplicate_records=1, lost=0).ok
    assert not sample_report(lost=0, produce_errors=1).ok
    assert not sample_report(lost=0, store_checked=False).ok
    doc = json.loads(report.to_json())
    assert doc["produced"] == 998 and doc["repeated_completions"] == 5 and doc["ok"] is True
    assert doc["by_status"] == {"success": 900, "application error": 97}


def test_report_without_metrics_or_latencies() -> None:
    text = Report(namespace="x", store_checked=True).format()
    assert "n/a" in text and text.splitlines()[-1].endswith("OK")


def test_metrics_from_a_daemon_registry() -> None:
    metrics = Metrics()
    metrics.peak_rss_bytes.set(123_456_789)
    metrics.pauses.inc(3)
    metrics.paused_seconds.inc(2.5)
    figures = parse_metrics(generate_latest(metrics.registry).decode())
    assert figures["peak_rss"] == 123_456_789
    assert figures["pauses"] == 3
    assert figures["paused_seconds"] == 2.5
    assert figures["overflowed"] == 0  # the invoker exports the counter even when idle
    other = parse_metrics("# TYPE invoker_overflow_records counter\n"
                          "invoker_overflow_records_total 7.0\n"
                          "invoker_process_peak_rss_bytes 5.0\n"
                          "invoker_feed_pauses_total 1.0\n")
    # a value that is not a number of anything (NaN, Inf) is no figure: it is left out
    assert parse_metrics("invoker_feed_pauses_total NaN\n"
                         "invoker_process_peak_rss_bytes +Inf\n") == {}
    total = combine_metrics([figures, other])
    assert total == {"peak_rss": 123_456_789, "pauses": 4, "paused_seconds": 2.5,
                     "overflowed": 7}


# --- spec and CLI --------------------------------------------------------------------------

def test_loadspec_defaults() -> None:
    a, b = LoadSpec(), LoadSpec()
    assert a.actions == ["echo"] and a.count == 100 and a.rate is None
    assert a.namespace != b.namespace and a.namespace.startswith("loadgen-")
    assert a.bootstrap == Config().kafka_bootstrap and a.feed_topic == Config().feed_topic
    assert a.completions_topic == Config().completions_topic
    a.validate()


@pytest.mark.parametrize("changes", [{"actions": []}, {"actions": ["bogus"]},
                                     {"count": None}, {"count": -1}, {"rate": 0},
                                     {"duration_s": 0}, {"namespace": "a/b"}])
def test_loadspec_validation(changes: dict) -> None:
    spec = LoadSpec(**changes)
    with pytest.raises(ValueError):
        spec.validate()
    with pytest.raises(ValueError):
        loadgen.run_load(spec)  # rejected before any network I/O


def parse(argv: list[str]):
    return build_parser().parse_args(["loadgen", *argv])


def test_cli_flags() -> None:
    args = parse(["--bootstrap", "127.0.0.1:1", "--store-url", "sqlite:///tmp/x.db",
                  "--action", "sleep:10", "--action", "echo", "--rate", "50", "--count", "7",
                  "--namespace", "mine", "--metrics-url", "http://127.0.0.1:1/metrics",
                  "--timeout", "3", "--no-progress", "--json"])
    spec = spec_from_args(args, environ={})
    assert spec.bootstrap == "127.0.0.1:1" and spec.store_url == "sqlite:///tmp/x.db"
    assert spec.actions == ["sleep:10", "echo"] and spec.rate == 50 and spec.count == 7
    assert spec.namespace == "mine" and spec.metrics_urls == ["http://127.0.0.1:1/metrics"]
    assert spec.completion_timeout_s == 3 and spec.progress is False
    assert args.json is True


def test_cli_environment_defaults() -> None:
    env = {"INVOKER_KAFKA_BOOTSTRAP": "127.0.0.1:9999", "INVOKER_STORE_URL": "sqlite:///e.db",
           "INVOKER_FEED_TOPIC": "feed-x", "INVOKER_COMPLETIONS_TOPIC": "done-x"}
    spec = spec_from_args(parse(["--duration", "2.5"]), environ=env)
    assert (spec.bootstrap, spec.store_url, spec.feed_topic, spec.completions_topic) == (
        "127.0.0.1:9999", "sqlite:///e.db", "feed-x", "done-x")
    assert spec.duration_s == 2.5 and spec.actions == ["echo"]
    spec = spec_from_args(parse(["--bootstrap", "127.0.0.1:1"]), environ=env)
    assert spec.bootstrap == "127.0.0.1:1"
    spec = spec_from_args(parse([]), environ={})
    assert spec.store_url == Config().store_url and spec.count == 100


@pytest.mark.parametrize("argv", [["--action", "bogus"], ["--count", "1", "--duration", "1"],
                                  ["--rate", "-1"], ["--count", "x"], ["--namespace", "a/b"],
                                  ["--progress", "--no-progress"]])
def test_cli_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["loadgen", *argv])
    assert exc.value.code == 2


# --- encoded messages, copies, ids -----------------------------------------------------------

def compact(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("options", [{}, {"blocking": True}, {"limits": {}},
                                     {"limits": {"timeout": 1000, "memory": 128}},
                                     {"copy": 3}])
def test_encoder_bytes_are_those_of_the_message(spec: str, options: dict) -> None:
    activation_id = "0123456789abcdef" * 2
    expected = activation_message(spec, "ns-x", activation_id=activation_id, **options)
    expected["submittedAt"] = 1_700_000_000_123
    encoded = MessageEncoder(spec, "ns-x", **options).encode(activation_id.encode(),
                                                             1_700_000_000_123)
    assert encoded == compact(expected)
    activation = decode(json.loads(encoded))
    assert activation.activation_id == activation_id
    assert activation.submitted_at_ms == 1_700_000_000_123


def test_copies_are_distinct_actions_used_round_robin() -> None:
    encoders = message_encoders(["noop", "sleep:5", "noop"], "ns", copies=3)
    names = [encoders[i % len(encoders)].action_name for i in range(18)]
    assert names[:9] == ["loadgen-noop-1", "loadgen-sleep-5-1", "loadgen-noop-1",
                         "loadgen-noop-2", "loadgen-sleep-5-2", "loadgen-noop-2",
                         "loadgen-noop-3", "loadgen-sleep-5-3", "loadgen-noop-3"]
    assert names[9:] == names[:9]
    assert len(set(names)) == 6
    messages = [json.loads(e.encode(b"ab" * 16, 0)) for e in encoders]
    codes = {m["action"]["name"]: m["action"]["code"] for m in messages}
    assert codes["loadgen-noop-1"] == codes["loadgen-noop-3"] == parse_action_spec("noop").code
    assert codes["loadgen-sleep-5-2"] == parse_action_spec("sleep:5").code
    for message in messages:
        decode(message)


def test_one_copy_keeps_the_plain_names() -> None:
    encoders = message_encoders(["noop", "echo"], "ns")
    assert [e.action_name for e in encoders] == ["loadgen-noop", "loadgen-echo"]
    assert activation_message("noop", "ns")["action"]["name"] == "loadgen-noop"


@pytest.mark.parametrize("copies", [0, -1, MAX_COPIES + 1, 2.0, True, "2"])
def test_invalid_copies_are_rejected(copies) -> None:
    spec = LoadSpec(copies=copies)
    with pytest.raises(ValueError):
        spec.validate()
    with pytest.raises(ValueError):
        loadgen.run_load(spec)  # rejected before any network I/O
    with pytest.raises(ValueError):
        activation_message("noop", "ns", copy=copies)


def test_cli_copies() -> None:
    assert spec_from_args(parse(["--copies", "40"]), environ={}).copies == 40
    assert spec_from_args(parse([]), environ={}).copies == 1


@pytest.mark.parametrize("argv", [["--copies", "0"], ["--copies", "x"],
                                  ["--copies", str(MAX_COPIES + 1)]])
def test_cli_bad_copies_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["loadgen", *argv])
    assert exc.value.code == 2


def test_activation_ids_are_unique_valid_ids() -> None:
    ids = activation_ids(chunk=7)
    drawn = [next(ids) for _ in range(5000)]
    assert len(set(drawn)) == 5000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in drawn)


# --- acknowledgements and completions --------------------------------------------------------

def test_settle_reads_acknowledgements_in_send_order() -> None:
    from kafka.errors import KafkaTimeoutError
    from kafka.future import Future

    futures = {name: Future() for name in "abcd"}
    unsettled = deque(futures.items())
    sending = Sending()
    futures["a"].success(None)
    futures["c"].success(None)
    settle(unsettled, sending, only_leading=True)
    assert sending.acked == {"a"} and [i for i, _ in unsettled] == ["b", "c", "d"]
    futures["b"].failure(KafkaTimeoutError("expired"))
    settle(unsettled, sending, only_leading=True)
    assert sending.acked == {"a", "c"} and set(sending.failed) == {"b"}
    assert "KafkaTimeoutError" in sending.failed["b"] and [i for i, _ in unsettled] == ["d"]
    settle(unsettled, sending, only_leading=False)  # after the flush: "d" never acknowledged
    assert not unsettled and sending.acked == {"a", "c"} and set(sending.failed) == {"b"}


def completion_bytes(activation_id: str, namespace: str, **extra) -> bytes:
    """A completion as the daemon encodes it (invoker.records.completion_message)."""
    from invoker.records import completion_message
    from invoker.safejson import dumps

    record = {"activationId": activation_id, "namespace": namespace,
              "response": {"status": "success", "statusCode": 0, "result": {"x": 1}}}
    return dumps({**completion_message(record, "invoker0", blocking=True), **extra})


def test_completion_matcher() -> None:
    ours, other = "a" * 32, "b" * 32
    match = CompletionMatcher("ns", {ours: 0.0}).activation_id
    assert match(ours.encode(), completion_bytes(ours, "ns")) == ours
    assert match(None, completion_bytes(ours, "ns")) == ours  # unkeyed: decoded
    assert match(other.encode(), completion_bytes(other, "ns")) is None
    assert match(None, completion_bytes(other, "ns")) is None
    assert match(ours.encode(), completion_bytes(ours, "ns2")) is None  # another namespace
    assert match(None, completion_bytes(ours, "ns2")) is None
    # keyed by our id but encoded otherwise: decoded, and judged by its members
    spaced = json.dumps({"namespace": "ns", "activationId": ours}).encode()
    assert match(ours.encode(), spaced) == ours
    assert match(ours.encode(), json.dumps({"activationId": other}).encode()) is None
    for junk in [b"", b"not json", b"[1]", b'{"activationId": 7}', None, b"[" * 100_000]:
        assert match(ours.encode(), junk) is None
        assert match(None, junk) is None
    assert match(b"\xff" * 32, completion_bytes(ours, "ns")) is None
