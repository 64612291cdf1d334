"""In-process double of the CTA download service and certificate service.

Behaves like the Flask service (cta-epfl downloadservice) described in
PROTOCOL.md section 1, in front of a real WebDAV upstream (nginx in the tests):

    with DownloadService(nginx.url, nginx.token) as ds:
        os.environ["CTADS_URL"] = ds.base_url         # .../services/downloadservice/
        os.environ["JUPYTERHUB_API_TOKEN"] = ds.token
        os.environ["CTACS_URL"] = ds.cert_base_url    # .../services/certificateservice/

Quirks of the real service that are kept on purpose: ``list`` hrefs are
relative to the storage root and percent-encoded as the upstream wrote them
(collections always end in "/", as on dCache);
``fetch`` streams with chunked encoding (no Content-Length), ignores Range and,
when the upstream read fails mid-way, just ends the body (status 200); uploads
go to the upstream as chunked PUTs; the webdav pass-through does not follow
redirects.  Bodies are streamed with fixed-size buffers in both directions.
"""

import http.client
import json
import re
import ssl
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from contextlib import closing

from httpdouble import BUFSIZE, HTTP_TIMEOUT, DoubleHandler, ServerDouble

DS_PREFIX = "/services/downloadservice"
CS_PREFIX = "/services/certificateservice"
DS_SCOPE = "access:services!service=downloadservice"
CS_SCOPE = "access:services!service=certificateservice"
DEFAULT_TOKEN = "ds-test-api-token"
CERTIFICATE_KEYS = ("cta", "lst", "arc")
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_REDIRECTS = 5
READ_ONLY_METHODS = ("GET", "HEAD", "OPTIONS", "PROPFIND")
WEBDAV_METHODS = READ_ONLY_METHODS + ("PUT", "MKCOL", "DELETE")
# RFC 7230 6.1 hop-by-hop headers, plus the framing we redo ourselves.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                  "te", "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
                  "host", "authorization", "expect"}
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
_HREF = re.compile(r"(<(?:[A-Za-z_][\w.-]*:)?href>)([^<]*)(</)")

SAMPLE_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUJ3Wq0ctadataTestOnlyNotARealCertificateAAAAA\n"
    "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n"
    "-----END CERTIFICATE-----\n"
)


def user_path_fragment(name):
    """The per-user folder name (lower case, anything but [0-9a-z] -> '_')."""
    return re.sub("[^0-9a-z]", "_", name.lower())


class UpstreamError(Exception):
    pass


