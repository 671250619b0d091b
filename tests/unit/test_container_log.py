"""ContainerLog on real files written in Docker's json-file format (Docker is the boundary
faked here: the writer below appends entries as its json-file driver does)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from invoker.containers.engine import LINE_OVERHEAD_BYTES, SENTINEL
from invoker.containers.logs import CHUNK_BYTES, MAX_ENTRY_BYTES, ContainerLog
from tests.support.memory import traced

END = SENTINEL.decode()


class FakeDockerLog:
    """Appends entries as Docker's json-file driver does; times are nanoseconds after a base
    second and written in Go's RFC3339Nano (trailing zeros of the fraction dropped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ns = 0
        path.write_bytes(b"")

    def time(self) -> str:
        self.ns += 1000
        fraction = f"{self.ns:09d}".rstrip("0")
        return f"2024-05-01T10:00:00{'.' + fraction if fraction else ''}Z"

    def entry(self, text: str, stream: str = "stdout", *, time: str | None = None,
              newline: bool = True) -> bytes:
        entry = {"log": text + ("\n" if newline else ""), "stream": stream,
                 "time": time or self.time()}
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def write(self, *texts: str, stream: str = "stdout") -> None:
        self.append(b"".join(self.entry(t, stream) for t in texts))

    def end(self, *streams: str) -> None:
        """The runtime's sentinels, on stdout then stderr unless told."""
        for stream in streams or ("stdout", "stderr"):
            self.write(END, stream=stream)

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as fh:
            fh.write(data)

    def size(self) -> int:
        return self.path.stat().st_size

    def rotate(self) -> None:
        """Docker's rotation with max-file=2: rename to .1 (replacing it), new empty file."""
        os.replace(self.path, f"{self.path}.1")
        self.path.write_bytes(b"")


@pytest.fixture
def docker_log(tmp_path: Path) -> FakeDockerLog:
    return FakeDockerLog(tmp_path / "c-json.log")


@pytest.fixture
def log(docker_log: FakeDockerLog):
    opened = ContainerLog.open(str(docker_log.path))
    yield opened
    opened.close()


async def collect(log: ContainerLog, *, limit: int = 10_000, wait: bool = True,
                  timeout_s: float = 2.0):
    return await log.collect(limit_bytes=limit, wait_sentinels=wait, timeout_s=timeout_s)


def texts(collected) -> list[str]:
    return [line.text for line in collected.lines]


async def test_activations_in_a_row_each_start_after_the_previous_sentinels(docker_log, log):
    docker_log.write("init output")
    docker_log.write("first", "  padded  ")
    docker_log.end()
    docker_log.write("second")
    docker_log.end("stderr", "stdout")
    docker_log.write("third, no sentinels yet")

    first = await collect(log)
    assert (texts(first), first.complete, first.truncated) == (
        ["init output", "first", "  padded"], True, False)
    assert first.kept_bytes == (len("init output") + len("first") + len("  padded  ")
                                + 3 * LINE_OVERHEAD_BYTES)
    second = await collect(log)
    assert (texts(second), second.complete) == (["second"], True)
    docker_log.end()
    third = await collect(log)
    assert (texts(third), third.complete) == (["third, no sentinels yet"], True)
    docker_log.write("fourth")
    fourth = await collect(log, wait=False)
    assert (texts(fourth), fourth.complete) == (["fourth"], True)


async def test_lines_keep_stream_and_time_in_the_api_format(docker_log, log):
    docker_log.append(docker_log.entry("a", time="2024-05-01T10:00:00.1234Z")
                      + docker_log.entry("b", "stderr", time="2024-05-01T10:00:01Z")
                      + docker_log.entry("c", time="2024-05-01T10:00:02.123456789Z"))
    docker_log.end()
    got = await collect(log)
    assert [(line.time, line.stream, line.text) for line in got.lines] == [
        ("2024-05-01T10:00:00.123400000Z", "stdout", "a"),
        ("2024-05-01T10:00:01.000000000Z", "stderr", "b"),
        ("2024-05-01T10:00:02.123456789Z", "stdout", "c"),
    ]
    assert got.lines[0].formatted() == "2024-05-01T10:00:00.123400000Z stdout: a"


