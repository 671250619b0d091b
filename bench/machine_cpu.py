"""Where the machine's CPU goes during a run, by process group, from ``/proc``.

The daemon's own CPU per activation is the figure that travels between machines; this says
what the rest of the machine spends on the same activations (the Kafka broker, the load
generator, Docker, the action runtimes, the kernel), and so how far the daemon alone can move
the throughput of a run where everything shares one host.

Linux only. A snapshot reads ``/proc/stat`` and every ``/proc/<pid>/stat`` (user + system
time; a few ms for a few hundred processes); CPU of processes that ended between two snapshots
is counted only in the machine's total (``unattributed``). Time the hypervisor gave another
guest while this VM had work (``steal``, from ``/proc/stat``) is apart: it is no process's
here, and a run with much of it ran on a busy host.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
KTHREADD_PID = 2
GROUPS = ("daemon", "load generator", "Kafka broker", "store server", "Docker",
          "docker-proxy", "action runtimes", "kernel", "other")
STEAL = "steal"


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    ppid: int
    comm: str
    cpu_ticks: int  # user + system, since the process started
    started: int  # clock ticks after boot: a pid reused meanwhile has another


def read_processes(proc: str = "/proc") -> dict[int, Process]:
    """Every process's parent, name and CPU; those that end while read are skipped."""
    processes = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: it ends at the last ")"
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        processes[int(entry)] = Process(int(entry), int(fields[1]), comm,
                                        int(fields[11]) + int(fields[12]), int(fields[19]))
    return processes


def read_busy_ticks(proc: str = "/proc") -> tuple[int, int]:
    """The machine's non-idle CPU time so far (all cores), steal included, and its steal, from
    ``/proc/stat``."""
    with open(f"{proc}/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest and guest_nice, after them, are
    # already counted in user and nice)
    busy = sum(values[:8]) - values[3] - values[4]
    return busy, values[7] if len(values) > 7 else 0


def group_of(pid: int, processes: Mapping[int, Process], *, daemon_pid: int,
             loadgen_pid: int) -> str:
    """The group a process's CPU counts in: by its nearest known ancestor (the daemon's and
    the load generator's children are theirs; what runs under a ``containerd-shim`` is an
    action runtime), else by its name."""
    own = processes.get(pid)
    if own is None:
        return "other"
    current: Process | None = own
    for _ in range(64):  # a bounded walk: /proc may change under it
        if current is None:
            break
        if current.pid == daemon_pid:
            return "daemon"
        if current.pid == loadgen_pid:
            return "load generator"
        if current.pid == KTHREADD_PID or current.ppid == KTHREADD_PID:
            return "kernel"
        if current.comm.startswith("containerd-shim") and current is not own:
            return "action runtimes"
        current = processes.get(current.ppid)
    if own.comm == "java":
        return "Kafka broker"
    if own.comm == "node":
        return "store server"  # pouchdb-server (the CouchDB API); runtimes are caught above
    if own.comm == "docker-proxy":
        return "docker-proxy"  # the userland proxy of a published port
    if own.comm.startswith(("containerd", "dockerd", "docker")):
        return "Docker"
    return "other"


@dataclass(frozen=True)
class CpuSplit:
    seconds: dict[str, float]  # CPU seconds by group (GROUPS, "unattributed", then STEAL)
    busy_s: float  # the machine's, all cores, steal included

    def per_activation_ms(self, activations: int) -> dict[str, float]:
        n = max(activations, 1)
        return {group: s * 1000 / n for group, s in self.seconds.items()}

    def describe(self, activations: int) -> str:
        """``daemon 1.9, Kafka broker 2.1, ...`` ms per activation, largest first."""
        per = self.per_activation_ms(activations)
        return ", ".join(f"{g} {ms:.2f}" for g, ms in sorted(per.items(), key=lambda i: -i[1])
                         if ms >= 0.005)


class MachineCpu:
    """Snapshot now; :meth:`since` splits the machine's CPU used from then on by group."""

    def __init__(self, *, daemon_pid: int, loadgen_pid: int | None = None) -> None:
        self._daemon_pid = daemon_pid
        self._loadgen_pid = os.getpid() if loadgen_pid is None else loadgen_pid
        self._ticks = read_busy_ticks()
        self._before = read_processes()

    def since(self) -> CpuSplit:
        busy_now, steal_now = read_busy_ticks()
        busy, steal = busy_now - self._ticks[0], steal_now - self._ticks[1]
        after = read_processes()
        seconds = dict.fromkeys(GROUPS, 0.0)
        attributed = 0
        for pid, process in after.items():
            earlier = self._before.get(pid)
            # (a kernel worker's name changes with its work: compare start times)
            same = earlier is not None and earlier.started == process.started
            used = process.cpu_ticks - (earlier.cpu_ticks if same else 0)
            if used <= 0:
                continue
            group = group_of(pid, after, daemon_pid=self._daemon_pid,
                             loadgen_pid=self._loadgen_pid)
            seconds[group] += used / TICKS_PER_S
            attributed += used
        seconds["unattributed"] = max(busy - steal - attributed, 0) / TICKS_PER_S
        seconds[STEAL] = steal / TICKS_PER_S
        return CpuSplit(seconds, busy / TICKS_PER_S)


class LoadWindow:
    """A ``LoadSpec.on_window`` callback: the machine's CPU split (:attr:`split`) and the wall
    time (:attr:`wall_s`) over just the load, from the first message sent until the
    completions are in, without the run's setup and the store's read-back after it. Both
    stay None and 0 if the run never got that far."""

    def __init__(self, *, daemon_pid: int) -> None:
        self._daemon_pid = daemon_pid
        self._machine: MachineCpu | None = None
        self._started = 0.0
        self.split: CpuSplit | None = None
        self.wall_s = 0.0

    def __call__(self, phase: str) -> None:
        if phase == "start":
            self._machine = MachineCpu(daemon_pid=self._daemon_pid)
            self._started = time.monotonic()
        elif phase == "end" and self._machine is not None:
            self.split = self._machine.since()
            self.wall_s = time.monotonic() - self._started
