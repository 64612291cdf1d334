"""Self-test of the download-service double (tests/dsserver.py), via http.client.

Upstreams: the dCache-like `ctadata serve` (and, where a test needs faults or
the request log with headers, tests/faultserver.py) and folders of the
session's real nginx and Apache WebDAV servers (tests/conftest.py).
"""

import email.utils
import http.client
import json
import os
import re
import secrets
import shutil
import time
import urllib.parse

try:
    import tracemalloc
except ImportError:  # PyPy has no tracemalloc
    tracemalloc = None

import pytest

from dsserver import CS_SCOPE, DS_SCOPE, SAMPLE_PEM, DownloadService
from faultserver import FaultServer

TOKEN = "alice-api-token"
USERS = {
    TOKEN: "alice_example_org",
    "bob-token": {"name": "Bob.Smith@Example.org", "scopes": [DS_SCOPE, CS_SCOPE]},
    "no-scope-token": {"name": "carol", "scopes": ["read:users"]},
}
UP_TOKEN = "up-" + secrets.token_urlsafe(12)
A_BIN = bytes(range(256)) * 1200  # 307200 bytes
DS = "/services/downloadservice/"
CS = "/services/certificateservice/"


def seed(root):
    run = os.path.join(root, "lst", "data", "run1")
    os.makedirs(os.path.join(run, "sub"))
    os.makedirs(os.path.join(root, "lst", "users", "alice_example_org"))
    with open(os.path.join(run, "a.bin"), "wb") as f:
        f.write(A_BIN)
    with open(os.path.join(run, "with space.txt"), "wb") as f:
        f.write(b"spaced\n")
    return str(root)


class Upstream:
    """Where a test's storage root is: ``url`` (no trailing slash), ``token``, ``root`` on disk."""

    def __init__(self, url, token, root):
        self.url, self.token, self.root = url, token, str(root)


