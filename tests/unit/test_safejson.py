import json
import sys

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from invoker.safejson import (
    QUOTE_CHARS,
    SPLICE,
    JsonRejected,
    _dumps_standard,
    _loads_standard,
    dumps,
    dumps_decoded,
    dumps_splicing,
    loads,
    nesting_depth,
    quote,
)
from tests.support.memory import traced


def nested(depth: int, opener: str = "[", closer: str = "]", inner: str = "1") -> bytes:
    return (opener * depth + inner + closer * depth).encode()


def nested_objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


def rejected(raw, max_depth: int = 64) -> JsonRejected:
    with pytest.raises(JsonRejected) as info:
        loads(raw, max_depth)
    return info.value


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000,
                                 b"[" * 100_000 + b"]" * 100_000, nested(10_000),
                                 nested_objects(10_000)])
def test_deep_nesting_is_refused_before_the_parser_recurses(raw):
    exc = rejected(raw)
    assert str(exc) == "nested deeper than 64 levels" and not exc.syntax


def nested_mixed(depth: int) -> bytes:
    odd = depth % 2
    return ('[{"a":' * (depth // 2) + "[" * odd + "1" + "]" * odd + "}]" * (depth // 2)).encode()


@pytest.mark.parametrize("make", [nested, nested_objects, nested_mixed])
def test_depth_exactly_at_the_cap_is_accepted_one_more_refused(make):
    assert loads(make(64), 64) is not None
    assert "nested deeper than 64" in str(rejected(make(65)))


def test_scalars_are_depth_zero_and_empty_containers_count():
    assert loads(b"1", 0) == 1 and loads(b'"x"', 0) == "x"
    assert loads(b"[]", 1) == [] and "deeper than 0" in str(rejected(b"{}", 0))


def test_brackets_and_escapes_inside_strings_do_not_count():
    text = json.dumps({"s": "[" * 1000 + '\\"{{{' + "\\" * 7, "t": ['"]]]"']})
    assert loads(text.encode(), 2)["s"].startswith("[[[")
    assert nesting_depth(text.encode()) == 2


@pytest.mark.parametrize("raw, reason", [
    (b'{"n":' + b"1" * 5000 + b"}", "more than 4300 digits"),
    (b'{"x": NaN}', "NaN is not a JSON number"),
    (b"[Infinity]", "Infinity is not a JSON number"),
    (b"[-Infinity]", "-Infinity is not a JSON number"),
    (b"[1e400]", "number '1e400' is out of range"),
    (b"[-1" + b"0" * 400 + b".5]", "is out of range"),
    (b"[1.8e308]", "is out of range"),
    (b"[1E+0400]", "is out of range"),
    (b"[" + b"9" * 210 + b"e99]", "is out of range"),
    (b"[" + b"9" * 309 + b".0]", "is out of range"),
    (b'"\\ud800"', "lone surrogate"),
    (b'"\\uDC00"', "lone surrogate"),
    (b'"\\udc00\\ud800"', "lone surrogate"),
    (b'"\\ud83d x"', "lone surrogate"),
    (b'"\\\\\\ud800"', "lone surrogate"),  # an escaped backslash, then the escape
    (b'"\\ud83d\\\\\\ude00"', "lone surrogate"),  # the two halves apart: no pair
])
def test_values_only_python_would_take_are_refused_by_rule(raw, reason):
    exc = rejected(raw)
    assert reason in str(exc) and not exc.syntax


def test_numbers_and_escapes_within_range_are_accepted():
    assert loads(b"[" + b"9" * 4300 + b"]", 1) == [int("9" * 4300)]
    assert loads(b"[1e308, -0.0, 1e-400, 1.7976931348623157e308]", 1) == [
        1e308, -0.0, 0.0, 1.7976931348623157e308]
    assert loads(b"[" + b"9" * 199 + b"e99]", 1) == [float("9" * 199 + "e99")]
    assert loads(b'"\\ud83d\\ude00"', 0) == "\U0001f600"
    assert loads(b'"\\\\ud800"', 0) == "\\ud800"  # a backslash and text, not an escape


@pytest.mark.parametrize("raw, reason", [
    (b'{"a": "\xff"}', "not valid UTF-8"),
    (b'"\xed\xa0\x80"', "not valid UTF-8"),  # a surrogate encoded in UTF-8
    (b'"\xc0\xaf"', "not valid UTF-8"),  # overlong
    (b"\xef\xbb\xbf{}", "byte order mark"),
    ('{"a":1}'.encode("utf-16"), "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1] [2]", "not valid JSON"),
])
def test_text_that_is_not_utf8_json_is_a_syntax_rejection(raw, reason):
    exc = rejected(raw)
    assert reason in str(exc) and exc.syntax


def test_text_input():
    assert loads('{"a": "\u00e9"}', 1) == {"a": "\u00e9"}
    assert "lone surrogate" in str(rejected('"\ud800"'))


def test_huge_strings_within_the_size_are_fine():
    big = "\u6f22" * 300_000 + "x" * 100_000
    assert loads(json.dumps({"s": big}).encode(), 1) == {"s": big}
    assert loads(json.dumps({"s": big}, ensure_ascii=False).encode(), 1) == {"s": big}


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('[]{}"\\/ax\u00e9\U0001f600\n')), max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY_TEXT,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(_TRICKY_TEXT, children, max_size=4),
    max_leaves=20)


