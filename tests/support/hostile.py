"""Hostile feed messages for the fuzz test (``tests/integration/test_fuzz.py``).

:class:`HostileCorpus` builds, from one seed, a shuffled list of :class:`FuzzMessage`: valid
activation messages (``invoker.loadgen.activation_message``) and hostile ones. A hostile message
is either a valid message with exactly one part broken (so a failure names the field) or bytes
that are no activation at all. Every message carries the outcomes that are acceptable for it,
so the test can account for each one:

- ``DEAD_LETTER``: its bytes are on the dead-letter topic (found by ``dlq.partition`` and
  ``dlq.offset``);
- ``status(n)``: the store has a record with status code ``n`` under its activation id;
- ``RECORD_DEAD_LETTER``: its record was dead-lettered (``dlq.kind: record``).

A message whose activation id or namespace is invalid can only be dead-lettered; an
identifiable one (valid id and namespace) may instead get an error record.

Why a seeded ``random.Random`` and not hypothesis: hypothesis draws, runs and shrinks one example
per property call, which needs a cheap, repeatable property; here one daemon takes the whole
corpus in one go (a property run per message would start a daemon per message), and
``strategy.example()`` is meant for interactive use only. A seeded generator gives the same
corpus for the same seed, so a failure reproduces exactly; each class below cycles through all
its variants before repeating one, so every variant is covered at any count.

Nothing here does I/O.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from invoker.loadgen import activation_message

DEAD_LETTER = "dead-lettered"
RECORD_DEAD_LETTER = "record dead-lettered"


def status(code: int) -> str:
    """The outcome "stored with status code ``code``"."""
    return f"status {code}"


ONLY_DEAD_LETTER = frozenset({DEAD_LETTER})
# Refused: parked as it came, or an error record saying why (action developer error).
REFUSED = frozenset({DEAD_LETTER, status(2)})
ANY = frozenset({DEAD_LETTER, RECORD_DEAD_LETTER, *(status(c) for c in range(4))})
SUCCESS = frozenset({status(0)})

VALID = "valid"
EDGE = "valid edge case"

# The hostile classes, in the order reported, with what each one is.
CLASSES: dict[str, str] = {
    "deep_nesting": "arrays/objects nested beyond max_json_depth, in fields and at top level",
    "huge_integer": "integer literals of 400-5,000 digits in params, limits, submittedAt",
    "non_finite": "NaN, Infinity, -Infinity, 1e400 literals",
    "wrong_type": "a value of the wrong type in each field",
    "huge_string": "strings of 1,000 characters up to the whole message in each string field",
    "invalid_utf8": "bytes that are not UTF-8 in each field; UTF-16/32 and BOM encodings",
    "control_chars": "control characters and newlines in ids, names, namespace, transid",
    "leading_underscore": "names and namespaces starting with _ (_design, _users...)",
    "lone_surrogate": "lone surrogate escapes (\\ud800) in params and in each field",
    "wide": "64 KB of tiny arrays/objects (memory amplification when decoded)",
    "duplicate_keys": "a key twice in one object (parsers keep the last one)",
    "oversized": "messages above max_message_bytes, up to the topic's limit",
    "duplicate": "exact copies of valid messages (one record, completions may repeat)",
    "garbage": "random bytes, truncated or concatenated JSON, comments, XML...",
    "not_object": "JSON that is not an object (arrays, strings, numbers, null, {})",
    "empty": "empty value and tombstone (no value)",
    "blackbox_image": "blackbox images outside the (empty) allow-list",
}

DEFAULT_COUNTS: dict[str, int] = {
    "deep_nesting": 90, "huge_integer": 50, "non_finite": 50, "wrong_type": 180,
    "huge_string": 70, "invalid_utf8": 70, "control_chars": 90, "leading_underscore": 30,
    "lone_surrogate": 60, "wide": 12, "duplicate_keys": 12, "oversized": 24, "duplicate": 60,
    "garbage": 130,
    "not_object": 50, "empty": 20, "blackbox_image": 30,
}

# What a topic's max.message.bytes must leave besides a value: the record batch around it
# (61 bytes), the record's own fields and a 32-byte key, with room to spare.
BATCH_OVERHEAD_BYTES = 160

# Valid traffic: echo returns its params, noop {}, logs:3 {"lines": 3}.
VALID_ACTIONS = ("echo", "echo", "noop", "logs:3")
ACTION_LIMITS = {"memory": 128, "timeout": 10_000}

_STRING_FIELDS = [("action", "name"), ("action", "version"), ("action", "kind"),
                  ("action", "main"), ("transid",)]
_ID_FIELDS = [("activationId",), ("namespace",)]
_TYPED_FIELDS: list[tuple[tuple[str, ...], type]] = [
    (("activationId",), str), (("namespace",), str), (("action",), dict),
    (("action", "name"), str), (("action", "version"), str), (("action", "kind"), str),
    (("action", "image"), str), (("action", "code"), str), (("action", "main"), str),
    (("action", "binary"), bool), (("action", "limits"), dict),
    (("action", "limits", "timeout"), int), (("action", "limits", "memory"), int),
    (("action", "limits", "logs"), int), (("action", "limits", "concurrency"), int),
    (("params",), dict), (("blocking",), bool), (("transid",), str), (("submittedAt",), int),
]
# Truthy only: a falsy value of another type (0, "", [], {}) may fairly mean "absent".
_WRONG_VALUES: list[Any] = [7, -3, 2.5, True, "x", "17", [1], {"k": 1}, ["a", "b"]]
_INVALID_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
                 b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80", b"caf\xe9"]
_CONTROL = ["\n", "\r\n", "\t", "\x00", "\x1b[31m", "\x7f", "\x85", "\u2028", "\u202e", "\x0b"]
_SURROGATES = [b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\\udc00\\ud800", b"\\udbff"]
_LOCAL_IMAGES = ["invoker-action-python:latest", "invoker-python-base:bookworm"]
_WELL_FORMED_IMAGES = ["busybox:latest", "docker.io/library/alpine:3.19",
                       "ghcr.io/evil/miner:1", "localhost:5000/x/y:z",
                       "invoker-action-python@sha256:" + "ab" * 32]
_MALFORMED_IMAGES = ["../../../etc/passwd", "UPPER/Case:1", "a b:c", ":", "-x", "x:" + "y" * 200,
                     "img\n:1", "$(reboot)"]


@dataclass(frozen=True)
class Raw:
    """Bytes spliced verbatim where a JSON value goes (for what ``json.dumps`` cannot write)."""

    text: bytes


@dataclass(frozen=True)
class FuzzMessage:
    """One feed message and what may become of it."""

    kind: str  # a key of CLASSES, or VALID / EDGE
    detail: str  # which variant, e.g. "params: arrays nested 1000 deep"
    value: bytes | None  # None: a tombstone
    allowed: frozenset[str]
    activation_id: str | None = None  # set when id and namespace are valid (identifiable)
    namespace: str | None = None
    claimed_id: str | None = None  # the "activationId" string, valid or not (traces records)
    check_result: bool = False  # the record's result must equal expected_result
    expected_result: Any = None
    blocking: bool = False

    @property
    def hostile(self) -> bool:
        return self.kind not in (VALID, EDGE)

    @property
    def key(self) -> bytes | None:
        """Kafka key: the activation id when there is a valid one (duplicates share a
        partition, as a real producer would send them); a tombstone needs some key."""
        if self.activation_id:
            return self.activation_id.encode()
        return b"tombstone" if self.value is None else None

    def preview(self, limit: int = 100) -> str:
        """The value's start (at most ``limit`` bytes) and length, for failure messages."""
        if self.value is None:
            return "<tombstone>"
        return f"{self.value[:limit]!r}{'...' if len(self.value) > limit else ''} " \
               f"({len(self.value)} bytes)"