@pytest.fixture(params=["serve", "nginx", "apache"])
def upstream(request, tmp_path):
    """A seeded storage root on the dCache-like `ctadata serve` or on a folder
    of the session's real nginx / Apache server (tests/conftest.py)."""
    if request.param == "serve":
        import ctadata
        root = seed(tmp_path / "root")
        with ctadata.serve(root, token=UP_TOKEN) as server:
            yield Upstream(server.url, UP_TOKEN, root)
        return
    server = request.getfixturevalue(request.param + "_server")
    folder = "ds-" + secrets.token_hex(6)
    root = seed(server.root / folder)
    server.grant_access(root)
    try:
        yield Upstream(server.url + "/" + folder, server.token, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fault_upstream(tmp_path):
    with FaultServer(seed(tmp_path / "root"), UP_TOKEN) as server:
        yield server


@pytest.fixture
def ds(upstream):
    with DownloadService(upstream.url, upstream.token, users=USERS) as service:
        yield service


@pytest.fixture
def fds(fault_upstream):
    with DownloadService(fault_upstream.url, UP_TOKEN, users=USERS) as service:
        yield service


def call(service, method, path, body=None, headers=None, token=TOKEN, conn=None):
    """-> (status, headers, body bytes, response)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", service.port, timeout=20)
    hdrs = {"Authorization": "Bearer " + token} if token else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=body, headers=hdrs, encode_chunked=not isinstance(body, (bytes, str, type(None))))
    resp = conn.getresponse()
    data = resp.read()
    if own:
        conn.close()
    return resp.status, resp.headers, data, resp


def listing(service, path, **kw):
    status, _, data, _ = call(service, "GET", DS + "list/" + path, **kw)
    assert status == 200, data
    return json.loads(data)


# ---- list -------------------------------------------------------------------

def test_list_directory(ds, upstream):
    entries = listing(ds, "lst/data/run1")
    assert entries[0] == {"href": "lst/data/run1/", "size": None, "mtime": entries[0]["mtime"],
                          "url": upstream.url + "/lst/data/run1/", "type": "directory"}
    by_href = {e["href"]: e for e in entries}
    assert set(by_href) == {"lst/data/run1/", "lst/data/run1/a.bin",
                            "lst/data/run1/with%20space.txt", "lst/data/run1/sub/"}
    a_bin = by_href["lst/data/run1/a.bin"]
    assert (a_bin["size"], a_bin["type"]) == (str(len(A_BIN)), "file")
    assert a_bin["url"] == upstream.url + "/lst/data/run1/a.bin"
    assert email.utils.parsedate_to_datetime(a_bin["mtime"]).year >= 2020
    assert by_href["lst/data/run1/sub/"]["type"] == "directory"


def test_list_file_root_and_missing(ds):
    assert [e["href"] for e in listing(ds, "lst/data/run1/a.bin")] == ["lst/data/run1/a.bin"]
    assert "lst/" in [e["href"] for e in listing(ds, "")]
    status, headers, data, _ = call(ds, "GET", DS + "list/lst/nope")
    assert status == 404 and data.startswith(b"Error: 404")
    assert headers["Content-Type"].startswith("text/")


def test_list_asks_upstream_for_depth_1_with_its_token(fds, fault_upstream):
    listing(fds, "lst/data/run1")
    (record,) = fault_upstream.find("PROPFIND")
    assert record.headers["depth"] == "1"
    assert record.headers["authorization"] == "Bearer " + UP_TOKEN


# ---- fetch ------------------------------------------------------------------

def test_fetch_streams_chunked_attachment(ds):
    status, headers, data, resp = call(ds, "GET", DS + "fetch/lst/data/run1/a.bin?chunk_size=1000")
    assert status == 200 and data == A_BIN
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"].startswith('attachment; filename="a.bin"')
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    status, _, data, _ = call(ds, "GET", DS + "fetch/lst/data/run1/with%20space.txt")
    assert (status, data) == (200, b"spaced\n")
    status, headers, data, _ = call(ds, "HEAD", DS + "fetch/lst/data/run1/a.bin")
    assert (status, data, headers["Content-Type"]) == (200, b"", "application/octet-stream")


def test_fetch_rejects_dotdot_and_passes_404(ds):
    for path in ("lst/data/../data/run1/a.bin", "lst/%2E%2E/lst/data/run1/a.bin"):
        status, _, data, _ = call(ds, "GET", DS + "fetch/" + path)
        assert status == 400 and b".." in data
    status, _, data, _ = call(ds, "GET", DS + "fetch/lst/nope.bin")
    assert status == 404 and data.startswith(b"Error: 404")


def test_short_fetch_ends_body_normally_and_keeps_connection(ds):
    ds.short_fetch["lst/data/run1/a.bin"] = 1000
    conn = http.client.HTTPConnection("127.0.0.1", ds.port, timeout=20)
    for _ in range(2):
        status, _, data, resp = call(ds, "GET", DS + "fetch/lst/data/run1/a.bin", conn=conn)
        assert (status, data) == (200, A_BIN[:1000]) and not resp.will_close
    ds.short_fetch["lst/data/run1/a.bin"] = [10, None]
    assert call(ds, "GET", DS + "fetch/lst/data/run1/a.bin", conn=conn)[2] == A_BIN[:10]
    assert call(ds, "GET", DS + "fetch/lst/data/run1/a.bin", conn=conn)[2] == A_BIN
    assert call(ds, "GET", DS + "fetch/lst/data/run1/a.bin", conn=conn)[2] == A_BIN
    conn.close()


def test_upstream_failing_mid_read_gives_short_200(fds, fault_upstream):
    fault_upstream.add_fault("truncate", method="GET", path="/lst/data/run1/a.bin", after=5000)
    status, _, data, _ = call(fds, "GET", DS + "fetch/lst/data/run1/a.bin")
    assert (status, data) == (200, A_BIN[:5000])
    # The webdav pass-through forwards Content-Length, so it can only cut the connection.
    fault_upstream.add_fault("truncate", method="GET", path="/lst/data/run1/a.bin", after=5000)
    with pytest.raises(http.client.IncompleteRead):
        call(fds, "GET", DS + "webdav/lst/data/run1/a.bin")


def test_fetch_follows_pool_redirect_without_leaking_token(fds, fault_upstream):
    fault_upstream.redirect_get = True
    status, _, data, _ = call(fds, "GET", DS + "fetch/lst/data/run1/a.bin")
    assert (status, data) == (200, A_BIN)
    (pool_get,) = fault_upstream.find("GET", server="pool")
    assert "authorization" not in pool_get.headers


def test_unreachable_upstream_is_502():
    with DownloadService("http://127.0.0.1:9", UP_TOKEN, users=USERS) as service:
        status, _, data, _ = call(service, "GET", DS + "list/lst")
        assert status == 502 and data.startswith(b"Error:")


# ---- upload -----------------------------------------------------------------

def test_upload_with_content_length(ds, upstream):
    status, _, data, _ = call(ds, "POST", DS + "upload/new/deep/f.bin", body=A_BIN)
    assert status == 200
    assert json.loads(data) == {"status": "uploaded", "total_written": len(A_BIN),
                                "path": "lst/users/alice_example_org/new/deep/f.bin"}
    with open(os.path.join(upstream.root, "lst/users/alice_example_org/new/deep/f.bin"), "rb") as f:
        assert f.read() == A_BIN
    # What another user passes to fetch:
    assert call(ds, "GET", DS + "fetch/lst/users/alice_example_org/new/deep/f.bin",
                token="bob-token")[2] == A_BIN


def test_upload_chunked_and_user_folder_name(ds, upstream):
    status, _, data, _ = call(ds, "POST", DS + "upload/x%20y.txt", body=iter([b"ab", b"", b"cd"]),
                              token="bob-token")
    assert status == 200
    answer = json.loads(data)
    assert answer == {"status": "uploaded", "path": "lst/users/bob_smith_example_org/x y.txt",
                      "total_written": 4}
    with open(os.path.join(upstream.root, answer["path"]), "rb") as f:
        assert f.read() == b"abcd"


def test_upload_is_a_chunked_put_upstream(fds, fault_upstream):
    call(fds, "POST", DS + "upload/f.bin", body=b"12345")
    (put,) = fault_upstream.find("PUT")
    assert put.headers["transfer-encoding"] == "chunked" and put.body_len == 5
    assert put.headers["authorization"] == "Bearer " + UP_TOKEN
    assert [r.path for r in fault_upstream.find("MKCOL")] == [
        "/lst/", "/lst/users/", "/lst/users/alice_example_org/"]


def test_upload_rejects_bad_paths(ds):
    for path in ("a/../b", ""):
        status, headers, _, _ = call(ds, "POST", DS + "upload/" + path, body=b"x")
        assert status == 400


def test_big_upload_uses_bounded_memory(fds, fault_upstream):
    block = os.urandom(1024 * 1024)
    size = 48 * len(block)
    if tracemalloc is None:
        pytest.skip("tracemalloc is not available on this interpreter")
    tracemalloc.start()
    try:
        status, _, data, _ = call(fds, "POST", DS + "upload/big.bin",
                                  body=iter([block] * 48), headers={"Content-Length": str(size)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200 and json.loads(data)["total_written"] == size
    print("peak traced memory during a 48 MiB upload: %d bytes" % peak)
    assert peak < 8 * len(block), peak
    assert os.path.getsize(os.path.join(fault_upstream.root, "lst/users/alice_example_org/big.bin")) == size


# ---- webdav pass-through ----------------------------------------------------

def test_webdav_propfind_hrefs_point_at_the_service(ds):
    status, _, data, _ = call(ds, "PROPFIND", DS + "webdav/lst/data/run1/", headers={"Depth": "1"})
    assert status == 207
    hrefs = re.findall(r"<(?:\w+:)?href>([^<]*)<", data.decode())
    assert hrefs and all(h.startswith(DS + "webdav/lst/data/run1/") for h in hrefs), hrefs
    assert DS + "webdav/lst/data/run1/a.bin" in hrefs


def test_webdav_reads(ds):
    status, headers, data, resp = call(ds, "GET", DS + "webdav/lst/data/run1/a.bin")
    assert (status, data) == (200, A_BIN) and headers["Content-Length"] == str(len(A_BIN))
    assert not resp.will_close
    status, headers, data, _ = call(ds, "GET", DS + "webdav/lst/data/run1/a.bin", headers={"Range": "bytes=10-19"})
    assert (status, data) == (206, A_BIN[10:20])
    status, headers, data, _ = call(ds, "HEAD", DS + "webdav/lst/data/run1/a.bin")
    assert (status, data, headers["Content-Length"]) == (200, b"", str(len(A_BIN)))
    assert call(ds, "OPTIONS", DS + "webdav/lst/")[0] == 200


def test_webdav_writes_only_in_own_folder(ds, upstream):
    own = DS + "webdav/lst/users/alice_example_org/"
    assert call(ds, "MKCOL", own + "d/")[0] == 201
    assert call(ds, "PUT", own + "d/f.txt", body=b"hello")[0] == 201
    with open(os.path.join(upstream.root, "lst/users/alice_example_org/d/f.txt"), "rb") as f:
        assert f.read() == b"hello"
    assert call(ds, "PUT", own + "d/g.txt", body=iter([b"chun", b"ked"]))[0] == 201
    assert call(ds, "GET", own + "d/g.txt")[2] == b"chunked"
    assert call(ds, "DELETE", own + "d/f.txt")[0] == 204
    assert not os.path.exists(os.path.join(upstream.root, "lst/users/alice_example_org/d/f.txt"))
    for method, path in (("PUT", "lst/data/evil.txt"), ("MKCOL", "lst/data/evil/"),
                         ("DELETE", "lst/data/run1/a.bin"), ("PUT", "lst/users/alice_example_org/../x")):
        status, _, _, _ = call(ds, method, DS + "webdav/" + path, body=b"x" if method == "PUT" else None)
        assert status in (403, 400), (method, path, status)
    assert os.path.exists(os.path.join(upstream.root, "lst/data/run1/a.bin"))
    assert not os.path.exists(os.path.join(upstream.root, "lst/data/evil.txt"))


# ---- auth -------------------------------------------------------------------

def test_missing_or_bad_token(ds):
    status, headers, data, _ = call(ds, "GET", DS + "list/lst", token=None)
    assert status == 401 and headers["Content-Type"].startswith("text/plain")
    status, headers, data, _ = call(ds, "GET", DS + "list/lst", token="wrong",
                                    headers={"Content-Type": "application/json"})
    assert status == 401 and "message" in json.loads(data)
    # A rejected upload body is not read; the connection is closed instead.
    status, headers, _, resp = call(ds, "POST", DS + "upload/f", body=b"x" * 100000, token=None)
    assert status == 401 and resp.will_close
    assert ds.query_tokens == []


def test_missing_scope_is_403(ds):
    status, headers, data, _ = call(ds, "GET", DS + "list/lst", token="no-scope-token")
    assert status == 403 and DS_SCOPE.encode() in data


def test_legacy_query_token_works_and_is_recorded(ds):
    status, _, _, _ = call(ds, "GET", DS + "list/lst?token=" + TOKEN, token=None)
    assert status == 200 and ds.query_tokens == [TOKEN]
    assert ds.requests[-1]["query"] == {"token": [TOKEN]}


def test_routes_and_keep_alive(ds):
    conn = http.client.HTTPConnection("127.0.0.1", ds.port, timeout=20)
    assert call(ds, "GET", DS + "health", token=None, conn=conn)[0] == 200
    assert call(ds, "GET", DS, conn=conn)[0] == 200
    assert call(ds, "GET", DS + "nothing", conn=conn)[0] == 404
    assert call(ds, "GET", "/elsewhere", conn=conn)[0] == 404
    sock = conn.sock
    assert call(ds, "GET", DS + "list/lst", conn=conn)[0] == 200
    assert conn.sock is sock
    status, headers, _, resp = call(ds, "PUT", DS + "upload/x", body=b"1", conn=conn)
    assert status == 405 and headers["Allow"] == "POST" and resp.will_close
    conn.close()
    assert ds.base_url == ds.url + DS and ds.cert_base_url == ds.url + CS
    assert ds.user_folder() == "lst/users/alice_example_org"
    assert ds.user_folder("bob-token") == "lst/users/bob_smith_example_org"


# ---- certificate service ----------------------------------------------------

def post_json(service, path, obj, token=TOKEN):
    return call(service, "POST", path, body=json.dumps(obj), token=token,
                headers={"Content-Type": "application/json"})


def test_certificate_upload(fds):
    status, _, data, _ = post_json(fds, CS + "certificate",
                                   {"certificate": SAMPLE_PEM, "certificate_key": "lst", "user": "x"})
    assert status == 200 and json.loads(data)["message"]
    status, _, data, _ = post_json(fds, CS + "main-certificate", {"certificate": SAMPLE_PEM})
    assert status == 200
    assert [(c["kind"], c["auth_user"], c.get("certificate_key")) for c in fds.certificates] == [
        ("certificate", "alice_example_org", "lst"), ("main-certificate", "alice_example_org", None)]
    assert fds.certificates[0]["certificate"] == SAMPLE_PEM and fds.certificates[0]["user"] == "x"


def test_certificate_validation_and_auth(fds):
    bad = [({"certificate": "not a pem", "certificate_key": "cta"}, 400),
           ({"certificate": SAMPLE_PEM, "certificate_key": "zzz"}, 400),
           ({"certificate_key": "cta"}, 400)]
    for body, expected in bad:
        assert post_json(fds, CS + "certificate", body)[0] == expected
    assert call(fds, "POST", CS + "main-certificate", body=b"{", headers={"Content-Type": "application/json"})[0] == 400
    status, _, data, _ = post_json(fds, CS + "certificate", {"certificate": SAMPLE_PEM}, token="bad")
    assert status == 401 and "message" in json.loads(data)
    assert post_json(fds, CS + "certificate", {"certificate": SAMPLE_PEM}, token="no-scope-token")[0] == 403
    assert fds.certificates == []


def test_upload_path_is_fetchable_via_list(ds):
    path = json.loads(call(ds, "POST", DS + "upload/listed.bin", body=b"z" * 10)[2])["path"]
    (entry,) = listing(ds, urllib.parse.quote(path))
    assert (entry["href"], entry["size"]) == (path, "10")


def test_client_vanishing_mid_upload_leaves_no_file(ds, upstream):
    conn = http.client.HTTPConnection("127.0.0.1", ds.port, timeout=20)
    conn.putrequest("POST", DS + "upload/partial.bin")
    conn.putheader("Authorization", "Bearer " + TOKEN)
    conn.putheader("Content-Length", str(10 * len(A_BIN)))
    conn.endheaders()
    conn.send(A_BIN)
    conn.close()
    # The service notices, drops its upstream PUT, and keeps serving.
    assert listing(ds, "lst/users/alice_example_org/")[0]["type"] == "directory"
    for _ in range(10):
        assert not os.path.exists(os.path.join(upstream.root, "lst/users/alice_example_org/partial.bin"))
        time.sleep(0.05)


def test_upstream_with_base_path(tmp_path):
    seed(tmp_path / "pnfs" / "cta.cscs.ch")
    import ctadata
    with ctadata.serve(str(tmp_path), token=UP_TOKEN) as up, \
            DownloadService(up.url + "/pnfs/cta.cscs.ch/", UP_TOKEN, users=USERS) as service:
        entries = listing(service, "lst/data/run1/")
        assert entries[0]["href"] == "lst/data/run1/"
        assert entries[0]["url"] == up.url + "/pnfs/cta.cscs.ch/lst/data/run1/"
        assert call(service, "GET", DS + "fetch/lst/data/run1/a.bin")[2] == A_BIN
        answer = json.loads(call(service, "POST", DS + "upload/f.txt", body=b"1")[2])
        assert answer["path"] == "lst/users/alice_example_org/f.txt"
        assert (tmp_path / "pnfs/cta.cscs.ch/lst/users/alice_example_org/f.txt").read_bytes() == b"1"
        data = call(service, "PROPFIND", DS + "webdav/lst/data/", headers={"Depth": "1"})[2].decode()
        assert "<d:href>%swebdav/lst/data/run1/</d:href>" % DS in data
