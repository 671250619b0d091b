"""The overflow topic's message format (pure).

Value: compact UTF-8 JSON ``{"v": 1, "record": <activation record>, "blocking": bool,
"invoker": id}``; key: the activation id, so a record and its re-executions land in the same
partition.

Anyone who can write to the overflow topic can put anything there, so :func:`decode` takes it
as untrusted: :func:`invoker.safejson.loads` with the depth cap, then every field the recorder's
pipeline reads (the store's document id, the completion message) checked as the invoker checks
its feed messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from invoker.messages import valid_activation_id, valid_name
from invoker.model import Status
from invoker.safejson import JsonRejected, loads, quote
from store import MAX_KEPT_CHARS, MAX_RECORD_MEMBERS, encode_json, encode_record

VERSION = 1
# Levels above a record's result: the envelope, the record, its response.
ENVELOPE_LEVELS = 3
_INVOKER_ID = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no space
_STATUS_CODES = frozenset(int(status) for status in Status)


@dataclass(frozen=True, slots=True)
class OverflowedRecord:
    record: Mapping[str, Any]
    blocking: bool
    invoker_id: str


def encode(item: OverflowedRecord) -> bytes:
    """The envelope as compact UTF-8 JSON, with the record's bytes spliced in (an
    :class:`~store.EncodedRecord`'s are not encoded again). Raises ValueError for a record JSON
    or UTF-8 cannot hold (see :func:`invoker.safejson.dumps`)."""
    return b"".join((b'{"v":%d,"record":' % VERSION, encode_record(item.record),
                     b',"blocking":', b"true" if item.blocking else b"false",
                     b',"invoker":', encode_json(item.invoker_id), b"}"))


def decode(raw: bytes, max_json_depth: int) -> OverflowedRecord:
    """Raises ValueError with a reason for anything that is not an overflowed record.

    ``max_json_depth`` caps the nesting of the record's result, as for the invoker's results.
    """
    try:
        doc = loads(raw, max_json_depth + ENVELOPE_LEVELS)
    except JsonRejected as exc:
        raise ValueError(f"overflow message refused: {exc}") from None
    version = doc.get("v") if isinstance(doc, dict) else None
    if type(version) is not int or version != VERSION:  # True == 1, but is no version
        raise ValueError(f"overflow message is not a version {VERSION} envelope")
    record = doc.get("record")
    if not isinstance(record, dict):
        raise ValueError("overflow message has no record object")
    if len(record) > MAX_RECORD_MEMBERS or any(len(key) > MAX_KEPT_CHARS for key in record):
        raise ValueError(f"overflowed record has more than {MAX_RECORD_MEMBERS} members or a "
                         f"member name longer than {MAX_KEPT_CHARS} characters")
    activation_id = record.get("activationId")
    if not valid_activation_id(activation_id):
        raise ValueError("overflowed record's activationId is not 32 lower-case hex "
                         f"characters: {quote(activation_id)}")
    if not valid_name(record.get("namespace")):
        raise ValueError(f"overflowed record has an invalid namespace: "
                         f"{quote(record.get('namespace'))}")
    _check_response(record.get("response"))
    invoker = doc.get("invoker")
    if not isinstance(invoker, str) or not _INVOKER_ID.fullmatch(invoker):
        raise ValueError(f"overflow message has no valid invoker id: {quote(invoker)}")
    blocking = doc.get("blocking", False)
    if not isinstance(blocking, bool):
        raise ValueError(f"overflow message's blocking is not a boolean: {quote(blocking)}")
    return OverflowedRecord(record, blocking, invoker)


def _check_response(response: object) -> None:
    """What the completion message takes from the record: a status code and its label, and an
    object result."""
    if not isinstance(response, dict):
        raise ValueError("overflowed record has no response object")
    code = response.get("statusCode")
    if type(code) is not int or code not in _STATUS_CODES:
        raise ValueError(f"overflowed record's statusCode is not one of 0-3: {quote(code)}")
    label = Status(code).label
    if response.get("status") != label:
        raise ValueError(f"overflowed record's status is not {label!r} (statusCode {code}): "
                         f"{quote(response.get('status'))}")
    if not isinstance(response.get("result"), dict):
        raise ValueError("overflowed record's result is not an object")
