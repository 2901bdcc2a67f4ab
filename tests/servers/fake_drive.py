"""A small, in-memory fake of the Google Drive **v2** REST API.

It is meant to be driven by pydrive2's real client (``GoogleDrive`` and
``pydrive2.fs.GDriveFileSystem``) over real HTTP on 127.0.0.1, so that tests
exercise googleapiclient's request building, resumable uploads, ranged
downloads and pydrive2's retry/caching logic without touching Google.

What pydrive2 1.21 actually uses (and therefore what is implemented):

* discovery: ``googleapiclient.discovery.build("drive", "v2", ...)`` is called
  with ``static_discovery`` unset and no ``discoveryServiceUrl``, so the
  discovery document shipped inside googleapiclient is used and nothing is
  fetched.  The document is nevertheless served at
  ``/discovery/v1/apis/drive/v2/rest`` and ``/$discovery/rest?version=v2``
  (with ``rootUrl`` pointing at this server) for clients that do fetch it.
* ``GET    /drive/v2/files``                    files.list (``q``, paging)
* ``POST   /drive/v2/files``                    files.insert, metadata only
* ``POST   /upload/drive/v2/files``             files.insert with media
  (``uploadType=media|multipart|resumable``)
* ``PUT    /upload/drive/v2/files?upload_id=``  resumable chunk PUTs
* ``GET    /drive/v2/files/{id}``               files.get (``fields``)
* ``GET    /drive/v2/files/{id}?alt=media``     download, honours ``Range``
* ``PUT    /drive/v2/files/{id}``               files.update (metadata)
* ``PUT    /upload/drive/v2/files/{id}``        files.update with media
* ``PATCH  /drive/v2/files/{id}``               files.patch
* ``POST   /drive/v2/files/{id}/trash|untrash`` files.trash / files.untrash
* ``DELETE /drive/v2/files/{id}``               files.delete
* ``GET    /drive/v2/files/{id}/export``        always "not exportable"
* ``GET    /drive/v2/about``                    minimal about resource

Every file has an ``etag`` that changes with every change to it (content,
metadata, trash), as Drive v2's does. ``files.update`` and ``files.patch``
(metadata or media, resumable too) honour ``If-Match: <etag>`` like Drive v2:
412 ``conditionNotMet`` when the file's etag differs, checked atomically with
the change. A resumable upload is checked when it starts and again when it
completes (the stricter reading: Drive's documentation does not say; ckptstore
sends its conditional updates as one multipart request). ``If-Match`` anywhere
else, and ``If-None-Match``, are unsupported.

Anything else -- an unknown endpoint, query parameter, metadata key or ``q``
form -- is answered with an error *and* recorded in ``server.unsupported`` so
gaps are visible instead of silently "working".

Client side, :func:`make_google_auth` builds a real ``pydrive2.auth.GoogleAuth``
whose HTTP objects (both the one used to build the service and the per-thread
ones pydrive2 creates) are :class:`RoutedHttp` instances: they rewrite
``https://www.googleapis.com`` (and ``drive.googleapis.com``) to this server and
raise :class:`ExternalNetworkError` for any other host.  The credentials are
fake and raise :class:`FakeCredentialsRefreshError` instead of refreshing.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as _dt
import hashlib
import ipaddress
import json
import random
import re
import socket
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

FOLDER_MIME = "application/vnd.google-apps.folder"
GOOGLE_APPS_PREFIX = "application/vnd.google-apps."
PUBLIC_BASE = "https://www.googleapis.com"
ROUTED_HOSTS = frozenset({"www.googleapis.com", "drive.googleapis.com"})
DEFAULT_TOKEN = "fake-drive-access-token"
RESUMABLE_GRANULARITY = 256 * 1024
EMPTY_MD5 = hashlib.md5(b"").hexdigest()

# Drive's documented error shapes for the fault knobs:
# kind -> (HTTP status, domain, reason, message)
FAULT_KINDS: dict[str, tuple[int, str, str, str]] = {
    "userRateLimitExceeded": (
        403,
        "usageLimits",
        "userRateLimitExceeded",
        "User Rate Limit Exceeded",
    ),
    "rateLimitExceeded": (403, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded"),
    "429": (429, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded"),
    "backendError": (500, "global", "backendError", "Backend Error"),
    "internalError": (500, "global", "internalError", "Internal Error"),
}


class DriveError(Exception):
    """An error answered to the client in Drive's JSON error shape."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        domain: str = "global",
        location: str | None = None,
        location_type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.domain = domain
        self.location = location
        self.location_type = location_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "domain": self.domain,
            "reason": self.reason,
            "message": self.message,
        }
        if self.location is not None:
            err["locationType"] = self.location_type or "parameter"
            err["location"] = self.location
        return {"error": {"errors": [err], "code": self.status, "message": self.message}}


