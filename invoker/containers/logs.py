"""An action container's logs read straight from its json-file log, no Docker API request.

Docker's json-file driver appends one JSON object per line to ``LogPath``::

    {"log":"text\\n","stream":"stdout","time":"2024-05-01T10:00:00.123456789Z"}

Output lines longer than 16 KiB arrive as several entries (all but the last without the
newline); each entry is one ``LogLine``, as on the Docker API path. Docker writes ``time`` in
Go's RFC3339Nano, which drops trailing zeros of the fraction; it is padded back to nine digits
(the API's format), so that lines sort by their time string.

A ``ContainerLog`` keeps the file open and the byte offset where the previous activation's
logs ended: the next ``collect`` starts right after the later of the two sentinel lines. An
entry whose newline is not written yet is not consumed (read again next time). Containers run
with ``max-size``/``max-file=2``: Docker renames the file to ``<path>.1`` and starts a new one;
at the end of the open file, if the path names another file, the open one is read to its end
and then the path is reopened at offset 0. A log that vanished (container removed) ends the read.
A file rotated away and then replaced (two rotations, 32 MB, within one read) is not read: the
sentinels are then normally missed, and the caller retires the container.

Blocking: reads are ``pread`` calls of at most ``CHUNK_BYTES`` on the trio thread. The file was
just written by Docker, so it is in the page cache and a read takes microseconds; a thread hop
would cost more than the read, and parsing is Python code that holds the GIL in any thread. An
action that printed megabytes is read chunk by chunk with a checkpoint between chunks, so other
tasks run meanwhile, and lines past the byte limit are dropped without being parsed (unless
their text starts with the sentinel).
"""

from __future__ import annotations

import json
import os
import stat
from operator import attrgetter

import trio

from invoker.containers.engine import SENTINEL, CollectedLogs

CHUNK_BYTES = 64 * 1024
# Docker splits output at 16 KiB, so a longer entry is not Docker's: it is skipped, never buffered.
MAX_ENTRY_BYTES = 1 << 20
# Waiting for the sentinels: Docker usually has written them well under a millisecond after the
# runtime printed them. (trio's epoll rounds a sleep up to a whole millisecond.)
FIRST_POLL_S = 0.0002
MAX_POLL_S = 0.01
# Without sentinels to wait for (a failed /init, a crash, a timeout), the log is read until
# nothing new came for this long.
SETTLE_S = 0.05

_SENTINEL_TEXT = SENTINEL.decode()
# A sentinel entry as Docker writes it, up to the stream name: recognised without parsing.
_SENTINEL_ENTRY = b'{"log":"' + SENTINEL + b'\\n","stream":"'
_SENTINEL_STREAMS = {b'stdout","time":"': "stdout", b'stderr","time":"': "stderr"}
_STREAM_FIELD_END = len(_SENTINEL_ENTRY) + len(b'stdout","time":"')
# A JSON value starting with the sentinel (in log text, Docker escapes the quote: \")
_SENTINEL_VALUE = b':"' + SENTINEL
_decode_json = json.JSONDecoder().decode
_TIME_LENGTH = len("2024-05-01T10:00:00.123456789Z")
_by_time = attrgetter("time")

# What the path names now, compared with the open file (ContainerLog._path_state)
_SAME, _ROTATED, _MOVING, _GONE = "same", "rotated", "moving", "gone"


