"""ContainerLog reading the json-file log the real Docker engine writes for a real container.

The container runs a small Python loop from the runtime image: each command on its stdin makes it
print one activation's output and then the sentinel line on stdout and on stderr, as an action
runtime does after /run. Needs the Docker engine and ``invoker-action-python:latest``, and read
access to the engine's container directory (the tests run as root on the engine's host).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import trio

from invoker.containers.engine import LABEL_ID, LINE_OVERHEAD_BYTES, SENTINEL
from invoker.containers.logs import ContainerLog

pytestmark = pytest.mark.integration

IMAGE = "invoker-action-python:latest"
# Reads commands "<activation> <lines> <bytes per line>" and prints that activation's output:
# the lines on stdout (every fifth on stderr), then the sentinels.
PRINTER = f"""
import sys
for command in sys.stdin:
    name, count, size = command.split()
    for i in range(int(count)):
        stream = sys.stderr if i % 5 == 4 else sys.stdout
        label = "err" if stream is sys.stderr else "out"
        text = f"{{name}} {{label}} {{i:05d}} "
        print(text + "x" * (int(size) - len(text)), file=stream)
    print("{SENTINEL.decode()}", flush=True)
    print("{SENTINEL.decode()}", file=sys.stderr, flush=True)
"""


class Printer:
    """A running container of the printer loop; ``log_path`` is its json-file log."""

    def __init__(self, max_size: str) -> None:
        self.name = f"test-container-log-{uuid.uuid4().hex[:10]}"
        self.proc = subprocess.Popen(
            ["docker", "run", "-i", "--rm", "--name", self.name,
             "--label", f"{LABEL_ID}={self.name}", "--network", "none",
             "--log-driver", "json-file", "--log-opt", f"max-size={max_size}",
             "--log-opt", "max-file=2", IMAGE, "python3", "-u", "-c", PRINTER],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.log_path = self._wait_running()

    def _wait_running(self) -> str:
        for _ in range(300):
            found = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Running}} {{.LogPath}}", self.name],
                capture_output=True, text=True, timeout=30)
            running, _, path = found.stdout.strip().partition(" ")
            if running == "true" and path:
                return path
            if self.proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        raise AssertionError(f"container {self.name} did not start")

    def activation(self, name: str, count: int, size: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {count} {size}\n".encode())
        self.proc.stdin.flush()

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=60)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def printers() -> Iterator:
    started: list[Printer] = []

    def start(max_size: str = "16m") -> Printer:
        started.append(Printer(max_size))
        return started[-1]

    yield start
    for printer in started:
        printer.remove()


def expected(name: str, count: int, size: int) -> list[tuple[str, str]]:
    lines = []
    for i in range(count):
        label = "err" if i % 5 == 4 else "out"
        text = f"{name} {label} {i:05d} "
        lines.append(("stderr" if label == "err" else "stdout", text + "x" * (size - len(text))))
    return lines


async def collect(log: ContainerLog, limit: int = 10 * 1024, timeout_s: float = 10.0):
    return await log.collect(limit_bytes=limit, wait_sentinels=True, timeout_s=timeout_s)


def sorted_as_logged(collected) -> list[tuple[str, str]]:
    """The lines in their printing order (the texts number them), for comparison."""
    return sorted(((line.stream, line.text) for line in collected.lines),
                  key=lambda line: line[1].split()[2])


async def test_activations_in_a_row(printers):
    printer = printers()
    log = ContainerLog.open(printer.log_path)
    try:
        for n, count in enumerate([3, 0, 12, 1]):
            printer.activation(f"a{n}", count, 40)
            got = await collect(log)
            assert (got.complete, got.truncated) == (True, False)
            assert sorted_as_logged(got) == expected(f"a{n}", count, 40)
            times = [line.time for line in got.lines]
            assert times == sorted(times)
            assert all(len(t) == len("2024-05-01T10:00:00.123456789Z") for t in times)
    finally:
        log.close()


async def test_two_megabytes_are_drained_to_the_sentinels(printers):
    printer = printers()
    log = ContainerLog.open(printer.log_path)
    try:
        printer.activation("big", 2000, 1000)  # 2 MB of output
        started = trio.current_time()
        got = await collect(log, limit=10 * (1000 + LINE_OVERHEAD_BYTES))
        elapsed = trio.current_time() - started
        assert (got.complete, got.truncated, len(got.lines)) == (True, True, 10)
        assert got.kept_bytes == 10 * (1000 + LINE_OVERHEAD_BYTES)
        # The first lines Docker wrote of each stream (it copies the two streams separately).
        for stream in ("stdout", "stderr"):
            kept = [text for s, text in sorted_as_logged(got) if s == stream]
            assert kept == [text for s, text in expected("big", 2000, 1000) if s == stream][
                :len(kept)]
        assert elapsed < 5
        printer.activation("small", 2, 40)
        after = await collect(log)
        assert (after.complete, sorted_as_logged(after)) == (True, expected("small", 2, 40))
    finally:
        log.close()


async def test_a_long_line_arrives_in_16_kib_entries(printers):
    printer = printers()
    log = ContainerLog.open(printer.log_path)
    try:
        printer.activation("long", 1, 40_000)
        got = await collect(log, limit=100_000)
        assert got.complete
        assert [len(line.text) for line in got.lines] == [16384, 16384, 40_000 - 2 * 16384]
        assert "".join(line.text for line in got.lines) == expected("long", 1, 40_000)[0][1]
    finally:
        log.close()


async def test_rotation_mid_activation(printers):
    printer = printers(max_size="100k")
    log = ContainerLog.open(printer.log_path)
    try:
        printer.activation("before", 100, 500)  # 50 kB of 100
        assert (await collect(log, limit=1 << 20)).complete
        printer.activation("rotating", 200, 500)  # 100 kB more: rotated once, midway
        got = await collect(log, limit=1 << 20)
        assert (got.complete, got.truncated) == (True, False)
        assert sorted_as_logged(got) == expected("rotating", 200, 500)
        assert await trio.Path(printer.log_path + ".1").exists()
        printer.activation("after", 3, 40)
        after = await collect(log)
        assert sorted_as_logged(after) == expected("after", 3, 40)
    finally:
        log.close()


async def test_a_removed_container_ends_the_read(printers):
    printer = printers()
    log = ContainerLog.open(printer.log_path)
    try:
        async with trio.open_nursery() as nursery:
            # No activation: the sentinels never come; the read ends when the log is deleted.
            nursery.start_soon(trio.to_thread.run_sync, printer.remove)
            started = trio.current_time()
            got = await collect(log, timeout_s=30)
        assert got.complete is False
        assert trio.current_time() - started < 20
    finally:
        log.close()


def test_the_log_is_in_the_format_the_reader_expects(printers):
    """Docker's own entries: the sentinel lines match the reader's no-parse fast path."""
    printer = printers()
    printer.activation("fmt", 0, 0)
    for _ in range(100):
        with open(printer.log_path, "rb") as fh:
            entries = fh.read().splitlines()
        if len(entries) == 2:
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert {json.loads(e)["stream"] for e in entries} == {"stdout", "stderr"}
    assert all(e.startswith(b'{"log":"' + SENTINEL + b'\\n","stream":"std') for e in entries)
