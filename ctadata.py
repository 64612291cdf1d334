#!/usr/bin/env python3
"""ctadata: list, download and upload files on CTAO science data archives.

One module, standard library only, Python 3.8+.  It speaks WebDAV to dCache
(and to any WebDAV server: nginx, Apache, StoRM) with OIDC bearer tokens, and
can be used three ways:

* from Python: ``ctadata.list_dir(...)``, ``ctadata.fetch_and_save_file(...)``,
  ``ctadata.upload_file(...)`` or an explicit ``ctadata.Client(...)``;
* from the shell: ``ctadata ls / get / put / mkdir / rm / mv / stat``;
* as a single file, ``python3 ctadata.pyz ...`` built by ``make zipapp``.

The sections below are in dependency order: each one only uses those above it.
"""

import os
import sys
import threading
import time

############################################################################
# Constants & version
############################################################################

__version__ = "1.0.0"

__all__ = [
    # client, settings and data classes
    "Client", "Settings", "Entry", "DEFAULT_URL", "DEV_URL", "TransferResult", "TransferSummary", "Progress",
    # module-level functions (thin wrappers over a default Client)
    "list_dir", "ls", "stat", "fetch_and_save_file", "fetch_and_save_file_or_dir",
    "upload_file", "upload_dir", "mkdir", "remove", "move", "checksum",
    "default_client", "set_default_client",
    # errors
    "CtadataError", "ConfigError", "AuthError", "RemoteError", "NotFound",
    "TransferError", "ChecksumMismatch", "ProtocolError", "PartialFailure",
    "StorageException",
    # CLI
    "main",
]

DEFAULT_URL = "https://dcache.cta.cscs.ch:2880"
DEV_URL = "https://dcache-dev.ctaodc.ch:2880"

# Transfers move data in 1 MiB blocks: large enough that per-call Python
# overhead vanishes next to the copy, small enough for 4 workers to stay far
# below the 30 MB RSS budget.
_CHUNK = 1 << 20
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
# Error bodies are read for a message, never more than this.
_ERROR_BODY_LIMIT = 4096
# A finished-with response whose body is larger than this closes its
# connection instead of draining it.
_DRAIN_LIMIT = 1 << 16
# RFC 9110 §15: statuses worth retrying (rclone's retryErrorCodes).
_RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))

# A PROPFIND answer streams through the parser; what it buffers is bounded:
# one text node, and the element nesting (a multistatus needs about 8 levels).
_XML_TEXT_LIMIT = 1 << 16
_XML_MAX_DEPTH = 64

_PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<propfind xmlns="DAV:" xmlns:dc="http://www.dcache.org/2013/webdav"'
    b' xmlns:srm="http://srm.lbl.gov/StorageResourceManager"><prop>'
    b"<resourcetype/><getcontentlength/><getlastmodified/><getetag/>"
    b"<dc:Checksums/><srm:FileLocality/></prop></propfind>"
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


