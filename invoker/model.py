"""Plain data shared by the feed, the container pool, the record builder and the batcher.

Nothing here does I/O; every type is immutable or owned by one task at a time.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Status(enum.IntEnum):
    """OpenWhisk activation status codes; ``label`` is the string stored in the record."""

    SUCCESS = 0
    APPLICATION_ERROR = 1
    DEVELOPER_ERROR = 2
    INTERNAL_ERROR = 3

    @property
    def label(self) -> str:
        return _STATUS_LABELS[self]


_STATUS_LABELS = {
    Status.SUCCESS: "success",
    Status.APPLICATION_ERROR: "application error",
    Status.DEVELOPER_ERROR: "action developer error",
    Status.INTERNAL_ERROR: "whisk internal error",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-action limits in OpenWhisk units: timeout ms, memory MB, logs KB."""

    timeout_ms: int
    memory_mb: int
    logs_kb: int
    concurrency: int

    def as_json(self) -> dict[str, int]:
        return {
            "timeout": self.timeout_ms,
            "memory": self.memory_mb,
            "logs": self.logs_kb,
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True, slots=True)
class Action:
    """What to run. ``image`` is the resolved image (from ``kind`` or explicit for blackbox)."""

    name: str
    version: str
    kind: str
    image: str
    code: str | None
    main: str
    binary: bool
    limits: Limits
    blackbox: bool = False
    # Memo of code_digest: set on first use (the object is otherwise immutable). Not compared.
    _code_digest: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def code_digest(self) -> str:
        """sha256 (hex) of what a container is initialized with: kind, image, main, binary, code.

        Hashed once per Action object (one per activation message, code up to the message
        size) and kept in the object itself, so the memo lives and dies with the action: no
        cache to bound, no key that could be reused by another object.
        """
        digest = self._code_digest
        if digest is None:
            # repr quotes and escapes each string (lone surrogates too), so the header ends at
            # its newline (json.dumps made an encoder per call: most of the time it took)
            header = repr((self.kind, self.image, self.main, self.binary, self.code is None))
            h = hashlib.sha256(header.encode())
            h.update(b"\n")
            # surrogatepass: hashing never fails, whatever the string holds (the decoder refuses
            # lone surrogates, but an Action can be built by other code too)
            h.update((self.code or "").encode("utf-8", "surrogatepass"))
            digest = h.hexdigest()
            object.__setattr__(self, "_code_digest", digest)
        return digest

    def pool_key(self, namespace: str) -> PoolKey:
        """Which warm containers may serve this action for ``namespace`` (see PoolKey)."""
        return PoolKey(namespace, self.name, self.version, self.code_digest,
                       self.limits.memory_mb, max(1, self.limits.concurrency))


class PoolKey(NamedTuple):
    """A container is reused only by activations with an equal key: one namespace (a container
    never serves two tenants), one action and version, the same code (changed code under the
    same name and version gets a new container), and the limits the container was created
    with (memory limit and concurrency are fixed per container)."""

    namespace: str
    name: str
    version: str
    code_digest: str
    memory_mb: int
    concurrency: int


@dataclass(frozen=True, slots=True, eq=False)
class RawJson(Mapping[str, Any]):
    """A JSON object kept encoded (compact UTF-8, as :func:`invoker.safejson.dumps` makes it).
    A decoded message's params and an action's result are kept so: as Python objects they can
    take ~25 times their encoded size (``[{},{},...]``), which would break the worst-case
    memory bound for every running activation. Read as a mapping, it is decoded on each
    access (tests and error paths do; the hot path splices ``data``)."""

    data: bytes

    def __getitem__(self, key: str) -> Any:
        return json.loads(self.data)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(json.loads(self.data))

    def __len__(self) -> int:
        return len(json.loads(self.data))


@dataclass(frozen=True, slots=True)
class Activation:
    """One valid activation message, as taken from the feed."""

    activation_id: str
    namespace: str
    action: Action
    params: dict[str, Any] | RawJson  # RawJson when decoded from a message
    blocking: bool
    transid: str
    submitted_at_ms: int | None


@dataclass(slots=True)
class InvocationResult:
    """What running an activation in a container produced, before it becomes a record.

    ``start_ms``/``end_ms`` are epoch milliseconds around ``/run`` (or around the failed step).
    ``status`` and ``result`` already follow OpenWhisk's rules for interpreting the response.
    """

    status: Status
    result: dict[str, Any] | RawJson  # RawJson when the action answered it
    start_ms: int
    end_ms: int
    logs: list[str] = field(default_factory=list)
    init_time_ms: int | None = None
    wait_time_ms: int = 0
    start_kind: str = "warm"  # "cold" | "prewarm" | "warm" | "none" (never reached a container)


def now_ms() -> int:
    """Epoch milliseconds, as records and activation messages carry them."""
    return time.time_ns() // 1_000_000
