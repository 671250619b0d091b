"""The completion stage against a scripted publisher (Kafka is the boundary being faked)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from invoker.batcher import PendingRecord
from invoker.completions import CompletionStage
from invoker.kafka_io import OutgoingMessage, Refusal, Unpublishable
from invoker.metrics import Metrics
from invoker.model import Action, Activation, InvocationResult, Limits, Status
from invoker.offsets import OffsetToken
from invoker.records import build_record, completion_message
from invoker.safejson import dumps

LIMITS = Limits(timeout_ms=1000, memory_mb=128, logs_kb=10, concurrency=1)
ACTION = Action(name="hello", version="0.0.1", kind="python:3", image="img", code="x",
                main="main", binary=False, limits=LIMITS)


def built(n: int, result: dict | None = None):
    activation = Activation(activation_id=f"{n:032x}", namespace="guest", action=ACTION,
                            params={}, blocking=True, transid="t", submitted_at_ms=1000)
    outcome = InvocationResult(status=Status.SUCCESS, result=result or {"n": n, "s": "\u6f22"},
                               start_ms=2000, end_ms=2001)
    return build_record(activation, outcome, "inv0", 1 << 20)


def pending(n: int, blocking: bool = True, **kw) -> PendingRecord:
    return PendingRecord(kw.pop("record", None) or built(n), OffsetToken("p", 1, n), blocking,
                         **kw)


class ScriptedPublisher:
    """Holds each publish until released; refuses values over ``limit`` bytes as too large."""

    def __init__(self, limit: int = 1 << 20, hold: bool = True) -> None:
        self.limit = limit
        self.hold = hold
        self.calls: list[list[OutgoingMessage]] = []
        self.held: list[trio.Event] = []

    async def publish_until_acked(self, messages):
        self.calls.append(list(messages))
        if self.hold:
            release = trio.Event()
            self.held.append(release)
            await release.wait()
        refused = [Refusal(i, m, f"too large: {len(m.value)}", limit=self.limit)
                   for i, m in enumerate(messages) if len(m.value) > self.limit]
        if refused:
            raise Unpublishable(refused)


def stage(publisher, max_in_flight=2, metrics=None):
    completed: list[int] = []
    return CompletionStage(publisher, "done", "inv0", max_in_flight,
                           lambda token: completed.append(token.offset),
                           metrics or Metrics()), completed


async def test_offsets_complete_only_once_kafka_acknowledged_their_completions():
    publisher = ScriptedPublisher()
    completions, completed = stage(publisher)
    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        await completions.submit([pending(1), pending(2, blocking=False)])
        await trio.testing.wait_all_tasks_blocked()
        assert len(publisher.calls) == 1 and completed == []
        (blocking, quiet) = publisher.calls[0]
        record = built(1)
        assert blocking.value == dumps(completion_message(record, "inv0", blocking=True))
        assert blocking.key == record["activationId"].encode() and blocking.topic == "done"
        assert quiet.value == dumps(completion_message(built(2), "inv0", blocking=False))
        publisher.held[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert completed == [1, 2]
        completions.close()


async def test_at_most_max_in_flight_batches_await_acks_and_submit_waits_meanwhile():
    publisher = ScriptedPublisher()
    metrics = Metrics()
    completions, completed = stage(publisher, max_in_flight=2, metrics=metrics)
    submitted = []

    async def submit(n):
        await completions.submit([pending(n)])
        submitted.append(n)

    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        for i in range(4):
            n.start_soon(submit, i)
            await trio.testing.wait_all_tasks_blocked()
        assert len(publisher.calls) == 2 and len(submitted) == 2  # two wait for a place
        publisher.held[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(publisher.calls) == 3 and len(submitted) == 3
        for release in publisher.held:
            release.set()
        await trio.testing.wait_all_tasks_blocked()
        for release in publisher.held:
            release.set()
        completions.close()
    assert sorted(completed) == [0, 1, 2, 3]
    count = metrics.registry.get_sample_value("invoker_stage_seconds_count",
                                              {"stage": "completion_publish"})
    assert count == 4  # once per batch


async def test_close_waits_for_the_last_acks():
    publisher = ScriptedPublisher(hold=False)
    completions, completed = stage(publisher)
    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        await completions.submit([pending(i) for i in range(3)])
        completions.close()
    assert completed == [0, 1, 2]


async def test_too_large_goes_without_its_result_and_a_refused_one_still_completes():
    publisher = ScriptedPublisher(limit=300, hold=False)
    metrics = Metrics()
    completions, completed = stage(publisher, metrics=metrics)
    big = built(1, {"blob": "x" * 1000})
    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        await completions.submit([pending(1, record=big), pending(2)])
        completions.close()
    assert completed == [1, 2]
    first, again = publisher.calls
    assert len(first) == 2 and len(again) == 1
    sent = json.loads(again[0].value)
    assert "result" not in sent and sent["resultOmitted"].startswith(
        "too large for the completions topic")
    assert sent["activationId"] == big["activationId"] and sent["statusCode"] == 0
    refused = metrics.registry.get_sample_value("invoker_kafka_refused_total",
                                                {"instead": "result_omitted"})
    assert refused == 1


async def test_too_large_even_without_a_result_is_dropped_and_its_offset_completes():
    publisher = ScriptedPublisher(limit=10, hold=False)
    metrics = Metrics()
    completions, completed = stage(publisher, metrics=metrics)
    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        await completions.submit([pending(1), pending(2, blocking=False)])
        completions.close()
    assert completed == [1, 2]
    assert metrics.registry.get_sample_value("invoker_kafka_refused_total",
                                             {"instead": "dropped"}) == 2


@pytest.mark.parametrize(("stored", "expect"), [
    # read back from the store: JSON that Python's parser took, UTF-8 cannot write
    ({"result": {"x": float("nan")}}, "resultOmitted"),
    ({"result": {"x": "\ud800"}}, "resultOmitted"),
    ({"status": "succ\udc00ess"}, "ascii"),
])
async def test_a_record_read_back_that_cannot_be_encoded_still_gets_a_completion(stored, expect):
    publisher = ScriptedPublisher(hold=False)
    completions, completed = stage(publisher)
    record = json.loads(built(1).data)
    record["response"].update(stored)
    async with trio.open_nursery() as n:
        n.start_soon(completions.run)
        await completions.submit([pending(1, record=record)])
        completions.close()
    assert completed == [1]
    ((message,),) = publisher.calls
    sent = json.loads(message.value)
    assert sent["activationId"] == record["activationId"]
    if expect == "resultOmitted":
        assert "result" not in sent
        assert sent["resultOmitted"].startswith("not encodable as UTF-8 JSON")
    else:
        assert message.value.isascii() and sent["status"] == "succ\udc00ess"
