"""Building OpenWhisk activation records and completion messages (pure functions)."""

from __future__ import annotations

import json
from typing import Any

from invoker.config import RECORD_OVERHEAD_BYTES
from invoker.messages import Rejection
from invoker.model import Activation, InvocationResult, Status
from store import doc_id_for

LOGS_DROPPED_MARKER = "Logs were dropped because the record exceeded its size limit."
_ID_MEMBER = b',"_id":'


def build_record(activation: Activation, outcome: InvocationResult, invoker_id: str,
                 max_record_bytes: int) -> dict[str, Any]:
    """The stored activation record for an activation that reached the container pool."""
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
    record = _record(activation.activation_id, activation.namespace, action.name, action.version,
                     outcome.start_ms, outcome.end_ms, outcome.status, outcome.result,
                     outcome.logs, annotations)
    return _within(record, max_record_bytes)


def build_rejection_record(rejection: Rejection, invoker_id: str, now_ms: int,
                           max_record_bytes: int) -> dict[str, Any]:
    """The record of an activation that could not be run at all (bad limits, unknown kind,
    blackbox image not allowed). Capped like any record, so hostile input cannot grow it."""
    wait = now_ms - rejection.submitted_at_ms if rejection.submitted_at_ms else 0
    annotations = [
        {"key": "path", "value": f"{rejection.namespace}/{rejection.name}"},
        {"key": "kind", "value": rejection.kind},
        {"key": "waitTime", "value": max(wait, 0)},
        {"key": "invoker", "value": invoker_id},
    ]
    record = _record(rejection.activation_id, rejection.namespace, rejection.name,
                     rejection.version, now_ms, now_ms, rejection.status,
                     {"error": rejection.message}, [], annotations)
    return _within(record, max_record_bytes)


def _record(activation_id: str, namespace: str, name: str, version: str, start_ms: int,
            end_ms: int, status: Status, result: dict[str, Any], logs: list[str],
            annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "activationId": activation_id,
        "namespace": namespace,
        "name": name,
        "version": version,
        "subject": namespace,
        "publish": False,
        "start": start_ms,
        "end": end_ms,
        "duration": max(end_ms - start_ms, 0),
        "response": {
            "status": status.label,
            "statusCode": int(status),
            "success": status is Status.SUCCESS,
            "result": result,
            "size": len(_encode(result)),
        },
        "logs": logs,
        "annotations": annotations,
    }


def _within(record: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``record`` kept under ``max_bytes`` as stored (see :func:`enforce_size`).

    Encoding the whole record to measure it is the costly part; it is skipped when the result's
    size, the worst JSON escaping of the logs (6 bytes per character: ``\u001f``; no character
    takes more in UTF-8) and ``RECORD_OVERHEAD_BYTES`` for the rest (ids, names and kind are
    bounded by :mod:`invoker.messages`) stay under the cap.
    """
    logs_worst = sum(6 * len(line) + 4 for line in record["logs"])
    if record["response"]["size"] + logs_worst + RECORD_OVERHEAD_BYTES <= max_bytes:
        return record
    return enforce_size(record, max_bytes)


def enforce_size(record: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """Keep a record under ``max_bytes`` as the stores write it (:func:`stored_size`), dropping
    logs first, then the result.

    The pool already caps results and logs, so this only fires if the limits are configured
    inconsistently or an error text is huge; it is what makes the daemon's worst-case byte bound
    hold regardless.
    """
    if stored_size(record) <= max_bytes:
        return record
    record = {**record, "logs": [LOGS_DROPPED_MARKER]}
    if stored_size(record) <= max_bytes:
        return record
    response = dict(record["response"])
    response["result"] = {"error": "The action produced a response that exceeded the allowed "
                                   f"record size of {max_bytes} bytes."}
    if response["statusCode"] == Status.SUCCESS:
        response.update(status=Status.APPLICATION_ERROR.label,
                        statusCode=int(Status.APPLICATION_ERROR), success=False)
    return {**record, "response": response}


def completion_message(record: dict[str, Any], invoker_id: str, blocking: bool) -> dict[str, Any]:
    """What goes to the completions topic once ``record`` is durably stored."""
    response = record["response"]
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


def stored_size(record: dict[str, Any]) -> int:
    """An upper bound of the bytes a store writes for ``record``: its compact UTF-8 JSON
    (``ensure_ascii=False``, as :func:`store.encode_record` makes it) plus the ``"_id"`` member
    the CouchDB store adds."""
    doc_id = doc_id_for(record["namespace"], record["activationId"])
    return len(_encode(record)) + len(_ID_MEMBER) + len(_encode(doc_id))


def _encode(value: Any) -> bytes:
    """As the stores and Kafka encode, but never raising for a value they would refuse (a lone
    surrogate counts 3 bytes, NaN 3): measuring must not fail where storing fails alone."""
    return json.dumps(value, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8", "surrogatepass")
