"""An in-process dCache-like WebDAV server that can misbehave on purpose.

Real servers (nginx, Apache) are tested elsewhere; this one exists for what they
cannot do on demand: redirects to a "pool", single-use pool URLs, RFC 3230 digests,
dCache-shaped multistatus answers, and faults injected per request.

Two listeners, both HTTP/1.1 keep-alive on loopback, port 0, daemon threads:

* the *door* (``server.url``) serves a directory on disk as WebDAV and requires
  ``Authorization: Bearer <token>`` (401 + ``WWW-Authenticate: Bearer`` otherwise;
  ``token=None`` disables the check);
* the *pool* (``server.pool_url``) serves only the single-use
  ``?dcache-http-uuid=`` URLs the door hands out in its 307 answers and never asks
  for Authorization (tests assert it never gets one).

Usage::

    with FaultServer(tmp_path, redirect_get=True) as srv:
        srv.add_fault("truncate", method="GET", path="/a.bin", after=10)
        ...  # talk to srv.url
        assert not any("authorization" in r.headers for r in srv.requests
                       if r.server == "pool")

Constructor: ``FaultServer(root, token="tok", *, digest=True, redirect_get=False,
redirect_put=False, pool_scheme_host=None)``. The sockets are bound in the
constructor (so ``url``/``pool_url``/``port``/``pool_port`` are known at once);
``start()`` serves, ``stop()`` closes everything (idempotent); the context manager
does both. ``digest``, ``redirect_get``, ``redirect_put``, ``pool_scheme_host`` and
``token`` are plain attributes read on every request and may be changed at any time.

``pool_scheme_host`` replaces the scheme://host[:port] part of the pool URLs in
``Location``: ``"http://localhost"`` or ``"http://localhost:{port}"`` (``{port}``
and a missing port both mean the pool's real port), an explicit port is used
verbatim. If its host is an IPv4 loopback literal (``127.0.0.2``) the pool listener
binds to that address, so ``"http://127.0.0.2"`` really reaches the pool.

Door behaviour (paths are percent-decoded; ``..``/``.`` segments and NUL -> 400):

* GET/HEAD: ``ETag: "<size>-<mtime_ns>"``, ``Last-Modified`` (RFC 1123),
  ``Content-Length``, ``Accept-Ranges: bytes``; ``Range: bytes=N-``, ``N-M``, ``-S``
  -> 206 + ``Content-Range``; unsatisfiable -> 416 ``bytes */TOTAL``; several ranges
  or bad syntax -> 200 full; ``If-Range`` (ETag or exact Last-Modified) not matching
  -> 200 full. GET on a directory -> 200 small HTML listing. With ``digest=True`` and
  ``Want-Digest`` (``adler32``, ``md5``, ``sha-256``, ``sha-512``; q-values parsed
  loosely, ``q=0`` excluded) -> ``Digest: adler32=<8 hex>,md5=<base64>`` in the asked
  order, always of the whole file. ``redirect_get=True``: door GET on an existing
  file -> 307 ``Location: <pool>/<path>?dcache-http-uuid=<uuid4>`` (HEAD is
  answered by the door).
* PUT: body by Content-Length or chunked (neither = empty), written to a temp file
  then ``os.replace`` -> 201 (new) / 204 (replaced), with ``Digest`` if asked.
  ``Content-MD5`` mismatch -> 400 "Checksum mismatch ..." and the file stays
  behind (dCache issue 7862); malformed Content-MD5 -> 400. Missing parent -> 409,
  target is a directory -> 405. ``redirect_put=True`` and ``Expect: 100-continue``:
  307 to the pool before any body byte is read, with ``Connection: close``, and no
  ``100 Continue``. Without Expect the door takes the body itself. Whoever takes
  the body of an Expect request sends ``HTTP/1.1 100 Continue`` first (never
  before the auth/uuid/parent checks passed). A response sent without reading the
  request body: drained first if no Expect, else ``Connection: close``.
* MKCOL 201 / 405 exists / 409 no parent / 415 with a body. DELETE 204 (file or
  recursive dir) / 404 / 403 on "/". MOVE with ``Destination`` (URL or path),
  ``Overwrite: F`` -> 412 if it exists; 201 new / 204 replaced / 404 / 409.
  OPTIONS -> 200 ``DAV: 1, 2``.
* PROPFIND: ``Depth: 0`` or ``1``; ``infinity`` or no Depth -> 403. 207 multistatus
  with path-absolute, percent-encoded hrefs (collections end with "/"), the
  directory itself first, children sorted. Props: resourcetype, getcontentlength,
  getlastmodified, getetag, getcontenttype, displayname,
  ``{http://www.dcache.org/2013/webdav}Checksums`` (``adler32=..,md5=..``) and
  ``{http://srm.lbl.gov/StorageResourceManager}FileLocality`` (``ONLINE`` unless
  ``server.locality["/p"] = "NEARLINE"``). Empty body/allprop -> the DAV props
  only. Explicitly asked props a resource lacks (directories have no
  getcontentlength/getetag/getcontenttype/Checksums/FileLocality; unknown props;
  names in ``server.missing_props["/p"] = {"Checksums", "{DAV:}getetag"}``) go in a
  second propstat with ``HTTP/1.1 404 Not Found``, as dCache does.

Pool: GET (with Range etc., as above) or PUT on ``<path>?dcache-http-uuid=<uuid>``
for the uuid/method/path the door issued; each uuid works once (second use or a
wrong path -> 404 "uuid expired"; no uuid -> 400); other methods -> 405.

Faults: ``add_fault(kind, *, method=None, path=None, server=None, times=1,
**params) -> Fault``. ``method``: str or list, case-insensitive, None = any.
``path``: percent-decoded request path without query, trailing "/" ignored, exact
match; a pattern ending in "*" is a prefix match (``"/dir/*"``); None = any.
``server``: "door", "pool" or None = either. ``times``: uses, None = forever.
At the start of each request the first fault (in insertion order) that matches
and *can apply to this request* is chosen (at most one per request); it is
consumed only when actually applied. Data faults (truncate, corrupt, ignore_range,
wrong_content_range, wrong_digest, insufficient_storage, reset/stall with
``after``) can apply only where the bytes flow, so with ``redirect_get`` they skip
the redirecting door and hit the pool; status/redirect/plain reset/stall hit the
first matching request (use ``server="pool"`` to aim at the pool). Requests that
fail authentication or carry an unknown pool uuid take no fault.

=====================  =====================================================
kind                   params / effect
=====================  =====================================================
status                 status=503, headers={"Retry-After": "1"}, body=b""
redirect               location=URL (required), status=307
stall                  seconds=S, after=None: sleep S (cut short by stop())
                       before answering; with after=N, after N body bytes
                       (GET/PROPFIND: sent; PUT: received), then carry on
reset                  after=None: RST (SO_LINGER 0) before answering; with
                       after=N, after N body bytes sent (GET/PROPFIND) or
                       received (PUT; the partial upload is discarded)
truncate               after=0: GET/PROPFIND: full headers, N body bytes, close
ignore_range           GET/HEAD with Range: 200 with the whole file
wrong_content_range    GET/HEAD with a satisfiable Range: 206 whose
                       Content-Range (and body) start at ``start`` (default 0,
                       or 1 when the asked start is 0) instead of the asked one
wrong_digest           GET/HEAD/PUT answer: Digest with wrong values (for the
                       algorithms asked, adler32 if none asked, even if digest=False)
corrupt                GET: byte at file offset ``offset`` (default: first byte
                       sent) XOR 0xFF; lengths and Digest stay those of the file
hostile_propfind       PROPFIND: body=bytes (required), status=207, raw answer
insufficient_storage   PUT: read the body, 507, nothing written
hold                   event=Event (required), after=None, seconds=30: wait
                       until the event is set (at most S s, cut short by
                       stop()) before answering (after=None) or after N
                       GET body bytes sent; lists of after/event hold at
                       several points of one request, in order
outage                 seconds=5: the first matching request starts a window
                       of S s in which every matching request gets a RST
                       before its answer; afterwards the fault no longer
                       applies (add it with times=None)
store_as               name=NAME (required): PUT stores the body under NAME in
                       the same folder and answers as if all went well (a
                       storage that maps names differently, e.g. "?")
=====================  =====================================================

Records and counters (all guarded by ``server.lock``):

* ``requests``: list of ``RequestRecord(method, path, headers, server, body_len,
  query, raw_path, status, sent_continue, fault)``; ``headers`` is a dict with
  case-insensitive lookups, ``path`` percent-decoded, ``body_len`` the request
  body bytes read, ``status`` the final status (None if cut off before it),
  ``fault`` the kind applied or None.
* ``bytes_sent``: Counter, file-body bytes sent by GET per decoded path.
* ``method_counts``: Counter of requests per method (door and pool).
* ``count(method=None, path=None, server=None)``, ``find(...)`` -> list of records.
* ``errors``: tracebacks of unexpected exceptions inside handlers (should stay []).
* ``uuids``: pool uuids not used yet. ``faults``: the Fault objects (``.hits``,
  ``.remaining``). ``clear_faults()``, ``reset_log()``.
"""

