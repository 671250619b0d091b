"""Per-partition tracking of which offsets are safe to commit.

Activations finish out of order; an offset may be committed only when every message at or below
it in its partition has its record durably stored (or was dead-lettered). Each assignment of a
partition gets a new epoch, so work that finishes after its partition was revoked (and perhaps
assigned back) cannot move the committed offset of the new assignment.

Offsets are registered in increasing order. One that is not (the consumer's position went back:
an ``OFFSET_OUT_OF_RANGE`` reset, a seek) restarts the partition's tracking at that offset with a
new generation: the messages at or above it come again and are tracked anew (the completions of
their earlier copies change nothing), while those below it, which do not come again, stay
pending until their work is done. Nothing is raised: one odd offset must not stop the daemon.

A data structure owned by the trio thread; it only logs (a restart) and never blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OffsetToken:
    partition: Hashable
    epoch: int
    offset: int
    generation: int = 0  # of the partition's tracking when registered (see the module doc)


@dataclass(slots=True)
class _PartitionState:
    epoch: int
    generation: int = 0
    restarted_at: int = -1  # the offset the latest restart began at (-1: none yet)
    last: int = -1  # the highest offset registered in this generation (-1: none yet)
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
        """Record that ``offset`` was taken for processing; None if the assignment is stale.
        An offset not above the last one registered restarts the partition's tracking."""
        state = self._partitions.get(partition)
        if state is None or state.epoch != epoch:
            return None
        if offset <= state.last:
            self._restart(partition, state, offset)
        state.last = offset
        state.pending.append(offset)
        return OffsetToken(partition, epoch, offset, state.generation)

    @staticmethod
    def _restart(partition: Hashable, state: _PartitionState, offset: int) -> None:
        """Track ``partition`` anew from ``offset``: what is at or above it comes again."""
        kept = deque(o for o in state.pending if o < offset)
        log.warning("offset out of order: restarting the partition's offset tracking",
                    partition=str(partition), offset=offset, last_registered=state.last,
                    dropped=len(state.pending) - len(kept), still_pending=len(kept))
        state.generation += 1
        state.restarted_at = offset
        state.pending = kept
        state.done = {o for o in state.done if o < offset}

    def complete(self, token: OffsetToken) -> int | None:
        """Mark ``token`` finished; return the offset to commit (next to read) if it advanced."""
        state = self._partitions.get(token.partition)
        if state is None or state.epoch != token.epoch:
            return None
        # An earlier generation's token counts only below the restart: at or above it, its
        # message was registered again and that copy's completion is the one that counts.
        if token.generation != state.generation and token.offset >= state.restarted_at:
            return None
        if not state.pending or token.offset < state.pending[0]:
            return None  # committable already (another copy of the same message finished)
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