@settings(max_examples=100, deadline=None, database=None)
@given(_JSON, st.booleans())
def test_scan_depth_equals_the_parsed_depth(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(raw) == _depth(value)
    depth = _depth(value)
    assert loads(raw, depth) == value
    if depth:
        assert "nested deeper" in str(rejected(raw, depth - 1))


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=200)
       | st.text(alphabet=st.sampled_from(list('[]{}":,\\ud80e1-+.0NaInfty ')),
                 max_size=200).map(str.encode))
def test_any_bytes_either_parse_or_are_rejected(raw):
    try:
        loads(raw, 8)
    except JsonRejected:
        pass


def _outcome(parse, raw: bytes):
    try:
        value = parse(raw)
    except JsonRejected as exc:
        return "rejected", str(exc), exc.syntax
    return "parsed", repr(value)  # repr tells 1 from 1.0 and -0.0 from 0.0


_NUMBERS = st.sampled_from(["0", "-0", "-0.0", "1e400", "-1e400", "1e-400", "1.5e308",
                            "18446744073709551615", "18446744073709551616",
                            "-9223372036854775808", "-9223372036854775809", "9" * 19,
                            "12345678901234567890.5", "0.1e1", "01", "1.", "2.5E+3"])
_ESCAPES = st.sampled_from(["\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u0000",
                            "\\ud800\\u0041", "\\\\ud800", "\\x", "\\/"])


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.sampled_from(list('[]{}":, 1aeE+-.\\')) | _NUMBERS | _ESCAPES
                | st.sampled_from(["NaN", "Infinity", "true", "nul", "\x01", "\ufeff", "\xe9"]),
                max_size=24).map("".join),
       st.sampled_from([b"", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\xff"]), st.integers(0, 4))
@example("[" * 10, b"\xff", 0)  # too deep and not UTF-8: the same reason either way
@example("[" * 10, b"\xef\xbb\xbf", 0)
def test_orjson_and_the_standard_parser_give_the_same_answers(text, odd_bytes, at):
    """loads parses with orjson where it may and the standard parser otherwise: whichever it
    takes, the answer (value or reason) is the standard path's."""
    raw = text.encode("utf-8", "surrogatepass")
    raw = raw[:at] + odd_bytes + raw[at:]
    assert _outcome(lambda r: loads(r, 4), raw) == _outcome(lambda r: _loads_standard(r, 4), raw)


@settings(max_examples=200, deadline=None, database=None)
@given(_JSON)
def test_orjson_and_the_standard_parser_agree_on_json(value):
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert _outcome(lambda r: loads(r, 64), raw) == _outcome(lambda r: _loads_standard(r, 64), raw)


@settings(max_examples=300, deadline=None, database=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                    | st.sampled_from(["a\ud800", 10**30, -(2**63) - 1, 2**64]),
                    lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=3),
                    max_leaves=12))
@example({"x": [float("nan")]})
@example([1, float("-inf")])
@example({"null": "null"})
def test_dumps_writes_or_refuses_as_the_standard_encoder(value):
    """Same value back, or the same error (orjson's NaN-as-null goes the standard way)."""
    try:
        expected = json.loads(_dumps_standard(value))
    except (TypeError, ValueError, RecursionError) as exc:
        with pytest.raises(type(exc)):
            dumps(value)
        return
    assert json.loads(dumps(value)) == expected


@settings(max_examples=200, deadline=None, database=None)
@given(_JSON)
@example({"n": None, "big": 10**30, "neg": -(2**63) - 1, "f": 1e15})
@example({"n": None, "small": [3.2e-07, 3.2e-05, 1e-5, 1e16]})
def test_dumps_decoded_writes_what_dumps_writes_for_what_loads_returned(value):
    """Byte for byte: a value encoded by one and again by the other (a record in an overflow
    envelope, encoded again by the recorder) keeps its size."""
    decoded = loads(json.dumps(value, ensure_ascii=False).encode(), 64)
    assert dumps_decoded(decoded) == dumps(decoded)
    assert json.loads(dumps(decoded)) == value


