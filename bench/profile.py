"""``python -m bench.profile [--count N] [--out FILE]``: a py-spy profile of the daemon under load.

Starts one daemon (SQLite store, fresh topics), warms its no-op containers, then records it
with ``py-spy record --idle --threads -f raw`` during a throughput run of ``count`` no-op
activations, and prints the busiest frames per thread (self and total samples). The raw
collapsed stacks are kept for a flame graph (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.e2e import _spec
from bench.infra import launch, stop_daemon
from invoker.loadgen import run_load

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


# Leaf frames that wait (py-spy --idle samples them too) rather than compute.
_WAITING = ("select (", "get_events (trio/_core/_io_epoll.py:243", "Condition.wait",
            "_work (trio/_core/_thread_cache.py:211", "readinto (", "sleep (", "acquire (")


def summarize(raw: Path, top: int = 25) -> list[str]:
    """Per thread: its share of samples, the frames with the most samples of their own, and
    the frames of ours (invoker/, store/) with the most samples below them."""
    threads: collections.Counter[str] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    below: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    idle: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # "thread (123): Trio thread 5" -> "Trio thread": worker threads counted together
        thread = re.sub(r"^thread \(\d+\): ?|[\s\d]+$", "", frames[0]) or "main"
        thread = thread.split(" from ")[0]
        threads[thread] += count
        leaf = frames[-1]
        own[thread][leaf] += count
        if any(k in leaf for k in _WAITING):
            idle[thread] += count
        for frame in set(frames[1:]):
            if "(invoker/" in frame or "(store/" in frame:
                below[thread][frame] += count
    total = sum(threads.values()) or 1
    lines = []
    for thread, n in threads.most_common(6):
        lines.append(f"== {thread}: {n} samples ({100 * n / total:.1f}%), "
                     f"~{100 * (n - idle[thread]) / max(n, 1):.0f}% of them busy")
        lines += [f"   self {c:6d}  {f[:150]}" for f, c in own[thread].most_common(top)]
        lines.append("   -- our frames, inclusive:")
        lines += [f"   incl {c:6d}  {f[:150]}" for f, c in below[thread].most_common(top)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None, help="keep the raw profile here")
    parser.add_argument("--cpu", action="store_true",
                        help="sample only threads on a CPU (no --idle): where the CPU goes")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL: what keeps the others out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="invoker-profile-"))
    store_url = f"sqlite:///{work}/records.sqlite3"
    daemon, topics = launch(lambda m: print("error:", m), store_url, work, "profile")
    raw = args.out or work / "profile.txt"
    try:
        run_load(_spec(topics, store_url, count=100, completion_timeout_s=60))
        idle = ["--gil"] if args.gil else [] if args.cpu else ["--idle"]
        spy = subprocess.Popen([PY_SPY, "record", *idle, "--threads", "-f", "raw",
                                "-r", "200", "-o", str(raw), "--pid",
                                str(daemon.process.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        report = run_load(_spec(topics, store_url, count=args.count, completion_timeout_s=120,
                                daemons=[daemon]))
        spy.send_signal(2)
        spy.wait(30)
        print(f"throughput {report.throughput_per_s:.1f} activations/s "
              f"({report.completed} of {report.produced}); profile {raw}")
        for line in summarize(raw):
            print(line)
    finally:
        stop_daemon(daemon, graceful=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
