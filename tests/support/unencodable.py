"""Activation records no store can write as JSON text, each failing in its own way."""

from __future__ import annotations

import sys

from tests.support.records import record


def unencodable_records() -> dict[str, dict]:
    """By what is wrong: records that ``store.encode_record`` refuses (each a fresh id)."""
    deep: list = []
    for _ in range(sys.getrecursionlimit() + 100):
        deep = [deep]
    return {
        "lone surrogate": record(response={"statusCode": 0, "result": {"x": "a\ud800b"}}),
        "surrogate in the namespace": record(namespace="gu\udc80est"),
        "NaN": record(response={"statusCode": 0, "result": {"x": float("nan")}}),
        "Infinity": record(duration=float("inf")),
        "not a JSON type": record(response={"statusCode": 0, "result": {1, 2}}),
        "bytes": record(logs=[b"raw"]),
        "nested too deep": record(response={"statusCode": 0, "result": {"x": deep}}),
        "integer too long to print": record(duration=10**5000),
    }
