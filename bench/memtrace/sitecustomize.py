"""Opt-in memory tracing of a bench daemon, without a hook in the daemon.

``bench.memory`` (``BENCH_MEMTRACE=1``) starts the daemon with this directory first on its
PYTHONPATH, so Python's ``site`` imports this module at startup, and with
``BENCH_MEMTRACE_DIR`` set. Then tracemalloc traces every allocation (``BENCH_MEMTRACE_FRAMES``
frames each, default 10) and a daemon thread writes, every ``BENCH_MEMTRACE_INTERVAL_S``
(default 60 s), into that directory:

- ``snap-NNN.pickle``: a tracemalloc snapshot (what Python allocated and still holds, by
  traceback);
- ``malloc-NNN.xml``: glibc's ``malloc_info`` (every arena: in use, free, mmapped);
- a line of ``stats.jsonl``: RSS split by kind of mapping (from /proc/self/smaps: the brk heap,
  pymalloc's 1 MiB arenas, glibc's thread arenas, other anonymous memory, files), glibc's
  ``mallinfo2`` totals, tracemalloc's traced bytes, and the 25 most numerous object types.

Without ``BENCH_MEMTRACE_DIR`` it does nothing. Costly by design (tracemalloc roughly doubles
allocation time and adds ~2x the traced memory; a snapshot holds the GIL for about a second):
for finding what grows, not for measuring speed or the absolute RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import re
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

PYMALLOC_ARENA_KB = 1024  # CPython 3.10+ allocates its small-object arenas as 1 MiB mmaps
GLIBC_HEAP_KB = 64 * 1024  # glibc reserves each thread arena as a 64 MiB mapping (64-bit)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):  # not glibc, or older than 2.33 (no mallinfo2)
        return None


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


def rss_by_mapping() -> dict[str, int]:
    """Resident kB by kind of mapping, from /proc/self/smaps. Anonymous mappings are told apart
    by shape: glibc starts each thread arena's heap at a 64 MiB boundary, pymalloc's arenas are
    1 MiB each (a 1 MiB one at a 64 MiB boundary counts as pymalloc's: approximate)."""
    kinds: Counter[str] = Counter()
    kind = "other"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = _MAPPING.match(line)
            if head:
                start, end, name = int(head[1], 16), int(head[2], 16), head[3].strip()
                if name == "[heap]":
                    kind = "heap"  # the main arena (brk)
                elif name.startswith("/"):
                    kind = "file"
                elif name:
                    kind = "other"  # [stack], [vdso]...
                elif end - start == PYMALLOC_ARENA_KB * 1024:
                    kind = "pymalloc_arenas"
                elif start % (GLIBC_HEAP_KB * 1024) == 0:
                    kind = "thread_arenas"
                else:
                    kind = "anon"  # large mallocs (mmapped chunks), thread stacks, ...
            elif line.startswith("Rss:"):
                kinds[kind] += int(line.split()[1])
    return dict(kinds)


def _sample(k: int, out: Path, libc: ctypes.CDLL | None, started: float) -> None:
    stats: dict[str, object] = {"k": k, "t": round(time.monotonic() - started, 1)}
    stats["rss_kb"] = rss_by_mapping()
    traced, peak = tracemalloc.get_traced_memory()
    stats["traced"] = traced
    stats["traced_peak"] = peak
    stats["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
    if libc is not None:
        info = libc.mallinfo2()
        stats["mallinfo2"] = {name: getattr(info, name) for name, _ in _Mallinfo2._fields_}
        fp = libc.fopen(str(out / f"malloc-{k:03d}.xml").encode(), b"w")
        if fp:
            libc.malloc_info(0, fp)
            libc.fclose(fp)
    stats["objects"] = dict(Counter(type(o).__name__ for o in gc.get_objects()).most_common(25))
    tracemalloc.take_snapshot().dump(str(out / f"snap-{k:03d}.pickle"))
    with open(out / "stats.jsonl", "a") as f:
        f.write(json.dumps(stats) + "\n")


def _loop(out: Path, interval_s: float) -> None:
    libc = _libc()
    started = time.monotonic()
    k = 0
    while True:
        _sample(k, out, libc, started)
        k += 1
        time.sleep(max(0.0, started + k * interval_s - time.monotonic()))


def _start() -> None:
    out = Path(os.environ["BENCH_MEMTRACE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(int(os.environ.get("BENCH_MEMTRACE_FRAMES", "10")))
    interval_s = float(os.environ.get("BENCH_MEMTRACE_INTERVAL_S", "60"))
    threading.Thread(target=_loop, args=(out, interval_s), name="bench-memtrace",
                     daemon=True).start()


if os.environ.get("BENCH_MEMTRACE_DIR"):
    _start()