def _printable(text, limit=300):
    """Text from a server, fit for a message: no control characters (no
    terminal escapes), one line, bounded."""
    text = " ".join(str(text).split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class CtadataError(Exception):
    """Root of every error ctadata raises.

    Fields: ``message``; ``url`` (credentials and query removed); ``status``
    (HTTP status or None); ``hint`` (what the user can do about it).
    """

    exit_code = 1

    def __init__(self, message, url=None, status=None, hint=None):
        Exception.__init__(self, message)
        self.message = message
        self.url = _safe_url(url)
        self.status = status
        self.hint = hint
        self.retry_after = None  # the server's Retry-After, when it sent one

    def __str__(self):
        text = self.message
        if self.url and self.url not in text:
            text += " (%s)" % self.url
        if self.hint:
            text += "; " + self.hint
        return text


class ConfigError(CtadataError):
    """Bad input or settings: nothing was sent."""

    exit_code = 2


class AuthError(CtadataError):
    """No usable credentials, or the server refused them (401/403)."""


class RemoteError(CtadataError):
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


class PartialFailure(CtadataError):
    """Some files of a multi-file transfer failed; ``summary`` has them all."""

    def __init__(self, summary):
        first = summary.failures[0]
        CtadataError.__init__(
            self, "%d of %d files failed; first: %s: %s" % (
                summary.failed, summary.files, _safe_url(first.source), first.error))
        self.summary = summary


# The old client's name for storage errors; scripts catch it.
StorageException = RemoteError


def _error_for_status(status, url, body=b"", what=None, auth=None):
    """Map an HTTP error status to the right exception (the one place that does)."""
    text = body.decode("utf-8", "replace").strip() if body else ""
    if auth is not None:
        text = auth.redact(text)  # a server may echo the Authorization it got
    if text.startswith("<") or len(text) > 300:
        text = ""  # an HTML error page says nothing the status does not
    text = _printable(text)
    msg = "%s: HTTP %d" % (what, status) if what else "HTTP %d" % status
    if text:
        msg += " " + text
    if status == 401:
        hint = auth.hint() if auth is not None else None
        return AuthError(msg, url, status, hint)
    if status == 403:
        return AuthError(msg, url, status,
                         "the token is valid but lacks permission for this path")
    if status == 404:
        return NotFound(msg, url, status)
    if status == 507:
        return RemoteError(msg, url, status, "the storage is out of space")
    return RemoteError(msg, url, status)


############################################################################
# Settings & credentials
############################################################################

# `ctadata login` defaults: the CTA Keycloak realm and the client the old
# client registered with oidc-agent; --dev is its development pair.
_DEFAULT_ISSUER = "https://keycloak.cta.cscs.ch/realms/master/"
_DEFAULT_CLIENT_ID = "dcache-cta-cscs-ch-users"
_DEV_CLIENT_ID = "dcache-dev"
_LOGIN_SCOPE = "openid offline_access"
# Refresh a token this long before it expires (PROTOCOL.md §3); a token that
# lives less than twice as long is refreshed after half its lifetime.
_REFRESH_MARGIN = 60.0
_REFRESH_RETRY = 10.0
# Token files, oidc-token output and identity-provider answers are read
# whole, never more than this.
_SECRET_FILE_LIMIT = 1 << 16
_JSON_LIMIT = 1 << 20
_OIDC_TOKEN_TIMEOUT = 60
# Where the WLCG and grid conventions put per-user files (bt_u$UID,
# x509up_u$UID).  A variable so that tests never touch the real /tmp.
_SYSTEM_TMP = "/tmp"
_AUTH_MODES = ("auto", "token", "x509")


def _uid():
    return os.getuid() if hasattr(os, "getuid") else 0


def _home(env):
    return env.get("HOME") or os.path.expanduser("~")


def _when(ts):
    """Epoch seconds -> local time for messages ("2025-01-31 14:05:09 CET")."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)).strip()


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
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _Secrets:
    """Every secret this client has handled (tokens, refresh tokens, client
    secrets), so that text coming back from a server can be scrubbed of
    them before it goes into a message."""

    def __init__(self):
        self._items = set()
        self._lock = threading.Lock()

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


class _Token:
    """A bearer token and what we know about it; repr() shows only where it
    came from.  *refresh* is None or ``refresh(self, forced) -> _Token``."""

    __slots__ = ("value", "source", "claims", "exp", "margin", "refresh")

    def __init__(self, value, source, refresh=None, exp=None):
        value = (value or "").strip()
        # RFC 6750 §2.1: a b64token.  A space or line break inside would split
        # the header (and http.client would quote the value in its error).
        if not value or any(not ("!" <= c <= "~") for c in value):
            raise ConfigError("the token from %s is not one line of printable ASCII"
                              % source, hint="a token file holds the token and nothing else")
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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                          0o600)
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
    requires one.  Neither the token nor any other secret appears in
    repr(), str() or any message."""

    def __init__(self, token=None, token_file=None, env=None, oidc_agent=None,
                 mode=None, cert=None, profile="default", oidc=None):
        self._explicit = token
        self._token_file = token_file
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
        self._lock = threading.Lock()          # discovery
        self._refresh_lock = threading.Lock()  # one refresher at a time
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
        env, uid = self._env, _uid()

        def value(v, label, none="not set"):
            if not v:
                return none
            return _Token(v, label) if v.strip() else "empty"

        def from_file(path, label):
            text = _read_private(path)
            if text is None:
                return "no such file"
            return _Token(text, label) if text.strip() else "empty"

        def token_file():
            if not self._token_file:
                return "not given"
            path = os.path.expanduser(self._token_file)
            text = _read_private(path)
            if text is None:
                raise ConfigError("cannot read token file %s: no such file" % path)
            return _Token(text, "--token-file %s" % path)

        out = [("token argument", lambda: value(self._explicit, "token argument", "not given")),
               ("--token-file", token_file),
               ("$CTADATA_TOKEN", lambda: value(env.get("CTADATA_TOKEN"), "$CTADATA_TOKEN")),
               ("$BEARER_TOKEN", lambda: value(env.get("BEARER_TOKEN"), "$BEARER_TOKEN"))]

        def file_source(path, label):
            out.append((label, lambda: from_file(path, label)))

        btf = env.get("BEARER_TOKEN_FILE")
        if btf:
            file_source(btf, "$BEARER_TOKEN_FILE (%s)" % btf)
        else:
            out.append(("$BEARER_TOKEN_FILE", lambda: "not set"))
        xdg = env.get("XDG_RUNTIME_DIR")
        if xdg:
            file_source(os.path.join(xdg, "bt_u%d" % uid), os.path.join(xdg, "bt_u%d" % uid))
        else:
            out.append(("$XDG_RUNTIME_DIR/bt_u%d" % uid, lambda: "$XDG_RUNTIME_DIR not set"))
        tmp = os.path.join(_SYSTEM_TMP, "bt_u%d" % uid)
        file_source(tmp, tmp)
        out.append(("login store %s" % self.store.path, self._from_store))
        out.append(("oidc-agent", self._from_oidc_agent))
        old = os.path.join(_home(env), ".config", "cta-data",
                           "token-dev" if self.profile == "dev" else "token")
        file_source(old, "old client's token %s" % old)
        return out

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
        store, oidc, secrets = self.store, self.oidc, self.secrets

        def refresh(used, forced):
            with store.locked():
                rec = store.load() or {}
                current = rec.get("access_token")
                if current and current != used.value:
                    # Another process refreshed meanwhile: take its token.
                    tok = _Token(current, label, refresh, rec.get("expires_at"))
                    if tok.exp is None or tok.exp > time.time():
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
            if self._loaded:
                return self._cred
            looked = self.looked = []
            cred = None
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
            self._cred = cred
            self._loaded = True
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

    def header(self):
        """The Authorization value for the next request, or None.  Refreshes
        a refreshable token that expires within its margin; raises AuthError
        for an expired one (or none at all with auth "token") before
        anything is sent."""
        cred = self._cred if self._loaded else self.load()
        if cred is None:
            if self.mode == "token":
                raise AuthError("no token found", hint=self.hint())
            return None
        return "Bearer " + self._fresh(cred).value

    def _fresh(self, cred):
        if cred.exp is None:
            return cred
        now = time.time()
        left = cred.exp - now
        if cred.refresh is not None and left < cred.margin and (
                self._failed is not cred or now >= self._retry_at):
            return self._refresh(cred, False)
        if left <= 0:
            raise self._expired(cred)
        return cred

    def _refresh(self, used, forced):
        """Replace *used* by a fresh token and return it; only one thread at
        a time, and a thread that waited here reuses what the first one got.
        After a failure, nobody asks again for _REFRESH_RETRY seconds."""
        with self._refresh_lock:
            current = self._cred
            if current is not used:
                return current
            if self._failed is not used or time.time() >= self._retry_at:
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
                self._failed, self._retry_at = used, time.time() + _REFRESH_RETRY
            if forced or (used.exp is not None and used.exp > time.time()):
                return used
            raise self._expired(used)

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
        *used*.  Return True when repeating it is worth it: the token was
        replaced meanwhile, or a forced refresh got a new one (at most once
        in a row, so a server that refuses every token costs one refresh)."""
        cred = self._cred
        if cred is None or not used:
            return False
        if "Bearer " + cred.value != used:
            return True
        if cred.refresh is None or self._forced is cred:
            return False
        return self._refresh(cred, True) is not cred

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
        return "no token found; looked in: " + ", ".join(label for label, _ in self.looked)

    def explain(self):
        """Lines saying where discovery looked and what it found, for
        `ctadata token --explain`.  Never the token itself."""
        lines = []
        error = None
        try:
            cred = self.load()
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
            lines.extend("  " + line for line in _describe_token(cred))
        elif self.mode != "x509" and error is None:
            lines.append("no token found")
        try:
            cert = self.client_cert()
        except CtadataError as e:
            cert = "error: %s" % e
        lines.append("client certificate: %s" % (cert or "none"))
        return lines


def _describe_token(cred):
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
        left = cred.exp - time.time()
        out.append("%s %s (%s)" % ("expires" if left > 0 else "EXPIRED at", _when(cred.exp),
                                    "in %d min %d s" % divmod(int(left), 60) if left > 0
                                    else "%d s ago" % -left))
    out.append("refreshed automatically: %s" % (
        "yes, %d s before it expires" % cred.margin if cred.refresh else "no"))
    return out


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


class Settings:
    """Validated options of one :class:`Client`.

    url       storage base URL (remote paths are relative to it)
    timeout   seconds for connect and for each socket read/write
    retries   attempts after the first one for retryable failures
    jobs      parallel transfers
    ca_file, ca_dir, insecure, cert   TLS options
    """

    __slots__ = ("url", "timeout", "retries", "jobs", "ca_file", "ca_dir",
                 "insecure", "cert", "verify_upload", "backoff")

    def __init__(self, url=None, timeout=None, retries=None, jobs=None,
                 ca_file=None, ca_dir=None, insecure=False, cert=None,
                 verify_upload=None, backoff=0.5, env=None):
        env = os.environ if env is None else env
        url = url or env.get("CTADATA_URL") or DEFAULT_URL
        if "://" not in url:
            url = "https://" + url
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
        self.ca_file = ca_file or env.get("X509_CERT_FILE") or None
        cadir = ca_dir or env.get("X509_CERT_DIR")
        if not cadir and os.path.isdir("/etc/grid-security/certificates"):
            cadir = "/etc/grid-security/certificates"
        self.ca_dir = cadir
        self.insecure = bool(insecure)
        self.cert = cert
        self.verify_upload = verify_upload
        self.backoff = float(backoff)

    def __repr__(self):
        return "Settings(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


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


############################################################################
# HTTP transport
############################################################################

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


def _log(level, msg, *args):
    import logging
    logging.getLogger("ctadata").log(level, msg, *args)


def _debug_enabled():
    import logging
    return logging.getLogger("ctadata").isEnabledFor(logging.DEBUG)


class _RetryPolicy:
    """How often and how long to retry: bounded attempts, exponential
    backoff with full jitter, Retry-After honoured (capped)."""

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
    import random
    delay = random.uniform(0, min(policy.cap, policy.base * (2 ** attempt)))
    if retry_after:
        try:
            delay = max(delay, min(policy.cap, float(retry_after)))
        except ValueError:
            pass  # an HTTP-date: the jittered backoff is good enough
    return delay


def _is_transient(exc):
    import http.client
    import socket
    if isinstance(exc, (ConnectionError, socket.timeout, http.client.HTTPException,
                        TimeoutError)):
        return True
    if isinstance(exc, TransferError):
        return exc.retryable and not isinstance(exc, ChecksumMismatch)
    import ssl
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in (
        104, 110, 111, 113, 32)  # reset, timed out, refused, no route, broken pipe


class _FileBody:
    """A request body read from a local file; can be re-opened for a retry
    or a redirect (dCache pool URLs are single-use, so a retried upload
    starts again at the door)."""

    __slots__ = ("path", "size", "hash_algos", "hashers", "sent")

    def __init__(self, path, size, hash_algos=("adler32",)):
        self.path, self.size, self.hash_algos = path, size, hash_algos
        self.hashers = None
        self.sent = 0

    def chunks(self, cancel=None):
        """Yield the file's bytes in blocks, hashing them on the way."""
        self.hashers = _Hashers(self.hash_algos)
        self.sent = 0
        update = self.hashers.update
        with open(self.path, "rb", buffering=0) as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while True:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                n = f.readinto(buf)
                if not n:
                    break
                block = view[:n]
                update(block)
                self.sent += n
                yield block
        if self.sent != self.size:
            raise TransferError("local file changed size during upload", None,
                                hint=self.path, expected=self.size, received=self.sent)

    def read_all(self):
        self.hashers = _Hashers(self.hash_algos)
        with open(self.path, "rb") as f:
            data = f.read()
        if len(data) != self.size:
            raise TransferError("local file changed size during upload",
                                hint=self.path, expected=self.size, received=len(data))
        self.hashers.update(data)
        self.sent = len(data)
        return data


class _Transport:
    """The one HTTP transport: a keep-alive http.client connection per
    (thread, origin), a timeout on every request, our own redirect loop
    (urllib copies Authorization to every redirect target and refuses to
    redirect PUT/PROPFIND), retries per _should_retry."""

    def __init__(self, settings, auth, cancel=None):
        self.settings = settings
        self.auth = auth
        self.auth_origin = _origin(settings.url)
        # A token crosses the network only encrypted: over plain http it goes
        # to this machine only (test servers, tunnels), never elsewhere.
        self._auth_ok = self.auth_origin[0] == "https" or _is_loopback(self.auth_origin[1])
        self.policy = _RetryPolicy(settings.retries, settings.backoff)
        self.cancel = cancel
        self._local = threading.local()
        self._ctx = None
        self._ctx_lock = threading.Lock()
        self._ua = "ctadata/%s python/%d.%d" % ((__version__,) + sys.version_info[:2])

    def __repr__(self):
        return "<ctadata transport %s://%s:%d>" % self.auth_origin

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

    def _conn(self, key, fresh=False):
        import http.client
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = None if fresh else conns.get(key)
        if conn is not None:
            return conn, True
        scheme, host, port = key
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.settings.timeout,
                context=self.ssl_context(), blocksize=_CHUNK)
        else:
            conn = http.client.HTTPConnection(
                host, port, timeout=self.settings.timeout, blocksize=_CHUNK)
        if not fresh:
            conns[key] = conn
        return conn, False

    def _drop(self, key, conn):
        conns = getattr(self._local, "conns", {})
        if conns.get(key) is conn:
            del conns[key]
        conn.close()

    def close(self):
        for conn in getattr(self._local, "conns", {}).values():
            conn.close()
        self._local.conns = {}

    # -- one request ---------------------------------------------------------

    def _send(self, method, url, headers, body, expect):
        """Send one request to exactly *url* (no redirects, no retries)."""
        from urllib.parse import urlsplit
        import socket
        key = _origin(url)
        p = urlsplit(url)
        target = (p.path or "/") + ("?" + p.query if p.query else "")
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
        for attempt in (0, 1):
            conn, reused = self._conn(key, fresh=expect)
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.putrequest(method, target, skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                if expect:
                    conn.endheaders()
                    resp = self._expect_continue(conn, method, body)
                elif data is not None:
                    conn.endheaders(data)
                    resp = conn.getresponse()
                else:
                    conn.endheaders()
                    if body is not None:
                        for block in body.chunks(self.cancel):
                            conn.send(block)
                    resp = conn.getresponse()
            except Exception as e:
                self._drop(key, conn)
                # A kept-alive connection the server has closed in the meantime
                # fails on first use: that is not a failure of the request.
                if reused and attempt == 0 and _is_stale(e):
                    continue
                raise
            resp.ctadata_url = url
            resp.ctadata_key = key
            resp.ctadata_auth = value
            resp.ctadata_conn = conn
            resp.ctadata_close = expect or resp.will_close
            if not resp.ctadata_close or expect:
                pass
            return resp

    def _expect_continue(self, conn, method, body):
        """Wait for the server's interim answer to "Expect: 100-continue";
        send the body only after a 100 (or after a silent timeout, as RFC 9110
        §10.1.1 allows).  http.client has no support for this."""
        import http.client
        import socket
        resp = http.client.HTTPResponse(conn.sock, method=method)
        conn.sock.settimeout(_EXPECT_TIMEOUT)
        try:
            head = resp.fp.peek(16)
        except socket.timeout:
            head = b"HTTP/1.1 100"
        finally:
            conn.sock.settimeout(self.settings.timeout)
        if not head:
            raise http.client.RemoteDisconnected("connection closed before the interim answer")
        if head[9:12] == b"100"[:len(head[9:12])]:
            for block in body.chunks(self.cancel):
                conn.sock.sendall(block)
        resp.begin()  # skips the interim 100 itself
        return resp

    # -- the request loop: redirects and retries ------------------------------

    def request(self, method, url, headers=None, body=None, expect=False,
                ok=(200, 201, 204, 206, 207), what=None, retry=True):
        """Send a request, following redirects and retrying transient failures.

        Returns the final http.client.HTTPResponse (status in *ok*, body
        unread); raises the exception _error_for_status maps any other
        status to, or TransferError for network failures."""
        headers = headers or {}
        attempt = 0
        auth_retried = False
        while True:
            try:
                resp = self._follow(method, url, headers, body, expect)
            except CtadataError:
                raise
            except KeyboardInterrupt:
                raise
            except Exception as e:
                delay = _should_retry(self.policy, attempt, exc=e) if retry else None
                if delay is None:
                    raise _network_error(e, url, what)
                _log(20, "retrying %s %s in %.1fs after: %s", method, _safe_url(url),
                     delay, e)
                self._sleep(delay)
                attempt += 1
                continue
            if resp.status in ok:
                return resp
            err_body = _read_limited(resp)
            self.release(resp)
            if resp.status == 401 and not auth_retried and \
                    resp.ctadata_key == self.auth_origin and \
                    self.auth.on_unauthorized(resp.ctadata_auth):
                # A token can die before its "exp" (revoked, server clock):
                # one refresh, then the same request again.
                auth_retried = True
                continue
            delay = None
            if retry:
                delay = _should_retry(self.policy, attempt, status=resp.status,
                                      retry_after=resp.getheader("Retry-After"))
            if delay is None:
                err = _error_for_status(resp.status, resp.ctadata_url, err_body, what,
                                        self.auth)
                if resp.status == 401 and not self._auth_ok:
                    err.hint = "no token is sent over plain http to another machine: use https"
                err.retry_after = resp.getheader("Retry-After")
                raise err
            _log(20, "retrying %s %s in %.1fs after HTTP %d", method, _safe_url(url),
                 delay, resp.status)
            self._sleep(delay)
            attempt += 1

    def _sleep(self, delay):
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
            if length is None and not resp.chunked:
                pass
            elif resp.chunked:
                left = _DRAIN_LIMIT
                while left > 0:
                    b = resp.read(min(left, 8192))
                    if not b:
                        return
                    left -= len(b)
        except Exception:
            pass
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
    import ssl
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransferError("TLS certificate verification failed: %s"
                             % getattr(exc, "verify_message", text), url,
                             hint="use --ca-file/--ca-dir for a private CA")
    if isinstance(exc, TransferError):
        return exc
    return TransferError("%s%s" % (what + ": " if what else "", text), url)


############################################################################
# OpenID Connect (device login, refresh)
############################################################################

_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class _OIDC:
    """Talks to an OpenID provider through our own _Transport (one per
    issuer origin, never sending Authorization: client credentials go in
    the form body): discovery, the device authorization grant (RFC 8628)
    and the refresh_token grant with rotation.  Forms and answers are never
    logged; answers are read up to _JSON_LIMIT.  *sleep* waits between
    device-code polls (tests pass their own)."""

    def __init__(self, settings, secrets, sleep=None):
        self.settings = settings
        self.secrets = secrets
        self.sleep = sleep or time.sleep
        self._transports = {}
        self._lock = threading.Lock()

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
        form = {"client_id": client_id, "scope": scope}
        if secret:
            form["client_secret"] = secret
        status, dev = self._call(doc["device_authorization_endpoint"], form,
                                 ok=(200, 400, 401), what="device authorization")
        if status != 200:
            raise AuthError("the identity provider refused to start a login: %s"
                            % self._error(dev), status=status,
                            hint="check --client-id and the client secret")
        code, uri = dev.get("device_code"), dev.get("verification_uri") or \
            dev.get("verification_url")
        user_code = dev.get("user_code")
        if not all(isinstance(v, str) and v for v in (code, uri, user_code)):
            raise ProtocolError("device authorization answer without device_code, "
                                "user_code or verification_uri",
                                doc["device_authorization_endpoint"])
        complete = dev.get("verification_uri_complete")
        if show is not None:
            show(_printable(uri), _printable(user_code),
                 _printable(complete) if isinstance(complete, str) else None,
                 _number(dev.get("expires_in"), 600))
        interval = min(max(_number(dev.get("interval"), 5), 1), 60)
        deadline = time.monotonic() + _number(dev.get("expires_in"), 600)
        poll = {"grant_type": _DEVICE_GRANT, "device_code": code, "client_id": client_id}
        if secret:
            poll["client_secret"] = secret
        while True:
            self.sleep(interval)
            if time.monotonic() > deadline:
                raise AuthError("the login code expired before the login was finished",
                                hint="run `ctadata login` again")
            status, ans = self._call(doc["token_endpoint"], poll, ok=(200, 400, 401, 403),
                                     what="login")
            if status == 200:
                return self._record(issuer, doc, client_id, secret, scope, ans)
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
        now = time.time()
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
# WebDAV protocol (pure parsing)
############################################################################

class Entry:
    """One remote file or directory.

    name      last path segment (decoded)
    path      path relative to the storage URL (decoded), "/"-separated
    url       absolute URL (percent-encoded)
    is_dir    True for collections
    size      bytes, or None (directories, unknown)
    mtime     seconds since the epoch, or None when absent or unparsable
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
        return "Entry(%r, is_dir=%r, size=%r)" % (self.path, self.is_dir, self.size)

    def __eq__(self, other):
        return isinstance(other, Entry) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def to_dict(self):
        """A JSON-ready dict (mtime as ISO 8601 UTC)."""
        d = {k: getattr(self, k) for k in self.__slots__}
        d["type"] = "directory" if self.is_dir else "file"
        d["mtime"] = _iso(self.mtime)
        return d


def _iso(ts):
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _parse_http_date(text):
    """RFC 1123 date (also "UTC" instead of "GMT") -> epoch seconds, or None."""
    if not text:
        return None
    import email.utils
    try:
        dt = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    return dt.timestamp()


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


_TEXT_PROPS = {
    "DAV: getcontentlength": "size",
    "DAV: getlastmodified": "mtime",
    "DAV: getetag": "etag",
    "http://www.dcache.org/2013/webdav Checksums": "checksums",
    "http://srm.lbl.gov/StorageResourceManager FileLocality": "locality",
}


def _parse_multistatus(chunks, request_url, base_url=None, on_self=None, warn=None):
    """Parse a PROPFIND multistatus answer, streamed as byte *chunks*, into
    Entry objects, yielded as they complete.

    Each href is percent-decoded and resolved against *request_url*; the
    collection itself is passed to *on_self* (when given) instead of being
    yielded; dropped is anything
    that is not a direct child of it, is on another origin, or has a name
    that could escape a destination folder ("..", "/", "\\", NUL).  *warn* is
    called with a message for every entry dropped as unsafe.  Document type
    declarations are refused: a multistatus never needs one, and entity
    expansion is an attack surface.  Uses pyexpat directly: it is several
    times faster than building ElementTree elements for 100,000 entries."""
    import xml.parsers.expat
    from urllib.parse import urljoin, urlsplit, unquote
    req = urlsplit(request_url)
    req_origin = _origin(request_url)
    req_raw = req.path[:-1] if req.path.endswith("/") else req.path
    req_nsegs = len(req_raw.split("/"))
    req_dpath = unquote(req_raw)
    req_dprefix = req_dpath + "/"
    base_path = urlsplit(base_url).path.rstrip("/") + "/" if base_url else "/"
    warn = warn or (lambda msg: None)
    out = []
    stack = []
    cur = {}
    ps = {}
    text = []
    size = [0]  # characters in *text*: one text node is bounded, like the nesting

    def refuse(*_args):
        raise ProtocolError("refusing XML with a document type declaration",
                            request_url)

    def start(name, attrs):
        stack.append(name)
        if len(stack) > _XML_MAX_DEPTH:
            raise ProtocolError("PROPFIND answer nested deeper than %d elements"
                                % _XML_MAX_DEPTH, request_url)
        if name == "DAV: response":
            cur.clear()
            cur["props"] = {}
        elif name == "DAV: propstat":
            ps.clear()
        elif name == "DAV: collection" and len(stack) >= 2 and \
                stack[-2] == "DAV: resourcetype":
            ps["is_dir"] = True
        del text[:]
        size[0] = 0

    def chars(data):
        text.append(data)
        size[0] += len(data)
        if size[0] > _XML_TEXT_LIMIT:
            raise ProtocolError("PROPFIND answer with a text of more than %d characters"
                                % _XML_TEXT_LIMIT, request_url)

    def end(name):
        stack.pop()
        if name in _TEXT_PROPS:
            ps[_TEXT_PROPS[name]] = "".join(text).strip()
        elif name == "DAV: href" and stack and stack[-1] == "DAV: response":
            cur["href"] = "".join(text).strip()
        elif name == "DAV: status" and stack and stack[-1] == "DAV: propstat":
            ps["_status"] = "".join(text)
        elif name == "DAV: propstat":
            status = ps.pop("_status", "")
            # dCache puts properties a file lacks into a 404 propstat.
            if not status or " 200" in status:
                cur["props"].update(ps)
        elif name == "DAV: response":
            entry, is_self = make(cur.get("href"), cur.get("props", {}))
            if entry is None:
                pass
            elif is_self:
                on_self(entry)
            else:
                out.append(entry)
        del text[:]
        size[0] = 0

    def make(href, props):
        if not href:
            return None, False
        full = urljoin(request_url, href)
        p = urlsplit(full)
        try:
            same_origin = _origin(full) == req_origin
        except ProtocolError:
            same_origin = False
        if not same_origin:
            warn("skipping entry on another host: %s" % _safe_url(full))
            return None, False
        # Servers differ in percent-encoding (nginx upper-case hex, Apache
        # lower-case, StoRM full URLs): compare decoded paths, but count raw
        # segments, so that an encoded "/" (%2F) cannot pose as a separator.
        raw = p.path[:-1] if p.path.endswith("/") else p.path
        segs = raw.split("/")
        dpath = unquote(raw, errors="strict")
        is_self = len(segs) == req_nsegs and dpath == req_dpath
        if is_self:
            if on_self is None:
                return None, False
        elif len(segs) != req_nsegs + 1 or not dpath.startswith(req_dprefix):
            warn("skipping entry outside %r: %r" % (req_dprefix, dpath))
            return None, False
        name = unquote(segs[-1], errors="strict")
        # Control characters (C0, DEL, C1) are refused too: they would become
        # file names and terminal escapes ("ls" prints names as they are).
        if not is_self and (name in ("", ".", "..") or
                            any(c in "/\\" or c < " " or "\x7f" <= c <= "\x9f"
                                for c in name)):
            warn("skipping entry with an unsafe name: %r" % name)
            return None, False
        path = dpath[len(base_path):] if dpath.startswith(base_path) else dpath
        is_dir = bool(props.get("is_dir"))
        size = props.get("size")
        try:
            size = int(size) if size not in (None, "") and not is_dir else None
        except ValueError:
            size = None
        raw_mtime = props.get("mtime")
        mtime = _parse_http_date(raw_mtime)
        if raw_mtime and mtime is None:
            warn("unparsable modification time %r for %s" % (raw_mtime, path))
        url = "%s://%s%s" % (req.scheme, req.netloc, p.path)
        return Entry(name, path, url, is_dir, size, mtime, props.get("etag") or None,
                     _parse_digest(props.get("checksums")),
                     props.get("locality") or None), is_self

    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.buffer_text = True
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        for chunk in chunks:
            parser.Parse(chunk, False)
            if out:
                yield from out
                del out[:]
        parser.Parse(b"", True)
    except xml.parsers.expat.ExpatError as e:
        raise ProtocolError("malformed PROPFIND answer: %s" % e, request_url)
    except UnicodeDecodeError:
        raise ProtocolError("malformed percent-encoding in PROPFIND answer",
                            request_url)
    yield from out


def _iter_body(resp, size=_CHUNK):
    """Yield a response body in blocks."""
    while True:
        block = resp.read1(size) if hasattr(resp, "read1") else resp.read(size)
        if not block:
            return
        yield block


############################################################################
# Transfer engine (plans, workers, progress)
############################################################################

class _Hashers:
    """Running checksums, updated as blocks stream by (never a second read).
    adler32 is always cheap (zlib, several GB/s); md5 only when asked for."""

    __slots__ = ("adler", "md5", "_adler32")

    def __init__(self, algos=("adler32",)):
        import zlib
        self._adler32 = zlib.adler32
        self.adler = 1 if "adler32" in algos else None
        self.md5 = None
        if "md5" in algos:
            import hashlib
            self.md5 = hashlib.md5()

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


def _compare_sums(local, remote):
    """Return (algorithm, remote value, local value) of the first algorithm
    both sides know that differs, or None when all common ones agree."""
    for algo in ("adler32", "md5", "sha-256", "sha"):
        if algo in local and algo in remote and local[algo] != remote[algo]:
            return algo, remote[algo], local[algo]
    return None


def _algos_for(remote_sums):
    """Which checksums to compute locally: what the server can confirm,
    preferring the cheap adler32; adler32 alone when the server has none."""
    if "adler32" in remote_sums or "md5" not in remote_sums:
        return ("adler32",)
    return ("md5",)


class TransferResult:
    """What happened to one file.

    source, dest   remote URL / local path (or the reverse for uploads)
    size           bytes of the file
    status         "transferred", "skipped" or "failed"
    error          message when failed, else None
    checksums      {algorithm: hex} computed while streaming
    bytes          bytes that actually crossed the network (less than size
                   after a resume)
    remote_path    the path the file has on the storage (uploads)
    """

    __slots__ = ("source", "dest", "size", "status", "error", "checksums", "bytes",
                 "remote_path")

    def __init__(self, source, dest, size=None, status="transferred", error=None,
                 checksums=None, nbytes=0, remote_path=None):
        self.source, self.dest, self.size, self.status = source, dest, size, status
        self.error, self.checksums, self.bytes = error, checksums or {}, nbytes
        self.remote_path = remote_path

    def __repr__(self):
        return "TransferResult(%r -> %r, %s)" % (_safe_url(self.source), self.dest,
                                                 self.status)

    def to_dict(self):
        d = {k: getattr(self, k) for k in self.__slots__}
        d["source"] = _safe_url(self.source) if "://" in str(self.source) else self.source
        d["dest"] = _safe_url(self.dest) if "://" in str(self.dest) else self.dest
        return d


class TransferSummary:
    """Outcome of a (possibly multi-file) transfer: ``results`` holds one
    TransferResult per file; counters ``files``, ``transferred``,
    ``skipped``, ``failed``, ``bytes`` (moved over the network),
    ``seconds``."""

    def __init__(self, results, seconds):
        self.results = results
        self.seconds = seconds
        self.files = len(results)
        self.transferred = sum(1 for r in results if r.status == "transferred")
        self.skipped = sum(1 for r in results if r.status == "skipped")
        self.failed = sum(1 for r in results if r.status == "failed")
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

    def to_dict(self):
        return {"files": self.files, "transferred": self.transferred,
                "skipped": self.skipped, "failed": self.failed, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "results": [r.to_dict() for r in self.results]}


class Progress:
    """Counts what a transfer has done.  The engine calls ``add_total``,
    ``advance`` and ``file_done`` from its worker threads; this base class
    only counts (thread-safe) and draws nothing.  The CLI subclasses it to
    draw a status line on a terminal."""

    def __init__(self):
        self.lock = threading.Lock()
        self.total_files = self.total_bytes = 0
        self.done_files = self.done_bytes = 0
        self.failed = self.skipped = 0
        self.started = time.monotonic()

    def add_total(self, files, nbytes):
        with self.lock:
            self.total_files += files
            self.total_bytes += nbytes or 0

    def advance(self, nbytes):
        with self.lock:
            self.done_bytes += nbytes

    def file_done(self, result):
        with self.lock:
            self.done_files += 1
            if result.status == "failed":
                self.failed += 1
            elif result.status == "skipped":
                self.skipped += 1

    def close(self):
        pass


def _safe_join(root, rel_parts):
    """Join remote path segments below a local *root*, refusing anything
    that could land outside it (the parser already drops such names; this
    is the second lock on the door)."""
    for part in rel_parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part \
                or (os.sep != "/" and os.sep in part):
            raise ProtocolError("refusing unsafe remote name %r" % part)
    path = os.path.join(root, *rel_parts)
    real_root = os.path.abspath(root)
    if os.path.commonpath([real_root, os.path.abspath(path)]) != real_root:
        raise ProtocolError("refusing path outside the destination: %r" % path)
    return path


def _local_error(e, path):
    """A local I/O failure, naming the path."""
    return TransferError("%s: %s" % (e.strerror or e, path), retryable=False)


def _download_file(tr, url, dest, entry=None, progress=None, cancel=None):
    """Download *url* to *dest* through ``dest.part`` (renamed on success).

    Resumes an existing .part with Range + If-Range; verifies size and the
    server's checksum (from the Digest header, else from the listing);
    retries transient failures per the transport's policy, resuming each
    time (one retry budget for the whole file).  A checksum mismatch deletes
    the .part and starts over once.  Returns a TransferResult; raises
    CtadataError on failure, leaving at most a .part file behind (never a
    wrong file under the final name)."""
    part = dest + ".part"
    mismatches = attempt = 0
    fetched = [0]
    while True:
        try:
            sums, mtime = _download_once(tr, url, part, entry, progress, cancel, fetched)
        except ChecksumMismatch:
            _unlink(part)
            mismatches += 1
            if mismatches > 1:
                raise
            continue
        except CtadataError as e:
            delay = _retry_delay(tr.policy, attempt, e)
            if delay is None:
                raise
            _log(20, "retrying download of %s in %.1fs after: %s", _safe_url(url), delay, e)
            tr._sleep(delay)
            attempt += 1
            continue
        try:
            os.replace(part, dest)
        except OSError as e:
            raise _local_error(e, dest)
        if mtime is not None:
            try:
                os.utime(dest, (mtime, mtime))
            except OSError:
                pass
        size = os.path.getsize(dest)
        return TransferResult(url, dest, size, "transferred", None, sums, fetched[0])


def _retry_delay(policy, attempt, err):
    """_should_retry for a CtadataError raised by a request or a transfer."""
    if isinstance(err, RemoteError):
        return _should_retry(policy, attempt, status=err.status, retry_after=err.retry_after)
    if isinstance(err, TransferError):
        return _should_retry(policy, attempt, exc=err)
    return None


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _download_once(tr, url, part, entry, progress, cancel, fetched):
    """One GET attempt; returns (checksums, remote mtime).  Network errors
    become retryable TransferErrors; *fetched[0]* counts bytes received."""
    expected = entry.size if entry is not None else None
    known_sums = entry.checksums if entry is not None else {}
    try:
        offset = os.path.getsize(part)
    except OSError:
        offset = 0
    if expected is not None and offset >= expected:
        offset = 0  # nothing to resume (or a stale, longer part): start over
    headers = {"Want-Digest": "adler32,md5;q=0.5"}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
        validator = entry.etag if entry is not None and entry.etag and \
            not entry.etag.startswith("W/") else None
        if validator is None and entry is not None and entry.mtime is not None:
            import email.utils
            validator = email.utils.formatdate(entry.mtime, usegmt=True)
        if validator:
            # RFC 9110 §13.1.5: if the file changed, we get all of it (200).
            headers["If-Range"] = validator
    resp = tr.request("GET", url, headers, ok=(200, 206), what="download", retry=False)
    try:
        total = _content_total(resp)
        if resp.status == 206:
            start = _content_range_start(resp)
            if start != offset:
                _unlink(part)
                raise TransferError("server sent bytes from %s instead of %d" % (
                    start, offset), url)
        else:
            offset = 0
        if expected is None:
            expected = total
        elif total is not None and total != expected:
            expected = total  # the file changed since it was listed
        remote_sums = _parse_digest(resp.getheader("Digest")) or known_sums
        hashers = _Hashers(_algos_for(remote_sums))
        mtime = _parse_http_date(resp.getheader("Last-Modified"))
        if mtime is None and entry is not None:
            mtime = entry.mtime
        try:
            f = open(part, "r+b" if offset else "wb", buffering=0)
        except OSError as e:
            raise _local_error(e, part)
        got = 0
        with f:
            if offset:
                # The running checksum must cover the whole file: hash what is
                # already there once, then append.
                _hash_file(f, offset, hashers)
                f.seek(offset)
                f.truncate()
                if progress is not None:
                    progress.advance(offset)
            try:
                got = _copy_body(resp, f, hashers, progress, cancel, part, fetched)
            except TransferError:
                raise
            except Exception as e:
                if not _is_transient(e):
                    raise
                raise _network_error(e, url, "download")
        received = offset + got
        if expected is not None and received != expected:
            raise TransferError("short download: %d of %d bytes" % (received, expected),
                                url, expected=expected, received=received)
        sums = hashers.result()
        bad = _compare_sums(sums, remote_sums)
        if bad:
            raise ChecksumMismatch("%s checksum mismatch: server says %s, received %s"
                                   % bad, url, *bad)
        return sums, mtime
    finally:
        tr.release(resp)


def _content_total(resp):
    cr = resp.getheader("Content-Range")
    if cr and "/" in cr:
        tail = cr.rpartition("/")[2].strip()
        return int(tail) if tail.isdigit() else None
    length = resp.getheader("Content-Length")
    return int(length) if resp.status == 200 and length and length.isdigit() else None


def _content_range_start(resp):
    cr = (resp.getheader("Content-Range") or "").strip()
    unit, _, rng = cr.partition(" ")
    first = rng.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _hash_file(f, length, hashers):
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


def _copy_body(resp, f, hashers, progress, cancel, path, fetched):
    """Stream a response body into file *f*: one reusable buffer, checksum
    updated on the way, progress fed per block."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    readinto, write, update = resp.readinto, f.write, hashers.update
    advance = progress.advance if progress is not None else None
    got = 0
    while True:
        n = readinto(buf)
        if not n:
            return got
        block = view[:n]
        update(block)
        try:
            write(block)
        except OSError as e:
            raise _local_error(e, path)
        got += n
        fetched[0] += n
        if advance is not None:
            advance(n)
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt


def _upload_file(tr, local, url, size, verify=None, progress=None):
    """PUT one local file to *url*; returns a TransferResult.

    Large files say "Expect: 100-continue" so that dCache redirects them to a
    pool instead of proxying every byte through the door.  The adler32 (and
    md5 with *verify*) computed while sending is compared with the Digest of
    the server's answer; on a mismatch the remote file is deleted."""
    algos = ("adler32", "md5") if verify else ("adler32",)
    body = _FileBody(local, size, algos)
    headers = {"Want-Digest": "adler32,md5;q=0.5" if verify else "adler32"}
    if verify:
        import base64
        import hashlib
        h = hashlib.md5()
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        headers["Content-MD5"] = base64.b64encode(h.digest()).decode()
    expect = size >= _EXPECT_THRESHOLD
    try:
        resp = tr.request("PUT", url, headers, body, expect=expect, ok=(200, 201, 204),
                          what="upload")
    except RemoteError as e:
        if e.status == 400 and "checksum" in (e.message or "").lower():
            # dCache may keep the corrupt file after a 400 (dCache issue 7862).
            _try_delete(tr, url)
            raise ChecksumMismatch("server rejected the upload: %s" % e.message, url,
                                   "md5")
        raise
    remote_sums = _parse_digest(resp.getheader("Digest"))
    tr.release(resp)
    sums = body.hashers.result() if body.hashers else {}
    bad = _compare_sums(sums, remote_sums)
    if bad:
        _try_delete(tr, url)
        raise ChecksumMismatch("%s checksum mismatch after upload: server has %s, "
                               "sent %s; remote copy deleted" % bad, url, *bad)
    if progress is not None:
        progress.advance(size)
    return TransferResult(local, url, size, "transferred", None, sums, size)


def _try_delete(tr, url):
    try:
        tr.release(tr.request("DELETE", url, ok=(200, 202, 204, 404), retry=False))
    except CtadataError:
        pass


def _run_parallel(tasks, worker, jobs, progress=None, cancel=None):
    """Run ``worker(task)`` for every task from the iterable *tasks* on a pool
    of *jobs* threads; return the TransferResults in completion order.

    Tasks are pulled lazily (listing of the next directory overlaps with the
    transfers of this one) with at most ``jobs * 8`` in flight, so memory
    stays bounded.  A worker's CtadataError becomes a failed result; the
    others go on.  On KeyboardInterrupt the *cancel* event stops the workers
    at their next block, and the interrupt propagates."""
    from concurrent.futures import ThreadPoolExecutor
    results = []
    lock = threading.Lock()
    slots = threading.Semaphore(jobs * 8)

    def run(task):
        try:
            res = worker(task)
        except CtadataError as e:
            res = TransferResult(task.source, task.dest, task.size, "failed", str(e))
        except OSError as e:
            res = TransferResult(task.source, task.dest, task.size, "failed",
                                 str(_local_error(e, task.dest)))
        finally:
            slots.release()
        with lock:
            results.append(res)
        if progress is not None:
            progress.file_done(res)
        return res

    ex = ThreadPoolExecutor(max_workers=jobs)
    try:
        for task in tasks:
            if isinstance(task, TransferResult):  # decided without a transfer
                results.append(task)
                if progress is not None:
                    progress.file_done(task)
                continue
            while not slots.acquire(timeout=0.2):
                pass  # wake up regularly so Ctrl-C is seen promptly
            ex.submit(run, task)
        ex.shutdown(wait=True)
    except BaseException:
        if cancel is not None:
            cancel.set()
        ex.shutdown(wait=True)
        raise
    return results


class _Task:
    __slots__ = ("source", "dest", "size", "entry")

    def __init__(self, source, dest, size, entry=None):
        self.source, self.dest, self.size, self.entry = source, dest, size, entry


def _summarize(results, started, raise_on_failure=True):
    summary = TransferSummary(results, time.monotonic() - started)
    if raise_on_failure and summary.failed:
        raise PartialFailure(summary)
    return summary


############################################################################
# Public function API
############################################################################

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


def _into(dest):
    """True when a destination names a folder to put things *into*."""
    return dest in ("", ".", "..") or dest.endswith(("/", os.sep))


def _basename(path):
    return path.rstrip("/").rpartition("/")[2]


class Client:
    """A client of one storage endpoint (dCache or any WebDAV server).

    >>> c = Client(url="https://dcache.example.org:2880", token_file="~/tok")
    >>> for e in c.ls("lst/DL1"): print(e.name, e.size)

    Every module-level function exists as a method of the same name.  Remote
    paths are relative to *url*; a full http(s):// URL is accepted too.
    The token is found lazily (see README "Credentials"), refreshed when it
    came from `ctadata login` or oidc-agent (*oidc_agent*: account name),
    and sent only to the origin of *url*.  *auth*: "auto" (default: a token,
    else an X.509 proxy), "token" or "x509" (client certificate *cert*,
    $X509_USER_PROXY or /tmp/x509up_u$UID).  A Client is safe to use from
    several threads."""

    def __init__(self, url=None, token=None, token_file=None, dev=False, timeout=None,
                 retries=None, jobs=None, ca_file=None, ca_dir=None, insecure=False,
                 cert=None, verify_upload=None, env=None, auth=None, oidc_agent=None):
        if dev and not url:
            url = DEV_URL
        self.settings = Settings(url, timeout, retries, jobs, ca_file, ca_dir, insecure,
                                 cert, verify_upload, env=env)
        profile = "dev" if dev or self.settings.url == DEV_URL else "default"
        self._auth = _Auth(token, token_file, env, oidc_agent, auth, cert, profile)
        self._oidc = self._auth.oidc = _OIDC(self.settings, self._auth.secrets)
        self._cancel = threading.Event()
        self._tr = _Transport(self.settings, self._auth, self._cancel)
        self.warnings = []

    def __repr__(self):
        return "Client(url=%r)" % self.settings.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close this thread's kept-alive connections."""
        self._tr.close()

    @property
    def url(self):
        return self.settings.url

    # -- paths ---------------------------------------------------------------

    def url_for(self, path, collection=False):
        """Absolute, percent-encoded URL of a remote *path* (or Entry, or URL)."""
        if isinstance(path, Entry):
            url = path.url
        elif "://" in str(path):
            url = str(path)
            if not url.lower().startswith(("http://", "https://")):
                raise ConfigError("only http(s):// URLs are supported: %r" % _safe_url(url))
        else:
            from urllib.parse import quote
            url = self.settings.url + "/" + quote(_normpath(str(path or "")), safe="/")
        if collection and not url.endswith("/"):
            url += "/"
        return url

    def _warn(self, msg):
        self.warnings.append(msg)
        _log(30, "%s", msg)

    # -- listing ---------------------------------------------------------------

    def _propfind(self, url, depth, on_self=None):
        headers = {"Depth": str(depth), "Content-Type": 'application/xml; charset="utf-8"'}
        resp = self._tr.request("PROPFIND", url, headers, _PROPFIND_BODY,
                                ok=(200, 207), what="list")
        try:
            if resp.status != 207:
                raise ProtocolError("the server does not speak WebDAV (PROPFIND "
                                    "answered %d)" % resp.status, url)
            yield from _parse_multistatus(_iter_body(resp), resp.ctadata_url,
                                          self.settings.url, on_self, self._warn)
        finally:
            self._tr.release(resp)

    def stat(self, path):
        """Return the Entry of a remote file or directory.

        Raises NotFound if it does not exist, AuthError, RemoteError."""
        found = []
        for _ in self._propfind(self.url_for(path), 0, found.append):
            pass
        if not found:
            raise NotFound("no such file or directory", self.url_for(path))
        return found[0]

    def iter_dir(self, path=""):
        """Yield the entries of one directory as the server sends them
        (unsorted, in bounded memory).  For a file, yield its own entry."""
        selfs = []
        n = 0
        for entry in self._propfind(self.url_for(path), 1, selfs.append):
            n += 1
            yield entry
        if not n and selfs and not selfs[0].is_dir:
            yield selfs[0]

    def walk(self, path="", jobs=None):
        """Yield (entry of a directory, sorted list of its entries) for *path*
        and every directory below it, depth first.  Directory listings run
        ahead in parallel (*jobs* threads); the order is deterministic."""
        from concurrent.futures import ThreadPoolExecutor
        from collections import deque

        def listing(p):
            selfs = []
            children = sorted(self._propfind(p, 1, selfs.append), key=_entry_key)
            return (selfs[0] if selfs else None), self._unique(children)

        with ThreadPoolExecutor(max_workers=jobs or self.settings.jobs) as ex:
            queue = deque([ex.submit(listing, self.url_for(path, collection=True))])
            try:
                while queue:
                    top, children = queue.popleft().result()
                    subdirs = [e for e in children if e.is_dir]
                    for e in reversed(subdirs):
                        queue.appendleft(ex.submit(listing, self.url_for(e, True)))
                    yield top, children
            finally:
                for fut in queue:
                    fut.cancel()

    def _unique(self, entries):
        """Drop repeated names from a sorted listing (two downloads into one
        file would race), with a warning."""
        out = []
        for e in entries:
            if out and out[-1].name == e.name:
                self._warn("skipping a second entry named %r in one listing" % e.name)
            else:
                out.append(e)
        return out

    def ls(self, path="", recursive=False):
        """Return a list of Entry objects below *path*, sorted by name (with
        *recursive*, every descendant, depth first).  For a file, a list
        holding its own entry.  Raises NotFound, AuthError, RemoteError."""
        if not recursive:
            return sorted(self.iter_dir(path), key=_entry_key)
        out = []
        for _top, children in self.walk(path):
            out.extend(children)
        return out

    def list_dir(self, path=""):
        """Return the paths (relative to the storage URL) of the entries of
        the directory *path*, directories ending with "/": what the old
        client's ``list_dir`` returned and what ``fetch_and_save_file`` takes."""
        return [e.path + "/" if e.is_dir else e.path for e in self.ls(path)]

    # -- downloads ---------------------------------------------------------------

    def download(self, path, dest=None, recursive=False, overwrite=False,
                 progress=None, jobs=None, raise_on_failure=True):
        """Download a remote file, or with *recursive* a whole directory tree.

        A file goes to *dest* (a file name, or an existing/"…/"-ending folder;
        default: its name in the current folder).  A tree goes to
        ``dest/<name>`` when *dest* ends with "/" (or is ".", or omitted),
        else to *dest* itself.  Files already there with the same size are
        skipped unless *overwrite*.  Each file streams to ``name.part`` and is
        renamed when complete and verified.

        Returns a TransferSummary.  Raises PartialFailure (with the summary)
        if any file failed, NotFound/AuthError/RemoteError if *path* cannot be
        listed."""
        started = time.monotonic()
        progress = progress if progress is not None else Progress()
        self._cancel.clear()
        url = self.url_for(path)
        entry = self.stat(url)
        if not entry.is_dir:
            if dest is None:
                dest = entry.name
            elif _into(dest) or os.path.isdir(dest):
                try:
                    os.makedirs(dest, exist_ok=True)
                except OSError as e:
                    raise _local_error(e, dest)
                dest = os.path.join(dest, entry.name)
            task = self._download_task(entry, dest, overwrite, progress)
            results = _run_parallel([task], self._download_worker(progress), 1,
                                    progress, self._cancel)
            return _summarize(results, started, raise_on_failure)
        if not recursive:
            raise ConfigError("%s is a directory (use recursive=True / get -r)" % entry.path)
        if dest is None or _into(dest):
            target = os.path.join(dest or ".", entry.name) if entry.name else (dest or ".")
        else:
            target = dest

        def tasks():
            roots = {}
            base = entry.url if entry.url.endswith("/") else entry.url + "/"
            for top, children in self.walk(entry, jobs):
                top_url = top.url if top is not None else base
                rel = _rel_parts(base, top_url)
                local_dir = _safe_join(target, rel)
                if local_dir not in roots:
                    try:
                        os.makedirs(local_dir, exist_ok=True)
                    except OSError as e:
                        raise _local_error(e, local_dir)
                    roots[local_dir] = True
                for e in children:
                    if not e.is_dir:
                        yield self._download_task(e, _safe_join(local_dir, [e.name]),
                                                  overwrite, progress)

        results = _run_parallel(tasks(), self._download_worker(progress),
                                jobs or self.settings.jobs, progress, self._cancel)
        return _summarize(results, started, raise_on_failure)

    def _download_task(self, entry, dest, overwrite, progress):
        if not overwrite and entry.size is not None:
            try:
                if os.stat(dest).st_size == entry.size:
                    return TransferResult(entry.url, dest, entry.size, "skipped")
            except OSError:
                pass
        progress.add_total(1, entry.size)
        return _Task(entry.url, dest, entry.size, entry)

    def _download_worker(self, progress):
        tr, cancel = self._tr, self._cancel
        return lambda t: _download_file(tr, t.source, t.dest, t.entry, progress, cancel)

    def fetch_and_save_file(self, path, save_to_fn=None, overwrite=True):
        """Download one remote file; return the number of bytes written.

        *save_to_fn* defaults to the file's name in the current folder (as in
        the old client).  Raises NotFound, AuthError, TransferError,
        ChecksumMismatch."""
        summary = self.download(path, save_to_fn, overwrite=overwrite,
                                raise_on_failure=False)
        if summary.failed:
            raise _reraise(summary.failures[0])
        return sum(r.size or 0 for r in summary.results)

    def fetch_and_save_file_or_dir(self, path, save_to=None, recursive=False,
                                   overwrite=False):
        """Download a file, or with *recursive* a directory tree (kept below
        ``<save_to or .>/<name>``); return the TransferSummary.  Raises
        PartialFailure if any file failed."""
        if save_to is not None and recursive and not _into(save_to):
            save_to = save_to + "/"
        return self.download(path, save_to, recursive=recursive, overwrite=overwrite)

    # -- uploads ---------------------------------------------------------------

    def upload(self, local, remote="", recursive=False, verify=None, progress=None,
               jobs=None, raise_on_failure=True):
        """Upload a local file, or with *recursive* a directory tree.

        A remote path ending with "/" (or empty) names the folder to upload
        *into* (``remote/<local name>``); otherwise it is the new name.
        Missing remote folders are created.  Returns a TransferSummary;
        raises PartialFailure if any file failed, ConfigError for a bad local
        path."""
        started = time.monotonic()
        progress = progress if progress is not None else Progress()
        self._cancel.clear()
        local = os.fspath(local)
        remote = str(remote or "")
        if "://" not in remote:
            remote = _normpath(remote) if remote.strip("/") else ""
        name = os.path.basename(os.path.normpath(local))
        if os.path.isdir(local):
            if not recursive:
                raise ConfigError("%s is a directory (use recursive=True / put -r)" % local)
            target = remote + name if _into(remote) else remote
            return self._upload_tree(local, target, verify, progress, jobs,
                                     started, raise_on_failure)
        if not os.path.isfile(local):
            raise ConfigError("no such local file: %s" % local)
        target = remote + name if _into(remote) else remote
        url = self.url_for(target)
        parent = target.rstrip("/").rpartition("/")[0] if "://" not in target else None
        size = os.path.getsize(local)
        progress.add_total(1, size)
        tr = self._tr

        def worker(t):
            try:
                return _upload_file(tr, t.source, t.dest, t.size, verify, progress)
            except NotFound:
                raise
            except RemoteError as e:
                if e.status != 409 or not parent:
                    raise
            self.mkdir(parent, parents=True)  # 409: the parent folder is missing
            return _upload_file(tr, t.source, t.dest, t.size, verify, progress)

        results = _run_parallel([_Task(local, url, size)], worker, 1, progress,
                                self._cancel)
        for r in results:
            r.remote_path = target
        return _summarize(results, started, raise_on_failure)

    def _upload_tree(self, local, target, verify, progress, jobs, started,
                     raise_on_failure):
        if target.strip("/"):
            self.mkdir(target, parents=True)
        tr = self._tr
        base = target.rstrip("/")

        def tasks():
            for dirpath, dirnames, filenames in os.walk(local):
                dirnames.sort()
                rel = os.path.relpath(dirpath, local)
                rparts = [] if rel == "." else rel.split(os.sep)
                rdir = "/".join([base] + rparts if base else rparts)
                if rparts:
                    self._mkcol(self.url_for(rdir, True), exist_ok=True)
                for fn in sorted(filenames):
                    path = os.path.join(dirpath, fn)
                    try:
                        size = os.path.getsize(path)
                    except OSError as e:
                        yield TransferResult(path, rdir + "/" + fn, None, "failed",
                                             str(_local_error(e, path)))
                        continue
                    rpath = (rdir + "/" + fn) if rdir else fn
                    progress.add_total(1, size)
                    t = _Task(path, self.url_for(rpath), size)
                    yield t

        def worker(t):
            res = _upload_file(tr, t.source, t.dest, t.size, verify, progress)
            res.remote_path = _rel_path(self.settings.url, t.dest)
            return res

        results = _run_parallel(tasks(), worker, jobs or self.settings.jobs, progress,
                                self._cancel)
        return _summarize(results, started, raise_on_failure)

    def upload_file(self, local, remote=""):
        """Upload one file; return ``{"path", "status", "total_written"}`` like
        the download service does.  A *remote* ending with "/" is a folder:
        ``upload_file("latest.txt", "your-folder/")`` -> your-folder/latest.txt."""
        summary = self.upload(local, remote, raise_on_failure=False)
        if summary.failed:
            raise _reraise(summary.failures[0])
        r = summary.results[0]
        return {"path": r.remote_path, "status": "uploaded", "total_written": r.size}

    def upload_dir(self, local, remote=""):
        """Upload a local directory tree to *remote* (into it when *remote*
        ends with "/"); return the TransferSummary.  Raises PartialFailure."""
        return self.upload(local, remote, recursive=True)

    # -- namespace operations -------------------------------------------------

    def mkdir(self, path, parents=False):
        """Create a remote directory (with *parents*, also missing parents;
        an existing directory is then fine).  Raises RemoteError."""
        norm = _normpath(str(path)) if "://" not in str(path) else str(path)
        if not parents or "://" in norm:
            self._mkcol(self.url_for(norm, True), exist_ok=parents)
            return
        segs = norm.strip("/").split("/")
        for i in range(1, len(segs) + 1):
            self._mkcol(self.url_for("/".join(segs[:i]), True), exist_ok=True)

    def _mkcol(self, url, exist_ok):
        # 405: the name exists (a collection, or a file: then the next MKCOL
        # below it or the PUT fails with 409, which is reported).
        ok = (200, 201, 405) if exist_ok else (200, 201)
        self._tr.release(self._tr.request("MKCOL", url, ok=ok, what="mkdir"))

    def remove(self, path, recursive=False):
        """Delete a remote file, or with *recursive* a directory tree.
        Raises NotFound, ConfigError (a directory without *recursive*)."""
        entry = self.stat(path)
        if entry.is_dir and not recursive:
            raise ConfigError("%s is a directory (use recursive=True / rm -r)" % entry.path)
        url = self.url_for(entry, collection=entry.is_dir)
        self._tr.release(self._tr.request("DELETE", url, ok=(200, 202, 204),
                                          what="remove"))

    def move(self, src, dst, overwrite=False):
        """Rename/move a remote file or directory on the server (WebDAV MOVE).
        A *dst* ending with "/" is a folder to move into.  Raises NotFound,
        RemoteError (412 when *dst* exists and not *overwrite*)."""
        entry = self.stat(src)
        dst = str(dst)
        if dst.endswith("/"):
            dst += entry.name
        headers = {"Destination": self.url_for(dst, entry.is_dir),
                   "Overwrite": "T" if overwrite else "F"}
        self._tr.release(self._tr.request(
            "MOVE", self.url_for(entry, entry.is_dir), headers, ok=(201, 204),
            what="move"))

    def checksum(self, path):
        """Return the server's checksums of a file as {algorithm: hex}.

        Asks with HEAD + Want-Digest (RFC 3230), falls back to dCache's
        Checksums property.  Empty dict when the server has none."""
        url = self.url_for(path)
        resp = self._tr.request("HEAD", url, {"Want-Digest": "adler32,md5;q=0.5"},
                                ok=(200,), what="checksum")
        sums = _parse_digest(resp.getheader("Digest"))
        self._tr.release(resp)
        if sums:
            return sums
        return self.stat(url).checksums


def _entry_key(e):
    return e.name


def _rel_parts(base_url, url):
    """Decoded path segments of *url* below *base_url*."""
    from urllib.parse import urlsplit, unquote
    b = urlsplit(base_url).path.rstrip("/") + "/"
    p = urlsplit(url).path
    if not (p.rstrip("/") + "/").startswith(b):
        raise ProtocolError("listing left the requested tree", url)
    rest = p[len(b):].strip("/")
    return [unquote(s) for s in rest.split("/")] if rest else []


def _rel_path(base_url, url):
    return "/".join(_rel_parts(base_url, url))


def _reraise(result):
    """Rebuild an exception for a failed single-file result."""
    return TransferError(result.error or "transfer failed", result.source)


_default_client = None
_default_lock = threading.Lock()


def default_client():
    """Return the Client used by the module-level functions, creating it on
    first use from the environment (CTADATA_URL, token discovery)."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def set_default_client(client):
    """Make *client* the one the module-level functions use (None: rebuild
    from the environment on next use)."""
    global _default_client
    with _default_lock:
        _default_client = client


def list_dir(path=""):
    """Paths of the entries of a remote directory (see Client.list_dir)."""
    return default_client().list_dir(path)


def ls(path="", recursive=False):
    """Entry objects of a remote directory (see Client.ls)."""
    return default_client().ls(path, recursive)


def stat(path):
    """Entry of a remote file or directory (see Client.stat)."""
    return default_client().stat(path)


def fetch_and_save_file(path, save_to_fn=None):
    """Download one file; return bytes written (see Client.fetch_and_save_file)."""
    return default_client().fetch_and_save_file(path, save_to_fn)


def fetch_and_save_file_or_dir(path, save_to=None, recursive=False):
    """Download a file or a tree (see Client.fetch_and_save_file_or_dir)."""
    return default_client().fetch_and_save_file_or_dir(path, save_to, recursive)


def upload_file(local, remote=""):
    """Upload one file; return {"path", "status", "total_written"} (see Client.upload_file)."""
    return default_client().upload_file(local, remote)


def upload_dir(local, remote=""):
    """Upload a directory tree; return a TransferSummary (see Client.upload_dir)."""
    return default_client().upload_dir(local, remote)


def mkdir(path, parents=False):
    """Create a remote directory (see Client.mkdir)."""
    return default_client().mkdir(path, parents)


def remove(path, recursive=False):
    """Delete a remote file or tree (see Client.remove)."""
    return default_client().remove(path, recursive)


def move(src, dst, overwrite=False):
    """Move/rename on the server (see Client.move)."""
    return default_client().move(src, dst, overwrite)


def checksum(path):
    """Server-side checksums of a file (see Client.checksum)."""
    return default_client().checksum(path)


############################################################################
# CLI
############################################################################

def _human(n):
    """1234567 -> '1.2M' (binary units, like ls -h)."""
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return ("%d%s" % (n, unit)) if unit == "" else ("%.1f%s" % (n, unit))
        n /= 1024.0


def _human_bytes(n):
    h = _human(n)
    return h + "B" if h[-1:].isdigit() else h + "iB"


class _TermProgress(Progress):
    """Progress that draws one live status line on a terminal (files
    done/total, bytes, rate, ETA), at most 5 times a second."""

    def __init__(self, stream, label):
        Progress.__init__(self)
        self.stream, self.label = stream, label
        self._last = 0.0
        self._drawn = False

    def advance(self, nbytes):
        Progress.advance(self, nbytes)
        self._tick()

    def file_done(self, result):
        Progress.file_done(self, result)
        self._tick()

    def _tick(self):
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        with self.lock:
            elapsed = max(now - self.started, 1e-6)
            rate = self.done_bytes / elapsed
            left = self.total_bytes - self.done_bytes
            eta = "%d:%02d" % divmod(int(left / rate), 60) if rate > 0 and left > 0 else "-"
            line = "%s %d/%d files  %s/%s  %s/s  ETA %s" % (
                self.label, self.done_files, self.total_files,
                _human_bytes(self.done_bytes), _human_bytes(self.total_bytes),
                _human_bytes(rate), eta)
            if self.failed:
                line += "  %d failed" % self.failed
        self.stream.write("\r" + line[:200] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self):
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _add_common(parser, suppress):
    """Options every subcommand accepts (before or after its name)."""
    import argparse
    d = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("storage and connection")
    g.add_argument("--url", default=d, metavar="URL",
                   help="storage URL; remote paths are relative to it "
                        "(env CTADATA_URL; default %s)" % DEFAULT_URL)
    g.add_argument("--dev", action="store_true", default=d or False,
                   help="use the development storage %s" % DEV_URL)
    g.add_argument("-j", "--jobs", type=int, default=d, metavar="N",
                   help="parallel transfers and listings (default %d)" % _DEFAULT_JOBS)
    g.add_argument("--timeout", type=float, default=d, metavar="S",
                   help="seconds before a silent connection fails (default %d)"
                        % _DEFAULT_TIMEOUT)
    g.add_argument("--retries", type=int, default=d, metavar="N",
                   help="retries of transient failures (default %d)" % _DEFAULT_RETRIES)
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
    g = parser.add_argument_group("credentials", _CREDENTIALS_HELP)
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
exit status: 0 success, 1 a failure, 2 bad usage, 130 interrupted.
"""


def _build_parser():
    import argparse
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="ctadata", formatter_class=fmt, epilog=_EPILOG,
        description="List, download and upload files on CTAO data archives "
                    "(dCache WebDAV with bearer tokens).")
    _add_common(p, suppress=False)
    p.add_argument("--version", action="version", version="ctadata " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name, func, help_, description=None, add_help=True, aliases=()):
        sp = sub.add_parser(name, help=help_, description=description or help_,
                            formatter_class=fmt, add_help=add_help, aliases=list(aliases))
        if not add_help:
            sp.add_argument("--help", action="help", help="show this help and exit")
        _add_common(sp, suppress=True)
        sp.set_defaults(func=func)
        return sp

    sp = cmd("ls", _cmd_ls, "list a remote directory", add_help=False,
             description="List a remote directory: names one per line, directories "
                         "ending with '/'.")
    sp.add_argument("path", nargs="?", default="", help="remote path or URL")
    sp.add_argument("-l", dest="long", action="store_true",
                    help="long format: type, size, modification time (UTC), name")
    sp.add_argument("-R", "--recursive", action="store_true",
                    help="list everything below PATH (paths relative to it)")
    sp.add_argument("-h", "--human", action="store_true", help="sizes as 1.2K, 3.4M, ...")
    sp.add_argument("-U", "--unsorted", action="store_true",
                    help="print entries as the server sends them, in constant memory")
    sp.add_argument("--json", action="store_true",
                    help="one JSON list of entries (name, path, url, type, size, mtime, "
                         "etag, checksums, locality)")

    sp = cmd("stat", _cmd_stat, "show one remote file or directory")
    sp.add_argument("path", help="remote path or URL")
    sp.add_argument("--json", action="store_true", help="as a JSON object")

    sp = cmd("get", _cmd_get, "download files", description=(
        "Download a remote file, or with -r a directory tree. Files stream to "
        "NAME.part and are renamed when complete and verified; files already present "
        "with the same size are skipped."))
    sp.add_argument("source", help="remote path or URL")
    sp.add_argument("dest", nargs="?", default=None, help=(
        "local file or folder (default: current folder). With -r, the tree goes to "
        "DEST/NAME when DEST ends with '/' (or is '.'), else to DEST itself"))
    sp.add_argument("-r", "--recursive", action="store_true", help="download a directory tree")
    sp.add_argument("--overwrite", action="store_true",
                    help="download even files that are already present")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")

    sp = cmd("put", _cmd_put, "upload files", description=(
        "Upload a local file, or with -r a directory tree. A remote path ending "
        "with '/' is a folder to upload into; missing folders are created."))
    sp.add_argument("source", help="local file or folder")
    sp.add_argument("dest", nargs="?", default="", help="remote path (default: the root)")
    sp.add_argument("-r", "--recursive", action="store_true", help="upload a directory tree")
    sp.add_argument("--verify", action="store_true", default=None,
                    help="also send Content-MD5 and compare md5 (reads each file twice)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")

    sp = cmd("mkdir", _cmd_mkdir, "create a remote directory")
    sp.add_argument("path", help="remote path")
    sp.add_argument("-p", "--parents", action="store_true",
                    help="create missing parents; no error if it exists")

    sp = cmd("rm", _cmd_rm, "delete a remote file or directory")
    sp.add_argument("path", help="remote path")
    sp.add_argument("-r", "--recursive", action="store_true", help="delete a directory tree")

    sp = cmd("mv", _cmd_mv, "move or rename on the server (no data through the client)")
    sp.add_argument("source", help="remote path")
    sp.add_argument("dest", help="remote path; ending with '/' moves into that folder")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing DEST")

    sp = cmd("sum", _cmd_sum, "print the server's checksum of a file")
    sp.add_argument("path", help="remote path")
    sp.add_argument("--algo", choices=("adler32", "md5"), default=None,
                    help="only this algorithm")

    def login_options(sp):
        sp.add_argument("--issuer", default=None, metavar="URL",
                        help="OpenID provider (default %s)" % _DEFAULT_ISSUER)
        sp.add_argument("--client-id", default=None, metavar="ID",
                        help="OIDC client (default %s; with --dev %s)"
                             % (_DEFAULT_CLIENT_ID, _DEV_CLIENT_ID))
        sp.add_argument("--scope", default=_LOGIN_SCOPE,
                        help="scopes to ask for (default %(default)r; offline_access "
                             "brings the refresh token)")

    login_help = "log in with your browser (OIDC device flow) and keep the tokens"
    login_description = """\
Log in once per machine: prints an address and a code to enter in any browser,
waits for you, then keeps an access and a refresh token in ~/.config/ctadata/
(folder 0700, file 0600). Later commands refresh the access token themselves
shortly before it expires: no agent, no daemon.
The client secret, if the client has one, comes from $CTADATA_CLIENT_SECRET,
the old client's ~/.config/cta-data/secret or a prompt that does not echo;
never from the command line."""
    login_options(cmd("login", _cmd_login, login_help, description=login_description))
    cmd("logout", _cmd_logout, "forget the tokens of `ctadata login`",
        description="Delete the tokens `ctadata login` stored (the --dev ones with --dev).")
    sp = cmd("token", _cmd_token, "print the bearer token, or where it comes from",
             description="Print the bearer token that would be used (refreshed if it "
                         "was about to expire), e.g. for curl; with --explain, where "
                         "it was looked for and what was found, without the token.")
    sp.add_argument("--explain", action="store_true",
                    help="say where the token was looked for and what was found "
                         "(never prints the token)")

    # The old client's command names (no help line: they are not advertised).
    def alias(name, new, func):
        sp = sub.add_parser(name, description="Old name of `ctadata %s`." % new,
                            formatter_class=fmt)
        _add_common(sp, suppress=True)
        sp.set_defaults(func=func, alias_of=new)
        return sp

    sp = alias("start-agent", "login", _cmd_login)
    login_options(sp)
    sp.add_argument("-s", "--secret", default=None, help=argparse.SUPPRESS)
    alias("print-token", "token", _cmd_token).set_defaults(explain=False)
    alias("stop-agent", "logout", _cmd_logout)
    alias("reset-config", "logout", _cmd_logout)
    return p


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
                  token=_opt(args, "token"), auth=_opt(args, "auth"),
                  oidc_agent=_opt(args, "oidc_agent"))


