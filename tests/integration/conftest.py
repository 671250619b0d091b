"""Fixtures for tests against the real Kafka broker, Docker engine and store servers.

``make test`` starts them (deploy/services.sh up). When one is missing the tests fail with the
reason; they never skip.
"""

import uuid

import httpx
import pytest

from tests.support.daemon import COUCHDB, Daemon, Topics, remove_containers, settings_env
from tests.support.faultproxy import ProxyProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def topics():
    created = Topics.create()
    yield created
    created.delete()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/records.sqlite3"


@pytest.fixture
def couchdb_url():
    url = f"{COUCHDB}/t-{uuid.uuid4().hex[:12]}"
    yield url
    httpx.delete(url, timeout=10)


@pytest.fixture
def daemons(tmp_path, topics):
    """Factory: ``daemons(store_url, **settings)`` → a started Daemon, cleaned up after."""
    started: list[Daemon] = []

    def make(store_url: str, *, start: bool = True, invoker_id: str | None = None,
             command: str = "run", **settings: str) -> Daemon:
        kwargs = {"invoker_id": invoker_id} if invoker_id else {}
        d = Daemon(topics, store_url, tmp_path / f"{command}-{len(started)}.log",
                   settings=settings_env(settings), command=command, **kwargs)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop_quietly()
        # Shown by pytest only when the test failed.
        print(f"--- {d.log_path.name} (non-debug tail) ---")
        print("\n".join([line for line in d.log_path.read_text(errors="replace").splitlines()
                         if '"level": "debug"' not in line][-40:]))
    for invoker_id in {d.invoker_id for d in started}:
        remove_containers(invoker_id)


@pytest.fixture
def couch_proxies(tmp_path):
    """Factory of fault proxies in front of the CouchDB-API server (``.port`` to connect)."""
    target = COUCHDB.split("//", 1)[1].rstrip("/")
    proxies: list[ProxyProcess] = []

    def make() -> ProxyProcess:
        workdir = tmp_path / f"proxy-{len(proxies)}"
        workdir.mkdir()
        proxies.append(ProxyProcess(target, workdir, quiet=False))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def couch_proxy(couch_proxies):
    return couch_proxies()
