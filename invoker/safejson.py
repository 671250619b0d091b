"""JSON from untrusted sources (feed messages, action results, overflow envelopes), and JSON for
Kafka and the stores. Pure functions; nothing here blocks beyond its own CPU time.

:func:`loads` turns everything a parser raises on hostile input into one exception,
:class:`JsonRejected`, so a caller has one thing to catch and never dies of a message:

- invalid UTF-8, and UTF-8 starting with a byte order mark (RFC 8259: JSON between systems is
  UTF-8 without one; the parser would otherwise sniff UTF-16/32 from the bytes);
- syntax errors;
- nesting deeper than ``max_depth`` (arrays and objects both count; a scalar is depth 0, ``[]``
  depth 1). Refused by a scan of the bytes before parsing, so the parser never recurses deeper
  than the cap (without it, ``b"[" * 100000`` raised RecursionError from inside the parser);
- ``NaN``, ``Infinity``, ``-Infinity`` (Python's extension, not JSON), and numbers that only
  Python's parser would turn into ``inf`` (``1e400``);
- integer literals longer than the interpreter converts (``sys.get_int_max_str_digits()``,
  4300 digits by default: the parser raises ValueError);
- lone surrogate escapes (``"\\ud800"`` without its pair). Decided here rather than at encoding
  time: such a string cannot be written as UTF-8, which Kafka messages and the stores use, so it
  is refused at the door with a clear reason instead of failing later in a record or completion.

MemoryError is not caught: it says the process, not the input, is in trouble.

Cost of the depth scan (measured on this project's 2-core machine, CPython 3.11, best of 7):
nothing beyond two ``bytes.count`` calls when a message has no more ``[``/``{`` than
``max_depth`` (most messages); otherwise, for 1 MiB of input, 5-13 ms for ordinary shapes (a big
code string, 45,000 small objects, strings full of brackets and escapes) against 5-60 ms to
parse the same bytes, and ~50 ms in the worst case (1 MiB of brackets nested 64 deep, which
takes ~310 ms to parse).
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
import sys
from array import array
from itertools import accumulate
from typing import Any, NoReturn

import orjson

QUOTE_CHARS = 100  # of the input an error text quotes at most

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_NESTING_SIGNS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as signed bytes
_STRING = re.compile(rb'"[^"]*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class JsonRejected(ValueError):
    """The input is not JSON this service takes; ``str(exc)`` says why (never more than
    ``QUOTE_CHARS`` characters of the input). ``syntax`` is True when the input is not JSON
    text at all (bad UTF-8, byte order mark, syntax error), False when it is refused by one of
    this module's rules (depth, NaN/Infinity, number range, lone surrogate)."""

    def __init__(self, reason: str, *, syntax: bool) -> None:
        super().__init__(reason)
        self.syntax = syntax


