import json

import pytest

from invoker.messages import Rejection
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.records import (
    LOGS_DROPPED_MARKER,
    build_record,
    build_rejection_record,
    completion_message,
    stored_size,
)
from store import doc_id_for, encode_record

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
    assert len(json.dumps(big)) <= 20_000
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
