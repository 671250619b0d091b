"""Noticing operations that do not finish: what ``/healthz`` reports as stuck.

An operation (a Kafka publish, a bulk store write) registers with :meth:`StuckWatch.begin`
when it starts and :meth:`StuckWatch.end` when it succeeded or was given up; while it is
retrying it reports each failure with :meth:`StuckWatch.failed`. :meth:`StuckWatch.oldest`
then says how long the longest-running unfinished one has been going and what went wrong last.
A slow success and an endless retry look the same from outside, and both are worth knowing
once they last longer than the health limit.

Not thread-safe: use one watch from one thread (the trio thread). Nothing here blocks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_ERROR_CHARS = 300  # of an operation's last error, as /healthz and /status show it


@dataclass(frozen=True, slots=True)
class Stuck:
    what: str  # e.g. "publish to invoker-completions"
    seconds: float  # since it began
    error: str  # its last failure; empty while none was reported

    def describe(self) -> str:
        text = f"{self.what} unfinished for {self.seconds:.1f} s"
        return f"{text}: {self.error}" if self.error else text


@dataclass(slots=True)
class _Operation:
    what: str
    started: float
    error: str = ""


class StuckWatch:
    """Unfinished operations, so health can tell how long the oldest one has been going."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ids = itertools.count()
        self._running: dict[int, _Operation] = {}

    def begin(self, what: str) -> int:
        """An operation started; returns its token for :meth:`failed` and :meth:`end`."""
        token = next(self._ids)
        self._running[token] = _Operation(what, self._clock())
        return token

    def failed(self, token: int, error: str) -> None:
        """The operation failed once and will be retried."""
        operation = self._running.get(token)
        if operation is not None:
            operation.error = error[:MAX_ERROR_CHARS]  # a peer's text: /healthz stays small

    def end(self, token: int) -> None:
        """The operation succeeded or was given up (either way it no longer waits)."""
        self._running.pop(token, None)

    def stuck_for(self) -> float:
        """Seconds the oldest unfinished operation has been going (0.0: none)."""
        oldest = self.oldest()
        return oldest.seconds if oldest else 0.0

    def oldest(self) -> Stuck | None:
        if not self._running:
            return None
        # Tokens grow with time, so the first entry (dicts keep insertion order) is the oldest.
        operation = next(iter(self._running.values()))
        return Stuck(operation.what, self._clock() - operation.started, operation.error)