class ContainerLog:
    """One container's json-file log, read from where the previous read stopped.

    Holds an open file descriptor until ``close``. One ``collect`` at a time."""

    __slots__ = ("_path", "_fd", "_file_id", "_offset", "_skipping", "_collecting")

    def __init__(self, path: str, fd: int, file_id: tuple[int, int]) -> None:
        self._path = path
        self._fd = fd
        self._file_id = file_id  # (st_dev, st_ino) of the open file
        self._offset = 0  # first byte of the open file not consumed yet
        self._skipping = False  # inside an entry longer than MAX_ENTRY_BYTES: drop to its newline
        self._collecting = False

    @classmethod
    def open(cls, path: str) -> ContainerLog:
        """Open the log at ``path``, positioned at its start. Raises OSError if it cannot be
        read (missing, or no permission)."""
        return cls(path, *_open_regular(path))

    def skip_to_end(self) -> None:
        """Start the next ``collect`` at the log's current end: what was logged so far (by a
        stem cell before it was given to an action) belongs to no activation. Raises OSError.
        (A line being written at this moment is then skipped as malformed.)"""
        self._offset = os.fstat(self._fd).st_size
        self._skipping = False

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    async def collect(self, *, limit_bytes: int, wait_sentinels: bool,
                      timeout_s: float) -> CollectedLogs:
        """The lines logged since the previous ``collect``, sorted by time (stable).

        With ``wait_sentinels``: until the sentinel line has been read on stdout and on stderr
        (``complete=True``), or ``timeout_s`` passed or the log vanished (``complete=False``),
        polling with sleeps growing from FIRST_POLL_S to MAX_POLL_S. Without it: the complete
        entries there once nothing new came for SETTLE_S (``complete=True``). Lines past
        ``limit_bytes`` of text are read and dropped (``truncated=True``), still up to the
        sentinels.

        Memory: one chunk, one unfinished entry (≤ MAX_ENTRY_BYTES + one chunk) and the kept
        lines (at most ``limit_bytes // LINE_OVERHEAD_BYTES``, ``limit_bytes`` with their text).
        Does not checkpoint when the first read finds everything (the common case).
        Raises OSError when the file cannot be read, RuntimeError if already collecting or
        closed.
        """
        if self._collecting or self._fd < 0:
            raise RuntimeError("this log is closed or another task is collecting from it")
        self._collecting = True
        try:
            out = await self._collect(limit_bytes, wait_sentinels,
                                      trio.current_time() + timeout_s)
        finally:
            self._collecting = False
        out.lines.sort(key=_by_time)
        return out

    async def _collect(self, limit: int, wait: bool, deadline: float) -> CollectedLogs:
        out = CollectedLogs()
        seen: set[str] = set()  # the streams whose sentinel was read
        pending = bytearray()  # an unfinished entry: the bytes from self._offset to read_at
        read_at = self._offset
        rotated = False  # the path names a newer file: finish this one, then switch
        delay = FIRST_POLL_S
        settled = False  # without sentinels: the end was reached again after SETTLE_S
        while trio.current_time() < deadline:
            chunk = os.pread(self._fd, CHUNK_BYTES, read_at)
            if chunk:
                settled = False
                read_at += len(chunk)
                if self._skipping:
                    newline = chunk.find(b"\n")
                    if newline < 0:
                        self._offset = read_at
                        await trio.lowlevel.checkpoint()
                        continue
                    self._skipping = False
                    self._offset = read_at - len(chunk) + newline + 1
                    chunk = chunk[newline + 1:]
                if pending:
                    pending += chunk
                    data: bytes | bytearray = pending
                else:
                    data = chunk
                consumed, finished = _take_entries(data, out, seen, limit, wait)
                self._offset += consumed
                if finished:
                    out.complete = True
                    return out
                if data is pending:
                    del pending[:consumed]
                elif consumed < len(data):
                    pending = bytearray(data[consumed:])
                if len(pending) > MAX_ENTRY_BYTES:
                    self._skipping = True
                    self._offset += len(pending)
                    pending = bytearray()
                await trio.lowlevel.checkpoint()  # more may follow: let other tasks run
                continue
            # At the end of the open file.
            if rotated:
                rotated = False
                if self._reopen():
                    read_at, pending = 0, bytearray()
                continue  # else the path vanished again: _path_state tells why
            state = self._path_state()
            if state == _ROTATED:
                rotated = True  # read what was appended before the rename, then switch
                continue
            if state == _GONE or (not wait and settled):
                break
            if not wait:
                # Docker writes the file shortly after the runtime printed: what a failing
                # runtime printed last may not be there yet.
                await trio.sleep(min(SETTLE_S, max(0.0, deadline - trio.current_time())))
                settled = True
                continue
            await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
            delay = min(delay * 2, MAX_POLL_S)
        out.complete = not wait
        return out

    def _path_state(self) -> str:
        """What the path names now, compared with the open file."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            # Between Docker's rename and its creating the new file, or removed for good
            # (the container's directory was deleted): only then has the open file no link.
            return _MOVING if os.fstat(self._fd).st_nlink > 0 else _GONE
        except OSError:
            return _GONE
        return _SAME if (st.st_dev, st.st_ino) == self._file_id else _ROTATED

    def _reopen(self) -> bool:
        """Switch to the file the path names now, at its start; False if there is none."""
        try:
            fd, file_id = _open_regular(self._path)
        except FileNotFoundError:
            return False
        os.close(self._fd)
        self._fd, self._file_id = fd, file_id
        self._offset, self._skipping = 0, False
        return True


def _open_regular(path: str) -> tuple[int, tuple[int, int]]:
    """A descriptor of the regular file at ``path`` and its (device, inode). Neither follows a
    symbolic link nor waits on a FIFO (the engine writes these files; never trust a path
    blindly). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
    except OSError:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


