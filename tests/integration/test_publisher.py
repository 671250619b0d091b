"""The publisher against a real broker: where it sends from, and that every message arrives once.

A topic's first publish learns its size limit and metadata from the brokers, on a worker
thread; later ones send from the trio thread and wait on the futures' callbacks.
"""

from __future__ import annotations

import threading

import trio

from invoker.kafka_io import OutgoingMessage, Publisher
from tests.support.daemon import KAFKA, read_topic


def watched(publisher: Publisher) -> list[str]:
    """Where each of ``publisher``'s sends runs from, in order: "trio" (trio.run runs on this
    thread) or "worker"."""
    producer_send = publisher._producer.send
    senders: list[str] = []

    def send(*args, **kwargs):
        senders.append("trio" if threading.current_thread() is threading.main_thread()
                       else "worker")
        return producer_send(*args, **kwargs)

    publisher._producer.send = send
    return senders


def test_a_known_topic_is_published_to_from_the_trio_thread(topics):
    publisher = Publisher(KAFKA, "tests-publisher")
    senders = watched(publisher)
    messages = [OutgoingMessage(topics.completions, f"m-{i}".encode(), key=f"k{i}".encode())
                for i in range(5)]
    try:
        trio.run(publisher.publish_until_acked, messages[:1])
        trio.run(publisher.publish_until_acked, messages[1:])
    finally:
        publisher.close()
    assert senders == ["worker", "trio", "trio", "trio", "trio"]
    delivered = read_topic(topics.completions, expect=5)
    assert sorted(r.value for r in delivered) == [m.value for m in messages]  # once each


def test_a_batch_with_a_topic_not_known_goes_from_a_worker_thread(topics):
    publisher = Publisher(KAFKA, "tests-publisher")
    senders = watched(publisher)
    done = [OutgoingMessage(topics.completions, f"d-{i}".encode()) for i in range(4)]
    dead = OutgoingMessage(topics.dead_letters, b"dl")
    try:
        trio.run(publisher.publish_until_acked, done[:1])
        trio.run(publisher.publish_until_acked, [done[1], dead])  # dead letters: new to it
        publisher._limits.forget(topics.completions)  # its limit is to be learnt again
        trio.run(publisher.publish_until_acked, done[2:3])
        trio.run(publisher.publish_until_acked, done[3:])
    finally:
        publisher.close()
    assert senders == ["worker", "worker", "worker", "worker", "trio"]
    assert sorted(r.value for r in read_topic(topics.completions, expect=4)) == [
        m.value for m in done]
    assert [r.value for r in read_topic(topics.dead_letters, expect=1)] == [b"dl"]
