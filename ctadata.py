#!/usr/bin/env python3
"""ctadata: list, download and upload files on CTAO science data archives.

One module, standard library only, Python 3.6+.  It speaks WebDAV to dCache
(and to any WebDAV server: XRootD's HTTP door, nginx, Apache, StoRM) with
OIDC bearer tokens (the "direct mode"), or goes through the CTA download
service, a JupyterHub service that proxies the storage (the "service mode":
``--service``, ``$CTADS_URL``).
Scripts written for the old ``ctadata`` client keep working: its functions,
keyword arguments, ``APIClient`` class and exception names are all here.
It can be used three ways:

* from Python: ``ctadata.list_dir(...)``, ``ctadata.fetch_and_save_file(...)``,
  ``ctadata.upload_file(...)``, ``ctadata.open(path, "rb")`` or an explicit
  ``ctadata.Client(...)``;
* from the shell: ``ctadata ls / get / put / cp / share / mkdir / rm / mv / stat /
  stage``;
* as a single file, ``python3 ctadata.pyz ...`` built by ``make zipapp``.

The sections below are in dependency order: each one only uses those above
it.  Constants -> Errors -> Paths & names -> Local files -> Checksums ->
Settings -> HTTP transport -> OpenID Connect -> Credentials -> WebDAV
protocol (the parser and _DAV, the direct-mode backend) -> Tape (the WLCG
Tape REST API: _TapeAPI, StageRequest) -> Download service & JupyterHub
services (_Service, the service-mode backend, and _Hub) -> Transfer engine
(_Download, the worker pool, the planners) -> Remote files (open, cat) ->
Third-party copy & FTS3 (_ThirdPartyCopy, _Copies, share's macaroons, _FTS,
FTSJob) -> Progress displays (terminal, notebook) -> Client (a face over a
backend and the planners) -> Public functions -> Server -> CLI -> Entry
point.
"""

import _thread
import io
import os
import sys
import time

# Everything else (threading, ssl, http.client, xml, concurrent.futures,
# argparse, logging, urllib) is imported where it is used: `import ctadata`
# and `ctadata --version` stay about as fast as starting Python itself.
# (io is loaded by every Python at start-up, for sys.stdout: it costs nothing.)

# Python 3.6 compatibility --------------------------------------------------
# 3.6 is the system python3 of RHEL 8 and SLES 15 login nodes.  Older Pythons
# stop at this check with one line, not a traceback, so the module must stay
# parseable by 3.5: no f-strings, no variable annotations (`make lint`
# checks).  In an interactive session `import ctadata` raises ImportError.
if sys.version_info < (3, 6):
    _why = "ctadata needs Python >= 3.6; this is %d.%d.%d" % tuple(sys.version_info[:3])
    if hasattr(sys, "ps1"):
        raise ImportError(_why)
    sys.stderr.write(_why + "\n")
    sys.exit(2)


def _is_cert_error(exc):
    """A failed TLS certificate check: ssl.SSLCertVerificationError (3.7+);
    on 3.6 an SSLError with reason CERTIFICATE_VERIFY_FAILED, or for a wrong
    host name ssl.CertificateError (a ValueError there)."""
    import ssl
    if hasattr(ssl, "SSLCertVerificationError"):
        return isinstance(exc, ssl.SSLCertVerificationError)
    return isinstance(exc, ssl.CertificateError) or (
        isinstance(exc, ssl.SSLError) and exc.reason == "CERTIFICATE_VERIFY_FAILED")


def _rerun_in_utf8_locale():
    """Python 3.6 (and PyPy 3.9) in the C/POSIX locale (LANG unset, or a
    locale that ssh passed and the node lacks) encode file names as ASCII:
    "é" in a name fails.  CPython 3.7+ use UTF-8 there (PEP 538, 540); for
    the command line, do the same: run it again under a UTF-8 LC_CTYPE."""
    if sys.getfilesystemencoding() != "ascii" or not sys.executable or \
            not os.path.isfile(sys.argv[0]) or os.environ.get("_CTADATA_RERUN"):
        return
    import locale
    for name in ("C.UTF-8", "C.utf8", "UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        env = dict(os.environ, LC_CTYPE=name, _CTADATA_RERUN="1")
        if env.get("LC_ALL"):
            env["LC_ALL"] = name
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


############################################################################
# Constants & version
############################################################################

__version__ = "1.0.0"

__all__ = [
    # client, settings and data classes
    "Client", "Settings", "Entry", "DEFAULT_URL", "DEV_URL", "TransferResult", "TransferSummary", "Progress",
    "StageRequest", "StagedFile", "SharedLink", "FTSJob",
    "SERVICE_URL", "CERTIFICATE_SERVICE_URL",
    # module-level functions (thin wrappers over a default Client)
    "list_dir", "ls", "stat", "fetch_and_save_file", "fetch_and_save_file_or_dir",
    "upload_file", "upload_dir", "mkdir", "remove", "move", "checksum", "du",
    "upload_certificate", "upload_personal_certificate", "upload_shared_certificate",
    "webdav_client", "webdav4_client",
    "stage", "stage_request", "archive_info",
    "copy", "share", "fts_copy", "fts_job",
    "default_client", "set_default_client",
    # a local dCache-like archive (`ctadata serve`)
    "serve",
    # the old client's class, for scripts that configure it
    "APIClient",
    # errors
    "CtadataError", "ConfigError", "AuthError", "RemoteError", "NotFound",
    "TransferError", "ChecksumMismatch", "ProtocolError", "PartialFailure",
    "StorageException", "CertificateError",
    # CLI
    "main",
]

DEFAULT_URL = "https://dcache.cta.cscs.ch:2880"
DEV_URL = "https://dcache-dev.ctaodc.ch:2880"
# The CTA download service (a JupyterHub service proxying the storage) and its
# companion certificate service: the old client's defaults, PROTOCOL.md §1.
SERVICE_URL = "https://platform.cta.cscs.ch/services/downloadservice/"
CERTIFICATE_SERVICE_URL = "https://platform.cta.cscs.ch/services/certificateservice/"
_CERTIFICATE_KEYS = ("cta", "lst", "arc")

# Transfers move data in 256 KiB blocks.  Measured on 1 GiB downloads
# (make bench, 2 cores): 256 KiB 0.83-0.98 s, 64 KiB 1.08-1.75 s, 1 MiB
# 1.73-2.68 s: a block that stays in the CPU cache between recv() and
# write() beats fewer, larger system calls.
_CHUNK = 256 << 10
# ...but written to disk in 16 KiB pieces: with larger write() calls this
# Linux (6.x, large page-cache folios) spent up to 2.8 s of system time per
# GiB in page allocation, in one run out of two; 16 KiB writes, like
# curl's, kept every 1 GiB download at 0.7-1.3 s (tests/bench, 2 cores).
_WRITE = 16 << 10
# Bodies up to this size are read whole and sent together with the headers:
# one send() per request, no Nagle/delayed-ACK stall between headers and body.
_SMALL_BODY = 1 << 20
# dCache only redirects a PUT to a pool when the request says
# "Expect: 100-continue"; that costs a fresh connection (the door closes it
# afterwards), which only pays off for large files.
_EXPECT_THRESHOLD = 64 << 20
_EXPECT_TIMEOUT = 60.0
_MAX_REDIRECTS = 10
_DEFAULT_TIMEOUT = 60.0
_DEFAULT_RETRIES = 5
_DEFAULT_JOBS = 4
# Without -j the number of parallel transfers adapts (_Concurrency): from
# _DEFAULT_JOBS up to this many while the link, not this machine, is what
# the transfers wait for; uploads up to _MAX_PUT_JOBS: dCache doors answered
# more than ~30 parallel PUTs with TLS errors (dCache issue 5618).
_MAX_JOBS = 32
_MAX_PUT_JOBS = 16
# A download attempt that brought the file this much further is progress:
# the retry budget starts again (issue 10: a link that keeps dropping).
_PROGRESS = 1 << 20
# Error bodies are read for a message, never more than this.
_ERROR_BODY_LIMIT = 4096
# A finished-with response whose body is larger than this closes its
# connection instead of draining it.
_DRAIN_LIMIT = 1 << 16
# RFC 9110 §15: statuses worth retrying (rclone's retryErrorCodes).
_RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))

# Tape (WLCG Tape REST API v1): where a storage says where its API is, how
# many files go in one stage request (the spec sets no limit; dCache and the
# stand-ins refuse more than 1,000), and how often a stage request is polled
# by default: 1 s, doubling while nothing changes, up to 60 s (a recall takes
# minutes to hours; Client(stage_poll=...) or a profile's stage_poll changes it).
_TAPE_WELL_KNOWN = "/.well-known/wlcg-tape-rest-api"
_STAGE_BATCH = 1000
_STAGE_POLL = (1.0, 60.0)
# A JSON answer (of the tape REST API, of FTS3) is read whole, never more.
_JSON_ANSWER_LIMIT = 64 << 20

# A PROPFIND answer streams through the parser; what it buffers is bounded:
# one text node (the parser keeps no element stack of its own).
_XML_TEXT_LIMIT = 1 << 16

_PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<propfind xmlns="DAV:" xmlns:dc="http://www.dcache.org/2013/webdav"'
    b' xmlns:srm="http://srm.lbl.gov/StorageResourceManager"><prop>'
    b"<resourcetype/><getcontentlength/><getlastmodified/><getetag/>"
    b"<dc:Checksums/><srm:FileLocality/></prop></propfind>"
)
# Names and types only (``ls`` without -l): a smaller answer to parse (3.6 MB
# instead of 5.9 MB for 20,000 entries on nginx), and dCache need not look
# up checksums and tape locality for every file.
_PROPFIND_NAMES_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>'
)
# Names, types and sizes: what confirming uploads needs (issue 10).
_PROPFIND_SIZES_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<propfind xmlns="DAV:"><prop><resourcetype/><getcontentlength/></prop></propfind>'
)


############################################################################
# Errors
############################################################################

def _safe_url(url):
    """Return *url* without user info and query string (which may carry
    credentials or single-use dCache pool UUIDs): fit for messages."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = p.netloc.rpartition("@")[2]
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def _safe_place(place):
    """A URL fit for messages (_safe_url), or a local path as it is: "#" and
    "?" are parts of file names, not fragments and queries."""
    return _safe_url(place) if "://" in str(place) else place


def _printable(text, limit=300):
    """Text from a server, fit for a message: no control characters (no
    terminal escapes), one line, bounded."""
    text = " ".join(str(text).split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class CtadataError(Exception):
    """Root of every error ctadata raises.

    Fields: ``message``; ``url`` (credentials and query removed); ``status``
    (HTTP status or None); ``hint`` (what the user can do about it, in
    Python's words: "use recursive=True"); ``cli_hint`` (the same on the
    command line, "use get -r", when the words differ); ``path`` (the remote
    path it is about, as a user writes it, when known).
    """

    exit_code = 1

    def __init__(self, message, url=None, status=None, hint=None, cli_hint=None, path=None):
        Exception.__init__(self, message)
        self.message = message
        self.url = _safe_url(url)
        self.status = status
        self.hint = hint
        self.cli_hint = cli_hint
        self.path = path
        self.retry_after = None  # the server's Retry-After, when it sent one

    def __str__(self):
        return self.text(self.hint)

    def text(self, hint):
        """The message, the URL (unless the message has it) and *hint*."""
        text = self.message
        if self.url and self.url not in text:
            text += " (%s)" % self.url
        if hint:
            text += "; " + hint
        return text


class ConfigError(CtadataError):
    """Bad input or settings: nothing was sent."""

    exit_code = 2


class AuthError(CtadataError):
    """No usable credentials, or the server refused them (401/403)."""


class StorageException(CtadataError):
    """The old client's error, which its scripts catch: every RemoteError
    is one, and so is every error that a function of the old client's API
    raises (list_dir, fetch_and_save_file, fetch_and_save_file_or_dir,
    upload_file, upload_dir, the certificate uploads, APIClient's methods),
    whatever its class: a ConfigError for a path above the storage root, an
    AuthError for a refused token, a TransferError are then also
    StorageExceptions, as the old client reported them (see _old_api_error)."""


class RemoteError(StorageException):
    """The server answered with an HTTP error status."""


class NotFound(RemoteError):
    """The remote path does not exist (404)."""


class TransferError(CtadataError):
    """A transfer failed: network error, short body, local I/O error.

    ``expected`` and ``received`` are byte counts when known."""

    def __init__(self, message, url=None, status=None, hint=None,
                 expected=None, received=None, retryable=True):
        CtadataError.__init__(self, message, url, status, hint)
        self.expected = expected
        self.received = received
        self.retryable = retryable


class ChecksumMismatch(TransferError):
    """The bytes transferred do not match the server's checksum."""

    def __init__(self, message, url=None, algorithm=None, expected_sum=None,
                 actual_sum=None):
        TransferError.__init__(self, message, url)
        self.algorithm = algorithm
        self.expected_sum = expected_sum
        self.actual_sum = actual_sum


class ProtocolError(CtadataError):
    """The server's answer could not be understood or was refused as unsafe."""


# Errors of the old client's functions: each class with a twin that is
# also a StorageException (same name, fields, message and exit code), made
# on first use.  A twin pickles as its class plus the twin mark, so that a
# worker process can send one back (multiprocessing).
_OLD_API_ERRORS = {}


def _old_api_error(e):
    """*e* made a StorageException, in place (its class becomes the twin of
    its class): `except StorageException` of an old script catches it,
    `except ConfigError` of a new one still does.  Returns *e*."""
    if isinstance(e, StorageException):
        return e
    cls = type(e)
    twin = _OLD_API_ERRORS.get(cls)
    if twin is None:
        twin = _OLD_API_ERRORS[cls] = type(cls.__name__, (cls, StorageException), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "__reduce__": _old_api_reduce})
    e.__class__ = twin
    return e


def _old_api_reduce(e):
    return _old_api_rebuilt, (type(e).__bases__[0], e.args), e.__dict__


def _old_api_rebuilt(cls, args):
    """Unpickling: an error of class *cls*, made an old-API one."""
    return _old_api_error(cls.__new__(cls, *args))


def _error_text(body):
    """The server's own words from an error body: the ``message`` of a JSON
    object (the download service answers 401 with ``{"message": ...}``), the
    ``title`` and ``detail`` of an RFC 7807 problem (the tape REST API), the
    ``http_message`` of an FTS3 job that cannot be shown, else
    the text up to any HTML page (the service passes upstream errors through as
    ``Error: 404 <html>...``: an HTML page says nothing the status does not)."""
    text = body.decode("utf-8", "replace").strip() if body else ""
    if text.startswith("{"):
        import json
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            found = [doc[k] for k in ("message", "error", "detail", "http_message")
                     if isinstance(doc.get(k), str)]
            text = found[0] if found else ""
            title = doc.get("title")
            if isinstance(title, str) and title.strip() and not any(
                    isinstance(doc.get(k), str) for k in ("message", "error")):
                # RFC 7807 problem details (the tape REST API): title, then detail
                text = title.strip() + (": " + text if text else "")
    text = text.partition("<")[0]
    if len(text) > 300:
        text = ""
    return " ".join(text.split())


# What a request was for (_Transport.request's *what*) when a 404 to it
# means that the path the user named does not exist.
_PATH_WHATS = frozenset(("list", "check", "checksum", "download", "mkdir", "move", "read",
                         "remove"))


def _error_for_status(status, url, body=b"", what=None, auth=None, path=None):
    """Map an HTTP error status to the right exception (the one place that
    does).  *what* says what the request was for ("list", "mkdir", ...);
    *path* is the remote path it was about, as a user writes it (messages
    name it; default: the URL).  The statuses of RFC 4918 that have a plain
    meaning get plain words: 404 "no such file or folder", and for MKCOL 405
    (the name exists) and 409 (no parent folder), for MOVE 409 (no folder
    for the destination) and 412 (the destination exists, Overwrite: F)."""
    where = path if path is not None else _safe_url(url)
    where = where or "/"
    if status == 404 and body.startswith(_XROOTD_READ_RACE):
        # XRootD before 5.8.3: its bridge lost a race while reading a file
        # that is there (xrootd issue 2360, fixed in 5.8.3; measured on 5.5.3:
        # about 1 GET in 400 while it computes a checksum): a failed
        # transfer, worth another try (_retry_delay), not "no such file"
        return TransferError("%s: HTTP 404 %s" % (what or "request", _printable(
            _error_text(body))), url, 404, "the server failed to read the file")
    if status == 404 and what in _PATH_WHATS:
        return NotFound("no such file or folder: %s" % where, url, status, path=where)
    if (what, status) in _PLAIN_STATUS:
        message, hint, cli_hint = _PLAIN_STATUS[what, status]
        return RemoteError(message % where, url, status, hint, cli_hint, path=where)
    text = _error_text(body)
    echo = "Error: %d" % status  # the download service's prefix to upstream errors
    if text.startswith(echo):
        text = text[len(echo):].strip()
    if auth is not None:
        text = auth.redact(text)  # a server may echo the Authorization it got
    text = _printable(text)
    msg = "%s: HTTP %d" % (what, status) if what else "HTTP %d" % status
    if text:
        msg += " " + text
    if status == 401:
        hint = auth.hint() if auth is not None else None
        return AuthError(msg, url, status, hint)
    if status == 403:
        # dCache, nginx, Apache: the credentials are fine, the path is not
        # allowed; XRootD answers 403 (never 401) to missing or refused ones
        hint = auth.hint() if auth is not None else None
        if not (hint or "").startswith("no token found"):
            hint = "refused: no permission for this path, or credentials this server " \
                   "does not accept (XRootD answers 403 to both)"
        return AuthError(msg, url, status, hint)
    if status == 404:
        return NotFound(msg, url, status, path=path)
    if status == 507:
        return RemoteError(msg, url, status, "the storage is out of space")
    return RemoteError(msg, url, status)


# The start of XRootD's answer to a read its bridge failed (see _error_for_status).
_XROOTD_READ_RACE = b"Could not run read request"

# (what, status) -> (message with %s for the path, hint, hint on the command line)
_PLAIN_STATUS = {
    ("mkdir", 405): ("already exists: %s", "parents=True accepts an existing folder",
                     "mkdir -p accepts an existing folder"),
    ("mkdir", 409): ("no parent folder for %s", "parents=True makes the missing folders",
                     "use -p to make the missing folders"),
    ("move", 409): ("no folder for the destination of %s", "make that folder first (mkdir)",
                    "make that folder first (mkdir -p)"),
    ("move", 412): ("the destination of %s exists already", "overwrite=True replaces it",
                    "use --overwrite to replace it"),
}


def _log(level, msg, *args):
    import logging
    logging.getLogger("ctadata").log(level, msg, *args)


def _debug_enabled():
    import logging
    return logging.getLogger("ctadata").isEnabledFor(logging.DEBUG)


class _Secrets:
    """Every secret this client has handled (tokens, refresh tokens, client
    secrets), so that text coming back from a server can be scrubbed of
    them before it goes into a message."""

    def __init__(self):
        self._items = set()
        self._lock = _thread.allocate_lock()

    def __repr__(self):
        return "<ctadata secrets: %d>" % len(self._items)

    def add(self, *values):
        with self._lock:
            self._items.update(v for v in values if isinstance(v, str) and len(v) >= 6)

    def redact(self, text):
        with self._lock:
            items = sorted(self._items, key=len, reverse=True)
        for s in items:
            if s in text:
                text = text.replace(s, "<redacted>")
        return text


############################################################################
# Paths & names
############################################################################

# One rule for what a name from a server may be, used by both listing
# parsers (WebDAV, download service), by _safe_join before anything is
# written, and by whatever serves files (the same rule on both sides, so
# they cannot drift apart).  pip's join_within_directory is the model of
# the second check: never trust that the first one ran.


def _has_control(name):
    """True for C0 controls (NUL, ESC...), DEL and C1 controls: in a file
    name they make terminal escapes of ``ls`` output and awkward files."""
    return any(c < " " or "\x7f" <= c <= "\x9f" for c in name)


def _is_safe_name(name):
    """True when *name* can be one path segment on every system without
    escaping its folder or the terminal: not empty, "." or "..", no "/" or
    "\\", no control character."""
    return not (name in ("", ".", "..") or "/" in name or "\\" in name
                or not name.isprintable() and _has_control(name))


def _cut_name_error(path):
    """The error for a remote *path* with "?" on a server that cuts names
    there (_Quirks.cuts_at_query), raised before anything is sent: XRootD's
    HTTP door decodes the path, then its xroot layer takes what follows a
    "?" (even one sent as %3F) as its own options, so "question?.txt" would
    be stored as "question" and a GET of "q?x.txt" would answer with the
    file "q".  Its *path* is set: it is about one name (a tree goes on
    without it, see _fails_everything)."""
    return ConfigError('XRootD cannot store or find a name with "?" in it (it cuts the '
                       'name there): %s' % path, path=path)


def _safe_join(root, rel_parts):
    """Join remote path segments below a local *root*, refusing any that is
    not a safe name (the parsers drop such entries already; this is the
    second lock on the door)."""
    for part in rel_parts:
        if not _is_safe_name(part):
            raise ProtocolError("refusing unsafe remote name %r" % part)
    return os.path.join(root, *rel_parts)


def _normpath(path):
    """Normalise a remote path like a URL library would (RFC 3986 §5.2.4
    dot-segment removal), keeping a trailing slash; refuse to climb above
    the storage root."""
    import posixpath
    trailing = path.endswith("/")
    parts = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise ConfigError("path climbs above the storage root: %r" % path)
            parts.pop()
        else:
            parts.append(seg)
    out = posixpath.join(*parts) if parts else ""
    return out + "/" if trailing and out else out


def _names_folder(dest):
    """True when a destination names a folder to put things *into*."""
    return dest in ("", ".", "..") or dest.endswith(("/", os.sep))


def _rel_parts(base_url, url):
    """Decoded path segments of *url* below *base_url*.  Servers encode
    differently (nginx leaves "&", "'", ";", "[" as they are, Python's
    quote does not): a prefix that differs raw is compared decoded,
    segment by segment (an encoded "/" stays inside its segment)."""
    from urllib.parse import urlsplit, unquote
    b = urlsplit(base_url).path.rstrip("/") + "/"
    p = urlsplit(url).path
    if (p.rstrip("/") + "/").startswith(b):
        rest = p[len(b):].strip("/")
        return [unquote(s) for s in rest.split("/")] if rest else []
    bs = [unquote(s) for s in b.strip("/").split("/")] if b.strip("/") else []
    ps = [unquote(s) for s in p.strip("/").split("/")] if p.strip("/") else []
    if ps[:len(bs)] != bs:
        raise ProtocolError("listing left the requested tree", url)
    return ps[len(bs):]


def _rel_path(base_url, url):
    return "/".join(_rel_parts(base_url, url))


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# -- sizes and tables for people (a terminal, a notebook) ---------------------
# Names come from servers: every cell of an HTML table is escaped.


def _plural(n, word):
    """1 file, 2 files (*word* takes an "s")."""
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def _span(seconds):
    """A duration for people: '45 s', '12 min 5 s', '3 h 20 min', '2 days 4 h',
    '73 years 47 days' (a year of 365 days)."""
    s = max(int(seconds), 0)
    if s < 3600:
        return "%d s" % s if s < 60 else "%d min %d s" % divmod(s, 60)
    if s < 86400:
        return "%d h %d min" % (s // 3600, s % 3600 // 60)
    if s < 365 * 86400:
        return "%s %d h" % (_plural(s // 86400, "day"), s % 86400 // 3600)
    return "%s %s" % (_plural(s // (365 * 86400), "year"),
                      _plural(s % (365 * 86400) // 86400, "day"))


def _human(n):
    """1234567 -> '1.2M' (binary units; _human_bytes says them)."""
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return ("%d%s" % (n, unit)) if unit == "" else ("%.1f%s" % (n, unit))
        n /= 1024.0


def _human_bytes(n):
    """1234567 -> '1.2MiB', 512 -> '512B': the one way sizes are shown to
    people (ls -h, du -h, progress, summaries, notebooks)."""
    h = _human(n)
    return h + "B" if h[-1:].isdigit() else h + "iB"


def _html_table(header, rows, more=0, caption=None, right=()):
    """A compact HTML table (a notebook's ``_repr_html_``): *header* names,
    *rows* of values (None shows as empty), "... and N more" when *more*;
    the columns numbered in *right* are right-aligned.  Everything is
    escaped."""
    import html
    esc = html.escape

    def cell(tag, i, value):
        align = "right" if i in right else "left"
        return '<%s style="text-align:%s">%s</%s>' % (
            tag, align, esc("" if value is None else str(value)), tag)
    out = ['<table class="ctadata">']
    if caption:
        out.append('<caption style="text-align:left">%s</caption>' % esc(caption))
    out.append("<thead><tr>%s</tr></thead><tbody>" % "".join(
        cell("th", i, h) for i, h in enumerate(header)))
    for row in rows:
        out.append("<tr>%s</tr>" % "".join(cell("td", i, v) for i, v in enumerate(row)))
    if more:
        out.append('<tr><td colspan="%d">... and %d more</td></tr>' % (len(header), more))
    out.append("</tbody></table>")
    return "".join(out)


# Rows a notebook shows of a long listing (the rest: "... and N more").
_HTML_ROWS = 200


############################################################################
# Local files
############################################################################

# Everything a download writes below its destination goes through folder
# file descriptors: each folder below the one the user named is opened
# relative to its parent with O_NOFOLLOW, and every name in it relative to
# that folder (openat, mkdirat, renameat...), so that no symlink planted in
# a shared, group-writable folder can make ctadata write outside it.  The
# folder the user names may itself be a symlink: that is the user's choice.
# Without dir_fd support (Windows) the same calls take paths, each name
# checked with lstat first (best effort: a window remains between the two).
#
# Two processes must never write one NAME.part: each holds a lock on it
# (flock on the open part, or a NAME.part.lock file where flock is missing
# or only local to one machine) from opening it until after the rename.

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_DIR_FDS = {os.open, os.mkdir, os.stat, os.unlink, os.rename} <= os.supports_dir_fd


def _local_error(e, path):
    """A local I/O failure, naming the path."""
    return TransferError("%s: %s" % (e.strerror or e, path), retryable=False)


def _open_regular_fd(path):
    """(descriptor, stat) of *path* opened for reading (uploads) if it is a
    regular file, else TransferError.  Opened without blocking: a FIFO with
    no writer would hang for ever (O_NONBLOCK changes nothing for a regular
    file)."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_NOCTTY", 0) |
                     _O_CLOEXEC | _O_BINARY)
    except OSError as e:
        raise _local_error(e, path)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TransferError("not a regular file: %s" % path, retryable=False)
    return fd, st


def _open_regular(path):
    """_open_regular_fd as an unbuffered binary file."""
    return open(_open_regular_fd(path)[0], "rb", buffering=0)


def _read_regular(path, size):
    """(the bytes, the stat) of the regular file *path*, read whole: at
    most *size* + 1 bytes (so that growth shows)."""
    fd, st = _open_regular_fd(path)
    try:
        parts, left = [], size + 1
        while left > 0:
            part = os.read(fd, left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
    except OSError as e:
        raise _local_error(e, path)
    finally:
        os.close(fd)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), st


def _file_kind(mode):
    """What a file that is not a regular one is, in words."""
    import stat
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "a special file"


def _refusal(e, path, is_link):
    if is_link:
        return TransferError("refusing to write through a symbolic link: %s" % path,
                             retryable=False)
    if e.errno in (20, 17):  # ENOTDIR, EEXIST: a file where a folder should be
        return TransferError("not a folder: %s" % path, retryable=False)
    return _local_error(e, path)


class _Folder:
    """A local folder that downloads write into, opened without following
    a symlink (see above); names are relative to it.  Shared by the tasks
    in it: each holds it, the last release() closes it.  *created*: this
    run made it (so it holds no file or .part of an earlier run)."""

    __slots__ = ("path", "fd", "created", "tree", "users", "_lock")

    def __init__(self, path, fd, created=False, tree=None):
        self.path, self.fd, self.created, self.tree = path, fd, created, tree
        self.users = 1
        self._lock = _thread.allocate_lock()

    def join(self, name):
        return os.path.join(self.path, name)

    def hold(self):
        with self._lock:
            self.users += 1
        return self

    def release(self):
        with self._lock:
            self.users -= 1
            fd, self.fd = (self.fd, None) if not self.users else (None, self.fd)
        if fd is not None:
            os.close(fd)

    def __del__(self):  # a task that never ran (interrupted) did not release it
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)

    def open(self, name, flags, mode=0o666):
        flags |= _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
        if self.fd is not None:
            return os.open(name, flags, mode, dir_fd=self.fd)
        path = self.join(name)
        if os.path.islink(path):
            import errno
            raise OSError(errno.ELOOP, "Too many levels of symbolic links", path)
        return os.open(path, flags, mode)

    def lstat(self, name):
        if self.fd is not None:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self.join(name))

    def unlink(self, name):
        if self.fd is not None:
            os.unlink(name, dir_fd=self.fd)
        else:
            os.unlink(self.join(name))

    def unlink_quietly(self, name):
        try:
            self.unlink(name)
        except OSError:
            pass

    def replace(self, src, dst):
        if self.fd is not None:
            os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            os.replace(self.join(src), self.join(dst))

    def read(self, name):
        """The regular file *name* opened for reading, or None."""
        import stat
        try:
            fd = self.open(name, os.O_RDONLY | _O_NONBLOCK)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return open(fd, "rb", buffering=0)


class _LocalTree:
    """The folders below a local destination *root*: the user's folder (a
    symlink is followed there; it is made when missing), below which
    folder() opens (and makes) each one without following a symlink.
    *dry_run*: look only (paths, nothing made)."""

    def __init__(self, root, dry_run=False):
        self.root = root or "."
        self.fd = None
        self.lock_mode = None  # decided at the first lock: see _lock_part
        if dry_run:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise _local_error(e, self.root)
        if _DIR_FDS:
            try:
                self.fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            except OSError as e:
                raise _local_error(e, self.root)

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self.close()

    def folder(self, parts, create=True):
        """The held _Folder of root/parts (made when missing, with
        *create*), or TransferError: a symlink or a file on the way."""
        path = os.path.join(self.root, *parts)
        if self.fd is None:
            return self._folder_by_path(parts, path, create)
        fd, created = self.fd, False
        try:
            for i, name in enumerate(parts):
                created = False
                if create:
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                        created = True
                    except FileExistsError:
                        pass
                    except OSError as e:
                        raise _refusal(e, os.path.join(self.root, *parts[:i + 1]), False)
                try:
                    sub = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC,
                                  dir_fd=fd)
                except OSError as e:
                    import stat
                    try:
                        link = stat.S_ISLNK(os.stat(name, dir_fd=fd,
                                                    follow_symlinks=False).st_mode)
                    except OSError:
                        link = False
                    raise _refusal(e, os.path.join(self.root, *parts[:i + 1]), link)
                if fd != self.fd:
                    os.close(fd)
                fd = sub
        except BaseException:
            if fd != self.fd:
                os.close(fd)
            raise
        if fd == self.fd:
            fd = os.dup(fd)
        return _Folder(path, fd, created, self)

    def _folder_by_path(self, parts, path, create):
        created = False
        for i in range(len(parts)):
            sub = os.path.join(self.root, *parts[:i + 1])
            if os.path.islink(sub):
                raise _refusal(None, sub, True)
            if create and not os.path.isdir(sub):
                try:
                    os.mkdir(sub)
                    created = True
                except OSError as e:
                    raise _refusal(e, sub, False)
        return _Folder(path, None, created, self)


# -- locks on partial downloads ---------------------------------------------------
# flock(2) on the open NAME.part is the lock: it belongs to the open file
# (so our own other open()s of the file and two Clients in one process do
# not break it, as they would POSIX record locks), it dies with its process
# (no stale locks), and it reaches every machine on local file systems, on
# NFS (Linux emulates it with NFS byte-range locks since 2.6.12), on Lustre
# mounted with "flock" and on GPFS.  Where it does not (flock(2) fails
# with ENOLCK/ENOSYS/EOPNOTSUPP: NFSv3 without lockd, Lustre "noflock"), or
# where it only reaches this machine (NFS "nolock" or "local_lock=flock|all",
# nfs(5); Lustre "localflock", mount.lustre(8)), NAME.part.lock, created
# with O_EXCL (atomic on NFSv3+ and Lustre), is the lock instead or as well.
# $CTADATA_LOCK=file|flock|both overrides what /proc/self/mountinfo says.


def _flock(fd):
    """Take the exclusive flock of an open file without waiting: True when
    taken, False when another open file holds it, None when this file
    system has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    import errno
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                       getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return None
        raise


def _lock_mode(path):
    """How downloads below the local folder *path* lock their parts:
    "flock", "file" (NAME.part.lock) or "both"."""
    mode = os.environ.get("CTADATA_LOCK", "").strip().lower()
    if mode in ("flock", "file", "both"):
        return mode
    return "both" if _flock_is_node_local(path) else "flock"


def _flock_is_node_local(path, mountinfo="/proc/self/mountinfo"):
    """True when the file system holding *path* keeps flock() locks on this
    machine only, so another machine sharing the folder would not see
    them: NFS mounted with nolock or local_lock=flock|all, Lustre with
    localflock.  Read from /proc/self/mountinfo (proc(5)); False when
    unknown."""
    import re
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    best, kind, opts = "", "", set()
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        # octal escapes (\040 for a space) in the mount point
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, rest[0]
            opts = set(fields[5].split(",")) | set(rest[2].split(","))
    if kind in ("nfs", "nfs4"):
        return bool(opts & {"nolock", "local_lock=flock", "local_lock=all"})
    if kind == "lustre":
        return "localflock" in opts
    return False


class _LockFile:
    """NAME.part.lock, the lock where flock cannot be trusted (see above):
    made with O_EXCL, it says who holds it (host, pid, boot id); its holder
    touches it every 30 s (one thread per process) and removes it when done.
    Left behind by a process that was killed, it is stale once its process
    is gone (same machine and boot) or it was not touched for 10 minutes
    by the file server's clock; a stale lock is moved aside and removed."""

    STALE = 600.0
    BEAT = 30.0
    _held = {}  # fd -> path, touched by the heartbeat thread
    _guard = _thread.allocate_lock()
    _beating = []

    def __init__(self, folder, name, fd):
        self.folder, self.name, self.fd = folder, name, fd

    @classmethod
    def take(cls, folder, name):
        """The lock *name* in *folder*, or None when another process holds it."""
        import json
        import socket
        for _ in range(3):
            try:
                fd = folder.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not cls.break_stale(folder, name):
                    return None
                continue
            except OSError as e:
                raise _local_error(e, folder.join(name))
            info = {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                os.write(fd, json.dumps(info).encode("utf-8"))
            except OSError:
                pass  # an empty lock still locks; it goes stale by its age
            with cls._guard:
                cls._held[fd] = folder.join(name)
                if not cls._beating:
                    import threading
                    cls._beating.append(threading.Thread(target=cls._beat, daemon=True,
                                                         name="ctadata-lock-heartbeat"))
                    cls._beating[0].start()
            return cls(folder, name, fd)
        return None

    def release(self):
        with self._guard:
            self._held.pop(self.fd, None)
            self.folder.unlink_quietly(self.name)
            os.close(self.fd)

    @classmethod
    def _beat(cls):
        while True:
            time.sleep(cls.BEAT)
            with cls._guard:
                for fd, path in list(cls._held.items()):
                    try:
                        os.utime(fd if os.utime in os.supports_fd else path)
                    except OSError:
                        pass

    @classmethod
    def break_stale(cls, folder, name):
        """True when the lock *name* is gone now: it was stale (and is
        removed here) or its holder just released it."""
        import json
        import stat
        try:
            st = folder.lstat(name)
        except FileNotFoundError:
            return True
        if not stat.S_ISREG(st.st_mode):  # planted: not a lock of ours
            folder.unlink_quietly(name)
            return True
        f = folder.read(name)
        try:
            info = json.loads(f.read(4096).decode("utf-8")) if f is not None else {}
        except (OSError, ValueError):
            info = {}
        finally:
            if f is not None:
                f.close()
        if not isinstance(info, dict) or not cls.stale(folder, name, st, info):
            return False
        aside = "%s.stale.%d" % (name, os.getpid())
        try:
            os.rename(folder.join(name), folder.join(aside)) if folder.fd is None else \
                os.rename(name, aside, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except FileNotFoundError:
            return True  # another process broke it first
        except OSError:
            return False
        try:
            moved = folder.lstat(aside)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                folder.replace(aside, name)  # a fresh lock made meanwhile: put it back
                return False
        except OSError:
            pass
        folder.unlink_quietly(aside)
        _log(30, "removed a stale lock %s (%s)", folder.join(name),
             "held by process %s on %s" % (info.get("pid"), info.get("host")))
        return True

    @classmethod
    def stale(cls, folder, name, st, info):
        import socket
        here = info.get("host") == socket.gethostname() and info.get("boot") == _boot_id()
        if here and os.name == "posix":  # (os.kill(pid, 0) kills on Windows)
            try:
                os.kill(int(info.get("pid")), 0)
            except ProcessLookupError:
                return True
            except (OSError, ValueError, TypeError):
                pass
        return cls.now(folder, name) - st.st_mtime > cls.STALE

    @staticmethod
    def now(folder, name):
        """The time on the file server's clock (machines' clocks differ):
        the modification time of a file made now."""
        probe = "%s.now.%d" % (name, os.getpid())
        try:
            fd = folder.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError:
            return time.time()
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            folder.unlink_quietly(probe)


def _boot_id():
    """This boot of this machine (Linux), so that a pid from before a
    reboot is not taken for a live process."""
    if not _BOOT:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT.append(f.read().strip())
        except OSError:
            _BOOT.append(None)
    return _BOOT[0]


_BOOT = []


############################################################################
# Checksums
############################################################################

# What the storage says a file's checksum is (RFC 3230 Digest, dCache's
# Checksums property) and what we compute while bytes stream by; the one
# adler32 helper of client and server.


# Asking for a checksum: adler32 (what dCache keeps), else md5 (RFC 3230).
_WANT_DIGEST = "adler32,md5;q=0.5"


def _parse_digest(text):
    """Parse an RFC 3230 ``Digest`` header (or dCache's Checksums property)
    into {algorithm: lowercase hex}.  adler32/crc32c are hex (padded to 8);
    md5, sha, sha-256, sha-512 are base64 of the raw digest (a 32-hex md5,
    as old DPM sends, is tolerated).  Unknown or malformed values are dropped."""
    import base64
    import binascii
    out = {}
    for part in (text or "").split(","):
        algo, sep, value = part.strip().partition("=")
        algo, value = algo.strip().lower(), value.strip()
        if not sep or not algo or not value:
            continue
        if algo in ("adler32", "crc32c"):
            if 1 <= len(value) <= 8 and all(c in "0123456789abcdefABCDEF" for c in value):
                out[algo] = value.lower().rjust(8, "0")
            continue
        if algo == "md5" and len(value) == 32 and all(
                c in "0123456789abcdefABCDEF" for c in value):
            out[algo] = value.lower()
            continue
        try:
            raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        out[algo] = raw.hex()
    return out


class _Hashers:
    """Running checksums, updated as blocks stream by (never a second read).
    adler32 is always cheap (zlib, several GB/s); md5 only when asked for."""

    __slots__ = ("adler", "md5", "_adler32", "active")

    def __init__(self, algos=("adler32",)):
        import zlib
        self._adler32 = zlib.adler32
        self.adler = 1 if "adler32" in algos else None
        self.md5 = None
        if "md5" in algos:
            import hashlib
            self.md5 = hashlib.md5()
        self.active = bool(algos)

    def update(self, block):
        if self.adler is not None:
            self.adler = self._adler32(block, self.adler)
        if self.md5 is not None:
            self.md5.update(block)

    def result(self):
        out = {}
        if self.adler is not None:
            out["adler32"] = "%08x" % (self.adler & 0xFFFFFFFF)
        if self.md5 is not None:
            out["md5"] = self.md5.hexdigest()
        return out


def _first_mismatch(local, remote):
    """Return (algorithm, remote value, local value) of the first algorithm
    both sides know that differs, or None when all common ones agree."""
    for algo in ("adler32", "md5", "sha-256", "sha"):
        if algo in local and algo in remote and local[algo] != remote[algo]:
            return algo, remote[algo], local[algo]
    return None


def _algos_for(remote_sums, always=True):
    """Which checksums to compute locally: what the server can confirm,
    preferring the cheap adler32.  When the server has none: adler32 if
    *always* (a manifest wants it), else nothing (nothing to verify)."""
    if "adler32" in remote_sums:
        return ("adler32",)
    if "md5" in remote_sums:
        return ("md5",)
    return ("adler32",) if always else ()


def _hash_head(f, length, hashers):
    """Hash the first *length* bytes of the open file *f* into *hashers*
    (anything with ``update``)."""
    f.seek(0)
    buf = bytearray(_CHUNK)
    left = length
    while left > 0:
        n = f.readinto(buf)
        if not n:
            break
        n = min(n, left)
        hashers.update(memoryview(buf)[:n])
        left -= n


def _local_checksums(path, algos=("adler32",)):
    """{algorithm: hex} of a local file, read in blocks (never whole:
    `ctadata sum --local` of a 100 GB file needs 256 KiB of memory).
    Raises OSError."""
    hashers = _Hashers(algos)
    with open(path, "rb", buffering=0) as f:
        _hash_head(f, os.fstat(f.fileno()).st_size, hashers)
    return hashers.result()


def _file_matches(path, remote_sums):
    """True when the local file's checksums (those the server has, adler32
    preferred) equal the server's.  *path*: a path or an open binary file
    (closed here)."""
    hashers = _Hashers(_algos_for(remote_sums))
    try:
        with (open(path, "rb", buffering=0) if isinstance(path, str) else path) as f:
            _hash_head(f, os.fstat(f.fileno()).st_size, hashers)
    except OSError:
        return False
    return _first_mismatch(hashers.result(), remote_sums) is None


############################################################################
# Settings
############################################################################

# The options of a Client and where each comes from: argument, environment,
# a profile of the config file, built-in default (_Options; `ctadata config`
# shows the result).


# `ctadata login` defaults: the CTA Keycloak realm and the client the old
# client registered with oidc-agent; --dev is its development pair.
_DEFAULT_ISSUER = "https://keycloak.cta.cscs.ch/realms/master/"
_DEFAULT_CLIENT_ID = "dcache-cta-cscs-ch-users"
_DEV_CLIENT_ID = "dcache-dev"
_LOGIN_SCOPE = "openid offline_access"


def _uid():
    return os.getuid() if hasattr(os, "getuid") else 0


def _home(env):
    return env.get("HOME") or os.path.expanduser("~")


def _is_loopback(host):
    if host.lower() == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_secure_url(url, what):
    """Credentials travel only over https (plain http only to this machine)."""
    from urllib.parse import urlsplit
    p = urlsplit(url)
    if p.scheme == "https" or (p.scheme == "http" and _is_loopback(p.hostname or "")):
        return
    raise ConfigError("refusing %s %s: credentials go only over https" % (what, _safe_url(url)))


# Profiles: sections of $XDG_CONFIG_HOME/ctadata/config.ini (default
# ~/.config/ctadata/config.ini), chosen with --profile / profile= /
# $CTADATA_PROFILE; [default] applies when none is chosen; --dev is the
# built-in profile "dev" (a [dev] section can amend it).  What a profile may
# set, and the environment variable that overrides it:
_PROFILE_KEYS = {
    "url": "CTADATA_URL", "service": "CTADS_URL", "cert_service": "CTACS_URL",
    "issuer": None, "client_id": None, "jobs": None, "timeout": None, "retries": None,
    "ca_dir": "X509_CERT_DIR", "ca_file": "X509_CERT_FILE", "token_file": None,
    "oidc_agent": "CTADATA_OIDC_AGENT", "auth": None, "cert": None,
    "tape_api": None, "tape_prefix": None, "stage_poll": None, "fts": "CTADATA_FTS",
}
_BUILTIN_PROFILES = {"default": {}, "dev": {"url": DEV_URL, "client_id": _DEV_CLIENT_ID}}


def _config_file(env):
    base = env.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(_home(env), ".config")
    return os.path.join(base, "ctadata", "config.ini")


def _load_profile(name, env):
    """{key: (value, where it comes from)} of profile *name*: the built-in
    values, amended by the config file's section.  Raises ConfigError for
    an unknown profile or setting (a token never goes in this file)."""
    import configparser
    out = {k: (v, "built-in profile %s" % name)
           for k, v in _BUILTIN_PROFILES.get(name, {}).items()}
    path = _config_file(env)
    cp = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    try:
        cp.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError("cannot read %s: %s" % (path, str(e).splitlines()[0]))
    if cp.has_section(name):
        for key, value in cp.items(name):
            if key not in _PROFILE_KEYS:
                raise ConfigError("unknown setting %r in [%s] of %s (known: %s)" % (
                    key, name, path, ", ".join(sorted(_PROFILE_KEYS))))
            out[key] = (value.strip(), "profile %s (%s)" % (name, path))
    elif name not in _BUILTIN_PROFILES:
        raise ConfigError("no profile [%s] in %s" % (name, path))
    return out


class Settings:
    """Validated options of one :class:`Client`.

    url       storage base URL (remote paths are relative to it)
    timeout   seconds for connect and for each socket read/write
    retries   attempts after the first one for retryable failures
    jobs      parallel transfers (and listings)
    adaptive  True when *jobs* was not given: transfers start with jobs
              in parallel and take more while they wait on the link
    ca_file, ca_dir, insecure, cert   TLS options
    """

    __slots__ = ("url", "timeout", "retries", "jobs", "adaptive", "ca_file", "ca_dir",
                 "insecure", "cert", "backoff", "expect_threshold")

    def __init__(self, url=None, timeout=None, retries=None, jobs=None,
                 ca_file=None, ca_dir=None, insecure=False, cert=None,
                 backoff=0.5, expect_threshold=_EXPECT_THRESHOLD, env=None):
        env = os.environ if env is None else env
        url = url or env.get("CTADATA_URL") or DEFAULT_URL
        if "://" not in url:
            url = "https://" + url   # dCache's doors speak https (see _is_plain_http)
        from urllib.parse import urlsplit
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ConfigError("storage URL must be http(s)://host[:port][/path]: %r"
                              % _safe_url(url))
        if p.username or p.password:
            raise ConfigError("credentials in the storage URL are not accepted; "
                              "use a token file")
        self.url = url.rstrip("/")
        self.timeout = _positive(timeout, _DEFAULT_TIMEOUT, "timeout", float)
        self.retries = _positive(retries, _DEFAULT_RETRIES, "retries", int, zero=True)
        self.jobs = _positive(jobs, _DEFAULT_JOBS, "jobs", int)
        self.adaptive = jobs is None
        self.ca_file = ca_file or env.get("X509_CERT_FILE") or None
        cadir = ca_dir or env.get("X509_CERT_DIR")
        if not cadir and os.path.isdir("/etc/grid-security/certificates"):
            cadir = "/etc/grid-security/certificates"
        self.ca_dir = cadir
        self.insecure = bool(insecure)
        self.cert = cert
        self.backoff = _positive(backoff, 0.5, "backoff", float, zero=True)
        self.expect_threshold = _positive(expect_threshold, _EXPECT_THRESHOLD,
                                          "expect_threshold", int, zero=True)

    def __repr__(self):
        return "Settings(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


def _service_url(url, dev, service, env):
    """Decide the mode: return the download-service URL for service mode,
    None for direct mode.

    *service* is a URL, True/"" (the default service: $CTADS_URL, else
    SERVICE_URL), False (direct mode) or None: then $CTADS_URL selects service
    mode unless a storage *url* or *dev* was asked for explicitly."""
    if service is None:
        if url or dev or not env.get("CTADS_URL"):
            return None
        service = True
    if service is False:
        return None
    if url:
        raise ConfigError("a storage URL and the download service exclude each other "
                          "(--url / --service)")
    if dev:
        raise ConfigError("no development download service is known: pass its URL "
                          "(--service URL, downloadservice=URL)")
    if service is True or service == "":
        return env.get("CTADS_URL") or SERVICE_URL
    return str(service)


def _positive(value, default, name, kind, zero=False):
    if value is None:
        return kind(default)
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise ConfigError("%s must be a number, not %r" % (name, value))
    if v < 0 or (v == 0 and not zero):
        raise ConfigError("%s must be %s, not %r" % (
            name, "zero or more" if zero else "positive", value))
    return v


def _iso_duration(text):
    """Seconds of an ISO 8601 duration ("PT1H", "P1D", "P1DT12H", "PT90S",
    "P2W"), or None."""
    import re
    m = re.match(r"P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?\Z",
                 str(text or "").strip().upper())
    if not m or not any(m.groups()) or str(text).strip().upper().endswith("T"):
        return None
    w, d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return (((w * 7 + d) * 24 + h) * 60 + mi) * 60 + s


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text):
    """Seconds of a duration as a person writes it: "90s", "30m", "1h",
    "1.5h", "2d", "1w", a plain number of seconds, or ISO 8601 ("PT1H",
    "P2D"); None when it is none of these."""
    import re
    m = re.match(r"(\d+(?:\.\d+)?)\s*([smhdw]?)\Z", str(text or "").strip().lower())
    if m:
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return _iso_duration(text)


def _iso_seconds(seconds):
    """ISO 8601 text of a duration, in the form java.time.Duration parses
    (dCache validates diskLifetime with it: days, hours, minutes, seconds;
    no weeks, months or years): 86400 -> "P1D", 5400 -> "PT1H30M"."""
    s = max(0, int(round(seconds)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    mi, s = divmod(s, 60)
    t = "".join("%d%s" % (v, u) for v, u in ((h, "H"), (mi, "M"), (s, "S")) if v)
    return ("P%dD" % d if d else "P") + ("T" + t if t else "" if d else "T0S")


def _stage_poll(value):
    """(first, longest) seconds between two polls of a stage request, from a
    pair of numbers or the text "FIRST,LONGEST" (durations: "1s,1m");
    default 1 s growing to 60 s.  ConfigError when it is not that."""
    if value is None:
        return _STAGE_POLL
    parts = value.split(",") if isinstance(value, str) else value
    try:
        first, longest = [p if isinstance(p, (int, float)) else _duration(p) for p in parts]
    except (TypeError, ValueError):
        first = longest = None
    if first is None or longest is None or not 0 < first <= longest:
        raise ConfigError("stage_poll must be two durations FIRST,LONGEST with 0 < FIRST "
                          "<= LONGEST (e.g. 1s,1m), not %r" % (value,))
    return float(first), float(longest)


class _Options:
    """The options of one Client after precedence: argument > environment >
    profile > built-in default.  ``values`` {key of _PROFILE_KEYS: value or
    None}, ``sources`` {key: "argument", "$VARIABLE", "profile NAME
    (file)"...}, ``profile`` (its name), ``service_url`` (None: direct
    mode), ``settings`` (a Settings), ``store`` (the profile whose login
    store holds the tokens), ``issuer``, ``client_id``.  The environment
    variables themselves are read where they are used (Settings, _Auth)."""

    def __init__(self, given, profile=None, dev=False, env=None, insecure=False,
                 backoff=0.5, expect_threshold=_EXPECT_THRESHOLD):
        env = os.environ if env is None else env
        name = profile or ("dev" if dev else None) or env.get("CTADATA_PROFILE") or "default"
        self.profile, self.env, self.dev = name, env, dev
        self.sources = {"profile": "argument" if profile else "--dev/dev=" if dev else
                        "$CTADATA_PROFILE" if env.get("CTADATA_PROFILE") else
                        "built-in default"}
        self.values = v = self._apply(dict(given), _load_profile(name, env))
        self.issuer = v["issuer"] or _DEFAULT_ISSUER
        self.client_id = v["client_id"] or _DEFAULT_CLIENT_ID
        url = v["url"]
        self.service_url = _service_url(url, dev and self.sources.get("url") is None,
                                        v["service"], env)
        if self.service_url:
            url = self.service_url
        elif dev and not url:
            url = DEV_URL
        self.settings = Settings(url, v["timeout"], v["retries"], v["jobs"], v["ca_file"],
                                 v["ca_dir"], insecure, v["cert"], backoff, expect_threshold,
                                 env=env)
        self.store = "dev" if name == "dev" or self.settings.url == DEV_URL else name

    def _apply(self, given, prof):
        for key, value in given.items():
            var = _PROFILE_KEYS[key]
            if value is not None:
                self.sources[key] = "argument"
            elif var and self.env.get(var) and not (key == "url" and self.dev):
                # (--dev is on the command line: its URL beats $CTADATA_URL)
                self.sources[key] = "$" + var
            elif key in prof and not (key == "service" and given["url"] is not None) and \
                    not (key == "url" and given["service"] not in (None, False)):
                # (an explicit storage URL or download service beats the
                # profile's choice of the other)
                given[key], self.sources[key] = prof[key]
        return given

    def rows(self):
        """(name, value, where it came from) of each setting: what
        Client.config() shows (the token row aside)."""
        s, v = self.settings, self.values
        rows = [("profile", self.profile, self.sources["profile"])]

        def row(key, value, default="built-in default"):
            rows.append((key, value, self.sources.get(key, default)))
        row("service" if self.service_url else "url", s.url)
        row("jobs", s.jobs, "built-in default (transfers adapt: up to %d, uploads %d)"
            % (_MAX_JOBS, _MAX_PUT_JOBS) if s.adaptive else "built-in default")
        row("timeout", s.timeout)
        row("retries", s.retries)
        row("ca_file", s.ca_file)
        row("ca_dir", s.ca_dir, "built-in default (if it exists)")
        row("cert", v["cert"])
        row("auth", v["auth"] or "auto")
        row("token_file", v["token_file"])
        row("oidc_agent", v["oidc_agent"] or self.env.get("CTADATA_OIDC_AGENT") or None)
        row("issuer", self.issuer)
        row("client_id", self.client_id)
        row("cert_service", v["cert_service"])
        row("tape_api", v["tape_api"] or "asked of the storage (.well-known)")
        row("tape_prefix", v["tape_prefix"] or "the URL path")
        row("stage_poll", "%gs growing to %gs" % _stage_poll(v["stage_poll"]))
        row("fts", v["fts"] or self.env.get("CTADATA_FTS") or None)
        return rows


############################################################################
# HTTP transport
############################################################################

# One http.client connection per (thread, origin), kept alive; our own
# redirect loop (Authorization never crosses origins) and one retry rule
# (_should_retry); request bodies that can be sent again (_FileBody).


def _origin(url):
    """(scheme, host, port) of an absolute URL, with the default port filled in."""
    from urllib.parse import urlsplit
    p = urlsplit(url)
    scheme = p.scheme.lower()
    try:
        port = p.port
    except ValueError:
        raise ProtocolError("invalid port in URL", url)
    return (scheme, (p.hostname or "").lower(),
            port or (443 if scheme == "https" else 80))


def _hostport(key):
    """"host:port" of an origin key (IPv6 in brackets), for messages."""
    host = key[1]
    return "%s:%d" % ("[%s]" % host if ":" in host else host, key[2])


class _RetryPolicy:
    """How often and how long to retry: bounded attempts, exponential
    backoff with equal jitter, Retry-After honoured (capped)."""

    __slots__ = ("retries", "base", "cap")

    def __init__(self, retries, base=0.5, cap=30.0):
        self.retries, self.base, self.cap = retries, base, cap


def _should_retry(policy, attempt, status=None, exc=None, retry_after=None,
                  replayable=True):
    """Return seconds to sleep before the next attempt, or None to give up.

    *attempt* counts from 0 for the first failure.  Retry on connection
    errors, timeouts and the statuses in _RETRY_STATUSES; never replay a
    body that cannot be rewound."""
    if attempt >= policy.retries or not replayable:
        return None
    if status is not None and status not in _RETRY_STATUSES:
        return None
    if exc is not None and not _is_transient(exc):
        return None
    # "Equal jitter" (M. Brooker, "Exponential Backoff And Jitter", AWS
    # Architecture Blog, 2015): half the backoff for sure, half at random, so
    # that the default 5 retries always span 7.75-15.5 s (with full jitter
    # they spanned under 5 s for one file in six, and a 5 s outage failed it)
    # while parallel clients still spread out.
    import random
    step = min(policy.cap, policy.base * (2 ** attempt))
    delay = step / 2 + random.uniform(0, step / 2)
    if retry_after:
        try:
            delay = max(delay, min(policy.cap, float(retry_after)))
        except ValueError:
            pass  # an HTTP-date: the jittered backoff is good enough
    return delay


def _retry_delay(policy, attempt, err):
    """_should_retry for a CtadataError raised by a request or a transfer
    (also for an error answer in _Transport.request: _error_for_status
    decides what an answer is, this whether it is tried again)."""
    if isinstance(err, RemoteError):
        return _should_retry(policy, attempt, status=err.status, retry_after=err.retry_after)
    if isinstance(err, TransferError):
        return _should_retry(policy, attempt, exc=err)
    return None


def _log_retry(method, url, delay, why, attempt, policy):
    """Say that a request is tried again, one line per retry: "retrying GET
    URL in 2.1 s after: connection reset by peer (attempt 2 of 6)".  At INFO
    on the logger "ctadata.retry", which the command line shows on stderr
    (not with -q): a server that accepts and never answers is then not
    minutes of silence.  *attempt* counts the failures before this one."""
    if isinstance(why, CtadataError):
        # "HTTP 503", "connection reset by peer": the request is named already
        # (a TransferError with a status says more than its status)
        verb, sep, rest = why.message.partition(": ")
        why = "HTTP %d" % why.status if why.status and not isinstance(why, TransferError) \
            else rest if sep and " " not in verb else why.message
    elif isinstance(why, BaseException):
        why = _network_error(why, url).message
    why = str(why)
    import logging
    logging.getLogger("ctadata.retry").info(
        "retrying %s %s in %.1f s after: %s (attempt %d of %d)", method, _safe_url(url), delay,
        why[:1].lower() + why[1:] if why[1:2].islower() else why, attempt + 2,
        policy.retries + 1)


# What OpenSSL says when the server answers a TLS handshake in plain text.
_PLAIN_HTTP_REASONS = frozenset(("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                 "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"))


def _is_plain_http(exc):
    """A TLS handshake that a plain-http server answered (https:// asked of
    it, or a URL without a scheme, which means https)."""
    import ssl
    return isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in _PLAIN_HTTP_REASONS


def _is_transient(exc):
    import http.client
    import socket
    if isinstance(exc, (ConnectionError, socket.timeout, http.client.HTTPException,
                        TimeoutError)):
        return True
    if isinstance(exc, TransferError):
        return exc.retryable and not isinstance(exc, ChecksumMismatch)
    import ssl
    if isinstance(exc, ssl.SSLError) and not _is_cert_error(exc):
        return not _is_plain_http(exc)
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in (
        104, 110, 111, 113, 32)  # reset, timed out, refused, no route, broken pipe


# PyPy copies a buffer handed to socket/file/zlib calls into raw memory that
# its GC does not count: without a nudge, moving 1 GB grew RSS by over 1 GB.
_PYPY = sys.implementation.name == "pypy"
_PYPY_MOVED = [0]


def _pypy_gc(nbytes):
    """Collect after every 16 MiB moved (PyPy only; ~64 collections/GiB)."""
    _PYPY_MOVED[0] += nbytes
    if _PYPY_MOVED[0] >= 16 << 20:
        _PYPY_MOVED[0] = 0
        import gc
        gc.collect()


class _FileBody:
    """A request body read from a local file; can be re-opened for a retry
    or a redirect (dCache pool URLs are single-use, so a retried upload
    starts again at the door)."""

    __slots__ = ("path", "size", "hash_algos", "hashers", "sent", "advance")

    def __init__(self, path, size, hash_algos=("adler32",)):
        self.path, self.size, self.hash_algos = path, size, hash_algos
        self.hashers = None
        self.sent = 0
        self.advance = None  # a Progress's advance(), told of every block sent

    def chunks(self, cancel=None):
        """Yield the file's bytes in blocks, hashing them on the way (in this
        thread: a second one cost more in GIL hand-overs than the hashing,
        1 GiB uploads 1.5-3.1 s against 1.0-1.2 s inline)."""
        self.hashers = _Hashers(self.hash_algos)
        advance = self.advance
        if advance is not None and self.sent:
            advance(-self.sent)  # sent again (a retry, a redirect): counted again
        self.sent = 0
        update = self.hashers.update if self.hashers.active else None
        with _open_regular(self.path) as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while True:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                n = f.readinto(buf)
                if not n:
                    break
                block = view[:n]
                if update is not None:
                    update(block)
                yield block
                self.sent += n
                if advance is not None:
                    advance(n)
                if _PYPY:
                    _pypy_gc(n)
        if self.sent != self.size:
            raise TransferError("local file changed size during upload: %s" % self.path,
                                expected=self.size, received=self.sent, retryable=False)

    def read_all(self):
        self.hashers = _Hashers(self.hash_algos)
        with _open_regular(self.path) as f:
            data = f.readall()
        if len(data) != self.size:
            raise TransferError("local file changed size during upload",
                                hint=self.path, expected=self.size, received=len(data))
        self.hashers.update(data)
        if self.advance is not None:
            self.advance(len(data) - self.sent)
        self.sent = len(data)
        return data


class _Headers:
    """Case-insensitive, multi-valued response headers: the part of
    email.message.Message that http.client uses, without the email parser
    (which costs ~25 us per response: a tenth of a small-file transfer)."""

    __slots__ = ("_items", "_map")

    def __init__(self, items):
        self._items = items
        m = {}
        for k, v in items:
            m.setdefault(k.lower(), []).append(v)
        self._map = m

    def get(self, name, default=None):
        v = self._map.get(name.lower())
        return v[0] if v else default

    def get_all(self, name, failobj=None):
        v = self._map.get(name.lower())
        return list(v) if v else failobj

    def items(self):
        return list(self._items)

    def keys(self):
        return [k for k, _ in self._items]

    def __contains__(self, name):
        return name.lower() in self._map

    def __getitem__(self, name):
        return self.get(name)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._items)


def _read_header_lines(fp):
    """Read header lines up to the blank line: [(name, value)] (RFC 9112 §5,
    with obsolete line folding joined); same limits as http.client."""
    import http.client
    items = []
    while True:
        line = fp.readline(65537)
        if len(line) > 65536:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return items
        if len(items) >= 100:
            raise http.client.HTTPException("got more than 100 headers")
        text = line.decode("iso-8859-1")
        if text[:1] in (" ", "\t") and items:
            name, value = items[-1]
            items[-1] = (name, value + " " + text.strip())
            continue
        name, sep, value = text.partition(":")
        if sep:
            items.append((name.strip(), value.strip()))


_RESPONSE_CLASS = []


def _response_class():
    """http.client.HTTPResponse with a lean header parser (built on first
    use: http.client is not imported at start-up).  Its begin() is
    http.client's own, line for line, but for _Headers: kept whole so that
    it can be compared with the original."""
    if _RESPONSE_CLASS:
        return _RESPONSE_CLASS[0]
    import http.client

    class _Response(http.client.HTTPResponse):
        def __init__(self, sock, debuglevel=0, method=None, url=None):
            http.client.HTTPResponse.__init__(self, sock, debuglevel, method, url)
            # A 64 KiB read buffer instead of 8 KiB: status line, headers and
            # a small file's body arrive in one recv() instead of three.
            self.fp.close()
            self.fp = sock.makefile("rb", 1 << 16)

        def begin(self):
            # http.client.HTTPResponse.begin, with _Headers for the headers
            if self.headers is not None:
                return
            while True:
                version, status, reason = self._read_status()
                if status != 100:
                    break
                _read_header_lines(self.fp)       # an interim 100 Continue
            self.code = self.status = status
            self.reason = reason.strip()
            if version in ("HTTP/1.0", "HTTP/0.9"):
                self.version = 10
            elif version.startswith("HTTP/1."):
                self.version = 11
            else:
                raise http.client.UnknownProtocol(version)
            self.headers = self.msg = _Headers(_read_header_lines(self.fp))
            te = self.headers.get("transfer-encoding")
            self.chunked = bool(te and te.lower() == "chunked")
            self.chunk_left = None
            self.will_close = self._check_close()
            self.length = None
            length = self.headers.get("content-length")
            if length and not self.chunked:
                try:
                    self.length = int(length)
                except ValueError:
                    self.length = None
                if self.length is not None and self.length < 0:
                    self.length = None
            if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
                self.length = 0
            if not self.will_close and not self.chunked and self.length is None:
                self.will_close = True

    _RESPONSE_CLASS.append(_Response)
    return _Response


class _Quirks:
    """What the storage's HTTP server does differently from the RFCs, as its
    Server header says: the one place that knows server products (the rest
    of the module asks these flags, never for a product).  So far only
    XRootD's HTTP door (XrdHttp; measured on 5.5.3, PROTOCOL.md §5, pinned
    by tests/test_xrootd.py):

    raw_hrefs      PROPFIND hrefs are the names as they are, not
                   percent-encoded ("lit%20eral" is literal).
    cuts_at_query  a "?" in a path, even sent as %3F, ends the name: a
                   name with one can be neither stored nor found
                   (_cut_name_error).
    raw_destination  MOVE's Destination is taken byte for byte, not
                   percent-decoded: it is sent unencoded (UTF-8).
    moves_over     MOVE ignores "Overwrite: F" and replaces the
                   destination: the client looks first.
    rmdir_delete   DELETE removes only an empty folder ("directory not
                   empty" otherwise): what is in it goes first.
    lenient_mkcol  MKCOL makes missing parents and accepts an existing
                   folder: mkdir without parents looks first.
    digests        may be asked for checksums (Want-Digest) in transfers:
                   not XRootD before 5.8.3.  It computes a checksum it has
                   not stored yet in a job whose answer races with the rest
                   of the request (xrootd issues 2360, 2602; fixed in 5.8.3
                   and 6.0).  Measured on 5.5.3: GET + Want-Digest failed or
                   hung 1 time in 40 and crashed the server within a few
                   hundred; HEAD + Want-Digest just after a PUT crashed it
                   within 30-800 uploads; a Want-Digest lingered in its
                   recycled request objects, so that later GETs came back
                   with a wrong Digest.  Those transfers are checked by size
                   only (XRootD sends no ETag or Last-Modified either, so a
                   .part is never resumed there: _PartMeta); `ctadata sum`
                   still asks, with one HEAD.
    refuses_403    answers 403, never 401, to missing or refused
                   credentials: a 403 gets what a 401 gets (one refresh or
                   second look for a token, the credentials' hint)."""

    __slots__ = ("server", "raw_hrefs", "cuts_at_query", "raw_destination", "moves_over",
                 "rmdir_delete", "lenient_mkcol", "digests", "refuses_403")

    def __init__(self, server):
        self.server = server or ""   # the Server header ("" when none)
        xrootd = self.server.startswith("XrootD")
        self.raw_hrefs = self.cuts_at_query = xrootd
        self.raw_destination = self.moves_over = self.rmdir_delete = xrootd
        self.lenient_mkcol = xrootd
        self.digests = not xrootd or self.version() >= (5, 8, 3)
        self.refuses_403 = xrootd

    def __repr__(self):
        return "<ctadata quirks of %r>" % self.server

    def version(self):
        """The product's version from "Name/v1.2.3..." as a tuple of three
        ints; (0, 0, 0) when the header has none."""
        import re
        m = re.match(r"[^/]*/v?(\d+)\.(\d+)(?:\.(\d+))?", self.server)
        return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


class _Transport:
    """The one HTTP transport: a keep-alive http.client connection per
    (thread, origin), a timeout on every request, our own redirect loop
    (urllib copies Authorization to every redirect target and refuses to
    redirect PUT/PROPFIND), retries per _should_retry."""

    def __init__(self, settings, auth, cancel=None):
        self.settings = settings
        self.auth = auth
        self.auth_origin = _origin(settings.url)
        from urllib.parse import urlsplit
        self._prefix = "%s://%s" % urlsplit(settings.url)[:2]  # scheme://netloc
        # A token crosses the network only encrypted: over plain http it goes
        # to this machine only (test servers, tunnels), never elsewhere.
        self._auth_ok = self.auth_origin[0] == "https" or _is_loopback(self.auth_origin[1])
        self.policy = _RetryPolicy(settings.retries, settings.backoff)
        # compute checksums of downloads even when the server has none to
        # compare with (for manifests)
        self.record_sums = False
        # does this server answer uploads with a Digest? None: not known yet
        self.put_digests = None
        self._quirks = None  # the storage's _Quirks, from its first answer (see quirks())
        self.cancel = cancel
        self._local = _thread._local()
        self._ctx = None
        self._ctx_lock = _thread.allocate_lock()
        import weakref
        self._open = weakref.WeakSet()  # every connection, for abort()
        self.retries = 0                # requests tried again, by all threads
        self._ua = "ctadata/%s python/%d.%d" % ((__version__,) + sys.version_info[:2])
        self._siblings = []             # see sibling()
        # where remote paths start, for messages (describe); the download
        # service's backend puts its endpoints here
        self.roots = (settings.url.rstrip("/") + "/",)

    def __repr__(self):
        return "<ctadata transport %s://%s:%d>" % self.auth_origin

    def describe(self, url):
        """The remote path *url* names, as a user writes it (decoded,
        relative to the storage URL, without a trailing "/"), or None for a
        URL elsewhere: what messages call it."""
        from urllib.parse import unquote
        bare = url.partition("?")[0]
        for root in self.roots:
            if bare.startswith(root) or bare + "/" == root:
                return unquote(bare[len(root):]).strip("/")
        return None

    # -- connections -------------------------------------------------------

    def ssl_context(self):
        with self._ctx_lock:
            if self._ctx is None:
                self._ctx = self._make_ssl_context()
            return self._ctx

    def _make_ssl_context(self):
        import ssl
        s = self.settings
        try:
            ctx = ssl.create_default_context()
            # Grid host certificates are signed by IGTF CAs that are not in the
            # system store: load them on top of it.
            if s.ca_file:
                ctx.load_verify_locations(cafile=s.ca_file)
            if s.ca_dir and os.path.isdir(s.ca_dir):
                ctx.load_verify_locations(capath=s.ca_dir)
            cert = self.auth.client_cert()
            if cert:
                ctx.load_cert_chain(cert)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("TLS setup failed: %s" % e)
        if s.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _conn(self, key, single_use=False):
        """This thread's kept-alive connection to *key*, and whether it was
        used before; *single_use*: a new one, not kept (dCache closes the
        connection of an Expect: 100-continue PUT after the redirect)."""
        import http.client
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = None if single_use else conns.get(key)
        if conn is not None:
            return conn, True
        scheme, host, port = key
        # No blocksize= (3.7+): it only sizes http.client's reads of a file
        # object given as body, and every body here is sent by _send and
        # _send_body themselves, in _CHUNK blocks.
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.settings.timeout, context=self.ssl_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.settings.timeout)
        conn.response_class = _response_class()
        if not single_use:
            conns[key] = conn
        self._open.add(conn)
        return conn, False

    def abort(self):
        """Shut down every open connection, in all threads, so that workers
        blocked in recv() wake up at once (Ctrl-C)."""
        import socket
        for tr in self._siblings:
            tr.abort()
        for conn in list(self._open):
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _drop(self, key, conn):
        conns = getattr(self._local, "conns", {})
        if conns.get(key) is conn:
            del conns[key]
        conn.close()

    def close(self):
        for tr in self._siblings:
            tr.close()
        for conn in getattr(self._local, "conns", {}).values():
            conn.close()
        self._local.conns = {}

    def sibling(self, url):
        """A transport with these settings and credentials whose token goes
        to the origin of *url* (and, like this one's, nowhere else).  The one
        way a token reaches a second origin: the tape REST API on dCache's
        frontend (another port), which the storage's own discovery document
        or the user's profile named (_TapeAPI).  This transport still never
        sends it there."""
        s = self.settings
        tr = _Transport(Settings(url, s.timeout, s.retries, s.jobs, s.ca_file, s.ca_dir,
                                 s.insecure, s.cert, s.backoff, s.expect_threshold, env={}),
                        self.auth, self.cancel)
        self._siblings.append(tr)
        return tr

    # -- one request ---------------------------------------------------------

    def _send(self, method, url, headers, body, expect):
        """Send one request to exactly *url* (no redirects, no retries)."""
        prefix = self._prefix
        if url.startswith(prefix) and url[len(prefix):len(prefix) + 1] == "/" and \
                "#" not in url:
            # the storage's own URLs (nearly all of them): no parsing
            key, target = self.auth_origin, url[len(prefix):]
        else:
            key, target = self._split(url)
        hdrs, data, value = self._headers(key, headers, body, expect)
        for attempt in (0, 1):
            conn, reused = self._conn(key, single_use=expect)
            try:
                resp, cut = self._exchange(conn, method, target, hdrs, body, data, expect)
            except Exception as e:
                self._drop(key, conn)
                # A kept-alive connection the server has closed in the meantime
                # fails on first use: that is not a failure of the request
                # (unless it was shut down by abort(): Ctrl-C, SIGTERM).
                if reused and attempt == 0 and _is_stale(e) and not (
                        self.cancel is not None and self.cancel.is_set()):
                    continue
                raise
            if self._quirks is None and key == self.auth_origin:
                self._quirks = _Quirks(resp.getheader("Server"))
            resp.ctadata_url = url
            resp.ctadata_key = key
            resp.ctadata_auth = value
            resp.ctadata_conn = conn
            resp.ctadata_close = expect or resp.will_close or cut is not None
            return resp

    def quirks(self):
        """The storage's _Quirks, from the Server header of its first answer;
        asked with OPTIONS when nothing has answered yet (a failure then
        says nothing is known: no quirks)."""
        if self._quirks is None:
            try:
                self.release(self._send("OPTIONS", self._prefix + "/", {}, None, False))
            except Exception:
                return _Quirks(None)
        return self._quirks

    @staticmethod
    def _split(url):
        """(origin key, request target) of any absolute URL."""
        from urllib.parse import urlsplit
        p = urlsplit(url)
        return _origin(url), (p.path or "/") + ("?" + p.query if p.query else "")

    def _headers(self, key, headers, body, expect):
        """(request headers, body to send with them or None, the
        Authorization value sent or None)."""
        hdrs = {"User-Agent": self._ua}
        value = None
        if key == self.auth_origin and self._auth_ok:
            # Authorization only ever goes to the origin the user configured:
            # dCache pools authenticate the transfer by its single-use UUID.
            # The auth object is asked per request: it refreshes when needed.
            value = self.auth.header()
            if value:
                hdrs["Authorization"] = value
        hdrs.update(headers)
        data = None
        if isinstance(body, (bytes, bytearray)):
            data = body
            hdrs["Content-Length"] = str(len(body))
        elif body is not None:
            hdrs["Content-Length"] = str(body.size)
            if not expect and body.size <= _SMALL_BODY:
                data = body.read_all()
        if expect:
            hdrs["Expect"] = "100-continue"
        return hdrs, data, value

    def _exchange(self, conn, method, target, hdrs, body, data, expect):
        """Send the request on *conn* and read the answer's head; return
        (response, the error that cut the body short or None)."""
        t0 = time.monotonic()
        if conn.sock is None:
            import socket
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if expect:
            conn.endheaders()
            self._waited(t0)
            return self._expect_continue(conn, method, body), None
        if data is not None or body is None:
            conn.endheaders(data)
            resp = conn.getresponse()
            self._waited(t0)
            return resp, None
        conn.endheaders()
        self._waited(t0)
        cut = self._send_body(conn, body)
        t0 = time.monotonic()
        try:
            resp = conn.getresponse()
        except Exception:
            if cut is not None:
                raise cut
            raise
        self._waited(t0)
        if cut is not None and resp.status < 300:
            raise cut  # "fine" without the whole body is not fine
        return resp, cut

    def _waited(self, since):
        """Count the time since *since* as this thread's waiting on the
        network (see meter())."""
        local = self._local
        local.waited = getattr(local, "waited", 0.0) + time.monotonic() - since

    def meter(self):
        """(seconds, retries): the seconds this thread has spent waiting on
        the network so far (connecting, TCP and TLS, and from sending a
        request to the head of its answer, not streaming a body either way),
        and the requests tried again by any thread (pause()).  What the
        adaptive worker pool weighs against the time of each transfer
        (_Concurrency)."""
        return getattr(self._local, "waited", 0.0), self.retries

    def close_mine(self):
        """Close this thread's kept-alive connections (a worker that stops
        while others go on: its connections would hold server slots)."""
        conns = getattr(self._local, "conns", None) or {}
        for conn in list(conns.values()):
            conn.close()
        conns.clear()

    def _send_body(self, conn, body):
        """Stream *body*; return None, or the error if the server stopped
        taking it: it may have answered already without reading the body
        (the download service does for 401/403), and that answer says more
        than "broken pipe"."""
        try:
            for block in body.chunks(self.cancel):
                conn.send(block)
        except (BrokenPipeError, ConnectionResetError) as e:
            return e
        return None

    def _expect_continue(self, conn, method, body):
        """Wait for the server's interim answer to "Expect: 100-continue";
        send the body only after a 100 (or after a silent timeout, as RFC 9110
        §10.1.1 allows).  http.client has no support for this."""
        import http.client
        import socket
        resp = conn.response_class(conn.sock, method=method)
        conn.sock.settimeout(_EXPECT_TIMEOUT)
        t0 = time.monotonic()
        try:
            head = resp.fp.peek(16)
        except socket.timeout:
            head = b"HTTP/1.1 100"
        finally:
            conn.sock.settimeout(self.settings.timeout)
        self._waited(t0)
        if not head:
            raise http.client.RemoteDisconnected("connection closed before the interim answer")
        if head[9:12] == b"100"[:len(head[9:12])]:
            for block in body.chunks(self.cancel):
                conn.sock.sendall(block)
        t0 = time.monotonic()
        resp.begin()  # skips the interim 100 itself
        self._waited(t0)
        return resp

    # -- the request loop: redirects and retries ------------------------------

    def request(self, method, url, headers=None, body=None, expect=False,
                ok=(200, 201, 204, 206, 207), what=None, retry=True):
        """Send a request, following redirects and retrying transient failures.

        Returns the final http.client.HTTPResponse (status in *ok*, body
        unread); raises the exception _error_for_status maps any other
        status to, or TransferError for network failures."""
        if "%3F" in url or "%3f" in url:
            self._refuse_cut_name(url)
        headers = headers or {}
        attempt = 0
        auth_retried = False
        while True:
            try:
                resp = self._follow(method, url, headers, body, expect)
            except (CtadataError, KeyboardInterrupt):
                raise
            except Exception as e:
                delay = _should_retry(self.policy, attempt, exc=e) if retry else None
                if delay is None:
                    raise _network_error(e, url, what)
                self.pause(method, url, delay, e, attempt)
                attempt += 1
                continue
            if resp.status in ok:
                return resp
            err_body = _read_limited(resp)
            self.release(resp)
            if resp.status in (401, 403) and not auth_retried and self._auth_ok and \
                    resp.ctadata_key == self.auth_origin and \
                    (resp.status == 401 or self.quirks().refuses_403) and \
                    self.auth.on_unauthorized(resp.ctadata_auth):
                # A token can die before its "exp" (revoked, server clock):
                # one refresh (or a second look for one), then the same
                # request again.  (XRootD says 403: _Quirks.refuses_403.)
                auth_retried = True
                continue
            err = self._status_error(resp, err_body, what, url)
            delay = _retry_delay(self.policy, attempt, err) if retry else None
            if delay is None:
                raise err
            self.pause(method, url, delay, err, attempt)
            attempt += 1

    def _refuse_cut_name(self, url):
        """Raise _cut_name_error for a URL of the storage whose path has a
        "?" (a query of a URL given as it is stays alone)."""
        from urllib.parse import urlsplit, unquote
        path = urlsplit(url).path
        if "%3f" in path.lower() and _origin(url) == self.auth_origin and \
                self.quirks().cuts_at_query:
            raise _cut_name_error(self.describe(url) or unquote(path))

    def _status_error(self, resp, body, what, url):
        """The exception for an answer with an error status to a request
        for *url* (the answer may come from where it was redirected)."""
        err = _error_for_status(resp.status, resp.ctadata_url, body, what, self.auth,
                                self.describe(url))
        if resp.status == 401 and not self._auth_ok:
            err.hint = "no token is sent over plain http to another machine: use https"
        elif resp.status == 403 and resp.ctadata_key == self.auth_origin and \
                self.quirks().refuses_403:
            err.hint = self.auth.hint()  # (a 401 elsewhere)
        elif resp.status in (401, 403) and resp.ctadata_key != self.auth_origin:
            # the token was not refused: it never went there (see _headers)
            there = _hostport(resp.ctadata_key)
            err.hint = err.cli_hint = (
                "token not sent: %s is not the storage URL (--url)" % there
                if _origin(url) != self.auth_origin else
                "token not sent: the request was redirected to %s, which is not the "
                "storage URL" % there)
        err.retry_after = resp.getheader("Retry-After")
        return err

    def pause(self, method, url, delay, why, attempt):
        """Say that a request is tried again (_log_retry), count it (see
        meter()), and wait *delay* seconds before it."""
        _log_retry(method, url, delay, why, attempt, self.policy)
        self.retries += 1   # (a lost increment between threads loses nothing)
        self.sleep(delay)

    def sleep(self, delay):
        """Wait *delay* seconds; KeyboardInterrupt at once when cancelled."""
        if self.cancel is not None:
            if self.cancel.wait(delay):
                raise KeyboardInterrupt
        else:
            time.sleep(delay)

    def _follow(self, method, url, headers, body, expect):
        from urllib.parse import urljoin
        debug = _debug_enabled()
        for _hop in range(_MAX_REDIRECTS + 1):
            t0 = time.monotonic() if debug else 0
            resp = self._send(method, url, headers, body, expect)
            if debug:
                _log(10, "%s %s -> %d (%.3fs)", method, _safe_url(url), resp.status,
                     time.monotonic() - t0)
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.getheader("Location")
            self.release(resp)
            if not location:
                raise ProtocolError("redirect without Location", url, resp.status)
            new = urljoin(url, location)
            if resp.status in (301, 302) and method in ("PUT", "POST"):
                # Apache answers 301 when the name is an existing directory;
                # following with the body could create a file next to it.
                raise RemoteError("%s redirected (%d) to %s: is a directory there?"
                                  % (method, resp.status, _safe_url(new)), url,
                                  resp.status)
            if _origin(new)[0] not in ("http", "https"):
                raise ProtocolError("refusing redirect to a non-HTTP URL", url)
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body, expect = "GET", None, False
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in ("content-type", "content-md5")}
            url = new
        raise ProtocolError("too many redirects", url)

    def release(self, resp):
        """Finish with a response: drain a small rest so the connection can be
        reused, otherwise close the connection."""
        if getattr(resp, "ctadata_close", False) or resp.will_close:
            resp.close()
            self._drop(resp.ctadata_key, resp.ctadata_conn)
            return
        if resp.isclosed():
            return
        try:
            length = resp.length
            if length is not None and length <= _DRAIN_LIMIT:
                resp.read()
                return
            if resp.chunked:  # a small chunked rest is drained too
                left = _DRAIN_LIMIT
                while left > 0:
                    b = resp.read(min(left, 8192))
                    if not b:
                        return
                    left -= len(b)
        except Exception:
            pass  # a broken rest: the connection is dropped just below
        resp.close()
        self._drop(resp.ctadata_key, resp.ctadata_conn)


def _is_stale(exc):
    import http.client
    return isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                            BrokenPipeError, ConnectionAbortedError))


def _read_limited(resp, limit=_ERROR_BODY_LIMIT):
    try:
        return resp.read(limit)
    except Exception:
        return b""


def _network_error(exc, url, what=None):
    import socket
    if isinstance(exc, (socket.timeout, TimeoutError)):
        text = "timed out"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    if _is_cert_error(exc):
        return TransferError("TLS certificate verification failed: %s"
                             % getattr(exc, "verify_message", text), url,
                             hint="use --ca-file/--ca-dir for a private CA")
    if _is_plain_http(exc):
        there = _hostport(_origin(url))
        return TransferError("%s answered https in plain http" % there, url, retryable=False,
                             hint="if it is a plain http server, say so: http://%s "
                                  "(a URL without a scheme means https)" % there)
    if isinstance(exc, TransferError):
        return exc
    return TransferError("%s%s" % (what + ": " if what else "", text), url)


def _read_body(tr, resp, url, what, limit=None):
    """Read a whole (JSON) answer, or its first *limit* bytes; network
    errors become TransferError."""
    try:
        return resp.read() if limit is None else resp.read(limit)
    except Exception as e:
        if not _is_transient(e):
            raise
        raise _network_error(e, url, what)
    finally:
        tr.release(resp)


class _NoAuth:
    """Credentials of a transport that never sends any (the identity
    provider gets the client's credentials in the form body)."""

    def __init__(self, secrets):
        self.secrets = secrets

    def header(self):
        return None

    def hint(self):
        return None

    def on_unauthorized(self, used):
        return False

    def client_cert(self):
        return None

    def redact(self, text):
        return self.secrets.redact(text)


def _iter_body(resp, size=_CHUNK):
    """Yield a response body in blocks."""
    while True:
        block = resp.read1(size) if hasattr(resp, "read1") else resp.read(size)
        if not block:
            return
        yield block


############################################################################
# OpenID Connect (device login, refresh)
############################################################################

# `ctadata login`: the device authorization grant (RFC 8628) and the
# refresh_token grant with rotation (RFC 6749 §6), OpenID Connect Discovery.


# Identity-provider answers are read whole, never more than this.
_JSON_LIMIT = 1 << 20
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class _OIDC:
    """Talks to an OpenID provider through our own _Transport (one per
    issuer origin, never sending Authorization: client credentials go in
    the form body): discovery, the device authorization grant (RFC 8628)
    and the refresh_token grant with rotation.  Forms and answers are never
    logged; answers are read up to _JSON_LIMIT.  *sleep* waits between
    device-code polls, *clock* says what time it is (tests pass their own,
    or replace the class's)."""

    sleep = staticmethod(time.sleep)
    clock = staticmethod(time.time)

    def __init__(self, settings, secrets, sleep=None, clock=None):
        self.settings = settings
        self.secrets = secrets
        if sleep is not None:
            self.sleep = sleep
        if clock is not None:
            self.clock = clock
        self._transports = {}
        self._lock = _thread.allocate_lock()

    def __repr__(self):
        return "<ctadata OIDC client>"

    def _transport(self, url):
        _check_secure_url(url, "identity provider URL")
        key = _origin(url)
        with self._lock:
            tr = self._transports.get(key)
            if tr is None:
                s = self.settings
                st = Settings(url, s.timeout, min(s.retries, 3), 1, s.ca_file, s.ca_dir,
                              s.insecure, None, backoff=s.backoff, env={})
                tr = self._transports[key] = _Transport(st, _NoAuth(self.secrets))
            return tr

    def _call(self, url, form=None, ok=(200,), what=None):
        """GET *url*, or POST *form* urlencoded; return (status, JSON object)."""
        import json
        tr = self._transport(url)
        headers = {"Accept": "application/json"}
        body = None
        if form is not None:
            from urllib.parse import urlencode
            self.secrets.add(form.get("client_secret"), form.get("refresh_token"),
                             form.get("device_code"))
            body = urlencode(form).encode("utf-8")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp = tr.request("POST" if form is not None else "GET", url, headers, body,
                          ok=ok, what=what)
        try:
            data = resp.read(_JSON_LIMIT + 1)
        except Exception as e:
            raise _network_error(e, url, what)
        finally:
            tr.release(resp)
        if len(data) > _JSON_LIMIT:
            raise ProtocolError("%s: answer larger than %d bytes" % (what, _JSON_LIMIT), url)
        try:
            doc = json.loads(data.decode("utf-8"))
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ProtocolError("%s: HTTP %d without a JSON object" % (what, resp.status), url)
        for key in ("access_token", "refresh_token", "id_token"):
            self.secrets.add(doc.get(key))
        return resp.status, doc

    def discover(self, issuer):
        """The issuer's discovery document (OpenID Connect Discovery 1.0)."""
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        _, doc = self._call(url, what="OIDC discovery")
        for key in ("device_authorization_endpoint", "token_endpoint"):
            if not isinstance(doc.get(key), str):
                raise ProtocolError("the identity provider does not offer %s" % key, url)
            _check_secure_url(doc[key], key)
        return doc

    def device_login(self, issuer, client_id, secret=None, scope=_LOGIN_SCOPE, show=None):
        """Run the device authorization grant (RFC 8628): *show(uri, code,
        complete_uri, expires_in)* is called once with what the user must
        open; then poll until the user has logged in.  Returns the record
        for _TokenStore.save; raises AuthError when denied or expired."""
        doc = self.discover(issuer)
        dev = self._start_device_flow(doc["device_authorization_endpoint"], client_id,
                                      secret, scope)
        complete = dev.get("verification_uri_complete")
        if show is not None:
            show(_printable(dev["verification_uri"]), _printable(dev["user_code"]),
                 _printable(complete) if isinstance(complete, str) else None,
                 _number(dev.get("expires_in"), 600))
        ans = self._poll(doc["token_endpoint"], dev, client_id, secret)
        return self._record(issuer, doc, client_id, secret, scope, ans)

    def _start_device_flow(self, url, client_id, secret, scope):
        """The device authorization answer (RFC 8628 §3.2), checked;
        ``verification_uri`` also when the provider calls it _url."""
        form = {"client_id": client_id, "scope": scope}
        if secret:
            form["client_secret"] = secret
        status, dev = self._call(url, form, ok=(200, 400, 401), what="device authorization")
        if status != 200:
            raise AuthError("the identity provider refused to start a login: %s"
                            % self._error(dev), status=status,
                            hint="check --client-id and the client secret")
        dev["verification_uri"] = dev.get("verification_uri") or dev.get("verification_url")
        if not all(isinstance(dev.get(k), str) and dev[k]
                   for k in ("device_code", "verification_uri", "user_code")):
            raise ProtocolError("device authorization answer without device_code, "
                                "user_code or verification_uri", url)
        return dev

    def _poll(self, url, dev, client_id, secret):
        """Ask the token endpoint until the user has logged in (RFC 8628
        §3.4-3.5); return its answer."""
        interval = min(max(_number(dev.get("interval"), 5), 1), 60)
        deadline = time.monotonic() + _number(dev.get("expires_in"), 600)
        poll = {"grant_type": _DEVICE_GRANT, "device_code": dev["device_code"],
                "client_id": client_id}
        if secret:
            poll["client_secret"] = secret
        while True:
            self.sleep(interval)
            if time.monotonic() > deadline:
                raise AuthError("the login code expired before the login was finished",
                                hint="run `ctadata login` again")
            status, ans = self._call(url, poll, ok=(200, 400, 401, 403), what="login")
            if status == 200:
                return ans
            error = ans.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5  # RFC 8628 §3.5: for this and all later polls
                continue
            if error == "access_denied":
                raise AuthError("the login was denied in the browser")
            if error == "expired_token":
                raise AuthError("the login code expired before the login was finished",
                                hint="run `ctadata login` again")
            raise AuthError("login failed: %s" % self._error(ans), status=status)

    def _error(self, answer):
        return self.secrets.redact(_oauth_error(answer))

    def _record(self, issuer, doc, client_id, secret, scope, ans):
        access = ans.get("access_token")
        if not isinstance(access, str) or not access:
            raise ProtocolError("the identity provider answered without an access token",
                                doc["token_endpoint"])
        now = self.clock()
        rec = {"version": 1, "issuer": issuer, "token_endpoint": doc["token_endpoint"],
               "client_id": client_id, "scope": scope, "access_token": access,
               "obtained_at": now}
        if isinstance(ans.get("refresh_token"), str):
            rec["refresh_token"] = ans["refresh_token"]
        if ans.get("expires_in") is not None:
            rec["expires_at"] = now + _number(ans.get("expires_in"), 0)
        if secret:
            rec["client_secret"] = secret
        return rec

    def refresh(self, rec):
        """Use the refresh token of a store record; return the new record
        (the rotated refresh token, when the provider sent one, replaces
        the old one, which is spent).  Raises AuthError when refused."""
        url = rec.get("token_endpoint")
        if not isinstance(url, str):
            raise AuthError("the login store has no token endpoint",
                            hint="run `ctadata login` again")
        form = {"grant_type": "refresh_token", "refresh_token": rec["refresh_token"],
                "client_id": rec.get("client_id") or ""}
        if rec.get("client_secret"):
            form["client_secret"] = rec["client_secret"]
        status, ans = self._call(url, form, ok=(200, 400, 401), what="token refresh")
        if status != 200:
            raise AuthError("the identity provider refused the refresh: %s"
                            % self._error(ans), status=status,
                            hint="run `ctadata login` again")
        new = dict(rec)
        new.update(self._record(rec.get("issuer"), {"token_endpoint": url},
                                rec.get("client_id"), rec.get("client_secret"),
                                rec.get("scope"), ans))
        if "refresh_token" not in ans:
            new["refresh_token"] = rec["refresh_token"]
        if ans.get("expires_in") is None:
            new.pop("expires_at", None)
        return new


def _number(value, default):
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return default


def _oauth_error(answer):
    """RFC 6749 §5.2 error of a JSON answer, fit for a message."""
    error = _printable(answer.get("error") or "unknown error", 80)
    desc = answer.get("error_description")
    return error + (" (%s)" % _printable(desc, 200) if isinstance(desc, str) and desc else "")


############################################################################
# Credentials (tokens, login store, oidc-agent)
############################################################################

# Where the bearer token comes from (the WLCG Bearer Token Discovery order,
# then `ctadata login`'s store, oidc-agent, the old client's file) and
# keeping it fresh; secrets never reach a message, a repr or a log line.


# Refresh a token this long before it expires (PROTOCOL.md §3); a token that
# lives less than twice as long is refreshed after half its lifetime.
_REFRESH_MARGIN = 60.0
_REFRESH_RETRY = 10.0
# Token files and oidc-token output are read whole, never more than this.
_SECRET_FILE_LIMIT = 1 << 16
_OIDC_TOKEN_TIMEOUT = 60
# Where the WLCG and grid conventions put per-user files (bt_u$UID,
# x509up_u$UID).  A variable so that tests never touch the real /tmp.
_SYSTEM_TMP = "/tmp"
_AUTH_MODES = ("auto", "token", "x509")


def _jwt_claims(token):
    """The payload of a JWT as a dict, or None for anything else (macaroons,
    opaque tokens: they are used as they are).  JWT segments are base64url
    *without* padding (RFC 7515 §2); the old client decoded them as standard
    base64 plus one "=" and so rejected about a third of valid tokens."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    import base64
    import binascii
    import json
    seg = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (binascii.Error, ValueError):  # incl. UnicodeDecodeError, JSONDecodeError
        return None
    return claims if isinstance(claims, dict) else None


def _claim_time(claims, name):
    value = (claims or {}).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _private_problem(st, path):
    """Why a file holding a secret must not be trusted, or None."""
    import stat
    if os.name != "posix" or not stat.S_ISREG(st.st_mode):
        return None  # pipes (--token-file <(...)) and devices are fine
    if st.st_mode & 0o077:
        return "group or others can access %s (mode %04o)" % (path, st.st_mode & 0o777)
    if st.st_uid != _uid():
        return "%s belongs to another user (uid %d)" % (path, st.st_uid)
    return None


def _read_private(path, what="token file"):
    """Read a small file holding a secret; return its text, or None when it
    does not exist.  Refuses a file that group or others can access, or that
    another user owns (PROTOCOL.md §3): someone else could read the token,
    or plant theirs."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError("cannot read %s %s: %s" % (what, path, e.strerror))
    with os.fdopen(fd, "rb") as f:
        problem = _private_problem(os.fstat(f.fileno()), path)
        if problem:
            import shlex
            raise ConfigError("refusing to read %s: %s" % (what, problem),
                              hint="chmod 600 %s" % shlex.quote(path))
        data = f.read(_SECRET_FILE_LIMIT + 1)
    if len(data) > _SECRET_FILE_LIMIT:
        raise ConfigError("%s %s is too large to hold a token" % (what, path))
    return data.decode("utf-8", "replace")


def _write_private(path, data):
    """Write *data* to *path* readable by us only: a fresh 0600 file
    (O_EXCL, so never someone else's), then os.replace over the old one."""
    import secrets
    tmp = os.path.join(os.path.dirname(path), ".%s.%s.tmp" % (
        os.path.basename(path), secrets.token_hex(6)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


class _Token:
    """A bearer token and what we know about it; repr() shows only where it
    came from.  *refresh* is None or ``refresh(self, forced) -> _Token``."""

    __slots__ = ("value", "source", "claims", "exp", "margin", "refresh")

    def __init__(self, value, source, refresh=None, exp=None):
        value = (value or "").strip()
        if value[:7].lower() == "bearer " and value[7:].strip():
            # BEARER_TOKEN="Bearer ey...", as an Authorization header says it:
            # the scheme is not part of the token
            value = value[7:].strip()
        # RFC 6750 §2.1: a b64token.  A space or line break inside would split
        # the header (and http.client would quote the value in its error).
        if not value or any(not ("!" <= c <= "~") for c in value):
            raise ConfigError("the token from %s is not one line of printable ASCII"
                              % source, hint="a token file holds the token and nothing else "
                              "(no 'Authorization:', no quotes)")
        self.value, self.source, self.refresh = value, source, refresh
        self.claims = _jwt_claims(value)
        self.exp = _claim_time(self.claims, "exp") or exp
        iat = _claim_time(self.claims, "iat")
        life = self.exp - iat if self.exp and iat and self.exp > iat else None
        self.margin = min(_REFRESH_MARGIN, life / 2.0) if life else _REFRESH_MARGIN

    def __repr__(self):
        return "<ctadata token from %s>" % self.source


class _TokenStore:
    """What `ctadata login` obtained (access + refresh token, issuer, client):
    one JSON file in $XDG_CONFIG_HOME/ctadata/ (default ~/.config/ctadata/),
    the folder 0700, the file 0600 and replaced atomically.  Processes
    sharing it refresh under an advisory lock, so that a rotated refresh
    token is never spent twice."""

    def __init__(self, env, profile="default"):
        base = env.get("XDG_CONFIG_HOME")
        if not base or not os.path.isabs(base):
            base = os.path.join(_home(env), ".config")
        self.dir = os.path.join(base, "ctadata")
        name = "tokens.json" if profile == "default" else "tokens-%s.json" % profile
        self.path = os.path.join(self.dir, name)

    def __repr__(self):
        return "<ctadata token store %s>" % self.path

    def load(self):
        """The stored record (a dict), or None when not logged in."""
        import json
        text = _read_private(self.path, "login store")
        if text is None:
            return None
        try:
            rec = json.loads(text)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("access_token"), str):
            raise ConfigError("the login store %s is damaged" % self.path,
                              hint="run `ctadata login` again")
        return rec

    def save(self, rec):
        import json
        self._make_dir()
        _write_private(self.path, (json.dumps(rec, indent=1, sort_keys=True) + "\n")
                       .encode("utf-8"))

    def _make_dir(self):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.stat(self.dir)
        if os.name == "posix" and st.st_mode & 0o077 and st.st_uid == _uid():
            os.chmod(self.dir, 0o700)

    def remove(self):
        """Delete the stored tokens; return True if there were any."""
        existed = os.path.exists(self.path)
        _unlink_quietly(self.path)
        _unlink_quietly(self.path + ".lock")
        return existed

    def locked(self):
        """A context manager holding an exclusive lock between processes."""
        return _FileLock(self.path + ".lock", self._make_dir)


class _FileLock:
    __slots__ = ("path", "prepare", "fd")

    def __init__(self, path, prepare):
        self.path, self.prepare, self.fd = path, prepare, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: threads are still serialised by _Auth
            return self
        self.prepare()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def _oidc_token(account, min_valid):
    """Ask oidc-agent for an access token valid for at least *min_valid*
    seconds.  Only the account name goes on oidc-token's command line; the
    token comes back on its stdout."""
    import subprocess
    argv = ["oidc-token", "--time=%d" % min_valid, account]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=_OIDC_TOKEN_TIMEOUT)
    except FileNotFoundError:
        raise AuthError("oidc-token (oidc-agent) is not installed",
                        hint="use `ctadata login` instead of --oidc-agent") from None
    except subprocess.TimeoutExpired:
        raise AuthError("oidc-token %s gave no answer in %d s"
                        % (account, _OIDC_TOKEN_TIMEOUT)) from None
    if r.returncode != 0:
        why = r.stderr.decode("utf-8", "replace").strip() or "exit status %d" % r.returncode
        raise AuthError("oidc-token %s failed: %s" % (account, _printable(why, 200)),
                        hint="is oidc-agent running and the account loaded (oidc-add)?")
    return r.stdout[:_SECRET_FILE_LIMIT].decode("utf-8", "replace")


def _token_from_value(value, label, none="not set"):
    if not value:
        return none
    return _Token(value, label) if value.strip() else "empty"


def _token_file_source(path, label):
    """(label, loader) of a token file that may not exist."""
    def load():
        text = _read_private(path)
        if text is None:
            return "no such file"
        return _Token(text, label) if text.strip() else "empty"
    return label, load


def _wlcg_token_files(env):
    """The token files of the WLCG discovery order (WLCG Bearer Token
    Discovery): $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u$UID, /tmp/bt_u$UID."""
    uid = _uid()
    out = []
    btf = env.get("BEARER_TOKEN_FILE")
    if btf:
        out.append(_token_file_source(btf, "$BEARER_TOKEN_FILE (%s)" % btf))
    else:
        out.append(("$BEARER_TOKEN_FILE", lambda: "not set"))
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        path = os.path.join(xdg, "bt_u%d" % uid)
        out.append(_token_file_source(path, path))
    else:
        out.append(("$XDG_RUNTIME_DIR/bt_u%d" % uid, lambda: "$XDG_RUNTIME_DIR not set"))
    tmp = os.path.join(_SYSTEM_TMP, "bt_u%d" % uid)
    out.append(_token_file_source(tmp, tmp))
    return out


class _Auth:
    """The credentials of one Client: finds the bearer token once, lazily,
    hands out the Authorization value per request, refreshes it.

    Discovery order (README "Credentials"): token=, token_file=,
    $CTADATA_TOKEN, the WLCG order ($BEARER_TOKEN, $BEARER_TOKEN_FILE,
    $XDG_RUNTIME_DIR/bt_u$UID, /tmp/bt_u$UID), the `ctadata login` store,
    oidc-agent (oidc_agent= / $CTADATA_OIDC_AGENT), the old client's
    ~/.config/cta-data/token.  A token from the store or oidc-agent is
    refreshed shortly before it expires, by one thread while the others
    wait; an expired one that cannot be refreshed fails before anything is
    sent.  *mode* "x509" skips tokens (client certificate only), "token"
    requires one.  For the download service (*service*), a JupyterHub API
    token instead: token=, token_file=, $JUPYTERHUB_API_TOKEN (a storage
    token means nothing to the hub, and must not be sent there).  Neither
    the token nor any other secret appears in repr(), str() or any message."""

    # What time it is, for token lifetimes (tests move it instead of sleeping).
    clock = staticmethod(time.time)

    def __init__(self, token=None, token_file=None, env=None, oidc_agent=None,
                 mode=None, cert=None, profile="default", oidc=None, service=False,
                 clock=None):
        if clock is not None:
            self.clock = clock
        self._explicit = token
        self._token_file = token_file
        self.service = service
        self._env = os.environ if env is None else env
        self._oidc_agent = oidc_agent or self._env.get("CTADATA_OIDC_AGENT") or None
        self.mode = mode or "auto"
        if self.mode not in _AUTH_MODES:
            raise ConfigError("auth must be one of %s, not %r" % (", ".join(_AUTH_MODES), mode))
        if self.mode == "token" and cert:
            raise ConfigError("a client certificate makes no sense with auth 'token'")
        self._cert = cert
        self.profile = profile
        self.store = _TokenStore(self._env, profile)
        self.oidc = oidc
        self.secrets = _Secrets()
        self.secrets.add(token)
        self._lock = _thread.allocate_lock()          # discovery
        self._refresh_lock = _thread.allocate_lock()  # one refresher at a time
        self._loaded = False
        self._cred = None
        self._failed = None    # the _Token whose refresh failed last
        self._failure = None   # why (redacted)
        self._retry_at = 0.0
        self._forced = None    # the _Token a 401 made us fetch (no second try)
        self.refreshes = 0
        self.looked = []       # [(source, what was found there)]

    def __repr__(self):
        return "<ctadata auth %s source=%r>" % (
            self.mode, self._cred.source if self._cred else None)

    @property
    def source(self):
        return self._cred.source if self._cred else None

    # -- discovery ---------------------------------------------------------

    def _sources(self):
        """[(label, loader)] in discovery order.  A loader returns a _Token or
        a short note on why there is none; an empty value means "next"."""
        env = self._env
        out = [("token argument", lambda: _token_from_value(
                    self._explicit, "token argument", "not given")),
               ("--token-file", self._from_token_file)]
        if self.service:
            return out + [("$JUPYTERHUB_API_TOKEN", lambda: _token_from_value(
                env.get("JUPYTERHUB_API_TOKEN"), "$JUPYTERHUB_API_TOKEN"))]
        out += [(label, lambda label=label: _token_from_value(env.get(label[1:]), label))
                for label in ("$CTADATA_TOKEN", "$BEARER_TOKEN")]
        out += _wlcg_token_files(env)
        out.append(("login store %s" % self.store.path, self._from_store))
        out.append(("oidc-agent", self._from_oidc_agent))
        old = os.path.join(_home(env), ".config", "cta-data",
                           "token-dev" if self.profile == "dev" else "token")
        out.append(_token_file_source(old, "old client's token %s" % old))
        return out

    def _from_token_file(self):
        if not self._token_file:
            return "not given"
        path = os.path.expanduser(self._token_file)
        text = _read_private(path)
        if text is None:
            raise ConfigError("cannot read token file %s: no such file" % path)
        return _Token(text, "--token-file %s" % path)

    def _from_store(self):
        rec = self.store.load()
        if rec is None:
            return "not logged in (ctadata login)"
        self.secrets.add(rec.get("refresh_token"), rec.get("client_secret"))
        label = "login store %s" % self.store.path
        refresh = None
        if rec.get("refresh_token") and self.oidc is not None:
            refresh = self._store_refresher(label)
        return _Token(rec["access_token"], label, refresh, rec.get("expires_at"))

    def _store_refresher(self, label):
        store, oidc, secrets, clock = self.store, self.oidc, self.secrets, self.clock

        def refresh(used, forced):
            with store.locked():
                rec = store.load() or {}
                current = rec.get("access_token")
                if current and current != used.value:
                    # Another process refreshed meanwhile: take its token.
                    tok = _Token(current, label, refresh, rec.get("expires_at"))
                    if tok.exp is None or tok.exp > clock():
                        return tok
                if not rec.get("refresh_token"):
                    raise AuthError("the login store has no refresh token")
                new = oidc.refresh(rec)
                secrets.add(new.get("access_token"), new.get("refresh_token"))
                try:
                    store.save(new)
                except OSError as e:  # the new tokens still serve this process
                    _log(30, "could not save the refreshed tokens in %s: %s", store.path,
                         e.strerror or e)
            return _Token(new["access_token"], label, refresh, new.get("expires_at"))
        return refresh

    def _from_oidc_agent(self):
        account = self._oidc_agent
        if not account:
            return "not configured (--oidc-agent / $CTADATA_OIDC_AGENT)"
        label = "oidc-agent account %s" % account

        def refresh(used, forced):
            margin = used.margin if used is not None else _REFRESH_MARGIN
            value = _oidc_token(account, int(2 * margin) + 1)
            self.secrets.add(value.strip())
            return _Token(value, label, refresh)
        return refresh(None, False)

    def load(self):
        """Run discovery (once); return the _Token found, or None."""
        with self._lock:
            if not self._loaded:
                self._cred, self.looked = self._discover()
                self._loaded = True
            return self._cred

    def _discover(self):
        """(the first _Token of the discovery order or None, [(source, what
        was found there)])."""
        looked, cred = [], None
        if self.mode != "x509":
            for label, loader in self._sources():
                found = loader()
                if isinstance(found, _Token):
                    looked.append((label, "found"))
                    cred = found
                    break
                looked.append((label, found))
        if cred is not None:
            self.secrets.add(cred.value)
        return cred, looked

    def _look_again(self, old):
        """Run discovery again, since *old* (the token in use, or None) will
        not do: none was found, it expired, or the server refused it.  A
        notebook may have set $BEARER_TOKEN since, an agent rewritten the
        token file.  Return the token found when it is another one (it is
        then used from now on), else None.  Only these three events cause a
        look (never a request as such: a token file is not read again for
        every file of a transfer)."""
        with self._lock:
            if self._cred is not old:          # another thread has looked already
                return self._cred
            cred, looked = self._discover()
            if cred is None or (old is not None and cred.value == old.value):
                if old is None:
                    self.looked = looked
                return None
            self._cred, self.looked, self._loaded = cred, looked, True
        _log(20, "using the token from %s (%s)", cred.source,
             "found on a second look" if old is None else "it changed")
        return cred

    def client_cert(self):
        """Path of the client certificate (+ key) to present, or None:
        cert=, else (auth "x509", or "auto" without a token)
        $X509_USER_PROXY or /tmp/x509up_u$UID.  The file must be private."""
        path = self._cert
        if not path and self.mode != "token" and (self.mode == "x509" or self.load() is None):
            for path in (self._env.get("X509_USER_PROXY"),
                         os.path.join(_SYSTEM_TMP, "x509up_u%d" % _uid())):
                if path and os.path.exists(path):
                    break
            else:
                path = None
        if not path:
            if self.mode == "x509":
                raise ConfigError("no client certificate: give --cert or set $X509_USER_PROXY"
                                  " (looked also for %s)"
                                  % os.path.join(_SYSTEM_TMP, "x509up_u%d" % _uid()))
            return None
        path = os.path.expanduser(path)
        try:
            problem = _private_problem(os.stat(path), path)
        except OSError as e:
            raise ConfigError("cannot read client certificate %s: %s" % (path, e.strerror))
        if problem:
            raise ConfigError("refusing client certificate: %s (its key must be private)"
                              % problem, hint="chmod 600 %s" % path)
        return path

    # -- per request -------------------------------------------------------

    def header(self, need=False):
        """The Authorization value for the next request, or None.  Refreshes
        a refreshable token that expires within its margin; raises AuthError
        for an expired one (or none at all with auth "token", or *need*)
        before anything is sent."""
        cred = self._cred if self._loaded else self.load()
        if cred is None and (need or self.mode == "token"):
            cred = self._look_again(None)
            if cred is None:
                raise AuthError("no token found", hint=self.looked_in())
        if cred is None:
            return None   # (auto: a 401 makes on_unauthorized look again)
        return "Bearer " + self._usable(cred).value

    def _usable(self, cred):
        """*cred*, or its refreshed successor, or the token a second look
        finds when it has expired; AuthError when there is none."""
        if cred.exp is None:
            return cred
        now = self.clock()
        left = cred.exp - now
        if cred.refresh is not None and left < cred.margin and (
                self._failed is not cred or now >= self._retry_at):
            cred = self._refresh(cred, False)
            left = cred.exp - self.clock() if cred.exp is not None else 1
        if left > 0:
            return cred
        new = self._look_again(cred)
        if new is not None:
            return self._usable(new)
        raise self._expired(cred)

    def _refresh(self, used, forced):
        """Replace *used* by a fresh token and return it; only one thread at
        a time, and a thread that waited here reuses what the first one got.
        After a failure, nobody asks again for _REFRESH_RETRY seconds."""
        with self._refresh_lock:
            current = self._cred
            if current is not used:
                return current
            if self._failed is not used or self.clock() >= self._retry_at:
                try:
                    new = used.refresh(used, forced)
                except CtadataError as e:
                    new = None
                    self._failure = self.secrets.redact(str(e))
                    _log(30, "could not refresh the token from %s: %s", used.source,
                         self._failure)
                if new is not None:
                    self.secrets.add(new.value)
                    if new.value != used.value:
                        return self._replace(new, forced)
                    self._failure = "%s had no newer token" % used.source
                self._failed, self._retry_at = used, self.clock() + _REFRESH_RETRY
            return used

    def _replace(self, new, forced):
        self.refreshes += 1
        _log(20, "refreshed the token from %s (valid until %s)", new.source,
             _when(new.exp) if new.exp else "unknown")
        self._cred = new
        if forced:
            self._forced = new
        return new

    def on_unauthorized(self, used):
        """The server answered 401 to a request sent with Authorization
        *used* (None: without).  Return True when repeating it is worth it:
        the token was replaced meanwhile, a forced refresh got a new one (at
        most once in a row, so a server that refuses every token costs one
        refresh), or a second look found a token where there was none or
        another one than that refused (set or rewritten since)."""
        if self.mode == "x509":
            return False
        cred = self._cred
        if cred is not None and used and "Bearer " + cred.value != used:
            return True
        if cred is not None and used and cred.refresh is not None and \
                self._forced is not cred and self._refresh(cred, True) is not cred:
            return True
        return self._look_again(cred) is not None

    def _expired(self, cred):
        msg = "token expired at %s (source: %s)" % (_when(cred.exp), cred.source)
        if self._failed is cred and self._failure:
            msg += "; refreshing it failed: " + self._failure
        if cred.refresh is not None or cred.source.startswith("login store"):
            hint = "run `ctadata login` again"
        else:
            hint = "get a new token, or use `ctadata login` (refreshed automatically)"
        return AuthError(msg, hint=hint)

    # -- explanations --------------------------------------------------------

    def redact(self, text):
        return self.secrets.redact(text)

    def hint(self):
        """Say where a token came from or was looked for (never the token)."""
        if self.mode == "x509":
            return "the client certificate was refused (or this server wants a token)"
        if not self._loaded:
            self.load()
        cred = self._cred
        if cred:
            if self._failed is cred and self._failure:
                extra = "; refreshing it failed: " + self._failure
            elif self._forced is cred:
                extra = " even after refreshing it"
            else:
                extra = " (expired or not valid here?)"
            return "the token from %s was refused%s" % (cred.source, extra)
        return "no token found; " + self.looked_in()

    def looked_in(self):
        """Where discovery looked, for a message that says none was found."""
        return "looked in: " + ", ".join(label for label, _ in self.looked)

    def explain(self):
        """Lines saying where discovery looked and what it found, for
        `ctadata token --explain`.  Never the token itself."""
        lines = []
        error = None
        try:
            cred = self.load() or self._look_again(None)
        except CtadataError as e:
            cred, error = None, e
        if self.mode == "x509":
            lines.append("tokens: not used (--auth x509)")
        else:
            lines.append("token discovery, first match wins:")
            notes = dict(self.looked)
            for label, _ in self._sources():
                lines.append("  %-46s %s" % (label, notes.get(label, "not consulted")))
            if error is not None:
                lines.append("  stopped by an error: %s" % error)
        if cred is not None:
            lines.append("using the token from %s:" % cred.source)
            lines.extend("  " + line for line in _describe_token(cred, self.clock()))
        elif self.mode != "x509" and error is None:
            lines.append("no token found")
        try:
            cert = self.client_cert()
        except CtadataError as e:
            cert = "error: %s" % e
        lines.append("client certificate: %s" % (cert or "none"))
        return lines


def _describe_token(cred, now):
    claims = cred.claims
    if claims is None:
        kind = "not a JWT (a macaroon or opaque token): sent as it is"
    else:
        kind = "JWT" + "".join(", %s %s" % (k, _printable(claims[k], 80))
                               for k in ("iss", "sub", "scope") if claims.get(k))
    out = ["type: " + kind]
    if cred.exp is None:
        out.append("expires: unknown")
    else:
        left = cred.exp - now
        out.append("%s %s (%s)" % ("expires" if left > 0 else "EXPIRED at", _when(cred.exp),
                                    "in " + _span(left) if left > 0 else _span(-left) + " ago"))
    out.append("refreshed automatically: %s" % (
        "yes, %d s before it expires" % cred.margin if cred.refresh else "no"))
    return out


def _when(ts):
    """Epoch seconds -> local time for messages ("2025-01-31 14:05:09 CET")."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)).strip()


############################################################################
# WebDAV protocol
############################################################################

# RFC 4918 as dCache, nginx, Apache and StoRM speak it: the streaming
# multistatus parser (pure: bytes in, Entry objects out) and _DAV, the
# requests of the direct mode (PROPFIND, MKCOL, DELETE, MOVE, HEAD).


class Entry:
    """One remote file or directory.

    name      last path segment (decoded)
    path      path relative to the storage URL (decoded), "/"-separated
    url       absolute URL (percent-encoded)
    is_dir    True for collections
    size      bytes, or None (directories, unknown)
    mtime     seconds since the epoch, or None when absent or unparsable
              (``modified``: the same as a timezone-aware datetime, UTC)
    etag      entity tag as sent by the server, or None
    checksums dict algorithm -> lowercase hex digest (e.g. {"adler32": "..."})
    locality  dCache FileLocality (ONLINE, NEARLINE, ...) or None
    """

    __slots__ = ("name", "path", "url", "is_dir", "size", "mtime", "etag",
                 "checksums", "locality")

    def __init__(self, name, path, url, is_dir, size=None, mtime=None, etag=None,
                 checksums=None, locality=None):
        self.name, self.path, self.url, self.is_dir = name, path, url, is_dir
        self.size, self.mtime, self.etag = size, mtime, etag
        self.checksums = checksums or {}
        self.locality = locality

    def __repr__(self):
        if self.is_dir:
            return "<Entry %r directory>" % self.path
        when = " " + _iso(self.mtime).replace("T", " ").replace("Z", " UTC") \
            if self.mtime is not None else ""
        size = " " + _human_bytes(self.size) if self.size is not None else ""
        return "<Entry %r file%s%s>" % (self.path, size, when)

    def __eq__(self, other):
        return isinstance(other, Entry) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @property
    def modified(self):
        """The modification time as a timezone-aware datetime (UTC), or None."""
        if self.mtime is None:
            return None
        import datetime
        return datetime.datetime.fromtimestamp(self.mtime, datetime.timezone.utc)

    def _repr_html_(self):
        """A notebook shows an Entry as a one-row table."""
        return _html_table(_ENTRY_HEADER, [_entry_row(self)], right=(2,))

    def to_dict(self):
        """A JSON-ready dict (mtime as ISO 8601 UTC)."""
        d = {k: getattr(self, k) for k in self.__slots__}
        d["type"] = "directory" if self.is_dir else "file"
        d["mtime"] = _iso(self.mtime)
        return d


def _entry_key(e):
    return e.name


_ENTRY_HEADER = ("path", "type", "size", "modified (UTC)", "checksums", "locality")


def _entry_row(e):
    """An Entry as the cells of a table row (notebooks)."""
    return (e.path + ("/" if e.is_dir else ""), "directory" if e.is_dir else "file",
            "" if e.is_dir or e.size is None else _human_bytes(e.size),
            _iso(e.mtime).replace("T", " ").rstrip("Z") if e.mtime is not None else "",
            " ".join("%s:%s" % kv for kv in sorted(e.checksums.items())), e.locality)


class _Listing(list):
    """What ``Client.ls`` returns: a plain list of Entry objects (equal to
    any list with the same entries) that a notebook shows as a table (the
    first _HTML_ROWS rows)."""

    __slots__ = ()

    def _repr_html_(self):
        rows = [_entry_row(e) if isinstance(e, Entry) else (str(e),) + ("",) * 5
                for e in self[:_HTML_ROWS]]
        files = [e for e in self if isinstance(e, Entry) and not e.is_dir]
        caption = "%d %s: %d %s, %s" % (
            len(self), "entry" if len(self) == 1 else "entries", len(files),
            "file" if len(files) == 1 else "files",
            _human_bytes(sum(e.size or 0 for e in files)))
        return _html_table(_ENTRY_HEADER, rows, len(self) - len(rows), caption, right=(2,))


def _iso(ts):
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _parse_http_date(text):
    """RFC 1123 date (also "UTC" instead of "GMT") -> epoch seconds, or None."""
    if not text:
        return None
    parts = text.split()
    if len(parts) == 6 and parts[5] in ("GMT", "UTC") and parts[2] in _MONTHS:
        # the fixed RFC 1123 format every WebDAV server sends: no email parser
        try:
            import calendar
            h, m, sec = parts[4].split(":")
            return float(calendar.timegm((int(parts[3]), _MONTHS[parts[2]], int(parts[1]),
                                          int(h), int(m), int(sec))))
        except ValueError:
            return None
    import email.utils
    try:
        dt = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    return dt.timestamp()


# Element names as expat reports them with namespace_separator "\x01": a
# character XML text can never contain, so names and text cannot be confused.
_NS = "\x01"
_PROP_KEYS = {
    "DAV:" + _NS + "getcontentlength": "size",
    "DAV:" + _NS + "getlastmodified": "mtime",
    "DAV:" + _NS + "getetag": "etag",
    "http://www.dcache.org/2013/webdav" + _NS + "Checksums": "checksums",
    "http://srm.lbl.gov/StorageResourceManager" + _NS + "FileLocality": "locality",
}
_E_HREF, _E_COLL, _E_STATUS, _E_PROPSTAT, _E_RESPONSE = (
    "DAV:" + _NS + n for n in ("href", "collection", "status", "propstat", "response"))
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def _parse_multistatus(chunks, request_url, base_url=None, on_self=None, warn=None,
                       raw_hrefs=False):
    """Parse a PROPFIND multistatus answer, streamed as byte *chunks*, into
    Entry objects, yielded as they complete (memory does not grow with the
    size of the listing).

    Each href is percent-decoded and resolved against *request_url*, except
    with *raw_hrefs* (a server that sends names as they are: _Quirks) and
    for an href that cannot be percent-encoded (_unencoded): that one is
    the path as it is, and the entry's URL is that path percent-encoded.  The
    collection itself is passed to *on_self* (when given) instead of being
    yielded; dropped is anything that is not a direct child of it, is on
    another origin, or has a name that is not safe (_is_safe_name: "..",
    "\\", an encoded "/", control characters).  *warn* is called with a message for every entry
    dropped.  Document type declarations are refused: a multistatus never
    needs one, and entity expansion is an attack surface.

    Speed: pyexpat calls C-level ``list.append`` for end tags and text (no
    Python frame per element); one loop then walks that flat event list.
    That is ~6x faster than Python handlers per element, and faster than
    ElementTree's pull parser."""
    import xml.parsers.expat
    warn = warn or (lambda msg: None)
    ctx = _HrefContext(request_url, base_url, on_self, warn, raw_hrefs)

    def refuse(*_args):
        raise ProtocolError("refusing XML with a document type declaration",
                            request_url)

    events = []
    parser = xml.parsers.expat.ParserCreate(namespace_separator=_NS)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.buffer_text = True
    parser.buffer_size = 1 << 16
    parser.CharacterDataHandler = events.append
    parser.EndElementHandler = events.append
    state = [None, {}, {}, None, ""]   # href, props, propstat props, status, text
    try:
        for chunk in chunks:
            parser.Parse(chunk, False)
            for entry in _walk_events(events, state, ctx):
                yield entry
            del events[:]
        parser.Parse(b"", True)
    except xml.parsers.expat.ExpatError as e:
        raise ProtocolError("malformed PROPFIND answer: %s" % e, request_url)
    for entry in _walk_events(events, state, ctx):
        yield entry


def _walk_events(events, state, ctx):
    """Turn the flat (text | end-tag name) event list into Entry objects;
    *state* carries a response that spans two chunks."""
    href, props, ps, status, text = state
    prop_keys = _PROP_KEYS
    out = []
    for ev in events:
        if _NS not in ev:
            text += ev          # text (expat merges it unless a tag intervenes)
            if len(text) > _XML_TEXT_LIMIT:
                raise ProtocolError("PROPFIND answer with a text of more than %d "
                                    "characters" % _XML_TEXT_LIMIT, ctx.request_url)
            continue
        key = prop_keys.get(ev)
        if key is not None:
            ps[key] = text.strip()
        elif ev == _E_HREF:
            if href is None:    # the response's own href comes first
                href = text.strip()
        elif ev == _E_COLL:
            ps["is_dir"] = True
        elif ev == _E_STATUS:
            status = text
        elif ev == _E_PROPSTAT:
            # dCache puts properties a file lacks into a 404 propstat.
            if status is None or " 200" in status:
                props.update(ps)
            ps = {}
            status = None
        elif ev == _E_RESPONSE:
            entry = ctx.entry(href, props)
            if entry is not None:
                out.append(entry)
            href, props, ps, status = None, {}, {}, None
        text = ""
    state[:] = [href, props, ps, status, text]
    return out


_HEX = frozenset("0123456789abcdefABCDEF")


def _unencoded(href):
    """True for an href that cannot be percent-encoded: one with a space,
    "#", "?", a non-ASCII character or a "%" without two hex digits (what
    XRootD sends for such names; RFC 4918 §8.3 wants them encoded)."""
    if " " in href or "#" in href or "?" in href or (href and max(href) > "~"):
        return True
    if "%" in href:
        for part in href.split("%")[1:]:
            if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
                return True
    return False


class _HrefContext:
    """What entries of one PROPFIND answer are checked against."""

    def __init__(self, request_url, base_url, on_self, warn, raw_hrefs=False):
        from urllib.parse import urlsplit, unquote, quote
        req = urlsplit(request_url)
        self.request_url, self.on_self, self.warn = request_url, on_self, warn
        self.raw_hrefs = raw_hrefs
        self.unquote, self.quote = unquote, quote
        self.origin = _origin(request_url)
        self.prefix = "%s://%s" % (req.scheme, req.netloc)
        raw = req.path[:-1] if req.path.endswith("/") else req.path
        self.nsegs = raw.count("/")
        self.dpath = unquote(raw)
        self.dprefix = self.dpath + "/"
        self.base_path = (urlsplit(base_url).path.rstrip("/") + "/") if base_url else "/"
        self.dates = {}

    def _path_of(self, href):
        """The raw (percent-encoded) path of an href on the request's origin,
        or None.  Path-absolute hrefs without dot segments (what dCache,
        nginx and Apache send) take a fast path; the rest is resolved with
        urljoin (StoRM sends full URLs)."""
        if href.startswith("/") and not href.startswith("//") and "/." not in href \
                and "?" not in href and "#" not in href and "\\" not in href:
            return href
        from urllib.parse import urljoin, urlsplit
        full = urljoin(self.request_url, href)
        try:
            same = _origin(full) == self.origin
        except (ProtocolError, ValueError):
            same = False
        if not same:
            self.warn("skipping entry on another host: %s" % _safe_url(full))
            return None
        return urlsplit(full).path

    def _raw_path_of(self, href):
        """The path of an href taken as it is (no dot segments resolved, no
        "?" or "#" split off) on the request's origin, or None."""
        if href.lower().startswith(("http://", "https://")):
            if not href.startswith(self.prefix + "/"):
                self.warn("skipping entry on another host: %s" % _safe_url(href))
                return None
            href = href[len(self.prefix):]
        if not href.startswith("/") or href.startswith("//"):
            self.warn("skipping entry with a relative href: %r" % href)
            return None
        return href

    def entry(self, href, props):
        """The Entry of one <response> (its href, its 200 properties), or
        None when it is dropped.  One function on purpose: it runs for every
        entry (20,000 in a big folder), where each helper call would show in
        the time of `ls`."""
        unquote = self.unquote
        if not href:
            return None
        as_is = self.raw_hrefs or _unencoded(href)
        path = self._raw_path_of(href) if as_is else self._path_of(href)
        if path is None:
            return None
        # Servers differ in percent-encoding (nginx upper-case hex, Apache
        # lower-case): compare decoded paths, but count raw segments, so that
        # an encoded "/" (%2F) cannot pose as a separator.
        raw = path[:-1] if path.endswith("/") else path
        nsegs = raw.count("/")
        if as_is:
            dpath = raw
            path = self.quote(path, safe="/")  # the URL to ask for it: encoded once
        else:
            try:
                dpath = unquote(raw, errors="strict")
            except UnicodeDecodeError:
                self.warn("skipping entry with undecodable name: %r" % raw)
                return None
        is_self = nsegs == self.nsegs and dpath == self.dpath
        if is_self:
            if self.on_self is None:
                return None
        elif nsegs != self.nsegs + 1 or not dpath.startswith(self.dprefix):
            self.warn("skipping entry outside %r: %r" % (self.dprefix, dpath))
            return None
        name = dpath[dpath.rfind("/") + 1:]
        # a decoded "/" (%2F) makes the name shorter than the rest of the path
        if not is_self and (len(name) != len(dpath) - len(self.dprefix)
                            or not _is_safe_name(name)):
            self.warn("skipping entry with an unsafe name: %r" % name)
            return None
        base = self.base_path
        rel = dpath[len(base):] if dpath.startswith(base) else dpath
        is_dir = "is_dir" in props
        size = props.get("size")
        if is_dir or not size:
            size = None
        else:
            try:
                size = int(size)
            except ValueError:
                size = None
        raw_mtime = props.get("mtime")
        mtime = None
        if raw_mtime:
            mtime = self.dates.get(raw_mtime)
            if mtime is None:
                mtime = _parse_http_date(raw_mtime)
                if mtime is None:
                    self.warn("unparsable modification time %r for %s" % (raw_mtime, rel))
                elif len(self.dates) < 4096:
                    self.dates[raw_mtime] = mtime
        sums = props.get("checksums")
        e = Entry(name, rel, self.prefix + path, is_dir, size, mtime,
                  props.get("etag") or None, _parse_digest(sums) if sums else None,
                  props.get("locality") or None)
        if is_self:
            self.on_self(e)
            return None
        return e


def _try_delete(tr, url):
    """DELETE *url*, once, ignoring any failure (cleaning up after a failed
    upload: the error being reported is the upload's)."""
    try:
        tr.release(tr.request("DELETE", url, ok=(200, 202, 204, 404), retry=False))
    except CtadataError:
        pass


class _DAV:
    """The WebDAV requests of one storage, over the one transport: PROPFIND
    (listing, stat), MKCOL, DELETE, MOVE and HEAD (checksum), RFC 4918.

    The direct-mode backend of a Client (_Service is the other one): remote
    paths are relative to *base_url*; a full http(s) URL or an Entry is
    taken as it is.  *warn* receives a message for every listing entry
    dropped."""

    kind = "url"          # what Client(...) calls the base URL
    service_url = None
    resumable = True      # GET honours Range
    adaptive = True       # more transfers in parallel over a WAN (_Concurrency)

    def __init__(self, tr, base_url, warn):
        self.tr, self.base_url, self.warn = tr, base_url, warn

    def url_for(self, path, collection=False):
        """Absolute, percent-encoded URL of a remote path, Entry, URL or
        listing entry (a dict with "href")."""
        if isinstance(path, dict):
            path = path.get("href") or ""
        if isinstance(path, Entry):
            url = path.url
        elif "://" in str(path):
            url = str(path)
            if not url.lower().startswith(("http://", "https://")):
                raise ConfigError("only http(s):// URLs are supported: %r" % _safe_url(url))
        else:
            from urllib.parse import quote
            url = self.base_url + "/" + quote(_normpath(str(path or "")), safe="/")
        if collection and not url.endswith("/"):
            url += "/"
        return url

    def webdav(self, what):
        """The _DAV that does *what* (mkdir, remove, ...): this one."""
        return self

    # -- PROPFIND --------------------------------------------------------------

    def propfind(self, url, depth, on_self=None, details=True):
        """Yield the Entry objects of a PROPFIND (see _parse_multistatus);
        *details* False asks for names and types only, "sizes" for names,
        types and sizes."""
        headers = {"Depth": str(depth), "Content-Type": 'application/xml; charset="utf-8"'}
        resp = self.tr.request("PROPFIND", url, headers,
                               _PROPFIND_SIZES_BODY if details == "sizes" else
                               _PROPFIND_BODY if details else _PROPFIND_NAMES_BODY,
                               ok=(200, 207), what="list")
        try:
            if resp.status != 207:
                raise ProtocolError("the server does not speak WebDAV (PROPFIND "
                                    "answered %d)" % resp.status, url)
            yield from _parse_multistatus(_iter_body(resp), resp.ctadata_url,
                                          self.base_url, on_self, self.warn,
                                          _Quirks(resp.getheader("Server")).raw_hrefs)
        finally:
            self.tr.release(resp)

    def children(self, target, on_self=None, details=True):
        """The entries of one directory (path, Entry or URL); its own entry
        goes to *on_self*."""
        return self.propfind(self.url_for(target), 1, on_self, details)

    def stat(self, target):
        """The Entry of a remote file or directory; NotFound if none."""
        found = []
        for _ in self.propfind(self.url_for(target), 0, found.append):
            pass
        if not found:
            url = self.url_for(target)
            where = self.tr.describe(url)
            raise NotFound("no such file or folder: %s" % (where or url), url, 404, path=where)
        return found[0]

    def list_dir(self, target, recursive, ls):
        """The old client's listing in this mode: paths relative to the
        base URL, directories ending with "/" (*ls* is Client.ls)."""
        return [e.path + "/" if e.is_dir else e.path
                for e in ls(target, recursive, details=False)]

    # -- changes -----------------------------------------------------------------

    def mkcol(self, url, exist_ok):
        """MKCOL *url*; with *exist_ok* a folder that is there is fine.  405
        says the name exists (a collection, or a file: then the next MKCOL
        below it or the PUT fails with 409, which is reported).  Any other
        refusal but 401 is followed by a look (PROPFIND Depth 0): Apache
        answers 403 to the loser of two MKCOLs of one folder at the same
        moment (mod_dav_fs: its mkdir() fails with EEXIST after its own
        check found nothing), so a folder that is there now is made.
        Without *exist_ok*, a server whose MKCOL makes parents and accepts
        an existing folder (_Quirks.lenient_mkcol) is asked first, so that
        it refuses what RFC 4918 §9.3.1 refuses (405, 409)."""
        if not exist_ok and self.tr.quirks().lenient_mkcol:
            self.mkcol_look(url)
        ok = (200, 201, 405) if exist_ok else (200, 201)
        try:
            self.tr.release(self.tr.request("MKCOL", url, ok=ok, what="mkdir"))
        except (RemoteError, AuthError) as e:
            if not exist_ok or e.status in (None, 401):
                raise
            try:
                if self.stat(url).is_dir:
                    return
            except CtadataError:
                pass
            raise e

    def mkcol_look(self, url):
        """Raise what a strict MKCOL of *url* would answer: 405 when the
        name exists, 409 when its parent folder does not."""
        from urllib.parse import urlsplit
        where = self.tr.describe(url)
        if self.exists(url):
            raise _error_for_status(405, url, what="mkdir", path=where)
        parent = url.rstrip("/").rpartition("/")[0] + "/"
        if urlsplit(parent).path != "/" and not self.exists(parent):
            raise _error_for_status(409, url, what="mkdir", path=where)

    def mkdir(self, path, parents=False):
        """MKCOL *path*; with *parents*, each missing folder on the way too
        (an existing one is then fine)."""
        norm = _normpath(str(path)) if "://" not in str(path) else str(path)
        if not parents or "://" in norm:
            self.mkcol(self.url_for(norm, True), exist_ok=parents)
            return
        segs = norm.strip("/").split("/")
        for i in range(1, len(segs) + 1):
            self.mkcol(self.url_for("/".join(segs[:i]), True), exist_ok=True)

    def delete(self, url, folder=False):
        """DELETE *url*; a *folder* goes with everything in it (RFC 4918
        §9.6.1).  A server whose DELETE removes only empty folders
        (_Quirks.rmdir_delete) gets what is in it deleted first."""
        if folder and self.tr.quirks().rmdir_delete:
            self.empty(url)
        self.tr.release(self.tr.request("DELETE", url, ok=(200, 202, 204), what="remove"))

    def empty(self, url):
        """Delete what is in the folder *url*, deepest first: its files (on
        the transport's jobs threads), then each folder in it, emptied."""
        children = list(self.children(url, details=False))
        files = [e.url for e in children if not e.is_dir]
        if files:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=min(self.tr.settings.jobs, len(files))) as ex:
                for _ in ex.map(self.delete, files):
                    pass
        for e in children:
            if e.is_dir:
                self.delete(self.url_for(e, collection=True), folder=True)

    def move(self, url, target, overwrite=False):
        """MOVE *url* to the URL *target*; without *overwrite* an existing
        target is refused (412).  A server that ignores "Overwrite: F"
        (_Quirks.moves_over) is asked first whether the target exists (a
        look, then the move: another client could still come in between);
        one that does not percent-decode the Destination (raw_destination)
        gets it unencoded."""
        quirks = self.tr.quirks()
        dest = target
        if quirks.raw_destination or quirks.cuts_at_query:
            from urllib.parse import urlsplit, unquote
            p = urlsplit(target)
            path = unquote(p.path)
            if quirks.cuts_at_query and "?" in path:
                raise _cut_name_error(self.tr.describe(target) or path)
            if quirks.raw_destination:
                dest = ("%s://%s%s" % (p.scheme, p.netloc, path)).encode("utf-8")
        if quirks.moves_over and not overwrite and self.exists(target):
            raise _error_for_status(412, url, what="move", path=self.tr.describe(url))
        headers = {"Destination": dest, "Overwrite": "T" if overwrite else "F"}
        self.tr.release(self.tr.request("MOVE", url, headers, ok=(201, 204), what="move"))

    def exists(self, url):
        """Is there a file or folder at *url*?"""
        try:
            self.stat(url)
        except NotFound:
            return False
        return True

    def checksum(self, target):
        """The server's checksums of a file: HEAD + Want-Digest (RFC 3230),
        else dCache's Checksums property; {} when it has none."""
        url = self.url_for(target)
        resp = self.tr.request("HEAD", url, {"Want-Digest": _WANT_DIGEST}, ok=(200,),
                               what="checksum")
        sums = _parse_digest(resp.getheader("Digest"))
        self.tr.release(resp)
        return sums or self.stat(url).checksums


############################################################################
# Tape (WLCG Tape REST API)
############################################################################

# Files on tape.  dCache's PROPFIND says where a file is (FileLocality:
# ONLINE, NEARLINE = on tape only, ONLINE_AND_NEARLINE, LOST, UNAVAILABLE);
# the WLCG Tape REST API v1 ("WLCG Tape REST API reference document v1",
# May 2022; served by dCache, StoRM and EOS-CTA) brings files from tape to
# disk and lets them go again: discovery at /.well-known/wlcg-tape-rest-api,
# POST /stage -> a request id, GET /stage/ID (files SUBMITTED -> STARTED ->
# COMPLETED | FAILED | CANCELLED, or just onDisk), POST /stage/ID/cancel,
# DELETE /stage/ID, POST /release/ID, POST /archiveinfo; errors are RFC 7807
# problems.  _TapeAPI speaks it; a StageRequest is what the user holds.
#
# Paths in the API are namespace paths, which may differ from WebDAV URL
# paths (dCache maps the first below frontend.root, the second below
# webdav.root: dCache issue 7506): tape_prefix is the namespace path of the
# storage URL (default: its URL path).  The API may be on another origin
# (dCache's frontend, port 3880): the token goes there only because the
# storage's own discovery document, or the user's profile, named it
# (_Transport.sibling).

_STAGE_FINAL = frozenset(("COMPLETED", "FAILED", "CANCELLED"))
# FileLocality of a file that is not on disk: a GET would block a door for a
# whole recall (or fail after minutes), so none is ever sent for one.
_NOT_ON_DISK = frozenset(("NEARLINE", "LOST", "UNAVAILABLE"))
# archiveinfo's words for a file that is on disk
_API_ON_DISK = frozenset(("DISK", "DISK_AND_TAPE"))


def _api_clean(path):
    """An API path as a server answers with it (spec p. 8: duplicate and
    trailing slashes removed)."""
    import re
    path = re.sub("/+", "/", str(path))
    return path.rstrip("/") if len(path) > 1 else path


def _json_answer(data, url, what):
    """A JSON answer (of the tape API, of FTS3), decoded; ProtocolError when
    it is not JSON or too large."""
    import json
    if len(data) >= _JSON_ANSWER_LIMIT:
        raise ProtocolError("%s: the answer is larger than %d MiB" % (
            what, _JSON_ANSWER_LIMIT >> 20), url)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("%s: the answer is not JSON" % what, url)


def _json_call(tr, method, url, doc=None, what="tape API", ok=(200, 201, 202, 204),
               retry=True):
    """One request to a JSON API (the tape REST API, FTS3) over *tr*, with
    the JSON document *doc* as its body when given; its decoded JSON answer
    (None if empty)."""
    import json
    headers = {"Accept": "application/json"}
    body = None
    if doc is not None:
        body = json.dumps(doc).encode("utf-8")
        headers["Content-Type"] = "application/json"
    resp = tr.request(method, url, headers, body, ok=ok, what=what, retry=retry)
    data = _read_body(tr, resp, url, what, _JSON_ANSWER_LIMIT)
    return _json_answer(data, url, what) if data.strip() else None


def _check_api_url(url, what):
    from urllib.parse import urlsplit
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname or p.username or p.password:
        raise ConfigError("%s must be an http(s) URL without credentials: %r"
                          % (what, _safe_url(url)))


def _url_id(value, what, refuse=""):
    """A request or job id (a user typed it, a server sent it), fit for a
    URL path; ConfigError when it is empty, unprintable or holds a
    character of *refuse*."""
    from urllib.parse import quote
    value = str(value or "").strip()
    if not value or not value.isprintable() or any(c in value for c in refuse):
        raise ConfigError("not %s: %r" % (what, value))
    return quote(value, safe="")


def _split_ids(text, what):
    """The ids of "ID1,ID2,..." (the id of a StageRequest or an FTSJob
    made of several); ConfigError when there is none."""
    ids = [i.strip() for i in str(text or "").split(",") if i.strip()]
    if not ids:
        raise ConfigError("no %s given" % what)
    return ids


def _say_submitted(error, ids):
    """Add to *error*'s hint the ids of the requests (or jobs) submitted
    before it, so that they can be followed or cancelled."""
    if ids:
        error.hint = "%s; already submitted: %s" % (error.hint or "", ",".join(ids))


def _lifetime(value):
    """The ISO 8601 diskLifetime of a duration ("1h", "2d", "PT12H", seconds),
    or None for the server's default; ConfigError for anything else."""
    if value is None or value == "":
        return None
    seconds = value if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else _duration(value)
    if not seconds or seconds <= 0:
        raise ConfigError("the disk lifetime must be a positive duration like 1h, 30m, 2d "
                          "or PT1H, not %r" % (value,))
    return _iso_seconds(seconds)


class _Pace:
    """Seconds to wait before the next poll of a stage request: *first*,
    doubling after each poll that found nothing new, up to *longest*.  A poll
    that found news keeps the pace: files keep coming at about that rate."""

    __slots__ = ("delay", "longest")

    def __init__(self, first, longest):
        self.delay, self.longest = first, longest

    def next(self, news):
        delay = self.delay
        if not news:
            self.delay = min(self.longest, self.delay * 2)
        return delay


def _poll_until_done(job, pace, sleep, timeout=None, progress=None):
    """Refresh *job* (a StageRequest, an FTSJob) until it is ``done``,
    waiting between two polls what the _Pace *pace* says: it backs off
    while ``job._poll_state()`` stays the same.  *progress(job)* is called
    after each poll, *sleep(seconds)* waits.  Return True when done, False
    when *timeout* seconds ran out first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = None
    while True:
        job.refresh()
        if progress is not None:
            progress(job)
        if job.done:
            return True
        now = job._poll_state()
        delay = pace.next(now != seen)
        seen = now
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            delay = min(delay, left)
        sleep(delay)


class StagedFile:
    """One file of a stage request, as the tape REST API last reported it.

    path      remote path (relative to the storage URL); the API's path when
              the file is not below the storage URL
    api_path  the path the tape API knows (a namespace path)
    request   the id of the server's stage request that holds it
    state     SUBMITTED (waiting for a drive), STARTED, COMPLETED, FAILED or
              CANCELLED.  A server that reports only ``onDisk`` (the spec
              allows it) gives COMPLETED, FAILED, or SUBMITTED while waiting
    on_disk   True when the file is on disk now
    error     the server's reason when it failed, else None
    """

    __slots__ = ("path", "api_path", "request", "state", "on_disk", "error")

    def __init__(self, path, api_path, request, state="SUBMITTED", on_disk=False, error=None):
        self.path, self.api_path, self.request = path, api_path, request
        self.state, self.on_disk, self.error = state, on_disk, error

    @property
    def done(self):
        """True when the file will not change any more (a final state)."""
        return self.state in _STAGE_FINAL

    @property
    def problem(self):
        """Why a finished file is not on disk, or None."""
        if not self.done or self.on_disk:
            return None
        if self.state == "COMPLETED":
            return "staged, but no longer on disk (released, or its disk lifetime ran out)"
        return self.error or ("cancelled" if self.state == "CANCELLED" else "staging failed")

    def __repr__(self):
        return "StagedFile(%r, %s%s)" % (self.path, self.state,
                                         ", on disk" if self.on_disk else "")

    def to_dict(self):
        return {"path": self.path, "api_path": self.api_path, "request": self.request,
                "state": self.state, "on_disk": self.on_disk, "error": self.error}


def _staged_files(doc, rid, tape, url):
    """The StagedFile objects of a GET /stage/ID answer (spec p. 11-15: the
    files come in no particular order; each has ``state`` or ``onDisk``, and
    ``error`` when something went wrong)."""
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list):
        raise ProtocolError("the status of stage request %s has no list of files"
                            % _printable(rid, 80), url)
    finished = doc.get("completedAt") is not None
    out = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ProtocolError("a file of stage request %s without a path: %s" % (
                _printable(rid, 80), _printable(item, 100)), url)
        error = _printable(item["error"]) if item.get("error") else None
        state, on_disk = item.get("state"), item.get("onDisk")
        if isinstance(state, str):
            state = state.strip().upper()
            if state == "CANCELED":       # clients should accept both spellings
                state = "CANCELLED"
            on_disk = on_disk if isinstance(on_disk, bool) else state == "COMPLETED"
        elif isinstance(on_disk, bool):
            state = "COMPLETED" if on_disk else "FAILED" if error or finished else "SUBMITTED"
            if state == "FAILED" and not error:
                error = "not on disk, and the request is finished"
        else:
            raise ProtocolError("a file of stage request %s with neither state nor onDisk"
                                % _printable(rid, 80), url)
        path = item["path"]
        remote = tape.remote_path(path)
        out.append(StagedFile(path if remote is None else remote, path, rid, state,
                              on_disk, error))
    return out


class _TapeAPI:
    """The WLCG Tape REST API v1 of one storage, over the one transport (or,
    when the storage names an endpoint on another origin, over a sibling of
    it that sends the token there and nowhere else).

    *base_url*: the storage URL; *endpoint*: the API's URL when the user set
    one (profile ``tape_api``), else it is discovered on first use;
    *prefix*: the namespace path of the storage URL (profile
    ``tape_prefix``; default: its URL path); *poll*: (first, longest)
    seconds between two polls of a stage request."""

    def __init__(self, tr, base_url, endpoint=None, prefix=None, poll=_STAGE_POLL):
        from urllib.parse import unquote, urlsplit
        self.tr, self.base_url, self.poll = tr, base_url, poll
        if endpoint:
            _check_api_url(endpoint, "tape_api")
        self._configured = endpoint.rstrip("/") if endpoint else None
        self.base_path = unquote(urlsplit(base_url).path).rstrip("/")
        if prefix and not prefix.startswith("/"):
            raise ConfigError("tape_prefix must be a path starting with '/', not %r" % prefix)
        self.prefix = _api_clean(prefix).rstrip("/") if prefix else self.base_path
        self._api = None
        self._lock = _thread.allocate_lock()

    def __repr__(self):
        return "<ctadata tape API of %s>" % _safe_url(self.base_url)

    def require(self):
        """Nothing: this storage may have a tape API (_NoTape refuses)."""

    # -- where the API is ------------------------------------------------------

    def endpoint(self):
        """(the API's URL, the transport to use for it), found once."""
        with self._lock:
            if self._api is None:
                uri = self._configured or self.discover()
                tr = self.tr
                if _origin(uri) != tr.auth_origin:
                    # dCache's frontend: trusted with the token because the
                    # storage (or the user) named it, and for this API only
                    tr = tr.sibling(uri)
                self._api = (uri, tr)
            return self._api

    def discover(self):
        """The v1 endpoint that the storage's discovery document names (spec
        p. 4-5: served on every WebDAV door, at the root of its origin)."""
        from urllib.parse import urljoin, urlsplit
        p = urlsplit(self.base_url)
        url = "%s://%s%s" % (p.scheme, p.netloc, _TAPE_WELL_KNOWN)
        what = "tape API discovery"
        try:
            resp = self.tr.request("GET", url, {"Accept": "application/json"}, ok=(200,),
                                   what=what)
        except NotFound:
            raise ConfigError("this storage announces no tape REST API (%s: 404)"
                              % _TAPE_WELL_KNOWN, url,
                              hint="if it has one, set tape_api = URL in your profile")
        doc = _json_answer(_read_body(self.tr, resp, url, what, _JSON_ANSWER_LIMIT), url, what)
        endpoints = doc.get("endpoints") if isinstance(doc, dict) else None
        uris = [e["uri"] for e in endpoints if isinstance(e, dict)
                and isinstance(e.get("uri"), str) and str(e.get("version")).lower() == "v1"] \
            if isinstance(endpoints, list) else []
        if not uris:
            raise ProtocolError("the tape API discovery document names no v1 endpoint", url)
        uri = urljoin(url, uris[0].strip()).rstrip("/")
        _check_api_url(uri, "the tape API endpoint")
        if p.scheme == "https" and uri.lower().startswith("http:"):
            raise ProtocolError("refusing a tape API over plain http named by an https "
                                "storage: %s" % _safe_url(uri), url)
        return uri

    # -- paths -------------------------------------------------------------------

    def api_path(self, url):
        """The API's path of a file of this storage, given its absolute URL."""
        from urllib.parse import unquote, urlsplit
        if _origin(url) != _origin(self.base_url):
            raise ConfigError("not on this storage, so not on its tape: %s" % _safe_url(url))
        path = unquote(urlsplit(url).path).rstrip("/")
        base = self.base_path
        if path == base or path.startswith(base + "/"):
            return self.prefix + path[len(base):]
        if self.prefix == base:
            return path
        raise ConfigError("%s is not below the storage URL: its tape path is unknown "
                          "(tape_prefix maps the storage URL only)" % _safe_url(url))

    def remote_path(self, api_path):
        """The remote path (relative to the storage URL) of an API path, or
        None when it is not below tape_prefix or not made of safe names."""
        path = _api_clean(api_path)
        prefix = self.prefix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return None
        parts = [s for s in path[len(prefix):].split("/") if s]
        if not all(_is_safe_name(s) for s in parts):
            return None
        return "/".join(parts)

    # -- requests ----------------------------------------------------------------

    def call(self, method, sub, doc=None, what="tape API"):
        """One request to the API; its decoded JSON answer (None if empty)."""
        uri, tr = self.endpoint()
        return _json_call(tr, method, uri + sub, doc, what)

    @staticmethod
    def _id(rid):
        return _url_id(rid, "a stage request id")

    def stage(self, api_paths, lifetime=None):
        """POST /stage for at most _STAGE_BATCH paths (*lifetime*: ISO 8601
        text or None); return the request id."""
        files = [{"path": p, "diskLifetime": lifetime} if lifetime else {"path": p}
                 for p in api_paths]
        answer = self.call("POST", "/stage", {"files": files}, "stage")
        rid = answer.get("requestId") if isinstance(answer, dict) else None
        if not isinstance(rid, str) or not rid.strip() or not rid.isprintable():
            raise ProtocolError("the answer to a stage request has no requestId",
                                self.endpoint()[0] + "/stage")
        return rid

    def status(self, rid):
        """GET /stage/ID: the StagedFile objects of the request, in no order."""
        sub = "/stage/" + self._id(rid)
        try:
            doc = self.call("GET", sub, what="stage request")
        except NotFound as e:
            e.hint = ("the server forgets a request some time after it finished; "
                      "stage the files again")
            raise
        return _staged_files(doc, rid, self, self.endpoint()[0] + sub)

    def cancel(self, rid, api_paths):
        for i in range(0, len(api_paths), _STAGE_BATCH):
            self.call("POST", "/stage/%s/cancel" % self._id(rid),
                      {"paths": api_paths[i:i + _STAGE_BATCH]}, "cancel")

    def release(self, rid, api_paths):
        for i in range(0, len(api_paths), _STAGE_BATCH):
            self.call("POST", "/release/" + self._id(rid),
                      {"paths": api_paths[i:i + _STAGE_BATCH]}, "release")

    def archive_info(self, api_paths):
        """POST /archiveinfo: {API path: (locality or None, error or None)}.
        A server may answer for only some of many paths (spec p. 23): the
        rest is asked again."""
        out = {}
        todo = list(dict.fromkeys(api_paths))
        while todo:
            batch = todo[:_STAGE_BATCH]
            answer = self.call("POST", "/archiveinfo", {"paths": batch}, "archive info")
            if not isinstance(answer, list):
                raise ProtocolError("the archiveinfo answer is not a list",
                                    self.endpoint()[0] + "/archiveinfo")
            wanted = {_api_clean(p): p for p in batch}
            for item in answer:
                path = wanted.get(_api_clean(item.get("path", ""))) \
                    if isinstance(item, dict) else None
                if path is None or path in out:
                    continue
                loc, err = item.get("locality"), item.get("error")
                out[path] = (loc.strip().upper() if isinstance(loc, str) and loc.strip()
                             else None, _printable(err) if err else None)
            if not any(p in out for p in batch):
                for p in batch:
                    out[p] = (None, "the server gave no answer for this file")
            todo = [p for p in todo if p not in out]
        return out


class StageRequest:
    """Files being brought from tape to disk: one stage request of the WLCG
    Tape REST API, or several when there were more files than one request
    takes (1,000 each).  ``Client.stage()`` makes one,
    ``Client.stage_request(id)`` finds one again (from any machine).

    id        the server's request id; several joined with "," (what
              stage_request() and ``ctadata get --stage-id`` take)
    ids       the server's request ids (a list)
    files     StagedFile objects, sorted by path, as of the last refresh()
              (right after stage(): as submitted)
    on_disk, waiting, failed   counts of files; ``failures`` the failed
              StagedFile objects (``problem`` says why each is not on disk)
    done      no file is waiting any more; ``ok``: every file is on disk
    """

    def __init__(self, tape, ids, files=None):
        self._tape = tape
        self.ids = list(ids)
        self.files = sorted(files or [], key=lambda f: (f.path, f.request))

    @property
    def id(self):
        return ",".join(self.ids)

    @property
    def on_disk(self):
        return sum(1 for f in self.files if f.on_disk)

    @property
    def waiting(self):
        return sum(1 for f in self.files if not f.done)

    @property
    def failures(self):
        return [f for f in self.files if f.problem]

    @property
    def failed(self):
        return len(self.failures)

    @property
    def done(self):
        return not self.waiting

    @property
    def ok(self):
        return all(f.on_disk for f in self.files)

    def refresh(self):
        """Ask the server how the files are doing; return this request.
        Raises NotFound when the server has forgotten it."""
        files = []
        for rid in self.ids:
            files.extend(self._tape.status(rid))
        self.files = sorted(files, key=lambda f: (f.path, f.request))
        return self

    def wait(self, timeout=None, progress=None):
        """Poll until no file is waiting, backing off between polls (the
        client's ``stage_poll``: from 1 s, doubling while nothing changes,
        up to 60 s); *progress(request)* is called after each poll.  Return
        True when done, False when *timeout* seconds ran out first.  Raises
        NotFound when the server has forgotten the request."""
        return _poll_until_done(self, _Pace(*self._tape.poll), time.sleep, timeout, progress)

    def _poll_state(self):
        """What two polls compare: files on disk, failed, started."""
        return self.on_disk, self.failed, sum(f.state == "STARTED" for f in self.files)

    def cancel(self):
        """Stop staging the files that are not done yet (files already on
        disk stay); return how many were cancelled."""
        if not self.files:
            self.refresh()
        n = 0
        for rid in self.ids:
            paths = [f.api_path for f in self.files if f.request == rid and not f.done]
            if paths:
                self._tape.cancel(rid, paths)
                n += len(paths)
        self.refresh()
        return n

    def release(self, paths=None):
        """Tell the storage it may drop the disk copies of these files (remote
        paths, default: all of them), now that they are no longer needed on
        disk; return how many were released.  ConfigError for a path that
        is not in this request."""
        if not self.files:
            self.refresh()
        chosen = self.files
        if paths is not None:
            by_path = {}
            for f in self.files:
                by_path.setdefault(f.path, []).append(f)
                by_path.setdefault(f.api_path, []).append(f)
            chosen = []
            for p in [paths] if isinstance(paths, str) else paths:
                key = p if p in by_path else _normpath(str(p)).strip("/")
                if key not in by_path:
                    raise ConfigError("not in stage request %s: %s" % (self.id, p))
                chosen.extend(by_path[key])
        n = 0
        for rid in self.ids:
            mine = list(dict.fromkeys(f.api_path for f in chosen if f.request == rid))
            if mine:
                self._tape.release(rid, mine)
                n += len(mine)
        return n

    def to_dict(self):
        return {"id": self.id, "ids": list(self.ids), "files": [f.to_dict() for f in self.files],
                "on_disk": self.on_disk, "waiting": self.waiting, "failed": self.failed,
                "done": self.done}

    def __repr__(self):
        return "StageRequest(%r, files=%d, on_disk=%d, waiting=%d, failed=%d)" % (
            self.id, len(self.files), self.on_disk, self.waiting, self.failed)

    def _repr_html_(self):
        from html import escape
        rows = "".join("<tr><td>%s</td><td>%s</td><td>%s</td></tr>" % (
            escape(f.path), escape(f.state), escape(f.problem or ("on disk" if f.on_disk
                                                                  else "")))
            for f in self.files[:50])
        more = "<p>... and %d more files</p>" % (len(self.files) - 50) \
            if len(self.files) > 50 else ""
        return ("<p>stage request <code>%s</code>: %d files, %d on disk, %d waiting, "
                "%d failed</p><table><tr><th>path</th><th>state</th><th></th></tr>%s"
                "</table>%s" % (escape(self.id), len(self.files), self.on_disk,
                                self.waiting, self.failed, rows, more))


class _NoTape:
    """The tape API of service mode: there is none."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ConfigError("tape staging needs direct mode: the download service offers "
                          "no tape API", hint="talk to the storage itself (--url, url=)")


############################################################################
# Download service & JupyterHub services
############################################################################

# The CTA download service (PROTOCOL.md §1) is a Flask proxy in front of the
# storage: GET {base}/list/{path} -> JSON, GET {base}/fetch/{path} -> bytes,
# POST {base}/upload/{path} -> JSON; a JupyterHub API token as Bearer.  Paths
# in URLs are relative to the storage root and never end with "/" (as the old
# client sent them).  The functions here are pure, except _Service and _Hub,
# which send requests through the one transport.


class CertificateError(RemoteError):
    """The certificate service refused a certificate, or could not be used
    (the old client's name; ``status`` is the HTTP status)."""


def _service_json(data, url):
    """Decode a JSON answer of the service; ProtocolError when it is not JSON."""
    import json
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("the download service sent something other than JSON "
                            "(is the URL right?)", url)


def _parse_service_listing(items, base, path="", on_self=None, warn=None):
    """Turn the service's JSON listing of *path* into a list of Entry objects.

    *items* is the decoded JSON list: one ``{"href", "type", "size",
    "mtime", "url"}`` per entry, hrefs relative to the storage root and
    percent-encoded as the upstream wrote them, the directory itself
    included.  *path* is the decoded, normalised path that was listed;
    *base* the service URL (no trailing slash).  The entry of *path* itself
    goes to *on_self* (when given) instead of the result.  Dropped, with a
    message to *warn*: anything that is not a direct child of *path*, and
    names that are not safe (_is_safe_name: "..", "/", "\\", control
    characters).  Each Entry's ``url`` is the service URL that serves it,
    ``{base}/fetch/{path}`` (directories end with "/")."""
    from urllib.parse import quote
    warn = warn or (lambda msg: None)
    if not isinstance(items, list):
        raise ProtocolError("the download service's listing is not a JSON list",
                            base + "/list/" + quote(path))
    want = [s for s in path.split("/") if s]
    out = []
    for item in items:
        segs = _listed_segments(item, want, warn)
        if segs is None:
            continue
        entry = _service_entry(item, segs, base, warn)
        if segs != want:
            out.append(entry)
        elif on_self is not None:
            on_self(entry)
    return out


def _listed_segments(item, want, warn):
    """The decoded path segments of one listing item, or None (with a
    warning) when it is neither the listed path *want* nor a safely named
    direct child of it."""
    from urllib.parse import unquote
    href = item.get("href") if isinstance(item, dict) else None
    if not isinstance(href, str):
        warn("skipping a listing entry without href: %r" % (item,))
        return None
    try:
        segs = [unquote(s, errors="strict") for s in href.strip("/").split("/") if s]
    except UnicodeDecodeError:
        warn("skipping entry with malformed percent-encoding: %r" % href)
        return None
    if segs == want:
        return segs
    if len(segs) != len(want) + 1 or segs[:-1] != want:
        warn("skipping entry outside %r: %r" % ("/".join(want) + "/", "/".join(segs)))
        return None
    if not _is_safe_name(segs[-1]):
        warn("skipping entry with an unsafe name: %r" % segs[-1])
        return None
    return segs


def _service_entry(item, segs, base, warn):
    """The Entry of one checked listing item."""
    from urllib.parse import quote
    is_dir = item.get("type") == "directory" or item["href"].endswith("/")
    size = item.get("size")
    try:
        size = int(size) if size not in (None, "") and not is_dir else None
    except (TypeError, ValueError):
        size = None
    dpath = "/".join(segs)
    raw_mtime = item.get("mtime")
    mtime = _parse_http_date(raw_mtime) if isinstance(raw_mtime, str) else None
    if raw_mtime and mtime is None:
        warn("unparsable modification time %r for %s" % (raw_mtime, dpath))
    url = "%s/fetch/%s%s" % (base, quote(dpath, safe="/"), "/" if is_dir and dpath else "")
    return Entry(segs[-1] if segs else "", dpath, url, is_dir, size, mtime)


def _parse_upload_answer(data, url):
    """The service's answer to an upload: ``{"status", "path",
    "total_written"}``, checked; ProtocolError when it is anything else."""
    answer = _service_json(data, url)
    if not isinstance(answer, dict) or not isinstance(answer.get("path"), str) or \
            not isinstance(answer.get("total_written"), int):
        raise ProtocolError("unexpected answer of the download service to an upload: %r"
                            % (answer,), url)
    # `put` prints this path: the names in it follow the rule of listings
    if not all(_is_safe_name(s) for s in answer["path"].split("/") if s):
        raise ProtocolError("the download service reported an unsafe path: %r"
                            % answer["path"], url)
    return answer


class _ListingEntry(dict):
    """One entry of the download service's listing, exactly as it sent it
    (``href``, ``type``, ``size``, ``mtime``, ``url``).  The old README loops
    over list_dir() as if it gave path strings (``'.0100' in url``,
    ``url.split("/")``, ``fetch_and_save_file(url)``), older code uses
    dicts (``url["href"]``): both work.  ``in`` tests the keys, then the
    href's text; str methods (split, endswith, ...) are those of the href."""

    __slots__ = ()

    def __contains__(self, key):
        return dict.__contains__(self, key) or (
            isinstance(key, str) and key in str(self.get("href") or ""))

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(str(self.get("href") or ""), name)


def _href_path(item):
    """Decoded path of a service listing entry (no leading/trailing "/")."""
    from urllib.parse import unquote
    href = item.get("href") if isinstance(item, dict) else None
    return unquote(href).strip("/") if isinstance(href, str) else None


class _Service:
    """The requests of the download service, over the one transport: the
    service-mode backend of a Client (_DAV is the other one).

    Remote paths are relative to the storage root and may be
    percent-encoded, as the service lists them; ``path_of`` decodes and
    normalises them (no leading or trailing "/")."""

    kind = "service"      # what Client(...) calls the base URL
    resumable = False     # /fetch ignores Range
    # one service process proxies the storage for every user: its default
    # number of requests at a time, not more
    adaptive = False

    def __init__(self, tr, base, warn):
        self.tr, self.warn = tr, warn
        self.base = self.service_url = base.rstrip("/")
        # messages name storage paths, not the service's endpoints
        tr.roots = tuple("%s/%s/" % (self.base, e) for e in ("list", "fetch", "upload", "webdav"))

    def url(self, endpoint, path):
        """``{base}/{endpoint}/{path}``, percent-encoded."""
        from urllib.parse import quote
        return "%s/%s%s" % (self.base, endpoint, "/" + quote(path, safe="/") if path else "")

    def path_of(self, target):
        """The decoded, normalised storage path of a path, Entry, listing
        entry or service URL.  A valid %XX is decoded, anything else taken
        literally, so "with%20space" and "with space" name the same file."""
        from urllib.parse import unquote
        if isinstance(target, Entry):
            return target.path
        if isinstance(target, dict):
            target = target.get("href") or ""
        text = str(target or "")
        if "://" in text:
            text = text.partition("?")[0]
            for endpoint in ("fetch", "list", "upload", "webdav"):
                prefix = "%s/%s" % (self.base, endpoint)
                if text == prefix or text.startswith(prefix + "/"):
                    text = text[len(prefix):]
                    break
            else:
                raise ConfigError("in service mode remote paths are relative to the "
                                  "storage root; not a URL of this service: %r"
                                  % _safe_url(text))
        return _normpath(unquote(text)).strip("/")

    def url_for(self, target, collection=False):
        """The service URL that serves *target* (``{base}/fetch/{path}``)."""
        url = target.url if isinstance(target, Entry) else self.url("fetch", self.path_of(target))
        return url + "/" if collection and not url.endswith("/") else url

    def webdav(self, what):
        raise ConfigError("%s is not offered by the download service: use "
                          "webdav_client() (writes only in your own folder) or "
                          "direct mode" % what)

    def list(self, path, on_self=None):
        """GET /list/{path}; return (the JSON list as sent, the child Entries)."""
        url = self.url("list", path)
        resp = self.tr.request("GET", url, {"Accept": "application/json"}, ok=(200,),
                               what="list")
        items = _service_json(_read_body(self.tr, resp, url, "list"), url)
        return items, _parse_service_listing(items, self.base, path, on_self, self.warn)

    def children(self, target, on_self=None, details=True):
        """The entries of one directory (the service always sends details)."""
        return iter(self.list(self.path_of(target), on_self)[1])

    def stat(self, target):
        """The Entry of *target*, from the listing of *target* itself (the
        service has no stat: a file lists as itself, a directory with itself)."""
        path = self.path_of(target)
        found = []
        _items, children = self.list(path, found.append)
        if found:
            return found[0]
        if children:  # a listing without its own entry: still a directory
            return Entry(path.rpartition("/")[2], path, self.url("fetch", path) + "/", True)
        raise NotFound("no such file or folder: %s" % (path or "/"), self.url("list", path), 404,
                       path=path or "/")

    def list_dir(self, target, recursive, ls=None):
        """The service's listing as it sent it (_ListingEntry dicts, the
        directory itself included), with *recursive* that of every folder
        below too."""
        return self._list_dir(self.path_of(target), recursive)

    def _list_dir(self, path, recursive):
        items, children = self.list(path)
        out = [_ListingEntry(i) if isinstance(i, dict) else i for i in items]
        if recursive:
            for e in children:
                if e.is_dir:
                    out.extend(i for i in self._list_dir(e.path, True)
                               if _href_path(i) != e.path)
        return out


def _post_certificate(tr, url, payload):
    """POST a certificate (JSON) to the certificate service; return its JSON
    answer.  Every refusal is a CertificateError with the service's message."""
    import json
    body = json.dumps(payload).encode("utf-8")
    try:
        resp = tr.request("POST", url, {"Content-Type": "application/json",
                                        "Accept": "application/json"}, body,
                          ok=(200, 201), what="certificate upload")
    except (AuthError, RemoteError) as e:
        raise CertificateError(e.message, e.url, e.status, e.hint)
    answer = _service_json(_read_body(tr, resp, url, "certificate upload"), url)
    return answer if isinstance(answer, dict) else {"message": answer}


class _Hub:
    """The JupyterHub services beside the download service: the certificate
    service (POST a PEM for a storage area) and the download service's WebDAV
    pass-through (``{service}/webdav/``).  Both want the hub token: *auth*
    (the Client's own in service mode, else one found the service way:
    token=, token_file=, $JUPYTERHUB_API_TOKEN, never a storage token).
    The certificate service's transport is made on first use."""

    def __init__(self, auth, settings, env, cert_url, service_url, cancel):
        self.auth, self.settings, self.env = auth, settings, env
        self.cert_url = cert_url or env.get("CTACS_URL") or CERTIFICATE_SERVICE_URL
        self.service_url = service_url.rstrip("/")
        self.cancel = cancel
        self._tr = None
        self._lock = _thread.allocate_lock()

    def transport(self):
        with self._lock:
            if self._tr is None:
                s = self.settings
                cs = Settings(self.cert_url, s.timeout, s.retries, s.jobs, s.ca_file,
                              s.ca_dir, s.insecure, s.cert, backoff=s.backoff, env=self.env)
                self._tr = _Transport(cs, self.auth, self.cancel)
            return self._tr

    def close(self):
        if self._tr is not None:
            self._tr.close()

    def post_certificate(self, endpoint, path, fields):
        """Read the PEM file *path* and POST it with *fields* to
        ``{certificate service}/{endpoint}``; return the service's answer."""
        try:
            with open(os.fspath(path), "r", encoding="utf-8") as f:
                pem = f.read(1 << 20)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("cannot read certificate file %s: %s"
                              % (path, getattr(e, "strerror", None) or e))
        tr = self.transport()
        return _post_certificate(tr, tr.settings.url + "/" + endpoint,
                                 dict(fields, certificate=pem))

    def webdav_url(self):
        return self.service_url + "/webdav"


############################################################################
# Transfer engine (plans, workers, progress)
############################################################################

# Moving files: one download (_Download, in steps) or upload (_upload_file)
# with verification, the worker pool that runs many, and the planners that
# turn a call (a tree, a list of URLs, a folder to upload) into tasks.


class TransferResult:
    """What happened to one file.

    source, dest   remote URL / local path (or the reverse for uploads)
    size           bytes of the file
    status         "transferred", "skipped", "failed", or "planned" (dry run)
    error          message when failed, else None
    mtime          modification time (seconds since the epoch) or None
    checksums      {algorithm: hex} computed while streaming
    bytes          bytes that actually crossed the network (less than size
                   after a resume)
    remote_path    the path the file has on the storage (uploads)
    """

    __slots__ = ("source", "dest", "size", "status", "error", "checksums", "bytes",
                 "remote_path", "mtime", "exception")

    def __init__(self, source, dest, size=None, status="transferred", error=None,
                 checksums=None, nbytes=0, remote_path=None):
        self.source, self.dest, self.size, self.status = source, dest, size, status
        self.error, self.checksums, self.bytes = error, checksums or {}, nbytes
        self.remote_path = remote_path
        self.mtime = None
        self.exception = None  # the CtadataError of a failed transfer

    def __repr__(self):
        return "TransferResult(%r -> %r, %s)" % (_safe_place(self.source),
                                                 _safe_place(self.dest), self.status)

    def to_dict(self):
        """The manifest record: remote (URL), local (path), remote_path, size,
        mtime (ISO 8601 UTC), checksums {algorithm: hex}, status, error,
        bytes (moved over the network)."""
        upload = "://" in str(self.dest)
        remote, local = (self.dest, self.source) if upload else (self.source, self.dest)
        return {"remote": _safe_url(remote), "local": local,
                "remote_path": self.remote_path, "size": self.size,
                "mtime": _iso(self.mtime), "checksums": dict(self.checksums),
                "status": self.status, "error": self.error, "bytes": self.bytes}


class TransferSummary:
    """Outcome of a (possibly multi-file) transfer: ``results`` holds one
    TransferResult per file; counters ``files``, ``transferred``,
    ``skipped``, ``failed``, ``planned`` (dry run), ``bytes`` (moved over
    the network), ``seconds``; for uploads ``remote_path``, where the file
    or tree is on the storage (as the download service names it, in
    service mode)."""

    def __init__(self, results, seconds):
        self.results = results
        self.seconds = seconds
        self.remote_path = None
        self.files = len(results)
        self.transferred = sum(1 for r in results if r.status == "transferred")
        self.skipped = sum(1 for r in results if r.status == "skipped")
        self.failed = sum(1 for r in results if r.status == "failed")
        self.planned = sum(1 for r in results if r.status == "planned")
        self.bytes = sum(r.bytes for r in results)

    @property
    def ok(self):
        return self.failed == 0

    @property
    def failures(self):
        return [r for r in self.results if r.status == "failed"]

    def __repr__(self):
        return ("TransferSummary(files=%d, transferred=%d, skipped=%d, failed=%d, "
                "bytes=%d, seconds=%.2f)" % (self.files, self.transferred, self.skipped,
                                             self.failed, self.bytes, self.seconds))

    def _repr_html_(self):
        """A notebook shows the counts, then the failures (first 20)."""
        rate = self.bytes / self.seconds if self.seconds > 0 else 0
        html = _html_table(
            ("files", "transferred", "skipped", "failed", "planned", "bytes", "seconds",
             "rate"),
            [(self.files, self.transferred, self.skipped, self.failed, self.planned,
              _human_bytes(self.bytes), "%.2f" % self.seconds, _human_bytes(rate) + "/s")],
            right=range(8))
        failures = self.failures
        if failures:
            html += _html_table(("failed", "error"), [
                (_safe_url(r.source if "://" in str(r.source) else r.dest or r.source),
                 r.error) for r in failures[:20]], len(failures) - min(len(failures), 20))
        return html

    def to_dict(self):
        return {"files": self.files, "transferred": self.transferred,
                "skipped": self.skipped, "failed": self.failed, "planned": self.planned,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "remote_path": self.remote_path,
                "results": [r.to_dict() for r in self.results]}


class PartialFailure(CtadataError):
    """Some files of a multi-file transfer failed; ``summary`` has them all."""

    def __init__(self, summary):
        first = summary.failures[0]
        CtadataError.__init__(
            self, "%d of %s failed; first: %s: %s" % (
                summary.failed, _plural(summary.files, "file"), _safe_place(first.source),
                first.error))
        self.summary = summary


class Progress:
    """Counts what a transfer has done.  The engine calls ``add_total``,
    ``advance`` and ``file_done`` from its worker threads, ``planned`` once
    every file is known, and ``poll`` from the thread that waits for the
    workers (the caller's), about five times a second.  This base class
    only counts (thread-safe) and draws nothing; ``snapshot()`` returns the
    numbers with a rate and an ETA.  A display sets ``interval`` (seconds
    between two draws) and overrides ``show(snapshot)`` and ``close()``:
    see the "Progress displays" section, and pass one as ``progress=``."""

    interval = None  # seconds between two show() calls from poll(); None: never

    def __init__(self):
        self.lock = _thread.allocate_lock()
        self.total_files = self.total_bytes = 0
        self.done_files = self.done_bytes = 0
        self.failed = self.skipped = 0
        self.started = time.monotonic()
        self.planning = True  # more files may still be added (listing goes on)
        self._shown = 0.0     # when show() last ran
        self._marks = []      # (time, bytes done) of recent snapshots: the rate
        self.waiting = 0      # files waiting to come from tape (downloads with staging)

    def planned(self):
        """Called once every file is known (totals are final)."""
        self.planning = False

    def add_total(self, files, nbytes):
        with self.lock:
            self.total_files += files
            self.total_bytes += nbytes or 0

    def advance(self, nbytes):
        """*nbytes* more moved (negative: a transfer starts again)."""
        with self.lock:
            self.done_bytes += nbytes

    def file_done(self, result):
        with self.lock:
            self.done_files += 1
            if result.status == "failed":
                self.failed += 1
            elif result.status == "skipped":
                self.skipped += 1

    def staging(self, waiting):
        """Called with the number of files still waiting to come from tape
        (downloads with staging), after each poll."""
        with self.lock:
            self.waiting = waiting

    def snapshot(self, final=False):
        """The counters now, with the recent rate and an ETA: a _Snapshot."""
        now = time.monotonic()
        with self.lock:
            s = _Snapshot(self.done_files, self.total_files, self.done_bytes,
                          self.total_bytes, self.failed, self.skipped,
                          now - self.started, self.planning and not final, final)
            # files waiting to come from tape (downloads with staging, issue 12)
            s.waiting = getattr(self, "waiting", 0)
            # The rate of the last ~10 s: the average since the start counts
            # the listing and stalls long gone.
            marks = self._marks
            if not marks or now - marks[-1][0] >= 0.5:
                marks.append((now, s.bytes_done))
            while len(marks) > 2 and now - marks[0][0] > _RATE_WINDOW:
                del marks[0]
        t0, b0 = marks[0]
        if now - t0 >= 1.0 and not final:
            s.rate = max(s.bytes_done - b0, 0) / (now - t0)
        else:
            s.rate = max(s.bytes_done, 0) / max(s.elapsed, 1e-6)
        s.eta = _eta(s)
        return s

    def poll(self):
        """Show a snapshot if *interval* seconds passed since the last one."""
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._shown >= self.interval:
            self._shown = now
            self.show(self.snapshot())

    def show(self, snapshot):
        """Draw *snapshot* (a display's job; the base class draws nothing)."""

    def close(self):
        """The transfer is over (a display shows its final state)."""


# Seconds of recent history the rate of a progress display is taken over.
_RATE_WINDOW = 10.0


def _eta(s):
    """Seconds left, estimated from what is known (None: nothing to go by):
    the bytes left at the recent rate, else (sizes unknown) the files left
    at the pace so far.  While listing (s.listing) it is a lower bound."""
    files_left = s.files_total - s.files_done
    bytes_left = s.bytes_total - s.bytes_done
    if files_left <= 0 and (s.files_total or not s.listing):
        return 0.0
    if bytes_left > 0 and s.rate > 0:
        return bytes_left / s.rate
    if files_left > 0 and s.files_done > 0:
        return s.elapsed * files_left / s.files_done
    return None


class _Snapshot:
    """What a transfer has done so far, as a progress callback receives it:
    files_done, files_total, bytes_done, bytes_total, failed, skipped,
    elapsed (seconds), rate (bytes/s over the last seconds), eta (seconds
    left, or None when unknown), listing (True while files may still be
    added: the totals and the ETA are then lower bounds), final (True for
    the last one, when the transfer is over), waiting (files still to come
    from tape, with staging)."""

    __slots__ = ("files_done", "files_total", "bytes_done", "bytes_total", "failed",
                 "skipped", "elapsed", "listing", "final", "rate", "eta", "waiting")

    def __init__(self, files_done, files_total, bytes_done, bytes_total, failed, skipped,
                 elapsed, listing, final, rate=0.0, eta=None):
        self.files_done, self.files_total = files_done, files_total
        self.bytes_done, self.bytes_total = bytes_done, bytes_total
        self.failed, self.skipped, self.elapsed = failed, skipped, elapsed
        self.listing, self.final, self.rate, self.eta = listing, final, rate, eta
        self.waiting = 0

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return "<progress %d/%d%s files, %d/%d bytes, %.0f B/s, ETA %s%s>" % (
            self.files_done, self.files_total, "+" if self.listing else "",
            self.bytes_done, self.bytes_total, self.rate,
            "-" if self.eta is None else "%.1f s" % self.eta, ", final" if self.final else "")


def _download_file(tr, task, progress=None, cancel=None, resume=True, warn=None):
    """Download *task* (a _Task: its URL, _Folder and name) through
    ``NAME.part`` (renamed on success); return a TransferResult.  See
    _Download."""
    return _Download(tr, task, progress, cancel, resume, warn).run()


class _Busy(Exception):
    """Another process is downloading this file (it holds the lock of its
    .part): the worker pool takes the task again later, to wait then."""


class _Download:
    """One file downloaded to NAME in a _Folder through ``NAME.part``, in
    the steps of pip's network/download.py and httpie's downloads.py: claim
    the part (open it, never through a symlink, and lock it: see
    _LockFile), decide what to resume, ask (Range + If-Range), check the
    answer's range (one Content-Range parser), stream into the part, verify
    (the size on disk, the server's checksum from the Digest header, else
    from the listing), and commit (rename, still holding the lock).

    When another process holds the part, raise _Busy, or with *task.wait*
    wait for it; when that process has meanwhile downloaded the file (a
    regular file of the listed size at the final name), the result is
    "skipped".

    Transient failures are retried per the transport's policy, resuming
    each time (one retry budget for the whole file).  A checksum mismatch
    starts over from zero once.  run() returns a TransferResult or raises
    CtadataError, leaving at most a .part file behind (never a wrong file
    under the final name).  Without *resume* (the download service ignores
    Range), every attempt starts from byte 0 and a failed download leaves
    no .part either."""

    STALLED = 600.0  # give up after this long without progress (at least)

    def __init__(self, tr, task, progress=None, cancel=None, resume=True, warn=None):
        self.tr, self.url, self.entry = tr, task.source, task.entry
        self.folder, self.name, self.part = task.folder, task.name, task.name + ".part"
        self.dest = self.folder.join(self.name)
        self.progress, self.cancel, self.resume = progress, cancel, resume
        self.warn = warn or (lambda msg: _log(30, "%s", msg))
        self.overwrite, self.wait, self.check = task.overwrite, task.wait, task.check
        self.fd = self.lockfile = None
        self.locked = False  # this process holds the part's lock
        self.meta = None  # the part's _PartMeta (False: none; None: not read yet)
        self.created = False   # the part is new (made by this process with O_EXCL)
        self.restart = False   # the part's bytes are not to be resumed
        self.high = None       # the furthest byte of the file the part has reached
        self.gained = 0        # how much further the last attempt got
        self.fetched = [0]  # bytes received over the network, all attempts
        self.counted = 0    # bytes the progress was told of beside those fetched

    def run(self):
        try:
            done = self.claim()
            if done is not None:
                return done
            return self.transfer()
        except BaseException:
            self.drop_empty_part()
            raise
        finally:
            self.close()

    def drop_empty_part(self):
        """A failed download leaves no empty .part (e.g. after a 404); only
        one this process holds the lock of (another process's may be empty
        because it has only just begun)."""
        try:
            if self.locked and self.fd is not None and not os.fstat(self.fd).st_size:
                self.folder.unlink(self.part)
        except OSError:
            pass

    def close(self):
        """Close the part (which drops its flock) and release its lock file."""
        fd, self.fd = self.fd, None
        lockfile, self.lockfile = self.lockfile, None
        self.locked = False
        if lockfile is not None:
            lockfile.release()
        if fd is not None:
            os.close(fd)

    # -- the part -----------------------------------------------------------------

    def claim(self):
        """Open and lock NAME.part; return None when it is ours, or the
        "skipped" result when another process has meanwhile downloaded the
        file (it held the part, or renamed it while we opened it)."""
        other = False
        while True:
            self.open_part()
            if not self.lock():
                if not self.wait:
                    self.close()
                    raise _Busy(self.dest)
                self.wait_for_lock()
                other = True
            self.locked = True
            if not self.created and not self.same_part():
                self.close()  # the holder finished: the part we opened is its file now
                done = self.done_elsewhere()
                if done is not None:
                    return done
                other = True
                continue
            if other or not (self.overwrite or self.check):
                done = self.done_elsewhere()
                if done is not None:
                    self.folder.unlink_quietly(self.part)  # ours (locked): not needed
                    if not self.created:
                        self.folder.unlink_quietly(self.part + ".meta")
                    return done
            return None

    def lock(self):
        """Lock the open part: True when this process holds it now."""
        tree = self.folder.tree
        mode = tree.lock_mode if tree is not None else None
        if mode is None:
            mode = _lock_mode(self.folder.path)
            if tree is not None:
                tree.lock_mode = mode
        if mode != "file":
            got = _flock(self.fd)
            if got is False:
                return False
            if got is None:  # no flock here: the lock file instead, from now on
                mode = "file"
                if tree is not None:
                    tree.lock_mode = mode
            elif mode == "flock":
                return True
        self.lockfile = _LockFile.take(self.folder, self.part + ".lock")
        return self.lockfile is not None

    def wait_for_lock(self):
        """Wait until this process holds the part (polling: a thread in a
        blocking flock() could not be stopped by Ctrl-C)."""
        started, said, delay = time.monotonic(), False, 0.005
        while not self.lock():
            if not said and time.monotonic() - started > 1.0:
                self.warn("waiting for another process downloading %s" % self.dest)
                said = True
            if self.cancel is not None:
                if self.cancel.wait(delay):
                    raise KeyboardInterrupt
            else:
                time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def same_part(self):
        """True when NAME.part still names the file we hold open."""
        try:
            st = self.folder.lstat(self.part)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _local_error(e, self.folder.join(self.part))
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def done_elsewhere(self, sums=None):
        """The "skipped" result when the final name holds a regular file of
        the remote file's size and modification time (made by another
        process, which verified it;
        with *sums*, checksums this process computed, also of those), else
        None."""
        import stat
        try:
            st = self.folder.lstat(self.name)
        except OSError:
            return None
        if self.entry is not None:
            size, mtime = self.entry.size, self.entry.mtime
        else:
            size, mtime = self.head()
        if not stat.S_ISREG(st.st_mode) or size is None or st.st_size != size:
            return None
        if not _same_time(st.st_mtime, mtime):
            return None  # not the server's file (whoever downloads it sets its mtime)
        if sums:
            f = self.folder.read(self.name)
            if f is None or not _file_matches(f, sums):
                return None
        res = TransferResult(self.url, self.dest, size, "skipped")
        res.mtime = mtime
        return res

    def head(self):
        """(size, modification time) of the remote file, asked with HEAD
        (no listing said them); (None, None) when that fails."""
        try:
            resp = self.tr.request("HEAD", self.url, ok=(200,), what="check")
        except CtadataError:
            return None, None
        size = _count(resp.getheader("Content-Length"))
        mtime = _parse_http_date(resp.getheader("Last-Modified"))
        self.tr.release(resp)
        return size, mtime

    def open_part(self):
        """Open NAME.part for writing without following a symlink: one that
        is not a regular file of ours (a symlink, a FIFO, a hard link to
        some other file) is removed, with a warning, and made anew."""
        import stat
        excl = True
        for _ in range(6):
            flags = os.O_RDWR | os.O_CREAT | _O_NONBLOCK | (os.O_EXCL if excl else 0)
            try:
                fd = self.folder.open(self.part, flags)
            except FileExistsError:
                excl = False
                continue
            except OSError as e:
                if not self.foreign(e):
                    raise _local_error(e, self.folder.join(self.part))
                excl = True
                continue
            if excl:  # made just now, without following a link: an empty file of ours
                self.fd, self.created = fd, True
                return
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                self.fd, self.created = fd, excl
                return
            os.close(fd)
            self.foreign(None)
            excl = True
        raise TransferError("cannot make %s" % self.folder.join(self.part), retryable=False)

    def foreign(self, err):
        """Remove what is at NAME.part if it is not ours to write (True)."""
        import errno
        if err is not None and err.errno not in (errno.ELOOP, errno.EMLINK, errno.ENXIO,
                                                 errno.ENODEV, errno.ETXTBSY):
            return False
        path = self.folder.join(self.part)
        self.warn("removed %s: a symbolic link or special file where the partial "
                  "download goes" % path)
        try:
            self.folder.unlink(self.part)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _local_error(e, path)
        return True

    # -- the transfer ----------------------------------------------------------------

    def transfer(self):
        """The attempts: the retry budget (the transport's retries) counts
        the attempts in a row that brought the part no further by 1 MiB: an
        attempt that did gives a full budget again (a link that drops every
        150 MB still delivers), within a bound on the time without progress:
        10 x the timeout, at least 10 minutes."""
        mismatches = attempt = 0
        first = True
        since, bound = time.monotonic(), max(10 * self.tr.settings.timeout, self.STALLED)
        while True:
            clean = first and self.created  # nothing in the part yet
            first = False
            look, self.restart = self.resume and not clean and not self.restart, False
            self.gained = 0
            try:
                sums, mtime, size = self.attempt(look, clean)
            except ChecksumMismatch:
                mismatches += 1
                if mismatches > 1:
                    self.folder.unlink_quietly(self.part)  # known to be wrong
                    raise
                self.restart = True
                continue
            except CtadataError as e:
                if self.gained >= _PROGRESS:
                    attempt, since = 0, time.monotonic()
                delay = _retry_delay(self.tr.policy, attempt, e)
                if delay is not None and time.monotonic() + delay - since > bound:
                    delay = None
                    if attempt and e.hint is None:
                        e.hint = "no progress in %d attempts over %.0f s" % (
                            attempt + 1, time.monotonic() - since)
                if delay is None:
                    if not self.resume:
                        self.folder.unlink_quietly(self.part)
                    raise
                self.tr.pause("GET", self.url, delay, e, attempt)
                attempt += 1
                continue
            return self.commit(sums, mtime, size)

    def attempt(self, look, clean=False):
        """One GET; return (checksums, remote mtime, size).  *look*: resume
        from what the part holds; *clean*: it holds nothing.  Network errors
        become retryable TransferErrors."""
        entry = self.entry
        expected = entry.size if entry is not None else None
        offset, headers = self.resume_headers(look, expected)
        resp = self.tr.request("GET", self.url, headers, ok=(200, 206), what="download",
                               retry=False)
        try:
            offset, total = self.check_range(resp, offset)
            if not offset:
                self.start_over(resp, total, clean)
            if total is not None:
                expected = total  # the server's word (the file may have changed)
            remote_sums = _asked_digest(resp, headers) or (
                entry.checksums if entry is not None else {})
            hashers = _Hashers(_algos_for(remote_sums, self.tr.record_sums))
            mtime = entry.mtime if entry is not None and entry.mtime is not None else \
                _parse_http_date(resp.getheader("Last-Modified"))
            received = offset + self.stream(resp, offset, expected, hashers, mtime, clean)
            return self.verify(received, expected, hashers, remote_sums), mtime, received
        finally:
            self.tr.release(resp)

    def resume_headers(self, look, expected):
        """(offset, request headers): Range + If-Range when the part can be
        resumed, else offset 0.  Only with its provenance (NAME.part.meta,
        see _PartMeta): the same URL, the same remote size as the listing's,
        and a part shorter than that; If-Range then carries the validator
        the server gave when the part was started, never today's listing's:
        only it says that the bytes in the part belong to the file."""
        headers = _want_digest_header(self.tr)
        if not look or (expected is not None and expected <= _SMALL_BODY):
            return 0, headers  # small files are never resumed
        offset = os.fstat(self.fd).st_size
        if not offset:
            return 0, headers
        if self.meta is None:
            self.meta = _PartMeta.read(self.folder, self.part, self.url)
        meta = self.meta
        if not meta or (expected is not None and meta.size != expected) or \
                offset >= meta.size:
            return 0, headers  # nothing says the part is current: start over
        # RFC 9110 §13.1.5: if the file changed, we get all of it (200).  The
        # last byte is named: XRootD 5.5 answers "bytes=N-" with an empty 206.
        headers["Range"] = "bytes=%d-%d" % (offset, meta.size - 1)
        headers["If-Range"] = meta.validator
        return offset, headers

    def check_range(self, resp, offset):
        """(offset the body starts at, total size or None) of the answer:
        a 206 must start where the part ends and be of the file the part
        was started from (its size), else the part starts over."""
        first, total = _content_range(resp)
        if resp.status == 206:
            if not self.meta or first != offset or total != self.meta.size:
                self.restart = True
                raise TransferError("server sent bytes from %s of %s instead of %d of %s" % (
                    first, total, offset, self.meta and self.meta.size), self.url)
            return offset, total
        return 0, total

    def start_over(self, resp, total, clean):
        """A 200: the part starts again from byte 0.  Its provenance is
        written before its first byte (a large file's: small ones are never
        resumed), after the old bytes are gone (a crash in between must not
        pair old bytes with new provenance)."""
        if not clean:
            try:
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)
            except OSError as e:
                raise _local_error(e, self.folder.join(self.part))
        if self.resume and total is not None and total > _SMALL_BODY:
            self.meta = _PartMeta.write(self.folder, self.part, self.url, total, resp)
        elif self.meta is not None or not self.created:
            self.folder.unlink_quietly(self.part + ".meta")  # stale: not of these bytes
            self.meta = False

    def stream(self, resp, offset, expected, hashers, mtime, clean):
        """Write the body into the part after its first *offset* bytes (which
        are hashed first: the checksum covers the whole file); return the
        bytes received.  The part gets the server's modification time."""
        import functools
        if offset:  # resumed: keep only the first *offset* bytes
            with open(self.fd, "r+b", buffering=0, closefd=False) as f:
                if hashers.active:
                    _hash_head(f, offset, hashers)
                try:
                    f.seek(offset)
                    f.truncate()
                except OSError as e:
                    raise _local_error(e, self.folder.join(self.part))
        if self.progress is not None:
            # this file now counts *offset* bytes (a retry: as many or fewer
            # than were fetched; a resumed .part: more)
            delta = offset - self.counted - self.fetched[0]
            self.counted += delta
            self.progress.advance(delta)
        before = self.fetched[0]
        if self.high is None:
            self.high = offset  # where this run started
        try:
            # straight to the descriptor: no file object (and its fstat) per file
            got = _copy_body(resp, functools.partial(os.write, self.fd), hashers,
                             self.progress, self.cancel, self.part, self.fetched,
                             None if expected is None else expected - offset)
        except TransferError:
            raise
        except Exception as e:
            if not _is_transient(e):
                raise
            raise _network_error(e, self.url, "download")
        finally:  # how much further than ever before the part got
            end = offset + self.fetched[0] - before
            self.gained, self.high = max(0, end - self.high), max(end, self.high)
        if mtime is not None:
            # set through the open file (no second path lookup); the rename keeps it
            try:
                os.utime(self.fd if os.utime in os.supports_fd else self.dest + ".part",
                         (mtime, mtime))
            except OSError:
                pass
        return got

    def verify(self, received, expected, hashers, remote_sums):
        """The part's size (what was received, and what is on disk) and
        checksums against the server's; return the checksums."""
        if expected is not None and received != expected:
            raise TransferError("short download: %d of %d bytes" % (received, expected),
                                self.url, expected=expected, received=received)
        on_disk = os.fstat(self.fd).st_size
        if on_disk != received:
            self.restart = True
            raise TransferError("%s holds %d bytes, not the %d received: written to by "
                                "another program?" % (self.folder.join(self.part), on_disk,
                                                      received), self.url)
        sums = hashers.result()
        bad = _first_mismatch(sums, remote_sums)
        if bad:
            raise ChecksumMismatch("%s checksum mismatch: server says %s, received %s"
                                   % bad, self.url, *bad)
        return sums

    def commit(self, sums, mtime, size):
        """Give the verified part its final name (still holding its lock)."""
        try:
            self.folder.replace(self.part, self.name)
        except FileNotFoundError as e:
            # Another process renamed it first (only without a working lock:
            # an old ctadata, or lock files on a machine whose lock we broke).
            done = self.done_elsewhere(sums)
            if done is None:
                raise _local_error(e, self.dest)
            return done
        except OSError as e:
            raise _local_error(e, self.dest)
        if self.meta or not self.created:
            self.folder.unlink_quietly(self.part + ".meta")
        res = TransferResult(self.url, self.dest, size, "transferred", None, sums,
                             self.fetched[0])
        res.mtime = mtime
        return res


# The old client's chunk size: its APIClient.chunk_size, and the download
# service's default.
_OLD_CHUNK_SIZE = 10 * 1024 * 1024


class _ChunkLog:
    """The progress of one download as the old client logged it while it
    fetched a file from the download service (ctadata/api.py,
    fetch_and_save_file): at INFO, on the logger of its module,
    "ctadata.api", "wrote %.2f / %.2f Mb in %d chunks in %.2f seconds" when
    a chunk of *chunk_size* bytes has arrived and the whole percentage of
    the file grew since the last line: the bytes before that chunk and the
    file's size in Mb (bytes / 1024 / 1024), the chunks before it (counted
    from 0), the seconds since the download started.  So, as there, no line
    for the first chunk (0 %) nor for the one that ends the file.  Scripts
    and the service's own tests read these lines.  Everything else goes to
    *progress* (a Progress)."""

    def __init__(self, progress, size, chunk_size):
        import logging
        self.progress, self.size, self.chunk = progress, size, chunk_size
        self.got = 0       # bytes received
        self.chunks = 0    # chunks complete
        self.last_pc = 0
        self.t0 = time.monotonic()
        self.log = logging.getLogger("ctadata.api")

    def advance(self, nbytes):
        self.progress.advance(nbytes)
        self.got += nbytes
        if nbytes < 0:     # a download started again (the service cannot resume)
            self.chunks = min(self.chunks, max(self.got, 0) // self.chunk)
        size, chunk = self.size, self.chunk
        if not size:
            return
        while (self.chunks + 1) * chunk <= self.got or (
                self.got >= size and self.chunks * chunk < size):
            before = self.chunks * chunk
            pc = int(before / size * 100)
            if pc > self.last_pc:
                self.log.info("wrote %.2f / %.2f Mb in %d chunks in %.2f seconds",
                              before / 1024 / 1024, size / 1024 / 1024, self.chunks,
                              time.monotonic() - self.t0)
                self.last_pc = pc
            self.chunks += 1

    def __getattr__(self, name):
        return getattr(self.progress, name)


def _chunked_download(tr, t, progress, cancel, chunk_size):
    """Download task *t* from the download service as the old client did:
    asking for ``?chunk_size=N`` (the service then reads the storage, and
    sends, in pieces of N bytes) and logging each chunk (_ChunkLog)."""
    url = t.source + ("&" if "?" in t.source else "?") + "chunk_size=%d" % chunk_size
    asked = _Task(url, t.dest, t.size, t.entry, t.check, new_folder=t.new_folder,
                  folder=t.folder, name=t.name, overwrite=t.overwrite)
    asked.wait = t.wait
    res = _download_file(tr, asked, _ChunkLog(progress, t.size, chunk_size), cancel, False)
    res.source = t.source
    return res


class _PartMeta:
    """The provenance of a partial download, NAME.part.meta: one JSON
    object, written before the part's first byte and removed after the
    rename::

        {"format": 1, "url": "<the URL>", "size": <the remote file's size>,
         "validator": "<the ETag, if strong, else the Last-Modified the
                       server sent with the first byte>",
         "started": "<UTC time>"}

    A part is resumed only when its meta reads back whole, for the same
    URL (spelled the same way) and the size the listing says now; the
    resumed GET says If-Range: <validator>, so a server whose file changed
    since sends all of it again.  Files up to 1 MiB get none (they are
    never resumed: it would save nothing)."""

    __slots__ = ("size", "validator")

    def __init__(self, size, validator):
        self.size, self.validator = size, validator

    @classmethod
    def read(cls, folder, part, url):
        """The _PartMeta beside *part* if it is whole and for *url*, else False."""
        import json
        f = folder.read(part + ".meta")  # never through a symlink
        if f is None:
            return False
        try:
            with f:
                meta = json.loads(f.read(4096).decode("utf-8"))
            size, validator = meta["size"], meta["validator"]
            if meta["format"] == 1 and meta["url"] == _safe_url(url) and \
                    isinstance(size, int) and size > 0 and \
                    isinstance(validator, str) and validator:
                return cls(size, validator)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return False

    @classmethod
    def write(cls, folder, part, url, size, resp):
        """Write the provenance of a part that starts now with the 200
        answer *resp*; return it, or False when the server gave no
        validator (or it cannot be written): the part is then never
        resumed.  Written as NAME.part.meta.tmp and renamed: a symlink
        planted at NAME.part.meta is replaced, never followed."""
        import json
        etag = resp.getheader("ETag")
        validator = etag if etag and not etag.startswith("W/") else \
            resp.getheader("Last-Modified")
        meta, tmp = part + ".meta", part + ".meta.tmp"
        if not validator:
            folder.unlink_quietly(meta)
            return False
        data = json.dumps({"format": 1, "url": _safe_url(url), "size": size,
                           "validator": validator,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        try:
            try:
                fd = folder.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # left by a crash (or planted): ours to replace
                folder.unlink(tmp)
                fd = folder.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data.encode("utf-8"))
            finally:
                os.close(fd)
            folder.replace(tmp, meta)
        except OSError:
            folder.unlink_quietly(tmp)
            folder.unlink_quietly(meta)
            return False
        return cls(size, validator)


def _content_range(resp):
    """(first byte, total size) of a GET answer, each None when unknown:
    from ``Content-Range: bytes FIRST-LAST/TOTAL`` (RFC 9110 §14.4; TOTAL
    may be "*"), else, for a 200, (0, Content-Length)."""
    cr = resp.getheader("Content-Range")
    if cr is not None:
        unit, _, rng = cr.strip().partition(" ")
        span, _, total = rng.partition("/")
        first = _count(span.partition("-")[0]) if unit.lower() == "bytes" else None
        return first, _count(total)
    if resp.status == 200:
        return 0, _count(resp.getheader("Content-Length"))
    return None, None


def _count(text):
    """A non-negative decimal integer as an int, else None."""
    text = (text or "").strip()
    return int(text) if text and not text.strip("0123456789") else None


def _copy_body(resp, write, hashers, progress, cancel, path, fetched, length=None):
    """Stream a response body into *write* (a file's): one reused buffer (no
    larger than the body), the checksum updated on the way, progress fed
    per block; the download stops if the server sends more than *length*.
    (A short write is caught afterwards: the size on disk is checked.)"""
    advance = progress.advance if progress is not None else None
    update = hashers.update if hashers.active else None
    buf = bytearray(_CHUNK if length is None else max(min(length, _CHUNK), 8192))
    view = memoryview(buf)
    readinto = resp.readinto
    got = 0
    while True:
        n = readinto(buf)
        if not n:
            return got
        block = view[:n]
        try:
            for i in range(0, n, _WRITE):
                write(block[i:i + _WRITE])
        except OSError as e:
            raise _local_error(e, path)
        if update is not None:
            update(block)
        got += n
        fetched[0] += n
        if length is not None and got > length:
            raise TransferError("the server sent more than the %d bytes it announced"
                                % length, retryable=False)
        if _PYPY:
            _pypy_gc(n)
        if advance is not None:
            advance(n)
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt


def _upload_file(tr, local, url, size, verify=None, progress=None):
    """PUT one local file to *url*; returns a TransferResult.

    Checksums: adler32 (computed while sending, or afterwards from the
    file, see _put_algos) is compared with the ``Digest`` of the server's
    answer (asked for with ``Want-Digest``); on a mismatch the remote copy
    is deleted and ChecksumMismatch raised.  Files up to 1 MiB are read into
    memory anyway, so they also carry ``Content-MD5`` (free there, and
    adler32 is weak on short inputs); larger files carry it only with
    *verify* (it costs a second read of the file, before sending).  *verify*
    False never sends it.  Large files say "Expect: 100-continue" so that
    dCache redirects them to a pool instead of proxying every byte through
    the door."""
    body, sums_of, local_md5, mtime = _upload_body(local, size, _put_algos(tr, size),
                                                   verify)
    streamed = isinstance(body, _FileBody)
    if streamed and progress is not None:
        body.advance = progress.advance  # progress moves as the bytes are sent
    headers = _want_digest_header(tr)
    if local_md5 is not None:
        import base64
        headers["Content-MD5"] = base64.b64encode(local_md5.digest()).decode()
    remote_sums = _put(tr, url, headers, body, size >= tr.settings.expect_threshold)
    sums = sums_of()
    if local_md5 is not None:
        sums["md5"] = local_md5.hexdigest()
    _verify_upload(tr, url, local, size, sums, remote_sums)
    if progress is not None and not streamed:
        progress.advance(size)
    res = TransferResult(local, url, size, "transferred", None, sums, size)
    try:
        res.mtime = mtime if mtime is not None else os.stat(local).st_mtime
    except OSError:
        pass
    return res


def _want_digest_header(tr):
    """The Want-Digest of a GET or PUT (RFC 3230): adler32, else md5; none
    for a server that must not be asked during transfers (_Quirks.digests)."""
    return {"Want-Digest": _WANT_DIGEST} if tr.quirks().digests else {}


def _asked_digest(resp, headers):
    """The checksums of the answer's Digest, if the request asked for one
    (XRootD 5.5 may answer with the Digest of an earlier request)."""
    return _parse_digest(resp.getheader("Digest")) if "Want-Digest" in headers else {}


def _put_algos(tr, size):
    """What to hash while sending.  Only the server's answer tells whether it
    checks a Digest (dCache does, nginx and Apache don't).  Hash while
    sending when that is known, or when a manifest wants the value, or for
    small files (cheap); a large file sent before the first answer is hashed
    afterwards, and only if the answer has a Digest: adler32 on the sending
    thread costs ~0.45 s per GiB, for nothing on a server that never answers
    one."""
    if tr.record_sums or tr.put_digests or (size <= _SMALL_BODY and tr.put_digests is None):
        return ("adler32",)
    return ()


def _upload_body(local, size, algos, verify):
    """(the body to send, a function returning the checksums computed on
    the way, the md5 to send as Content-MD5 or None, the file's mtime or
    None).  A small file is read whole (and its md5 is free); a large one
    streams as a _FileBody, its md5 only with *verify* (a first read of its
    own)."""
    import hashlib
    if size > _SMALL_BODY:
        local_md5 = hashlib.md5() if verify else None
        if local_md5 is not None:
            try:
                with _open_regular(local) as f:
                    _hash_head(f, size, local_md5)
            except OSError as e:
                raise _local_error(e, local)
        body = _FileBody(local, size, algos)
        return body, lambda: body.hashers.result(), local_md5, None
    data, st = _read_regular(local, size)
    if len(data) != size:
        raise TransferError("local file changed size during upload: %s" % local,
                            expected=size, received=len(data), retryable=False)
    hashers = _Hashers(algos)
    if algos:
        hashers.update(data)
    return data, hashers.result, hashlib.md5(data) if verify is not False else None, \
        st.st_mtime


def _put(tr, url, headers, body, expect):
    """Send the PUT; return the checksums of the answer's Digest."""
    try:
        resp = tr.request("PUT", url, headers, body, expect=expect, ok=(200, 201, 204),
                          what="upload")
    except RemoteError as e:
        if e.status == 400 and "checksum" in (e.message or "").lower():
            # dCache may keep the corrupt file after a 400 (dCache issue 7862).
            _try_delete(tr, url)
            raise ChecksumMismatch("server rejected the upload: %s; remote copy deleted"
                                   % e.message, url, "md5")
        raise
    remote_sums = _asked_digest(resp, headers)
    tr.release(resp)
    tr.put_digests = bool(remote_sums) or bool(tr.put_digests)
    return remote_sums


def _verify_upload(tr, url, local, size, sums, remote_sums):
    """Compare the checksums sent (*sums*, completed here) with the server's;
    on a mismatch delete the remote copy and raise ChecksumMismatch."""
    if remote_sums and not any(a in sums for a in remote_sums):
        # nothing hashed on the way that the server's Digest can confirm:
        # hash the file now (what was sent is what is on disk, unless it
        # changed meanwhile, which this then reports as a mismatch)
        hashers = _Hashers(_algos_for(remote_sums))
        try:
            with _open_regular(local) as f:
                _hash_head(f, size, hashers)
        except OSError as e:
            raise _local_error(e, local)
        sums.update(hashers.result())
    bad = _first_mismatch(sums, remote_sums)
    if bad:
        _try_delete(tr, url)
        raise ChecksumMismatch("%s checksum mismatch after upload: server has %s, "
                               "sent %s; remote copy deleted" % bad, url, *bad)


class _ServiceResult(TransferResult):
    """A TransferResult that keeps the download service's answer."""

    __slots__ = ("answer",)


def _upload_service_file(tr, local, url, size, progress=None):
    """POST one local file, streamed, to the download service's /upload/ URL;
    return a _ServiceResult whose ``remote_path`` is the path the service
    reports (the file lands in the caller's own folder: that path is what
    others pass to fetch).  The service's ``total_written`` must equal the
    file's size, else TransferError."""
    body = _FileBody(local, size)
    if progress is not None:
        body.advance = progress.advance  # progress moves as the bytes are sent
    resp = tr.request("POST", url, {"Content-Type": "application/octet-stream",
                                    "Accept": "application/json"}, body,
                      ok=(200, 201), what="upload")
    answer = _parse_upload_answer(_read_body(tr, resp, url, "upload"), url)
    if answer["total_written"] != size:
        raise TransferError("the service stored %d of %d bytes" % (
            answer["total_written"], size), url, expected=size,
            received=answer["total_written"])
    res = _ServiceResult(local, url, size, "transferred", None,
                         body.hashers.result() if body.hashers else {}, size,
                         answer["path"])
    res.answer = answer
    return res


class _Concurrency:
    """How many workers a _WorkerPool runs when no -j was given: more while
    the transfers wait on the link, back to the start when they do not.

    Over a WAN, a small file costs a round trip or two (a dCache door: the
    GET, then the pool) and almost no work here: with 4 requests in flight,
    5,000 files at 20 ms take 30 s whatever the bandwidth.  So the pool
    measures, per window of finished tasks (at least 8, two per worker, and
    0.1 s):

    * *waiting*: the share of the workers' time spent waiting for answers
      (connecting, and from a request to its answer's head: the transport's
      meter(); streaming a body is transfer, not waiting);
    * *CPU*: the process's CPU time per second of the window (all threads);
    * *rate*: workers / mean time per task (Little's law: what the workers
      could do if they never waited for their next task; a worker's first
      task, which pays its connection's handshakes, is left out).  The time
      a worker waits for its next task (the listing, an upload's MKCOL) is
      not counted: a folder boundary in a short window made a doubling look
      useless at random (measured: 1.05x in one run, 1.67x in the next).

    The first window only warms up (the first listings, connections and
    imports make it look like waiting): nothing is decided on it.

    While waiting is at least half of the time and less than 90 % of a CPU
    is busy (on loopback or a LAN this machine is the bottleneck: its CPU
    is busy and nothing grows), the number of workers doubles, up to a cap
    (_MAX_JOBS).  A doubling is on trial for one window: unless the rate
    rose by a quarter (the server or this machine is saturated), it is
    undone and growth stops.  Big files (waiting under a quarter of the
    time: their transfers dominate) bring the number back to the start,
    and growth may begin again with the next small files.  A request tried
    again (a 503 or 429, a connection refused or reset: the server or the
    link pushes back) brings the number back to the start at once, and
    nothing grows any more in this run: several processes each growing
    would otherwise take every slot of a server with a connection limit
    (`ctadata serve`: 64; dCache doors) and fail each other's files.  The
    workers that stop close their connections (*leave*).  Each change is
    logged at DEBUG (-v)."""

    GROW_WAIT = 0.5     # grow while waiting is at least this share of the time
    GROW_CPU = 0.9      # ...and the process keeps less than this share of a CPU busy
    GAIN = 1.25         # a doubling must raise the rate this much, or it is undone
    SHRINK_WAIT = 0.25  # below this, back to the start (transfers dominate)
    WINDOW = 0.1        # seconds a window lasts at least (and 8 tasks, 2 per worker)

    def __init__(self, start, cap, meter, leave=None):
        self.start, self.cap, self.meter = start, max(cap, start), meter
        self.leave = leave   # called by a worker that stops while others go on
        self.n = start
        self.frozen = False  # a doubling did not pay: no more growth
        self.pushed = False  # a request was tried again: no more growth, ever
        self.trial = None    # (workers, rate) before the doubling on trial
        self.warm = False    # the first window is over
        self.window()

    def window(self):
        self.count, self.cycles, self.waits = 0, 0.0, 0.0
        self.t0, self.cpu0 = time.monotonic(), time.process_time()

    def sample(self, cycle, waited, retried=0):
        """A worker finished a task that took *cycle* seconds, *waited*
        seconds of it waiting on the network; *retried* requests (of any
        worker) were tried again meanwhile.  Return the new number of
        workers, or None."""
        if retried and not self.pushed:
            self.pushed, self.trial = True, None
            self.window()
            if self.n > self.start:
                _log(10, "parallel transfers %d -> %d (the server pushes back: a request "
                         "was tried again)", self.n, self.start)
                self.n = self.start
                return self.start
            return None
        self.count += 1
        self.cycles += cycle
        self.waits += waited
        if self.count < max(8, 2 * self.n):
            return None
        elapsed = time.monotonic() - self.t0
        if elapsed < self.WINDOW or self.cycles <= 0:
            return None
        n, wait = self.n, self.waits / self.cycles
        rate = n * self.count / self.cycles
        cpu = (time.process_time() - self.cpu0) / elapsed
        self.window()
        if not self.warm:
            self.warm = True
            return None
        new = None
        if self.trial is not None:
            before, rate0 = self.trial
            self.trial = None
            if rate < rate0 * self.GAIN:
                self.frozen, new = True, before
        if new is None and not (self.frozen or self.pushed) and n < self.cap and \
                wait >= self.GROW_WAIT and cpu < self.GROW_CPU:
            self.trial, new = (n, rate), min(self.cap, 2 * n)
        elif new is None and n > self.start and wait < self.SHRINK_WAIT:
            self.frozen, new = False, self.start
        if new is None:
            return None
        _log(10, "parallel transfers %d -> %d (waiting %.0f%% of the time, CPU %.0f%%, "
                 "%.1f files/s)", n, new, 100 * wait, 100 * cpu, rate)
        self.n = new
        return new


class _WorkerPool:
    """Runs ``worker(task)`` for every task from an iterable on *jobs*
    threads; run() returns the TransferResults in the order of the tasks.

    Each worker pulls its next task from the iterable itself (under a
    lock), so the listing of the next directory overlaps with the transfers
    of this one, memory stays bounded, and no dispatcher thread hands tasks
    over: with many small files, every hand-over between threads is a GIL
    switch and futex calls (measured: 68 futex calls per file with an
    executor).  A worker's CtadataError becomes a failed result; the others
    go on; an error of the iterable itself (a listing failed) is raised
    after the workers stop.  On KeyboardInterrupt the *cancel* event stops
    the workers at their next block, *abort* wakes those blocked on the
    network, and the interrupt propagates (partial downloads stay as .part
    files).  Workers return results, they print nothing; *progress* hears
    of each finished file.

    With *control* (a _Concurrency) the number of workers changes as it
    says: workers start in slots up to its number (the first *jobs* at
    once), and a worker whose slot is beyond it stops before its next task.

    A worker that raises _Busy (another process has the file in hand)
    defers its task: it is taken again, with ``task.wait`` set, once the
    iterable has no more tasks; by then the other process is usually done
    with it."""

    def __init__(self, worker, jobs, progress=None, cancel=None, abort=None, control=None):
        import threading
        self.worker, self.jobs, self.progress = worker, jobs, progress
        self.cancel, self.abort, self.control = cancel, abort, control
        self._take = threading.Lock()  # guards everything below
        self._tasks = None
        self._n = 0
        self._done = False   # the iterable has no more tasks
        self._stop = False   # interrupted, or the iterable failed
        self._deferred = []  # (index, task) of the tasks that raised _Busy
        self._error = None
        slots = control.cap if control is not None else jobs
        self._want = jobs    # workers wanted (slots 0 .. _want - 1)
        self._running = [False] * slots
        self._outs = [[] for _ in range(slots)]       # each slot's (index, result)
        self._nows = [[None] for _ in range(slots)]   # each slot's task in hand
        self._threads = []
        self._live = 0
        self._stopped = threading.Event()

    def run(self, tasks):
        self._tasks = iter(tasks)
        # The main thread waits on _stopped, never in Thread.join(timeout):
        # a Ctrl-C that interrupts join() can mark a running thread as
        # finished (CPython gh-90882), and a daemon thread still running at
        # interpreter exit can abort the process.
        try:
            self._spawn()
            while True:
                if self.progress is not None:
                    self.progress.poll()  # displays draw here, in the caller's thread
                if self._stopped.wait(0.2):  # wake up regularly: Ctrl-C is seen at once
                    break
        except KeyboardInterrupt as e:
            self._interrupt()
            # what was done, and what was cut short (for the manifest)
            cut = [(now[0][0], TransferResult(now[0][1].source, now[0][1].dest,
                                              now[0][1].size, "failed", "interrupted"))
                   for now in self._nows
                   if now[0] is not None and isinstance(now[0][1], _Task)]
            e.results = [res for _idx, res in sorted(
                [r for out in self._outs for r in out] + cut, key=lambda r: r[0])]
            raise
        except BaseException:
            self._interrupt()
            raise
        for t in list(self._threads):
            t.join()
        if self._error is not None:
            raise self._error
        return [res for _idx, res in sorted((r for out in self._outs for r in out),
                                            key=lambda r: r[0])]

    def _spawn(self):
        """Start a worker in every wanted slot that has none, once (a
        worker that finds no task exits at once and frees its slot: looping
        until every slot is taken would start workers for ever)."""
        import threading
        with self._take:
            if self._stop or (self._done and not self._deferred and self._live):
                return
            slots = [i for i in range(self._want) if not self._running[i]]
            for slot in slots:
                self._running[slot] = True
            self._live += len(slots)
        for k, slot in enumerate(slots):
            t = threading.Thread(target=self._loop, args=(slot,), name="ctadata-%d" % slot,
                                 daemon=True)
            try:
                t.start()
            except BaseException:
                for rest in slots[k:]:
                    self._exited(rest)
                raise
            self._threads.append(t)

    def _next(self, slot):
        """(index, task) of the next task, or (None, None) when there is
        none (or none for this worker: its slot is no longer wanted)."""
        with self._take:
            if self._stop or slot >= self._want:
                return None, None
            if not self._done:
                try:
                    task = next(self._tasks)
                except StopIteration:
                    self._done = True
                    if self.progress is not None:
                        self.progress.planned()
                except BaseException as e:  # the listing behind the tasks failed
                    self._done = self._stop = True
                    self._error = e
                    return None, None
                else:
                    self._n += 1
                    return self._n, task
            if self._deferred:
                idx, task = self._deferred.pop(0)
                task.wait = True
                return idx, task
            return None, None

    def _one(self, task):
        if isinstance(task, TransferResult):  # decided without a transfer
            return task
        try:
            return self.worker(task)
        except _Busy:
            return _Busy
        except CtadataError as e:
            err = e
        except OSError as e:
            err = _local_error(e, task.dest)
        res = TransferResult(task.source, task.dest, task.size, "failed", str(err))
        res.exception = err
        return res

    def _loop(self, slot):
        cancel, progress, control = self.cancel, self.progress, self.control
        out, now = self._outs[slot], self._nows[slot]
        meter = control.meter if control is not None else None
        first = True  # its first task pays the connection's handshakes: not counted
        try:
            while cancel is None or not cancel.is_set():
                idx, task = self._next(slot)
                if task is None:
                    if control is not None and control.leave is not None and \
                            slot >= self._want:  # fewer workers wanted: others go on
                        control.leave()
                    return
                now[0] = idx, task
                if meter is not None:
                    (waited, retried), began = meter(), time.monotonic()
                res = self._one(task)
                if res is _Busy:
                    with self._take:
                        self._deferred.append((idx, task))
                    now[0] = None
                elif res is None:  # a task that is no transfer (_Confirm)
                    now[0] = None
                else:
                    out.append((idx, res))
                    now[0] = None
                    if progress is not None:
                        progress.file_done(res)
                if meter is not None:
                    now_waited, now_retried = meter()
                    if not first or now_retried > retried:
                        self._adapt(time.monotonic() - began, now_waited - waited,
                                    now_retried - retried)
                    first = False
        except KeyboardInterrupt:
            pass  # cancelled: the main thread reports the interrupt
        except BaseException as e:  # a bug: raised in the caller's thread
            with self._take:
                self._done = self._stop = True
                if self._error is None:
                    self._error = e
        finally:
            self._exited(slot)

    def _adapt(self, cycle, waited, retried):
        """Tell the controller of a finished task; start workers it wants."""
        with self._take:
            want = self.control.sample(cycle, waited, retried)
            if want is None:
                return
            grow = want > self._want
            self._want = want
        if grow:
            try:
                self._spawn()
            except RuntimeError:  # "can't start new thread" (a limit): as many as run
                with self._take:
                    self._want = self.control.n = max(1, sum(self._running))
                    self.control.frozen = True

    def _exited(self, slot):
        with self._take:
            self._running[slot] = False
            self._live -= 1
            if not self._live:
                self._stopped.set()

    def _interrupt(self):
        """Stop the workers (the main thread was interrupted) and wait for them."""
        if self.cancel is not None:
            self.cancel.set()
        if self.abort is not None:
            self.abort()
        with self._take:
            self._done = self._stop = True
            if not self._live:
                self._stopped.set()
        while not self._stopped.wait(0.2):
            pass


def _glob_regex(pattern):
    """Translate a glob to a regex over a "/"-separated relative path: "*"
    and "?" stay within one name, "**" crosses folders, "[...]" is a class.
    A pattern without "/" matches a name at any depth (like rclone and
    .gitignore); one starting with "/" is anchored at the root."""
    import re
    anchored = pattern.startswith("/")
    pat = pattern.lstrip("/")
    out, i, n = [], 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            if pat[i:i + 3] == "**/":
                out.append("(?:.*/)?")
                i += 3
                continue
            if pat[i:i + 2] == "**":
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pat[i + 1:j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    prefix = "" if anchored or "/" in pat.rstrip("/") else "(?:.*/)?"
    return re.compile(prefix + "".join(out) + r"\Z", re.DOTALL)


def _selector(select=None, include=(), exclude=()):
    """A predicate over relative file paths, or None when everything is
    selected.  *select*: a glob, a list of globs, a compiled regex (searched)
    or a callable taking the relative path; *include*/*exclude*: globs (a
    file must match one include, if any, and no exclude)."""
    tests = []
    if select is not None:
        if isinstance(select, str):
            include = [select] + list(include)
        elif isinstance(select, (list, tuple, set, frozenset)):
            include = list(select) + list(include)
        elif hasattr(select, "search"):
            tests.append(select.search)
        elif callable(select):
            tests.append(select)
        else:
            raise ConfigError("select= takes a glob, a list of globs, a compiled regex "
                              "or a callable, not %r" % type(select).__name__)
    inc = [_glob_regex(g).match for g in include]
    exc = [_glob_regex(g).match for g in exclude]
    if not (tests or inc or exc):
        return None

    def selected(rel):
        if inc and not any(m(rel) for m in inc):
            return False
        if any(m(rel) for m in exc):
            return False
        return all(t(rel) for t in tests)
    return selected


class _Task:
    """One planned transfer; *check*: compare checksums first, skip if
    equal; *remote*: for uploads, the remote path asked for.  Downloads:
    *folder* (a held _Folder) and *name* say where the file goes (*dest* is
    their path); *new_folder*: this run made that folder (no .part
    there); *overwrite*: download even when the file is there.  Uploads:
    *confirm*, the _Confirm of the remote folder."""

    __slots__ = ("source", "dest", "size", "entry", "check", "remote", "new_folder",
                 "folder", "name", "overwrite", "wait", "confirm")

    def __init__(self, source, dest, size, entry=None, check=False, remote=None,
                 new_folder=False, folder=None, name=None, overwrite=False):
        self.source, self.dest, self.size, self.entry = source, dest, size, entry
        self.check = check
        self.remote = remote
        self.new_folder = new_folder
        self.folder, self.name, self.overwrite = folder, name, overwrite
        self.wait = False  # set when the pool takes a deferred task again (_Busy)
        self.confirm = None  # uploads: the _Confirm of the task's remote folder


def _summarize(results, started, raise_on_failure=True):
    summary = TransferSummary(results, time.monotonic() - started)
    if raise_on_failure and summary.failed:
        raise PartialFailure(summary)
    return summary


def _failed(source, dest, size, err, cls=TransferResult, remote_path=None):
    """The "failed" result (a *cls*) of one file, carrying the error *err*."""
    res = cls(source, dest, size, "failed", str(err), remote_path=remote_path)
    res.exception = err
    return res


def _failure_of(task, err, cls=TransferResult):
    """The "failed" result of a planned task (a _Task, a _CopyTask)."""
    return _failed(task.source, task.dest, task.size, err, cls)


def _failure_exception(result):
    """The exception of a failed single-file result."""
    if result.exception is not None:
        return result.exception
    return TransferError(result.error or "transfer failed", result.source)


# -- listing trees ---------------------------------------------------------


def _walk(remote, path, jobs, details=True, warn=None, on_error=None):
    """Yield (entry of a directory, sorted list of its entries) for *path*
    and every directory below it, depth first, on a backend (_DAV or
    _Service).  Listings run ahead in parallel on *jobs* threads; the order
    is deterministic.  A file has no directory to walk: nothing is yielded.
    A folder below *path* that cannot be listed goes to *on_error(entry,
    error)*, and the walk goes on without it (and what is below it); without
    *on_error*, for *path* itself, and for an error that would fail every
    folder (see _fails_everything), the error is raised."""
    from concurrent.futures import ThreadPoolExecutor
    from collections import deque

    def listing(p):
        selfs = []
        children = sorted(remote.children(p, selfs.append, details), key=_entry_key)
        return (selfs[0] if selfs else None), _unique(children, warn)

    def first(p):
        """The listing of *path*, or (None, None) for a file."""
        try:
            top, children = listing(p)
        except RemoteError as e:
            # Apache answers 400 to a file's name with "/" appended
            if isinstance(e, NotFound) or remote.stat(path).is_dir:
                raise
            return None, None
        if top is not None and not top.is_dir:   # nginx, dCache, the service list a file
            return None, None
        return top, children

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        queue = deque([(None, ex.submit(first, remote.url_for(path, collection=True)))])
        try:
            while queue:
                entry, fut = queue.popleft()
                try:
                    top, children = fut.result()
                except CtadataError as e:
                    if on_error is None or entry is None or _fails_everything(e):
                        raise
                    on_error(entry, e)
                    continue
                if children is None:
                    return
                # submitted in the order they are needed (the first one
                # first: submitted last, it waited for all the others)
                queue.extendleft(reversed([(e, ex.submit(listing, remote.url_for(e, True)))
                                           for e in children if e.is_dir]))
                yield top, children
        finally:
            for _entry, fut in queue:
                fut.cancel()


def _files_below(remote, folder, jobs, warn=None):
    """{path relative to *folder*: Entry} of every file below the remote
    *folder* (a path, URL or Entry of the backend *remote*): what a copy
    or an upload finds already there; empty when it does not exist."""
    index = {}
    root = remote.url_for(folder, collection=True)
    try:
        for _top, children in _walk(remote, folder, jobs, True, warn):
            for e in children:
                if not e.is_dir:
                    index[_rel_path(root, e.url)] = e
    except NotFound:
        pass
    return index


def _fails_everything(error):
    """True for an error that every other folder would meet too (no token,
    an expired or refused one: 401; bad settings), which stops a tree at
    once rather than failing each of its folders (a 403 is about one
    folder, and so is a ConfigError about one name: _cut_name_error)."""
    return isinstance(error, ConfigError) and error.path is None or (
        isinstance(error, AuthError) and error.status != 403)


def _unique(entries, warn=None):
    """Drop repeated names from a sorted listing (two downloads into one
    file would race), with a warning."""
    out = []
    for e in entries:
        if out and out[-1].name == e.name:
            if warn is not None:
                warn("skipping a second entry named %r in one listing" % e.name)
        else:
            out.append(e)
    return out


def _usage_by_child(entry, tree, sel=None):
    """Files, folders and bytes below the directory *entry*, counted from
    *tree* (what _walk yields for it) per immediate child: a list of
    {"name", "type", "files", "dirs", "bytes"} sorted by name.  *sel*
    counts only the files it accepts (and keeps the folders around them)."""
    root = entry.url if entry.url.endswith("/") else entry.url + "/"
    kids = {}
    for _top, children in tree:
        for e in children:
            rel = _rel_path(root, e.url)
            first, _, rest = rel.partition("/")
            rec = kids.get(first)
            if rec is None:
                rec = kids[first] = {"name": first, "files": 0, "dirs": 0, "bytes": 0,
                                     "type": "directory" if e.is_dir or rest else "file"}
            if e.is_dir:
                if rest:
                    rec["dirs"] += 1
            elif sel is None or sel(rel):
                rec["files"] += 1
                rec["bytes"] += e.size or 0
    children = [kids[k] for k in sorted(kids)]
    if sel is not None:  # only what the filter kept (and the folders around it)
        children = [c for c in children if c["files"] or c["type"] == "directory"]
    return children


class _Usage(dict):
    """What ``Client.du`` returns: a plain dict (``path``, ``files``,
    ``dirs``, ``bytes``, ``children``) that a notebook shows as a table."""

    __slots__ = ()

    def _repr_html_(self):
        kids = self.get("children") or []
        rows = [(c["name"] + ("/" if c["type"] == "directory" else ""), c["files"], c["dirs"],
                 _human_bytes(c["bytes"])) for c in kids[:_HTML_ROWS]]
        rows.append(("total", self["files"], self["dirs"], _human_bytes(self["bytes"])))
        return _html_table(("name", "files", "dirs", "bytes"), rows,
                           max(len(kids) - _HTML_ROWS, 0), self["path"] or "/",
                           right=(1, 2, 3))


# -- planners ----------------------------------------------------------------
# A planner turns one call (download a tree, upload a folder...) into tasks
# for a _WorkerPool: it lists, decides what is already there, makes the
# folders, and hands each file to the function that moves it.  The Client
# has one of each; the upload planner differs by mode (_Uploads: WebDAV PUT,
# _ServiceUploads: the download service's POST).


# Is a file already there (then a transfer skips it)?  rclone's rule: the
# same size and modification time, within the 1 s of an HTTP date.  A
# download gives the local file the server's mtime, so the two agree until
# either side changes (a reprocessed FITS file often keeps its size: FITS
# pads to blocks of 2,880 bytes).  No WebDAV server lets a client set a
# file's mtime (nginx, Apache, XRootD and dCache stamp an upload with the
# time it arrived), so for an upload "the same" means the same size and a
# remote copy not older than the local file: one made after the local file
# last changed.  With checksum=True (--checksum) the size and the checksums
# decide instead (a worker hashes the local file), where the server has
# checksums; where it has none, size and time do, and a warning says so once.
_MTIME_WINDOW = 1.0


def _same_time(local, remote, upload=False):
    """Do these modification times say "the same file" (see above)?  An
    unknown one (a server that lists none) leaves it to the size."""
    if local is None or remote is None:
        return True
    if upload:
        return remote > local - _MTIME_WINDOW
    return abs(remote - local) < _MTIME_WINDOW


class _Planner:
    """What the planners of one Client share: its backend *remote* (_DAV or
    _Service), the transport, the cancel event (Ctrl-C), the default number
    of parallel jobs and where warnings go."""

    max_jobs = _MAX_JOBS  # the adaptive number of transfers grows up to this

    def __init__(self, remote, tr, cancel, jobs, warn):
        self.remote, self.tr, self.cancel, self.jobs, self.warn = remote, tr, cancel, jobs, warn
        self.said_no_sums = False

    def walk(self, path, jobs=None, details=True, on_error=None):
        return _walk(self.remote, path, jobs or self.jobs, details, self.warn, on_error)

    def start(self, progress):
        """(start time, the Progress to feed) of a new transfer."""
        self.cancel.clear()
        self.said_no_sums = False
        return time.monotonic(), progress if progress is not None else Progress()

    def same(self, size, mtime, entry, checksum, upload=False):
        """Is the local file of *size* and *mtime* the one the remote *entry*
        (or None) describes?  "same" (skip it), "hash" (skip it if the
        checksums agree: a worker hashes it), or None (transfer it).  The
        rule is explained above _same_time."""
        if entry is None or entry.size is None or size != entry.size:
            return None
        if checksum:
            if entry.checksums:
                return "hash"
            if not self.said_no_sums:
                self.said_no_sums = True
                self.warn("the server has no checksums to compare (%s, for one): size and "
                          "modification time decide what is already there" % (
                              entry.path or _safe_url(entry.url)))
        return "same" if _same_time(mtime, entry.mtime, upload) else None

    def run(self, tasks, worker, jobs, progress, started, raise_on_failure, dry_run):
        """Run planned tasks on a worker pool (or, for a dry run, only list
        them as "planned") and summarize."""
        if dry_run:
            results = []
            for t in tasks:
                if isinstance(t, _Confirm):
                    continue
                if not isinstance(t, TransferResult):
                    t = TransferResult(t.source, t.dest, t.size, "planned")
                results.append(t)
            return _summarize(results, started, False)
        if isinstance(tasks, list):
            progress.planned()  # every file is known: the ETA is not a lower bound
        control = None
        if jobs is None and self.tr.settings.adaptive and self.remote.adaptive:
            control = _Concurrency(self.jobs, self.max_jobs, self.tr.meter, self.tr.close_mine)
        pool = _WorkerPool(worker, jobs or self.jobs, progress, self.cancel, self.tr.abort,
                           control)
        try:
            results = pool.run(tasks)
        except KeyboardInterrupt as e:
            # what was done before the interrupt (files in flight: "failed",
            # "interrupted"), e.g. for the CLI's --manifest
            e.summary = _summarize(getattr(e, "results", []), started, False)
            raise
        return _summarize(results, started, raise_on_failure)


def _in_folder(t, run):
    """run() for task *t*, then release its folder, unless the task is
    deferred (_Busy: it runs again later, in the same folder)."""
    try:
        res = run()
    except _Busy:
        raise
    except BaseException:
        t.folder.release()
        raise
    t.folder.release()
    return res


class _Downloads(_Planner):
    """Plans downloads: a file, a tree (listed as it goes), a list of URLs.
    Files go into _Folder objects of a _LocalTree (no symlink followed
    below the destination the user named)."""

    def download(self, path, dest, recursive, overwrite, checksum, select, dry_run,
                 progress, jobs, raise_on_failure, stage=None, chunk_size=None):
        """See Client.download; *chunk_size*: see _ChunkLog (service mode,
        the old functions)."""
        started, progress = self.start(progress)
        entry = self.remote.stat(self.remote.url_for(path))
        if not entry.is_dir:
            if dest is None:
                dest = entry.name
            elif _names_folder(dest) or os.path.isdir(dest):
                dest = os.path.join(dest, entry.name)
            # a list: every file is known at once (the ETA is no lower bound)
            tasks = list(self.file_tasks(entry, dest, overwrite, checksum, progress, dry_run))
            tasks, work = self.gate(tasks, progress, stage, dry_run)
            if chunk_size:   # (service mode: no tape to gate)
                work = self.worker(progress, chunk_size)
            return self.run(tasks, work, 1, progress, started, raise_on_failure, dry_run)
        if not recursive:
            raise ConfigError("%s is a directory" % (entry.path or "/"), hint="use recursive=True",
                              cli_hint="use get -r")
        if dest is None or _names_folder(dest):
            # the user named the folder to download into; the tree's own
            # folder is made below it
            root, top = dest or ".", [entry.name] if entry.name else []
        else:
            root, top = dest, []
        tasks = self.tree_tasks(entry, _LocalTree(root, dry_run), top, overwrite, checksum,
                                _selector(select), dry_run, progress, jobs)
        tasks, work = self.gate(tasks, progress, stage, dry_run)
        if chunk_size:
            work = self.worker(progress, chunk_size)
        return self.run(tasks, work, jobs, progress, started, raise_on_failure, dry_run)

    def gate(self, tasks, progress, stage, dry_run):
        """(tasks, worker) of a download: the place where files on tape are
        held back (_TapeDownloads); here, every file goes as it is."""
        return tasks, self.worker(progress)

    def file_tasks(self, entry, dest, overwrite, checksum, progress, dry_run):
        """The task of one file download to the path *dest*: its folder is
        the user's (followed if a symlink, made when missing)."""
        where, name = os.path.split(dest)
        tree = _LocalTree(where, dry_run)
        try:
            folder = tree.folder([], create=False)
        finally:
            tree.close()
        try:
            yield self.task(entry, folder, name, overwrite, checksum, progress)
        finally:
            folder.release()

    def tree_tasks(self, entry, tree, top, overwrite, checksum, sel, dry_run, progress, jobs):
        """The tasks of a tree download into the folder *top* (a list of
        names) of *tree*, listed folder by folder; local folders are made as
        it goes (without a filter, empty ones too: the tree is mirrored)."""
        base = entry.url if entry.url.endswith("/") else entry.url + "/"
        bad = []  # local folders that cannot be made: nothing is written below them
        unlisted = []  # (entry, error) of remote folders that cannot be listed
        try:
            for top_entry, children in self.walk(entry, jobs, on_error=lambda e, exc:
                                                 unlisted.append((e, exc))):
                for res in self.unlisted(unlisted, base, top, tree):
                    yield res
                rel = top + _rel_parts(base, top_entry.url if top_entry is not None else base)
                files = self.no_part_clash([e for e in children if not e.is_dir and (
                    sel is None or sel("/".join(rel[len(top):] + [e.name])))])
                if not (files or sel is None) or any(rel[:len(b)] == b for b in bad):
                    continue
                _safe_join(tree.root, rel)  # every name checked before anything is made
                try:
                    folder = tree.folder(rel, create=not dry_run)
                except TransferError as e:
                    bad.append(rel)
                    yield _failed(top_entry.url if top_entry is not None else base,
                                  os.path.join(tree.root, *rel), None, e)
                    continue
                try:
                    for e in files:
                        _safe_join(folder.path, [e.name])
                        yield self.task(e, folder, e.name, overwrite, checksum, progress)
                finally:
                    folder.release()
            for res in self.unlisted(unlisted, base, top, tree):
                yield res
        finally:
            tree.close()

    @staticmethod
    def unlisted(failures, base, top, tree):
        """One failed result per remote folder that could not be listed."""
        while failures:
            e, exc = failures.pop(0)
            yield _failed(e.url, os.path.join(tree.root, *(top + _rel_parts(base, e.url))),
                          None, exc)

    def no_part_clash(self, files):
        """Drop "x.part" (and "x.part.meta") when "x" is in the same listing:
        downloading x goes through x.part, which would mix the two files."""
        names = set(e.name for e in files)
        keep = []
        for e in files:
            stem = e.name[:-5] if e.name.endswith(".part") else \
                e.name[:-10] if e.name.endswith(".part.meta") else None
            if stem is not None and stem in names:
                self.warn("skipping %r: it would clash with the partial download of %r"
                          % (e.name, stem))
            else:
                keep.append(e)
        return keep

    def task(self, entry, folder, name, overwrite, checksum, progress):
        """The _Task of downloading *entry* to *name* in *folder* (which the
        task then holds), or the "skipped" result when the same file is
        there (same(): a regular file of the same size and mtime; with
        *checksum*, size and checksum, which a worker compares).  A symlink
        at the final name is never "there": the download replaces it."""
        import stat
        check = False
        dest = folder.join(name)
        if not overwrite and not folder.created and entry.size is not None:
            try:
                st = folder.lstat(name)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                self.warn("%s is a symbolic link: the download replaces it" % dest)
            elif st is not None and stat.S_ISREG(st.st_mode):
                how = self.same(st.st_size, st.st_mtime, entry, checksum)
                if how == "same":
                    res = TransferResult(entry.url, dest, entry.size, "skipped")
                    res.mtime = entry.mtime
                    return res
                check = how == "hash"  # hashing the local copy is left to a worker
        progress.add_total(1, entry.size)
        return _Task(entry.url, dest, entry.size, entry, check, new_folder=folder.created,
                     folder=folder.hold(), name=name, overwrite=overwrite)

    def worker(self, progress, chunk_size=None):
        tr, cancel, resume, warn = self.tr, self.cancel, self.remote.resumable, self.warn

        def work(t):
            if t.check:
                f = t.folder.read(t.name)
                if f is not None and _file_matches(f, t.entry.checksums):
                    t.folder.release()
                    return TransferResult(t.source, t.dest, t.size, "skipped")
            if chunk_size:
                return _in_folder(t, lambda: _chunked_download(tr, t, progress, cancel,
                                                               chunk_size))
            return _in_folder(t, lambda: _download_file(tr, t, progress, cancel, resume,
                                                        warn))
        return work

    def from_list(self, items, dest, strip_prefix, overwrite, dry_run, progress, jobs,
                  raise_on_failure):
        """See Client.download_list."""
        started, progress = self.start(progress)
        prefix = strip_prefix and (self.remote.url_for(strip_prefix)
                                   if "://" not in strip_prefix else strip_prefix)
        tasks = self.list_tasks(items, _LocalTree(dest, dry_run), prefix, overwrite, progress,
                                dry_run)
        return self.run(tasks, self.list_worker(overwrite, progress), jobs, progress,
                        started, raise_on_failure, dry_run)

    def list_tasks(self, items, tree, prefix, overwrite, progress, dry_run):
        folder = None  # the folder of the previous item (lists come sorted, often)
        try:
            for line in items:
                item = line.strip()
                if not item or item.startswith("#"):
                    continue
                try:
                    url, parts = self.list_item(item, prefix)
                    dest = _safe_join(tree.root, parts)
                    if folder is None or folder.path != os.path.dirname(dest):
                        if folder is not None:
                            folder.release()
                            folder = None
                        folder = tree.folder(parts[:-1], create=not dry_run)
                except CtadataError as e:
                    yield _failed(item, None, None, e)
                    continue
                progress.add_total(1, 0)
                yield _Task(url, dest, None, folder=folder.hold(), name=parts[-1],
                            overwrite=overwrite)
        finally:
            if folder is not None:
                folder.release()
            tree.close()

    def list_item(self, item, prefix):
        """(URL, local path segments) of one line of a URL list: the local
        path is what follows *prefix* in the URL, else its whole path (for a
        remote path: that path)."""
        from urllib.parse import quote, unquote, urlsplit
        url = self.remote.url_for(item)
        if prefix:
            if not url.startswith(prefix):
                raise ConfigError("not below --strip-prefix %s" % _safe_url(prefix))
            rest = url[len(prefix):]
        elif "://" in item:
            rest = urlsplit(url).path
        else:  # a remote path: its place below the storage URL
            rest = quote(_normpath(item))
        parts = [unquote(p) for p in rest.split("/") if p]
        if not parts:
            raise ConfigError("no file name in this URL")
        return url, parts

    def list_worker(self, overwrite, progress):
        """Files of a URL list come without a listing: a present file is
        skipped when HEAD says it is the same (size and Last-Modified)."""
        import stat
        tr, cancel, warn = self.tr, self.cancel, self.warn

        def present(t):
            try:
                st = None if overwrite or t.wait else t.folder.lstat(t.name)
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode):
                resp = tr.request("HEAD", t.source, ok=(200,), what="check")
                there = Entry("", "", t.source, False, _count(resp.getheader("Content-Length")),
                              _parse_http_date(resp.getheader("Last-Modified")))
                tr.release(resp)
                if self.same(st.st_size, st.st_mtime, there, False) == "same":
                    return TransferResult(t.source, t.dest, there.size, "skipped")
            return _download_file(tr, t, progress, cancel, True, warn)
        return lambda t: _in_folder(t, lambda: present(t))


class _Uploads(_Planner):
    """Plans uploads with WebDAV PUT (direct mode); _ServiceUploads changes
    what differs through the download service."""

    max_jobs = _MAX_PUT_JOBS

    def upload(self, local, remote, recursive, verify, overwrite, checksum, select,
               dry_run, progress, jobs, raise_on_failure):
        """See Client.upload."""
        started, progress = self.start(progress)
        local = os.fspath(local)
        remote = self.target(str(remote or ""))
        name = os.path.basename(os.path.normpath(local))
        target = remote + name if _names_folder(remote) else remote
        if os.path.isdir(local):
            if not recursive:
                raise ConfigError("%s is a directory" % local, hint="use recursive=True",
                                  cli_hint="use put -r")
            return self.tree(local, target, verify, overwrite, checksum, _selector(select),
                             dry_run, progress, jobs, started, raise_on_failure)
        if not os.path.isfile(local):
            raise ConfigError(("not a regular file: %s" if os.path.exists(local) else
                               "no such local file: %s") % local)
        st = os.stat(local)
        have = None if overwrite else self.present(target)
        how = self.same(st.st_size, st.st_mtime, have, checksum, upload=True)
        if how == "same":   # a re-run skips it, as it skips the files of a tree
            task = TransferResult(local, have.url, st.st_size, "skipped", remote_path=target)
        else:
            progress.add_total(1, st.st_size)
            task = _Task(local, self.url(target), st.st_size, have, how == "hash", target)

        def work(t):
            if t.check and _file_matches(t.source, t.entry.checksums):
                return TransferResult(t.source, t.dest, t.size, "skipped", remote_path=t.remote)
            return self.send(t, verify, progress)
        summary = self.run([task], work, 1, progress, started, raise_on_failure, dry_run)
        for r in summary.results:
            if r.remote_path is None:
                r.remote_path = target
        summary.remote_path = summary.results[0].remote_path
        return summary

    def tree(self, local, target, verify, overwrite, checksum, sel, dry_run, progress, jobs,
             started, raise_on_failure):
        """Upload the local folder *local* as the remote folder *target*."""
        base = target.rstrip("/")
        existing = {} if overwrite else self.existing(target)
        ensure = self.folder_maker(base, dry_run)
        area = []  # service mode: the caller's folder, as the service names it
        tasks = self.tree_tasks(local, base, existing, checksum, sel, ensure, progress,
                                not dry_run)
        summary = self.run(tasks, self.tree_worker(verify, progress, area), jobs, progress,
                           started, raise_on_failure, dry_run)
        summary.remote_path = self.tree_path(base, area)
        return summary

    def tree_tasks(self, local, base, existing, checksum, sel, ensure, progress,
                   confirm=True):
        """The tasks of a tree upload, folder by folder, remote folders made
        as it goes.  A folder that cannot be read, or made on the server,
        is one failed result; the others go on.  Only regular files, and
        symlinks to regular files, are uploaded (see file_task).  With
        *confirm*, each remote folder's uploads are confirmed once its last
        one is done (see _Confirm)."""
        unreadable = []
        for dirpath, dirnames, filenames in os.walk(local, onerror=unreadable.append):
            for res in self.unreadable(unreadable):
                yield res
            dirnames.sort()
            for d in dirnames:  # os.walk does not follow them: say so
                if os.path.islink(os.path.join(dirpath, d)):
                    self.warn("skipping %s: a symbolic link to a folder (not followed)"
                              % os.path.join(dirpath, d))
            rel = os.path.relpath(dirpath, local)
            rparts = [] if rel == "." else rel.split(os.sep)
            rdir = "/".join([base] + rparts if base else rparts)
            names = [fn for fn in sorted(filenames)
                     if sel is None or sel("/".join(rparts + [fn]))]
            if names or sel is None:
                try:
                    ensure(base)
                    ensure(rdir)
                except CtadataError as e:
                    if _fails_everything(e):
                        raise
                    dirnames[:] = []  # nothing below it either
                    yield _failed(dirpath, self.url(rdir), None, e, remote_path=rdir)
                    continue
            check = self.confirmer(rdir, rparts, names, existing) if confirm else None
            for fn in names:
                task = self.file_task(os.path.join(dirpath, fn), rdir, existing.get(
                    "/".join(rparts + [fn])), checksum, progress)
                if check is not None and isinstance(task, _Task):
                    task.confirm = check.add()
                yield task
            if check is not None:
                yield check  # the folder's last task: a worker confirms it (or its last upload)
        for res in self.unreadable(unreadable):
            yield res

    def file_task(self, path, rdir, have, checksum, progress):
        """The _Task of uploading the local file *path* into the remote
        folder *rdir* (where *have*, an Entry or None, is what is there
        now), or its result: skipped when the same file is there (same()),
        or when it is not a regular file or a symlink to one (FIFOs,
        sockets, devices, links to nothing or to those: with a warning);
        failed when it cannot be read."""
        import stat
        fn = os.path.basename(path)
        rpath = (rdir + "/" + fn) if rdir else fn
        try:
            st = os.stat(path)  # a symlink to a regular file is uploaded
        except OSError as e:
            if os.path.islink(path):
                self.warn("skipping %s: a symbolic link to nothing" % path)
                return TransferResult(path, rpath, None, "skipped", remote_path=rpath)
            return TransferResult(path, rpath, None, "failed", str(_local_error(e, path)))
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block for ever
            self.warn("skipping %s: not a regular file (%s)" % (path, _file_kind(st.st_mode)))
            return TransferResult(path, rpath, None, "skipped", remote_path=rpath)
        how = self.same(st.st_size, st.st_mtime, have, checksum, upload=True)
        if how == "same":
            return TransferResult(path, have.url, st.st_size, "skipped", remote_path=rpath)
        progress.add_total(1, st.st_size)
        return _Task(path, self.url(rpath), st.st_size, have, check=how == "hash",
                     remote=rpath)

    @staticmethod
    def unreadable(errors):
        """One failed result per local folder that could not be read."""
        while errors:
            e = errors.pop(0)
            yield _failed(e.filename, None, None, _local_error(e, e.filename))

    # -- what differs between WebDAV and the download service -------------------

    def target(self, remote):
        """The remote path asked for, normalised (a URL is kept)."""
        if "://" in remote:
            return remote
        return _normpath(remote) if remote.strip("/") else ""

    def url(self, rpath):
        return self.remote.url_for(rpath)

    def send(self, t, verify, progress):
        """PUT one file; a 409 (a missing parent folder: Apache does not make
        them) makes the folders, then tries once more."""
        try:
            res = _upload_file(self.tr, t.source, t.dest, t.size, verify, progress)
        except NotFound:
            raise
        except RemoteError as e:
            parent = t.remote.rstrip("/").rpartition("/")[0] if "://" not in t.remote else None
            if e.status != 409 or not parent:
                raise
            self.remote.mkdir(parent, parents=True)
            res = _upload_file(self.tr, t.source, t.dest, t.size, verify, progress)
        _Confirm.one(self.remote, res)
        return res

    def present(self, target):
        """The Entry of the remote file *target*, or None when there is no
        file there (or the server will not say: then the upload goes)."""
        try:
            entry = self.remote.stat(target)
        except (NotFound, ProtocolError):
            return None
        except RemoteError as e:   # e.g. a server that refuses PROPFIND
            _log(10, "could not look at %s before uploading: %s", target, e)
            return None
        return None if entry.is_dir else entry

    def existing(self, target):
        """{relative path: Entry} of the files below a remote folder (empty
        when it does not exist yet)."""
        return _files_below(self.remote, target, self.jobs, self.warn)

    def folder_maker(self, base, dry_run):
        """A function that makes a remote folder once, parents first
        (Apache does not make them on PUT); nothing for a dry run."""
        made = set()

        def ensure(rdir):
            if dry_run or rdir in made or not rdir:
                return
            parent = rdir.rpartition("/")[0]
            if parent and parent not in made and parent != base:
                ensure(parent)
            if rdir == base:
                self.remote.mkdir(base, parents=True)
            else:
                self.remote.mkcol(self.remote.url_for(rdir, True), exist_ok=True)
            made.add(rdir)
        return ensure

    def confirmer(self, rdir, rparts, names, existing):
        """The _Confirm of the remote folder *rdir* (holding the local
        *names*; *existing*: what the remote tree held before)."""
        known = set(names)
        known.update(n for n in (e.name for k, e in existing.items()
                                 if k.rpartition("/")[0] == "/".join(rparts)))
        return _Confirm(self.remote, self.remote.url_for(rdir, True), known)

    def tree_worker(self, verify, progress, area):
        tr = self.tr

        def upload(t):
            if t.check and _file_matches(t.source, t.entry.checksums):
                return TransferResult(t.source, t.dest, t.size, "skipped",
                                      remote_path=t.remote)
            res = _upload_file(tr, t.source, t.dest, t.size, verify, progress)
            res.remote_path = t.remote
            return res

        def work(t):
            if isinstance(t, _Confirm):
                t.close()
                return None
            if t.confirm is None:
                return upload(t)
            res = None
            try:
                res = upload(t)
            finally:
                t.confirm.done(os.path.basename(t.source), res)
            return res
        return work

    def tree_path(self, base, area):
        """Where the tree is on the storage."""
        return base


class _Confirm:
    """Confirms from the server that a remote folder's uploads are there,
    each under its own name with its size: one PROPFIND Depth 1 once the
    folder's last upload is done, in the worker pool (so it overlaps with
    the next folders' uploads).  A file not listed, or listed with another
    size, becomes a failed result (a storage may keep "question?.txt" as
    "question" and still answer 201); nothing is deleted.  The planner
    add()s each task and then hands the _Confirm itself to the pool as the
    folder's last task (close()); workers report each upload with done()."""

    def __init__(self, dav, url, known):
        self.dav, self.url, self.known = dav, url, known
        self.lock = _thread.allocate_lock()
        self.pending, self.closed, self.sent = 0, False, {}

    def add(self):
        with self.lock:
            self.pending += 1
        return self

    def done(self, name, res):
        with self.lock:
            if res is not None and res.status == "transferred":
                self.sent[name] = res
            self.pending -= 1
            now = self.closed and not self.pending
        if now:
            self.check()

    def close(self):
        with self.lock:
            self.closed = True
            now = not self.pending
        if now:
            self.check()

    def check(self):
        if not self.sent:
            return
        try:
            listed = dict((e.name, e) for e in self.dav.propfind(self.url, 1,
                                                                 details="sizes"))
        except CtadataError as e:
            for res in self.sent.values():
                _Confirm.fail(res, "could not confirm the upload: %s" % e)
            return
        strays = sorted(n for n in listed if n not in self.known and not listed[n].is_dir)
        for name, res in self.sent.items():
            _Confirm.compare(res, name, listed.get(name), strays)

    @staticmethod
    def compare(res, name, entry, strays=()):
        if entry is None or entry.is_dir:
            what = "; it lists %s" % ", ".join(strays[:3]) if 0 < len(strays) <= 3 else ""
            _Confirm.fail(res, "the server does not list %s after the upload%s" % (name, what))
        elif entry.size is not None and entry.size != res.size:
            _Confirm.fail(res, "the server lists %s with %d bytes after the upload, not %d"
                          % (name, entry.size, res.size))

    @staticmethod
    def fail(res, message):
        res.status, res.error = "failed", message
        res.exception = TransferError(message, res.dest)

    @staticmethod
    def answer(res, rpath):
        """Confirm an upload through the download service from its answer:
        the path it reports must end with the one asked for."""
        got = res.remote_path or ""
        if rpath and got != rpath and not got.endswith("/" + rpath):
            _Confirm.fail(res, "the download service stored %s as %s" % (rpath, got))
        return res

    @staticmethod
    def one(dav, res):
        """Confirm a single upload: PROPFIND Depth 0 of its URL (not of a
        folder that may hold 100,000 files); the name in the answer's href
        must be the one asked for (a server that maps the URL to another
        file answers for that one)."""
        from urllib.parse import unquote, urlsplit
        name = unquote(urlsplit(res.dest).path.rstrip("/").rpartition("/")[2])
        try:
            entry = dav.stat(res.dest)
        except NotFound:
            entry = None
        except CtadataError as e:
            _Confirm.fail(res, "could not confirm the upload: %s" % e)
            return
        _Confirm.compare(res, name, entry if entry is None or entry.name == name else None,
                         [entry.name] if entry is not None and entry.name != name else ())


class _ServiceUploads(_Uploads):
    """Uploads through the download service: POST /upload/{path}; everything
    lands in the caller's own folder, which the service's answers name."""

    def target(self, remote):
        if "://" in remote:
            raise ConfigError("in service mode the destination is a path in your "
                              "own folder, not a URL: %r" % _safe_url(remote))
        trailing = "/" if remote.endswith("/") else ""
        path = self.remote.path_of(remote)
        return path + trailing if path else ""

    def url(self, rpath):
        return self.remote.url("upload", rpath)

    def send(self, t, verify, progress):
        return _Confirm.answer(_upload_service_file(self.tr, t.source, t.dest, t.size,
                                                    progress), t.remote)

    def existing(self, target):
        return {}  # the service offers no listing of what is already there to skip

    def present(self, target):
        return None  # (nor a stat of it: the path in the caller's folder is not known yet)

    def folder_maker(self, base, dry_run):
        return lambda rdir: None  # the service makes folders itself

    def confirmer(self, rdir, rparts, names, existing):
        return None  # each answer says where the file went: see _upload_service_file

    def tree_worker(self, verify, progress, area):
        tr = self.tr

        def work(t):
            res = _Confirm.answer(_upload_service_file(tr, t.source, t.dest, t.size, progress),
                                  t.remote)
            if not area and res.remote_path.endswith("/" + t.remote):
                area.append(res.remote_path[:-len(t.remote)])
            return res
        return work

    def tree_path(self, base, area):
        return area[0] + base if area else None


# -- files on tape -----------------------------------------------------------
# A file the listing reports as not on disk (FileLocality NEARLINE: on tape
# only; LOST; UNAVAILABLE) is never asked for with GET: a door would hold the
# request for a whole recall, or fail it after minutes.  A plain download
# fails such a file at once, with a hint; a download with staging (get
# --stage, get --stage-id) stages it and hands it to a worker as soon as it
# is on disk.  _TapeGate does both by wrapping the planner's task stream:
# _WorkerPool pulls tasks from it, so the files on disk download while the
# others are staged, and each staged file starts when a poll finds it on disk.


class _StageOptions:
    """How a download stages: *lifetime* of its stage requests (ISO 8601
    text, or None for the server's default); *release* each staged file
    after its download."""

    __slots__ = ("lifetime", "release")

    def __init__(self, lifetime=None, release=False):
        self.lifetime, self.release = lifetime, release


def _tape_failure(task, message, hint=None):
    """The failed result of a file that cannot be read from disk."""
    return _failure_of(task, TransferError(message, task.source, hint=hint, retryable=False))


class _TapeGate:
    """The task stream of one download, with the files on tape taken care
    of.  Without *stage* (a _StageOptions) each is a failed result at once.
    With it, each is held back, staged in requests of 1,000 while the
    listing goes on, and once the listing is done the requests are polled
    (with back-off) and each file is handed out as soon as it is on disk; a
    failure (lost on tape...) becomes a failed result with the server's
    reason.  adopt() waits for a file of an earlier request instead
    (--stage-id).  worker() wraps the download worker for *stage.release*."""

    def __init__(self, planner, stage, progress):
        from collections import deque
        self.planner, self.tape, self.stage, self.progress = (planner, planner.tape, stage,
                                                              progress)
        self.held = {}         # request id -> {API path: task}, files not on disk yet
        self.batch = []        # [(API path, task)] to stage
        self.where = {}        # task -> (request id, API path), for release
        self.ready = deque()   # tasks (and failed results) to hand out
        self.ids = []          # the stage requests this download made

    @staticmethod
    def on_tape(task):
        return isinstance(task, _Task) and task.entry is not None and \
            task.entry.locality in _NOT_ON_DISK

    @staticmethod
    def matches(t):
        """The local copy (a regular file, never through a symlink) has the
        server's checksums; its folder is then released (no download)."""
        f = t.folder.read(t.name) if t.folder is not None else None
        if f is not None and _file_matches(f, t.entry.checksums):
            t.folder.release()
            return True
        return False

    def tasks(self, tasks):
        for t in tasks:
            if not self.on_tape(t):
                yield t
            elif t.check and self.matches(t):
                res = TransferResult(t.source, t.dest, t.size, "skipped")
                res.mtime = t.entry.mtime
                yield res
            elif self.stage is None:
                yield self.refuse(t)
            else:
                self.hold(t)
            while self.ready:
                yield self.ready.popleft()
        if self.stage is not None:
            self.submit()
            self.progress.planned()
            for item in self.poll():
                yield item

    @staticmethod
    def refuse(t):
        where = t.entry.locality
        if where == "NEARLINE":
            return _tape_failure(t, "on tape only (NEARLINE)",
                                 'use "ctadata stage" or "get --stage"')
        if where == "LOST":
            return _tape_failure(t, "lost on tape (LOST): the storage cannot read it",
                                 "ask the storage's operators")
        return _tape_failure(t, "unavailable (UNAVAILABLE): its tape or disk is offline",
                             "try again later")

    def hold(self, t):
        try:
            path = self.tape.api_path(t.source)
        except CtadataError as e:
            self.ready.append(_failure_of(t, e))
            return
        self.batch.append((path, t))
        if len(self.batch) >= _STAGE_BATCH:
            self.submit()
        self.progress.staging(self.waiting())

    def adopt(self, rid, api_path, task):
        """Wait for *task*'s file, which the earlier request *rid* stages."""
        self.held.setdefault(rid, {})[_api_clean(api_path)] = task
        self.where[task] = (rid, api_path)

    def submit(self):
        batch, self.batch = self.batch, []
        if not batch:
            return
        try:
            rid = self.tape.stage([p for p, _t in batch], self.stage.lifetime)
        except CtadataError as e:
            self.ready.extend(_failure_of(t, e) for _p, t in batch)
            return
        self.ids.append(rid)
        _log(20, "stage request %s: %d files (get --stage-id %s follows it again)",
             rid, len(batch), rid)
        for path, t in batch:
            self.adopt(rid, path, t)

    def waiting(self):
        return len(self.batch) + sum(len(files) for files in self.held.values())

    def poll(self):
        """Hand out held files as polls find them on disk (or failed)."""
        while self.ready:
            yield self.ready.popleft()
        pace = _Pace(*self.tape.poll)
        news = True
        while self.held:
            self.progress.staging(self.waiting())
            self.planner.tr.sleep(pace.next(news))   # Ctrl-C: KeyboardInterrupt
            news = False
            for rid in list(self.held):
                news = self.check(rid) or news
            while self.ready:
                yield self.ready.popleft()
        self.progress.staging(0)

    def check(self, rid):
        """Poll one request; True when some of its files are done."""
        files = self.held[rid]
        try:
            found = self.tape.status(rid)
        except NotFound as e:
            self.forgotten(rid, e)
            return True
        except CtadataError as e:   # after the transport's retries: these files fail
            self.ready.extend(_failure_of(t, e) for t in files.values())
            del self.held[rid]
            return True
        news = False
        for f in found:
            t = files.pop(_api_clean(f.api_path), None) if (f.on_disk or f.done) else None
            if t is None:
                continue
            news = True
            self.ready.append(t if f.on_disk else _tape_failure(t, "staging failed: %s"
                                                                % f.problem))
        if files and all(f.done for f in found):
            # a finished request that does not list some of our files
            self.ready.extend(_tape_failure(t, "not in the answer of stage request %s" % rid)
                              for t in files.values())
            files.clear()
        if not files:
            del self.held[rid]
        return news

    def forgotten(self, rid, err):
        """The server forgot request *rid* (404) before all its files were
        seen on disk: archiveinfo says which ones are."""
        files = self.held.pop(rid)
        try:
            found = self.tape.archive_info(list(files))
        except CtadataError as e:
            found, err = {}, e
        for path, t in files.items():
            locality = found.get(path, (None, None))[0]
            if locality in _API_ON_DISK:
                self.ready.append(t)
            else:
                self.ready.append(_tape_failure(
                    t, "stage request %s is gone (%s) and the file is not on disk" % (
                        rid, err.message if isinstance(err, CtadataError) else err),
                    "stage it again"))

    def worker(self, inner):
        """The download worker, releasing each staged file after its
        download when *stage.release* says so (a failed release is a
        warning: the file itself is fine)."""
        if self.stage is None or not self.stage.release:
            return inner
        tape, where, warn = self.tape, self.where, self.planner.warn

        def work(t):
            res = inner(t)
            place = where.get(t)
            if place is not None and res.status == "transferred":
                try:
                    tape.release(place[0], [place[1]])
                except CtadataError as e:
                    warn("could not release %s: %s" % (place[1], e))
            return res
        return work


class _TapeDownloads(_Downloads):
    """Downloads that know about tape (_TapeGate), and the Client's tape
    calls: stage, stage_request, archive_info and the download of the
    files of an earlier stage request.  *tape* is the storage's _TapeAPI
    (_NoTape in service mode)."""

    def __init__(self, remote, tr, cancel, jobs, warn, tape):
        _Downloads.__init__(self, remote, tr, cancel, jobs, warn)
        self.tape = tape

    def gate(self, tasks, progress, stage, dry_run):
        if stage is not None:
            self.tape.require()
            if dry_run:
                return tasks, self.worker(progress)
        gate = _TapeGate(self, stage, progress)
        gated = gate.tasks(tasks)
        if isinstance(tasks, list) and stage is None:
            gated = list(gated)  # still every file known at once (ETA no lower bound)
        return gated, gate.worker(self.worker(progress))

    # -- stage, look up, archive info --------------------------------------------

    def stage(self, paths, lifetime, recursive, select):
        """See Client.stage."""
        life = _lifetime(lifetime)
        self.tape.require()
        ids, files, batch, seen = [], [], [], set()
        try:
            for e in self.stage_files(paths, recursive, select):
                path = self.tape.api_path(e.url)
                if path not in seen:
                    seen.add(path)
                    batch.append((path, e))
                if len(batch) == _STAGE_BATCH:
                    self.submit(batch, life, ids, files)
                    batch = []
            if batch:
                self.submit(batch, life, ids, files)
        except CtadataError as e:
            _say_submitted(e, ids)
            raise
        if not ids:
            raise ConfigError("nothing to stage: no file selected")
        return StageRequest(self.tape, ids, files)

    def submit(self, batch, lifetime, ids, files):
        rid = self.tape.stage([p for p, _e in batch], lifetime)
        ids.append(rid)
        files.extend(StagedFile(e.path, p, rid) for p, e in batch)

    def stage_files(self, paths, recursive, select):
        """The file entries of *paths*: files as they are, directories (with
        *recursive*) listed, their files filtered by *select*."""
        sel = _selector(select)
        for target in [paths] if isinstance(paths, (str, Entry)) else paths:
            if isinstance(target, Entry) and not target.is_dir:
                yield target
                continue
            entry = self.remote.stat(self.remote.url_for(target))
            if not entry.is_dir:
                yield entry
                continue
            if not recursive:
                raise ConfigError("%s is a directory" % (entry.path or "/"),
                                  hint="use recursive=True", cli_hint="use stage -r")
            root = self.remote.url_for(entry, collection=True)
            for _top, children in self.walk(entry, details=False):
                for e in children:
                    if not e.is_dir and (sel is None or sel(_rel_path(root, e.url))):
                        yield e

    def stage_request(self, request_id):
        """See Client.stage_request."""
        self.tape.require()
        return StageRequest(self.tape, _split_ids(request_id, "stage request id")).refresh()

    def archive_info(self, paths):
        """See Client.archive_info."""
        self.tape.require()
        api = {}
        for p in [paths] if isinstance(paths, (str, Entry)) else paths:
            key = p.path if isinstance(p, Entry) else str(p)
            api[key] = self.tape.api_path(self.remote.url_for(p))
        found = self.tape.archive_info(list(api.values()))
        out = {}
        for key, path in api.items():
            locality, error = found.get(path, (None, "no answer"))
            if error:
                self.warn("archive info of %s: %s" % (key, error))
            out[key] = locality
        return out

    # -- the files of an earlier stage request (get --stage-id) ----------------

    def download_request(self, request, dest, overwrite, checksum, release, dry_run,
                         progress, jobs, raise_on_failure):
        """See Client.download_staged."""
        started, progress = self.start(progress)
        req = request.refresh() if isinstance(request, StageRequest) else \
            self.stage_request(request)
        gate = _TapeGate(self, _StageOptions(None, release), progress)
        tasks = self.request_tasks(req, dest, overwrite, checksum, gate, progress, dry_run)
        if not dry_run:
            tasks = gate.tasks(tasks)
        return self.run(tasks, gate.worker(self.worker(progress)), jobs, progress, started,
                        raise_on_failure, dry_run)

    def request_tasks(self, req, dest, overwrite, checksum, gate, progress, dry_run):
        """The tasks of downloading the files of *req* below *dest* (each at
        its remote path), listed folder by folder.  A file on disk goes at
        once; one still staging waits for its request; one whose disk copy
        is gone already is staged again; a failed one fails."""
        folders = {}
        for f in req.files:
            if self.tape.remote_path(f.api_path) is None:
                yield _tape_failure(_Task(f.api_path, None, None), "not below the storage "
                                    "URL (tape_prefix maps the storage URL's path)")
            else:
                folders.setdefault(f.path.rpartition("/")[0], []).append(f)
        seen = set()
        tree = _LocalTree(dest, dry_run)   # no symlink followed below dest
        for folder in sorted(folders):
            try:
                listing = {e.name: e for e in self.remote.children(folder + "/")}
            except NotFound:
                listing = {}
            except CtadataError as e:
                for f in folders[folder]:
                    yield _failure_of(_Task(self.remote.url_for(f.path), None, None), e)
                continue
            for f in folders[folder]:
                if f.path in seen:
                    continue
                seen.add(f.path)
                for item in self.request_task(f, listing, tree, overwrite, checksum, gate,
                                              progress, dry_run):
                    yield item

    def request_task(self, f, listing, tree, overwrite, checksum, gate, progress, dry_run):
        e = listing.get(f.path.rpartition("/")[2])
        if e is None or e.is_dir:
            yield _tape_failure(_Task(self.remote.url_for(f.path), None, None),
                                "no such file (it was in stage request %s)" % f.request)
            return
        parts = f.path.split("/")
        _safe_join(tree.root, parts)
        try:
            folder = tree.folder(parts[:-1], create=not dry_run)
        except TransferError as err:   # a symlink or a file on the way: this file fails
            yield _failure_of(_Task(e.url, None, e.size), err)
            return
        try:
            t = self.task(e, folder, parts[-1], overwrite, checksum, progress)
        finally:
            folder.release()    # the task holds its own reference
        if not isinstance(t, _Task):
            yield t                 # already there
        elif e.locality in _NOT_ON_DISK and f.done and f.state != "COMPLETED":
            yield _tape_failure(t, "staging failed: %s" % f.problem)
        elif dry_run or e.locality not in _NOT_ON_DISK or f.done:
            gate.where[t] = (f.request, f.api_path)
            yield t                 # on disk now, or gone from disk: the gate stages it again
        else:
            gate.adopt(f.request, f.api_path, t)


############################################################################
# Remote files (reading without downloading)
############################################################################

# A remote file read in place.  _RemoteFile is a seekable, read-only binary
# file that fetches what a reader asks for with HTTP Range requests (RFC
# 9110 §14: one "bytes=FIRST-LAST" range per GET), in blocks kept in a small LRU cache, and
# reads ahead (doubling, up to _READ_AHEAD) while the reads are
# sequential: h5py, astropy.io.fits and zipfile then read only the parts
# they need.  No If-Range: Apache takes a fresh file's validators as weak
# and answers a whole 200; every answer's ETag and Last-Modified must be
# those of the first one instead (a file changed meanwhile is an error).  The download service ignores Range: there the file reads
# from start to end only (seek raises).  _copy_to streams a whole file to
# a binary stream (`ctadata cat`), verified against the server's checksum.

# Block size and cache of open(), measured with tests/bench/open_blocks.py
# (nginx; requests / bytes for blocks of 64K, 256K, 1M, 4M): h5py keys() of
# a 1 GiB file 1 request / 64K, 256K, 1M, 4M; keys, attributes and two
# slices 3 / 148K, 542K, 2.1M, 8.4M; astropy, five HDUs and a column of a
# 192 MiB file 4 / 219K, 809K, 3.2M, 12.6M; zipfile, listing and two
# members of 100 MiB 3 / 1.3M, 1.8M, 4.2M, 4.2M (2 requests).  The request
# counts hardly change, so small blocks win on these; but a reader that
# jumps about within a region pays a round trip (~20 ms over a wide-area
# link: 2 MB at 100 MB/s) per block it misses, and 256 KiB costs 2.6 ms.
_OPEN_BLOCK = 256 << 10
_OPEN_CACHE = 32 << 20
# The most a sequential reader fetches ahead in one request.
_READ_AHEAD = 8 << 20


class _RemoteFile(io.RawIOBase):
    """A remote file opened for reading (Client.open): read, readinto,
    seek, tell, readall, close, a context manager; ``name`` (the remote
    path), ``size``, ``mode`` ("rb"), ``url``, and what it cost so far:
    ``requests`` (GETs sent) and ``fetched`` (bytes received).  Not safe
    to share between threads (as no file object is)."""

    def __init__(self, tr, entry, block_size=None, cache_size=None, ranges=True,
                 cancel=None):
        io.RawIOBase.__init__(self)
        self.tr, self.entry, self.url, self.name = tr, entry, entry.url, entry.path
        self.size = entry.size
        self.mode = "rb"
        self.block = _positive(block_size, _OPEN_BLOCK, "block_size", int)
        self.cache_blocks = max(_positive(cache_size, _OPEN_CACHE, "cache_size", int) //
                                self.block, 2)
        self.ranges, self.cancel = ranges, cancel
        self.requests = self.fetched = 0
        import collections
        self._cache = collections.OrderedDict()  # block number -> bytes, LRU first
        self._pos = 0
        self._last = -2   # the last block read: is the next read sequential?
        self._ahead = 0   # blocks to read ahead on the next sequential miss
        self._stream = None  # without ranges: the one GET, read front to back
        self._version = None  # (ETag, Last-Modified) of the first answer

    def __repr__(self):
        return "<ctadata remote file %r, %s%s>" % (
            self.name, _human_bytes(self.size), ", closed" if self.closed else "")

    def readable(self):
        return True

    def seekable(self):
        return self.ranges

    def tell(self):
        self._check_open()
        return self._pos

    def seek(self, offset, whence=0):
        self._check_open()
        pos = {0: 0, 1: self._pos, 2: self.size}.get(whence)
        if pos is None:
            raise ValueError("invalid whence (%r, should be 0, 1 or 2)" % whence)
        pos += offset
        if pos < 0:
            raise ValueError("negative seek position %d" % pos)
        if not self.ranges and pos != self._pos:
            raise io.UnsupportedOperation(
                "the download service ignores Range requests: this file reads only from "
                "start to end (seeking needs direct mode, e.g. Client.webdav_client())")
        self._pos = pos
        return pos

    def readinto(self, b):
        self._check_open()
        view = memoryview(b).cast("B")
        end = min(self._pos + len(view), self.size)
        if end <= self._pos:
            return 0
        if not self.ranges:
            return self._read_stream(view[:end - self._pos])
        bs, pos = self.block, self._pos
        first, last = pos // bs, (end - 1) // bs
        sequential = first in (self._last, self._last + 1)
        self._ahead = min(max(self._ahead * 2, 1), _READ_AHEAD // bs) if sequential else 0
        k = first
        while k <= last:
            data = self._cache.get(k)
            if data is not None:
                self._cache.move_to_end(k)
                blocks = [data]
            else:
                blocks = self._fetch_run(k, last)
            for data in blocks:
                if k > last:
                    break
                lo = max(pos - k * bs, 0)
                hi = min(end - k * bs, len(data))
                at = k * bs + lo - self._pos
                view[at:at + hi - lo] = data[lo:hi]
                k += 1
        self._last = last
        n = end - self._pos
        self._pos = end
        return n

    def readall(self):
        """The rest of the file, fetched in as few requests as possible."""
        self._check_open()
        buf = bytearray(max(self.size - self._pos, 0))
        n = self.readinto(buf) if buf else 0
        del buf[n:]
        return bytes(buf)

    def close(self):
        if self._stream is not None:
            self.tr.release(self._stream)
            self._stream = None
        self._cache.clear()
        io.RawIOBase.close(self)

    def _check_open(self):
        if self.closed:
            raise ValueError("I/O operation on a closed file")

    # -- fetching ----------------------------------------------------------------

    def _fetch_run(self, k, last):
        """Fetch the blocks from *k* that are not cached, up to *last* and
        then as far as the read-ahead goes; cache them and return them."""
        n_blocks = (self.size + self.block - 1) // self.block
        stop = k + 1
        while stop <= last and stop not in self._cache:
            stop += 1
        if stop > last:  # the request's end: read ahead beyond it
            limit = min(last + 1 + self._ahead, n_blocks)
            while stop < limit and stop not in self._cache:
                stop += 1
        blocks = self._fetch(k, stop)
        for i, data in enumerate(blocks):
            self._cache[k + i] = data
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return blocks

    def _fetch(self, k, stop):
        """Blocks k..stop-1 in one GET (retried per the transport's policy)."""
        start = k * self.block
        end = min(stop * self.block, self.size) - 1
        headers = {"Range": "bytes=%d-%d" % (start, end)}
        return _retrying(self.tr, self.url, lambda: self._get(headers, start, end))

    def _get(self, headers, start, end):
        resp = self.tr.request("GET", self.url, headers, ok=(200, 206), what="read",
                               retry=False)
        self.requests += 1
        try:
            first, total = _content_range(resp)
            if resp.status != 206 or first != start:
                raise TransferError("the server ignored the Range request (answer %d, %s)"
                                    % (resp.status, resp.getheader("Content-Range")),
                                    self.url, retryable=False)
            self._version = _same_version(self._version, resp, total, self.size, self.url)
            blocks, left = [], end - start + 1
            while left > 0:
                want = min(self.block - (start % self.block if not blocks else 0), left)
                data = self._read_exactly(resp, want)
                blocks.append(data)
                left -= len(data)
            return blocks
        finally:
            self.tr.release(resp)

    def _read_exactly(self, resp, n):
        parts, got = [], 0
        while got < n:
            data = _read_from(resp.read, n - got, self.url)
            if not data:
                raise TransferError("short read: the server sent %d of %d bytes"
                                    % (got, n), self.url)
            parts.append(data)
            got += len(data)
        self.fetched += n
        if self.cancel is not None and self.cancel.is_set():
            raise KeyboardInterrupt
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_stream(self, view):
        """Without ranges: read on from the one GET (made at the first read)."""
        if self._stream is None:
            self._stream = self.tr.request("GET", self.url, ok=(200,), what="read")
            self.requests += 1
        # (read, not readinto: PyPy's readinto refuses a cast view)
        data = _read_from(self._stream.read, len(view), self.url)
        n = len(data)
        view[:n] = data
        if not n:
            raise TransferError("short read: the server sent %d of %d bytes"
                                % (self._pos, self.size), self.url)
        self.fetched += n
        self._pos += n
        return n


def _retrying(tr, url, attempt, may_retry=None):
    """The result of *attempt()* (a GET of *url*), tried again after a
    CtadataError as the transport's policy says (logged; the cancellable
    sleep between), as long as *may_retry()* (when given) allows it."""
    failures = 0
    while True:
        try:
            return attempt()
        except CtadataError as e:
            delay = _retry_delay(tr.policy, failures, e) \
                if may_retry is None or may_retry() else None
            if delay is None:
                raise
            tr.pause("GET", url, delay, e, failures)
            failures += 1


def _read_from(read, n, url):
    """*read(n)* of an answer's body; a network failure is a (retryable)
    TransferError."""
    try:
        return read(n)
    except Exception as e:
        if not _is_transient(e):
            raise
        raise _network_error(e, url, "read")


def _same_version(version, resp, total, size, url):
    """The (ETag, Last-Modified) of a range answer, which must be those of
    the earlier answers (*version*, None for the first) and say the size
    the file had: else the file changed while it was being read."""
    now = (resp.getheader("ETag"), resp.getheader("Last-Modified"))
    if (total is not None and total != size) or version is not None and any(
            a is not None and b is not None and a != b for a, b in zip(version, now)):
        raise TransferError("the file changed since it was opened", url, retryable=False)
    return now


def _copy_to(tr, entry, out, resumable, cancel=None):
    """Write the remote file *entry* to the binary stream *out* (stdout for
    `ctadata cat`); return the bytes written.  A transient failure resumes
    with Range where the bytes written end (direct mode; elsewhere only
    while nothing is written yet).  The size and the server's checksum (the
    answer's Digest, else the listing's) are checked at the end: the bytes
    are written by then, so a mismatch raises ChecksumMismatch (a short
    file TransferError) for the caller to report.  A failed write (a
    closed pipe) is raised as it is."""
    state = {"written": 0, "hashers": None, "sums": None, "version": None}
    _retrying(tr, entry.url, lambda: _copy_attempt(tr, entry, out, state, cancel),
              lambda: not state["written"] or resumable)
    bad = _first_mismatch(state["hashers"].result(), state["sums"])
    if bad:
        raise ChecksumMismatch("%s checksum mismatch: server says %s, received %s; the "
                               "bytes written are not the file" % bad, entry.url, *bad)
    return state["written"]


def _copy_attempt(tr, entry, out, state, cancel):
    """One GET of _copy_to, from where the bytes written end (the answer
    must be the same version of the file: see _same_version)."""
    written = state["written"]
    headers = _want_digest_header(tr)
    if written:
        # the last byte named (XRootD 5.5 answers "bytes=N-" with an empty 206)
        headers["Range"] = "bytes=%d-%s" % (written, "" if entry.size is None
                                            else entry.size - 1)
    resp = tr.request("GET", entry.url, headers, ok=(200, 206), what="read", retry=False)
    try:
        first, total = _content_range(resp)
        if (resp.status == 206) != bool(written) or (written and first != written):
            raise TransferError("cannot resume after %d bytes were written: the server "
                                "ignores Range" % written, entry.url, retryable=False)
        if written:
            _same_version(state["version"], resp, total, entry.size, entry.url)
        else:
            state["version"] = (resp.getheader("ETag"), resp.getheader("Last-Modified"))
        if state["hashers"] is None:
            state["sums"] = _asked_digest(resp, headers) or entry.checksums
            state["hashers"] = _Hashers(_algos_for(state["sums"], False))
        size = total if total is not None else entry.size
        _copy_stream(resp, out, state, cancel, entry.url)
    finally:
        tr.release(resp)
    if size is not None and state["written"] != size:
        raise TransferError("short read: %d of %d bytes" % (state["written"], size),
                            entry.url, expected=size, received=state["written"])


def _copy_stream(resp, out, state, cancel, url):
    """Write the body of *resp* to *out* as it arrives, hashing it and
    counting it in *state* (see _copy_to); a failed write (but a closed
    pipe) is a TransferError that is not retried."""
    update = state["hashers"].update if state["hashers"].active else None
    read = resp.read1 if hasattr(resp, "read1") else resp.read
    while True:
        block = _read_from(read, _CHUNK, url)
        if not block:
            return
        try:
            out.write(block)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise TransferError("cannot write the output: %s" % (e.strerror or e),
                                retryable=False)
        if update is not None:
            update(block)
        state["written"] += len(block)
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt


############################################################################
# Third-party copy & FTS3
############################################################################

# Copies between remote places: the bytes never pass through this machine.
# Within one server: WebDAV COPY with Destination (RFC 4918 §9.8).  Between
# two: HTTP third-party copy (HTTP-TPC, what FTS3 drives between WLCG sites;
# PROTOCOL.md §6): COPY sent to the destination with "Source:" (pull, the
# default) or to the source with "Destination:" (push).  The server that gets
# the COPY reaches the other one with what we hand it in
# "TransferHeaderAuthorization": a macaroon (§7) that the other server
# issued, limited to the path and to DOWNLOAD (a pull's source) or UPLOAD (a
# push's destination).  The answer streams perf markers and ends with a
# line "success: ..." or "failure: ..." (_perf_markers).
#
# Which credential goes to which origin (_Origins): the storage's origin gets
# our token, as always; another origin gets what `ctadata --profile NAME`
# sends it, when the url of a profile NAME is on that origin; our token only
# when the user named that origin with --delegate-token; else nothing (an
# open server, or a URL that carries ?authz=).  Our token is not handed to
# another origin inside TransferHeaderAuthorization either: it would pass it
# on, and could keep it.
#
# _ThirdPartyCopy copies one file (COPY, markers, clean-up, checksums of
# both sides); _Copies plans (a file, a tree, several sources into a
# folder) for the worker pool; _macaroon / SharedLink are `share`.  FTS3
# (fts-rest docs/api-curl.md): _FTS submits jobs of at most 1,000 files to
# the endpoint the user named and follows them; FTSJob is what the user
# holds, as a StageRequest for tape.

_MACAROON_REQUEST = "application/macaroon-request"
# A macaroon handed to the other server of a copy is valid for an hour, and
# asked anew after half of it (it is checked when each transfer starts).
_TPC_MACAROON_LIFE = 3600.0
# Lines of a perf-marker stream are short; anything longer is not one.
_PERF_LINE_LIMIT = 1 << 16
# What a macaroon may allow, in the words of `share --allow` (PROTOCOL.md §7).
_SHARE_ACTIVITIES = ("download", "list", "upload", "delete", "manage", "read_metadata",
                     "update_metadata", "stage")
_SHARE_DEFAULT = ("download", "list")
# FTS3: files per job (FTS itself sets no limit; a job of thousands of files
# is slow to list and to cancel), how often a job is polled by default (2 s,
# doubling while nothing changes, up to 60 s), its final states.
_FTS_BATCH = 1000
_FTS_POLL = (2.0, 60.0)
_FTS_FINAL = frozenset(("FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED"))
# A macaroon request's answer is read whole, never more than this.
_MACAROON_ANSWER_LIMIT = 1 << 20


def _perf_markers(lines):
    """Read the answer of a third-party COPY, an iterable of byte lines:
    yield ("progress", bytes moved so far) after each perf marker (blocks
    "Perf Marker" ... "Stripe Index: I" ... "Stripe Bytes Transferred: N"
    ... "End", per stripe), then once the verdict: ("success" | "failure" |
    "aborted", the server's words) from the stream's last line, or
    ("unknown", "") when the stream ended without one (the copy may have
    failed: never a success)."""
    stripes = {}
    index, moved, verdict = 0, None, None
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        word = key.strip().lower()
        if sep and word in ("success", "failure", "aborted"):
            verdict = (word, _printable(value.strip()))
            continue
        verdict = None      # the last line decides: a verdict followed by more is none
        if line == "Perf Marker":
            index, moved = 0, None
        elif word == "stripe index":
            index = _count(value) or 0
        elif word == "stripe bytes transferred":
            moved = _count(value)
        elif line == "End" and moved is not None:
            stripes[index] = moved
            yield "progress", sum(stripes.values())
    yield verdict or ("unknown", "")


def _response_lines(resp, cancel=None):
    """The lines of a (chunked) answer as they arrive."""
    while True:
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt
        line = resp.readline(_PERF_LINE_LIMIT)
        if not line:
            return
        yield line


def _remote_sums(dav, url):
    """(size or None, {algorithm: hex}, the Server header) of a remote file:
    HEAD with Want-Digest (XRootD, dCache), else the listing's Checksums
    (dCache)."""
    resp = dav.tr.request("HEAD", url, {"Want-Digest": _WANT_DIGEST}, ok=(200,),
                          what="checksum")
    size = _count(resp.getheader("Content-Length"))
    sums = _parse_digest(resp.getheader("Digest"))
    server = resp.getheader("Server") or ""
    dav.tr.release(resp)
    if not sums:
        entry = dav.stat(url)
        sums, size = entry.checksums, size if size is not None else entry.size
    return size, sums, server


def _racy_checksums(server):
    """True for a Server header of XRootD before 5.8.3, which computes a
    checksum it has not stored yet in a job whose answer races with the
    link's next request (fixed in 5.8.3, "Do not reset runStatus...", xrootd
    #2360).  Measured on 5.5.3 with copies between two instances: with four
    such requests at a time about one in a thousand hangs (one at a time:
    none in 4,500); asking for the checksum of files the server has just
    written by third-party copy killed it (SIGSEGV in SSL_read) in 3 runs
    of 6 of a 249-file `cp -r`, even one request at a time.  So: one at a
    time, and never for a file it has just written (_Quirks.digests)."""
    return not _Quirks(server.strip()).digests


# -- macaroons ----------------------------------------------------------------


class _NoMacaroons(RemoteError):
    """The server answered a macaroon request with "not offered here"."""


def _macaroon(tr, url, activities, seconds, ip=None):
    """Ask the server of *url* for a macaroon limited to that path (and
    below), to *activities* (upper-case names: DOWNLOAD, LIST...) and, with
    *ip*, to that address, valid *seconds* (PROTOCOL.md §7); return
    (macaroon, its validity in seconds as the server says it, or None).
    Raises _NoMacaroons when the server issues none, AuthError, ProtocolError."""
    import json
    caveats = ["activity:" + ",".join(activities)] + (["ip:" + ip] if ip else [])
    body = json.dumps({"caveats": caveats, "validity": _iso_seconds(seconds)}).encode()
    what = "macaroon request"
    try:
        resp = tr.request("POST", url, {"Content-Type": _MACAROON_REQUEST,
                                        "Accept": "application/json"}, body, ok=(200, 201),
                          what=what)
    except AuthError:
        raise
    except RemoteError as e:
        if e.status in (400, 405, 415, 501):
            # nginx, Apache: 405; XRootD without libXrdMacaroons: 501
            raise _NoMacaroons("%s: this server issues no macaroons (HTTP %d)"
                               % (_safe_url(url), e.status), url, e.status)
        raise
    data = _read_body(tr, resp, url, what, _MACAROON_ANSWER_LIMIT)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _NoMacaroons("%s: the answer to a macaroon request is not JSON: this server "
                           "issues no macaroons" % _safe_url(url), url, resp.status)
    value = doc.get("macaroon") if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value or \
            any(not ("!" <= c <= "~") for c in value):
        raise ProtocolError("the answer to a macaroon request has no macaroon", url)
    tr.auth.secrets.add(value)
    life = doc.get("expires_in")
    return value, (float(life) if isinstance(life, (int, float)) and
                   not isinstance(life, bool) else None)


class SharedLink:
    """A link to a remote file or folder that works without an account,
    until it expires: what ``Client.share()`` returns.

    url       the address with the macaroon in it (``...?authz=...``): opens
              in a browser, or ``curl -O URL``
    macaroon  the macaroon alone (``Authorization: Bearer <macaroon>``)
    path      the remote path shared
    allow     what the holder may do ("download", "list", ...)
    ip        the address (or network) it is limited to, or None
    expires   when it stops working (seconds since the epoch)

    The macaroon is a secret: whoever has the link can do what it allows.
    repr() shows neither it nor the url."""

    __slots__ = ("url", "macaroon", "path", "allow", "ip", "expires")

    def __init__(self, url, macaroon, path, allow, ip, expires):
        self.url, self.macaroon, self.path = url, macaroon, path
        self.allow, self.ip, self.expires = list(allow), ip, expires

    def __repr__(self):
        return "SharedLink(%r, allow=%s, expires=%s)" % (self.path, ",".join(self.allow),
                                                         _iso(self.expires))

    def to_dict(self):
        """A JSON-ready dict: url, macaroon, path, allow, ip, expires (ISO
        8601 UTC), expires_in (seconds from now)."""
        return {"url": self.url, "macaroon": self.macaroon, "path": self.path,
                "allow": list(self.allow), "ip": self.ip, "expires": _iso(self.expires),
                "expires_in": max(0, int(round(self.expires - time.time())))}


def _share(dav, path, duration, allow, ip):
    """See Client.share."""
    from urllib.parse import quote
    seconds = duration if isinstance(duration, (int, float)) and \
        not isinstance(duration, bool) else _duration(duration)
    if not seconds or seconds <= 0:
        raise ConfigError("the validity of a shared link must be a positive duration like "
                          "1d, 12h, 30m or P1D, not %r" % (duration,))
    words = [allow] if isinstance(allow, str) else list(allow or ())
    words = [w.strip().lower() for item in words for w in str(item).split(",") if w.strip()]
    bad = [w for w in words if w not in _SHARE_ACTIVITIES]
    if bad or not words:
        raise ConfigError("a shared link may allow %s, not %r" % (
            ", ".join(_SHARE_ACTIVITIES), ",".join(bad) or allow))
    if ip is not None:
        import ipaddress
        try:
            ipaddress.ip_network(str(ip).strip(), strict=False)
        except ValueError:
            raise ConfigError("--ip takes an address or network (192.0.2.1, "
                              "192.0.2.0/24), not %r" % (ip,))
        ip = str(ip).strip()
    url = dav.url_for(path)
    try:
        if dav.stat(url).is_dir and not url.endswith("/"):
            url += "/"
    except NotFound:
        pass    # a place to upload to may not exist yet
    activities = [w.upper() for w in dict.fromkeys(words)]
    asked = time.time()
    try:
        value, life = _macaroon(dav.tr, url, activities, seconds, ip)
    except _NoMacaroons as e:
        e.hint = ("share needs a storage that issues macaroons (dCache, XRootD with "
                  "libXrdMacaroons, ctadata serve)")
        raise
    link = url + "?authz=" + quote(value, safe="")
    shown = path.path if isinstance(path, Entry) else str(path)
    shown = _normpath(shown) if "://" not in shown else _safe_url(url)
    return SharedLink(link, value, shown, [w.lower() for w in activities], ip,
                      asked + (life or seconds))


# -- who is who in a copy -------------------------------------------------------


def _profile_for_origin(origin, env):
    """(profile name, its url) of the first profile of the config file whose
    url is on *origin*, or None."""
    import configparser
    cp = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    try:
        cp.read(_config_file(env), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    for name in cp.sections():
        url = cp.get(name, "url", fallback="").strip()
        if url and "://" not in url:
            url = "https://" + url
        try:
            if url and _origin(url) == origin:
                return name, url.rstrip("/")
        except ProtocolError:
            continue
    return None


def _origin_root(url):
    from urllib.parse import urlsplit
    p = urlsplit(url)
    return "%s://%s" % (p.scheme.lower(), p.netloc.rpartition("@")[2])


class _Peer:
    """One server of a copy: *tr* reaches its origin with the credentials
    that may go there (or none), *dav* makes the WebDAV requests over it,
    *label* says whose credentials those are ("the storage", "profile
    NAME", "--delegate-token") or is None (none), *home* the origins to which
    its bearer token may be shown."""

    __slots__ = ("origin", "tr", "dav", "label", "home", "one_at_a_time", "sums_lock")

    def __init__(self, origin, tr, dav, label, home):
        self.origin, self.tr, self.dav, self.label, self.home = origin, tr, dav, label, home
        self.one_at_a_time = None         # not known until the server answered once
        self.sums_lock = _thread.allocate_lock()

    def __repr__(self):
        return "<ctadata copy peer %s://%s:%d (%s)>" % (self.origin + (
            self.label or "no credentials",))

    def bearer(self):
        """The Authorization value of our credentials here, or None."""
        if self.label is None:
            return None
        try:
            return self.tr.auth.header()
        except AuthError:
            return None

    def checksums(self, url):
        """(size or None, {algorithm: hex}) of a file of this server; one
        request at a time to a server whose checksums race (_racy_checksums)."""
        if self.one_at_a_time is False:
            return _remote_sums(self.dav, url)[:2]
        with self.sums_lock:
            size, sums, server = _remote_sums(self.dav, url)
            self.learn(server)
            return size, sums

    def learn(self, server):
        """Note what the Server header of an answer says about checksums."""
        if self.one_at_a_time is None and server is not None:
            self.one_at_a_time = _racy_checksums(server)

    def racy(self, url):
        """True for a server that must not be asked for the checksum of a
        file it has just written (_racy_checksums), learnt from its Server
        header: of an earlier answer, else of an OPTIONS request."""
        if self.one_at_a_time is None:
            resp = self.tr.request("OPTIONS", url, ok=tuple(range(200, 600)),
                                   what="options", retry=False)
            self.tr.release(resp)
            self.learn(resp.getheader("Server") or "")
        return self.one_at_a_time

    def holds_credentials(self):
        return self.bearer() is not None or (
            self.label is not None and self.tr.auth.client_cert() is not None)


class _Origins:
    """The servers of one copy call, by origin (see the section's head):
    the storage's origin with the Client's transport, origins named with
    --delegate-token with a sibling of it (our token), origins of a profile
    with that profile's Client (made by *peer_client(name, url)*), any other
    with a transport that sends no credentials.  Hands out the credential
    one server needs to reach another (transfer_header)."""

    def __init__(self, tr, dav, env, delegated, peer_client, warn):
        import threading
        self.tr, self.env, self.peer_client, self.warn = tr, env, peer_client, warn
        self.delegated = set()
        for item in delegated or ():
            _check_api_url(str(item), "--delegate-token")
            self.delegated.add(_origin(str(item)))
        home = frozenset(self.delegated | {tr.auth_origin})
        self.main = _Peer(tr.auth_origin, tr, dav, "the storage", home)
        self.peers = {tr.auth_origin: self.main}
        self.clients = []
        self.transports = []
        self.macaroons = {}        # (origin, scope URL, activities) -> (value, when)
        self.lock = threading.Lock()

    def peer(self, url):
        """The _Peer of the origin of *url*."""
        origin = _origin(url)
        with self.lock:
            found = self.peers.get(origin)
            if found is None:
                found = self.peers[origin] = self._make(origin, _origin_root(url))
            return found

    def _make(self, origin, root):
        if origin in self.delegated:
            tr = self.tr.sibling(root)
            return _Peer(origin, tr, _DAV(tr, root, self.warn), "--delegate-token",
                         self.main.home)
        found = _profile_for_origin(origin, self.env)
        if found is not None:
            client = self.peer_client(*found)
            self.clients.append(client)
            return _Peer(origin, client._transport, client._remote.webdav("copy"),
                         "profile " + found[0], frozenset((origin,)))
        s = self.tr.settings
        tr = _Transport(Settings(root, s.timeout, s.retries, s.jobs, s.ca_file, s.ca_dir,
                                 s.insecure, None, s.backoff, s.expect_threshold, env={}),
                        _NoAuth(self.tr.auth.secrets), self.tr.cancel)
        self.transports.append(tr)
        return _Peer(origin, tr, _DAV(tr, root, self.warn), None, frozenset())

    def transfer_header(self, passive, active, scope, activities):
        """The TransferHeaderAuthorization value with which *active*'s server
        may reach *scope* (a URL, the file or the folder of the copy) on
        *passive*'s; None when we hold no credentials for *passive* (an open
        server).  Within one server: our own token, else a macaroon.  Across
        two: a macaroon that *passive* issues, cached per scope; where it
        issues none, its token only if *active*'s origin may see it, else
        ConfigError (nothing is sent)."""
        if passive is active and passive.bearer():
            return passive.bearer()   # the same origin: the token stays at home
        if not passive.holds_credentials():
            return None
        key = (passive.origin, scope, tuple(activities))
        with self.lock:
            have = self.macaroons.get(key)
        if have is not None and time.monotonic() - have[1] < _TPC_MACAROON_LIFE / 2:
            return "Bearer " + have[0]
        try:
            value = _macaroon(passive.tr, scope, activities, _TPC_MACAROON_LIFE)[0]
        except _NoMacaroons as e:
            token = passive.bearer()
            if token and active.origin in passive.home:
                return token
            if passive is active:
                return None
            other = _origin_root(active.tr.settings.url)
            if not token:
                raise ConfigError("%s cannot be let in at %s: that server issues no "
                                  "macaroons (HTTP %s), and a client certificate cannot be "
                                  "handed over" % (other, _safe_url(scope), e.status), scope,
                                  hint="copy the other way round (--push, or without it)")
            raise ConfigError("%s would need your token to reach %s, whose server issues "
                              "no macaroons (HTTP %s)" % (other, _safe_url(scope), e.status),
                              scope, hint="copy the other way round (--push, or without it), "
                              "or, if you trust %s with your token, --delegate-token %s"
                              % (other, other))
        for peer in list(self.peers.values()):
            peer.tr.auth.secrets.add(value)
        with self.lock:
            self.macaroons[key] = (value, time.monotonic())
        return "Bearer " + value

    def abort(self):
        """Wake every worker blocked on any of these servers (Ctrl-C)."""
        for peer in list(self.peers.values()):
            peer.tr.abort()

    def close(self):
        for client in self.clients:
            client.close()
        for tr in self.transports:
            tr.close()


# -- copying one file -------------------------------------------------------------


class _CopyResult(TransferResult):
    """The TransferResult of a copy between remote places."""

    __slots__ = ()

    def to_dict(self):
        """The manifest record: source, destination (URLs), size, checksums
        (of the destination, as verified), status, error, bytes."""
        return {"source": _safe_url(self.source), "destination": _safe_url(self.dest),
                "size": self.size, "checksums": dict(self.checksums),
                "status": self.status, "error": self.error, "bytes": self.bytes}


class _CopyTask:
    """One planned copy: *source*, *dest* URLs; *entry* the source's Entry;
    *src*, *dst* their _Peer; *have* the Entry already at *dest* or None;
    *scopes* (source URL, destination URL) that the macaroons handed over
    are limited to (the file or the trees copied)."""

    __slots__ = ("source", "dest", "size", "entry", "src", "dst", "have", "scopes")

    def __init__(self, entry, dest, src, dst, have, scopes):
        self.source, self.dest, self.size, self.entry = entry.url, dest, entry.size, entry
        self.src, self.dst, self.have, self.scopes = src, dst, have, scopes


class _ThirdPartyCopy:
    """The worker of a copy: COPY one file (within one server, or pull/push
    between two), follow its perf markers (*progress* advances with them),
    decide on the stream's last line, and verify: the checksums of both
    sides (HEAD with Want-Digest) must agree, else the destination copy is
    deleted.  A failed copy deletes what it left at the destination (XRootD
    leaves an empty file behind a failed pull).  A destination that is
    already there is skipped when it has the same size and, when both
    servers have one, the same checksum; when it differs, the file fails
    unless *overwrite*."""

    def __init__(self, origins, mode, overwrite, verify, progress, cancel):
        self.origins, self.mode, self.overwrite = origins, mode, overwrite
        self.verify, self.progress, self.cancel = verify, progress, cancel

    def __call__(self, t):
        if t.have is not None and not self.overwrite:
            differs = self.differs(t)
            if not differs:
                return _CopyResult(t.source, t.dest, t.size, "skipped")
            raise TransferError("already at the destination, and different (%s); "
                                "--overwrite replaces it" % differs, t.dest, retryable=False)
        if t.have is not None:
            # Replaced by a new file, not rewritten: XRootD 5.5 keeps the
            # checksum it computed for a file as long as its mtime has the same
            # second, and would report the old file's after a quick rewrite.
            _try_delete(t.dst.tr, t.dest)
        self.send(t)
        sums = self.check(t) if self.verify else {}
        return _CopyResult(t.source, t.dest, t.size, "transferred", None, sums, t.size or 0)

    def differs(self, t):
        """Why the file at the destination is not the source's, or None."""
        if t.have.size is not None and t.size is not None and t.have.size != t.size:
            return "%d bytes, the source %d" % (t.have.size, t.size)
        src = t.entry.checksums or t.src.checksums(t.source)[1]
        dst = t.have.checksums or t.dst.checksums(t.dest)[1]
        bad = _first_mismatch(dst, src)
        return "%s %s, the source %s" % (bad[0], bad[2], bad[1]) if bad else None

    def request(self, t):
        """(the _Peer that gets the COPY, its URL, its headers)."""
        within = t.src.origin == t.dst.origin
        if within or self.mode == "push":
            # within one server the source gets the COPY (RFC 4918 §9.8);
            # XRootD pushes to itself and needs to be let in as well
            active, url = t.src, t.source
            headers = {"Destination": t.dest}
            cred = self.origins.transfer_header(t.dst, active, t.scopes[1],
                                                ("UPLOAD", "DELETE") if self.overwrite
                                                else ("UPLOAD",))
        else:
            active, url = t.dst, t.dest
            headers = {"Source": t.source}
            cred = self.origins.transfer_header(t.src, active, t.scopes[0],
                                                ("DOWNLOAD", "LIST"))
        if not within:
            headers["Credential"] = "none"    # no X.509 delegation (XRootD refuses it)
        headers["Overwrite"] = "T" if self.overwrite else "F"
        if cred:
            headers["TransferHeaderAuthorization"] = cred
        return active, url, headers

    def send(self, t):
        """COPY, and read the answer to its verdict; TransferError on a failure."""
        active, url, headers = self.request(t)
        try:
            resp = active.tr.request("COPY", url, headers, ok=(200, 201, 202, 204),
                                     what="copy")
        except RemoteError as e:
            if e.status == 412:
                raise TransferError("already at the destination (the server refused to "
                                    "replace it); --overwrite replaces it", t.dest,
                                    status=412, retryable=False)
            raise
        active.learn(resp.getheader("Server") or "")
        moved, markers, verdict = 0, 0, ("unknown", "")
        try:
            for kind, value in _perf_markers(_response_lines(resp, self.cancel)):
                if kind != "progress":
                    verdict = (kind, value)
                    continue
                markers += 1
                step = min(value, t.size or value) - moved
                if step > 0 and self.progress is not None:
                    self.progress.advance(step)
                moved += max(step, 0)
        except (CtadataError, KeyboardInterrupt):
            raise
        except Exception as e:
            self.clean_up(t)
            raise _network_error(e, url, "copy")
        finally:
            active.tr.release(resp)
        kind, words = verdict
        if kind == "unknown" and not markers and t.src.origin == t.dst.origin and \
                resp.status in (201, 204):
            kind = "success"    # a plain WebDAV COPY (nginx, Apache, dCache within itself)
        if kind != "success":
            self.clean_up(t)
            why = words or ("the server did not say how the copy ended (no success or "
                            "failure line)" if kind == "unknown" else kind)
            raise TransferError("copy failed: %s" % why, t.dest, retryable=False)
        if self.progress is not None and t.size and t.size > moved:
            self.progress.advance(t.size - moved)

    def clean_up(self, t):
        """Delete what a failed copy left at the destination, unless it was
        there before and is to stay."""
        if t.have is None or self.overwrite:
            _try_delete(t.dst.tr, t.dest)

    def check(self, t):
        """Compare the destination's checksums with the source's (the size
        when they share none); on a mismatch delete the copy.  Return the
        destination's checksums (from XRootD before 5.8.3, which must not
        be asked for those of a file it has just written: the source's,
        and only the size is compared)."""
        if t.entry.checksums:
            src_size, src = t.size, t.entry.checksums
        else:
            src_size, src = t.src.checksums(t.source)
        if t.dst.racy(t.dest):
            size, dst = t.dst.dav.stat(t.dest).size, {}
        else:
            size, dst = t.dst.checksums(t.dest)
        bad = _first_mismatch(dst, src)
        if bad:
            _try_delete(t.dst.tr, t.dest)
            raise ChecksumMismatch("%s checksum mismatch after the copy: the source has %s, "
                                   "the copy %s; copy deleted" % bad, t.dest, *bad)
        if not any(a in dst for a in src) and None not in (size, src_size) and \
                size != src_size:
            _try_delete(t.dst.tr, t.dest)
            raise TransferError("the copy has %d bytes, the source %d; copy deleted" % (
                size, src_size), t.dest, expected=src_size, received=size, retryable=False)
        return dst or src


# -- planning copies ------------------------------------------------------------------


def _local_side(arg):
    """The local path that *arg* of a copy names (an os.PathLike, a
    ``file:`` URL, or a path starting with ./ ../ or ~), or None: a remote
    path (relative to the storage URL) or an http(s) URL."""
    if hasattr(arg, "__fspath__"):
        return os.fspath(arg)
    text = str(arg)
    if text.startswith("file:"):
        from urllib.parse import unquote, urlsplit
        p = urlsplit(text)
        if p.netloc not in ("", "localhost"):
            raise ConfigError("a file: URL names this machine only: %r" % text)
        return unquote(p.path) or "."
    if text in (".", "..", "~") or text.startswith(("./", "../", "~/")):
        return os.path.expanduser(text)
    return None


def _ensure_folder(dav, url):
    """mkdir -p for a folder given as a URL, on any server: find the
    nearest folder that exists (PROPFIND), make the rest (MKCOL)."""
    from urllib.parse import urlsplit
    url = url if url.endswith("/") else url + "/"
    try:
        entry = dav.stat(url)
    except NotFound:
        parent = url[:-1].rpartition("/")[0] + "/"
        if urlsplit(parent).path not in ("", "/"):
            _ensure_folder(dav, parent)
        dav.mkcol(url, exist_ok=True)
        return
    if not entry.is_dir:
        raise ConfigError("not a folder: %s" % _safe_url(url))


def _join_url(folder, rel_parts):
    """The URL of *rel_parts* (decoded names) below the folder URL *folder*."""
    from urllib.parse import quote
    base = folder.rstrip("/")
    return base + "".join("/" + quote(p, safe="") for p in rel_parts) if rel_parts else base


class _Copies(_Planner):
    """Plans copies between remote places (a file; a tree, listed as it
    goes, its folders made at the destination; several sources into a
    folder) and runs them on a worker pool with _ThirdPartyCopy, or lists
    them for FTS3.  *peer_client(name, url)* makes the Client of a profile
    (the credentials of another origin, see _Origins); *env* is where
    profiles are looked up."""

    def __init__(self, remote, tr, cancel, jobs, warn, env, peer_client):
        _Planner.__init__(self, remote, tr, cancel, jobs, warn)
        self.env, self.peer_client = env, peer_client

    def origins(self, delegated=()):
        return _Origins(self.tr, self.remote.webdav("copy"), self.env, delegated,
                        self.peer_client, self.warn)

    def copy(self, sources, dst, recursive, mode, overwrite, verify, select, dry_run,
             progress, jobs, raise_on_failure, delegated):
        """See Client.copy."""
        if mode not in ("pull", "push"):
            raise ConfigError('mode must be "pull" or "push", not %r' % (mode,))
        started, progress = self.start(progress)
        origins = self.origins(delegated)
        try:
            tasks = self.plan(origins, sources, dst, recursive, _selector(select), dry_run,
                              progress, jobs, fts=False)
            if dry_run:
                results = [t if isinstance(t, TransferResult) else
                           _CopyResult(t.source, t.dest, t.size,
                                       "planned" if t.have is None or overwrite else "skipped")
                           for t in tasks]
            else:
                worker = _ThirdPartyCopy(origins, mode, overwrite, verify, progress,
                                         self.cancel)
                pool = _WorkerPool(lambda t: self.guarded(worker, t), jobs or self.jobs,
                                   progress, self.cancel, origins.abort)
                results = pool.run(tasks)
            return _summarize(results, started, raise_on_failure)
        finally:
            origins.close()

    @staticmethod
    def guarded(worker, t):
        try:
            return worker(t)
        except CtadataError as e:
            return _failure_of(t, e, _CopyResult)

    def plan(self, origins, sources, dst, recursive, sel, dry_run, progress, jobs, fts):
        """The _CopyTask of every file to copy (and failed results for
        sources that cannot be).  A single source that does not exist raises
        NotFound before anything else; *fts*: no look at the destination
        (FTS3 decides) and no folders made."""
        many = isinstance(sources, (list, tuple))
        items = list(sources) if many else [sources]
        if not items:
            raise ConfigError("nothing to copy: no source given")
        many = many and len(items) > 1
        dav = self.remote.webdav("copy")
        dst_url = dav.url_for(dst)
        into = many or str(dst).endswith("/") or str(dst) in ("", ".")
        found = []
        for item in items:
            url = dav.url_for(item)
            src = origins.peer(url)
            try:
                entry = item if isinstance(item, Entry) else src.dav.stat(url)
            except NotFound:
                err = NotFound("the source does not exist", url, 404)
                if not many:
                    raise err
                found.append(_failure_of(_CopyTask(Entry("", "", url, False), dst_url, src,
                                                   src, None, (url, url)), err, _CopyResult))
                continue
            if entry.is_dir and not recursive:
                raise ConfigError("%s is a folder (use recursive=True / cp -r)"
                                  % _safe_url(entry.url))
            found.append((entry, src))
        return self.tasks(origins, found, dst_url, into, sel, dry_run, progress, jobs, fts)

    def tasks(self, origins, found, dst_url, into, sel, dry_run, progress, jobs, fts):
        dst = origins.peer(dst_url)
        if into and not dry_run and not fts and any(not isinstance(f, TransferResult)
                                                    for f in found):
            _ensure_folder(dst.dav, dst_url)
        for item in found:
            if isinstance(item, TransferResult):
                yield item
                continue
            entry, src = item
            if entry.is_dir:
                target = _join_url(dst_url, [entry.name]) if into and entry.name else dst_url
                for t in self.tree(entry, src, target, dst, sel, dry_run, progress, jobs,
                                   fts):
                    yield t
                continue
            target, have = dst_url, None
            if into:
                target = _join_url(dst_url, [entry.name])
            if not fts:
                try:
                    have = dst.dav.stat(target)
                except NotFound:
                    if not into and not dry_run:
                        _ensure_folder(dst.dav, target.rpartition("/")[0] + "/")
                if have is not None and have.is_dir and not into:
                    target = _join_url(target, [entry.name])
                    try:
                        have = dst.dav.stat(target)
                    except NotFound:
                        have = None
                if have is not None and have.is_dir:
                    yield _failure_of(_CopyTask(entry, target, src, dst, None, (
                        entry.url, target)), ConfigError("a folder is in the way at the "
                                                         "destination", target), _CopyResult)
                    continue
            progress.add_total(1, entry.size)
            yield _CopyTask(entry, target, src, dst, have,
                            (entry.url, target.rpartition("/")[0] + "/"))

    def tree(self, entry, src, target, dst, sel, dry_run, progress, jobs, fts):
        """The tasks of copying the source folder *entry* to the folder URL
        *target*, listed folder by folder; each destination folder is made
        before its files are handed out (without a filter, empty ones too)."""
        root = entry.url if entry.url.endswith("/") else entry.url + "/"
        target = target.rstrip("/") + "/"
        existing = {} if fts else _files_below(dst.dav, target, self.jobs, self.warn)
        made = set()
        if not dry_run and not fts:
            _ensure_folder(dst.dav, target)
            made.add(target)
        scopes = (root, target)
        for top, children in _walk(src.dav, entry, jobs or self.jobs, True, self.warn):
            rel = _rel_parts(root, top.url if top is not None else root)
            folder = _join_url(target, rel) + "/"
            files = [e for e in children if not e.is_dir and (
                sel is None or sel("/".join(rel + [e.name])))]
            if not dry_run and not fts and folder not in made and (files or sel is None):
                dst.dav.mkcol(folder, exist_ok=True)
                made.add(folder)
            for e in files:
                have = existing.get("/".join(rel + [e.name]))
                progress.add_total(1, e.size)
                yield _CopyTask(e, _join_url(folder, [e.name]), src, dst, have, scopes)

    # -- FTS3 -------------------------------------------------------------------------

    def fts_submit(self, fts, sources, dst, recursive, overwrite, verify, retry, select,
                   jobs):
        """See Client.fts_copy."""
        origins = self.origins()
        try:
            progress = Progress()
            files = []
            for t in self.plan(origins, sources, dst, recursive, _selector(select), True,
                               progress, jobs, fts=True):
                if isinstance(t, TransferResult):
                    raise _failure_exception(t)
                files.append(self.fts_file(t))
        finally:
            origins.close()
        if not files:
            raise ConfigError("nothing to copy: no file selected")
        params = {"verify_checksum": bool(verify), "overwrite": bool(overwrite),
                  "retry": int(retry)}
        ids = []
        try:
            for i in range(0, len(files), _FTS_BATCH):
                ids.append(fts.submit(files[i:i + _FTS_BATCH], params))
        except CtadataError as e:
            _say_submitted(e, ids)
            raise
        return FTSJob(fts, ids)

    @staticmethod
    def fts_file(t):
        """One file of an FTS3 submission (fts-rest docs/api-curl.md)."""
        f = {"sources": [t.source], "destinations": [t.dest]}
        if t.size is not None:
            f["filesize"] = t.size
        if "adler32" in t.entry.checksums:
            f["checksum"] = "adler32:" + t.entry.checksums["adler32"]
        return f


# -- FTS3 -----------------------------------------------------------------------------


class _FTS:
    """The REST API of one FTS3 endpoint (fts-rest docs/api-curl.md): POST
    /jobs, GET /jobs/ID and /jobs/ID/files, DELETE /jobs/ID.  Reached over
    a sibling of the storage's transport: our token (or client certificate)
    goes there because the user named the endpoint (cp --fts, profile key
    fts).  *poll*: (first, longest) seconds between two polls of a job."""

    def __init__(self, tr, url, poll=None):
        _check_api_url(url, "the FTS3 endpoint")
        _check_secure_url(url, "the FTS3 endpoint")
        self.url = url.rstrip("/")
        self.tr = tr.sibling(self.url) if _origin(url) != tr.auth_origin else tr
        self.poll = poll or _FTS_POLL

    def __repr__(self):
        return "<ctadata FTS3 %s>" % _safe_url(self.url)

    def call(self, method, sub, doc=None, what="FTS3"):
        """One request to FTS3 (a submission is never sent twice); its
        decoded JSON answer (None if empty)."""
        try:
            return _json_call(self.tr, method, self.url + sub, doc, what,
                              ok=(200, 201, 202, 207), retry=method != "POST")
        except RemoteError as e:
            if e.status == 419:
                e.hint = ("FTS3 wants a proxy certificate delegated to it, which ctadata "
                          "cannot make: delegate with fts-rest-delegate (or fts-delegation-"
                          "init) first, or use a token")
            raise

    @staticmethod
    def _id(job_id):
        return _url_id(job_id, "an FTS3 job id", refuse=",")

    def submit(self, files, params):
        answer = self.call("POST", "/jobs", {"files": files, "params": params}, "FTS3 submit")
        jid = answer.get("job_id") if isinstance(answer, dict) else None
        if not isinstance(jid, str) or not jid.strip() or not jid.isprintable():
            raise ProtocolError("the FTS3 answer to a submission has no job_id",
                                self.url + "/jobs")
        return jid

    def job(self, job_id):
        doc = self.call("GET", "/jobs/" + self._id(job_id), what="FTS3 job")
        if not isinstance(doc, dict) or not isinstance(doc.get("job_state"), str):
            raise ProtocolError("the FTS3 job %s has no job_state" % _printable(job_id, 80),
                                self.url + "/jobs/" + self._id(job_id))
        return doc

    def files(self, job_id):
        sub = "/jobs/%s/files" % self._id(job_id)
        doc = self.call("GET", sub, what="FTS3 job files")
        if not isinstance(doc, list):
            raise ProtocolError("the files of FTS3 job %s are not a list"
                                % _printable(job_id, 80), self.url + sub)
        return [f for f in doc if isinstance(f, dict)]

    def cancel(self, job_id):
        return self.call("DELETE", "/jobs/" + self._id(job_id), what="FTS3 cancel")


def _fts_file(f, job_id):
    """One file of an FTS3 job, as FTSJob.files holds it."""
    state = f.get("file_state")
    reason = f.get("reason")
    return {"job": job_id, "source": _printable(f.get("source_surl") or "", 2000),
            "destination": _printable(f.get("dest_surl") or "", 2000),
            "state": state.strip().upper() if isinstance(state, str) else "UNKNOWN",
            "reason": _printable(reason) if reason else None,
            "size": f.get("filesize") if isinstance(f.get("filesize"), (int, float)) else None}


class FTSJob:
    """Transfers handed to an FTS3 server: one job, or several when there
    were more than 1,000 files.  ``Client.fts_copy()`` makes one,
    ``Client.fts_job(id)`` finds one again (from any machine).

    id        the job id; several joined with "," (what fts_job() and
              ``ctadata fts status`` take)
    ids       the job ids (a list)
    endpoint  the FTS3 server's URL
    jobs      {job id: FTS3's own job record} as of the last refresh()
    files     one dict per file: job, source, destination, state (SUBMITTED,
              ACTIVE, FINISHED, FAILED, CANCELED, ...), reason (why it
              failed), size
    counts    {state: number of files}
    state     FTS3's job state when there is one job; for several, the
              state FTS3 would give one job holding all their files
              (SUBMITTED, ACTIVE, FINISHED, FAILED, FINISHEDDIRTY, CANCELED)
    done      every job is in a final state; ``ok``: all of them FINISHED
    failures  the files that failed or were cancelled
    """

    def __init__(self, fts, ids):
        self._fts = fts
        self.ids = list(ids)
        self.jobs = {}
        self.files = []

    @property
    def id(self):
        return ",".join(self.ids)

    @property
    def endpoint(self):
        return self._fts.url

    @property
    def counts(self):
        out = {}
        for f in self.files:
            out[f["state"]] = out.get(f["state"], 0) + 1
        return out

    @property
    def state(self):
        states = [j.get("job_state", "SUBMITTED") for j in self.jobs.values()]
        if not states:
            return "SUBMITTED"
        if len(states) == 1:
            return states[0]
        if not all(s in _FTS_FINAL for s in states):
            return "ACTIVE" if any(s != "SUBMITTED" for s in states) else "SUBMITTED"
        c = self.counts
        finished, failed = c.get("FINISHED", 0), c.get("FAILED", 0)
        if finished == len(self.files):
            return "FINISHED"
        if finished and failed:
            return "FINISHEDDIRTY"
        return "FAILED" if failed else "CANCELED" if not finished else "FINISHEDDIRTY"

    @property
    def done(self):
        return len(self.jobs) == len(self.ids) and all(
            j.get("job_state") in _FTS_FINAL for j in self.jobs.values())

    @property
    def ok(self):
        return self.done and all(j.get("job_state") == "FINISHED" for j in self.jobs.values())

    @property
    def failures(self):
        return [f for f in self.files if f["state"] in ("FAILED", "CANCELED")]

    def refresh(self):
        """Ask FTS3 how the jobs and their files are doing; return this job.
        Raises NotFound for a job FTS3 does not know."""
        jobs, files = {}, []
        for jid in self.ids:
            jobs[jid] = self._fts.job(jid)
            files.extend(_fts_file(f, jid) for f in self._fts.files(jid))
        self.jobs, self.files = jobs, files
        return self

    def wait(self, timeout=None, progress=None, poll=None):
        """Poll until every job is in a final state, backing off between
        polls (*poll*: (first, longest) seconds; default 2 s, doubling while
        nothing changes, up to 60 s); *progress(job)* is called after each
        poll.  Return True when done, False when *timeout* seconds ran out."""
        return _poll_until_done(self, _Pace(*(poll or self._fts.poll)), self._fts.tr.sleep,
                                timeout, progress)

    def _poll_state(self):
        """What two polls compare: the number of files in each state."""
        return sorted(self.counts.items())

    def cancel(self):
        """Cancel the jobs (FTS3 stops their files that are not done yet);
        return this job, refreshed."""
        for jid in self.ids:
            self._fts.cancel(jid)
        return self.refresh()

    def to_dict(self):
        return {"id": self.id, "ids": list(self.ids), "endpoint": self.endpoint,
                "state": self.state, "done": self.done, "counts": self.counts,
                "files": [dict(f) for f in self.files]}

    def __repr__(self):
        return "FTSJob(%r, state=%s, files=%d)" % (self.id, self.state, len(self.files))


############################################################################
# Progress displays (terminal, notebook)
############################################################################

# What the engine's Progress counters look like to a person: a live status
# line on a terminal, a plain line every few seconds in a log (a batch job's
# stderr), an updating output in a Jupyter notebook (IPython.display, loaded
# in every kernel: taken from sys.modules, never imported), or a function of
# the user's.
# Each draws from poll(), in the thread that waits for the workers (a
# notebook's output belongs to the cell that runs there), never from the
# workers' hot loops.


def _clock(seconds):
    """93 -> '1:33', 4000 -> '1:06:40'."""
    m, sec = divmod(int(seconds + 0.5), 60)
    return "%d:%02d:%02d" % (m // 60, m % 60, sec) if m >= 60 else "%d:%02d" % (m, sec)


def _eta_text(s):
    """The ETA of a snapshot: '1:02', '1:02+' (a lower bound: still
    listing) or '-' (nothing to go by yet)."""
    if s.eta is None:
        return "-"
    return _clock(s.eta) + ("+" if s.listing else "")


def _status_line(label, s):
    """'get 3/10+ files  1.2MiB/4.0MiB+  45.0MiB/s  ETA 1:02+' (while
    running) or 'get 10 files  4.0MiB  in 0:05  800.0KiB/s' (final)."""
    if s.final:
        line = "%s %s  %s  in %s  %s/s" % (label, _plural(s.files_done, "file"), _human_bytes(
            s.bytes_done), _clock(s.elapsed), _human_bytes(s.rate))
    else:
        more = "+" if s.listing else ""  # still listing: the totals may grow
        line = "%s %d/%d%s file%s  %s/%s%s  %s/s  ETA %s" % (
            label, s.files_done, s.files_total, more,
            "" if s.files_total == 1 and not more else "s", _human_bytes(s.bytes_done),
            _human_bytes(s.bytes_total), more, _human_bytes(s.rate), _eta_text(s))
    if s.skipped:
        line += "  %d skipped" % s.skipped
    if s.failed:
        line += "  %d failed" % s.failed
    if s.waiting:
        line += "  %d on tape" % s.waiting
    return line


class _TermProgress(Progress):
    """One live status line on a terminal (files done/total, bytes, rate,
    ETA), redrawn at most 5 times a second.  At the end it is cleared (the
    CLI prints its summary line), or with *keep* left as a final line."""

    interval = 0.2

    def __init__(self, stream, label, keep=False):
        Progress.__init__(self)
        self.stream, self.label, self.keep = stream, label, keep
        self._drawn = False

    def show(self, snapshot):
        self.stream.write("\r" + _status_line(self.label, snapshot)[:200] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self):
        if self.keep:
            self.stream.write("\r" + _status_line(self.label, self.snapshot(True))[:200] +
                              "\x1b[K\n")
        elif self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.flush()


class _LineProgress(Progress):
    """A plain status line every *interval* seconds (default 5), for a log
    that is not a terminal (a SLURM job's stderr): no "\\r", no escape codes.
    With *keep*, a last line when the transfer is over."""

    def __init__(self, stream, label, interval=5.0, keep=False):
        Progress.__init__(self)
        self.stream, self.label, self.interval, self.keep = stream, label, interval, keep

    def show(self, snapshot):
        self.stream.write(_status_line(self.label, snapshot) + "\n")
        self.stream.flush()

    def close(self):
        if self.keep:
            self.show(self.snapshot(True))


class _CallbackProgress(Progress):
    """Calls *func(snapshot)* at most every *interval* seconds, and once more
    with the final snapshot (``snapshot.final`` True) when the transfer is
    over.  It runs in the caller's thread; an exception it raises stops the
    transfer."""

    def __init__(self, func, interval=0.5):
        Progress.__init__(self)
        self.func, self.interval = func, interval

    def show(self, snapshot):
        self.func(snapshot)

    def close(self):
        self.func(self.snapshot(True))


class _NotebookProgress(Progress):
    """An output of the running notebook cell that updates in place (at most
    4 times a second): a bar and the status line, as HTML and as plain text
    for front ends without HTML.  Its final state stays visible.  A failure
    of the display turns it off; the transfer goes on."""

    interval = 0.25

    def __init__(self, label):
        Progress.__init__(self)
        self.label = label
        self._handle = None

    def show(self, snapshot):
        bundle = {"text/plain": _status_line(self.label, snapshot),
                  "text/html": _progress_html(self.label, snapshot)}
        try:
            if self._handle is None:
                # every IPython kernel has loaded it (ipykernel's shell uses
                # it): taken from there, nothing is imported
                display = sys.modules["IPython.display"].display
                self._handle = display(bundle, raw=True, display_id=True)
            else:
                self._handle.update(bundle, raw=True)
        except Exception as e:  # a front end's trouble must not stop the transfer
            self.interval = None
            _log(30, "progress display failed: %s", e)

    def close(self):
        if self.interval is not None:
            self.show(self.snapshot(True))


def _progress_html(label, s):
    """A notebook's progress output: a <progress> bar and the status line."""
    import html
    done = s.bytes_done if s.bytes_total else s.files_done
    total = s.bytes_total or s.files_total
    if s.final:
        bar = ""
    elif total:
        bar = '<progress value="%d" max="%d" style="width:16em"></progress>' % (
            max(min(done, total), 0), total)
    else:  # nothing known yet: an indeterminate bar
        bar = '<progress style="width:16em"></progress>'

    color = "#b00" if s.failed else "inherit"
    return ('<div style="font-family:monospace;color:%s">%s %s</div>'
            % (color, bar, html.escape(_status_line(label, s))))


def _in_kernel():
    """True inside an IPython kernel (Jupyter, VS Code, Colab), found without
    importing anything: a kernel has loaded ipykernel and set get_ipython."""
    if "ipykernel" not in sys.modules:
        return False
    import builtins
    get = getattr(builtins, "get_ipython", None)
    try:
        shell = get() if get is not None else None
    except Exception:
        return False
    return getattr(shell, "kernel", None) is not None


def _interactive():
    """A person at a prompt (python or IPython in a terminal), not a script."""
    import builtins
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or \
        hasattr(builtins, "get_ipython")


def _stderr_is_terminal():
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_for(progress, label):
    """The Progress a transfer method feeds, for its ``progress=`` argument,
    and whether the method made it (and so closes it):

    - a Progress (or subclass): used as it is, never closed here;
    - a callable: called with a snapshot (see _CallbackProgress);
    - True: a notebook output in a kernel, else a live line on stderr when
      it is a terminal, else a plain line on stderr every 5 seconds;
    - False: nothing shown;
    - None (default): as True in a notebook, and at an interactive prompt
      whose stderr is a terminal; nothing in a script (a library that draws
      on its caller's terminal uninvited garbles the caller's own output:
      scripts ask with progress=True)."""
    if isinstance(progress, Progress):
        return progress, False
    if progress is None:
        kernel = _in_kernel()
        progress = kernel or (_interactive() and _stderr_is_terminal())
    if progress is True:
        if _in_kernel():
            return _NotebookProgress(label), True
        if _stderr_is_terminal():
            return _TermProgress(sys.stderr, label, keep=True), True
        return _LineProgress(sys.stderr, label, keep=True), True
    if progress is False:
        return Progress(), True
    if callable(progress):
        return _CallbackProgress(progress), True
    raise ConfigError("progress= takes True, False, None, a function or a Progress, "
                      "not %r" % (progress,))


class _Shown:
    """``with _Shown(progress, label) as p:`` the Progress for a transfer
    method's *progress* argument (_progress_for), closed at the end when
    the method made it (a display then shows its final state)."""

    def __init__(self, progress, label):
        self.progress, self.owned = _progress_for(progress, label)

    def __enter__(self):
        return self.progress

    def __exit__(self, *exc):
        if self.owned:
            self.progress.close()


############################################################################
# Client
############################################################################

# The public face: one method per thing a user does, each a few lines over
# a backend (_DAV or _Service, chosen once in __init__), the planners of
# the engine, the credentials and the JupyterHub services.


class Client:
    """A client of one storage endpoint (dCache or any WebDAV server), or of
    the CTA download service that proxies it.

    >>> c = Client(url="https://dcache.example.org:2880", token_file="~/tok")
    >>> for e in c.ls("lst/DL1"): print(e.name, e.size)
    >>> hub = Client(service=True)      # $CTADS_URL or SERVICE_URL, $JUPYTERHUB_API_TOKEN

    Every module-level function exists as a method of the same name.  Remote
    paths are relative to *url*; a full http(s):// URL is accepted too.
    The token is found lazily (see README "Credentials"), refreshed when it
    came from `ctadata login` or oidc-agent (*oidc_agent*: account name),
    and sent only to the origin of *url*.  *auth*: "auto" (default: a token,
    else an X.509 proxy), "token" or "x509" (client certificate *cert*,
    $X509_USER_PROXY or /tmp/x509up_u$UID).  A Client is safe to use from
    several threads.

    *service* selects the service mode (see _service_url): a URL, True for
    the default one, False to refuse it; None lets $CTADS_URL decide when no
    *url* is given.  There, ``ls``, downloads and uploads go through the
    service's /list, /fetch and /upload; remote paths are relative to the
    storage root and may be percent-encoded, as the service lists them;
    uploads land in the caller's own folder.  *certificate_service* is the
    certificate service's URL (else $CTACS_URL, else CERTIFICATE_SERVICE_URL).
    *record_checksums*: compute the checksums of downloads even when the
    server has none to compare with (for manifests).  Tape (stage(),
    download(stage=True)): *tape_api* is the WLCG Tape REST API's URL (default:
    what the storage's /.well-known/wlcg-tape-rest-api names; the token is sent
    there, and only there besides the storage), *tape_prefix* the namespace
    path of *url* in that API (default: its URL path), *stage_poll* (first,
    longest) seconds between polls of a stage request (default 1 s, doubling
    while nothing changes, up to 60 s).  *fts*: the FTS3 server that
    fts_copy() and fts_job() talk to (else $CTADATA_FTS, else the profile's
    ``fts``); the token goes there too.  *jobs*: parallel transfers and
    listings (default 4; when neither it nor a method's *jobs* is given,
    transfers adapt up to 32, uploads up to 16, see _Concurrency)."""

    def __init__(self, url=None, token=None, token_file=None, dev=False, timeout=None,
                 retries=None, jobs=None, ca_file=None, ca_dir=None, insecure=False,
                 cert=None, backoff=0.5, expect_threshold=_EXPECT_THRESHOLD, env=None,
                 service=None, certificate_service=None, auth=None, oidc_agent=None,
                 profile=None, issuer=None, client_id=None, record_checksums=False,
                 tape_api=None, tape_prefix=None, stage_poll=None, fts=None):
        env = os.environ if env is None else env
        opts = _Options({"url": url, "service": service, "cert_service": certificate_service,
                         "issuer": issuer, "client_id": client_id, "jobs": jobs,
                         "timeout": timeout, "retries": retries, "ca_dir": ca_dir,
                         "ca_file": ca_file, "token_file": token_file,
                         "oidc_agent": oidc_agent, "auth": auth, "cert": cert,
                         "tape_api": tape_api, "tape_prefix": tape_prefix,
                         "stage_poll": stage_poll, "fts": fts},
                        profile, dev, env, insecure, backoff, expect_threshold)
        self._options, self.settings = opts, opts.settings
        self.profile, self.sources = opts.profile, opts.sources
        self.issuer, self.client_id = opts.issuer, opts.client_id
        self.warnings = []
        v, s = opts.values, self.settings
        self._auth = _Auth(token, v["token_file"], env, v["oidc_agent"], v["auth"], v["cert"],
                           opts.store, service=opts.service_url is not None)
        self._oidc = self._auth.oidc = _OIDC(s, self._auth.secrets, clock=self._auth.clock)
        import threading
        self._cancel = threading.Event()
        self._transport = tr = _Transport(s, self._auth, self._cancel)
        tr.record_sums = bool(record_checksums)
        # The one place where the modes differ: the backend (and so how
        # uploads go), and whose token the JupyterHub services get.
        if opts.service_url:
            self._remote = _Service(tr, s.url, self._warn)
            uploads, hub_auth, hub_url = _ServiceUploads, self._auth, s.url
            tape = _NoTape()
        else:
            self._remote = _DAV(tr, s.url, self._warn)
            uploads, hub_url = _Uploads, env.get("CTADS_URL") or SERVICE_URL
            hub_auth = _Auth(token, v["token_file"], env, service=True)
            tape = _TapeAPI(tr, s.url, v["tape_api"], v["tape_prefix"],
                            _stage_poll(v["stage_poll"]))
        self._downloads = _TapeDownloads(self._remote, tr, self._cancel, s.jobs, self._warn,
                                         tape)
        self._uploads = uploads(self._remote, tr, self._cancel, s.jobs, self._warn)
        self._copies = _Copies(self._remote, tr, self._cancel, s.jobs, self._warn, env,
                               self._peer_client)
        self._hub = _Hub(hub_auth, s, env, v["cert_service"], hub_url, self._cancel)

    def __repr__(self):
        return "Client(%s=%r)" % (self._remote.kind, self.settings.url)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close this thread's kept-alive connections."""
        self._transport.close()
        self._hub.close()

    def _warn(self, msg):
        self.warnings.append(msg)
        _log(30, "%s", msg)

    # -- settings and credentials -----------------------------------------------

    @property
    def url(self):
        """The storage URL (in service mode: the download service's URL)."""
        return self.settings.url

    @property
    def service(self):
        """The download service's URL in service mode, else None."""
        return self._remote.service_url

    @property
    def config_file(self):
        """The configuration file whose sections are the profiles."""
        return _config_file(self._options.env)

    def config(self):
        """The effective settings: a list of (name, value, where it came
        from: "argument", "$VARIABLE", "profile NAME (file)", "built-in
        default", ...).  Never a secret: the token is described by its
        source only."""
        rows = self._options.rows()
        try:
            self._auth.load()   # discovery only: the token itself is not shown
        except CtadataError as e:
            rows.append(("token", "error", str(e)))
        else:
            source = self._auth.source
            rows.append(("token", "found" if source else "none found",
                         source or "see `ctadata token --explain`"))
        return rows

    @property
    def auth_mode(self):
        """"auto" (a token, else an X.509 proxy), "token" or "x509"."""
        return self._auth.mode

    @property
    def token_source(self):
        """Where the token this client sends was found (never the token
        itself), once token discovery has run (the first request, token(),
        explain_token()); None when there is no token."""
        return self._auth.source

    def token(self):
        """Return the bearer token this client sends (refreshed first when it
        is about to expire), e.g. for curl.  Raises AuthError when there is
        none, ConfigError for an unreadable or unsafe token file."""
        return self._auth.header(need=True)[len("Bearer "):]

    def explain_token(self):
        """Return lines saying where the token was looked for and what was
        found (never the token itself), as `ctadata token --explain` prints."""
        return self._auth.explain()

    @property
    def login_store(self):
        """The file where login() keeps the tokens of this client's profile."""
        return self._auth.store.path

    def login(self, scope=_LOGIN_SCOPE, secret=None, show=None):
        """Log in with the OIDC device flow (RFC 8628) at this client's
        ``issuer`` as ``client_id``, and keep the tokens in ``login_store``
        (0600), where later clients find and refresh them.  *show(uri, code,
        complete_uri, expires_in)* is called once with what the user must
        open in a browser; then this waits for the login.  *secret*: the
        OIDC client's secret, if it has one.  Returns {"user": the user's
        name in the token or None, "store": the file, "refreshable": True
        when a refresh token came}.  Raises AuthError (denied, expired),
        ConfigError (the store cannot be written)."""
        rec = self._oidc.device_login(self.issuer, self.client_id, secret, scope, show)
        store = self._auth.store
        try:
            store.save(rec)
        except OSError as e:
            raise ConfigError("cannot keep the tokens in %s: %s" % (store.path, e.strerror or e))
        claims = _jwt_claims(rec["access_token"]) or {}
        who = claims.get("preferred_username") or claims.get("sub")
        return {"user": _printable(who, 80) if who else None, "store": store.path,
                "refreshable": bool(rec.get("refresh_token"))}

    def logout(self):
        """Forget the tokens login() kept for this client's profile; return
        True when there were any."""
        return self._auth.store.remove()

    # -- paths and listings ---------------------------------------------------------

    def url_for(self, path, collection=False):
        """Absolute, percent-encoded URL of a remote *path* (or Entry, or URL,
        or an entry of the service's listing).  In service mode, the service
        URL that serves it (``{service}/fetch/{path}``)."""
        return self._remote.url_for(path, collection)

    def stat(self, path):
        """Return the Entry of a remote file or directory.

        Raises NotFound if it does not exist, AuthError, RemoteError."""
        return self._remote.stat(path)

    def iter_dir(self, path="", details=True):
        """Yield the entries of one directory as the server sends them
        (unsorted, in bounded memory; the download service sends its listing
        as one JSON document).  For a file, yield its own entry.
        ``details=False`` asks the server for names and types only (faster;
        on dCache it also spares the checksum and tape-locality lookups):
        size, mtime, etag, checksums and locality are then left empty."""
        selfs = []
        n = 0
        for entry in self._remote.children(path, selfs.append, details):
            n += 1
            yield entry
        if not n and selfs and not selfs[0].is_dir:
            yield selfs[0]

    def walk(self, path="", jobs=None, details=True, on_error=None):
        """Yield (entry of a directory, sorted list of its entries) for *path*
        and every directory below it, depth first (for a file: nothing).
        Directory listings run ahead in parallel (*jobs* threads); the order
        is deterministic.  *details*: as for iter_dir.  *on_error(entry,
        error)*: a folder below *path* that cannot be listed is passed to it
        and skipped (with everything below it), and the walk goes on; without
        it, the error is raised.  Errors that every folder would meet
        (AuthError other than 403, ConfigError) are always raised."""
        return _walk(self._remote, path, jobs or self.settings.jobs, details, self._warn,
                     on_error)

    def ls(self, path="", recursive=False, select=None, details=True):
        """Return a list of Entry objects below *path*, sorted by name (with
        *recursive*, every descendant, depth first).  For a file, a list
        holding its own entry.  *select* (a glob, list of globs, compiled
        regex or callable over the path relative to *path*) keeps only the
        files it accepts (and no directories).  ``details=False``: names and
        types only (see iter_dir).  Raises NotFound, AuthError, RemoteError."""
        sel = _selector(select)
        if not recursive:
            return _Listing(sorted((e for e in self.iter_dir(path, details)
                                    if sel is None or (not e.is_dir and sel(e.name))),
                                   key=_entry_key))
        root = self.url_for(path, collection=True)
        out = _Listing()
        walked = False
        for _top, children in self.walk(path, details=details):
            walked = True
            out.extend(e for e in children if sel is None or (
                not e.is_dir and sel(_rel_path(root, e.url))))
        if not walked:   # a file: its own entry, as without recursive
            return self.ls(path, False, select, details)
        return out

    def list_dir(self, path="", recursive=False, n_threads=None):
        """List a remote directory (with *recursive*, everything below it) the
        way the old client did in this mode; what ``fetch_and_save_file`` takes.

        Direct mode: a list of paths (str, relative to the storage URL),
        directories ending with "/".  Service mode: the service's listing as
        it sent it, a list of dicts ``{"href", "type", "size", "mtime",
        "url"}`` (the directory itself included; hrefs percent-encoded) that
        also act as their href for ``in``, ``.split()`` and the like, as the
        old README's loops expect.  *n_threads* (the old client's) is
        ignored: listings use ``jobs``.  Raises NotFound, AuthError,
        RemoteError."""
        return self._remote.list_dir(path, recursive, self.ls)

    def du(self, path="", select=None, on_error=None):
        """Count what is below a remote path (listing in parallel): returns
        ``{"path", "files", "dirs", "bytes", "children": [{"name", "type",
        "files", "dirs", "bytes"}, ...]}`` with one record per immediate
        child, sorted by name.  *select* counts only some files (as for
        download).  *on_error*: as for walk (the counts then leave out the
        folders it was told of).  Raises NotFound, AuthError, RemoteError."""
        entry = self.stat(path)
        if not entry.is_dir:
            return _Usage(path=entry.path, files=1, dirs=0, bytes=entry.size or 0,
                          children=[])
        children = _usage_by_child(entry, self.walk(entry, on_error=on_error), _selector(select))
        return _Usage(path=entry.path,
                      files=sum(c["files"] for c in children),
                      dirs=sum(c["dirs"] + (c["type"] == "directory") for c in children),
                      bytes=sum(c["bytes"] for c in children),
                      children=children)

    # -- transfers -------------------------------------------------------------------

    def download(self, path, dest=None, recursive=False, overwrite=False,
                 checksum=False, select=None, dry_run=False, progress=None, jobs=None,
                 raise_on_failure=True, stage=False, release=False, lifetime=None):
        """Download a remote file, or with *recursive* a whole directory tree.

        A file goes to *dest* (a file name, or an existing/"…/"-ending folder;
        default: its name in the current folder).  A tree goes to
        ``dest/<name>`` when *dest* ends with "/" (or is ".", or omitted),
        else to *dest* itself.  *select* keeps only some files of a tree (a
        glob, list of globs, compiled regex or callable, applied to the path
        relative to the tree; see README "Selecting files").  Files already
        there are skipped unless *overwrite*: those of the same size and
        modification time (a download gives a file the server's); with
        *checksum*, those of the same size and checksum, where the server
        has checksums (where it has none, a warning says so once).  Each
        file streams to ``name.part`` and is renamed when
        complete and verified.  *dry_run*: list and plan only (results have
        status "planned"), write nothing.

        *progress* (every transfer method takes it): True shows files, bytes,
        rate and ETA (an updating output in a notebook, a line on stderr
        elsewhere), False nothing, a function is called with a snapshot
        (``files_done``, ``files_total``, ``bytes_done``, ``bytes_total``,
        ``rate``, ``eta``, ``listing``, ``final``, ...) at most twice a
        second and once at the end, a Progress object is fed as it is.  The
        default None shows it in a notebook and at an interactive prompt on
        a terminal, not in a script.


        A file the storage reports as on tape only (dCache's FileLocality
        NEARLINE; also LOST, UNAVAILABLE) is never asked for: it fails at
        once, with a hint.  With *stage*, such files are staged (WLCG Tape
        REST API; *lifetime*: how long they stay on disk, e.g. "1d") and
        each one is downloaded as soon as it is on disk, while the files on
        disk download at once; a file that cannot be staged (lost on tape)
        fails with the server's reason; *release*: let the storage drop
        each staged file's disk copy after its download.

        Another process downloading the same file into the same place is
        waited for (a lock on its .part; see README "Integrity and
        resilience"); a folder of the tree that cannot be listed or made is
        one failed result.

        Returns a TransferSummary.  Raises PartialFailure (with the summary)
        if any file failed, NotFound/AuthError/RemoteError if *path* cannot be
        listed, ConfigError (*stage* in service mode, a bad *lifetime*); a
        KeyboardInterrupt (Ctrl-C) carries ``.summary``, what was done by
        then."""
        if release and not stage:
            raise ConfigError("release goes with stage (get --stage --release)")
        how = None
        if stage:
            self._downloads.tape.require()      # service mode: said before anything is sent
            how = _StageOptions(_lifetime(lifetime), release)
        with _Shown(progress, "download") as p:
            return self._downloads.download(path, dest, recursive, overwrite, checksum,
                                            select, dry_run, p, jobs, raise_on_failure, how)

    def download_list(self, items, dest=".", strip_prefix=None, overwrite=False,
                      dry_run=False, progress=None, jobs=None, raise_on_failure=True):
        """Download every URL or remote path in *items* (strings; blank ones
        and "#" comments are ignored) below the folder *dest*, keeping the
        archive's tree: the local path is what follows *strip_prefix* in the
        URL, or else the whole URL path (for a remote path: that path).
        Works with plain HTTP(S) file servers (no WebDAV needed: no listing
        is made).  Present files of the same size and modification time
        (asked with HEAD) are skipped unless *overwrite*; transfers
        are parallel, resumable and verified like any download.  The token is
        only sent to the storage URL's origin.

        Returns a TransferSummary; raises PartialFailure if any file failed."""
        with _Shown(progress, "download") as p:
            return self._downloads.from_list(items, dest, strip_prefix, overwrite, dry_run,
                                             p, jobs, raise_on_failure)

    def fetch_and_save_file(self, path, save_to_fn=None, overwrite=True, progress=None,
                            chunk_size=None):
        """Download one remote file (a path, URL, Entry or an entry of
        list_dir()); return the number of bytes written.

        *save_to_fn* defaults to the file's name in the current folder (as in
        the old client).  In service mode the size is checked against the
        service's listing (it answers 200 even when the storage failed
        mid-way), and, as the old client did there, *chunk_size* (default
        10 MiB) is sent to the service (``/fetch/PATH?chunk_size=N``: it
        reads the storage and sends in pieces of N bytes) and a line "wrote
        %.2f / %.2f Mb in %d chunks in %.2f seconds" is logged at INFO on the
        logger "ctadata.api" as the chunks arrive (each time the percentage
        grew).  Raises NotFound, AuthError, TransferError, ChecksumMismatch."""
        summary = self._old_download(path, save_to_fn, False, overwrite, progress, chunk_size,
                                     False)
        if summary.failed:
            raise _failure_exception(summary.failures[0])
        return sum(r.size or 0 for r in summary.results)

    def fetch_and_save_file_or_dir(self, path, save_to=None, recursive=False,
                                   overwrite=False, progress=None, chunk_size=None):
        """Download a file, or with *recursive* a directory tree (kept below
        ``<save_to or .>/<name>``); return the TransferSummary.  Raises
        PartialFailure if any file failed.  ``(path, True)`` means
        recursive, as in the old client, whose second argument it was.
        *chunk_size*: as for fetch_and_save_file (service mode)."""
        if isinstance(save_to, bool):
            save_to, recursive = None, save_to
        if save_to is not None and recursive and not _names_folder(save_to):
            save_to = save_to + "/"
        return self._old_download(path, save_to, recursive, overwrite, progress, chunk_size,
                                  True)

    def _old_download(self, path, dest, recursive, overwrite, progress, chunk_size,
                      raise_on_failure):
        """download() as the old functions make it: in service mode with the
        old client's chunk size (see fetch_and_save_file)."""
        if self.service:
            chunk_size = _positive(chunk_size, _OLD_CHUNK_SIZE, "chunk_size", int)
        with _Shown(progress, "download") as p:
            return self._downloads.download(path, dest, recursive, overwrite, False, None,
                                            False, p, None, raise_on_failure,
                                            chunk_size=chunk_size if self.service else None)

    def upload(self, local, remote="", recursive=False, verify=None, overwrite=False,
               checksum=False, select=None, dry_run=False, progress=None, jobs=None,
               raise_on_failure=True):
        """Upload a local file, or with *recursive* a directory tree.

        A remote path ending with "/" (or empty) names the folder to upload
        *into* (``remote/<local name>``); otherwise it is the new name.
        Missing remote folders are created.  What is already there is
        skipped unless *overwrite* (a tree upload lists the destination
        first, one file is looked up): a remote file of the same size that
        is not older than the local one (servers stamp an upload with the
        time it arrived, so a local file changed after its upload goes
        again); with *checksum*, one of the same size and checksum, where
        the server has checksums.  In service mode nothing is skipped (the
        service cannot say what is there).  *select* keeps only some files
        (as for download).
        *verify*: see _upload_file (True: Content-MD5 for every file; None:
        for files up to 1 MiB; False: never).  *dry_run*: plan only, send
        nothing that changes the storage.  In service mode everything lands
        in the caller's own folder, and each result's ``remote_path`` (and the
        summary's) is the path the service reports.  Only regular files (and
        symlinks to them) are uploaded; afterwards the server is asked
        whether each is there under its name with its size (a file that is
        not fails).  Returns a TransferSummary; raises PartialFailure if any
        file failed, ConfigError for a bad local path; a KeyboardInterrupt
        carries ``.summary``."""
        with _Shown(progress, "upload") as p:
            return self._uploads.upload(local, remote, recursive, verify, overwrite, checksum,
                                        select, dry_run, p, jobs, raise_on_failure)

    def upload_file(self, local, remote="", progress=None):
        """Upload one file; return ``{"path", "status", "total_written"}``: in
        service mode the service's own answer (``path`` is in your folder:
        what others pass to fetch), in direct mode a dict like it.  A *remote*
        ending with "/" is a folder: ``upload_file("latest.txt",
        "your-folder/")`` -> your-folder/latest.txt.  Raises ConfigError
        (bad local file or remote path), AuthError, TransferError."""
        # overwrite: the old client's upload_file always sent the file
        summary = self.upload(local, remote, overwrite=True, progress=progress,
                              raise_on_failure=False)
        if summary.failed:
            raise _failure_exception(summary.failures[0])
        r = summary.results[0]
        if isinstance(r, _ServiceResult):
            return dict(r.answer)
        return {"path": r.remote_path, "status": "uploaded", "total_written": r.size}

    def upload_dir(self, local, remote="", progress=None):
        """Upload a local directory tree to *remote* (into it when *remote*
        ends with "/"); return the TransferSummary.  Raises PartialFailure."""
        return self.upload(local, remote, recursive=True, progress=progress)

    # -- reading without downloading ----------------------------------------------

    def open(self, path, mode="rb", block_size=None, cache_size=None):
        """Open a remote file for reading without downloading it: return a
        seekable, read-only binary file object (read, readinto, seek, tell,
        close; ``with``; ``name``, ``size``, and ``requests`` / ``fetched``:
        the GETs and bytes it cost so far) that fetches only the parts read,
        with HTTP Range requests, in blocks of *block_size* bytes (default
        256 KiB) kept in a cache of *cache_size* bytes (default 32 MiB),
        reading ahead while reads are sequential.  ``h5py.File(f)``,
        ``astropy.io.fits.open(f)`` and ``zipfile.ZipFile(f)`` take it.
        Nothing is checksummed (use download or cat for that).  In service
        mode (the download service ignores Range) the file reads from start
        to end only: seek() raises io.UnsupportedOperation.  Raises NotFound,
        ConfigError (a directory, a mode other than "rb"), AuthError; reads
        raise TransferError (also when the file changed since it was opened)."""
        if mode != "rb":
            raise ConfigError("open() reads bytes: mode must be 'rb', not %r (for text, "
                              "wrap the file in io.TextIOWrapper)" % (mode,))
        entry = self._readable(path, "open")
        return _RemoteFile(self._transport, entry, block_size, cache_size,
                           self._remote.resumable)

    def cat(self, path, out):
        """Write a remote file to the binary stream *out* (e.g.
        ``sys.stdout.buffer``) as it arrives; return the number of bytes
        written.  A dropped connection resumes where it stopped (direct
        mode).  The size and the server's checksum are checked at the end,
        after the bytes are written: a mismatch raises ChecksumMismatch (the
        output is then not the file).  Raises NotFound, ConfigError (a
        directory), TransferError."""
        entry = self._readable(path, "cat")
        return _copy_to(self._transport, entry, out, self._remote.resumable)

    def _readable(self, path, verb):
        """The Entry of a remote file to read (not a directory, size known)."""
        entry = self._remote.stat(path)
        if entry.is_dir:
            raise ConfigError("%s is a directory (%s reads files)" % (entry.path or "/", verb))
        if entry.size is None:
            raise ProtocolError("the server does not say the size of %s" % entry.path,
                                entry.url)
        return entry

    # -- tape (WLCG Tape REST API) ---------------------------------------------------

    def stage(self, paths, lifetime=None, recursive=False, select=None):
        """Ask the storage to bring files from tape to disk, in stage
        requests of at most 1,000 files; return a StageRequest (``.id``,
        ``.files``, ``.refresh()``, ``.wait()``, ``.cancel()``,
        ``.release()``).  *paths*: a remote path (or Entry), or a list;
        a directory needs *recursive* (its files, filtered by *select* as
        for download).  *lifetime*: how long the files stay on disk ("12h",
        "2d", "PT12H", seconds; default: the server's).  Files on disk
        already are staged too (their disk copy is then kept that long).
        Raises ConfigError (a directory without *recursive*, a bad
        *lifetime*, service mode), NotFound, AuthError, RemoteError (with
        the server's RFC 7807 message; its hint names the requests already
        submitted, if any)."""
        return self._downloads.stage(paths, lifetime, recursive, select)

    def stage_request(self, request_id):
        """The StageRequest with this id (several ids joined with "," for
        more than 1,000 files, as StageRequest.id gives them), refreshed:
        e.g. to follow, cancel or release one made earlier, from any
        machine.  Raises NotFound (an unknown id, or one the server has
        forgotten), ConfigError (service mode), AuthError."""
        return self._downloads.stage_request(request_id)

    def archive_info(self, paths):
        """Where files are, as the tape REST API says (POST /archiveinfo, in
        batches): {path as given: "DISK", "TAPE", "DISK_AND_TAPE", "LOST",
        "NONE", "UNAVAILABLE", or None when the server did not say (its
        reason, e.g. "No such file or directory", goes to ``warnings``)}.
        Raises ConfigError (service mode), AuthError, RemoteError."""
        return self._downloads.archive_info(paths)

    def download_staged(self, request, dest=".", overwrite=False, checksum=False,
                        release=False, dry_run=False, progress=None, jobs=None,
                        raise_on_failure=True):
        """Download exactly the files of an earlier stage request (a
        StageRequest or its id) below the folder *dest*, each at its remote
        path (``dest/raw/run1/f.fits.fz``), each as soon as it is on disk: the
        morning after ``stage()``, on any machine.  A file whose disk copy
        is gone again is staged anew; one whose staging failed fails with
        the server's reason.  *overwrite*, *checksum*, *dry_run*, *release*
        as for download(stage=True).  Returns a TransferSummary; raises
        PartialFailure, NotFound (unknown or forgotten request),
        ConfigError (service mode)."""
        with _Shown(progress, "download") as p:
            return self._downloads.download_request(request, dest, overwrite, checksum,
                                                    release, dry_run, p, jobs,
                                                    raise_on_failure)

    # -- copies between remote places, shared links, FTS3 ---------------------------

    def copy(self, src, dst, recursive=False, mode="pull", overwrite=False, verify=True,
             select=None, dry_run=False, progress=None, jobs=None, raise_on_failure=True,
             delegate_token=()):
        """Copy a remote file, or with *recursive* a tree, to another remote
        place: the bytes go from server to server, never through this
        machine.  *src* is a remote path (relative to the storage URL), a
        URL or an Entry, or a list of them (copied into the folder *dst*);
        *dst* a remote path or URL, a folder to copy into when it ends with
        "/" (a tree goes to ``dst/<name>`` then, else to *dst* itself, as for
        download).  Within one server: WebDAV COPY.  Between two: HTTP
        third-party copy, *mode* "pull" (the destination fetches; default)
        or "push" (the source sends); the other server gets a macaroon
        limited to the files and to reading (pull) or writing (push), asked
        of the server it is for.  Credentials: the storage's origin gets
        your token; another origin what the profile whose ``url`` is there
        would send (see README "Copies between storages"), else nothing; your
        token goes to another origin only if *delegate_token* names it
        (a list of URLs).  After each copy the checksums of both sides are
        compared (*verify*; the sizes when they share no algorithm); a
        mismatch deletes the copy.  A file already at the destination with
        the same size and checksum is skipped; one that differs fails unless
        *overwrite*.  *select*, *dry_run*, *progress*, *jobs* as for
        download.  A local side (an os.PathLike, ``file:PATH``, ``.``,
        ``./PATH``, ``../PATH``, ``~/PATH``) makes this a download() or an
        upload().

        Returns a TransferSummary; raises PartialFailure if any file failed,
        NotFound (a single source that does not exist), ConfigError (a
        folder without *recursive*, service mode)."""
        sources = list(src) if isinstance(src, (list, tuple)) else [src]
        local = [_local_side(s) for s in sources]
        here = _local_side(dst)
        if here is not None or any(p is not None for p in local):
            if len(sources) != 1 or (here is not None and local[0] is not None):
                raise ConfigError("copy with a local side takes one source and one remote "
                                  "side (both local: use cp)")
            if here is not None:
                return self.download(sources[0], here, recursive, overwrite, bool(verify),
                                     select, dry_run, progress, jobs, raise_on_failure)
            return self.upload(local[0], dst, recursive, None if verify else False,
                               overwrite, bool(verify), select, dry_run, progress, jobs,
                               raise_on_failure)
        return self._copies.copy(src, dst, recursive, mode, overwrite, verify, select,
                                 dry_run, progress, jobs, raise_on_failure, delegate_token)

    def share(self, path, duration="1d", allow=_SHARE_DEFAULT, ip=None):
        """Ask the storage for a macaroon for *path* (a file, or a folder
        and everything below it): a SharedLink whose ``url`` works without
        an account, in a browser or with curl, until it expires.
        *duration*: how long ("1d", "12h", "30m", "P1D", seconds; default
        one day; servers cap it: dCache and ctadata serve at 7 days);
        *allow*: what its holder may do, names or a "," list of download,
        list, upload, delete, manage, read_metadata, update_metadata, stage
        (default download and list); *ip*: only from this address or
        network.  The macaroon is a secret: whoever has the link can do what
        it allows.  Raises ConfigError (bad arguments; a server that issues
        no macaroons; service mode), AuthError."""
        dav = self._remote.webdav("share")
        return _share(dav, path, duration, allow, ip)

    def fts_copy(self, src, dst, fts=None, recursive=False, overwrite=False, verify=True,
                 retry=2, select=None, jobs=None):
        """Hand a copy to an FTS3 server (*fts*, else the client's ``fts``)
        instead of doing it from here: the files of *src* (a path, URL or
        list; a tree with *recursive*, filtered by *select*) are listed,
        then submitted with their sizes (and adler32, when the listing has
        it) as FTS3 jobs of at most 1,000 files, with *overwrite*,
        *verify* (FTS3 compares checksums) and *retry* (attempts FTS3 makes
        after a failure).  *src* and *dst* as for copy(); the storage's
        folders are not made here (FTS3 does it).  Your token (or client
        certificate) goes to the FTS3 server.  Returns an FTSJob (``.id``,
        ``.refresh()``, ``.wait()``, ``.cancel()``).  Raises ConfigError (no
        FTS3 server, nothing selected), NotFound, AuthError, RemoteError."""
        return self._copies.fts_submit(self._fts(fts), src, dst, recursive, overwrite,
                                       verify, retry, select, jobs)

    def fts_job(self, job_id, fts=None):
        """The FTSJob with this id (several joined with ","), refreshed: to
        follow or cancel one submitted earlier, from any machine.  Raises
        NotFound (FTS3 does not know it), ConfigError (no FTS3 server),
        AuthError."""
        ids = _split_ids(job_id, "FTS3 job id")
        return FTSJob(self._fts(fts), ids).refresh()

    def _fts(self, url):
        url = url or self._options.values["fts"] or self._options.env.get("CTADATA_FTS")
        if not url:
            raise ConfigError("no FTS3 server: give its URL (--fts URL, fts=URL)",
                              hint="or set fts = URL in your profile, or $CTADATA_FTS")
        return _FTS(self._transport, str(url))

    def _peer_client(self, profile, url):
        """The Client of *profile*, whose url is *url*: the credentials of
        another origin of a copy, with this client's connection settings
        where they were given as arguments."""
        s, given = self.settings, self.sources
        kw = {k: getattr(s, k) for k in ("timeout", "retries", "ca_file", "ca_dir")
              if given.get(k) == "argument"}
        return Client(url=url, profile=profile, env=self._options.env,
                      insecure=s.insecure, jobs=s.jobs, **kw)

    # -- namespace operations (WebDAV only) ---------------------------------------

    def mkdir(self, path, parents=False):
        """Create a remote directory (with *parents*, also missing parents;
        an existing directory is then fine).  Returns None.  Raises
        RemoteError, ConfigError (service mode)."""
        self._remote.webdav("mkdir").mkdir(path, parents)

    def remove(self, path, recursive=False, dry_run=False):
        """Delete a remote file, or with *recursive* a directory tree.
        Returns the Entry objects deleted (with *dry_run*: that would be,
        nothing is deleted; a tree is listed in full).  Raises NotFound,
        ConfigError (a directory without *recursive*; service mode)."""
        dav = self._remote.webdav("remove")
        entry = dav.stat(path)
        if entry.is_dir and not recursive:
            raise ConfigError("%s is a directory" % (entry.path or "/"),
                              hint="use recursive=True", cli_hint="use rm -r")
        if dry_run:
            return [entry] + (self.ls(entry, recursive=True) if entry.is_dir else [])
        dav.delete(dav.url_for(entry, collection=entry.is_dir), folder=entry.is_dir)
        return [entry]

    def move(self, src, dst, overwrite=False, dry_run=False):
        """Rename/move a remote file or directory on the server (WebDAV MOVE).
        A *dst* ending with "/" is a folder to move into.  Returns (source
        Entry, destination URL); *dry_run* only checks the source.  Raises
        NotFound, RemoteError (412 when *dst* exists and not *overwrite*),
        ConfigError (service mode)."""
        dav = self._remote.webdav("move")
        entry = dav.stat(src)
        dst = str(dst)
        if dst.endswith("/"):
            dst += entry.name
        target = dav.url_for(dst, entry.is_dir)
        if not dry_run:
            dav.move(dav.url_for(entry, entry.is_dir), target, overwrite)
        return entry, target

    def checksum(self, path):
        """Return the server's checksums of a file as {algorithm: hex}.

        Asks with HEAD + Want-Digest (RFC 3230), falls back to dCache's
        Checksums property.  Empty dict when the server has none.  Raises
        NotFound, RemoteError, ConfigError (service mode)."""
        return self._remote.webdav("checksum").checksum(path)

    # -- the JupyterHub services: certificates, WebDAV pass-through ------------

    def upload_certificate(self, path, certificate_key="cta"):
        """Upload your (proxy) certificate, a PEM file, to the certificate
        service, so that the platform can reach the storage as you;
        *certificate_key* says for which storage area: "cta", "lst" or
        "arc".  Return the service's JSON answer (a dict with a
        ``message``).  Raises ConfigError (unreadable file, unknown key:
        nothing sent), CertificateError (refused; ``status`` and the
        service's message), TransferError."""
        if certificate_key not in _CERTIFICATE_KEYS:
            raise ConfigError("certificate_key must be one of %s, not %r"
                              % (", ".join(_CERTIFICATE_KEYS), certificate_key))
        return self._hub.post_certificate("certificate", path,
                                          {"certificate_key": certificate_key})

    def upload_shared_certificate(self, path):
        """Upload the shared (robot) certificate used for data syncing to the
        certificate service (its main certificate; for operators).  Return
        the service's JSON answer.  Raises ConfigError, CertificateError,
        TransferError."""
        return self._hub.post_certificate("main-certificate", path, {})

    def webdav_client(self):
        """Return a direct-mode Client on the download service's WebDAV
        pass-through (``{service}/webdav/``), with the same hub token:
        mkdir, rm, stat and the rest, writes only inside your own folder.
        Without service mode, the service is $CTADS_URL or SERVICE_URL.
        Raises ConfigError for a bad URL."""
        s = self.settings
        c = Client(url=self._hub.webdav_url(), timeout=s.timeout, retries=s.retries,
                   jobs=s.jobs, ca_file=s.ca_file, ca_dir=s.ca_dir, insecure=s.insecure,
                   cert=s.cert, env=self._options.env, service=False)
        # The pass-through wants the hub token, not a storage token.
        c._auth = c._transport.auth = self._hub.auth
        return c

    def webdav4_client(self):
        """Return a ``webdav4.client.Client`` on the download service's WebDAV
        pass-through, sending the hub token: the old client's function, for
        those who have webdav4 installed (ctadata never needs it; see
        webdav_client()).  Raises ConfigError when webdav4 is missing."""
        try:
            # An optional third-party package, looked up by name only when a
            # script asks for it: ctadata itself depends on nothing.
            import importlib
            WebDAV4Client = importlib.import_module("webdav4.client").Client
        except ImportError:
            raise ConfigError("webdav4_client() needs the webdav4 package "
                              "(pip install webdav4); webdav_client() needs nothing")
        auth = self._hub.auth

        def bearer(request):  # an httpx auth callable
            value = auth.header()
            if value:
                request.headers["Authorization"] = value
            return request
        return WebDAV4Client(self._hub.webdav_url() + "/", auth=bearer)


############################################################################
# Public functions
############################################################################

# The module-level functions of the old client and their new siblings: each
# one calls the Client method of the same name on one lazily made default
# Client (the only module-level state), or on one made for the old client's
# keyword arguments and APIClient settings.


_default_client = None
_default_key = None
_default_explicit = False
_compat = None  # (settings key, Client) of the last call with old-style settings
_default_lock = _thread.allocate_lock()
# What decides the default client.  A notebook that sets these after a first
# call (as the old README does) gets a client that follows them.
_ENV_KEYS = ("CTADATA_URL", "CTADS_URL", "CTACS_URL", "JUPYTERHUB_API_TOKEN")
# The old client's keyword arguments, accepted by its functions.
_OLD_OPTIONS = ("token", "downloadservice", "certificateservice", "chunk_size",
                "dev_instance")


def _env_key():
    return tuple(os.environ.get(k) for k in _ENV_KEYS)


def default_client():
    """Return the Client used by the module-level functions, creating it on
    first use from the environment (CTADATA_URL, CTADS_URL, token discovery)
    and again when those variables changed.  Raises ConfigError for a bad
    URL in the environment."""
    global _default_client, _default_key
    key = _env_key()
    with _default_lock:
        if _default_client is None or (not _default_explicit and key != _default_key):
            _default_client = Client()
            _default_key = key
        return _default_client


def set_default_client(client):
    """Make *client* the one the module-level functions use (None: rebuild
    from the environment on next use).  Returns None."""
    global _default_client, _default_explicit, _compat
    with _default_lock:
        _default_client = client
        _default_explicit = client is not None
        _compat = None


# The old client's functions (module-level, and APIClient's methods): what
# they raise is a StorageException (_old_api_error), as the old client's was.
_OLD_NAMES = ("list_dir", "fetch_and_save_file", "fetch_and_save_file_or_dir", "upload_file",
              "upload_dir", "upload_certificate", "upload_personal_certificate",
              "upload_shared_certificate", "webdav4_client")


def _old_api(func):
    """*func*, raising its errors as StorageExceptions too (_old_api_error)."""
    def old(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CtadataError as e:
            _old_api_error(e)
            raise
    old.__name__, old.__qualname__, old.__doc__ = func.__name__, func.__qualname__, func.__doc__
    old.__wrapped__ = func
    return old


def _client(options=None, func="function"):
    """The Client for one module-level call: the default one, unless the old
    client's keyword arguments (*options*) or APIClient's class attributes
    ask for other settings; then a Client made for those (and kept for the
    next call that asks the same).  Unknown keywords are a TypeError, as
    Python would say."""
    global _compat
    wanted = {"token": APIClient.token, "downloadservice": APIClient.downloadservice,
              "certificateservice": APIClient.certificateservice, "dev_instance": None}
    for k, v in (options or {}).items():
        if k not in _OLD_OPTIONS:
            raise TypeError("%s() got an unexpected keyword argument %r" % (func, k))
        if v is not None:  # as in the old client, None means "not given"
            wanted[k] = v
    wanted.pop("chunk_size", None)  # not a setting of the Client: see fetch_and_save_file
    if not any(wanted.values()):
        return default_client()
    key = (tuple(sorted(wanted.items())), _env_key())
    with _default_lock:
        if _compat is None or _compat[0] != key:
            _compat = (key, Client(token=wanted["token"],
                                   service=wanted["downloadservice"] or None,
                                   certificate_service=wanted["certificateservice"],
                                   dev=bool(wanted["dev_instance"])))
        return _compat[1]


class APIClient:
    """The old client's class, for scripts written for it.

    Scripts set its class attributes and later module-level calls honour
    them: ``ctadata.APIClient.downloadservice = url`` (service mode with that
    service), ``certificateservice`` (the certificate service), ``token``
    (the JupyterHub API token), ``chunk_size`` (service mode: what
    fetch_and_save_file asks the service for and logs per chunk, default
    10 MiB, as the old client did; direct mode ignores it).  None, the
    default, means "from the environment" ($CTADS_URL, $CTACS_URL,
    $JUPYTERHUB_API_TOKEN), or 10 MiB for chunk_size.

    The old functions also take these as keyword arguments (``token=``,
    ``downloadservice=``, ``certificateservice=``, ``chunk_size=``), and
    ``dev_instance=True`` (the development storage, in direct mode).

    An instance has the old methods; its attributes override the class's:
    ``api = ctadata.APIClient(); api.token = "..."; api.list_dir("lst")``.
    Importing or instantiating it reads nothing and creates nothing."""

    downloadservice = None
    certificateservice = None
    token = None
    chunk_size = None

    def __init__(self, dev_instance=False):
        self.dev_instance = dev_instance

    def _client(self, options, func):
        merged = {"token": self.token, "downloadservice": self.downloadservice,
                  "certificateservice": self.certificateservice,
                  "dev_instance": self.dev_instance}
        for k, v in options.items():
            if v is not None or k not in merged:
                merged[k] = v
        return _client(merged, func)

    @_old_api
    def list_dir(self, path="", recursive=False, n_threads=None, **options):
        """As the module function list_dir()."""
        return self._client(options, "list_dir").list_dir(path, recursive)

    @_old_api
    def fetch_and_save_file(self, path, save_to_fn=None, progress=None, **options):
        """As the module function fetch_and_save_file()."""
        return self._client(options, "fetch_and_save_file").fetch_and_save_file(
            path, save_to_fn, progress=progress,
            chunk_size=options.get("chunk_size") or self.chunk_size)

    @_old_api
    def fetch_and_save_file_or_dir(self, path, save_to=None, recursive=False, progress=None,
                                   **options):
        """As the module function fetch_and_save_file_or_dir()."""
        return self._client(options, "fetch_and_save_file_or_dir") \
            .fetch_and_save_file_or_dir(path, save_to, recursive, progress=progress,
                                        chunk_size=options.get("chunk_size") or self.chunk_size)

    @_old_api
    def upload_file(self, local_fn, path="", progress=None, **options):
        """As the module function upload_file()."""
        return self._client(options, "upload_file").upload_file(local_fn, path,
                                                                 progress=progress)

    @_old_api
    def upload_dir(self, local_dir, path="", progress=None, **options):
        """As the module function upload_dir()."""
        return self._client(options, "upload_dir").upload_dir(local_dir, path,
                                                               progress=progress)

    @_old_api
    def upload_certificate(self, path, certificate_key="cta", **options):
        """As the module function upload_certificate()."""
        return self._client(options, "upload_certificate").upload_certificate(
            path, certificate_key)

    upload_personal_certificate = upload_certificate

    @_old_api
    def upload_shared_certificate(self, path, **options):
        """As the module function upload_shared_certificate()."""
        return self._client(options, "upload_shared_certificate") \
            .upload_shared_certificate(path)

    def webdav_client(self, **options):
        """As the module function webdav_client()."""
        return self._client(options, "webdav_client").webdav_client()

    @_old_api
    def webdav4_client(self, **options):
        """As the module function webdav4_client()."""
        return self._client(options, "webdav4_client").webdav4_client()


_DEFAULT_CLIENT_NOTE = """\
        On the default client (see default_client()), or on one made for
        the old client's keyword arguments token=, downloadservice=,
        certificateservice=, chunk_size=, dev_instance= (see APIClient)."""


def _default_client_function(name, method=None):
    """The module-level function *name*: Client.<method or name> called on
    the Client of _client() (bottle's make_default_app_wrapper).  The old
    client's keyword arguments (see APIClient) choose that Client, the rest
    go to the method, whose docstring and signature it shows."""
    import functools
    unbound = getattr(Client, method or name)
    code = unbound.__code__
    params = code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount]

    def function(*args, **kwargs):
        options = {}
        for k in list(kwargs):
            if k in _OLD_OPTIONS:
                options[k] = kwargs.pop(k)
            elif k not in params:
                raise TypeError("%s() got an unexpected keyword argument %r" % (name, k))
        if "chunk_size" in params:  # (fetch_and_save_file...: see APIClient.chunk_size)
            kwargs["chunk_size"] = options.get("chunk_size") or APIClient.chunk_size
        return getattr(_client(options, name), method or name)(*args, **kwargs)
    if name in _OLD_NAMES:
        function = _old_api(function)
    function.__name__ = function.__qualname__ = name
    function.__doc__ = "%s%s\n\n%s" % ("The old name of %s(). " % method if method else "",
                                       unbound.__doc__, _DEFAULT_CLIENT_NOTE)
    function.__wrapped__ = functools.partial(unbound, None)  # its signature, without self
    return function


# The module-level functions: one per Client method of the same name.
list_dir = _default_client_function("list_dir")
ls = _default_client_function("ls")
stat = _default_client_function("stat")
fetch_and_save_file = _default_client_function("fetch_and_save_file")
fetch_and_save_file_or_dir = _default_client_function("fetch_and_save_file_or_dir")
upload_file = _default_client_function("upload_file")
upload_dir = _default_client_function("upload_dir")
upload_certificate = _default_client_function("upload_certificate")
upload_personal_certificate = _default_client_function("upload_personal_certificate",
                                                       "upload_certificate")
upload_shared_certificate = _default_client_function("upload_shared_certificate")
webdav_client = _default_client_function("webdav_client")
webdav4_client = _default_client_function("webdav4_client")
mkdir = _default_client_function("mkdir")
remove = _default_client_function("remove")
move = _default_client_function("move")
du = _default_client_function("du")
checksum = _default_client_function("checksum")
stage = _default_client_function("stage")
stage_request = _default_client_function("stage_request")
archive_info = _default_client_function("archive_info")
copy = _default_client_function("copy")
share = _default_client_function("share")
fts_copy = _default_client_function("fts_copy")
fts_job = _default_client_function("fts_job")


class _Module(type(sys)):
    """The type of the ctadata module: it adds ``ctadata.open(path, "rb")``
    (Client.open on the default client, as tarfile.open or gzip.open),
    without a global ``open`` that would hide the built-in open() from this
    module's own code and from ``from ctadata import *``."""

    open = staticmethod(_default_client_function("open"))


sys.modules[__name__].__class__ = _Module


############################################################################
# Server (`ctadata serve`)
############################################################################

# A small dCache-like archive over a local folder, for trying ctadata
# without an account, for users' pipelines in their CI, and for our own
# tests.  It follows RFC 4918 (WebDAV: PROPFIND Depth 0/1, MKCOL, DELETE,
# MOVE, COPY), RFC 9110 (Range, If-Range), RFC 3230 (Want-Digest/Digest),
# dCache's door-to-pool redirects and properties (PROTOCOL.md §2), the WLCG
# Tape REST API v1 (§8, issue 12) and dCache's macaroon requests (§7).
# It shares the client's rules: names are checked with _is_safe_name (the
# rule both listing parsers and _safe_join use), checksums are _Hashers,
# globs are _selector.
#
# A server is an attack surface: it binds loopback unless told otherwise,
# every request needs the bearer token (or a macaroon within its caveats)
# unless it runs --no-auth --read-only, every path is resolved inside the
# folder (symlinks leading out of it are refused), request heads and
# bodies that are parsed are bounded, and nothing answers with HTML.

_SERVE_TMP = ".ctadata-upload-"   # uploads in progress: never listed or served
_SERVE_LINE_LIMIT = 8192          # the request line, and each header line
_SERVE_HEAD_LIMIT = 65536         # all header lines of a request together
_SERVE_HEADER_COUNT = 100
_SERVE_XML_LIMIT = 1 << 16        # PROPFIND bodies
_SERVE_JSON_LIMIT = 1 << 20       # macaroon and tape requests (1,000 paths fit)
_SERVE_DRAIN_LIMIT = 1 << 20      # an unread body up to this is read and dropped,
                                  # a larger one closes the connection
_SERVE_IDLE = 60.0                # seconds a connection may stay silent
_SERVE_CONNECTIONS = 64           # open connections; more are answered 503
_SERVE_TICKET_TTL = 300.0         # a pool URL (--redirect) works once, this long
_SERVE_LOG = 10000                # requests kept for `requests` (tests)
_STAGE_DELAY = 2.0                # simulated seconds from stage request to disk
_STAGE_LIFETIME = 86400.0         # diskLifetime when a stage request names none
_MACAROON_VALIDITY = 86400.0      # when a macaroon request names none
_MACAROON_MAX = 7 * 86400.0
_DCACHE_NS = "http://www.dcache.org/2013/webdav"
_SRM_NS = "http://srm.lbl.gov/StorageResourceManager"
_TAPE_API = "/api/v1/tape"        # where dCache's frontend has it
_ACTIVITIES = ("LIST", "DOWNLOAD", "UPLOAD", "DELETE", "MANAGE", "READ_METADATA",
               "UPDATE_METADATA", "STAGE")
# What a macaroon must allow for each method (any one of the activities).
_METHOD_ACTIVITIES = {
    "GET": ("DOWNLOAD",), "HEAD": ("DOWNLOAD", "READ_METADATA", "LIST"),
    "PUT": ("UPLOAD",), "MKCOL": ("UPLOAD", "MANAGE"), "DELETE": ("DELETE",),
    "MOVE": ("MANAGE",),
}
_DAV_PROPS = ("resourcetype", "getcontentlength", "getlastmodified", "getetag",
              "getcontenttype", "displayname")   # allprop: the DAV: ones, as dCache


class _Refusal(Exception):
    """An HTTP error answer, raised anywhere below a request handler.
    *problem*: answer as RFC 7807 JSON (the tape API) instead of text."""

    def __init__(self, status, text, headers=None, close=False, problem=False):
        Exception.__init__(self, text)
        self.status, self.text, self.headers = status, text, headers or {}
        self.close, self.problem = close, problem


def _url_path_parts(raw):
    """The decoded names of a request's percent-encoded URL path, checked
    with the client's rules.  Each segment is decoded on its own, so that an
    encoded "/" (%2F) cannot pose as a separator; "", "." and ".." segments,
    "\\", NUL and control characters are refused (400)."""
    from urllib.parse import unquote
    parts = []
    for seg in raw.split("/"):
        if not seg:
            continue
        try:
            parts.append(unquote(seg, errors="strict"))
        except UnicodeDecodeError:
            raise _Refusal(400, "the path is not UTF-8")
    return _checked_names(parts)


def _checked_names(parts):
    for part in parts:
        if not _is_safe_name(part):
            raise _Refusal(400, "refusing the path: unsafe name %r" % part)
    return parts


def _plain_path_parts(text):
    """The names of a namespace path (the tape API's, not percent-encoded)."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise _Refusal(400, "a path must be a string starting with '/': %r"
                       % _printable(text, 100), problem=True)
    parts = [p for p in text.split("/") if p]
    try:
        return _checked_names(parts)
    except _Refusal as e:
        e.problem = True
        raise


def _rel(parts):
    return "/" + "/".join(parts)


def _etag(st):
    return '"%d-%d"' % (st.st_size, st.st_mtime_ns)


def _http_date(ts):
    import email.utils
    return email.utils.formatdate(ts, usegmt=True)


def _utc_stamp(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _parse_utc_stamp(text):
    import calendar
    try:
        return float(calendar.timegm(time.strptime(text.strip()[:19], "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, OverflowError):
        return None


def _want_digest(header):
    """The checksums a Want-Digest asks for that we compute ("adler32",
    "md5"), most wanted first; q=0 means "not this one" (RFC 3230 §4.3.1)."""
    wanted = []
    for item in (header or "").split(","):
        name, _, params = item.partition(";")
        name, q = name.strip().lower(), 1.0
        for p in params.split(";"):
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name in ("adler32", "md5") and q > 0:
            wanted.append((-q, len(wanted), name))
    return [name for _q, _i, name in sorted(wanted)]


def _digest_value(sums, algos):
    """The Digest header (or dCache Checksums property) for *algos*:
    adler32 in hex, md5 as base64 of the raw digest (PROTOCOL.md §2)."""
    import base64
    out = []
    for algo in algos:
        value = sums[algo]
        if algo == "md5":
            value = base64.b64encode(bytes.fromhex(value)).decode()
        out.append("%s=%s" % (algo, value))
    return ",".join(out)


def _parse_range(header, if_range, size, etag, lastmod):
    """The byte range a GET asks for: None for the whole file (no Range, a
    Range we do not serve such as several ranges, or an If-Range that no
    longer matches: RFC 9110 §13.1.5), (first, last), or "unsatisfiable"."""
    if not header:
        return None
    if if_range is not None and if_range.strip() not in (etag, lastmod):
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first + last).isdigit():
        return None
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


def _propfind_request(body):
    """What a PROPFIND body asks for: a list of (namespace, name), "allprop"
    (also for an empty body, RFC 4918 §9.1) or "propname".  Document type
    declarations are refused, as in _parse_multistatus."""
    if not body.strip():
        return "allprop"
    import xml.parsers.expat

    def refuse(*_args):
        raise _Refusal(400, "refusing XML with a document type declaration")

    found = {"mode": None, "props": []}
    depth = [0]
    path = []

    def start(name, _attrs):
        depth[0] += 1
        path.append(name)
        if depth[0] == 2 and path[0] == "DAV:" + _NS + "propfind":
            if name in ("DAV:" + _NS + "allprop", "DAV:" + _NS + "propname"):
                found["mode"] = name.partition(_NS)[2]
        elif depth[0] == 3 and path[1] == "DAV:" + _NS + "prop":
            ns, sep, local = name.rpartition(_NS)
            if len(found["props"]) < 100:
                found["props"].append((ns if sep else "", local))

    def end(_name):
        depth[0] -= 1
        path.pop()

    p = xml.parsers.expat.ParserCreate(namespace_separator=_NS)
    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.StartElementHandler = start
    p.EndElementHandler = end
    try:
        p.Parse(body, True)
    except xml.parsers.expat.ExpatError as e:
        raise _Refusal(400, "malformed PROPFIND body: %s" % e)
    if found["mode"]:
        return found["mode"]
    return found["props"] or "allprop"


def _xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") \
        .replace('"', "&quot;")


class _Node:
    """A path of the served folder, resolved: *rel* ("/a/b"), *path* (its
    parent folder resolved, the last name as given: what DELETE and MOVE
    act on), *real* (every symlink resolved: what is read), *st* (stat of
    *real*, or None when it does not exist)."""

    __slots__ = ("parts", "rel", "path", "real", "st")

    def __init__(self, parts, rel, path, real, st):
        self.parts, self.rel, self.path, self.real, self.st = parts, rel, path, real, st

    @property
    def is_dir(self):
        import stat
        return self.st is not None and stat.S_ISDIR(self.st.st_mode)


class _TapeLibrary:
    """The tape of `serve --tape GLOB`: files matching GLOB are on tape only
    (NEARLINE) until a stage request brings them to disk after a simulated
    delay, for their disk lifetime or until released; then they are
    ONLINE_AND_NEARLINE.  Stage requests follow the WLCG Tape REST API v1:
    files go SUBMITTED -> STARTED (after half the delay) -> COMPLETED, or
    FAILED (missing, a folder, lost) or CANCELLED.  Files in ``lost`` (a
    set of paths, for tests) fail to stage.  Timestamps are epoch seconds."""

    def __init__(self, glob, delay):
        self.selected = _selector(glob) if glob else None
        self.delay = delay
        self.lock = _thread.allocate_lock()
        self.disk = {}        # path -> when its disk copy goes (inf: until released)
        self.requests = {}    # id -> request record (oldest dropped past 10,000)
        self.pending = []     # file records not yet COMPLETED
        self.lost = set()

    def on_tape(self, rel):
        return self.selected is not None and self.selected(rel.lstrip("/"))

    def _advance(self, now):
        """Move staging files on with the clock (called under the lock)."""
        still = []
        for f in self.pending:
            if f["state"] == "SUBMITTED" and now >= f["start_at"]:
                f["state"], f["startedAt"] = "STARTED", int(f["start_at"])
            if f["state"] == "STARTED" and now >= f["done_at"]:
                f["state"], f["finishedAt"], f["onDisk"] = "COMPLETED", int(f["done_at"]), True
                self.disk[f["path"]] = max(self.disk.get(f["path"], 0),
                                           f["done_at"] + f["lifetime"])
            if f["state"] in ("SUBMITTED", "STARTED"):
                still.append(f)
        self.pending = still

    def locality(self, rel, now=None):
        """ONLINE (not a tape file), NEARLINE, ONLINE_AND_NEARLINE or LOST."""
        if not self.on_tape(rel):
            return "ONLINE"
        now = time.time() if now is None else now
        with self.lock:
            if rel in self.lost:
                return "LOST"
            self._advance(now)
            return "ONLINE_AND_NEARLINE" if self.disk.get(rel, 0) > now else "NEARLINE"

    def written(self, rel):
        """A file just uploaded: on disk (and, in this simulation, on tape)."""
        with self.lock:
            self.disk[rel] = float("inf")
            self.lost.discard(rel)

    def forget(self, rel):
        """A path (and everything below it) deleted or moved away."""
        with self.lock:
            for p in [p for p in self.disk if p == rel or p.startswith(rel + "/")]:
                del self.disk[p]

    def stage(self, files, now=None):
        """Submit [(path, kind, lifetime)] (kind: "file", "dir", None for
        missing); return the request id."""
        import uuid
        now = time.time() if now is None else now
        rid = str(uuid.uuid4())
        records = []
        with self.lock:
            self._advance(now)
            for path, kind, lifetime in files:
                f = {"path": path, "state": "SUBMITTED", "lifetime": lifetime,
                     "start_at": now + self.delay / 2.0, "done_at": now + self.delay}
                error = ("No such file or directory" if kind is None else
                         "Not a file" if kind == "dir" else
                         "File is lost on tape" if path in self.lost else None)
                if error:
                    f.update(state="FAILED", error=error, finishedAt=int(now), onDisk=False)
                elif not self.on_tape(path) or self.disk.get(path, 0) > now:
                    # on disk already: nothing to wait for
                    f.update(state="COMPLETED", startedAt=int(now), finishedAt=int(now),
                             onDisk=True)
                    if self.on_tape(path):
                        self.disk[path] = max(self.disk[path], now + lifetime)
                else:
                    f["onDisk"] = False
                    self.pending.append(f)
                records.append(f)
            self.requests[rid] = {"id": rid, "createdAt": int(now), "files": records}
            while len(self.requests) > 10000:
                del self.requests[next(iter(self.requests))]
        return rid

    def status(self, rid, now=None):
        """The request as the API shows it, or None for an unknown id."""
        now = time.time() if now is None else now
        with self.lock:
            self._advance(now)
            req = self.requests.get(rid)
            if req is None:
                return None
            files = []
            for f in req["files"]:
                out = {k: f[k] for k in ("path", "state", "error", "startedAt",
                                         "finishedAt") if k in f}
                out["onDisk"] = f["state"] == "COMPLETED" and (
                    not self.on_tape(f["path"]) or self.disk.get(f["path"], 0) > now)
                files.append(out)
        doc = {"id": rid, "createdAt": req["createdAt"], "files": files}
        started = [f["startedAt"] for f in files if "startedAt" in f]
        if started:
            doc["startedAt"] = min(started)
        if all(f["state"] in ("COMPLETED", "FAILED", "CANCELLED") for f in files):
            doc["completedAt"] = max([f.get("finishedAt", req["createdAt"]) for f in files]
                                     or [req["createdAt"]])
        return doc

    def cancel(self, rid, paths, now=None):
        """Cancel the files *paths* of a request that are not done yet;
        None for an unknown id, else the paths the request does not hold."""
        now = time.time() if now is None else now
        with self.lock:
            self._advance(now)
            req = self.requests.get(rid)
            if req is None:
                return None
            mine = {f["path"]: f for f in req["files"]}
            for p in paths:
                f = mine.get(p)
                if f is not None and f["state"] in ("SUBMITTED", "STARTED"):
                    f.update(state="CANCELLED", finishedAt=int(now))
            self.pending = [f for f in self.pending if f["state"] != "CANCELLED"]
            return [p for p in paths if p not in mine]

    def delete(self, rid, now=None):
        """Forget a request (its unfinished files are cancelled); False if unknown."""
        with self.lock:
            req = self.requests.get(rid)
        if req is None:
            return False
        self.cancel(rid, [f["path"] for f in req["files"]], now)
        with self.lock:
            self.requests.pop(rid, None)
        return True

    def release(self, rid, paths):
        """Let the disk copies of *paths* go (NEARLINE again); as cancel."""
        with self.lock:
            req = self.requests.get(rid)
            if req is None:
                return None
            mine = {f["path"] for f in req["files"]}
            for p in paths:
                if p in mine and self.on_tape(p):
                    self.disk.pop(p, None)
            return [p for p in paths if p not in mine]

    def archive_info(self, rel, kind):
        """One entry of an archiveinfo answer."""
        if kind is None:
            return {"path": rel, "error": "No such file or directory"}
        if kind == "dir":
            return {"path": rel, "locality": "NONE"}
        return {"path": rel, "locality": {
            "ONLINE": "DISK", "NEARLINE": "TAPE", "ONLINE_AND_NEARLINE": "DISK_AND_TAPE",
            "LOST": "LOST"}[self.locality(rel)]}


def _packet(key, value):
    """One libmacaroons v1 packet: 4 hex digits of length, "key value\\n"."""
    return b"%04x" % (4 + len(key) + 1 + len(value) + 1) + key + b" " + value + b"\n"


class _Macaroons:
    """Macaroons as dCache and XRootD issue them (PROTOCOL.md §7): the
    libmacaroons v1 format (packets "location", "identifier", one "cid" per
    caveat, "signature"; base64url), signed with HMAC-SHA256 chained from a
    key that lives as long as the server over the identifier and each
    caveat, so that a holder can add caveats but never remove one."""

    def __init__(self, location):
        import hashlib
        import hmac
        import secrets
        self.location = location.encode()
        self._key = hmac.new(b"macaroons-key-generator", secrets.token_bytes(32),
                             hashlib.sha256).digest()

    def _sign(self, ident, caveats):
        import hashlib
        import hmac
        sig = hmac.new(self._key, ident, hashlib.sha256).digest()
        for c in caveats:
            sig = hmac.new(sig, c, hashlib.sha256).digest()
        return sig

    def mint(self, caveats):
        import base64
        import secrets
        ident = secrets.token_hex(16).encode()
        cids = [c.encode("utf-8") for c in caveats]
        data = (_packet(b"location", self.location) + _packet(b"identifier", ident)
                + b"".join(_packet(b"cid", c) for c in cids)
                + _packet(b"signature", self._sign(ident, cids)))
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def verify(self, text):
        """The caveats of a macaroon this server issued, or None (another
        server's, altered, malformed)."""
        import base64
        import binascii
        import hmac
        if len(text) > 8192:
            return None
        text = text.strip().replace("+", "-").replace("/", "_")
        try:
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return None
        packets, i = [], 0
        while i < len(data) and len(packets) <= 66:
            head = data[i:i + 4]
            if len(head) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in head):
                return None
            n = int(head, 16)
            if n < 6 or i + n > len(data) or data[i + n - 1:i + n] != b"\n":
                return None
            key, _, value = data[i + 4:i + n - 1].partition(b" ")
            packets.append((key, value))
            i += n
        keys = [k for k, _v in packets]
        if len(keys) < 3 or keys[:2] != [b"location", b"identifier"] or \
                keys[-1] != b"signature" or any(k != b"cid" for k in keys[2:-1]):
            return None
        cids = [v for _k, v in packets[2:-1]]
        if not hmac.compare_digest(self._sign(packets[1][1], cids), packets[-1][1]):
            return None
        try:
            return [c.decode("utf-8") for c in cids]
        except UnicodeDecodeError:
            return None


def _check_caveat(text):
    """A caveat a macaroon request may ask for, normalised; raises _Refusal."""
    key, sep, value = str(text).partition(":")
    key, value = key.strip().lower(), value.strip()
    if sep and key == "activity":
        acts = [a.strip().upper() for a in value.split(",") if a.strip()]
        if acts and all(a in _ACTIVITIES for a in acts):
            return "activity:" + ",".join(acts)
    elif sep and key == "path" and value.startswith("/"):
        return "path:" + _rel(_plain_path_parts(value))
    elif sep and key == "ip":
        import ipaddress
        try:
            return "ip:" + ",".join(str(ipaddress.ip_network(v.strip(), strict=False))
                                    for v in value.split(","))
        except ValueError:
            pass
    elif sep and key == "before" and _parse_utc_stamp(value) is not None:
        return "before:" + value
    raise _Refusal(400, "unsupported caveat %r (this server knows activity:, path:, ip:, "
                   "before:)" % _printable(text, 100))


def _caveats_refuse(caveats, client_ip, now):
    """Why the caveats that do not depend on the path refuse this request
    (expired, wrong address, a caveat we do not know: fail closed), or None."""
    import ipaddress
    for c in caveats:
        key, _, value = c.partition(":")
        if key == "before":
            t = _parse_utc_stamp(value)
            if t is None or now >= t:
                return "the macaroon has expired"
        elif key == "ip":
            try:
                addr = ipaddress.ip_address(client_ip)
                if not any(addr in ipaddress.ip_network(v, strict=False)
                           for v in value.split(",")):
                    return "the macaroon is not valid from this address"
            except ValueError:
                return "the macaroon is not valid from this address"
        elif key not in ("activity", "path"):
            return "the macaroon has a caveat this server does not know"
    return None


def _caveats_allow(caveats, activities, rels):
    """Whether the caveats allow one of *activities* on every path in *rels*."""
    for c in caveats:
        key, _, value = c.partition(":")
        if key == "activity" and not set(value.split(",")) & set(activities):
            return False
        if key == "path":
            base = value.rstrip("/")
            if not all(r == base or r.startswith(base + "/") for r in rels):
                return False
    return True


class _Archive:
    """What every connection of one server shares: the folder, the token,
    the macaroon key, the tape, the pool URLs handed out, checksums already
    computed, the request log and the open connections."""

    def __init__(self, root, token, read_only, tape, stage_delay, redirect):
        self.root = os.path.realpath(root)
        self.token = token.encode("utf-8") if token is not None else None
        self.read_only = read_only
        self.redirect = redirect
        self.tape = _TapeLibrary(tape, stage_delay)
        self.macaroons = _Macaroons("ctadata-serve")
        self.lock = _thread.allocate_lock()
        self.url = self.pool_url = self.pool_port = None   # known once bound
        self._sums = {}
        self._tickets = {}
        import collections
        self.log = collections.deque(maxlen=_SERVE_LOG)
        self.connections = set()

    # -- paths -----------------------------------------------------------------

    def _inside(self, real):
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def node(self, parts):
        """Resolve checked names (_url_path_parts) inside the folder.  The
        parent folder and the whole path are resolved with every symlink
        followed, and must stay inside the folder (403 otherwise): a symlink
        may point anywhere within it, never out of it."""
        parent = os.path.realpath(os.path.join(self.root, *parts[:-1]))
        if not self._inside(parent):
            raise _Refusal(403, "refusing a path that leads out of the served folder")
        path = os.path.join(parent, parts[-1]) if parts else parent
        real = os.path.realpath(path)
        if not self._inside(real):
            raise _Refusal(403, "refusing a path that leads out of the served folder")
        if parts and parts[-1].startswith(_SERVE_TMP):
            raise _Refusal(404, "no such file or directory")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        return _Node(parts, _rel(parts), path, real, st)

    def children(self, node):
        """The listable entries of a folder, sorted: names the client would
        accept (no control characters, "\\", undecodable bytes), no uploads
        in progress, no symlinks leading out of the folder."""
        out = []
        try:
            names = sorted(os.listdir(node.real))
        except OSError:
            return out
        for name in names:
            if name.startswith(_SERVE_TMP) or not _is_safe_name(name):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue        # bytes that are no UTF-8 name (surrogateescape)
            try:
                out.append(self.node(node.parts + [name]))
            except _Refusal:
                continue
        return [n for n in out if n.st is not None]

    # -- checksums ---------------------------------------------------------------

    def sums(self, node):
        """{"adler32": hex, "md5": hex} of a file, computed on first use and
        kept while the file is unchanged (dCache keeps them in its
        namespace); uploads fill it in as they arrive."""
        st = node.st
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            found = self._sums.get(key)
        if found is not None:
            return found
        hashers = _Hashers(("adler32", "md5"))
        with open(node.real, "rb", buffering=0) as f:
            _hash_head(f, st.st_size, hashers)
        return self.remember(st, hashers.result())

    def remember(self, st, sums):
        with self.lock:
            if len(self._sums) >= 100000:
                self._sums.clear()
            self._sums[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = sums
        return sums

    # -- single-use pool URLs (--redirect) ---------------------------------------

    def ticket(self, method, rel):
        import secrets
        uid = secrets.token_hex(16)
        now = time.monotonic()
        with self.lock:
            for k in [k for k, v in self._tickets.items() if v[2] < now]:
                del self._tickets[k]
            self._tickets[uid] = (method, rel, now + _SERVE_TICKET_TTL)
        return uid

    def redeem(self, uid, method, rel):
        with self.lock:
            found = self._tickets.pop(uid, None)
        return found is not None and found[:2] == (method, rel) and \
            found[2] >= time.monotonic()


class _DavRequest:
    """The request handler of `ctadata serve`, mixed into
    http.server.BaseHTTPRequestHandler (see _serve_classes); one instance
    per connection, requests one after the other (keep-alive).  The door
    (``server.role == "door"``) serves the folder, the tape API and
    macaroons; the pool (--redirect) only the single-use URLs the door
    hands out."""

    protocol_version = "HTTP/1.1"
    server_version = "ctadata-serve/" + __version__
    timeout = _SERVE_IDLE
    disable_nagle_algorithm = True

    # -- connection --------------------------------------------------------------

    def setup(self):
        # Never raises: socketserver calls finish() (which frees this
        # connection's place) only after a setup() that returned.
        self._dead = False
        try:
            ctx = self.server.ssl_context
            if ctx is not None:
                self.request.settimeout(self.timeout)
                self.request = ctx.wrap_socket(self.request, server_side=True)
            with self.server.archive.lock:
                self.server.archive.connections.add(self.request)
            super().setup()
        except (OSError, ValueError) as e:     # a failed TLS handshake, mostly
            _log(10, "serve: connection dropped: %s", e)
            self._dead = True

    def finish(self):
        arch = self.server.archive
        with arch.lock:
            arch.connections.discard(self.request)
        try:
            if not self._dead:
                super().finish()
            else:
                self.request.close()
        except (OSError, ValueError):
            pass
        self.server.leave()

    def handle(self):
        if not self._dead:
            super().handle()

    def version_string(self):
        return self.server_version    # not Python's version

    def log_message(self, fmt, *args):
        pass    # our own log line per request, in _dispatch

    def log_request(self, code="-", size="-"):
        pass

    def handle_expect_100(self):
        # Decided later: the door must not say 100 Continue to a PUT it will
        # redirect, and nobody before the token and the path were checked.
        self._expect = True
        return True

    def handle_one_request(self):
        """Read one request head within our limits, let http.server parse it,
        answer it."""
        import io
        import socket
        self._expect = False
        self._body_left = 0
        self._chunked = False
        self._sent = False
        self._recorded = True     # heads refused before _dispatch are not logged
        self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""
        try:
            head = self._read_head()
            if head is None:
                self.close_connection = True
                return
            self.raw_requestline, rest = head
            real, self.rfile = self.rfile, io.BytesIO(rest)
            try:
                ok = self.parse_request()
            finally:
                self.rfile = real
            if not ok:
                self.close_connection = True
                return
            if self.request_version < "HTTP/1.0":
                self.close_connection = True
                return
            self._dispatch()
            self.wfile.flush()
        except _Refusal as e:   # the head itself was refused
            self.close_connection = True
            self._answer(e.status, e.text + "\n")
        except (socket.timeout, ConnectionError, BrokenPipeError):
            self.close_connection = True
        except OSError as e:    # a TLS connection dropped
            _log(10, "serve: connection closed: %s", e)
            self.close_connection = True

    def _read_head(self):
        """(request line, header bytes) or None at the end of the
        connection; refuses a request line over _SERVE_LINE_LIMIT (414), a
        header line over it, more than _SERVE_HEADER_COUNT headers or more
        than _SERVE_HEAD_LIMIT bytes of them (431)."""
        rfile = self.rfile
        peek = getattr(rfile, "peek", None)
        if peek is not None and peek(1)[:1] == b"\x16":
            # a TLS handshake (an https:// URL, or one without a scheme): say
            # so at once, as nginx does, instead of waiting for a line
            raise _Refusal(400, "this server speaks plain http, not https")
        line = rfile.readline(_SERVE_LINE_LIMIT + 1)
        for _ in range(4):                  # RFC 9112 §2.2: a few empty lines may come first
            if line not in (b"\r\n", b"\n"):
                break
            line = rfile.readline(_SERVE_LINE_LIMIT + 1)
        if not line:
            return None
        if len(line) > _SERVE_LINE_LIMIT:
            raise _Refusal(414, "request line longer than %d bytes" % _SERVE_LINE_LIMIT)
        lines, total = [], 0
        while True:
            h = rfile.readline(_SERVE_LINE_LIMIT + 1)
            total += len(h)
            if len(h) > _SERVE_LINE_LIMIT or total > _SERVE_HEAD_LIMIT:
                raise _Refusal(431, "request header fields too large (at most %d bytes "
                               "each, %d in all)" % (_SERVE_LINE_LIMIT, _SERVE_HEAD_LIMIT))
            if h in (b"\r\n", b"\n", b""):
                break
            lines.append(h)
            if len(lines) > _SERVE_HEADER_COUNT:
                raise _Refusal(431, "more than %d request header fields"
                               % _SERVE_HEADER_COUNT)
        return line, b"".join(lines) + b"\r\n"

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, version): plain text,
        not its HTML page."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"   # a status line even before the version is known
        self._answer(code, "%s\n" % (message or explain or "error"))

    # -- answers -------------------------------------------------------------

    def _start(self, status, headers, length=None):
        """Status line and headers (the body, if any, follows)."""
        self._settle()
        self._status = status
        self._record()       # before the client can see the answer
        self.send_response(status)
        self._sent = True
        for k, v in headers.items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        # Nothing here is meant to be rendered: no sniffing, no scripts
        # (an uploaded .html must not run with access to ?authz= URLs).
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; sandbox")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _answer(self, status, body=b"", headers=None, ctype="text/plain; charset=utf-8"):
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = dict(headers or {})
        if body or status not in (204, 304):
            headers.setdefault("Content-Type", ctype)
        self._start(status, headers, None if status in (204, 304) else len(body))
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status, doc, headers=None):
        import json
        self._answer(status, json.dumps(doc, indent=1) + "\n", headers, "application/json")

    def _refused(self, e):
        if self._sent:               # too late for an error answer: hang up
            self.close_connection = True
            return
        if e.close:
            self.close_connection = True
        if e.problem:                # RFC 7807
            import http.client
            self._json(e.status, {"type": "about:blank", "status": e.status,
                                  "title": http.client.responses.get(e.status, "Error"),
                                  "detail": e.text}, e.headers)
            return
        self._answer(e.status, e.text + "\n", e.headers)

    # -- request bodies ------------------------------------------------------------

    def _body_start(self):
        """Check the framing of the request body (once per request)."""
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        cl = self.headers.get("Content-Length")
        if len(self.headers.get_all("Content-Length") or ()) > 1 or \
                len(self.headers.get_all("Transfer-Encoding") or ()) > 1:
            raise _Refusal(400, "ambiguous request body framing", close=True)
        if te:
            if te != "chunked" or cl is not None:
                self.close_connection = True
                raise _Refusal(501 if te != "chunked" else 400,
                               "unsupported request body framing", close=True)
            self._chunked = True
        elif cl is not None:
            if not cl.strip().isdigit():
                raise _Refusal(400, "bad Content-Length", close=True)
            self._body_left = int(cl)

    def _has_body(self):
        return self._chunked or self._body_left > 0

    def _continue(self):
        if self._expect:
            self._expect = False
            self.send_response_only(100)
            self.end_headers()

    def _body(self, limit=None):
        """Yield the request body as it arrives (100 Continue first when the
        client waits for it); more than *limit* bytes: 413."""
        self._continue()
        got = 0
        rfile = self.rfile
        if self._chunked:
            while True:
                line = rfile.readline(1026)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _Refusal(400, "malformed chunked body", close=True)
                if size == 0:
                    for _ in range(_SERVE_HEADER_COUNT):     # the trailer, if any
                        if rfile.readline(_SERVE_LINE_LIMIT + 1) in (b"\r\n", b"\n", b""):
                            break
                    else:
                        raise _Refusal(431, "too many trailer fields", close=True)
                    self._chunked = False
                    return
                while size > 0:
                    block = rfile.read(min(size, _CHUNK))
                    if not block:
                        raise ConnectionError("client went away")
                    size -= len(block)
                    got += len(block)
                    if limit is not None and got > limit:
                        raise _Refusal(413, "request body larger than %d bytes" % limit,
                                       close=True)
                    yield block
                rfile.readline(3)
        else:
            if limit is not None and self._body_left > limit:
                raise _Refusal(413, "request body larger than %d bytes" % limit, close=True)
            while self._body_left > 0:
                block = rfile.read(min(self._body_left, _CHUNK))
                if not block:
                    raise ConnectionError("client went away")
                self._body_left -= len(block)
                yield block

    def _small_body(self, limit):
        return b"".join(self._body(limit))

    def _json_body(self):
        import json
        try:
            doc = json.loads(self._small_body(_SERVE_JSON_LIMIT).decode("utf-8"))
        except _Refusal as e:
            e.problem = True
            raise
        except ValueError:
            raise _Refusal(400, "the body is not JSON", problem=True)
        if not isinstance(doc, dict):
            raise _Refusal(400, "the body must be a JSON object", problem=True)
        return doc

    def _settle(self):
        """Before answering: read and drop a small unread body (keep-alive);
        close the connection when the client waits for 100 Continue or the
        body is large."""
        if not self._has_body():
            return
        if self._expect or self._chunked or self._body_left > _SERVE_DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            for _ in self._body():
                pass
        except (_Refusal, OSError):
            self.close_connection = True

    # -- dispatch --------------------------------------------------------------

    def _dispatch(self):
        started = time.monotonic()
        self._status = None
        self._recorded = False
        self._caveats = None     # a macaroon's caveats, once authenticated by one
        self._query = ""
        target = self.path
        try:
            self._body_start()
            if target.startswith(("http://", "https://")):   # absolute form (RFC 9112 §3.2.2)
                from urllib.parse import urlsplit
                p = urlsplit(target)
                target = (p.path or "/") + ("?" + p.query if p.query else "")
            if not target.startswith("/") and not (target == "*" and self.command == "OPTIONS"):
                raise _Refusal(400, "bad request target")
            raw, _, self._query = target.partition("?")
            if self.server.role == "pool":
                self._pool(raw)
            elif self.command == "OPTIONS":
                self._answer(200, headers={"DAV": "1, 2", "Allow": ", ".join(
                    sorted(_METHOD_ACTIVITIES) + ["COPY", "OPTIONS", "POST", "PROPFIND"])})
            elif raw == "/.well-known/wlcg-tape-rest-api":
                self._tape_discovery()
            elif raw == _TAPE_API or raw.startswith(_TAPE_API + "/"):
                self._tape_api(raw[len(_TAPE_API):])
            else:
                self._door(raw)
        except _Refusal as e:
            self._refused(e)
        except OSError as e:
            import errno
            import socket
            if isinstance(e, (ConnectionError, socket.timeout)):
                raise
            status = {errno.ENOENT: 404, errno.EACCES: 403, errno.EPERM: 403,
                      errno.ELOOP: 403, errno.ENOTDIR: 409, errno.EISDIR: 405,
                      errno.ENOTEMPTY: 409, errno.EEXIST: 405, errno.ENOSPC: 507,
                      getattr(errno, "EDQUOT", errno.ENOSPC): 507}.get(e.errno, 500)
            if status == 500:
                _log(30, "serve: %s %s: %s", self.command, self._logged_path(target), e)
            self._refused(_Refusal(status, e.strerror or "error"))
        except Exception:
            import traceback
            _log(30, "serve: %s %s: unexpected error: %s", self.command,
                 self._logged_path(target), traceback.format_exc().strip())
            self._refused(_Refusal(500, "internal error", close=True))
        finally:
            self._record()
            _log(10, "serve: %s %s %s %s %.3f s", self.server.role, self.command,
                 self._logged_path(target), self._status, time.monotonic() - started)

    def _record(self):
        """Add this request to the log (once; `requests` of serve())."""
        if self._recorded:
            return
        self._recorded = True
        arch = self.server.archive
        with arch.lock:
            arch.log.append({"server": self.server.role, "method": self.command,
                             "path": self._logged_path(self.path), "status": self._status})

    @staticmethod
    def _logged_path(target):
        """The decoded path of a request, without its query (never a
        macaroon or a pool URL's ticket in a log)."""
        from urllib.parse import unquote
        return _printable(unquote(target.partition("?")[0]), 300)

    def _query_value(self, name):
        for item in self._query.split("&")[:50]:
            key, _, value = item.partition("=")
            if key == name:
                from urllib.parse import unquote
                return unquote(value)
        return None

    def _authenticate(self):
        """Check the bearer token (Authorization, or a macaroon as ?authz=);
        401 without a valid one.  The server's own token allows everything,
        a macaroon only what its caveats allow (self._caveats)."""
        arch = self.server.archive
        if arch.token is None:
            return
        auth = self.headers.get("Authorization") or ""
        scheme, _, cred = auth.strip().partition(" ")
        cred = cred.strip() if scheme.lower() == "bearer" else ""
        challenge = {"WWW-Authenticate": 'Bearer realm="ctadata-serve"'}
        if cred:
            import hmac
            # (http.server decoded the header as Latin-1: these are its bytes)
            if hmac.compare_digest(cred.encode("latin-1", "replace"), arch.token):
                return
        else:
            cred = self._query_value("authz") or ""   # only a macaroon, never the token
        if not cred:
            raise _Refusal(401, "a bearer token is needed (Authorization: Bearer ...)",
                           challenge)
        caveats = arch.macaroons.verify(cred)
        if caveats is None:
            raise _Refusal(401, "invalid bearer token", challenge)
        why = _caveats_refuse(caveats, self.client_address[0], time.time())
        if why:
            raise _Refusal(401 if "expired" in why else 403, why, challenge)
        self._caveats = caveats

    def _allow(self, activities, *rels):
        """403 unless the credential allows one of *activities* on every
        path in *rels*."""
        if self._caveats is not None and not _caveats_allow(self._caveats, activities, rels):
            raise _Refusal(403, "the macaroon does not allow %s on %s" % (
                " or ".join(activities), ", ".join(rels)))

    def _writable(self):
        if self.server.archive.read_only:
            raise _Refusal(403, "this server is read-only (--read-only)")

    def _public_base(self, port=None):
        """scheme://host:port of this server as the client reached it: the
        Host header's name when it is a plain host name or address, else
        the address we are bound to."""
        import re
        arch = self.server.archive
        own = arch.pool_url if port is not None else arch.url
        host = (self.headers.get("Host") or "").strip()
        m = re.match(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d+)?\Z", host)
        if not m:
            return own
        scheme = own.partition(":")[0]
        return "%s://%s:%d" % (scheme, m.group(1), port or self.server.server_port)

    def _door(self, raw):
        parts = _url_path_parts(raw)
        self._authenticate()
        ctype = (self.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if self.command == "POST" and ctype == "application/macaroon-request":
            return self._macaroon(parts)
        handler = getattr(self, "_do_" + (self.command or "").upper(), None)
        if handler is None:
            raise _Refusal(405, "method not allowed", {"Allow": "OPTIONS, GET, HEAD, PUT, "
                           "DELETE, MKCOL, MOVE, COPY, PROPFIND, POST"})
        handler(parts)

    def _pool(self, raw):
        """A single-use URL the door handed out (no token: the ticket is the
        credential, as on a dCache pool)."""
        uid = self._query_value("dcache-http-uuid")
        if not uid:
            raise _Refusal(400, "missing dcache-http-uuid")
        parts = _url_path_parts(raw)
        if self.command not in ("GET", "PUT"):
            raise _Refusal(405, "method not allowed", {"Allow": "GET, PUT"})
        if not self.server.archive.redeem(uid, self.command, _rel(parts)):
            raise _Refusal(404, "unknown, used or expired transfer URL")
        if self.command == "PUT":
            return self._receive(parts)
        node = self._existing(parts)
        if node.is_dir:
            raise _Refusal(404, "not a file")
        self._send_file(node, head=False)

    def _existing(self, parts):
        node = self.server.archive.node(parts)
        if node.st is None:
            raise _Refusal(404, "no such file or directory")
        return node

    # -- reading ------------------------------------------------------------------

    def _do_GET(self, parts, head=False):
        node = self._existing(parts)
        if node.is_dir:
            # A folder as plain text, one name per line (never HTML: the
            # names are the users' own markup).
            self._allow(("LIST", "READ_METADATA") if head else ("LIST",), node.rel)
            text = "".join("%s%s\n" % (c.parts[-1], "/" if c.is_dir else "")
                           for c in self.server.archive.children(node))
            return self._answer(200, text)
        self._allow(_METHOD_ACTIVITIES[self.command], node.rel)
        if not head:
            self._refuse_tape_only(node)
            if self.server.archive.redirect:
                # dCache's door sends the client to a pool with a one-time URL.
                from urllib.parse import quote
                uid = self.server.archive.ticket("GET", node.rel)
                return self._answer(307, headers={"Location": "%s%s?dcache-http-uuid=%s" % (
                    self._public_base(self.server.archive.pool_port), quote(node.rel), uid)})
        self._send_file(node, head)

    def _do_HEAD(self, parts):
        self._do_GET(parts, head=True)

    def _refuse_tape_only(self, node):
        """A file on tape only is refused at once, as dCache does when
        staging on read is not allowed (a GET would otherwise block for the
        whole recall)."""
        where = self.server.archive.tape.locality(node.rel)
        if where in ("NEARLINE", "LOST"):
            raise _Refusal(403, "%s is on tape only (%s): stage it first (WLCG Tape REST API "
                           "at %s%s/stage; ctadata stage, get --stage)" % (
                               node.rel, where, self._public_base(), _TAPE_API))

    def _send_file(self, node, head):
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(node.real, flags)    # node.real has no symlink left in it
        with os.fdopen(fd, "rb", buffering=0) as f:
            node.st = st = os.fstat(fd)   # what is sent is what was opened
            size, etag, lastmod = st.st_size, _etag(st), _http_date(st.st_mtime)
            rng = _parse_range(self.headers.get("Range"), self.headers.get("If-Range"),
                               size, etag, lastmod)
            if rng == "unsatisfiable":
                raise _Refusal(416, "range not satisfiable",
                               {"Content-Range": "bytes */%d" % size})
            start, end = rng or (0, size - 1)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "ETag": etag, "Last-Modified": lastmod}
            if rng:
                headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
            want = _want_digest(self.headers.get("Want-Digest"))
            if want:
                headers["Digest"] = _digest_value(self.server.archive.sums(node), want)
            length = end - start + 1 if size else 0
            self._start(206 if rng else 200, headers, length)
            if head or not length:
                return
            sent = self.connection.sendfile(f, start, length)
            if sent != length:                 # the file shrank meanwhile
                self.close_connection = True

    # -- PROPFIND ---------------------------------------------------------------------

    def _do_PROPFIND(self, parts):
        depth = (self.headers.get("Depth") or "infinity").strip().lower()
        if depth not in ("0", "1"):
            # RFC 4918 §9.1 lets a server refuse; dCache truncates, Apache and
            # nginx refuse: clients list one level at a time.
            raise _Refusal(403, "Depth: infinity is not supported; list one level at a time")
        wanted = _propfind_request(self._small_body(_SERVE_XML_LIMIT))
        arch = self.server.archive
        node = self._existing(parts)
        listing = depth == "1" and node.is_dir
        self._allow(("LIST",) if listing else ("LIST", "READ_METADATA", "DOWNLOAD"), node.rel)
        nodes = [node] + (arch.children(node) if listing else [])
        out = ['<?xml version="1.0" encoding="utf-8"?>\n<d:multistatus xmlns:d="DAV:" '
               'xmlns:ns1="%s" xmlns:ns2="%s">' % (_DCACHE_NS, _SRM_NS)]
        for n in nodes:
            out.append(self._propstat(n, wanted))
        out.append("</d:multistatus>\n")
        self._answer(207, "".join(out), ctype="application/xml; charset=utf-8")

    def _prop(self, node, ns, name):
        """The XML content of one property of *node*, or None if it has none."""
        st, is_dir = node.st, node.is_dir
        if ns == "DAV:":
            if name == "resourcetype":
                return "<d:collection/>" if is_dir else ""
            if name == "getlastmodified":
                return _http_date(st.st_mtime)
            if name == "displayname":
                return _xml_escape(node.parts[-1] if node.parts else "/")
            if is_dir:
                return None
            return {"getcontentlength": str(st.st_size), "getetag": _xml_escape(_etag(st)),
                    "getcontenttype": "application/octet-stream"}.get(name)
        if is_dir:
            return None
        if (ns, name) == (_DCACHE_NS, "Checksums"):
            return _digest_value(self.server.archive.sums(node), ("adler32", "md5"))
        if ns == _SRM_NS:
            tape = self.server.archive.tape.on_tape(node.rel)
            if name == "FileLocality":
                return self.server.archive.tape.locality(node.rel)
            if name == "AccessLatency":
                return "NEARLINE" if tape else "ONLINE"
            if name == "RetentionPolicy":
                return "CUSTODIAL" if tape else "REPLICA"
        return None

    def _propstat(self, node, wanted):
        """One <response>: the properties asked for that the resource has,
        then (dCache-like) those it lacks in a 404 propstat."""
        from urllib.parse import quote
        if wanted in ("allprop", "propname"):
            asked = [("DAV:", n) for n in _DAV_PROPS]
        else:
            asked = wanted
        prefixes = {"DAV:": "d", _DCACHE_NS: "ns1", _SRM_NS: "ns2"}
        found, missing = [], []
        for ns, name in asked:
            value = self._prop(node, ns, name)
            if ns in prefixes:
                tag, decl = "%s:%s" % (prefixes[ns], name), ""
            else:   # echo an unknown property back in its own namespace
                tag, decl = "x:" + name, ' xmlns:x="%s"' % _xml_escape(ns)
            if value is None:
                if wanted != "allprop":
                    missing.append("<%s%s/>" % (tag, decl))
            elif value == "" or wanted == "propname":
                found.append("<%s%s/>" % (tag, decl))
            else:
                found.append("<%s%s>%s</%s>" % (tag, decl, value, tag))
        href = quote(node.rel + ("/" if node.is_dir and node.parts else ""))
        out = ["<d:response><d:href>%s</d:href>" % _xml_escape(href)]
        if found:
            out.append("<d:propstat><d:prop>%s</d:prop><d:status>HTTP/1.1 200 OK</d:status>"
                       "</d:propstat>" % "".join(found))
        if missing:
            out.append("<d:propstat><d:prop>%s</d:prop><d:status>HTTP/1.1 404 Not Found"
                       "</d:status></d:propstat>" % "".join(missing))
        out.append("</d:response>")
        return "".join(out)

    # -- writing ------------------------------------------------------------------------

    def _place(self, parts):
        """The node a write creates or replaces: its folder must exist (409)."""
        if not parts:
            raise _Refusal(405, "not on the root folder")
        node = self.server.archive.node(parts)
        if not os.path.isdir(os.path.dirname(node.path)):
            raise _Refusal(409, "the parent folder does not exist")
        return node

    def _do_PUT(self, parts):
        self._writable()
        node = self._place(parts)
        self._allow(("UPLOAD",), node.rel)
        if node.is_dir:
            raise _Refusal(405, "a folder is there")
        if self.server.archive.redirect and self._expect:
            # dCache redirects an upload that waits for 100 Continue to a
            # pool, before any byte of the body, and closes the connection.
            from urllib.parse import quote
            self.close_connection = True
            uid = self.server.archive.ticket("PUT", node.rel)
            return self._answer(307, headers={"Location": "%s%s?dcache-http-uuid=%s" % (
                self._public_base(self.server.archive.pool_port), quote(node.rel), uid)})
        self._receive(parts)

    def _receive(self, parts):
        """Write the request body to a temporary file beside the target,
        check Content-MD5 (400 on a mismatch, nothing kept), rename."""
        import secrets
        arch = self.server.archive
        node = self._place(parts)
        if node.is_dir:
            raise _Refusal(405, "a folder is there")
        expected = self.headers.get("Content-MD5")
        if expected is not None:     # RFC 1864: base64 of the md5, as in a Digest
            expected = _parse_digest("md5=" + expected).get("md5", "")
            if len(expected) != 32:
                raise _Refusal(400, "malformed Content-MD5")
        existed = os.path.lexists(node.path)
        tmp = os.path.join(os.path.dirname(node.path), _SERVE_TMP + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                     0o644)
        hashers = _Hashers(("adler32", "md5"))
        try:
            with os.fdopen(fd, "wb") as f:
                for block in self._body():
                    f.write(block)
                    hashers.update(block)
            sums = hashers.result()
            if expected and expected != sums["md5"]:
                raise _Refusal(400, "Checksum mismatch: Content-MD5 says %s, received %s" % (
                    _digest_value({"md5": expected}, ("md5",))[4:],
                    _digest_value(sums, ("md5",))[4:]))
            os.replace(tmp, node.path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        st = os.stat(node.path)
        arch.remember(st, sums)
        if arch.tape.on_tape(node.rel):
            arch.tape.written(node.rel)
        headers = {"ETag": _etag(st)}
        want = _want_digest(self.headers.get("Want-Digest"))
        if want:
            headers["Digest"] = _digest_value(sums, want)
        self._answer(204 if existed else 201, b"" if existed else "created\n", headers)

    def _do_MKCOL(self, parts):
        self._writable()
        node = self._place(parts)
        self._allow(_METHOD_ACTIVITIES["MKCOL"], node.rel)
        if self._has_body():
            raise _Refusal(415, "MKCOL takes no body")
        if os.path.lexists(node.path):
            raise _Refusal(405, "it exists already")
        os.mkdir(node.path, 0o755)
        self._answer(201, "created\n")

    def _do_DELETE(self, parts):
        self._writable()
        if not parts:
            raise _Refusal(403, "not the root folder")
        node = self.server.archive.node(parts)
        self._allow(("DELETE",), node.rel)
        if not os.path.lexists(node.path):
            raise _Refusal(404, "no such file or directory")
        _remove_path(node.path)
        self.server.archive.tape.forget(node.rel)
        self._answer(204)

    def _destination(self):
        """The checked names of the Destination header (a URL on this
        server, or a path); another server's URL: 502 (RFC 4918 §9.8.5):
        third-party copy is not offered here."""
        from urllib.parse import urlsplit
        dest = (self.headers.get("Destination") or "").strip()
        if not dest:
            raise _Refusal(400, "no Destination header")
        p = urlsplit(dest)
        if p.scheme or p.netloc:
            host = (self.headers.get("Host") or "").partition(":")[0].strip("[]").lower()
            try:
                port = p.port or (443 if p.scheme == "https" else 80)
            except ValueError:
                port = None
            if port != self.server.server_port or not (
                    (p.hostname or "") == host or _is_loopback(p.hostname or "")):
                raise _Refusal(502, "Destination is on another server: third-party copy "
                               "is not offered by ctadata serve")
        return _url_path_parts(p.path)

    def _do_MOVE(self, parts):
        self._relocate(parts, move=True)

    def _do_COPY(self, parts):
        self._relocate(parts, move=False)

    def _relocate(self, parts, move):
        """MOVE or COPY within the folder (RFC 4918 §9.8, §9.9): Overwrite
        (default T), 201 new / 204 replaced, 412 when it exists and
        Overwrite is F, 409 without the destination's parent."""
        self._writable()
        if self.headers.get("Source"):
            raise _Refusal(501, "third-party copy (Source:) is not offered by ctadata serve")
        arch = self.server.archive
        if not parts:
            raise _Refusal(403, "not the root folder")
        src = self.server.archive.node(parts)
        dparts = self._destination()
        if move:
            self._allow(("MANAGE",), src.rel, _rel(dparts))
        else:
            self._allow(("DOWNLOAD",), src.rel)
            self._allow(("UPLOAD",), _rel(dparts))
        if not os.path.lexists(src.path):
            raise _Refusal(404, "no such file or directory")
        dst = self._place(dparts)
        if dst.rel == src.rel or dst.rel.startswith(src.rel + "/"):
            raise _Refusal(403, "the destination is the source or inside it")
        if not move and not src.is_dir:
            self._refuse_tape_only(src)
        existed = os.path.lexists(dst.path)
        if existed:
            if (self.headers.get("Overwrite") or "T").strip().upper() == "F":
                raise _Refusal(412, "the destination exists (Overwrite: F)")
            _remove_path(dst.path)
            arch.tape.forget(dst.rel)
        if move:
            os.rename(src.path, dst.path)
            arch.tape.forget(src.rel)
        elif src.is_dir:
            import shutil
            if (self.headers.get("Depth") or "infinity").strip() == "0":
                os.mkdir(dst.path, 0o755)
            else:
                # symlinks are copied as links: the copy resolves no further
                # than the original, and each access is checked again
                shutil.copytree(src.path, dst.path, symlinks=True,
                                ignore=shutil.ignore_patterns(_SERVE_TMP + "*"))
        else:
            import secrets
            import shutil
            tmp = os.path.join(os.path.dirname(dst.path), _SERVE_TMP + secrets.token_hex(8))
            try:
                shutil.copyfile(src.real, tmp, follow_symlinks=False)
                os.replace(tmp, dst.path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        self._answer(204 if existed else 201, b"" if existed else "created\n")

    # -- macaroons (PROTOCOL.md §7) -----------------------------------------------------

    def _macaroon(self, parts):
        """Answer a macaroon request: a macaroon limited to this path (and
        the caveats asked for, and those of the macaroon that asks, if one
        does), valid for the "validity" asked (default 1 day, at most 7)."""
        from urllib.parse import quote
        arch = self.server.archive
        if arch.token is None:
            raise _Refusal(400, "this server runs without authentication (--no-auth): "
                           "there is nothing a macaroon could limit")
        doc = self._json_body()
        asked = doc.get("caveats", [])
        if not isinstance(asked, list) or len(asked) > 20:
            raise _Refusal(400, '"caveats" must be a list of at most 20 strings')
        seconds = _iso_duration(doc.get("validity", "P1D"))
        if not seconds or seconds <= 0:
            raise _Refusal(400, '"validity" must be an ISO 8601 duration such as "PT1H"')
        seconds = min(seconds, _MACAROON_MAX)
        rel = _rel(parts)
        caveats = list(self._caveats or []) + ["path:" + rel]
        caveats += [_check_caveat(c) for c in asked]
        caveats.append("before:" + _utc_stamp(time.time() + seconds))
        macaroon = arch.macaroons.mint(caveats)
        base = self._public_base()
        node = arch.node(parts)
        target = base + quote(rel + ("/" if node.is_dir and parts else ""))
        self._json(200, {"macaroon": macaroon, "expires_in": int(seconds), "uri": {
            "targetWithMacaroon": target + "?authz=" + macaroon,
            "baseWithMacaroon": base + "/?authz=" + macaroon,
            "target": target, "base": base + "/"}})

    # -- WLCG Tape REST API v1 ------------------------------------------------------------

    def _tape_discovery(self):
        if self.command not in ("GET", "HEAD"):
            raise _Refusal(405, "method not allowed", {"Allow": "GET, HEAD"})
        self._json(200, {"sitename": "ctadata-serve",
                         "description": "ctadata serve: a simulated tape (--tape)",
                         "endpoints": [{"uri": self._public_base() + _TAPE_API,
                                        "version": "v1", "metadata": {}}]})

    def _tape_api(self, sub):
        """POST /stage, GET|DELETE /stage/ID, POST /stage/ID/cancel,
        POST /release/ID, POST /archiveinfo; errors are RFC 7807 JSON.
        Namespace paths are URL paths of this server."""
        arch = self.server.archive
        tape = arch.tape
        try:
            self._authenticate()
        except _Refusal as e:
            e.problem = True
            raise
        words = [w for w in sub.split("/") if w]
        method = self.command
        if words == ["stage"] and method == "POST":
            return self._tape_stage(tape)
        if words == ["archiveinfo"] and method == "POST":
            paths = self._tape_paths(self._json_body())
            out = []
            for parts in paths:
                self._tape_allow(("STAGE", "READ_METADATA", "LIST"), _rel(parts))
                out.append(tape.archive_info(_rel(parts), self._kind(parts)))
            return self._json(200, out)
        if len(words) >= 2 and words[0] in ("stage", "release"):
            rid = words[1]
            req = tape.status(rid)
            if req is None:
                raise _Refusal(404, "no stage request %s" % _printable(rid, 80), problem=True)
            self._tape_allow(("STAGE",), *[f["path"] for f in req["files"]])
            if words[0] == "stage" and len(words) == 2 and method == "GET":
                return self._json(200, req)
            if words[0] == "stage" and len(words) == 2 and method == "DELETE":
                tape.delete(rid)
                return self._answer(204)
            if words[2:] == ["cancel"] and words[0] == "stage" and method == "POST" or \
                    words[0] == "release" and len(words) == 2 and method == "POST":
                paths = [_rel(p) for p in self._tape_paths(self._json_body())]
                act = tape.cancel if words[0] == "stage" else tape.release
                strangers = act(rid, paths)
                if strangers:
                    raise _Refusal(400, "not in request %s: %s" % (
                        rid, ", ".join(strangers[:10])), problem=True)
                return self._answer(200)
        raise _Refusal(404 if method in ("GET", "POST", "DELETE") else 405,
                       "no such tape API call: %s %s%s" % (method, _TAPE_API, sub),
                       problem=True)

    def _tape_stage(self, tape):
        """POST /stage: a new stage request of 1 to 1000 files, each with
        its optional diskLifetime (ISO 8601); 201 with its id."""
        doc = self._json_body()
        files = doc.get("files")
        if not isinstance(files, list) or not files or len(files) > 1000 or \
                not all(isinstance(f, dict) for f in files):
            raise _Refusal(400, '"files" must be a list of 1 to 1000 objects {"path": ...}',
                           problem=True)
        planned = []
        for f in files:
            parts = _plain_path_parts(f.get("path"))
            life = _iso_duration(f.get("diskLifetime")) if f.get("diskLifetime") \
                else _STAGE_LIFETIME
            if not life:
                raise _Refusal(400, "diskLifetime must be an ISO 8601 duration",
                               problem=True)
            self._tape_allow(("STAGE",), _rel(parts))
            planned.append((_rel(parts), self._kind(parts), life))
        rid = tape.stage(planned)
        return self._json(201, {"requestId": rid},
                          {"Location": self._public_base() + _TAPE_API + "/stage/" + rid})

    def _tape_paths(self, doc):
        paths = doc.get("paths")
        if not isinstance(paths, list) or not paths or len(paths) > 1000:
            raise _Refusal(400, '"paths" must be a list of 1 to 1000 paths', problem=True)
        return [_plain_path_parts(p) for p in paths]

    def _tape_allow(self, activities, *rels):
        try:
            self._allow(activities, *rels)
        except _Refusal as e:
            e.problem = True
            raise

    def _kind(self, parts):
        """"file", "dir" or None (missing, or leading out of the folder)."""
        try:
            node = self.server.archive.node(parts)
        except _Refusal:
            return None
        return None if node.st is None else "dir" if node.is_dir else "file"


def _remove_quietly(paths):
    """Remove the token file (and its folder) made for one run."""
    for path in paths:
        try:
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
        except OSError:
            pass


def _remove_path(path):
    """Delete a file, a symlink (not what it points to) or a folder tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil
        shutil.rmtree(path)
    else:
        os.unlink(path)


_SERVE_CLASSES = []


def _serve_classes():
    """(listener class, handler class), made on first use (http.server and
    socketserver are not imported at start-up)."""
    if _SERVE_CLASSES:
        return _SERVE_CLASSES
    import http.server
    import socket
    import socketserver

    handler = type("_DavHandler", (_DavRequest, http.server.BaseHTTPRequestHandler), {})

    class _Listener(socketserver.ThreadingMixIn, http.server.HTTPServer):
        """One listening socket (the door, or the pool of --redirect), a
        thread per connection, at most _SERVE_CONNECTIONS at a time."""

        daemon_threads = True
        block_on_close = False
        request_queue_size = 64

        def __init__(self, address, archive, role, ssl_context):
            self.archive, self.role, self.ssl_context = archive, role, ssl_context
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            self._active = 0
            http.server.HTTPServer.__init__(self, address, handler)

        def server_bind(self):
            # HTTPServer.server_bind asks DNS for our name (socket.getfqdn):
            # slow, and not needed.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

        def process_request(self, request, client_address):
            with self.archive.lock:
                full = self._active >= _SERVE_CONNECTIONS
                if not full:
                    self._active += 1
            if full:
                try:
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                    b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                socketserver.ThreadingMixIn.process_request(self, request, client_address)
            except BaseException:
                self.leave()
                raise

        def leave(self):
            with self.archive.lock:
                self._active -= 1

        def handle_error(self, request, client_address):
            import traceback
            _log(30, "serve: unexpected error: %s", traceback.format_exc().strip())

    _SERVE_CLASSES[:] = [_Listener, handler]
    return _SERVE_CLASSES


class _Served:
    """A running `ctadata serve`, as ``serve()`` returns it (a context
    manager: leaving the ``with`` block stops it).

    url         http(s)://host:port of the archive
    token       the bearer token it wants (None with auth=False)
    token_file  a private (0600) file holding it
    tape_url    the WLCG Tape REST API endpoint
    pool_url    where redirects go (redirect=True), else None
    requests    one dict per request served: server ("door"/"pool"),
                method, path (decoded, no query), status
    tape        the simulated tape (``tape.lost.add("/raw/f")`` loses a file)
    client(**options)  a Client of this archive
    env         environment variables that point ctadata at it
    stop()      stop serving (idempotent)"""

    def __init__(self, archive, listeners, token, token_file, cleanup):
        self._archive, self._listeners = archive, listeners
        self.url, self.pool_url = archive.url, archive.pool_url
        self.tape_url = archive.url + _TAPE_API
        self.root = archive.root
        self.tape = archive.tape
        self.token, self.token_file = token, token_file
        self._cleanup = cleanup
        self._threads = []
        self._stopped = False

    def __repr__(self):
        return "<ctadata serve %s at %s>" % (self.root, self.url)

    @property
    def requests(self):
        with self._archive.lock:
            return list(self._archive.log)

    @property
    def env(self):
        out = {"CTADATA_URL": self.url}
        if self.token_file:
            out["BEARER_TOKEN_FILE"] = self.token_file
        return out

    def client(self, **options):
        """A Client of this archive (its token unless *options* say otherwise)."""
        options.setdefault("url", self.url)
        if self.token is not None:
            options.setdefault("token", self.token)
        return Client(**options)

    def _start(self):
        import threading
        for srv in self._listeners:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 name="ctadata-serve-" + srv.role)
            t.daemon = True
            t.start()
            self._threads.append(t)

    def stop(self):
        """Stop serving: close the listeners and every open connection, and
        remove a token file made for this run."""
        import socket
        import threading
        if self._stopped:
            return
        self._stopped = True
        stoppers = [threading.Thread(target=s.shutdown) for s in self._listeners[1:]]
        for t in stoppers:
            t.start()
        if self._threads:
            self._listeners[0].shutdown()
        for t in stoppers:
            t.join()
        for s in self._listeners:
            s.server_close()
        with self._archive.lock:
            conns = list(self._archive.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        _remove_quietly(self._cleanup)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _tls_context(tls):
    """A server-side SSLContext from a PEM holding certificate and key, or
    a (certificate, key) pair."""
    import ssl
    cert, key = (tls if isinstance(tls, (tuple, list)) else (tls, None))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(os.path.expanduser(cert), key and os.path.expanduser(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("cannot use %s as the TLS certificate%s: %s" % (
            cert, " (key %s)" % key if key else "", getattr(e, "strerror", None) or e))
    return ctx


def _serve_token(token, token_file, auth):
    """(token, token file, paths to remove at stop) for serve()."""
    import secrets
    import tempfile
    if not auth:
        if token or token_file:
            raise ConfigError("no token with --no-auth")
        return None, None, []
    if token_file and not token:
        token_file = os.path.abspath(os.path.expanduser(token_file))
        text = _read_private(token_file, "token file")
        if text is not None:
            token = text.strip()
            if not token or any(c.isspace() for c in token):
                raise ConfigError("the token file %s must hold one token on one line"
                                  % token_file)
            return token, token_file, []
        token = secrets.token_urlsafe(32)
        try:
            _write_private(token_file, (token + "\n").encode())
        except OSError as e:
            raise ConfigError("cannot write the token file %s: %s" % (token_file, e.strerror))
        return token, token_file, []
    if token_file:
        raise ConfigError("give token= or token_file=, not both")
    token = token or secrets.token_urlsafe(32)
    folder = tempfile.mkdtemp(prefix="ctadata-serve-")     # 0700
    path = os.path.join(folder, "token")
    _write_private(path, (token + "\n").encode())
    return token, path, [path, folder]


def serve(root, port=0, bind="127.0.0.1", token=None, token_file=None, auth=True,
          read_only=False, tape=None, redirect=False, tls=None, stage_delay=_STAGE_DELAY):
    """Serve the local folder *root* as a dCache-like archive (WebDAV, tape,
    macaroons) from background threads, and return the running server
    (see _Served: ``url``, ``token``, ``token_file``, ``requests``,
    ``client()``, ``stop()``); use it as a context manager::

        with ctadata.serve("data/", tape="raw/*") as srv:
            srv.client().ls("raw")

    *port* 0 picks a free one.  *bind* is 127.0.0.1 unless told otherwise
    (another address is logged as a warning without *tls*).  Every request
    needs the bearer token: *token*, else the one in *token_file* (written
    there, 0600, if the file does not exist), else a new random one in a
    private temporary file removed at stop.  ``auth=False`` serves without
    any token and needs *read_only*.  *tape*: a glob (or list of globs,
    matched as --include matches) of files that are on tape only until
    staged through the WLCG Tape REST API, *stage_delay* seconds after the
    request.  *redirect*: GETs and uploads that wait for "100 Continue" are
    sent with 307 to a second port, on single-use URLs, as dCache's doors
    send them to pools.  *tls*: a PEM with certificate and key, or a
    (certificate, key) pair: https.

    Raises ConfigError (no such folder, a port in use, a bad certificate,
    auth=False without read_only)."""
    if not os.path.isdir(root):
        raise ConfigError("not a folder: %s" % root)
    if not auth and not read_only:
        raise ConfigError("--no-auth needs --read-only: anyone who can reach the port "
                          "could change the files")
    if not _is_loopback(bind) and tls is None:
        _log(30, "WARNING: serving on %s without --tls: the token and the data cross "
                 "the network in clear text", bind)
    ctx = _tls_context(tls) if tls is not None else None
    token, token_file, cleanup = _serve_token(token, token_file, auth)
    try:
        archive = _Archive(root, token, read_only, tape, stage_delay, redirect)
        listener_class = _serve_classes()[0]
        listeners = []
        try:
            for role, p in (("door", port), ("pool", 0))[:2 if redirect else 1]:
                listeners.append(listener_class((bind.strip("[]"), p), archive, role, ctx))
        except OSError as e:
            for s in listeners:
                s.server_close()
            raise ConfigError("cannot listen on %s port %d: %s%s" % (
                bind, port, e.strerror or e, "; --port 0 picks a free one"
                if getattr(e, "errno", None) == 98 else ""))
    except BaseException:
        _remove_quietly(cleanup)
        raise
    scheme = "https" if ctx is not None else "http"
    host = bind.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    host = "[%s]" % host if ":" in host else host
    archive.url = "%s://%s:%d" % (scheme, host, listeners[0].server_port)
    archive.pool_port = listeners[1].server_port if redirect else None
    archive.pool_url = "%s://%s:%d" % (scheme, host, archive.pool_port) if redirect else None
    served = _Served(archive, listeners, token, token_file, cleanup)
    served._start()
    return served


############################################################################
# CLI
############################################################################

# `ctadata COMMAND`: argparse only parses, each _cmd_X(client, args) calls the
# Client and prints; the options of a command (_args_X) sit beside it.


class _Unlisted:
    """Adds options to a command's parser without listing them in its
    --help: the options every command takes, listed once by `ctadata --help`."""

    def __init__(self, parser):
        self.parser = parser

    def add_argument(self, *names, **kw):
        import argparse
        kw["help"] = argparse.SUPPRESS
        return self.parser.add_argument(*names, **kw)


_COMMON_POINTER = """\
The options of every command (--url, --token-file, -j, --timeout, --retries,
-q, -v, ...) go before or after it: `ctadata --help` lists them."""


def _add_common(parser, suppress):
    """Options every subcommand accepts (before or after its name); after it
    (*suppress*) they are accepted but not listed in the command's help."""
    import argparse
    d = argparse.SUPPRESS if suppress else None
    g = _Unlisted(parser) if suppress else parser.add_argument_group("storage and connection")
    g.add_argument("--url", default=d, metavar="URL",
                   help="storage URL; remote paths are relative to it; HOST:PORT without "
                        "a scheme means https://HOST:PORT (env CTADATA_URL; default %s)"
                        % DEFAULT_URL)
    g.add_argument("--dev", action="store_true", default=d or False,
                   help="use the development storage %s (the built-in profile "
                        "'dev')" % DEV_URL)
    g.add_argument("--profile", default=d, metavar="NAME",
                   help="settings from section [NAME] of ~/.config/ctadata/config.ini "
                        "(env CTADATA_PROFILE; default [default]); see `ctadata config`")
    g.add_argument("--service", nargs="?", const="", default=d, metavar="URL",
                   help="go through the CTA download service (JupyterHub) instead: "
                        "URL, else env CTADS_URL (which alone selects this mode), "
                        "else %s; token from --token-file, else "
                        "$JUPYTERHUB_API_TOKEN. A URL must say http(s)://, or use "
                        "--service=URL" % SERVICE_URL)
    g.add_argument("-j", "--jobs", type=int, default=d, metavar="N",
                   help="parallel transfers and listings (default %d; without -j, "
                        "transfers adapt: up to %d at a time, %d for uploads, while "
                        "small files wait on a distant server and that helps, back "
                        "to %d once a request has to be retried; not through the "
                        "download service)"
                        % (_DEFAULT_JOBS, _MAX_JOBS, _MAX_PUT_JOBS, _DEFAULT_JOBS))
    g.add_argument("--timeout", type=float, default=d, metavar="S",
                   help="seconds before a silent connection fails (default %d)"
                        % _DEFAULT_TIMEOUT)
    g.add_argument("--retries", type=int, default=d, metavar="N",
                   help="retries of transient failures, each said on stderr (default %d)"
                        % _DEFAULT_RETRIES)
    g.add_argument("--ca-file", default=d, metavar="PEM",
                   help="extra CA certificates (env X509_CERT_FILE)")
    g.add_argument("--ca-dir", default=d, metavar="DIR",
                   help="extra CA directory (env X509_CERT_DIR; default "
                        "/etc/grid-security/certificates when it exists)")
    g.add_argument("--insecure", action="store_true", default=d or False,
                   help="do NOT verify TLS certificates (warns every time)")
    g.add_argument("-q", "--quiet", action="store_true", default=d or False,
                   help="print only errors")
    g.add_argument("-v", "--verbose", action="count", default=d or 0,
                   help="log requests (never credentials) to stderr")
    _add_credential_options(_Unlisted(parser) if suppress else
                            parser.add_argument_group("credentials", _CREDENTIALS_HELP), d)


def _add_credential_options(g, d):
    g.add_argument("--token-file", default=d, metavar="FILE",
                   help="read the bearer token from FILE (must be private: chmod 600)")
    g.add_argument("--token", default=d, metavar="TOKEN",
                   help="the bearer token itself. DISCOURAGED: every user of this machine "
                        "can read a command line with `ps`; use --token-file or "
                        "`ctadata login`")
    g.add_argument("--oidc-agent", default=d, metavar="ACCOUNT",
                   help="get tokens from oidc-agent (`oidc-token ACCOUNT`; env "
                        "CTADATA_OIDC_AGENT)")
    g.add_argument("--auth", default=d, choices=_AUTH_MODES,
                   help="auto (default): a token, else an X.509 proxy; token: a token "
                        "or fail; x509: the client certificate only")
    g.add_argument("--cert", default=d, metavar="PEM",
                   help="client certificate + key in one file, e.g. an X.509 proxy "
                        "(default with --auth x509 or without a token: "
                        "$X509_USER_PROXY, /tmp/x509up_u$UID)")


_CREDENTIALS_HELP = """\
The first token found is used: --token, --token-file, $CTADATA_TOKEN,
$BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u$UID, /tmp/bt_u$UID,
the `ctadata login` store, oidc-agent, the old client's ~/.config/cta-data/token.
`ctadata token --explain` shows where it looked. A token is sent only to the
storage URL's origin, over https (or to this machine)."""

_EPILOG = """\
examples:
  ctadata ls cta/DL1/20241114/
  ctadata ls -l -h lst/some-dir
  ctadata get -r lst/some-dir ./data/
  ctadata put -r results/ your-folder/
  ctadata cat lst/some-dir/run.json | jq .
  ctadata --service put results.txt your-folder/     # prints where it landed
  ctadata upload-cert --key lst ~/x509up.pem
exit status: 0 success (every file transferred or already there, and right),
  1 a failure (some file or folder failed: each is named on stderr),
  2 bad usage, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as SLURM
  sends at a job's time limit), 129 SIGHUP: .part files are kept and
  --manifest records what was done.
"""


def _build_parser():
    """The argparse tree: the options every command takes (_add_common),
    then each command's own (_args_X, beside its _cmd_X)."""
    import argparse
    p = argparse.ArgumentParser(
        prog="ctadata", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
        description="List, download and upload files on CTAO data archives "
                    "(dCache WebDAV with bearer tokens), directly or through the "
                    "CTA download service (--service).")
    _add_common(p, suppress=False)
    p.add_argument("--version", action="version", version="ctadata " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_args_ls, _args_stat, _args_du, _args_get, _args_put, _args_mkdir, _args_rm,
                _args_mv, _args_cp, _args_sum, _args_cat, _args_share, _args_stage,
                _args_release, _args_fts, _args_config,
                _args_completion, _args_upload_cert,
                _args_login, _args_logout, _args_token, _args_serve, _args_old_names):
        add(sub)
    return p


def _subcommand(sub, name, func, help_, description=None, add_help=True, aliases=()):
    """Add the command *name*, run by *func(client, args)*; return its parser."""
    import argparse
    sp = sub.add_parser(name, help=help_, description=description or help_,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        add_help=add_help, aliases=list(aliases), epilog=_COMMON_POINTER)
    if not add_help:
        sp.add_argument("--help", action="help", help="show this help and exit")
    _add_common(sp, suppress=True)
    sp.set_defaults(func=func)
    return sp


def _args_filters(sp):
    g = sp.add_argument_group("selecting files")
    g.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files matching GLOB (repeatable); matched against the "
                        "path below the source: '*' stays within a name, '**' crosses "
                        "folders, a GLOB without '/' matches a name at any depth")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files matching GLOB (repeatable)")


def _args_output(sp, what):
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="one JSON document: " + what)
    g.add_argument("--jsonl", action="store_true",
                   help="JSON lines: one object per line (streams)")


def _opt(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def _client_from_args(args):
    if _opt(args, "insecure"):
        sys.stderr.write("ctadata: WARNING: TLS certificate verification is OFF "
                         "(--insecure): anyone on the path can read your token\n")
    return Client(url=_opt(args, "url"), token_file=_opt(args, "token_file"),
                  dev=_opt(args, "dev", False), timeout=_opt(args, "timeout"),
                  retries=_opt(args, "retries"), jobs=_opt(args, "jobs"),
                  ca_file=_opt(args, "ca_file"), ca_dir=_opt(args, "ca_dir"),
                  insecure=_opt(args, "insecure", False), cert=_opt(args, "cert"),
                  service=_opt(args, "service"),
                  certificate_service=_opt(args, "cert_service"),
                  token=_opt(args, "token"), auth=_opt(args, "auth"),
                  oidc_agent=_opt(args, "oidc_agent"), profile=_opt(args, "profile"),
                  issuer=_opt(args, "issuer"), client_id=_opt(args, "client_id"),
                  # checksums in the manifest even without a Digest to check
                  record_checksums=bool(getattr(args, "manifest", None)))


def _out(text):
    sys.stdout.write(text)


def _entry_line(e, long, human, name, locality=None):
    """One line of `ls`; *locality*: the width of a locality column (None:
    no such column; the server reports no locality)."""
    if not long:
        return name + ("/" if e.is_dir else "")
    size = "-" if e.is_dir else (_human_bytes(e.size) if human else str(e.size))
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime)) if e.mtime else "-"
    if locality is not None:
        when += " " + (e.locality or "-").ljust(locality)
    return "%s %s %s %s" % ("d" if e.is_dir else "-", size, when,
                            name + ("/" if e.is_dir else ""))


class _RecordWriter:
    """Writes a listing as text lines, one JSON document or JSON lines, in
    batches (20,000 lines cost one write, not 20,000)."""

    def __init__(self, args):
        self.json = getattr(args, "json", False)
        self.jsonl = getattr(args, "jsonl", False)
        self.batch = []
        self.first = True
        if self.json:
            self.batch.append("[")

    def item(self, obj, line=None):
        import json
        if self.json:
            self.batch.append(("\n" if self.first else ",\n") + json.dumps(obj))
        elif self.jsonl:
            self.batch.append(json.dumps(obj) + "\n")
        else:
            self.batch.append(line + "\n")
        self.first = False
        if len(self.batch) >= 1000:
            self.flush()

    def flush(self):
        _out("".join(self.batch))
        del self.batch[:]

    def close(self):
        if self.json:
            self.batch.append("\n]\n" if not self.first else "]\n")
        self.flush()


def _cli_selector(args):
    return _selector(None, getattr(args, "include", ()), getattr(args, "exclude", ()))


def _args_ls(sub):
    sp = _subcommand(sub, "ls", _cmd_ls, "list a remote directory", add_help=False,
                     aliases=("list",),
                     description="List a remote directory: names one per line, sorted, "
                                 "directories ending with '/'.  Without -l, --json or "
                                 "--jsonl only names and types are asked of the server "
                                 "(faster, and no checksum or tape lookups on dCache).  "
                                 "--include selects files; --exclude leaves out the files "
                                 "and folders it names (with -R: files only).")
    sp.add_argument("path", nargs="?", default="", help="remote path or URL")
    sp.add_argument("-l", dest="long", action="store_true",
                    help="long format: type, size, modification time (UTC), where the "
                         "file is (dCache's locality: ONLINE = on disk, NEARLINE = on tape "
                         "only, ONLINE_AND_NEARLINE, LOST; when the server reports it), name")
    sp.add_argument("-R", "--recursive", action="store_true",
                    help="list everything below PATH (paths relative to it)")
    sp.add_argument("-h", "--human", action="store_true",
                    help="sizes as 512B, 1.2KiB, 3.4MiB (binary units)")
    sp.add_argument("-U", "--unsorted", action="store_true",
                    help="print entries as the server sends them, in constant memory")
    _args_output(sp, "a list of entries (README: JSON output)")
    _args_filters(sp)


def _ls_filter(args, sel):
    """What `ls` without -R shows with --include/--exclude: the files they
    select; folders only without --include (which names files), unless an
    --exclude names them (hiding every folder for an --exclude hid
    everything in a folder of folders)."""
    if sel is None:
        return None
    return lambda e: not args.include and sel(e.name) if e.is_dir else sel(e.name)


def _cmd_ls(client, args):
    sel = _cli_selector(args)
    out = _RecordWriter(args)
    # names only: ask the server for nothing else
    details = bool(args.long or out.json or out.jsonl)
    shown = _ls_filter(args, sel)
    if args.unsorted and not args.recursive:
        # Constant memory however big the folder: print as entries parse.
        structured = out.json or out.jsonl
        locality = None     # a locality column from the first entry that has one on
        for e in client.iter_dir(args.path, details):
            if shown is None or shown(e):
                if structured:
                    out.item(e.to_dict())
                else:
                    locality = 0 if e.locality else locality
                    out.item(None, _entry_line(e, args.long, args.human, e.name, locality))
        out.close()
        return 0
    failures = []  # folders that could not be listed: reported at the end
    if args.recursive:
        root = client.url_for(args.path, collection=True)
        rows = []
        walked = False
        for _top, children in client.walk(args.path, details=details,
                                          on_error=lambda e, exc: failures.append((e, exc))):
            walked = True
            for e in children:
                rel = _rel_path(root, e.url)
                if sel is None or (not e.is_dir and sel(rel)):
                    rows.append((rel, e))
        if not walked:   # a file: listed as without -R
            rows = [(e.name, e) for e in client.iter_dir(args.path, details)
                    if sel is None or sel(e.name)]
        rows.sort(key=lambda r: r[0])
    else:
        rows = [(e.name, e) for e in client.ls(args.path, details=details)
                if shown is None or shown(e)]
    if out.json or out.jsonl:
        for _n, e in rows:
            out.item(e.to_dict())
        out.close()
        return _folder_failures(failures)
    # dCache's FileLocality (ONLINE, NEARLINE...) as a column, when the server has it
    locality = None
    if args.long and any(e.locality for _n, e in rows):
        locality = max(len(e.locality or "-") for _n, e in rows)
    lines = [(_entry_line(e, args.long, args.human, n, locality)) for n, e in rows]
    if args.long and lines:
        # align the size column
        parts = [ln.split(" ", 2) for ln in lines]
        width = max(len(p[1]) for p in parts)
        lines = ["%s %*s %s" % (p[0], width, p[1], p[2]) for p in parts]
    _out("".join(ln + "\n" for ln in lines))
    return _folder_failures(failures)


def _folder_failures(failures):
    """Report the folders a walk could not list (after what it could);
    return the exit status."""
    for e, exc in failures:
        sys.stderr.write("ctadata: failed: %s/: %s\n" % (e.path, exc))
    return 1 if failures else 0


def _args_stat(sub):
    sp = _subcommand(sub, "stat", _cmd_stat, "show one remote file or directory")
    sp.add_argument("path", help="remote path or URL")
    sp.add_argument("--json", action="store_true", help="as a JSON object")


def _cmd_stat(client, args):
    e = client.stat(args.path)
    if args.json:
        import json
        _out(json.dumps(e.to_dict(), indent=1) + "\n")
        return 0
    d = e.to_dict()
    for k in ("path", "type", "size", "mtime", "etag", "checksums", "locality", "url"):
        v = d[k]
        if isinstance(v, dict):
            v = ",".join("%s=%s" % kv for kv in sorted(v.items())) or None
        if v is not None:
            _out("%-10s %s\n" % (k + ":", v))
    return 0


def _args_du(sub):
    sp = _subcommand(sub, "du", _cmd_du, "count files, folders and bytes below a remote path",
                     add_help=False, description="Count files, folders and bytes below a remote "
                     "path, per immediate child and in total (listing in parallel).")
    sp.add_argument("path", nargs="?", default="", help="remote path or URL")
    sp.add_argument("-h", "--human", action="store_true",
                    help="sizes as 512B, 1.2KiB, 3.4MiB (binary units)")
    _args_output(sp, "totals and a list of children")
    _args_filters(sp)


def _files(n):
    return "file" if n == 1 else "files"


def _dirs(n):
    return "dir" if n == 1 else "dirs"


def _cmd_du(client, args):
    failures = []
    report = client.du(args.path, select=_cli_selector(args),
                       on_error=lambda e, exc: failures.append((e, exc)))
    size = _human_bytes if args.human else str
    if args.json:
        import json
        if failures:
            report["errors"] = [{"path": e.path, "error": str(exc)} for e, exc in failures]
        _out(json.dumps(report, indent=1) + "\n")
        return _folder_failures(failures)
    out = _RecordWriter(args)
    total = {k: report[k] for k in ("path", "files", "dirs", "bytes")}
    for c in report["children"]:
        out.item(c, "%10s  %8d %-5s %6d %-4s  %s%s" % (
            size(c["bytes"]), c["files"], _files(c["files"]), c["dirs"], _dirs(c["dirs"]),
            c["name"],
            "/" if c["type"] == "directory" else ""))
    out.item(dict(total, name="total"), "%10s  %8d %-5s %6d %-4s  total (%s)" % (
        size(report["bytes"]), report["files"], _files(report["files"]), report["dirs"],
        _dirs(report["dirs"]), report["path"] or "/"))
    out.close()
    return _folder_failures(failures)


def _args_progress(sp):
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress even when stderr is not a terminal: a plain line "
                        "every 5 s (for batch jobs' logs); default: a live line on a "
                        "terminal only")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="show no progress line")


def _make_progress(args, label):
    """The progress display of get/put: a live line on a terminal, a plain
    line every 5 s with --progress elsewhere, none with --no-progress, -q
    (unless --progress) or a dry run."""
    want = getattr(args, "progress", None)
    if want is False or getattr(args, "dry_run", 0) or (_opt(args, "quiet") and not want):
        return Progress()
    if _stderr_is_terminal():
        return _TermProgress(sys.stderr, label)
    if want:
        return _LineProgress(sys.stderr, label)
    return Progress()


def _write_json_atomic(path, doc):
    """Write a JSON document to *path* through path.part + os.replace."""
    import json
    tmp = path + ".part"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise _local_error(e, path)


def _write_manifest(args, verb, summary):
    """Write --manifest (if asked for) with one record per file."""
    if getattr(args, "manifest", None):
        doc = {"ctadata": __version__, "command": verb, "created": _iso(time.time())}
        doc.update(summary.to_dict())
        doc["files"] = doc.pop("results")
        _write_json_atomic(args.manifest, doc)


def _report(args, verb, summary):
    """Print the plan (dry run), failures and the summary line, write the
    manifest; return the exit code.  A signal meanwhile waits (_Held)."""
    with _Held():
        return _report_now(args, verb, summary)


def _interrupted(args, verb, error):
    """Ctrl-C or SIGTERM stopped a transfer: write the manifest of what was
    done (if asked for) before the CLI reports the interrupt."""
    summary = getattr(error, "summary", None)
    if summary is not None:
        with _Held():
            _write_manifest(args, verb, summary)


def _report_now(args, verb, summary):
    import json
    _write_manifest(args, verb, summary)
    if args.json:
        _out(json.dumps(summary.to_dict(), indent=1) + "\n")
    elif getattr(args, "jsonl", False):
        out = _RecordWriter(args)
        for r in summary.results:
            out.item(r.to_dict())
        d = summary.to_dict()
        d.pop("results")
        out.item({"summary": d})
        out.close()
    elif getattr(args, "dry_run", False):
        lines = []
        for r in summary.results:
            src, dst = _safe_place(r.source), _safe_place(r.dest)
            what = "would %s" % verb if r.status == "planned" else r.status
            size = "" if r.size is None else " (%s)" % _human_bytes(r.size)
            lines.append("%s %s -> %s%s\n" % (what, src, dst, size))
        _out("".join(lines))
    failures = summary.failures
    for r in failures[:20]:
        where = r.dest if verb == "get" and r.dest else r.source
        sys.stderr.write("ctadata: failed: %s: %s\n" % (_safe_place(where), r.error))
    if len(failures) > 20:
        sys.stderr.write("ctadata: ... and %d more failures\n" % (len(failures) - 20))
    if getattr(args, "dry_run", False):
        planned = [r for r in summary.results if r.status == "planned"]
        sys.stderr.write("dry run: %s (%s) would be %s, %d skipped (already there), "
                         "%d failed\n" % (_plural(len(planned), "file"), _human_bytes(sum(
                             r.size or 0 for r in planned)),
                             {"get": "downloaded", "cp": "copied"}.get(verb, "uploaded"),
                             summary.skipped, summary.failed))
    elif not _opt(args, "quiet"):
        rate = summary.bytes / summary.seconds if summary.seconds > 0 else 0
        sys.stderr.write("%s: %s (%d transferred, %d skipped, %d failed), %s in "
                         "%.2f s, %s/s\n" % (verb, _plural(summary.files, "file"),
                                             summary.transferred,
                                             summary.skipped, summary.failed,
                                             _human_bytes(summary.bytes),
                                             summary.seconds, _human_bytes(rate)))
    return 1 if summary.failed else 0


def _args_get(sub):
    # Long only in argparse definitions and their --help text: one
    # add_argument per option, nothing to split off.
    sp = _subcommand(sub, "get", _cmd_get, "download files", description=(
                "Download a remote file, or with -r a directory tree, or with --from-list "
                "a list of URLs. Files stream to NAME.part and are renamed when complete and "
                "verified against the server's checksum (when it has one; XRootD before "
                "5.8.3: the size only, see the README); an interrupted download of a file "
                "over 1 MiB resumes from its .part file when NAME.part.meta says it is of the "
                "same file; files already there (the same size and modification time) are "
                "skipped; a file another process is downloading into the same place is "
                "waited for (a lock on its .part); transient failures are retried with "
                "backoff (--retries). A folder that cannot be listed or made fails alone. "
                "Nothing is written through a symbolic link below DEST."))
    sp.add_argument("source", nargs="?", help="remote path or URL (not with --from-list)")
    sp.add_argument("dest", nargs="?", default=None, help=(
        "local file or folder (default: current folder). With -r, the tree goes to "
        "DEST/NAME when DEST ends with '/' (or is '.'), else to DEST itself; '-' writes "
        "the file to standard output (as `ctadata cat`)"))
    sp.add_argument("-r", "--recursive", action="store_true", help="download a directory tree")
    sp.add_argument("--from-list", metavar="FILE", help=(
        "download every URL or remote path listed in FILE ('-': standard input; one "
        "per line, blank lines and '#' comments ignored) below DEST, keeping the "
        "URL's path; plain HTTP(S) file servers work too"))
    sp.add_argument("--strip-prefix", metavar="URL", help=(
        "with --from-list: the part of each URL to drop; the local tree starts after "
        "it (default: keep the whole URL path)"))
    sp.add_argument("--overwrite", action="store_true",
                    help="download even files that are already there")
    sp.add_argument("--checksum", action="store_true",
                    help="a file already there is one of the same size and checksum as "
                         "the server's (reads the local file), not of the same size and "
                         "modification time")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="list what would be downloaded and the totals; write nothing")
    sp.add_argument("--manifest", metavar="FILE.json",
                    help="write one record per file (remote URL, local path, size, mtime, "
                         "checksums, status, error); also when stopped by Ctrl-C or "
                         "SIGTERM: what was done by then")
    _args_output(sp, "the summary and one record per file")
    _args_progress(sp)
    _args_filters(sp)
    g = sp.add_argument_group(
        "files on tape", "A file the storage reports as on tape only (NEARLINE) is never\n"
        "asked for: without --stage it fails at once, the other files go on.")
    g.add_argument("--stage", action="store_true",
                   help="stage the files that are on tape only (WLCG Tape REST API) and "
                        "download each as soon as it is on disk; files on disk download at "
                        "once, a file that cannot be staged (lost on tape) fails with the "
                        "storage's reason")
    g.add_argument("--stage-id", metavar="ID",
                   help="download exactly the files of an earlier stage request (the ID "
                        "`ctadata stage` printed) below DEST, each at its remote path, each "
                        "as soon as it is on disk (files no longer on disk are staged again)")
    g.add_argument("--release", action="store_true",
                   help="with --stage or --stage-id: release each staged file after its "
                        "download (the storage may drop its disk copy)")
    g.add_argument("--lifetime", metavar="DURATION",
                   help="with --stage: how long staged files stay on disk (1h, 30m, 2d, "
                        "PT1H; default: the storage's)")


def _get_checks(args, sel):
    """The destination of `get` after checking which options go together."""
    dest = args.dest
    if args.release and not (args.stage or args.stage_id):
        raise ConfigError("--release goes with --stage or --stage-id")
    if args.lifetime and not args.stage:
        raise ConfigError("--lifetime goes with --stage")
    if args.stage_id:
        if args.from_list or args.recursive or args.stage or sel is not None or \
                args.strip_prefix:
            raise ConfigError("--stage-id takes a destination folder only (no -r, --stage, "
                              "--from-list, --include/--exclude)")
        if args.source and args.dest:
            raise ConfigError("with --stage-id give only the destination folder")
        return args.dest or args.source or "."
    if args.from_list:
        if args.recursive or sel is not None or args.stage:
            raise ConfigError("--from-list takes neither -r, --include/--exclude nor --stage")
        if args.source and args.dest:
            raise ConfigError("with --from-list give only the destination folder")
        dest = args.dest or args.source or "."
    elif not args.source:
        raise ConfigError("get needs a remote path (or --from-list FILE, --stage-id ID)")
    elif args.strip_prefix:
        raise ConfigError("--strip-prefix goes with --from-list")
    return dest


def _cmd_get(client, args):
    sel = _cli_selector(args)
    dest = _get_checks(args, sel)
    if args.dest == "-":
        if (args.recursive or args.from_list or sel is not None or args.dry_run or
                getattr(args, "stage", False) or getattr(args, "stage_id", None)):
            raise ConfigError("get PATH - writes one file to standard output: no -r, "
                              "--from-list, --include/--exclude, --dry-run or --stage")
        return _to_stdout(client, [args.source])
    progress = _make_progress(args, "get")
    try:
        if args.from_list:
            if args.from_list == "-":
                lines = sys.stdin.read().splitlines()
            else:
                try:
                    with open(args.from_list, encoding="utf-8") as f:
                        lines = f.read().splitlines()
                except OSError as e:
                    raise ConfigError("cannot read %s: %s" % (args.from_list, e.strerror))
            summary = client.download_list(lines, dest, strip_prefix=args.strip_prefix,
                                           overwrite=args.overwrite, dry_run=args.dry_run,
                                           progress=progress, raise_on_failure=False)
        elif args.stage_id:
            summary = client.download_staged(args.stage_id, dest, overwrite=args.overwrite,
                                             checksum=args.checksum, release=args.release,
                                             dry_run=args.dry_run, progress=progress,
                                             raise_on_failure=False)
        else:
            summary = client.download(args.source, dest, recursive=args.recursive,
                                      overwrite=args.overwrite, checksum=args.checksum,
                                      select=sel, dry_run=args.dry_run, progress=progress,
                                      raise_on_failure=False, stage=args.stage,
                                      release=args.release, lifetime=args.lifetime)
    except KeyboardInterrupt as e:
        progress.close()
        _interrupted(args, "get", e)
        raise
    except NotFound as e:
        if args.source and "://" not in args.source and os.path.exists(args.source):
            e.cli_hint = "%s is a local %s: did you mean put?" % (
                args.source, "folder" if os.path.isdir(args.source) else "file")
        raise
    finally:
        progress.close()
    return _report(args, "get", summary)


def _args_put(sub):
    sp = _subcommand(sub, "put", _cmd_put, "upload files", description=(
                "Upload a local file, or with -r a directory tree. A remote path ending "
                "with '/' is a folder to upload into; missing folders are created. Only "
                "regular files, and symbolic links to them, are uploaded (FIFOs, sockets, "
                "devices are skipped with a warning). Afterwards the server is asked "
                "(PROPFIND) whether each file is there under its name with its size."))
    sp.add_argument("source", help="local file or folder")
    sp.add_argument("dest", nargs="?", default="", help=(
        "remote folder to put it into (ending with '/'; '/' is the storage root) or its new "
        "name; required, except in service mode (default: your own folder)"))
    sp.add_argument("-r", "--recursive", action="store_true", help="upload a directory tree")
    sp.add_argument("--overwrite", action="store_true",
                    help="upload even files already there (by default a remote file of the "
                         "same size, not older than the local one, is not sent again)")
    sp.add_argument("--checksum", action="store_true",
                    help="a file already there is one of the same size and checksum (reads "
                         "the local file)")
    sp.add_argument("--verify", action="store_const", const=True, default=None,
                    help="send Content-MD5 for every file so the server checks it "
                         "(reads files over 1 MiB twice; default: files up to 1 MiB)")
    sp.add_argument("--no-verify", dest="verify", action="store_const", const=False,
                    help="never send Content-MD5 (adler32 is still compared)")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="list what would be uploaded and the totals; change nothing")
    sp.add_argument("--manifest", metavar="FILE.json",
                    help="write one record per file (as for get)")
    _args_output(sp, "the summary and one record per file")
    _args_progress(sp)
    _args_filters(sp)


def _cmd_put(client, args):
    if not args.dest and not client.service:
        # (it meant the storage root: rarely what a user wants, never by accident)
        raise ConfigError("put needs a destination: a remote folder ending with '/' "
                          "(e.g. your-folder/), or the new name; '/' is the storage root")
    progress = _make_progress(args, "put")
    try:
        summary = client.upload(args.source, args.dest, recursive=args.recursive,
                                verify=args.verify, overwrite=args.overwrite,
                                checksum=args.checksum, select=_cli_selector(args),
                                dry_run=args.dry_run, progress=progress,
                                raise_on_failure=False)
    except KeyboardInterrupt as e:
        progress.close()
        _interrupted(args, "put", e)
        raise
    finally:
        progress.close()
    if summary.transferred and not (args.json or args.jsonl) and not _opt(args, "quiet"):
        # In service mode the files land in your own folder: say where, since
        # that path is what others pass to get.
        if not args.recursive:
            _out("%s\n" % summary.results[0].remote_path)
        elif client.service and summary.remote_path:
            _out("%s/\n" % summary.remote_path)
    return _report(args, "put", summary)


def _args_mkdir(sub):
    sp = _subcommand(sub, "mkdir", _cmd_mkdir, "create a remote directory")
    sp.add_argument("path", help="remote path")
    sp.add_argument("-p", "--parents", action="store_true",
                    help="create missing parents; no error if it exists")


def _cmd_mkdir(client, args):
    client.mkdir(args.path, parents=args.parents)
    return 0


def _args_rm(sub):
    sp = _subcommand(sub, "rm", _cmd_rm, "delete a remote file or directory")
    sp.add_argument("path", help="remote path")
    sp.add_argument("-r", "--recursive", action="store_true", help="delete a directory tree")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="list what would be deleted; delete nothing")


def _cmd_rm(client, args):
    gone = client.remove(args.path, recursive=args.recursive, dry_run=args.dry_run)
    if args.dry_run:
        _out("".join("would remove %s%s\n" % (e.path, "/" if e.is_dir else "")
                     for e in gone))
        files = [e for e in gone if not e.is_dir]
        sys.stderr.write("dry run: %s (%s) and %s would be removed\n" % (
            _plural(len(files), "file"), _human_bytes(sum(e.size or 0 for e in files)),
            _plural(len(gone) - len(files), "folder")))
    return 0


def _args_mv(sub):
    sp = _subcommand(sub, "mv", _cmd_mv,
                     "move or rename on the server (no data through the client)")
    sp.add_argument("source", help="remote path")
    sp.add_argument("dest", help="remote path; ending with '/' moves into that folder")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="say what would be moved; move nothing")


def _cmd_mv(client, args):
    entry, target = client.move(args.source, args.dest, overwrite=args.overwrite,
                                dry_run=args.dry_run)
    if args.dry_run:
        _out("would move %s -> %s\n" % (entry.path, _rel_path(client.url, target)
                                        if target.startswith(client.url) else target))
    return 0


def _args_sum(sub):
    sp = _subcommand(sub, "sum", _cmd_sum, "print the server's checksum of a file "
                     "(--local: of local files)", description=(
                         "Print the server's checksums of remote files (what it has: adler32,\n"
                         "md5), or with --local compute those of local files, reading them in\n"
                         "blocks (any size, little memory). One line per checksum, 'ALGO VALUE',\n"
                         "followed by '  PATH' when several paths are given, so that the two\n"
                         "compare with diff:\n"
                         "  diff <(ctadata sum --algo adler32 lst/f.h5) <(ctadata sum --local f.h5)"))
    sp.add_argument("paths", nargs="+", metavar="PATH",
                    help="remote path (with --local: local file)")
    sp.add_argument("--local", action="store_true",
                    help="checksum local files (default algorithm adler32)")
    sp.add_argument("--algo", choices=("adler32", "md5"), default=None,
                    help="only this algorithm (with --local: this one instead of adler32)")


def _cmd_sum(client, args):
    several = len(args.paths) > 1
    lines = []
    for path in args.paths:
        if args.local:
            try:
                sums = _local_checksums(path, (args.algo or "adler32",))
            except OSError as e:
                raise ConfigError("cannot read %s: %s" % (path, e.strerror or e))
        else:
            sums = client.checksum(path)
            if args.algo:
                sums = {k: v for k, v in sums.items() if k == args.algo}
            if not sums:
                raise RemoteError("the server has no %s checksum for this file"
                                  % (args.algo or "known"), client.url_for(path))
        for algo, value in sorted(sums.items()):
            lines.append("%s %s%s\n" % (algo, value, "  " + path if several else ""))
        if several:  # one file at a time: a long run shows as it goes
            _out("".join(lines))
            del lines[:]
    _out("".join(lines))
    return 0


def _args_cat(sub):
    sp = _subcommand(sub, "cat", _cmd_cat, "write remote files to standard output",
                     description=(
                         "Write remote files to standard output as they arrive (binary-safe),\n"
                         "e.g. `ctadata cat lst/run.json | jq .`; `get PATH -` does the same.\n"
                         "A dropped connection resumes where it stopped. Each file's size and\n"
                         "the server's checksum (when it has one) are checked at the end: the\n"
                         "bytes are written by then, so a mismatch ends with an error on\n"
                         "stderr and exit status 1 (the output is not the file)."))
    sp.add_argument("paths", nargs="+", metavar="PATH", help="remote path or URL")


def _cmd_cat(client, args):
    return _to_stdout(client, args.paths)


def _to_stdout(client, paths):
    """Write remote files to the binary standard output (cat, get PATH -)."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", sys.stdout)
    for path in paths:
        client.cat(path, out)
    out.flush()
    return 0


_CP_DESCRIPTION = """\
Copy remote files, or with -r a tree, to another remote place: server to
server, no bytes through this machine. Within one server: WebDAV COPY. Between
two servers: HTTP third-party copy, pulled by the destination (default) or,
with --push, pushed by the source; the other server gets a macaroon limited to
the files and to reading (or writing), asked of the server it is for. Live
progress comes from the servers' perf markers. After each copy the checksums of
both sides are compared (the sizes when they share no checksum); a mismatch
deletes the copy. A file already at the destination with the same size and
checksum is skipped; one that differs fails unless --overwrite.

SRC and DST are remote paths (relative to the storage URL) or URLs; a DST
ending with '/' (and any DST of several SRCs) is a folder to copy into. A local
side, written ., ./PATH, ../PATH, ~/PATH or file:PATH, makes this a `get` or a
`put`.

Credentials: the storage's origin (--url) gets your token. Another origin gets
what `ctadata --profile NAME` would send it, where NAME is the first profile of
~/.config/ctadata/config.ini whose url is on that origin; else nothing (an open
server, or a URL with ?authz=). Your token goes to another origin only if you
name it with --delegate-token: a server that gets it can pass it on and use it
as you, for anything the token allows, until it expires.

With --fts URL the copy is handed to that FTS3 server instead (jobs of at most
1,000 files): ctadata lists the files, submits, prints the job ID and returns
(--wait: follows the job to its end). Your token (or client certificate, with
--auth x509) goes to the FTS3 server.

exit status: 0 success (with --fts: submitted; with --wait: every file
FINISHED), 1 a failure, 2 bad usage, 130 interrupted."""

_CP_EPILOG = """\
examples:
  ctadata cp raw/run1.fits.fz raw/copy.fits.fz           # within the storage
  ctadata cp -r raw/20241114 https://other.site/cta/raw/ # pulled by other.site
  ctadata cp --push -r raw/20241114 https://other.site/cta/raw/
  ctadata cp --fts https://fts3.example.org:8446 -r raw/20241114 \\
      https://other.site/cta/raw/ --wait
  ctadata fts status JOB_ID --wait
"""


def _args_cp(sub):
    sp = _subcommand(sub, "cp", _cmd_cp, "copy between remote places (server to server; "
                     "third-party copy; FTS3)", description=_CP_DESCRIPTION)
    sp.epilog = _CP_EPILOG
    sp.add_argument("sources", nargs="+", metavar="SRC", help="remote path or URL")
    sp.add_argument("dest", metavar="DST", help="remote path or URL; ending with '/': a "
                    "folder to copy into")
    sp.add_argument("-r", "--recursive", action="store_true", help="copy folder trees")
    sp.add_argument("--push", action="store_true",
                    help="between two servers: the source sends (COPY with Destination) "
                         "instead of the destination fetching (default: pull)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace files already at the destination (default: skip those "
                         "with the same size and checksum, fail the others)")
    sp.add_argument("--no-verify", dest="verify", action="store_false",
                    help="do not compare the checksums of source and copy afterwards")
    sp.add_argument("--delegate-token", action="append", default=[], metavar="ORIGIN",
                    help="trust ORIGIN (https://host:port, repeatable) with your token: "
                         "it is sent there, and handed to it for the storage when the "
                         "storage issues no macaroons")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="list what would be copied and the totals; change nothing")
    sp.add_argument("--manifest", metavar="FILE.json",
                    help="write one record per file (source, destination, size, "
                         "checksums, status, error)")
    _args_output(sp, "the summary and one record per file (with --fts: the job)")
    _args_filters(sp)
    g = sp.add_argument_group("FTS3", "Hand the copy to an FTS3 server instead.")
    g.add_argument("--fts", metavar="URL",
                   help="submit to this FTS3 server (REST, e.g. https://fts3.example.org:"
                        "8446; env CTADATA_FTS or profile key fts give a default for "
                        "`ctadata fts`) and print the job ID")
    g.add_argument("--wait", action="store_true",
                   help="with --fts: follow the job until it ends, then list the failures")
    g.add_argument("--fts-retry", type=int, default=2, metavar="N",
                   help="with --fts: attempts FTS3 makes after a failure (default 2)")


def _cmd_cp(client, args):
    sources, dest = args.sources, args.dest
    if args.fts:
        return _cp_fts(client, args, sources, dest)
    if args.wait:
        raise ConfigError("--wait goes with --fts")
    progress = _make_progress(args, "cp")
    try:
        summary = client.copy(sources if len(sources) > 1 else sources[0], dest,
                              recursive=args.recursive, mode="push" if args.push else "pull",
                              overwrite=args.overwrite, verify=args.verify,
                              select=_cli_selector(args), dry_run=args.dry_run,
                              progress=progress, raise_on_failure=False,
                              delegate_token=args.delegate_token)
    finally:
        progress.close()
    return _report(args, "cp", summary)


def _cp_fts(client, args, sources, dest):
    if args.dry_run or args.manifest or args.push or args.delegate_token:
        raise ConfigError("--fts takes neither -n, --manifest, --push nor --delegate-token "
                          "(FTS3 does the copy)")
    if args.jsonl:
        raise ConfigError("--fts prints one JSON document (--json), not JSON lines")
    job = client.fts_copy(sources if len(sources) > 1 else sources[0], dest, args.fts,
                          recursive=args.recursive, overwrite=args.overwrite,
                          verify=args.verify, retry=args.fts_retry,
                          select=_cli_selector(args))
    if not args.json:
        _out("".join(jid + "\n" for jid in job.ids))
        sys.stdout.flush()
    _note(args, "submitted %s to %s (%s); follow with `ctadata fts status ID --wait%s`" % (
        _plural(len(job.ids), "FTS3 job"), _safe_url(job.endpoint),
        "IDs joined with ',' count as one ID" if len(job.ids) > 1 else "ID above",
        " --fts %s" % _safe_url(job.endpoint) if args.fts else ""))
    if not args.wait:
        if args.json:
            import json
            _out(json.dumps(job.refresh().to_dict(), indent=1) + "\n")
        return 0
    return _fts_follow(args, job, sys.stderr)


_SHARE_DESCRIPTION = """\
Make a link to a remote file or folder that works without an account, in a
browser or with curl, until it expires: the storage issues a macaroon limited
to PATH (and what is below it), to what --allow says, and to --for; ctadata
prints PATH's URL with it (...?authz=MACAROON). The macaroon is a secret:
whoever has the link can do what it allows, so it is printed on stdout only and
never logged.
Needs a storage that issues macaroons (dCache, XRootD with libXrdMacaroons,
ctadata serve)."""

_SHARE_EPILOG = """\
examples:
  ctadata share cta/DL1/run1.h5                       # a day, download and list
  curl -O "$(ctadata share cta/DL1/run1.h5 --for 2h)"
  ctadata share users/me/incoming/ --allow upload,list --ip 192.0.2.0/24
  ctadata share cta/DL1/ --json                       # url, macaroon, expires
"""


def _args_share(sub):
    sp = _subcommand(sub, "share", _cmd_share, "make a link that works without an account "
                     "(a macaroon)", description=_SHARE_DESCRIPTION)
    sp.epilog = _SHARE_EPILOG
    sp.add_argument("path", help="remote file or folder")
    sp.add_argument("--for", dest="duration", default="1d", metavar="DURATION",
                    help="how long the link works: 1d, 12h, 30m, 1w, P1D (default 1d; "
                         "servers cap it, dCache at 7 days)")
    sp.add_argument("--allow", default=",".join(_SHARE_DEFAULT), metavar="LIST",
                    help="what the link allows, ',' separated: %s (default %s)" % (
                        ", ".join(_SHARE_ACTIVITIES), ",".join(_SHARE_DEFAULT)))
    sp.add_argument("--ip", metavar="ADDRESS",
                    help="only from this address or network (192.0.2.7, 192.0.2.0/24)")
    sp.add_argument("--json", action="store_true",
                    help="print {url, macaroon, path, allow, ip, expires, expires_in}")


def _cmd_share(client, args):
    link = client.share(args.path, args.duration, args.allow, args.ip)
    if args.json:
        import json
        _out(json.dumps(link.to_dict(), indent=1) + "\n")
    else:
        _out(link.url + "\n")
        _note(args, "%s: %s until %s%s" % (link.path or "/", ",".join(link.allow),
                                           _when(link.expires),
                                           " from %s" % link.ip if link.ip else ""))
    return 0


_STAGE_DESCRIPTION = """\
Ask the storage to bring files from tape to disk (WLCG Tape REST API), in
requests of at most 1,000 files, and print the request ID (the IDs of several
requests joined with ',' count as one). A recall takes minutes to hours: follow
it with --status ID [--wait], download the files with `ctadata get --stage-id ID
DEST` (on any machine), and let the storage drop the disk copies with `ctadata
release ID`. With --wait, poll until no file is waiting (from every 1 s, backing
off to every 60 s while nothing changes), showing the files on disk.

exit status: 0 when every file is on disk (without --wait: when none failed),
1 when some failed (listed with the storage's reason), 2 bad usage."""

_STAGE_EPILOG = """\
examples:
  ctadata stage -r cta/DL0/20241114 --lifetime 2d     # prints ID; files on disk for 2 days
  ctadata stage --status ID                           # how far it is
  ctadata stage --status ID --wait                    # until every file is on disk
  ctadata get --stage-id ID data/                     # -> data/cta/DL0/20241114/...
  ctadata release ID                                  # done with them on disk
  ctadata stage --cancel ID
"""


def _args_stage(sub):
    sp = _subcommand(sub, "stage", _cmd_stage,
                     "bring files from tape to disk (prints a stage request ID)",
                     description=_STAGE_DESCRIPTION)
    sp.epilog = _STAGE_EPILOG + "\n" + _COMMON_POINTER
    sp.add_argument("paths", nargs="*", metavar="PATH",
                    help="remote files, or folders with -r")
    sp.add_argument("-r", "--recursive", action="store_true",
                    help="stage every file below a folder")
    sp.add_argument("--lifetime", metavar="DURATION",
                    help="how long the files stay on disk: 1h, 30m, 2d, PT1H (default: the "
                         "storage's)")
    sp.add_argument("--wait", action="store_true",
                    help="poll until no file is waiting; exit 0 only if every file is on disk")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--status", metavar="ID",
                   help="show how the files of an earlier request are doing (with --wait: "
                        "until they are done)")
    g.add_argument("--cancel", metavar="ID",
                   help="stop staging the files of a request that are not on disk yet")
    sp.add_argument("--json", action="store_true",
                    help="print the request as JSON: {id, ids, files: [{path, api_path, "
                         "request, state, on_disk, error}], on_disk, waiting, failed, done}")
    _args_filters(sp)


class _StageProgress:
    """What `stage --wait` shows after each poll: a live line on a terminal,
    else a line whenever the count of files on disk or failed changed
    (_FTSProgress shows an FTS3 job the same way)."""

    def __init__(self, args):
        self.quiet = _opt(args, "quiet")
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = None
        self.drawn = False

    @staticmethod
    def key(req):
        return req.on_disk, req.failed, len(req.files)

    @staticmethod
    def text(req):
        return "stage: %d/%s on disk%s" % (
            req.on_disk, _plural(len(req.files), "file"),
            ", %d failed" % req.failed if req.failed else "")

    def __call__(self, req):
        key = self.key(req)
        if self.quiet or (key == self.last and not self.tty):
            return
        self.last = key
        line = "%s, %d:%02d elapsed" % ((self.text(req),) + divmod(
            int(time.monotonic() - self.started), 60))
        if self.tty:
            sys.stderr.write("\r" + line[:200] + "\x1b[K")
            self.drawn = True
        else:
            sys.stderr.write("ctadata: %s\n" % line)
        sys.stderr.flush()

    def close(self):
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _cmd_stage(client, args):
    if (args.status or args.cancel) and (args.paths or args.recursive or args.lifetime or
                                         _cli_selector(args) is not None):
        raise ConfigError("--status and --cancel take a request ID only")
    if args.cancel:
        if args.wait:
            raise ConfigError("--cancel does not wait")
        req = client.stage_request(args.cancel)
        _note(args, "cancelled %s of %s" % (_plural(req.cancel(), "file"), req.id))
        _stage_report(args, req, sys.stdout, failures=False)
        return 0
    if args.status:
        req = client.stage_request(args.status)
    elif not args.paths:
        raise ConfigError("stage needs remote paths (or --status ID, --cancel ID)")
    else:
        req = client.stage(args.paths, lifetime=args.lifetime, recursive=args.recursive,
                           select=_cli_selector(args))
        if not args.json:
            _out(req.id + "\n")
            sys.stdout.flush()
        _note(args, "%s in %s; follow with `ctadata stage --status ID --wait`, download "
                    "with `ctadata get --stage-id ID DEST`" % (
                        _plural(len(req.files), "file"), _plural(len(req.ids), "stage request")))
        if not args.wait:
            if args.json:
                return _stage_report(args, req, sys.stdout)
            return 0
    if args.wait:
        show = _StageProgress(args)
        try:
            req.wait(progress=show)
        finally:
            show.close()
    return _stage_report(args, req, sys.stdout if args.status else sys.stderr)


def _stage_report(args, req, stream, failures=True):
    """Print how a stage request is doing (JSON, or a summary line and, with
    *failures*, the failed files); return the exit code."""
    if args.json:
        import json
        _out(json.dumps(req.to_dict(), indent=1) + "\n")
    elif not _opt(args, "quiet"):
        states = {}
        for f in req.files:
            states[f.state] = states.get(f.state, 0) + 1
        stream.write("stage %s: %s, %d on disk, %d waiting, %d failed (%s)\n" % (
            req.id, _plural(len(req.files), "file"), req.on_disk, req.waiting, req.failed,
            ", ".join("%s %d" % kv for kv in sorted(states.items()))))
    failures = req.failures if failures else []
    for f in failures[:20]:
        sys.stderr.write("ctadata: failed: %s: %s\n" % (f.path, f.problem))
    if len(failures) > 20:
        sys.stderr.write("ctadata: ... and %d more failures\n" % (len(failures) - 20))
    if args.wait and not req.ok:
        return 1
    return 1 if failures else 0


def _args_release(sub):
    sp = _subcommand(sub, "release", _cmd_release,
                     "let the storage drop the disk copies of staged files",
                     description="Tell the storage that the files of a stage request (all "
                                 "of them, or the PATHs given) are no longer needed on disk: "
                                 "it may drop their disk copies (they stay on tape). "
                                 "`get --stage --release` does it for each file after its "
                                 "download.")
    sp.add_argument("id", metavar="ID", help="the stage request, as `ctadata stage` printed it")
    sp.add_argument("paths", nargs="*", metavar="PATH",
                    help="only these files of the request (remote paths)")


def _cmd_release(client, args):
    req = client.stage_request(args.id)
    _note(args, "released %s of %s" % (_plural(req.release(args.paths or None), "file"),
                                       req.id))
    return 0


class _FTSProgress(_StageProgress):
    """What `--wait` shows of an FTS3 job after each poll (see _StageProgress)."""

    @staticmethod
    def key(job):
        return job.state, sorted(job.counts.items())

    @staticmethod
    def text(job):
        return "fts: %s, %s" % (job.state, ", ".join(
            "%s %d" % kv for kv in sorted(job.counts.items())) or "no files")


def _fts_follow(args, job, stream):
    show = _FTSProgress(args)
    try:
        job.wait(progress=show)
    finally:
        show.close()
    return _fts_report(args, job, stream)


def _fts_report(args, job, stream):
    """Print an FTS3 job (JSON, or its state, per-state counts and the
    failed files with FTS3's reasons); return the exit code: 0 only for a
    job that FINISHED (while it runs: 0 unless files failed already)."""
    if args.json:
        import json
        _out(json.dumps(job.to_dict(), indent=1) + "\n")
    elif not _opt(args, "quiet"):
        counts = job.counts
        stream.write("fts %s: %s, %s (%s)\n" % (
            job.id, job.state, _plural(len(job.files), "file"),
            ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "none listed"))
    failures = job.failures
    for f in failures[:20]:
        sys.stderr.write("ctadata: failed: %s -> %s: %s %s\n" % (
            _safe_url(f["source"]), _safe_url(f["destination"]), f["state"],
            f["reason"] or ""))
    if len(failures) > 20:
        sys.stderr.write("ctadata: ... and %d more failures\n" % (len(failures) - 20))
    if job.done:
        return 0 if job.ok else 1
    return 1 if failures else 0


_FTS_DESCRIPTION = """\
Follow or cancel an FTS3 job that `ctadata cp --fts` submitted (the ID it
printed; several IDs joined with ',' count as one). status shows the job's
state and how many files are in each state (with --wait: polls, from every 2 s
backing off to every 60 s while nothing changes, until the job ends) and the
failed files with FTS3's reasons. The FTS3 server is --fts URL, else
$CTADATA_FTS, else the profile's fts key; your token (or certificate) goes
there.

exit status: 0 when the job FINISHED (status without --wait: when no file
failed so far), 1 otherwise, 2 bad usage."""


def _args_fts(sub):
    sp = _subcommand(sub, "fts", _cmd_fts, "follow or cancel an FTS3 job (cp --fts)",
                     description=_FTS_DESCRIPTION)
    sp.add_argument("action", choices=("status", "cancel"))
    sp.add_argument("job", metavar="ID", help="the job ID that `cp --fts` printed")
    sp.add_argument("--fts", metavar="URL", help="the FTS3 server (env CTADATA_FTS; "
                                                 "profile key fts)")
    sp.add_argument("--wait", action="store_true",
                    help="status: poll until the job ends; exit 0 only if it FINISHED")
    sp.add_argument("--json", action="store_true",
                    help="print the job as JSON: {id, ids, endpoint, state, done, counts, "
                         "files: [{job, source, destination, state, reason, size}]}")


def _cmd_fts(client, args):
    job = client.fts_job(args.job, args.fts)
    if args.action == "cancel":
        if args.wait:
            raise ConfigError("cancel does not wait")
        job.cancel()
        _note(args, "cancelled %s" % job.id)
        return _fts_report(args, job, sys.stdout) if args.json else 0
    if args.wait:
        return _fts_follow(args, job, sys.stdout)
    return _fts_report(args, job, sys.stdout)


_SERVE_DESCRIPTION = """\
Serve a local folder as a dCache-like archive, to try ctadata without an
account or to test a pipeline offline: WebDAV (PROPFIND with dCache's
checksums and tape locality, GET/HEAD with ranges and Digest, PUT with
Content-MD5 checked, MKCOL, DELETE, MOVE, COPY), the WLCG Tape REST API,
and macaroons (`share`). It prints its URL on stdout and runs until Ctrl-C
(or SIGTERM).

Every request needs the bearer token, which is printed as the path of a
private file (or --token-file); macaroons it issues are accepted within
their caveats. It listens on 127.0.0.1 only unless --bind says otherwise."""

_SERVE_EPILOG = """\
example:
  ctadata serve ~/data --tape 'raw/**' --token-file ~/.serve-token &
  export CTADATA_URL=http://127.0.0.1:8880 BEARER_TOKEN_FILE=~/.serve-token
  ctadata ls -l raw/
"""


def _args_serve(sub):
    """`ctadata serve`: its own options (none of the client's apply)."""
    import argparse
    sp = sub.add_parser("serve", help="serve a local folder as a dCache-like archive "
                        "(try ctadata without an account)", description=_SERVE_DESCRIPTION,
                        epilog=_SERVE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(func=_cmd_serve, no_client=True)
    sp.add_argument("dir", metavar="DIR", help="the folder to serve")
    sp.add_argument("--port", type=int, default=8880,
                    help="TCP port (default 8880; 0 picks a free one)")
    sp.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                    help="address to listen on (default 127.0.0.1: this machine only); "
                         "another one warns unless --tls is given")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--token-file", dest="serve_token_file", metavar="FILE",
                   help="the bearer token clients must send: read from FILE, or a new "
                        "random one written there (mode 0600) if FILE does not exist. "
                        "Default: a new one in a private temporary file, removed at exit")
    g.add_argument("--no-auth", action="store_true",
                   help="no token at all: whoever reaches the port reads everything "
                        "(needs --read-only)")
    sp.add_argument("--read-only", action="store_true",
                    help="refuse every change (PUT, MKCOL, DELETE, MOVE, COPY)")
    sp.add_argument("--tape", action="append", metavar="GLOB",
                    help="files matching GLOB (repeatable; matched as --include matches: "
                         "'raw/*', 'raw/**', '*.fits.fz') are on tape only (NEARLINE) until "
                         "staged through the WLCG Tape REST API at URL/api/v1/tape; a GET of "
                         "such a file is refused at once")
    sp.add_argument("--stage-delay", type=float, default=_STAGE_DELAY, metavar="S",
                    help="seconds a simulated recall from tape takes (default %g)"
                         % _STAGE_DELAY)
    sp.add_argument("--redirect", action="store_true",
                    help="answer GETs, and PUTs that say 'Expect: 100-continue', with 307 to "
                         "a second port on single-use URLs, as dCache's doors send clients "
                         "to pools")
    sp.add_argument("--tls", metavar="CERT.pem",
                    help="serve https with this certificate (and its key, in the same "
                         "file unless --tls-key)")
    sp.add_argument("--tls-key", metavar="KEY.pem", help="the key of --tls, if separate")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                    help="print only errors (and the URL)")
    sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                    help="log every request (method, path, status; never a token)")


def _cmd_serve(client, args):
    if args.tls_key and not args.tls:
        raise ConfigError("--tls-key goes with --tls")
    srv = serve(args.dir, port=args.port, bind=args.bind, token_file=args.serve_token_file,
                auth=not args.no_auth, read_only=args.read_only, tape=args.tape,
                redirect=args.redirect, tls=(args.tls, args.tls_key) if args.tls else None,
                stage_delay=args.stage_delay)
    import signal

    def terminate(_signum, _frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:          # not the main thread
        previous = None
    try:
        _out(srv.url + "\n")
        sys.stdout.flush()
        what = ["read-only" if args.read_only else "read-write"]
        if args.tape:
            what.append("on tape: %s" % ", ".join(args.tape))
        if args.redirect:
            what.append("redirects to %s" % srv.pool_url)
        _note(args, "serving %s at %s (%s)" % (srv.root, srv.url, "; ".join(what)))
        if srv.token_file:
            import shlex
            _note(args, "the token is in %s; for example:\n  ctadata --url %s --token-file "
                        "%s ls -l" % (srv.token_file, srv.url, shlex.quote(srv.token_file)))
        _note(args, "Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _note(args, "stopped")
    return 0


def _args_config(sub):
    _subcommand(sub, "config", _cmd_config,
                "show the effective settings and where each comes from",
                description="Show the effective settings (storage or service URL, jobs, "
                            "timeouts, CAs, credentials...) and where each came from: the "
                            "command line, an environment variable, a profile of "
                            "~/.config/ctadata/config.ini, or the built-in default. Never "
                            "shows a secret. Precedence: command line > environment > "
                            "profile > default.")


def _cmd_config(client, args):
    rows = client.config()
    width = max(len(k) for k, _v, _s in rows)
    for key, value, source in rows:
        where = "command line" if source == "argument" else source
        _out("%-*s  %-40s  %s\n" % (width, key, "-" if value is None else value, where))
    _out("%-*s  %s\n" % (width, "config file", client.config_file))
    return 0


def _completion_words(parser):
    """{subcommand: [option strings]} and the global options, read from
    the argparse tree itself (never a hand-written copy).  Only the commands
    `ctadata --help` lists: not the old names (start-agent...) nor aliases
    (list), which still work."""
    import argparse
    glob = [o for a in parser._actions for o in a.option_strings]
    subs = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for listed in action._choices_actions:
                name, sp = listed.dest, action.choices[listed.dest]
                words = [o for a in sp._actions for o in a.option_strings]
                for a in sp._actions:
                    if not a.option_strings and a.choices:
                        words += list(a.choices)
                subs[name] = words
    return glob, subs


def _args_completion(sub):
    sp = _subcommand(sub, "completion", _cmd_completion, "print a shell completion script",
                     description="Print a completion script for bash or zsh, generated from "
                                 "these very options. Enable it with\n"
                                 "  eval \"$(ctadata completion bash)\"   # in ~/.bashrc\n"
                                 "  eval \"$(ctadata completion zsh)\"    # in ~/.zshrc")
    sp.add_argument("shell", choices=("bash", "zsh"))


def _cmd_completion(client, args):
    glob, subs = _completion_words(_build_parser())
    cases = "".join('        %s) opts="%s" ;;\n' % (name, " ".join(sorted(set(words))))
                    for name, words in sorted(subs.items()))
    script = """# ctadata %(v)s %(shell)s completion, generated from its argparse options
_ctadata() {
    local cur cmd="" i opts
    cur="${COMP_WORDS[COMP_CWORD]}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            %(names)s) cmd="${COMP_WORDS[i]}"; break ;;
        esac
    done
    case "$cmd" in
        "") opts="%(cmds)s %(glob)s" ;;
%(cases)s    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -o default -o bashdefault -F _ctadata ctadata cta-data cta-data-direct ctadata.pyz
""" % {"v": __version__, "shell": args.shell, "names": "|".join(sorted(subs)),
       "cmds": " ".join(sorted(subs)), "glob": " ".join(sorted(set(glob))),
       "cases": cases}
    if args.shell == "zsh":
        script = ("autoload -U +X compinit && compinit\n"
                  "autoload -U +X bashcompinit && bashcompinit\n") + script
    _out(script)
    return 0


def _args_upload_cert(sub):
    sp = _subcommand(sub, "upload-cert", _cmd_upload_cert, "upload a certificate to the platform",
                     description="Upload your (proxy) certificate, a PEM file, to the CTA "
                                 "certificate service, so that the platform can reach the "
                                 "storage as you. Token from --token-file, else "
                                 "$JUPYTERHUB_API_TOKEN.")
    sp.add_argument("path", help="PEM file")
    sp.add_argument("--key", choices=_CERTIFICATE_KEYS, default="cta",
                    help="the storage area the certificate is for (default cta)")
    sp.add_argument("--shared", action="store_true",
                    help="upload the shared robot certificate instead (operators)")
    sp.add_argument("--cert-service", metavar="URL", default=None,
                    help="certificate service URL (env CTACS_URL; default %s)"
                         % CERTIFICATE_SERVICE_URL)
    sp.add_argument("--json", action="store_true", help="print the answer as JSON")


def _cmd_upload_cert(client, args):
    if args.shared:
        answer = client.upload_shared_certificate(args.path)
    else:
        answer = client.upload_certificate(args.path, args.key)
    if args.json:
        import json
        _out(json.dumps(answer, indent=1) + "\n")
    elif not _opt(args, "quiet"):
        _out("%s\n" % (answer.get("message") or "certificate uploaded"))
    return 0


def _service_flag(argv):
    """``--service`` takes an optional URL: a following argument is its value
    only if it says "://", so ``--service ls x`` still means the ls command."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--service" and (i + 1 == len(out) or "://" not in out[i + 1]):
            out[i] = "--service="
    return out


def _note(args, text):
    if not _opt(args, "quiet"):
        sys.stderr.write("ctadata: %s\n" % text)


def _client_secret(client_id):
    """The OIDC client secret: $CTADATA_CLIENT_SECRET, else the file the old
    client kept it in (for its own client id), else a prompt that does not
    echo (on a terminal).  Never from the command line."""
    secret = os.environ.get("CTADATA_CLIENT_SECRET", "").strip()
    if secret:
        return secret
    if client_id in (_DEFAULT_CLIENT_ID, _DEV_CLIENT_ID):
        old = os.path.join(_home(os.environ), ".config", "cta-data",
                           "secret-dev" if client_id == _DEV_CLIENT_ID else "secret")
        text = (_read_private(old, "client secret file") or "").strip()
        if text:
            return text.splitlines()[0].strip()
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass
        return getpass.getpass("Client secret of %s (Enter if it has none): "
                               % client_id).strip() or None
    return None


def _args_login_options(sp):
    sp.add_argument("--issuer", default=None, metavar="URL",
                    help="OpenID provider (default %s)" % _DEFAULT_ISSUER)
    sp.add_argument("--client-id", default=None, metavar="ID",
                    help="OIDC client (default %s; with --dev %s)"
                         % (_DEFAULT_CLIENT_ID, _DEV_CLIENT_ID))
    sp.add_argument("--scope", default=_LOGIN_SCOPE,
                    help="scopes to ask for (default %(default)r; offline_access "
                         "brings the refresh token)")


_LOGIN_DESCRIPTION = """\
Log in once per machine: prints an address and a code to enter in any browser,
waits for you, then keeps an access and a refresh token in ~/.config/ctadata/
(folder 0700, file 0600). Later commands refresh the access token themselves
shortly before it expires: no agent, no daemon.
The client secret, if the client has one, comes from $CTADATA_CLIENT_SECRET,
the old client's ~/.config/cta-data/secret or a prompt that does not echo;
never from the command line."""


def _args_login(sub):
    _args_login_options(_subcommand(
        sub, "login", _cmd_login,
        "log in with your browser (OIDC device flow) and keep the tokens",
        description=_LOGIN_DESCRIPTION))


def _cmd_login(client, args):
    if getattr(args, "secret", None):
        raise ConfigError("the client secret is not taken from the command line: every "
                          "user of this machine can read it with `ps`",
                          hint="set $CTADATA_CLIENT_SECRET or answer the prompt")
    secret = _client_secret(client.client_id)   # client_id: flag > profile > default

    def show(uri, code, complete, expires_in):
        err = sys.stderr
        if complete:
            err.write("To log in, open this address in a browser, on any device:\n\n"
                      "    %s\n\n(or open %s and enter the code %s)\n" % (complete, uri, code))
        else:
            err.write("To log in, open %s in a browser, on any device, and enter the "
                      "code\n\n    %s\n\n" % (uri, code))
        err.write("Waiting for you (the code is valid for %d min)...\n"
                  % max(1, expires_in // 60))
        err.flush()

    done = client.login(args.scope, secret, show)
    _note(args, "logged in%s; tokens kept in %s (%s)" % (
        " as %s" % done["user"] if done["user"] else "", done["store"],
        "refreshed automatically; `ctadata logout` forgets them"
        if done["refreshable"] else "no refresh token: log in again when it expires"))
    return 0


def _args_logout(sub):
    _subcommand(sub, "logout", _cmd_logout, "forget the tokens of `ctadata login`",
                description="Delete the tokens `ctadata login` stored (the --dev ones "
                            "with --dev).")


def _cmd_logout(client, args):
    if client.logout():
        _note(args, "logged out: removed %s" % client.login_store)
    else:
        _note(args, "not logged in (no %s)" % client.login_store)
    return 0


def _args_token(sub):
    sp = _subcommand(sub, "token", _cmd_token, "print the bearer token, or where it comes from",
                     description="Print the bearer token that would be used (refreshed if it "
                                 "was about to expire), e.g. for curl; with --explain, where "
                                 "it was looked for and what was found, without the token.")
    sp.add_argument("--explain", action="store_true",
                    help="say where the token was looked for and what was found "
                         "(never prints the token)")


def _cmd_token(client, args):
    if args.explain:
        _out("".join(line + "\n" for line in client.explain_token()))
        return 0 if client.token_source or client.auth_mode == "x509" else 1
    _out(client.token() + "\n")
    return 0


def _args_old_names(sub):
    """The old client's command names (no help line: they are not advertised)."""
    import argparse

    def alias(name, new, func):
        sp = sub.add_parser(name, description="Old name of `ctadata %s`." % new,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sp, suppress=True)
        sp.set_defaults(func=func, alias_of=new)
        return sp

    sp = alias("start-agent", "login", _cmd_login)
    _args_login_options(sp)
    sp.add_argument("-s", "--secret", default=None, help=argparse.SUPPRESS)
    alias("print-token", "token", _cmd_token).set_defaults(explain=False)
    alias("stop-agent", "logout", _cmd_logout)
    alias("reset-config", "logout", _cmd_logout)


def _setup_logging(args):
    """Log to stderr as "ctadata: ..." for the run of one command; return
    the function that puts the loggers back as they were (main() may run
    many times in one process: a test, a notebook, a script's loop)."""
    import logging
    logger = logging.getLogger("ctadata")
    retry = logging.getLogger("ctadata.retry")
    before = (logger.propagate, logger.level, retry.level)
    for h in [h for h in logger.handlers if getattr(h, "_ctadata_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._ctadata_cli = True
    handler.setFormatter(logging.Formatter("ctadata: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    verbose = _opt(args, "verbose", 0)
    quiet = _opt(args, "quiet")
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    # one line per retry (INFO, see _log_retry), unless -q
    retry.setLevel(logging.ERROR if quiet and not verbose else logging.INFO)

    def restore():
        logger.removeHandler(handler)
        logger.propagate, level, retry_level = before
        logger.setLevel(level)
        retry.setLevel(retry_level)
    return restore


def _cli_error(args, e):
    """An error as the command line says it: the hint in its words (get -r,
    not recursive=True), and an error about a remote path the server
    refused (no such file or folder, already exists) under the command the
    user typed."""
    text = e.text(e.cli_hint or e.hint)
    if isinstance(e, RemoteError) and e.path is not None:
        text = "%s: %s" % (args.command, text)
    return text


class _Terminated(KeyboardInterrupt):
    """A signal stopped the command line (see _StopSignals)."""

    def __init__(self, signum):
        KeyboardInterrupt.__init__(self, signum)
        self.signum = signum


class _StopSignals:
    """While main() runs: SIGTERM (what SLURM sends when a job's time is up)
    and SIGHUP (a closed terminal) stop the command the way Ctrl-C does (a
    _Terminated, which is a KeyboardInterrupt, raised in the main thread):
    workers stop, .part files stay, the manifest of what was done is
    written, exit 128 + the signal's number.  A second signal while
    stopping is ignored, so that it cannot break the cleanup (SIGKILL still
    works); one that comes while the summary and manifest are being written
    waits until they are (_Held).  Only signals at their default action are
    taken (not one that nohup or a shell made the process ignore), and only
    in the main thread (signal.signal works nowhere else)."""

    current = None

    def __init__(self):
        import signal
        import threading
        self.old, self.seen, self.pending, self.holding = {}, False, None, 0
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            num = getattr(signal, name, None)
            if num is not None and signal.getsignal(num) in (signal.SIG_DFL,
                                                             signal.default_int_handler):
                self.old[num] = signal.signal(num, self.handle)
        _StopSignals.current = self

    def handle(self, signum, frame):
        if self.seen:
            return
        if self.holding:
            self.pending = self.pending or signum
            return
        self.seen = True
        raise _Terminated(signum)

    def restore(self):
        import signal
        for num, old in self.old.items():
            signal.signal(num, old)
        if _StopSignals.current is self:
            _StopSignals.current = None


class _Held:
    """A block that a stop signal does not cut short: it is acted on after."""

    def __enter__(self):
        s = _StopSignals.current
        if s is not None:
            s.holding += 1

    def __exit__(self, kind, value, tb):
        s = _StopSignals.current
        if s is not None:
            s.holding -= 1
            if not s.holding and s.pending is not None and kind is None and not s.seen:
                s.seen, signum, s.pending = True, s.pending, None
                raise _Terminated(signum)


_SIGNAL_NAMES = {1: "hung up (SIGHUP)", 2: "interrupted", 15: "terminated (SIGTERM)"}


def main(argv=None):
    """Run the command line; return the exit status (0 ok, 1 failure,
    2 usage, 128 + N stopped by signal N: 130 Ctrl-C, 143 SIGTERM, 129
    SIGHUP).  Never calls sys.exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        # Fast path: no argparse, no network modules (start-up time matters
        # on login nodes and in scripts that call us in a loop).
        sys.stdout.write("ctadata %s\n" % __version__)
        return 0
    parser = _build_parser()
    try:
        args = parser.parse_args(_service_flag(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    restore_logging = _setup_logging(args)
    if getattr(args, "alias_of", None):
        sys.stderr.write("ctadata: note: `%s` is now `ctadata %s`\n"
                         % (args.command, args.alias_of))
    signals = _StopSignals()
    try:
        try:
            client = None if getattr(args, "no_client", False) else _client_from_args(args)
            return args.func(client, args) or 0
        finally:
            restore_logging()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        what = _SIGNAL_NAMES.get(signum, "stopped by signal %d" % signum)
        if args.command == "get":
            sys.stderr.write("\nctadata: %s (partial downloads kept as .part files; run "
                             "the same command again to resume)\n" % what)
        else:
            sys.stderr.write("\nctadata: %s\n" % what)
        return 128 + signum
    except CtadataError as e:
        sys.stderr.write("ctadata: error: %s\n" % _cli_error(args, e))
        return e.exit_code
    except BrokenPipeError:
        # stdout closed early (e.g. `ctadata ls | head`): not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    finally:
        signals.restore()


############################################################################
# Entry point
############################################################################

# `from ctadata import direct` and `ctadata.direct.upload_file(...)` come from
# the old client's README; `ctadata.api` from its service-mode era.
direct = api = sys.modules[__name__]


def _entry():
    """Console-script and zipapp entry point (zipapp's generated __main__.py
    drops the return value, hence this wrapper)."""
    _rerun_in_utf8_locale()
    _exit(main())


def _exit(code):
    """Exit with *code*.  After a Ctrl-C (or SIGTERM), a worker thread that
    has not noticed yet must not run into interpreter shutdown (CPython can
    abort then): flush and leave at once."""
    threading = sys.modules.get("threading")
    if code >= 128 and threading is not None and any(
            t.daemon and t.is_alive() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def _entry_service():
    """The ``cta-data`` command: the old client's service-mode command, so
    service mode unless --url, --dev or --service says otherwise."""
    argv = sys.argv[1:]
    if not any(a in ("--url", "--dev", "--service") or a.startswith(("--url=", "--service="))
               for a in argv):
        argv = ["--service="] + argv
    _rerun_in_utf8_locale()
    _exit(main(argv))


if __name__ == "__main__":
    _entry()
