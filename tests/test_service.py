"""Service mode and the old client's API: ctadata against the download-service
double (tests/dsserver.py) in front of a real nginx WebDAV upstream, so that
list, fetch and upload really move bytes; plus the pure parsing underneath.

The old client's own README snippets run here unchanged (only the URL/token
environment variables differ, as the README itself says to adapt them).
"""

import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import types
import zlib
from pathlib import Path
from subprocess import PIPE

import pytest

import ctadata
from conftest import HUB_AREA, HUB_TOKEN, HUB_USERS, SERVICE_A_BIN, SERVICE_ODD, \
    make_tree, tree_digests
from dsserver import CS_SCOPE, DS_SCOPE, SAMPLE_PEM, DownloadService

REPO = Path(__file__).resolve().parent.parent
# The service fixtures (upstream, ds, svc, hub, old_api) and the seeded tree
# are shared: tests/conftest.py.
TOKEN, USERS, AREA, A_BIN, ODD = HUB_TOKEN, HUB_USERS, HUB_AREA, SERVICE_A_BIN, SERVICE_ODD


def raw_listing(ds, path):
    conn = http.client.HTTPConnection("127.0.0.1", ds.port, timeout=20)
    conn.request("GET", "/services/downloadservice/list/" + path,
                 headers={"Authorization": "Bearer " + TOKEN})
    data = conn.getresponse().read()
    conn.close()
    return json.loads(data)


def requests_to(ds, endpoint):
    return [r for r in ds.requests if r["path"].startswith(
        "/services/downloadservice/%s" % endpoint)]


# ---- layer 1: pure parsing ---------------------------------------------------

BASE = "https://hub.example.org/services/downloadservice"
MTIME = "Mon, 11 May 2020 12:13:17 GMT"


def item(href, type_="file", size="3", mtime=MTIME):
    return {"href": href, "type": type_, "size": size if type_ == "file" else None,
            "mtime": mtime, "url": "https://dcache.example.org:2880/" + href}


def test_parse_service_listing_self_children_and_urls():
    selfs = []
    entries = ctadata._parse_service_listing([
        item("lst/d/", "directory"), item("lst/d/a.bin", size="1234"),
        item("lst/d/sub/", "directory"), item("lst/d/with%20space%23.txt"),
        item("lst/d/%C3%A9t%C3%A9.fits", size=None),
    ], BASE, "lst/d", selfs.append)
    assert [s.path for s in selfs] == ["lst/d"] and selfs[0].is_dir
    assert selfs[0].url == BASE + "/fetch/lst/d/"
    by = {e.name: e for e in entries}
    assert set(by) == {"a.bin", "sub", "with space#.txt", "été.fits"}
    assert (by["a.bin"].size, by["a.bin"].is_dir, by["a.bin"].path) == (1234, False, "lst/d/a.bin")
    assert by["a.bin"].mtime == 1589199197
    assert by["sub"].is_dir and by["sub"].size is None and by["sub"].url == BASE + "/fetch/lst/d/sub/"
    assert by["with space#.txt"].url == BASE + "/fetch/lst/d/with%20space%23.txt"
    assert by["été.fits"].size is None
    # The root lists with an empty href for itself.
    root = []
    (child,) = ctadata._parse_service_listing([item("", "directory"), item("lst/", "directory")],
                                              BASE, "", root.append)
    assert root[0].path == "" and child.path == "lst" and child.is_dir
    # A file lists as itself.
    me = []
    assert ctadata._parse_service_listing([item("lst/d/a.bin")], BASE, "lst/d/a.bin", me.append) == []
    assert me[0].name == "a.bin" and not me[0].is_dir


def test_parse_service_listing_drops_hostile_entries_with_a_warning():
    warnings = []
    entries = ctadata._parse_service_listing([
        item("lst/d/ok.txt"),
        item("lst/d/.."), item("lst/d/%2E%2E"), item("lst/d/a%2Fb"), item("lst/d/a%5Cb"),
        item("lst/d/nul%00"), item("lst/other/x"), item("lst/d/deep/er"), item("etc/passwd"),
        item("lst/d/bad%FF"), {"no": "href"}, "not a dict",
        item("lst/d/when.txt", mtime="the day before yesterday"),
        item("lst/d/sized.txt", size="many"),
    ], BASE, "lst/d", None, warnings.append)
    assert sorted(e.name for e in entries) == ["ok.txt", "sized.txt", "when.txt"]
    when = [e for e in entries if e.name == "when.txt"][0]
    assert when.mtime is None  # not 1970
    assert [e for e in entries if e.name == "sized.txt"][0].size is None
    assert len(warnings) == 12, warnings


def test_parse_service_answers_refuse_non_json():
    with pytest.raises(ctadata.ProtocolError):
        ctadata._parse_service_listing({"href": "x"}, BASE, "x")
    with pytest.raises(ctadata.ProtocolError, match="other than JSON"):
        ctadata._service_json(b"<html>login page</html>", BASE)
    with pytest.raises(ctadata.ProtocolError):
        ctadata._parse_upload_answer(b'{"status": "uploaded"}', BASE)
    answer = {"status": "uploaded", "path": AREA + "/f", "total_written": 3}
    assert ctadata._parse_upload_answer(json.dumps(answer).encode(), BASE) == answer


def test_service_error_bodies_become_messages():
    e = ctadata._error_for_status(401, BASE, b'{"message": "Unauthorized: missing or invalid token"}')
    assert isinstance(e, ctadata.AuthError) and "Unauthorized: missing or invalid token" in str(e)
    e = ctadata._error_for_status(403, BASE, b"Forbidden: missing scope " + DS_SCOPE.encode())
    assert isinstance(e, ctadata.AuthError) and DS_SCOPE in e.message
    e = ctadata._error_for_status(404, BASE, b"Error: 404 <html><body><h1>404 Not Found</h1></body></html>",
                                  "list")
    assert isinstance(e, ctadata.NotFound) and e.message == "no such file or folder: " + BASE
    e = ctadata._error_for_status(400, BASE, b"Error: path cannot contain '..'")
    assert e.message == "HTTP 400 Error: path cannot contain '..'"


