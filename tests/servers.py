"""Throw-away real WebDAV / HTTP servers for the ctadata test-suite (stdlib only).

Servers
-------
* ``start_nginx(root, token, workdir)``            nginx + http_dav + dav-ext (PROPFIND/OPTIONS)
* ``start_nginx(..., tls=True)``                   the same over HTTPS (self-signed CA in workdir)
* ``start_nginx(..., static_only=True)``           plain static GET/HEAD server, *no* token required
* ``start_nginx(..., auth_url=URL)``               token checked by ``auth_request`` against URL
                                                   (e.g. an OIDC userinfo endpoint) instead of ``token``
* ``start_nginx(..., tls=True, client_certs=True)`` also accepts a client certificate signed by
                                                   the test CA instead of the token
                                                   (``make_client_cert``)
* ``start_nginx(..., limit_rate="100k")``          slow downloads (bytes/s per connection)
* ``start_apache(root, token, workdir)``           Apache httpd + mod_dav + mod_dav_fs
* ``start_xrootd(root, workdir, macaroons=...)``   XRootD 5 (XrdHttp door over https, HTTP-TPC,
                                                   macaroons); see "XRootD" below

Every server listens on 127.0.0.1 on an ephemeral port, runs in the foreground
as a child of the test process (own process group) and keeps all its
config/pid/log/temp/lock files inside ``workdir``.  Nothing in /etc, no system
service and no fixed port is used.  ``RunningServer.stop()`` (also called from
an ``atexit`` hook) kills the whole process group; on Linux the servers also
get SIGTERM from the kernel if the test process dies (PR_SET_PDEATHSIG), so
even a SIGKILLed pytest leaves nothing running.  Start-up takes ~20-40 ms
(TLS: ~100 ms incl. key generation).

All DAV servers require ``Authorization: Bearer <token>`` on *every* request
(OPTIONS included); anything else gets **401** with
``WWW-Authenticate: Bearer realm="ctadata"``.

Apache and root
---------------
Apache refuses to run its workers as root.  When the tests run as root, the
Apache workers run as the owner of ``root`` if that is not root, else as
``www-data`` (falling back to ``daemon``/``nobody``).  ``start_apache`` then
puts a POSIX ACL (access + *default*, via ``os.setxattr``) on ``root`` that
gives that user rwx, so everything created below ``root`` later -- by the test
process (as root) or by Apache -- stays readable/writable by both sides.  If
the file system has no ACL support it falls back to chown-ing ``root`` to the
Apache user; files the tests create afterwards then need
``server.grant_access(path)`` (a no-op for nginx and when not running as root).
Every ancestor directory of ``root`` must be traversable by that user
(pytest's own ``/tmp/pytest-of-root`` is 0700, so conftest uses a 0755
``tempfile.mkdtemp`` directory instead).  Files written by Apache end up owned
by that user (mode 0644 + ACL); root can of course read/modify/delete them.
nginx, when started as root, runs its workers as root (``user root;``) so it
can write anywhere below ``root``.  When the tests do not run as root, both
servers simply run as the current user.

Server behaviour observed with nginx 1.22.1 + dav-ext 3.0.0 and Apache 2.4.x
(Debian 12) -- facts for the client author.  The ones marked [t] are asserted
by tests/test_servers.py (test_quirks_*), so they stay true.
--------------------------------------------------------------------------------
Both:
  * [t] no Authorization, a wrong token or another scheme -> 401 with
    ``WWW-Authenticate: Bearer realm="ctadata"``.  The connection stays
    usable after a 401 (even after a PUT whose body was ignored), and
    ``Expect: 100-continue`` without/with a wrong token gets the 401 *before*
    the body is sent (with the token: ``100 Continue``).
  * [t] PUT -> 201 new, 204 overwrite.  DELETE file -> 204, missing -> 404.
    DELETE "dir/" removes recursively -> 204 (Depth: 0 on a collection -> 400).
  * [t] MKCOL "dir/" -> 201, existing -> 405, missing parent -> 409.
    MKCOL with a request body -> 415.
  * [t] PROPFIND Depth 0 / 1 -> 207, missing -> 404, **Depth: infinity -> 403**
    on both (so "list recursively" = walk with Depth 1).
  * [t] hrefs in multistatus are absolute *paths* (no scheme/host),
    percent-encoded (space %20, % %25, # %23, ? %3F, UTF-8 bytes %XX);
    nginx uses UPPER-case hex, Apache lower-case -> unquote before comparing.
    Collections are listed with a trailing "/" (except see nginx below).
  * [t] Existing destination + "Overwrite: F" on MOVE/COPY -> 412.
  * GET with "Range: bytes=1-2" -> 206.  GET on a collection: see below.
  * The server's "self" response is the first <response> in a Depth-1 listing.
  * 200 MB PUT/GET over loopback: ~0.3-0.7 s each.

nginx (http_dav + dav-ext):
  * [t] PUT creates missing parent directories (create_full_put_path on) -> 201.
  * [t] MKCOL "dir" (no trailing slash) -> 409.   PUT "x/" -> 409.
    PUT onto an existing collection name (no slash) -> 409.
  * [t] DELETE "dir" (collection, no trailing slash) -> 409.
    DELETE "file/" -> 409.
  * [t] PROPFIND on a collection *without* trailing slash -> 207, and the
    self href is then also without slash ("/dir"), children are "/dir/x".
    PROPFIND "file/" -> 207 with href "/file/" (!).
  * [t] PROPFIND without a Depth header is treated as Depth 0 (Apache: as
    infinity -> 403).
  * Props returned: displayname, getcontentlength (files only),
    getlastmodified, resourcetype, lockdiscovery, supportedlock.
    NO getetag, NO creationdate, NO getcontenttype.  A <prop> request body
    is ignored (always the same props).
  * [t] MOVE/COPY of a *file* -> **204 even when the destination is new**.
    MOVE/COPY of a collection needs a trailing slash on source AND
    Destination: "dir"->"x" 400, "dir/"->"x" 409, "dir/"->"x/" 201
    (201 also when it overwrote).  COPY ignores "Depth: 0" (copies all).
  * [t] MOVE of a file into a missing parent creates the parents (204);
    COPY of a file into a missing parent -> **500**.
  * [t] Destination: absolute URL or plain path accepted; the host part must
    equal the Host header's host (port ignored), else 400.
  * %2F in a name is decoded to "/" (PUT "a%2Fb" creates a/b).
  * [t] GET/HEAD on "dir" -> 301 (absolute Location with slash), "dir/" -> 403.
  * OPTIONS -> 200, "DAV: 1", Allow: GET,HEAD,PUT,DELETE,MKCOL,COPY,MOVE,
    PROPFIND,OPTIONS,LOCK,UNLOCK.  HEAD/GET have ETag + Last-Modified.

Apache (mod_dav + mod_dav_fs; mod_dir loaded, i.e. DirectorySlash On, as on
most real Apache servers):
  * [t] PUT into a missing parent -> 409 (parents are NOT created; MKCOL
    each level first).
  * [t] ANY method on a collection URL without trailing slash (GET, HEAD,
    PUT, PROPFIND, DELETE, MOVE, COPY, ...) -> **301** to the slash URL
    (absolute Location, e.g. http://127.0.0.1:PORT/dir/).  Clients must not
    blindly follow it for non-GET methods; append "/" themselves.
  * [t] MKCOL "dir" (no slash) -> 201 as well.
  * PUT "x/" (trailing slash, not existing) -> 201 and creates a *file* "x".
  * PROPFIND / DELETE "file/" -> 400.
  * [t] GET/HEAD on "dir/" -> 404 (no index, no autoindex).
  * [t] Destination must be an absolute URL: a plain path -> 400.
    (The host is not checked.)
  * [t] MOVE/COPY -> 201 new, 204 overwritten -- files and collections,
    with or without trailing slash on the Destination.  COPY "Depth: 0"
    copies only the collection itself.
  * [t] Destination parent missing: COPY -> 409, but MOVE -> **500**.
  * Props (allprop): resourcetype, creationdate, getcontentlength (files),
    getlastmodified, getetag (weak, W/"..."), executable, supportedlock,
    lockdiscovery.  No displayname, no getcontenttype (mod_mime not loaded).
    Unknown requested props come back in a separate 404 propstat.
  * %2F in a name -> 404 (AllowEncodedSlashes Off).
  * OPTIONS -> 200, two DAV headers ("1,2" and
    "<http://apache.org/dav/propset/fs/1>"), an Allow list that depends on
    the resource (no PUT/MKCOL on an existing collection).

See the constants/behaviour tested in tests/test_servers.py for exact proof.

XRootD (5.5.3, Debian 12: xrootd-server, -server-plugins, -client)
-------------------------------------------------------------------
Two instances per session (conftest ``xrootd_server``, ``xrootd_open_server``),
sharing one test CA so that each verifies the other in third-party copies:
https on an ephemeral port (XrdHttp) plus the xroot protocol on another
(``server.xroot_url``).  XRootD cannot bind one address: it listens on all,
and ``xrd.allow host localhost`` refuses other peers.  It refuses to run as
root: as root it runs as ``xrootd`` (else ``daemon``), privileges dropped in
preexec_fn (after which the parent-death signal is set again); the data
folder gets the same default ACL as Apache's.  Start-up ~0.15 s.

How clients authenticate (the choice for the suite):
  * ``xrootd_server`` ("xrootd"): ``ofs.authorize`` + an authdb that grants
    everything to the test client certificate only (``server.client_cert``;
    XrdHttp names it by subject hash), libXrdMacaroons as authlib and
    exthandler, ``http.header2cgi Authorization authz``.  Without a valid
    macaroon every request gets **403** (never 401).  ``server.token`` is a
    macaroon the server issued at start-up to that certificate (path "/",
    every activity, 23 h): ctadata uses it as any bearer token.  This is the
    instance of the ``dav`` fixture's "xrootd" parameter.
    ``mint_macaroon(server, path, caveats)`` asks for more.
  * ``xrootd_open_server`` ("xrootd-open"): no authorization at all
    (anything goes, a token is ignored): the peer for copies.

Facts for the client author (pinned by tests/test_xrootd.py, test_quirk_*;
the full name table is in /work/notes/xrootd-names.md):
  * PROPFIND hrefs are NOT percent-encoded (space, #, ?, %, unicode, a
    literal %20 all as they are; XML-escaped).  The self href is the request
    path decoded, with a slash only if the request had one.  Depth infinity
    is answered like Depth 0 (the folder alone, no error: a client that
    relies on it lists nothing); the request body is ignored (all properties
    always: getcontentlength, getlastmodified, resourcetype, iscollection,
    executable).  No getetag.
  * A request path is percent-decoded once; then "?" (even from %3F) starts
    XRootD's opaque data: a name with "?" cannot be stored or addressed
    (PUT "q%3Fx" stores "q").  A raw space ends the request target, a raw
    "%" is mis-decoded: percent-encode everything but unreserved and "/".
  * MOVE: Destination must be a full URL and is NOT percent-decoded (send
    the path unencoded, UTF-8); ``Overwrite: F`` is ignored (replaces).
  * PUT -> 200 (new or replaced) and creates parents; MKCOL creates parents
    and answers 201 for an existing folder; DELETE of a folder is rmdir
    (500 "directory not empty"); GET of a folder -> 200 HTML listing.
  * ``Range: bytes=N-`` -> 206 with NO body (``Content-Range: bytes
    N--1/SIZE``); ``bytes=N-M`` works; If-Range ignored; no ETag or
    Last-Modified.  ``Want-Digest: adler32`` -> ``Digest: adler32=...`` on
    GET/HEAD (never on PUT answers).
  * Server bug (XRootD < 5.8.3): a checksum not yet stored is computed in a
    job; a GET that waits for it fails now and then ("404 Could not run read
    request." or a hang) and, repeated, crashes the server; asking for the
    checksum (HEAD + Want-Digest) of a file just written crashes it within
    tens to hundreds of uploads; HEADs in parallel hang now and then.  A
    Want-Digest also lingers in the server's recycled request objects: a
    later GET *without* one may come back with a Digest of something else.
    So ctadata (_Quirks.digests) asks XRootD < 5.8.3 for no checksum in
    get/put/cat and ignores Digests it did not ask for; ``ctadata sum``
    asks (one HEAD: reliable).
"""

