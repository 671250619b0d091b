"""Activation record stores: where finished activation records are kept, idempotently.

Every record is an OpenWhisk activation record (a JSON-able dict with ``namespace`` and
``activationId``). Its id in the store is ``doc_id_for(namespace, activationId)``, as in
OpenWhisk. Writing an id that is already stored never makes a second copy and never changes
the first one: the store answers ``ALREADY_STORED`` for it, so a batch can be retried after a
``StoreUnavailable`` without duplicating anything.

A record built by the invoker is an :class:`EncodedRecord`: it carries its encoding, made once,
which the stores write as it is (:func:`encode_record` returns it); any other mapping is encoded
by the store.

Backends: an embedded SQLite file (the default) and CouchDB over HTTP (Apache CouchDB 3 or
pouchdb-server). All methods are called from trio.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

from invoker.safejson import dumps

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "MAX_KEPT_CHARS",
    "MAX_RECORD_MEMBERS",
    "DocResult",
    "EncodedRecord",
    "Outcome",
    "Store",
    "StoreUnavailable",
    "UnencodableRecord",
    "doc_id_for",
    "encode_json",
    "encode_record",
    "mask_url",
    "open_store",
]

DEFAULT_SQLITE_PATH = "./invoker-records.sqlite3"


class Outcome(enum.Enum):
    STORED = "stored"  # written by this call
    ALREADY_STORED = "already_stored"  # the id was there before; the stored record is unchanged
    FAILED = "failed"  # this document was rejected; retrying the same document will not help
    RETRY = "retry"  # this document was not written this time (the others were): write it again


@dataclass(frozen=True)
class DocResult:
    doc_id: str
    outcome: Outcome
    reason: str | None = None


class StoreUnavailable(Exception):
    """The whole write failed (connection refused, timeout, 5xx): retry the batch later."""


@runtime_checkable
class Store(Protocol):
    async def open(self) -> None:
        """Connect; create the database/table if missing. May raise StoreUnavailable."""

    async def write_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[DocResult]:
        """One DocResult per doc, in the same order. A doc that cannot be encoded (see
        :func:`encode_record`) or that the store refuses for good is FAILED on its own; one
        the store failed to write for a reason that may pass is RETRY; neither affects the
        others. Raises StoreUnavailable if the write as a whole failed (then any subset of
        the docs may have been stored)."""

    async def get(self, doc_id: str) -> dict[str, Any] | None: ...

    async def get_many(self, doc_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Only the ids that are present; handles at least 1000 ids per call."""

    async def count(self) -> int: ...

    async def aclose(self) -> None: ...

    def describe(self) -> str:
        """Where the records go, with any password masked."""


def doc_id_for(namespace: str, activation_id: str) -> str:
    """The store id of an activation record: ``<namespace>/<activationId>`` as in OpenWhisk."""
    return f"{namespace}/{activation_id}"


def record_doc_id(doc: Mapping[str, Any]) -> str | None:
    """The store id of ``doc``, or None if it lacks a string namespace/activationId."""
    namespace = doc.get("namespace")
    activation_id = doc.get("activationId")
    if not isinstance(namespace, str) or not isinstance(activation_id, str):
        return None
    if not namespace or not activation_id:
        return None
    return doc_id_for(namespace, activation_id)


def fallback_doc_id(doc: Mapping[str, Any]) -> str:
    """A name for a record that has no proper id, for its FAILED result."""
    try:
        return f"{doc.get('namespace')!s}/{doc.get('activationId')!s}"
    except Exception:  # a Mapping with an odd .get must not fail the whole batch
        return "<invalid record>"


class UnencodableRecord(ValueError):
    """A record that cannot be written as JSON text: it fails alone, retrying cannot help."""


