"""Stopping the daemon: one deadline for a graceful stop, and a second signal that ends it.

Each test runs ``invoker run`` as a subprocess against the real Kafka broker and Docker engine,
with activations that sleep longer than the daemon's grace period.
"""

from __future__ import annotations

import signal
import time

from invoker.loadgen import activation_message, produce_messages, read_completions
from tests.support.daemon import (
    KAFKA,
    container_ids,
    group_lag,
    stored_records,
    wait_for,
)

NS = "shutdown"
# In-flight work is cut off a quarter of it before the deadline; the rest leaves Docker time to
# remove the containers even on a loaded machine.
GRACE_S = 6.0
# A bound, not a speed target: the deadline plus leaving the consumer group, closing the
# producer and the interpreter's exit on a loaded machine.
EXIT_MARGIN_S = 15.0


def _running(daemon, count: int) -> bool:
    return daemon.metrics()["invoker_in_flight"] == count


def test_sigterm_stops_within_one_deadline_and_cut_off_work_runs_again(daemons, topics,
                                                                       sqlite_url):
    first = daemons(sqlite_url, grace_period_s=GRACE_S, max_activations=4)
    # Longer than the grace period: the stop must cut them off.
    sleepers = [activation_message("sleep:8000", NS) for _ in range(2)]
    produce_messages(KAFKA, topics.feed, sleepers)
    wait_for(lambda: _running(first, 2), 60, "both sleepers running")

    assert first.process is not None
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    code = first.process.wait(timeout=GRACE_S + EXIT_MARGIN_S)
    took = time.monotonic() - signalled
    print(f"SIGTERM to exit: {took:.1f} s (grace period {GRACE_S} s)")
    assert code == 0
    assert first.log_events("shutdown: in-flight work cut off; it runs again after a restart")
    assert container_ids(first.invoker_id) == [], "the stop removes its containers"
    sleeper_ids = {m["activationId"]: NS for m in sleepers}
    records, _ = stored_records(sqlite_url, sleeper_ids)
    assert records == {}, "cut-off activations have no record"
    assert group_lag(topics) == 2, "cut-off activations are not committed"

    second = daemons(sqlite_url, max_activations=4)
    completions = read_completions(KAFKA, topics.completions, set(sleeper_ids), 90)
    assert set(completions) == set(sleeper_ids)
    records, _ = stored_records(sqlite_url, sleeper_ids)
    assert {aid: r["response"]["statusCode"] for aid, r in records.items()} == {
        aid: 0 for aid in sleeper_ids}
    wait_for(lambda: group_lag(topics) == 0, 30, "the re-run activations committed")
    assert second.metrics()["invoker_records_already_stored_total"] == 0


def test_a_second_signal_exits_at_once_with_130_and_no_traceback(daemons, topics, sqlite_url):
    daemon = daemons(sqlite_url, grace_period_s=60)
    produce_messages(KAFKA, topics.feed, [activation_message("sleep:30000", NS)])
    wait_for(lambda: _running(daemon, 1), 60, "the sleeper running")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGINT)
    wait_for(lambda: daemon.log_events("signal received: draining"), 10, "the graceful stop")
    daemon.process.send_signal(signal.SIGTERM)
    # Far less than the 60 s grace period or the 30 s activation: it did not wait for them.
    assert daemon.process.wait(timeout=EXIT_MARGIN_S) == 130
    log = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert daemon.log_events("second signal: stopping at once")
