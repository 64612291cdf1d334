"""A dCache-like tape-backed storage: a WebDAV door and the WLCG Tape REST API v1.

Written from the "WLCG Tape REST API reference document v1" (wlcg-storage/
wlcg-tape-rest-api, May 2022) and from what dCache's door and frontend do
(notes in /work/notes/stands.md).  Two listeners at most, both HTTP/1.1 keep-alive
on 127.0.0.1, port 0, built on tests/httpdouble.py:

* the *door* (``tape.url``): WebDAV over the files below ``root`` (GET, HEAD,
  PROPFIND, OPTIONS; no writes), and ``GET /.well-known/wlcg-tape-rest-api``
  (no token needed);
* the tape API (``tape.api_url``, default path ``/api/v1/tape``): on the door, or,
  with ``api_origin=True``, on a second listener (``tape.api_origin_url``), like
  dCache's frontend on port 3880.  The door then has no API.

Usage::

    with TapeServer(tmp_path, token="tok", drives=2, stage_seconds=10,
                    speed=100) as tape:           # 10 emulated s = 0.1 s
        tape.set_file("/raw/run1.fits", stage_seconds=30)
        tape.set_file("/raw/bad.fits", locality="LOST")
        ...  # a client stages and downloads via tape.url / tape.api_url
        assert not tape.tape_only_gets()          # no GET of a file on tape only
        assert tape.find(method="POST", path=tape.api_path + "/stage")
        tape.makespan()                           # emulated s, submission -> last on disk

Constructor ``TapeServer(root, token="tok", *, drives=2, stage_seconds=1.0,
disk_lifetime=3600, default_locality="NEARLINE", speed=1.0, clock=None,
api_origin=False, api_path="/api/v1/tape", dav_prefix="", tape_prefix=None,
report="state", shuffle=True, seed=0, archiveinfo_limit=None, max_files=1000,
request_ttl=None, timestamps="s", nearline_get_timeout=1.0,
nearline_get_status=503, sitename="ctadata-test-tape",
cancelled_state="CANCELLED")``.  Every option is a
plain attribute, read when used (so a test may change ``report`` or
``archiveinfo_limit`` between two polls).  ``token=None``: no token checked.
``start()``/``stop()`` or the context manager.  Durations are in emulated seconds.
``clock``: a ``Clock`` to share or drive (``speed`` is then ignored).  Helpers:
``dav_url(rel)`` (door URL of a file), ``api_name(rel)`` (its API path),
``well_known_url``, ``now()`` (emulated time).

Paths.  A file ``root/raw/a`` has the relative path ``/raw/a``; the door serves it
at URL path ``dav_prefix + "/raw/a"`` and the API knows it as ``tape_prefix +
"/raw/a"`` (default ``tape_prefix = dav_prefix``).  dCache maps API paths
relative to its frontend root, WebDAV paths relative to the door's root, so the
two may differ (dCache issue 7506): e.g. ``dav_prefix="/data"``,
``tape_prefix="/pnfs/example.org/data"``.  An API path outside ``tape_prefix`` is
"No such file or directory".  The server sanitises API paths (duplicate and
trailing slashes removed, spec p. 8) and answers with the sanitised form.

Time.  ``Clock(speed=1.0)``: emulated seconds since the epoch, running ``speed``
times as fast as real time (0 = stopped: it moves only when told).
``tape.advance(seconds)`` jumps forward (evictions, expiry) at any speed.  The
emulation is evaluated lazily at the current emulated time on every request,
so it is exact at any speed.  Timestamps in answers are integer seconds
(spec examples) or, ``timestamps="ms"``, milliseconds (what dCache sends).

Tape emulation.
* Locality per file: ``set_file(path, locality=..., stage_seconds=...)``; default
  ``default_locality`` (NEARLINE: on tape only), NONE for an empty file.  Base
  localities ONLINE (disk only), ONLINE_AND_NEARLINE (disk copy kept for good),
  NEARLINE, LOST, UNAVAILABLE.  A NEARLINE file that has been staged is
  ONLINE_AND_NEARLINE while a pin holds it (``diskLifetime`` of the stage
  request, default ``disk_lifetime``), then NEARLINE again (evicted).
* ``drives`` tape drives read files in submission order (FIFO over all requests)
  as drives free up, ``stage_seconds`` each (``set_file`` overrides per path;
  ``stage_seconds`` may also be a dict ``{path or fnmatch pattern: s}`` with a
  ``"*"`` default).  A file asked for by several requests is read once.
* File states in a request: SUBMITTED (queued for a drive), STARTED (on a drive
  or joined a running read), COMPLETED, FAILED (+ ``error``), CANCELLED.  Already
  on disk: COMPLETED at once.  Missing, a directory, an empty file: FAILED at once
  (the spec's "file-specific error").  LOST / UNAVAILABLE files take their drive
  time, then FAILED.  ``report="onDisk"``: files carry ``onDisk`` (whether the
  file is on disk now) instead of ``state`` (the spec allows either);
  ``cancelled_state="CANCELED"`` spells that state the American way, as clients
  should also accept (PROTOCOL.md).  File order in answers is shuffled
  (``shuffle``; seeded by ``seed``).
* cancel: SUBMITTED/STARTED -> CANCELLED (a read nobody waits for any more is
  dropped, its drive freed); COMPLETED stays COMPLETED but loses its pin.  Paths
  not in the request -> 400, nothing changed (spec p. 17).  DELETE: cancel, then
  the id is gone (404).  release: the request's pins on those files are dropped
  (a file with no pin left is evicted at once); the files' states do not change;
  paths not in the request -> 400 (as cancel; the spec does not say), unknown id
  -> 404.
* ``request_ttl``: a request is forgotten (404) that long after its last file
  finished, as dCache's bulk service cleans up; ``expire(request_id)`` forgets it
  now.
* More than ``max_files`` files in one stage request -> 400 (the spec sets no
  limit and lists only 400 for a bad request; dCache answers 429 when its own
  limits are hit).  ``archiveinfo_limit=N`` answers for the first N paths only
  (the spec: "the server MUST NOT return an error", it answers what it could).
* Errors are RFC 7807 ``application/problem+json`` (``title``, ``status``,
  ``detail``): 400 malformed JSON / missing ``files`` or ``paths`` / bad
  ``diskLifetime`` / too many files / paths not in the request, 401 no or wrong
  token, 404 unknown id or route, 405 wrong method.

Door.  PROPFIND Depth 0/1 (else 403) with dCache's properties when asked for
explicitly: ``{http://srm.lbl.gov/StorageResourceManager}FileLocality``,
``AccessLatency`` (ONLINE/NEARLINE), ``RetentionPolicy`` (CUSTODIAL/REPLICA),
``{http://www.dcache.org/2013/webdav}Checksums`` (``adler32=<8 hex>``), and the
DAV ones (resourcetype, getcontentlength, getlastmodified, getetag,
getcontenttype, displayname); empty body / allprop -> DAV props only; props a
resource lacks -> a 404 propstat.  GET/HEAD with ``Range`` (one range; 206/416),
``ETag``, ``Last-Modified`` and ``Digest: adler32=..`` (+ ``md5``) when asked by
``Want-Digest``.  A GET of a file that is not on disk (NEARLINE, LOST,
UNAVAILABLE) blocks up to ``nearline_get_timeout`` real seconds (dCache's door:
minutes), serves the file if it came online meanwhile, else answers
``nearline_get_status`` (503).  HEAD never blocks.  Writes -> 405.

Records (guarded by ``tape.lock``).  ``tape.requests``: one ``Record`` per request
(``listener`` "door"/"api", ``method``, ``path`` decoded, ``query``, ``headers``
dict with lower-case names and the Authorization value replaced by its scheme +
" <redacted>", ``authorized`` bool, ``body`` bytes of API requests, ``json``,
``status``, ``locality`` of a door GET/HEAD target at request time, ``time``
emulated).  ``find(method=None, path=None, listener=None)``, ``count(...)``,
``tape_only_gets()`` (door GETs of a file that was not on disk), ``reset_log()``.
``tape.errors``: tracebacks of stand-in bugs (answered 500; should stay []).
``tape.recalls``: tape reads done (``path``, ``start``, ``end``, ``ok``).
``makespan(request_ids=None)``: emulated seconds from the first of these stage
requests' submission to the last of their files finished (None while one is
pending); ``makespan_wall(...)`` the same in real seconds.  ``locality(path)``,
``on_disk(path)``, ``request_state(id)`` (the JSON a GET would return, unshuffled).
"""