async def test_waits_for_sentinels_appended_later_by_a_concurrent_task(docker_log, log):
    docker_log.write("before")

    async def runtime_finishes_later() -> None:
        await trio.sleep(0.05)
        docker_log.write("late")
        docker_log.end("stdout")
        await trio.sleep(0.25)
        docker_log.end("stderr")
        docker_log.write("next activation")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime_finishes_later)
        started = trio.current_time()
        got = await collect(log, timeout_s=5)
        waited = trio.current_time() - started
    assert (texts(got), got.complete) == (["before", "late"], True)
    # Polls at least every MAX_POLL_S (10 ms); the margin is for a busy shared machine, far
    # below what a reader waiting for another poll period or for its timeout would take.
    assert 0.3 <= waited < 0.3 + 0.15
    assert texts(await collect(log, wait=False)) == ["next activation"]


async def test_timeout_without_sentinels_is_incomplete(docker_log, log):
    docker_log.write("printed")
    docker_log.end("stdout")  # stderr's never comes
    started = trio.current_time()
    got = await collect(log, timeout_s=0.2)
    assert 0.2 <= trio.current_time() - started < 0.5
    assert (texts(got), got.complete, got.truncated) == (["printed"], False, False)


async def test_without_waiting_reads_what_is_there_skipping_sentinels(docker_log, log):
    docker_log.write("a")
    docker_log.end()
    docker_log.write("b")
    got = await collect(log, wait=False)
    assert (texts(got), got.complete) == (["a", "b"], True)
    empty = await collect(log, wait=False)
    assert (empty.lines, empty.complete) == ([], True)


async def test_truncates_at_the_limit_and_drains_to_the_sentinels(docker_log, log):
    docker_log.write(*[f"line {i:04d}" for i in range(2000)])  # 9 bytes each
    docker_log.end()
    docker_log.write("next")
    docker_log.end()
    line_cost = 9 + LINE_OVERHEAD_BYTES
    got = await collect(log, limit=11 * line_cost + line_cost - 1)
    assert texts(got) == [f"line {i:04d}" for i in range(11)]
    assert (got.kept_bytes, got.truncated, got.complete) == (11 * line_cost, True, True)
    assert texts(await collect(log)) == ["next"]


async def test_while_draining_only_real_sentinels_end_the_activation(docker_log, log):
    docker_log.write("x" * 50, f"say {END}", f"{END} and more", f'"{END}"', END + "\t")
    docker_log.append(b'{"stream":"stderr","time":"2024-05-01T10:00:01Z","log":"'
                      + SENTINEL + b'\\r\\n"}\n')
    docker_log.write("dropped")
    docker_log.append(b'{"stream":"stdout","time":"2024-05-01T10:00:02Z","log":"'
                      + SENTINEL + b'\\n"}\n')
    docker_log.write("next")
    got = await collect(log, limit=10)
    assert (texts(got), got.truncated, got.complete) == ([], True, True)
    assert texts(await collect(log, wait=False)) == ["next"]


async def test_a_flood_of_empty_lines_is_bounded_by_the_limit_too(docker_log, log):
    docker_log.write(*[""] * 5000)  # no text to count: without a line charge, 5000 kept lines
    docker_log.end()
    got = await collect(log, limit=1000)
    assert (got.truncated, got.complete) == (True, True)
    assert len(got.lines) == 1000 // LINE_OVERHEAD_BYTES
    assert got.kept_bytes == len(got.lines) * LINE_OVERHEAD_BYTES


