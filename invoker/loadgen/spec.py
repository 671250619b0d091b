"""What a load run does (:class:`LoadSpec`), and the error for a run that cannot start."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from invoker.loadgen.actions import check_copies, check_namespace, parse_action_spec
from invoker.loadgen.daemon_metrics import check_metrics_url


class LoadgenError(RuntimeError):
    """The run could not be carried out (Kafka or the store unreachable at the start...)."""


def _default_namespace() -> str:
    return f"loadgen-{secrets.token_hex(4)}"


@dataclass
class LoadSpec:
    """What to run. ``duration_s``, when set, governs and ``count`` is ignored.

    ``actions`` are used round-robin (message i gets ``actions[i % len(actions)]``); repeat a
    spec to weight it. ``copies`` > 1 deploys every spec as that many distinct actions (same
    code, names ``<name>-1`` ... ``<name>-<copies>``) and the messages go round-robin over all
    of them (see :func:`invoker.loadgen.actions.message_encoders`). ``rate`` None: as fast as
    possible. ``completion_timeout_s`` counts from the end of producing. ``progress``: draw a
    progress bar on stderr when stderr is a terminal; ``force_progress`` also when it is not.
    ``store_url`` None: the daemon default (SQLite ``./invoker-records.sqlite3``).
    ``metrics_urls``: each daemon's /metrics; a URL whose host resolves to several addresses
    stands for that many daemons (:mod:`invoker.loadgen.daemon_metrics`). ``plot``: write
    ``<plot>.png`` and ``<plot>.html`` with the run over time (:mod:`invoker.loadgen.plot`).
    ``on_window``: called (on the calling thread) with ``"start"`` just before the first
    message is sent (the producer made) and ``"end"`` once the completions are in or their
    wait timed out, before the store is read back, for a caller that measures something over
    just that span; it should return at once, and what it raises ends the run (no report).
    A run that raises meanwhile makes no ``"end"`` call.
    """

    bootstrap: str = "127.0.0.1:9092"
    feed_topic: str = "invoker-activations"
    completions_topic: str = "invoker-completions"
    store_url: str | None = None
    actions: list[str] = field(default_factory=lambda: ["echo"])
    count: int | None = 100
    duration_s: float | None = None
    rate: float | None = None
    namespace: str = field(default_factory=_default_namespace)
    metrics_urls: list[str] = field(default_factory=list)
    completion_timeout_s: float = 120.0
    progress: bool = True
    blocking: bool = False
    force_progress: bool = False
    topic_partitions: int = 4  # only used when loadgen has to create a missing topic
    limits: dict[str, Any] | None = None  # passed to activation_message for every message
    copies: int = 1  # distinct actions per spec, at most actions.MAX_COPIES
    plot: str | None = None
    on_window: Callable[[str], None] | None = None

    def validate(self) -> None:
        """Raise ValueError for anything that makes the spec unusable."""
        if not self.actions:
            raise ValueError("at least one action spec is needed")
        for spec in self.actions:
            parse_action_spec(spec)
        check_namespace(self.namespace)
        check_copies(self.copies)
        if self.duration_s is None:
            if self.count is None:
                raise ValueError("set count or duration_s")
            if self.count < 0:
                raise ValueError(f"count must be >= 0, got {self.count}")
        elif not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if not self.completion_timeout_s >= 0:
            raise ValueError("completion_timeout_s must be >= 0")
        if not self.bootstrap:
            raise ValueError("bootstrap servers are required")
        for url in self.metrics_urls:
            check_metrics_url(url)