import email.utils
import fnmatch
import hashlib
import base64
import json
import os
import random
import re
import threading
import time
import traceback
import uuid
import zlib
from collections import deque
from urllib.parse import quote, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from httpdouble import BUFSIZE, DoubleHandler, ServerDouble

__all__ = ["TapeServer", "Clock", "Record", "LOCALITIES", "STATES"]

DAV_NS = "DAV:"
DCACHE_NS = "http://www.dcache.org/2013/webdav"
SRM_NS = "http://srm.lbl.gov/StorageResourceManager"
_PREFIX = {DAV_NS: "d", DCACHE_NS: "dc", SRM_NS: "srm"}

LOCALITIES = ("ONLINE", "NEARLINE", "ONLINE_AND_NEARLINE", "LOST", "UNAVAILABLE", "NONE")
# FileLocality (SRM, PROPFIND) -> locality of the Tape REST API (archiveinfo)
API_LOCALITY = {"ONLINE": "DISK", "NEARLINE": "TAPE", "ONLINE_AND_NEARLINE": "DISK_AND_TAPE",
                "LOST": "LOST", "UNAVAILABLE": "UNAVAILABLE", "NONE": "NONE"}
STATES = ("SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED")
_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
WELL_KNOWN = "/.well-known/wlcg-tape-rest-api"
NO_SUCH_FILE = "No such file or directory"

# java.time.Duration syntax (what dCache's TimeUtils.validateDuration accepts).
_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?"
                       r"(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$", re.I)


