"""The overflow topic's message format (pure).

Value: JSON ``{"v": 1, "record": <activation record>, "blocking": bool, "invoker": id}``; key:
the activation id, so a record and its re-executions land in the same partition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1


@dataclass(frozen=True, slots=True)
class OverflowedRecord:
    record: dict[str, Any]
    blocking: bool
    invoker_id: str


def encode(item: OverflowedRecord) -> bytes:
    return json.dumps({"v": VERSION, "record": item.record, "blocking": item.blocking,
                       "invoker": item.invoker_id}, separators=(",", ":")).encode()


def decode(raw: bytes) -> OverflowedRecord:
    """Raises ValueError with a reason for anything that is not an overflowed record."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"overflow message is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError(f"overflow message is not a version {VERSION} envelope")
    record = doc.get("record")
    if not isinstance(record, dict):
        raise ValueError("overflow message has no record object")
    for key in ("activationId", "namespace"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"overflowed record has no {key}")
    response = record.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("statusCode"), int):
        raise ValueError("overflowed record has no response status")
    invoker = doc.get("invoker")
    if not isinstance(invoker, str):
        raise ValueError("overflow message has no invoker id")
    return OverflowedRecord(record, bool(doc.get("blocking")), invoker)
