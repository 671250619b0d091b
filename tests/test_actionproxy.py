"""Tests of the Python action runtime (deploy/runtime/python/actionproxy.py), run as a subprocess.

No Docker needed: each test starts the proxy on a free loopback port (PORT env) and speaks
OpenWhisk's action protocol to it with httpx.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PROXY = Path(__file__).resolve().parents[1] / "deploy" / "runtime" / "python" / "actionproxy.py"
SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lines:
    """Collects the lines a pipe produces, on a background thread."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_count(self, line: str, count: int, timeout: float = 5.0) -> list[str]:
        """Wait until ``line`` has been seen ``count`` times; return all lines so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.lines.count(line) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{line!r} not seen {count} times in {self.lines!r}")
                self._cond.wait(left)
            return list(self.lines)


class Proxy:
    def __init__(self) -> None:
        self.port = _free_port()
        env = dict(os.environ, PORT=str(self.port), ACTIONPROXY_HOST="127.0.0.1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(PROXY)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=10.0)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"actionproxy did not start: {self.stderr.lines}") from None
                time.sleep(0.02)

    def init(self, code: str, main: str = "main", binary: bool = False, env=None):
        value = {"name": "test", "main": main, "code": code, "binary": binary}
        if env is not None:
            value["env"] = env
        return self.client.post("/init", json={"value": value})

    def run(self, params=None, client: httpx.Client | None = None, **extra):
        body = {
            "value": params if params is not None else {},
            "activation_id": "act-1",
            "namespace": "guest",
            "action_name": "/guest/test",
            "action_version": "0.0.1",
            "transaction_id": "tid-1",
            "deadline": "1999999999999",
        }
        body.update(extra)
        return (client or self.client).post("/run", json=body)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    try:
        yield p
    finally:
        p.close()


def _code(src: str) -> str:
    return textwrap.dedent(src).lstrip()


ECHO = _code(
    """
    import os

    def main(args):
        env = {k: v for k, v in os.environ.items() if k.startswith("__OW_")}
        return {"args": args, "env": env, "greeting": os.environ.get("GREETING")}
    """
)


def test_init_and_run_with_params_and_ow_env(proxy: Proxy) -> None:
    r = proxy.init(ECHO, env={"GREETING": "hi", "NUMBER": 3})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True}

    r = proxy.run({"name": "world", "n": [1, 2]}, api_key="user:secret")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["args"] == {"name": "world", "n": [1, 2]}
    assert body["greeting"] == "hi"
    assert body["env"] == {
        "__OW_ACTIVATION_ID": "act-1",
        "__OW_NAMESPACE": "guest",
        "__OW_ACTION_NAME": "/guest/test",
        "__OW_ACTION_VERSION": "0.0.1",
        "__OW_TRANSACTION_ID": "tid-1",
        "__OW_DEADLINE": "1999999999999",
        "__OW_API_KEY": "user:secret",
    }

    # A later activation without an api_key must not see the previous one's key.
    r = proxy.run({}, activation_id="act-2")
    assert r.status_code == 200, r.text
    env = r.json()["env"]
    assert env["__OW_ACTIVATION_ID"] == "act-2"
    assert "__OW_API_KEY" not in env


def test_second_init_is_forbidden(proxy: Proxy) -> None:
    assert proxy.init(ECHO).status_code == 200
    r = proxy.init("def main(args):\n    return {'other': True}\n")
    assert r.status_code == 403
    assert r.json() == {"error": "Cannot initialize the action more than once."}
    # the first code is still the one that runs
    assert "args" in proxy.run({"x": 1}).json()


def test_run_before_init(proxy: Proxy) -> None:
    r = proxy.run({"x": 1})
    assert r.status_code == 502
    assert r.json() == {"error": "Cannot invoke an uninitialized action."}
    proxy.stdout.wait_count(SENTINEL, 1)
    proxy.stderr.wait_count(SENTINEL, 1)


def test_action_raising_gives_502_and_traceback(proxy: Proxy) -> None:
    code = _code(
        """
        def helper():
            raise ValueError("boom went the action")

        def main(args):
            helper()
        """
    )
    assert proxy.init(code).status_code == 200
    r = proxy.run({})
    assert r.status_code == 502
    error = r.json()["error"]
    assert error.startswith("An error has occurred: ")
    assert "ValueError" in error and "boom went the action" in error
    err = proxy.stderr.wait_count(SENTINEL, 1)
    text = "\n".join(err)
    assert "Traceback (most recent call last)" in text
    assert "in helper" in text
    assert "ValueError: boom went the action" in text
    # the traceback comes before the sentinel
    assert err.index(SENTINEL) > max(i for i, line in enumerate(err) if "boom" in line)


@pytest.mark.parametrize("ret", ["[1, 2]", "'a string'", "None", "42"])
def test_non_dict_result_is_502(proxy: Proxy, ret: str) -> None:
    assert proxy.init(f"def main(args):\n    return {ret}\n").status_code == 200
    r = proxy.run({})
    assert r.status_code == 502
    assert r.json() == {"error": "The action did not return a dictionary."}


def test_non_json_serialisable_result_is_502(proxy: Proxy) -> None:
    assert proxy.init("def main(args):\n    return {'s': {1, 2}}\n").status_code == 200
    r = proxy.run({})
    assert r.status_code == 502
    assert "error" in r.json()
    # the proxy survives and answers the next request
    assert proxy.run({}).status_code == 502
    proxy.stdout.wait_count(SENTINEL, 2)


def test_compile_error_at_init(proxy: Proxy) -> None:
    r = proxy.init("def main(args)\n    return {}\n")
    assert r.status_code == 502
    error = r.json()["error"]
    assert "SyntaxError" in error
    # still uninitialised
    assert proxy.run({}).json() == {"error": "Cannot invoke an uninitialized action."}


def test_missing_main_function_at_init(proxy: Proxy) -> None:
    r = proxy.init("def handler(args):\n    return {}\n", main="entry")
    assert r.status_code == 502
    assert "entry" in r.json()["error"]


def test_exception_in_module_code_at_init(proxy: Proxy) -> None:
    r = proxy.init("import no_such_module_xyz\n")
    assert r.status_code == 502
    assert "no_such_module_xyz" in r.json()["error"]


def test_malformed_init_body(proxy: Proxy) -> None:
    r = proxy.client.post(
        "/init", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code in (400, 502)
    assert "error" in r.json()
    r = proxy.client.post("/init", json={"novalue": 1})
    assert r.status_code in (400, 502)
    assert "error" in r.json()


def test_unknown_path_is_404(proxy: Proxy) -> None:
    r = proxy.client.post("/nope", json={})
    assert r.status_code == 404
    assert "error" in r.json()
    r = proxy.client.get("/")
    assert r.status_code == 404


def test_binary_zip_action(proxy: Proxy) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("helper.py", "def double(x):\n    return 2 * x\n")
        zf.writestr("data.txt", "from the zip\n")
        zf.writestr(
            "__main__.py",
            _code(
                """
                import helper

                def entry(args):
                    with open("data.txt") as fh:
                        data = fh.read().strip()
                    return {"doubled": helper.double(args["x"]), "data": data}
                """
            ),
        )
    code = base64.b64encode(buf.getvalue()).decode()
    r = proxy.init(code, main="entry", binary=True)
    assert r.status_code == 200, r.text
    r = proxy.run({"x": 21})
    assert r.status_code == 200, r.text
    assert r.json() == {"doubled": 42, "data": "from the zip"}


def test_binary_without_main_py(proxy: Proxy) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("other.py", "def main(a):\n    return {}\n")
    r = proxy.init(base64.b64encode(buf.getvalue()).decode(), binary=True)
    assert r.status_code == 502
    assert "__main__.py" in r.json()["error"]


def test_sentinel_after_each_run_and_after_action_output(proxy: Proxy) -> None:
    code = _code(
        """
        import sys

        def main(args):
            print("out line", args["i"])
            print("err line", args["i"], file=sys.stderr)
            sys.stdout.write("no newline flush " + str(args["i"]))
            sys.stdout.write("\\n")
            if args.get("fail"):
                raise RuntimeError("failing run")
            return {"i": args["i"]}
        """
    )
    assert proxy.init(code).status_code == 200
    assert proxy.run({"i": 1}).status_code == 200
    assert proxy.run({"i": 2, "fail": True}).status_code == 502
    assert proxy.run({"i": 3}).status_code == 200

    out = proxy.stdout.wait_count(SENTINEL, 3)
    err = proxy.stderr.wait_count(SENTINEL, 3)
    expected_out = []
    for i in (1, 2, 3):
        expected_out += [f"out line {i}", f"no newline flush {i}", SENTINEL]
    assert out == expected_out
    # stderr: each run's own line, (for run 2 a traceback), then the sentinel
    groups, cur = [], []
    for line in err:
        if line == SENTINEL:
            groups.append(cur)
            cur = []
        else:
            cur.append(line)
    assert cur == []
    assert len(groups) == 3
    assert groups[0] == ["err line 1"]
    assert groups[1][0] == "err line 2"
    assert "RuntimeError: failing run" in groups[1][-1]
    assert groups[2] == ["err line 3"]


def test_concurrent_runs_overlap(proxy: Proxy) -> None:
    code = "import time\n\ndef main(args):\n    time.sleep(1.0)\n    return {'i': args['i']}\n"
    assert proxy.init(code).status_code == 200
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            with httpx.Client(base_url=proxy.url, timeout=5.0) as c:
                results[i] = proxy.run({"i": i}, client=c).json()
        except Exception as exc:  # reported by the assertion below
            results[i] = repr(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert results == {1: {"i": 1}, 2: {"i": 2}}
    assert elapsed < 1.8, f"two 1 s runs took {elapsed:.2f} s: they did not overlap"
    proxy.stdout.wait_count(SENTINEL, 2)
    proxy.stderr.wait_count(SENTINEL, 2)


def test_keep_alive_50_requests_on_one_connection(proxy: Proxy) -> None:
    assert proxy.init("def main(args):\n    return {'n': args['n']}\n").status_code == 200
    peers = set()
    with httpx.Client(base_url=proxy.url, timeout=10.0) as c:
        for n in range(50):
            r = proxy.run({"n": n}, client=c)
            assert r.status_code == 200
            assert r.json() == {"n": n}
            assert r.headers["content-length"] == str(len(r.content))
            stream = r.extensions["network_stream"]
            peers.add(stream.get_extra_info("client_addr"))
    assert len(peers) == 1, f"expected one reused connection, saw {len(peers)}"
    proxy.stdout.wait_count(SENTINEL, 50)


def test_raw_http11_keep_alive_wire_format(proxy: Proxy) -> None:
    """Three requests on one raw socket: each answer is a complete HTTP/1.1 response with an
    exact Content-Length and the connection stays open."""
    assert proxy.init("def main(args):\n    return {'ok': 1}\n").status_code == 200
    body = b'{"value":{}}'
    req = (
        b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        for _ in range(3):
            s.sendall(req)
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b'{"ok":1}'):
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {data!r}"
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode()
            assert head.startswith("HTTP/1.1 200 ")
            assert "Content-Length: 8" in head
            assert "Connection: keep-alive" in head