def _out(text):
    sys.stdout.write(text)


def _entry_line(e, long, human, name):
    if not long:
        return name + ("/" if e.is_dir else "")
    size = "-" if e.is_dir else (_human(e.size) if human else str(e.size))
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime)) if e.mtime else "-"
    return "%s %s %s %s" % ("d" if e.is_dir else "-", size, when,
                            name + ("/" if e.is_dir else ""))


def _cmd_ls(client, args):
    import json
    if args.unsorted and not args.recursive:
        # Constant memory however big the folder: print as entries parse.
        first = True
        batch = []
        if args.json:
            _out("[")
        for e in client.iter_dir(args.path):
            if args.json:
                batch.append(("" if first else ",\n") + json.dumps(e.to_dict()))
                first = False
            else:
                batch.append(_entry_line(e, args.long, args.human, e.name) + "\n")
            if len(batch) >= 1000:
                _out("".join(batch))
                del batch[:]
        _out("".join(batch) + ("]\n" if args.json else ""))
        return 0
    if args.recursive:
        root = client.url_for(args.path, collection=True)
        rows = []
        for _top, children in client.walk(args.path):
            for e in children:
                rows.append((_rel_path(root, e.url), e))
        rows.sort(key=lambda r: r[0])
    else:
        rows = [(e.name, e) for e in client.ls(args.path)]
    if args.json:
        _out(json.dumps([e.to_dict() for _n, e in rows], indent=1) + "\n")
        return 0
    lines = [(_entry_line(e, args.long, args.human, n)) for n, e in rows]
    if args.long and lines:
        # align the size column
        parts = [ln.split(" ", 2) for ln in lines]
        width = max(len(p[1]) for p in parts)
        lines = ["%s %*s %s" % (p[0], width, p[1], p[2]) for p in parts]
    _out("".join(ln + "\n" for ln in lines))
    return 0


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


