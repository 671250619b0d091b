"""The invoker's dispatcher, with the real offset tracker and slots; only the per-message work
(``Invoker._handle``) is replaced, by one that records what it was given and holds its slot."""

from __future__ import annotations

import trio
import trio.testing
from kafka.structs import TopicPartition

from invoker.batcher import PendingRecord
from invoker.config import Config
from invoker.daemon import Invoker
from invoker.feed import FeedMessage
from invoker.service import ReadAhead

TP = TopicPartition("feed", 0)


class _Recording(Invoker):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.started: list[int] = []
        self.finish = trio.Event()

    async def _handle(self, message, token) -> None:  # type: ignore[no-untyped-def]
        self.started.append(message.offset)
        try:
            await self.finish.wait()
        finally:
            self._slots.release()


def _message(offset: int, epoch: int = 1) -> FeedMessage:
    return FeedMessage(TP, epoch, offset, b"{}", 0.0)


async def _dispatching(invoker: _Recording, messages: list[FeedMessage],
                       turns: int | None = None) -> tuple[list[int], int]:
    """Offsets started with ``messages`` waiting, and the slots left free: after ``turns``
    turns of the scheduler, or once everything is blocked."""
    tx, rx = trio.open_memory_channel[FeedMessage](len(messages))
    for message in messages:
        tx.send_nowait(message)
    async with trio.open_nursery() as work:
        work.start_soon(invoker.dispatch, ReadAhead(rx, lambda: None), work)
        if turns is None:
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(turns or 0):
            await trio.lowlevel.checkpoint()
        started = sorted(invoker.started)  # tasks of one turn run in any order
        free = invoker._slots.value
        invoker.finish.set()
        work.cancel_scope.cancel()
    return started, free


async def test_what_waits_starts_in_one_turn_up_to_the_free_slots() -> None:
    invoker = _Recording(Config(max_activations=5))
    invoker.tracker.assign(TP, 1)
    # The dispatcher's first message takes it a few turns (receive, slot, start) and the
    # handlers start one turn later; 6 turns leave one to spare. At one message per turn (each
    # await a checkpoint) only the first would have started by then; the slots bound it.
    started, free = await _dispatching(invoker, [_message(n) for n in range(8)], turns=6)
    assert started == [0, 1, 2, 3, 4]
    assert free == 0


async def test_revoked_messages_are_skipped_without_taking_a_slot() -> None:
    invoker = _Recording(Config(max_activations=4))
    invoker.tracker.assign(TP, 2)  # messages handed over in epoch 1 belong to a revoked one
    messages = [_message(0, epoch=2), _message(1, epoch=1), _message(2, epoch=2),
                _message(3, epoch=1), _message(4, epoch=2)]
    started, free = await _dispatching(invoker, messages)
    assert started == [0, 2, 4]
    assert free == 1


async def test_the_uncommitted_offsets_bound_stops_the_batch() -> None:
    invoker = _Recording(Config(max_activations=8, max_uncommitted_offsets=3))
    invoker.tracker.assign(TP, 1)
    started, free = await _dispatching(invoker, [_message(n) for n in range(6)])
    assert started == [0, 1, 2]  # the fourth waits for an offset to commit
    assert free == 4  # the dispatcher holds the fourth one's slot while it waits
    assert invoker.tracker.outstanding() == 3


async def test_a_record_with_room_is_enqueued_without_a_checkpoint() -> None:
    """With room in the record channel, enqueueing takes no scheduler turn (and so cannot be
    cancelled: a record made is handed on); with none, it waits, as long as it may."""
    invoker = Invoker(Config(record_channel_size=1, record_channel_low_watermark=0))
    pending = PendingRecord({"activationId": "a" * 32}, None, False)
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint would raise Cancelled
        assert await invoker.enqueue(pending)
    assert invoker._record_rx.receive_nowait() is pending
    assert await invoker.enqueue(pending)
    assert not await invoker.enqueue(pending, timeout_s=0.01)
    with trio.move_on_after(0.01) as waited:
        await invoker.enqueue(pending)
    assert waited.cancelled_caught
    assert invoker.record_depth() == 1