class EncodedRecord(Mapping[str, Any]):
    """An activation record that carries its encoding: ``data``, its compact UTF-8 JSON exactly
    as :func:`encode_json` makes it, made once when the record is built. The stores write
    ``data``, the overflow topic carries it, and a completion takes the result from it:
    ``result`` is the slice of ``data`` that holds ``response.result``'s JSON (None when the
    record has none).

    In memory a record costs its bytes and a few scalars: its ids, names and times and
    :attr:`response_head`, when short, and its keys, when few and short, are kept as objects;
    everything else (the result, logs, annotations: what an action controls; any member of a
    record from an untrusted producer) is decoded from ``data`` each time it is read. Parsed,
    ``{"a":[{},{},...]}`` takes ~25 times its JSON, which would break the stated worst case
    for every buffered record. Read-only: a change would leave ``data`` stale.
    """

    __slots__ = ("data", "result", "_keys", "_fields", "_response_head")

    def __init__(self, record: Mapping[str, Any], data: bytes, result: slice | None) -> None:
        self.data = data
        self.result = result
        # A record from an untrusted producer (the overflow topic) may have any members: only
        # a record's own short scalars are kept, and its keys when they are few.
        self._keys = (tuple(record) if len(record) <= MAX_RECORD_MEMBERS
                      and all(isinstance(key, str) and len(key) <= MAX_KEPT_CHARS
                              for key in record) else None)
        self._fields = {key: record[key] for key in _KEPT_MEMBERS
                        if key in record and _is_small_scalar(record[key])}
        response = record.get("response")
        self._response_head: Mapping[str, Any] = (
            {key: response[key] for key in _KEPT_RESPONSE_MEMBERS
             if key in response and _is_small_scalar(response[key])}
            if isinstance(response, Mapping) else {})

    @property
    def response_head(self) -> Mapping[str, Any]:
        """The response's status members (status, statusCode, success, size) that are short
        scalars, read without decoding anything; the result is ``self["response"]["result"]``."""
        return self._response_head

    def __getitem__(self, key: str) -> Any:
        if key in self._fields:
            return self._fields[key]
        if self._keys is not None and key not in self._keys:
            raise KeyError(key)
        return json.loads(self.data)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all_keys())

    def __len__(self) -> int:
        return len(self._all_keys())

    def __contains__(self, key: object) -> bool:
        return key in self._all_keys()

    def _all_keys(self) -> Sequence[str]:
        return self._keys if self._keys is not None else list(json.loads(self.data))

    def __repr__(self) -> str:
        return f"EncodedRecord({self._fields.get('activationId')!r}, {len(self.data)} bytes)"

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("an EncodedRecord is read-only: its data would no longer match it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only
    __ior__ = _read_only


# What an EncodedRecord keeps as objects: the members of a record that are read per activation
# (ids, names, times, status), when they are short scalars; the rest is read from its data.
_KEPT_MEMBERS = ("activationId", "namespace", "name", "version", "subject", "publish", "start",
                 "end", "duration")
_KEPT_RESPONSE_MEMBERS = ("status", "statusCode", "success", "size")
# A record's members (activation records have 12) and a kept name or string, at most: the
# overflow envelope's decoder refuses records beyond them, so only records made by other code
# fall back to decoding their keys.
MAX_RECORD_MEMBERS = 32
MAX_KEPT_CHARS = 256


def _is_small_scalar(value: object) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_KEPT_CHARS
    if isinstance(value, int):  # bool is an int
        return -(2**63) <= value < 2**63
    return value is None or isinstance(value, float)


def encode_json(value: Any) -> bytes:
    """``value`` as every store writes records: compact UTF-8 JSON,
    :func:`invoker.safejson.dumps` (the encoding Kafka messages use too). Raises
    UnencodableRecord for what JSON or UTF-8 cannot hold: a lone surrogate, NaN, a value of no
    JSON type, nesting deeper than the interpreter recurses, an integer too long to print."""
    try:
        return dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise UnencodableRecord(f"record is not JSON: {type(exc).__name__}: "
                                f"{str(exc)[:100]}") from None


def encode_record(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as every store writes it: an EncodedRecord's ``data`` (encoded when it was
    built), any other mapping encoded now (:func:`encode_json`; raises UnencodableRecord)."""
    if isinstance(doc, EncodedRecord):
        return doc.data
    return encode_json(doc)


def open_store(url: str | None, *, timeout_s: float = 30.0) -> Store:
    """Make (not yet open) the store named by ``url``.

    - None or "": SQLite at ``./invoker-records.sqlite3``
    - ``sqlite:///abs/path`` or ``sqlite://relative/path``: SQLite at that path
    - ``http(s)://[user:pass@]host:port/dbname``: CouchDB database ``dbname``
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not url:
        from store.sqlite import SqliteStore

        return SqliteStore(DEFAULT_SQLITE_PATH, timeout_s=timeout_s)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if not rest:
            raise ValueError("sqlite store URL has no path: use sqlite:///abs/path")
        from store.sqlite import SqliteStore

        return SqliteStore(rest, timeout_s=timeout_s)
    if sep and scheme in ("http", "https"):
        from store.couchdb import CouchStore

        return CouchStore(url, timeout_s=timeout_s)
    raise ValueError(
        "unsupported store URL (expected sqlite:///path or http(s)://host:port/db): "
        + mask_url(url)
    )


def mask_url(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` shown as ``***``: for logs,
    errors and printed configuration.

    The last ``@``, not the first, and not only up to the first ``/``: a password may hold
    ``@``, ``:`` or ``/``, so anything before the last ``@`` may be part of one (a path with an
    ``@`` in it is masked too; that only hides more). Without ``://`` everything before the
    last ``@`` is masked. Never echoes a password back, even from a URL too broken to parse.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}***@{hostpart}"