def _make_progress(args, label):
    if not _opt(args, "quiet") and sys.stderr.isatty():
        return _TermProgress(sys.stderr, label)
    return Progress()


def _report(args, verb, summary):
    """Print failures and the summary line; return the exit code."""
    if args.json:
        import json
        _out(json.dumps(summary.to_dict(), indent=1) + "\n")
    failures = summary.failures
    for r in failures[:20]:
        sys.stderr.write("ctadata: failed: %s: %s\n" % (r.dest if verb == "get" else
                                                       r.source, r.error))
    if len(failures) > 20:
        sys.stderr.write("ctadata: ... and %d more failures\n" % (len(failures) - 20))
    if not _opt(args, "quiet"):
        rate = summary.bytes / summary.seconds if summary.seconds > 0 else 0
        sys.stderr.write("%s: %d files (%d transferred, %d skipped, %d failed), %s in "
                         "%.2f s, %s/s\n" % (verb, summary.files, summary.transferred,
                                             summary.skipped, summary.failed,
                                             _human_bytes(summary.bytes),
                                             summary.seconds, _human_bytes(rate)))
    return 1 if summary.failed else 0


def _cmd_get(client, args):
    progress = _make_progress(args, "get")
    try:
        summary = client.download(args.source, args.dest, recursive=args.recursive,
                                  overwrite=args.overwrite, progress=progress,
                                  raise_on_failure=False)
    finally:
        progress.close()
    return _report(args, "get", summary)


