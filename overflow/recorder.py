"""``invoker recorder``: drains the overflow topic into the store.

Same pipeline as the invoker after execution: feed (its own consumer group) → bounded record
channel → batcher → store → completion → commit. The consumer pauses when the channel is
saturated. Undecodable messages go to the dead-letter topic (the overflow topic is taken as
untrusted: see :mod:`overflow.envelope`), and so does one whose handling fails unexpectedly
(:mod:`invoker.lastresort`). Scale out by starting more recorders in the same group
(``recorder_group_id``).
"""

from __future__ import annotations

from typing import Any

import trio
from kafka.structs import TopicPartition

from invoker.batcher import PendingRecord
from invoker.config import Config
from invoker.feed import FeedMessage
from invoker.lastresort import HandOff, dead_letter_unexpected
from invoker.metrics import Metrics
from invoker.offsets import OffsetToken
from invoker.records import encode, stored_size
from invoker.service import FeedService, ReadAhead
from overflow.envelope import decode
from store import Store


class Recorder(FeedService):
    role = "recorder"

    def __init__(self, config: Config, metrics: Metrics | None = None,
                 store: Store | None = None) -> None:
        super().__init__(config, topic=config.overflow_topic, group_id=config.recorder_group_id,
                         client_id=config.recorder_id, metrics_port=config.recorder_metrics_port,
                         feed_bootstrap=config.overflow_brokers, metrics=metrics, store=store)

    def started_fields(self) -> dict[str, Any]:
        return {"topic": self.config.overflow_topic, "group": self.config.recorder_group_id}

    async def dispatch(self, messages: ReadAhead, work: trio.Nursery) -> None:
        """Decode in order; blocks on the record channel, which is what pauses the feed.

        Whatever goes wrong with one message beyond what decoding expects, it is
        dead-lettered and the recorder goes on (:mod:`invoker.lastresort`).
        """
        async for message in messages:
            token = await self.register(message)
            if token is None:
                continue
            handoff = HandOff()
            try:
                await self._take(message, token, handoff)
            except MemoryError:
                raise
            except Exception as exc:
                await dead_letter_unexpected(self, message, token, exc, handoff)

    async def _take(self, message: FeedMessage, token: OffsetToken[TopicPartition],
                    handoff: HandOff) -> None:
        """Into the record channel (blocks while it is full), or to the dead-letter topic:
        undecodable, or a record larger than an invoker of this configuration builds
        (``max_record_bytes``)."""
        try:
            item = decode(message.value, self.config.max_json_depth)
        except ValueError as exc:
            await self._refuse(message, token, handoff, str(exc))
            return
        # Encoded once here: the store writes these bytes, the completion takes its result from
        # them (what the envelope's decoder took is always encodable). The parsed envelope (up
        # to PARSED_JSON_FACTOR times its size) goes before waiting on a full channel.
        record, blocking, invoker_id = encode(item.record), item.blocking, item.invoker_id
        del item
        size, limit = stored_size(record), self.config.max_record_bytes
        if size > limit:
            await self._refuse(message, token, handoff, f"overflowed record is {size} bytes, "
                               f"over max_record_bytes ({limit})")
            return
        await self.enqueue(PendingRecord(record, token, blocking, invoker_id=invoker_id))
        handoff.done = True

    async def _refuse(self, message: FeedMessage, token: OffsetToken[TopicPartition],
                      handoff: HandOff, reason: str) -> None:
        await self.dead_letter(message, reason)
        handoff.done = True
        self.complete(token)
