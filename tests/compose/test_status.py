"""``invoker status`` inside the compose stack's containers, as an operator runs it
(``docker compose exec invoker invoker status``): the default URL comes from the compose
environment (``INVOKER_METRICS_HOST=0.0.0.0`` is reached on loopback)."""

import json

from tests.support.compose import FEED_TOPIC, OVERFLOW_TOPIC
from tests.support.daemon import wait_for


def exec_status(stack, service: str, *args: str):
    return stack.compose("exec", "-T", service, "invoker", "status", *args, check=False,
                         timeout_s=60)


def test_status_from_inside_the_invoker_and_the_recorder(stack):
    stack.up()  # test_stack.py's last test takes the stack down; up is a no-op if it is up
    def owning_every_partition():
        result = exec_status(stack, "invoker", "--json")
        if result.returncode != 0:
            return None
        doc = json.loads(result.stdout)
        return doc if len(doc["partitions"]) == 4 else None

    doc = wait_for(owning_every_partition, 120, "the invoker's status with 4 partitions",
                   interval_s=1)
    assert doc["role"] == "invoker" and doc["slots"]["max"] == 16
    assert {r["topic"] for r in doc["partitions"]} == {FEED_TOPIC}
    assert doc["record_channel"]["capacity"] > 0 and "containers" in doc
    screen = exec_status(stack, "invoker")
    assert screen.returncode == 0, screen.stderr
    assert screen.stdout.startswith("invoker ") and "\nslots        " in screen.stdout

    recorder = exec_status(stack, "recorder", "--recorder", "--json")
    assert recorder.returncode == 0, recorder.stderr
    doc = json.loads(recorder.stdout)
    assert doc["role"] == "recorder" and "slots" not in doc
    assert {r["topic"] for r in doc["partitions"]} <= {OVERFLOW_TOPIC}
