"""Decoding activation messages from the feed.

Three outcomes, so nothing is ever dropped silently:
- :class:`Activation` — valid, run it;
- :class:`Rejection` — identifiable (id and namespace are valid) but not runnable, e.g. an unknown
  kind, limits out of range, a blackbox image outside ``blackbox_images``: it gets an error record
  with an OpenWhisk status;
- :class:`InvalidMessage` raised — not JSON or not an activation at all: it goes to the dead-letter
  topic with the reason and its original bytes.

Every field is bounded and checked before it goes anywhere (a record, a container's
environment, Docker, a log line). A field of the wrong JSON type, or an identity field the record
carries (id, namespace, name, version, kind) or ``transid``/``submittedAt`` out of bounds, makes
the message invalid; a runnability problem (image, main, limits, kind unknown) makes it a
rejection. The JSON itself goes through :func:`invoker.safejson.loads` (depth cap, no
NaN/Infinity, no lone surrogates). Error texts quote at most ~100 characters of the input
(:func:`invoker.safejson.quote`). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from invoker.config import Config, limits_problem
from invoker.model import Action, Activation, Limits, RawJson, Status
from invoker.safejson import JsonRejected, dumps_decoded, loads, quote

_ACTIVATION_ID = re.compile(r"[0-9a-f]{32}")
# OpenWhisk's entity names, 1-256 characters: no leading "_" (OpenWhisk's alias of the default
# namespace), ".", "@", "-" or space, no trailing space; so never "." or "..", never "/".
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_@.\- ]{0,254}[A-Za-z0-9_@.\-])?")
NAME_RULE = ("1-256 of A-Z a-z 0-9 _ @ . - space, starting with a letter or digit, "
              "not ending with a space")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,31}")  # semver and the like
_KIND = re.compile(r"[a-z0-9][a-z0-9:._-]{0,63}")  # python:3, nodejs:20, java:8, blackbox
# A Docker image reference (registry host and port, path, tag, digest); never a leading "-".
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,255}")
# A function or class name, dotted (com.example.Main), with Java's "#method" and .NET's "::".
_MAIN = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.:#]{0,127}")
_TRANSID = re.compile(r"[\x20-\x7e]{0,128}")  # printable ASCII: it goes into headers and logs
MAX_EPOCH_MS = 10**13  # year 2286: a larger submittedAt is not a time in milliseconds
DEFAULT_VERSION = "0.0.1"


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


def valid_activation_id(value: object) -> bool:
    return isinstance(value, str) and _ACTIVATION_ID.fullmatch(value) is not None


def valid_name(value: object) -> bool:
    """Whether ``value`` is a valid namespace or action name."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def decode_activation(raw: bytes, config: Config) -> Activation | Rejection:
    """Decode one feed message. Raises :class:`InvalidMessage` for dead-letter material."""
    if len(raw) > config.max_message_bytes:
        raise InvalidMessage(f"message of {len(raw)} bytes exceeds {config.max_message_bytes}")
    try:
        # The message object is one level; params may nest max_json_depth below it.
        doc = loads(raw, config.max_json_depth + 1)
    except JsonRejected as exc:
        raise InvalidMessage(str(exc)) from None
    if not isinstance(doc, dict):
        raise InvalidMessage("message is not a JSON object")

    activation_id = _required_str(doc, "activationId")
    if not _ACTIVATION_ID.fullmatch(activation_id):
        raise InvalidMessage(f"activationId must be 32 lower-case hex characters, "
                             f"got {quote(activation_id)}")
    namespace = _checked(_required_str(doc, "namespace"), _NAME, "namespace", NAME_RULE)
    action_doc = doc.get("action")
    if not isinstance(action_doc, dict):
        raise InvalidMessage("action must be an object")
    name = _checked(_required_str(action_doc, "name"), _NAME, "action name", NAME_RULE)
    version = _checked(_optional(action_doc, "version", str) or DEFAULT_VERSION, _VERSION,
                       "action version", "1-32 of A-Z a-z 0-9 . + _ -, starting with a "
                                         "letter or digit")
    kind = _optional(action_doc, "kind", str) or ""
    if kind:
        _checked(kind, _KIND, "action kind", "1-64 of a-z 0-9 : . _ -, starting with a "
                                             "letter or digit")
    explicit_image = _optional(action_doc, "image", str)
    code = _optional(action_doc, "code", str)  # bounded by max_message_bytes
    main = _optional(action_doc, "main", str) or "main"
    binary = _optional(action_doc, "binary", bool) or False
    params = doc.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidMessage("params must be an object")
    blocking = _optional(doc, "blocking", bool) or False
    transid = _checked(_optional(doc, "transid", str) or "", _TRANSID, "transid",
                       "at most 128 printable ASCII characters")
    submitted_at = _optional(doc, "submittedAt", int)
    if submitted_at is not None and not 0 <= submitted_at <= MAX_EPOCH_MS:
        raise InvalidMessage(f"submittedAt must be epoch milliseconds in [0, {MAX_EPOCH_MS}], "
                             f"got {quote(submitted_at)}")
    limits_doc = action_doc.get("limits") or {}
    if not isinstance(limits_doc, dict):
        raise InvalidMessage("action.limits must be an object")

    def reject(message: str) -> Rejection:
        return Rejection(activation_id, namespace, name, version, kind or "blackbox",
                         Status.DEVELOPER_ERROR, message, submitted_at, blocking)

    try:
        limits = _limits(limits_doc, config)
    except InvalidMessage as exc:
        return reject(str(exc))
    problem = limits_problem(limits, config)
    if problem:
        return reject(f"Invalid limits: {problem}.")
    if not _MAIN.fullmatch(main):
        return reject(f"Invalid main {quote(main)}: 1-128 of A-Z a-z 0-9 _ $ . : #, not "
                      "starting with a digit or punctuation other than _ and $.")

    if explicit_image:
        if not _IMAGE.fullmatch(explicit_image):
            return reject(f"Invalid image {quote(explicit_image)}: a Docker image reference "
                          "of at most 256 characters.")
        if problem := blackbox_problem(explicit_image, config.blackbox_images):
            return reject(problem)
        image, blackbox = explicit_image, True
        kind = kind or "blackbox"
    elif kind in config.kind_images:
        image, blackbox = config.kind_images[kind], False
    else:
        known = ", ".join(sorted(config.kind_images)) or "none"
        return reject(f"Unknown action kind {quote(kind)} (known kinds: {known}).")
    if not blackbox and code is None:
        return reject("The action has no code.")
    # Re-encoded, params can outgrow the message a little (1e15 -> 1000000000000000.0).
    params_json = dumps_decoded(params)
    if len(params_json) > config.max_message_bytes:
        return reject(f"The params take {len(params_json)} bytes as JSON, more than "
                      f"{config.max_message_bytes}.")

    action = Action(name=name, version=version, kind=kind, image=image, code=code, main=main,
                    binary=binary, limits=limits, blackbox=blackbox)
    return Activation(activation_id=activation_id, namespace=namespace, action=action,
                      params=RawJson(params_json), blocking=blocking, transid=transid,
                      submitted_at_ms=submitted_at)