def test_mode_selection():
    env = {"CTADS_URL": "hub.example.org/services/downloadservice/"}
    assert ctadata.Client(env=env).service == "https://hub.example.org/services/downloadservice"
    assert ctadata.Client(env={}).service is None
    assert ctadata.Client(service=True, env={}).service == ctadata.SERVICE_URL.rstrip("/")
    assert ctadata.Client(service="", env=env).url == "https://hub.example.org/services/downloadservice"
    assert ctadata.Client(service="http://127.0.0.1:1/s/", env={}).url == "http://127.0.0.1:1/s"
    # An explicit storage URL (or --dev, or service=False) wins over the environment.
    assert ctadata.Client(url="https://h:1", env=env).service is None
    assert ctadata.Client(dev=True, env=env).url == ctadata.DEV_URL
    assert ctadata.Client(service=False, env=env).service is None
    with pytest.raises(ctadata.ConfigError, match="exclude"):
        ctadata.Client(url="https://h:1", service=True, env={})
    with pytest.raises(ctadata.ConfigError, match="development"):
        ctadata.Client(dev=True, service=True, env={})
    assert "service=" in repr(ctadata.Client(service=True, env={}))


def test_service_token_comes_from_the_hub_not_from_storage_places(tmp_path):
    env = {"JUPYTERHUB_API_TOKEN": "hub-tok", "BEARER_TOKEN": "storage-tok",
           "CTADATA_TOKEN": "storage-tok"}
    assert ctadata.Client(service=True, env=env)._auth.header() == "Bearer hub-tok"
    assert ctadata.Client(env=env)._auth.header() == "Bearer storage-tok"
    f = tmp_path / "tok"
    f.write_text("file-tok\n")
    f.chmod(0o600)  # token files must be private
    assert ctadata.Client(service=True, token_file=str(f), env=env)._auth.header() == "Bearer file-tok"
    nothing = ctadata.Client(service=True, env={"BEARER_TOKEN": "storage-tok"})
    assert nothing._auth.header() is None
    hint = nothing._auth.hint()
    assert hint.startswith("no token found; looked in:") and "$JUPYTERHUB_API_TOKEN" in hint
    assert "BEARER_TOKEN" not in hint


def test_service_paths_are_normalised_like_urls():
    c = ctadata.Client(service=BASE, env={})
    assert c.url_for("a/b/../c") == BASE + "/fetch/a/c"
    assert c.url_for("/a/./b//c/") == BASE + "/fetch/a/b/c"
    assert c.url_for("a/%2E%2E/b") == BASE + "/fetch/b"
    # As listed (percent-encoded) or as written: the same file.
    assert c.url_for("d/with%20space.txt") == c.url_for("d/with space.txt") == \
        BASE + "/fetch/d/with%20space.txt"
    assert c.url_for("d/100%.bin") == BASE + "/fetch/d/100%25.bin"
    assert c.url_for({"href": "d/x%23y"}) == BASE + "/fetch/d/x%23y"
    assert c.url_for(BASE + "/fetch/d/x?chunk_size=10") == BASE + "/fetch/d/x"
    for bad in ("../x", "a/../../x", "%2E%2E/x"):
        with pytest.raises(ctadata.ConfigError, match="climbs above"):
            c.url_for(bad)
    with pytest.raises(ctadata.ConfigError, match="not a URL of this service"):
        c.url_for("https://dcache.example.org:2880/lst/x")


def test_listing_entries_are_dicts_that_also_act_as_paths():
    e = ctadata._ListingEntry(item("cta/DL1/dl1_LST-1.Run11111.0100.h5"))
    assert isinstance(e, dict) and e == item("cta/DL1/dl1_LST-1.Run11111.0100.h5")
    assert "href" in e and "size" in e                     # dict keys
    assert ".0100" in e and "datacheck" not in e           # the old README's tests
    assert e.split("/")[-1] == "dl1_LST-1.Run11111.0100.h5" and e.endswith(".h5")
    assert json.loads(json.dumps(e)) == dict(e)
    with pytest.raises(AttributeError):
        e.__nonexistent__


# ---- layer 3: through the double, in front of real nginx ----------------------

def test_ls_stat_and_list_dir(svc, ds):
    names = [e.name for e in svc.ls("lst/data/run1")]
    assert names == sorted(["a.bin", "sub", "with space.txt", ODD])
    st = svc.stat("lst/data/run1/a.bin")
    assert (st.size, st.is_dir, st.path) == (len(A_BIN), False, "lst/data/run1/a.bin")
    assert svc.stat("lst/data/run1/").is_dir and svc.stat("").is_dir
    every = {e.path for e in svc.ls("lst/data/run1", recursive=True)}
    assert "lst/data/run1/sub/deeper/c.txt" in every and "lst/data/run1/sub/deeper" in every
    assert [e.name for e in svc.iter_dir("lst/data/run1/a.bin")] == ["a.bin"]

    listing = svc.list_dir("lst/data/run1")
    assert listing == raw_listing(ds, "lst/data/run1")   # what the service returns, as is
    hrefs = [d["href"] for d in listing]
    assert hrefs[0] == "lst/data/run1/" and "lst/data/run1/with%20space.txt" in hrefs
    assert set(listing[1]) == {"href", "type", "size", "mtime", "url"}
    assert {d["type"] for d in listing} == {"file", "directory"}
    deep = [d["href"] for d in svc.list_dir("lst/data/run1", recursive=True)]
    assert "lst/data/run1/sub/deeper/c.txt" in deep and deep.count("lst/data/run1/sub/") == 1
    assert all(r["query"] == {} for r in ds.requests)   # no ?token=, no ?chunk_size=
    assert all(r["headers"]["Authorization"] == "Bearer " + TOKEN for r in ds.requests)


