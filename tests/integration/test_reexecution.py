"""A re-executed activation's completion tells what the store has, not what the re-run did.

An earlier run stored the record and then died before its offset was committed: the message
comes again, runs again, the store answers "already stored", and the completion must carry
the stored record's status and result.
"""

from __future__ import annotations

from invoker.loadgen import activation_message, produce_messages, read_completions, store_session
from tests.support.daemon import KAFKA, group_lag, stored_records, wait_for
from tests.support.records import record

NS = "rerun"


def test_completion_after_a_re_execution_carries_the_stored_status_and_result(
        daemons, topics, couchdb_url):
    again = activation_message("echo", NS, blocking=True)
    aid = again["activationId"]
    again["params"] = {"name": "second run"}
    first = record(namespace=NS, activation_id=aid, response={
        "status": "application error", "statusCode": 1, "success": False,
        "result": {"error": "from the first run"}})

    async def store_first_run(store):
        return await store.write_batch([first])

    store_session(couchdb_url, store_first_run)
    fresh = activation_message("echo", NS, blocking=True)
    fresh["params"] = {"name": "only run"}

    daemon = daemons(couchdb_url)
    produce_messages(KAFKA, topics.feed, [again, fresh])
    completions = read_completions(KAFKA, topics.completions, {aid, fresh["activationId"]}, 90)
    (completion,) = completions[aid]
    assert (completion["status"], completion["statusCode"], completion["result"]) == (
        "application error", 1, {"error": "from the first run"})
    (other,) = completions[fresh["activationId"]]
    assert (other["status"], other["result"]) == ("success", {"name": "only run"})

    records, _ = stored_records(couchdb_url, {aid: NS})
    assert records[aid] == first
    metrics = daemon.metrics()
    assert metrics["invoker_records_already_stored_total"] == 1
    assert metrics["invoker_records_stored_total"] == 1
    wait_for(lambda: group_lag(topics) == 0, 30, "both offsets committed")