import atexit
import os
import pwd
import grp
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

__all__ = [
    "RunningServer",
    "ServerStartError",
    "start_nginx",
    "start_apache",
    "have_nginx",
    "have_apache",
    "nginx_missing_reason",
    "apache_missing_reason",
    "make_test_ca",
    "make_client_cert",
    "start_xrootd",
    "have_xrootd",
    "xrootd_missing_reason",
    "xrootd_ca",
    "mint_macaroon",
]

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 10.0  # seconds, per attempt
START_ATTEMPTS = 5  # fresh port per attempt
STOP_TIMEOUT = 10.0

PathLike = Union[str, "os.PathLike[str]"]


class ServerStartError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------

_RUNNING: "set[RunningServer]" = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all() -> None:
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for srv in servers:
        try:
            srv.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_stop_all)


def _killpg(pgid: int, sig: int) -> bool:
    """Send sig to a process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return False


def _terminate(proc: "subprocess.Popen[bytes]", timeout: float = STOP_TIMEOUT) -> None:
    """Terminate proc and everything in its process group (it is a session leader)."""
    pgid = proc.pid
    if proc.poll() is None:
        _killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(pgid, signal.SIGKILL)
            proc.wait(timeout)
    # leftover workers (parent gone, group still alive)?  Give them a moment
    # to notice the master's SIGTERM, then kill the rest of the group.
    deadline = time.monotonic() + 2.0
    while _killpg(pgid, 0):
        if time.monotonic() > deadline:
            _killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
            if not _killpg(pgid, 0):
                break
            deadline = time.monotonic() + 2.0  # keep trying SIGKILL
        time.sleep(0.02)


class RunningServer:
    """A started server.  ``url`` has no trailing slash and maps to ``root``."""

    def __init__(
        self,
        name: str,
        url: str,
        root: Path,
        token: str,
        proc: "subprocess.Popen[bytes]",
        workdir: Path,
        *,
        ca_file: Optional[str] = None,
        run_as: Optional[pwd.struct_passwd] = None,
        requires_token: bool = True,
        log_files: Optional[List[Path]] = None,
    ) -> None:
        self.name = name
        self.url = url
        self.root = root
        self.token = token
        self.ca_file = ca_file
        self.workdir = workdir
        self.proc = proc
        #: False for the static server (it ignores Authorization)
        self.requires_token = requires_token
        #: pwd entry of the user the workers run as when we are root and the
        #: server cannot run as root (Apache); None otherwise
        self.run_as = run_as
        self.log_files = list(log_files or [])
        self._stopped = False
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    # -- convenience -----------------------------------------------------
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def auth_header(self) -> Dict[str, str]:
        return {"Authorization": "Bearer " + self.token}

    def alive(self) -> bool:
        return not self._stopped and self.proc.poll() is None

    def grant_access(self, path: PathLike) -> None:
        """Make ``path`` (recursively) accessible to the server's workers.

        Only does something for Apache when the tests run as root *and* the
        file system lacked POSIX ACL support; otherwise a no-op.
        """
        if self.run_as is None:
            return
        _chown_tree(Path(path), self.run_as.pw_uid, self.run_as.pw_gid)

    def logs(self) -> str:
        out = []
        for f in self.log_files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                out.append("==> %s <==\n%s" % (f, text[-20000:]))
        return "\n".join(out)

    # -- lifecycle -------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            _terminate(self.proc)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(self)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "<RunningServer %s %s pid=%s root=%s>" % (
            self.name,
            self.url,
            self.proc.pid,
            self.root,
        )


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _which(names: List[str], extra_dirs: List[str]) -> Optional[str]:
    for n in names:
        if os.sep in n:
            if os.path.isfile(n) and os.access(n, os.X_OK):
                return n
            continue
        p = shutil.which(n)
        if p:
            return p
        for d in extra_dirs:
            c = os.path.join(d, n)
            if os.path.isfile(c) and os.access(c, os.X_OK):
                return c
    return None


_SBIN = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"]

_cache: Dict[str, object] = {}


def _cached(key: str, fn):  # type: ignore[no-untyped-def]
    if key not in _cache:
        _cache[key] = fn()
    return _cache[key]


def _run_quiet(argv: List[str]) -> str:
    try:
        r = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.decode("utf-8", "replace")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _conf_quote(s: Union[str, Path]) -> str:
    """Double-quote a path for nginx/apache config files."""
    s = str(s)
    if any(c in s for c in '"\\\n\r$'):
        raise ServerStartError("unsupported character in path for server config: %r" % s)
    return '"%s"' % s


def _wait_ready(
    proc: "subprocess.Popen[bytes]", port: int, pidfile: Path, deadline: float
) -> Optional[str]:
    """Wait until proc wrote its pid file and accepts connections.

    Returns None when ready, "exited" if the process died, "timeout" otherwise.
    The pid file is written by nginx/apache only after the listening sockets
    are bound, so an unrelated process that grabbed "our" port in the
    meantime is not mistaken for our server.
    """
    while True:
        if proc.poll() is not None:
            return "exited"
        try:
            ok_pid = pidfile.read_text().strip() == str(proc.pid)
        except OSError:
            ok_pid = False
        if ok_pid and _can_connect(port):
            if proc.poll() is None:
                return None
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.01)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _launch(
    name: str,
    argv: List[str],
    port: int,
    pidfile: Path,
    logs: List[Path],
    stdio_log: Path,
    preexec: Optional[Callable[[], None]] = None,
    cwd: Optional[str] = None,
) -> "tuple[Optional[subprocess.Popen[bytes]], str]":
    """Start one attempt; returns (proc, "") when ready, else (None, why).
    *preexec* replaces the default preexec_fn (_parent_death_signal)."""
    try:
        pidfile.unlink()
    except FileNotFoundError:
        pass
    with open(stdio_log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group -> reliable kill
            close_fds=True,
            preexec_fn=preexec or _parent_death_signal(),
            cwd=cwd,
        )
    why = _wait_ready(proc, port, pidfile, time.monotonic() + STARTUP_TIMEOUT)
    if why is None:
        return proc, ""
    _terminate(proc, timeout=5)
    text = "\n".join("--- %s:\n%s" % (p.name, _tail(p)) for p in logs + [stdio_log])
    return None, "%s %s (rc=%s) on port %d:\n%s" % (name, why, proc.returncode, port, text)


def _parent_death_signal() -> Optional[Callable[[], None]]:
    """preexec_fn: have the kernel SIGTERM the server when we die (Linux).

    Safety net for a test run that is SIGKILLed (atexit does not run then).
    The server master handles SIGTERM as a normal fast shutdown and takes
    its workers down with it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def _addr_in_use(msg: str) -> bool:
    m = msg.lower()
    return "address already in use" in m or "could not bind" in m or "98:" in m