def test_list_404_and_direct_only_operations(svc):
    with pytest.raises(ctadata.NotFound) as ei:
        svc.list_dir("lst/nope")
    assert ei.value.status == 404 and "/services/downloadservice/list/lst/nope" in ei.value.url
    with pytest.raises(ctadata.NotFound):
        svc.stat("lst/nope")
    for call in (lambda: svc.mkdir("x"), lambda: svc.remove("x"), lambda: svc.move("x", "y"),
                 lambda: svc.checksum("x")):
        with pytest.raises(ctadata.ConfigError, match="webdav_client"):
            call()


def test_get_files_and_trees(svc, ds, upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert svc.fetch_and_save_file("lst/data/run1/a.bin") == len(A_BIN)
    assert (tmp_path / "a.bin").read_bytes() == A_BIN
    # percent-encoded as listed, or as written
    assert svc.fetch_and_save_file("lst/data/run1/with%20space.txt", "s1") == 7
    assert svc.fetch_and_save_file("lst/data/run1/with space.txt", "s2") == 7
    odd = [d for d in svc.list_dir("lst/data/run1") if d["href"].endswith(".fits")][0]
    assert svc.fetch_and_save_file(odd) == 9 and (tmp_path / ODD).read_bytes() == b"odd name\n"
    summary = svc.download("lst/data/run1", "out/", recursive=True)
    assert summary.failed == 0 and summary.transferred == 5
    assert tree_digests(tmp_path / "out/run1") == tree_digests(upstream.root / "lst/data/run1")
    again = svc.download("lst/data/run1", "out/", recursive=True)
    assert again.skipped == again.files == 5
    assert not list(tmp_path.rglob("*.part"))
    assert not [r for r in ds.requests if "range" in {k.lower() for k in r["headers"]}]


def test_short_fetch_is_a_failed_transfer(svc, ds, tmp_path):
    """The service answers 200 and just ends the body when the storage fails."""
    ds.short_fetch["lst/data/run1/a.bin"] = 1000
    dest = tmp_path / "a.bin"
    with pytest.raises(ctadata.TransferError, match="short download: 1000 of 307200") as ei:
        svc.fetch_and_save_file("lst/data/run1/a.bin", str(dest))
    assert (ei.value.expected, ei.value.received) == (len(A_BIN), 1000)
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    assert len(requests_to(ds, "fetch")) == 2  # retried once (retries=1), from byte 0


def test_short_fetch_then_whole_restarts_from_zero(svc, ds, tmp_path):
    ds.short_fetch["lst/data/run1/a.bin"] = [5000, None]
    assert svc.fetch_and_save_file("lst/data/run1/a.bin", str(tmp_path / "a")) == len(A_BIN)
    assert (tmp_path / "a").read_bytes() == A_BIN
    ds.short_fetch["lst/data/run1/sub/b.txt"] = [2, 2]
    summary = svc.download("lst/data/run1", str(tmp_path / "t") + "/", recursive=True,
                           raise_on_failure=False)
    (failed,) = summary.failures
    assert failed.dest.endswith("b.txt") and "short download" in failed.error
    assert not (tmp_path / "t/run1/sub/b.txt").exists()
    assert (tmp_path / "t/run1/a.bin").read_bytes() == A_BIN  # the others go on


def test_upload_path_rules(svc, ds, upstream, tmp_path):
    f = tmp_path / "latest.txt"
    f.write_bytes(b"hello")
    answer = svc.upload_file(str(f), "your-folder/")
    assert answer == {"status": "uploaded", "path": AREA + "/your-folder/latest.txt",
                      "total_written": 5}
    assert (upstream.root / AREA / "your-folder/latest.txt").read_bytes() == b"hello"
    assert svc.upload_file(str(f), "your-folder/new-name.md")["path"] == \
        AREA + "/your-folder/new-name.md"
    assert svc.upload_file(str(f), "a/./b/../c/")["path"] == AREA + "/a/c/latest.txt"
    assert svc.upload_file(str(f), "")["path"] == AREA + "/latest.txt"
    assert svc.upload_file(str(f), "with%20space/x y.txt")["path"] == AREA + "/with space/x y.txt"
    assert (upstream.root / AREA / "with space/x y.txt").exists()
    before = len(ds.requests)
    for bad in ("../x", "a/../../x", "%2E%2E/x"):
        with pytest.raises(ctadata.ConfigError, match="climbs above"):
            svc.upload_file(str(f), bad)
    with pytest.raises(ctadata.ConfigError, match="not a URL"):
        svc.upload_file(str(f), "https://elsewhere.example.org/x")
    assert len(ds.requests) == before  # refused locally: nothing sent
    # What another user passes to fetch:
    other = ctadata.Client(service=ds.base_url, token="bob-token", env={})
    assert other.fetch_and_save_file(answer["path"], str(tmp_path / "got")) == 5


def test_upload_dir_lands_nested_tree_in_own_folder(svc, upstream, tmp_path):
    src = make_tree(tmp_path / "results", {"top.txt": b"1", "sub/mid.txt": b"22",
                                           "sub/deeper/low.txt": b"333", "sp ace/é.txt": b"4"})
    summary = svc.upload_dir(str(src), "your-folder/")
    assert summary.transferred == summary.files == 4
    assert summary.remote_path == AREA + "/your-folder/results"
    assert tree_digests(upstream.root / AREA / "your-folder/results") == tree_digests(src)
    paths = sorted(r.remote_path for r in summary.results)
    assert paths == sorted(AREA + "/your-folder/results/" + p for p in
                           ("top.txt", "sub/mid.txt", "sub/deeper/low.txt", "sp ace/é.txt"))
    # The old client put nested folders at the storage root; nothing leaks there.
    assert not (upstream.root / "sub").exists() and not (upstream.root / "deeper").exists()
    svc.upload_dir(str(src) + "/", "your-folder/renamed")   # no slash: the new name
    assert tree_digests(upstream.root / AREA / "your-folder/renamed") == tree_digests(src)


def test_401_and_403_carry_the_service_message(ds, tmp_path):
    anonymous = ctadata.Client(service=ds.base_url, env={}, retries=0)
    with pytest.raises(ctadata.AuthError) as ei:
        anonymous.ls("lst")
    assert ei.value.status == 401
    assert "Unauthorized: missing or invalid token" in str(ei.value)
    assert "looked in:" in str(ei.value) and "$JUPYTERHUB_API_TOKEN" in str(ei.value)
    wrong = ctadata.Client(service=ds.base_url, token="wrong", env={}, retries=0)
    with pytest.raises(ctadata.AuthError, match="refused") as ei:
        wrong.list_dir("lst")
    assert "wrong" not in str(ei.value).replace("wrong-", "")
    pem = tmp_path / "c.pem"
    pem.write_text(SAMPLE_PEM)
    with pytest.raises(ctadata.CertificateError) as ei:   # JSON 401 of the certificate service
        ctadata.Client(service=ds.base_url, token="wrong", env={"CTACS_URL": ds.cert_base_url},
                       retries=0).upload_certificate(str(pem))
    assert ei.value.status == 401 and "Unauthorized: missing or invalid token" in ei.value.message
    no_scope = ctadata.Client(service=ds.base_url, token="no-scope-token", env={}, retries=0)
    with pytest.raises(ctadata.AuthError) as ei:
        no_scope.ls("lst")
    assert ei.value.status == 403 and DS_SCOPE in str(ei.value)
    f = tmp_path / "f"
    f.write_bytes(b"x" * 3000000)
    with pytest.raises(ctadata.AuthError) as ei:     # also for uploads, not a bare TransferError
        no_scope.upload_file(str(f), "x")
    assert ei.value.status == 403
    assert ds.query_tokens == []


def test_certificates(ds, tmp_path, monkeypatch):
    pem = tmp_path / "yourcertificate.crt"
    pem.write_text(SAMPLE_PEM)
    c = ctadata.Client(service=ds.base_url, token=TOKEN, env={"CTACS_URL": ds.cert_base_url})
    assert c.upload_certificate(str(pem))["message"]
    assert c.upload_certificate(str(pem), certificate_key="lst")["certificate_key"] == "lst"
    assert c.upload_shared_certificate(str(pem))["message"] == "Main certificate stored"
    assert [(x["kind"], x.get("certificate_key"), x["auth_user"]) for x in ds.certificates] == [
        ("certificate", "cta", "alice_example_org"), ("certificate", "lst", "alice_example_org"),
        ("main-certificate", None, "alice_example_org")]
    assert ds.certificates[0]["certificate"] == SAMPLE_PEM
    with pytest.raises(ctadata.ConfigError, match="certificate_key"):
        c.upload_certificate(str(pem), "nope")
    with pytest.raises(ctadata.ConfigError, match="cannot read"):
        c.upload_certificate(str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ctadata.CertificateError) as ei:
        c.upload_certificate(str(bad))
    assert ei.value.status == 400 and "invalid certificate" in ei.value.message
    assert isinstance(ei.value, ctadata.StorageException)
    # A direct-mode client sends the hub token there, never a storage token.
    direct = ctadata.Client(url="https://dcache.example.org:2880",
                            env={"CTACS_URL": ds.cert_base_url, "BEARER_TOKEN": "storage",
                                 "JUPYTERHUB_API_TOKEN": "cert-only-token"})
    assert direct.upload_certificate(str(pem), "arc")["certificate_key"] == "arc"
    assert ds.certificates[-1]["auth_user"] == "dave"
    assert len(ds.certificates) == 4


def test_webdav_client_uses_the_pass_through(svc, ds, upstream, tmp_path):
    w = svc.webdav_client()
    assert w.url == ds.base_url + "webdav" and w.service is None
    assert [e.name for e in w.ls("lst/data/run1/sub")] == ["b.txt", "deeper"]
    w.mkdir(AREA + "/via-webdav")
    f = tmp_path / "f.txt"
    f.write_bytes(b"through webdav")
    w.upload(str(f), AREA + "/via-webdav/")
    assert (upstream.root / AREA / "via-webdav/f.txt").read_bytes() == b"through webdav"
    with pytest.raises(ctadata.AuthError):   # writes only in one's own folder
        w.mkdir("lst/data/evil")


def test_webdav4_client_only_with_webdav4(ds, monkeypatch, hub):
    monkeypatch.setitem(sys.modules, "webdav4", None)
    monkeypatch.setitem(sys.modules, "webdav4.client", None)
    with pytest.raises(ctadata.ConfigError, match="webdav4"):
        ctadata.webdav4_client()
    made = {}

    class FakeWebDAV4Client:   # stands in for webdav4.client.Client
        def __init__(self, base_url, auth=None):
            made.update(base_url=base_url, auth=auth)
    fake = types.ModuleType("webdav4.client")
    fake.Client = FakeWebDAV4Client
    monkeypatch.setitem(sys.modules, "webdav4", types.ModuleType("webdav4"))
    monkeypatch.setitem(sys.modules, "webdav4.client", fake)
    assert isinstance(ctadata.webdav4_client(), FakeWebDAV4Client)
    assert made["base_url"] == ds.base_url + "webdav/"
    request = types.SimpleNamespace(headers={})
    assert made["auth"](request) is request
    assert request.headers == {"Authorization": "Bearer " + TOKEN}


# ---- the old client's API ----------------------------------------------------

def test_old_functions_with_old_keyword_arguments(ds, upstream, tmp_path, monkeypatch):
    """No environment at all: everything comes from the old keyword arguments."""
    monkeypatch.chdir(tmp_path)
    kw = {"token": TOKEN, "downloadservice": ds.base_url, "chunk_size": 10 * 1024 * 1024}
    listing = ctadata.list_dir("lst/data/run1", **kw)
    assert listing[0]["href"] == "lst/data/run1/"
    assert any(d["href"] == "lst/data/run1/sub/deeper/c.txt"
               for d in ctadata.list_dir("lst/data/run1", recursive=True, **kw))
    assert ctadata.fetch_and_save_file("lst/data/run1/a.bin", **kw) == len(A_BIN)
    assert ctadata.fetch_and_save_file("lst/data/run1/a.bin", "pos.bin", **kw) == len(A_BIN)
    assert ctadata.fetch_and_save_file("lst/data/run1/a.bin", save_to_fn="kw.bin", **kw) == len(A_BIN)
    assert (tmp_path / "pos.bin").read_bytes() == (tmp_path / "kw.bin").read_bytes() == A_BIN
    ctadata.fetch_and_save_file_or_dir("lst/some-data-dir", recursive=True, **kw)
    assert (tmp_path / "some-data-dir/sub/deeper.txt").read_bytes() == b"deeper\n"
    shutil.rmtree(str(tmp_path / "some-data-dir"))
    ctadata.fetch_and_save_file_or_dir("lst/some-data-dir", True, **kw)   # old positional
    assert (tmp_path / "some-data-dir/some-data-file").exists()
    ctadata.fetch_and_save_file_or_dir("lst/data/run1/with space.txt", **kw)
    assert (tmp_path / "with space.txt").exists()
    (tmp_path / "latest").write_bytes(b"file list")
    answer = ctadata.upload_file("latest", "filelists/latest-file-list", **kw)
    assert answer == {"status": "uploaded", "total_written": 9,
                      "path": AREA + "/filelists/latest-file-list"}
    make_tree(tmp_path / "tree", {"a": b"a", "b/c": b"c"})
    summary = ctadata.upload_dir("tree", "dirs/", **kw)
    assert tree_digests(upstream.root / AREA / "dirs/tree") == tree_digests(tmp_path / "tree")
    assert summary.remote_path == AREA + "/dirs/tree"
    pem = tmp_path / "cert.pem"
    pem.write_text(SAMPLE_PEM)
    ckw = {"token": TOKEN, "certificateservice": ds.cert_base_url, "chunk_size": 1}
    assert ctadata.upload_certificate(str(pem), **ckw)["certificate_key"] == "cta"
    assert ctadata.upload_personal_certificate(str(pem), "lst", **ckw)["certificate_key"] == "lst"
    assert ctadata.upload_shared_certificate(str(pem), **ckw)["message"]
    assert [c["certificate_key"] for c in ds.certificates[:2]] == ["cta", "lst"]
    w = ctadata.webdav_client(**kw)
    assert w.stat("lst/data/run1/a.bin").size == len(A_BIN)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokn'"):
        ctadata.list_dir("lst", tokn=TOKEN)
    assert ds.query_tokens == []


def test_dev_instance_means_the_development_storage(hub):
    assert ctadata._client({"dev_instance": True}).url == ctadata.DEV_URL
    assert ctadata._client({"dev_instance": True}).service is None  # even with $CTADS_URL
    assert ctadata._client({}).service == hub.base_url.rstrip("/")
    with pytest.raises(ctadata.ConfigError, match="development"):
        ctadata.list_dir("lst", dev_instance=True, downloadservice=hub.base_url)


def test_apiclient_class_attributes_are_honoured(ds, upstream, tmp_path, monkeypatch, old_api):
    monkeypatch.chdir(tmp_path)
    ctadata.APIClient.downloadservice = ds.base_url
    ctadata.APIClient.certificateservice = ds.cert_base_url
    ctadata.APIClient.token = TOKEN
    ctadata.APIClient.chunk_size = 1024
    assert ctadata.list_dir("lst/data/run1")[0]["href"] == "lst/data/run1/"
    assert ctadata.fetch_and_save_file("lst/data/run1/a.bin") == len(A_BIN)
    assert ctadata.stat("lst/data/run1/sub").is_dir          # new functions honour them too
    (tmp_path / "pem").write_text(SAMPLE_PEM)
    assert ctadata.upload_certificate("pem")["message"]
    first = ctadata._client()
    assert ctadata._client() is first                        # kept: connections reused
    ctadata.APIClient.token = "bob-token"
    assert ctadata._client() is not first
    assert ctadata.upload_file("pem", "p")["path"] == "lst/users/bob/p"
    # An instance, as the old CLI used it: its attributes win over the class's.
    api = ctadata.APIClient()
    api.token = TOKEN
    assert api.upload_file(str(tmp_path / "pem"), "q")["path"] == AREA + "/q"
    assert api.fetch_and_save_file("lst/data/run1/with%20space.txt") == 7
    assert ctadata.APIClient.token == "bob-token"


def test_old_exception_names():
    from ctadata import direct
    assert issubclass(ctadata.StorageException, ctadata.CtadataError)
    assert issubclass(ctadata.CertificateError, ctadata.CtadataError)
    assert ctadata.api.StorageException is ctadata.StorageException
    assert direct.StorageException is ctadata.StorageException
    assert direct.CertificateError is ctadata.CertificateError
    assert ctadata.api.APIClient is ctadata.APIClient


def test_default_client_follows_the_environment(ds, monkeypatch, tmp_path):
    """A notebook may call ctadata before setting $CTADS_URL (the old client
    read it once, at import)."""
    monkeypatch.setenv("CTADATA_URL", "https://dcache.example.org:2880")
    assert ctadata.default_client().service is None
    monkeypatch.setenv("CTADS_URL", ds.base_url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    assert ctadata.default_client().service == ds.base_url.rstrip("/")
    assert ctadata.list_dir("lst/data")[0]["href"] == "lst/data/"
    mine = ctadata.Client(url="https://h:1", env={})
    ctadata.set_default_client(mine)
    monkeypatch.setenv("CTADS_URL", ds.base_url + "x/")
    assert ctadata.default_client() is mine   # an explicit choice stays


# The old client's README snippets, verbatim but for the URL/token values.
# ctadata-readme-service-mode.txt, "Usage from within CTA CSCS JupyterHub platform":
SNIPPET_PLATFORM = '''
import ctadata

for url in ctadata.list_dir("cta/DL1/20241114/v0.1/"):
    if 'datacheck' not in url and '.0100' in url and '11111' in url:
        print("stored", ctadata.fetch_and_save_file(url)/1024/1024, "Mb")
        print("found keys", h5py.File(url.split("/")[-1]).keys())
'''
# "Uploading files" (both READMEs), then the fetch of the returned path.
SNIPPET_UPLOAD = '''
result = ctadata.upload_file("latest", "filelists/latest-file-list")
print(result)
ctadata.fetch_and_save_file("lst/users/volodymyr_savchenko_epfl_ch/filelists/latest-file-list")
ctadata.upload_file("latest.txt", "your-folder/new-file-name.md")
ctadata.upload_file("latest.txt", "your-folder/") # will autocomplete to `your-folder/latest.txt`
ctadata.fetch_and_save_file_or_dir("lst/some-data-dir", recursive=True)
ctadata.upload_certificate('yourcertificate.crt')
'''
# "From outside (possibly another jupyterhub)" (direct-mode era README, with CTACS_URL).
SNIPPET_OUTSIDE = '''
import os
os.environ["CTADS_URL"] = "DATA-DISTRIBUTING-JUPYTERHUB/services/downloadservice/"
os.environ["CTACS_URL"] = "DATA-DISTRIBUTING-JUPYTERHUB/services/certificateservice/"
os.environ["JUPYTERHUB_API_TOKEN"] = "INSERT-YOUR-TOKEN-HERE"

for url in ctadata.list_dir("cta/DL1/20241114/v0.1"):
    if 'datacheck' not in url and '.0100' in url and '11111' in url:
        print("stored", ctadata.fetch_and_save_file(url)/1024/1024, "Mb")
        print("found keys", h5py.File(url.split("/")[-1]).keys())
'''


class _FakeH5File:
    """h5py is not a test dependency; the snippets only open the file and list keys."""

    def __init__(self, name):
        with open(name, "rb") as f:
            self._magic = f.read(4)

    def keys(self):
        return ["magic=%r" % self._magic]


def run_snippet(code, **replace):
    for old, new in replace.items():
        assert old in code
        code = code.replace(old, new)
    namespace = {"ctadata": ctadata, "h5py": types.SimpleNamespace(File=_FakeH5File)}
    exec(compile(code, "<old README snippet>", "exec"), namespace)
    return namespace


def test_old_readme_notebook_snippets_run_unchanged(ds, upstream, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latest").write_bytes(b"a file list\n")
    (tmp_path / "latest.txt").write_bytes(b"latest\n")
    (tmp_path / "yourcertificate.crt").write_text(SAMPLE_PEM)
    want_h5 = "dl1_LST-1.Run11111.0100.h5"
    # From outside: the snippet sets the environment itself (restored afterwards).
    for name in ("CTADS_URL", "CTACS_URL", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.setenv(name, "")
    run_snippet(SNIPPET_OUTSIDE, **{
        "DATA-DISTRIBUTING-JUPYTERHUB/services/downloadservice/": ds.base_url,
        "DATA-DISTRIBUTING-JUPYTERHUB/services/certificateservice/": ds.cert_base_url,
        "INSERT-YOUR-TOKEN-HERE": "volodymyr-token"})
    out = capsys.readouterr().out
    assert out.splitlines() == ["stored 2.0 Mb", "found keys [\"magic=b'\\\\x89HDF'\"]"]
    # (conftest points the system /tmp of token discovery at tmp_path/tmp)
    assert sorted(set(os.listdir(tmp_path)) - {"tmp"}) == sorted(
        ["latest", "latest.txt", "yourcertificate.crt", want_h5])
    assert (tmp_path / want_h5).read_bytes() == (upstream.root / "cta/DL1/20241114/v0.1" / want_h5).read_bytes()
    # On the platform the hub sets the environment; the snippets use it as is.
    os.remove(want_h5)
    run_snippet(SNIPPET_PLATFORM)
    assert capsys.readouterr().out.startswith("stored 2.0 Mb\n") and os.path.exists(want_h5)
    run_snippet(SNIPPET_UPLOAD)
    out = capsys.readouterr().out
    assert out.strip() == str({"status": "uploaded",
                               "path": "lst/users/volodymyr_savchenko_epfl_ch/filelists/latest-file-list",
                               "total_written": 12})
    assert (tmp_path / "latest-file-list").read_bytes() == b"a file list\n"
    mine = upstream.root / "lst/users/volodymyr_savchenko_epfl_ch"
    assert (mine / "your-folder/new-file-name.md").read_bytes() == b"latest\n"
    assert (mine / "your-folder/latest.txt").read_bytes() == b"latest\n"
    assert (tmp_path / "some-data-dir/sub/deeper.txt").read_bytes() == b"deeper\n"
    assert [(c["kind"], c["certificate_key"]) for c in ds.certificates] == [("certificate", "cta")]


# ctadata-readme-direct-mode.txt, "Basic usage" (direct mode, against nginx itself).
SNIPPET_DIRECT = '''
from ctadata import direct as ctadata
for path in ctadata.list_dir("cta"):
    print(path)
# downloading single file
ctadata.fetch_and_save_file_or_dir("lst/some-data-dir/some-data-file")
# recursively downloading a directory
ctadata.fetch_and_save_file_or_dir("lst/some-data-dir", recursive=True)
ctadata.direct.upload_file("latest.txt", "your-folder/new-file-name.md")
ctadata.direct.upload_file("latest.txt", "your-folder/") # will autocomplete to `your-folder/latest.txt`
'''


def test_old_readme_direct_snippet_runs_unchanged(upstream, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTADATA_URL", upstream.url)
    monkeypatch.setenv("BEARER_TOKEN", upstream.token)
    (tmp_path / "latest.txt").write_bytes(b"latest\n")
    run_snippet(SNIPPET_DIRECT)
    assert capsys.readouterr().out.splitlines() == ["cta/DL1/"]
    assert (tmp_path / "some-data-file").read_bytes() == b"some data\n"
    assert (tmp_path / "some-data-dir/sub/deeper.txt").exists()
    assert (upstream.root / "your-folder/new-file-name.md").read_bytes() == b"latest\n"
    assert (upstream.root / "your-folder/latest.txt").exists()


# ---- the CLI -------------------------------------------------------------------

@pytest.fixture
def run(capsys):
    def run(*argv):
        code = ctadata.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_cli_service_ls_get_put(hub, upstream, tmp_path, run):
    code, out, err = run("--service", "ls", "lst/data/run1")          # flag, URL from $CTADS_URL
    assert code == 0, err
    assert out.splitlines() == sorted(["a.bin", "sub/", "with space.txt", ODD])
    code, out, _ = run("ls", "--service", hub.base_url, "-l", "lst/data/run1/sub")   # after, with URL
    assert code == 0 and out.splitlines()[0].endswith(" b.txt")
    code, out, _ = run("list", "lst/data")                            # old command name; env alone
    assert out.splitlines() == ["run1/"]
    code, out, _ = run("--service=" + hub.base_url, "ls", "-R", "lst/data/run1/sub")
    assert out.splitlines() == ["b.txt", "deeper/", "deeper/c.txt"]
    code, out, _ = run("stat", "--json", "lst/data/run1/a.bin")
    assert json.loads(out)["url"] == hub.base_url + "fetch/lst/data/run1/a.bin"
    code, out, err = run("get", "-r", "lst/data/run1", str(tmp_path / "dl") + "/")
    assert code == 0, err
    assert tree_digests(tmp_path / "dl/run1") == tree_digests(upstream.root / "lst/data/run1")
    (tmp_path / "f.txt").write_bytes(b"cli")
    code, out, err = run("put", tmp_path / "f.txt", "your-folder/")
    assert (code, out) == (0, AREA + "/your-folder/f.txt\n"), err
    code, out, err = run("put", "-r", tmp_path / "dl/run1", "your-folder/")
    assert (code, out) == (0, AREA + "/your-folder/run1/\n"), err
    assert tree_digests(upstream.root / AREA / "your-folder/run1") == tree_digests(tmp_path / "dl/run1")
    code, out, err = run("put", "--json", tmp_path / "f.txt", "j")
    assert json.loads(out)["remote_path"] == AREA + "/j"
    code, out, err = run("get", "lst/nope")
    assert code == 1 and err.startswith("ctadata: error: get: no such file or folder: lst/nope (")
    code, out, err = run("mkdir", "x")
    assert code == 2 and "webdav_client" in err
    code, out, err = run("--url", "https://h:1", "--service", "ls")
    assert code == 2 and "exclude" in err
    hub.short_fetch["lst/data/run1/a.bin"] = 10
    code, out, err = run("--retries", "0", "get", "lst/data/run1/a.bin", tmp_path / "short.bin")
    assert code == 1 and "short download" in err and not (tmp_path / "short.bin").exists()


def test_cli_upload_cert(hub, tmp_path, run, monkeypatch):
    pem = tmp_path / "x509up.pem"
    pem.write_text(SAMPLE_PEM)
    assert run("upload-cert", pem) == (0, "Certificate stored\n", "")
    code, out, _ = run("upload-cert", "--key", "lst", "--json", pem)
    assert json.loads(out)["certificate_key"] == "lst"
    assert run("upload-cert", "--shared", pem)[:2] == (0, "Main certificate stored\n")
    monkeypatch.delenv("CTACS_URL")
    assert run("upload-cert", "--cert-service", hub.cert_base_url, pem)[0] == 0
    assert [(c["kind"], c.get("certificate_key")) for c in hub.certificates] == [
        ("certificate", "cta"), ("certificate", "lst"), ("main-certificate", None),
        ("certificate", "cta")]
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    code, out, err = run("upload-cert", "--cert-service", hub.cert_base_url, bad)
    assert code == 1 and "invalid certificate" in err
    assert run("upload-cert", "--key", "xyz", pem)[0] == 2


def test_cli_help_mentions_service(run):
    code, out, _ = run("--help")
    assert code == 0 and "--service" in out and "upload-cert" in out
    code, out, _ = run("upload-cert", "--help")
    assert code == 0 and "--key" in out and "JUPYTERHUB_API_TOKEN" in out


def test_cta_data_command_is_service_mode(hub, monkeypatch, capsys):
    """`cta-data` was the old service-mode command: it still is (unless --url)."""
    for argv, want in ((["cta-data", "ls", "lst/data"], "run1/\n"),
                       (["cta-data", "--service", hub.base_url, "ls", "lst/data"], "run1/\n")):
        monkeypatch.delenv("CTADS_URL")
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(ctadata, "SERVICE_URL", hub.base_url)
        with pytest.raises(SystemExit) as ei:
            ctadata._entry_service()
        assert ei.value.code == 0 and capsys.readouterr().out == want
        monkeypatch.setenv("CTADS_URL", hub.base_url)
    monkeypatch.setattr(sys, "argv", ["cta-data", "--url", "ftp://x", "ls"])
    with pytest.raises(SystemExit) as ei:
        ctadata._entry_service()
    assert ei.value.code == 2


# ---- a big file through the service, in bounded memory -------------------------

BIG = 1536 * 1024 * 1024 + 12345   # 1.5 GiB and a ragged end
CLIENT_SCRIPT = textwrap.dedent('''
    import json, resource, sys, time
    import ctadata

    def peak_kb():
        # VmHWM: this process's own peak. ru_maxrss would also count what the
        # forked pytest process had before exec.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base, token, src, dst = sys.argv[1:5]
    c = ctadata.Client(service=base, token=token, env={}, retries=0, timeout=120)
    c.stat("")  # connections, TLS and listing code loaded: the baseline
    base_kb = peak_kb()
    t0 = time.monotonic()
    up = c.upload(src, "big/")
    t1 = time.monotonic()
    down = c.download(up.remote_path, dst)
    t2 = time.monotonic()
    print(json.dumps({"path": up.remote_path, "up_s": t1 - t0, "down_s": t2 - t1,
                      "sent_adler32": up.results[0].checksums["adler32"],
                      "got_adler32": down.results[0].checksums.get("adler32"),
                      "got": down.results[0].size,
                      "maxrss_kb": peak_kb(), "base_kb": base_kb}))
''')


def sparse_file(path, size, blocks):
    """A sparse file of *size* bytes with a few random blocks at known offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in blocks.items():
            f.seek(offset)
            f.write(data)


def adler32_of(path):
    value = 1
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            value = zlib.adler32(block, value)
    return "%08x" % value


@pytest.mark.skipif(not os.environ.get("CTADATA_SLOW_TESTS"),
                    reason="about 15 s; set CTADATA_SLOW_TESTS=1")
def test_service_1_5_gb_streamed_upload_and_download_in_bounded_memory(ds, upstream, tmp_path):
    blocks = {0: os.urandom(4096), 700 * 1024 * 1024 + 17: os.urandom(1 << 20),
              BIG - 5000: os.urandom(5000)}
    src = tmp_path / "big.bin"
    dst = tmp_path / "back.bin"
    sparse_file(src, BIG, blocks)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, ds.base_url, TOKEN, str(src),
                            str(dst)], stdout=PIPE, stderr=PIPE, universal_newlines=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        wall = time.monotonic() - started
        print("\n1.5 GiB through the service: upload %.1f s, download %.1f s, wall %.1f s, "
              "client peak RSS %.1f MB" % (report["up_s"], report["down_s"], wall,
                                           report["maxrss_kb"] / 1024))
        assert report["path"] == AREA + "/big/big.bin"
        stored = upstream.root / report["path"]
        assert stored.stat().st_size == BIG and dst.stat().st_size == BIG == report["got"]
        want = adler32_of(src)
        assert report["sent_adler32"] == want == adler32_of(dst)
        # the service has no checksum to compare with: no hashing work on the way in
        assert report["got_adler32"] is None
        with open(stored, "rb") as s, open(dst, "rb") as d:
            for offset, data in blocks.items():
                s.seek(offset)
                d.seek(offset)
                assert s.read(len(data)) == data == d.read(len(data))
        # far below the file's 1.5 GB: what the transfers add is a few buffers
        assert report["maxrss_kb"] - report["base_kb"] < 64 * 1024, report
        if sys.implementation.name == "cpython":
            assert report["maxrss_kb"] < 100 * 1024, report
        assert not list(tmp_path.glob("*.part"))
    finally:
        for p in (src, dst, upstream.root / AREA / "big"):
            shutil.rmtree(str(p), ignore_errors=True) if p.is_dir() else \
                p.unlink() if p.exists() else None



def test_service_listing_with_a_terminal_escape_in_a_name_is_refused(apache_server, tmp_path,
                                                                     monkeypatch, capsys):
    # The issue's case: a listing href like "dir/%1B%5B31mred" must not reach
    # the terminal: the entry is skipped with a warning, as on WebDAV.  (Apache
    # upstream: it percent-encodes control characters in hrefs, nginx writes
    # them raw into the XML.)
    folder = "svc-" + secrets.token_hex(6)
    root = make_tree(apache_server.root / folder, {"dir/a.bin": b"a", "dir/\x1b[31mred": b"x"})
    apache_server.grant_access(root)
    try:
        with DownloadService(apache_server.url + "/" + folder, apache_server.token,
                             users=USERS) as ds:
            items = raw_listing(ds, "dir")
            assert any("%1B" in i["href"].upper() for i in items)  # the service sends it
            monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
            code = ctadata.main(["--service", ds.base_url, "ls", "dir"])
    finally:
        shutil.rmtree(str(root), ignore_errors=True)
    out, err = capsys.readouterr()
    assert code == 0 and out == "a.bin\n", (out, err)
    assert "\x1b" not in err and "unsafe name" in err
