"""A group join kafka-python forgets is finished (real Kafka broker).

kafka-python 2.x, as group leader, rejoins when a subscribed topic's partitions change, and
forgets the join when ``poll()`` times out between its JoinGroup and SyncGroup answers: the
member then keeps its revoked partitions unassigned for ever (seen in CI as a daemon that
stopped reading after a rebalance). The feed asks it to finish the join
(:func:`invoker.feed.finish_abandoned_join`); this drives a real consumer the way the feed does.
"""

from __future__ import annotations

import time
import uuid

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic

from invoker.feed import finish_abandoned_join
from tests.support.daemon import KAFKA

ROUNDS = 5  # partitions added, one at a time; each is a rebalance led by the one member
ROUND_TIMEOUT_S = 30.0


class _Recorder(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.awaiting = False
        self.assigned: set[int] = set()

    def on_partitions_revoked(self, revoked):  # type: ignore[no-untyped-def]
        self.awaiting = True

    def on_partitions_assigned(self, assigned):  # type: ignore[no-untyped-def]
        self.awaiting = False
        self.assigned = {tp.partition for tp in assigned}


def _poll_until_assigned(consumer: KafkaConsumer, listener: _Recorder, partitions: int,
                         finished: list[int]) -> None:
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while len(listener.assigned) < partitions:
        assert time.monotonic() < deadline, (
            f"still assigned {sorted(listener.assigned)} of {partitions} partitions after "
            f"{ROUND_TIMEOUT_S} s: the join was never finished")
        # A poll this short mostly returns between the join's two answers, as the feed's
        # 10 ms paused polls did.
        consumer.poll(timeout_ms=1)
        if listener.awaiting and finish_abandoned_join(consumer):
            finished[0] += 1


def test_a_leader_join_left_unfinished_after_partitions_were_added_is_finished():
    topic, group = f"t-{uuid.uuid4().hex[:10]}-join", f"g-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=KAFKA, client_id="tests")
    admin.create_topics([NewTopic(topic, 1, 1)])
    listener = _Recorder()
    consumer = KafkaConsumer(bootstrap_servers=KAFKA, group_id=group,
                             enable_auto_commit=False, metadata_max_age_ms=200)
    finished = [0]
    try:
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while not consumer.partitions_for_topic(topic):
            assert time.monotonic() < deadline, "topic metadata never arrived"
            time.sleep(0.1)
        consumer.subscribe([topic], listener=listener)
        _poll_until_assigned(consumer, listener, 1, finished)
        for partitions in range(2, 2 + ROUNDS):
            admin.create_partitions({topic: NewPartitions(partitions)})
            _poll_until_assigned(consumer, listener, partitions, finished)
        # The rounds pass only through the repair when kafka-python forgot a join; say how
        # often it did (a round where the poll did not time out mid-join needs none).
        print(f"{finished[0]} of {ROUNDS} leader rejoins finished by finish_abandoned_join")
        assert listener.assigned == set(range(1 + ROUNDS))
    finally:
        consumer.close(autocommit=False)
        admin.delete_topics([topic])
        admin.close()
