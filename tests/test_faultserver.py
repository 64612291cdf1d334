"""Tests of tests/faultserver.py itself, driven with http.client and raw sockets."""

import base64
import email.utils
import hashlib
import http.client
import os
import socket
import sys
import time
import zlib
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from faultserver import FaultServer  # noqa: E402

DATA = bytes(range(256)) * 40  # 10240 bytes
AUTH = {"Authorization": "Bearer tok"}
D = "{DAV:}"
DC = "{http://www.dcache.org/2013/webdav}"
SRM = "{http://srm.lbl.gov/StorageResourceManager}"


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a b%.txt").write_bytes(b"hello")
    (tmp_path / "dir" / "sub").mkdir()
    return tmp_path


def _server(root, **kw):
    srv = FaultServer(root, **kw)
    srv.start()
    return srv


@pytest.fixture
def srv(root):
    with FaultServer(root) as s:
        yield s
    assert s.errors == []


@pytest.fixture
def rsrv(root):
    with FaultServer(root, redirect_get=True, redirect_put=True) as s:
        yield s
    assert s.errors == []


def conn_for(url, timeout=5):
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(url, method, path, body=None, headers=None, auth=True, conn=None):
    c = conn or conn_for(url)
    h = dict(AUTH if auth else {})
    h.update(headers or {})
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r, r.read()
    finally:
        if conn is None:
            c.close()


