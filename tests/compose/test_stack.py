"""The compose stack under load: what a platform team checks before deploying it.

The tests share one stack and run in this order; each leaves it with one invoker, one recorder
and the store up. Load comes from ``invoker loadgen`` (in the stack's own loadgen service for
the first test, on this machine for the others); its report says what was produced, completed
and found in the store.
"""

import json
import time
from pathlib import Path

from tests.support.compose import LoadRun, assert_nothing_lost
from tests.support.daemon import container_ids, counter_total, read_metrics, wait_for


def activations(samples: dict[str, float]) -> float:
    return counter_total(samples, "invoker_activations_total")


def action_containers(invoker_id: str) -> set[str]:
    return set(container_ids(invoker_id, timeout_s=60))


def process_status(service: str, stack) -> dict[str, str]:
    """/proc/1/status of ``service``'s container (its main process), as name → value."""
    text = stack.compose("exec", "-T", service, "cat", "/proc/1/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_services_run_unprivileged(stack):
    socket_gid = str(Path("/var/run/docker.sock").stat().st_gid)
    # the invoker keeps one capability, to read the action containers' json-file logs
    dac_read_search = 1 << 2
    for service, caps in (("invoker", dac_read_search), ("recorder", 0)):
        status = process_status(service, stack)
        assert status["Uid"].split() == ["10001"] * 4, (service, status["Uid"])
        assert status["Gid"].split() == ["10001"] * 4, (service, status["Gid"])
        for kind in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(status[kind], 16) == caps, (service, kind, status[kind])
        assert status["NoNewPrivs"].strip() == "1", service
    assert int(process_status("invoker", stack)["CapBnd"], 16) == dac_read_search
    # the invoker reaches the engine through the socket's group, found at start
    assert socket_gid in process_status("invoker", stack)["Groups"].split()
    assert socket_gid not in process_status("recorder", stack)["Groups"].split()


def test_load_run_from_the_loadgen_service(stack):
    result = stack.compose(
        "--profile", "loadgen", "run", "--rm", "-T", "loadgen",
        "--count", "300", "--rate", "60", "--action", "echo", "--action", "sleep:50",
        "--action", "error", "--timeout", "180", "--no-progress", "--json",
        "--metrics-url", "http://invoker:9180/metrics",
        "--metrics-url", "http://recorder:9181/metrics",
        check=False, timeout_s=400)
    lines = result.stdout.strip().splitlines()
    assert lines, f"loadgen exited {result.returncode} with no report:\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert_nothing_lost(report)
    assert report["metrics_read"] == 2, report["errors"]
    assert result.returncode == 0
    stack.wait_offsets_committed()


def test_invoker_killed_mid_run_then_started(stack):
    (health,) = stack.wait_owning_partitions(1)
    before = stack.metrics()
    run = LoadRun("--count", "400", "--rate", "40", "--action", "sleep:300", "--action", "echo",
                  "--timeout", "240")
    try:
        wait_for(lambda: activations(stack.metrics()) >= activations(before) + 40, 90,
                 "40 activations done before the kill", interval_s=0.5)
        containers_of_killed_run = action_containers(health["id"])
        assert containers_of_killed_run, "the invoker runs no action containers"
        stack.compose("kill", "invoker")
        assert run.running(), "the load run ended before the invoker was killed"
        time.sleep(3)
        stack.compose("start", "invoker")
        (restarted,) = stack.wait_owning_partitions(1)
        report = run.report()
    finally:
        run.stop()
    assert_nothing_lost(report)
    after = stack.metrics()
    # the same container (same id), a new process that removed the killed one's containers
    assert restarted["id"] == health["id"]
    assert after["process_start_time_seconds"] > before["process_start_time_seconds"]
    assert not containers_of_killed_run & action_containers(health["id"])
    stack.wait_offsets_committed()


def test_two_invokers_share_the_partitions(stack):
    stack.up("--scale", "invoker=2")
    try:
        states = stack.wait_owning_partitions(2)
        assert all(s["partitions"] for s in states), states
        urls = stack.metrics_urls("invoker")
        before = [activations(read_metrics(url)) for url in urls]
        report = LoadRun("--count", "400", "--rate", "60", "--action", "echo",
                         "--action", "sleep:100", "--timeout", "180").report()
        after = [activations(read_metrics(url)) for url in urls]
        stack.wait_offsets_committed()
    finally:
        stack.up("--scale", "invoker=1")
    assert_nothing_lost(report)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) >= report["produced"]


