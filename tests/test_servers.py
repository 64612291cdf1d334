"""Smoke tests of the real-server fixtures (tests/servers.py, conftest.py).

Only http.client/ssl are used here -- no ctadata -- so a failure points at the
fixtures or at the servers, not at the client.  The test_quirks_* tests pin
the server behaviour documented at the top of tests/servers.py.
"""

import hashlib
import http.client
import os
import re
import socket
import ssl
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

import servers
from compat import monotonic_ns
from conftest import dav_target

DAV_NS = "{DAV:}"


@pytest.fixture(params=["nginx", "apache"])
def dav(request):  # type: ignore[no-untyped-def]
    """Here only nginx and Apache: these tests pin their quirks (tests/servers.py);
    XRootD's are pinned in tests/test_xrootd.py."""
    yield from dav_target(request, request.param)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class Resp:
    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def __repr__(self) -> str:
        return "<Resp %d %r>" % (self.status, self.body[:200])


def _conn(url: str, ca_file: Optional[str] = None, context: Optional[ssl.SSLContext] = None,
          timeout: float = 30) -> http.client.HTTPConnection:
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        if context is None:
            context = ssl.create_default_context(cafile=ca_file)
        return http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=context)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def call(
    base_url: str,
    method: str,
    path: str = "",
    body: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
    token: Optional[str] = None,
    conn: Optional[http.client.HTTPConnection] = None,
    ca_file: Optional[str] = None,
) -> Resp:
    """One request.  ``path`` (already percent-encoded) is appended to the
    path of ``base_url``; a path starting with "/" replaces it."""
    u = urllib.parse.urlsplit(base_url)
    full = path if path.startswith("/") else (u.path or "/") + path
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = "Bearer " + token
    own = conn is None
    c = conn or _conn(base_url, ca_file=ca_file)
    try:
        c.request(method, full, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return Resp(r.status, r.getheaders(), data)
    finally:
        if own:
            c.close()


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="/")


def dav_call(dav, method: str, rel: str = "", **kw) -> Resp:  # type: ignore[no-untyped-def]
    return call(dav.url, method, rel, token=dav.token, **kw)


def abs_url(dav, rel: str) -> str:  # type: ignore[no-untyped-def]
    return dav.url + rel


def propfind(dav, rel: str, depth: str) -> Tuple[Resp, List[str]]:  # type: ignore[no-untyped-def]
    """PROPFIND; returns the response and the *unquoted* hrefs in order."""
    r = dav_call(dav, "PROPFIND", rel, headers={"Depth": depth})
    hrefs: List[str] = []
    if r.status == 207:
        tree = ET.fromstring(r.body)
        hrefs = [urllib.parse.unquote(e.text or "")
                 for e in tree.iter(DAV_NS + "href")]
    return r, hrefs


def _expected(dav, **per_server: int) -> int:  # type: ignore[no-untyped-def]
    return per_server[dav.name]


# --------------------------------------------------------------------------
# fixture sanity
# --------------------------------------------------------------------------


def test_dav_fixture_gives_empty_private_folder(dav) -> None:  # type: ignore[no-untyped-def]
    assert dav.name in ("nginx", "apache")
    assert dav.url.startswith("http://127.0.0.1:")
    assert dav.url.endswith("/")
    assert dav.url == dav.server.url + "/" + dav.root.name + "/"
    assert dav.root.is_dir() and list(dav.root.iterdir()) == []
    assert dav.root.parent == dav.server.root
    assert dav.token == dav.server.token and len(dav.token) >= 20
    assert dav.server.alive()
    # url "/" <-> root
    r = dav_call(dav, "PUT", "probe.bin", body=b"abc")
    assert r.status == 201, r
    assert (dav.root / "probe.bin").read_bytes() == b"abc"


