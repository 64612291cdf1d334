"""`ctadata cp`: copies between remote places, issue 11 part 2.

Third-party copies run between the two real XRootD 5.5 instances of the
suite (tests/servers.py): ``xrootd`` (authorization on, macaroons issued to
the holder of the test client certificate) and ``xrootd_open`` (no
credentials).  The client reaches the first one with that certificate: XRootD
5.5 gives a request authenticated by a macaroon a new macaroon without the
holder's name, which this authdb (that grants by name) then refuses.
Copies within one server run against nginx, Apache and `ctadata serve`.

``TPCPeer`` (below) is a small HTTP-TPC server in a thread, for what no real
server shows: every header it receives (does a token leak to it?), and
answers no real server gives on demand (a stream that ends without
"success:"/"failure:", markers that arrive one by one).  It performs real
pulls (GET of the Source with the forwarded credential) and accepts the PUTs
of XRootD's pushes.
"""

import hashlib
import http.client
import json
import os
import shutil
import ssl
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

import ctadata
from conftest import dav_target, make_tree, tree_digests
from httpdouble import DoubleHandler, ServerDouble


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def xa(request):
    """An empty folder on the XRootD instance with macaroons."""
    yield from dav_target(request, "xrootd")


@pytest.fixture
def xb(request):
    """An empty folder on the open XRootD instance."""
    yield from dav_target(request, "xrootd_open")


def private_cert(target, tmp_path):
    """The test client certificate, in a private file (ctadata refuses others)."""
    path = tmp_path / "client.pem"
    if not path.exists():
        shutil.copyfile(target.server.client_cert, str(path))
        os.chmod(str(path), 0o600)
    return str(path)


def xclient(target, tmp_path, **kw):
    """A Client on an XRootD folder: the certificate for the macaroon
    instance, nothing for the open one."""
    if target.server.requires_token:
        kw.setdefault("auth", "x509")
        kw.setdefault("cert", private_cert(target, tmp_path))
    kw.setdefault("retries", 1)
    kw.setdefault("timeout", 30)
    return ctadata.Client(url=target.url, ca_file=target.ca_file, env={}, **kw)


def put_files(target, spec):
    """Files on a server's disk (readable by the server), {rel: bytes}."""
    make_tree(target.root, spec)
    target.grant_access(target.root)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def adler(data):
    return "%08x" % (zlib.adler32(data) & 0xFFFFFFFF)


@pytest.fixture
def cli(monkeypatch, capsys):
    """main([...]) in-process; returns (exit code, stdout, stderr)."""
    def run(*argv):
        code = ctadata.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


# --------------------------------------------------------------------------
# the perf-marker stream (pure)
# --------------------------------------------------------------------------

XROOTD_SUCCESS = (b"Perf Marker\nTimestamp: 1796053405\nStripe Index: 0\n"
                  b"Stripe Bytes Transferred: 0\nTotal Stripe Count: 1\n"
                  b"RemoteConnections: tcp:127.0.0.1:42231\nEnd\nsuccess: Created\n")


def markers(body):
    return list(ctadata._perf_markers(body.splitlines(True)))


def test_perf_markers_as_xrootd_sends_them():
    assert markers(XROOTD_SUCCESS) == [("progress", 0), ("success", "Created")]
    failed = XROOTD_SUCCESS.replace(
        b"success: Created", b'failure: Remote side failed with status code 403; error '
                             b'message: "Unable to open /src.bin; permission denied "')
    assert markers(failed)[-1] == (
        "failure", 'Remote side failed with status code 403; error message: "Unable to '
                   'open /src.bin; permission denied "')


