"""Self-test of the FTS3 REST stand-in (tests/ftsserver.py) with plain http.client.

The stand-in copies for real between loopback storage: folders of the session's
nginx and Apache WebDAV servers (tests/conftest.py) and the in-process tape
stand-in (tests/tapeserver.py, which sends adler32 Digests and needs its own
token).
"""

import hashlib
import http.client
import json
import os
import shutil
import ssl
import time
import zlib
from urllib.parse import quote, urlsplit

import pytest

import servers
from ftsserver import FAILED_JOB_REASON, FTSServer
from tapeserver import TapeServer

FTS_TOKEN = "fts-test-token"
AUTH = {"Authorization": "Bearer " + FTS_TOKEN}


class Reply(object):
    def __init__(self, resp):
        self.status, self.headers, self.raw = resp.status, resp.headers, resp.read()

    @property
    def json(self):
        return json.loads(self.raw.decode("utf-8"))


def call(url, method, path="", body=None, headers=AUTH, context=None):
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=20,
                                           context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        hdrs = dict(headers)
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def submit(fts, files, expect=200, **params):
    r = call(fts.url, "POST", "/jobs", {"files": files, "params": params})
    assert r.status == expect, r.raw
    return r.json["job_id"] if expect == 200 else r.json


def adler(data):
    return "%08x" % (zlib.adler32(data) & 0xFFFFFFFF)


class Folder(object):
    """A private folder on a running real server (like conftest's DavTarget)."""

    def __init__(self, server, name):
        self.server, self.root = server, server.root / name
        self.url = "%s/%s" % (server.url, name)
        self.root.mkdir()
        server.grant_access(self.root)

    def file_url(self, rel):
        return self.url + "/" + quote(rel)

    def write(self, rel, data):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.server.grant_access(path.parent)
        return self.file_url(rel)

    def read(self, rel):
        return (self.root / rel).read_bytes()

    def exists(self, rel):
        return (self.root / rel).exists()


@pytest.fixture
def src(nginx_server, request):
    folder = Folder(nginx_server, "fts-src-%s" % request.node.name[:40])
    yield folder
    shutil.rmtree(str(folder.root), ignore_errors=True)


@pytest.fixture
def dst(apache_server, request):
    folder = Folder(apache_server, "fts-dst-%s" % request.node.name[:40])
    yield folder
    shutil.rmtree(str(folder.root), ignore_errors=True)


@pytest.fixture
def fts(src, dst):
    """Each storage has its own token; the stand-in gets them by origin (as a
    delegated credential) for files submitted without source/destination tokens."""
    origins = {src.server.url: src.server.token, dst.server.url: dst.server.token}
    with FTSServer(token=FTS_TOKEN, storage_tokens=origins) as server:
        yield server
    assert server.errors == []


# ---------------------------------------------------------------- copies