@settings(max_examples=200, deadline=None, database=None)
@given(_JSON, _JSON, st.lists(_TRICKY_TEXT | st.just("\x00"), max_size=3))
@example({"a": "\x00", "\x00": [0]}, "\x00", ["\x00"])
def test_dumps_splicing_writes_what_dumps_writes_with_the_spliced_json_in_place(
        around, inner, path):
    """Wherever SPLICE sits (keys and strings holding NUL bytes included), the answer is the
    bytes of encoding the whole, and it says where the spliced JSON lies in them."""
    raw = dumps(inner)
    value, whole = SPLICE, inner
    for key in path:
        value, whole = {key: value, "around": around}, {key: whole, "around": around}
    spliced = dumps_splicing(value, raw)
    if spliced is None:  # left to the caller: only what orjson refuses (integers beyond 64 bits)
        with pytest.raises(TypeError):
            orjson.dumps(whole)
        return
    data, start = spliced
    assert data == dumps(whole)
    assert data[start:start + len(raw)] == raw


def test_dumps_splicing_refuses_as_dumps_or_leaves_it_to_the_caller():
    with pytest.raises(ValueError):
        dumps_splicing({"x": float("nan"), "r": SPLICE}, b"1")
    assert dumps_splicing({"n": None, "r": SPLICE}, b"[]") == (b'{"n":null,"r":[]}', 14)
    # what orjson refuses: the caller encodes it otherwise (and learns why from dumps)
    for refused in ({"big": 2**64, "r": SPLICE}, {1: "int key", "r": SPLICE},
                    {"s": "a\ud800", "r": SPLICE}, {"f": orjson.Fragment(b"\x00"), "r": SPLICE}):
        assert dumps_splicing(refused, b"{}") is None
    assert dumps_splicing({"no": "splice"}, b"{}") is None


def test_dumps_is_compact_utf8_and_refuses_what_utf8_json_cannot_hold():
    assert dumps({"a": ["\u6f22", 1.5, None]}) == '{"a":["\u6f22",1.5,null]}'.encode()
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})
    with pytest.raises(UnicodeEncodeError):
        dumps({"x": "\ud800"})
    value = loads(b'{"s": "\\ud83d\\ude00\\u0000\\"", "n": [1, 2.5e10]}', 2)
    assert loads(dumps(value), 2) == value


def test_quote_bounds_what_it_shows():
    assert quote("abc") == "'abc'"
    cut = quote("y" * 10_000)
    assert cut == repr("y" * QUOTE_CHARS) + "... (10000 characters)"
    assert quote("a\nb\x00\ud800") == repr("a\nb\x00\ud800")  # escaped, encodable
    assert quote([1] * 10**6) == "an array" and quote({"a": 1}) == "an object"
    assert quote(None) == "null" and quote(True) == "true" and quote(12) == "12"
    assert quote(10**400).endswith("... (401 characters)")
    assert len(quote(10**400)) < QUOTE_CHARS + 30
    limit = sys.get_int_max_str_digits()
    assert quote(10 ** (limit + 10)) == "a number too long to print"


@pytest.mark.parametrize("unit", [b"{}", b"[]", b'{"":0}', b'{"":{"":{}}}', b"[1.5]",
                                  b'{"":' * 40 + b"{}" + b"}" * 40, b"[" * 62 + b"]" * 62])
@pytest.mark.parametrize("tail", [b"", "\U0001f600".encode(), b"1" * 19],
                         ids=["ascii", "an emoji", "19 digits"])
@pytest.mark.parametrize("parse", [loads, _loads_standard], ids=["loads", "standard"])
def test_a_parse_takes_at_most_its_stated_multiple_of_the_text(unit, tail, parse):
    """PARSED_JSON_FACTOR, which the worst-case bound charges one parse at a time, holds for
    the shapes that cost most per byte (tracemalloc's peak during the parse), on either path
    (19 digits send loads the standard way; one emoji makes the strings 4 bytes a character)."""
    from invoker.config import PARSED_JSON_FACTOR

    members = b",".join([unit] * (200_000 // len(unit)))
    number = tail if tail.isdigit() else b"0"
    text = b'{"a":[' + members + b'],"t":"' + tail + b'","n":' + number + b"}"
    value, _, peak = traced(lambda: parse(text, 64))
    assert value["a"] and peak <= PARSED_JSON_FACTOR * len(text)