def _cmd_put(client, args):
    progress = _make_progress(args, "put")
    try:
        summary = client.upload(args.source, args.dest, recursive=args.recursive,
                                verify=args.verify, progress=progress,
                                raise_on_failure=False)
    finally:
        progress.close()
    if not args.recursive and summary.transferred and not args.json and \
            not _opt(args, "quiet"):
        _out("%s\n" % summary.results[0].remote_path)
    return _report(args, "put", summary)


def _cmd_mkdir(client, args):
    client.mkdir(args.path, parents=args.parents)
    return 0


def _cmd_rm(client, args):
    client.remove(args.path, recursive=args.recursive)
    return 0


def _cmd_mv(client, args):
    client.move(args.source, args.dest, overwrite=args.overwrite)
    return 0


def _cmd_sum(client, args):
    sums = client.checksum(args.path)
    if args.algo:
        sums = {k: v for k, v in sums.items() if k == args.algo}
    if not sums:
        raise RemoteError("the server has no %s checksum for this file"
                          % (args.algo or "known"), client.url_for(args.path))
    for algo, value in sorted(sums.items()):
        _out("%s %s\n" % (algo, value))
    return 0


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


def _cmd_login(client, args):
    if getattr(args, "secret", None):
        raise ConfigError("the client secret is not taken from the command line: every "
                          "user of this machine can read it with `ps`",
                          hint="set $CTADATA_CLIENT_SECRET or answer the prompt")
    dev = _opt(args, "dev", False)
    issuer = args.issuer or _DEFAULT_ISSUER
    client_id = args.client_id or (_DEV_CLIENT_ID if dev else _DEFAULT_CLIENT_ID)
    secret = _client_secret(client_id)

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

    rec = client._oidc.device_login(issuer, client_id, secret, args.scope, show)
    store = client._auth.store
    try:
        store.save(rec)
    except OSError as e:
        raise ConfigError("cannot keep the tokens in %s: %s" % (store.path, e.strerror or e))
    claims = _jwt_claims(rec["access_token"]) or {}
    who = claims.get("preferred_username") or claims.get("sub")
    _note(args, "logged in%s; tokens kept in %s (%s)" % (
        " as %s" % _printable(who, 80) if who else "", store.path,
        "refreshed automatically; `ctadata logout` forgets them"
        if rec.get("refresh_token") else "no refresh token: log in again when it expires"))
    return 0