def test_scaling_to_three_and_back_to_one_under_load_re_executes_nothing(stack):
    stack.up("invoker")
    stack.wait_owning_partitions(1)
    before = stack.metrics()
    already_before = before["invoker_records_already_stored_total"]
    run = LoadRun("--count", "1600", "--rate", "40", "--action", "echo",
                  "--action", "sleep:100", "--timeout", "300")
    try:
        wait_for(lambda: activations(stack.metrics()) >= activations(before) + 80, 90,
                 "load under way on one invoker", interval_s=0.5)
        stack.up("--scale", "invoker=3")  # two join: rebalances under load
        stack.wait_owning_partitions(3)
        urls = stack.metrics_urls("invoker")
        joined = [activations(read_metrics(url)) for url in urls]
        wait_for(lambda: all(activations(read_metrics(url)) > count
                             for url, count in zip(urls, joined, strict=True)),
                 90, "all three invokers executing", interval_s=0.5)
        at_three = [read_metrics(url) for url in urls]
        stack.up("--scale", "invoker=1")  # two stop with SIGTERM: rebalances under load
        report = run.report()
    finally:
        run.stop()
        stack.up("--scale", "invoker=1")
    assert_nothing_lost(report)
    stack.wait_offsets_committed()
    # The stopped replicas' counts are those read at three, which is after their joining;
    # what they did after it is caught by the repeated completions (a re-run publishes again).
    already = (sum(m["invoker_records_already_stored_total"] for m in at_three)
               - already_before)
    print(f"scale 1 -> 3 -> 1 under load: {already:.0f} re-executed up to three replicas, "
          f"{report['repeated_completions']} completions repeated")
    assert report["repeated_completions"] == 0
    assert already == 0


def test_store_outage_pauses_the_invokers_then_they_recover(stack):
    stack.env["INVOKER_OVERFLOW_ENABLED"] = "false"
    stack.up("invoker")  # recreated: records wait for the store, nothing overflows
    stack.wait_owning_partitions(1)
    before = stack.metrics()
    run = LoadRun("--count", "800", "--rate", "40", "--action", "echo", "--timeout", "300")
    try:
        wait_for(lambda: activations(stack.metrics()) >= activations(before) + 40, 90,
                 "40 activations done before the outage", interval_s=0.5)
        stack.compose("stop", "couchdb")
        wait_for(lambda: stack.metrics()["invoker_feed_paused"] == 1, 120,
                 "the invoker pausing its feed while the store is down", interval_s=0.5)
        paused_at = activations(stack.metrics())
        time.sleep(5)
        during = stack.metrics()
        assert during["invoker_feed_paused"] == 1
        # the slots are held by records waiting for the store: at most that many more finish
        assert activations(during) - paused_at <= during["invoker_slots_total"]
        stack.compose("start", "couchdb")
        wait_for(lambda: stack.metrics()["invoker_feed_paused"] == 0, 120,
                 "the feed resumed once the store was back", interval_s=0.5)
        report = run.report()
    finally:
        run.stop()
        stack.compose("start", "couchdb")
    assert_nothing_lost(report)
    after = stack.metrics()
    print(f"store outage: paused {after['invoker_feed_paused_seconds_total']:.1f} s in "
          f"{after['invoker_feed_pauses_total']:.0f} pause(s)")
    assert after["invoker_feed_pauses_total"] > before["invoker_feed_pauses_total"]
    assert after["invoker_overflow_records_total"] == 0
    stack.wait_offsets_committed()


def test_overflow_while_the_store_is_down_then_the_recorder_drains_it(stack):
    stack.env["INVOKER_OVERFLOW_ENABLED"] = "true"
    stack.up("invoker")
    stack.wait_owning_partitions(1)
    before, recorder_before = stack.metrics(), stack.metrics("recorder")
    run = LoadRun("--count", "800", "--rate", "40", "--action", "echo", "--timeout", "300")
    try:
        wait_for(lambda: activations(stack.metrics()) >= activations(before) + 40, 90,
                 "40 activations done before the outage", interval_s=0.5)
        stack.compose("stop", "couchdb")
        outage_start = activations(stack.metrics())
        overflowed_before = counter_total(before, "invoker_overflow_records_total")
        wait_for(lambda: counter_total(stack.metrics(), "invoker_overflow_records_total")
                 >= overflowed_before + 100, 120,
                 "100 records overflowed while the store is down", interval_s=0.5)
        during = stack.metrics()
        # the invoker kept working: far more finished than its slots could hold back
        assert activations(during) - outage_start > 2 * during["invoker_slots_total"]
        stack.compose("start", "couchdb")
        report = run.report()
    finally:
        run.stop()
        stack.compose("start", "couchdb")
    assert_nothing_lost(report)
    stack.wait_offsets_committed()
    stack.wait_overflow_drained()
    after, recorder_after = stack.metrics(), stack.metrics("recorder")
    overflowed = counter_total(after, "invoker_overflow_records_total") - overflowed_before
    recorded = sum(
        counter_total(recorder_after, name) - counter_total(recorder_before, name)
        for name in ("invoker_records_stored_total", "invoker_records_already_stored_total"))
    print(f"overflow: {overflowed:.0f} records overflowed, {recorded:.0f} stored by the recorder")
    assert recorded >= overflowed >= 100


def test_down_removes_what_a_killed_invoker_left(stack):
    """Last: it takes the stack down (the fixture's teardown then finds it gone)."""
    (health,) = stack.wait_owning_partitions(1)
    assert_nothing_lost(LoadRun("--count", "20", "--rate", "20", "--action", "echo",
                                "--timeout", "120").report())
    left_by_kill = action_containers(health["id"])
    assert left_by_kill, "the invoker runs no action containers"
    stack.compose("kill", "invoker")
    time.sleep(2)
    assert action_containers(health["id"]) == left_by_kill, "something removed them already"
    stack.down()
    assert not action_containers(health["id"])
    left = stack.leftovers()
    assert not any(left.values()), left
