"""Building OpenWhisk activation records and completion messages (pure functions)."""

from __future__ import annotations

import json
from typing import Any

from invoker.config import RECORD_OVERHEAD_BYTES
from invoker.messages import Rejection
from invoker.model import Activation, InvocationResult, Status

LOGS_DROPPED_MARKER = "Logs were dropped because the record exceeded its size limit."


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
    # Encoding the whole record to measure it is the costly part; skip it when even the worst
    # JSON escaping (6 bytes per character) of the logs keeps it under the cap.
    logs_worst = sum(6 * len(line) + 4 for line in record["logs"])
    if record["response"]["size"] + logs_worst + RECORD_OVERHEAD_BYTES <= max_record_bytes:
        return record
    return enforce_size(record, max_record_bytes)


def build_rejection_record(rejection: Rejection, invoker_id: str, now_ms: int) -> dict[str, Any]:
    """The record of an activation that could not be run at all (bad limits, unknown kind)."""
    wait = now_ms - rejection.submitted_at_ms if rejection.submitted_at_ms else 0
    annotations = [
        {"key": "path", "value": f"{rejection.namespace}/{rejection.name}"},
        {"key": "kind", "value": rejection.kind},
        {"key": "waitTime", "value": max(wait, 0)},
        {"key": "invoker", "value": invoker_id},
    ]
    return _record(rejection.activation_id, rejection.namespace, rejection.name,
                   rejection.version, now_ms, now_ms, rejection.status,
                   {"error": rejection.message}, [], annotations)


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


def enforce_size(record: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """Keep a record under ``max_bytes`` encoded, dropping logs first, then the result.

    The pool already caps results and logs, so this only fires if the limits are configured
    inconsistently; it is what makes the daemon's worst-case byte bound hold regardless.
    """
    if len(_encode(record)) <= max_bytes:
        return record
    record = {**record, "logs": [LOGS_DROPPED_MARKER]}
    if len(_encode(record)) <= max_bytes:
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


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