def test_perf_markers_stripes_add_up_and_the_last_line_decides():
    block = ("Perf Marker\nTimestamp: 1\nStripe Index: %d\nStripe Bytes Transferred: %d\n"
             "Total Stripe Count: 2\nEnd\n")
    body = "".join(block % s for s in ((0, 100), (1, 50), (0, 300), (1, 70))).encode()
    got = markers(body + b"success: done\n")
    assert [v for k, v in got if k == "progress"] == [100, 150, 350, 370]
    assert got[-1] == ("success", "done")
    assert markers(body)[-1] == ("unknown", "")                  # no final line
    assert markers(body + b"aborted: by the admin\n")[-1] == ("aborted", "by the admin")
    # a verdict followed by more text is no verdict; control characters are dropped
    assert markers(b"success: ok\nPerf Marker\n")[-1] == ("unknown", "")
    assert markers(b"failure: bad \x1b[31mred\n")[-1] == ("failure", "bad ?[31mred")
    assert markers(b"")[-1] == ("unknown", "")


# --------------------------------------------------------------------------
# third-party copies between the two XRootD instances
# --------------------------------------------------------------------------

def test_pull_and_push_between_two_xrootd_are_byte_identical(xa, xb, tmp_path):
    data = os.urandom(3 << 20) + b"end"
    put_files(xa, {"run/f.bin": data})
    with xclient(xa, tmp_path) as c:
        pulled = c.copy("run/f.bin", xb.url + "pulled/f.bin")          # pull (default)
        pushed = c.copy("run/f.bin", xb.url + "pushed/", mode="push")
    for summary in (pulled, pushed):
        assert (summary.files, summary.transferred, summary.failed) == (1, 1, 0)
        assert summary.results[0].checksums == {"adler32": adler(data)}
        assert summary.bytes == len(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha(xb.root / "pulled/f.bin") == want == sha(xb.root / "pushed/f.bin")


def test_copies_towards_the_storage_with_a_macaroon_it_issues(xa, xb, tmp_path):
    """The open instance as source: pulled by the storage, or pushed to it
    with an UPLOAD macaroon of the storage's in TransferHeaderAuthorization."""
    data = os.urandom(100000)
    put_files(xb, {"in.bin": data})
    with xclient(xa, tmp_path) as c:
        c.copy(xb.url + "in.bin", "pulled.bin")
        c.copy(xb.url + "in.bin", "deep/er/pushed.bin", mode="push")
        with pytest.raises(ctadata.NotFound, match="the source does not exist"):
            c.copy(xb.url + "missing.bin", "x.bin")
    assert (xa.root / "pulled.bin").read_bytes() == data
    assert (xa.root / "deep/er/pushed.bin").read_bytes() == data
    assert not (xa.root / "x.bin").exists()


def test_cp_r_between_xrootd_verifies_and_a_rerun_skips(xa, xb, tmp_path, cli, monkeypatch):
    spec = {"night/a.fits": os.urandom(5000), "night/sub/b.fits": os.urandom(7000),
            "night/sub/deeper/c.txt": b"c" * 10, "night/z.log": b""}
    put_files(xa, spec)
    (xa.root / "night/empty").mkdir()
    xa.grant_access(xa.root)
    cert = private_cert(xa, tmp_path)
    base = ["--url", xa.url, "--ca-file", xa.ca_file, "--auth", "x509", "--cert", cert]
    manifest = tmp_path / "m.json"
    code, out, err = cli(*base, "cp", "-r", "-j", "3", "night", xb.url + "copies/",
                         "--manifest", manifest)
    assert code == 0, err
    assert "cp: 4 files (4 transferred, 0 skipped, 0 failed)" in err
    assert tree_digests(xb.root / "copies/night") == tree_digests(xa.root / "night")
    assert (xb.root / "copies/night/empty").is_dir()
    doc = json.loads(manifest.read_text())
    rec = {r["destination"].rsplit("/", 1)[1]: r for r in doc["files"]}
    assert rec["a.fits"]["checksums"] == {"adler32": adler(spec["night/a.fits"])}
    assert rec["a.fits"]["source"] == xa.url + "night/a.fits"
    # again: everything is there with the same size and checksum
    code, out, err = cli(*base, "cp", "-r", "night", xb.url + "copies/", "--jsonl")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert {r["status"] for r in lines[:-1]} == {"skipped"} and lines[-1]["summary"][
        "skipped"] == 4
    # a copy that differs (same size) fails without --overwrite, is replaced with it
    # (a new file through the server: XRootD 5.5 reports the checksum it computed
    # for a file rewritten within the same second of mtime)
    (tmp_path / "other").write_bytes(os.urandom(5000))
    with xclient(xb, tmp_path) as c:
        c.remove("copies/night/a.fits")
        c.upload(str(tmp_path / "other"), "copies/night/a.fits")
    code, out, err = cli(*base, "cp", "-r", "night", xb.url + "copies/")
    assert code == 1 and "already at the destination, and different (adler32" in err
    assert "cp: 4 files (0 transferred, 3 skipped, 1 failed)" in err
    code, out, err = cli(*base, "cp", "-r", "--push", "--overwrite", "--include", "*.fits",
                         "night", xb.url + "copies/")
    assert code == 0 and "cp: 2 files (2 transferred" in err, err
    assert tree_digests(xb.root / "copies/night") == tree_digests(xa.root / "night")
    # a dry run changes nothing
    code, out, err = cli(*base, "cp", "-r", "-n", "night", xb.url + "dry/")
    assert code == 0 and "would cp" in out and not (xb.root / "dry").exists()
    assert "dry run: 4 files (11.7KiB) would be copied" in err


def test_a_missing_source_fails_clearly(xa, xb, tmp_path, cli):
    cert = private_cert(xa, tmp_path)
    code, out, err = cli("--url", xa.url, "--ca-file", xa.ca_file, "--auth", "x509",
                         "--cert", cert, "cp", "nothing-here.bin", xb.url + "x.bin")
    assert code == 1
    assert err.strip() == "ctadata: error: the source does not exist (%snothing-here.bin)" \
        % xa.url
    # one of several sources: that one fails, the others are copied
    put_files(xa, {"one.bin": b"1"})
    code, out, err = cli("--url", xa.url, "--ca-file", xa.ca_file, "--auth", "x509",
                         "--cert", cert, "cp", "one.bin", "two.bin", xb.url + "both/")
    assert code == 1 and "the source does not exist" in err
    assert (xb.root / "both/one.bin").read_bytes() == b"1"


def test_a_failure_line_is_a_failed_file_and_nothing_stays_behind(xa, xb, tmp_path):
    """XRootD cannot read the source (mode 000 on its disk): the destination
    answers 201 and a stream that ends with "failure: ..."; XRootD leaves an
    empty file behind, which ctadata deletes."""
    put_files(xb, {"locked.bin": os.urandom(4000), "fine.bin": b"fine"})
    os.chmod(str(xb.root / "locked.bin"), 0)
    with xclient(xa, tmp_path) as c:
        summary = c.copy([xb.url + "locked.bin", xb.url + "fine.bin"], "got/",
                         raise_on_failure=False)
    assert summary.failed == 1 and summary.transferred == 1
    bad = summary.failures[0]
    assert bad.error.startswith("copy failed: Remote side failed with status code")
    assert "locked.bin" in bad.error
    assert not (xa.root / "got/locked.bin").exists()
    assert (xa.root / "got/fine.bin").read_bytes() == b"fine"


def test_a_profile_authenticates_the_other_origin(xa, xb, tmp_path, cli, monkeypatch):
    """The storage (--url) is the open instance; the macaroon instance is
    reached with the credentials of the profile whose url is there."""
    data = os.urandom(20000)
    put_files(xa, {"src/p.bin": data})
    cert = private_cert(xa, tmp_path)
    conf = Path(os.environ["HOME"]) / ".config" / "ctadata" / "config.ini"
    conf.parent.mkdir(parents=True)
    conf.write_text("[other]\nurl = %s\nauth = x509\ncert = %s\nca_file = %s\n" % (
        xa.server.url + "/some/where", cert, xa.ca_file))
    code, out, err = cli("--url", xb.url, "--ca-file", xb.ca_file, "cp",
                         xa.url + "src/p.bin", "p.bin")
    assert code == 0, err
    assert (xb.root / "p.bin").read_bytes() == data
    code, out, err = cli("--url", xb.url, "--ca-file", xb.ca_file, "cp", "--push",
                         "p.bin", xa.url + "back/p.bin")
    assert code == 0, err
    assert (xa.root / "back/p.bin").read_bytes() == data
    # without the profile nothing is sent there, and the macaroon instance says no
    conf.unlink()
    code, out, err = cli("--url", xb.url, "--ca-file", xb.ca_file, "cp",
                         xa.url + "src/p.bin", "q.bin")
    assert code == 1 and "HTTP 403" in err and not (xb.root / "q.bin").exists()


def test_big_file_copy_reports_progress(xa, xb, tmp_path):
    data = os.urandom(64 << 20)
    put_files(xa, {"big.bin": data})

    class Seen(ctadata.Progress):
        def advance(self, n):
            assert n > 0
            ctadata.Progress.advance(self, n)

    progress = Seen()
    with xclient(xa, tmp_path) as c:
        summary = c.copy("big.bin", xb.url + "big.bin", progress=progress)
    assert summary.transferred == 1
    assert progress.done_bytes == progress.total_bytes == len(data)
    assert sha(xb.root / "big.bin") == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# TPCPeer: an HTTP-TPC server that shows what it receives
# --------------------------------------------------------------------------

class TPCPeer(ServerDouble):
    """A WebDAV + HTTP-TPC server over the folder *root* (see the module
    docstring).  *mode*: "pull" performs a COPY with Source: (GET it with
    the TransferHeader* headers, then markers and "success: Created");
    "no-verdict" sends markers and ends; "failure" ends with a failure line;
    "slow" performs the pull and sends a marker per 1/4 of the file.
    ``requests``: (method, path, {header: value}) of every request."""

    def __init__(self, root, mode="pull", ca_file=None):
        ServerDouble.__init__(self)
        self.root, self.mode, self.ca_file = Path(root), mode, ca_file
        self.requests = []
        self.lock = threading.Lock()

    def headers_seen(self):
        with self.lock:
            return [h for _m, _p, h in self.requests]


class _TPCHandler(DoubleHandler):
    def _local(self):
        path = unquote(urlsplit(self.path).path)
        return self.double.root / path.lstrip("/"), path

    def _note(self):
        with self.double.lock:
            self.double.requests.append((self.command, self.path, dict(self.headers.items())))

    def do_PROPFIND(self):
        self._note()
        local, path = self._local()
        if not local.exists():
            return self.send(404, "no such file")
        items = [(path, local)]
        if local.is_dir() and self.headers.get("Depth", "0") == "1":
            items += [(path.rstrip("/") + "/" + p.name, p) for p in sorted(local.iterdir())]
        out = ['<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">']
        for href, p in items:
            kind = "<D:collection/>" if p.is_dir() else ""
            size = "" if p.is_dir() else "<D:getcontentlength>%d</D:getcontentlength>" % (
                p.stat().st_size)
            out.append("<D:response><D:href>%s</D:href><D:propstat><D:prop><D:resourcetype>%s"
                       "</D:resourcetype>%s</D:prop><D:status>HTTP/1.1 200 OK</D:status>"
                       "</D:propstat></D:response>" % (quote(href), kind, size))
        out.append("</D:multistatus>")
        self.send(207, "".join(out), "application/xml")

    def do_HEAD(self):
        self._note()
        local, _ = self._local()
        if not local.is_file():
            return self.send(404, "")
        data = local.read_bytes()
        self._start(200, [("Content-Length", str(len(data))),
                          ("Digest", "adler32=" + adler(data))])

    def do_PUT(self):
        self._note()
        local, _ = self._local()
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.read_body())
        self.send(201, "")

    def do_MKCOL(self):
        self._note()
        local, _ = self._local()
        if local.exists():
            return self.send(405, "exists")
        local.mkdir(parents=True)
        self.send(201, "")

    def do_DELETE(self):
        self._note()
        local, _ = self._local()
        if not local.exists():
            return self.send(404, "")
        local.unlink()
        self.send(204, "")

    def do_COPY(self):
        self._note()
        peer = self.double
        local, _ = self._local()
        self.start_chunked(201, [("Content-Type", "text/perf-marker-stream")])
        marker = ("Perf Marker\nTimestamp: %d\nStripe Index: 0\nStripe Bytes Transferred: %d\n"
                  "Total Stripe Count: 1\nEnd\n")
        if peer.mode in ("no-verdict", "failure"):
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(b"")             # as XRootD does, before it fails
            self.write_chunk((marker % (time.time(), 0)).encode())
            if peer.mode == "failure":
                self.write_chunk(b"failure: the peer was told to fail\n")
            return self.end_chunked()
        status, data = self._fetch()
        if status != 200:
            self.write_chunk(b"failure: Remote side failed with status code %d\n" % status)
            return self.end_chunked()
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        steps = 4 if peer.mode == "slow" else 1
        for i in range(1, steps + 1):
            self.write_chunk((marker % (time.time(), len(data) * i // steps)).encode())
            self.wfile.flush()
            if steps > 1:
                time.sleep(0.05)
        self.write_chunk(b"success: Created\n")
        self.end_chunked()

    def _fetch(self):
        """GET the Source, with the TransferHeader* headers as headers."""
        src = urlsplit(self.headers["Source"])
        fwd = {k[len("TransferHeader"):]: v for k, v in self.headers.items()
               if k.lower().startswith("transferheader")}
        if src.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.double.ca_file)
            conn = http.client.HTTPSConnection(src.hostname, src.port, context=ctx, timeout=30)
        else:
            conn = http.client.HTTPConnection(src.hostname, src.port, timeout=30)
        try:
            conn.request("GET", src.path, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, data


TPCPeer.handler_class = _TPCHandler


def tokens_in(headers_list, token):
    return [h for h in headers_list if any(token in v for v in h.values())]


def test_the_token_never_reaches_the_other_origin(tmp_path, xa, monkeypatch):
    """The storage holds a bearer token (the XRootD fixture's macaroon for
    "/"): in a pull the other server gets a macaroon limited to the file,
    in a push nothing at all; our token shows in none of its requests."""
    put_files(xa, {"f.bin": os.urandom(5000)})
    with TPCPeer(tmp_path / "peer", ca_file=xa.ca_file) as peer, \
            ctadata.Client(url=xa.url, token=xa.token, ca_file=xa.ca_file, env={},
                           retries=0) as c:
        s = c.copy("f.bin", peer.url + "/in/pulled.bin", raise_on_failure=False)
        s2 = c.copy("f.bin", peer.url + "/in/pushed.bin", mode="push",
                    raise_on_failure=False)
        seen = peer.headers_seen()
    assert seen and not tokens_in(seen, xa.token)
    assert not any("Authorization" in h for h in seen)
    copies = [h for h in seen if "Source" in h]
    assert len(copies) == 1
    handed = copies[0]["TransferHeaderAuthorization"]
    assert handed.startswith("Bearer ") and handed != "Bearer " + xa.token
    assert copies[0]["Credential"] == "none" and copies[0]["Overwrite"] == "F"
    # (XRootD 5.5 refuses a macaroon that a macaroon asked for: see the module
    # docstring; the pull fails for that reason, the push works)
    assert s.transferred == 1 or "status code 403" in s.failures[0].error
    assert s2.transferred == 1, s2.failures and s2.failures[0].error
    assert (tmp_path / "peer/in/pushed.bin").read_bytes() == (xa.root / "f.bin").read_bytes()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    with ctadata.serve(str(root), token="serve-token-0123456789") as srv:
        yield srv


def test_pull_by_another_server_with_a_macaroon_and_progress(served, tmp_path):
    data = os.urandom(200000)
    make_tree(Path(served.root), {"d/f.bin": data})

    class Steps(ctadata.Progress):
        steps = []

        def advance(self, n):
            self.steps.append(n)
            ctadata.Progress.advance(self, n)

    with TPCPeer(tmp_path / "peer", mode="slow") as peer, served.client() as c:
        progress = Steps()
        summary = c.copy("d/f.bin", peer.url + "/x/f.bin", progress=progress)
        seen = peer.headers_seen()
    assert summary.transferred == 1
    assert (tmp_path / "peer/x/f.bin").read_bytes() == data
    assert progress.steps == [len(data) // 4] * 4 and progress.done_bytes == len(data)
    assert not tokens_in(seen, served.token)
    # the macaroon handed over reads that file only, and only reads
    copy = [h for h in seen if "Source" in h][0]
    mac = copy["TransferHeaderAuthorization"][len("Bearer "):]
    host, port = urlsplit(served.url).hostname, urlsplit(served.url).port

    def status(method, path, body=None):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request(method, path, body, {"Authorization": "Bearer " + mac})
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status
    assert status("GET", "/d/f.bin") == 200
    assert status("PUT", "/d/other.bin", b"x") in (401, 403)
    assert status("DELETE", "/d/f.bin") in (401, 403)


@pytest.mark.parametrize("mode,why", [
    ("no-verdict", "copy failed: the server did not say how the copy ended"),
    ("failure", "copy failed: the peer was told to fail")])
def test_no_final_line_or_a_failure_is_a_failure(served, tmp_path, mode, why):
    make_tree(Path(served.root), {"f.bin": b"some bytes"})
    with TPCPeer(tmp_path / "peer", mode=mode) as peer, served.client() as c:
        summary = c.copy("f.bin", peer.url + "/f.bin", raise_on_failure=False)
        seen = [(m, p) for m, p, _h in peer.requests]
    assert summary.failed == 1 and summary.failures[0].error.startswith(why)
    assert ("DELETE", "/f.bin") in seen          # what the failed copy left is removed
    assert not (tmp_path / "peer/f.bin").exists()
    with pytest.raises(ctadata.PartialFailure):
        with served.client() as c, TPCPeer(tmp_path / "peer2", mode=mode) as peer:
            c.copy("f.bin", peer.url + "/f.bin")


def test_a_storage_without_macaroons_hands_its_token_only_when_told(nginx_server, tmp_path):
    """nginx issues no macaroons: the other server could only read the
    source with our token, which goes there only with delegate_token."""
    folder = "cp-%d" % os.getpid()
    make_tree(nginx_server.root / folder, {"n.bin": b"from nginx"})
    url = nginx_server.url + "/" + folder + "/"
    with TPCPeer(tmp_path / "peer") as peer, \
            ctadata.Client(url=url, token=nginx_server.token, env={}, retries=0) as c:
        s = c.copy("n.bin", peer.url + "/n.bin", raise_on_failure=False)
        assert s.failed == 1
        assert s.failures[0].error.startswith(
            "%s would need your token to reach %sn.bin, whose server issues no macaroons "
            "(HTTP 405)" % (peer.url, url))
        assert "--delegate-token %s" % peer.url in s.failures[0].error
        assert not any(m == "COPY" for m, _p, _h in peer.requests)
        before = len(peer.headers_seen())
        assert before and not tokens_in(peer.headers_seen(), nginx_server.token)
        s = c.copy("n.bin", peer.url + "/n.bin", delegate_token=[peer.url + "/any/path"])
        assert s.transferred == 1
        seen = peer.headers_seen()[before:]
    assert (tmp_path / "peer/n.bin").read_bytes() == b"from nginx"
    # delegated: the token is sent to that origin, and handed to it for nginx
    assert all(h.get("Authorization") == "Bearer " + nginx_server.token for h in seen)
    copy = [h for h in seen if "Source" in h][0]
    assert copy["TransferHeaderAuthorization"] == "Bearer " + nginx_server.token
    shutil.rmtree(str(nginx_server.root / folder))


# --------------------------------------------------------------------------
# copies within one server: WebDAV COPY
# --------------------------------------------------------------------------

@pytest.fixture(params=["nginx", "apache", "serve"])
def within(request, tmp_path):
    """(a Client on an empty folder, that folder on disk) of nginx, Apache,
    ctadata serve."""
    if request.param == "serve":
        root = tmp_path / "serve-root"
        root.mkdir()
        with ctadata.serve(str(root), token="serve-token-abcdef") as srv:
            with srv.client() as c:
                yield c, root
        return
    for target in dav_target(request, request.param):
        with ctadata.Client(url=target.url, token=target.token, env={}, retries=1) as c:
            yield c, target.root


def test_copy_within_one_server(within, cli, monkeypatch):
    c, root = within
    spec = {"src/a.bin": os.urandom(3000), "src/sub/b.bin": os.urandom(10),
            "src/sub/c.txt": b""}
    make_tree(root, spec)
    s = c.copy("src/a.bin", "a-copy.bin")
    assert s.transferred == 1 and (root / "a-copy.bin").read_bytes() == spec["src/a.bin"]
    s = c.copy("src", "tree-copy", recursive=True, jobs=2)
    assert s.transferred == 3
    assert tree_digests(root / "tree-copy") == tree_digests(root / "src")
    # already there and the same: skipped; different: refused, then --overwrite
    assert c.copy("src", "tree-copy", recursive=True).skipped == 3
    (root / "tree-copy/a.bin").write_bytes(b"other")
    s = c.copy("src/a.bin", "tree-copy/a.bin", raise_on_failure=False)
    assert s.failed == 1 and "different (5 bytes, the source 3000)" in s.failures[0].error
    assert (root / "tree-copy/a.bin").read_bytes() == b"other"
    assert c.copy("src/a.bin", "tree-copy/", overwrite=True).transferred == 1
    assert (root / "tree-copy/a.bin").read_bytes() == spec["src/a.bin"]
    with pytest.raises(ctadata.ConfigError, match="is a folder"):
        c.copy("src", "x")
    with pytest.raises(ctadata.NotFound):
        c.copy("nothing", "x")


def test_the_server_refuses_to_replace_without_overwrite(served):
    """Overwrite: F reaches the server: a file that appears between the look
    at the destination and the COPY is not replaced (412)."""
    make_tree(Path(served.root), {"a": b"aaa", "b": b"bbb"})
    with served.client() as c:
        dav = c._remote
        resp = dav.tr.request("COPY", c.url_for("a"), {"Destination": c.url_for("b"),
                                                       "Overwrite": "F"}, ok=(412,))
        dav.tr.release(resp)
        worker = ctadata._ThirdPartyCopy(c._copies.origins(), "pull", False, True, None, None)
        origins = worker.origins
        peer = origins.peer(c.url)
        t = ctadata._CopyTask(c.stat("a"), c.url_for("b"), peer, peer, None,
                              (c.url_for("a"), c.url + "/"))
        with pytest.raises(ctadata.TransferError, match="refused to replace it"):
            worker(t)
    assert (Path(served.root) / "b").read_bytes() == b"bbb"


def test_local_sides_make_it_a_download_or_an_upload(served, tmp_path, monkeypatch):
    make_tree(Path(served.root), {"r/x.bin": b"remote"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "up.txt").write_bytes(b"local")
    with served.client() as c:
        assert c.copy("r/x.bin", "./x.bin").transferred == 1
        assert c.copy("./up.txt", "r/").transferred == 1
        assert c.copy(tmp_path / "up.txt", "r/up2.txt").transferred == 1
        assert c.copy("file:" + str(tmp_path / "up.txt"), "r/up3.txt").transferred == 1
        with pytest.raises(ctadata.ConfigError, match="both local"):
            c.copy("./up.txt", "./elsewhere.txt")
    assert (tmp_path / "x.bin").read_bytes() == b"remote"
    for name in ("up.txt", "up2.txt", "up3.txt"):
        assert (Path(served.root) / "r" / name).read_bytes() == b"local"


def test_cp_needs_direct_mode():
    c = ctadata.Client(service="http://127.0.0.1:9/services/ds/", env={})
    with pytest.raises(ctadata.ConfigError, match="not offered by the download service"):
        c.copy("a", "b")
