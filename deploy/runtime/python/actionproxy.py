#!/usr/bin/env python3
"""OpenWhisk-compatible Python action runtime ("action proxy").

A stdlib-only HTTP/1.1 server (default 0.0.0.0:8080, port from $PORT) speaking Apache
OpenWhisk's action protocol:

* ``POST /init`` ``{"value": {"name", "main", "code", "binary", "env"}}`` loads the action once.
* ``POST /run`` ``{"value": params, "activation_id", "namespace", ...}`` calls ``main(params)``;
  every top-level key except ``value`` becomes the environment variable ``__OW_<KEY>``.

After every ``/run`` the line ``XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX`` is written to stdout and
to stderr (after whatever the action printed), before the HTTP response is sent, so the invoker
can collect the activation's logs as soon as it has the response.

Every response is written with a single ``send`` and the sockets use TCP_NODELAY: a response
split over several sends meets Nagle's algorithm and delayed ACK and costs ~40 ms per request.
Nothing is logged per request; the container's logs hold only what the action prints.
"""

from __future__ import annotations

import base64
import binascii
import glob
import http.server
import io
import json
import os
import signal
import site
import socket
import socketserver
import sys
import tempfile
import threading
import traceback
import types
import zipfile

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
# OpenWhisk's python runtime imports the action as module "main__", so an
# ``if __name__ == "__main__":`` block in the action does not run at /init.
MODULE_NAME = "main__"
MAX_BODY_BYTES = 64 * 1024 * 1024


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _env_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - an action may have replaced/closed a stream
            pass


