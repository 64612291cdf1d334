"""`ctadata serve`: the local dCache-like archive inside ctadata.py.

Every ctadata command against it (with and without --redirect, and over
TLS), the tape REST API and macaroons by raw HTTP, hostile requests
(traversal in every encoding, symlinks leading out, oversized heads and
bodies, missing or wrong tokens, writes to a read-only server), the
Python context manager, the CLI as a process, and the interop of curl,
davix and rclone with it (skipped where a tool is not installed)."""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import ctadata
from conftest import leftover_part, make_tree, tree_digests, ODD_NAMES

REPO = Path(__file__).resolve().parent.parent
DL1 = "cta/DL1/20241114/v0.1/"


def seed(root):
    return make_tree(root, {
        DL1 + "dl1_LST-1.Run11111.0100.h5": b"\x89HDF\r\n\x1a\n" + os.urandom(300000),
        DL1 + "dl1_LST-1.Run11111.0101.h5": os.urandom(2000),
        DL1 + "datacheck_dl1_LST-1.Run11111.0100.h5": b"datacheck",
        "raw/20241114/LST-1.1.Run11111.0000.fits.fz": os.urandom(5000),
        "raw/20241114/LST-1.1.Run11111.0001.fits.fz": os.urandom(6000),
        "users/me/.keep": b"",
    })


@pytest.fixture
def archive(tmp_path):
    return seed(tmp_path / "archive")


@pytest.fixture(params=[False, True], ids=["direct", "redirect"])
def srv(request, archive):
    with ctadata.serve(str(archive), tape="raw/**", redirect=request.param,
                       stage_delay=0.3) as s:
        yield s