async def test_limit_counts_utf8_bytes_and_replaces_lone_surrogates(docker_log, log):
    docker_log.append(b'{"log":"\\ud800 x\\n","stream":"stdout","time":"2024-05-01T10:00:00Z"}\n')
    docker_log.write("é" * 4, "ok")  # 8 bytes, then 2
    docker_log.end()
    got = await collect(log, limit=12 + 2 * LINE_OVERHEAD_BYTES)
    assert texts(got) == ["? x", "éééé"]
    assert (got.kept_bytes, got.truncated) == (11 + 2 * LINE_OVERHEAD_BYTES, True)


async def test_megabytes_of_output_do_not_stall_other_tasks(docker_log, log):
    line = "y" * 200
    docker_log.write(*[line] * 30_000)  # ~6.5 MB of log file
    docker_log.end()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        got = await collect(log, limit=10 * 1024, timeout_s=30)
        nursery.cancel_scope.cancel()
    assert (got.truncated, got.complete, len(got.lines)) == (
        True, True, 10 * 1024 // (200 + LINE_OVERHEAD_BYTES))
    assert ticks >= docker_log.size() // CHUNK_BYTES - 1


async def test_split_long_lines_are_one_entry_each(docker_log, log):
    long_line = "".join(chr(ord("a") + i % 26) for i in range(40_000))
    parts = [long_line[:16384], long_line[16384:32768], long_line[32768:]]
    docker_log.append(b"".join(docker_log.entry(p, newline=(i == 2)) for i, p in enumerate(parts)))
    docker_log.end()
    got = await collect(log, limit=100_000)
    assert texts(got) == parts
    assert "".join(texts(got)) == long_line


async def test_a_partial_last_entry_is_read_once_it_is_complete(docker_log, log):
    docker_log.write("whole")
    tail = docker_log.entry("half written")
    docker_log.append(tail[:20])
    first = await collect(log, wait=False)
    assert texts(first) == ["whole"]
    docker_log.append(tail[20:])
    docker_log.end()
    assert texts(await collect(log)) == ["half written"]


async def test_an_entry_completed_while_waiting_is_read(docker_log, log):
    tail = docker_log.entry("slow")

    async def write_slowly() -> None:
        docker_log.append(tail[:10])
        await trio.sleep(0.03)
        docker_log.append(tail[10:])
        docker_log.end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_slowly)
        got = await collect(log)
    assert (texts(got), got.complete) == (["slow"], True)


async def test_rotation_mid_activation(docker_log, log):
    docker_log.write("a1")
    assert texts(await collect(log, wait=False)) == ["a1"]
    docker_log.write("a2")
    docker_log.rotate()
    docker_log.write("a3")
    docker_log.end()
    docker_log.write("b1")
    got = await collect(log)
    assert (texts(got), got.complete) == (["a2", "a3"], True)
    assert texts(await collect(log, wait=False)) == ["b1"]


async def test_rotation_while_waiting_reads_the_old_file_to_its_end(docker_log, log):
    docker_log.write("a1")
    # What the old file got after the last read and before the rename is read before the new
    # file; the path is missing for a moment between the rename and the new file.
    async def docker_rotates() -> None:
        await trio.sleep(0.03)
        docker_log.write("a2")
        os.replace(docker_log.path, f"{docker_log.path}.1")
        await trio.sleep(0.03)
        docker_log.path.write_bytes(b"")
        docker_log.write("a3")
        docker_log.end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(docker_rotates)
        got = await collect(log)
    assert (texts(got), got.complete) == (["a1", "a2", "a3"], True)


async def test_entries_written_just_before_the_rename_are_read_first(docker_log, log,
                                                                     monkeypatch):
    docker_log.write("a1")
    real_path_state = ContainerLog._path_state

    def docker_rotates_right_after_our_last_read(self: ContainerLog) -> str:
        if not docker_log.path.with_name(docker_log.path.name + ".1").exists():
            docker_log.write("a2")  # after the read that found the end, before the rename
            docker_log.rotate()
            docker_log.write("a3")
            docker_log.end()
        return real_path_state(self)

    monkeypatch.setattr(ContainerLog, "_path_state", docker_rotates_right_after_our_last_read)
    got = await collect(log)
    assert (texts(got), got.complete) == (["a1", "a2", "a3"], True)


