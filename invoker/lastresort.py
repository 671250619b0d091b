"""The last resort around the handling of one message: nothing one message does may stop the
invoker or the recorder.

The services catch what they expect (undecodable messages, action faults, store refusals). For
anything else raised while handling one message — a bug, an input nobody thought of —
:func:`dead_letter_unexpected` dead-letters that message (reason: the exception's type and a short
text), completes its offset and logs one error line (a JSON line with the traceback in its
``exception`` field: an unexpected exception is a bug, and the traceback is what fixes it). The
service keeps running. trio.Cancelled, KeyboardInterrupt and SystemExit are not Exceptions and
pass; the callers let MemoryError pass too (the process, not the message, is in trouble).

Twice must not happen: once a message's outcome was handed on (its record into the record
channel or acknowledged by the overflow topic, or the message dead-lettered), that path
completes its offset. A :class:`HandOff` marker, passed down to where the hand-off happens and
set there, tells.

When even dead-lettering fails: a second, minimal dead letter is tried (the original bytes and
the reason, through the publisher directly, so a fault in the usual dead-letter path does not
stop it; like every publish it is retried while Kafka is unreachable). Then:

- Kafka refuses it for good (:class:`~invoker.kafka_io.Unpublishable`): the message is dropped
  with one error line giving its topic, partition and offset, and its offset completes, as the
  service does with any dead letter Kafka can never take (see :mod:`invoker.service`): waiting
  could never end, and the bytes stay readable at that offset for the topic's retention.
- Anything else (the publisher itself is broken): the offset is *not* completed. Committing a
  message that is neither stored nor dead-lettered would lose it; instead its partition's
  commits wait at that offset while later messages are still processed (up to
  ``max_uncommitted_offsets``), and the next start or rebalance reads it again. With a broken
  publisher no completion can be published either, so nothing could commit meanwhile anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from invoker.kafka_io import OutgoingMessage, Unpublishable, header_text

if TYPE_CHECKING:
    from kafka.structs import TopicPartition

    from invoker.feed import FeedMessage
    from invoker.offsets import OffsetToken
    from invoker.service import FeedService

log = structlog.get_logger(__name__)

REASON_CHARS = 200  # of a last-resort dead letter's reason


@dataclass(slots=True)
class HandOff:
    """Whether a message's outcome was handed on; from then on its offset is not ours to
    complete, nor the message ours to dead-letter."""

    done: bool = False


def unexpected_reason(exc: BaseException) -> str:
    """``exc`` as a dead letter's reason: its type and a short text, at most ``REASON_CHARS``
    characters, ASCII (it becomes a Kafka header and a log field)."""
    text = f"unexpected {type(exc).__name__} while handling the message: {exc}"
    return header_text(text, REASON_CHARS).decode("ascii")


async def dead_letter_unexpected(service: FeedService, message: FeedMessage,
                                 token: OffsetToken[TopicPartition], exc: Exception,
                                 handoff: HandOff) -> None:
    """The last resort for ``message``, whose handling raised ``exc`` (see the module
    docstring). Blocks while Kafka is unreachable, as every dead letter does."""
    where = {"topic": message.partition.topic, "partition": message.partition.partition,
             "offset": message.offset, "error_type": type(exc).__name__}
    if handoff.done:
        log.error("handling a message failed after its outcome was handed on; nothing to undo",
                  exc_info=exc, **where)
        return
    reason = unexpected_reason(exc)
    log.error("handling a message failed; dead-lettering it", reason=reason, exc_info=exc,
              **where)
    try:
        await service.dead_letter(message, reason)
    except Exception as failed:
        log.error("dead-lettering failed; sending a minimal dead letter",
                  error=unexpected_reason(failed), **where)
        try:
            assert service.publisher is not None  # the service publishes before dispatching
            await service.publisher.publish_until_acked([OutgoingMessage(
                service.config.dead_letter_topic, message.value,
                headers=(("dlq.reason", header_text(reason)),))])
        except Unpublishable as refused:
            log.error("message dropped: neither handled nor dead-lettered, and Kafka will "
                      "never take it as a dead letter", error=str(refused)[:REASON_CHARS],
                      **where)
        except Exception as failed_again:
            log.error("message neither handled nor dead-lettered: its offset stays "
                      "uncommitted until a restart or rebalance reads it again",
                      error=unexpected_reason(failed_again), **where)
            return
    service.complete(token)