# --------------------------------------------------------------------------
# POSIX ACLs through os.setxattr (no setfacl needed)
# --------------------------------------------------------------------------

_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def _acl_blob(extra_uid: int, mode: int) -> bytes:
    entries = [
        (_ACL_USER_OBJ, (mode >> 6) & 7, _ACL_UNDEFINED_ID),
        (_ACL_USER, 7, extra_uid),
        (_ACL_GROUP_OBJ, (mode >> 3) & 7, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 7, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, mode & 7, _ACL_UNDEFINED_ID),
    ]
    entries.sort()
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _grant_acl(path: Path, uid: int) -> bool:
    """Give uid rwx on directory path, inherited (default ACL) by new entries."""
    if not hasattr(os, "setxattr"):
        return False
    blob = _acl_blob(uid, 0o755)
    try:
        os.setxattr(str(path), "system.posix_acl_access", blob)
        os.setxattr(str(path), "system.posix_acl_default", blob)
    except OSError:
        return False
    return True


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    try:
        os.chown(str(path), uid, gid, follow_symlinks=False)
    except OSError:
        pass
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(str(path)):
            for n in dirnames + filenames:
                try:
                    os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)
                except OSError:
                    pass


def _check_access_as(user: pwd.struct_passwd, rw_dirs: List[Path]) -> Optional[str]:
    """Check (in a forked child running as user) that user can rwx the given dirs.

    Returns None if fine, else the offending paths.  (fork, not exec: the
    Python binary itself may live somewhere that user cannot read.)
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        code = 2
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            bad = [str(p) for p in rw_dirs
                   if not os.access(str(p), os.R_OK | os.W_OK | os.X_OK)]
            os.write(w, "\n".join(bad).encode())
            code = 1 if bad else 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    return b"".join(chunks).decode(errors="replace").strip() or "check failed (%d)" % status


# --------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------

_NGINX_MODULE_DIRS = [
    "/usr/lib/nginx/modules",
    "/usr/lib64/nginx/modules",
    "/usr/share/nginx/modules",
    "/usr/local/nginx/modules",
    "/usr/local/lib/nginx/modules",
    "/etc/nginx/modules",
]


def _server_binary(env_var: str, names: List[str]) -> Optional[str]:
    """$env_var if set (and executable), else the first of *names* found."""
    env = os.environ.get(env_var)
    if env:
        return env if os.access(env, os.X_OK) else None
    return _which(names, _SBIN)


def _nginx_binary() -> Optional[str]:
    return _server_binary("CTADATA_TEST_NGINX", ["nginx"])


def _nginx_configure() -> str:
    def get() -> str:
        b = _nginx_binary()
        return _run_quiet([b, "-V"]) if b else ""

    return _cached("nginx-V", get)  # type: ignore[return-value]


def _nginx_dav_ext_module() -> Optional[str]:
    """Path of the dynamic dav-ext module, "" if compiled in, None if absent."""
    conf = _nginx_configure()
    if "dav-ext" in conf and "--add-module" in conf:
        # statically compiled (e.g. custom builds)
        for tok in conf.split():
            if tok.startswith("--add-module=") and "dav-ext" in tok:
                return ""
    dirs = list(_NGINX_MODULE_DIRS)
    for tok in conf.split():
        if tok.startswith("--modules-path="):
            dirs.insert(0, tok.split("=", 1)[1])
    for d in dirs:
        p = os.path.join(d, "ngx_http_dav_ext_module.so")
        if os.path.isfile(p):
            return p
    return None


def nginx_missing_reason(*, static_only: bool = False, tls: bool = False,
                         auth_request: bool = False) -> Optional[str]:
    """None if nginx (with what the variant needs) is usable, else why not."""
    if not _nginx_binary():
        return "nginx binary not found (install nginx / nginx-light)"
    conf = _nginx_configure()
    if not conf:
        return "`nginx -V` failed"
    if not static_only:
        if "--with-http_dav_module" not in conf:
            return "nginx is built without http_dav_module"
        if _nginx_dav_ext_module() is None:
            return "nginx dav-ext module not found (install libnginx-mod-http-dav-ext)"
    if tls:
        if "--with-http_ssl_module" not in conf:
            return "nginx is built without http_ssl_module"
        if not shutil.which("openssl"):
            return "openssl CLI not found"
    if auth_request:
        if "--with-http_auth_request_module" not in conf:
            return "nginx is built without http_auth_request_module"
        if "--without-http_proxy_module" in conf:
            return "nginx is built without http_proxy_module"
    return None


def have_nginx(*, static_only: bool = False, tls: bool = False) -> bool:
    return nginx_missing_reason(static_only=static_only, tls=tls) is None


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = ctadata test
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def make_test_ca(directory: PathLike) -> "tuple[str, str, str]":
    """Create (ca.pem, server.pem, server.key) in directory with the openssl CLI.

    EC P-256 keys (fast to generate); the server certificate is valid for
    IP 127.0.0.1 and DNS localhost and satisfies Python 3.13's
    VERIFY_X509_STRICT (key identifiers, critical basicConstraints/keyUsage).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca.key"
    crt, key, csr = d / "server.pem", d / "server.key", d / "server.csr"
    cnf = d / "openssl.cnf"
    if ca.exists() and crt.exists() and key.exists():
        return str(ca), str(crt), str(key)
    cnf.write_text(_OPENSSL_CNF)
    env = dict(os.environ, OPENSSL_CONF=str(cnf))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cmds = [
        ["openssl", "req", "-x509", "-config", str(cnf), "-extensions", "v3_ca"]
        + ec
        + ["-keyout", str(ca_key), "-out", str(ca), "-days", "30",
           "-subj", "/CN=ctadata test CA"],
        ["openssl", "req", "-new", "-config", str(cnf)]
        + ec
        + ["-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca),
         "-CAkey", str(ca_key), "-set_serial", "0x" + secrets.token_hex(8),
         "-days", "30", "-sha256", "-extfile", str(cnf), "-extensions", "server",
         "-out", str(crt)],
    ]
    for argv in cmds:
        r = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env,
        )
        if r.returncode != 0:
            raise ServerStartError(
                "openssl failed: %s\n%s" % (" ".join(argv), r.stdout.decode(errors="replace"))
            )
    os.chmod(str(key), 0o600)
    return str(ca), str(crt), str(key)


