"""Poison messages against a running daemon and a running recorder (real Kafka, Docker, store).

Each poison message sits between valid ones on the same topic. Afterwards the process is still
running, each poison message is on the dead-letter topic with its reason (or, for a hostile
action result, in an error record), every valid one is stored once with its completion, and
the consumer group's offsets reached the end of the topic.
"""

from __future__ import annotations

import json

import httpx

from invoker.loadgen import activation_message, produce_messages, read_completions
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import build_record
from overflow.envelope import OverflowedRecord, encode
from tests.support.daemon import (
    KAFKA,
    group_lag,
    read_topic,
    stored_records,
    topic_lag,
    wait_for,
)

NS = "hostile"


def nested(depth: int) -> dict:
    """An object nested ``depth`` levels deep (itself included)."""
    value: dict = {"leaf": True}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def nested_text(depth: int) -> bytes:
    """``nested(depth)`` as JSON text, for depths json.dumps would not recurse to."""
    return b'{"a":' * (depth - 1) + b'{"leaf":true}' + b"}" * (depth - 1)


def with_raw_value(doc: dict, raw: bytes) -> bytes:
    """``doc`` as JSON with its "__RAW__" string replaced by ``raw`` (text json.dumps would not
    write, or would refuse to)."""
    return json.dumps(doc).encode().replace(b'"__RAW__"', raw)


def poison_feed_messages() -> dict[bytes, str]:
    """Poison message → a text its dead letter's reason must hold."""
    def activation(params: dict) -> dict:
        message = activation_message("echo", NS)
        message["params"] = params
        return message

    return {
        b"[" * 100_000: "nested deeper than 65 levels",
        with_raw_value(activation({"n": "__RAW__"}), b"7" * 5000): "more than 4300 digits",
        with_raw_value(activation({"x": "__RAW__"}), b"NaN"): "NaN is not a JSON number",
        with_raw_value(activation({"s": "__RAW__"}), b'"caf\xe9"'): "not valid UTF-8",
        with_raw_value(activation({"s": "__RAW__"}), b'"\\udead"'): "lone surrogate",
        # Small (a few KB) but deep: the size limit does not stop it, the depth cap does.
        with_raw_value(activation({"p": "__RAW__"}), nested_text(1000)):
            "nested deeper than 65 levels",
    }


def hostile_result_action(tag: str, body: bytes) -> dict:
    """An action that makes its runtime answer /run with ``body`` (it swaps the runtime's JSON
    encoder, as any action code running in the runtime's process may)."""
    message = activation_message("echo", NS)
    message["action"].update(name=f"hostile-{tag}", code=(
        "import sys\n"
        f"BODY = {body!r}\n"
        "def main(params):\n"
        "    sys.modules['__main__']._json_bytes = lambda payload: BODY\n"
        "    return {}\n"))
    return message


def reasons_by_value(letters: list) -> dict[bytes, str]:
    return {letter.value: dict(letter.headers)["dlq.reason"].decode() for letter in letters}


def test_poison_feed_messages_are_dead_lettered_and_the_daemon_keeps_going(daemons, topics,
                                                                          sqlite_url):
    daemon = daemons(sqlite_url)
    poison = poison_feed_messages()
    good = [activation_message("echo", NS) for _ in range(len(poison) + 1)]
    at_cap = activation_message("echo", NS)
    at_cap["params"] = nested(64)  # max_json_depth: runs, and its result is as deep
    results = {
        "nan": (b'{"x": NaN}', "(NaN is not a JSON number)"),
        "digits": (b'{"n": ' + b"1" * 5000 + b"}", "(an integer has more than 4300 digits)"),
        "deep": (b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                 "(nested deeper than 64 levels)"),
    }
    hostile_results = {tag: hostile_result_action(tag, body) for tag, (body, _) in results.items()}
    messages: list[bytes | dict] = [good[0]]
    for raw, message in zip(poison, good[1:], strict=True):
        messages += [raw, message]
    messages += [*hostile_results.values(), at_cap]
    produce_messages(KAFKA, topics.feed, messages)

    recorded = {m["activationId"]: NS for m in [*good, at_cap, *hostile_results.values()]}
    completions = read_completions(KAFKA, topics.completions, set(recorded), 90)
    assert set(completions) == set(recorded)
    records, stored = stored_records(sqlite_url, recorded)
    assert stored == len(recorded)  # each once, and nothing else
    for m in good:
        assert records[m["activationId"]]["response"]["result"] == {"loadgen": "echo"}
    assert records[at_cap["activationId"]]["response"]["result"] == nested(64)
    for tag, (_, reason) in results.items():
        response = records[hostile_results[tag]["activationId"]]["response"]
        assert response["statusCode"] == 2, response
        assert response["result"]["error"].startswith(
            "The action did not produce a valid JSON response: ")
        assert response["result"]["error"].endswith(reason)

    reasons = reasons_by_value(read_topic(topics.dead_letters, expect=len(poison)))
    assert set(reasons) == set(poison)
    for raw, text in poison.items():
        assert text in reasons[raw], (reasons[raw], text)
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end of the topic")
    assert daemon.process.poll() is None
    assert httpx.get(daemon.url("/healthz"), timeout=5).status_code == 200
    assert daemon.metrics()["invoker_dead_letters_total"] == len(poison)


