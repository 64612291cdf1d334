"""Layer 2: integrity and resilience against a server that misbehaves on
purpose (tests/faultserver.py, a dCache-like door + pool on loopback); the
tests that need no fault use `ctadata serve` (the ``served`` fixture).

For every fault: the final file is byte-identical or absent, never wrong;
exit codes are right; resumption sends a Range."""

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import ctadata
from conftest import leftover_part
from faultserver import FaultServer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "fault-token-123"


@pytest.fixture
def fs(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    with FaultServer(root, TOKEN) as srv:
        srv.root = root
        yield srv
        assert srv.errors == []


@pytest.fixture
def served(tmp_path):
    """`ctadata serve`: a dCache-like server, for the tests that need no fault."""
    root = tmp_path / "remote"
    root.mkdir()
    with ctadata.serve(str(root), token=TOKEN) as srv:
        srv.root = root
        yield srv


def served_count(srv, method, path=None):
    return sum(1 for r in srv.requests
               if r["method"] == method and (path is None or r["path"] == path))


def mkclient(fs, **kw):
    opts = dict(url=fs.url, token=TOKEN, env={}, retries=3, backoff=0.01, timeout=5)
    opts.update(kw)
    return ctadata.Client(**opts)


def put_remote(fs, rel, data):
    p = fs.root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return data


def gets(fs, path, server=None):
    return [r for r in fs.find(method="GET", path=path, server=server)]


def sha(b):
    return hashlib.sha256(b).hexdigest()


BIG = 3 * 1024 * 1024 + 11


@pytest.mark.parametrize("kind,params", [
    ("truncate", {"after": 1000000}),
    ("reset", {"after": 1500000}),
])
def test_cut_connection_resumes_with_range(fs, tmp_path, kind, params):
    data = put_remote(fs, "f.bin", os.urandom(BIG))
    fs.add_fault(kind, method="GET", path="/f.bin", **params)
    c = mkclient(fs)
    assert c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin")) == BIG
    assert sha((tmp_path / "f.bin").read_bytes()) == sha(data)
    reqs = gets(fs, "/f.bin")
    assert len(reqs) == 2
    assert "range" not in reqs[0].headers
    assert reqs[0].headers.get("want-digest", "").startswith("adler32")
    if kind == "reset" and "range" not in reqs[1].headers:
        # an RST makes the kernel drop what the client had not read yet: it may
        # have had nothing to resume from
        return
    start, _, end = reqs[1].headers["range"].split("=")[1].partition("-")
    start = int(start)
    assert end == str(BIG - 1)                        # the size is known: a closed range
    assert 0 < start <= params["after"]
    assert reqs[1].headers.get("if-range")            # the ETag from the listing
    assert fs.bytes_sent["/f.bin"] < 2 * BIG - 500000  # resumed, not restarted
    assert not (tmp_path / "f.bin.part").exists()


def test_503_with_retry_after_is_honoured(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(1000))
    fs.add_fault("status", method="GET", path="/f.bin", status=503,
                 headers={"Retry-After": "1"}, times=2)
    c = mkclient(fs)
    t0 = time.monotonic()
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert time.monotonic() - t0 >= 1.9
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(gets(fs, "/f.bin")) == 3


def test_retries_are_bounded_and_the_exit_code_is_1(fs, tmp_path):
    put_remote(fs, "f.bin", b"x" * 100)
    fs.add_fault("status", method="GET", path="/f.bin", status=503, headers={}, times=None)
    c = mkclient(fs, retries=2)
    with pytest.raises(ctadata.RemoteError) as ei:
        c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert ei.value.status == 503
    assert len(gets(fs, "/f.bin")) == 3
    assert not (tmp_path / "f.bin").exists()


def test_xrootds_could_not_run_read_request_is_retried(fs, tmp_path, caplog):
    # XRootD < 5.8.3 sometimes answers a GET of an existing file with
    # "404 Could not run read request." (a race in its bridge): not "not found"
    data = put_remote(fs, "f.bin", os.urandom(1000))
    fs.add_fault("status", method="GET", path="/f.bin", status=404, headers={},
                 body=b"Could not run read request.", times=1)
    c = mkclient(fs)
    with caplog.at_level(logging.INFO, logger="ctadata.retry"):
        assert c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin")) == 1000
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(gets(fs, "/f.bin")) == 2
    assert "after: HTTP 404 Could not run read request." in caplog.text
    # every time: a failed transfer that says so, not "no such file"
    fs.add_fault("status", method="GET", path="/f.bin", status=404, headers={},
                 body=b"Could not run read request.", times=None)
    with pytest.raises(ctadata.PartialFailure) as ei:
        c.download("f.bin", str(tmp_path / "again.bin"))
    err = ei.value.summary.failures[0].exception
    assert isinstance(err, ctadata.TransferError) and err.status == 404
    assert "HTTP 404 Could not run read request." in str(err)
    assert len(gets(fs, "/f.bin")) == 2 + 4                  # retried (retries=3)
    # the transport's own retry loop (retry=True) goes by the same rule
    fs.clear_faults()
    fs.add_fault("status", method="GET", path="/f.bin", status=404, headers={},
                 body=b"Could not run read request.", times=1)
    resp = c._transport.request("GET", c.url_for("f.bin"))
    assert resp.status == 200 and resp.read() == data
    c._transport.release(resp)
    # and a 404 that says "not found" is one
    with pytest.raises(ctadata.NotFound):
        c._transport.request("GET", c.url_for("nothing.bin"), what="download")


def test_404_is_not_retried(served, tmp_path):
    c = mkclient(served)
    with pytest.raises(ctadata.NotFound):
        c.fetch_and_save_file("nope.bin", str(tmp_path / "x"))
    assert served_count(served, "PROPFIND") == 1 and len(served.requests) == 1


def test_stall_past_the_timeout_is_retried(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(200000))
    fs.add_fault("stall", method="GET", path="/f.bin", seconds=5, after=100000)
    c = mkclient(fs, timeout=0.5)
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(gets(fs, "/f.bin")) == 2


def test_resume_uses_the_validator_saved_with_the_part(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(BIG))
    fs.add_fault("truncate", method="GET", path="/f.bin", after=2000000)
    c = mkclient(fs, retries=0)
    with pytest.raises(ctadata.TransferError):
        c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    import json
    meta = json.loads((tmp_path / "f.bin.part.meta").read_text())
    # the server's strong ETag ("<size>-<mtime>"), saved when the part was started
    assert re.fullmatch(r'"%d-\d+"' % len(data), meta["validator"])
    # the file changes on the server between the two runs
    put_remote(fs, "f.bin", data[:100] + b"changed" + data[107:])
    c2 = mkclient(fs)
    c2.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == (fs.root / "f.bin").read_bytes()
    last = gets(fs, "/f.bin")[-1]
    assert last.headers["if-range"] == meta["validator"]   # the old validator was sent...
    assert last.status == 200                         # ...so the server sent it all
    assert not (tmp_path / "f.bin.part.meta").exists()


def test_ignored_range_restarts_from_zero(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(BIG))
    c = mkclient(fs)
    leftover_part(tmp_path / "f.bin", data[:12345], c, "f.bin")  # an earlier run's
    fs.add_fault("ignore_range", method="GET", path="/f.bin")
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert gets(fs, "/f.bin")[0].headers["range"] == "bytes=12345-%d" % (BIG - 1)


def test_resume_of_an_existing_part_file(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(BIG))
    c = mkclient(fs)
    leftover_part(tmp_path / "f.bin", data[:2000000], c, "f.bin")
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert fs.bytes_sent["/f.bin"] == BIG - 2000000


def test_wrong_content_range_discards_the_part(fs, tmp_path):
    data = put_remote(fs, "f.bin", os.urandom(BIG))
    c = mkclient(fs)
    leftover_part(tmp_path / "f.bin", data[:5000], c, "f.bin")
    fs.add_fault("wrong_content_range", method="GET", path="/f.bin", start=100)
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert "range" not in gets(fs, "/f.bin")[1].headers   # started again from zero


def test_a_stale_part_with_wrong_bytes_is_caught_by_the_checksum(served, tmp_path):
    data = put_remote(served, "f.bin", os.urandom(BIG))
    c = mkclient(served)
    leftover_part(tmp_path / "f.bin", b"\0" * 5000, c, "f.bin")  # not what it has
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data       # mismatch -> once more from 0


@pytest.mark.parametrize("kind", ["corrupt", "wrong_digest"])
def test_checksum_mismatch_retries_once(fs, tmp_path, kind):
    data = put_remote(fs, "f.bin", os.urandom(100000))
    fs.add_fault(kind, method="GET", path="/f.bin")
    c = mkclient(fs)
    c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(gets(fs, "/f.bin")) == 2


@pytest.mark.parametrize("kind", ["corrupt", "wrong_digest"])
def test_checksum_mismatch_twice_fails_and_leaves_nothing(fs, tmp_path, kind):
    put_remote(fs, "f.bin", os.urandom(100000))
    fs.add_fault(kind, method="GET", path="/f.bin", times=2)
    c = mkclient(fs)
    with pytest.raises(ctadata.ChecksumMismatch, match="checksum mismatch"):
        c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_get_redirected_to_pool_without_authorization(fs, tmp_path):
    fs.redirect_get = True
    data = put_remote(fs, "d/f.bin", os.urandom(BIG))
    fs.add_fault("truncate", method="GET", path="/d/f.bin", server="pool", after=700000)
    c = mkclient(fs)
    c.fetch_and_save_file("d/f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    pool = [r for r in fs.requests if r.server == "pool"]
    door = gets(fs, "/d/f.bin", server="door")
    assert len(pool) == 2 and len(door) == 2   # the retry starts again at the door
    assert all("authorization" not in r.headers for r in pool)
    assert all("authorization" in r.headers for r in door)


def test_redirect_to_another_host_gets_no_token(fs, tmp_path):
    put_remote(fs, "f.bin", b"abc")
    other = "http://localhost:%d/f.bin" % fs.port       # same port, other origin
    fs.add_fault("redirect", method="GET", path="/f.bin", location=other)
    c = mkclient(fs)
    with pytest.raises(ctadata.AuthError):      # the other origin wants a token: 401
        c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin"))
    second = gets(fs, "/f.bin")[1]
    assert second.headers["host"].startswith("localhost")
    assert "authorization" not in second.headers
    assert not (tmp_path / "f.bin").exists()


def test_put_large_file_uses_expect_and_goes_to_the_pool(fs, tmp_path):
    fs.redirect_put = True
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(BIG))
    c = mkclient(fs, expect_threshold=1024 * 1024)
    r = c.upload_file(str(src), "up/")
    assert r["path"] == "up/big.bin" and r["total_written"] == BIG
    assert (fs.root / "up/big.bin").read_bytes() == src.read_bytes()
    door = fs.find(method="PUT", server="door")
    pool = fs.find(method="PUT", server="pool")
    assert door[-1].headers["expect"] == "100-continue" and door[-1].body_len == 0
    assert pool[-1].body_len == BIG and pool[-1].sent_continue
    assert all("authorization" not in r.headers for r in pool)


def test_put_small_file_goes_straight_with_content_md5(fs, tmp_path):
    fs.redirect_put = True
    src = tmp_path / "small.txt"
    src.write_bytes(b"small file" * 10)
    c = mkclient(fs)
    c.upload_file(str(src), "s.txt")
    (put,) = fs.find(method="PUT")
    assert "expect" not in put.headers and put.server == "door"
    import base64
    assert put.headers["content-md5"] == base64.b64encode(
        hashlib.md5(src.read_bytes()).digest()).decode()
    assert put.headers["want-digest"].startswith("adler32")


def test_verify_sends_content_md5_for_large_files(fs, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(BIG))
    mkclient(fs).upload(str(src), "a.bin")
    assert "content-md5" not in fs.find(method="PUT")[-1].headers
    mkclient(fs).upload(str(src), "b.bin", verify=True)
    assert "content-md5" in fs.find(method="PUT")[-1].headers
    assert (fs.root / "b.bin").read_bytes() == src.read_bytes()


def test_upload_with_wrong_digest_is_deleted_and_fails(fs, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(50000))
    fs.add_fault("wrong_digest", method="PUT", path="/f.bin")
    with pytest.raises(ctadata.ChecksumMismatch, match="remote copy deleted"):
        mkclient(fs).upload_file(str(src), "f.bin")
    assert fs.count(method="DELETE", path="/f.bin") == 1
    assert not (fs.root / "f.bin").exists()


@pytest.mark.parametrize("known", [False, True])
def test_large_upload_with_wrong_digest_is_deleted_and_fails(fs, tmp_path, known):
    # before the first answer (known=False) a large file is hashed after it
    # is sent, once the server has shown it sends a Digest while it is sent:
    # a wrong Digest is caught either way
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(BIG))
    c = mkclient(fs)
    if known:
        (tmp_path / "first.txt").write_bytes(b"x" * 100)
        c.upload_file(str(tmp_path / "first.txt"), "first.txt")
        assert c._transport.put_digests is True
    fs.add_fault("wrong_digest", method="PUT", path="/f.bin")
    with pytest.raises(ctadata.ChecksumMismatch, match="adler32 checksum mismatch"):
        c.upload_file(str(src), "f.bin")
    assert fs.count(method="DELETE", path="/f.bin") == 1
    assert not (fs.root / "f.bin").exists()
    fs.clear_faults()
    r = c.upload(str(src), "f.bin")
    assert r.results[0].checksums["adler32"] == "%08x" % zlib.adler32(src.read_bytes())