def _print_action_traceback(exc: BaseException) -> None:
    """Print ``exc``'s traceback to stderr without the proxy's own frames at the top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


class Action:
    """The single action this process hosts. Thread-safe: /run may be called concurrently."""

    def __init__(self) -> None:
        self._init_lock = threading.Lock()
        self._env_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._run_env_keys: set[str] = set()
        self.main = None  # the entry point, set once /init succeeded

    # ----------------------------------------------------------------- /init
    def init(self, message: object) -> tuple[int, dict]:
        if not isinstance(message, dict) or not isinstance(message.get("value"), dict):
            return 400, {"error": 'Malformed /init request: expected {"value": {...}}.'}
        with self._init_lock:
            if self.main is not None:
                return 403, {"error": "Cannot initialize the action more than once."}
            try:
                entry = self._load(message["value"])
            except BaseException as exc:  # noqa: BLE001 - action code may raise anything
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                if not isinstance(exc, _InitError):
                    _print_action_traceback(exc)
                _flush_std_streams()
                if isinstance(exc, _InitError):
                    return 502, {"error": str(exc)}
                return 502, {"error": f"Initialization has failed due to: {text}"}
            self.main = entry
        _flush_std_streams()
        return 200, {"ok": True}

    def _load(self, value: dict):
        code = value.get("code")
        main_name = value.get("main") or "main"
        env = value.get("env") or {}
        if not isinstance(main_name, str):
            raise _InitError("The 'main' field must be a string.")
        if not isinstance(env, dict):
            raise _InitError("The 'env' field must be an object.")
        if not isinstance(code, str) or not code.strip():
            raise _InitError("Missing main/no code to execute.")

        for key, val in env.items():
            os.environ[str(key)] = _env_value(val)

        module = types.ModuleType(MODULE_NAME)
        if value.get("binary"):
            action_dir = self._unzip(code)
            main_file = os.path.join(action_dir, "__main__.py")
            if not os.path.isfile(main_file):
                raise _InitError("Zip file does not include a mandatory __main__.py.")
            for sp in sorted(
                glob.glob(
                    os.path.join(action_dir, "virtualenv", "lib", "python3*", "site-packages")
                )
            ):
                site.addsitedir(sp)
            sys.path.insert(0, action_dir)
            os.chdir(action_dir)
            with open(main_file, encoding="utf-8") as fh:
                source = fh.read()
            filename = main_file
        else:
            source = code
            filename = "<action>" if not value.get("name") else f"<action {value['name']}>"

        module.__file__ = filename
        sys.modules[MODULE_NAME] = module
        try:
            compiled = compile(source, filename, "exec")
        except SyntaxError as exc:
            sys.modules.pop(MODULE_NAME, None)
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise _InitError(f"Initialization has failed due to: {text}") from exc
        try:
            exec(compiled, module.__dict__)  # noqa: S102 - running the action is the point
        except BaseException:
            sys.modules.pop(MODULE_NAME, None)
            raise
        entry = module.__dict__.get(main_name)
        if entry is None:
            raise _InitError(
                f"Initialization has failed: the action has no function named '{main_name}'."
            )
        if not callable(entry):
            raise _InitError(
                f"Initialization has failed: '{main_name}' is not a function "
                f"(it is a {type(entry).__name__})."
            )
        return entry

    @staticmethod
    def _unzip(code: str) -> str:
        try:
            data = base64.b64decode(code, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise _InitError(f"Unable to decode the base64 action code: {exc}") from exc
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise _InitError(f"The binary action is not a valid zip file: {exc}") from exc
        action_dir = tempfile.mkdtemp(prefix="action-")
        with archive:
            archive.extractall(action_dir)
        return action_dir

    # ------------------------------------------------------------------ /run
    def run(self, message: object) -> tuple[int, dict | bytes]:
        try:
            entry = self.main
            if entry is None:
                return 502, {"error": "Cannot invoke an uninitialized action."}
            if not isinstance(message, dict):
                return 400, {"error": "Malformed /run request: expected a JSON object."}
            self._set_run_env(message)
            params = message.get("value")
            if params is None:
                params = {}
            try:
                result = entry(params)
            except BaseException as exc:  # noqa: BLE001 - includes sys.exit() in the action
                _print_action_traceback(exc)
                return 502, {"error": f"An error has occurred: {type(exc).__name__}: {exc}"}
            if not isinstance(result, dict):
                return 502, {"error": "The action did not return a dictionary."}
            try:
                return 200, _json_bytes(result)
            except (TypeError, ValueError, RecursionError) as exc:
                return 502, {
                    "error": f"The action did not return a JSON-serializable dictionary: {exc}"
                }
        finally:
            self.end_activation()

    def _set_run_env(self, message: dict) -> None:
        with self._env_lock:
            keys = set()
            for key, val in message.items():
                if key == "value" or val is None:
                    continue
                name = "__OW_" + str(key).upper()
                os.environ[name] = _env_value(val)
                keys.add(name)
            # Do not let e.g. __OW_API_KEY of an earlier activation leak into this one.
            for name in self._run_env_keys - keys:
                os.environ.pop(name, None)
            self._run_env_keys = keys

    def end_activation(self) -> None:
        """Write the log sentinel on both streams, after everything the action printed."""
        with self._log_lock:
            _flush_std_streams()
            for stream in (sys.__stdout__, sys.__stderr__):
                try:
                    stream.write(SENTINEL + "\n")
                    stream.flush()
                except Exception:  # noqa: BLE001
                    pass


class _InitError(Exception):
    """An /init failure whose message is already meant for the caller."""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "actionproxy"
    sys_version = ""
    wbufsize = 0  # wfile.write() is one sendall(): we write each response in one call

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # no access log: container logs are the action's logs

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        reason = self.responses.get(code, ("Error",))[0]
        self._respond(code, {"error": message or reason})

    def _respond(self, status: int, payload: dict | bytes) -> None:
        body = payload if isinstance(payload, bytes) else _json_bytes(payload)
        reason = self.responses.get(status, ("",))[0]
        connection = "close" if self.close_connection else "keep-alive"
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {connection}\r\n"
            "\r\n"
        ).encode("latin-1")
        if getattr(self, "command", None) == "HEAD":
            body = b""
        try:
            self.wfile.write(head + body)
        except OSError:
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400 (and closing) if it cannot be read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0 or n > MAX_BODY_BYTES:
                raise ValueError(length)
        except ValueError:
            self.send_error(400, f"Invalid Content-Length: {length!r}")
            return None
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self) -> bytes | None:
        parts = []
        total = 0
        try:
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("body too large")
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise ValueError("truncated chunk")
                parts.append(chunk)
                self.rfile.readline(3)
        except ValueError as exc:
            self.send_error(400, f"Invalid chunked body: {exc}")
            return None

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        if path not in ("/init", "/run"):
            self._respond(404, {"error": f"Not found: {path}"})
            return
        if self.command != "POST":
            self._respond(405, {"error": f"Method {self.command} not allowed on {path}."})
            return
        action: Action = self.server.action  # type: ignore[attr-defined]
        try:
            message = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError) as exc:
            if path == "/run":
                action.end_activation()
            self._respond(400, {"error": f"The request body is not valid JSON: {exc}"})
            return
        if path == "/init":
            status, payload = action.init(message)
        else:
            status, payload = action.run(message)
        self._respond(status, payload)

    do_POST = do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # start-up in a container without DNS; we do not need the server name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away; not the action's business
        super().handle_error(request, client_address)


def _terminate(signum, frame) -> None:
    # As PID 1 in a container, default signal dispositions are ignored: exit explicitly.
    raise SystemExit(0)


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    host = os.environ.get("ACTIONPROXY_HOST", "0.0.0.0")  # tests bind to loopback only
    signal.signal(signal.SIGTERM, _terminate)
    server = Server((host, port), Handler)
    server.action = Action()  # type: ignore[attr-defined]
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
