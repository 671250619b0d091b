"""Activation records as the store tests write them."""

from __future__ import annotations

import uuid

from store import doc_id_for


def record(namespace: str = "guest", activation_id: str | None = None, **extra) -> dict:
    """A complete activation record (a fresh activation id unless given); ``extra`` keys are
    added or replace the defaults."""
    rec = {
        "namespace": namespace,
        "name": "hello",
        "activationId": activation_id or uuid.uuid4().hex,
        "version": "0.0.1",
        "subject": "guest",
        "start": 1700000000000,
        "end": 1700000000042,
        "duration": 42,
        "response": {"statusCode": 0, "success": True, "result": {"msg": "héllo ☃"}},
        "logs": ["2024-01-01T00:00:00Z stdout: hi"],
        "annotations": [{"key": "path", "value": f"{namespace}/hello"}],
        "publish": False,
    }
    rec.update(extra)
    return rec


def rid(rec: dict) -> str:
    """The store's document id of ``rec``."""
    return doc_id_for(rec["namespace"], rec["activationId"])
