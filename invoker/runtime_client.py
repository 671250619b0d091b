"""Client of the OpenWhisk action runtime protocol (``POST /init``, ``POST /run``).

Also the pure functions that turn a runtime's answer into an OpenWhisk status and result, so
they can be tested without containers. Timeouts are the caller's business (trio cancel scopes);
this module never waits on its own except for the readiness probe.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from invoker.config import Config
from invoker.model import Action, Activation, RawJson, Status
from invoker.safejson import QUOTE_CHARS, JsonRejected, dumps, loads

# OpenWhisk's messages (common/scala/.../core/entity/ActivationResult.scala and Messages.scala)
MSG_TIMEOUT = "The action exceeded its time limits of {ms} milliseconds."
MSG_INIT_TIMEOUT = "The action exceeded its time limits of {ms} milliseconds during initialization."
MSG_OOM = "The action exhausted its memory and was aborted."
MSG_ABNORMAL = "The action did not produce a valid response and exited unexpectedly."
MSG_INVALID_RUN = "The action did not produce a valid response: {text}"
MSG_INVALID_JSON = "The action did not produce a valid JSON response: {text}"
MSG_INVALID_INIT = "The action failed during initialization: {text}"
MSG_TRUNCATED = (
    "The action produced a response that exceeded the allowed length: {n} > {max} bytes."
)
MSG_LOGS_TRUNCATED = (
    "Logs were truncated because the total bytes size exceeds the limit of {n} bytes."
)
MSG_LOGS_FAILED = "There was an issue while collecting your logs. Data might be missing."
MSG_LOGS_CONCURRENT = "Logs are not collected for actions with concurrency > 1."

_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}


class ConnectionLost(Exception):
    """The runtime could not be reached or closed the connection without a complete answer."""


@dataclass(frozen=True, slots=True)
class RuntimeResponse:
    status_code: int
    body: bytes  # at most max_bytes + one chunk; empty when truncated before reading
    truncated: bool = False
    length: int = 0  # Content-Length if announced, else the bytes seen


class RuntimeClient:
    """Makes one keep-alive HTTP client per container (see ``RuntimeConnection``)."""

    def __init__(self, max_result_bytes: int) -> None:
        self.max_result_bytes = max_result_bytes
        # Built once: making an SSL context per client costs ~40 ms (we never use TLS).
        self._ssl = ssl.create_default_context()

    def connect(self, base_url: str) -> RuntimeConnection:
        return RuntimeConnection(base_url, self.max_result_bytes, self._ssl)

    async def aclose(self) -> None:
        pass


class RuntimeConnection:
    """HTTP to one container. Its pooled keep-alive connections die with the container, so a
    stale connection can never reach a later container that got the same address."""

    def __init__(self, base_url: str, max_result_bytes: int, ssl_context: ssl.SSLContext):
        self.max_result_bytes = max_result_bytes
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64, keepalive_expiry=60.0
            ),
            trust_env=False,  # never send container traffic through a proxy from the environment
            verify=ssl_context,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def probe(self, timeout_s: float) -> bool:
        """True once anything answers HTTP on the action port (any status)."""
        try:
            resp = await self._client.get("/", timeout=timeout_s, headers=_HEADERS)
        except httpx.HTTPError:
            return False
        await resp.aclose()
        return True

    async def post(self, path: str, payload: dict[str, Any]) -> RuntimeResponse:
        """POST JSON; reads the answer streaming and stops past ``max_result_bytes``."""
        content = encode_body(payload)
        limit = self.max_result_bytes
        try:
            async with self._client.stream("POST", path, content=content,
                                           headers=_HEADERS) as resp:
                announced = resp.headers.get("content-length")
                if announced is not None and announced.isdigit() and int(announced) > limit:
                    # Leaving the block unread closes this connection; the container stays usable.
                    return RuntimeResponse(resp.status_code, b"", True, int(announced))
                buf = bytearray()
                async for chunk in resp.aiter_raw():
                    buf += chunk
                    if len(buf) > limit:
                        total = int(announced) if announced and announced.isdigit() else len(buf)
                        return RuntimeResponse(resp.status_code, b"", True, total)
                return RuntimeResponse(resp.status_code, bytes(buf), False, len(buf))
        except httpx.TransportError as exc:
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ protocol bodies
def init_body(action: Action, api_host: str | None = None) -> dict[str, Any]:
    env: dict[str, str] = {}
    if api_host:
        env["__OW_API_HOST"] = api_host
    value: dict[str, Any] = {
        "name": action.name,
        "main": action.main,
        "binary": action.binary,
        "env": env,
    }
    if action.code is not None:
        value["code"] = action.code
    return {"value": value}


def encode_body(payload: dict[str, Any]) -> bytes:
    """``payload`` as compact UTF-8 JSON; a :class:`RawJson` ``value`` goes in as it is."""
    value = payload.get("value")
    if not isinstance(value, RawJson):
        return dumps(payload)
    rest = dumps({k: v for k, v in payload.items() if k != "value"})
    return b'{"value":' + value.data + (b"," + rest[1:] if len(rest) > 2 else b"}")


def run_body(activation: Activation, deadline_ms: int) -> dict[str, Any]:
    action = activation.action
    return {
        "value": activation.params,
        "namespace": activation.namespace,
        "action_name": f"/{activation.namespace}/{action.name}",
        "action_version": action.version,
        "activation_id": activation.activation_id,
        "transaction_id": activation.transid,
        "deadline": str(deadline_ms),
    }


# ------------------------------------------------------------------ interpretation
def _text(body: bytes) -> str:
    """The start of an answer for an error text: at most ``QUOTE_CHARS`` characters, saying how
    long it was when cut (the whole answer is the action's to log, not the record's)."""
    text = body[:4 * QUOTE_CHARS].decode("utf-8", "replace")  # a character is at most 4 bytes
    if len(text) <= QUOTE_CHARS and len(body) <= 4 * QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(body)} bytes)"


def _json_object(body: bytes, max_depth: int) -> tuple[dict[str, Any] | None, str]:
    """The answer as a JSON object, or None and why not (empty when the reason is plain to see
    in the answer's text: not JSON at all, or JSON but not an object)."""
    try:
        value = loads(body, max_depth)
    except JsonRejected as exc:
        return None, "" if exc.syntax else str(exc)
    return (value, "") if isinstance(value, dict) else (None, "")


def _invalid_json(body: bytes, why: str) -> str:
    text = _text(body)
    return MSG_INVALID_JSON.format(text=f"{text} ({why})" if why else text)


def truncated_result(length: int, max_bytes: int) -> tuple[Status, dict[str, Any]]:
    return Status.APPLICATION_ERROR, {"error": MSG_TRUNCATED.format(n=length, max=max_bytes)}


def interpret_run(resp: RuntimeResponse, max_bytes: int,
                  max_depth: int = Config.max_json_depth) -> tuple[Status, dict[str, Any]]:
    """OpenWhisk's rules for a /run answer. A result that is not JSON as
    :func:`invoker.safejson.loads` takes it (NaN, nested deeper than ``max_depth``, an
    integer of thousands of digits, invalid UTF-8...) is a developer error saying why."""
    if resp.truncated:
        return truncated_result(resp.length, max_bytes)
    obj, why = _json_object(resp.body, max_depth)
    if resp.status_code == 200:
        if obj is None:
            return Status.DEVELOPER_ERROR, {"error": _invalid_json(resp.body, why)}
        if "error" in obj:
            return Status.APPLICATION_ERROR, obj
        return Status.SUCCESS, obj
    if obj is not None and "error" in obj:
        return Status.DEVELOPER_ERROR, {"error": obj["error"]}
    return Status.DEVELOPER_ERROR, {"error": MSG_INVALID_RUN.format(text=_text(resp.body))}


def interpret_init(resp: RuntimeResponse, max_bytes: int,
                   max_depth: int = Config.max_json_depth,
                   ) -> tuple[Status, dict[str, Any]] | None:
    """None when /init succeeded, else the DEVELOPER_ERROR status and result."""
    if resp.status_code == 200 and not resp.truncated:
        return None
    if resp.truncated:
        return Status.DEVELOPER_ERROR, {
            "error": MSG_INVALID_INIT.format(
                text=MSG_TRUNCATED.format(n=resp.length, max=max_bytes)
            )
        }
    obj, _ = _json_object(resp.body, max_depth)
    if obj is not None and "error" in obj:
        return Status.DEVELOPER_ERROR, {"error": obj["error"]}
    return Status.DEVELOPER_ERROR, {"error": MSG_INVALID_INIT.format(text=_text(resp.body))}