def encode(doc: Any) -> bytes:
    """Compact UTF-8 JSON of ``doc``, with every :class:`Raw` (value or key) spliced in."""
    raws: list[bytes] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {swap(k): swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(doc), separators=(",", ":"), ensure_ascii=False).encode()
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@raw{index}@@"'.encode(), raw, 1)
    return text


def _nest_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _nest_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _nest_mixed(depth: int) -> bytes:
    half = depth // 2
    return b'[{"a":' * half + b"0" + b"}]" * half


class HostileCorpus:
    """Builds a reproducible corpus; ``max_message_bytes`` is the daemon's setting and
    ``topic_message_bytes`` the largest value the feed topic takes (oversized messages stay
    under it)."""

    def __init__(self, seed: int, namespace: str, max_message_bytes: int,
                 topic_message_bytes: int) -> None:
        self.seed = seed
        self.namespace = namespace
        self.max_message_bytes = max_message_bytes
        self.topic_message_bytes = topic_message_bytes
        self.rng = random.Random(seed)
        self._builders: dict[str, Iterator[Callable[[], FuzzMessage]]] = {
            name: itertools.cycle(getattr(self, f"_{name}_variants")()) for name in CLASSES
            if name != "duplicate"
        }

    # --- public ------------------------------------------------------------------------

    def valid(self, spec: str, *, blocking: bool = False) -> FuzzMessage:
        """A valid activation of ``spec`` (see VALID_ACTIONS) with its expected result."""
        doc = self._doc(spec, blocking=blocking)
        expected = {"echo": doc["params"], "noop": {}, "logs:3": {"lines": 3}}[spec]
        return self._message(VALID, spec + (" blocking" if blocking else ""), doc, SUCCESS,
                             check_result=True, expected_result=expected)

    def build(self, valid_count: int, counts: dict[str, int] | None = None,
              edge_count: int = 40) -> list[FuzzMessage]:
        """``valid_count`` valid messages, ``edge_count`` valid edge cases and the hostile ones
        of ``counts`` (class → how many; DEFAULT_COUNTS when None), shuffled."""
        counts = DEFAULT_COUNTS if counts is None else counts
        valid = [self.valid(VALID_ACTIONS[i % len(VALID_ACTIONS)], blocking=i % 5 == 0)
                 for i in range(valid_count)]
        messages = list(valid)
        edges = itertools.cycle(self._edge_variants())
        messages += [next(edges)() for _ in range(edge_count)]
        for name in CLASSES:
            for _ in range(counts.get(name, 0)):
                if name == "duplicate":
                    original = self.rng.choice(valid)
                    messages.append(replace(original, kind="duplicate",
                                            detail=f"copy of {original.detail}"))
                else:
                    messages.append(self._checked(name, next(self._builders[name])()))
        self.rng.shuffle(messages)
        return messages

    # --- building blocks ---------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _doc(self, spec: str = "echo", *, blocking: bool = False) -> dict[str, Any]:
        doc = activation_message(spec, self.namespace, activation_id=self._new_id(),
                                 blocking=blocking, limits=dict(ACTION_LIMITS))
        doc["params"] = {"loadgen": spec, "n": self.rng.randrange(1 << 30), "text": "héllo ☃"}
        return doc

    def _message(self, kind: str, detail: str, doc: dict[str, Any] | bytes | None,
                 allowed: frozenset[str], *, identified: bool = True, **extra: Any
                 ) -> FuzzMessage:
        """A message from ``doc`` (encoded; bytes or None as they are). ``identified``: the
        id and namespace in ``doc`` are the valid ones it was built with. ``extra``: more
        FuzzMessage fields (the identity of a message given as bytes)."""
        value = doc if doc is None or isinstance(doc, bytes) else encode(doc)
        if isinstance(doc, dict):
            claimed = doc.get("activationId")
            extra.setdefault("claimed_id", claimed if isinstance(claimed, str) else None)
            extra.setdefault("blocking", doc.get("blocking") is True)
            if identified:
                extra.update(activation_id=doc["activationId"], namespace=doc["namespace"])
        return FuzzMessage(kind, detail, value, allowed, **extra)

    def _mutant(self, kind: str, detail: str, path: tuple[str, ...], value: Any,
                allowed: frozenset[str] = REFUSED, base: dict[str, Any] | None = None
                ) -> FuzzMessage:
        """A valid echo message with the field at ``path`` set to ``value``. Touching the id
        or the namespace makes it unidentifiable: then only a dead letter will do."""
        doc = base or self._doc()
        target = doc
        for step in path[:-1]:
            if not isinstance(target.get(step), dict):
                target[step] = {}
            target = target[step]
        target[path[-1]] = value
        identified = path[0] not in ("activationId", "namespace")
        return self._message(kind, f"{'.'.join(path)}: {detail}", doc,
                             allowed if identified else ONLY_DEAD_LETTER, identified=identified)

    def _checked(self, name: str, message: FuzzMessage) -> FuzzMessage:
        """Generator self-check: only oversized messages may exceed max_message_bytes."""
        size = len(message.value or b"")
        if name == "oversized":
            limit = self.topic_message_bytes - BATCH_OVERHEAD_BYTES
            assert self.max_message_bytes < size <= limit, (message.detail, size)
        else:
            assert size <= self.max_message_bytes, (name, message.detail, size)
        return message

    def _room(self, margin: int = 256) -> int:
        """Bytes a valid echo message leaves before max_message_bytes, less ``margin``."""
        return self.max_message_bytes - len(encode(self._doc())) - margin

    # --- hostile classes: each a list of variant builders ------------------------------

    def _deep_nesting_variants(self) -> list[Callable[[], FuzzMessage]]:
        def depth(unit: int) -> int:
            limit = self._room() // unit
            return self.rng.choice([d for d in (65, 70, 100, 500, 999, 1000, 1001, 3000,
                                                10_000, 30_000) if d <= limit] + [limit])

        def in_params(make: Callable[[int], bytes], what: str) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                d = depth(6)
                return self._mutant("deep_nesting", f"{what} nested {d} deep", ("params", "p"),
                                    Raw(make(d)))
            return build

        def field(path: tuple[str, ...]) -> Callable[[], FuzzMessage]:
            return lambda: self._mutant("deep_nesting", "arrays nested 2000 deep", path,
                                        Raw(_nest_arrays(2000)))

        def top(make: Callable[[int], bytes], what: str, unit: int
                ) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                d = depth(unit)
                return self._message("deep_nesting", f"top level: {what} nested {d} deep",
                                     make(d), ONLY_DEAD_LETTER)
            return build

        def params_itself() -> FuzzMessage:
            d = depth(6)
            return self._mutant("deep_nesting", f"objects nested {d} deep", ("params",),
                                Raw(_nest_objects(d)))

        def ignored_field() -> FuzzMessage:
            # The cap is on params and results; a deep unknown field may also be ignored.
            return self._mutant("deep_nesting", "arrays nested 5000 deep in an unknown field",
                                ("extra",), Raw(_nest_arrays(5000)), REFUSED | SUCCESS)

        def unclosed() -> FuzzMessage:
            n = self._room() - 100
            return self._message("deep_nesting", f'top level: b"[" * {n}', b"[" * n,
                                 ONLY_DEAD_LETTER)

        return [in_params(_nest_arrays, "arrays"), in_params(_nest_objects, "objects"),
                in_params(_nest_mixed, "arrays of objects"), params_itself,
                field(("action", "limits")), field(("transid",)), field(("action", "code")),
                field(("action",)), ignored_field, unclosed,
                top(_nest_arrays, "arrays", 2), top(_nest_objects, "objects", 6),
                top(lambda d: b"[" * d, "unclosed arrays", 1)]

    def _huge_integer_variants(self) -> list[Callable[[], FuzzMessage]]:
        def digits(n: int, sign: str = "") -> Raw:
            return Raw((sign + "9" * n).encode())

        cases: list[tuple[tuple[str, ...], Raw, str]] = [
            (("params", "n"), digits(5000), "5,000 digits"),
            (("params", "n"), digits(5000, "-"), "-5,000 digits"),
            (("params", "deep", "n"), digits(4301), "4,301 digits (just past int parsing)"),
            (("params", "n"), Raw(b"1" + b"0" * 5000 + b".5"), "5,000-digit float"),
            (("submittedAt",), Raw(b"1" + b"0" * 400), "10**400"),
            (("submittedAt",), Raw(b"-1" + b"0" * 400), "-10**400"),
            (("submittedAt",), digits(5000), "5,000 digits"),
            (("action", "limits", "timeout"), digits(5000), "5,000 digits"),
            (("action", "limits", "memory"), Raw(b"1" + b"0" * 400), "10**400"),
            (("action", "limits", "logs"), Raw(b"-1" + b"0" * 400), "-10**400"),
            (("blocking",), digits(5000), "5,000 digits"),
            (("activationId",), digits(5000), "5,000 digits"),
        ]
        variants = [
            (lambda c=case: self._mutant("huge_integer", c[2], c[0], c[1])) for case in cases
        ]
        variants.append(lambda: self._message("huge_integer", "top level: 5,000 digits",
                                              b"7" * 5000, ONLY_DEAD_LETTER))
        # Parsable, so params may carry them; JavaScript (the CouchDB API) reads them as
        # Infinity, so the stored result is not compared: only that nothing breaks.
        variants += [
            (lambda n=n: self._mutant("huge_integer", f"{n:,} digits, parsable", ("params", "n"),
                                      digits(n), ANY)) for n in (1000, 4300)]
        return variants

    def _non_finite_variants(self) -> list[Callable[[], FuzzMessage]]:
        literals = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"]
        paths = [("params", "x"), ("params", "list"), ("action", "limits", "timeout"),
                 ("submittedAt",), ("blocking",), ("activationId",)]
        variants: list[Callable[[], FuzzMessage]] = []
        for path in paths:
            for literal in literals:
                raw = b"[1," + literal + b"]" if path[-1] == "list" else literal
                variants.append(lambda p=path, r=raw: self._mutant(
                    "non_finite", r.decode(), p, Raw(r)))
        variants += [
            lambda lit=lit: self._message("non_finite", f"top level: {lit.decode()}", lit,
                                          ONLY_DEAD_LETTER) for lit in literals[:3]]
        return variants

    def _wrong_type_variants(self) -> list[Callable[[], FuzzMessage]]:
        def wrong(kind: type) -> list[Any]:
            if kind is int:
                return [v for v in _WRONG_VALUES if isinstance(v, bool) or not isinstance(v, int)]
            return [v for v in _WRONG_VALUES if type(v) is not kind]

        return [
            (lambda p=path, v=value: self._mutant("wrong_type", f"{v!r}", p, v))
            for path, kind in _TYPED_FIELDS for value in wrong(kind)
        ]

    def _huge_string_variants(self) -> list[Callable[[], FuzzMessage]]:
        alphabets = {"ascii": "abcdefghij", "latin": "é", "cjk": "漢", "emoji": "😀",
                     "backslash": "\\"}

        def text(alphabet: str) -> str:
            chars = alphabets[alphabet]
            per_char = len(encode(chars[0])) - 2  # JSON-encoded bytes per character
            room = self._room(margin=2048) // per_char
            # Far past every field's limit, up to all the message can hold (spread, so the
            # corpus stays a few MiB: producing and consuming cost CPU per byte).
            n = self.rng.choice([n for n in (1000, 4096, 16_384) if n < room] + [room])
            return (chars * (n // len(chars) + 1))[:n]

        def field(path: tuple[str, ...], alphabet: str, allowed: frozenset[str] = REFUSED
                  ) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                value = text(alphabet)
                return self._mutant("huge_string", f"{len(value)} {alphabet} characters", path,
                                    value, allowed)
            return build

        def param_value(alphabet: str) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                doc = self._doc()
                doc["params"]["big"] = text(alphabet)
                return self._message("huge_string", f"params.big: {alphabet}", doc, SUCCESS,
                                     check_result=True, expected_result=doc["params"])
            return build

        def param_key() -> FuzzMessage:
            doc = self._doc()
            doc["params"][text("ascii")] = 1
            return self._message("huge_string", "params: a huge key", doc, SUCCESS,
                                 check_result=True, expected_result=doc["params"])

        def code() -> FuzzMessage:
            # Valid code with a huge comment: running it (status 0) is as right as refusing it.
            doc = self._doc()
            doc["action"]["code"] += "# " + text("ascii") + "\n"
            return self._message("huge_string", "action.code: huge comment", doc, ANY)

        variants: list[Callable[[], FuzzMessage]] = []
        for path in _STRING_FIELDS + [("action", "image")] + _ID_FIELDS:
            variants += [field(path, "ascii"), field(path, self.rng.choice(list(alphabets)))]
        variants += [param_value(a) for a in alphabets] + [param_key, code]
        # Valid characters, one past the length limit of names (256).
        variants.append(lambda: self._mutant("huge_string", "257 name characters",
                                             ("action", "name"), "n" * 257))
        variants.append(lambda: self._mutant("huge_string", "257 namespace characters",
                                             ("namespace",), "n" * 257))
        return variants

    def _invalid_utf8_variants(self) -> list[Callable[[], FuzzMessage]]:
        def in_field(path: tuple[str, ...], bad: bytes) -> Callable[[], FuzzMessage]:
            return lambda: self._mutant("invalid_utf8", repr(bad), path,
                                        Raw(b'"ab' + bad + b'cd"'))

        def in_key(bad: bytes) -> FuzzMessage:
            doc = self._doc()
            doc["params"][Raw(b'"k' + bad + b'"')] = 1
            return self._message("invalid_utf8", f"params key {bad!r}", doc, REFUSED)

        def whole(codec: str) -> FuzzMessage:
            # Not UTF-8 at all, but a decoder that sniffs encodings may read it: either is
            # fine as long as it is accounted for.
            doc = self._doc()
            return self._message("invalid_utf8", f"whole message in {codec}",
                                 encode(doc).decode().encode(codec), ANY)

        def latin1() -> FuzzMessage:
            doc = self._doc()
            doc["params"]["text"] = "café ☃"
            raw = json.dumps(doc, ensure_ascii=False).replace("☃", "").encode("latin-1")
            return self._message("invalid_utf8", "whole message in latin-1", raw, REFUSED)

        def trailing() -> FuzzMessage:
            return self._message("invalid_utf8", "valid message + \\xff",
                                 encode(self._doc()) + b"\xff", REFUSED)

        paths = _STRING_FIELDS + _ID_FIELDS + [("action", "code"), ("params", "v"),
                                               ("action", "image")]
        variants = [in_field(path, bad) for bad in _INVALID_UTF8 for path in paths]
        self.rng.shuffle(variants)
        variants += [lambda b=b: in_key(b) for b in _INVALID_UTF8[:3]]
        variants += [lambda c=c: whole(c) for c in ("utf-16-le", "utf-16", "utf-32", "utf-8-sig")]
        variants += [latin1, trailing]
        return variants

    def _control_chars_variants(self) -> list[Callable[[], FuzzMessage]]:
        def in_field(path: tuple[str, ...], char: str) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                doc = self._doc()
                target = doc
                for step in path[:-1]:
                    target = target[step]
                original = target[path[-1]]
                where = self.rng.choice(["end", "middle", "start"])
                value = {"end": original + char, "start": char + original,
                         "middle": original[:3] + char + original[3:]}[where]
                return self._mutant("control_chars", f"{char!r} at the {where}", path, value,
                                    base=doc)
            return build

        def raw_newline(path: tuple[str, ...]) -> FuzzMessage:
            # An unescaped newline inside a JSON string is not JSON.
            return self._mutant("control_chars", "unescaped newline", path, Raw(b'"ab\ncd"'))

        paths = _STRING_FIELDS + _ID_FIELDS
        variants = [in_field(path, char) for char in _CONTROL for path in paths]
        self.rng.shuffle(variants)
        variants += [lambda p=p: raw_newline(p) for p in paths]
        return variants

    def _leading_underscore_variants(self) -> list[Callable[[], FuzzMessage]]:
        names = ["_x", "_", "__proto__", "_design", "_hidden-action"]
        namespaces = ["_design", "_users", "_all_docs", "_local", "_replicator", "_x"]
        variants = [(lambda n=n: self._mutant("leading_underscore", repr(n), ("action", "name"),
                                              n)) for n in names]
        variants += [(lambda n=n: self._mutant("leading_underscore", repr(n), ("namespace",), n))
                     for n in namespaces]
        return variants

    def _lone_surrogate_variants(self) -> list[Callable[[], FuzzMessage]]:
        def in_field(path: tuple[str, ...], escape: bytes, allowed: frozenset[str]
                     ) -> Callable[[], FuzzMessage]:
            return lambda: self._mutant("lone_surrogate", escape.decode(), path,
                                        Raw(b'"a' + escape + b'b"'), allowed)

        def in_key(escape: bytes) -> FuzzMessage:
            doc = self._doc()
            doc["params"][Raw(b'"k' + escape + b'"')] = "v"
            # Params are free text: running it, refusing it, or the store refusing it are all
            # acceptable; losing it or stopping is not.
            return self._message("lone_surrogate", f"params key {escape.decode()}", doc, ANY)

        variants: list[Callable[[], FuzzMessage]] = []
        for escape in _SURROGATES:
            variants.append(in_field(("params", "s"), escape, ANY))
            variants.append(in_field(("action", "code"), escape, ANY))
            variants += [in_field(path, escape, REFUSED)
                         for path in _STRING_FIELDS + _ID_FIELDS + [("action", "image")]]
            variants.append(lambda e=escape: in_key(e))
        self.rng.shuffle(variants)
        return variants

    def _wide_variants(self) -> list[Callable[[], FuzzMessage]]:
        def wide(item: bytes, what: str) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                count = self._room() // (len(item) + 1)
                return self._mutant("wide", f"{count} × {what}", ("params", "w"),
                                    Raw(b"[" + b",".join([item] * count) + b"]"), ANY)
            return build

        return [wide(b"{}", "{}"), wide(b"[]", "[]"), wide(b"0", "0"), wide(b'""', '""'),
                wide(b"[[]]", "[[]]")]

    def _duplicate_keys_variants(self) -> list[Callable[[], FuzzMessage]]:
        def twice(path: tuple[str, ...], first: Any, last: Any, allowed: frozenset[str]
                  ) -> Callable[[], FuzzMessage]:
            """``path`` set to ``last``, with ``first`` written under the same key before it."""
            def build() -> FuzzMessage:
                doc = self._doc()
                target = doc
                for step in path[:-1]:
                    target = target[step]
                target[path[-1]] = last
                key = json.dumps(path[-1]).encode()
                raw = encode(doc)
                # the key's first occurrence is the one we set (ids and names come before it)
                at = raw.index(key + b":")
                raw = raw[:at] + key + b":" + encode(first) + b"," + raw[at:]
                return self._message("duplicate_keys", f"{'.'.join(path)}: {first!r} then "
                                     f"{last!r}", raw, allowed,
                                     activation_id=doc["activationId"],
                                     namespace=doc["namespace"], claimed_id=doc["activationId"])
            return build

        return [twice(("params",), [1], {"p": 1}, ANY),
                twice(("params",), {"p": 1}, [1], REFUSED),
                twice(("action", "name"), "fine", "_design", REFUSED),
                twice(("blocking",), False, "yes", REFUSED)]

    def _oversized_variants(self) -> list[Callable[[], FuzzMessage]]:
        over, top = self.max_message_bytes, self.topic_message_bytes

        def sizes() -> list[int]:
            # Just over the daemon's limit, in between, and so close to the topic's limit that
            # the dead letter (the same bytes plus dlq.* headers) cannot fit: it is truncated.
            wanted = {over + 1, over + 1000, (over + top) // 2, top - 4096, top - 300,
                      top - BATCH_OVERHEAD_BYTES}
            return sorted(n for n in wanted if over < n <= top - BATCH_OVERHEAD_BYTES)

        def activation(size: int) -> FuzzMessage:
            doc = self._doc()
            doc["params"]["pad"] = ""
            doc["params"]["pad"] = "x" * (size - len(encode(doc)))
            return self._message("oversized", f"activation of {size} bytes", doc, REFUSED)

        def garbage(size: int) -> FuzzMessage:
            return self._message("oversized", f"{size} random bytes", self.rng.randbytes(size),
                                 ONLY_DEAD_LETTER)

        def brackets(size: int) -> FuzzMessage:
            return self._message("oversized", f'b"[" * {size}', b"[" * size, ONLY_DEAD_LETTER)

        variants: list[Callable[[], FuzzMessage]] = [
            lambda: self._message("oversized", 'b"[" * 100000 (the poison of issue 8)',
                                  b"[" * 100_000, ONLY_DEAD_LETTER)]
        for size in sizes():
            variants += [lambda s=size: activation(s), lambda s=size: garbage(s),
                         lambda s=size: brackets(s)]
        return variants

    def _garbage_variants(self) -> list[Callable[[], FuzzMessage]]:
        def random_bytes() -> FuzzMessage:
            n = self.rng.randint(1, 3000)
            return self._message("garbage", f"{n} random bytes", self.rng.randbytes(n),
                                 ONLY_DEAD_LETTER)

        def printable() -> FuzzMessage:
            n = self.rng.randint(1, 2000)
            text = "".join(self.rng.choice("{}[]\":,0123456789abcdefnulltrue \\")
                           for _ in range(n))
            return self._message("garbage", f"{n} JSON-ish characters", text.encode(),
                                 ONLY_DEAD_LETTER)

        def truncated() -> FuzzMessage:
            raw = encode(self._doc())
            cut = self.rng.randint(1, len(raw) - 1)
            return self._message("garbage", f"valid message cut at byte {cut}", raw[:cut],
                                 ONLY_DEAD_LETTER)

        def fixed(detail: str, raw: bytes) -> Callable[[], FuzzMessage]:
            return lambda: self._message("garbage", detail, raw, ONLY_DEAD_LETTER)

        def built(detail: str, make: Callable[[bytes], bytes]) -> Callable[[], FuzzMessage]:
            return lambda: self._message("garbage", detail, make(encode(self._doc())),
                                         ONLY_DEAD_LETTER)

        return [
            random_bytes, printable, truncated, random_bytes, truncated,
            built("two messages back to back", lambda m: m + m),
            built("valid message + trailing junk", lambda m: m + b"}garbage"),
            built("junk + valid message", lambda m: b"x" + m),
            built("message with a // comment", lambda m: m[:1] + b"// hi\n" + m[1:]),
            built("single quotes", lambda m: m.replace(b'"', b"'")),
            built("python repr", lambda m: repr(json.loads(m)).encode()),
            built("newline-separated pair", lambda m: m + b"\n" + m),
            fixed("xml", b"<activation id='1'/>"),
            fixed("whitespace only", b" \n\t\r "),
            fixed("NUL bytes", b"\x00" * 64),
            fixed("BOM only", b"\xef\xbb\xbf"),
            fixed("null + NUL", b"null\x00"),
            fixed("unterminated string", b'{"activationId": "'),
            fixed("lone }", b"}"),
        ]

    def _not_object_variants(self) -> list[Callable[[], FuzzMessage]]:
        def fixed(raw: bytes) -> Callable[[], FuzzMessage]:
            return lambda: self._message("not_object", raw[:40].decode(errors="replace"), raw,
                                         ONLY_DEAD_LETTER)

        def wrapped(detail: str, make: Callable[[bytes], bytes]) -> Callable[[], FuzzMessage]:
            return lambda: self._message("not_object", detail, make(encode(self._doc())),
                                         ONLY_DEAD_LETTER)

        return [fixed(raw) for raw in (b"[]", b"[{}]", b'"activation"', b"42", b"-1.5e3",
                                       b"null", b"true", b"false", b"{}", b'{"": null}')] + [
            wrapped("valid message in an array", lambda m: b"[" + m + b"]"),
            wrapped("valid message as a JSON string", lambda m: json.dumps(m.decode()).encode()),
        ]

    def _empty_variants(self) -> list[Callable[[], FuzzMessage]]:
        return [lambda: self._message("empty", "empty value", b"", ONLY_DEAD_LETTER),
                lambda: self._message("empty", "tombstone", None, ONLY_DEAD_LETTER)]

    def _blackbox_image_variants(self) -> list[Callable[[], FuzzMessage]]:
        def blackbox(image: str, allowed: frozenset[str], kind: str | None
                     ) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                doc = self._doc()
                doc["action"].update(name="fuzz-blackbox", image=image, kind=kind, code=None)
                return self._message("blackbox_image", f"{image[:60]!r} (kind {kind!r})", doc,
                                     allowed)
            return build

        # A well-formed image reference outside the allow-list gets a status-2 record that
        # names the rule; a malformed one may also be dead-lettered by the decoder.
        well_formed = [blackbox(image, frozenset({status(2)}), kind)
                       for image in _LOCAL_IMAGES + _WELL_FORMED_IMAGES
                       for kind in (None, "blackbox")]
        return well_formed + [blackbox(image, REFUSED, None) for image in _MALFORMED_IMAGES]

    def _edge_variants(self) -> list[Callable[[], FuzzMessage]]:
        """Valid messages that look odd: they must run and echo their params unchanged."""
        def echo(detail: str, params: Any, expected: Any = None) -> Callable[[], FuzzMessage]:
            """``params`` (a dict, or a callable making one); ``expected``: the echo when the
            params hold Raw escapes (else the params themselves)."""
            def build() -> FuzzMessage:
                doc = self._doc(blocking=self.rng.random() < 0.3)
                doc["params"] = params() if callable(params) else params
                result = doc["params"] if expected is None else expected
                return self._message(EDGE, detail, doc, SUCCESS, check_result=True,
                                     expected_result=result)
            return build

        def named(detail: str, path: tuple[str, ...], value: Callable[[], str]
                  ) -> Callable[[], FuzzMessage]:
            def build() -> FuzzMessage:
                doc = self._doc()
                target = doc if len(path) == 1 else doc[path[0]]
                target[path[-1]] = value()
                return self._message(EDGE, detail, doc, SUCCESS, check_result=True,
                                     expected_result=doc["params"])
            return build

        def long_name() -> str:
            allowed = "abcXYZ019@.- "
            return "n" + "".join(self.rng.choice(allowed) for _ in range(254)) + "n"

        def nested(depth: int) -> Any:
            value: Any = 0
            for level in range(depth):
                value = [value] if level % 2 else {"a": value}
            return {"deep": value}

        return [
            echo("underscore keys", {"_id": "x", "_rev": "1-abc", "_deleted": True,
                                     "_attachments": {}}),
            echo("unicode", {"t": "héllo ☃ 😀 \u2028 \u0000 \u202e"}),
            echo("surrogate pair as escapes", {"t": Raw(b'"\\ud83d\\ude00"')}, {"t": "😀"}),
            echo("nested 30 deep", nested(30)),
            echo("safe numbers", {"i": 2**53 - 1, "neg": -(2**53 - 1), "f": 1.5, "big": 1e300,
                                  "small": 5e-324}),
            echo("500 keys", lambda: {f"k{i}": i for i in range(500)}),
            echo("empty key", {"": 1}),
            echo("empty params", {}),
            echo("nested 60 deep (under the cap)", nested(60)),
            named("action name of 256 allowed characters", ("action", "name"), long_name),
            named("namespace of 256 allowed characters", ("namespace",), long_name),
        ]