import base64
import collections
import email.utils
import hashlib
import html
import ipaddress
import os
import shutil
import socket
import struct
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler
from typing import Any, Dict, List
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from httpdouble import Listener

__all__ = ["FaultServer", "Fault", "RequestRecord", "FAULT_KINDS"]

DAV = "DAV:"
DCACHE_NS = "http://www.dcache.org/2013/webdav"
SRM_NS = "http://srm.lbl.gov/StorageResourceManager"
_PREFIX = {DAV: "d", DCACHE_NS: "ns1", SRM_NS: "ns2"}
_TMP_PREFIX = ".faultserver-upload-"
_CHUNK = 64 * 1024

# kind -> allowed params (with defaults)
FAULT_KINDS: Dict[str, Dict[str, Any]] = {
    "status": {"status": 503, "headers": {"Retry-After": "1"}, "body": b""},
    "redirect": {"location": None, "status": 307},
    "stall": {"seconds": 1.0, "after": None},
    "reset": {"after": None},
    "truncate": {"after": 0},
    "ignore_range": {},
    "wrong_content_range": {"start": None},
    "wrong_digest": {},
    "corrupt": {"offset": None},
    "hostile_propfind": {"body": None, "status": 207},
    "insufficient_storage": {},
    "hold": {"event": None, "after": None, "seconds": 30.0},
    "outage": {"seconds": 5.0},
    "store_as": {"name": None},
}
_REQUIRED = {"redirect": "location", "hostile_propfind": "body", "hold": "event",
             "store_as": "name"}