def test_dav_fixture_cleans_up_previous_folders(dav) -> None:  # type: ignore[no-untyped-def]
    # earlier tests' folders (t0001-..., with their files) were removed
    if os.environ.get("CTADATA_KEEP_SERVER_DATA"):
        pytest.skip("CTADATA_KEEP_SERVER_DATA keeps the folders")
    others = [p.name for p in dav.server.root.iterdir()
              if re.match(r"t[0-9]{4}-", p.name) and p != dav.root]
    assert others == []


# --------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------

BAD_AUTH = [
    None,
    "Bearer wrong-token",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
]


@pytest.mark.parametrize("auth", BAD_AUTH, ids=["none", "wrong", "empty", "basic"])
@pytest.mark.parametrize("method", ["GET", "PROPFIND", "OPTIONS", "PUT", "DELETE", "MKCOL"])
def test_requests_without_valid_token_get_401(dav, auth, method) -> None:  # type: ignore[no-untyped-def]
    (dav.root / "existing.txt").write_bytes(b"keep")
    headers = {"Depth": "1"} if method == "PROPFIND" else {}
    if auth is not None:
        headers["Authorization"] = auth
    if method == "MKCOL":
        path = "newdir/"
    elif method == "PUT":
        path = "new.txt"
    else:
        path = "existing.txt"
    r = call(dav.url, method, path, body=b"data" if method == "PUT" else None,
             headers=headers)
    assert r.status == 401, r
    assert (r.header("WWW-Authenticate") or "").startswith("Bearer"), r.headers
    # nothing happened on disk
    assert sorted(p.name for p in dav.root.iterdir()) == ["existing.txt"]
    assert (dav.root / "existing.txt").read_bytes() == b"keep"


def test_token_also_required_for_server_root(dav) -> None:  # type: ignore[no-untyped-def]
    assert call(dav.server.url, "GET", "/").status == 401
    assert call(dav.server.url, "PROPFIND", "/", headers={"Depth": "0"}).status == 401
    r = call(dav.server.url, "PROPFIND", "/", headers={"Depth": "0"}, token=dav.token)
    assert r.status == 207


def test_connection_reusable_after_401_with_body(dav) -> None:  # type: ignore[no-untyped-def]
    c = _conn(dav.url)
    try:
        r = call(dav.url, "PUT", "x.bin", body=b"z" * (1 << 20), conn=c)
        assert r.status == 401
        r = call(dav.url, "PUT", "x.bin", body=b"ok", token=dav.token, conn=c)
        assert r.status == 201
    finally:
        c.close()
    assert (dav.root / "x.bin").read_bytes() == b"ok"


