import json
import re

import pytest

from invoker.config import RECORD_OBJECT_BYTES
from invoker.messages import Rejection
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import (
    LOGS_DROPPED_MARKER,
    build_record,
    build_rejection_record,
    completion_message,
    completion_value,
    encode,
    stored_size,
)
from invoker.safejson import dumps
from overflow.envelope import OverflowedRecord
from overflow.envelope import encode as encode_envelope
from store import EncodedRecord, UnencodableRecord, doc_id_for, encode_json, encode_record
from store.couchdb import _document
from tests.support.memory import traced

LIMITS = Limits(timeout_ms=1000, memory_mb=128, logs_kb=10, concurrency=1)
ACTION = Action(name="hello", version="0.0.2", kind="python:3", image="img", code="x",
                main="main", binary=False, limits=LIMITS)
ACT = Activation(activation_id="a" * 32, namespace="guest", action=ACTION, params={},
                 blocking=True, transid="t", submitted_at_ms=1000)


def result(status=Status.SUCCESS, res=None, logs=(), init=None):
    return InvocationResult(status=status, result=res if res is not None else {"ok": 1},
                            start_ms=2000, end_ms=2250, logs=list(logs), init_time_ms=init,
                            wait_time_ms=1000, start_kind="cold" if init else "warm")


def annotations(record):
    return {a["key"]: a["value"] for a in record["annotations"]}


def test_record_follows_openwhisk_shape():
    r = build_record(ACT, result(init=40, logs=["2026-01-01T00:00:00Z stdout: hi"]), "inv0",
                     1 << 20)
    assert r["activationId"] == "a" * 32 and r["namespace"] == "guest"
    assert (r["name"], r["version"], r["subject"]) == ("hello", "0.0.2", "guest")
    assert (r["start"], r["end"], r["duration"]) == (2000, 2250, 250)
    assert r["response"] == {"status": "success", "statusCode": 0, "success": True,
                             "result": {"ok": 1}, "size": len('{"ok":1}')}
    ann = annotations(r)
    assert ann["kind"] == "python:3" and ann["invoker"] == "inv0"
    assert ann["limits"] == {"timeout": 1000, "memory": 128, "logs": 10, "concurrency": 1}
    assert ann["waitTime"] == 1000 and ann["initTime"] == 40
    assert r["logs"] == ["2026-01-01T00:00:00Z stdout: hi"]


def test_warm_start_has_no_init_time():
    assert "initTime" not in annotations(build_record(ACT, result(), "inv0", 1 << 20))


def test_status_codes_and_labels():
    for status, label in [(Status.APPLICATION_ERROR, "application error"),
                          (Status.DEVELOPER_ERROR, "action developer error"),
                          (Status.INTERNAL_ERROR, "whisk internal error")]:
        r = build_record(ACT, result(status, {"error": "e"}), "inv0", 1 << 20)
        assert r["response"]["status"] == label
        assert r["response"]["statusCode"] == int(status) and not r["response"]["success"]


def test_record_over_size_cap_drops_logs_then_result():
    logs = ["x" * 1000] * 50
    r = build_record(ACT, result(logs=logs), "inv0", 20_000)
    assert r["logs"] == [LOGS_DROPPED_MARKER] and r["response"]["result"] == {"ok": 1}
    big = build_record(ACT, result(res={"blob": "y" * 50_000}, logs=logs), "inv0", 20_000)
    assert len(json.dumps(dict(big))) <= 20_000
    assert big["response"]["statusCode"] == 1 and "exceeded" in big["response"]["result"]["error"]


def test_rejection_record():
    rej = Rejection("b" * 32, "ns", "act", "1.0", "cobol", Status.DEVELOPER_ERROR, "Unknown kind",
                    submitted_at_ms=500)
    r = build_rejection_record(rej, "inv0", now_ms=900, max_record_bytes=1 << 20)
    assert r["response"]["statusCode"] == 2 and r["response"]["result"] == {"error": "Unknown kind"}
    assert annotations(r)["waitTime"] == 400 and r["duration"] == 0


def test_rejection_records_are_capped_too():
    rej = Rejection("b" * 32, "ns", "act", "1.0", "cobol", Status.DEVELOPER_ERROR,
                    "\u6f22" * 50_000, submitted_at_ms=500)
    r = build_rejection_record(rej, "inv0", now_ms=900, max_record_bytes=20_000)
    assert stored_size(r) <= 20_000 and r["response"]["statusCode"] == 2
    assert "exceeded the allowed record size" in r["response"]["result"]["error"]


def written_by_store(record) -> int:
    """Bytes the stores write for ``record`` (the CouchDB store adds its _id member)."""
    doc_id = doc_id_for(record["namespace"], record["activationId"])
    return len(encode_record({**record, "_id": doc_id}))