async def test_a_removed_log_ends_the_read(docker_log, log):
    docker_log.write("last words")

    async def container_removed() -> None:
        await trio.sleep(0.05)
        docker_log.path.unlink()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(container_removed)
        started = trio.current_time()
        got = await collect(log, timeout_s=5)
    assert trio.current_time() - started < 1
    assert (texts(got), got.complete) == (["last words"], False)
    assert (await collect(log, wait=False)).complete


async def test_malformed_entries_are_skipped(docker_log, log):
    junk = [
        b"not json at all",
        b"[1, 2, 3]",
        b'"just a string"',
        b'{"log":"no stream\\n","time":"2024-05-01T10:00:00Z"}',
        b'{"log":"bad stream\\n","stream":"stdin","time":"2024-05-01T10:00:00Z"}',
        b'{"log":"list stream\\n","stream":["stdout"],"time":"2024-05-01T10:00:00Z"}',
        b'{"log":"no time\\n","stream":"stdout"}',
        b'{"log":12,"stream":"stdout","time":"2024-05-01T10:00:00Z"}',
        b'{"log":"bad utf-8 \xff\\n","stream":"stdout","time":"2024-05-01T10:00:00Z"}',
        b"[" * 100_000,
        b"",
    ]
    docker_log.append(b"\n".join(junk) + b"\n")
    docker_log.write("fine")
    docker_log.append(b'{"stream":"stderr","time":"2024-05-01T10:00:09Z"}\n')  # empty "log"
    docker_log.end()
    got = await collect(log)
    assert [(line.stream, line.text) for line in got.lines] == [("stdout", "fine"),
                                                                 ("stderr", "")]
    assert got.complete