def _cmd_logout(client, args):
    store = client._auth.store
    if store.remove():
        _note(args, "logged out: removed %s" % store.path)
    else:
        _note(args, "not logged in (no %s)" % store.path)
    return 0


def _cmd_token(client, args):
    auth = client._auth
    if args.explain:
        _out("".join(line + "\n" for line in auth.explain()))
        return 0 if auth.source or auth.mode == "x509" else 1
    value = auth.header()
    if value is None:
        raise AuthError("no token found", hint=auth.hint())
    _out(value[len("Bearer "):] + "\n")
    return 0


def _setup_logging(args):
    import logging
    logger = logging.getLogger("ctadata")
    for h in [h for h in logger.handlers if getattr(h, "_ctadata_cli", False)]:
        logger.removeHandler(h)  # main() may run many times in one process
    handler = logging.StreamHandler(sys.stderr)
    handler._ctadata_cli = True
    handler.setFormatter(logging.Formatter("ctadata: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    verbose = _opt(args, "verbose", 0)
    logger.setLevel(logging.DEBUG if verbose else
                    logging.ERROR if _opt(args, "quiet") else logging.WARNING)


def main(argv=None):
    """Run the command line; return the exit status (0 ok, 1 failure,
    2 usage, 130 interrupted).  Never calls sys.exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        # Fast path: no argparse, no network modules (start-up time matters
        # on login nodes and in scripts that call us in a loop).
        sys.stdout.write("ctadata %s\n" % __version__)
        return 0
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    _setup_logging(args)
    if getattr(args, "alias_of", None):
        sys.stderr.write("ctadata: note: `%s` is now `ctadata %s`\n"
                         % (args.command, args.alias_of))
    try:
        client = _client_from_args(args)
        return args.func(client, args) or 0
    except KeyboardInterrupt:
        if args.command == "get":
            sys.stderr.write("\nctadata: interrupted (partial downloads kept as .part "
                             "files; run the same command again to resume)\n")
        else:
            sys.stderr.write("\nctadata: interrupted\n")
        return 130
    except CtadataError as e:
        sys.stderr.write("ctadata: error: %s\n" % e)
        return e.exit_code
    except BrokenPipeError:
        # stdout closed early (e.g. `ctadata ls | head`): not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


############################################################################
# Entry point
############################################################################

# `from ctadata import direct` and `ctadata.direct.upload_file(...)` come from
# the old client's README; `ctadata.api` from its service-mode era.
direct = api = sys.modules[__name__]


def _entry():
    """Console-script and zipapp entry point (zipapp's generated __main__.py
    drops the return value, hence this wrapper)."""
    sys.exit(main())


if __name__ == "__main__":
    _entry()