def _take_entries(data: bytes | bytearray, out: CollectedLogs, seen: set[str], limit: int,
                  wait: bool) -> tuple[int, bool]:
    """Add the complete entries in ``data`` to ``out``. Returns (bytes consumed, finished):
    finished when waiting and this read the second stream's sentinel, which ends the
    consumed bytes."""
    start = 0
    if out.truncated and data.find(SENTINEL) < 0:
        # Draining to the sentinels, none in sight: skip the complete entries unparsed.
        return data.rfind(b"\n") + 1, False
    while (end := data.find(b"\n", start)) >= 0:
        line = data[start:end]
        start = end + 1
        if line.startswith(_SENTINEL_ENTRY) and line.endswith(b'"}') \
                and line.find(b'"', _STREAM_FIELD_END, len(line) - 2) < 0:
            stream = _SENTINEL_STREAMS.get(bytes(line[len(_SENTINEL_ENTRY):_STREAM_FIELD_END]))
            if stream is not None:
                seen.add(stream)
                if wait and len(seen) == 2:
                    return start, True
                continue
        if out.truncated and _SENTINEL_VALUE not in line:
            continue  # draining to the sentinels: only a value starting with one is parsed
        entry = _parse_entry(line)
        if entry is None:
            continue
        time, stream, text = entry
        text = text.rstrip("\r\n")
        if text == _SENTINEL_TEXT:
            seen.add(stream)
            if wait and len(seen) == 2:
                return start, True
            continue
        if out.truncated:
            continue
        if text.isascii():
            size = len(text)
        else:
            # Lone surrogates (from "\ud800" escapes) become "?": the text must encode later.
            encoded = text.encode("utf-8", "replace")
            size, text = len(encoded), encoded.decode("utf-8")
        out.keep(_api_time(time), stream, text.rstrip(), size, limit)
    return start, False


def _parse_entry(line: bytes | bytearray) -> tuple[str, str, str] | None:
    """(time, stream, text) of one json-file entry; None when it is not a well-formed one."""
    try:
        entry = _decode_json(line.decode())  # Docker writes UTF-8 only (invalid bytes replaced)
    except (ValueError, RecursionError):
        return None
    if type(entry) is not dict:
        return None
    stream = entry.get("stream")
    time = entry.get("time")
    text = entry.get("log", "")  # Docker omits an empty "log"
    if (stream != "stdout" and stream != "stderr") or type(time) is not str \
            or type(text) is not str:
        return None
    return time, stream, text


def _api_time(time: str) -> str:
    """Docker's RFC3339Nano time with the fraction padded to nine digits, as the API writes it:
    "...:00.1234Z" -> "...:00.123400000Z", "...:00Z" -> "...:00.000000000Z"."""
    if len(time) == _TIME_LENGTH or not time.endswith("Z"):
        return time
    whole, dot, fraction = time[:-1].partition(".")
    if dot and not (fraction.isdigit() and len(fraction) <= 9):
        return time
    return f"{whole}.{fraction:0<9}Z"