def raw(url, head, body=b""):
    """Open a socket, send raw request bytes, return the socket."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=5)
    s.sendall(head + body)
    return s


def read_head(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def read_all(sock):
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def adler(b):
    return "%08x" % (zlib.adler32(b) & 0xFFFFFFFF)


def md5b64(b):
    return base64.b64encode(hashlib.md5(b).digest()).decode()


def parse_ms(data):
    tree = ElementTree.fromstring(data)
    out = {}
    for resp in tree.findall(D + "response"):
        href = resp.find(D + "href").text
        stats = {}
        for ps in resp.findall(D + "propstat"):
            code = int(ps.find(D + "status").text.split()[1])
            for p in ps.find(D + "prop"):
                stats[p.tag] = (code, p)
        out[href] = stats
    return out


PROPS = ('<?xml version="1.0"?><propfind xmlns="DAV:" xmlns:dc="http://www.dcache.org/2013/'
         'webdav" xmlns:srm="http://srm.lbl.gov/StorageResourceManager"><prop><resourcetype/>'
         '<getcontentlength/><getlastmodified/><getetag/><dc:Checksums/><srm:FileLocality/>'
         '</prop></propfind>')


# ------------------------------------------------------------------ basics

def test_urls_and_lifecycle(root):
    s = FaultServer(root)
    assert s.url.startswith("http://127.0.0.1:") and not s.url.endswith("/")
    assert s.pool_url.startswith("http://127.0.0.1:") and s.pool_url != s.url
    with s:
        r, _ = request(s.url, "HEAD", "/data.bin")
        assert r.status == 200
    s.stop()  # idempotent
    with pytest.raises(OSError):
        request(s.url, "HEAD", "/data.bin")


def test_auth_required_on_door(srv):
    r, _ = request(srv.url, "GET", "/data.bin", auth=False)
    assert r.status == 401
    assert r.getheader("WWW-Authenticate").startswith("Bearer")
    r, _ = request(srv.url, "GET", "/data.bin", headers={"Authorization": "Bearer nope"},
                   auth=False)
    assert r.status == 401
    r, data = request(srv.url, "GET", "/data.bin")
    assert r.status == 200 and data == DATA


def test_get_headers_and_counters(srv, root):
    c = conn_for(srv.url)
    r, data = request(srv.url, "GET", "/data.bin", conn=c)
    st = os.stat(root / "data.bin")
    assert data == DATA
    assert r.getheader("Content-Length") == str(len(DATA))
    assert r.getheader("ETag") == '"%d-%d"' % (st.st_size, st.st_mtime_ns)
    lm = email.utils.parsedate_to_datetime(r.getheader("Last-Modified"))
    assert abs(lm.timestamp() - st.st_mtime) < 1
    assert r.getheader("Digest") is None
    r, data = request(srv.url, "HEAD", "/data.bin", conn=c)  # same keep-alive conn
    assert r.status == 200 and data == b""
    assert r.getheader("Content-Length") == str(len(DATA))
    c.close()
    assert srv.bytes_sent["/data.bin"] == len(DATA)
    assert srv.method_counts["GET"] == 1 and srv.method_counts["HEAD"] == 1
    assert srv.count("GET", "/data.bin") == 1
    rec = srv.find("GET")[0]
    assert rec.server == "door" and rec.status == 200 and rec.body_len == 0
    assert rec.headers["authorization"] == "Bearer tok"
    assert "AUTHORIZATION" in rec.headers


def test_missing_and_bad_paths(srv):
    assert request(srv.url, "GET", "/nope")[0].status == 404
    assert request(srv.url, "GET", "/../etc/passwd")[0].status == 400
    assert request(srv.url, "GET", "/dir/%2e%2e/data.bin")[0].status == 400
    assert request(srv.url, "GET", "/a%00b")[0].status == 400


@pytest.mark.parametrize("rng,status,cr,body", [
    ("bytes=100-", 206, "bytes 100-10239/10240", DATA[100:]),
    ("bytes=100-199", 206, "bytes 100-199/10240", DATA[100:200]),
    ("bytes=10000-99999", 206, "bytes 10000-10239/10240", DATA[10000:]),
    ("bytes=-10", 206, "bytes 10230-10239/10240", DATA[-10:]),
    ("bytes=0-1,5-6", 200, None, DATA),
    ("bytes=20000-", 416, "bytes */10240", None),
], ids=["open", "closed", "clamped", "suffix", "multi", "unsatisfiable"])
def test_range(srv, rng, status, cr, body):
    r, data = request(srv.url, "GET", "/data.bin", headers={"Range": rng})
    assert r.status == status
    assert r.getheader("Content-Range") == cr
    if body is not None:
        assert data == body
        assert int(r.getheader("Content-Length")) == len(body)


def test_if_range(srv):
    r, _ = request(srv.url, "HEAD", "/data.bin")
    etag, lm = r.getheader("ETag"), r.getheader("Last-Modified")
    for good in (etag, lm):
        r, data = request(srv.url, "GET", "/data.bin",
                          headers={"Range": "bytes=10-", "If-Range": good})
        assert r.status == 206 and data == DATA[10:]
    for bad in ('"0-0"', "Mon, 11 May 2020 12:13:17 GMT"):
        r, data = request(srv.url, "GET", "/data.bin",
                          headers={"Range": "bytes=10-", "If-Range": bad})
        assert r.status == 200 and data == DATA


def test_digest(srv, root):
    get = lambda want, m="GET", **h: request(  # noqa: E731
        srv.url, m, "/data.bin", headers=dict({"Want-Digest": want}, **h))[0]
    assert get("adler32").getheader("Digest") == "adler32=" + adler(DATA)
    assert get("ADLER32, md5;q=0.5").getheader("Digest") == \
        "adler32=%s,md5=%s" % (adler(DATA), md5b64(DATA))
    assert get("md5;q=0.3,adler32;q=0", "HEAD").getheader("Digest") == "md5=" + md5b64(DATA)
    assert get("crc99").getheader("Digest") is None
    # range answers carry the digest of the whole file
    assert get("adler32", Range="bytes=5-9").getheader("Digest") == "adler32=" + adler(DATA)
    srv.digest = False
    assert get("adler32").getheader("Digest") is None


# ------------------------------------------------------------------ PUT

def test_put_create_replace_and_digest(srv, root):
    r, _ = request(srv.url, "PUT", "/new.bin", body=b"abc", headers={"Want-Digest": "adler32,md5"})
    assert r.status == 201
    assert r.getheader("Digest") == "adler32=%s,md5=%s" % (adler(b"abc"), md5b64(b"abc"))
    assert (root / "new.bin").read_bytes() == b"abc"
    r, _ = request(srv.url, "PUT", "/new.bin", body=b"xyz!")
    assert r.status == 204
    assert (root / "new.bin").read_bytes() == b"xyz!"
    assert srv.find("PUT")[-1].body_len == 4
    assert not [n for n in os.listdir(root) if n.startswith(".faultserver")]


def test_put_chunked(srv, root):
    c = conn_for(srv.url)
    c.request("PUT", "/chunked.bin", body=iter([b"ab", b"cde", b""]),
              headers=dict(AUTH), encode_chunked=True)
    r = c.getresponse()
    r.read()
    assert r.status == 201
    assert (root / "chunked.bin").read_bytes() == b"abcde"
    # connection still usable after a chunked body
    r, data = request(srv.url, "GET", "/chunked.bin", conn=c)
    assert data == b"abcde"
    c.close()


def test_put_content_md5(srv, root):
    r, _ = request(srv.url, "PUT", "/ok.bin", body=b"good", headers={"Content-MD5": md5b64(b"good")})
    assert r.status == 201
    r, data = request(srv.url, "PUT", "/bad.bin", body=b"evil",
                      headers={"Content-MD5": md5b64(b"good")})
    assert r.status == 400 and b"Checksum mismatch" in data
    assert (root / "bad.bin").read_bytes() == b"evil"  # dCache issue 7862
    r, _ = request(srv.url, "PUT", "/bad2.bin", body=b"x", headers={"Content-MD5": "zz"})
    assert r.status == 400


def test_put_conflicts(srv):
    assert request(srv.url, "PUT", "/no/such/dir/f", body=b"x")[0].status == 409
    assert request(srv.url, "PUT", "/dir", body=b"x")[0].status == 405


def test_unauthorized_put_keeps_connection_usable(srv):
    c = conn_for(srv.url)
    r, _ = request(srv.url, "PUT", "/x.bin", body=b"12345", auth=False, conn=c)
    assert r.status == 401
    r, _ = request(srv.url, "HEAD", "/data.bin", conn=c)
    assert r.status == 200
    c.close()


# ------------------------------------------------------------------ namespace

def test_mkcol_delete_move(srv, root):
    assert request(srv.url, "MKCOL", "/newdir")[0].status == 201
    assert (root / "newdir").is_dir()
    assert request(srv.url, "MKCOL", "/newdir")[0].status == 405
    assert request(srv.url, "MKCOL", "/x/y")[0].status == 409
    assert request(srv.url, "MOVE", "/data.bin",
                   headers={"Destination": srv.url + "/newdir/m%20v.bin"})[0].status == 201
    assert (root / "newdir" / "m v.bin").read_bytes() == DATA
    (root / "other").write_bytes(b"o")
    assert request(srv.url, "MOVE", "/other",
                   headers={"Destination": "/newdir/m%20v.bin", "Overwrite": "F"})[0].status == 412
    assert request(srv.url, "MOVE", "/other",
                   headers={"Destination": "/newdir/m%20v.bin"})[0].status == 204
    assert (root / "newdir" / "m v.bin").read_bytes() == b"o"
    assert request(srv.url, "MOVE", "/gone", headers={"Destination": "/z"})[0].status == 404
    assert request(srv.url, "DELETE", "/newdir/m%20v.bin")[0].status == 204
    assert request(srv.url, "DELETE", "/dir")[0].status == 204
    assert not (root / "dir").exists()
    assert request(srv.url, "DELETE", "/dir")[0].status == 404


def test_propfind_file(srv, root):
    srv.locality["/dir/a b%.txt"] = "NEARLINE"
    r, data = request(srv.url, "PROPFIND", "/dir/a%20b%25.txt", body=PROPS, headers={"Depth": "0"})
    assert r.status == 207
    ms = parse_ms(data)
    assert list(ms) == ["/dir/a%20b%25.txt"]
    p = ms["/dir/a%20b%25.txt"]
    assert p[D + "getcontentlength"][1].text == "5"
    assert p[D + "resourcetype"][0] == 200 and len(p[D + "resourcetype"][1]) == 0
    assert p[DC + "Checksums"][1].text == "adler32=%s,md5=%s" % (adler(b"hello"), md5b64(b"hello"))
    assert p[SRM + "FileLocality"][1].text == "NEARLINE"
    st = os.stat(root / "dir" / "a b%.txt")
    assert p[D + "getetag"][1].text == '"%d-%d"' % (st.st_size, st.st_mtime_ns)
    email.utils.parsedate_to_datetime(p[D + "getlastmodified"][1].text)


def test_propfind_dir_depth1(srv):
    r, data = request(srv.url, "PROPFIND", "/dir", body=PROPS, headers={"Depth": "1"})
    assert r.status == 207
    ms = parse_ms(data)
    assert list(ms) == ["/dir/", "/dir/a%20b%25.txt", "/dir/sub/"]
    d = ms["/dir/"]
    assert d[D + "resourcetype"][1].find(D + "collection") is not None
    assert d[D + "getcontentlength"][0] == 404  # second propstat, as dCache
    assert d[DC + "Checksums"][0] == 404
    assert ms["/dir/a%20b%25.txt"][SRM + "FileLocality"][1].text == "ONLINE"


def test_propfind_missing_props_allprop_and_depth(srv):
    srv.missing_props["/data.bin"] = {"Checksums", "{DAV:}getetag"}
    ms = parse_ms(request(srv.url, "PROPFIND", "/data.bin", body=PROPS,
                          headers={"Depth": "0"})[1])
    p = ms["/data.bin"]
    assert p[DC + "Checksums"][0] == 404 and p[D + "getetag"][0] == 404
    assert p[D + "getcontentlength"][0] == 200
    ms = parse_ms(request(srv.url, "PROPFIND", "/", headers={"Depth": "1"})[1])
    assert "/" in ms and "/data.bin" in ms and "/dir/" in ms
    assert DC + "Checksums" not in ms["/data.bin"]
    assert request(srv.url, "PROPFIND", "/", headers={"Depth": "infinity"})[0].status == 403
    assert request(srv.url, "PROPFIND", "/")[0].status == 403
    assert request(srv.url, "PROPFIND", "/nope", headers={"Depth": "0"})[0].status == 404


# ------------------------------------------------------------------ redirects

def test_redirect_get_single_use_pool(rsrv):
    r, _ = request(rsrv.url, "GET", "/dir/a%20b%25.txt")
    assert r.status == 307
    loc = r.getheader("Location")
    assert loc.startswith(rsrv.pool_url + "/dir/a%20b%25.txt?dcache-http-uuid=")
    u = urlsplit(loc)
    r, data = request(rsrv.pool_url, "GET", u.path + "?" + u.query, auth=False)
    assert r.status == 200 and data == b"hello"
    r, data = request(rsrv.pool_url, "GET", u.path + "?" + u.query, auth=False)
    assert r.status == 404 and b"uuid expired" in data
    pool = rsrv.find(server="pool")
    assert len(pool) == 2 and all("Authorization" not in p.headers for p in pool)
    # an Authorization that does reach the pool is recorded (and not needed)
    loc = request(rsrv.url, "GET", "/data.bin")[0].getheader("Location")
    u = urlsplit(loc)
    r, data = request(rsrv.pool_url, "GET", u.path + "?" + u.query)
    assert r.status == 200 and data == DATA
    assert rsrv.find(server="pool")[-1].headers["Authorization"] == "Bearer tok"
    # HEAD is answered by the door itself
    assert request(rsrv.url, "HEAD", "/data.bin")[0].status == 200


def test_redirect_get_uuid_bound_to_path(rsrv):
    loc = request(rsrv.url, "GET", "/data.bin")[0].getheader("Location")
    query = urlsplit(loc).query
    assert request(rsrv.pool_url, "GET", "/dir/a%20b%25.txt?" + query, auth=False)[0].status == 404
    assert request(rsrv.pool_url, "GET", "/data.bin", auth=False)[0].status == 400


def test_redirect_put_with_expect(rsrv, root):
    head = ("PUT /up.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode()
    s = raw(rsrv.url, head)
    resp = read_head(s)
    assert resp.startswith(b"HTTP/1.1 307"), resp  # no 100 Continue first
    assert b"connection: close" in resp.lower()
    loc = [ln.split(b": ", 1)[1].decode() for ln in resp.split(b"\r\n")
           if ln.lower().startswith(b"location:")][0]
    assert read_all(s) == b""  # door closed the connection
    s.close()
    assert rsrv.find("PUT")[0].body_len == 0
    assert not rsrv.find("PUT")[0].sent_continue

    u = urlsplit(loc)
    assert loc.startswith(rsrv.pool_url)
    head = ("PUT %s?%s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\nWant-Digest: adler32\r\n\r\n" % (u.path, u.query)).encode()
    s = raw(rsrv.pool_url, head)
    assert read_head(s) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"hello")
    r = http.client.HTTPResponse(s)
    r.begin()
    r.read()
    assert r.status == 201 and r.getheader("Digest") == "adler32=" + adler(b"hello")
    s.close()
    assert (root / "up.bin").read_bytes() == b"hello"
    pool = rsrv.find(server="pool")
    assert pool[0].sent_continue and "Authorization" not in pool[0].headers


def test_redirect_put_without_expect_is_proxied(rsrv, root):
    r, _ = request(rsrv.url, "PUT", "/px.bin", body=b"proxied")
    assert r.status == 201
    assert (root / "px.bin").read_bytes() == b"proxied"
    assert rsrv.find(server="pool") == []


def test_door_sends_100_when_not_redirecting(srv, root):
    head = ("PUT /c.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
            "Content-Length: 3\r\nExpect: 100-continue\r\n\r\n").encode()
    s = raw(srv.url, head)
    assert read_head(s) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"abc")
    r = http.client.HTTPResponse(s)
    r.begin()
    assert r.status == 201
    s.close()
    assert (root / "c.bin").read_bytes() == b"abc"


def test_expect_without_auth_gets_no_100(srv):
    head = ("PUT /c.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    s = raw(srv.url, head)
    assert read_head(s).startswith(b"HTTP/1.1 401")
    s.close()


def test_pool_scheme_host_placeholder(root):
    with FaultServer(root, redirect_get=True, pool_scheme_host="http://localhost:{port}") as s:
        loc = request(s.url, "GET", "/data.bin")[0].getheader("Location")
        assert loc.startswith("http://localhost:%d/data.bin?dcache-http-uuid=" % s.pool_port)
        u = urlsplit(loc)
        r, data = request(s.pool_url, "GET", u.path + "?" + u.query, auth=False)
        assert data == DATA


def _can_bind(host):
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_bind("127.0.0.2"), reason="127.0.0.2 not routable here")
def test_pool_scheme_host_other_loopback(root):
    with FaultServer(root, redirect_get=True, pool_scheme_host="http://127.0.0.2") as s:
        assert s.pool_url == "http://127.0.0.2:%d" % s.pool_port
        loc = request(s.url, "GET", "/data.bin")[0].getheader("Location")
        assert loc.startswith("http://127.0.0.2:%d/" % s.pool_port)
        r, data = request(loc, "GET", loc[len(s.pool_url):], auth=False)
        assert r.status == 200 and data == DATA


# ------------------------------------------------------------------ faults

def test_add_fault_validation(srv):
    with pytest.raises(ValueError):
        srv.add_fault("explode")
    with pytest.raises(ValueError):
        srv.add_fault("truncate", bogus=1)
    with pytest.raises(ValueError):
        srv.add_fault("redirect")
    with pytest.raises(ValueError):
        srv.add_fault("status", server="elsewhere")


def test_fault_truncate(srv):
    f = srv.add_fault("truncate", method="GET", path="/data.bin", after=100)
    c = conn_for(srv.url)
    c.request("GET", "/data.bin", headers=AUTH)
    r = c.getresponse()
    assert r.getheader("Content-Length") == str(len(DATA))
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert e.value.partial == DATA[:100]
    c.close()
    assert f.hits == 1 and f.remaining == 0
    assert srv.bytes_sent["/data.bin"] == 100
    assert request(srv.url, "GET", "/data.bin")[1] == DATA  # consumed


def test_fault_truncate_is_fin_not_rst(srv):
    srv.add_fault("truncate", after=10)
    s = raw(srv.url, b"GET /data.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
    got = read_all(s)  # raises on RST
    s.close()
    assert got.endswith(b"\r\n\r\n" + DATA[:10])


def test_fault_reset_before_answer(srv):
    srv.add_fault("reset", method="GET")
    s = raw(srv.url, b"GET /data.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
    with pytest.raises(ConnectionResetError):
        read_all(s)
    s.close()
    assert srv.find("GET")[0].status is None and srv.find("GET")[0].fault == "reset"


def test_fault_reset_after_bytes(srv):
    srv.add_fault("reset", path="/data.bin", after=50)
    c = conn_for(srv.url)
    c.request("GET", "/data.bin", headers=AUTH)
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        r.read()
    c.close()
    assert srv.bytes_sent["/data.bin"] == 50


def test_fault_reset_during_put(srv, root):
    srv.add_fault("reset", method="PUT", after=3)
    with pytest.raises(ConnectionError):
        request(srv.url, "PUT", "/r.bin", body=b"0123456789")
    assert srv.find("PUT")[0].body_len == 3
    assert not (root / "r.bin").exists()
    assert not [n for n in os.listdir(root) if n.startswith(".faultserver")]


def test_fault_status_then_ok_and_times(srv):
    srv.add_fault("status", method="GET", times=2)
    c = conn_for(srv.url)
    for _ in range(2):
        r, data = request(srv.url, "GET", "/data.bin", conn=c)
        assert r.status == 503 and r.getheader("Retry-After") == "1" and data == b""
    r, data = request(srv.url, "GET", "/data.bin", conn=c)
    assert r.status == 200 and data == DATA
    c.close()


def test_fault_status_custom_and_on_put_body_drained(srv, root):
    srv.add_fault("status", method="PUT", status=500, headers={}, body=b"boom")
    c = conn_for(srv.url)
    r, data = request(srv.url, "PUT", "/s.bin", body=b"x" * 1000, conn=c)
    assert r.status == 500 and data == b"boom"
    r, _ = request(srv.url, "PUT", "/s.bin", body=b"y", conn=c)  # same connection
    assert r.status == 201
    c.close()


def test_fault_forever_prefix_and_method_match(srv):
    srv.add_fault("status", method=["HEAD"], path="/dir/*", times=None, status=502)
    for _ in range(3):
        assert request(srv.url, "HEAD", "/dir/a%20b%25.txt")[0].status == 502
    assert request(srv.url, "GET", "/dir/a%20b%25.txt")[0].status == 200
    assert request(srv.url, "HEAD", "/data.bin")[0].status == 200


def test_fault_exact_path_ignores_trailing_slash(srv):
    srv.add_fault("status", path="/dir/", status=500)
    assert request(srv.url, "GET", "/dir/sub")[0].status == 200
    assert request(srv.url, "GET", "/dir")[0].status == 500


def test_fault_order_is_insertion_order(srv):
    srv.add_fault("truncate", path="/data.bin", after=1)
    srv.add_fault("status", path="/data.bin", status=500)
    with pytest.raises(http.client.IncompleteRead):
        request(srv.url, "GET", "/data.bin")
    assert request(srv.url, "GET", "/data.bin")[0].status == 500
    assert request(srv.url, "GET", "/data.bin")[0].status == 200


def test_fault_stall(srv):
    srv.add_fault("stall", method="HEAD", seconds=0.3)
    t = time.monotonic()
    assert request(srv.url, "HEAD", "/data.bin")[0].status == 200
    assert time.monotonic() - t >= 0.3
    t = time.monotonic()
    request(srv.url, "HEAD", "/data.bin")
    assert time.monotonic() - t < 0.25


def test_fault_stall_after_bytes_hits_client_timeout(srv):
    srv.add_fault("stall", method="GET", seconds=2, after=10)
    c = conn_for(srv.url, timeout=0.3)
    c.request("GET", "/data.bin", headers=AUTH)
    r = c.getresponse()
    assert r.read(10) == DATA[:10]
    with pytest.raises(socket.timeout):
        r.read(1)
    c.close()


def test_stop_cuts_stall_short(root):
    s = _server(root)
    s.add_fault("stall", seconds=30)
    c = conn_for(s.url, timeout=5)
    c.request("HEAD", "/data.bin", headers=AUTH)
    time.sleep(0.1)
    t = time.monotonic()
    s.stop()
    assert time.monotonic() - t < 1
    c.close()


def test_fault_ignore_range(srv):
    srv.add_fault("ignore_range")
    r, data = request(srv.url, "GET", "/data.bin", headers={"Range": "bytes=100-"})
    assert r.status == 200 and data == DATA and r.getheader("Content-Range") is None


def test_fault_ignore_range_waits_for_a_range_request(srv):
    f = srv.add_fault("ignore_range")
    request(srv.url, "GET", "/data.bin")
    assert f.hits == 0
    assert request(srv.url, "GET", "/data.bin", headers={"Range": "bytes=1-"})[0].status == 200
    assert f.hits == 1


def test_fault_wrong_content_range(srv):
    srv.add_fault("wrong_content_range")
    r, data = request(srv.url, "GET", "/data.bin", headers={"Range": "bytes=100-199"})
    assert r.status == 206
    assert r.getheader("Content-Range") == "bytes 0-99/10240"
    assert data == DATA[:100]
    srv.add_fault("wrong_content_range", start=7)
    r, data = request(srv.url, "GET", "/data.bin", headers={"Range": "bytes=100-"})
    assert r.getheader("Content-Range").startswith("bytes 7-")
    assert data == DATA[7:7 + len(DATA) - 100]


def test_fault_wrong_digest(srv):
    srv.add_fault("wrong_digest", method="GET")
    r, data = request(srv.url, "GET", "/data.bin", headers={"Want-Digest": "adler32,md5"})
    algos = dict(kv.split("=", 1) for kv in r.getheader("Digest").split(","))
    assert data == DATA
    assert algos["adler32"] != adler(DATA) and len(algos["adler32"]) == 8
    assert algos["md5"] != md5b64(DATA)
    srv.add_fault("wrong_digest", method="PUT")
    r, _ = request(srv.url, "PUT", "/w.bin", body=b"abc", headers={"Want-Digest": "adler32"})
    assert r.status == 201 and r.getheader("Digest") != "adler32=" + adler(b"abc")


def test_fault_redirect(srv):
    srv.add_fault("redirect", location="http://elsewhere.invalid/x", status=302)
    r, _ = request(srv.url, "GET", "/data.bin")
    assert r.status == 302 and r.getheader("Location") == "http://elsewhere.invalid/x"


def test_fault_hostile_propfind(srv):
    body = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x "boom">]>'
            b'<d:multistatus xmlns:d="DAV:"><d:response><d:href>../../etc/passwd</d:href>'
            b'</d:response></d:multistatus>')
    srv.add_fault("hostile_propfind", body=body)
    r, data = request(srv.url, "PROPFIND", "/dir", headers={"Depth": "1"}, body=PROPS)
    assert r.status == 207 and data == body
    r, data = request(srv.url, "PROPFIND", "/dir", headers={"Depth": "1"}, body=PROPS)
    assert b"../../etc/passwd" not in data


def test_fault_insufficient_storage(srv, root):
    srv.add_fault("insufficient_storage")
    r, _ = request(srv.url, "PUT", "/full.bin", body=b"abc")
    assert r.status == 507 and not (root / "full.bin").exists()
    assert srv.find("PUT")[0].body_len == 3


def test_fault_corrupt(srv):
    srv.add_fault("corrupt")
    r, data = request(srv.url, "GET", "/data.bin", headers={"Want-Digest": "md5"})
    assert len(data) == len(DATA) and data != DATA
    assert sum(a != b for a, b in zip(data, DATA)) == 1 and data[0] == DATA[0] ^ 0xFF
    assert r.getheader("Digest") == "md5=" + md5b64(DATA)
    srv.add_fault("corrupt", offset=5000)
    r, data = request(srv.url, "GET", "/data.bin", headers={"Range": "bytes=4000-"})
    assert data[1000] == DATA[5000] ^ 0xFF and data[:1000] == DATA[4000:5000]


def test_data_faults_skip_redirecting_door(rsrv):
    f = rsrv.add_fault("truncate", method="GET", after=3)
    r, _ = request(rsrv.url, "GET", "/data.bin")
    assert r.status == 307 and f.hits == 0
    u = urlsplit(r.getheader("Location"))
    with pytest.raises(http.client.IncompleteRead):
        request(rsrv.pool_url, "GET", u.path + "?" + u.query, auth=False)
    assert f.hits == 1
    assert rsrv.find(server="pool")[0].fault == "truncate"


def test_status_fault_aimed_at_pool(rsrv):
    rsrv.add_fault("status", server="pool", status=503)
    r, _ = request(rsrv.url, "GET", "/data.bin")
    assert r.status == 307
    u = urlsplit(r.getheader("Location"))
    path = u.path + "?" + u.query
    assert request(rsrv.pool_url, "GET", path, auth=False)[0].status == 503
    # the uuid was used up by the failed attempt
    assert request(rsrv.pool_url, "GET", path, auth=False)[0].status == 404


def test_unauthenticated_request_takes_no_fault(srv):
    f = srv.add_fault("status")
    assert request(srv.url, "GET", "/data.bin", auth=False)[0].status == 401
    assert f.hits == 0
    assert request(srv.url, "GET", "/data.bin")[0].status == 503


def test_propfind_truncate(srv):
    srv.add_fault("truncate", method="PROPFIND", after=20)
    with pytest.raises(http.client.IncompleteRead):
        request(srv.url, "PROPFIND", "/dir", headers={"Depth": "1"})


def test_malformed_bodies_do_not_break_the_server(srv):
    s = raw(srv.url, b"PUT /m.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                     b"Content-Length: abc\r\n\r\n")
    assert read_all(s).startswith(b"HTTP/1.1 400")
    s.close()
    s = raw(srv.url, b"PUT /m.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert read_all(s) == b""
    s.close()
    assert request(srv.url, "HEAD", "/data.bin")[0].status == 200


# -- fault kinds added for issue 10 (hold, outage, store_as) ----------------------

def test_hold_pauses_an_answer_at_each_point_until_released(srv):
    import threading
    before, middle = threading.Event(), threading.Event()
    srv.add_fault("hold", method="GET", path="/data.bin", after=[None, 4096],
                  event=[before, middle])
    c = conn_for(srv.url)
    c.request("GET", "/data.bin", headers=AUTH)
    c.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):                 # held before the answer
        c.getresponse()
    c.sock.settimeout(5)
    before.set()
    head = read_head(c.sock)
    assert head.startswith(b"HTTP/1.1 200")
    got = b""
    while len(got) < 4096:
        got += c.sock.recv(4096 - len(got))
    c.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):                 # held after 4096 bytes
        c.sock.recv(1)
    c.sock.settimeout(5)
    middle.set()
    while len(got) < len(DATA):
        got += c.sock.recv(65536)
    assert got == DATA
    c.close()


def test_hold_gives_up_after_its_seconds(srv):
    import threading
    srv.add_fault("hold", method="GET", event=threading.Event(), seconds=0.2)
    t0 = time.monotonic()
    assert request(srv.url, "GET", "/data.bin")[1] == DATA
    assert 0.15 < time.monotonic() - t0 < 5


def test_outage_resets_every_request_for_its_seconds_then_ends(srv):
    f = srv.add_fault("outage", method="GET", seconds=0.5, times=None)
    t0 = time.monotonic()
    resets = 0
    while True:
        try:
            r, body = request(srv.url, "GET", "/data.bin")
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            resets += 1
            time.sleep(0.05)
    assert body == DATA and r.status == 200
    assert resets >= 3 and 0.45 < time.monotonic() - t0 < 5
    assert request(srv.url, "HEAD", "/data.bin")[0].status == 200   # GET only
    assert f.hits == resets


def test_store_as_keeps_the_upload_under_another_name(srv, root):
    srv.add_fault("store_as", method="PUT", path="/dir/q?.txt", name="q")
    r, _ = request(srv.url, "PUT", "/dir/q%3F.txt", body=b"question")
    assert r.status == 201
    assert (root / "dir" / "q").read_bytes() == b"question"
    assert not (root / "dir" / "q?.txt").exists()
    with pytest.raises(ValueError):
        srv.add_fault("store_as", method="PUT")                 # name= is required