def test_507_on_put_fails_without_retry(fs, tmp_path, capsys, monkeypatch):
    src = tmp_path / "f.bin"
    src.write_bytes(b"z" * 5000)
    fs.add_fault("insufficient_storage", method="PUT", times=None)
    monkeypatch.setenv("BEARER_TOKEN", TOKEN)
    code = ctadata.main(["--url", fs.url, "put", str(src), "f.bin"])
    err = capsys.readouterr().err
    assert code == 1 and "507" in err and "out of space" in err
    assert fs.count(method="PUT") == 1


def test_put_retried_after_reset_starts_again_from_the_door(fs, tmp_path):
    fs.redirect_put = True
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(BIG))
    fs.add_fault("reset", method="PUT", server="pool", after=1000000)
    c = mkclient(fs, expect_threshold=1024 * 1024)
    c.upload_file(str(src), "big.bin")
    assert (fs.root / "big.bin").read_bytes() == src.read_bytes()
    assert fs.count(method="PUT", server="door") == 2 and fs.count(method="PUT", server="pool") == 2


def test_one_failing_file_does_not_stop_the_others(fs, tmp_path, capsys, monkeypatch):
    for i in range(6):
        put_remote(fs, "d/f%d" % i, os.urandom(1000 + i))
    fs.add_fault("status", method="GET", path="/d/f3", status=500, headers={}, times=None)
    monkeypatch.setenv("BEARER_TOKEN", TOKEN)
    code = ctadata.main(["--url", fs.url, "--retries", "1", "get", "-r", "d",
                         str(tmp_path) + "/"])
    err = capsys.readouterr().err
    assert code == 1 and "1 failed" in err and "f3" in err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f0", "f1", "f2", "f4", "f5"]