@pytest.mark.parametrize("char", ["\u00e9", "\u6f22", "\U0001f600", "\x01"])
def test_records_with_multibyte_or_escaped_characters_near_the_cap_stay_under_it(char):
    cap = 20_000
    # Sizes in characters around where the stored bytes cross the cap, whatever the
    # character's UTF-8 length or JSON escaping.
    width = len(encode_record({"s": char})) - len(encode_record({"s": ""}))
    for chars in range(cap // width - 100, cap // width + 20, 3):
        for res, logs in [({"s": char * chars}, []), ({"ok": 1}, [char * chars])]:
            record = build_record(ACT, result(res=res, logs=logs), "inv0", cap)
            assert written_by_store(record) <= cap
            assert stored_size(record) >= written_by_store(record)
            if stored_size(build_record(ACT, result(res=res, logs=logs), "inv0", 1 << 30)) <= cap:
                assert record["response"]["result"] == res and record["logs"] == logs


def test_completion_carries_result_only_when_blocking():
    r = build_record(ACT, result(), "inv0", 1 << 20)
    c = completion_message(r, "inv0", blocking=True)
    assert c == {"activationId": "a" * 32, "namespace": "guest", "status": "success",
                 "statusCode": 0, "invoker": "inv0", "result": {"ok": 1}}
    assert "result" not in completion_message(r, "inv0", blocking=False)


# --- each record encoded once -------------------------------------------------------------

def encoded_before(value) -> bytes:
    """How the stores and Kafka encoded a record (or message) before records carried their
    bytes: the whole value, at once."""
    return dumps(value)


BUILT = {
    "plain": lambda: build_record(ACT, result(), "inv0", 1 << 20),
    "cold, logs, non-ASCII": lambda: build_record(
        ACT, result(res={"t": "\u6f22\U0001f600 \"q\" \\", "n": [1, 2.5, None]}, init=7,
                    logs=["2026-01-01T00:00:00Z stdout: \u00e9\x01"]), "inv0", 1 << 20),
    "empty result": lambda: build_record(ACT, result(res={}), "inv0", 1 << 20),
    "logs dropped": lambda: build_record(ACT, result(logs=["x" * 1000] * 50), "inv0", 20_000),
    "result replaced": lambda: build_record(ACT, result(res={"b": "y" * 50_000}), "inv0", 20_000),
    "rejection": lambda: build_rejection_record(
        Rejection("b" * 32, "ns", "act", "1.0", "cobol", Status.DEVELOPER_ERROR, "Unknown kind",
                  submitted_at_ms=500), "inv0", now_ms=900, max_record_bytes=1 << 20),
}


@pytest.mark.parametrize("make", BUILT.values(), ids=BUILT.keys())
def test_a_built_record_carries_the_bytes_the_stores_wrote_before(make):
    record = make()
    assert isinstance(record, EncodedRecord)
    plain = dict(record)
    assert record.data == encoded_before(plain) == encode_record(record)
    assert json.loads(record.data[record.result]) == record["response"]["result"]
    assert record["response"]["size"] == len(encoded_before(record["response"]["result"])) or (
        "exceeded" in record["response"]["result"]["error"])
    # CouchDB: the same bytes as the document with its _id added last
    doc_id = doc_id_for(record["namespace"], record["activationId"])
    assert _document(record, doc_id) == encoded_before({**plain, "_id": doc_id})
    assert stored_size(record) == len(_document(record, doc_id))
    # the overflow envelope and the completions: the same bytes as encoding them whole
    for blocking in (True, False):
        envelope = {"v": 1, "record": plain, "blocking": blocking, "invoker": "inv0"}
        assert encode_envelope(OverflowedRecord(record, blocking, "inv0")) == encoded_before(
            envelope)
        summary = completion_message(record, "inv0", blocking=False)
        assert completion_value(summary, record if blocking else None) == encoded_before(
            completion_message(plain, "inv0", blocking))


@pytest.mark.parametrize("record", [
    {"activationId": "a", "namespace": "n"},  # no response
    {"response": {"status": "x"}, "n": 1},  # no result
    {"response": {"result": [1, {"a": "\u6f22"}]}},  # nothing around the result
    {"a": 1, "response": {"result": None, "size": 4}},
    {"response": {"x": True, "result": "s"}, "z": []},
    {1: "int key", "response": {"result": {}}, "tail": {"deep": [[[]]]}},
    # what marks the result's place, and its key, in strings around it
    {"a": ',"result":{}\x00', "response": {"\x00": "\x00", "result": {"x": "\x00"}}, "z": "\x00"},
    {"big": 2**64, "response": {"result": [2**70]}},  # orjson refuses: encoded in parts
])
def test_encoding_any_record_gives_the_bytes_of_encoding_it_whole(record):
    encoded = encode(record)
    # It reads as its JSON does: the record itself, but for keys JSON makes strings (1 -> "1").
    assert encoded.data == encoded_before(record)
    assert encoded == json.loads(encoded_before(record))
    if encoded.result is not None:
        assert json.loads(encoded.data[encoded.result]) == record["response"]["result"]


def test_a_record_read_back_from_the_store_still_makes_its_completion():
    read_back = json.loads(build_record(ACT, result(), "inv0", 1 << 20).data)
    summary = completion_message(read_back, "inv0", blocking=False)
    assert json.loads(completion_value(summary, read_back))["result"] == {"ok": 1}
    with pytest.raises(ValueError):  # what the completion stage catches (resultOmitted)
        completion_value(summary, {**read_back, "response": {"result": {"x": float("nan")}}})


def test_an_encoded_record_is_read_only():
    record = build_record(ACT, result(), "inv0", 1 << 20)
    for change in (lambda: record.__setitem__("logs", []), lambda: record.pop("logs"),
                   lambda: record.update(logs=[]), lambda: record.setdefault("x", 1),
                   lambda: record.clear(), lambda: record.popitem(),
                   lambda: record.__delitem__("logs")):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert record.data == encoded_before(dict(record))


def test_a_record_no_encoder_can_write_is_refused_when_built():
    with pytest.raises(UnencodableRecord, match="record is not JSON"):
        build_record(ACT, result(logs=["a\ud800b"]), "inv0", 1 << 20)
    with pytest.raises(UnencodableRecord):
        build_record(ACT, result(res={"x": float("nan")}), "inv0", 1 << 20)
    for member in (float("nan"), -float("inf"), "a\ud800", {1, 2}):
        with pytest.raises(UnencodableRecord, match="record is not JSON"):
            encode({"x": member, "response": {"result": {}}})


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, -0.0, 1e300, None, True, False], "é\u6f22": "\U0001f600\x01\"\\/"},
    "text", 10**4000, [], {}, {3: "int key"}, [[[[{"deep": [[]]}]]]],
])
def test_the_store_encoding_is_byte_for_byte_safejson_dumps(value):
    assert encode_json(value) == dumps(value)
    # compact UTF-8 JSON of the same value as json.dumps with these settings writes (floats
    # may be written in another notation)
    standard = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert json.loads(dumps(value)) == json.loads(standard)
    if not re.search(r"\d[eE.]", standard):
        assert dumps(value) == standard.encode("utf-8")


