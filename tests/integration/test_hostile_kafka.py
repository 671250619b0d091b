"""Kafka refusing what the daemon sends: too large for a topic, or a topic that cannot be
written at all. Real broker, Docker engine and store; topics shrunk with real topic configs.

Nothing Kafka can never take may stop the pipeline: completions go without their result, dead
letters are truncated, overflowed records go to the store instead, offsets reach the end. What
may yet succeed (here: publishing to a topic deleted under the daemon, which may be created
again) is retried, and ``/healthz`` says so.
"""

from __future__ import annotations

import httpx
import trio
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from invoker.kafka_io import OutgoingMessage, Publisher, Unpublishable, record_batch_bytes
from invoker.loadgen import activation_message, produce_messages, read_completions
from tests.support.daemon import KAFKA, group_lag, read_topic, stored_records, wait_for

NS = "hostile"
CJK = 300_000  # characters of the large result: 900 kB as UTF-8, 1.8 MB as ASCII-escaped JSON
BROKER_MESSAGE_MAX_BYTES = 1_048_588  # the test broker's message.max.bytes (Kafka's default)


def set_topic_config(topic: str, **configs: str) -> None:
    """Topic-level overrides (``max_message_bytes`` for ``max.message.bytes``, ...); returns
    once the broker describes the topic with them (it applies them asynchronously)."""
    wanted = {k.replace("_", "."): v for k, v in configs.items()}
    admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=wanted)])

        def applied() -> bool:
            (response,) = admin.describe_configs([ConfigResource(
                ConfigResourceType.TOPIC, topic, configs=dict.fromkeys(wanted))])
            entries = response.resources[0][4]
            return {entry[0]: entry[1] for entry in entries} == wanted

        wait_for(applied, 30, f"{topic} configured with {wanted}", interval_s=0.1)
    finally:
        admin.close()


def action(name: str, code: str, *, blocking: bool = False, **params: object) -> dict:
    message = activation_message("echo", NS, blocking=blocking)
    message["action"].update(name=name, code=code, limits={"timeout": 30000, "memory": 256})
    message["params"] = params
    return message


def refused(daemon, instead: str) -> float:
    return daemon.metrics().get(f"invoker_kafka_refused_total{{instead={instead}}}", 0.0)


def test_publisher_refuses_only_what_can_never_fit_and_delivers_the_rest(topics):
    set_topic_config(topics.completions, max_message_bytes="200000")
    small = [OutgoingMessage(topics.completions, f"small-{i}".encode()) for i in range(3)]
    too_large = OutgoingMessage(topics.completions, b"x" * 250_000, key=b"k")
    beyond_broker = OutgoingMessage(topics.dead_letters, b"y" * 1_100_000)
    shrunk_later = OutgoingMessage(topics.dead_letters, b"z" * 150_000)
    caught: list[Unpublishable] = []

    async def publish(publisher: Publisher, messages: list[OutgoingMessage]) -> None:
        try:
            await publisher.publish_until_acked(messages)
        except Unpublishable as exc:
            caught.append(exc)

    publisher = Publisher(KAFKA, "tests-publisher")
    try:
        trio.run(publish, publisher, [small[0], too_large, small[1], beyond_broker, small[2]])
        # The dead-letter topic shrinks after the publisher learnt its limit: the broker
        # refuses, and the publisher learns the new limit instead of retrying.
        set_topic_config(topics.dead_letters, max_message_bytes="100000")

        def refused() -> bool:
            # The broker applies a topic's config a moment after it describes it (seen once in
            # CI: the message went through); one that does goes to a topic no test reads.
            trio.run(publish, publisher, [shrunk_later])
            return len(caught) == 2

        wait_for(refused, 30, "the broker to refuse what the new limit excludes", interval_s=0.1)
    finally:
        publisher.close()
    first, second = caught
    assert [(r.index, r.limit) for r in first.refused] == [
        (1, 200_000),
        # a topic without an override takes what the broker's message.max.bytes allows
        (3, BROKER_MESSAGE_MAX_BYTES)]
    size = record_batch_bytes(b"k", too_large.value, ())
    assert first.refused[0].reason == f"too large: {size} bytes > 200000 bytes"
    room = first.refused[0].room
    assert record_batch_bytes(b"k", b"x" * room, ()) <= 200_000
    (refusal,) = second.refused
    assert refusal.limit == 100_000 and "MessageSizeTooLargeError" in refusal.reason
    delivered = read_topic(topics.completions, expect=3)
    assert sorted(r.value for r in delivered) == sorted(m.value for m in small)  # once each


