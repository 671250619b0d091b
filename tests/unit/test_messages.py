import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoker.config import Config
from invoker.messages import MAX_EPOCH_MS, InvalidMessage, Rejection, decode_activation
from invoker.model import Activation, RawJson, Status
from invoker.safejson import QUOTE_CHARS

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
    assert a.params == RawJson(b'{"name":"x"}')
    assert a.blocking and a.submitted_at_ms == 1764290000000


def test_params_are_kept_encoded_and_bounded_as_encoded():
    # Held as Python objects, [{}, {}, ...] takes ~25 times its size: params stay bytes.
    a = decode_activation(message(params={"l": [{}] * 1000}), Config())
    assert isinstance(a, Activation) and a.params == RawJson(b'{"l":[' + b",".join(
        [b"{}"] * 1000) + b"]}")
    # Re-encoding may grow numbers (9e15 -> 9000000000000000.0); past the bound: refused.
    config = Config(max_message_bytes=4000)
    raw = b'{"l":[' + b",".join([b"9e15"] * 500) + b"]}"
    grown = message(params={"l": 1}).replace(b'{"l": 1}', raw)
    assert len(grown) < 4000
    rejection = decode_activation(grown, config)
    assert isinstance(rejection, Rejection) and rejection.status is Status.DEVELOPER_ERROR
    assert "params take" in rejection.message


def test_missing_limits_take_defaults():
    cfg = Config(default_timeout_ms=5000, default_memory_mb=192)
    a = decode_activation(message(action_limits=None), cfg)
    assert (a.action.limits.timeout_ms, a.action.limits.memory_mb) == (5000, 192)
    assert a.action.limits.logs_kb == cfg.default_logs_kb


def test_explicit_image_is_blackbox_when_allowed():
    a = decode_activation(message(action_image="my/image:1", action_kind=None,
                                  action_code=None), Config(blackbox_images=["my/*"]))
    assert a.action.blackbox and a.action.image == "my/image:1" and a.action.kind == "blackbox"


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid UTF-8"),
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


def reason(raw: bytes, config: Config | None = None) -> str:
    with pytest.raises(InvalidMessage) as info:
        decode_activation(raw, config or Config())
    return str(info.value)


def rejection(raw: bytes, config: Config | None = None) -> str:
    r = decode_activation(raw, config or Config())
    assert isinstance(r, Rejection) and r.status is Status.DEVELOPER_ERROR, r
    return r.message


@pytest.mark.parametrize("raw, text", [
    (b"[" * 100_000, "nested deeper than 65 levels"),
    (message(params={"n": 1}).replace(b'"n": 1', b'"n": ' + b"7" * 5000), "4300 digits"),
    (message(params={"x": float("nan")}), "NaN is not a JSON number"),
    (message(params={"x": 1}).replace(b'"x"', b'"\\ud800"'), "lone surrogate"),
    (message(params={"s": "abc"}).replace(b"abc", b"a\xffc"), "not valid UTF-8"),
])
def test_hostile_json_is_dead_letter_material(raw, text):
    assert text in reason(raw)


def deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_params_may_nest_max_json_depth_deep():
    config = Config(max_json_depth=10)
    decoded = decode_activation(message(params=deep(10)), config)
    assert isinstance(decoded, Activation)
    assert json.loads(decoded.params.data) == deep(10)
    assert "nested deeper than 11" in reason(message(params=deep(11)), config)


@pytest.mark.parametrize("overrides, text", [
    ({"namespace": "guest\n"}, "invalid namespace 'guest\\n'"),
    ({"namespace": "_guest"}, "invalid namespace"),
    ({"namespace": ".."}, "invalid namespace"),
    ({"namespace": "guest "}, "invalid namespace"),
    ({"namespace": "g" * 257}, "invalid namespace"),
    ({"action_name": "hello\n"}, "invalid action name"),
    ({"action_name": "_hello"}, "invalid action name"),
    ({"action_name": "a/b"}, "invalid action name"),
    ({"action_version": "1" * 33}, "invalid action version"),
    ({"action_version": "1.0 beta"}, "invalid action version"),
    ({"action_version": 1}, "version must be of type str"),
    ({"action_kind": "k" * 65}, "invalid action kind"),
    ({"action_kind": "Python:3"}, "invalid action kind"),
    ({"action_kind": "python:3\n"}, "invalid action kind"),
    ({"transid": "t" * 129}, "invalid transid"),
    ({"transid": "t\u00e9"}, "invalid transid"),
    ({"transid": "t\r\nx"}, "invalid transid"),
    ({"submittedAt": -1}, "submittedAt must be epoch milliseconds"),
    ({"submittedAt": MAX_EPOCH_MS + 1}, "submittedAt must be epoch milliseconds"),
    ({"submittedAt": 10**400}, "submittedAt must be epoch milliseconds"),
    ({"submittedAt": 1.5}, "submittedAt must be of type int"),
    ({"submittedAt": True}, "submittedAt must be of type int"),
    ({"activationId": "0123456789ABCDEF0123456789abcdef"}, "activationId"),
    ({"activationId": "0123456789abcdef0123456789abcdef\n"}, "activationId"),
])
def test_identity_fields_are_bounded_and_fully_matched(overrides, text):
    assert text in reason(message(**overrides))


