import json

import pytest

from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import build_record
from invoker.safejson import QUOTE_CHARS
from overflow.envelope import ENVELOPE_LEVELS, OverflowedRecord, decode, encode

LIMITS = Limits(timeout_ms=1000, memory_mb=128, logs_kb=10, concurrency=1)
ACTION = Action(name="hello", version="0.0.1", kind="python:3", image="img", code="x",
                main="main", binary=False, limits=LIMITS)
AID = "c" * 32


def record(result=None, status=Status.SUCCESS) -> dict:
    activation = Activation(activation_id=AID, namespace="guest", action=ACTION, params={},
                            blocking=True, transid="t", submitted_at_ms=1)
    outcome = InvocationResult(status=status, result={"ok": 1} if result is None else result,
                               start_ms=2, end_ms=3, logs=["2026-01-01T00:00:00Z stdout: hi"])
    return build_record(activation, outcome, "inv-1", 1 << 20)


def envelope(**changes) -> bytes:
    doc = json.loads(encode(OverflowedRecord(record(), True, "inv-1")))
    for key, value in changes.items():
        target = doc
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return json.dumps(doc).encode()


def test_encode_is_utf8_json_and_decodes_back():
    item = OverflowedRecord(record({"t": "\u6f22\U0001f600"}), True, "inv-1")
    raw = encode(item)
    assert "\u6f22\U0001f600".encode() in raw and b"\\u" not in raw and b'"v":1,' in raw
    assert decode(raw, 64) == item


def test_encode_refuses_what_utf8_json_cannot_hold():
    with pytest.raises(ValueError):
        encode(OverflowedRecord(record({"x": float("nan")}), False, "inv-1"))
    with pytest.raises(ValueError):
        encode(OverflowedRecord(record({"x": "\ud800"}), False, "inv-1"))


def deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_result_may_nest_max_json_depth_deep():
    assert decode(encode(OverflowedRecord(record(deep(10)), False, "i")), 10).record[
        "response"]["result"] == deep(10)
    with pytest.raises(ValueError, match=f"nested deeper than {10 + ENVELOPE_LEVELS}"):
        decode(encode(OverflowedRecord(record(deep(11)), False, "i")), 10)


@pytest.mark.parametrize("raw, text", [
    (b"[" * 100_000, "nested deeper than 67 levels"),
    (envelope().replace(b'"ok": 1', b'"ok": ' + b"1" * 5000), "4300 digits"),
    (envelope().replace(b'"ok": 1', b'"ok": NaN'), "NaN is not a JSON number"),
    (envelope().replace(b'"ok": 1', b'"ok": "\xff"'), "not valid UTF-8"),
    (envelope().replace(b'"ok": 1', b'"ok": "\\udfff"'), "lone surrogate"),
    (b"", "not valid JSON"),
    (b"[1]", "not a version 1 envelope"),
    (envelope(v=True), "not a version 1 envelope"),
    (envelope(v=2), "not a version 1 envelope"),
    (envelope(record=[]), "no record object"),
    (envelope(**{"record.activationId": "x" * 5000}), "activationId is not 32"),
    (envelope(**{"record.namespace": "_whisk.system"}), "invalid namespace"),
    (envelope(**{"record.namespace": "guest\n"}), "invalid namespace"),
    (envelope(**{"record.response": None}), "no response object"),
    (envelope(**{"record.response.statusCode": 7}), "statusCode is not one of 0-3"),
    (envelope(**{"record.response.statusCode": True}), "statusCode is not one of 0-3"),
    (envelope(**{"record.response.status": "success!"}), "status is not 'success'"),
    (envelope(**{"record.response.result": "ok"}), "result is not an object"),
    (envelope(invoker=""), "no valid invoker id"),
    (envelope(invoker="a b"), "no valid invoker id"),
    (envelope(invoker=7), "no valid invoker id"),
    (envelope(blocking="yes"), "blocking is not a boolean"),
    (envelope(**{f"record.m{i}": i for i in range(21)}), "more than 32 members"),
    (envelope(**{"record." + "k" * 257: 1}), "member name longer than 256"),
])
def test_poison_envelopes_are_refused_with_a_short_reason(raw, text):
    with pytest.raises(ValueError) as info:
        decode(raw, 64)
    assert text in str(info.value)
    assert len(str(info.value)) < QUOTE_CHARS + 150


def test_missing_blocking_means_not_blocking():
    raw = json.loads(envelope())
    del raw["blocking"]
    assert decode(json.dumps(raw).encode(), 64).blocking is False


def test_a_record_encoded_again_by_the_recorder_keeps_its_bytes():
    """The invoker encodes an action's answer once; the recorder decodes the envelope and
    encodes the record again: the same bytes, so a record within max_record_bytes stays so
    (floats orjson and the standard encoder write differently, with a null beside them)."""
    from invoker.containers.runtime import RuntimeResponse, interpret_run
    from invoker.records import encode as encode_record

    answer = json.dumps({"p": [3.2e-07, 3.2e-05, 1e16, 0.1], "n": None}).encode()
    status, result = interpret_run(RuntimeResponse(200, answer), 1 << 20)
    built = record(result, status)
    again = encode_record(decode(encode(OverflowedRecord(built, True, "inv-1")), 64).record)
    assert again.data == built.data