class _Refused(ValueError):
    """Raised inside the parser's hooks; becomes JsonRejected."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {quote(text)} is out of range")
    return value


# Checking every float costs a Python call per number (it doubles the time to parse 1 MiB of
# floats), so it is done only when one may be out of range: a literal reaches 1.8e308 only with
# an exponent of 3 digits or more, or with 210 digits or more before its point.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_FINITE_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)
_NUMBER_SHAPE = bytes.maketrans(b"0123456789eE+-", b"0000000000ee++")
# orjson reads an integer beyond 64 bits (-9223372036854775809 has 19 digits) as a float.
_LONG_DIGITS = b"0" * 19


def loads(raw: bytes | str, max_depth: int) -> Any:
    """Parse ``raw`` (UTF-8 bytes, or text) as JSON nested at most ``max_depth`` deep.

    Raises :class:`JsonRejected` for anything it will not take (see the module docstring);
    MemoryError passes through.

    Bytes within the depth cap go to orjson (it parses an activation message ~4 times faster
    than the standard parser, 5.3 -> 2.4 us with this module's checks; it refuses lone
    surrogate escapes, NaN and numbers out of range as this module does) unless they hold a run
    of 19 digits or more (orjson reads an integer beyond 64 bits as a float). What orjson
    refuses goes the standard way, so the reasons given are always the standard path's; a
    property test holds the two paths to the same answers.
    """
    if not isinstance(raw, bytes):
        return _loads_standard(raw, max_depth)
    too_deep = _too_deep(raw, max_depth)
    shape = raw.translate(_NUMBER_SHAPE)
    if not too_deep and _LONG_DIGITS not in shape:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard parser says why
    return _loads_standard(raw, max_depth, scanned=(too_deep, shape))


def _too_deep(data: bytes, max_depth: int) -> bool:
    if data.count(b"[") + data.count(b"{") <= max_depth:  # else it cannot be deeper
        return False
    return nesting_depth(data) > max_depth


def _loads_standard(raw: bytes | str, max_depth: int, *,
                    scanned: tuple[bool, bytes] | None = None) -> Any:
    """:func:`loads` with the standard library's parser. ``scanned``: what :func:`loads` found
    of ``raw`` already, :func:`_too_deep` and its number shape (the depth scan of 1 MiB can take
    50 ms, and whatever orjson refused would otherwise be scanned twice)."""
    if isinstance(raw, str):
        text = raw
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonRejected("text holds a lone surrogate", syntax=False) from None
    else:
        data = raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                               syntax=True) from None
    if text.startswith("\ufeff"):
        raise JsonRejected("starts with a byte order mark (JSON is UTF-8 without one)",
                           syntax=True)
    too_deep, shape = scanned or (_too_deep(data, max_depth), data.translate(_NUMBER_SHAPE))
    if too_deep:
        raise JsonRejected(f"nested deeper than {max_depth} levels", syntax=False)
    if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(data):
        raise JsonRejected("holds a lone surrogate escape (\\ud800-\\udfff without its pair)",
                           syntax=False)
    may_overflow = b"e000" in shape or b"e+000" in shape or b"0" * 200 in shape
    try:
        return (_FINITE_DECODER if may_overflow else _DECODER).decode(text)
    except json.JSONDecodeError as exc:
        raise JsonRejected(f"not valid JSON: {exc}", syntax=True) from None
    except _Refused as exc:
        raise JsonRejected(str(exc), syntax=False) from None
    except (ValueError, OverflowError):  # int() of a literal longer than the interpreter takes
        raise JsonRejected("an integer has more than "
                           f"{sys.get_int_max_str_digits()} digits", syntax=False) from None
    except RecursionError:  # only if the scan was fooled by invalid input; belt and braces
        raise JsonRejected("nested too deeply", syntax=False) from None


def nesting_depth(data: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``data`` (brackets inside strings do
    not count). Exact for valid JSON; for invalid input some number the parser will refuse
    anyway. C-speed bytes operations only, no Python loop over the input."""
    if b"\\" in data:
        # Drop escaped backslashes first (left to right, as escapes pair up), then escaped
        # quotes: every quote left delimits a string.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Keep quotes and brackets only. Removing two adjacent quotes keeps every other quote's
    # parity and every bracket's inside/outside, and drops most strings at once.
    skeleton = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = _STRING.sub(b"", skeleton)  # strings that hold brackets
    return max(accumulate(array("b", skeleton.translate(_NESTING_SIGNS))), default=0)


