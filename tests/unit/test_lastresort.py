"""The last-resort guard, with the service's Kafka side faked (the guard is what is tested)."""

from __future__ import annotations

from types import SimpleNamespace

from kafka.structs import TopicPartition

from invoker.feed import FeedMessage
from invoker.kafka_io import OutgoingMessage, Refusal, Unpublishable
from invoker.lastresort import (
    REASON_CHARS,
    HandOff,
    dead_letter_unexpected,
    unexpected_reason,
)
from invoker.offsets import OffsetToken

MESSAGE = FeedMessage(TopicPartition("feed", 2), epoch=1, offset=41, value=b"\x00poison",
                      received_at=0.0)
TOKEN = OffsetToken(MESSAGE.partition, 1, 41)


class FakeService:
    def __init__(self, dead_letter_fails: bool = False,
                 publish_fails: Exception | None = None) -> None:
        self.config = SimpleNamespace(dead_letter_topic="dlq")
        self.dead_letters: list[tuple[bytes, str]] = []
        self.published: list[OutgoingMessage] = []
        self.completed: list[OffsetToken] = []
        self._dead_letter_fails = dead_letter_fails
        self._publish_fails = publish_fails
        self.publisher = self

    async def dead_letter(self, message: FeedMessage, reason: str) -> None:
        if self._dead_letter_fails:
            raise KeyError("a bug in the dead-letter path")
        self.dead_letters.append((message.value, reason))

    async def publish_until_acked(self, messages: list[OutgoingMessage]) -> None:
        if self._publish_fails:
            raise self._publish_fails
        self.published.extend(messages)

    def complete(self, token: OffsetToken) -> None:
        self.completed.append(token)


async def test_unexpected_exception_dead_letters_and_completes():
    service = FakeService()
    await dead_letter_unexpected(service, MESSAGE, TOKEN, ZeroDivisionError("boom"), HandOff())
    assert service.dead_letters == [
        (b"\x00poison", "unexpected ZeroDivisionError while handling the message: boom")]
    assert service.completed == [TOKEN]


async def test_nothing_twice_once_the_outcome_was_handed_on():
    service = FakeService()
    await dead_letter_unexpected(service, MESSAGE, TOKEN, RuntimeError("late"), HandOff(True))
    assert service.dead_letters == [] and service.published == [] and service.completed == []


async def test_a_failing_dead_letter_path_gets_a_minimal_dead_letter():
    service = FakeService(dead_letter_fails=True)
    await dead_letter_unexpected(service, MESSAGE, TOKEN, ValueError("x"), HandOff())
    (sent,) = service.published
    assert sent.topic == "dlq" and sent.value == b"\x00poison"
    assert dict(sent.headers)["dlq.reason"].startswith(b"unexpected ValueError")
    assert service.completed == [TOKEN]


async def test_neither_handled_nor_dead_lettered_is_never_committed():
    service = FakeService(dead_letter_fails=True, publish_fails=RuntimeError("broken producer"))
    await dead_letter_unexpected(service, MESSAGE, TOKEN, ValueError("x"), HandOff())
    assert service.completed == []


async def test_a_dead_letter_kafka_never_takes_is_dropped_as_the_service_does():
    refusal = Refusal(0, OutgoingMessage("dlq", b"x"), "topic authorization failed", None)
    service = FakeService(dead_letter_fails=True, publish_fails=Unpublishable([refusal]))
    await dead_letter_unexpected(service, MESSAGE, TOKEN, ValueError("x"), HandOff())
    assert service.completed == [TOKEN]


def test_reason_is_short_ascii_with_the_type():
    reason = unexpected_reason(UnicodeEncodeError("utf-8", "\ud800" * 1000, 0, 1, "surrogates"))
    assert reason.startswith("unexpected UnicodeEncodeError while handling the message: ")
    assert len(reason) <= REASON_CHARS and reason.isascii()
    reason.encode("ascii")
