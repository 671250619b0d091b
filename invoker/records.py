"""Building OpenWhisk activation records and completion messages (pure functions).

Each record is encoded once, when it is built: it is an :class:`store.EncodedRecord`, whose
compact UTF-8 JSON is what its size is checked against (``max_record_bytes``), what the stores
write, what the overflow topic carries and where a completion takes its result from. Encoding
is CPU time on the caller's thread (the trio thread): about the record's size in JSON, which
the pool's caps on results and logs keep near ``max_record_bytes`` (a rejection's error text is
bounded by the message it quotes); only a record over the cap is encoded again, smaller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invoker.messages import Rejection
from invoker.model import Activation, InvocationResult, RawJson, Status
from invoker.safejson import SPLICE, dumps_splicing
from store import EncodedRecord, doc_id_for, encode_json

LOGS_DROPPED_MARKER = "Logs were dropped because the record exceeded its size limit."
_ID_MEMBER = b',"_id":'
# A built record's response up to its result, by status: the same bytes encode_json makes.
def build_record(activation: Activation, outcome: InvocationResult, invoker_id: str,
                 max_record_bytes: int) -> EncodedRecord:
    """The stored activation record for an activation that reached the container pool.

    Raises UnencodableRecord if it holds what JSON or UTF-8 cannot (the pool's results and
    logs never do)."""
    action = activation.action
    annotations: list[dict[str, Any]] = [
        {"key": "path", "value": f"{activation.namespace}/{action.name}"},
        {"key": "kind", "value": action.kind},
        {"key": "limits", "value": action.limits.as_json()},
        {"key": "waitTime", "value": outcome.wait_time_ms},
        {"key": "invoker", "value": invoker_id},
        {"key": "startKind", "value": outcome.start_kind},
    ]
    if outcome.init_time_ms is not None:
        annotations.append({"key": "initTime", "value": outcome.init_time_ms})
    if action.blackbox:
        annotations.append({"key": "image", "value": action.image})
    return _record(activation.activation_id, activation.namespace, action.name, action.version,
                   outcome.start_ms, outcome.end_ms, outcome.status, outcome.result,
                   outcome.logs, annotations, max_record_bytes)


def build_rejection_record(rejection: Rejection, invoker_id: str, now_ms: int,
                           max_record_bytes: int) -> EncodedRecord:
    """The record of an activation that could not be run at all (bad limits, unknown kind,
    blackbox image not allowed). Capped like any record, so hostile input cannot grow it."""
    wait = now_ms - rejection.submitted_at_ms if rejection.submitted_at_ms else 0
    annotations: list[dict[str, Any]] = [
        {"key": "path", "value": f"{rejection.namespace}/{rejection.name}"},
        {"key": "kind", "value": rejection.kind},
        {"key": "waitTime", "value": max(wait, 0)},
        {"key": "invoker", "value": invoker_id},
    ]
    return _record(rejection.activation_id, rejection.namespace, rejection.name,
                   rejection.version, now_ms, now_ms, rejection.status,
                   {"error": rejection.message}, [], annotations, max_record_bytes)


def _record(activation_id: str, namespace: str, name: str, version: str, start_ms: int,
            end_ms: int, status: Status, result: dict[str, Any] | RawJson, logs: list[str],
            annotations: list[dict[str, Any]], max_record_bytes: int) -> EncodedRecord:
    # Its length is the record's response.size.
    result_json = result.data if isinstance(result, RawJson) else encode_json(result)
    head: dict[str, Any] = {
        "activationId": activation_id,
        "namespace": namespace,
        "name": name,
        "version": version,
        "subject": namespace,
        "publish": False,
        "start": start_ms,
        "end": end_ms,
        "duration": max(end_ms - start_ms, 0),
    }
    response = {"status": status.label, "statusCode": int(status),
                "success": status is Status.SUCCESS, "result": result, "size": len(result_json)}
    record = {**head, "response": response, "logs": logs, "annotations": annotations}
    return _within(record, result_json, max_record_bytes)


def _within(record: dict[str, Any], result_json: bytes, max_bytes: int) -> EncodedRecord:
    """``record`` encoded, kept under ``max_bytes`` as the stores write it
    (:func:`stored_size`): logs are dropped first, then the result, each time encoded again.

    The pool already caps results and logs, so only a record of limits configured
    inconsistently, or with a huge error text, is over; this is what makes the daemon's
    worst-case byte bound hold regardless.
    """
    encoded = encode(record, result_json)
    if stored_size(encoded) <= max_bytes:
        return encoded
    without_logs = {**record, "logs": [LOGS_DROPPED_MARKER]}
    encoded = encode(without_logs, result_json)
    if stored_size(encoded) <= max_bytes:
        return encoded
    response = dict(record["response"])
    response["result"] = {"error": "The action produced a response that exceeded the allowed "
                                   f"record size of {max_bytes} bytes."}
    if response["statusCode"] == Status.SUCCESS:
        response.update(status=Status.APPLICATION_ERROR.label,
                        statusCode=int(Status.APPLICATION_ERROR), success=False)
    return encode({**without_logs, "response": response})


def encode(record: Mapping[str, Any], result_json: bytes | None = None) -> EncodedRecord:
    """``record`` with its compact UTF-8 JSON (byte for byte :func:`store.encode_json`'s),
    knowing where ``response.result`` lies in it. ``result_json`` is that result already
    encoded, if it is. Raises UnencodableRecord.

    The record is encoded around its result, into which the result's JSON is spliced: each
    part encoded once, none twice. Where orjson refuses the record (a big integer read from an
    overflow envelope), the members before ``response``, the response's members around
    ``result`` and the members after are encoded apart and joined around the result.
    """
    response = record.get("response")
    if not isinstance(response, dict) or "result" not in response:
        return EncodedRecord(record, encode_json(record), None)
    if result_json is None:
        result_json = encode_json(response["result"])
    try:
        spliced = dumps_splicing({**record, "response": {**response, "result": SPLICE}},
                                 result_json)
    except (TypeError, ValueError):
        spliced = None  # encoding the parts apart says why
    if spliced is not None:
        data, start = spliced
        return EncodedRecord(record, data, slice(start, start + len(result_json)))
    outer_before, outer_after = _members_around(record, "response")
    inner_before, inner_after = _members_around(response, "result")
    head = b"".join((b"{", outer_before, b'"response":{', inner_before, b'"result":'))
    tail = b"".join((inner_after, b"}", outer_after, b"}"))
    start = len(head)
    return EncodedRecord(record, head + result_json + tail,
                         slice(start, start + len(result_json)))


def _members_around(obj: Mapping[str, Any], key: str) -> tuple[bytes, bytes]:
    """The JSON members of ``obj`` before ``key`` (with a trailing comma if any) and after it
    (with a leading comma if any)."""
    keys = list(obj)
    at = keys.index(key)
    before = encode_json({k: obj[k] for k in keys[:at]})[1:-1]
    after = encode_json({k: obj[k] for k in keys[at + 1:]})[1:-1]
    return (before + b"," if before else b""), (b"," + after if after else b"")


def completion_message(record: Mapping[str, Any], invoker_id: str,
                       blocking: bool) -> dict[str, Any]:
    """What goes to the completions topic once ``record`` is durably stored."""
    response = (record.response_head if isinstance(record, EncodedRecord) and not blocking
                else record["response"])  # the head alone: nothing decoded on the hot path
    message = {
        "activationId": record["activationId"],
        "namespace": record["namespace"],
        "status": response["status"],
        "statusCode": response["statusCode"],
        "invoker": invoker_id,
    }
    if blocking:
        message["result"] = response["result"]
    return message


def completion_value(summary: dict[str, Any], record: Mapping[str, Any] | None = None) -> bytes:
    """A completion message as compact UTF-8 JSON: ``summary`` (:func:`completion_message`
    without the result, perhaps with ``resultOmitted``) and, when ``record`` is given (a
    blocking activation), its result, last. The result of an EncodedRecord is spliced from its
    bytes rather than encoded again.

    Raises ValueError for what JSON or UTF-8 cannot hold (a record read back from the store may).
    """
    if record is None:
        return encode_json(summary)
    if isinstance(record, EncodedRecord) and record.result is not None:
        head = encode_json(summary)
        return b"".join((memoryview(head)[:-1], b',"result":',
                         memoryview(record.data)[record.result], b"}"))
    return encode_json({**summary, "result": record["response"]["result"]})


def stored_size(record: EncodedRecord) -> int:
    """The bytes a store writes for ``record``, at most: its JSON plus the ``"_id"`` member
    the CouchDB store adds."""
    doc_id = doc_id_for(record["namespace"], record["activationId"])
    return len(record.data) + len(_ID_MEMBER) + len(encode_json(doc_id))
