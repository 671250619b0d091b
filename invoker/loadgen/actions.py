"""Built-in actions, action specs and activation messages. Pure: no I/O.

An action spec (``"sleep:250"``) names a template of :data:`ACTIONS` and its number; the
module docstring of :mod:`invoker.loadgen` lists them. A spec can be deployed as several
*copies*: distinct actions (names ``<name>-1`` ... ``<name>-N``) with the same code, so a run
can load more actions than the daemon keeps containers for.

:func:`activation_message` builds one message as a dict; :class:`MessageEncoder` encodes a
run's messages of one action once and splices only the activation id and ``submittedAt`` into
each (the bytes are those of the dict's compact JSON, see ``tests/test_loadgen_unit.py``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from invoker.config import Config
from invoker.messages import NAME_RULE, valid_name

KIND = "python:3"
ACTION_VERSION = "0.0.1"
TRANSID_PREFIX = "loadgen-"  # + the first 12 characters of the activation id
MAX_COPIES = 10_000


@dataclass(frozen=True)
class ActionTemplate:
    """A built-in action. ``source`` is Python code with ``{arg}`` for the spec's number."""

    description: str
    source: str
    arg_name: str | None = None  # "ms", "lines", "kb"; None: the spec takes no argument
    default_arg: int | None = None
    max_arg: int | None = None

    def code(self, arg: int | None) -> str:
        return self.source.replace("{arg}", str(arg)) if self.arg_name else self.source


ACTIONS: dict[str, ActionTemplate] = {
    "echo": ActionTemplate(
        "returns its params",
        "def main(params):\n"
        "    return dict(params)\n"),
    "noop": ActionTemplate(
        "returns {}",
        "def main(params):\n"
        "    return {}\n"),
    "sleep": ActionTemplate(
        "sleeps <ms> milliseconds",
        "import time\n\n\n"
        "def main(params):\n"
        "    time.sleep({arg} / 1000.0)\n"
        "    return {'slept_ms': {arg}}\n",
        arg_name="ms", default_arg=100, max_arg=300_000),
    "cpu": ActionTemplate(
        "burns CPU for <ms> milliseconds",
        "import time\n\n\n"
        "def main(params):\n"
        "    deadline = time.perf_counter() + {arg} / 1000.0\n"
        "    iterations, x = 0, 1\n"
        "    while time.perf_counter() < deadline:\n"
        "        for _ in range(1000):\n"
        "            x = (x * 1103515245 + 12345) % 2147483648\n"
        "        iterations += 1000\n"
        "    return {'burned_ms': {arg}, 'iterations': iterations}\n",
        arg_name="ms", default_arg=100, max_arg=300_000),
    "error": ActionTemplate(
        "returns {'error': ...} (application error)",
        "def main(params):\n"
        "    return {'error': 'loadgen: deliberate application error'}\n"),
    "raise": ActionTemplate(
        "raises (action developer error)",
        "def main(params):\n"
        "    raise RuntimeError('loadgen: deliberate developer error')\n"),
    "logs": ActionTemplate(
        "prints <lines> lines",
        "def main(params):\n"
        "    for i in range({arg}):\n"
        "        print('loadgen log line %d of {arg}' % (i + 1))\n"
        "    return {'lines': {arg}}\n",
        arg_name="lines", default_arg=10, max_arg=1_000_000),
    "big": ActionTemplate(
        "returns a result of about <kb> KB",
        "def main(params):\n"
        "    # {\"data\":\"...\"} is 11 bytes besides the payload\n"
        "    return {'data': 'x' * max(0, {arg} * 1024 - 11)}\n",
        arg_name="kb", default_arg=64, max_arg=64 * 1024),
}


@dataclass(frozen=True)
class ParsedAction:
    spec: str
    kind: str  # key of ACTIONS
    arg: int | None
    name: str  # the action name in messages; distinct per spec so containers are not shared
    code: str


@functools.lru_cache(maxsize=256)
def parse_action_spec(spec: str) -> ParsedAction:
    """``"sleep:250"`` → ParsedAction. Raises ValueError for an unknown or malformed spec."""
    if not isinstance(spec, str):
        raise ValueError(f"action spec must be a string, got {spec!r}")
    kind, sep, raw_arg = spec.strip().partition(":")
    template = ACTIONS.get(kind)
    if template is None:
        raise ValueError(f"unknown action spec {spec!r} (known: {', '.join(action_spec_help())})")
    if template.arg_name is None:
        if sep:
            raise ValueError(f"action {kind!r} takes no argument: {spec!r}")
        return ParsedAction(spec, kind, None, f"loadgen-{kind}", template.code(None))
    if sep:
        if not re.fullmatch(r"\d{1,9}", raw_arg):
            raise ValueError(f"action spec {spec!r}: <{template.arg_name}> must be a "
                             "non-negative integer")
        arg = int(raw_arg)
    else:
        assert template.default_arg is not None
        arg = template.default_arg
    if template.max_arg is not None and arg > template.max_arg:
        raise ValueError(f"action spec {spec!r}: <{template.arg_name}> is at most "
                         f"{template.max_arg}")
    return ParsedAction(spec, kind, arg, f"loadgen-{kind}-{arg}", template.code(arg))


def action_spec_help() -> list[str]:
    return [f"{k}:<{t.arg_name}>" if t.arg_name else k for k, t in ACTIONS.items()]