class _CIDict(dict):
    """dict whose lookups ignore key case (keys are stored lower-case)."""

    def __init__(self, items=()):
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


def _fields_repr(self):
    return "%s(%s)" % (type(self).__name__,
                       ", ".join("%s=%r" % kv for kv in vars(self).items()))


class RequestRecord:
    """One request as the server saw it (a plain class: no dataclasses on 3.6)."""

    def __init__(self, method, path, headers, server, body_len=0, query="", raw_path="",
                 status=None, sent_continue=False, fault=None):
        self.method, self.path, self.headers, self.server = method, path, headers, server
        self.body_len, self.query, self.raw_path = body_len, query, raw_path
        self.status, self.sent_continue, self.fault = status, sent_continue, fault

    __repr__ = _fields_repr


class Fault:
    def __init__(self, kind, method=None, path=None, server=None, times=1, params=None,
                 hits=0):
        self.kind, self.method, self.path, self.server = kind, method, path, server
        self.times, self.hits = times, hits
        self.params = {} if params is None else params

    __repr__ = _fields_repr

    @property
    def remaining(self):
        return None if self.times is None else self.times - self.hits

    def matches(self, server, method, path):
        if self.server is not None and self.server != server:
            return False
        if self.method is not None:
            methods = [self.method] if isinstance(self.method, str) else self.method
            if method.upper() not in {m.upper() for m in methods}:
                return False
        if self.path is not None:
            if self.path.endswith("*"):
                return path.startswith(self.path[:-1])
            return _norm(path) == _norm(self.path)
        return True


def _norm(path):
    return path.rstrip("/") or "/"


def _hold_points(fault):
    """[(after or None, event), ...] of a "hold" fault, in order."""
    after, event = fault.params["after"], fault.params["event"]
    if not isinstance(event, (list, tuple)):
        after, event = [after], [event]
    elif not isinstance(after, (list, tuple)):
        after = [after] * len(event)
    return list(zip(after, event))


class _Abort(Exception):
    """The connection was closed on purpose; stop handling it."""


class _BadPath(Exception):
    pass


# ---------------------------------------------------------------- checksums

def _digests(path):
    adler, md5 = 1, hashlib.md5()
    sha256, sha512 = hashlib.sha256(), hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            adler = zlib.adler32(block, adler)
            md5.update(block)
            sha256.update(block)
            sha512.update(block)
    return {"adler32": "%08x" % (adler & 0xFFFFFFFF), "md5": _b64(md5),
            "sha-256": _b64(sha256), "sha-512": _b64(sha512)}


def _b64(hash_obj):
    return base64.b64encode(hash_obj.digest()).decode()


def _wrong(algo, value):
    if algo == "adler32":
        return "%08x" % (int(value, 16) ^ 0x1)
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 0xFF
    return base64.b64encode(bytes(raw)).decode()


def _want_digest(header):
    """'adler32, md5;q=0.5, sha;q=0' -> ['adler32', 'md5'] (loosely)."""
    algos = []
    for item in (header or "").split(","):
        parts = [p.strip() for p in item.split(";")]
        name = parts[0].lower()
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    pass
        if name and q > 0 and name not in algos:
            algos.append(name)
    return algos


# ---------------------------------------------------------------- servers

class _Listener(Listener):
    """The door or the pool (*role*) of FaultServer *fs*."""

    def __init__(self, address, fs, role):
        self.fs, self.role = fs, role
        super().__init__(address, _Handler, on_error=fs._record_error)