def test_rerun_skips_what_is_there_and_checksum_catches_same_size_changes(served, tmp_path):
    for i in range(3):
        put_remote(served, "d/f%d" % i, os.urandom(3000))
        os.utime(str(served.root / ("d/f%d" % i)), (time.time() - 3600,) * 2)
    c = mkclient(served)
    assert c.download("d", str(tmp_path) + "/", recursive=True).transferred == 3
    again = c.download("d", str(tmp_path) + "/", recursive=True)
    assert (again.skipped, again.transferred) == (3, 0)
    f1 = tmp_path / "d/f1"
    when = f1.stat().st_mtime
    f1.write_bytes(b"\0" * 3000)                           # same size, other bytes, newer
    again = c.download("d", str(tmp_path) + "/", recursive=True)   # size and mtime
    assert (again.skipped, again.transferred) == (2, 1) and f1.read_bytes() != b"\0" * 3000
    f1.write_bytes(b"\0" * 3000)
    os.utime(str(f1), (when, when))                         # ... even the same mtime
    assert c.download("d", str(tmp_path) + "/", recursive=True).skipped == 3
    third = c.download("d", str(tmp_path) + "/", recursive=True, checksum=True)
    assert (third.skipped, third.transferred) == (2, 1)
    assert (tmp_path / "d/f1").read_bytes() == (served.root / "d/f1").read_bytes()
    forced = c.download("d", str(tmp_path) + "/", recursive=True, overwrite=True)
    assert forced.transferred == 3


