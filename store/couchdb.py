"""CouchDB record store over HTTP (Apache CouchDB 3 or pouchdb-server 4.2).

One ``httpx.AsyncClient`` with keep-alive and a small bounded pool. A write is one
``POST /db/_bulk_docs``; CouchDB answers per document, and an ``_id`` that already exists comes
back as ``"error": "conflict"``, which is how ALREADY_STORED is told from STORED without a
second copy ever being made. Any other per-document error is FAILED when it says the document
itself is refused (``forbidden``, ``unauthorized``, ``bad_request``, ``too_large``,
``illegal_docid``, ``doc_validation``) and RETRY otherwise (e.g. ``unknown_error``, or a
validation function that crashed).

Each document is encoded on its own: one that cannot be is FAILED and the others are still
sent in one ``_bulk_docs`` body. An :class:`~store.EncodedRecord` is not encoded again: its
bytes go into the body with the ``_id`` member spliced in before the closing brace (the same
bytes as encoding the record with ``_id`` added last).

Every request has a total deadline of ``timeout_s`` (httpx's own timeouts are per socket
operation, so a server that trickles bytes could otherwise hold a write for much longer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import quote, unquote, urlsplit

import httpx
import trio

from store import (
    DocResult,
    EncodedRecord,
    Outcome,
    StoreUnavailable,
    UnencodableRecord,
    encode_json,
    fallback_doc_id,
    mask_url,
    record_doc_id,
)

_GET_MANY_CHUNK = 500
# Node (pouchdb-server) drops idle keep-alive connections after 5 s; reusing one at that very
# moment fails the request. Let our side expire them well before.
_KEEPALIVE_EXPIRY_S = 2.0
_MAX_CONNECTIONS = 4
# Errors that a request on a reused keep-alive connection gets when the server had just closed
# it. Retried once, at once, on a new connection; connect errors and timeouts are not.
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Per-document errors that say the document itself is refused: writing it again cannot help.
_PERMANENT_DOC_ERRORS = frozenset(
    {"forbidden", "unauthorized", "bad_request", "too_large", "illegal_docid", "doc_validation"}
)
_REASON_CHARS = 100  # of a server's reason quoted in a DocResult


class CouchStore:
    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("CouchDB store URL must be http(s)://[user:pass@]host[:port]/db")
        path = parts.path.rstrip("/")
        prefix, _, db = path.rpartition("/")
        if not db:
            raise ValueError(
                f"CouchDB store URL has no database name: {mask_url(url)} "
                "(expected http(s)://[user:pass@]host:port/dbname)"
            )
        self._db = quote(unquote(db), safe="")
        self._timeout_s = timeout_s
        self._describe = mask_url(url)
        hostport = parts.netloc.rpartition("@")[2]
        auth = None
        if parts.username is not None or parts.password is not None:
            auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        self._client = httpx.AsyncClient(
            base_url=f"{parts.scheme}://{hostport}{prefix}/",
            auth=auth,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=_MAX_CONNECTIONS,
                max_keepalive_connections=_MAX_CONNECTIONS,
                keepalive_expiry=_KEEPALIVE_EXPIRY_S,
            ),
            headers={"Accept": "application/json"},
            follow_redirects=False,
            trust_env=False,  # loopback store: no proxies from the environment
        )

    def describe(self) -> str:
        return self._describe

    # ---- HTTP plumbing ---------------------------------------------------------------

    def _fail(self, what: str, detail: str) -> NoReturn:
        raise StoreUnavailable(f"CouchDB store {self._describe}: {what} failed: {detail}")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if content is not None else None
        with trio.move_on_after(self._timeout_s) as deadline:
            for attempt in (1, 2):
                try:
                    return await self._client.request(
                        method, path, content=content, params=params, headers=headers
                    )
                except _STALE_CONNECTION_ERRORS as exc:
                    if attempt == 2:
                        self._fail(what, _describe_exc(exc))
                except httpx.HTTPError as exc:
                    self._fail(what, _describe_exc(exc))
                except OSError as exc:  # should be wrapped by httpx; be safe
                    self._fail(what, f"{type(exc).__name__}: {exc}")
        assert deadline.cancelled_caught
        self._fail(what, f"no answer within {self._timeout_s:g} s")

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except (ValueError, RecursionError):  # RecursionError: nested past Python's stack
            self._fail(what, f"HTTP {resp.status_code} with a body that is not JSON")

    def _unexpected(self, resp: httpx.Response, what: str) -> NoReturn:
        self._fail(what, _status_detail(resp))

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        what = "opening the database"
        resp = await self._request("GET", self._db, what=what)
        if resp.status_code == 200:
            return
        if resp.status_code != 404:
            self._unexpected(resp, what)
        await self._create_db()

    async def _create_db(self) -> None:
        what = "creating the database"
        resp = await self._request("PUT", self._db, what=what)
        # 412 file_exists: someone else created it in between; that is fine.
        if resp.status_code not in (200, 201, 202, 412):
            self._unexpected(resp, what)

    async def aclose(self) -> None:
        await self._client.aclose()

    # ---- writes ----------------------------------------------------------------------

    async def write_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[DocResult]:
        results: list[DocResult | None] = [None] * len(docs)
        first_index: dict[str, int] = {}  # id -> index of its first occurrence
        duplicates: list[tuple[int, int]] = []  # (index, index of first occurrence)
        to_send: list[tuple[str, bytes]] = []  # (id, the CouchDB document as UTF-8 JSON)
        for i, doc in enumerate(docs):
            doc_id = record_doc_id(doc)
            problem = _doc_problem(doc, doc_id)
            if problem is not None:
                results[i] = DocResult(doc_id or fallback_doc_id(doc), Outcome.FAILED, problem)
                continue
            assert doc_id is not None
            if doc_id in first_index:
                # Same id twice in one batch: the first one wins, the second is a duplicate.
                duplicates.append((i, first_index[doc_id]))
                continue
            try:
                encoded = _document(doc, doc_id)
            except UnencodableRecord as exc:
                results[i] = DocResult(doc_id, Outcome.FAILED, str(exc))
                continue
            first_index[doc_id] = i
            to_send.append((doc_id, encoded))

        if to_send:
            outcomes = await self._bulk_write(to_send)
            for doc_id, result in outcomes.items():
                results[first_index[doc_id]] = result
        for i, first in duplicates:
            prior = results[first]
            assert prior is not None
            if prior.outcome in (Outcome.FAILED, Outcome.RETRY):
                results[i] = prior
            else:
                results[i] = DocResult(prior.doc_id, Outcome.ALREADY_STORED)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    async def _bulk_write(self, to_send: list[tuple[str, bytes]]) -> dict[str, DocResult]:
        """POST the documents (unique ids); a result for each id, or StoreUnavailable."""
        what = f"writing {len(to_send)} records"
        content = b'{"docs":[' + b",".join(encoded for _, encoded in to_send) + b"]}"
        resp = await self._request("POST", f"{self._db}/_bulk_docs", what=what, content=content)
        if resp.status_code == 404:
            # The database was deleted under us: make it again and write once more.
            await self._create_db()
            resp = await self._request("POST", f"{self._db}/_bulk_docs", what=what, content=content)
        if resp.status_code in (200, 201, 202):  # 201 normally, 202 if w quorum was not met
            return self._bulk_results(resp, what, [doc_id for doc_id, _ in to_send])
        if _is_document_problem(resp):
            # One bad document makes CouchDB reject the whole request (400, 413, or 500
            # doc_validation from pouchdb-server). Retrying that batch would fail forever:
            # write one at a time so only the bad ones fail.
            if len(to_send) == 1:
                doc_id = to_send[0][0]
                return {doc_id: DocResult(doc_id, Outcome.FAILED, _status_detail(resp))}
            out: dict[str, DocResult] = {}
            for item in to_send:
                out.update(await self._bulk_write([item]))
            return out
        self._unexpected(resp, what)

    def _bulk_results(
        self, resp: httpx.Response, what: str, ids: list[str]
    ) -> dict[str, DocResult]:
        data = self._json(resp, what)
        if not isinstance(data, list):
            self._fail(what, f"HTTP {resp.status_code} but the body is not a list of results")
        out: dict[str, DocResult] = {}
        wanted = set(ids)
        for item in data:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                self._fail(what, f"unexpected per-document result {str(item)[:200]!r}")
            doc_id = item["id"]
            if doc_id not in wanted:
                self._fail(what, f"a result for a record not sent: {doc_id[:100]!r}")
            if item.get("ok"):
                out[doc_id] = DocResult(doc_id, Outcome.STORED)
            elif item.get("error") == "conflict":
                out[doc_id] = DocResult(doc_id, Outcome.ALREADY_STORED)
            else:
                error = item.get("error")
                reason = (f"{str(error)[:_REASON_CHARS]}: "
                          f"{str(item.get('reason'))[:_REASON_CHARS]}")
                permanent = isinstance(error, str) and error in _PERMANENT_DOC_ERRORS
                out[doc_id] = DocResult(doc_id, Outcome.FAILED if permanent else Outcome.RETRY,
                                        reason)
        missing = [doc_id for doc_id in ids if doc_id not in out]
        if missing:
            self._fail(what, f"no result for {len(missing)} of {len(ids)} records")
        return out

    # ---- reads -----------------------------------------------------------------------

    async def get(self, doc_id: str) -> dict[str, Any] | None:
        what = "reading a record"
        resp = await self._request("GET", f"{self._db}/{quote(doc_id, safe='')}", what=what)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            self._unexpected(resp, what)
        doc = self._json(resp, what)
        if not isinstance(doc, dict):
            self._fail(what, "the document is not a JSON object")
        return _strip(doc)

    async def get_many(self, doc_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(doc_ids))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _GET_MANY_CHUNK):
            chunk = ids[start : start + _GET_MANY_CHUNK]
            what = f"reading {len(chunk)} records"
            resp = await self._request(
                "POST",
                f"{self._db}/_all_docs",
                what=what,
                params={"include_docs": "true"},
                content=json.dumps({"keys": chunk}).encode(),
            )
            if resp.status_code != 200:
                self._unexpected(resp, what)
            data = self._json(resp, what)
            rows = data.get("rows") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                self._fail(what, "the _all_docs answer has no rows")
            for row in rows:
                # Missing ids come back as {"key": id, "error": "not_found"}, deleted ones
                # with "doc": null.
                doc = row.get("doc") if isinstance(row, dict) else None
                if isinstance(doc, dict) and isinstance(row.get("id"), str):
                    found[row["id"]] = _strip(doc)
        return found

    async def count(self) -> int:
        what = "counting records"
        resp = await self._request("GET", self._db, what=what)
        if resp.status_code != 200:
            self._unexpected(resp, what)
        data = self._json(resp, what)
        n = data.get("doc_count") if isinstance(data, dict) else None
        if not isinstance(n, int):
            self._fail(what, "the database info has no doc_count")
        return n


def _document(doc: Mapping[str, Any], doc_id: str) -> bytes:
    """``doc`` as a CouchDB document with ``doc_id`` as its ``_id`` (a caller's ``_id`` and
    ``_rev`` dropped), compact UTF-8 JSON. Raises UnencodableRecord."""
    if isinstance(doc, EncodedRecord) and "_id" not in doc and "_rev" not in doc:
        return b"".join((memoryview(doc.data)[:-1], b',"_id":', encode_json(doc_id), b"}"))
    body = {k: v for k, v in doc.items() if k not in ("_id", "_rev")}
    body["_id"] = doc_id
    return encode_json(body)


def _doc_problem(doc: Mapping[str, Any], doc_id: str | None) -> str | None:
    """Why CouchDB would reject this record on its own, or None."""
    if doc_id is None:
        return "record has no string namespace/activationId"
    if doc_id.startswith("_"):
        return "CouchDB document ids may not start with '_'"
    reserved = sorted(
        k for k in doc if isinstance(k, str) and k.startswith("_") and k not in ("_id", "_rev")
    )
    if reserved:
        return f"CouchDB reserves top-level fields starting with '_': {', '.join(reserved)}"
    return None


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    doc.pop("_id", None)
    doc.pop("_rev", None)
    return doc


def _is_document_problem(resp: httpx.Response) -> bool:
    if resp.status_code in (400, 413):
        return True
    if resp.status_code == 500:
        try:
            error: object = resp.json().get("error")
            return error == "doc_validation"
        except (ValueError, AttributeError, RecursionError):
            return False
    return False


def _status_detail(resp: httpx.Response) -> str:
    detail = f"HTTP {resp.status_code}"
    try:
        body = resp.json()
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and ("error" in body or "reason" in body):
        detail += f" {str(body.get('error'))[:200]}: {str(body.get('reason'))[:200]}"
    if resp.status_code == 401:
        detail += " (check the user and password in the store URL)"
    return detail


def _describe_exc(exc: BaseException) -> str:
    # httpx messages name the error, not the URL, and our URLs carry no userinfo anyway.
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
