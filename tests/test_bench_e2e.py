"""bench.e2e: the figures of a paced run (latency, and how busy the machine was meanwhile)."""

from __future__ import annotations

import io

import pytest

from bench.e2e import CORES, _Paced
from bench.figures import Results
from bench.machine_cpu import STEAL, CpuSplit


def _paced(busy_s: float, steal_s: float, wall_s: float, completed: int,
           timed_out: bool = False) -> _Paced:
    seconds = {"daemon": 2.0, "load generator": 1.0, "unattributed": busy_s - steal_s - 3.0,
               STEAL: steal_s}
    return _Paced(rate=100.0, added=[1.0, 2.0, 3.0, 4.0], durations=[1.0], waits=[2.0],
                  stages={"run": (2.0, 9.0, 1000)}, machine=CpuSplit(seconds, busy_s),
                  wall_s=wall_s, completed=completed, timed_out=timed_out)


def test_machine_busy_is_the_share_of_all_cores_without_steal():
    results = Results(out=io.StringIO())
    _paced(busy_s=6.0, steal_s=1.0, wall_s=5.0, completed=1000).add(
        results, "e2e.x", "quarter_load_", "a quarter", saturated_ms=1.25)

    busy = results.get("e2e.x.quarter_load_machine_busy")
    assert busy is not None
    assert busy.value == pytest.approx(5.0 / (5.0 * CORES) * 100)
    # CPU per activation without steal: 5 s over 1000 activations, beside the saturated run's
    assert "5.00 ms of CPU per activation (the throughput run's 1.25)" in busy.note
    assert "daemon 2.00" in busy.note
    p50 = results.get("e2e.x.quarter_load_added_latency_p50")
    assert p50 is not None and p50.value == pytest.approx(2.5)
    assert "100/s (a quarter)" in p50.note


def test_machine_busy_and_cpu_per_activation_share_one_total():
    # /proc/stat's busy time can fall short of what the processes' own counters add up to
    # (unattributed is then 0): both figures count the processes' CPU
    results = Results(out=io.StringIO())
    paced = _paced(busy_s=2.0, steal_s=0.0, wall_s=5.0, completed=1000)
    paced.machine.seconds["unattributed"] = 0.0  # daemon 2 + load generator 1: 3 s
    paced.add(results, "e2e.x", "", "half", saturated_ms=None)

    busy = results.get("e2e.x.machine_busy")
    assert busy is not None
    assert busy.value == pytest.approx(3.0 / (5.0 * CORES) * 100)
    assert "3.00 ms of CPU per activation (the throughput run's n/a)" in busy.note


@pytest.mark.parametrize("completed, timed_out", [(0, False), (1000, True)])
def test_a_run_that_completed_nothing_or_timed_out_states_no_machine_figure(completed,
                                                                            timed_out):
    # timed out: the span holds the wait for completions that never came
    results = Results(out=io.StringIO())
    _paced(busy_s=6.0, steal_s=0.0, wall_s=5.0, completed=completed,
           timed_out=timed_out).add(results, "e2e.x", "", "half", saturated_ms=None)

    assert results.get("e2e.x.machine_busy") is None
    assert results.get("e2e.x.added_latency_p50") is not None


def test_stages_are_stated_under_the_given_name_with_the_run_s_rate():
    results = Results(out=io.StringIO())
    _paced(busy_s=6.0, steal_s=0.0, wall_s=5.0, completed=1000).add_stages(
        results, "e2e.x.quarter_load_stage")

    run = results.get("e2e.x.quarter_load_stage.run")
    assert run is not None and run.value == 2.0
    assert run.note == "p99 9.0 ms; 1000 observations (the paced run at 100/s)"