_CLIENT_EXT = """\
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def make_client_cert(ca_dir: PathLike, out: PathLike, cn: str = "ctadata test user") -> str:
    """Sign a client certificate with the CA ``make_test_ca(ca_dir)`` made and
    write certificate + key into one PEM file ``out`` (mode 0600, laid out
    like an X.509 proxy file); return its path."""
    d = Path(ca_dir)
    ca, _, _ = make_test_ca(d)
    out = Path(out)
    key, csr, crt = out.with_suffix(".key"), out.with_suffix(".csr"), out.with_suffix(".crt")
    ext = out.with_suffix(".ext")
    ext.write_text(_CLIENT_EXT)
    env = dict(os.environ, OPENSSL_CONF=str(d / "openssl.cnf"))
    cmds = [
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=" + cn],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", ca, "-CAkey", str(d / "ca.key"),
         "-set_serial", "0x" + secrets.token_hex(8), "-days", "30", "-sha256",
         "-extfile", str(ext), "-extensions", "client", "-out", str(crt)],
    ]
    for argv in cmds:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env)
        if r.returncode != 0:
            raise ServerStartError(
                "openssl failed: %s\n%s" % (" ".join(argv), r.stdout.decode(errors="replace")))
    fd = os.open(str(out), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(crt.read_bytes() + key.read_bytes())
    for p in (key, csr, crt, ext):
        p.unlink()
    return str(out)


def _nginx_conf(
    *,
    port: int,
    root: Path,
    token: str,
    workdir: Path,
    static_only: bool,
    tls: Optional["tuple[str, str]"],
    auth_url: Optional[str] = None,
    client_ca: Optional[str] = None,
    limit_rate: Optional[str] = None,
    redirect_get: Optional[str] = None,
) -> str:
    q = _conf_quote
    conf = _nginx_configure()
    tmp = workdir / "tmp"
    lines: List[str] = ["# generated by tests/servers.py -- do not edit"]
    module = _nginx_dav_ext_module()
    if not static_only and module:
        lines.append("load_module %s;" % q(module))
    lines += [
        "daemon off;",
        "master_process on;",
        "worker_processes 2;",
        "pid %s;" % q(workdir / "nginx.pid"),
        "lock_file %s;" % q(workdir / "nginx.lock"),
        "error_log %s warn;" % q(workdir / "error.log"),
    ]
    if _is_root():
        # workers must be able to write everywhere below root (owned by root)
        lines.append("user root root;")
    lines += [
        "events { worker_connections 1024; }",
        "http {",
        "    access_log off;",
        "    server_tokens off;",
        "    default_type application/octet-stream;",
        "    sendfile on;",
        "    tcp_nopush on;",
        "    tcp_nodelay on;",
        "    keepalive_requests 100000;",
        "    keepalive_timeout 60s;",
        "    client_max_body_size 0;",
        "    client_body_buffer_size 1m;",
        "    output_buffers 2 1m;",
        "    client_body_temp_path %s;" % q(tmp / "body"),
    ]
    for mod, directive in (
        ("proxy", "proxy_temp_path"),
        ("fastcgi", "fastcgi_temp_path"),
        ("uwsgi", "uwsgi_temp_path"),
        ("scgi", "scgi_temp_path"),
    ):
        if "--without-http_%s_module" % mod not in conf:
            lines.append("    %s %s;" % (directive, q(tmp / mod)))
    if not static_only and client_ca:
        lines += [
            '    map "$ssl_client_verify|$http_authorization" $ctadata_authorized {',
            "        default 0;",
            '        "~^SUCCESS\\|" 1;',
            '        "~\\|Bearer %s$" 1;' % token,
            "    }",
        ]
    elif not static_only:
        lines += [
            "    map $http_authorization $ctadata_authorized {",
            "        default 0;",
            '        "Bearer %s" 1;' % token,
            "    }",
        ]
    if not static_only:
        lines += [
            "    map $status $ctadata_www_authenticate {",
            "        default \"\";",
            "        401 'Bearer realm=\"ctadata\"';",
            "    }",
        ]
    lines += [
        "    server {",
        "        listen %s:%d%s;" % (LOOPBACK, port, " ssl" if tls else ""),
        "        server_name localhost 127.0.0.1;",
        "        root %s;" % q(root),
        "        autoindex off;",
    ]
    if tls:
        lines += [
            "        ssl_certificate %s;" % q(tls[0]),
            "        ssl_certificate_key %s;" % q(tls[1]),
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            "        ssl_session_cache shared:ctadata:1m;",
        ]
        if client_ca:
            lines += [
                "        ssl_client_certificate %s;" % q(client_ca),
                "        ssl_verify_client optional;",
            ]
    if limit_rate:
        lines.append("        limit_rate %s;" % limit_rate)
    if static_only:
        lines += [
            "        if ($request_method !~ ^(GET|HEAD)$) { return 405; }",
            "        location / { }",
        ]
    else:
        lines.append("        add_header WWW-Authenticate $ctadata_www_authenticate always;")
        if auth_url:
            # The token is checked by the URL (200: valid, 401: not), e.g. an
            # OIDC provider's userinfo endpoint, for every request.
            lines += [
                "        auth_request /_ctadata_auth;",
                "        location = /_ctadata_auth {",
                "            internal;",
                "            proxy_pass %s;" % auth_url,
                "            proxy_method GET;",
                "            proxy_pass_request_body off;",
                '            proxy_set_header Content-Length "";',
                "        }",
            ]
        else:
            lines.append("        if ($ctadata_authorized = 0) { return 401; }")
        lines.append("        location / {")
        if redirect_get:
            # a dCache door: a GET is answered with a 307 to a pool
            lines.append("            if ($request_method = GET) { return 307 %s$request_uri; }"
                         % redirect_get.rstrip("/"))
        lines += [
            "            dav_methods PUT DELETE MKCOL COPY MOVE;",
            "            dav_ext_methods PROPFIND OPTIONS;",
            "            dav_access user:rw group:rw all:r;",
            "            create_full_put_path on;",
            "            min_delete_depth 0;",
            "        }",
        ]
    lines += ["    }", "}", ""]
    return "\n".join(lines)


def _check_token(token: str) -> None:
    if not token or any(c in token for c in ' "\'\\\n\r\t$;{}%'):
        raise ValueError("token must be non-empty and URL-safe (use secrets.token_urlsafe)")


def start_nginx(
    root: PathLike,
    token: str,
    workdir: PathLike,
    *,
    static_only: bool = False,
    tls: bool = False,
    auth_url: Optional[str] = None,
    client_certs: bool = False,
    limit_rate: Optional[str] = None,
    redirect_get: Optional[str] = None,
) -> RunningServer:
    """Start nginx serving ``root``; see the module docstring for the variants.

    ``static_only``: plain GET/HEAD file server, no token check (``token`` is
    kept on the returned object but not enforced).
    ``tls``: WebDAV over https with a fresh CA in ``workdir``
    (``RunningServer.ca_file``; the CA key is next to it, for
    ``make_client_cert(Path(ca_file).parent, ...)``).
    ``auth_url``: instead of comparing with ``token``, ask this URL (nginx
    ``auth_request``, the client's Authorization forwarded) for every request.
    ``client_certs`` (with ``tls``): a client certificate signed by the test CA
    is accepted instead of the token.
    ``limit_rate``: nginx ``limit_rate`` for responses (e.g. ``"100k"``).
    ``redirect_get``: answer every authorized GET with a 307 to this base URL
    + the request URI, as a dCache door sends a GET to a pool (the other
    methods are served here).
    """
    reason = nginx_missing_reason(static_only=static_only, tls=tls,
                                  auth_request=auth_url is not None)
    if reason:
        raise ServerStartError(reason)
    _check_token(token)
    root = Path(root).resolve()
    workdir = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    if os.stat(str(root)).st_dev != os.stat(str(workdir)).st_dev:
        # works, but PUT then copies the body instead of renaming it
        pass
    tls_files = None
    ca_file = None
    if tls:
        ca_file, crt, key = make_test_ca(workdir / "tls")
        tls_files = (crt, key)
    if client_certs and not tls:
        raise ValueError("client_certs needs tls=True")
    name = "nginx-static" if static_only else ("nginx-tls" if tls else "nginx")
    conf_path = workdir / "nginx.conf"
    pidfile = workdir / "nginx.pid"
    errlog = workdir / "error.log"
    stdio = workdir / "stdout.log"
    errors = []
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        conf_path.write_text(
            _nginx_conf(port=port, root=root, token=token, workdir=workdir,
                        static_only=static_only, tls=tls_files, auth_url=auth_url,
                        client_ca=ca_file if client_certs else None,
                        limit_rate=limit_rate, redirect_get=redirect_get)
        )
        argv = [
            _nginx_binary() or "nginx",
            "-p", str(workdir) + "/",
            "-c", str(conf_path),
            "-e", str(errlog),  # nginx >= 1.19.5: no write to the default log
        ]
        proc, why = _launch(name, argv, port, pidfile, [errlog], stdio)
        if proc is not None:
            scheme = "https" if tls else "http"
            return RunningServer(
                name, "%s://%s:%d" % (scheme, LOOPBACK, port), root, token, proc, workdir,
                ca_file=ca_file, requires_token=not static_only,
                log_files=[errlog, stdio],
            )
        errors.append(why)
        if not _addr_in_use(why):
            break
    raise ServerStartError("could not start %s:\n%s" % (name, "\n\n".join(errors)))


# --------------------------------------------------------------------------
# Apache httpd
# --------------------------------------------------------------------------

_APACHE_MODULE_DIRS = [
    "/usr/lib/apache2/modules",
    "/usr/lib64/httpd/modules",
    "/usr/lib/httpd/modules",
    "/usr/libexec/apache2",
    "/usr/lib64/apache2/modules",
    "/usr/lib/apache2",
    "/usr/local/apache2/modules",
    "/opt/homebrew/lib/httpd/modules",
    "/usr/local/lib/httpd/modules",
]


def _apache_binary() -> Optional[str]:
    return _server_binary("CTADATA_TEST_APACHE", ["apache2", "httpd"])


def _apache_compiled_in() -> "set[str]":
    def get() -> "set[str]":
        b = _apache_binary()
        text = _run_quiet([b, "-l"]) if b else ""
        return {ln.strip() for ln in text.splitlines() if ln.strip().endswith(".c")}

    return _cached("apache-l", get)  # type: ignore[return-value]


def _apache_module_dir() -> Optional[str]:
    env = os.environ.get("CTADATA_TEST_APACHE_MODULES")
    dirs = [env] if env else _APACHE_MODULE_DIRS
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "mod_dav_fs.so")):
            return d
    return None


# (module name in LoadModule, file/compiled-in name, required)
_APACHE_MODULES = [
    ("mpm_event_module", "mod_mpm_event", False),
    ("mpm_prefork_module", "mod_mpm_prefork", False),
    ("unixd_module", "mod_unixd", True),
    ("authz_core_module", "mod_authz_core", True),
    ("rewrite_module", "mod_rewrite", True),
    ("headers_module", "mod_headers", False),
    ("dir_module", "mod_dir", False),
    ("dav_module", "mod_dav", True),
    ("dav_fs_module", "mod_dav_fs", True),
]


def _apache_load_lines() -> "tuple[List[str], Optional[str]]":
    compiled = _apache_compiled_in()
    mdir = _apache_module_dir()
    lines: List[str] = []
    have_mpm = any(c.startswith(("event.c", "prefork.c", "worker.c")) for c in compiled)
    for mod, fname, required in _APACHE_MODULES:
        if fname + ".c" in compiled or (fname.startswith("mod_mpm_") and
                                        fname[8:] + ".c" in compiled):
            continue
        if fname.startswith("mod_mpm_"):
            if have_mpm:
                continue
        path = os.path.join(mdir, fname + ".so") if mdir else None
        if path and os.path.isfile(path):
            lines.append("LoadModule %s %s" % (mod, _conf_quote(path)))
            if fname.startswith("mod_mpm_"):
                have_mpm = True
        elif required:
            return [], "Apache module %s not found (module dir: %s)" % (fname, mdir)
    if not have_mpm:
        return [], "no Apache MPM module (event/prefork) found"
    return lines, None


def apache_missing_reason() -> Optional[str]:
    if not _apache_binary():
        return "apache2/httpd binary not found (install apache2)"
    if not _apache_module_dir():
        return "Apache mod_dav_fs.so not found (install apache2 / apache2-bin)"
    return _apache_load_lines()[1]


def have_apache() -> bool:
    return apache_missing_reason() is None


def _unprivileged(names, what: str) -> pwd.struct_passwd:
    """The first of the users *names* that exists and is not root."""
    for name in names:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0:
            return pw
    raise ServerStartError("no non-root user found to run %s as" % what)


def _apache_run_user(root: Path) -> Optional[pwd.struct_passwd]:
    """The user Apache workers run as when we are root (None if not root)."""
    if not _is_root():
        return None
    owner = os.stat(str(root)).st_uid
    if owner != 0:
        try:
            return pwd.getpwuid(owner)
        except KeyError:
            pass
    return _unprivileged(("www-data", "apache", "httpd", "daemon", "nobody"),
                         "Apache workers")


def _apache_conf(
    *, port: int, root: Path, token: str, workdir: Path,
    run_as: Optional[pwd.struct_passwd], load_lines: List[str],
) -> str:
    q = _conf_quote
    lines = ["# generated by tests/servers.py -- do not edit"]
    lines += [
        "ServerRoot %s" % q(workdir),
        "DefaultRuntimeDir %s" % q(workdir / "run"),
        "PidFile %s" % q(workdir / "apache.pid"),
        "ErrorLog %s" % q(workdir / "error.log"),
        "LogLevel warn",
        "Listen %s:%d" % (LOOPBACK, port),
        "ServerName %s:%d" % (LOOPBACK, port),
        "ServerTokens Prod",
        "Mutex file:%s default" % (workdir / "run"),
    ] + load_lines
    if run_as is not None:
        gname = str(run_as.pw_gid)
        try:
            gname = grp.getgrgid(run_as.pw_gid).gr_name
        except KeyError:
            gname = "#%d" % run_as.pw_gid
        lines += ["User %s" % run_as.pw_name, "Group %s" % gname]
    lines += [
        "<IfModule mpm_event_module>",
        "    StartServers 1",
        "    ServerLimit 4",
        "    ThreadsPerChild 16",
        "    ThreadLimit 16",
        "    MaxRequestWorkers 64",
        "    MinSpareThreads 16",
        "    MaxSpareThreads 64",
        "    MaxConnectionsPerChild 0",
        "</IfModule>",
        "<IfModule mpm_prefork_module>",
        "    StartServers 2",
        "    MinSpareServers 1",
        "    MaxSpareServers 8",
        "    MaxRequestWorkers 32",
        "    MaxConnectionsPerChild 0",
        "</IfModule>",
        "Timeout 120",
        "KeepAlive On",
        "MaxKeepAliveRequests 0",
        "KeepAliveTimeout 60",
        "EnableSendfile On",
        "LimitRequestBody 0",
        "DavLockDB %s" % q(workdir / "davlock" / "DavLock"),
        "DocumentRoot %s" % q(root),
        "<IfModule dir_module>",
        "    DirectoryIndex disabled",
        "</IfModule>",
        "<Directory />",
        "    Options None",
        "    AllowOverride None",
        "    Require all denied",
        "</Directory>",
        "<Directory %s>" % q(root),
        "    Options None",
        "    AllowOverride None",
        "    Require all granted",
        "    Dav On",
        "</Directory>",
        # every request needs the exact bearer token, else 401
        "RewriteEngine On",
        'RewriteCond "%%{HTTP:Authorization}" "!=Bearer %s"' % token,
        'RewriteRule "^" "-" [R=401,L]',
        "<IfModule headers_module>",
        '    Header always set WWW-Authenticate "Bearer realm=\\"ctadata\\"" '
        '"expr=%{REQUEST_STATUS} == 401"',
        "</IfModule>",
        "",
    ]
    return "\n".join(lines)


def start_apache(root: PathLike, token: str, workdir: PathLike) -> RunningServer:
    """Start Apache httpd + mod_dav_fs serving ``root`` (see module docstring)."""
    reason = apache_missing_reason()
    if reason:
        raise ServerStartError(reason)
    _check_token(token)
    root = Path(root).resolve()
    workdir = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "davlock"):
        (workdir / sub).mkdir(exist_ok=True)
    run_as = _apache_run_user(root)
    if run_as is not None:
        uid, gid = run_as.pw_uid, run_as.pw_gid
        _chown_tree(workdir / "davlock", uid, gid)
        _chown_tree(workdir / "run", uid, gid)
        if os.stat(str(root)).st_uid != uid and not _grant_acl(root, uid):
            _chown_tree(root, uid, gid)  # no ACL support: hand root over
        bad = _check_access_as(run_as, [root, workdir / "davlock"])
        if bad:
            raise ServerStartError(
                "Apache workers run as %r (tests run as root) but cannot rwx: %s\n"
                "(all ancestors of root must be traversable by that user)"
                % (run_as.pw_name, bad)
            )
    load_lines, why = _apache_load_lines()
    if why:
        raise ServerStartError(why)
    conf_path = workdir / "apache.conf"
    pidfile = workdir / "apache.pid"
    errlog = workdir / "error.log"
    stdio = workdir / "stdout.log"
    binary = _apache_binary() or "apache2"
    errors = []
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        conf_path.write_text(
            _apache_conf(port=port, root=root, token=token, workdir=workdir,
                         run_as=run_as, load_lines=load_lines)
        )
        argv = [binary, "-d", str(workdir), "-f", str(conf_path), "-DFOREGROUND"]
        proc, why = _launch("apache", argv, port, pidfile, [errlog], stdio)
        if proc is not None:
            return RunningServer(
                "apache", "http://%s:%d" % (LOOPBACK, port), root, token, proc, workdir,
                run_as=run_as, log_files=[errlog, stdio],
            )
        errors.append(why)
        if not _addr_in_use(why):
            break
    raise ServerStartError("could not start apache:\n%s" % "\n\n".join(errors))


# --------------------------------------------------------------------------
# XRootD (XrdHttp door, HTTP-TPC, macaroons)
# --------------------------------------------------------------------------

# Plugins XRootD loads by their unversioned name (libXrdHttp.so ->
# libXrdHttp-5.so, found by the dynamic loader); we only check they exist, for
# a clear skip reason.
_XROOTD_PLUGINS = ("libXrdHttp-5.so", "libXrdHttpTPC-5.so")
_XROOTD_MACAROONS = "libXrdMacaroons-5.so"


def _xrootd_binary() -> Optional[str]:
    return _server_binary("CTADATA_TEST_XROOTD", ["xrootd"])


def _lib_dirs() -> List[str]:
    import sysconfig
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = ["/usr/lib/" + multiarch] if multiarch else []
    return dirs + ["/usr/lib64", "/usr/lib", "/usr/local/lib64", "/usr/local/lib"]


def _have_lib(name: str) -> bool:
    return any(os.path.isfile(os.path.join(d, name)) for d in _lib_dirs())


def xrootd_missing_reason(*, macaroons: bool = False) -> Optional[str]:
    """None if XRootD (with its HTTP plugins) can be started, else why not."""
    if not _xrootd_binary():
        return "xrootd binary not found (install xrootd-server)"
    for lib in _XROOTD_PLUGINS + ((_XROOTD_MACAROONS,) if macaroons else ()):
        if not _have_lib(lib):
            return "%s not found (install xrootd-server-plugins)" % lib
    if not shutil.which("openssl"):
        return "openssl CLI not found"
    return None


def have_xrootd(*, macaroons: bool = False) -> bool:
    return xrootd_missing_reason(macaroons=macaroons) is None


def _xrootd_run_user() -> Optional[pwd.struct_passwd]:
    """XRootD refuses to run as root: the user it runs as when we are root."""
    if not _is_root():
        return None
    return _unprivileged(("xrootd", "daemon", "nobody"), "XRootD")


def _drop_privileges(user: Optional[pwd.struct_passwd]) -> Optional[Callable[[], None]]:
    """preexec_fn: become *user* (no supplementary groups), then ask for the
    parent-death signal (a change of credentials clears it, so it must come
    after; ``setpriv`` would lose it)."""
    death = _parent_death_signal()
    if user is None:
        return death
    uid, gid = user.pw_uid, user.pw_gid

    def preexec() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if death is not None:
            death()

    return preexec


def xrootd_ca(directory: PathLike) -> "tuple[str, str, str, str]":
    """The test CA for XRootD instances: (ca.pem, server.pem, server.key,
    certdir).  certdir holds the CA under its OpenSSL hash name, as
    ``xrd.tlsca certdir`` wants.  Instances that copy to each other must
    share it (each one verifies the other's certificate with it)."""
    d = Path(directory)
    ca, crt, key = make_test_ca(d)
    certdir = d / "certdir"
    if not certdir.is_dir():
        certdir.mkdir()
        h = subprocess.run(["openssl", "x509", "-noout", "-subject_hash", "-in", ca],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
        if h.returncode != 0:
            raise ServerStartError("openssl -subject_hash failed: %s" % h.stdout.decode())
        shutil.copyfile(ca, str(certdir / (h.stdout.decode().strip() + ".0")))
    return ca, crt, key, str(certdir)


def _subject_hash(cert: str) -> str:
    r = subprocess.run(["openssl", "x509", "-noout", "-subject_hash", "-in", cert],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise ServerStartError("openssl -subject_hash failed: %s" % r.stdout.decode())
    return r.stdout.decode().strip()


def _xrootd_conf(*, xport: int, hport: int, root: Path, workdir: Path,
                 tls: "tuple[str, str, str]", macaroons: bool, sitename: str) -> str:
    crt, key, certdir = tls
    lines = [
        "# generated by tests/servers.py -- do not edit",
        "all.export /",
        "oss.localroot %s" % root,
        "all.adminpath %s" % (workdir / "admin"),
        "all.pidpath %s" % (workdir / "run"),
        "all.sitename %s" % sitename,
        # XRootD cannot bind to one address: it listens on all of them, and
        # takes connections from this machine only
        "xrd.allow host localhost",
        "xrd.network nodnr",
        "xrd.port %d" % xport,
        "xrd.protocol XrdHttp:%d libXrdHttp.so" % hport,
        "xrd.tls %s %s" % (crt, key),
        "xrd.tlsca certdir %s" % certdir,
        "xrootd.chksum adler32",
        "http.exthandler xrdtpc libXrdHttpTPC.so",
    ]
    if macaroons:
        lines += [
            "ofs.authorize 1",
            "acc.authdb %s" % (workdir / "authdb"),
            "ofs.authlib ++ libXrdMacaroons.so",
            "http.exthandler xrdmacaroons libXrdMacaroons.so",
            "macaroons.secretkey %s" % (workdir / "macaroon-secret"),
            # the bearer token reaches the authorization plugins as ?authz=
            "http.header2cgi Authorization authz",
        ]
    return "\n".join(lines) + "\n"


def mint_macaroon(server: "RunningServer", path: str = "/", caveats: "List[str] | None" = None,
                  validity: str = "PT1H") -> str:
    """Ask an XRootD instance started with ``macaroons=True`` for a macaroon
    for *path* (URL path, e.g. "/" or "/dir/"), authenticated with the test
    client certificate that its authdb grants everything.  *caveats* e.g.
    ``["activity:DOWNLOAD,LIST"]``; the answer's ``macaroon`` is returned."""
    import http.client
    import json
    import ssl
    ctx = ssl.create_default_context(cafile=server.ca_file)
    ctx.load_cert_chain(server.client_cert)  # type: ignore[attr-defined]
    body = {"validity": validity}
    if caveats:
        body["caveats"] = list(caveats)  # type: ignore[assignment]
    conn = http.client.HTTPSConnection(LOOPBACK, server.port, timeout=20, context=ctx)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/macaroon-request"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise ServerStartError("macaroon request for %s answered %d: %r"
                               % (path, r.status, data[:300]))
    return json.loads(data.decode())["macaroon"]


def start_xrootd(
    root: PathLike,
    workdir: PathLike,
    *,
    ca_dir: Optional[PathLike] = None,
    macaroons: bool = False,
    token: str = "",
    sitename: str = "ctadata-test",
) -> RunningServer:
    """Start XRootD 5 serving ``root`` over HTTPS (XrdHttp) and the xroot
    protocol, both on ephemeral ports; see "XRootD" in the module docstring.

    ``ca_dir``: where the test CA lives (``xrootd_ca``); give two instances
    the same one so that each trusts the other for third-party copies.
    Default: ``workdir/tls``.
    ``macaroons``: authorization on: nothing is allowed without a macaroon
    (HTTP 403), except to the holder of the test client certificate
    (``server.client_cert``), who may do everything and ask for macaroons.
    ``server.token`` is then such a macaroon for "/" with every activity,
    valid 23 hours -- a bearer token like any other for the client.
    Without ``macaroons`` the server needs no credentials at all and
    ``token`` (anything) is kept on the returned object but not checked.

    The returned RunningServer also has ``xroot_url`` ("root://...") and
    ``client_cert`` (a PEM with certificate + key, signed by the test CA).
    """
    reason = xrootd_missing_reason(macaroons=macaroons)
    if reason:
        raise ServerStartError(reason)
    root = Path(root).resolve()
    workdir = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("admin", "run"):
        (workdir / sub).mkdir(exist_ok=True)
    ca, crt, key, certdir = xrootd_ca(ca_dir if ca_dir is not None else workdir / "tls")
    client_cert = Path(ca).parent / "client.pem"
    if not client_cert.exists():
        make_client_cert(Path(ca).parent, client_cert)
    run_as = _xrootd_run_user()
    if macaroons:
        secret = workdir / "macaroon-secret"
        if not secret.exists():
            import base64
            fd = os.open(str(secret), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(64)).decode() + "\n")
        # XrdHttp names a client by its certificate's subject hash (no gridmap)
        (workdir / "authdb").write_text("u %s.0 / a\n" % _subject_hash(str(client_cert)))
    if run_as is not None:
        uid, gid = run_as.pw_uid, run_as.pw_gid
        # the server key must be the server user's and private
        _chown_tree(workdir, uid, gid)
        os.chown(key, uid, gid)
        os.chmod(key, 0o600)
        if os.stat(str(root)).st_uid != uid and not _grant_acl(root, uid):
            _chown_tree(root, uid, gid)
        bad = _check_access_as(run_as, [root, workdir / "admin", workdir / "run"])
        if bad:
            raise ServerStartError(
                "XRootD runs as %r (tests run as root) but cannot rwx: %s\n"
                "(all ancestors of root must be traversable by that user)"
                % (run_as.pw_name, bad))
    name = "xrootd" if macaroons else "xrootd-open"
    conf_path = workdir / "xrootd.cfg"
    pidfile = workdir / "run" / "xrootd.pid"
    log = workdir / "xrootd.log"
    stdio = workdir / "stdout.log"
    errors = []
    for _ in range(START_ATTEMPTS):
        xport, hport = _free_port(), _free_port()
        if xport == hport:
            continue
        conf_path.write_text(_xrootd_conf(
            xport=xport, hport=hport, root=root, workdir=workdir,
            tls=(crt, key, certdir), macaroons=macaroons, sitename=sitename))
        argv = [_xrootd_binary() or "xrootd", "-c", str(conf_path), "-l", str(log)]
        proc, why = _launch(name, argv, hport, pidfile, [log], stdio,
                            preexec=_drop_privileges(run_as), cwd=str(workdir))
        if proc is not None:
            srv = RunningServer(
                name, "https://%s:%d" % (LOOPBACK, hport), root, token, proc, workdir,
                ca_file=ca, run_as=run_as, requires_token=macaroons,
                log_files=[log, stdio])
            srv.xroot_url = "root://%s:%d" % (LOOPBACK, xport)  # type: ignore[attr-defined]
            srv.client_cert = str(client_cert)  # type: ignore[attr-defined]
            if macaroons:
                try:
                    srv.token = mint_macaroon(srv, "/", validity="PT23H")
                except Exception:
                    srv.stop()
                    raise
            return srv
        errors.append(why)
        if not _addr_in_use(why):
            break
    raise ServerStartError("could not start %s:\n%s" % (name, "\n\n".join(errors)))


if __name__ == "__main__":  # manual poking: python3 tests/servers.py [nginx|apache|xrootd|...]
    import tempfile

    kind = sys.argv[1] if len(sys.argv) > 1 else "nginx"
    base = Path(tempfile.mkdtemp(prefix="ctadata-servers-"))
    os.chmod(str(base), 0o755)
    tok = secrets.token_urlsafe(16)
    if kind == "apache":
        srv = start_apache(base / "root", tok, base / "work")
    elif kind in ("xrootd", "xrootd-open"):
        srv = start_xrootd(base / "root", base / "work", macaroons=kind == "xrootd", token=tok)
        tok = srv.token
    else:
        srv = start_nginx(base / "root", tok, base / "work",
                          static_only=kind == "nginx-static", tls=kind == "nginx-tls")
    print(srv.url, srv.root, tok, srv.ca_file or "")
    print("config:", srv.workdir)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