def test_copies_are_byte_identical_and_reported(fts, src, dst):
    files = {"a.bin": os.urandom(300000), "sub dir/b #1.dat": b"hello" * 1000,
             "deep/er/c.txt": b""}
    subs = [{"sources": [src.write(rel, data)], "destinations": [dst.file_url(rel)],
             "filesize": len(data), "metadata": {"n": i}}
            for i, (rel, data) in enumerate(files.items())]
    for s in subs:
        s["source_tokens"] = [src.server.token]
        s["destination_tokens"] = [dst.server.token]
    job_id = submit(fts, subs, verify_checksum=True, overwrite=False, retry=1)
    job = fts.wait(job_id)
    assert job["job_state"] == "FINISHED" and job["reason"] is None
    for rel, data in files.items():
        assert hashlib.sha256(dst.read(rel)).digest() == hashlib.sha256(data).digest()

    r = call(fts.url, "GET", "/jobs/" + job_id)
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json
    assert doc["job_id"] == job_id and doc["job_state"] == "FINISHED"
    assert doc["http_status"] == "200 Ok" and "files" not in doc
    assert doc["verify_checksum"] == "b" and doc["retry"] == 1 and doc["overwrite_flag"] is None
    assert doc["source_se"] == "http://127.0.0.1" and doc["job_finished"]
    assert doc["job_metadata"] == {"auth_method": "oauth2"}
    assert doc["user_dn"] == "ctadata-test-user"

    rows = call(fts.url, "GET", "/jobs/%s/files" % job_id).json
    assert len(rows) == 3
    by_dest = {r["dest_surl"]: r for r in rows}
    for i, (rel, data) in enumerate(files.items()):
        row = by_dest[dst.file_url(rel)]
        assert row["file_state"] == "FINISHED" and row["reason"] is None
        assert row["source_surl"] == src.file_url(rel) and row["file_index"] == i
        assert row["filesize"] == len(data) and row["user_filesize"] == len(data)
        assert row["checksum"] == "adler32:" + adler(data)
        assert row["file_metadata"] == {"n": i} and row["retry"] == 0
        assert row["start_time"] and row["finish_time"] and row["job_id"] == job_id
        assert "_src_token" not in row
    sub = call(fts.url, "GET", "/jobs/%s?files=file_state,dest_surl" % job_id).json
    assert sorted(f["dest_surl"] for f in sub["files"]) == sorted(by_dest)
    assert all(set(f) == {"file_state", "dest_surl"} for f in sub["files"])


def test_single_token_user_and_storage_tokens(src, dst):
    """Without source_tokens/destination_tokens and without a credential for the
    storage, FTS uses the submitter's token, which the storage here rejects."""
    data = b"payload" * 100
    sub = [{"sources": [src.write("x.bin", data)], "destinations": [dst.file_url("x.bin")]}]
    with FTSServer(token=FTS_TOKEN) as fts:
        job = fts.wait(submit(fts, sub))
        assert job["job_state"] == "FAILED" and job["reason"] == FAILED_JOB_REASON
        row = fts.files_of(job["job_id"])[0]
        assert row["file_state"] == "FAILED" and "401" in row["reason"]
    origins = {src.server.url: src.server.token, dst.server.url: dst.server.token}
    with FTSServer(tokens={"tok-b": "bob"}, token=None, storage_tokens=origins) as fts:
        r = call(fts.url, "POST", "/jobs", {"files": sub},
                 headers={"Authorization": "Bearer tok-b"})
        job = fts.wait(r.json["job_id"])
        assert job["job_state"] == "FINISHED" and job["user_dn"] == "bob"
        assert dst.read("x.bin") == data


def test_source_with_digest_and_its_own_token(tmp_path, dst):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "d.fits").write_bytes(b"D" * 5000)
    with TapeServer(tmp_path, token="tape-tok", default_locality="ONLINE") as tape, \
            FTSServer(token=FTS_TOKEN, storage_tokens={dst.server.url: dst.server.token}) as fts:
        sub = [{"sources": [tape.dav_url("/run/d.fits")], "destinations": [dst.file_url("d.fits")],
                "source_tokens": ["tape-tok"], "destination_tokens": [dst.server.token],
                "checksum": "adler32:" + adler(b"D" * 5000)}]
        job = fts.wait(submit(fts, sub, verify_checksum=True))
        assert job["job_state"] == "FINISHED"
        gets = tape.find(method="GET", path="/run/d.fits")
        assert len(gets) == 1 and gets[0].authorized
        assert gets[0].headers["want-digest"] == "adler32"
        assert dst.read("d.fits") == b"D" * 5000


# ---------------------------------------------------------------- failures, retries