def test_expect_100_continue_gets_early_401(dav) -> None:  # type: ignore[no-untyped-def]
    port = dav.server.port
    for token, first_line in ((None, b"HTTP/1.1 401"), (dav.token, b"HTTP/1.1 100")):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
            s.sendall(b"PUT " + dav.path.encode() + b"e.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      + auth + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            assert s.recv(100).startswith(first_line)


# --------------------------------------------------------------------------
# basic WebDAV operations with the token
# --------------------------------------------------------------------------


def test_put_get_head_overwrite(dav) -> None:  # type: ignore[no-untyped-def]
    assert dav_call(dav, "PUT", "a.txt", body=b"hello").status == 201
    assert (dav.root / "a.txt").read_bytes() == b"hello"
    assert dav_call(dav, "PUT", "a.txt", body=b"hello world").status == 204
    r = dav_call(dav, "GET", "a.txt")
    assert (r.status, r.body) == (200, b"hello world")
    r = dav_call(dav, "HEAD", "a.txt")
    assert r.status == 200 and r.header("Content-Length") == "11"
    r = dav_call(dav, "GET", "a.txt", headers={"Range": "bytes=6-"})
    assert (r.status, r.body) == (206, b"world")
    assert dav_call(dav, "GET", "missing.txt").status == 404
    assert dav_call(dav, "PUT", "empty", body=b"").status == 201
    assert (dav.root / "empty").stat().st_size == 0


def test_large_put_get(dav) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(16 << 20)
    assert dav_call(dav, "PUT", "big.bin", body=data).status == 201
    assert hashlib.sha256((dav.root / "big.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    r = dav_call(dav, "GET", "big.bin")
    assert r.status == 200 and r.body == data


def test_mkcol_propfind_delete(dav) -> None:  # type: ignore[no-untyped-def]
    assert dav_call(dav, "MKCOL", "sub/").status == 201
    assert (dav.root / "sub").is_dir()
    assert dav_call(dav, "MKCOL", "sub/").status == 405
    assert dav_call(dav, "MKCOL", "nope/deeper/").status == 409
    assert dav_call(dav, "PUT", "sub/f1", body=b"12345").status == 201
    assert dav_call(dav, "MKCOL", "sub/inner/").status == 201

    r, hrefs = propfind(dav, "sub/", "1")
    assert r.status == 207
    base = dav.path + "sub/"
    assert hrefs[0] == base  # self first
    assert sorted(hrefs) == sorted([base, base + "f1", base + "inner/"])
    tree = ET.fromstring(r.body)
    sizes = {}
    for resp in tree.iter(DAV_NS + "response"):
        href = urllib.parse.unquote(resp.find(DAV_NS + "href").text)
        is_col = resp.find(".//" + DAV_NS + "resourcetype/" + DAV_NS + "collection") is not None
        length = resp.find(".//" + DAV_NS + "getcontentlength")
        sizes[href] = (is_col, int(length.text) if length is not None else None)
    assert sizes[base + "f1"] == (False, 5)
    assert sizes[base + "inner/"][0] is True

    r, hrefs = propfind(dav, "sub/", "0")
    assert (r.status, hrefs) == (207, [base])
    r, hrefs = propfind(dav, "sub/f1", "0")
    assert (r.status, hrefs) == (207, [base + "f1"])
    assert propfind(dav, "nothing", "0")[0].status == 404

    assert dav_call(dav, "DELETE", "sub/f1").status == 204
    assert not (dav.root / "sub" / "f1").exists()
    assert dav_call(dav, "DELETE", "sub/f1").status == 404
    assert dav_call(dav, "PUT", "sub/inner/deep", body=b"x").status == 201
    assert dav_call(dav, "DELETE", "sub/").status == 204  # recursive
    assert not (dav.root / "sub").exists()


def test_move_and_copy(dav) -> None:  # type: ignore[no-untyped-def]
    # file operations
    file_new = _expected(dav, nginx=204, apache=201)
    assert dav_call(dav, "PUT", "a", body=b"A").status == 201
    r = dav_call(dav, "MOVE", "a", headers={"Destination": abs_url(dav, "b")})
    assert r.status == file_new
    assert not (dav.root / "a").exists() and (dav.root / "b").read_bytes() == b"A"
    r = dav_call(dav, "COPY", "b", headers={"Destination": abs_url(dav, "c")})
    assert r.status == file_new
    assert (dav.root / "b").read_bytes() == (dav.root / "c").read_bytes() == b"A"
    assert dav_call(dav, "PUT", "c", body=b"C").status == 204
    r = dav_call(dav, "MOVE", "c", headers={"Destination": abs_url(dav, "b"), "Overwrite": "F"})
    assert r.status == 412
    assert (dav.root / "b").read_bytes() == b"A"
    r = dav_call(dav, "MOVE", "c", headers={"Destination": abs_url(dav, "b")})
    assert r.status == 204  # overwritten
    assert (dav.root / "b").read_bytes() == b"C" and not (dav.root / "c").exists()
    assert dav_call(dav, "MOVE", "zzz", headers={"Destination": abs_url(dav, "y")}).status == 404

    # collections (trailing slash on both sides works everywhere)
    assert dav_call(dav, "MKCOL", "d1/").status == 201
    assert dav_call(dav, "PUT", "d1/x", body=b"X").status == 201
    r = dav_call(dav, "COPY", "d1/", headers={"Destination": abs_url(dav, "d2/")})
    assert r.status == 201
    assert (dav.root / "d2" / "x").read_bytes() == b"X"
    r = dav_call(dav, "MOVE", "d2/", headers={"Destination": abs_url(dav, "d3/")})
    assert r.status == 201
    assert not (dav.root / "d2").exists() and (dav.root / "d3" / "x").read_bytes() == b"X"
    r = dav_call(dav, "MOVE", "d3/", headers={"Destination": abs_url(dav, "d1/"),
                                              "Overwrite": "F"})
    assert r.status == 412
    # overwriting a collection: nginx says 201, Apache 204
    r = dav_call(dav, "COPY", "d1/", headers={"Destination": abs_url(dav, "d3/")})
    assert r.status == _expected(dav, nginx=201, apache=204)


SPECIAL_NAMES = [
    "with space.txt",
    "per%cent.txt",
    "hash#tag.txt",
    "quest?ion.txt",
    "amp&semi;.txt",
    "plus+eq=.txt",
    "caf\u00e9.txt",
    "\u65e5\u672c.txt",
    "mix \u00e9 \u65e5\u672c #%?& 100%.txt",
    "'quote'\".txt",
]


def test_special_names_round_trip(dav) -> None:  # type: ignore[no-untyped-def]
    folder = "d\u00e9 #%? \u65e5"
    assert dav_call(dav, "MKCOL", q(folder) + "/").status == 201
    assert (dav.root / folder).is_dir()
    for i, name in enumerate(SPECIAL_NAMES):
        rel = q(folder) + "/" + q(name)
        data = ("%d:%s" % (i, name)).encode()
        assert dav_call(dav, "PUT", rel, body=data).status == 201, name
        assert (dav.root / folder / name).read_bytes() == data, name
        r = dav_call(dav, "GET", rel)
        assert (r.status, r.body) == (200, data), name
    r, hrefs = propfind(dav, q(folder) + "/", "1")
    assert r.status == 207
    base = dav.path + folder + "/"
    assert hrefs[0] == base
    assert sorted(hrefs[1:]) == sorted(base + n for n in SPECIAL_NAMES)
    # and the other direction: files created on disk are listed/served
    (dav.root / folder / "local \u00e9#.bin").write_bytes(b"L")
    r = dav_call(dav, "GET", q(folder) + "/" + q("local \u00e9#.bin"))
    assert (r.status, r.body) == (200, b"L")
    # move/delete with encoded names (Destination percent-encoded too)
    src = q(folder) + "/" + q(SPECIAL_NAMES[-2])
    dst = q(folder) + "/" + q("moved \u00e9#%.txt")
    r = dav_call(dav, "MOVE", src, headers={"Destination": abs_url(dav, dst)})
    assert r.status in (201, 204)
    assert (dav.root / folder / "moved \u00e9#%.txt").exists()
    assert dav_call(dav, "DELETE", q(folder) + "/").status == 204
    assert list(dav.root.iterdir()) == []


def test_files_created_locally_are_manageable_via_dav(dav) -> None:  # type: ignore[no-untyped-def]
    """The test process (maybe root) creates a tree; the server must be able
    to list, overwrite, move and delete it (Apache workers are not root)."""
    d = dav.root / "local" / "nested"
    d.mkdir(parents=True)
    (d / "f.txt").write_bytes(b"1")
    (dav.root / "local" / "g.txt").write_bytes(b"2")
    r, hrefs = propfind(dav, "local/", "1")
    assert r.status == 207 and len(hrefs) == 3
    assert dav_call(dav, "PUT", "local/nested/f.txt", body=b"new").status == 204
    assert dav_call(dav, "PUT", "local/nested/h.txt", body=b"h").status == 201
    r = dav_call(dav, "MOVE", "local/nested/", headers={"Destination": abs_url(dav, "moved/")})
    assert r.status == 201
    assert (dav.root / "moved" / "f.txt").read_bytes() == b"new"
    assert dav_call(dav, "DELETE", "local/").status == 204
    assert dav_call(dav, "DELETE", "moved/").status == 204
    assert list(dav.root.iterdir()) == []
    # and files written by the server can be modified by the test process
    assert dav_call(dav, "PUT", "srv.txt", body=b"s").status == 201
    (dav.root / "srv.txt").write_bytes(b"changed")
    assert dav_call(dav, "GET", "srv.txt").body == b"changed"


def test_keepalive_many_requests(dav) -> None:  # type: ignore[no-untyped-def]
    c = _conn(dav.url)
    try:
        for i in range(50):
            assert call(dav.url, "PUT", "k%d" % i, body=b"%d" % i, token=dav.token,
                        conn=c).status == 201
        for i in range(50):
            r = call(dav.url, "GET", "k%d" % i, token=dav.token, conn=c)
            assert (r.status, r.body) == (200, b"%d" % i)
    finally:
        c.close()


# --------------------------------------------------------------------------
# documented quirks (see the docstring of tests/servers.py)
# --------------------------------------------------------------------------


def test_quirks_common(dav) -> None:  # type: ignore[no-untyped-def]
    assert dav_call(dav, "MKCOL", "c/").status == 201
    assert dav_call(dav, "PUT", "c/f", body=b"x").status == 201
    assert dav_call(dav, "PROPFIND", "c/", headers={"Depth": "infinity"}).status == 403
    assert dav_call(dav, "DELETE", "c/", headers={"Depth": "0"}).status == 400
    assert dav_call(dav, "MKCOL", "m/", body=b"<x/>").status == 415
    r = dav_call(dav, "OPTIONS", "")
    assert r.status == 200
    assert any(v.startswith("1") for v in r.header_all("DAV")), r.headers
    # percent-encoding case differs, the decoded href does not
    assert dav_call(dav, "PUT", q("\u00e9"), body=b"e").status == 201
    r = dav_call(dav, "PROPFIND", "", headers={"Depth": "1"})
    raw = [e.text for e in ET.fromstring(r.body).iter(DAV_NS + "href")]
    enc = _expected(dav, nginx=0, apache=1)
    want = dav.path + ("%C3%A9" if enc == 0 else "%c3%a9")
    assert want in raw, raw


def test_quirks_nginx(nginx_server) -> None:  # type: ignore[no-untyped-def]
    s = nginx_server
    t = s.token
    u = s.url
    p = "/quirks-nginx-%d/" % monotonic_ns()
    assert call(u, "MKCOL", p, token=t).status == 201
    assert call(u, "MKCOL", p + "noslash", token=t).status == 409
    assert call(u, "PUT", p + "a/b/c.txt", body=b"x", token=t).status == 201  # parents
    assert call(u, "PUT", p + "x/", body=b"x", token=t).status == 409
    assert call(u, "PUT", p + "a", body=b"x", token=t).status == 409  # is a collection
    # PROPFIND on a collection without slash: 207, self href without slash
    r = call(u, "PROPFIND", p + "a", headers={"Depth": "1"}, token=t)
    assert r.status == 207
    hrefs = [e.text for e in ET.fromstring(r.body).iter(DAV_NS + "href")]
    assert hrefs == [p + "a", p + "a/b/"]
    # DELETE of a collection without slash
    assert call(u, "DELETE", p + "a", token=t).status == 409
    # trailing slash on a file
    assert call(u, "PUT", p + "file", body=b"f", token=t).status == 201
    assert call(u, "DELETE", p + "file/", token=t).status == 409
    r = call(u, "PROPFIND", p + "file/", headers={"Depth": "0"}, token=t)
    assert r.status == 207
    assert [e.text for e in ET.fromstring(r.body).iter(DAV_NS + "href")] == [p + "file/"]
    # GET on a collection
    r = call(u, "GET", p + "a", token=t)
    assert r.status == 301 and r.header("Location") == u + p + "a/"
    assert call(u, "GET", p + "a/", token=t).status == 403
    # file MOVE/COPY to a new name: 204
    assert call(u, "MOVE", p + "a/b/c.txt", headers={"Destination": u + p + "c.txt"},
                token=t).status == 204
    # collection MOVE needs slashes on both sides
    assert call(u, "MOVE", p + "a", headers={"Destination": u + p + "z"}, token=t).status == 400
    assert call(u, "MOVE", p + "a/", headers={"Destination": u + p + "z"}, token=t).status == 409
    # relative Destination is fine; foreign host is not
    assert call(u, "COPY", p + "c.txt", headers={"Destination": p + "d.txt"},
                token=t).status == 204
    assert call(u, "COPY", p + "c.txt", headers={"Destination": "http://example.org" + p + "e"},
                token=t).status == 400
    # destination parent missing: COPY 500 (!), MOVE creates the parents
    assert call(u, "COPY", p + "c.txt", headers={"Destination": u + p + "n1/e"},
                token=t).status == 500
    assert call(u, "MOVE", p + "d.txt", headers={"Destination": u + p + "n2/n3/e"},
                token=t).status == 204
    assert (s.root / p.strip("/") / "n2" / "n3" / "e").is_file()
    # PROPFIND without Depth == Depth 0
    r = call(u, "PROPFIND", p, token=t)
    assert r.status == 207 and len(list(ET.fromstring(r.body).iter(DAV_NS + "href"))) == 1
    assert call(u, "DELETE", p, token=t).status == 204


def test_quirks_apache(apache_server) -> None:  # type: ignore[no-untyped-def]
    s = apache_server
    t = s.token
    u = s.url
    p = "/quirks-apache-%d/" % monotonic_ns()
    assert call(u, "MKCOL", p, token=t).status == 201
    assert call(u, "MKCOL", p + "noslash", token=t).status == 201
    assert call(u, "PUT", p + "a/b/c.txt", body=b"x", token=t).status == 409  # no parents
    assert call(u, "MKCOL", p + "a/", token=t).status == 201
    # every method on a collection without trailing slash -> 301
    loc = u + p + "a/"
    for method, hdrs in (("GET", {}), ("PROPFIND", {"Depth": "1"}), ("DELETE", {}),
                         ("MOVE", {"Destination": u + p + "z/"}), ("PUT", {})):
        r = call(u, method, p + "a", headers=hdrs, body=b"" if method == "PUT" else None,
                 token=t)
        assert (method, r.status, r.header("Location")) == (method, 301, loc)
    assert call(u, "GET", p + "a/", token=t).status == 404
    # trailing slash on a file
    assert call(u, "PUT", p + "file", body=b"f", token=t).status == 201
    assert call(u, "DELETE", p + "file/", token=t).status == 400
    assert call(u, "PROPFIND", p + "file/", headers={"Depth": "0"}, token=t).status == 400
    assert call(u, "PUT", p + "x/", body=b"x", token=t).status == 201
    assert (s.root / p.strip("/") / "x").is_file()
    # relative Destination rejected
    assert call(u, "PUT", p + "f", body=b"f", token=t).status == 201
    assert call(u, "COPY", p + "f", headers={"Destination": p + "g"}, token=t).status == 400
    assert call(u, "COPY", p + "f", headers={"Destination": u + p + "g"}, token=t).status == 201
    # destination parent missing: COPY 409, but MOVE 500 (!)
    assert call(u, "COPY", p + "f", headers={"Destination": u + p + "nope/g"},
                token=t).status == 409
    assert call(u, "MOVE", p + "f", headers={"Destination": u + p + "nope/g"},
                token=t).status == 500
    # no Depth header on PROPFIND = infinity -> 403
    assert call(u, "PROPFIND", p, token=t).status == 403
    assert call(u, "DELETE", p, token=t).status == 204


# --------------------------------------------------------------------------
# TLS and static variants
# --------------------------------------------------------------------------


def test_tls_server_verifies_with_ca_file(nginx_tls_server) -> None:  # type: ignore[no-untyped-def]
    s = nginx_tls_server
    assert s.url.startswith("https://127.0.0.1:")
    assert s.ca_file and Path(s.ca_file).is_file()
    ctx = ssl.create_default_context(cafile=s.ca_file)
    if hasattr(ssl, "VERIFY_X509_STRICT"):  # default in Python >= 3.13
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c = _conn(s.url, context=ctx)
    try:
        assert call(s.url, "GET", "/", conn=c).status == 401
        r = call(s.url, "PROPFIND", "/", headers={"Depth": "0"}, token=s.token, conn=c)
        assert r.status == 207
        name = "tls-%d.bin" % monotonic_ns()
        assert call(s.url, "PUT", "/" + name, body=b"secret", token=s.token,
                    conn=c).status == 201
        assert (s.root / name).read_bytes() == b"secret"
    finally:
        c.close()
    # the certificate is also valid for "localhost"
    lc = http.client.HTTPSConnection("localhost", s.port, timeout=10, context=ctx)
    try:
        lc.request("GET", "/")
        assert lc.getresponse().status == 401
    finally:
        lc.close()


def test_tls_server_fails_without_ca_file(nginx_tls_server) -> None:  # type: ignore[no-untyped-def]
    s = nginx_tls_server
    with pytest.raises(ssl.SSLError) as ei:  # SSLCertVerificationError on 3.7+
        call(s.url, "GET", "/", token=s.token)  # system CAs only
    assert ei.value.reason == "CERTIFICATE_VERIFY_FAILED"
    # an SSLError; on Python 3.6 the name check is Python's own: CertificateError
    with pytest.raises((ssl.SSLError, ssl.CertificateError)):
        # wrong hostname for the certificate (it is only for 127.0.0.1/localhost)
        ctx = ssl.create_default_context(cafile=s.ca_file)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="example.org"):
                pass
    # plain http on the https port does not work either
    r = call("http://127.0.0.1:%d" % s.port, "GET", "/")
    assert r.status == 400


def test_static_server_needs_no_token(nginx_static_server) -> None:  # type: ignore[no-untyped-def]
    s = nginx_static_server
    assert not s.requires_token and s.ca_file is None
    name = "static \u00e9 #%d.bin" % monotonic_ns()
    (s.root / name).write_bytes(b"public data")
    r = call(s.url, "GET", "/" + q(name))
    assert (r.status, r.body) == (200, b"public data")
    r = call(s.url, "GET", "/" + q(name), token="whatever")
    assert (r.status, r.body) == (200, b"public data")
    assert call(s.url, "HEAD", "/" + q(name)).header("Content-Length") == "11"
    assert call(s.url, "GET", "/missing").status == 404
    assert call(s.url, "PUT", "/" + q(name), body=b"x").status == 405
    assert call(s.url, "PROPFIND", "/", headers={"Depth": "1"}).status == 405
    assert (s.root / name).read_bytes() == b"public data"


# --------------------------------------------------------------------------
# lifecycle: start/stop leave nothing behind
# --------------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("kind", ["nginx", "apache"])
def test_start_stop_leaves_nothing_running(kind) -> None:  # type: ignore[no-untyped-def]
    reason = servers.nginx_missing_reason() if kind == "nginx" else \
        servers.apache_missing_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="ctadata-lifecycle-"))
    os.chmod(str(base), 0o755)
    try:
        start = servers.start_apache if kind == "apache" else servers.start_nginx
        t0 = time.monotonic()
        with start(base / "root", "tok-123_ABC", base / "work") as srv:
            startup = time.monotonic() - t0
            assert srv.alive()
            assert call(srv.url, "GET", "/").status == 401
            assert call(srv.url, "GET", "/", token="tok-123_ABC").status in (403, 404)
            pgid = srv.pid
            assert _group_alive(pgid)
            port = srv.port
        assert startup < 5, startup
        assert not srv.alive()
        assert not _group_alive(pgid)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        srv.stop()  # idempotent
        # nothing written outside workdir/root
        assert sorted(p.name for p in base.iterdir()) == ["root", "work"]
    finally:
        import shutil
        shutil.rmtree(str(base), ignore_errors=True)