def parse_duration(text):
    """ISO 8601 duration ("PT1H", "P1DT12H", "PT90.5S") -> seconds; ValueError."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not m or not any(m.groups()) or text.strip().upper().endswith("T"):
        raise ValueError("invalid ISO 8601 duration %r" % (text,))
    d, h, mi, s = (float(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def sanitise(path):
    """Collapse duplicate slashes, drop a trailing one; "" for no path."""
    path = re.sub("/+", "/", path)
    if len(path) > 1:
        path = path.rstrip("/")
    return path


class Clock(object):
    """Emulated time: ``speed`` x real time (0 = only ``advance`` moves it)."""

    def __init__(self, speed=1.0, start=None):
        self.speed = float(speed)
        self._start = time.time() if start is None else float(start)
        self._mono = time.monotonic()
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self):
        with self._lock:
            return self._start + (time.monotonic() - self._mono) * self.speed + self._offset

    def advance(self, seconds):
        with self._lock:
            self._offset += float(seconds)

    def to_wall(self, seconds):
        """Real seconds that ``seconds`` of emulated time take (inf if stopped)."""
        return seconds / self.speed if self.speed else float("inf")


class Record(object):
    """One request as the server saw it (see the module docstring)."""

    __slots__ = ("listener", "method", "path", "query", "headers", "authorized", "body",
                 "status", "locality", "time")

    def __init__(self, listener, method, path, query, headers, authorized, when):
        self.listener, self.method, self.path, self.query = listener, method, path, query
        self.headers, self.authorized, self.time = headers, authorized, when
        self.body = self.status = self.locality = None

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def __repr__(self):
        return "<Record %s %s %s %s -> %s>" % (self.listener, self.method, self.path,
                                               self.query, self.status)


class _Read(object):
    """One recall of one file from tape, shared by the requests that want it."""

    def __init__(self, rel, duration, queued):
        self.rel, self.duration, self.queued = rel, duration, queued
        self.start = self.end = None
        self.entries = []           # _Entry objects still waiting for this read


class _Entry(object):
    """One file of one stage request."""

    def __init__(self, rid, path, rel, lifetime):
        self.rid, self.path, self.rel, self.lifetime = rid, path, rel, lifetime
        self.state, self.error = "SUBMITTED", None
        self.started = self.finished = None
        self.read = None
        self.released = False


class _Request(object):
    def __init__(self, rid, created):
        self.id, self.created = rid, created
        self.entries = {}           # sanitised API path -> _Entry, in submission order
        self.forgotten = False

    def completed(self):
        if self.entries and all(e.state in _TERMINAL for e in self.entries.values()):
            return max(e.finished for e in self.entries.values())
        return None


class _Problem(Exception):
    def __init__(self, status, title, detail=None):
        Exception.__init__(self, title)
        self.status, self.title, self.detail = status, title, detail


# ---------------------------------------------------------------- the server

class TapeServer(object):
    """Tape-backed dCache-like storage; see the module docstring."""

    def __init__(self, root, token="tok", drives=2, stage_seconds=1.0, disk_lifetime=3600,
                 default_locality="NEARLINE", speed=1.0, clock=None, api_origin=False,
                 api_path="/api/v1/tape", dav_prefix="", tape_prefix=None, report="state",
                 shuffle=True, seed=0, archiveinfo_limit=None, max_files=1000,
                 request_ttl=None, timestamps="s", nearline_get_timeout=1.0,
                 nearline_get_status=503, sitename="ctadata-test-tape",
                 cancelled_state="CANCELLED"):
        self.root = os.path.abspath(os.fspath(root))
        self.token = token
        self.drives = drives
        self.stage_seconds = stage_seconds
        self.disk_lifetime = disk_lifetime
        self.default_locality = default_locality
        self.clock = clock if clock is not None else Clock(speed)
        self.api_origin = api_origin
        self.api_path = "/" + api_path.strip("/")
        self.dav_prefix = sanitise(dav_prefix).rstrip("/")
        self.tape_prefix = self.dav_prefix if tape_prefix is None \
            else sanitise(tape_prefix).rstrip("/")
        self.report = report
        self.shuffle = shuffle
        self.archiveinfo_limit = archiveinfo_limit
        self.max_files = max_files
        self.request_ttl = request_ttl
        self.timestamps = timestamps
        self.nearline_get_timeout = nearline_get_timeout
        self.nearline_get_status = nearline_get_status
        self.sitename = sitename
        self.cancelled_state = cancelled_state
        self.lock = threading.RLock()
        self.requests = []
        self.recalls = []
        self.errors = []
        self._random = random.Random(seed)
        self._files = {}            # rel -> {"locality":.., "stage_seconds":..}
        self._pins = {}             # rel -> {request id: expiry}
        self._stage_requests = {}   # id -> _Request (also forgotten ones, for makespan)
        self._queue = deque()
        self._running = []
        self._t = self.clock.now()
        self._stop = threading.Event()
        self._door = _Listener(self, "door")
        self._api = _Listener(self, "api") if api_origin else None
        self.url = self.api_origin_url = None

    # ------------------------------------------------------------ life cycle
    def start(self):
        self._door.start()
        self.url = self._door.url
        if self._api is not None:
            self._api.start()
            self.api_origin_url = self._api.url
        else:
            self.api_origin_url = self.url
        return self

    def stop(self):
        self._stop.set()
        for listener in (self._door, self._api):
            if listener is not None:
                listener.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def api_url(self):
        """The endpoint ``uri`` announced by the discovery document."""
        return self.api_origin_url + self.api_path

    @property
    def well_known_url(self):
        return self.url + WELL_KNOWN

    def dav_url(self, rel):
        """Door URL of the file with relative path ``rel``."""
        return self.url + quote(self.dav_prefix + "/" + rel.lstrip("/"))

    def api_name(self, rel):
        """The API's path for the file with relative path ``rel``."""
        return self.tape_prefix + "/" + rel.lstrip("/")

    # ------------------------------------------------------------ test controls
    def set_file(self, rel, locality=None, stage_seconds=None):
        """Set the base locality and/or the staging time of one file."""
        if locality is not None and locality not in LOCALITIES:
            raise ValueError("locality must be one of %s" % ", ".join(LOCALITIES))
        rel = _rel(rel)
        with self.lock:
            self._update()
            info = self._files.setdefault(rel, {})
            if locality is not None:
                info["locality"] = locality
                self._pins.pop(rel, None)
            if stage_seconds is not None:
                info["stage_seconds"] = float(stage_seconds)

    def advance(self, seconds):
        """Move emulated time forward (reads finish, pins expire, requests expire)."""
        self.clock.advance(seconds)
        with self.lock:
            self._update()

    def now(self):
        return self.clock.now()

    def expire(self, request_id):
        """Forget a stage request now (later GETs -> 404)."""
        with self.lock:
            self._stage_requests[request_id].forgotten = True

    def locality(self, rel):
        """Current FileLocality of a file (None if it does not exist)."""
        with self.lock:
            self._update()
            return self._locality(_rel(rel))

    def on_disk(self, rel):
        with self.lock:
            self._update()
            return self._on_disk(_rel(rel))

    def request_state(self, request_id):
        with self.lock:
            self._update()
            req = self._live_request(request_id)
            return None if req is None else self._request_json(req, shuffle=False)

    def makespan(self, request_ids=None):
        """Emulated seconds from the first submission of these stage requests
        (default: all) to the last of their files finished; None if not done."""
        with self.lock:
            self._update()
            reqs = [r for rid, r in self._stage_requests.items()
                    if request_ids is None or rid in request_ids]
            if not reqs:
                return None
            ends = [r.completed() for r in reqs]
            if any(e is None for e in ends):
                return None
            return max(ends) - min(r.created for r in reqs)

    def makespan_wall(self, request_ids=None):
        span = self.makespan(request_ids)
        return None if span is None else self.clock.to_wall(span)

    def find(self, method=None, path=None, listener=None):
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method.upper())
                    and (path is None or r.path == path)
                    and (listener is None or r.listener == listener)]

    def count(self, method=None, path=None, listener=None):
        return len(self.find(method, path, listener))

    def tape_only_gets(self):
        """Door GETs whose file was not on disk when asked for."""
        with self.lock:
            return [r for r in self.requests if r.listener == "door" and r.method == "GET"
                    and r.locality in ("NEARLINE", "LOST", "UNAVAILABLE")]

    def reset_log(self):
        with self.lock:
            del self.requests[:]

    # ------------------------------------------------------------ files
    def _local(self, rel):
        return os.path.join(self.root, *[p for p in rel.split("/") if p])

    def _base_locality(self, rel):
        info = self._files.get(rel, {})
        if "locality" in info:
            return info["locality"]
        try:
            if os.path.getsize(self._local(rel)) == 0:
                return "NONE"
        except OSError:
            pass
        return self.default_locality

    def _on_disk(self, rel):
        base = self._base_locality(rel)
        if base in ("ONLINE", "ONLINE_AND_NEARLINE"):
            return True
        if base != "NEARLINE":
            return False
        return any(exp > self._t for exp in self._pins.get(rel, {}).values())

    def _locality(self, rel):
        local = self._local(rel)
        if not os.path.lexists(local) or os.path.isdir(local):
            return None
        base = self._base_locality(rel)
        if base == "NEARLINE" and self._on_disk(rel):
            return "ONLINE_AND_NEARLINE"
        return base

    def _stage_time(self, rel):
        info = self._files.get(rel, {})
        if "stage_seconds" in info:
            return info["stage_seconds"]
        table = self.stage_seconds
        if not isinstance(table, dict):
            return float(table)
        if rel in table:
            return float(table[rel])
        for pattern, seconds in table.items():
            if pattern != "*" and fnmatch.fnmatchcase(rel, pattern):
                return float(seconds)
        return float(table.get("*", 1.0))

    def _rel_of_api_path(self, path):
        prefix = self.tape_prefix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return None
        rel = path[len(prefix):] or "/"
        if any(seg in (".", "..") for seg in rel.split("/")):
            return None
        return rel

    def _rel_of_dav_path(self, path):
        prefix = self.dav_prefix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return None
        rel = path[len(prefix):] or "/"
        if any(seg in (".", "..") for seg in rel.split("/")) or "\0" in rel:
            return None
        return rel

    # ------------------------------------------------------------ emulation
    def _update(self):
        """Run the emulation up to the clock's present (call with the lock)."""
        now = max(self._t, self.clock.now())
        t = self._t
        while True:
            self._fill(t)
            if not self._running:
                break
            end = min(r.end for r in self._running)
            if end > now:
                break
            t = end
            for read in [r for r in self._running if r.end <= t]:
                self._running.remove(read)
                self._finish(read)
        self._t = now
        self._fill(now)
        if self.request_ttl is not None:
            for req in self._stage_requests.values():
                done = req.completed()
                if done is not None and now >= done + self.request_ttl:
                    req.forgotten = True

    def _fill(self, t):
        while self._queue and len(self._running) < self.drives:
            read = self._queue.popleft()
            if not read.entries:
                continue            # everybody cancelled it
            read.start, read.end = t, t + read.duration
            self._running.append(read)
            for entry in read.entries:
                entry.state, entry.started = "STARTED", t

    def _finish(self, read):
        base = self._base_locality(read.rel)
        ok = base in ("NEARLINE", "ONLINE", "ONLINE_AND_NEARLINE")
        self.recalls.append({"path": read.rel, "queued": read.queued, "start": read.start,
                             "end": read.end, "ok": ok})
        for entry in read.entries:
            entry.finished, entry.read = read.end, None
            if ok:
                entry.state = "COMPLETED"
                if not entry.released:
                    self._pin(entry, read.end)
            else:
                entry.state = "FAILED"
                entry.error = ("File is lost on tape (tape read error)" if base == "LOST"
                               else "File is unavailable: tape not accessible")
        read.entries = []

    def _pin(self, entry, t):
        pins = self._pins.setdefault(entry.rel, {})
        pins[entry.rid] = max(pins.get(entry.rid, 0), t + entry.lifetime)

    def _unpin(self, entry):
        self._pins.get(entry.rel, {}).pop(entry.rid, None)

    def _cancel_entry(self, entry):
        if entry.state in _TERMINAL:
            self._unpin(entry)
            entry.released = True
            return
        entry.state, entry.finished = "CANCELLED", self._t
        if entry.started is None:
            entry.started = self._t
        read, entry.read = entry.read, None
        if read is not None and entry in read.entries:
            read.entries.remove(entry)
            if not read.entries and read in self._running:
                self._running.remove(read)      # abort: the drive is free now
                self._fill(self._t)

    def _submit(self, files):
        """files: [(sanitised path, lifetime)] -> the new _Request."""
        now = self._t
        req = _Request(str(uuid.uuid4()), now)
        waiting = {}
        for read in list(self._queue) + self._running:
            if read.entries:
                waiting[read.rel] = read
        for path, lifetime in files:
            if path in req.entries:
                continue            # duplicates are merged (dCache: "sanitized")
            rel = self._rel_of_api_path(path)
            entry = _Entry(req.id, path, rel, lifetime)
            req.entries[path] = entry
            error = self._stage_error(rel)
            if error is not None:
                entry.state, entry.error = "FAILED", error
                entry.started = entry.finished = now
            elif self._on_disk(rel):
                entry.state, entry.started = "COMPLETED", now
                entry.finished = now
                self._pin(entry, now)
            else:
                read = waiting.get(rel)
                if read is None:
                    read = waiting[rel] = _Read(rel, self._stage_time(rel), now)
                    self._queue.append(read)
                read.entries.append(entry)
                entry.read = read
                if read.start is not None:
                    entry.state, entry.started = "STARTED", now
        self._stage_requests[req.id] = req
        self._fill(now)
        return req

    def _stage_error(self, rel):
        if rel is None:
            return NO_SUCH_FILE
        local = self._local(rel)
        if not os.path.lexists(local):
            return NO_SUCH_FILE
        if os.path.isdir(local):
            return "Not a file: directories are not stored on tape"
        if self._base_locality(rel) == "NONE":
            return "Empty file: not stored on tape"
        return None

    def _live_request(self, rid):
        req = self._stage_requests.get(rid)
        return None if req is None or req.forgotten else req

    # ------------------------------------------------------------ JSON
    def _ts(self, t):
        return int(t * 1000) if self.timestamps == "ms" else int(t)

    def _request_json(self, req, shuffle=True):
        files = []
        for entry in req.entries.values():
            item = {"path": entry.path}
            if self.report == "onDisk":
                item["onDisk"] = bool(entry.rel is not None and entry.error is None
                                      and self._on_disk(entry.rel))
            else:
                item["state"] = (self.cancelled_state if entry.state == "CANCELLED"
                                 else entry.state)
                if entry.started is not None:
                    item["startedAt"] = self._ts(entry.started)
                if entry.finished is not None:
                    item["finishedAt"] = self._ts(entry.finished)
            if entry.error:
                item["error"] = entry.error
            files.append(item)
        if shuffle and self.shuffle:
            self._random.shuffle(files)
        started = [e.started for e in req.entries.values() if e.started is not None]
        out = {"id": req.id, "createdAt": self._ts(req.created),
               "startedAt": self._ts(min(started) if started else req.created),
               "files": files}
        done = req.completed()
        if done is not None:
            out["completedAt"] = self._ts(done)
        return out


