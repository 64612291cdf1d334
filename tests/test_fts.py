"""`ctadata cp --fts`, `ctadata fts status|cancel`: copies handed to FTS3,
issue 11 part 4, against tests/ftsserver.py (an FTS3 REST stand-in written
from fts-rest's documentation, which really copies between loopback storage:
here folders of nginx and of `ctadata serve`)."""

import json
import os
import shutil
from pathlib import Path

import pytest

import ctadata
from conftest import make_tree, tree_digests
from ftsserver import FTSServer

FAST = (0.02, 0.1)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(ctadata, "_FTS_POLL", FAST)


@pytest.fixture
def store(nginx_server, request):
    """(a folder URL on nginx, its folder on disk, the token)."""
    name = "fts-cp-%s" % request.node.name[:40]
    root = Path(nginx_server.root) / name
    root.mkdir()
    yield nginx_server.url + "/" + name + "/", root, nginx_server.token
    shutil.rmtree(str(root), ignore_errors=True)


@pytest.fixture
def fts(store):
    """The stand-in, which knows our token (the storage's: a single-token user)."""
    with FTSServer(token=store[2]) as server:
        yield server
    assert server.errors == []


@pytest.fixture
def cli(store, monkeypatch, capsys):
    monkeypatch.setenv("BEARER_TOKEN", store[2])

    def run(*argv):
        code = ctadata.main(["--url", store[0]] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_cp_fts_submits_one_job_and_follows_it(store, fts, cli):
    url, root, token = store
    spec = {"night/a.fits": os.urandom(3000), "night/sub/b.fits": os.urandom(100),
            "night/sub/c.log": b"log"}
    make_tree(root, spec)
    code, out, err = cli("cp", "--fts", fts.url, "-r", "--exclude", "*.log", "night",
                         "copies/", "--wait")
    assert code == 0, err
    job_id = out.strip()
    assert job_id in fts.jobs and fts.jobs[job_id]["job_state"] == "FINISHED"
    assert "FINISHED, 2 files (FINISHED 2)" in err
    assert tree_digests(root / "copies/night") == {
        k: v for k, v in tree_digests(root / "night").items() if not k.endswith(".log")}
    posts = fts.find("POST", "/jobs")
    assert len(posts) == 1 and posts[0].headers["authorization"] == "Bearer <redacted>"
    doc = posts[0].json
    assert doc["params"] == {"verify_checksum": True, "overwrite": False, "retry": 2}
    assert sorted((f["sources"][0], f["destinations"][0], f["filesize"])
                  for f in doc["files"]) == [
        (url + "night/a.fits", url + "copies/night/a.fits", 3000),
        (url + "night/sub/b.fits", url + "copies/night/sub/b.fits", 100)]
    # the storage lists no checksums (nginx): FTS3 compares source and destination
    assert not any("checksum" in f for f in doc["files"])
    # again, now with --overwrite and no checksum comparison
    code, out, err = cli("cp", "--fts", fts.url, "night/a.fits", "copies/night/",
                         "--overwrite", "--no-verify", "--fts-retry", "0", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert fts.find("POST", "/jobs")[1].json["params"] == {
        "verify_checksum": False, "overwrite": True, "retry": 0}
    assert job["files"][0]["destination"] == url + "copies/night/a.fits"
    assert fts.wait(job["id"])["job_state"] == "FINISHED"


def test_large_submissions_are_split_and_followed_as_one(store, fts, cli, monkeypatch):
    monkeypatch.setattr(ctadata, "_FTS_BATCH", 2)
    make_tree(store[1], {"many/f%d.bin" % i: os.urandom(10 + i) for i in range(5)})
    code, out, err = cli("cp", "--fts", fts.url, "-r", "many", "dst/")
    assert code == 0, err
    ids = out.split()
    assert len(ids) == 3 == fts.count("POST", "/jobs")
    assert [len(r.json["files"]) for r in fts.find("POST", "/jobs")] == [2, 2, 1]
    assert "IDs joined with ',' count as one ID" in err
    code, out, err = cli("fts", "status", ",".join(ids), "--fts", fts.url, "--wait")
    assert code == 0, err
    assert out.startswith("fts %s: FINISHED, 5 files (FINISHED 5)" % ",".join(ids))
    assert tree_digests(store[1] / "dst/many") == tree_digests(store[1] / "many")


def test_failures_are_listed_with_reasons_and_exit_1(store, fts, cli):
    make_tree(store[1], {"src/good.bin": b"good", "src/bad.bin": b"bad"})
    fts.add_outcome("*/bad.bin", fail="TRANSFER [5] Connection reset by peer",
                    recoverable=False)
    code, out, err = cli("cp", "--fts", fts.url, "-r", "src", "dst/", "--wait")
    assert code == 1
    assert "FINISHEDDIRTY, 2 files (FAILED 1, FINISHED 1)" in err
    assert ("ctadata: failed: %ssrc/bad.bin -> %sdst/src/bad.bin: FAILED TRANSFER [5] "
            "Connection reset by peer" % (store[0], store[0])) in err
    job = ctadata.Client(url=store[0], token=store[2], env={}).fts_job(out.strip(), fts.url)
    assert job.done and not job.ok and job.state == "FINISHEDDIRTY"
    assert [f["source"].rsplit("/", 1)[1] for f in job.failures] == ["bad.bin"]


def test_cancel_and_status_of_a_running_job(store, fts, cli, monkeypatch):
    make_tree(store[1], {"slow/s.bin": b"s" * 1000})
    fts.add_outcome("*/s.bin", delay=5)
    code, out, err = cli("cp", "--fts", fts.url, "slow/s.bin", "later/s.bin")
    assert code == 0, err
    job_id = out.strip()
    monkeypatch.setenv("CTADATA_FTS", fts.url)     # the default server from now on
    code, out, err = cli("fts", "status", job_id)
    assert code == 0 and out.startswith("fts %s: " % job_id)
    assert fts.jobs[job_id]["job_state"] in ("SUBMITTED", "ACTIVE")
    code, out, err = cli("fts", "cancel", job_id)
    assert code == 0 and "cancelled %s" % job_id in err
    assert fts.jobs[job_id]["job_state"] == "CANCELED"
    code, out, err = cli("fts", "status", job_id, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["state"] == "CANCELED" and doc["done"] is True
    assert doc["files"][0]["state"] == "CANCELED"


def test_checksums_of_the_listing_go_with_the_submission(tmp_path):
    """ctadata serve lists adler32 (as dCache does): each file is submitted
    with it, and FTS3 checks the copy against it."""
    root = tmp_path / "served"
    data = os.urandom(5000)
    make_tree(root, {"d/x.bin": data})
    with ctadata.serve(str(root), token="serve-fts-token-0123") as srv, \
            FTSServer(token=srv.token) as fts:
        c = srv.client()
        job = c.fts_copy("d", "e/", fts.url, recursive=True)
        assert job.wait(timeout=20) and job.ok and job.state == "FINISHED"
        files = fts.find("POST", "/jobs")[0].json["files"]
        assert files[0]["checksum"] == "adler32:%s" % c.checksum("d/x.bin")["adler32"]
        assert (root / "e/d/x.bin").read_bytes() == data
        assert repr(job).startswith("FTSJob(%r, state=FINISHED" % job.id)


def test_errors_no_server_bad_token_unknown_job(store, fts, cli):
    code, out, err = cli("fts", "status", "some-id")
    assert code == 2 and "no FTS3 server: give its URL" in err
    code, out, err = cli("fts", "status", "no-such-job", "--fts", fts.url)
    assert code == 1 and "No job with the id" in err
    with FTSServer(token="another-token") as other:
        make_tree(store[1], {"t.bin": b"t"})
        code, out, err = cli("cp", "--fts", other.url, "t.bin", "u.bin")
        assert code == 1 and "HTTP 403 Invalid credentials" in err
        assert store[2] not in err
    code, out, err = cli("cp", "--fts", fts.url, "--push", "t.bin", "u.bin")
    assert code == 2 and "--fts takes neither" in err
    code, out, err = cli("cp", "--wait", "t.bin", "u.bin")
    assert code == 2 and "--wait goes with --fts" in err
    code, out, err = cli("cp", "--fts", fts.url, "missing.bin", "u.bin")
    assert code == 1 and "the source does not exist" in err
    assert fts.count("POST", "/jobs") == 0


@pytest.fixture
def xb(request):
    from conftest import dav_target
    yield from dav_target(request, "xrootd_open")


def test_a_client_certificate_instead_of_a_token(tmp_path, xb):
    """--auth x509: the certificate is presented to FTS3, no token is sent.
    Real FTS3 also wants a proxy delegated to it (419), which ctadata says.
    (The storage is the open XRootD; the stand-in's TLS uses XRootD's test CA.)"""
    ca_dir = Path(xb.ca_file).parent
    pem = tmp_path / "user.pem"
    shutil.copyfile(xb.server.client_cert, str(pem))
    os.chmod(str(pem), 0o600)
    make_tree(xb.root, {"c.bin": b"via certificate"})
    xb.grant_access(xb.root)
    with FTSServer(token=None, tls=(str(ca_dir / "server.pem"), str(ca_dir / "server.key")),
                   client_ca=xb.ca_file, storage_ca=xb.ca_file) as fts:
        c = ctadata.Client(url=xb.url, auth="x509", cert=str(pem), ca_file=xb.ca_file, env={})
        job = c.fts_copy("c.bin", "d.bin", fts.url)
        assert job.wait(timeout=20) and job.ok, job.to_dict()
        assert fts.find("POST", "/jobs")[0].headers.get("authorization") is None
        assert fts.jobs[job.id]["job_metadata"]["auth_method"] == "certificate"
        fts.require_delegation = True
        with pytest.raises(ctadata.RemoteError, match="No delegation found") as e:
            c.fts_copy("c.bin", "e.bin", fts.url)
        assert "fts-rest-delegate" in str(e.value)
    assert (xb.root / "d.bin").read_bytes() == b"via certificate"
