import json

import pytest

from invoker.config import Config
from invoker.messages import InvalidMessage, Rejection, decode_activation
from invoker.model import Activation, Status

AID = "0123456789abcdef0123456789abcdef"


def message(**overrides):
    doc = {
        "activationId": AID,
        "namespace": "guest",
        "action": {"name": "hello", "version": "0.0.1", "kind": "python:3", "image": None,
                   "code": "def main(args):\n    return args", "main": "main",
                   "limits": {"timeout": 1000, "memory": 128, "logs": 10, "concurrency": 1}},
        "params": {"name": "x"},
        "blocking": True,
        "transid": "t1",
        "submittedAt": 1764290000000,
    }
    for key, value in overrides.items():
        if key.startswith("action_"):
            doc["action"][key[7:]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def test_valid_message_decodes():
    a = decode_activation(message(), Config())
    assert isinstance(a, Activation)
    assert a.action.image == "invoker-action-python:latest"
    assert a.action.limits.timeout_ms == 1000 and a.action.limits.memory_mb == 128
    assert a.params == {"name": "x"} and a.blocking and a.submitted_at_ms == 1764290000000


def test_missing_limits_take_defaults():
    cfg = Config(default_timeout_ms=5000, default_memory_mb=192)
    a = decode_activation(message(action_limits=None), cfg)
    assert (a.action.limits.timeout_ms, a.action.limits.memory_mb) == (5000, 192)
    assert a.action.limits.logs_kb == cfg.default_logs_kb


def test_explicit_image_is_blackbox():
    a = decode_activation(message(action_image="my/image:1", action_kind=None,
                                  action_code=None), Config())
    assert a.action.blackbox and a.action.image == "my/image:1" and a.action.kind == "blackbox"


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (message(activationId="xyz"), "activationId"),
    (message(activationId=None), "activationId"),
    (message(namespace="a/b"), "namespace"),
    (message(action="hello"), "action must be an object"),
    (message(action_name=""), "name"),
    (message(params=[1]), "params"),
    (message(blocking="yes"), "blocking"),
])
def test_malformed_messages_are_dead_letter_material(raw, reason):
    with pytest.raises(InvalidMessage, match=reason):
        decode_activation(raw, Config())


def test_oversized_message_is_rejected_before_parsing():
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode_activation(b" " * 2048, Config(max_message_bytes=1024))


@pytest.mark.parametrize("limits, text", [
    ({"timeout": 10}, "timeout limit 10"),
    ({"memory": 100000}, "memory limit 100000"),
    ({"concurrency": 0}, "concurrency limit 0"),
    ({"logs": "ten"}, "logs must be an integer"),
])
def test_out_of_range_limits_become_error_records(limits, text):
    r = decode_activation(message(action_limits=limits), Config())
    assert isinstance(r, Rejection)
    assert r.status is Status.DEVELOPER_ERROR and text in r.message
    assert r.activation_id == AID and r.namespace == "guest"


def test_unknown_kind_is_rejected_with_known_kinds():
    r = decode_activation(message(action_kind="cobol:85"), Config())
    assert isinstance(r, Rejection) and "cobol:85" in r.message and "python:3" in r.message


def test_rejection_keeps_blocking_so_the_caller_gets_the_error_result():
    assert decode_activation(message(action_kind="cobol:85"), Config()).blocking
    assert not decode_activation(message(action_kind="cobol:85", blocking=False),
                                 Config()).blocking
