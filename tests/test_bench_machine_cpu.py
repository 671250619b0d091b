"""bench.machine_cpu: the machine's CPU split by process group, read from the real /proc."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.machine_cpu import STEAL, LoadWindow, MachineCpu, Process, group_of, read_busy_ticks

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_processes_are_grouped_by_their_nearest_known_ancestor_then_by_name():
    table = {p.pid: p for p in [
        Process(1, 0, "systemd", 0, 0),
        Process(2, 0, "kthreadd", 0, 0),
        Process(30, 2, "kworker/u8:3-flush-254:0", 0, 0),
        Process(100, 1, "java", 0, 0),
        Process(200, 1, "dockerd", 0, 0),
        Process(210, 200, "docker-proxy", 0, 0),
        Process(300, 1, "containerd-shim", 0, 0),
        Process(310, 300, "python", 0, 0),  # an action runtime
        Process(320, 310, "node", 0, 0),  # a runtime's child: still the action's
        Process(400, 1, "node", 0, 0),  # pouchdb-server
        Process(500, 1, "python", 0, 0),  # the daemon
        Process(510, 500, "docker", 0, 0),  # a child of the daemon is the daemon's
        Process(600, 1, "python", 0, 0),  # the load generator
        Process(700, 1, "sshd", 0, 0),
    ]}

    def group(pid: int) -> str:
        return group_of(pid, table, daemon_pid=500, loadgen_pid=600)

    assert [group(p) for p in (30, 100, 200, 210, 300, 310, 320, 400, 500, 510, 600, 700, 9)] == [
        "kernel", "Kafka broker", "Docker", "docker-proxy", "Docker", "action runtimes",
        "action runtimes", "store server", "daemon", "daemon", "load generator", "other",
        "other"]


def test_a_cycle_in_a_changing_proc_table_ends_the_walk():
    table = {10: Process(10, 11, "a", 0, 0), 11: Process(11, 10, "b", 0, 0)}
    assert group_of(10, table, daemon_pid=1, loadgen_pid=2) == "other"


def test_cpu_of_the_daemon_and_of_this_process_is_split_from_the_machines():
    daemon = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.4)])
    machine = MachineCpu(daemon_pid=daemon.pid)
    _burn(0.4)
    assert daemon.wait(timeout=60) == 0
    # the daemon ended: its CPU is the machine's, unattributed; a live one is attributed
    ended = machine.since()
    assert ended.seconds["load generator"] >= 0.35
    assert ended.seconds["daemon"] == 0 and ended.seconds["unattributed"] >= 0.3

    live = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.4) + "time.sleep(30)\n"])
    try:
        machine = MachineCpu(daemon_pid=live.pid)
        deadline = time.monotonic() + 60
        while machine.since().seconds["daemon"] < 0.35:
            assert time.monotonic() < deadline, "the daemon's CPU was never counted"
            time.sleep(0.1)
        split = machine.since()
        assert split.busy_s >= split.seconds["daemon"] + split.seconds["load generator"] - 0.05
        per = split.per_activation_ms(100)
        assert per["daemon"] == pytest.approx(split.seconds["daemon"] * 10)
        described = [part.rsplit(" ", 1) for part in split.describe(100).split(", ")]
        values = [float(ms) for _, ms in described]
        assert values == sorted(values, reverse=True)  # largest first
        assert dict(described)["daemon"] == f"{per['daemon']:.2f}"
    finally:
        live.kill()
        live.wait()


def test_steal_is_counted_apart_and_guest_time_once(tmp_path):
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is already
    # in user, so it is not added again
    (tmp_path / "stat").write_text("cpu  100 10 50 1000 40 5 5 30 20 0\ncpu0 ...\n")
    assert read_busy_ticks(str(tmp_path)) == (200, 30)
    (tmp_path / "stat").write_text("cpu  100 10 50 1000 40 5 5\n")  # a kernel without steal
    assert read_busy_ticks(str(tmp_path)) == (170, 0)


def test_the_real_machines_steal_is_a_group_of_its_own():
    split = MachineCpu(daemon_pid=1).since()
    assert STEAL in split.seconds and split.seconds[STEAL] >= 0
    assert split.busy_s >= split.seconds[STEAL]


def test_a_load_window_splits_the_cpu_between_its_start_and_end_only():
    window = LoadWindow(daemon_pid=1)
    window("end")  # an end before any start is no window
    assert window.split is None and window.wall_s == 0

    _burn(0.3)  # before the window: not counted
    window("start")
    _burn(0.2)
    window("end")
    _burn(0.3)  # after it: not counted either

    assert window.split is not None
    mine = window.split.seconds["load generator"]  # this process stands for it
    assert 0.15 <= mine <= 0.35
    assert window.wall_s >= 0.2
