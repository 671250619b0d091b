"""Per-partition tracking of which offsets are safe to commit.

Activations finish out of order; an offset may be committed only when every message at or below
it in its partition has its record durably stored (or was dead-lettered). Each assignment of a
partition gets a new epoch, so work that finishes after its partition was revoked (and perhaps
assigned back) cannot move the committed offset of the new assignment.

Pure data structure: no I/O, owned by the trio thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class OffsetToken:
    partition: Hashable
    epoch: int
    offset: int


@dataclass(slots=True)
class _PartitionState:
    epoch: int
    pending: deque[int] = field(default_factory=deque)  # registered, in offset order
    done: set[int] = field(default_factory=set)  # finished but not yet at the head


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Hashable, _PartitionState] = {}

    def assign(self, partition: Hashable, epoch: int) -> None:
        self._partitions[partition] = _PartitionState(epoch)

    def revoke(self, partition: Hashable) -> None:
        self._partitions.pop(partition, None)

    def partitions(self) -> list[Hashable]:
        """The partitions currently assigned."""
        return list(self._partitions)

    def register(self, partition: Hashable, epoch: int, offset: int) -> OffsetToken | None:
        """Record that ``offset`` was taken for processing; None if the assignment is stale."""
        state = self._partitions.get(partition)
        if state is None or state.epoch != epoch:
            return None
        if state.pending and offset <= state.pending[-1]:
            raise ValueError(f"offset {offset} registered out of order on {partition}")
        state.pending.append(offset)
        return OffsetToken(partition, epoch, offset)

    def complete(self, token: OffsetToken) -> int | None:
        """Mark ``token`` finished; return the offset to commit (next to read) if it advanced."""
        state = self._partitions.get(token.partition)
        if state is None or state.epoch != token.epoch:
            return None
        state.done.add(token.offset)
        committable = None
        while state.pending and state.pending[0] in state.done:
            head = state.pending.popleft()
            state.done.discard(head)
            committable = head + 1
        return committable

    def outstanding(self, partition: Hashable | None = None) -> int:
        """Offsets registered and not yet committable, in one partition or in all."""
        if partition is not None:
            state = self._partitions.get(partition)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._partitions.values())
