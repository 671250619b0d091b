"""Reading completions: a run's collector thread, and :func:`read_completions` for tests.

The daemon publishes a completion once an activation's record is durably stored, keyed by the
activation id, as compact JSON that starts with ``{"activationId":"<id>","namespace":"<ns>",``.
The collector needs only those two fields: a record keyed by an id the run did not send is
skipped without decoding, and one whose value starts as expected is taken without decoding;
anything else is decoded in full and judged by its ``activationId`` and ``namespace`` members.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from invoker.config import Config
from invoker.loadgen.clients import TOPIC_METADATA_TIMEOUT_S, assign_all, new_consumer
from invoker.loadgen.spec import LoadgenError
from invoker.safejson import loads

POLL_TIMEOUT_MS = 100  # how soon the collector thread sees close()


def decode_completion(raw: bytes | None) -> dict[str, Any] | None:
    """A completion message as a dict, or None when it is not one (no string activationId)."""
    if not raw:
        return None
    try:
        doc = loads(raw, Config.max_json_depth)  # deep nesting is refused, not a crash
    except ValueError:  # JsonRejected
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("activationId"), str):
        return None
    return doc


def read_completions(bootstrap: str, topic: str, ids: set[str], timeout_s: float
                     ) -> dict[str, list[dict[str, Any]]]:
    """Completion messages on ``topic`` for ``ids``, waiting until each id has at least one or
    ``timeout_s`` passed. Reads the topic from its beginning. The result has only the ids that
    got a completion (so ``ids - result.keys()`` are the missing ones); each maps to all its
    messages, in order.
    """
    wanted = set(ids)
    found: dict[str, list[dict[str, Any]]] = {}
    if not wanted:
        return found
    deadline = time.monotonic() + timeout_s
    consumer = new_consumer(bootstrap)
    try:
        try:
            tps = assign_all(consumer, topic, max(0.0, timeout_s))
        except LoadgenError:
            return found
        consumer.seek_to_beginning(*tps)
        while len(found) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batches = consumer.poll(timeout_ms=int(min(left, 0.5) * 1000) or 1)
            for records in batches.values():
                for record in records:
                    doc = decode_completion(record.value)
                    if doc is not None and doc["activationId"] in wanted:
                        found.setdefault(doc["activationId"], []).append(doc)
    finally:
        consumer.close()
    return found


class CompletionMatcher:
    """Which expected activation a completion record is for (see the module docstring). Pure."""

    def __init__(self, namespace: str, expected: Mapping[str, float]) -> None:
        self._namespace = namespace
        self._expected = expected
        # what follows the id in the daemon's encoding; namespaces are ASCII (NAME_RULE)
        self._after_id = b'","namespace":' + json.dumps(namespace).encode() + b","

    def activation_id(self, key: bytes | None, value: bytes | None) -> str | None:
        """The expected activation id the record is a completion of, or None."""
        if key is not None:
            keyed_id = key.decode("latin-1")  # never fails; our ids are ASCII
            if keyed_id not in self._expected:
                return None
            if value is not None and value.startswith(
                    b'{"activationId":"%s%s' % (key, self._after_id)):
                return keyed_id
        doc = decode_completion(value)
        if doc is None or doc.get("namespace", self._namespace) != self._namespace:
            return None
        activation_id = doc["activationId"]
        return activation_id if activation_id in self._expected else None


class CompletionCollector:
    """Consumes the completions topic on a thread, from the end it had when started.

    ``expected`` (activation id -> send time) is filled by the producing thread before each
    send; completions of other ids are ignored. Memory: one entry per expected id seen.
    """

    def __init__(self, bootstrap: str, topic: str, namespace: str,
                 expected: Mapping[str, float]) -> None:
        """Blocks: connecting and reading the topic's metadata and end offsets (bounded by
        TOPIC_METADATA_TIMEOUT_S and the consumer's request timeout)."""
        self._matcher = CompletionMatcher(namespace, expected)
        self.cond = threading.Condition()
        self.first_seen: dict[str, float] = {}  # guarded by cond
        self._arrivals: list[str] = []  # ids in first-seen order, guarded by cond
        self.message_counts: dict[str, int] = {}  # completion messages per id, guarded by cond
        self.error: str | None = None
        self._stop = threading.Event()
        self._consumer = new_consumer(bootstrap)
        try:
            tps = assign_all(self._consumer, topic, TOPIC_METADATA_TIMEOUT_S)
            # Explicit end offsets (not a lazy seek_to_end): everything published after this
            # point is read, however late the first poll happens.
            ends = self._consumer.end_offsets(tps)
            for tp in tps:
                self._consumer.seek(tp, ends[tp])
        except Exception:
            self._consumer.close()
            raise
        self._thread = threading.Thread(target=self._run, name="loadgen-completions",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batches = self._consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                now = time.monotonic()
                match = self._matcher.activation_id
                ids = [i for records in batches.values() for record in records
                       if (i := match(record.key, record.value)) is not None]
                if ids:
                    self._take(ids, now)
        except Exception as exc:  # reported, and the waiters stop waiting
            with self.cond:
                self.error = f"completions consumer failed: {type(exc).__name__}: {exc}"
                self.cond.notify_all()

    def _take(self, ids: list[str], now: float) -> None:
        with self.cond:
            for activation_id in ids:
                seen = self.message_counts.get(activation_id, 0)
                self.message_counts[activation_id] = seen + 1
                if not seen:
                    self.first_seen[activation_id] = now
                    self._arrivals.append(activation_id)
            self.cond.notify_all()

    def completed_count(self) -> int:
        return len(self.first_seen)

    def wait_for(self, ids: set[str], deadline: float) -> bool:
        """Wait until every id in ``ids`` completed or ``deadline`` (monotonic); True if all.

        Linear overall: each wake-up only looks at the arrivals since the previous one.
        """
        with self.cond:
            remaining = {i for i in ids if i not in self.first_seen}
            seen = len(self._arrivals)
            while True:
                remaining.difference_update(self._arrivals[seen:])
                seen = len(self._arrivals)
                if not remaining:
                    return True
                if self.error is not None:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop the thread (waits up to 5 s for its current poll) and close the consumer."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        try:
            self._consumer.close()
        except Exception:
            pass