def blackbox_problem(image: str, allowed: list[str]) -> str | None:
    """Why a blackbox action may not run ``image`` (the rule it breaks), or None if it may.

    ``allowed`` holds fnmatch patterns, matched case-sensitively against the whole reference
    (``*`` also matches ``/``); empty means blackbox actions are off.
    """
    if not allowed:
        return (f"Blackbox image {quote(image)} is not allowed: blackbox actions are disabled "
                "on this invoker (blackbox_images is empty).")
    if any(fnmatchcase(image, pattern) for pattern in allowed):
        return None
    return (f"Blackbox image {quote(image)} is not allowed: it does not match any of "
            f"blackbox_images ({', '.join(allowed)}).")


def _limits(doc: dict[str, Any], config: Config) -> Limits:
    default = config.default_limits

    def value(key: str, fallback: int) -> int:
        raw = doc.get(key)
        if raw is None:
            return fallback
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise InvalidMessage(f"Invalid limits: {key} must be an integer, got {quote(raw)}.")
        return raw

    return Limits(
        timeout_ms=value("timeout", default.timeout_ms),
        memory_mb=value("memory", default.memory_mb),
        logs_kb=value("logs", default.logs_kb),
        concurrency=value("concurrency", default.concurrency),
    )


def _checked(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not pattern.fullmatch(value):
        raise InvalidMessage(f"invalid {what} {quote(value)}: {rule}")
    return value


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
