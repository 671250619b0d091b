"""Decoding activation messages from the feed.

Three outcomes, so nothing is ever dropped silently:
- :class:`Activation` — valid, run it;
- :class:`Rejection` — identifiable (id and namespace are valid) but not runnable, e.g. an unknown
  kind or limits out of range: it gets an error record with an OpenWhisk status;
- :class:`InvalidMessage` raised — not JSON or not an activation at all: it goes to the dead-letter
  topic with the reason and its original bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from invoker.config import Config, limits_problem
from invoker.model import Action, Activation, Limits, Status

_ACTIVATION_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9_@.\- ]{1,256}$")


class InvalidMessage(ValueError):
    """The message cannot be read as an activation; ``reason`` says why."""


@dataclass(frozen=True, slots=True)
class Rejection:
    activation_id: str
    namespace: str
    name: str
    version: str
    kind: str
    status: Status
    message: str
    submitted_at_ms: int | None
    blocking: bool = False  # the caller still waits for the (error) result


def decode_activation(raw: bytes, config: Config) -> Activation | Rejection:
    """Decode one feed message. Raises :class:`InvalidMessage` for dead-letter material."""
    if len(raw) > config.max_message_bytes:
        raise InvalidMessage(f"message of {len(raw)} bytes exceeds {config.max_message_bytes}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidMessage("message is not a JSON object")

    activation_id = _required_str(doc, "activationId")
    if not _ACTIVATION_ID.match(activation_id):
        raise InvalidMessage("activationId must be 32 lower-case hex characters")
    namespace = _required_str(doc, "namespace")
    if not _NAME.match(namespace) or "/" in namespace:
        raise InvalidMessage(f"invalid namespace {namespace!r}")
    action_doc = doc.get("action")
    if not isinstance(action_doc, dict):
        raise InvalidMessage("action must be an object")
    name = _required_str(action_doc, "name")
    if not _NAME.match(name):
        raise InvalidMessage(f"invalid action name {name!r}")
    version = _optional(action_doc, "version", str) or "0.0.1"
    kind = _optional(action_doc, "kind", str) or ""
    explicit_image = _optional(action_doc, "image", str)
    code = _optional(action_doc, "code", str)
    main = _optional(action_doc, "main", str) or "main"
    binary = _optional(action_doc, "binary", bool) or False
    params = doc.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidMessage("params must be an object")
    blocking = _optional(doc, "blocking", bool) or False
    transid = _optional(doc, "transid", str) or ""
    submitted_at = _optional(doc, "submittedAt", int)
    limits_doc = action_doc.get("limits") or {}
    if not isinstance(limits_doc, dict):
        raise InvalidMessage("action.limits must be an object")

    def reject(status: Status, message: str) -> Rejection:
        return Rejection(activation_id, namespace, name, version, kind or "blackbox", status,
                         message, submitted_at, blocking)

    try:
        limits = _limits(limits_doc, config)
    except InvalidMessage as exc:
        return reject(Status.DEVELOPER_ERROR, str(exc))
    problem = limits_problem(limits, config)
    if problem:
        return reject(Status.DEVELOPER_ERROR, f"Invalid limits: {problem}.")

    if explicit_image:
        image, blackbox = explicit_image, True
        kind = kind or "blackbox"
    elif kind in config.kind_images:
        image, blackbox = config.kind_images[kind], False
    else:
        known = ", ".join(sorted(config.kind_images)) or "none"
        return reject(Status.DEVELOPER_ERROR,
                      f"Unknown action kind {kind!r} (known kinds: {known}).")
    if not blackbox and code is None:
        return reject(Status.DEVELOPER_ERROR, "The action has no code.")

    action = Action(name=name, version=version, kind=kind, image=image, code=code, main=main,
                    binary=binary, limits=limits, blackbox=blackbox)
    return Activation(activation_id=activation_id, namespace=namespace, action=action,
                      params=params, blocking=blocking, transid=transid,
                      submitted_at_ms=submitted_at)


def _limits(doc: dict[str, Any], config: Config) -> Limits:
    default = config.default_limits

    def value(key: str, fallback: int) -> int:
        raw = doc.get(key)
        if raw is None:
            return fallback
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise InvalidMessage(f"Invalid limits: {key} must be an integer, got {raw!r}.")
        return raw

    return Limits(
        timeout_ms=value("timeout", default.timeout_ms),
        memory_mb=value("memory", default.memory_mb),
        logs_kb=value("logs", default.logs_kb),
        concurrency=value("concurrency", default.concurrency),
    )


def _required_str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"{key} is required and must be a non-empty string")
    return value


def _optional(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidMessage(f"{key} must be of type {kind.__name__}")
    return value