def action_name(action: ParsedAction, copy: int | None) -> str:
    """The name of ``action``'s copy number ``copy`` (1-based); None: the only one."""
    return action.name if copy is None else f"{action.name}-{copy}"


def _config_default(field_name: str) -> int:
    """The daemon's default for the integer setting ``field_name``."""
    default = Config.__dataclass_fields__[field_name].default
    if not isinstance(default, int):
        raise TypeError(f"Config.{field_name} has no integer default")
    return default


def auto_limits(action: ParsedAction) -> dict[str, int] | None:
    """Limits an action needs beyond the daemon's defaults, or None when the defaults do."""
    if action.kind in ("sleep", "cpu") and action.arg is not None:
        default_timeout = _config_default("default_timeout_ms")
        needed = action.arg + 5_000
        if needed > default_timeout:
            return {"timeout": min(needed, _config_default("max_timeout_ms"))}
    if action.kind == "logs" and action.arg is not None:
        default_kb = _config_default("default_logs_kb")
        # "loadgen log line N of M" (21 + 2 digits) and the 71 bytes the pool charges a line
        needed = math.ceil(action.arg * (100 + 2 * len(str(action.arg))) / 1024) + 1
        if needed > default_kb:
            return {"logs": min(needed, _config_default("max_logs_kb"))}
    return None


def check_namespace(namespace: str) -> str:
    if not valid_name(namespace):
        raise ValueError(f"invalid namespace {namespace!r} ({NAME_RULE})")
    return namespace


def check_copies(copies: int) -> int:
    if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= MAX_COPIES:
        raise ValueError(f"copies must be an integer in [1, {MAX_COPIES}], got {copies!r}")
    return copies


def activation_message(action_spec: str, namespace: str, *, activation_id: str | None = None,
                       blocking: bool = False, limits: dict[str, Any] | None = None,
                       copy: int | None = None) -> dict[str, Any]:
    """An activation message the daemon accepts (see :mod:`invoker.messages`).

    ``limits`` None: the action's automatic limits, if any (see the module docstring of
    :mod:`invoker.loadgen`); ``{}`` or a dict: exactly those (OpenWhisk keys ``timeout``,
    ``memory``, ``logs``, ``concurrency``). ``copy``: for copy number ``copy`` (1-based) of
    the action, see :func:`action_name`.
    """
    action = parse_action_spec(action_spec)
    check_namespace(namespace)
    if copy is not None:
        check_copies(copy)
    activation_id = activation_id or uuid.uuid4().hex
    action_doc: dict[str, Any] = {
        "name": action_name(action, copy),
        "version": ACTION_VERSION,
        "kind": KIND,
        "code": action.code,
        "main": "main",
        "binary": False,
    }
    chosen = auto_limits(action) if limits is None else dict(limits)
    if chosen:
        action_doc["limits"] = chosen
    return {
        "activationId": activation_id,
        "namespace": namespace,
        "action": action_doc,
        "params": {"loadgen": action.spec},
        "blocking": bool(blocking),
        "transid": TRANSID_PREFIX + activation_id[:12],
        "submittedAt": int(time.time() * 1000),
    }


def encode_message(message: bytes | bytearray | dict[str, Any]) -> bytes:
    """A message as it goes to Kafka: dicts as compact JSON, bytes as they are."""
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return json.dumps(message, separators=(",", ":")).encode()


class MessageEncoder:
    """The encoded activation messages of one action spec (and copy) in one namespace.

    Everything but the activation id and ``submittedAt`` is encoded once, here;
    :meth:`encode` only joins the parts. Pure.
    """

    _ID_MEMBER = b'{"activationId":"'
    _SUBMITTED_MEMBER = b'","submittedAt":'

    def __init__(self, action_spec: str, namespace: str, *, blocking: bool = False,
                 limits: dict[str, Any] | None = None, copy: int | None = None) -> None:
        doc = activation_message(action_spec, namespace, activation_id="0" * 32,
                                 blocking=blocking, limits=limits, copy=copy)
        # activation_message's member order: activationId, these, transid, submittedAt
        fixed = {k: doc[k] for k in ("namespace", "action", "params", "blocking")}
        self._middle = (b'",' + encode_message(fixed)[1:-1] + b',"transid":"'
                        + TRANSID_PREFIX.encode())
        self.action_name: str = doc["action"]["name"]

    def encode(self, activation_id: bytes, submitted_at_ms: int) -> bytes:
        """The message for ``activation_id`` (32 lower-case hex digits, ASCII)."""
        return b"".join((self._ID_MEMBER, activation_id, self._middle, activation_id[:12],
                         self._SUBMITTED_MEMBER, b"%d}" % submitted_at_ms))


def message_encoders(actions: list[str], namespace: str, *, copies: int = 1,
                     blocking: bool = False, limits: dict[str, Any] | None = None
                     ) -> list[MessageEncoder]:
    """One encoder per action and copy; message ``i`` of a run uses encoder ``i % len``.

    Message ``i`` gets ``actions[i % len(actions)]`` (so repeating a spec weights it), copy
    ``i // len(actions) % copies + 1``: every copy of every action in turn.
    """
    if copies == 1:
        return [MessageEncoder(a, namespace, blocking=blocking, limits=limits) for a in actions]
    return [MessageEncoder(a, namespace, blocking=blocking, limits=limits, copy=c)
            for c in range(1, copies + 1) for a in actions]