class DownloadService(ServerDouble):
    """Download service + certificate service double (see module docstring).

    ``users`` maps API tokens to a user name or to a dict ``{"name": ...,
    "scopes": [...]}``; without "scopes" a user has every scope.  Test hooks:
    ``short_fetch[path] = N`` (or a list of N/None, one per fetch) makes fetch
    of ``path`` (as in the URL, decoded, no leading '/') send N bytes and end
    the body normally; ``query_tokens`` lists tokens sent as ``?token=``;
    ``certificates`` the accepted certificate uploads; ``requests`` every
    request as a dict (method, path, query, headers).
    """

    def __init__(self, upstream_url, upstream_token, users=None, area="lst",
                 upstream_ssl_context=None):
        super().__init__()
        parts = urllib.parse.urlsplit(upstream_url)
        self.upstream_url = upstream_url.rstrip("/") + "/"
        self.upstream_token = upstream_token
        self.users = {DEFAULT_TOKEN: "alice_example_org"} if users is None else dict(users)
        self.area = area
        self.upstream_ssl_context = upstream_ssl_context
        self._upstream_origin = "%s://%s" % (parts.scheme, parts.netloc)
        self._upstream_base = parts.path.rstrip("/")  # already percent-encoded
        self.short_fetch = {}
        self.query_tokens = []
        self.certificates = []
        self.requests = []
        self.lock = threading.Lock()

    @property
    def token(self):
        """The first API token in ``users``."""
        return next(iter(self.users))

    @property
    def base_url(self):
        return self.url + DS_PREFIX + "/"

    @property
    def cert_base_url(self):
        return self.url + CS_PREFIX + "/"

    def user_folder(self, token=None):
        """``<area>/users/<user>`` for the given (default: first) token."""
        user = self.users[token or self.token]
        return self.folder_of(user["name"] if isinstance(user, dict) else user)

    def folder_of(self, name):
        return "%s/users/%s" % (self.area, user_path_fragment(name))

    def _fetch_limit(self, path):
        with self.lock:
            plan = self.short_fetch.get(path)
            if isinstance(plan, list):
                return plan.pop(0) if plan else None
            return plan

    # ---- upstream ---------------------------------------------------------
    def upstream_target(self, path):
        """Full upstream URL of a storage path (decoded, relative to the root)."""
        return self._upstream_origin + self._upstream_base + "/" + urllib.parse.quote(path.lstrip("/"))

    def open_upstream(self, method, url, headers=(), body=None, length=None):
        """Send one request upstream and return ``(connection, response)``.

        ``body`` is None, bytes, or an iterable of bytes sent with
        ``length`` as Content-Length or, if length is None, chunked.  The
        bearer token only goes to the configured upstream origin."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=HTTP_TIMEOUT,
                                               context=self.upstream_ssl_context or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=HTTP_TIMEOUT)
        try:
            conn.putrequest(method, (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                            skip_accept_encoding=True)
            if "%s://%s" % (parts.scheme, parts.netloc) == self._upstream_origin:
                conn.putheader("Authorization", "Bearer " + self.upstream_token)
            for name, value in headers:
                conn.putheader(name, value)
            if isinstance(body, bytes):
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            elif body is None:
                conn.endheaders()
            else:
                conn.putheader(*(("Content-Length", str(length)) if length is not None
                                 else ("Transfer-Encoding", "chunked")))
                conn.endheaders()
                self._send_stream(conn, body, chunked=length is None)
            return conn, conn.getresponse()
        except OSError as exc:
            conn.close()
            raise UpstreamError("upstream %s %s failed: %s" % (method, url, exc)) from exc

    @staticmethod
    def _send_stream(conn, body, chunked):
        for piece in body:
            if chunked:
                if piece:
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                conn.send(piece)
        if chunked:
            conn.send(b"0\r\n\r\n")

    def open_following(self, method, url, headers=()):
        """Bodyless request that follows redirects, as python-requests does."""
        for _ in range(MAX_REDIRECTS):
            conn, resp = self.open_upstream(method, url, headers)
            if resp.status not in (301, 302, 303, 307, 308) or not resp.getheader("Location"):
                return conn, resp
            url = urllib.parse.urljoin(url, resp.getheader("Location"))
            conn.close()
        return conn, resp

    def list_entries(self, xml_bytes):
        """The service's JSON list from a PROPFIND multistatus body."""
        entries = []
        for response in ET.fromstring(xml_bytes).iter("{DAV:}response"):
            href = response.findtext("{DAV:}href") or ""
            if response.find(".//{DAV:}collection") is not None and not href.endswith("/"):
                # dCache always ends collection hrefs with "/"; nginx does not
                # for the directory itself when asked without one.
                href += "/"
            size = mtime = None
            for element in response.iter():  # like the service: any propstat
                if element.tag == "{DAV:}getcontentlength":
                    size = element.text
                elif element.tag == "{DAV:}getlastmodified":
                    mtime = element.text
            entries.append({
                "href": self._storage_relative(href),
                "size": size,
                "mtime": mtime,
                "url": urllib.parse.urljoin(self.upstream_url, href),
                "type": "directory" if href.endswith("/") else "file",
            })
        return entries

    def _storage_relative(self, href):
        """Upstream href (path-absolute or full URL) -> path relative to the storage root."""
        path = urllib.parse.urlsplit(href).path if "://" in href else href
        if self._upstream_base and path.startswith(self._upstream_base + "/"):
            path = path[len(self._upstream_base):]
        return path.lstrip("/")

    def rewrite_hrefs(self, xml_text):
        """Point the hrefs of a multistatus body under ``{prefix}/webdav/``."""
        def rewrite(match):
            relative = self._storage_relative(match.group(2))
            return match.group(1) + DS_PREFIX + "/webdav/" + relative + match.group(3)
        return _HREF.sub(rewrite, xml_text)


def _first(query, name):
    values = query.get(name)
    return values[-1] if values else None