@pytest.mark.parametrize("overrides", [
    {"namespace": "g" * 256}, {"namespace": "a b@c.d-e_f"}, {"action_name": "9lives"},
    {"action_version": "1.2.3-rc.1+build_5"}, {"action_kind": "python:3"},
    {"transid": "~" * 128}, {"transid": None}, {"submittedAt": 0},
    {"submittedAt": MAX_EPOCH_MS}, {"action_main": "com.example.Main#run"},
    {"action_main": "Apache.Example::Apache.Example.Hello::Main"},
])
def test_values_at_the_bounds_are_accepted(overrides):
    assert isinstance(decode_activation(message(**overrides), Config()), Activation)


@pytest.mark.parametrize("overrides, text", [
    ({"action_main": "my-main"}, "Invalid main 'my-main'"),
    ({"action_main": "m" * 129}, "Invalid main"),
    ({"action_main": "1main"}, "Invalid main"),
    ({"action_image": "-rm", "action_kind": None}, "Invalid image '-rm'"),
    ({"action_image": "my image", "action_kind": None}, "Invalid image"),
    ({"action_image": "a" * 257, "action_kind": None}, "Invalid image"),
])
def test_runnability_fields_are_bounded_and_give_error_records(overrides, text):
    assert text in rejection(message(**overrides), Config(blackbox_images=["*"]))


def test_error_texts_quote_at_most_about_100_characters_of_the_input():
    long = "x" * 10_000
    for raw in [message(namespace="_" + long), message(action_name="_" + long),
                message(action_version=long), message(transid=long)]:
        text = reason(raw)
        assert "(10001 characters)" in text or "(10000 characters)" in text
        assert len(text) < QUOTE_CHARS + 250 and long not in text
    text = rejection(message(action_main=long))
    assert "(10000 characters)" in text and len(text) < QUOTE_CHARS + 250
    text = rejection(message(action_limits={"timeout": long}))
    assert "(10000 characters)" in text and len(text) < QUOTE_CHARS + 250
    text = rejection(message(action_limits={"memory": [long] * 10}))
    assert "got an array" in text


def test_blackbox_is_off_when_the_allow_list_is_empty():
    text = rejection(message(action_image="evil/miner:1", action_kind=None, action_code=None))
    assert text == ("Blackbox image 'evil/miner:1' is not allowed: blackbox actions are disabled "
                    "on this invoker (blackbox_images is empty).")


def test_blackbox_image_must_match_a_pattern():
    config = Config(blackbox_images=["registry.local/actions/*", "tools:1.?"])
    text = rejection(message(action_image="evil/miner:1", action_kind=None), config)
    assert text == ("Blackbox image 'evil/miner:1' is not allowed: it does not match any of "
                    "blackbox_images (registry.local/actions/*, tools:1.?).")
    for image in ["registry.local/actions/a:2", "registry.local/actions/x/y@sha256:ab",
                  "tools:1.5"]:
        a = decode_activation(message(action_image=image, action_kind=None, action_code=None),
                              config)
        assert isinstance(a, Activation) and a.action.blackbox and a.action.image == image
    for image in ["Registry.local/actions/a", "tools:1.55", "registry.local/other/a"]:
        assert "does not match" in rejection(message(action_image=image), config)


def test_a_refused_blackbox_keeps_its_kind_and_blocking():
    r = decode_activation(message(action_image="x/y", action_kind=None, blocking=True), Config())
    assert isinstance(r, Rejection) and r.kind == "blackbox" and r.blocking


_VALID = json.loads(message())
_FIELDS = ["activationId", "namespace", "action", "params", "blocking", "transid",
           "submittedAt", "action.name", "action.version", "action.kind", "action.image",
           "action.code", "action.main", "action.binary", "action.limits",
           "action.limits.timeout", "action.limits.memory"]
_HOSTILE_VALUES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                   | st.text(max_size=300) | st.lists(st.integers(), max_size=3)
                   | st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(_FIELDS), _HOSTILE_VALUES)
def test_any_value_in_any_field_gives_one_of_the_three_outcomes(field, value):
    doc = json.loads(json.dumps(_VALID))
    *path, key = field.split(".")
    target = doc
    for part in path:
        target = target[part]
    target[key] = value
    try:
        outcome = decode_activation(json.dumps(doc).encode(), Config(blackbox_images=["*"]))
    except InvalidMessage as exc:
        assert len(str(exc)) < QUOTE_CHARS + 250
        return
    assert isinstance(outcome, Activation | Rejection)
    if isinstance(outcome, Rejection):
        assert len(outcome.message) < QUOTE_CHARS + 250