@pytest.fixture
def run(srv, monkeypatch, capsys):
    """ctadata.main in-process against *srv*, the token from its file."""
    monkeypatch.setenv("BEARER_TOKEN_FILE", srv.token_file)

    def run(*argv):
        code = ctadata.main(["--url", srv.url, "--retries", "0"] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def call(srv, method, path, body=None, headers=None, token=True, url=None):
    """-> (status, headers, body bytes) of one request with http.client."""
    from urllib.parse import urlsplit
    u = urlsplit(url or srv.url)
    if u.scheme == "https":
        import ssl
        ctx = ssl.create_default_context(cafile=getattr(srv, "ca_file", None))
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=20, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    hdrs = {}
    if token is True:
        if srv.token:
            hdrs["Authorization"] = "Bearer " + srv.token
    elif token:
        hdrs["Authorization"] = "Bearer " + token
    hdrs.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def send_raw(srv, data, read=65536):
    """Send raw bytes, return what comes back until the server closes or stops."""
    from urllib.parse import urlsplit
    u = urlsplit(srv.url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    try:
        s.sendall(data)
        out = b""
        while len(out) < read:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and not data.startswith(b"GET / HTTP/1.1\r\nConnection"):
                head, _, rest = out.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
        return out
    finally:
        s.close()


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


def adler(data):
    return "%08x" % (zlib.adler32(data) & 0xFFFFFFFF)


def propfind(srv, path, depth="1", body=None, **kw):
    body = body if body is not None else ctadata._PROPFIND_BODY
    return call(srv, "PROPFIND", path, body, {"Depth": depth}, **kw)


# -- every command ---------------------------------------------------------------

def test_every_command_against_serve(srv, run, archive, tmp_path):
    dl1 = archive / DL1
    code, out, _ = run("ls", DL1)
    assert code == 0 and out.split() == sorted(p.name for p in dl1.iterdir())
    code, out, _ = run("ls", "-l", DL1)
    assert code == 0 and "300008" in out and "dl1_LST-1.Run11111.0100.h5" in out
    code, out, _ = run("ls", "-R", "cta")
    assert code == 0 and DL1[4:] + "datacheck_dl1_LST-1.Run11111.0100.h5" in out.split()
    code, out, _ = run("ls", "--json", DL1)
    entries = {e["name"]: e for e in json.loads(out)}
    data = (dl1 / "dl1_LST-1.Run11111.0101.h5").read_bytes()
    assert entries["dl1_LST-1.Run11111.0101.h5"]["checksums"] == {
        "adler32": adler(data), "md5": hashlib.md5(data).hexdigest()}
    assert entries["dl1_LST-1.Run11111.0101.h5"]["locality"] == "ONLINE"
    code, out, _ = run("stat", "raw/20241114/LST-1.1.Run11111.0000.fits.fz")
    assert code == 0 and "locality:  NEARLINE" in out

    # get, get -r, and a resumed get
    code, _, err = run("get", DL1 + "dl1_LST-1.Run11111.0101.h5", tmp_path / "one.h5")
    assert code == 0, err
    assert (tmp_path / "one.h5").read_bytes() == data
    code, _, err = run("get", "-r", "cta", str(tmp_path / "down") + "/")
    assert code == 0, err
    assert tree_digests(tmp_path / "down/cta") == tree_digests(archive / "cta")
    # (files up to 1 MiB are never resumed: this one is larger)
    big = os.urandom(1500000)
    (archive / "resume").mkdir()
    (archive / "resume" / "big.h5").write_bytes(big)
    with ctadata.Client(url=srv.url, token_file=srv.token_file, env={}) as c:
        leftover_part(tmp_path / "big.h5", big[:100000], c, "resume/big.h5")
    code, _, err = run("get", "resume/big.h5", tmp_path / "big.h5")
    assert code == 0, err
    assert (tmp_path / "big.h5").read_bytes() == big
    last_get = [r for r in srv.requests if r["method"] == "GET"][-1]
    assert last_get["status"] == 206 and last_get["path"].endswith("/resume/big.h5")
    shutil.rmtree(str(archive / "resume"))

    # put, put -r (with odd names), mkdir -p, mv, sum, du, rm -r
    src = make_tree(tmp_path / "results", {n: os.urandom(50 + i)
                                           for i, n in enumerate(ODD_NAMES)})
    (tmp_path / "results" / "sub").mkdir()
    (tmp_path / "results" / "sub" / "x.txt").write_bytes(b"x")
    code, out, err = run("put", src / "plain.txt", "users/me/")
    assert code == 0, err
    assert (archive / "users/me/plain.txt").read_bytes() == (src / "plain.txt").read_bytes()
    code, _, err = run("put", "-r", src, "users/me/")
    assert code == 0, err
    assert tree_digests(archive / "users/me/results") == tree_digests(src)
    code, _, _ = run("mkdir", "-p", "users/me/a/b/c")
    assert code == 0 and (archive / "users/me/a/b/c").is_dir()
    code, _, _ = run("mv", "users/me/plain.txt", "users/me/a/")
    assert code == 0 and (archive / "users/me/a/plain.txt").is_file()
    assert not (archive / "users/me/plain.txt").exists()
    code, out, _ = run("sum", "users/me/a/plain.txt")
    moved = (archive / "users/me/a/plain.txt").read_bytes()
    assert code == 0 and "adler32 %s" % adler(moved) in out
    assert "md5 %s" % hashlib.md5(moved).hexdigest() in out
    code, out, _ = run("du", "--json", "users/me")
    assert json.loads(out)["files"] == len(ODD_NAMES) + 3
    code, _, _ = run("rm", "-r", "users/me/a")
    assert code == 0 and not (archive / "users/me/a").exists()

    # a file on tape only fails at once, with the reason
    t0 = time.monotonic()
    code, _, err = run("get", "raw/20241114/LST-1.1.Run11111.0000.fits.fz", tmp_path / "r")
    assert code == 1 and "on tape only" in err and time.monotonic() - t0 < 5
    assert not (tmp_path / "r").exists()
    assert not [p for p in archive.rglob("*") if p.name.startswith(".ctadata-upload-")]
    if srv.pool_url:
        pool = [r for r in srv.requests if r["server"] == "pool"]
        assert {r["method"] for r in pool} == {"GET"} and all(r["status"] in (200, 206)
                                                             for r in pool)


def test_the_other_options_against_serve(srv, run, archive, tmp_path):
    code, out, _ = run("ls", "-U", DL1)
    assert code == 0 and sorted(out.split()) == sorted(p.name for p in (archive / DL1).iterdir())
    code, out, _ = run("ls", "-R", "--jsonl", "--include", "*.0100.h5", "cta")
    assert code == 0 and len(out.splitlines()) == 2
    code, out, err = run("get", "-n", "-r", "cta", str(tmp_path / "n") + "/")
    assert code == 0 and "would get" in out and not (tmp_path / "n").exists()
    urls = tmp_path / "urls.txt"
    urls.write_text("# two files\n%s/%s\n%s\n" % (srv.url, DL1 + "dl1_LST-1.Run11111.0101.h5",
                                                   DL1 + "datacheck_dl1_LST-1.Run11111.0100.h5"))
    code, _, err = run("get", "--from-list", urls, "--manifest", tmp_path / "m.json",
                       str(tmp_path / "listed") + "/")
    assert code == 0, err
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [f["status"] for f in manifest["files"]] == ["transferred"] * 2
    assert all(f["checksums"]["adler32"] for f in manifest["files"])
    code, _, err = run("get", "-r", "--checksum", "cta", str(tmp_path / "c") + "/")
    code, out, err = run("get", "-r", "--checksum", "--json", "cta", str(tmp_path / "c") + "/")
    assert code == 0 and json.loads(out)["skipped"] == len(tree_digests(archive / "cta"))
    code, out, _ = run("rm", "-n", "-r", "cta")
    assert code == 0 and "would remove cta/" in out and (archive / "cta").is_dir()
    code, out, _ = run("mv", "-n", "cta", "elsewhere")
    assert code == 0 and "would move" in out and (archive / "cta").is_dir()
    code, out, _ = run("put", "-n", "-r", tmp_path / "c", "users/me/")
    assert code == 0 and not (archive / "users/me/c").exists()


def test_redirected_uploads_go_to_the_pool(archive, tmp_path):
    big = os.urandom(3 << 20)
    (tmp_path / "big.bin").write_bytes(big)
    with ctadata.serve(str(archive), redirect=True) as srv:
        c = srv.client(expect_threshold=1, retries=0)
        c.upload(str(tmp_path / "big.bin"), "users/me/big.bin")
        assert (archive / "users/me/big.bin").read_bytes() == big
        door = [r for r in srv.requests if r["method"] == "PUT" and r["server"] == "door"]
        pool = [r for r in srv.requests if r["method"] == "PUT" and r["server"] == "pool"]
        assert [r["status"] for r in door] == [307] and [r["status"] for r in pool] == [201]
        # a pool URL works once, for its method and path only
        st, h, _ = call(srv, "GET", "/" + DL1 + "dl1_LST-1.Run11111.0101.h5")
        assert st == 307
        from urllib.parse import urlsplit
        loc = urlsplit(h["Location"])
        path = loc.path + "?" + loc.query
        assert call(srv, "PUT", path, b"x", token=False, url=srv.pool_url)[0] == 404
        st, h, _ = call(srv, "GET", "/" + DL1 + "dl1_LST-1.Run11111.0101.h5")
        loc = urlsplit(h["Location"])
        path = loc.path + "?" + loc.query
        assert call(srv, "GET", path, token=False, url=srv.pool_url)[0] == 200
        assert call(srv, "GET", path, token=False, url=srv.pool_url)[0] == 404
        assert call(srv, "GET", loc.path, token=False, url=srv.pool_url)[0] == 400


def test_over_tls(archive, tmp_path):
    import servers
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    ca, crt, key = servers.make_test_ca(tmp_path / "ca")
    with ctadata.serve(str(archive), tls=(crt, key), redirect=True) as srv:
        assert srv.url.startswith("https://") and srv.pool_url.startswith("https://")
        c = srv.client(ca_file=ca, retries=0)
        assert "v0.1" in [e.name for e in c.ls("cta/DL1/20241114")]
        c.download("cta", str(tmp_path / "down") + "/", recursive=True)
        assert tree_digests(tmp_path / "down/cta") == tree_digests(archive / "cta")
        (tmp_path / "up.txt").write_bytes(b"over tls")
        c.upload(str(tmp_path / "up.txt"), "users/me/")
        assert (archive / "users/me/up.txt").read_bytes() == b"over tls"
        # plain-http clients get no answer, and free their place: more of them
        # than the server takes at once, and it goes on
        for _ in range(ctadata._SERVE_CONNECTIONS + 6):
            assert send_raw(srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[:5] != b"HTTP/"
        assert c.stat("users/me/up.txt").size == 8
        # (last: PyPy's ssl keeps the verification error for the thread's next handshake)
        with pytest.raises(ctadata.CtadataError):         # an unknown CA is refused
            srv.client(retries=0).ls("")


# -- tape (WLCG Tape REST API v1) ------------------------------------------------

RAW0 = "/raw/20241114/LST-1.1.Run11111.0000.fits.fz"
RAW1 = "/raw/20241114/LST-1.1.Run11111.0001.fits.fz"


def api(srv, method, sub, doc=None, **kw):
    body = json.dumps(doc).encode() if doc is not None else None
    st, h, data = call(srv, method, "/api/v1/tape" + sub, body,
                       {"Content-Type": "application/json"} if body else None, **kw)
    return st, h, (json.loads(data) if data.strip() else None)


def locality(srv, path):
    st, _, body = propfind(srv, path, depth="0")
    assert st == 207
    return body.decode().partition("FileLocality>")[2].partition("<")[0]


def wait_stage(srv, rid, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        st, _, doc = api(srv, "GET", "/stage/" + rid)
        assert st == 200
        if all(f["state"] not in ("SUBMITTED", "STARTED") for f in doc["files"]) or \
                time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def test_tape_staging_through_the_rest_api(archive):
    with ctadata.serve(str(archive), tape="raw/**", stage_delay=0.4) as srv:
        st, _, data = call(srv, "GET", "/.well-known/wlcg-tape-rest-api", token=False)
        assert st == 200
        assert json.loads(data)["endpoints"] == [
            {"uri": srv.url + "/api/v1/tape", "version": "v1", "metadata": {}}]
        st, _, doc = api(srv, "POST", "/archiveinfo", {"paths": [
            RAW0, "/" + DL1 + "dl1_LST-1.Run11111.0101.h5", "/raw", "/nope"]})
        assert st == 200 and [d.get("locality") for d in doc] == ["TAPE", "DISK", "NONE", None]
        assert doc[3]["error"] == "No such file or directory"
        assert locality(srv, RAW0) == "NEARLINE"
        t0 = time.monotonic()
        st, _, body = call(srv, "GET", RAW0)
        assert st == 403 and b"on tape only" in body and time.monotonic() - t0 < 2

        st, h, doc = api(srv, "POST", "/stage", {"files": [
            {"path": RAW0, "diskLifetime": "PT1H"}, {"path": "/raw/20241114"},
            {"path": "/raw/missing.fits.fz"}, {"path": "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"}]})
        assert st == 201 and h["Location"] == srv.tape_url + "/stage/" + doc["requestId"]
        rid = doc["requestId"]
        st, _, doc = api(srv, "GET", "/stage/" + rid)
        states = {f["path"]: f for f in doc["files"]}
        assert states[RAW0]["state"] in ("SUBMITTED", "STARTED") and not states[RAW0]["onDisk"]
        assert states["/raw/20241114"]["state"] == "FAILED"
        assert states["/raw/missing.fits.fz"]["error"] == "No such file or directory"
        assert states["/" + DL1 + "dl1_LST-1.Run11111.0101.h5"]["state"] == "COMPLETED"
        assert "completedAt" not in doc and doc["createdAt"] <= time.time()
        doc = wait_stage(srv, rid)
        f = {f["path"]: f for f in doc["files"]}[RAW0]
        assert f["state"] == "COMPLETED" and f["onDisk"] and "completedAt" in doc
        assert f["startedAt"] <= f["finishedAt"]
        assert locality(srv, RAW0) == "ONLINE_AND_NEARLINE"
        st, _, body = call(srv, "GET", RAW0)
        assert st == 200 and body == (archive / RAW0[1:]).read_bytes()
        c = srv.client(retries=0)
        c.download(RAW0, str(archive.parent / "staged.fz"))
        assert api(srv, "POST", "/archiveinfo", {"paths": [RAW0]})[2] == [
            {"path": RAW0, "locality": "DISK_AND_TAPE"}]

        # release: back to tape only
        assert api(srv, "POST", "/release/" + rid, {"paths": [RAW0]})[0] == 200
        assert locality(srv, RAW0) == "NEARLINE"
        st, _, doc = api(srv, "POST", "/release/" + rid, {"paths": [RAW1]})
        assert st == 400 and doc["status"] == 400 and RAW1 in doc["detail"]


def test_tape_cancel_delete_lost_and_errors(archive):
    with ctadata.serve(str(archive), tape=["raw/**"], stage_delay=30) as srv:
        srv.tape.lost.add(RAW1)
        st, _, doc = api(srv, "POST", "/stage", {"files": [{"path": RAW0}, {"path": RAW1}]})
        rid = doc["requestId"]
        assert api(srv, "POST", "/stage/%s/cancel" % rid, {"paths": [RAW0]})[0] == 200
        files = {f["path"]: f for f in api(srv, "GET", "/stage/" + rid)[2]["files"]}
        assert files[RAW0]["state"] == "CANCELLED"
        assert files[RAW1]["state"] == "FAILED" and "lost" in files[RAW1]["error"]
        assert locality(srv, RAW0) == "NEARLINE" and locality(srv, RAW1) == "LOST"
        assert api(srv, "DELETE", "/stage/" + rid)[0] == 204
        st, h, doc = api(srv, "GET", "/stage/" + rid)
        assert st == 404 and h["Content-Type"] == "application/json"
        assert doc["status"] == 404 and doc["title"] == "Not Found"
        for sub, body in [("/stage", {"files": []}), ("/stage", {"files": [{"path": "a"}]}),
                          ("/stage", {"files": [{"path": "/../x"}]}),
                          ("/stage", {"files": [{"path": RAW0, "diskLifetime": "1 day"}]}),
                          ("/archiveinfo", {"paths": "x"}), ("/stage", [1])]:
            st, _, doc = api(srv, "POST", sub, body)
            assert st == 400 and doc["status"] == 400 and doc["detail"], (sub, body)
        st, _, data = call(srv, "POST", "/api/v1/tape/stage", b"{not json",
                           {"Content-Type": "application/json"})
        assert st == 400 and json.loads(data)["detail"] == "the body is not JSON"
        st, h, doc = api(srv, "POST", "/stage", {"files": [{"path": RAW0}]}, token=False)
        assert st == 401 and doc["status"] == 401 and "Bearer" in h["WWW-Authenticate"]
        assert api(srv, "GET", "/nonsense")[0] == 404
        assert api(srv, "POST", "/stage", {"files": [{"path": RAW0}] * 1001})[0] == 400


def test_uploads_into_tape_globs_are_on_disk_and_tape(archive, tmp_path):
    with ctadata.serve(str(archive), tape="raw/**") as srv:
        assert call(srv, "PUT", "/raw/new.fits.fz", b"fresh")[0] == 201
        assert locality(srv, "/raw/new.fits.fz") == "ONLINE_AND_NEARLINE"
        assert call(srv, "GET", "/raw/new.fits.fz")[2] == b"fresh"


# -- macaroons ---------------------------------------------------------------------

def mint(srv, path, caveats, validity="PT1H", token=True):
    body = json.dumps({"caveats": caveats, "validity": validity}).encode()
    st, _, data = call(srv, "POST", path, body,
                       {"Content-Type": "application/macaroon-request"}, token=token)
    return st, (json.loads(data) if st == 200 else data)


@pytest.fixture
def msrv(archive):
    with ctadata.serve(str(archive)) as s:
        yield s


def test_macaroon_allows_what_its_caveats_say_and_nothing_more(msrv, archive, tmp_path):
    srv = msrv
    st, doc = mint(srv, "/" + DL1, ["activity:DOWNLOAD,LIST"])
    assert st == 200 and 3590 <= doc["expires_in"] <= 3600
    m = doc["macaroon"]
    assert doc["uri"]["targetWithMacaroon"] == srv.url + "/" + DL1 + "?authz=" + m
    f = "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"
    data = (archive / f[1:]).read_bytes()
    assert call(srv, "GET", f, token=m)[2] == data
    assert call(srv, "GET", f + "?authz=" + m, token=False)[2] == data     # as a URL
    assert propfind(srv, "/" + DL1, token=m)[0] == 207
    assert call(srv, "GET", "/raw/20241114/LST-1.1.Run11111.0000.fits.fz", token=m)[0] == 403
    assert call(srv, "GET", "/" + DL1 + "../v0.2/x", token=m)[0] in (400, 403)
    assert call(srv, "PUT", "/" + DL1 + "new.h5", b"x", token=m)[0] == 403
    assert call(srv, "DELETE", f, token=m)[0] == 403
    assert call(srv, "MOVE", f, headers={"Destination": f + ".moved"}, token=m)[0] == 403
    assert (archive / f[1:]).read_bytes() == data and not (archive / DL1 / "new.h5").exists()
    # the ctadata client uses it as it is: downloads work, uploads are refused
    c = srv.client(token=m, retries=0)
    c.download(DL1, str(tmp_path / "down") + "/", recursive=True)
    assert tree_digests(tmp_path / "down/v0.1") == tree_digests(archive / DL1)
    (tmp_path / "u.txt").write_bytes(b"u")
    with pytest.raises(ctadata.PartialFailure):
        c.upload(str(tmp_path / "u.txt"), DL1)

    # a holder may narrow it further, never widen it
    st, doc = mint(srv, "/" + DL1, ["activity:UPLOAD,DOWNLOAD"], token=m)
    assert st == 200
    assert call(srv, "PUT", "/" + DL1 + "new.h5", b"x", token=doc["macaroon"])[0] == 403
    assert call(srv, "GET", f, token=doc["macaroon"])[0] == 200
    st, doc = mint(srv, "/", ["activity:DOWNLOAD"], token=m)      # path caveats add up
    assert call(srv, "GET", "/raw/20241114/LST-1.1.Run11111.0000.fits.fz",
                token=doc["macaroon"])[0] == 403

    # writes with an UPLOAD macaroon, only below its path
    st, doc = mint(srv, "/users/me", ["activity:UPLOAD,MANAGE"])
    w = doc["macaroon"]
    assert call(srv, "PUT", "/users/me/w.txt", b"w", token=w)[0] == 201
    assert call(srv, "MKCOL", "/users/me/dir", token=w)[0] == 201
    assert call(srv, "PUT", "/users/w.txt", b"w", token=w)[0] == 403
    assert call(srv, "GET", "/users/me/w.txt", token=w)[0] == 403    # no DOWNLOAD


def test_macaroons_refused_when_altered_expired_or_elsewhere(msrv):
    srv = msrv
    f = "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"
    _, doc = mint(srv, "/", ["activity:DOWNLOAD"], validity="PT1S")
    short = doc["macaroon"]
    _, doc = mint(srv, "/", ["activity:DOWNLOAD"])
    m = doc["macaroon"]
    i = len(m) // 2
    altered = m[:i] + ("A" if m[i] != "A" else "B") + m[i + 1:]
    for bad in (altered, m[:-4], m + "AAAA", "x" * 200, srv.token + "x", "", "a.b.c"):
        st, h, _ = call(srv, "GET", f, token=bad or False)
        assert st == 401 and "Bearer" in h["WWW-Authenticate"], bad
    # another server's macaroon (another key) is no good here
    with ctadata.serve(srv.root) as other:
        _, odoc = mint(other, "/", ["activity:DOWNLOAD"])
    assert call(srv, "GET", f, token=odoc["macaroon"])[0] == 401
    # the server's own token never works in a URL
    assert call(srv, "GET", f + "?authz=" + srv.token, token=False)[0] == 401
    _, doc = mint(srv, "/", ["activity:DOWNLOAD", "ip:10.9.8.7"])
    assert call(srv, "GET", f, token=doc["macaroon"])[0] == 403
    _, doc = mint(srv, "/", ["activity:DOWNLOAD", "ip:127.0.0.0/8"])
    assert call(srv, "GET", f, token=doc["macaroon"])[0] == 200
    assert mint(srv, "/", ["activity:FLY"])[0] == 400
    assert mint(srv, "/", ["id:0;0;root"])[0] == 400
    assert mint(srv, "/", ["activity:DOWNLOAD"], validity="soon")[0] == 400
    assert mint(srv, "/", ["activity:DOWNLOAD"], token=False)[0] == 401
    _, doc = mint(srv, "/", ["activity:DOWNLOAD"], validity="P30D")
    assert doc["expires_in"] == 7 * 86400
    time.sleep(1.1)
    st, _, body = call(srv, "GET", f, token=short)
    assert st == 401 and b"expired" in body


# -- security: hostile requests ------------------------------------------------------

@pytest.fixture
def fortress(tmp_path):
    """An archive with a secret beside it, symlinks out of it and one within it."""
    root = seed(tmp_path / "archive")
    (tmp_path / "secret.txt").write_bytes(b"TOPSECRET")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_bytes(b"TOPSECRET too")
    os.symlink(str(tmp_path / "secret.txt"), str(root / "link_file"))
    os.symlink(str(outside), str(root / "link_dir"))
    os.symlink("../../secret.txt", str(root / "users" / "rel_link"))
    os.symlink(DL1.rstrip("/"), str(root / "inside_link"))
    # a link in the outside folder pointing back in: only reachable through
    # link_dir, whose folder is outside, so refused all the same
    os.symlink(str(root / DL1 / "dl1_LST-1.Run11111.0101.h5"), str(outside / "back"))
    with ctadata.serve(str(root)) as srv:
        srv.tmp = tmp_path
        yield srv


def snapshot(path):
    out = {}
    for dirpath, dirnames, filenames in os.walk(str(path)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


TRAVERSALS = [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/./../secret.txt",
    "/users/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt", "/%2e%2e%2fsecret.txt",
    "/users/..%5c..%5csecret.txt", "/..\\secret.txt", "/%00", "/users%00/../x",
    "/%c0%ae%c0%ae/secret.txt", "/%252e%252e/secret.txt", "//../secret.txt",
    "/users/%2e/../../secret.txt", "/%ff/x", "/users/%0a/x",
    "http://127.0.0.1/../secret.txt", "/link_file", "/link_dir/x.txt", "/link_dir/back",
    "/users/rel_link", "/link_dir/", "/.ctadata-upload-0123", "/etc/passwd",
    "/%2Fetc%2Fpasswd", "/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_in_every_encoding_reaches_nothing_outside(fortress, target):
    srv = fortress
    before = snapshot(srv.tmp)
    auth = ("Authorization: Bearer %s\r\n" % srv.token).encode()
    host = b"Host: 127.0.0.1\r\n"
    for method, extra, body in [
            ("GET", b"", b""), ("HEAD", b"", b""), ("DELETE", b"", b""),
            ("PROPFIND", b"Depth: 1\r\n", b""), ("MKCOL", b"", b""),
            ("PUT", b"", b"OVERWRITTEN"),
            ("MOVE", b"Destination: /moved\r\n", b""), ("COPY", b"Destination: /copied\r\n", b""),
            ("PUT", b"", b"x"), ]:
        req = b"%s %s HTTP/1.1\r\n" % (method.encode(), target.encode("latin-1")) + host + \
            auth + extra + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        answer = send_raw(srv, req)
        assert status_of(answer) in (400, 403, 404, 405, 409), (method, answer[:200])
        assert b"TOPSECRET" not in answer and b"root:" not in answer
    # nor through a Destination
    for dest in ["/../escaped.txt", "/%2e%2e/escaped.txt", "/link_dir/escaped.txt",
                 "http://127.0.0.1:%d/../escaped.txt" % int(srv.url.rpartition(":")[2]),
                 "http://evil.example/escaped.txt"]:
        for method in ("MOVE", "COPY"):
            st, _, body = call(srv, method, "/" + DL1 + "dl1_LST-1.Run11111.0101.h5",
                               headers={"Destination": dest})
            assert st in (400, 403, 502), (method, dest, st, body)
    assert snapshot(srv.tmp) == before


def test_symlinks_out_of_the_folder_are_neither_listed_nor_followed(fortress, tmp_path,
                                                                    monkeypatch, capsys):
    srv = fortress
    st, _, body = propfind(srv, "/")
    names = body.decode()
    assert st == 207 and "inside_link" in names and "cta/" in names
    assert "link_file" not in names and "link_dir" not in names
    assert "rel_link" not in propfind(srv, "/users/")[2].decode()
    # a link inside the folder works like what it points to
    assert call(srv, "GET", "/inside_link/dl1_LST-1.Run11111.0101.h5")[0] == 200
    before = snapshot(srv.tmp)
    assert call(srv, "PUT", "/link_dir/new.txt", b"x")[0] == 403
    assert call(srv, "MKCOL", "/link_dir/sub")[0] == 403
    assert call(srv, "DELETE", "/link_dir/back")[0] == 403
    assert snapshot(srv.tmp) == before
    # `get -r` of everything brings nothing from outside
    monkeypatch.setenv("BEARER_TOKEN_FILE", srv.token_file)
    assert ctadata.main(["--url", srv.url, "get", "-r", srv.url + "/", str(tmp_path / "all") + "/"]) == 0
    got = b"".join(p.read_bytes() for p in (tmp_path / "all").rglob("*") if p.is_file())
    assert b"TOPSECRET" not in got and (tmp_path / "all").exists()
    # deleting a link inside removes the link, never what it points to
    assert call(srv, "DELETE", "/inside_link")[0] == 204
    assert (Path(srv.root) / DL1 / "dl1_LST-1.Run11111.0101.h5").exists()


def test_oversized_or_malformed_heads_and_bodies(fortress):
    srv = fortress
    auth = ("Authorization: Bearer %s\r\n" % srv.token).encode()
    cases = [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
         431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 4000)
                                          for i in range(20)) + b"\r\n", 431),
        (b"PROPFIND / HTTP/1.1\r\n" + auth + b"Depth: 1\r\nContent-Length: 100000\r\n\r\n"
         + b"<" * 100000, 413),
        (b"PROPFIND / HTTP/1.1\r\n" + auth + b"Depth: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"8000\r\n" + b" " * 0x8000 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n",
         413),
        (b"PROPFIND / HTTP/1.1\r\n" + auth + b"Depth: infinity\r\n\r\n", 403),
        (b"GET / HTTP/1.1\r\n" + auth + b"Content-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + auth + b"Content-Length: 3\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + auth + b"Transfer-Encoding: gzip\r\n\r\n", 501),
        (b"PUT /users/me/s HTTP/1.1\r\n" + auth + b"Content-Length: 1\r\nContent-Length: 5"
         b"\r\n\r\nhello", 400),
        (b"PUT /users/me/s HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
         b"zz\r\nhello\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\n\r\n", 505),
        (b"BREW /pot HTTP/1.1\r\n" + auth + b"\r\n", 405),
        (b"GET relative HTTP/1.1\r\n" + auth + b"\r\n", 400),
    ]
    for req, want in cases:
        answer = send_raw(srv, req)
        assert status_of(answer) == want, (req[:60], answer[:200])
        assert b"<html" not in answer.lower()
    # DTDs and entity expansion in a PROPFIND body
    bomb = (b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><propfind xmlns="DAV:"><prop>&b;'
            b'</prop></propfind>')
    st, _, body = propfind(srv, "/", body=bomb)
    assert st == 400 and b"document type" in body
    assert propfind(srv, "/", body=b"<propfind")[0] == 400
    assert send_raw(srv, b"GET /\r\n\r\n") == b""        # HTTP/0.9: no answer at all
    st, _, body = propfind(srv, "/", depth="0")           # and the server is fine
    assert st == 207


def test_tokens_missing_wrong_or_read_only(fortress, archive, tmp_path):
    srv = fortress
    f = "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"
    for method in ("GET", "PUT", "PROPFIND", "DELETE", "MKCOL", "MOVE", "COPY", "HEAD"):
        for token in (False, "wrong", srv.token[:-1], srv.token + " x"):
            st, h, _ = call(srv, method, f, b"x" if method == "PUT" else None,
                            {"Destination": "/y"}, token=token)
            assert st == 401 and h["WWW-Authenticate"].startswith("Bearer"), (method, token)
    assert call(srv, "GET", f, headers={"Authorization": "bearer " + srv.token},
                token=False)[0] == 200
    assert call(srv, "GET", f, headers={"Authorization": "Basic " + srv.token},
                token=False)[0] == 401
    assert call(srv, "OPTIONS", "/", token=False)[0] == 200        # no data in it
    before = snapshot(archive)
    with ctadata.serve(str(archive), read_only=True) as ro:
        for method in ("PUT", "DELETE", "MKCOL", "MOVE", "COPY"):
            st, _, body = call(ro, method, f + ("x" if method == "MKCOL" else ""),
                               b"x" if method == "PUT" else None, {"Destination": f + ".2"})
            assert st == 403 and b"read-only" in body, method
        assert call(ro, "GET", f)[0] == 200
    with ctadata.serve(str(archive), auth=False, read_only=True) as public:
        assert public.token is None and public.token_file is None
        assert call(public, "GET", f)[0] == 200
        assert call(public, "PUT", f, b"x")[0] == 403
        assert mint(public, "/", ["activity:DOWNLOAD"])[0] == 400
    assert snapshot(archive) == before
    with pytest.raises(ctadata.ConfigError, match="needs --read-only"):
        ctadata.serve(str(archive), auth=False)


def test_listings_are_never_html_and_files_never_render(msrv, archive):
    from urllib.parse import quote
    srv = msrv
    evil = "<img src=x onerror=alert(1)>.html"
    assert call(srv, "PUT", "/users/me/" + quote(evil),
                b"<html><script>alert(2)</script></html>")[0] == 201
    st, h, body = call(srv, "GET", "/users/me/")
    assert st == 200 and h["Content-Type"] == "text/plain; charset=utf-8"
    assert h["X-Content-Type-Options"] == "nosniff" and evil.encode() in body
    st, _, body = propfind(srv, "/users/me/")
    assert "&lt;img" in body.decode() or "%3Cimg" in body.decode()
    assert "<img" not in body.decode()
    st, h, _ = call(srv, "GET", "/users/me/" + quote(evil))
    assert st == 200 and h["Content-Type"] == "application/octet-stream"
    assert "sandbox" in h["Content-Security-Policy"]
    # an encoded "/" is no part of a name
    assert call(srv, "GET", "/users%2Fme/" + quote(evil))[0] == 400


@pytest.fixture
def log_lines(monkeypatch):
    """Every message of the "ctadata" logger, at DEBUG, in a list (the
    handlers an earlier in-process CLI run left there are set aside)."""
    import logging
    logger = logging.getLogger("ctadata")
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    monkeypatch.setattr(logger, "handlers", [Keep()])
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.setLevel(old)


def test_tokens_and_macaroons_never_logged(msrv, log_lines):
    srv = msrv
    _, doc = mint(srv, "/", ["activity:DOWNLOAD"])
    m = doc["macaroon"]
    f = "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"
    call(srv, "GET", f + "?authz=" + m, token=False)
    call(srv, "GET", f + "?authz=" + srv.token, token=False)
    call(srv, "GET", f, token="wrong-" + srv.token)
    logged = "\n".join(log_lines)
    text = logged + repr(srv) + json.dumps(srv.requests)
    assert "serve: door GET " + f in logged
    assert srv.token not in text and m not in text and m[:40] not in text


def test_connections_are_bounded(msrv):
    srv = msrv
    from urllib.parse import urlsplit
    u = urlsplit(srv.url)
    held = [socket.create_connection((u.hostname, u.port), timeout=10)
            for _ in range(ctadata._SERVE_CONNECTIONS)]
    try:
        time.sleep(0.3)
        st = send_raw(srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(st) == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and propfind(srv, "/", "0")[0] != 207:
        time.sleep(0.1)
    assert propfind(srv, "/", "0")[0] == 207


def test_chunked_upload_and_keep_alive(msrv, archive):
    srv = msrv
    from urllib.parse import urlsplit
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    auth = {"Authorization": "Bearer " + srv.token}
    conn.request("PUT", "/users/me/chunked.bin", body=iter([b"abc", b"defg"]), headers=auth,
                 encode_chunked=True)
    assert conn.getresponse().read() == b"created\n"
    for _ in range(3):                               # the same connection goes on
        conn.request("GET", "/users/me/chunked.bin", headers=auth)
        assert conn.getresponse().read() == b"abcdefg"
    conn.close()
    assert (archive / "users/me/chunked.bin").read_bytes() == b"abcdefg"


def test_put_checks_content_md5_and_keeps_nothing_bad(msrv, archive):
    import base64
    srv = msrv
    good = base64.b64encode(hashlib.md5(b"payload").digest()).decode()
    bad = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    st, _, body = call(srv, "PUT", "/users/me/p.bin", b"payload", {"Content-MD5": bad})
    assert st == 400 and b"Checksum mismatch" in body
    assert not (archive / "users/me/p.bin").exists()
    assert call(srv, "PUT", "/users/me/p.bin", b"payload", {"Content-MD5": "nonsense"})[0] == 400
    st, h, _ = call(srv, "PUT", "/users/me/p.bin", b"payload",
                    {"Content-MD5": good, "Want-Digest": "md5;q=0.5, adler32"})
    assert st == 201 and h["Digest"] == "adler32=%s,md5=%s" % (adler(b"payload"), good)
    assert call(srv, "PUT", "/users/me/p.bin", b"again")[0] == 204
    assert call(srv, "PUT", "/users/nobody/p.bin", b"x")[0] == 409
    assert call(srv, "PUT", "/users/me", b"x")[0] == 405
    assert not [p for p in archive.rglob("*") if p.name.startswith(".ctadata-upload-")]
    # ranges and digests on the way out
    st, h, body = call(srv, "GET", "/users/me/p.bin", headers={"Range": "bytes=1-3"})
    assert st == 206 and body == b"gai" and h["Content-Range"] == "bytes 1-3/5"
    st, h, body = call(srv, "GET", "/users/me/p.bin", headers={"Range": "bytes=-2"})
    assert (st, body) == (206, b"in")
    st, h, body = call(srv, "GET", "/users/me/p.bin", headers={
        "Range": "bytes=1-", "If-Range": '"stale"'})
    assert (st, body) == (200, b"again")
    assert call(srv, "GET", "/users/me/p.bin", headers={"Range": "bytes=9-"})[0] == 416
    st, h, _ = call(srv, "HEAD", "/users/me/p.bin", headers={"Want-Digest": "adler32;q=0,md5"})
    assert h["Digest"].startswith("md5=") and "adler32" not in h["Digest"]


# -- COPY, MOVE, MKCOL and DELETE details ------------------------------------------------

def test_copy_move_overwrite_semantics(msrv, archive):
    srv = msrv
    f = "/" + DL1 + "dl1_LST-1.Run11111.0101.h5"
    data = (archive / f[1:]).read_bytes()
    assert call(srv, "COPY", f, headers={"Destination": srv.url + "/users/me/c.h5"})[0] == 201
    assert (archive / "users/me/c.h5").read_bytes() == data
    st = call(srv, "COPY", f, headers={"Destination": "/users/me/c.h5", "Overwrite": "F"})[0]
    assert st == 412
    assert call(srv, "COPY", f, headers={"Destination": "/users/me/c.h5"})[0] == 204
    assert call(srv, "COPY", "/cta", headers={"Destination": "/users/me/cta"})[0] == 201
    assert tree_digests(archive / "users/me/cta") == tree_digests(archive / "cta")
    assert call(srv, "COPY", "/cta", headers={"Destination": "/cta/inside"})[0] == 403
    assert call(srv, "COPY", f, headers={"Destination": "/nope/x"})[0] == 409
    assert call(srv, "COPY", f, headers={"Source": "http://elsewhere/x"})[0] == 501
    assert call(srv, "MOVE", "/users/me/c.h5", headers={"Destination": "/users/me/m.h5"})[0] \
        == 201
    assert call(srv, "MOVE", "/users/me/m.h5", headers={"Destination": "/users/me/cta",
                                                         "Overwrite": "F"})[0] == 412
    assert call(srv, "MOVE", "/users/me/m.h5", headers={"Destination": "/users/me/cta"})[0] \
        == 204
    assert (archive / "users/me/cta").read_bytes() == data
    assert call(srv, "MKCOL", "/users/me/cta")[0] == 405
    assert call(srv, "MKCOL", "/users/x/y")[0] == 409
    assert call(srv, "DELETE", "/")[0] == 403
    assert call(srv, "DELETE", "/users/nope")[0] == 404
    ctadata_client = srv.client(retries=0)
    with pytest.raises(ctadata.RemoteError):
        ctadata_client.move("users/me/cta", "users/me/.keep")        # exists: 412


# -- the Python API and the command line -------------------------------------------------

def test_context_manager_cleans_up(archive, tmp_path):
    with ctadata.serve(str(archive), port=0, tape="raw/*") as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        mode = os.stat(srv.token_file).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(srv.token_file)).st_mode) == 0o700
        assert Path(srv.token_file).read_text().strip() == srv.token
        assert srv.env == {"CTADATA_URL": srv.url, "BEARER_TOKEN_FILE": srv.token_file}
        assert srv.token not in repr(srv)
        assert [e.name for e in srv.client().ls("raw")] == ["20241114"]
        token_dir = os.path.dirname(srv.token_file)
        port = int(srv.url.rpartition(":")[2])
    assert not os.path.exists(token_dir)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    srv.stop()    # idempotent


def test_token_file_option(archive, tmp_path):
    tf = tmp_path / "tok"
    with ctadata.serve(str(archive), token_file=str(tf)) as srv:
        assert stat.S_IMODE(tf.stat().st_mode) == 0o600
        first = srv.token
    assert tf.read_text().strip() == first          # kept: the user asked for it there
    with ctadata.serve(str(archive), token_file=str(tf)) as srv:
        assert srv.token == first                    # and used again
    tf.chmod(0o644)
    with pytest.raises(ctadata.ConfigError, match="refusing to read"):
        ctadata.serve(str(archive), token_file=str(tf))
    with pytest.raises(ctadata.ConfigError, match="not a folder"):
        ctadata.serve(str(tmp_path / "missing"))
    with ctadata.serve(str(archive)) as srv:
        port = int(srv.url.rpartition(":")[2])
        with pytest.raises(ctadata.ConfigError, match="cannot listen"):
            ctadata.serve(str(archive), port=port)
    assert ctadata._is_loopback("127.0.0.1") and "serve" in ctadata.__all__


def test_non_loopback_bind_warns_without_tls(archive, log_lines, monkeypatch):
    # Never bound for real here (no traffic leaves loopback in tests): the
    # warning comes before the listener exists.

    def no_listen(*a, **kw):
        raise ctadata.ConfigError("stop here")
    monkeypatch.setattr(ctadata, "_serve_classes", no_listen)
    with pytest.raises(ctadata.ConfigError, match="stop here"):
        ctadata.serve(str(archive), bind="0.0.0.0")
    assert "without --tls" in "\n".join(log_lines)
    del log_lines[:]
    with pytest.raises(ctadata.ConfigError, match="stop here"):
        ctadata.serve(str(archive), bind="127.0.0.1")
    assert "without --tls" not in "\n".join(log_lines)


def test_cli_serve_as_a_process(archive, tmp_path):
    tf = tmp_path / "tok"
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "ctadata", "serve", str(archive), "--port", "0",
                          "--token-file", str(tf), "--tape", "raw/**", "--redirect", "-v"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        url = p.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:")
        cenv = dict(env, CTADATA_URL=url, BEARER_TOKEN_FILE=str(tf))
        r = subprocess.run([sys.executable, "-m", "ctadata", "ls", "-l", "raw/20241114"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cenv, timeout=30)
        assert r.returncode == 0 and b"LST-1.1.Run11111.0000.fits.fz" in r.stdout
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0
    text = err.decode()
    assert "the token is in %s" % tf in text and "stopped" in text
    assert "serve: door PROPFIND /raw/20241114" in text          # -v logs requests
    assert tf.read_text().strip() not in text
    r = subprocess.run([sys.executable, "-m", "ctadata", "serve", str(archive), "--no-auth"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=30)
    assert r.returncode == 2 and b"needs --read-only" in r.stderr


def test_serve_help_is_complete(capsys):
    assert ctadata.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--port", "--bind", "--token-file", "--no-auth", "--read-only", "--tape",
                "--stage-delay", "--redirect", "--tls", "--tls-key", "DIR"):
        assert opt in out, opt
    assert ctadata.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


# -- interop: curl, davix, rclone ------------------------------------------------------

def need(tool):
    if not shutil.which(tool):
        pytest.skip("%s not installed (tests/bench/install-peers.sh installs it)" % tool)


def tool(argv, env=None, timeout=60):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=dict(os.environ, **(env or {})), timeout=timeout)
    assert r.returncode == 0, (argv, r.stderr.decode()[-2000:])
    return r.stdout.decode()


def test_curl_lists_gets_and_puts(msrv, archive, tmp_path):
    need("curl")
    srv = msrv
    hdr = tmp_path / "auth-header"      # the token in a private file, not on argv
    fd = os.open(str(hdr), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, ("Authorization: Bearer %s\n" % srv.token).encode())
    os.close(fd)
    base = ["curl", "-q", "-sS", "-f", "-H", "@" + str(hdr)]
    listing = tool(base + ["-X", "PROPFIND", "-H", "Depth: 1", srv.url + "/" + DL1])
    assert "dl1_LST-1.Run11111.0100.h5" in listing and "multistatus" in listing
    tool(base + ["-o", str(tmp_path / "got.h5"), srv.url + "/" + DL1 + "dl1_LST-1.Run11111.0100.h5"])
    assert (tmp_path / "got.h5").read_bytes() == \
        (archive / DL1 / "dl1_LST-1.Run11111.0100.h5").read_bytes()
    (tmp_path / "up.bin").write_bytes(os.urandom(100000))
    tool(base + ["-T", str(tmp_path / "up.bin"), srv.url + "/users/me/up.bin"])
    assert (archive / "users/me/up.bin").read_bytes() == (tmp_path / "up.bin").read_bytes()


def test_rclone_lists_gets_and_puts(msrv, archive, tmp_path):
    need("rclone")
    srv = msrv
    env = {"RCLONE_WEBDAV_BEARER_TOKEN": srv.token, "RCLONE_CONFIG": str(tmp_path / "rc.conf"),
           "HOME": str(tmp_path)}
    flags = ["--webdav-url", srv.url, "--low-level-retries", "1", "--retries", "1"]
    names = tool(["rclone", "lsf"] + flags + [":webdav:" + DL1], env).split()
    assert sorted(names) == sorted(p.name for p in (archive / DL1).iterdir())
    tool(["rclone", "copy"] + flags + [":webdav:cta", str(tmp_path / "down")], env)
    assert tree_digests(tmp_path / "down") == tree_digests(archive / "cta")
    up = make_tree(tmp_path / "up", {"a.txt": b"a", "sub/b.bin": os.urandom(70000)})
    tool(["rclone", "copy"] + flags + [str(up), ":webdav:users/me/up"], env)
    assert tree_digests(archive / "users/me/up") == tree_digests(up)


def test_davix_lists_gets_and_puts_with_a_macaroon(msrv, archive, tmp_path):
    need("davix-ls")
    srv = msrv
    # davix takes headers only on its command line: give it a short-lived
    # macaroon for the two folders it needs, not the server's token
    _, doc = mint(srv, "/", ["activity:DOWNLOAD,LIST,UPLOAD", "path:/" + DL1.rstrip("/")],
                  validity="PT2M")
    _, up = mint(srv, "/users/me", ["activity:UPLOAD,LIST"], validity="PT2M")
    auth = ["-H", "Authorization: Bearer " + doc["macaroon"]]
    names = tool(["davix-ls"] + auth + [srv.url + "/" + DL1]).split()
    assert sorted(names) == sorted(p.name for p in (archive / DL1).iterdir())
    tool(["davix-get"] + auth + [srv.url + "/" + DL1 + "dl1_LST-1.Run11111.0101.h5",
                                 str(tmp_path / "got.h5")])
    assert (tmp_path / "got.h5").read_bytes() == \
        (archive / DL1 / "dl1_LST-1.Run11111.0101.h5").read_bytes()
    (tmp_path / "up.bin").write_bytes(os.urandom(50000))
    tool(["davix-put", "-H", "Authorization: Bearer " + up["macaroon"], str(tmp_path / "up.bin"),
          srv.url + "/users/me/up.bin"])
    assert (archive / "users/me/up.bin").read_bytes() == (tmp_path / "up.bin").read_bytes()


def test_readme_fixture_recipe_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**In your own tests.**"):]
    start = section.index("```python\n") + 10
    code = section[start:section.index("\n```", start)]
    (tmp_path / "test_recipe.py").write_text(code + "\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(tmp_path / "test_recipe.py")], cwd=str(tmp_path), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, r.stdout.decode()[-3000:]
    assert b"1 passed" in r.stdout


def test_digest_values_parse_back_with_the_clients_parser():
    sums = {"adler32": "0001abcd", "md5": hashlib.md5(b"x").hexdigest()}
    for algos in (("adler32",), ("md5",), ("md5", "adler32")):
        text = ctadata._digest_value(sums, algos)
        assert ctadata._parse_digest(text) == {a: sums[a] for a in algos}
    assert ctadata._want_digest("adler32, md5;q=0.5, sha;q=1") == ["adler32", "md5"]
    assert ctadata._want_digest("md5;q=0.3,adler32;q=0.9") == ["adler32", "md5"]
    assert ctadata._want_digest("adler32;q=0, md5") == ["md5"]
    assert ctadata._iso_duration("PT1H") == 3600 and ctadata._iso_duration("P1DT30M") == 88200
    assert ctadata._iso_duration("P2W") == 14 * 86400 and ctadata._iso_duration("PT1.5S") == 1.5
    for bad in ("", "P", "PT", "1h", "P1H", "PT-1H", None):
        assert ctadata._iso_duration(bad) is None, bad
