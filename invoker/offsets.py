"""Per-partition tracking of which offsets are safe to commit.

Activations finish out of order; an offset may be committed only when every message at or below
it in its partition has its record durably stored (or was dead-lettered). Each assignment of a
partition gets a new epoch: messages are taken (registered) only with the current one, so what
a revoked assignment had handed over and not yet started is dropped.

A rebalance first *suspends* the revoked partitions (:meth:`OffsetTracker.suspend`): nothing
more registers, and their work in flight still completes here (its progress is kept, for the
feed to commit before the revocation ends) but the service stops asking the feed to commit it.
The next assignment then either *resumes* a suspended partition (handed back to this member:
its tracking goes on, the work still in flight counts as before, and the feed seeks to
:attr:`Resumed.position`, the offset after the last one taken, so nothing is read twice) or
forgets it (another member owns it now: its late completions change nothing).

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
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

P = TypeVar("P", bound=Hashable)  # a partition's key: kafka's TopicPartition in the daemon


@dataclass(frozen=True, slots=True)
class OffsetToken(Generic[P]):
    partition: P
    epoch: int
    offset: int
    generation: int = 0  # of the partition's tracking when registered (see the module doc)


@dataclass(frozen=True, slots=True)
class Resumed:
    """A partition handed back to this member with its tracking kept."""

    position: int  # the next offset to read: after the last one taken
    committable: int | None  # what its finished work lets commit now (None: nothing yet)


@dataclass(slots=True)
class _PartitionState:
    epoch: int  # messages register only with this epoch
    first_epoch: int  # tokens of epochs from this one up to ``epoch`` count (resumed: kept)
    owned: bool = True  # False while suspended by a revocation
    committable: int | None = None  # the highest offset to commit reached so far
    generation: int = 0
    restarted_at: int = -1  # the offset the latest restart began at (-1: none yet)
    last: int = -1  # the highest offset registered in this generation (-1: none yet)
    pending: deque[int] = field(default_factory=deque)  # registered, in offset order
    done: set[int] = field(default_factory=set)  # finished but not yet at the head


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._partitions: dict[P, _PartitionState] = {}

    def assign(self, partition: P, epoch: int) -> Resumed | None:
        """``partition`` is owned from now on, in ``epoch``. Suspended, with something taken
        in its current tracking: resumed (returned); else tracked afresh (None: read from the
        committed offset)."""
        state = self._partitions.get(partition)
        if state is not None and not state.owned and state.last >= 0:
            state.owned = True
            state.epoch = epoch
            return Resumed(state.last + 1, state.committable)
        self._partitions[partition] = _PartitionState(epoch, epoch)
        return None

    def suspend(self, partition: P) -> None:
        """A revocation began: take nothing more of ``partition``; its work in flight still
        completes (see :meth:`complete`)."""
        state = self._partitions.get(partition)
        if state is not None:
            state.owned = False

    def forget_suspended(self) -> list[P]:
        """Drop the partitions still suspended (not assigned back); returns them. Completions of
        their work change nothing from now on."""
        gone = [p for p, state in self._partitions.items() if not state.owned]
        for partition in gone:
            del self._partitions[partition]
        return gone

    def owns(self, partition: P) -> bool:
        """Whether ``partition`` is assigned and not suspended."""
        state = self._partitions.get(partition)
        return state is not None and state.owned

    def committable(self, partition: P) -> int | None:
        """The highest offset to commit ``partition``'s finished work reached (None: none)."""
        state = self._partitions.get(partition)
        return state.committable if state else None

    def partitions(self) -> list[P]:
        """The partitions currently owned."""
        return [p for p, state in self._partitions.items() if state.owned]

    def accepts(self, partition: P, epoch: int) -> bool:
        """Whether a message of ``partition`` handed over in ``epoch`` may be registered."""
        state = self._partitions.get(partition)
        return state is not None and state.owned and state.epoch == epoch

    def register(self, partition: P, epoch: int, offset: int) -> OffsetToken[P] | None:
        """Record that ``offset`` was taken for processing; None if the assignment is stale
        (or suspended). An offset not above the last one registered restarts the partition's
        tracking."""
        if not self.accepts(partition, epoch):
            return None
        state = self._partitions[partition]
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

    def complete(self, token: OffsetToken[P]) -> int | None:
        """Mark ``token`` finished; return the offset to commit (next to read) if it advanced.
        Also while suspended: the caller asks for a commit only if it :meth:`owns` the
        partition."""
        state = self._partitions.get(token.partition)
        if state is None or not state.first_epoch <= token.epoch <= state.epoch:
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
        if committable is not None:
            state.committable = committable
        return committable

    def outstanding(self, partition: P | None = None) -> int:
        """Offsets registered and not yet committable, in one partition or in all."""
        if partition is not None:
            state = self._partitions.get(partition)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._partitions.values())