def test_put_r_rerun_skips_what_is_there(served, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        (src / ("f%d" % i)).write_bytes(os.urandom(2000))
        (src / "sub" / ("g%d" % i)).write_bytes(os.urandom(2000))
    c = mkclient(served)
    assert c.upload(str(src), "dst", recursive=True).transferred == 6
    puts = served_count(served, "PUT")
    again = c.upload(str(src), "dst", recursive=True)
    assert (again.skipped, again.transferred) == (6, 0) and served_count(served, "PUT") == puts
    (src / "sub/g1").write_bytes(os.urandom(2000))           # same size, changed
    third = c.upload(str(src), "dst", recursive=True, checksum=True)
    assert (third.skipped, third.transferred) == (5, 1)
    assert (served.root / "dst/sub/g1").read_bytes() == (src / "sub/g1").read_bytes()


def test_sum_from_head_digest_and_from_the_property(fs, capsys, monkeypatch):
    data = put_remote(fs, "f.bin", os.urandom(5000))
    import zlib
    adler = "%08x" % zlib.adler32(data)
    monkeypatch.setenv("BEARER_TOKEN", TOKEN)
    assert ctadata.main(["--url", fs.url, "sum", "f.bin"]) == 0
    out = capsys.readouterr().out
    assert "adler32 %s" % adler in out and "md5 %s" % hashlib.md5(data).hexdigest() in out
    fs.digest = False                                 # no Digest header: PROPFIND property
    assert ctadata.main(["--url", fs.url, "sum", "--algo", "adler32", "f.bin"]) == 0
    assert capsys.readouterr().out.strip() == "adler32 " + adler
    assert fs.count(method="PROPFIND") >= 1


def test_local_permission_error_names_the_path(served, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "ro" / "sub"
        target.mkdir(parents=True)
        (target / "f.bin.part").mkdir()      # root ignores modes: block with a directory
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    put_remote(served, "f.bin", b"data")
    with pytest.raises(ctadata.TransferError) as ei:
        mkclient(served).fetch_and_save_file("f.bin", str(target / "f.bin"))
    assert str(target) in str(ei.value)
    assert served_count(served, "GET", "/f.bin") <= 1     # local errors are not retried


# -- interruption ------------------------------------------------------------------

def _cli(fs, *argv, **kw):
    env = {"PATH": os.environ["PATH"], "HOME": str(kw.pop("home")), "BEARER_TOKEN": TOKEN,
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ctadata", "--url", fs.url, "--timeout", "30"]
                            + list(argv), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _wait_for(pred, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_kill_9_then_rerun_resumes(fs, tmp_path):
    size = 8 * 1024 * 1024
    data = put_remote(fs, "big.bin", os.urandom(size))
    fs.add_fault("stall", method="GET", path="/big.bin", seconds=30, after=5 * 1024 * 1024)
    out = tmp_path / "out"
    out.mkdir()
    proc = _cli(fs, "get", "big.bin", str(out) + "/", home=tmp_path)
    part = out / "big.bin.part"
    try:
        assert _wait_for(lambda: part.exists() and part.stat().st_size >= 5 * 1024 * 1024)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not (out / "big.bin").exists()
    first = fs.bytes_sent["/big.bin"]
    fs.clear_faults()
    proc = _cli(fs, "get", "big.bin", str(out) + "/", home=tmp_path)
    assert proc.wait(60) == 0, proc.stderr.read()
    assert (out / "big.bin").read_bytes() == data
    second = fs.bytes_sent["/big.bin"] - first
    # the server sent `first` bytes before it stalled and all of them were on disk
    # when the process was killed: the re-run fetches exactly the rest
    assert second == size - first
    assert second < size / 2
    assert gets(fs, "/big.bin")[-1].headers["range"].startswith("bytes=")


def test_ctrl_c_stops_promptly_keeps_part_and_exits_130(fs, tmp_path):
    size = 4 * 1024 * 1024
    for i in range(3):
        put_remote(fs, "d/f%d.bin" % i, os.urandom(size))
    fs.add_fault("stall", method="GET", path="/d/*", seconds=60, after=1024 * 1024,
                 times=None)
    proc = _cli(fs, "get", "-r", "d", str(tmp_path) + "/", home=tmp_path)
    parts = lambda: list((tmp_path / "d").glob("*.part")) if (tmp_path / "d").exists() else []
    try:
        assert _wait_for(lambda: len(parts()) == 3 and all(
            p.stat().st_size >= 1024 * 1024 for p in parts()))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(15)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == 130, err
    assert elapsed < 5
    # the workers stop quietly: one message, no thread's traceback
    assert b"interrupted" in err and b"Traceback" not in err, err
    assert len(parts()) == 3
    # only .part files (and the .part.meta that says what they belong to)
    assert [p for p in (tmp_path / "d").iterdir()
            if not p.name.endswith((".part", ".part.meta"))] == []


def test_large_transfers_are_hashed_while_streaming_and_verified(fs, tmp_path):
    import zlib
    size = 20 * 1024 * 1024 + 3          # many blocks, a ragged end
    data = put_remote(fs, "big.bin", os.urandom(size))
    c = mkclient(fs)
    s = c.download("big.bin", str(tmp_path / "big.bin"))
    assert s.results[0].checksums == {"adler32": "%08x" % zlib.adler32(data)}
    fs.add_fault("wrong_digest", method="GET", path="/big.bin", times=2)
    with pytest.raises(ctadata.ChecksumMismatch):
        c.fetch_and_save_file("big.bin", str(tmp_path / "again.bin"))
    assert not (tmp_path / "again.bin").exists()
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    r = c.upload(str(src), "up.bin").results[0]
    assert r.checksums["adler32"] == "%08x" % zlib.adler32(data)
    assert (fs.root / "up.bin").read_bytes() == data
    fs.add_fault("wrong_digest", method="PUT", path="/up.bin")
    with pytest.raises(ctadata.ChecksumMismatch):
        c.upload_file(str(src), "up.bin")
    assert not (fs.root / "up.bin").exists()


def test_no_checksum_work_when_the_server_has_none(fs, tmp_path):
    fs.digest = False
    fs.missing_props["/plain.bin"] = {"Checksums"}
    put_remote(fs, "plain.bin", os.urandom(100000))
    s = mkclient(fs).download("plain.bin", str(tmp_path / "p"))
    assert s.results[0].checksums == {}            # nothing to verify against


def test_a_digest_not_asked_for_is_ignored(fs, tmp_path):
    # XRootD before 5.8.3 is not asked for checksums in transfers
    # (_Quirks.digests), and may answer with the Digest of an earlier request
    data = put_remote(fs, "f.bin", os.urandom(5000))
    c = mkclient(fs)
    c._transport._quirks = ctadata._Quirks("XrootD/v5.5.3")
    fs.add_fault("wrong_digest", method="GET", path="/f.bin")
    assert c.fetch_and_save_file("f.bin", str(tmp_path / "f.bin")) == 5000
    (req,) = gets(fs, "/f.bin")
    assert req.fault == "wrong_digest" and "want-digest" not in req.headers
    assert (tmp_path / "f.bin").read_bytes() == data
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(3000))
    fs.add_fault("wrong_digest", method="PUT", path="/up.bin")
    (r,) = c.upload(str(src), "up.bin").results
    assert r.status == "transferred" and (fs.root / "up.bin").read_bytes() == src.read_bytes()
    (put,) = fs.find(method="PUT")
    assert put.fault == "wrong_digest" and "want-digest" not in put.headers
    # from 5.8.3 on it is asked, and a wrong answer is a mismatch
    c._transport._quirks = ctadata._Quirks("XrootD/v5.8.3")
    fs.add_fault("wrong_digest", method="GET", path="/f.bin", times=None)
    with pytest.raises(ctadata.PartialFailure, match="checksum mismatch"):
        c.download("f.bin", str(tmp_path / "again.bin"))
    assert gets(fs, "/f.bin")[-1].headers["want-digest"].startswith("adler32")