def test_completion_too_large_for_its_topic_goes_without_result(daemons, topics, sqlite_url):
    set_topic_config(topics.completions, max_message_bytes="204800")
    # Two slots: few containers to start; the two large ones may hold both write slots.
    daemon = daemons(sqlite_url, max_result_bytes=3 << 20, max_activations=2)
    code = "def main(a):\n    return {'text': '\u4e2d' * a['n']}"
    large = [action("cjk", code, blocking=True, n=CJK) for _ in range(2)]
    small = [action("cjk", code, blocking=True, n=1) for _ in range(4)]
    messages = [large[0], *small[:2], large[1], *small[2:]]
    produce_messages(KAFKA, topics.feed, messages)

    ids = {m["activationId"]: NS for m in messages}
    completions = read_completions(KAFKA, topics.completions, set(ids), 90)
    assert set(completions) == set(ids)
    for m in large:
        (completion,) = completions[m["activationId"]]
        assert "result" not in completion and completion["status"] == "success"
        assert completion["resultOmitted"].startswith("too large for the completions topic (")
    for m in small:
        assert completions[m["activationId"]][0]["result"] == {"text": "\u4e2d"}
    records, total = stored_records(sqlite_url, ids)
    assert total == len(messages)
    for m in large:
        assert records[m["activationId"]]["response"]["result"] == {"text": "\u4e2d" * CJK}
    assert refused(daemon, "result_omitted") == 2
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end")


def test_dead_letter_too_large_for_its_topic_is_truncated(daemons, topics, sqlite_url):
    set_topic_config(topics.dead_letters, max_message_bytes="100000")
    daemon = daemons(sqlite_url)
    poison = b"\xff" + b"not json " * 33_333  # 300 kB: within max_message_bytes (1 MiB)
    good = [activation_message("echo", NS)]
    produce_messages(KAFKA, topics.feed, [poison, *good])

    (dead,) = read_topic(topics.dead_letters, expect=1)
    headers = dict(dead.headers)
    assert headers["dlq.truncated"] == str(len(poison)).encode()
    assert headers["dlq.reason"] and headers["dlq.source"] == daemon.invoker_id.encode()
    assert 90_000 < len(dead.value) < 100_000 and poison.startswith(dead.value)
    ids = {m["activationId"]: NS for m in good}
    assert set(read_completions(KAFKA, topics.completions, set(ids), 60)) == set(ids)
    assert daemon.metrics()["invoker_dead_letters_total"] == 1
    assert refused(daemon, "truncated") == 1
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed past the poison message")


def test_record_too_large_for_the_overflow_topic_is_stored_instead(daemons, topics,
                                                                   couchdb_url, couch_proxy):
    set_topic_config(topics.overflow, max_message_bytes="50000")
    couch_proxy.set(latency=0.5, down=False)  # a slow store: the record channel fills up
    db = couchdb_url.rsplit("/", 1)[1]
    daemon = daemons(f"http://127.0.0.1:{couch_proxy.port}/{db}", overflow_enabled="true",
                     max_activations=2, read_ahead=2, max_poll_records=2,
                     record_channel_size=1, record_channel_low_watermark=0, batch_size=2,
                     max_writes_in_flight=1, linger_ms=5)
    messages = [action("pad", "def main(a):\n    return {'pad': 'x' * 80000}")
                for _ in range(6)]
    produce_messages(KAFKA, topics.feed, messages)

    ids = {m["activationId"]: NS for m in messages}
    assert set(read_completions(KAFKA, topics.completions, set(ids), 90)) == set(ids)
    records, total = stored_records(couchdb_url, ids)
    assert len(records) == total == len(messages)
    m = daemon.metrics()
    assert m["invoker_records_stored_total"] == len(messages)  # all by the invoker itself
    assert m["invoker_overflow_records_total"] == 0
    assert refused(daemon, "stored_instead") >= 1
    wait_for(lambda: group_lag(topics) == 0, 30, "offsets committed to the end")


def test_stuck_publish_and_long_pause_fail_health_with_the_reasons(daemons, topics,
                                                                   sqlite_url):
    # One slot, one write, room for one record and one batch of completions: a stuck
    # completion soon pauses the feed.
    daemon = daemons(sqlite_url, health_stuck_s=2, health_paused_s=1, max_activations=1,
                     read_ahead=1, max_poll_records=1, record_channel_size=1,
                     record_channel_low_watermark=0, batch_size=1, max_writes_in_flight=1,
                     max_publishes_in_flight=1)
    assert httpx.get(daemon.url("/healthz"), timeout=5).status_code == 200
    # The completions topic is deleted under the running daemon: its publisher waits for the
    # topic's metadata (a failure that may pass: someone may create it again), for ever.
    admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
    try:
        admin.delete_topics([topics.completions])
        wait_for(lambda: topics.completions not in admin.list_topics(), 30, "topic deleted")
    finally:
        admin.close()
    produce_messages(KAFKA, topics.feed, [activation_message("noop", NS) for _ in range(4)])

    def both_reasons() -> httpx.Response | None:
        answer = httpx.get(daemon.url("/healthz"), timeout=5)
        return answer if len(answer.json()["reasons"]) == 2 else None

    answer = wait_for(both_reasons, 60, "/healthz to fail for both reasons")
    assert answer.status_code == 503
    health = answer.json()
    assert health["ok"] is False and health["paused"] is True
    stuck, paused = health["reasons"]
    assert stuck.startswith(f"publish to {topics.completions} unfinished for "), stuck
    assert paused.startswith("feed paused for "), paused
    # The store side is fine: the first record's completion is stuck, the second record waits
    # for the completion stage's one place, holding the only write slot.
    assert daemon.metrics()["invoker_records_stored_total"] == 2
    assert group_lag(topics) == 4  # and no offset moves before its completion
