"""Containers are per tenant and per code, and a failed container is never reused.

A real daemon, real Kafka, real Docker. The daemon runs one activation at a time
(``max_activations=1``) and the messages share one partition, so they run in the order sent:
each one finds the containers the earlier ones left warm, which is when a container could be
shared that must not be.

Actions return a token drawn when their module is imported, so equal tokens mean "the same
container" and different ones "a new container".
"""

from __future__ import annotations

import subprocess
import uuid

from invoker.loadgen import activation_message, produce_messages, read_completions
from tests.support.daemon import KAFKA, stored_records

TOKEN_ACTION = """
import uuid
TOKEN = uuid.uuid4().hex
def main(args):
    return {{"who": {who!r}, "token": TOKEN}}
"""

# On {"break": true} it puts the runtime in the state Apache OpenWhisk's Node.js runtime is in
# after an action failed: every later /run is answered 403 "System not ready".
BREAKING_ACTION = """
import uuid
TOKEN = uuid.uuid4().hex
def main(args):
    if args.get("break"):
        import __main__
        __main__.Action.run = lambda self, message: (403, {"error": "System not ready"})
        raise RuntimeError("the runtime is broken now")
    return {"token": TOKEN}
"""


def message(namespace: str, name: str, code: str, **params: object) -> dict:
    msg = activation_message("echo", namespace, blocking=True,
                             limits={"timeout": 10000, "memory": 128})
    msg["action"].update(name=name, code=code)  # same version for all: loadgen's
    msg["params"] = params
    return msg


def run_in_order(topics, messages: list[dict]) -> list[dict]:
    """Sends ``messages`` to one partition; returns their completions in the same order."""
    produce_messages(KAFKA, topics.feed, messages, key="one-partition")
    ids = {m["activationId"] for m in messages}
    found = read_completions(KAFKA, topics.completions, ids, 90)
    assert found.keys() == ids, f"missing completions: {ids - found.keys()}"
    return [found[m["activationId"]][0] for m in messages]


def namespace_labels(invoker_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=org.invoker.id={invoker_id}",
         "--format", '{{.Label "org.invoker.namespace"}}'],
        check=True, capture_output=True, text=True, timeout=30)
    return sorted(out.stdout.split())


def test_tenants_and_code_versions_never_share_a_container(daemons, topics, sqlite_url):
    daemon = daemons(sqlite_url, max_activations=1)
    code_a, code_b = TOKEN_ACTION.format(who="tenant-a"), TOKEN_ACTION.format(who="tenant-b")
    messages = [
        message("tenanta", "shared-name", code_a),
        message("tenantb", "shared-name", code_b),  # same name and version, other tenant
        message("tenanta", "shared-name", code_a),  # same tenant, same code: reused
        message("tenanta", "shared-name", TOKEN_ACTION.format(who="tenant-a v2")),  # new code
        message("tenantb", "shared-name", code_b),
    ]
    a1, b1, a2, a_new, b2 = (c["result"] for c in run_in_order(topics, messages))
    assert [r["who"] for r in (a1, b1, a2, a_new, b2)] == [
        "tenant-a", "tenant-b", "tenant-a", "tenant-a v2", "tenant-b"]
    assert a2["token"] == a1["token"] and b2["token"] == b1["token"]  # warm reuse still works
    assert len({a1["token"], b1["token"], a_new["token"]}) == 3
    records, _ = stored_records(sqlite_url, {m["activationId"]: m["namespace"]
                                             for m in messages})
    assert [records[m["activationId"]]["response"]["result"]["who"] for m in messages] == [
        "tenant-a", "tenant-b", "tenant-a", "tenant-a v2", "tenant-b"]
    # for operators: each container names the tenant it serves
    assert namespace_labels(daemon.invoker_id) == ["tenanta", "tenanta", "tenantb"]


def test_a_runtime_broken_by_an_error_is_replaced(daemons, topics, sqlite_url):
    daemons(sqlite_url, max_activations=1)
    name = f"breaks-{uuid.uuid4().hex[:6]}"
    before, broke, after, again = run_in_order(topics, [
        message("itest", name, BREAKING_ACTION),
        message("itest", name, BREAKING_ACTION, **{"break": True}),
        message("itest", name, BREAKING_ACTION),
        message("itest", name, BREAKING_ACTION),
    ])
    assert before["status"] == "success"
    assert (broke["status"], broke["statusCode"]) == ("action developer error", 2)
    assert broke["result"] == {"error": "An error has occurred: RuntimeError: "
                                        "the runtime is broken now"}
    # the broken runtime would answer 403 "System not ready": a new container runs it
    assert (after["status"], again["status"]) == ("success", "success"), (after, again)
    assert after["result"]["token"] != before["result"]["token"]
    assert again["result"]["token"] == after["result"]["token"]