def test_what_safejson_dumps_refuses_the_store_encoding_refuses_too():
    circular: list = []
    circular.append(circular)
    for value in (float("nan"), float("inf"), "a\ud800", {1, 2}, b"raw", 10**5000, circular):
        with pytest.raises(UnencodableRecord, match="record is not JSON"):
            encode_json(value)


def test_a_record_of_a_hostile_result_costs_its_bytes_not_its_objects():
    """``{"a":[{},{},...]}`` parses to ~25 times its JSON; a built record (and the result the
    runtime interpretation hands on) keeps the JSON only, which the worst case counts."""
    from invoker.containers.runtime import RuntimeResponse, interpret_run

    body = b'{"a":[' + b",".join([b"{}"] * 300_000) + b"]}"  # 900 KB
    (status, answer), retained, _ = traced(
        lambda: interpret_run(RuntimeResponse(200, body), 1 << 20))
    assert status is Status.SUCCESS and len(answer["a"]) == 300_000
    assert retained < 1.2 * len(body)
    record, retained, _ = traced(lambda: build_record(ACT, result(res=answer), "inv0", 2 << 20))
    assert record["response"]["result"] == json.loads(body)
    assert record.data == encoded_before(dict(record))
    assert retained < len(record.data) + RECORD_OBJECT_BYTES


def test_an_encoded_record_reads_like_the_record_it_was_built_from():
    built = json.loads(build_record(ACT, result(logs=["l1", "l2"]), "inv0", 1 << 20).data)
    record = encode(built)
    assert record == built and dict(record) == built and list(record) == list(built)
    assert "logs" in record and "nope" not in record and len(record) == len(built)
    assert record.response_head == {k: v for k, v in built["response"].items() if k != "result"}
    assert completion_message(record, "inv0", blocking=False) == completion_message(
        built, "inv0", blocking=False)


def test_a_hostile_record_keeps_only_its_bytes_and_a_few_short_scalars():
    """What the recorder encodes comes from an untrusted topic: members of any size or number
    are read from the record's bytes, never kept as objects besides them."""
    many_keys = {**json.loads(build_record(ACT, result(), "inv0", 1 << 20).data),
                 **{f"k{i}": i for i in range(100)}}
    long_members = {**json.loads(build_record(ACT, result(), "inv0", 1 << 20).data),
                    "name": "n" * 300_000, "start": 10 ** 4000, "x" * 100_000: 1,
                    "response": {"status": "s" * 100_000, "statusCode": 0, "result": {}}}
    for doc in (many_keys, long_members):
        record, retained, _ = traced(lambda doc=doc: encode(doc))
        assert retained < len(record.data) + RECORD_OBJECT_BYTES
        assert record == doc and len(record) == len(doc) and set(record) == set(doc)
        assert "k99" in record or "x" * 100_000 in record
        assert "nope" not in record