def test_injected_failure_missing_source_and_finished_dirty(fts, src, dst):
    good = src.write("good.bin", b"g" * 10)
    bad = src.write("bad.bin", b"b" * 10)
    outcome = fts.add_outcome("*/bad.bin", fail="TRANSFER Connection reset by peer",
                              recoverable=False)
    job_id = submit(fts, [
        {"sources": [good], "destinations": [dst.file_url("good.bin")]},
        {"sources": [bad], "destinations": [dst.file_url("bad.bin")]},
        {"sources": [src.file_url("missing.bin")], "destinations": [dst.file_url("m.bin")]},
    ], retry=3)
    job = fts.wait(job_id)
    assert job["job_state"] == "FINISHEDDIRTY" and job["reason"] == FAILED_JOB_REASON
    rows = {os.path.basename(r["dest_surl"]): r for r in fts.files_of(job_id)}
    assert rows["good.bin"]["file_state"] == "FINISHED"
    assert rows["bad.bin"]["file_state"] == "FAILED"
    assert rows["bad.bin"]["reason"] == "TRANSFER Connection reset by peer"
    assert rows["m.bin"]["file_state"] == "FAILED" and "404" in rows["m.bin"]["reason"]
    assert rows["m.bin"]["retry"] == 0 and rows["bad.bin"]["retry"] == 0   # not recoverable
    assert outcome.hits == 1
    assert not dst.exists("bad.bin") and not dst.exists("m.bin")


def test_recoverable_failure_is_retried(fts, src, dst):
    url = src.write("flaky.bin", b"f" * 100)
    fts.add_outcome("*flaky.bin", fail="TRANSFER timeout", times=2)
    job_id = submit(fts, [{"sources": [url], "destinations": [dst.file_url("flaky.bin")]}],
                    retry=2, retry_delay=0)
    assert fts.wait(job_id)["job_state"] == "FINISHED"
    row = fts.files_of(job_id)[0]
    assert row["retry"] == 2 and row["file_state"] == "FINISHED"
    retries = call(fts.url, "GET", "/jobs/%s/files/%d/retries" % (job_id, row["file_id"])).json
    assert [(r["attempt"], r["reason"]) for r in retries] == [(1, "TRANSFER timeout"),
                                                               (2, "TRANSFER timeout")]
    assert [t["outcome"] for t in fts.transfers] == ["FAILED", "FAILED", "FINISHED"]
    fts.add_outcome("*again.bin", fail="TRANSFER timeout")
    url = src.write("again.bin", b"a")
    job = fts.wait(submit(fts, [{"sources": [url], "destinations": [dst.file_url("again.bin")]}],
                          retry=1))
    assert job["job_state"] == "FAILED"
    assert fts.files_of(job["job_id"])[0]["retry"] == 1


def test_overwrite(fts, src, dst):
    url = src.write("o.bin", b"new")
    dst.write("o.bin", b"old content")
    sub = [{"sources": [url], "destinations": [dst.file_url("o.bin")]}]
    job = fts.wait(submit(fts, sub, retry=2))
    row = fts.files_of(job["job_id"])[0]
    assert job["job_state"] == "FAILED" and "overwrite is not enabled" in row["reason"]
    assert row["retry"] == 0 and dst.read("o.bin") == b"old content"
    job = fts.wait(submit(fts, sub, overwrite=True))
    assert job["job_state"] == "FINISHED" and job["overwrite_flag"] == "Y"
    assert dst.read("o.bin") == b"new"


def test_checksums_are_verified(fts, src, dst):
    url = src.write("c.bin", b"c" * 4096)
    wrong = [{"sources": [url], "destinations": [dst.file_url("c.bin")],
              "checksum": "adler32:deadbeef"}]
    job = fts.wait(submit(fts, wrong, verify_checksum=True))
    row = fts.files_of(job["job_id"])[0]
    assert job["job_state"] == "FAILED" and "CHECKSUM MISMATCH" in row["reason"]
    assert not dst.exists("c.bin")
    # verify_checksum false + a user checksum = compare it with the destination ("target")
    job = fts.wait(submit(fts, wrong))
    row = fts.files_of(job["job_id"])[0]
    assert job["verify_checksum"] == "t" and "DESTINATION CHECKSUM MISMATCH" in row["reason"]
    assert not dst.exists("c.bin")      # the bad copy is deleted
    right = [dict(wrong[0], checksum="adler32:" + adler(b"c" * 4096))]
    job = fts.wait(submit(fts, right, verify_checksum=True))
    assert job["job_state"] == "FINISHED" and dst.read("c.bin") == b"c" * 4096
    job = fts.wait(submit(fts, [{"sources": [url], "destinations": [dst.file_url("c2.bin")],
                                 "filesize": 12}]))
    assert "User specified source file size is 12" in fts.files_of(job["job_id"])[0]["reason"]