def _rel(path):
    return "/" + sanitise(path).strip("/")


# ---------------------------------------------------------------- listeners

class _Listener(ServerDouble):
    def __init__(self, tape, role):
        ServerDouble.__init__(self)
        self.tape, self.role = tape, role


class _Handler(DoubleHandler):
    server_version = "dCache/9.2-ctadata-test"

    @property
    def tape(self):
        return self.double.tape

    def send_response(self, code, message=None):
        DoubleHandler.send_response(self, code, message)
        if self._record is not None and code >= 200:
            self._record.status = code

    def handle_one_request(self):
        self._record = None
        DoubleHandler.handle_one_request(self)

    # ---- dispatch ---------------------------------------------------------
    def _dispatch(self):
        tape, role = self.tape, self.double.role
        split = urlsplit(self.path)
        self.upath = unquote(split.path) or "/"
        headers = {}
        for name, value in self.headers.items():
            if name.lower() == "authorization":
                value = value.partition(" ")[0] + " <redacted>"
            headers[name.lower()] = value
        scheme, _, cred = self.headers.get("Authorization", "").partition(" ")
        authorized = tape.token is None or (scheme.lower() == "bearer"
                                            and cred.strip() == tape.token)
        with tape.lock:
            record = Record(role, self.command, self.upath, split.query, headers, authorized,
                            tape.clock.now())
            tape.requests.append(record)
        self._record = record
        try:
            self._route(authorized)
        except Exception:
            with tape.lock:
                tape.errors.append(traceback.format_exc())
            self.close_connection = True
            if record.status is None:
                self.send(500, "stand-in error (see tape.errors)")

    def _route(self, authorized):
        tape, role = self.tape, self.double.role
        try:
            if self.upath == WELL_KNOWN:
                return self._well_known()
            serves_api = role == "api" or not tape.api_origin
            if serves_api and (self.upath == tape.api_path
                               or self.upath.startswith(tape.api_path + "/")):
                return self._api(authorized)
            if role == "api":
                raise _Problem(404, "Not found")
            if not authorized:
                return self.send(401, "Unauthorized",
                                 headers=[("WWW-Authenticate", 'Bearer realm="dCache"')])
            return self._dav()
        except _Problem as p:
            body = {"title": p.title, "status": p.status}
            if p.detail:
                body["detail"] = p.detail
            headers = [("Allow", p.detail)] if p.status == 405 else []
            return self.send(p.status, json.dumps(body), "application/problem+json", headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _dispatch
    do_PROPFIND = do_PROPPATCH = do_MKCOL = do_MOVE = do_COPY = do_PATCH = _dispatch

    def _well_known(self):
        if self.command not in ("GET", "HEAD"):
            raise _Problem(405, "Method not allowed", "GET, HEAD")
        tape = self.tape
        self.send_json(200, {
            "sitename": tape.sitename,
            "description": "ctadata test tape endpoint (WLCG Tape REST API v1 stand-in)",
            "endpoints": [{"uri": tape.api_url, "version": "v1", "metadata": {}}]})

    # ---- tape REST API ----------------------------------------------------
    def _api(self, authorized):
        tape = self.tape
        rest = self.upath[len(tape.api_path):].strip("/").split("/")
        routes = [
            (["stage"], {"POST": self._stage_submit}),
            (["stage", None], {"GET": self._stage_status, "DELETE": self._stage_delete}),
            (["stage", None, "cancel"], {"POST": self._stage_cancel}),
            (["release", None], {"POST": self._release}),
            (["archiveinfo"], {"POST": self._archiveinfo}),
        ]
        for pattern, methods in routes:
            if len(pattern) == len(rest) and all(p is None or p == r
                                                 for p, r in zip(pattern, rest)):
                break
        else:
            raise _Problem(404, "Not found")
        if not authorized:
            raise _Problem(401, "Unauthorized", "A valid bearer token is needed")
        if self.command not in methods:
            raise _Problem(405, "Method not allowed", ", ".join(sorted(methods)))
        args = [r for p, r in zip(pattern, rest) if p is None]
        if self.command == "POST":
            self._body = self.read_body()
            self._record.body = self._body
        with tape.lock:
            tape._update()
            return methods[self.command](*args)

    def _json_body(self, key):
        """The request body's list under ``key`` (400 if it is not a non-empty one)."""
        try:
            doc = json.loads(self._body.decode("utf-8"))
        except ValueError as exc:
            raise _Problem(400, "Bad Request", "The body is not valid JSON: %s" % exc)
        items = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items:
            raise _Problem(400, "JSON Validation error",
                           "%s - Field does not exist or is not a valid non-empty array" % key)
        return items

    def _paths(self):
        paths = self._json_body("paths")
        if not all(isinstance(p, str) and p for p in paths):
            raise _Problem(400, "JSON Validation error", "paths - must be non-empty strings")
        return [sanitise(p) for p in paths]

    def _request(self, rid):
        req = self.tape._live_request(rid)
        if req is None:
            raise _Problem(404, "Not found", "No STAGE request with id %s" % rid)
        return req

    def _stage_submit(self):
        tape = self.tape
        files = self._json_body("files")
        if tape.max_files is not None and len(files) > tape.max_files:
            raise _Problem(400, "Too many files",
                           "%d files in one request; this endpoint accepts at most %d"
                           % (len(files), tape.max_files))
        wanted = []
        for i, item in enumerate(files):
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(path, str) or not path:
                raise _Problem(400, "JSON Validation error",
                               "files[%d].path - Field does not exist or is not a string" % i)
            lifetime = tape.disk_lifetime
            if item.get("diskLifetime") is not None:
                try:
                    lifetime = parse_duration(item["diskLifetime"])
                except ValueError as exc:
                    raise _Problem(400, "JSON Validation error",
                                   "files[%d].diskLifetime - %s" % (i, exc))
            wanted.append((sanitise(path), lifetime))
        req = tape._submit(wanted)
        location = tape.api_url + "/stage/" + req.id
        self.send(201, json.dumps({"requestId": req.id}), "application/json",
                  [("Location", location)])

    def _stage_status(self, rid):
        self.send_json(200, self.tape._request_json(self._request(rid)))

    def _stage_cancel(self, rid):
        req = self._request(rid)
        paths = self._paths()
        self._check_belong(req, paths)
        for path in paths:
            self.tape._cancel_entry(req.entries[path])
        self.send(200, b"", "application/json")

    def _stage_delete(self, rid):
        req = self._request(rid)
        for entry in req.entries.values():
            if entry.state not in _TERMINAL:
                self.tape._cancel_entry(entry)
        req.forgotten = True
        self.send(200, b"", "application/json")

    def _release(self, rid):
        req = self._request(rid)
        paths = self._paths()
        self._check_belong(req, paths)
        for path in paths:
            entry = req.entries[path]
            entry.released = True
            self.tape._unpin(entry)
        self.send(200, b"", "application/json")

    def _check_belong(self, req, paths):
        for path in paths:
            if path not in req.entries:
                raise _Problem(400, "File missing from stage request",
                               "The file %s does not belong to the STAGE request %s. "
                               "No modification has been made to this request."
                               % (path, req.id))

    def _archiveinfo(self):
        tape = self.tape
        paths = self._paths()
        if tape.archiveinfo_limit is not None:
            paths = paths[:tape.archiveinfo_limit]
        out = []
        for path in paths:
            rel = tape._rel_of_api_path(path)
            locality = None if rel is None else tape._locality(rel)
            if locality is None:
                out.append({"path": path, "error": NO_SUCH_FILE})
            else:
                out.append({"path": path, "locality": API_LOCALITY[locality]})
        self.send_json(200, out)

    # ---- WebDAV door -------------------------------------------------------
    def _dav(self):
        tape = self.tape
        rel = tape._rel_of_dav_path(self.upath)
        if self.command == "OPTIONS":
            return self.send(200, b"", headers=[("DAV", "1, 2"),
                                                ("Allow", "OPTIONS, GET, HEAD, PROPFIND")])
        local = None if rel is None else tape._local(rel)
        if local is None or not os.path.lexists(local):
            return self.send(404, "Not Found")
        if self.command not in ("GET", "HEAD", "PROPFIND"):
            return self.send(405, "Method not allowed",
                             headers=[("Allow", "OPTIONS, GET, HEAD, PROPFIND")])
        if self.command == "PROPFIND":
            return self._propfind(rel, local)
        if os.path.isdir(local):
            return self.send(200, "<html><body>%s</body></html>" % escape(self.upath),
                             "text/html; charset=utf-8")
        with tape.lock:
            tape._update()
            self._record.locality = tape._locality(rel)
            on_disk = tape._on_disk(rel) or self._record.locality == "NONE"
        if not on_disk and self.command == "GET":
            deadline = time.monotonic() + tape.nearline_get_timeout
            while not on_disk and time.monotonic() < deadline:
                tape._stop.wait(0.02)
                with tape.lock:
                    tape._update()
                    on_disk = tape._on_disk(rel)
            if not on_disk:
                return self.send(tape.nearline_get_status,
                                 "File is not online: staging from tape required")
        return self._send_file(local)

    def _send_file(self, local):
        st = os.stat(local)
        size = st.st_size
        etag = '"%x-%x"' % (st.st_ino, int(st.st_mtime * 1000))
        headers = [("Accept-Ranges", "bytes"), ("ETag", etag),
                   ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))]
        digest = self._digest(local)
        if digest:
            headers.append(("Digest", digest))
        start, end, status = 0, size - 1, 200
        rng = _parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            return self.send(416, b"", headers=[("Content-Range", "bytes */%d" % size)])
        if rng is not None:
            start, end, status = rng[0], rng[1], 206
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end, size)))
        length = max(0, end - start + 1)
        self._start(status, [("Content-Type", "application/octet-stream"),
                             ("Content-Length", str(length))] + headers)
        if self.command == "HEAD":
            return
        with open(local, "rb") as f:
            f.seek(start)
            while length:
                data = f.read(min(BUFSIZE, length))
                if not data:
                    break
                self.wfile.write(data)
                length -= len(data)

    def _digest(self, local):
        wanted = [w.split(";")[0].strip().lower()
                  for w in self.headers.get("Want-Digest", "").split(",")]
        out = []
        for algo in wanted:
            if algo == "adler32":
                out.append("adler32=" + _adler32(local))
            elif algo == "md5":
                with open(local, "rb") as f:
                    out.append("md5=" + base64.b64encode(
                        hashlib.md5(f.read()).digest()).decode())
        return ",".join(out)

    def _propfind(self, rel, local):
        depth = self.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "1"):
            return self.send(403, "Depth infinity is not supported")
        raw = self.read_body() if self.has_body() else b""
        wanted = None
        if raw.strip():
            try:
                prop = ElementTree.fromstring(raw).find("{DAV:}prop")
            except ElementTree.ParseError:
                return self.send(400, "Bad PROPFIND body")
            if prop is not None:
                wanted = [tuple(el.tag[1:].split("}", 1)) if el.tag.startswith("{")
                          else ("", el.tag) for el in prop]
        entries = [(rel, local)]
        if depth == "1" and os.path.isdir(local):
            for name in sorted(os.listdir(local)):
                entries.append((rel.rstrip("/") + "/" + name, os.path.join(local, name)))
        tape = self.tape
        with tape.lock:
            tape._update()
            parts = [self._response_xml(r, l, wanted) for r, l in entries]
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<d:multistatus xmlns:d="DAV:" '
                'xmlns:dc="%s" xmlns:srm="%s">%s</d:multistatus>\n'
                % (DCACHE_NS, SRM_NS, "".join(parts)))
        self.send(207, body, "application/xml; charset=utf-8")

    def _props(self, rel, local):
        tape = self.tape
        st = os.stat(local)
        isdir = os.path.isdir(local)
        props = {
            (DAV_NS, "resourcetype"): "<d:collection/>" if isdir else "",
            (DAV_NS, "getlastmodified"): email.utils.formatdate(st.st_mtime, usegmt=True),
            (DAV_NS, "displayname"): escape(rel.rstrip("/").rsplit("/", 1)[-1]),
        }
        if not isdir:
            locality = tape._locality(rel)
            on_tape = locality in ("NEARLINE", "ONLINE_AND_NEARLINE", "LOST", "UNAVAILABLE")
            props.update({
                (DAV_NS, "getcontentlength"): str(st.st_size),
                (DAV_NS, "getetag"): '"%x-%x"' % (st.st_ino, int(st.st_mtime * 1000)),
                (DAV_NS, "getcontenttype"): "application/octet-stream",
                (DCACHE_NS, "Checksums"): "adler32=" + _adler32(local),
                (SRM_NS, "FileLocality"): locality,
                (SRM_NS, "AccessLatency"): "NEARLINE" if on_tape else "ONLINE",
                (SRM_NS, "RetentionPolicy"): "CUSTODIAL" if on_tape else "REPLICA",
            })
        return props

    def _response_xml(self, rel, local, wanted):
        props = self._props(rel, local)
        if wanted is None:
            wanted = [k for k in props if k[0] == DAV_NS]
        path = self.tape.dav_prefix + rel
        if os.path.isdir(local) and not path.endswith("/"):
            path += "/"

        def tag(ns, name, content=None):
            prefix = _PREFIX.get(ns)
            if prefix is None:
                t, decl = "x:" + name, ' xmlns:x="%s"' % escape(ns, {'"': "&quot;"})
            else:
                t, decl = prefix + ":" + name, ""
            if not content:
                return "<%s%s/>" % (t, decl)
            return "<%s%s>%s</%s>" % (t, decl, content, t)

        found = "".join(tag(ns, n, props[(ns, n)]) for ns, n in wanted if (ns, n) in props)
        missing = "".join(tag(ns, n) for ns, n in wanted if (ns, n) not in props)
        out = ["<d:response><d:href>%s</d:href>" % escape(quote(path))]
        if found:
            out.append("<d:propstat><d:prop>%s</d:prop>"
                       "<d:status>HTTP/1.1 200 OK</d:status></d:propstat>" % found)
        if missing:
            out.append("<d:propstat><d:prop>%s</d:prop>"
                       "<d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>" % missing)
        out.append("</d:response>")
        return "".join(out)


_Listener.handler_class = _Handler


def _adler32(local):
    value = 1
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(BUFSIZE), b""):
            value = zlib.adler32(block, value)
    return "%08x" % (value & 0xFFFFFFFF)


def _parse_range(header, size):
    """(start, end) inclusive, None (whole file) or "unsatisfiable"."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            return None
        if first == "":
            n = int(last)
            return (max(0, size - n), size - 1) if n > 0 and size else "unsatisfiable"
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    return None if end < start else (start, end)
