#!/usr/bin/env python3
"""An ActionLoop-style OpenWhisk action runtime, for tests: ActionLoop's layout and contract.

Apache OpenWhisk's ActionLoop runtimes (Python 3, Go, Java, PHP, Ruby, Rust, .NET …: the Go
proxy at /bin/proxy) do not run the action in the proxy. This one behaves the same way:

* ``POST /init`` ``{"value": {"code", "main", "env"}}`` writes the action under
  ``/action/<n>/`` (n counts the inits): ``src/main__.py`` and an executable ``bin/exec``, a
  launcher whose ``#!/usr/bin/env python3`` line makes it a program of its own. It then execs
  ``bin/exec`` as a child process and waits for its ``{"ok": true}`` on file descriptor 3.
  When ``/action`` cannot be written or ``bin/exec`` cannot be executed (no writable
  ``/action``, a ``noexec`` mount), it answers 502 "The action failed to generate or locate a
  binary. See logs for details." and logs the reason, as ActionLoop does.
* ``POST /run`` hands the request body to the child as one JSON line on its stdin, reads one
  JSON line, the result, from its fd 3, and then writes the log sentinel to stdout and stderr
  (which the child shares), so the invoker can collect the activation's logs.

Only source actions (no zip) and one init per container, as this project's invoker uses them.
Responses are written in one send with TCP_NODELAY (see the Nagle note in ENVIRONMENT.md).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading

SENTINEL = b"XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"
ACTION_ROOT = os.environ.get("OW_ACTION_ROOT", "/action")
NO_BINARY = "The action failed to generate or locate a binary. See logs for details."
MAX_BODY_BYTES = 64 * 1024 * 1024

LAUNCHER = '''#!/usr/bin/env python3
import json, os, sys, traceback
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
out = os.fdopen(3, "wb")
try:
    import main__
    entry = getattr(main__, MAIN)
except BaseException:
    traceback.print_exc()
    out.write(b'{"ok": false}\\n')
    out.flush()
    sys.exit(1)
out.write(b'{"ok": true}\\n')
out.flush()
for line in sys.stdin:
    args = json.loads(line)
    for key, value in args.items():
        if key != "value":
            os.environ["__OW_" + key.upper()] = value if isinstance(value, str) else json.dumps(value)
    try:
        result = entry(args.get("value") or {})
    except Exception as exc:
        traceback.print_exc()
        result = {"error": str(exc)}
    sys.stdout.flush()
    sys.stderr.flush()
    out.write(json.dumps(result, ensure_ascii=False).encode() + b"\\n")
    out.flush()
'''


class Action:
    """The child process that runs the action (one at a time: ActionLoop's default)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inits = 0
        self.child: subprocess.Popen | None = None
        self.results = None  # the read end of the child's fd 3

    def init(self, value: dict) -> tuple[int, dict]:
        with self.lock:
            if self.child is not None:
                return 403, {"error": "Cannot initialize the action more than once."}
            code, main = value.get("code"), value.get("main") or "main"
            if not isinstance(code, str) or not code.strip() or not isinstance(main, str):
                return 400, {"error": "Missing main/no code to execute."}
            env = {k: v if isinstance(v, str) else json.dumps(v)
                   for k, v in (value.get("env") or {}).items()}
            self.inits += 1
            home = os.path.join(ACTION_ROOT, str(self.inits))
            try:
                launcher = self._write(home, code, main)
                self._start(launcher, home, env)
            except (OSError, ValueError) as exc:
                log_failure(f"cannot start the action in {home}: {exc}")
                return 502, {"error": NO_BINARY}
            return 200, {"ok": True}

    @staticmethod
    def _write(home: str, code: str, main: str) -> str:
        os.makedirs(os.path.join(home, "src"))
        os.makedirs(os.path.join(home, "bin"))
        with open(os.path.join(home, "src", "main__.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        launcher = os.path.join(home, "bin", "exec")
        with open(launcher, "w", encoding="utf-8") as fh:
            fh.write(LAUNCHER.replace("MAIN)", f"{main!r})", 1))
        os.chmod(launcher, 0o755)
        return launcher

    def _start(self, launcher: str, home: str, env: dict[str, str]) -> None:
        read_end, write_end = os.pipe()  # both close-on-exec
        try:
            # The pipe becomes the child's fd 3 (dup2 makes it inheritable; every other fd of
            # this process is close-on-exec, so close_fds=False passes nothing else).
            child = subprocess.Popen([launcher], stdin=subprocess.PIPE, cwd=home,
                                     env={**os.environ, **env}, close_fds=False,
                                     preexec_fn=lambda: os.dup2(write_end, 3))
        finally:
            os.close(write_end)
        results = os.fdopen(read_end, "rb")
        ack = results.readline()
        if json.loads(ack or b"{}").get("ok") is not True:
            child.kill()
            child.wait()
            results.close()
            raise ValueError("the action did not initialize (see its output above)")
        self.child, self.results = child, results

    def run(self, body: bytes) -> tuple[int, dict | bytes]:
        with self.lock:
            try:
                if self.child is None:
                    return 400, {"error": "no action defined yet"}
                assert self.child.stdin is not None and self.results is not None
                try:
                    self.child.stdin.write(body.replace(b"\n", b"") + b"\n")
                    self.child.stdin.flush()
                    line = self.results.readline()
                except OSError:
                    line = b""
                if not line:
                    return 400, {"error": "command exited"}
                try:
                    result = json.loads(line)
                except ValueError:
                    result = None
                if not isinstance(result, dict):
                    return 502, {"error": "The action did not return a dictionary."}
                return 200, line.rstrip(b"\n")
            finally:
                for stream in (sys.stdout.buffer, sys.stderr.buffer):
                    stream.write(SENTINEL)
                    stream.flush()


def log_failure(text: str) -> None:
    sys.stderr.write(text + "\n")
    for stream in (sys.stdout.buffer, sys.stderr.buffer):
        stream.write(SENTINEL)
        stream.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 0  # one write per response

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the container's logs are the action's

    def _respond(self, status: int, payload: dict | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.wfile.write(head.encode("latin-1") + body)

    def do_GET(self) -> None:  # noqa: N802 - the invoker's readiness probe
        self._respond(404, {"error": "POST /init or /run"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._respond(413, {"error": "request too large"})
            return
        body = self.rfile.read(length)
        action: Action = self.server.action  # type: ignore[attr-defined]
        if self.path == "/run":
            self._respond(*action.run(body))
            return
        if self.path != "/init":
            self._respond(404, {"error": f"not found: {self.path[:100]}"})
            return
        try:
            value = json.loads(body)["value"]
            if not isinstance(value, dict):
                raise ValueError("value is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            self._respond(400, {"error": f"Error unmarshaling request: {exc}"})
            return
        self._respond(*action.init(value))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no reverse DNS lookup of the host name
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores it by default
    server = Server(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
    server.action = Action()  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__":
    main()
