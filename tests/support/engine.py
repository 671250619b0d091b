"""When a Docker command does not end: does the engine still answer, and if not, what do its
requests wait on (dockerd's goroutine stacks, deploy/docker-engine.sh stacks)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

ENGINE_SH = Path(__file__).resolve().parents[2] / "deploy" / "docker-engine.sh"
_ARGUMENTS = re.compile(r"\([^()]*\)$")  # "pkg.(*T).method(0xc0, 0x1)"
_LOCK_WAITS = ("semacquire", "sync.")  # e.g. "sync.Mutex.Lock", "sync.RWMutex.RLock"
_HEADER = re.compile(r"^goroutine \d+ \[([^,\]]+)(?:, (\d+) minutes)?(?:, [^\]]*)?\]:$")


def engine_answers(timeout_s: float = 10) -> bool:
    """Whether listing containers and networks ends (listing networks waits on the network
    controller's lock, which a deadlocked libnetwork holds; ``docker info`` still answers
    then)."""
    try:
        for listing in (["ps", "-aq"], ["network", "ls", "-q"]):
            subprocess.run(["docker", *listing], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True  # an engine that is down answers at once: not what this looks for


def long_blocked(stacks: str, *, min_minutes: int = 1, frames: int = 10, groups: int = 8) -> str:
    """The goroutines of a dump waiting on a lock for ``min_minutes`` or more, grouped by
    their top ``frames`` functions, the largest ``groups`` groups first. (Goroutines idle in
    I/O waits, selects and channel receives are many and say nothing of a deadlock.)"""
    counts: Counter[tuple[str, ...]] = Counter()
    for block in stacks.split("\n\n"):
        lines = block.strip().splitlines()
        match = _HEADER.match(lines[0]) if lines else None
        if (match is None or not match.group(1).startswith(_LOCK_WAITS)
                or int(match.group(2) or 0) < min_minutes):
            continue
        functions = [_ARGUMENTS.sub("", line) for line in lines[1:] if not line.startswith("\t")]
        counts[(f"[{match.group(1)}]", *functions[:frames])] += 1
    if not counts:
        return f"no goroutine waiting on a lock for {min_minutes} minute(s) or more"
    return "\n".join(f"{n} goroutine(s) {stack[0]}:\n    " + "\n    ".join(stack[1:])
                     for stack, n in counts.most_common(groups))


def stuck_engine_report() -> str | None:
    """None when the engine answers (``engine_answers``); else one paragraph for a failure
    message: the engine's goroutine stacks, and those waiting on a lock for minutes."""
    if engine_answers():
        return None
    stuck = "the Docker engine does not list containers or networks"
    try:
        done = subprocess.run([str(ENGINE_SH), "stacks"], capture_output=True, text=True,
                              timeout=30)
        if done.returncode != 0:
            return f"{stuck}; no goroutine stacks: {done.stderr.strip()[-500:]}"
        dump = done.stdout.strip()
        return (f"{stuck}; its goroutine stacks: {dump}; waiting on locks for minutes:\n"
                f"{long_blocked(Path(dump).read_text())}")
    except (subprocess.SubprocessError, OSError) as exc:
        return f"{stuck}; no goroutine stacks: {exc}"
