"""Plain data shared by the feed, the container pool, the record builder and the batcher.

Nothing here does I/O; every type is immutable or owned by one task at a time.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def pool_key(self) -> tuple[str, str, str]:
        """Containers are reused only by activations of the same action and version."""
        return (self.image, self.name, self.version)


@dataclass(frozen=True, slots=True)
class Activation:
    """One valid activation message, as taken from the feed."""

    activation_id: str
    namespace: str
    action: Action
    params: dict[str, Any]
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
    result: dict[str, Any]
    start_ms: int
    end_ms: int
    logs: list[str] = field(default_factory=list)
    init_time_ms: int | None = None
    wait_time_ms: int = 0
    start_kind: str = "warm"  # "cold" | "prewarm" | "warm" | "none" (never reached a container)


def now_ms() -> int:
    """Epoch milliseconds, as records and activation messages carry them."""
    return time.time_ns() // 1_000_000