def test_only_loopback_is_contacted(fts, src):
    url = src.write("l.bin", b"l")
    job = fts.wait(submit(fts, [
        {"sources": [url], "destinations": ["https://storage.example.org/x"]},
        {"sources": [url], "destinations": ["root://127.0.0.1:1094//x"]}]))
    reasons = {r["dest_surl"]: r["reason"] for r in fts.files_of(job["job_id"])}
    assert job["job_state"] == "FAILED"
    assert "only loopback hosts" in reasons["https://storage.example.org/x"]
    assert "protocol root is not emulated" in reasons["root://127.0.0.1:1094//x"]


# ---------------------------------------------------------------- states, cancel

def test_states_while_running_and_cancel(fts, src, dst):
    urls = [src.write("s%d.bin" % i, b"s") for i in range(3)]
    fts.max_active = 2
    fts.add_outcome("*/s*.bin", delay=5)
    job_id = submit(fts, [{"sources": [u], "destinations": [dst.file_url(os.path.basename(u))]}
                          for u in urls])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        doc = call(fts.url, "GET", "/jobs/%s?files=file_state" % job_id).json
        states = sorted(f["file_state"] for f in doc["files"])
        if states == ["ACTIVE", "ACTIVE", "SUBMITTED"]:
            break
        time.sleep(0.02)
    assert doc["job_state"] == "ACTIVE" and states == ["ACTIVE", "ACTIVE", "SUBMITTED"]
    r = call(fts.url, "DELETE", "/jobs/" + job_id)
    assert r.status == 200 and r.json["job_state"] == "CANCELED"
    assert r.json["http_status"] == "200 Ok" and r.json["reason"] == "Job canceled by the user"
    job = fts.wait(job_id)
    assert job["job_state"] == "CANCELED"
    rows = fts.files_of(job_id)
    assert {r["file_state"] for r in rows} == {"CANCELED"}
    time.sleep(0.1)         # the workers notice the cancel and write nothing
    assert not any(dst.exists("s%d.bin" % i) for i in range(3))
    again = call(fts.url, "DELETE", "/jobs/" + job_id)
    assert again.status == 200 and again.json["http_status"] == "304 Not Modified"
    assert again.json["job_state"] == "CANCELED"


def test_cancel_some_files_of_a_job(fts, src, dst):
    urls = [src.write("k%d.bin" % i, b"k") for i in range(2)]
    fts.add_outcome("*/k*.bin", delay=5)
    job_id = submit(fts, [{"sources": [u], "destinations": [dst.file_url(os.path.basename(u))]}
                          for u in urls])
    ids = [r["file_id"] for r in fts.files_of(job_id)]
    r = call(fts.url, "DELETE", "/jobs/%s/files/%d,999999" % (job_id, ids[0]))
    assert r.json == ["CANCELED", "File does not belong to the job"]
    r = call(fts.url, "DELETE", "/jobs/%s/files/%d" % (job_id, ids[1]))
    assert r.json == "CANCELED"
    assert fts.wait(job_id)["job_state"] == "CANCELED"


# ---------------------------------------------------------------- API surface