class Unsupported(DriveError):
    """Something the fake does not implement: 400 + recorded in server.unsupported."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, "fakeDriveUnsupported", "fake_drive unsupported: " + message)


def _not_found(file_id: str) -> DriveError:
    return DriveError(404, "notFound", f"File not found: {file_id}", location="fileId")


def _bad_request(message: str, location: str | None = None) -> DriveError:
    return DriveError(400, "badRequest", message, location=location)


# --------------------------------------------------------------------------
# Query language (files.list ``q``)
# --------------------------------------------------------------------------


class QueryError(Exception):
    pass


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<str>'(?:[^'\\]|\\.)*')
      | (?P<op>!=|<=|>=|=|<|>)
      | (?P<lp>\()
      | (?P<rp>\))
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)


def _tokenize(q: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    q = q.rstrip()
    while pos < len(q):
        m = _TOKEN_RE.match(q, pos)
        if not m or m.end() == pos:
            raise QueryError(f"cannot tokenize q at offset {pos}: {q[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "str":
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        out.append((kind, text))
    return out


# A compiled predicate: takes (FileEntry, root_id) and returns bool.
Pred = Callable[["FileEntry", str], bool]

_TEXT_FIELDS = {"title", "mimeType"}
_BOOL_FIELDS = {"trashed", "starred", "hidden"}


class _QueryParser:
    """Recursive descent parser for the subset of the Drive v2 query language.

    Supported terms: ``'<id>' in parents``, ``title = | != | contains '<s>'``,
    ``mimeType = | != | contains '<s>'``, ``trashed|starred|hidden = | != true|false``,
    combined with ``and``, ``or``, ``not`` and parentheses.  Everything else
    raises :class:`QueryError` (answered as 400 and recorded as unsupported).
    """

    def __init__(self, q: str, title_case_insensitive: bool):
        self.toks = _tokenize(q)
        self.i = 0
        self.ci = title_case_insensitive
        self.terms: list[str] = []

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise QueryError("unexpected end of query")
        self.i += 1
        return tok

    def is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "word" and tok[1].lower() == word

    def parse(self) -> Pred:
        if not self.toks:
            raise QueryError("empty query")
        pred = self.or_expr()
        if self.peek() is not None:
            raise QueryError(f"unexpected token {self.peek()[1]!r}")
        return pred

    def or_expr(self) -> Pred:
        preds = [self.and_expr()]
        while self.is_word("or"):
            self.take()
            preds.append(self.and_expr())
        if len(preds) == 1:
            return preds[0]
        return lambda f, root, ps=tuple(preds): any(p(f, root) for p in ps)

    def and_expr(self) -> Pred:
        preds = [self.unary()]
        while self.is_word("and"):
            self.take()
            preds.append(self.unary())
        if len(preds) == 1:
            return preds[0]
        return lambda f, root, ps=tuple(preds): all(p(f, root) for p in ps)

    def unary(self) -> Pred:
        if self.is_word("not"):
            self.take()
            inner = self.unary()
            return lambda f, root: not inner(f, root)
        tok = self.peek()
        if tok is not None and tok[0] == "lp":
            self.take()
            inner = self.or_expr()
            if self.take()[0] != "rp":
                raise QueryError("expected ')'")
            return inner
        return self.term()

    def term(self) -> Pred:
        kind, text = self.take()
        if kind == "str":
            value = text
            if not self.is_word("in"):
                raise QueryError(f"expected 'in' after string literal {value!r}")
            self.take()
            kind2, coll = self.take()
            if kind2 != "word" or coll != "parents":
                raise QueryError(f"unsupported collection {coll!r} (only 'parents')")
            self.terms.append("in parents")
            return lambda f, root: (root if value == "root" else value) in f.parents
        if kind != "word":
            raise QueryError(f"unexpected token {text!r}")
        fld = text
        if fld not in _TEXT_FIELDS and fld not in _BOOL_FIELDS:
            raise QueryError(f"unsupported field {fld!r}")
        op_kind, op = self.take()
        if op_kind == "word" and op.lower() == "contains":
            op = "contains"
        elif op_kind != "op" or op not in ("=", "!="):
            raise QueryError(f"unsupported operator {op!r} for {fld}")
        vkind, vtext = self.take()
        self.terms.append(f"{fld} {op}")
        if fld in _BOOL_FIELDS:
            if op == "contains" or vkind != "word" or vtext.lower() not in ("true", "false"):
                raise QueryError(f"{fld} needs = or != with bare true/false, got {op} {vtext!r}")
            want = vtext.lower() == "true"
            attr = fld
            if op == "=":
                return lambda f, root: f.label(attr) == want
            return lambda f, root: f.label(attr) != want
        if vkind != "str":
            raise QueryError(f"{fld} needs a quoted string value, got {vtext!r}")
        ci = self.ci and fld == "title"

        def norm(s: str) -> str:
            return s.lower() if ci or op == "contains" else s

        value = norm(vtext)
        getter = (lambda f: f.title) if fld == "title" else (lambda f: f.mime_type)
        if op == "=":
            return lambda f, root: norm(getter(f)) == value
        if op == "!=":
            return lambda f, root: norm(getter(f)) != value
        return lambda f, root: value in norm(getter(f))


def parse_query(q: str, title_case_insensitive: bool = True) -> Pred:
    return _QueryParser(q, title_case_insensitive).parse()


# --------------------------------------------------------------------------
# Partial responses (``fields=``)
# --------------------------------------------------------------------------


def _parse_fields(spec: str) -> dict[str, Any]:
    """Parse ``a,b/c,items(id,title)`` into a nested dict (``None`` = whole value)."""
    pos = 0

    def parse_list(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(spec):
            m = re.match(
                r"\s*([A-Za-z_*][A-Za-z0-9_]*(?:/[A-Za-z_*][A-Za-z0-9_]*)*)\s*", spec[pos:]
            )
            if not m:
                raise QueryError(f"bad fields spec near {spec[pos:]!r}")
            pos += m.end()
            path = m.group(1).split("/")
            sub: Any = None
            if pos < len(spec) and spec[pos] == "(":
                pos += 1
                sub = parse_list(")")
            node = out
            for part in path[:-1]:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            node[path[-1]] = sub
            if pos < len(spec) and spec[pos] == ",":
                pos += 1
                continue
            if end and pos < len(spec) and spec[pos] == end:
                pos += 1
                return out
            if pos < len(spec):
                raise QueryError(f"bad fields spec near {spec[pos:]!r}")
        if end:
            raise QueryError("unbalanced parentheses in fields")
        return out

    return parse_list(None)


def _apply_fields(value: Any, sel: dict[str, Any] | None) -> Any:
    if sel is None or "*" in sel:
        return value
    if isinstance(value, list):
        return [_apply_fields(v, sel) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: _apply_fields(value[k], sub) for k, sub in sel.items() if k in value}


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class FileEntry:
    id: str
    title: str
    mime_type: str
    parents: list[str]
    content: bytes | None = None
    trashed: bool = False
    explicitly_trashed: bool = False
    starred: bool = False
    hidden: bool = False
    description: str | None = None
    created: str = field(default_factory=_now)
    modified: str = field(default_factory=_now)
    version: int = 1
    seq: int = 0
    md5: str | None = None

    @property
    def is_folder(self) -> bool:
        return self.mime_type == FOLDER_MIME

    @property
    def has_blob(self) -> bool:
        return not self.mime_type.startswith(GOOGLE_APPS_PREFIX)

    def label(self, name: str) -> bool:
        return bool(getattr(self, name))

    def set_content(self, data: bytes) -> None:
        self.content = data
        self.md5 = hashlib.md5(data).hexdigest()
        self.touch()

    def touch(self) -> None:
        self.modified = _now()
        self.version += 1


@dataclass
class UploadSession:
    upload_id: str
    metadata: dict[str, Any]
    target_id: str | None  # None: files.insert; else files.update of that id
    mime_type: str | None
    total: int | None
    query: dict[str, str]
    data: bytearray = field(default_factory=bytearray)
    result_id: str | None = None
    chunks: int = 0
    if_match: str | None = None  # checked again when the upload completes


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body_len: int = 0
    status: int | None = None
    fault: str | None = None
    #: Title of the file the request is about, where the URL says which one
    #: (``files/{id}...`` and resumable-upload chunks): lets faults aim at one file.
    title: str | None = None


@dataclass
class Fault:
    kind: str
    remaining: int | None  # None = unlimited (rate based)
    rate: float | None = None
    method: str | None = None
    path: str | None = None  # regex, searched in the request path
    predicate: Callable[[RequestRecord], bool] | None = None
    served: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def matches(self, rec: RequestRecord) -> bool:
        if self.method and rec.method != self.method.upper():
            return False
        if self.path and not re.search(self.path, rec.path):
            return False
        return self.predicate is None or bool(self.predicate(rec))


# --------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------

_COMMON_PARAMS = {
    "alt",
    "fields",
    "prettyPrint",
    "key",
    "quotaUser",
    "userIp",
    "oauth_token",
    "access_token",
}
_DRIVE_FLAGS = {"supportsAllDrives", "supportsTeamDrives"}
_LIST_PARAMS = (
    _COMMON_PARAMS
    | _DRIVE_FLAGS
    | {
        "q",
        "maxResults",
        "pageToken",
        "corpora",
        "corpus",
        "driveId",
        "teamDriveId",
        "includeItemsFromAllDrives",
        "includeTeamDriveItems",
        "spaces",
        "projection",
        "orderBy",
    }
)
_GET_PARAMS = (
    _COMMON_PARAMS
    | _DRIVE_FLAGS
    | {
        "acknowledgeAbuse",
        "projection",
        "revisionId",
        "updateViewedDate",
        "source",
        "includePermissionsForView",
        "includeLabels",
    }
)
_INSERT_PARAMS = (
    _COMMON_PARAMS
    | _DRIVE_FLAGS
    | {
        "uploadType",
        "convert",
        "ocr",
        "pinned",
        "useContentAsIndexableText",
        "visibility",
        "enforceSingleParent",
        "upload_id",
        "includePermissionsForView",
        "includeLabels",
    }
)
_UPDATE_PARAMS = _INSERT_PARAMS | {
    "addParents",
    "removeParents",
    "newRevision",
    "setModifiedDate",
    "updateViewedDate",
    "modifiedDateBehavior",
}
_SIMPLE_PARAMS = _COMMON_PARAMS | _DRIVE_FLAGS
_WRITABLE_KEYS = {
    "id",
    "title",
    "mimeType",
    "parents",
    "description",
    "labels",
    "modifiedDate",
    "originalFilename",
    "properties",
    "kind",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY every
    # keep-alive response would stall ~40 ms on Nagle + delayed ACK.
    disable_nagle_algorithm = True
    server: _HTTPServer

    # quiet
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing -------------------------------------------------------

    def _body_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Unsupported("chunked request bodies", status=411)
        return int(self.headers.get("Content-Length") or 0)

    def _read_body(self) -> bytes:
        n = self._remaining_body
        out = bytearray()
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("client closed connection mid-body")
            out += chunk
            n -= len(chunk)
        self._remaining_body = 0
        return bytes(out)

    def _drain(self) -> None:
        with contextlib.suppress(Exception):
            n = self._remaining_body
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 20))
                if not chunk:
                    break
                n -= len(chunk)
            self._remaining_body = 0

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        self._drain()
        self._record.status = status  # before the client can see the response
        self.send_response(status, reason)
        hdrs = {"Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            view = memoryview(body)
            for i in range(0, len(view), 1 << 20):
                self.wfile.write(view[i : i + (1 << 20)])

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, indent=1).encode() if obj is not None else b""
        hdrs = {"Content-Type": "application/json; charset=UTF-8"}
        hdrs.update(headers or {})
        self._send(status, body, hdrs)

    def _send_error(self, err: DriveError) -> None:
        self._send_json(err.status, err.body(), err.headers)

    def _dispatch(self) -> None:
        srv: FakeDriveServer = self.server.fake
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self._remaining_body = 0
        headers = {
            k.lower(): v
            for k, v in self.headers.items()
            if k.lower()
            in (
                "range",
                "content-range",
                "content-type",
                "x-upload-content-type",
                "x-upload-content-length",
                "x-http-method-override",
                "if-match",
                "if-none-match",
            )
        }
        rec = RequestRecord(self.command, parts.path, query, headers)
        self._record = rec
        try:
            self._remaining_body = self._body_length()
            rec.body_len = self._remaining_body
            method = self.command
            override = self.headers.get("X-HTTP-Method-Override")
            if override:
                # googleapiclient turns over-long GETs into POST + form body.
                if method != "POST" or override.upper() != "GET":
                    raise Unsupported(f"X-HTTP-Method-Override {override} on {method}")
                form = self._read_body().decode()
                query.update({k: v[-1] for k, v in parse_qs(form, keep_blank_values=True).items()})
                method = "GET"
                rec.method = "GET"
            rec.title = srv._title_for(parts.path, query)
            srv._log(rec)
            fault = srv._pick_fault(rec)
            if fault is not None:
                rec.fault = fault
                status, domain, reason, message = FAULT_KINDS[fault]
                self._send_error(DriveError(status, reason, message, domain=domain))
                return
            self._route(srv, method, parts.path, query)
        except DriveError as err:
            if isinstance(err, Unsupported):
                srv._unsupported(f"{self.command} {self.path}: {err.message}")
            self._send_error(err)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:  # a bug in the fake: make it loud, never retried (400)
            tb = traceback.format_exc()
            srv._internal_error(f"{self.command} {self.path}\n{tb}")
            with contextlib.suppress(Exception):
                self._send_error(
                    DriveError(400, "fakeDriveInternalError", "fake_drive crashed:\n" + tb)
                )
            self.close_connection = True

    def _check_auth(self, srv: FakeDriveServer) -> None:
        if srv.access_token is None:
            return
        if self.headers.get("Authorization") != f"Bearer {srv.access_token}":
            raise DriveError(
                401,
                "authError",
                "Invalid Credentials",
                location="Authorization",
                location_type="header",
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )

    @staticmethod
    def _check_params(query: dict[str, str], allowed: set[str], what: str) -> None:
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise Unsupported(f"query parameter(s) {unknown} for {what}")

    def _route(self, srv: FakeDriveServer, method: str, path: str, query: dict[str, str]) -> None:
        # Discovery documents do not need auth.
        if method == "GET" and path in ("/discovery/v1/apis/drive/v2/rest", "/$discovery/rest"):
            if path == "/$discovery/rest" and query.get("version") != "v2":
                raise Unsupported(f"discovery for version {query.get('version')!r}", status=404)
            self._send_json(200, srv.discovery_document())
            return
        self._check_auth(srv)
        if query.get("alt") not in (None, "json", "media"):
            raise Unsupported(f"alt={query.get('alt')}")
        if_match = self.headers.get("If-Match")
        if self.headers.get("If-None-Match") is not None:
            raise Unsupported(f"If-None-Match on {method} {path}")
        updates_a_file = (
            method in ("PUT", "PATCH")
            and "upload_id" not in query
            and re.fullmatch(r"/(?:(?:resumable/)?upload/)?drive/v2/files/[^/]+", path)
        )
        if if_match is not None and not updates_a_file:
            raise Unsupported(f"If-Match on {method} {path}")

        if path == "/drive/v2/about" and method == "GET":
            self._check_params(
                query,
                _SIMPLE_PARAMS | {"includeSubscribed", "maxChangeIdCount", "startChangeId"},
                "about.get",
            )
            self._send_json(200, _apply_fields(srv.about(), self._fields(query)))
            return
        if path == "/drive/v2/files":
            if method == "GET":
                self._check_params(query, _LIST_PARAMS, "files.list")
                self._send_json(200, _apply_fields(srv._list(query), self._fields(query)))
                return
            if method == "POST":
                self._check_params(
                    query, _INSERT_PARAMS - {"uploadType", "upload_id"}, "files.insert"
                )
                meta = self._json_body()
                res = srv._insert(meta, None)
                self._send_json(200, _apply_fields(res, self._fields(query)))
                return
        if path in ("/upload/drive/v2/files", "/resumable/upload/drive/v2/files"):
            if method == "POST":
                self._check_params(query, _INSERT_PARAMS, "files.insert (upload)")
                self._media_upload(srv, query, None)
                return
            if method == "PUT" and "upload_id" in query:
                self._resumable_put(srv, query)
                return
        m = re.fullmatch(r"/(?:resumable/)?upload/drive/v2/files/([^/]+)", path)
        if m and method == "PUT":
            if "upload_id" in query:
                self._resumable_put(srv, query)
                return
            self._check_params(query, _UPDATE_PARAMS, "files.update (upload)")
            self._media_upload(srv, query, m.group(1), if_match)
            return
        m = re.fullmatch(r"/drive/v2/files/([^/]+)(/trash|/untrash|/export)?", path)
        if m:
            file_id, action = m.group(1), m.group(2)
            if action is None and method == "GET":
                self._check_params(query, _GET_PARAMS, "files.get")
                if query.get("alt") == "media":
                    self._download(srv, file_id)
                else:
                    self._send_json(200, _apply_fields(srv._get(file_id), self._fields(query)))
                return
            if action is None and method in ("PUT", "PATCH"):
                allowed = _UPDATE_PARAMS - {"uploadType", "upload_id"}
                self._check_params(
                    query, allowed, f"files.{'update' if method == 'PUT' else 'patch'}"
                )
                meta = self._json_body()
                res = srv._update(file_id, meta, query, None, if_match=if_match)
                self._send_json(200, _apply_fields(res, self._fields(query)))
                return
            if action is None and method == "DELETE":
                self._check_params(query, _SIMPLE_PARAMS | {"enforceSingleParent"}, "files.delete")
                srv._delete(file_id)
                self._send(204)
                return
            if action in ("/trash", "/untrash") and method == "POST":
                self._check_params(
                    query,
                    _SIMPLE_PARAMS | {"includeLabels", "includePermissionsForView"},
                    "files." + action[1:],
                )
                res = srv._set_trashed(file_id, action == "/trash")
                self._send_json(200, _apply_fields(res, self._fields(query)))
                return
            if action == "/export" and method == "GET":
                self._check_params(query, _SIMPLE_PARAMS | {"mimeType"}, "files.export")
                srv._get(file_id)  # 404 if missing
                raise DriveError(
                    403, "fileNotExportable", "Export only supports Docs Editors files."
                )
        raise Unsupported(f"endpoint {method} {path}", status=404)

    def _fields(self, query: dict[str, str]) -> dict[str, Any] | None:
        spec = query.get("fields")
        if not spec:
            return None
        try:
            return _parse_fields(spec)
        except QueryError as exc:
            raise DriveError(
                400, "invalidParameter", f"Invalid field selection {spec}: {exc}", location="fields"
            ) from None

    def _json_body(self) -> dict[str, Any]:
        raw = self._read_body()
        if not raw:
            return {}
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("application/json"):
            raise Unsupported(f"metadata body with Content-Type {ctype!r}")
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise _bad_request(f"Parse Error: {exc}") from None
        if not isinstance(obj, dict):
            raise _bad_request("Parse Error: body must be a JSON object")
        return obj

    # -- uploads ----------------------------------------------------------

    def _media_upload(
        self,
        srv: FakeDriveServer,
        query: dict[str, str],
        target_id: str | None,
        if_match: str | None = None,
    ) -> None:
        upload_type = query.get("uploadType")
        if target_id is not None:
            srv._check_if_match(srv._entry(target_id), if_match)  # 404 / 412 early
        if upload_type == "media":
            data = self._read_body()
            mime = self.headers.get("Content-Type")
            res = srv._store_upload({}, target_id, mime, data, query, if_match)
            self._send_json(200, _apply_fields(res, self._fields(query)))
        elif upload_type == "multipart":
            meta, mime, data = _parse_multipart(
                self.headers.get("Content-Type", ""), self._read_body()
            )
            res = srv._store_upload(meta, target_id, mime, data, query, if_match)
            self._send_json(200, _apply_fields(res, self._fields(query)))
        elif upload_type == "resumable":
            meta = self._json_body()
            total_hdr = self.headers.get("X-Upload-Content-Length")
            total = int(total_hdr) if total_hdr is not None else None
            sess = srv._new_session(
                meta, target_id, self.headers.get("X-Upload-Content-Type"), total, query
            )
            sess.if_match = if_match
            loc_q = {"uploadType": "resumable", "upload_id": sess.upload_id}
            loc_path = "/upload/drive/v2/files" + (f"/{target_id}" if target_id else "")
            location = f"{PUBLIC_BASE}{loc_path}?{urlencode(loc_q)}"
            self._send(200, b"", {"Location": location, "X-GUploader-UploadID": sess.upload_id})
        else:
            raise Unsupported(f"uploadType={upload_type!r}")

    def _resumable_put(self, srv: FakeDriveServer, query: dict[str, str]) -> None:
        sess = srv._session(query["upload_id"])
        n = self._remaining_body
        crange = self.headers.get("Content-Range")
        if crange is None:
            start, end, total = (
                (0, n - 1, n) if n else (None, None, sess.total if sess.total is not None else 0)
            )
        else:
            m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", crange.strip())
            if not m:
                raise _bad_request(f"Invalid Content-Range header: {crange}")
            start = int(m.group(1)) if m.group(1) is not None else None
            end = int(m.group(2)) if m.group(2) is not None else None
            total = int(m.group(3)) if m.group(3) != "*" else None
        if sess.total is not None and total is not None and total != sess.total:
            raise _bad_request(
                f"Content-Range total {total} != X-Upload-Content-Length {sess.total}"
            )
        if total is not None:
            sess.total = total
        if sess.result_id is not None:  # already finished: report the resource again
            self._send_json(200, srv._get(sess.result_id))
            return
        if start is not None:
            if start != len(sess.data):
                raise _bad_request(
                    f"fake_drive: chunk starts at {start} but session holds {len(sess.data)} bytes"
                )
            if end - start + 1 != n:
                raise _bad_request(f"Content-Range {crange} does not match body length {n}")
            is_last = sess.total is not None and end + 1 == sess.total
            if not is_last and n % RESUMABLE_GRANULARITY:
                raise _bad_request(
                    f"Non-final chunk of {n} bytes is not a multiple of {RESUMABLE_GRANULARITY}"
                )
            remaining = n
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError("client closed connection mid-chunk")
                sess.data += chunk
                remaining -= len(chunk)
            self._remaining_body = 0
            sess.chunks += 1
        elif n:
            raise _bad_request("Content-Range 'bytes */N' must have an empty body")
        if sess.total is not None and len(sess.data) == sess.total:
            res = srv._finish_session(sess)
            self._send_json(200, _apply_fields(res, self._fields(sess.query)))
            return
        hdrs = {"Content-Type": "text/plain; charset=utf-8"}
        if sess.data:
            hdrs["Range"] = f"bytes=0-{len(sess.data) - 1}"
        self._send(308, b"", hdrs, reason="Resume Incomplete")

    # -- download ---------------------------------------------------------

    def _download(self, srv: FakeDriveServer, file_id: str) -> None:
        entry = srv._entry(file_id)
        if entry.is_folder or not entry.has_blob:
            raise DriveError(
                403,
                "fileNotDownloadable",
                "Only files with binary content can be downloaded. "
                "Use Export with Docs Editors files.",
                location="alt",
            )
        data = entry.content or b""
        size = len(data)
        rng = self.headers.get("Range")
        base_headers = {
            "Content-Type": entry.mime_type,
            "ETag": f'"{entry.md5}"',
            "Accept-Ranges": "bytes",
        }
        if not rng:
            self._send(200, data, base_headers)
            return
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        if not m or (m.group(1) == "" and m.group(2) == ""):
            raise Unsupported(f"Range header {rng!r}")
        if m.group(1) == "":  # suffix range
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            hdrs = {
                "Content-Range": f"bytes */{size}",
                "Content-Type": "application/json; charset=UTF-8",
            }
            body = DriveError(
                416, "requestedRangeNotSatisfiable", "Request range not satisfiable"
            ).body()
            self._send(416, json.dumps(body).encode(), hdrs)
            return
        hdrs = dict(base_headers)
        hdrs["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(206, data[start : end + 1], hdrs)


def _parse_multipart(ctype: str, body: bytes) -> tuple[dict[str, Any], str | None, bytes]:
    m = re.match(r'multipart/related;\s*boundary="?([^";]+)"?', ctype)
    if not m:
        raise _bad_request(f"multipart upload needs multipart/related, got {ctype!r}")
    delim = b"--" + m.group(1).encode()
    pieces = body.split(delim)
    # pieces: [preamble, part1, part2, '--\r\n' epilogue]
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece.lstrip(b"\n")
        head, sep, payload = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = piece.partition(b"\n\n")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        elif payload.endswith(b"\n"):
            payload = payload[:-1]
        hdrs = {}
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        parts.append((hdrs, payload))
    if len(parts) != 2:
        raise _bad_request(f"multipart upload must have exactly 2 parts, got {len(parts)}")
    (h1, p1), (h2, p2) = parts
    if not h1.get("content-type", "").startswith("application/json"):
        raise _bad_request("first multipart part must be application/json metadata")
    enc = h2.get("content-transfer-encoding", "binary").lower()
    if enc == "base64":
        p2 = base64.b64decode(p2)
    elif enc not in ("binary", "8bit", "7bit"):
        raise Unsupported(f"Content-Transfer-Encoding {enc}")
    return json.loads(p1 or b"{}"), h2.get("content-type"), p2


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeDriveServer


# --------------------------------------------------------------------------
# The server object tests talk to
# --------------------------------------------------------------------------


class FakeDriveServer:
    """In-memory Drive v2 on ``http://127.0.0.1:<free port>``.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        access_token: str | None = DEFAULT_TOKEN,
        seed: int = 0,
        title_case_insensitive: bool = True,
        page_size_cap: int | None = None,
    ):
        self.access_token = access_token
        self.title_case_insensitive = title_case_insensitive
        #: Drive "may return fewer items than maxResults": cap pages to force paging.
        self.page_size_cap = page_size_cap
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._files: dict[str, FileEntry] = {}
        self._sessions: dict[str, UploadSession] = {}
        self._seq = 0
        self._faults: list[Fault] = []
        self.request_log: list[RequestRecord] = []
        #: Every request answered because the fake lacks a feature.
        self.unsupported: list[str] = []
        #: Tracebacks of crashes inside the fake (answered as 400, never retried).
        self.internal_errors: list[str] = []
        #: kind -> number of injected faults served
        self.fault_counts: dict[str, int] = {}
        self._damage_uploads: dict[str, Callable[[bytes], bytes]] = {}
        self.root_id = "0A" + self._rand_id(17)
        self._files[self.root_id] = FileEntry(self.root_id, "My Drive", FOLDER_MIME, [])
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> FakeDriveServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-drive", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeDriveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- fault knobs --------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        kind: str = "userRateLimitExceeded",
        *,
        method: str | None = None,
        path: str | None = None,
        predicate: Callable[[RequestRecord], bool] | None = None,
    ) -> Fault:
        """Answer the next ``n`` matching requests with fault ``kind`` (see FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(FAULT_KINDS)}")
        fault = Fault(kind, n, None, method, path, predicate)
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail_rate(
        self,
        rate: float,
        kind: str = "userRateLimitExceeded",
        *,
        seed: int = 0,
        method: str | None = None,
        path: str | None = None,
        predicate: Callable[[RequestRecord], bool] | None = None,
    ) -> Fault:
        """Answer each matching request with fault ``kind`` with probability ``rate``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind, None, rate, method, path, predicate, rng=random.Random(seed))
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults_served(self) -> int:
        return sum(self.fault_counts.values())

    def _title_for(self, path: str, query: dict[str, str]) -> str | None:
        with self._lock:
            if "upload_id" in query:
                sess = self._sessions.get(query["upload_id"])
                return None if sess is None else sess.metadata.get("title")
            m = re.match(r"/(?:upload/)?drive/v2/files/([^/]+)", path)
            entry = self._files.get(self._resolve(m.group(1))) if m else None
            return None if entry is None else entry.title

    def _pick_fault(self, rec: RequestRecord) -> str | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(rec):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                elif fault.rng.random() >= (fault.rate or 0.0):
                    continue
                fault.served += 1
                self.fault_counts[fault.kind] = self.fault_counts.get(fault.kind, 0) + 1
                return fault.kind
        return None

    # -- request log ----------------------------------------------------------

    def _log(self, rec: RequestRecord) -> None:
        with self._lock:
            self.request_log.append(rec)

    def _unsupported(self, msg: str) -> None:
        with self._lock:
            self.unsupported.append(msg)

    def _internal_error(self, msg: str) -> None:
        with self._lock:
            self.internal_errors.append(msg)

    def requests(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        """Logged requests, optionally filtered by method and a regex searched in the path."""
        with self._lock:
            log = list(self.request_log)
        return [
            r
            for r in log
            if (method is None or r.method == method) and (path is None or re.search(path, r.path))
        ]

    def clear_log(self) -> None:
        with self._lock:
            self.request_log.clear()

    # -- direct state access for test setup/assertions ----------------------

    def _rand_id(self, n: int) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        return "".join(self._rng.choice(alphabet) for _ in range(n))

    def _new_id(self) -> str:
        while True:
            fid = "1" + self._rand_id(32)  # shape of real Drive file ids
            if fid not in self._files:
                return fid

    def _resolve(self, file_id: str) -> str:
        return self.root_id if file_id == "root" else file_id

    def _entry(self, file_id: str) -> FileEntry:
        with self._lock:
            entry = self._files.get(self._resolve(file_id))
            if entry is None:
                raise _not_found(file_id)
            return entry

    def create_folder(self, title: str, parent: str = "root") -> str:
        return self._insert(
            {"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent}]}, None
        )["id"]

    def create_file(
        self,
        title: str,
        content: bytes = b"",
        parent: str = "root",
        mime_type: str = "application/octet-stream",
    ) -> str:
        return self._store_upload(
            {"title": title, "parents": [{"id": parent}]}, None, mime_type, content, {}
        )["id"]

    def trash(self, file_id: str) -> None:
        self._set_trashed(file_id, True)

    def metadata(self, file_id: str) -> dict[str, Any]:
        return self._get(file_id)

    def content(self, file_id: str) -> bytes:
        return self._entry(file_id).content or b""

    def find(
        self, title: str | None = None, parent: str | None = None, trashed: bool | None = None
    ) -> list[dict[str, Any]]:
        """Resources matching the filters, in creation order."""
        with self._lock:
            parent = self._resolve(parent) if parent else None
            out = [
                self._resource(f)
                for f in sorted(self._files.values(), key=lambda f: f.seq)
                if f.id != self.root_id
                and (title is None or f.title == title)
                and (parent is None or parent in f.parents)
                and (trashed is None or f.trashed == trashed)
            ]
        return out

    def discovery_document(self) -> dict[str, Any]:
        from googleapiclient import discovery_cache

        doc_path = Path(discovery_cache.__file__).parent / "documents" / "drive.v2.json"
        doc = json.loads(doc_path.read_text())
        doc["rootUrl"] = self.url + "/"
        doc["baseUrl"] = self.url + "/drive/v2/"
        doc["mtlsRootUrl"] = self.url + "/"
        return doc

    def about(self) -> dict[str, Any]:
        return {
            "kind": "drive#about",
            "name": "Fake User",
            "rootFolderId": self.root_id,
            "user": {
                "kind": "drive#user",
                "displayName": "Fake User",
                "isAuthenticatedUser": True,
                "emailAddress": "fake@example.com",
            },
            "quotaBytesTotal": str(15 * 1024**3),
            "quotaBytesUsed": str(sum(len(f.content or b"") for f in self._files.values())),
        }

    # -- resource rendering -------------------------------------------------

    def _parent_ref(self, pid: str, child: str) -> dict[str, Any]:
        return {
            "kind": "drive#parentReference",
            "id": pid,
            "selfLink": f"{PUBLIC_BASE}/drive/v2/files/{child}/parents/{pid}",
            "parentLink": f"{PUBLIC_BASE}/drive/v2/files/{pid}",
            "isRoot": pid == self.root_id,
        }

    @staticmethod
    def _etag(f: FileEntry) -> str:
        return f'"{f.id[-8:]}{f.version}"'  # f.version counts every change to the file

    def _check_if_match(self, entry: FileEntry, if_match: str | None) -> None:
        """Drive v2's answer to ``If-Match`` naming another version of the file."""
        if if_match is not None and if_match not in ("*", self._etag(entry)):
            raise DriveError(
                412,
                "conditionNotMet",
                "Precondition Failed",
                location="If-Match",
                location_type="header",
            )

    def _resource(self, f: FileEntry) -> dict[str, Any]:
        res: dict[str, Any] = {
            "kind": "drive#file",
            "id": f.id,
            "etag": self._etag(f),
            "selfLink": f"{PUBLIC_BASE}/drive/v2/files/{f.id}",
            "alternateLink": f"https://drive.google.com/file/d/{f.id}/view?usp=drivesdk",
            "title": f.title,
            "mimeType": f.mime_type,
            "labels": {
                "starred": f.starred,
                "hidden": f.hidden,
                "trashed": f.trashed,
                "restricted": False,
                "viewed": True,
            },
            "createdDate": f.created,
            "modifiedDate": f.modified,
            "modifiedByMeDate": f.modified,
            "lastViewedByMeDate": f.modified,
            "markedViewedByMeDate": "1970-01-01T00:00:00.000Z",
            "version": str(f.version),
            "parents": [self._parent_ref(p, f.id) for p in f.parents],
            "userPermission": {
                "kind": "drive#permission",
                "id": "me",
                "type": "user",
                "role": "owner",
            },
            "ownerNames": ["Fake User"],
            "editable": True,
            "copyable": not f.is_folder,
            "writersCanShare": True,
            "shared": False,
            "explicitlyTrashed": f.explicitly_trashed,
            "appDataContents": False,
            "spaces": ["drive"],
            "quotaBytesUsed": str(len(f.content or b"")),
        }
        if f.id == self.root_id:
            res["parents"] = []
        if f.description is not None:
            res["description"] = f.description
        if f.has_blob and not f.is_folder:
            data = f.content or b""
            res.update(
                {
                    "downloadUrl": (
                        f"{PUBLIC_BASE}/drive/v2/files/{f.id}?alt=media&source=downloadUrl"
                    ),
                    "webContentLink": f"https://drive.google.com/uc?id={f.id}&export=download",
                    "originalFilename": f.title,
                    "md5Checksum": f.md5 or EMPTY_MD5,
                    "fileSize": str(len(data)),
                    "headRevisionId": f"0B{f.id[2:12]}{f.version}",
                }
            )
            if "." in f.title:
                ext = f.title.rsplit(".", 1)[1]
                res["fileExtension"] = ext
                res["fullFileExtension"] = f.title.split(".", 1)[1]
        return res

    # -- operations (called by the handler; raise DriveError) ----------------

    def _validate_meta(self, meta: dict[str, Any]) -> None:
        unknown = sorted(set(meta) - _WRITABLE_KEYS)
        if unknown:
            raise Unsupported(f"metadata key(s) {unknown}")
        labels = meta.get("labels")
        if labels is not None and (
            not isinstance(labels, dict)
            or set(labels) - {"trashed", "starred", "hidden", "viewed", "restricted"}
        ):
            raise Unsupported(f"labels {labels!r}")

    def _parent_ids(self, parents: Any) -> list[str]:
        if not isinstance(parents, list) or not all(
            isinstance(p, dict) and "id" in p for p in parents
        ):
            raise _bad_request("parents must be a list of {'id': ...} objects", location="parents")
        ids = []
        for p in parents:
            pid = self._resolve(p["id"])
            parent = self._files.get(pid)
            if parent is None:
                raise _not_found(p["id"])
            if not parent.is_folder:
                raise DriveError(400, "invalidParent", f"The parent {p['id']} is not a folder")
            if pid not in ids:
                ids.append(pid)
        return ids

    def _insert(
        self, meta: dict[str, Any], data: bytes | None, mime: str | None = None
    ) -> dict[str, Any]:
        self._validate_meta(meta)
        with self._lock:
            parents = self._parent_ids(meta["parents"]) if meta.get("parents") else [self.root_id]
            fid = meta.get("id")
            if fid is not None:
                if fid in self._files:
                    raise DriveError(
                        409, "duplicate", "A file already exists with the provided ID."
                    )
            else:
                fid = self._new_id()
            mime_type = meta.get("mimeType") or mime or "application/octet-stream"
            if data is not None and mime_type.startswith(GOOGLE_APPS_PREFIX):
                raise Unsupported(f"content upload/conversion to {mime_type}")
            self._seq += 1
            entry = FileEntry(
                fid,
                meta.get("title") or "Untitled",
                mime_type,
                parents,
                description=meta.get("description"),
                seq=self._seq,
            )
            labels = meta.get("labels") or {}
            entry.starred = bool(labels.get("starred", False))
            entry.hidden = bool(labels.get("hidden", False))
            if labels.get("trashed"):
                entry.trashed = entry.explicitly_trashed = True
            if entry.has_blob and not entry.is_folder:
                entry.set_content(data or b"")
                entry.version = 1
            self._files[fid] = entry
            return self._resource(entry)

    def _get(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            return self._resource(self._entry(file_id))

    def _update(
        self,
        file_id: str,
        meta: dict[str, Any],
        query: dict[str, str],
        data: bytes | None,
        mime: str | None = None,
        *,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        self._validate_meta(meta)
        with self._lock:
            entry = self._entry(file_id)
            self._check_if_match(entry, if_match)
            if entry.id == self.root_id:
                raise DriveError(
                    403, "insufficientPermissions", "The root folder cannot be modified"
                )
            if meta.get("id") not in (None, entry.id):
                raise _bad_request("id cannot be changed")
            if "parents" in meta:
                entry.parents = self._parent_ids(meta["parents"])
            for pid in filter(None, query.get("addParents", "").split(",")):
                entry.parents = list(dict.fromkeys(entry.parents + self._parent_ids([{"id": pid}])))
            for pid in filter(None, query.get("removeParents", "").split(",")):
                entry.parents = [p for p in entry.parents if p != self._resolve(pid)]
            if "title" in meta:
                entry.title = meta["title"]
            if "description" in meta:
                entry.description = meta["description"]
            if meta.get("mimeType"):
                if (meta["mimeType"] == FOLDER_MIME) != entry.is_folder:
                    raise _bad_request("cannot convert between folder and file")
                entry.mime_type = meta["mimeType"]
            elif mime and data is not None and not entry.is_folder:
                entry.mime_type = mime
            labels = meta.get("labels") or {}
            if "trashed" in labels:
                self._trash_tree(entry, bool(labels["trashed"]))
            entry.starred = bool(labels.get("starred", entry.starred))
            entry.hidden = bool(labels.get("hidden", entry.hidden))
            if data is not None:
                if entry.is_folder or not entry.has_blob:
                    raise _bad_request("cannot upload content to a folder / Google Docs file")
                entry.set_content(data)
            else:
                entry.touch()
            return self._resource(entry)

    def _descendants(self, root: FileEntry) -> Iterator[FileEntry]:
        stack = [root.id]
        seen = {root.id}
        while stack:
            pid = stack.pop()
            for f in self._files.values():
                if pid in f.parents and f.id not in seen:
                    seen.add(f.id)
                    stack.append(f.id)
                    yield f

    def _trash_tree(self, entry: FileEntry, trashed: bool) -> None:
        # A child's labels change too, so its version (and etag) moves; its modifiedDate not.
        if trashed:
            entry.trashed = entry.explicitly_trashed = True
            for child in self._descendants(entry):
                if not child.trashed:
                    child.trashed, child.explicitly_trashed = True, False
                    child.version += 1
        else:
            entry.trashed = entry.explicitly_trashed = False
            for child in self._descendants(entry):
                if child.trashed and not child.explicitly_trashed:
                    child.trashed = False
                    child.version += 1

    def _set_trashed(self, file_id: str, trashed: bool) -> dict[str, Any]:
        with self._lock:
            entry = self._entry(file_id)
            if entry.id == self.root_id:
                raise DriveError(
                    403, "insufficientPermissions", "The root folder cannot be trashed"
                )
            self._trash_tree(entry, trashed)
            entry.touch()
            return self._resource(entry)

    def _delete(self, file_id: str) -> None:
        with self._lock:
            entry = self._entry(file_id)
            if entry.id == self.root_id:
                raise DriveError(
                    403, "insufficientPermissions", "The root folder cannot be deleted"
                )
            doomed = [entry, *self._descendants(entry)]
            for f in doomed:
                self._files.pop(f.id, None)

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        corpora = query.get("corpora", query.get("corpus", "default"))
        if corpora not in ("default", "user") or query.get("driveId") or query.get("teamDriveId"):
            raise Unsupported(f"shared drives / corpora={corpora!r}")
        if query.get("spaces", "drive") != "drive":
            raise Unsupported(f"spaces={query.get('spaces')!r}")
        if query.get("orderBy"):
            raise Unsupported(f"orderBy={query['orderBy']!r}")
        try:
            max_results = int(query.get("maxResults", "100"))
        except ValueError:
            raise _bad_request("Invalid value for maxResults", location="maxResults") from None
        if not 0 <= max_results <= 1000:
            raise DriveError(
                400,
                "invalid",
                f"Invalid value '{max_results}'. Values must be within the range: [0, 1000]",
                location="maxResults",
            )
        q = query.get("q")
        pred: Pred | None = None
        if q:
            try:
                pred = parse_query(q, self.title_case_insensitive)
            except QueryError as exc:
                err = Unsupported(f"q={q!r}: {exc}")
                err.reason, err.location, err.location_type = "invalid", "q", "parameter"
                err.message = f"Invalid query (fake_drive unsupported: {exc})"
                raise err from None
        digest = hashlib.sha1(json.dumps([q, corpora]).encode()).hexdigest()[:10]
        offset = 0
        token = query.get("pageToken")
        if token:
            try:
                tok_digest, tok_off = base64.urlsafe_b64decode(token.encode()).decode().split(":")
                offset = int(tok_off)
            except Exception:
                raise DriveError(400, "invalid", "Invalid Value", location="pageToken") from None
            if tok_digest != digest:
                raise DriveError(
                    400, "invalid", "pageToken does not belong to this query", location="pageToken"
                )
        page = max_results if self.page_size_cap is None else min(max_results, self.page_size_cap)
        with self._lock:
            matches = [
                f
                for f in sorted(self._files.values(), key=lambda f: f.seq)
                if f.id != self.root_id and (pred is None or pred(f, self.root_id))
            ]
            items = [self._resource(f) for f in matches[offset : offset + page]]
        result: dict[str, Any] = {
            "kind": "drive#fileList",
            "etag": '"fake"',
            "selfLink": f"{PUBLIC_BASE}/drive/v2/files?{urlencode(query)}",
            "incompleteSearch": False,
            "items": items,
        }
        if offset + page < len(matches):
            nxt = base64.urlsafe_b64encode(f"{digest}:{offset + page}".encode()).decode()
            result["nextPageToken"] = nxt
            result["nextLink"] = (
                f"{PUBLIC_BASE}/drive/v2/files?{urlencode({**query, 'pageToken': nxt})}"
            )
        return result

    def _store_upload(
        self,
        meta: dict[str, Any],
        target_id: str | None,
        mime: str | None,
        data: bytes,
        query: dict[str, str],
        if_match: str | None = None,
    ) -> dict[str, Any]:
        target = self._files.get(target_id) if target_id else None  # gone: _update says 404
        title = meta.get("title") or (target.title if target else None)
        with self._lock:
            damage = self._damage_uploads.pop(title, None) if title else None
        if damage is not None and data:
            data = damage(data)  # a transfer corrupted in a way the service did not notice
        if target_id is None:
            return self._insert(meta, data, mime)
        return self._update(target_id, meta, query, data, mime, if_match=if_match)

    def damage_next_upload(
        self, title: str, damage: Callable[[bytes], bytes] | None = None
    ) -> None:
        """Store the next upload titled ``title`` damaged (default: first byte flipped).

        The stored ``md5Checksum`` and ``fileSize`` describe the damaged bytes, as
        Drive's would: only a client that compares them with what it sent notices.
        """
        with self._lock:
            self._damage_uploads[title] = damage or (lambda b: bytes([b[0] ^ 0xFF]) + b[1:])

    def _new_session(
        self,
        meta: dict[str, Any],
        target_id: str | None,
        mime: str | None,
        total: int | None,
        query: dict[str, str],
    ) -> UploadSession:
        self._validate_meta(meta)
        sess = UploadSession(
            uuid.UUID(int=self._rng.getrandbits(128)).hex, meta, target_id, mime, total, dict(query)
        )
        with self._lock:
            self._sessions[sess.upload_id] = sess
        return sess

    def _session(self, upload_id: str) -> UploadSession:
        with self._lock:
            sess = self._sessions.get(upload_id)
        if sess is None:
            raise DriveError(
                404, "notFound", f"Upload session {upload_id} not found", location="upload_id"
            )
        return sess

    def _finish_session(self, sess: UploadSession) -> dict[str, Any]:
        data = bytes(sess.data)
        sess.data = bytearray()
        res = self._store_upload(
            sess.metadata, sess.target_id, sess.mime_type, data, sess.query, sess.if_match
        )
        sess.result_id = res["id"]
        return res

    def sessions(self) -> list[UploadSession]:
        with self._lock:
            return list(self._sessions.values())


# --------------------------------------------------------------------------
# Client side: routing pydrive2 to the fake
# --------------------------------------------------------------------------


class ExternalNetworkError(AssertionError):
    """Raised when something tries to reach a host other than the fake server."""


class FakeCredentialsRefreshError(AssertionError):
    """Raised when the client tries to refresh the fake OAuth token."""


def _httplib2() -> Any:
    import httplib2

    return httplib2


def _routed_http_class() -> type:
    httplib2 = _httplib2()

    class RoutedHttp(httplib2.Http):
        """``httplib2.Http`` that sends Google API traffic to the fake server.

        ``https://www.googleapis.com/...`` (and ``drive.googleapis.com``) are
        rewritten to ``http://127.0.0.1:PORT/...``; requests to the fake itself
        pass; anything else raises :class:`ExternalNetworkError`.
        """

        def __init__(self, target_url: str, timeout: float | None = 30):
            super().__init__(timeout=timeout, proxy_info=None)
            # Like pydrive2's GoogleAuth._build_http: 308 is "Resume Incomplete".
            self.redirect_codes = self.redirect_codes - {308}
            self.follow_redirects = False
            self._target = urlsplit(target_url)
            self.routed: list[str] = []

        def request(
            self,
            uri,
            method="GET",
            body=None,
            headers=None,
            redirections=httplib2.DEFAULT_MAX_REDIRECTS,
            connection_type=None,
        ):
            parts = urlsplit(uri)
            if parts.hostname in ROUTED_HOSTS and parts.scheme == "https":
                uri = urlunsplit(
                    (
                        self._target.scheme,
                        self._target.netloc,
                        parts.path,
                        parts.query,
                        parts.fragment,
                    )
                )
                self.routed.append(uri)
            elif (parts.scheme, parts.netloc) != (self._target.scheme, self._target.netloc):
                raise ExternalNetworkError(
                    f"fake_drive: refusing to contact {uri!r} (not the fake server)"
                )
            return super().request(uri, method, body, headers, redirections, connection_type)

    return RoutedHttp


def make_routed_http(server: FakeDriveServer | str, timeout: float | None = 30) -> Any:
    url = server if isinstance(server, str) else server.url
    return _routed_http_class()(url, timeout=timeout)


def _fake_credentials(access_token: str) -> Any:
    from oauth2client.client import AccessTokenCredentials

    class FakeCredentials(AccessTokenCredentials):
        """Static bearer token; never expires, never refreshes, never revokes."""

        def _refresh(self, http: Any) -> None:
            raise FakeCredentialsRefreshError(
                "fake_drive: the client tried to refresh its OAuth token (server answered 401?)"
            )

        def _revoke(self, http: Any) -> None:
            raise FakeCredentialsRefreshError(
                "fake_drive: the client tried to revoke its OAuth token"
            )

    return FakeCredentials(access_token, "ckptstore-tests/fake-drive")


def make_google_auth(server: FakeDriveServer, access_token: str | None = None) -> Any:
    """A real ``pydrive2.auth.GoogleAuth`` wired to ``server``.

    pydrive2 gets every ``httplib2.Http`` it uses from ``GoogleAuth._build_http``
    (``Authorize()`` for the service object, ``Get_Http_Object()`` for the
    per-thread objects that ``LoadAuth`` passes to ``execute(http=...)``), then
    wraps it with ``credentials.authorize``.  Overriding ``_build_http`` routes
    all of it.
    """
    from pydrive2.auth import GoogleAuth

    url = server.url

    class FakeGoogleAuth(GoogleAuth):
        def _build_http(self) -> Any:
            return make_routed_http(url, timeout=self.http_timeout or 30)

    settings = copy.deepcopy(GoogleAuth.DEFAULT_SETTINGS)
    settings["client_config_backend"] = "settings"
    settings["client_config"] = {
        "client_id": "fake-client-id",
        "client_secret": "fake-client-secret",
        "auth_uri": url + "/o/oauth2/auth",
        "token_uri": url + "/token",
        "revoke_uri": url + "/revoke",
        "redirect_uri": url + "/redirect",
    }
    auth = FakeGoogleAuth(settings=settings, http_timeout=30)
    token = access_token if access_token is not None else (server.access_token or DEFAULT_TOKEN)
    auth.credentials = _fake_credentials(token)
    return auth


def make_gdrive_fs(server: FakeDriveServer, path: str = "root", **kwargs: Any) -> Any:
    """``pydrive2.fs.GDriveFileSystem`` talking to ``server`` (fsspec instance cache skipped)."""
    from pydrive2.fs import GDriveFileSystem

    access_token = kwargs.pop("access_token", None)
    kwargs.setdefault("skip_instance_cache", True)
    return GDriveFileSystem(path, google_auth=make_google_auth(server, access_token), **kwargs)


@contextlib.contextmanager
def small_upload_chunks(chunksize: int = RESUMABLE_GRANULARITY) -> Iterator[None]:
    """Make pydrive2's resumable uploads use ``chunksize`` instead of 100 MiB.

    pydrive2 builds ``MediaIoBaseUpload(content, mime, resumable=True)`` with
    googleapiclient's ``DEFAULT_CHUNK_SIZE`` (100 MiB); patch the name it looks
    up in ``pydrive2.files`` so tests can exercise multi-chunk uploads cheaply.
    """
    import pydrive2.files as pfiles
    from googleapiclient.http import MediaIoBaseUpload

    orig = pfiles.MediaIoBaseUpload

    def factory(
        fd: Any, mimetype: str, chunksize_: int = chunksize, resumable: bool = False
    ) -> Any:
        return MediaIoBaseUpload(fd, mimetype, chunksize=chunksize_, resumable=resumable)

    pfiles.MediaIoBaseUpload = factory
    try:
        yield
    finally:
        pfiles.MediaIoBaseUpload = orig


def _is_loopback(host: Any) -> bool:
    if host is None:
        return False
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host)
    if host in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def block_external_network() -> Iterator[list[str]]:
    """Make any non-loopback connect()/DNS lookup raise ExternalNetworkError.

    Yields the list of refused attempts (normally empty).
    """
    refused: list[str] = []
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_getaddrinfo = socket.getaddrinfo

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refused.append(repr(address))
            raise ExternalNetworkError(f"fake_drive: blocked connection to {address!r}")

    def connect(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return orig_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return orig_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            refused.append(f"getaddrinfo({host!r})")
            raise ExternalNetworkError(f"fake_drive: blocked DNS lookup of {host!r}")
        return orig_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    try:
        yield refused
    finally:
        socket.socket.connect = orig_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = orig_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = orig_getaddrinfo


def main() -> None:
    """Serve until killed, in its own process (benchmarks keep its memory out of theirs).

    Prints ``URL TOKEN`` on one line once the server listens.
    """
    import signal
    import sys

    server = FakeDriveServer().start()
    print(server.url, server.access_token, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