def overflowed(index: int, result: dict | None = None) -> OverflowedRecord:
    """A record as the invoker overflows it, with its own activation id."""
    limits = Limits(timeout_ms=1000, memory_mb=128, logs_kb=10, concurrency=1)
    action = Action(name="rec", version="0.0.1", kind="python:3", image="img", code="x",
                    main="main", binary=False, limits=limits)
    activation = Activation(activation_id=f"{index:08x}" + "e" * 24, namespace=NS,
                            action=action, params={}, blocking=True, transid="t",
                            submitted_at_ms=1)
    outcome = InvocationResult(status=Status.SUCCESS,
                               result={"i": index} if result is None else result,
                               start_ms=2, end_ms=3)
    return OverflowedRecord(build_record(activation, outcome, "inv-x", 1 << 20), True, "inv-x")


def test_poison_overflow_messages_are_dead_lettered_and_the_recorder_keeps_going(
        daemons, topics, sqlite_url):
    # An invoker with these limits builds records of at most 10,000 + 1,024 + 16 KiB bytes.
    recorder = daemons(sqlite_url, command="recorder", max_result_bytes=10_000, max_logs_kb=1,
                       default_logs_kb=1)
    raw_result = overflowed(100, {"v": "__RAW__"})
    bad_status = json.loads(encode(overflowed(101)))
    bad_status["record"]["response"]["statusCode"] = 7
    poison = {
        b"[" * 100_000: "nested deeper than 67 levels",
        encode(raw_result).replace(b'"__RAW__"', b"7" * 5000): "more than 4300 digits",
        encode(raw_result).replace(b'"__RAW__"', b"NaN"): "NaN is not a JSON number",
        encode(raw_result).replace(b'"__RAW__"', b'"\xff"'): "not valid UTF-8",
        encode(raw_result).replace(b'"__RAW__"', nested_text(1000)):
            "nested deeper than 67 levels",
        json.dumps(bad_status).encode(): "statusCode is not one of 0-3",
        encode(overflowed(102, {"v": "x" * 40_000})): "over max_record_bytes (27408)",
    }
    valid = [overflowed(i) for i in range(len(poison) + 1)]
    messages: list[bytes | dict] = [encode(valid[0])]
    for raw, item in zip(poison, valid[1:], strict=True):
        messages += [raw, encode(item)]
    produce_messages(KAFKA, topics.overflow, messages)

    ids = {item.record["activationId"]: NS for item in valid}
    completions = read_completions(KAFKA, topics.completions, set(ids), 60)
    assert set(completions) == set(ids)
    assert all(c[0]["invoker"] == "inv-x" and c[0]["result"] for c in completions.values())
    records, stored = stored_records(sqlite_url, ids)
    assert stored == len(ids) and all(records[aid]["namespace"] == NS for aid in ids)

    reasons = reasons_by_value(read_topic(topics.dead_letters, expect=len(poison)))
    assert set(reasons) == set(poison)
    for raw, text in poison.items():
        assert text in reasons[raw], (reasons[raw], text)
    wait_for(lambda: topic_lag(topics.recorder_group, topics.overflow) == 0, 30,
             "overflow offsets committed to the end of the topic")
    assert recorder.process.poll() is None
    assert recorder.metrics()["invoker_dead_letters_total"] == len(poison)
