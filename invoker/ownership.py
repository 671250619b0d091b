"""Which process owns an action container, told by the container's labels.

Every container the pool creates is labelled with the invoker id and with the process that
created it: host name, pid namespace, pid and the process's start time. A process that ends
without removing its containers (SIGKILL, a crash, the machine losing power) leaves them
behind; the next pool to open on this host recognizes them here (see ``ContainerPool``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from invoker.containers.engine import LABEL_HOST, LABEL_PID, LABEL_PID_NAMESPACE, LABEL_PID_START


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """This process, as container labels name it."""

    host: str
    pid_namespace: str  # e.g. "pid:[4026531836]"; "" where /proc does not tell (not Linux)
    pid: int
    start: str  # start time in clock ticks since boot; "" where /proc does not tell

    @classmethod
    def current(cls) -> ProcessOwner:
        pid = os.getpid()
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = ""
        return cls(socket.gethostname(), namespace, pid, _start_ticks(pid))

    def labels(self) -> dict[str, str]:
        return {LABEL_HOST: self.host, LABEL_PID_NAMESPACE: self.pid_namespace,
                LABEL_PID: str(self.pid), LABEL_PID_START: self.start}

    def left_behind(self, labels: Mapping[str, str]) -> bool:
        """True when ``labels`` name a process of this host and pid namespace that has ended.

        Only pids of our own namespace can be checked (in another one the same number is
        another process), so containers of other hosts or namespaces are never taken for
        leftovers here. A pid that runs again under another process (pid reuse) is told apart
        by its start time.
        """
        if (labels.get(LABEL_HOST) != self.host
                or labels.get(LABEL_PID_NAMESPACE) != self.pid_namespace):
            return False
        try:
            pid = int(labels.get(LABEL_PID, ""))
        except ValueError:
            return False
        if pid <= 0:  # 0 and negative numbers name process groups for os.kill
            return False
        return not _running(pid, labels.get(LABEL_PID_START, ""))


def _running(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    except (OSError, OverflowError):
        return True  # cannot tell: assume it runs, never remove what may be in use
    if not start:
        return True
    now = _start_ticks(pid)
    return not now or now == start


def _start_ticks(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time after boot, clock ticks); "" if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces and ')': skip past it.
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode("ascii", "replace") if len(fields) > 19 else ""