def _has_lone_surrogate(data: bytes) -> bool:
    # An escaped backslash followed by "ud800" is text, not an escape. Replaced, not deleted:
    # deleting it would make a pair of the escapes on either side of it.
    data = data.replace(b"\\\\", b"..")
    return _SURROGATE_ESCAPE.search(_SURROGATE_PAIR.sub(b"", data)) is not None


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (not ASCII-escaped), as Kafka messages carry it.

    Raises ValueError for NaN or an infinite float, an integer longer than the interpreter
    prints, UnicodeEncodeError (a ValueError) for a string holding a lone surrogate, TypeError
    for a value of no JSON type, RecursionError for nesting beyond the interpreter's recursion
    limit. A value made of what :func:`loads` returned, plus ordinary str/int/bool/dict/list,
    raises none of them.

    :func:`dumps_decoded` encodes (orjson; what orjson refuses, the standard encoder). Output
    that holds a ``null`` (orjson writes NaN and the infinities so) is encoded by the standard
    encoder too, but only to raise as it does: the answer stays orjson's, so that a value
    encoded again (a record in an overflow envelope, read back by the recorder) comes out in
    the same bytes. The two write the same JSON but for floats' notation (orjson ``3.2e-7`` and
    ``0.000032``, the standard ``3.2e-07`` and ``3.2e-05``); orjson also writes enum members
    and UUIDs by value, which the standard refused.
    """
    data = dumps_decoded(value)
    if b"null" in data:
        _dumps_standard(value)  # raises for NaN and the infinities
    return data


def dumps_decoded(value: Any) -> bytes:
    """:func:`dumps` of a value :func:`loads` returned (an action's answer, a message's params),
    or one made of such values: it holds no NaN or infinity, so a ``null`` orjson writes is a
    null and needs no second encoding (results often hold one). Raises as :func:`dumps`.

    orjson encodes (a record's members 2-3.5 times faster than the standard encoder, the copy
    of its output included); what it refuses (an integer beyond 64 bits, a lone surrogate, a
    key that is no str, a subclass...) the standard encoder encodes, or refuses."""
    try:
        data = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        return _dumps_standard(value)
    # A copy of its exact size: orjson's bytes keep the buffer it wrote into, 4 KiB at least
    # (100,000 records of 84 bytes took 393 MiB), and tracemalloc counts what it reserved.
    return bytes(memoryview(data))


# Holds the place of the JSON dumps_splicing writes in: one NUL byte, which orjson writes nowhere
# else (it escapes control characters in strings and keys), so it marks that place alone.
SPLICE = orjson.Fragment(b"\x00")


def dumps_splicing(value: Any, raw: bytes) -> tuple[bytes, int] | None:
    """:func:`dumps` of ``value`` with ``raw`` (JSON already encoded, copied as it is) where
    ``value`` holds :data:`SPLICE` (once), and where ``raw`` begins in the answer: a record
    around a result its action answered, in one encoding instead of one per part. None where
    orjson refuses ``value`` (see :func:`dumps_decoded`), or where its answer holds no NUL or
    more than one (no SPLICE, or another NUL fragment): the caller encodes it otherwise.
    Raises as :func:`dumps` for what orjson takes: ValueError for NaN and the infinities,
    TypeError for what only orjson writes (enum members, UUIDs) in an answer holding a
    ``null``."""
    try:
        marked = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        return None
    if b"null" in marked:  # NaN or an infinity, or a null: the standard encoder tells which
        json.dumps(value, allow_nan=False, default=_splice_as_null)
    at = marked.find(b"\x00")
    if at < 0 or marked.rfind(b"\x00") != at:
        return None
    return b"".join((marked[:at], raw, marked[at + 1:])), at


def _splice_as_null(value: Any) -> None:
    if value is not SPLICE:
        _not_json(value)


# Subclasses of str/int/dict/list, dataclasses and datetimes go to the standard encoder, as
# orjson would otherwise write what the standard refuses or writes differently.
_ORJSON_OPTIONS = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME)


def _dumps_standard(value: Any) -> bytes:
    """:func:`dumps` with the standard library's encoder: the reference for what is refused
    and how."""
    if _encode_chunks is None:  # an interpreter without the C encoder
        return json.dumps(value, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")
    return "".join(_encode_chunks(value, 0)).encode("utf-8")


def dumps_escaped(value: Any) -> bytes:
    """``value`` as compact JSON with every non-ASCII character escaped: for a value whose
    strings may hold a lone surrogate (a record read back from a store), which :func:`dumps`
    refuses because UTF-8 cannot hold it. Raises as :func:`dumps` does otherwise."""
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode("ascii")


def _not_json(value: Any) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# CPython's C encoder with json.dumps(ensure_ascii=False, allow_nan=False, separators=(",",
# ":")) settings, made once: json.dumps makes one (and closures) on every call, which takes
# about twice as long as encoding a small record's parts. No circular-reference markers: a
# value that contains itself recurses until RecursionError (decoded JSON never does).
_encode_chunks = (None if json.encoder.c_make_encoder is None  # type: ignore[attr-defined]
                  else json.encoder.c_make_encoder(  # type: ignore[attr-defined]
                      None, _not_json, json.encoder.encode_basestring, None, ":", ",", False,
                      False, False))


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` for an error text or a log line: a string quoted (``repr``, so control
    characters, quotes and surrogates come out escaped) and cut to ``limit`` characters with
    its full length said; a number, boolean or null as JSON, cut the same way; an array or
    object by its type only (rendering a large one just to cut it would cost)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if value is None or isinstance(value, bool | int | float):
        try:
            text = json.dumps(value)
        except ValueError:  # an int longer than the interpreter prints
            return "a number too long to print"
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    return f"a {type(value).__name__}"