class _Handler(DoubleHandler):
    # ---- dispatch ---------------------------------------------------------
    def _dispatch(self):
        ds = self.double
        split = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        with ds.lock:
            ds.requests.append({"method": self.command, "path": split.path,
                                "query": self.query, "headers": dict(self.headers)})
        for prefix, routes, scope in ((DS_PREFIX, self._DS_ROUTES, DS_SCOPE),
                                      (CS_PREFIX, self._CS_ROUTES, CS_SCOPE)):
            if split.path == prefix or split.path.startswith(prefix + "/"):
                endpoint, _, rest = split.path[len(prefix) + 1:].partition("/")
                break
        else:
            return self.send(404, "Not Found")
        if endpoint not in routes:
            return self.send(404, "Not Found")
        methods, view, needs_auth = routes[endpoint]
        if self.command not in methods:
            return self.send(405, "Method Not Allowed", headers=[("Allow", ", ".join(methods))])
        self.path_arg = urllib.parse.unquote(rest)
        if needs_auth:
            self.user = self._authenticate(scope)
            if self.user is None:
                return
        try:
            view(self)
        except UpstreamError as exc:
            self.send(502, "Error: %s" % exc)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _dispatch
    do_PROPFIND = do_PROPPATCH = do_MKCOL = do_MOVE = do_COPY = _dispatch

    def _authenticate(self, scope):
        """The user's name, or None after answering 401/403."""
        ds = self.double
        token = None
        query_token = _first(self.query, "token")
        if query_token is not None:
            with ds.lock:
                ds.query_tokens.append(query_token)
            token = query_token  # the service looked at ?token= before the header
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if token is None and scheme == "Bearer":
            token = value.strip()
        user = ds.users.get(token)
        if user is None:
            message = "Unauthorized: missing or invalid token"
            if self.headers.get("Content-Type", "").startswith("application/json"):
                self.send_json(401, {"message": message})
            else:
                self.send(401, message)
            return None
        if isinstance(user, dict):
            if "scopes" in user and scope not in user["scopes"]:
                self.send(403, "Forbidden: missing scope %s" % scope)
                return None
            user = user["name"]
        return user

    def _error_from_upstream(self, resp):
        text = resp.read(64 * 1024).decode("utf-8", "replace")
        self.send(resp.status, "Error: %d %s" % (resp.status, text), "text/html; charset=utf-8")

    # ---- download service -------------------------------------------------
    def _index(self):
        self.send(200, "<html><body>CTA download service for %s</body></html>" % self.user,
                  "text/html; charset=utf-8")

    def _health(self):
        self.send(200, "OK")

    def _list(self):
        ds = self.double
        conn, resp = ds.open_following("PROPFIND", ds.upstream_target(self.path_arg).rstrip("/"),
                                        [("Depth", "1")])
        with closing(conn):
            if resp.status not in (200, 207):
                return self._error_from_upstream(resp)
            entries = ds.list_entries(resp.read())
        self.send_json(200, entries)

    def _fetch(self):
        ds = self.double
        if ".." in self.path_arg:
            return self.send(400, "Error: path cannot contain '..'")
        chunk_size = self._chunk_size()
        method = "HEAD" if self.command == "HEAD" else "GET"
        conn, resp = ds.open_following(method, ds.upstream_target(self.path_arg))
        with closing(conn):
            if not 200 <= resp.status < 300:
                return self._error_from_upstream(resp)
            self.start_chunked(200, [("Content-Type", "application/octet-stream"),
                                     ("Content-Disposition", _attachment(self.path_arg))])
            if method == "GET":
                self._stream_upstream(resp, chunk_size, ds._fetch_limit(self.path_arg.lstrip("/")))
            self.end_chunked()

    def _stream_upstream(self, resp, chunk_size, limit=None):
        """Copy the upstream body as chunks; a failed upstream read just ends
        the body, as the Flask generator does."""
        sent = 0
        while limit is None or sent < limit:
            want = chunk_size if limit is None else min(chunk_size, limit - sent)
            try:
                piece = resp.read(want)
            except (OSError, http.client.HTTPException):
                return
            if not piece:
                return
            self.write_chunk(piece)
            sent += len(piece)

    def _copy_upstream(self, resp, length):
        """Copy ``length`` raw bytes; if the upstream falls short, drop the
        connection so the client sees the truncation."""
        while length > 0:
            try:
                piece = resp.read(min(BUFSIZE, length))
            except (OSError, http.client.HTTPException):
                piece = b""
            if not piece:
                self.close_connection = True
                return
            self.wfile.write(piece)
            length -= len(piece)

    def _chunk_size(self):
        try:
            size = int(_first(self.query, "chunk_size") or DEFAULT_CHUNK_SIZE)
        except ValueError:
            size = DEFAULT_CHUNK_SIZE
        return max(1, min(size, MAX_CHUNK_SIZE))

    def _upload(self):
        ds = self.double
        path = self.path_arg.strip("/")
        if not path or ".." in path:
            return self.send(400, "Error: path cannot contain '..'")
        upload_path = "%s/%s" % (ds.folder_of(self.user), path)
        folders = upload_path.split("/")[:-1]
        for depth in range(1, len(folders) + 1):
            conn, resp = ds.open_upstream("MKCOL", ds.upstream_target("/".join(folders[:depth]) + "/"))
            resp.read()
            conn.close()
        counted = {"total_written": 0, "client_gone": False}

        def body():
            try:
                for piece in self.iter_body(min(self._chunk_size(), BUFSIZE)):
                    counted["total_written"] += len(piece)
                    yield piece
            except ConnectionError:
                counted["client_gone"] = True
                raise
        try:
            # Dropping the upstream connection before the last chunk makes the
            # upstream discard the partial file.
            conn, resp = ds.open_upstream("PUT", ds.upstream_target(upload_path), body=body())
        except UpstreamError:
            if counted["client_gone"]:
                self.close_connection = True
                return
            raise
        with closing(conn):
            if resp.status not in (200, 201, 204):
                return self._error_from_upstream(resp)
            resp.read()
        self.send_json(200, {"status": "uploaded", "path": upload_path,
                             "total_written": counted["total_written"]})

    def _webdav(self):
        ds = self.double
        path = self.path_arg
        if ".." in path.split("/"):
            return self.send(400, "Error: path cannot contain '..'")
        if self.command not in READ_ONLY_METHODS:
            own = ds.folder_of(self.user) + "/"
            if not path.lstrip("/").startswith(own):
                return self.send(403, "Access denied: missing rights to write in %s, "
                                      "you are only allowed to write in %s" % (path, own))
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED]
        body = length = None
        if self.has_body():
            body = self.iter_body()
            if not self.is_chunked():
                length = int(self.headers["Content-Length"])
        conn, resp = ds.open_upstream(self.command, ds.upstream_target(path), headers, body, length)
        with closing(conn):
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_FORWARDED]
            if self.command == "PROPFIND":
                text = ds.rewrite_hrefs(resp.read().decode("utf-8"))
                content_type = resp.getheader("Content-Type", "application/xml; charset=utf-8")
                headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
                return self.send(resp.status, text, content_type, headers)
            if self.command == "HEAD" or resp.status in (204, 304):
                if resp.getheader("Content-Length") is not None:
                    headers.append(("Content-Length", resp.getheader("Content-Length")))
                self._start(resp.status, headers)
                return
            if resp.getheader("Content-Length") is not None:
                self._start(resp.status, headers + [("Content-Length", resp.getheader("Content-Length"))])
                self._copy_upstream(resp, int(resp.getheader("Content-Length")))
            else:
                self.start_chunked(resp.status, headers)
                self._stream_upstream(resp, BUFSIZE)
                self.end_chunked()

    # ---- certificate service ----------------------------------------------
    def _certificate_json(self):
        try:
            data = json.loads(self.read_body().decode("utf-8"))
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.send(400, "Error: expected a JSON object")
            return None
        if not isinstance(data.get("certificate"), str) or not _PEM_CERT.search(data["certificate"]):
            self.send(400, "Error: invalid certificate")
            return None
        return data

    def _certificate(self):
        data = self._certificate_json()
        if data is None:
            return
        if data.get("certificate_key") not in CERTIFICATE_KEYS:
            return self.send(400, "Error: certificate_key must be one of %s" % ", ".join(CERTIFICATE_KEYS))
        self._store_certificate("certificate", data)
        self.send_json(200, {"message": "Certificate stored", "certificate_key": data["certificate_key"]})

    def _main_certificate(self):
        data = self._certificate_json()
        if data is not None:
            self._store_certificate("main-certificate", data)
            self.send_json(200, {"message": "Main certificate stored"})

    def _store_certificate(self, kind, data):
        ds = self.double
        with ds.lock:
            ds.certificates.append(dict(data, kind=kind, auth_user=self.user))

    _DS_ROUTES = {
        "": (("GET", "HEAD"), _index, True),
        "health": (("GET", "HEAD"), _health, False),
        "list": (("GET", "HEAD", "POST"), _list, True),
        "fetch": (("GET", "HEAD", "POST"), _fetch, True),
        "upload": (("POST",), _upload, True),
        "webdav": (WEBDAV_METHODS, _webdav, True),
    }
    _CS_ROUTES = {
        "certificate": (("POST",), _certificate, True),
        "main-certificate": (("POST",), _main_certificate, True),
    }


def _attachment(path):
    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
    fallback = name.encode("ascii", "replace").decode("ascii").replace("\\", "_").replace('"', "_")
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (fallback, urllib.parse.quote(name))


DownloadService.handler_class = _Handler