class FaultServer:
    """dCache-like WebDAV door + pool over ``root``; see the module docstring."""

    def __init__(self, root, token="tok", *, digest=True, redirect_get=False,
                 redirect_put=False, pool_scheme_host=None):
        self.root = os.fspath(root)
        self.token = token
        self.digest = digest
        self.redirect_get = redirect_get
        self.redirect_put = redirect_put
        self.pool_scheme_host = pool_scheme_host
        self.locality: Dict[str, str] = {}
        self.missing_props: Dict[str, set] = {}
        self.requests: List[RequestRecord] = []
        self.bytes_sent = collections.Counter()
        self.method_counts = collections.Counter()
        self.errors: List[str] = []
        self.faults: List[Fault] = []
        self.uuids: Dict[str, tuple] = {}
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._threads = []
        self._started = self._stopped = False

        pool_host = "127.0.0.1"
        if pool_scheme_host:
            host = urlsplit(pool_scheme_host).hostname or ""
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8"):
                    pool_host = host
            except ValueError:
                pass
        self._door = _Listener(("127.0.0.1", 0), self, "door")
        try:
            self._pool = _Listener((pool_host, 0), self, "pool")
        except BaseException:
            self._door.server_close()
            raise
        self.port = self._door.server_address[1]
        self.pool_port = self._pool.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.pool_url = "http://%s:%d" % (pool_host, self.pool_port)

    # ------------------------------------------------------------ lifecycle
    def start(self):
        if self._started:
            return self
        self._started = True
        for srv in (self._door, self._pool):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02},
                                 name="faultserver-" + srv.role, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._started:
            # shut both listeners down in parallel: each waits up to one poll
            t = threading.Thread(target=self._pool.shutdown, daemon=True)
            t.start()
            self._door.shutdown()
            t.join()
        self._door.server_close()
        self._pool.server_close()
        self._door.drop_connections()
        self._pool.drop_connections()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ faults & log
    def add_fault(self, kind, *, method=None, path=None, server=None, times=1, **params):
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r (known: %s)" % (kind, ", ".join(FAULT_KINDS)))
        unknown = set(params) - set(FAULT_KINDS[kind])
        if unknown:
            raise ValueError("fault %r takes no %s" % (kind, ", ".join(sorted(unknown))))
        if kind in _REQUIRED and params.get(_REQUIRED[kind]) is None:
            raise ValueError("fault %r needs %s=" % (kind, _REQUIRED[kind]))
        if server not in (None, "door", "pool"):
            raise ValueError("server must be 'door', 'pool' or None")
        full = dict(FAULT_KINDS[kind])
        full.update(params)
        fault = Fault(kind, method, path, server, times, full)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self):
        with self.lock:
            self.faults.clear()

    def reset_log(self):
        with self.lock:
            self.requests.clear()
            self.bytes_sent.clear()
            self.method_counts.clear()

    def find(self, method=None, path=None, server=None):
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method.upper())
                    and (path is None or _norm(r.path) == _norm(path))
                    and (server is None or r.server == server)]

    def count(self, method=None, path=None, server=None):
        return len(self.find(method, path, server))

    def _record_error(self, text):
        with self.lock:
            self.errors.append(text)

    def _pool_base(self):
        psh = self.pool_scheme_host
        if not psh:
            return self.pool_url
        psh = psh.rstrip("/").replace("{port}", str(self.pool_port))
        if urlsplit(psh).port is None:
            psh += ":%d" % self.pool_port
        return psh

    def _issue_uuid(self, method, path):
        u = str(uuid.uuid4())
        with self.lock:
            self.uuids[u] = (method, path)
        return "%s%s?dcache-http-uuid=%s" % (self._pool_base(), quote(path), u)