def test_auth_errors_whoami_and_records(fts):
    r = call(fts.url, "GET", "/whoami", headers={})
    assert r.status == 401
    assert r.json == {"status": "401 Unauthorized",
                      "message": "A valid X509 certificate or proxy is needed"}
    r = call(fts.url, "GET", "/jobs", headers={"Authorization": "Bearer nope"})
    assert r.status == 403 and r.json["message"].startswith("Invalid credentials")
    me = call(fts.url, "GET", "/whoami").json
    assert me["method"] == "oauth2" and me["user_dn"] == "ctadata-test-user"
    assert me["vos"] == ["cta"] and len(me["delegation_id"]) == 16 and "token" not in me
    assert [rec.status for rec in fts.requests] == [401, 403, 200]
    assert all(FTS_TOKEN not in repr(rec.headers) for rec in fts.requests)
    assert fts.requests[-1].headers["authorization"] == "Bearer <redacted>"


@pytest.mark.parametrize("body,headers,status,message", [
    (b"{oops", {"Content-Type": "application/json"}, 400, "Badly formatted JSON request"),
    (b"{}", {"Content-Type": "text/plain"}, 400, "Expecting application/json"),
    ({"params": {}}, {}, 400, "No transfers operations specified"),
    ({"files": [{"destinations": ["http://127.0.0.1/x"]}]}, {}, 400, "Missing parameter"),
    ({"files": [{"sources": ["127.0.0.1/x"], "destinations": ["http://127.0.0.1/x"]}]}, {},
     400, "Missing scheme"),
    ({"files": [{"sources": ["file:///etc/passwd"], "destinations": ["http://127.0.0.1/x"]}]},
     {}, 400, "Can not transfer local files"),
    ({"files": [{"sources": ["http://127.0.0.1/"], "destinations": ["http://127.0.0.1/x"]}]},
     {}, 400, "Missing path"),
    ({"files": []}, {}, 400, "No valid pairs available"),
    ({"files": [{"sources": ["http://127.0.0.1/a", "http://127.0.0.1/b"],
                 "destinations": ["http://127.0.0.1/x"]}]}, {}, 400, "multiple replica"),
    ({"files": [{"sources": ["http://127.0.0.1/a"], "destinations": ["http://127.0.0.1/x"],
                 "source_tokens": ["t"]}]}, {}, 400, "Both source_tokens"),
    ({"delete": [{"surl": "http://127.0.0.1/a"}]}, {}, 405, "no longer supported"),
])
def test_submission_errors(fts, body, headers, status, message):
    r = call(fts.url, "POST", "/jobs", body, dict(AUTH, **headers))
    assert r.status == status, r.raw
    assert message in r.json["message"]
    assert r.json["status"].startswith(str(status))
    assert not fts.jobs


def test_unknown_jobs_and_lists(fts, src, dst):
    r = call(fts.url, "GET", "/jobs/no-such-job")
    assert r.status == 404
    assert r.json == {"job_id": "no-such-job", "http_status": "404 Not Found",
                      "http_message": 'No job with the id "no-such-job" has been found'}
    url = src.write("q.bin", b"q")
    job_id = submit(fts, [{"sources": [url], "destinations": [dst.file_url("q.bin")]}])
    fts.wait(job_id)
    r = call(fts.url, "GET", "/jobs/%s,nope" % job_id)
    assert r.status == 207 and [j["http_status"] for j in r.json] == ["200 Ok", "404 Not Found"]
    assert call(fts.url, "GET", "/jobs").json == []          # unfinished jobs only
    listed = call(fts.url, "GET", "/jobs?state_in=FINISHED").json
    assert [j["job_id"] for j in listed] == [job_id]
    assert call(fts.url, "GET", "/jobs/%s/files" % "nope").status == 404
    assert call(fts.url, "GET", "/nothing").status == 404
    other = call(fts.url, "GET", "/jobs/" + job_id, headers={})
    assert other.status == 401


