"""The two XRootD test instances (tests/servers.py start_xrootd) and the
behaviour of XRootD 5.5's HTTP door that the client has to live with.

Like tests/test_servers.py, only http.client/ssl/subprocess are used here --
no ctadata -- so a failure points at the fixtures or at XRootD.  The
test_quirk_* tests pin what /work/notes/xrootd-names.md and the XRootD
section of tests/servers.py describe: if a newer XRootD changes one, the
client's workaround must be looked at again.
"""

import base64
import http.client
import json
import os
import shutil
import ssl
import subprocess
import urllib.parse
import xml.etree.ElementTree as ET

import pytest

import servers
from conftest import dav_target


@pytest.fixture(params=["xrootd", "xrootd_open"])
def xrd(request):
    """An empty folder on each XRootD instance (macaroons / open)."""
    yield from dav_target(request, request.param)


class _RawPath(http.client.HTTPSConnection):
    """Sends the request target exactly as given (spaces, UTF-8): what a
    careless client would send."""

    def _validate_path(self, url):
        pass

    def _encode_request(self, request):
        return request.encode("utf-8")


def call(target, method, path, body=None, headers=None, auth=True, raw=False):
    """One request to ``target.url + path`` (*path* sent as given: encode it
    yourself); returns (status, headers dict with lower-case names, body)."""
    ctx = ssl.create_default_context(cafile=target.ca_file)
    u = urllib.parse.urlsplit(target.url)
    cls = _RawPath if raw else http.client.HTTPSConnection
    conn = cls(u.hostname, u.port, context=ctx, timeout=30)
    h = dict(headers or {})
    if auth and target.server.requires_token:
        h["Authorization"] = "Bearer " + target.token
    try:
        conn.request(method, u.path + path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def hrefs(target, path, depth):
    status, _, body = call(target, "PROPFIND", path, headers={"Depth": str(depth)})
    assert status == 207, (status, body)
    return [e.text for e in ET.fromstring(body).iter("{DAV:}href")]


def q(name):
    return urllib.parse.quote(name, safe="/")


def at_root(srv):
    """A target for call() at the server's root folder."""
    import types
    return types.SimpleNamespace(url=srv.url + "/", ca_file=srv.ca_file, server=srv,
                                 token=srv.token)


# --------------------------------------------------------------------------
# the fixtures
# --------------------------------------------------------------------------

def test_both_instances_run_over_https_on_loopback(xrootd_server, xrootd_open_server):
    for srv in (xrootd_server, xrootd_open_server):
        assert srv.alive() and srv.url.startswith("https://127.0.0.1:")
        assert srv.xroot_url.startswith("root://127.0.0.1:")
        assert srv.ca_file == xrootd_server.ca_file     # one CA: they trust each other
        if os.geteuid() == 0:
            assert srv.run_as is not None and srv.run_as.pw_uid != 0
            assert os.stat("/proc/%d" % srv.pid).st_uid == srv.run_as.pw_uid
    assert xrootd_server.url != xrootd_open_server.url


def test_the_open_instance_needs_no_credentials(xrootd_open_server, tmp_path):
    T = at_root(xrootd_open_server)
    assert call(T, "PUT", "open-probe.txt", b"free", auth=False)[0] in (200, 201)
    assert call(T, "GET", "open-probe.txt", auth=False)[2] == b"free"
    assert (xrootd_open_server.root / "open-probe.txt").read_bytes() == b"free"
    assert call(T, "DELETE", "open-probe.txt", auth=False)[0] in (200, 204)


def test_the_macaroon_instance_wants_a_macaroon(xrootd_server):
    srv = xrootd_server
    (srv.root / "mac-probe.txt").write_bytes(b"secret")

    T = at_root(srv)
    # no credential, a wrong one, or another scheme: 403 (XRootD never says 401)
    for h in ({}, {"Authorization": "Bearer " + srv.token[:-4] + "AAAA"},
              {"Authorization": "Basic dXNlcjpwYXNz"}):
        status, _, body = call(T, "GET", "mac-probe.txt", headers=h, auth=False)
        assert status == 403 and b"secret" not in body, (h, status, body)
    assert call(T, "PUT", "mac-new.txt", b"x", auth=False)[0] == 403
    assert not (srv.root / "mac-new.txt").exists()
    # the fixture's token is a macaroon for "/" with every activity
    raw = base64.urlsafe_b64decode(srv.token + "=" * (-len(srv.token) % 4))
    assert b"location ctadata-test" in raw and b"cid path:/\n" in raw
    assert b"UPLOAD" in raw and b"DELETE" in raw
    assert call(T, "GET", "mac-probe.txt")[2] == b"secret"
    # also as ?authz= (what a shared link looks like)
    assert call(T, "GET", "mac-probe.txt?authz=" + srv.token, auth=False)[2] == b"secret"
    # a macaroon limited to reading cannot write
    ro = servers.mint_macaroon(srv, "/", ["activity:DOWNLOAD,LIST"])
    assert call(T, "GET", "mac-probe.txt", headers={"Authorization": "Bearer " + ro},
                auth=False)[0] == 200
    assert call(T, "PUT", "mac-ro.txt", b"x", headers={"Authorization": "Bearer " + ro},
                auth=False)[0] == 403
    (srv.root / "mac-probe.txt").unlink()


def test_a_macaroon_request_answers_json(xrootd_server):
    srv = xrootd_server
    ctx = ssl.create_default_context(cafile=srv.ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=30)
    body = json.dumps({"caveats": ["activity:DOWNLOAD"], "validity": "PT10M"})
    conn.request("POST", "/", body=body, headers={
        "Content-Type": "application/macaroon-request",
        "Authorization": "Bearer " + srv.token})
    r = conn.getresponse()
    doc = json.loads(r.read().decode())
    conn.close()
    assert r.status == 200 and set(doc) == {"macaroon", "expires_in"}
    assert 0 < doc["expires_in"] <= 600


def test_xroot_protocol_sees_what_http_wrote(xrd):
    xrdfs = shutil.which("xrdfs")
    if xrdfs is None:
        pytest.skip("xrdfs not installed (xrootd-client)")
    if xrd.server.requires_token:
        pytest.skip("the xroot protocol has no macaroon login here")
    assert call(xrd, "PUT", "via-http.txt", b"12345")[0] in (200, 201)
    out = subprocess.run([xrdfs, xrd.server.xroot_url, "stat", "/" + xrd.folder + "/via-http.txt"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0 and b"Size:   5" in out.stdout, out.stdout


# --------------------------------------------------------------------------
# XRootD 5.5's HTTP door, as observed (see the module docstring)
# --------------------------------------------------------------------------

def test_quirk_propfind_hrefs_are_not_percent_encoded(xrd):
    for name in ("with space", "hash#tag", "100%", "lit%20eral", "é日本", "a&b;c'd[e]f+g=h"):
        (xrd.root / name).write_bytes(b"x")
    (xrd.root / "sub dir").mkdir()
    xrd.grant_access(xrd.root)
    got = sorted(hrefs(xrd, "", 1)[1:])
    base = xrd.path
    assert got == sorted(base + n for n in (
        "with space", "hash#tag", "100%", "lit%20eral", "é日本", "a&b;c'd[e]f+g=h", "sub dir"))
    # the self href is the request path decoded, without the slash if we sent none
    assert hrefs(xrd, q("sub dir"), 0) == [base + "sub dir"]
    assert hrefs(xrd, q("sub dir") + "/", 0) == [base + "sub dir/"]
    assert hrefs(xrd, q("sub dir"), 1) == [base + "sub dir"]
    # no getetag; a file's resourcetype is empty; size and date are there
    status, _, body = call(xrd, "PROPFIND", q("with space"), headers={"Depth": "0"})
    assert b"getcontentlength>1<" in body and b"getlastmodified" in body
    assert b"getetag" not in body


def test_quirk_requests_are_percent_decoded_once_except_question_mark(xrd):
    # every character survives when percent-encoded ...
    for name in ("with space", "hash#tag", "100%", "lit%20eral", "é日本", "a&b;c'd[e]f+g=h"):
        assert call(xrd, "PUT", urllib.parse.quote(name, safe=""), b"v")[0] == 200
        assert (xrd.root / name).read_bytes() == b"v"
        assert call(xrd, "GET", urllib.parse.quote(name, safe=""))[2] == b"v"
    # ... but "?" even encoded starts XRootD's opaque data: the name is cut
    assert call(xrd, "PUT", "question%3F.txt", b"q")[0] == 200
    assert sorted(os.listdir(str(xrd.root))).count("question") == 1
    assert not (xrd.root / "question?.txt").exists()
    # and a GET of "question?.txt" answers with the file "question"
    assert call(xrd, "GET", "question%3F.txt")[2] == b"q"
    # a raw space ends the request target: "with" only
    assert call(xrd, "PUT", "raw space", b"r", raw=True)[0] == 200
    assert (xrd.root / "raw").exists()


def test_quirk_move_destination_is_not_decoded(xrd):
    assert call(xrd, "PUT", "src", b"1")[0] == 200
    # a percent-encoded Destination is taken literally ...
    st, _, _ = call(xrd, "MOVE", "src", headers={"Destination": xrd.url + "a%20b"})
    assert st == 201 and (xrd.root / "a%20b").exists()
    # ... a raw one (UTF-8 bytes) is stored as sent; a path alone is refused
    dest = (xrd.url + "é x#1").encode("utf-8")
    st, _, _ = call(xrd, "MOVE", "a%2520b", headers={"Destination": dest})
    assert st == 201 and (xrd.root / "é x#1").exists()
    st, _, _ = call(xrd, "MOVE", q("é x#1"), headers={"Destination": xrd.path + "p"})
    assert st == 501
    # Overwrite: F is ignored: the destination is replaced
    assert call(xrd, "PUT", "other", b"2")[0] == 200
    st, _, _ = call(xrd, "MOVE", "other", headers={
        "Destination": dest, "Overwrite": "F"})
    assert st == 201 and (xrd.root / "é x#1").read_bytes() == b"2"


def test_quirk_collections(xrd):
    # MKCOL makes parents and does not mind an existing collection
    assert call(xrd, "MKCOL", "a/b/c")[0] == 201 and (xrd.root / "a/b/c").is_dir()
    assert call(xrd, "MKCOL", "a/b/c/")[0] == 201
    # PUT makes parents too
    assert call(xrd, "PUT", "x/y/z.txt", b"z")[0] == 200
    # DELETE of a collection is rmdir: not recursive
    st, _, body = call(xrd, "DELETE", "x/")
    assert st == 500 and b"not empty" in body and (xrd.root / "x/y/z.txt").exists()
    assert call(xrd, "DELETE", "a/b/c")[0] == 200 and not (xrd.root / "a/b/c").exists()
    # GET of a collection is an HTML page
    st, _, body = call(xrd, "GET", "x")
    assert st == 200 and body.startswith(b"<!DOCTYPE html")
    assert call(xrd, "PROPFIND", "nothing", headers={"Depth": "0"})[0] == 404
    # Depth infinity: no error, the folder alone
    assert hrefs(xrd, "x/", "infinity") == [xrd.path + "x/"]


def test_quirk_ranges_and_digests(xrd):
    data = bytes(range(256)) * 40
    assert call(xrd, "PUT", "r.bin", data)[0] == 200
    # an open-ended range is answered 206 with nothing in it
    st, h, body = call(xrd, "GET", "r.bin", headers={"Range": "bytes=100-"})
    assert st == 206 and body == b"" and h["content-range"] == "bytes 100--1/10240"
    # a closed one works
    st, h, body = call(xrd, "GET", "r.bin", headers={"Range": "bytes=100-10239"})
    assert st == 206 and body == data[100:] and h["content-range"] == "bytes 100-10239/10240"
    # adler32 on request, for HEAD and GET; no ETag, no Last-Modified
    import zlib
    want = "adler32=%08x" % zlib.adler32(data)
    for method in ("HEAD", "GET"):
        st, h, _ = call(xrd, method, "r.bin", headers={"Want-Digest": "adler32"})
        assert st == 200 and h["digest"] == want
        assert "etag" not in h and "last-modified" not in h
    # PUT: 200 for new and replaced files alike
    assert call(xrd, "PUT", "r.bin", b"new")[0] == 200