async def test_an_oversized_entry_is_skipped_not_buffered(docker_log, log):
    docker_log.write("before")
    huge = b'{"log":"' + b"z" * (MAX_ENTRY_BYTES + 3 * CHUNK_BYTES)
    docker_log.append(huge[: len(huge) // 2])
    first = await collect(log, wait=False)
    assert texts(first) == ["before"]
    docker_log.append(huge[len(huge) // 2:] + b'\\n","stream":"stdout","time":"x"}\n')
    docker_log.write("after")
    docker_log.end()
    got = await collect(log)
    assert (texts(got), got.complete) == (["after"], True)


async def test_the_rest_of_an_oversized_entry_is_skipped_even_if_it_looks_like_one(
        docker_log, log):
    # Ends on a chunk boundary: what comes next is the first byte of a read.
    docker_log.append(b'{"log":"' + b"z" * (MAX_ENTRY_BYTES + CHUNK_BYTES - 8))
    assert (await collect(log, wait=False)).lines == []
    docker_log.write("looks like an entry but ends the oversized one", "after")
    docker_log.end()
    got = await collect(log)
    assert (texts(got), got.complete) == (["after"], True)


async def test_interleaved_streams_are_sorted_by_time_stable_on_ties(docker_log, log):
    def at(n: int) -> str:
        return f"2024-05-01T10:00:00.{n:09d}Z".replace("000Z", "Z")  # some trimmed, as Docker

    docker_log.append(b"".join([
        docker_log.entry("err 3", "stderr", time=at(3000)),
        docker_log.entry("err 1", "stderr", time=at(1000)),
        docker_log.entry("out 2", time=at(2000)),
        docker_log.entry("out 3", time=at(3000)),
        docker_log.entry("out 1", time=at(1001)),
        docker_log.entry("err 10", "stderr", time=at(10_000)),
    ]))
    docker_log.end("stderr", "stdout")
    got = await collect(log)
    assert texts(got) == ["err 1", "out 1", "out 2", "err 3", "out 3", "err 10"]


async def test_sentinels_on_one_stream_do_not_end_the_activation(docker_log, log):
    docker_log.end("stdout")
    docker_log.write("still running")
    docker_log.end("stdout")
    docker_log.end("stderr")
    got = await collect(log)
    assert (texts(got), got.complete) == (["still running"], True)


async def test_sentinel_entries_written_otherwise_are_recognised_and_broken_ones_not(
        docker_log, log):
    docker_log.write("a")
    broken = b'{"log":"' + SENTINEL + b'\\n","stream":"stderr","time":"2024-05-01T10:00:00.'
    docker_log.append(broken + docker_log.entry("cut short"))
    docker_log.append(b'{"stream": "stdout", "time": "2024-05-01T10:00:01Z", "log": "'
                      + SENTINEL + b'\\r\\n"}\n')
    docker_log.write("b", stream="stderr")
    docker_log.append(b'{"time":"2024-05-01T10:00:02Z","stream":"stderr","log":"'
                      + SENTINEL + b'\\n"}\n')
    docker_log.write("next")
    got = await collect(log)
    assert (texts(got), got.complete) == (["a", "b"], True)
    assert texts(await collect(log, wait=False)) == ["next"]


async def test_one_collect_at_a_time_and_none_after_close(docker_log, log):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, log)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError):
            await collect(log)
        docker_log.end()
    log.close()
    log.close()
    with pytest.raises(RuntimeError):
        await collect(log)


def test_open_raises_oserror_for_a_missing_file(tmp_path):
    with pytest.raises(OSError):
        ContainerLog.open(str(tmp_path / "gone-json.log"))


async def test_skip_to_end_leaves_out_what_a_stem_cell_logged_before_its_action(docker_log, log):
    docker_log.write("runtime started")  # logged while the container waited as a stem cell
    log.skip_to_end()
    docker_log.write("the action's own line")
    docker_log.end()
    got = await collect(log)
    assert (texts(got), got.complete) == (["the action's own line"], True)


def test_a_symlink_or_fifo_is_not_opened(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "link-json.log").symlink_to(target)
    os.mkfifo(tmp_path / "fifo-json.log")
    for name in ("link-json.log", "fifo-json.log"):
        with pytest.raises(OSError):
            ContainerLog.open(str(tmp_path / name))


async def test_without_sentinels_lines_written_shortly_after_are_read_too(docker_log, log):
    docker_log.write("before the crash")

    async def late_writer() -> None:
        await trio.sleep(0.01)  # Docker writes the last lines a moment later
        docker_log.write("the runtime's last words")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_writer)
        got = await collect(log, wait=False)
    assert (texts(got), got.complete) == (["before the crash", "the runtime's last words"], True)


@pytest.mark.parametrize("text", ["", "x" * 10, "y" * 1000, "\U0001f600",
                                  "z" * 1000 + "\U0001f600"])
def test_collected_lines_take_at_most_their_stated_share_of_memory(text):
    """What the worst-case bound counts for a running activation's logs: the kept lines and
    their formatted copies, at most LOG_OBJECTS_FACTOR times the log limit, however short the
    lines (each is charged LINE_OVERHEAD_BYTES besides its text), and when one character
    outside the BMP makes Python keep the whole line at 4 bytes a character."""
    from invoker.config import LOG_OBJECTS_FACTOR
    from invoker.containers.engine import CollectedLogs
    from invoker.containers.pool import ContainerPool

    limit = 1 << 20

    def collect_and_format() -> tuple[CollectedLogs, list[str]]:
        out = CollectedLogs()
        while not out.truncated:
            stamp = f"2024-05-01T10:00:00.{len(out.lines):09d}Z"  # each its own, as Docker's
            line = (text + "\n")[:-1]  # a string of its own, as each line read is
            out.keep(stamp, "stdout", line, len(line.encode()), limit)
        return out, ContainerPool._format_logs(out, limit, True)

    (out, formatted), used, _ = traced(collect_and_format)
    assert len(formatted) == len(out.lines) + 1  # and the truncation notice
    assert used <= LOG_OBJECTS_FACTOR * limit