def test_client_certificate_over_tls(tmp_path, src, dst):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    ca, crt, key = servers.make_test_ca(tmp_path / "ca")
    pem = servers.make_client_cert(tmp_path / "ca", tmp_path / "user.pem", cn="Jane Doe")
    origins = {src.server.url: src.server.token, dst.server.url: dst.server.token}
    with FTSServer(token=FTS_TOKEN, tls=(crt, key), client_ca=ca, storage_tokens=origins,
                   require_delegation=False) as fts:
        assert fts.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(pem)
        me = call(fts.url, "GET", "/whoami", headers={}, context=ctx).json
        assert me["method"] == "certificate" and me["user_dn"] == "/CN=Jane Doe"
        url = src.write("cert.bin", b"via certificate")
        r = call(fts.url, "POST", "/jobs", {"files": [{"sources": [url],
                 "destinations": [dst.file_url("cert.bin")]}]}, headers={}, context=ctx)
        assert fts.wait(r.json["job_id"])["job_state"] == "FINISHED"
        assert dst.read("cert.bin") == b"via certificate"
        plain = ssl.create_default_context(cafile=ca)
        assert call(fts.url, "GET", "/whoami", headers={}, context=plain).status == 401
        # real FTS wants a delegated proxy from certificate users
        fts.require_delegation = True
        job = {"files": [{"sources": [url], "destinations": [dst.file_url("cert2.bin")]}]}
        r = call(fts.url, "POST", "/jobs", job, headers={}, context=ctx)
        assert r.status == 419 and "No delegation found" in r.json["message"]
        dlg = call(fts.url, "GET", "/delegation/" + me["delegation_id"], headers={}, context=ctx)
        assert dlg.status == 200 and dlg.json is None
        fts.delegate("/CN=Jane Doe", seconds=600)
        r = call(fts.url, "POST", "/jobs", job, headers={}, context=ctx)
        assert r.status == 419 and "less than one hour left" in r.json["message"]
        fts.delegate("/CN=Jane Doe", seconds=-5)
        r = call(fts.url, "POST", "/jobs", job, headers={}, context=ctx)
        assert r.status == 419 and "expired" in r.json["message"]
        fts.delegate("/CN=Jane Doe")
        dlg = call(fts.url, "GET", "/delegation/" + me["delegation_id"], headers={}, context=ctx)
        assert set(dlg.json) == {"termination_time", "voms_attrs"}
        assert call(fts.url, "GET", "/delegation/0123456789abcdef", headers={},
                    context=ctx).status == 403
        r = call(fts.url, "POST", "/jobs", job, headers={}, context=ctx)
        assert fts.wait(r.json["job_id"])["job_state"] == "FINISHED"
        # token users need no delegation
        assert call(fts.url, "POST", "/jobs", job, context=ctx).status == 200


def test_https_storage_is_verified_with_its_ca(nginx_tls_server, dst):
    folder = Folder(nginx_tls_server, "fts-tls-src")
    try:
        url = folder.write("t.bin", b"over tls")
        origins = {nginx_tls_server.url: nginx_tls_server.token,
                   dst.server.url: dst.server.token}
        with FTSServer(token=FTS_TOKEN, storage_tokens=origins,
                       storage_ca=nginx_tls_server.ca_file) as fts:
            davs = "davs" + url[len("https"):]
            job = fts.wait(submit(fts, [{"sources": [davs],
                                         "destinations": [dst.file_url("t.bin")]}]))
            assert job["job_state"] == "FINISHED" and dst.read("t.bin") == b"over tls"
        with FTSServer(token=FTS_TOKEN, storage_tokens=origins) as fts:   # no CA: refused
            job = fts.wait(submit(fts, [{"sources": [url],
                                         "destinations": [dst.file_url("t2.bin")]}]))
            assert job["job_state"] == "FAILED"
            assert "CERTIFICATE_VERIFY_FAILED" in fts.files_of(job["job_id"])[0]["reason"]
    finally:
        shutil.rmtree(str(folder.root), ignore_errors=True)