# ---------------------------------------------------------------- handler

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultServer/1.0"
    disable_nagle_algorithm = True
    timeout = 30

    # -------------------------------------------------------- plumbing
    @property
    def fs(self) -> FaultServer:
        return self.server.fs

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def log_message(self, format, *args):
        pass

    def handle_one_request(self):
        self._expect_pending = False
        self._body_done = False
        self._fault = None
        self._rec = None
        self._holds = []
        self._holds_seconds = 0
        try:
            super().handle_one_request()
        except _Abort:
            self.close_connection = True
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    def handle_expect_100(self):
        # Decide later: the door must not say 100 when it is going to redirect,
        # and nobody should say it before auth and path checks passed.
        self._expect_pending = True
        return True

    def send_response(self, code, message=None):
        super().send_response(code, message)
        if self._rec is not None and code >= 200:
            self._rec.status = code

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    # -------------------------------------------------------- dispatch
    def _dispatch(self):
        fs, role = self.fs, self.server.role
        split = urlsplit(self.path)
        self.upath = unquote(split.path) or "/"
        self.query = split.query
        self._rec = RequestRecord(self.command, self.upath, _CIDict(self.headers.items()),
                                  role, 0, split.query, self.path)
        with fs.lock:
            fs.requests.append(self._rec)
            fs.method_counts[self.command] += 1
        if not (self.headers.get("Content-Length") or "0").strip().isdigit():
            self.close_connection = True
            self._body_done = True  # unreadable: do not try to drain it
            return self._simple(400, "Bad Content-Length")
        try:
            self.fspath = self._local(self.upath)
        except _BadPath as e:
            return self._simple(400, str(e))
        handler = getattr(self, "_%s_%s" % (role, self.command), None)
        if handler is None:
            return self._simple(405 if role == "pool" else 501, "Method not allowed")
        if role == "door" and fs.token is not None:
            auth = self.headers.get("Authorization", "")
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() != "bearer" or cred.strip() != fs.token:
                return self._simple(401, "Unauthorized",
                                    {"WWW-Authenticate": 'Bearer realm="dCache"'})
        if role == "pool":
            uid = parse_qs(self.query).get("dcache-http-uuid", [None])[0]
            if uid is None:
                return self._simple(400, "Missing dcache-http-uuid")
            with fs.lock:
                issued = fs.uuids.pop(uid, None)
            if issued != (self.command, self.upath):
                return self._simple(404, "uuid expired")
        self._choose_fault()
        f = self._take("status", "redirect", "hostile_propfind")
        if f is None:
            f = self._take("stall", "reset", when=lambda f: f.params["after"] is None)
        if f is not None:
            p = f.params
            if f.kind == "status":
                return self._simple(p["status"], p["body"], p["headers"])
            if f.kind == "redirect":
                return self._simple(p["status"], b"", {"Location": p["location"]})
            if f.kind == "hostile_propfind":
                self._settle_body()
                return self._simple(p["status"], p["body"], {},
                                    "application/xml; charset=utf-8")
            if f.kind == "reset":
                self._reset()
            if f.kind == "stall":
                fs._stop.wait(p["seconds"])
        if self._take("outage", when=self._outage_starts) is not None:
            self._reset()
        h = self._take("hold")
        if h is not None:
            self._holds = _hold_points(h)
            self._holds_seconds = h.params["seconds"]
            while self._holds and self._holds[0][0] is None:
                self._hold(self._holds.pop(0)[1])
        return handler()

    def _outage_starts(self, f):
        with self.fs.lock:
            if f.params.get("_end") is None:
                f.params["_end"] = time.monotonic() + f.params["seconds"]
        return True

    def _hold(self, event):
        end = time.monotonic() + self._holds_seconds
        while not event.is_set() and not self.fs._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            event.wait(min(left, 0.05))

    def _serves_body(self):
        """Whether this request moves file bytes here (no redirect elsewhere)."""
        fs, role, cmd = self.fs, self.server.role, self.command
        if cmd in ("GET", "HEAD"):
            return role == "pool" or cmd == "HEAD" or not fs.redirect_get
        if cmd == "PUT":
            return role == "pool" or not (fs.redirect_put and self._expect_pending)
        return False

    def _can_apply(self, f):
        cmd, k, p = self.command, f.kind, f.params
        body = self._serves_body()
        if k in ("status", "redirect"):
            return True
        if k in ("stall", "reset"):
            if p["after"] is None:
                return True
            return (body and cmd in ("GET", "PUT")) or cmd == "PROPFIND"
        if k == "truncate":
            return (body and cmd == "GET") or cmd == "PROPFIND"
        if k == "hostile_propfind":
            return cmd == "PROPFIND"
        if k == "insufficient_storage":
            return body and cmd == "PUT"
        if k == "hold":
            if all(a is None for a, _ in _hold_points(f)):
                return True
            return body and cmd == "GET"
        if k == "outage":
            end = p.get("_end")
            return end is None or time.monotonic() < end
        if k == "store_as":
            return body and cmd == "PUT"
        if k == "corrupt":
            return body and cmd == "GET"
        if k in ("ignore_range", "wrong_content_range"):
            return body and cmd in ("GET", "HEAD") and "Range" in self.headers
        if k == "wrong_digest":
            return body and cmd in ("GET", "HEAD", "PUT")
        return False

    def _choose_fault(self):
        with self.fs.lock:
            for f in self.fs.faults:
                if f.remaining is not None and f.remaining <= 0:
                    continue
                if f.matches(self.server.role, self.command, self.upath) and self._can_apply(f):
                    self._fault = f
                    return

    def _take(self, *kinds, when=None):
        """Apply (consume) the chosen fault if it is one of ``kinds``."""
        f = self._fault
        if f is None or f.kind not in kinds or (when is not None and not when(f)):
            return None
        with self.fs.lock:
            if f.remaining is not None and f.remaining <= 0:
                self._fault = None
                return None
            f.hits += 1
        self._fault = None
        self._rec.fault = f.kind
        return f

    # -------------------------------------------------------- helpers
    def _local(self, upath):
        if "\0" in upath:
            raise _BadPath("NUL in path")
        parts = [s for s in upath.split("/") if s]
        if any(s in (".", "..") for s in parts):
            raise _BadPath("dot segment in path")
        return os.path.join(self.fs.root, *parts)

    def _reset(self):
        """Abort with a TCP RST (SO_LINGER 0 then close)."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:
            pass
        for f in (self.rfile, self.wfile):
            try:
                f.close()
            except OSError:
                pass
        self.connection.close()
        raise _Abort()

    def _continue(self):
        if self._expect_pending:
            self._expect_pending = False
            self.send_response_only(100)
            self.end_headers()
            self._rec.sent_continue = True

    def _body_chunks(self, split_at=None):
        """Yield the request body (Content-Length or chunked); when ``split_at`` is
        given, no read crosses that many body bytes (so faults cut exactly there)."""
        self._continue()
        self._body_done = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Abort()
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise _Abort() from None  # malformed chunking: hang up
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exactly(size, split_at)
                self.rfile.readline(3)
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0),
                                          split_at)

    def _read_exactly(self, left, split_at):
        """Yield *left* body bytes as they arrive, counting them; hang up on EOF."""
        while left > 0:
            data = self.rfile.read(self._read_size(left, split_at))
            if not data:
                raise _Abort()
            left -= len(data)
            self._rec.body_len += len(data)
            yield data

    def _read_size(self, left, split_at):
        n = min(left, _CHUNK)
        if split_at is not None and self._rec.body_len < split_at:
            n = min(n, split_at - self._rec.body_len)
        return n

    def _has_body(self):
        return (int(self.headers.get("Content-Length") or 0) > 0
                or "chunked" in self.headers.get("Transfer-Encoding", "").lower())

    def _settle_body(self):
        """Before answering: drain an unread body, or close if the client waits."""
        if self._body_done or not self._has_body():
            return
        if self._expect_pending:
            self.close_connection = True
            return
        for _ in self._body_chunks():
            pass

    def _simple(self, status, body=b"", headers=None, ctype="text/plain; charset=utf-8"):
        if isinstance(body, str):
            body = body.encode()
        self._settle_body()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or status not in (204, 304):
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _digest_header(self, path):
        """The Digest value to send, or None."""
        wrong = self._take("wrong_digest") is not None
        want = _want_digest(self.headers.get("Want-Digest"))
        if not wrong and not (self.fs.digest and want):
            return None
        values = _digests(path)
        algos = [a for a in want if a in values] or (["adler32"] if wrong else [])
        if not algos:
            return None
        return ",".join("%s=%s" % (a, _wrong(a, values[a]) if wrong else values[a])
                        for a in algos)

    @staticmethod
    def _etag(st):
        return '"%d-%d"' % (st.st_size, st.st_mtime_ns)

    # -------------------------------------------------------- GET / HEAD
    def _door_GET(self):
        if not os.path.exists(self.fspath):
            return self._simple(404, "Not Found")
        if os.path.isdir(self.fspath):
            return self._listing()
        if self.fs.redirect_get:
            loc = self.fs._issue_uuid("GET", self.upath)
            return self._simple(307, b"", {"Location": loc})
        return self._send_file()

    def _pool_GET(self):
        if not os.path.isfile(self.fspath):
            return self._simple(404, "Not Found")
        return self._send_file()

    def _door_HEAD(self):
        if not os.path.exists(self.fspath):
            return self._simple(404, "Not Found")
        if os.path.isdir(self.fspath):
            return self._listing()
        return self._send_file()

    def _listing(self):
        names = sorted(n for n in os.listdir(self.fspath) if not n.startswith(_TMP_PREFIX))
        base = self.upath.rstrip("/") + "/"
        items = "".join('<li><a href="%s">%s</a></li>' % (quote(base + n), html.escape(n))
                        for n in names)
        return self._simple(200, "<html><body><ul>%s</ul></body></html>" % items, {},
                            "text/html; charset=utf-8")

    def _range(self, size, etag, lastmod):
        """(start, end) inclusive, None for the whole file, or 'bad' for 416."""
        rng = self.headers.get("Range")
        if not rng:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() not in (etag, lastmod):
            return None
        unit, _, spec = rng.partition("=")
        if unit.strip().lower() != "bytes" or "," in spec:
            return None
        first, dash, last = spec.strip().partition("-")
        try:
            if not dash:
                return None
            if first == "":
                n = int(last)
                if n <= 0:
                    return "bad"
                return (max(0, size - n), size - 1) if size else "bad"
            start = int(first)
            end = int(last) if last else size - 1
        except ValueError:
            return None
        if start >= size:
            return "bad"
        if end < start:
            return None
        return start, min(end, size - 1)

    def _send_file(self):
        st = os.stat(self.fspath)
        size, etag = st.st_size, self._etag(st)
        lastmod = email.utils.formatdate(st.st_mtime, usegmt=True)
        rng = self._range(size, etag, lastmod)
        if rng is not None and self._take("ignore_range"):
            rng = None
        if rng == "bad":
            return self._simple(416, "Range Not Satisfiable",
                                {"Content-Range": "bytes */%d" % size})
        wrong_cr = self._take("wrong_content_range") if rng else None
        if wrong_cr:
            start = wrong_cr.params["start"]
            if start is None:
                start = 0 if rng[0] > 0 else 1
            start = min(start, max(size - 1, 0))
            rng = (start, max(start, min(size - 1, start + rng[1] - rng[0])))
        start, end = rng if rng else (0, size - 1)
        length = end - start + 1 if size else 0
        digest = self._digest_header(self.fspath)
        self._settle_body()
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", lastmod)
        if rng:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        if digest:
            self.send_header("Digest", digest)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._write_body(self.fspath, start, length)

    def _write_body(self, path, start, length):
        fs = self.fs
        corrupt = self._take("corrupt")
        flip = None
        if corrupt:
            flip = start if corrupt.params["offset"] is None else corrupt.params["offset"]
        cut = self._take("truncate", "reset", "stall")
        holds = self._holds
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while True:
                if cut is not None and sent == cut.params["after"]:
                    self._cut(cut)
                    cut = None
                while holds and sent >= holds[0][0]:
                    self._hold(holds.pop(0)[1])
                if sent >= length:
                    break
                want = min(_CHUNK, length - sent)
                if cut is not None:
                    want = min(want, cut.params["after"] - sent)
                if holds:
                    want = min(want, holds[0][0] - sent)
                data = bytearray(f.read(want))
                if not data:
                    break
                pos = start + sent
                if flip is not None and pos <= flip < pos + len(data):
                    data[flip - pos] ^= 0xFF
                with fs.lock:  # counted first: the client may look right after
                    fs.bytes_sent[self.upath] += len(data)
                self.wfile.write(data)
                sent += len(data)

    def _cut(self, fault, tmp=None, out=None):
        """Apply truncate/reset/stall once its 'after' byte count is reached.
        ``tmp``/``out``: a partial upload to remove before the RST, so that the
        client never sees the reset before the temp file is gone."""
        if fault.kind == "truncate":
            self.close_connection = True
            raise _Abort()
        if fault.kind == "reset":
            if out is not None:
                out.close()
                os.unlink(tmp)
            self._reset()
        self.fs._stop.wait(fault.params["seconds"])

    # -------------------------------------------------------- PUT
    def _door_PUT(self):
        fs = self.fs
        if os.path.isdir(self.fspath):
            return self._simple(405, "Cannot PUT on a collection")
        if not os.path.isdir(os.path.dirname(self.fspath)):
            return self._simple(409, "Parent collection does not exist")
        if fs.redirect_put and self._expect_pending:
            # dCache: redirect before the body; the door drops the connection.
            self.close_connection = True
            loc = fs._issue_uuid("PUT", self.upath)
            return self._simple(307, b"", {"Location": loc})
        return self._receive_file()

    def _pool_PUT(self):
        if not os.path.isdir(os.path.dirname(self.fspath)) or os.path.isdir(self.fspath):
            return self._simple(409, "Parent collection does not exist")
        return self._receive_file()

    def _receive_file(self):
        if self._take("insufficient_storage"):
            self._settle_body()
            return self._simple(507, "Insufficient Storage")
        alias = self._take("store_as")
        if alias is not None:  # the storage maps the name to another one
            self.fspath = os.path.join(os.path.dirname(self.fspath), alias.params["name"])
        cut = self._take("reset", "stall")
        md5 = hashlib.md5()
        existed = os.path.exists(self.fspath)
        tmp = os.path.join(os.path.dirname(self.fspath), _TMP_PREFIX + uuid.uuid4().hex)
        try:
            with open(tmp, "wb") as out:
                if cut is not None and cut.params["after"] == 0:
                    self._continue()
                    self._cut(cut, tmp, out)
                    cut = None
                split = cut.params["after"] if cut is not None else None
                for data in self._body_chunks(split_at=split):
                    out.write(data)
                    md5.update(data)
                    if cut is not None and self._rec.body_len == cut.params["after"]:
                        self._cut(cut, tmp, out)
                        cut = None
            os.replace(tmp, self.fspath)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        cmd5 = self.headers.get("Content-MD5")
        if cmd5 is not None:
            try:
                expected = base64.b64decode(cmd5.strip(), validate=True)
                if len(expected) != 16:
                    raise ValueError
            except ValueError:
                return self._simple(400, "Bad Content-MD5")
            if expected != md5.digest():
                # dCache issue 7862: the corrupt file stays behind.
                return self._simple(400, "Checksum mismatch (expected %s, got %s)"
                                    % (cmd5.strip(), base64.b64encode(md5.digest()).decode()))
        headers = {}
        digest = self._digest_header(self.fspath)
        if digest:
            headers["Digest"] = digest
        headers["ETag"] = self._etag(os.stat(self.fspath))
        if existed:
            return self._simple(204, b"", headers)
        return self._simple(201, "Created", headers)

    # -------------------------------------------------------- namespace ops
    def _door_OPTIONS(self):
        return self._simple(200, b"", {
            "DAV": "1, 2", "Allow": "OPTIONS, GET, HEAD, PUT, DELETE, MKCOL, MOVE, PROPFIND"})

    def _door_MKCOL(self):
        if self._has_body():
            return self._simple(415, "MKCOL with a body")
        if os.path.exists(self.fspath):
            return self._simple(405, "Already exists")
        if not os.path.isdir(os.path.dirname(self.fspath)):
            return self._simple(409, "Parent collection does not exist")
        os.mkdir(self.fspath)
        return self._simple(201, "Created")

    def _door_DELETE(self):
        if os.path.normpath(self.fspath) == os.path.normpath(self.fs.root):
            return self._simple(403, "Forbidden")
        if os.path.isdir(self.fspath) and not os.path.islink(self.fspath):
            shutil.rmtree(self.fspath)
        elif os.path.lexists(self.fspath):
            os.unlink(self.fspath)
        else:
            return self._simple(404, "Not Found")
        return self._simple(204)

    def _door_MOVE(self):
        dest = self.headers.get("Destination")
        if not dest:
            return self._simple(400, "Missing Destination")
        dpath = unquote(urlsplit(dest).path) or "/"
        try:
            target = self._local(dpath)
        except _BadPath as e:
            return self._simple(400, str(e))
        if not os.path.lexists(self.fspath):
            return self._simple(404, "Not Found")
        if not os.path.isdir(os.path.dirname(target)):
            return self._simple(409, "Parent collection does not exist")
        existed = os.path.lexists(target)
        if existed:
            if self.headers.get("Overwrite", "T").strip().upper() == "F":
                return self._simple(412, "Destination exists")
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        os.replace(self.fspath, target)
        return self._simple(204 if existed else 201, b"" if existed else "Created")

    # -------------------------------------------------------- PROPFIND
    def _door_PROPFIND(self):
        depth = self.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "1"):
            return self._simple(403, "Depth infinity is not supported")
        raw = b"".join(self._body_chunks()) if self._has_body() else b""
        wanted = None  # None = allprop
        if raw.strip():
            try:
                tree = ElementTree.fromstring(raw)
            except ElementTree.ParseError:
                return self._simple(400, "Bad PROPFIND body")
            prop = tree.find("{DAV:}prop")
            if prop is not None:
                wanted = []
                for el in prop:
                    ns, _, name = el.tag[1:].partition("}") if el.tag.startswith("{") \
                        else ("", "", el.tag)
                    wanted.append((ns, name))
        if not os.path.lexists(self.fspath):
            return self._simple(404, "Not Found")
        entries = [(self.upath, self.fspath)]
        if depth == "1" and os.path.isdir(self.fspath):
            base = self.upath.rstrip("/")
            for name in sorted(os.listdir(self.fspath)):
                if not name.startswith(_TMP_PREFIX):
                    entries.append((base + "/" + name, os.path.join(self.fspath, name)))
        body = ['<?xml version="1.0" encoding="UTF-8"?>\n<d:multistatus xmlns:d="DAV:" '
                'xmlns:ns1="%s" xmlns:ns2="%s">' % (DCACHE_NS, SRM_NS)]
        for upath, local in entries:
            body.append(self._response_xml(upath, local, wanted))
        body.append("</d:multistatus>\n")
        data = "".join(body).encode()
        cut = self._take("truncate", "reset", "stall")
        self.send_response(207)
        self.send_header("Content-Type", "application/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut is None:
            self.wfile.write(data)
            return
        after = cut.params["after"]
        self.wfile.write(data[:after])
        self._cut(cut)
        self.wfile.write(data[after:])

    def _props(self, upath, local):
        """{(ns, name): xml content} of what this resource has."""
        st = os.stat(local)
        isdir = os.path.isdir(local)
        name = upath.rstrip("/").rsplit("/", 1)[-1]
        props = {
            (DAV, "resourcetype"): "<d:collection/>" if isdir else "",
            (DAV, "getlastmodified"): email.utils.formatdate(st.st_mtime, usegmt=True),
            (DAV, "displayname"): escape(name),
        }
        if not isdir:
            sums = _digests(local)
            props.update({
                (DAV, "getcontentlength"): str(st.st_size),
                (DAV, "getetag"): escape(self._etag(st)),
                (DAV, "getcontenttype"): "application/octet-stream",
                (DCACHE_NS, "Checksums"): "adler32=%s,md5=%s" % (sums["adler32"], sums["md5"]),
                (SRM_NS, "FileLocality"): escape(self.fs.locality.get(_norm(upath), "ONLINE")),
            })
        for miss in self.fs.missing_props.get(_norm(upath), ()):
            for key in list(props):
                if miss in (key[1], "{%s}%s" % key):
                    del props[key]
        return props

    def _response_xml(self, upath, local, wanted):
        props = self._props(upath, local)
        if wanted is None:
            wanted = [k for k in props if k[0] == DAV]
        href = quote(upath.rstrip("/") + ("/" if os.path.isdir(local) else ""))
        if href == "//":
            href = "/"

        def tag(ns, name, content=None):
            prefix = _PREFIX.get(ns)
            if prefix is None:
                t, decl = "x:" + name, ' xmlns:x="%s"' % escape(ns, {'"': "&quot;"})
            else:
                t, decl = "%s:%s" % (prefix, name), ""
            if content is None or content == "":
                return "<%s%s/>" % (t, decl)
            return "<%s%s>%s</%s>" % (t, decl, content, t)

        found = "".join(tag(ns, n, props[(ns, n)]) for ns, n in wanted if (ns, n) in props)
        missing = "".join(tag(ns, n) for ns, n in wanted if (ns, n) not in props)
        out = ["<d:response><d:href>%s</d:href>" % escape(href)]
        if found:
            out.append("<d:propstat><d:prop>%s</d:prop>"
                       "<d:status>HTTP/1.1 200 OK</d:status></d:propstat>" % found)
        if missing:
            out.append("<d:propstat><d:prop>%s</d:prop>"
                       "<d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>" % missing)
        out.append("</d:response>")
        return "".join(out)
