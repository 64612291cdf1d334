"""Tape: locality, staging and release (WLCG Tape REST API v1), issue 12.

Against tests/tapeserver.py (a tape-backed dCache stand-in written from the
API's reference document: drives, per-file staging times, lost files,
expiring request ids, an API on another origin, a namespace prefix, ``state``
or ``onDisk`` reports, unordered files, partial archiveinfo answers) and
against `ctadata serve --tape`, as a user would run it.  Every test that
talks to a tape checks that no GET was ever sent for a file that was on tape
only (``tape_only_gets()``, or serve's request log).
"""

import contextlib
import json
import os
import threading
import time

import pytest

import ctadata
from conftest import make_tree
from httpdouble import DoubleHandler, ServerDouble
from tapeserver import Clock, TapeServer

TOKEN = "tape-token-0123456789"
FAST = (0.02, 0.1)          # stage_poll for tests: 20 ms doubling to 100 ms


def seed(root, n=3, size=3000):
    spec = {"raw/run1/f%d.fits" % i: os.urandom(size + i) for i in range(n)}
    spec["dl1/run1.h5"] = os.urandom(2000)
    return make_tree(root, spec)


@contextlib.contextmanager
def tape_server(root, **kw):
    """A started TapeServer; at the end: no stand-in error, and no GET of a
    file that was on tape only."""
    kw.setdefault("token", TOKEN)
    kw.setdefault("stage_seconds", 0.1)
    kw.setdefault("nearline_get_timeout", 3.0)   # a GET of a tape file would show
    disk = kw.pop("disk", ("/dl1/run1.h5",))
    with TapeServer(str(root), **kw) as tape:
        for rel in disk:
            tape.set_file(rel, locality="ONLINE")
        yield tape
    assert tape.errors == []
    assert not tape.tape_only_gets()


def client(tape, **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("retries", 0)
    kw.setdefault("stage_poll", FAST)
    kw.setdefault("env", {})
    return ctadata.Client(url=kw.pop("url", tape.url), **kw)


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """Write [default] settings of a private config file; returns a writer."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    path = tmp_path / "cfg" / "ctadata" / "config.ini"
    path.parent.mkdir(parents=True)

    def write(**settings):
        settings.setdefault("stage_poll", "%gs,%gs" % FAST)
        path.write_text("[default]\n" + "".join("%s = %s\n" % kv for kv in settings.items()))
    write()
    return write


@pytest.fixture
def cli(monkeypatch, capsys, profile):
    """ctadata.main in-process: run(url, *argv) -> (code, out, err); token
    from $BEARER_TOKEN, polls fast (the profile's stage_poll)."""
    monkeypatch.setenv("BEARER_TOKEN", TOKEN)

    def run(url, *argv):
        code = ctadata.main(["--url", url, "--retries", "0"] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def posts(tape, what="/stage"):
    return tape.find(method="POST", path=tape.api_path + what)


# -- pure parts -------------------------------------------------------------------

def test_durations_poll_policy_and_lifetimes():
    d = ctadata._duration
    assert d("90s") == 90 and d("30m") == 1800 and d("1h") == 3600 and d("1.5h") == 5400
    assert d("2d") == 172800 and d("1w") == 604800 and d("45") == 45
    assert d("PT1H") == 3600 and d("P1DT30M") == 88200 and d("P2W") == 1209600
    for bad in ("", "soon", "1x", "-1h", "P", "PT", None):
        assert d(bad) is None, bad
    # what dCache's java Duration parser takes: no weeks, months, years
    iso = ctadata._iso_seconds
    assert [iso(s) for s in (3600, 5400, 86400, 90061, 0.4, 1209600)] == [
        "PT1H", "PT1H30M", "P1D", "P1DT1H1M1S", "PT0S", "P14D"]
    assert ctadata._lifetime("2d") == "P2D" and ctadata._lifetime("P2W") == "P14D"
    assert ctadata._lifetime(None) is None and ctadata._lifetime(600) == "PT10M"
    for bad in ("0s", "soon", -5):
        with pytest.raises(ctadata.ConfigError, match="lifetime"):
            ctadata._lifetime(bad)
    assert ctadata._stage_poll(None) == (1.0, 60.0)
    assert ctadata._stage_poll("0.5s,2m") == (0.5, 120.0)
    assert ctadata._stage_poll((0.1, 0.1)) == (0.1, 0.1)
    for bad in ("5", "2s,1s", "0,1", "x,y", (1, 2, 3)):
        with pytest.raises(ctadata.ConfigError, match="stage_poll"):
            ctadata._stage_poll(bad)
    # back-off: doubles while nothing changes, keeps the pace when files come
    pace = ctadata._Pace(1.0, 60.0)
    assert [pace.next(False) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    pace = ctadata._Pace(1.0, 60.0)
    assert [pace.next(n) for n in (False, False, True, True, False)] == [1, 2, 4, 4, 4]


def test_rfc7807_problems_read_as_title_and_detail():
    body = json.dumps({"type": "about:blank", "title": "Too many files", "status": 400,
                       "detail": "1001 files in one request"}).encode()
    assert ctadata._error_text(body) == "Too many files: 1001 files in one request"
    assert ctadata._error_text(b'{"title": "Not Found", "status": 404}') == "Not Found"
    assert ctadata._error_text(b'{"message": "m", "title": "t"}') == "m"


def test_stage_files_parse_state_ondisk_and_both_spellings():
    api = ctadata._TapeAPI(None, "https://door.example:2880/pnfs/x", prefix="/x")
    doc = {"id": "r", "files": [
        {"path": "/x/a", "state": "STARTED"},
        {"path": "//x/b/", "state": "CANCELED"},
        {"path": "/x/c", "state": "COMPLETED", "onDisk": False},
        {"path": "/elsewhere/d", "state": "FAILED", "error": "lost \x1b[31m on tape"}]}
    files = {f.api_path: f for f in ctadata._staged_files(doc, "r", api, "u")}
    assert files["/x/a"].path == "a" and not files["/x/a"].done
    assert files["//x/b/"].state == "CANCELLED" and files["//x/b/"].path == "b"
    assert files["/x/c"].problem.startswith("staged, but no longer on disk")
    d = files["/elsewhere/d"]
    assert d.path == "/elsewhere/d" and "\x1b" not in d.error and d.problem == d.error
    ondisk = {"files": [{"path": "/x/a", "onDisk": True}, {"path": "/x/b", "onDisk": False},
                        {"path": "/x/c", "onDisk": False, "error": "gone"}]}
    got = [(f.state, f.on_disk) for f in ctadata._staged_files(ondisk, "r", api, "u")]
    assert got == [("COMPLETED", True), ("SUBMITTED", False), ("FAILED", False)]
    ondisk["completedAt"] = 5
    assert ctadata._staged_files(ondisk, "r", api, "u")[1].problem.startswith("not on disk")
    with pytest.raises(ctadata.ProtocolError):
        ctadata._staged_files({"files": [{"path": "/x/a"}]}, "r", api, "u")
    # paths map back to the storage URL only when below tape_prefix, safely named
    assert api.api_path("https://door.example:2880/pnfs/x/raw/a%20b") == "/x/raw/a b"
    assert api.remote_path("/x/raw/a b") == "raw/a b"
    assert api.remote_path("/y/raw") is None and api.remote_path("/x/raw/../../etc") is None
    with pytest.raises(ctadata.ConfigError):
        api.api_path("https://door.example:2880/other/f")
    with pytest.raises(ctadata.ConfigError):
        api.api_path("https://elsewhere.example/pnfs/x/f")


# -- ls, stat: locality -------------------------------------------------------------

def test_ls_shows_a_locality_column_when_the_server_reports_one(tmp_path, cli):
    root = seed(tmp_path / "t")
    with tape_server(root, clock=Clock(speed=0)) as tape:
        tape.set_file("/dl1/run1.h5", locality="ONLINE")
        tape.set_file("/raw/run1/f1.fits", locality="ONLINE_AND_NEARLINE")
        tape.set_file("/raw/run1/f2.fits", locality="LOST")
        code, out, _ = cli(tape.url, "ls", "-l", "raw/run1")
        assert code == 0
        rows = [line.split() for line in out.splitlines()]
        assert [(r[4], r[5]) for r in rows] == [
            ("NEARLINE", "f0.fits"), ("ONLINE_AND_NEARLINE", "f1.fits"), ("LOST", "f2.fits")]
        assert len({line.index(" f") for line in out.splitlines()}) == 1   # aligned
        code, out, _ = cli(tape.url, "ls", "-lR", "")
        lines = {line.split()[-1]: line.split()[-2] for line in out.splitlines()}
        assert lines["dl1/run1.h5"] == "ONLINE" and lines["dl1/"] == "-"
        code, out, _ = cli(tape.url, "ls", "-lU", "raw/run1")
        assert sorted(line.split()[4] for line in out.splitlines()) == [
            "LOST", "NEARLINE", "ONLINE_AND_NEARLINE"]
        code, out, _ = cli(tape.url, "ls", "raw/run1")
        assert out.split() == ["f0.fits", "f1.fits", "f2.fits"]
        code, out, _ = cli(tape.url, "ls", "--json", "raw/run1")
        assert [e["locality"] for e in json.loads(out)] == [
            "NEARLINE", "ONLINE_AND_NEARLINE", "LOST"]
        code, out, _ = cli(tape.url, "stat", "raw/run1/f0.fits")
        assert "locality:  NEARLINE" in out


def test_no_locality_column_without_locality(tmp_path, cli):
    root = make_tree(tmp_path / "a", {"d/f.bin": b"x" * 10})
    with ctadata.serve(str(root), tape=None, token=TOKEN) as srv:       # no tape: every file ONLINE
        code, out, _ = cli(srv.url, "ls", "-l", "d")
        assert code == 0 and "ONLINE" in out
    entry = ctadata.Entry("f", "d/f", "http://h/d/f", False, 10, 86400.0)
    assert ctadata._entry_line(entry, True, False, "f") == "- 10 1970-01-02 00:00 f"


# -- a plain get: tape files fail at once -----------------------------------------

def test_plain_get_fails_tape_only_files_at_once_and_goes_on(tmp_path, cli):
    root = seed(tmp_path / "t")
    with tape_server(root, nearline_get_timeout=10) as tape:
        tape.set_file("/raw/run1/f1.fits", locality="ONLINE_AND_NEARLINE")
        tape.set_file("/raw/run1/f2.fits", locality="LOST")
        t0 = time.monotonic()
        code, _, err = cli(tape.url, "get", "-r", "raw/run1", str(tmp_path / "out") + "/")
        assert time.monotonic() - t0 < 5          # not the door's 10 s per tape file
        assert code == 1
        assert 'f0.fits: on tape only (NEARLINE)' in err
        assert 'use "ctadata stage" or "get --stage"' in err
        assert "f2.fits: lost on tape (LOST)" in err
        assert "1 transferred, 0 skipped, 2 failed" in err
        assert (tmp_path / "out/run1/f1.fits").read_bytes() == \
            (root / "raw/run1/f1.fits").read_bytes()
        assert not (tmp_path / "out/run1/f0.fits").exists()
        assert not (tmp_path / "out/run1/f0.fits.part").exists()
        # one file, in Python: TransferError with the hint
        c = client(tape)
        with pytest.raises(ctadata.TransferError) as e:
            c.fetch_and_save_file("raw/run1/f0.fits", str(tmp_path / "one"))
        assert "on tape only" in str(e.value) and "get --stage" in e.value.hint
        # a dry run says so too, and sends nothing to the tape API
        code, out, err = cli(tape.url, "get", "-n", "-r", "raw/run1", tmp_path / "dry/")
        assert code == 1 and "on tape only" in err and "would get" in out
        assert not posts(tape) and tape.count(method="GET", listener="door") == 1


# -- get --stage --------------------------------------------------------------------

def test_get_stage_downloads_each_file_as_soon_as_it_is_on_disk(tmp_path, cli):
    root = seed(tmp_path / "t", n=4)
    with tape_server(root, drives=1, stage_seconds=0.6) as tape:
        tape.set_file("/raw/run1/f3.fits", locality="LOST", stage_seconds=0.1)
        code, _, err = cli(tape.url, "get", "-r", "--stage", "--lifetime", "2h", "/",
                           str(tmp_path / "out") + "/")
        assert code == 1, err
        assert "failed: " in err and "f3.fits: staging failed: File is lost on tape" in err
        assert "5 files (4 transferred, 0 skipped, 1 failed)" in err
        for rel in ("raw/run1/f0.fits", "raw/run1/f1.fits", "raw/run1/f2.fits", "dl1/run1.h5"):
            assert (tmp_path / "out" / rel).read_bytes() == (root / rel).read_bytes()
        # one stage request for the four tape files, with the lifetime as ISO 8601
        (stage,) = posts(tape)
        assert sorted(f["path"] for f in stage.json["files"]) == [
            "/raw/run1/f%d.fits" % i for i in range(4)]
        assert {f["diskLifetime"] for f in stage.json["files"]} == {"PT2H"}
        # overlap: the disk file went before any recall ended, and each staged
        # file went before the single drive had finished the next one
        gets = {r.path: r.time for r in tape.find(method="GET", listener="door")
                if r.path.endswith((".fits", ".h5"))}
        ends = sorted(r["end"] for r in tape.recalls)
        assert gets["/dl1/run1.h5"] < ends[0]
        recalled = sorted((r["end"], r["path"]) for r in tape.recalls if r["ok"])
        for (end, path), (next_end, _p) in zip(recalled, recalled[1:]):
            assert end <= gets[path] < next_end, (path, end, gets[path], next_end)
        # staged files stay staged (no --release)
        assert tape.locality("/raw/run1/f0.fits") == "ONLINE_AND_NEARLINE"


def test_get_stage_release_and_python_api(tmp_path):
    root = seed(tmp_path / "t", n=3)
    with tape_server(root, drives=2) as tape:
        tape.set_file("/raw/run1/f1.fits", locality="ONLINE_AND_NEARLINE")
        c = client(tape)
        progress = ctadata.Progress()
        seen = []
        orig = progress.staging
        progress.staging = lambda n: (seen.append(n), orig(n))
        summary = c.download("raw/run1", str(tmp_path / "out") + "/", recursive=True,
                             stage=True, release=True, progress=progress)
        assert summary.transferred == 3 and summary.failed == 0
        assert max(seen) == 2 and seen[-1] == 0 and progress.waiting == 0
        # each staged file was released after its download; the disk one was not staged
        rel = [r for r in tape.find(method="POST") if "/release/" in r.path]
        assert sorted(p for r in rel for p in r.json["paths"]) == [
            "/raw/run1/f0.fits", "/raw/run1/f2.fits"]
        assert tape.locality("/raw/run1/f0.fits") == "NEARLINE"
        assert tape.locality("/raw/run1/f1.fits") == "ONLINE_AND_NEARLINE"
        # again: everything is there, nothing staged or fetched
        n = tape.count()
        again = c.download("raw/run1", str(tmp_path / "out") + "/", recursive=True, stage=True)
        assert again.skipped == 3 and not [r for r in tape.requests[n:] if r.listener == "api"]
        with pytest.raises(ctadata.ConfigError, match="release goes with stage"):
            c.download("raw/run1", str(tmp_path / "x"), release=True)
        with pytest.raises(ctadata.ConfigError, match="lifetime"):
            c.download("raw/run1", str(tmp_path / "x"), recursive=True, stage=True,
                       lifetime="soon")


def test_get_stage_with_ondisk_reports_unordered_files_and_american_spelling(tmp_path, cli):
    root = seed(tmp_path / "t", n=6, size=100)
    with tape_server(root, report="onDisk", drives=3, seed=7) as tape:
        code, _, err = cli(tape.url, "get", "-r", "--stage", "raw", str(tmp_path / "out") + "/")
        assert code == 0, err
        assert len(list((tmp_path / "out/raw/run1").iterdir())) == 6
    with tape_server(root, cancelled_state="CANCELED", clock=Clock(speed=0)) as tape:
        c = client(tape)
        req = c.stage("raw/run1/f0.fits")
        assert req.cancel() == 1
        assert [f.state for f in req.files] == ["CANCELLED"] and req.done and not req.ok


def test_get_stage_when_the_server_forgets_a_finished_request(tmp_path):
    # dCache's bulk service drops a request some time after it finished: a
    # client that polls late gets 404 and asks archiveinfo instead
    root = seed(tmp_path / "t", n=2)
    with tape_server(root, request_ttl=0, drives=2, stage_seconds=0.1) as tape:
        tape.set_file("/raw/run1/f1.fits", locality="LOST")
        c = client(tape, stage_poll=(0.5, 0.5))
        summary = c.download("raw/run1", str(tmp_path / "out") + "/", recursive=True,
                             stage=True, raise_on_failure=False)
        assert summary.transferred == 1 and summary.failed == 1
        (bad,) = summary.failures
        assert "is gone" in bad.error and "HTTP 404" in bad.error and "stage it again" in bad.error
        assert tape.count(method="POST", path=tape.api_path + "/archiveinfo") == 1


# -- stage, --status, --cancel, release ----------------------------------------------

def test_stage_wait_exit_status_and_failed_files(tmp_path, cli):
    root = seed(tmp_path / "t", n=3)
    with tape_server(root, drives=2) as tape:
        code, out, err = cli(tape.url, "stage", "-r", "raw", "--wait")
        assert code == 0, err
        rid = out.strip()
        assert tape.request_state(rid)["id"] == rid
        assert "3 files, 3 on disk, 0 waiting, 0 failed (COMPLETED 3)" in err
        tape.set_file("/raw/run1/f2.fits", locality="LOST")
        code, out, err = cli(tape.url, "stage", "raw/run1/f2.fits", "raw/run1/f0.fits",
                             "--wait", "--json")
        assert code == 1
        doc = json.loads(out)
        assert doc["failed"] == 1 and doc["on_disk"] == 1 and doc["done"]
        assert "failed: raw/run1/f2.fits: File is lost on tape (tape read error)" in err
        # --status of the same request: same answer, on stdout
        code, out, err = cli(tape.url, "stage", "--status", doc["id"])
        assert code == 1 and "2 files, 1 on disk, 0 waiting, 1 failed" in out
        code, _, err = cli(tape.url, "stage", "raw")
        assert code == 2 and "raw is a directory; use stage -r" in err
        code, _, err = cli(tape.url, "stage", "--status", rid, "raw")
        assert code == 2 and "take a request ID only" in err
        code, _, err = cli(tape.url, "stage")
        assert code == 2 and "stage needs remote paths" in err


def test_stage_in_batches_of_1000(tmp_path, cli):
    spec = {"raw/many/f%04d" % i: b"x" for i in range(2345)}
    root = make_tree(tmp_path / "t", spec)
    with tape_server(root, clock=Clock(speed=0)) as tape:
        code, out, err = cli(tape.url, "stage", "-r", "raw", "--include", "f1*", "--include",
                             "f0*", "--include", "f2*")
        assert code == 0, err
        ids = out.strip().split(",")
        assert [len(r.json["files"]) for r in posts(tape)] == [1000, 1000, 345]
        assert sorted(ids) == sorted(tape._stage_requests)
        assert "2345 files in 3 stage requests" in err
        code, out, _ = cli(tape.url, "stage", "--status", out.strip())
        assert code == 0 and "2345 files, 0 on disk, 2345 waiting" in out
        code, out, err = cli(tape.url, "stage", "--cancel", ",".join(ids))
        assert code == 0 and "cancelled 2345 files" in err and "CANCELLED 2345" in out
        assert [len(r.json["paths"]) for r in posts(tape, "/stage/%s/cancel" % ids[0])] == [1000]


def test_stage_request_api_status_cancel_release(tmp_path):
    root = seed(tmp_path / "t", n=4)
    clock = Clock(speed=0)
    with tape_server(root, clock=clock, drives=2, stage_seconds=10) as tape:
        tape.set_file("/raw/run1/f3.fits", stage_seconds=30)
        c = client(tape)
        req = c.stage(["raw/run1/f%d.fits" % i for i in range(4)] + ["dl1/run1.h5"],
                      lifetime="1h")
        assert isinstance(req, ctadata.StageRequest) and len(req.ids) == 1
        assert [f.state for f in req.files] == ["SUBMITTED"] * 5     # as submitted
        req.refresh()
        states = {f.path: f.state for f in req.files}
        assert states["dl1/run1.h5"] == "COMPLETED"                   # on disk already
        assert sorted(states.values()).count("STARTED") == 2          # two drives
        tape.advance(10)
        req.refresh()
        assert req.on_disk == 3 and req.waiting == 2 and not req.done
        assert "on_disk=3" in repr(req) and "<table>" in req._repr_html_()
        assert c.stage_request(req.id).on_disk == 3                   # found again by id
        # cancel: the waiting files stop; the staged ones stay on disk
        assert req.cancel() == 2
        assert sorted(f.state for f in req.files).count("CANCELLED") == 2
        assert tape.on_disk("/raw/run1/f0.fits")
        assert req.failed == 2 and {f.problem for f in req.failures} == {"cancelled"}
        # release: one file, then the rest; a path not in the request is refused
        with pytest.raises(ctadata.ConfigError, match="not in stage request"):
            req.release(["raw/run1/elsewhere.fits"])
        assert req.release("raw/run1/f0.fits") == 1
        assert not tape.on_disk("/raw/run1/f0.fits") and tape.on_disk("/raw/run1/f1.fits")
        assert req.release() == 5
        assert not tape.on_disk("/raw/run1/f1.fits")
        assert [r.json["paths"] for r in posts(tape, "/release/" + req.id)][0] == [
            "/raw/run1/f0.fits"]
        # the server's refusal of a path, in its own words (RFC 7807)
        with pytest.raises(ctadata.RemoteError) as e:
            c._downloads.tape.release(req.id, ["/raw/run1/nope"])
        assert e.value.status == 400 and "File missing from stage request: The file " \
            "/raw/run1/nope does not belong" in str(e.value)


def test_release_and_cancel_from_the_command_line(tmp_path, cli):
    root = seed(tmp_path / "t", n=2)
    with tape_server(root) as tape:
        code, out, _ = cli(tape.url, "stage", "-r", "raw", "--wait")
        rid = out.strip()
        assert code == 0 and tape.on_disk("/raw/run1/f0.fits")
        code, _, err = cli(tape.url, "release", rid, "raw/run1/f0.fits")
        assert code == 0 and "released 1 file of" in err
        assert not tape.on_disk("/raw/run1/f0.fits") and tape.on_disk("/raw/run1/f1.fits")
        code, _, err = cli(tape.url, "release", rid)
        assert code == 0 and "released 2 files" in err and not tape.on_disk("/raw/run1/f1.fits")
        code, _, err = cli(tape.url, "stage", "--cancel", rid, "--wait")
        assert code == 2 and "does not wait" in err


def test_errors_of_the_api_reach_the_user(tmp_path, cli):
    root = seed(tmp_path / "t", n=3)
    with tape_server(root, clock=Clock(speed=0), max_files=2) as tape:
        code, _, err = cli(tape.url, "stage", "-r", "raw")
        assert code == 1
        assert "stage: HTTP 400 Too many files: 3 files in one request; this endpoint " \
            "accepts at most 2" in err
        code, _, err = cli(tape.url, "stage", "--status", "no-such-id")
        assert code == 1 and "HTTP 404 Not found: No STAGE request with id no-such-id" in err
        assert "forgets a request" in err
        code, _, err = cli(tape.url, "stage", "--lifetime", "soon", "raw/run1/f0.fits")
        assert code == 2 and "positive duration like 1h" in err
        # an id cannot reach another route
        code, _, err = cli(tape.url, "stage", "--status", "../archiveinfo")
        assert code == 1 and tape.find(method="GET", path=tape.api_path +
                                       "/stage/../archiveinfo")
        # a token the API refuses
        c = client(tape, token="wrong-token-value")
        with pytest.raises(ctadata.AuthError) as e:
            c.stage_request("x")
        assert "Unauthorized" in str(e.value) and "wrong-token-value" not in str(e.value)


def test_expired_request_id(tmp_path, cli):
    root = seed(tmp_path / "t", n=1)
    with tape_server(root, drives=1) as tape:
        code, out, _ = cli(tape.url, "stage", "raw/run1/f0.fits", "--wait")
        rid = out.strip()
        tape.expire(rid)
        code, _, err = cli(tape.url, "stage", "--status", rid)
        assert code == 1 and "404" in err and "stage the files again" in err
        code, _, err = cli(tape.url, "get", "--stage-id", rid, tmp_path / "out")
        assert code == 1 and "404" in err
        code, _, err = cli(tape.url, "release", rid)
        assert code == 1 and "404" in err


def test_partial_archiveinfo_answers(tmp_path):
    root = seed(tmp_path / "t", n=5)
    with tape_server(root, archiveinfo_limit=2, clock=Clock(speed=0)) as tape:
        tape.set_file("/raw/run1/f1.fits", locality="ONLINE_AND_NEARLINE")
        tape.set_file("/raw/run1/f2.fits", locality="LOST")
        c = client(tape)
        paths = ["raw/run1/f%d.fits" % i for i in range(5)] + ["dl1/run1.h5", "raw/nope"]
        info = c.archive_info(paths)
        assert info == {"raw/run1/f0.fits": "TAPE", "raw/run1/f1.fits": "DISK_AND_TAPE",
                        "raw/run1/f2.fits": "LOST", "raw/run1/f3.fits": "TAPE",
                        "raw/run1/f4.fits": "TAPE", "dl1/run1.h5": "DISK", "raw/nope": None}
        assert tape.count(method="POST", path=tape.api_path + "/archiveinfo") == 4
        assert any("raw/nope: No such file or directory" in w for w in c.warnings)


# -- get --stage-id: the files of an earlier request ---------------------------------

def test_get_stage_id_downloads_exactly_the_files_of_the_request(tmp_path, cli):
    root = seed(tmp_path / "t", n=4)
    with tape_server(root, drives=1, stage_seconds=0.3) as tape:
        code, out, _ = cli(tape.url, "stage", "raw/run1/f0.fits", "raw/run1/f1.fits",
                           "raw/run1/f3.fits", "dl1/run1.h5", "--lifetime", "1h")
        rid = out.strip()
        code, _, err = cli(tape.url, "get", "--stage-id", rid, tmp_path / "out", "--release")
        assert code == 0, err
        got = sorted(str(p.relative_to(tmp_path / "out")) for p in
                     (tmp_path / "out").rglob("*") if p.is_file())
        assert got == ["dl1/run1.h5", "raw/run1/f0.fits", "raw/run1/f1.fits",
                       "raw/run1/f3.fits"]
        for rel in got:
            assert (tmp_path / "out" / rel).read_bytes() == (root / rel).read_bytes()
        assert len(posts(tape)) == 1        # waited for the request: no new one
        assert not tape.on_disk("/raw/run1/f0.fits")     # --release
        rel = [p for r in tape.find(method="POST") if "/release/" in r.path
               for p in r.json["paths"]]
        assert sorted(rel) == ["/dl1/run1.h5", "/raw/run1/f0.fits", "/raw/run1/f1.fits",
                               "/raw/run1/f3.fits"]
        # the morning after: the disk copies are gone again -> staged anew
        code, _, err = cli(tape.url, "get", "--stage-id", rid, tmp_path / "again/")
        assert code == 0, err
        assert len(posts(tape)) == 2
        assert sorted(f["path"] for f in posts(tape)[1].json["files"]) == [
            "/raw/run1/f0.fits", "/raw/run1/f1.fits", "/raw/run1/f3.fits"]
        assert (tmp_path / "again/raw/run1/f3.fits").is_file()
        # run again: skipped, nothing staged
        code, _, err = cli(tape.url, "get", "--stage-id", rid, tmp_path / "again/")
        assert code == 0 and "4 skipped" in err and len(posts(tape)) == 2
        for argv, msg in [(["--stage-id", rid, "-r", "x"], "destination folder only"),
                          (["--stage-id", rid, "a", "b"], "only the destination"),
                          (["--release", "raw/run1/f0.fits"], "--release goes with"),
                          (["--lifetime", "1h", "raw/run1/f0.fits"], "--lifetime goes with"),
                          (["--from-list", "-", "--stage", "x"], "--stage")]:
            code, _, err = cli(tape.url, "get", *argv)
            assert code == 2 and msg in err, (argv, err)


def test_get_stage_id_with_failed_and_waiting_files(tmp_path):
    root = seed(tmp_path / "t", n=3)
    with tape_server(root, drives=1, stage_seconds=0.2) as tape:
        tape.set_file("/raw/run1/f2.fits", locality="LOST")
        c = client(tape)
        req = c.stage("raw/run1", recursive=True)
        summary = c.download_staged(req, str(tmp_path / "out"), raise_on_failure=False)
        assert summary.transferred == 2 and summary.failed == 1
        assert "staging failed: File is lost on tape" in summary.failures[0].error
        plan = c.download_staged(req.id, str(tmp_path / "plan"), dry_run=True)
        assert [r.status for r in plan.results] == ["planned", "planned", "failed"] or \
            sorted(r.status for r in plan.results) == ["failed", "planned", "planned"]
        assert not (tmp_path / "plan").exists()


# -- where the token goes -------------------------------------------------------------

class Recorder(ServerDouble):
    """An origin that records what it gets; answers per ``routes``
    {(method, path): (status, headers, json or None)}, else 404."""

    def __init__(self):
        ServerDouble.__init__(self)
        self.seen = []
        self.routes = {}
        self.lock = threading.Lock()


class _RecorderHandler(DoubleHandler):
    def _any(self):
        body = self.read_body() if self.has_body() else b""
        with self.double.lock:
            self.double.seen.append((self.command, self.path,
                                     self.headers.get("Authorization"), body))
        status, headers, doc = self.double.routes.get((self.command, self.path),
                                                      (404, [], {"title": "Not Found"}))
        self.send(status, json.dumps(doc) if doc is not None else b"",
                  "application/json", headers)

    do_GET = do_POST = do_DELETE = do_PROPFIND = do_HEAD = _any


Recorder.handler_class = _RecorderHandler


def test_the_token_goes_to_the_api_origin_only_because_discovery_named_it(tmp_path):
    root = seed(tmp_path / "t", n=2)
    with tape_server(root, api_origin=True) as tape:
        assert tape.api_origin_url != tape.url
        c = client(tape)
        summary = c.download("raw/run1", str(tmp_path / "out") + "/", recursive=True,
                             stage=True)
        assert summary.transferred == 2
        api = [r for r in tape.requests if r.listener == "api"]
        assert api and all(r.authorized for r in api)
        assert {r.method for r in api} >= {"POST", "GET"}
        # the discovery document came from the storage itself
        assert tape.find(method="GET", path="/.well-known/wlcg-tape-rest-api",
                         listener="door")
        # nothing else sent to that origin carries the token
        n = len(tape.requests)
        with pytest.raises(ctadata.CtadataError):
            c.stat(tape.api_origin_url + "/raw/run1/f0.fits")
        (probe,) = tape.requests[n:]
        assert probe.listener == "api" and "authorization" not in probe.headers


def test_a_user_named_api_gets_the_token_and_nothing_it_points_to(tmp_path, profile):
    root = seed(tmp_path / "t", n=1)
    with tape_server(root) as tape, Recorder() as api, Recorder() as other:
        rid = "r-1"
        status = {"id": rid, "createdAt": 1, "files": [
            {"path": "/raw/run1/f0.fits", "state": "STARTED"}]}
        api.routes = {
            ("POST", "/tape/stage"): (201, [("Location", other.url + "/stage/" + rid)],
                                      {"requestId": rid}),
            ("GET", "/tape/stage/" + rid): (307, [("Location", other.url + "/s/" + rid)],
                                            None)}
        other.routes = {("GET", "/s/" + rid): (200, [], status)}
        profile(tape_api=api.url + "/tape")
        c = client(tape, env=os.environ)         # tape_api from the profile
        req = c.stage("raw/run1/f0.fits")
        assert req.id == rid and req.refresh().files[0].state == "STARTED"
        assert [(m, p, a) for m, p, a, _b in api.seen] == [
            ("POST", "/tape/stage", "Bearer " + TOKEN),
            ("GET", "/tape/stage/" + rid, "Bearer " + TOKEN)]
        assert [(m, p, a) for m, p, a, _b in other.seen] == [("GET", "/s/" + rid, None)]
        # no discovery when the user named the API
        assert not tape.find(path="/.well-known/wlcg-tape-rest-api")


def test_discovery_without_an_api_and_service_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    with Recorder() as door:
        c = ctadata.Client(url=door.url, token=TOKEN, retries=0, env={})
        with pytest.raises(ctadata.ConfigError) as e:
            c.stage_request("x")
        assert "announces no tape REST API" in str(e.value) and "tape_api" in e.value.hint
        door.routes = {("GET", "/.well-known/wlcg-tape-rest-api"): (200, [], {
            "endpoints": [{"uri": "/v2", "version": "v2"}]})}
        c = ctadata.Client(url=door.url, token=TOKEN, retries=0, env={})
        with pytest.raises(ctadata.ProtocolError, match="no v1 endpoint"):
            c.archive_info(["x"])
    svc = ctadata.Client(service="http://127.0.0.1:9/svc", token=TOKEN, env={})
    for call in (lambda: svc.stage("x"), lambda: svc.stage_request("x"),
                 lambda: svc.archive_info(["x"]), lambda: svc.download_staged("x"),
                 lambda: svc.download("x", stage=True)):
        with pytest.raises(ctadata.ConfigError, match="needs direct mode"):
            call()
    assert ctadata.main(["--service=http://127.0.0.1:9/svc", "stage", "--status", "x"]) == 2
    assert "tape staging needs direct mode" in capsys.readouterr().err


# -- the namespace prefix -------------------------------------------------------------

def test_tape_prefix_maps_url_paths_to_namespace_paths(tmp_path, cli, profile):
    root = seed(tmp_path / "t", n=2)
    with tape_server(root, dav_prefix="/pnfs/example.org/data", tape_prefix="/data",
                     api_origin=True) as tape:
        url = tape.url + "/pnfs/example.org/data"
        # without tape_prefix the API knows none of these paths, and says so
        code, _, err = cli(url, "stage", "raw/run1/f0.fits", "--wait")
        assert code == 1 and "No such file or directory" in err
        assert posts(tape)[0].json["files"] == [{"path": "/pnfs/example.org/data/raw/run1/f0.fits"}]
        profile(tape_prefix="/data")
        code, out, err = cli(url, "get", "-r", "--stage", "raw", str(tmp_path / "out") + "/")
        assert code == 0, err
        assert sorted(f["path"] for f in posts(tape)[1].json["files"]) == [
            "/data/raw/run1/f0.fits", "/data/raw/run1/f1.fits"]
        code, out, _ = cli(url, "stage", "-r", "raw", "--wait")
        code, _, err = cli(url, "get", "--stage-id", out.strip(), tmp_path / "byid",
                           "--release")
        assert code == 0, err
        assert (tmp_path / "byid/raw/run1/f1.fits").read_bytes() == \
            (root / "raw/run1/f1.fits").read_bytes()
        code, out, _ = cli(url, "config")
        assert "tape_prefix" in out and "/data" in out


# -- against `ctadata serve --tape`, as a user ------------------------------------------

def test_against_ctadata_serve_as_a_user_would(tmp_path, cli):
    root = make_tree(tmp_path / "archive", {
        "raw/20241114/run1.fits.fz": os.urandom(5000),
        "raw/20241114/run2.fits.fz": os.urandom(6000),
        "raw/20241114/run3.fits.fz": os.urandom(7000),
        "dl1/run1.h5": os.urandom(3000)})
    with ctadata.serve(str(root), tape="raw/**", stage_delay=0.3, token=TOKEN) as srv:
        srv.tape.lost.add("/raw/20241114/run3.fits.fz")
        url = srv.url
        code, out, _ = cli(url, "ls", "-l", "raw/20241114")
        assert code == 0 and out.count("NEARLINE") == 2 and "LOST" in out
        code, _, err = cli(url, "get", "raw/20241114/run1.fits.fz", str(tmp_path / "a") + "/")
        assert code == 1 and "on tape only (NEARLINE)" in err
        code, out, err = cli(url, "stage", "raw/20241114/run1.fits.fz", "--wait")
        assert code == 0, err
        rid = out.strip()
        code, _, _ = cli(url, "get", "raw/20241114/run1.fits.fz", str(tmp_path / "a") + "/")
        assert code == 0 and (tmp_path / "a/run1.fits.fz").is_file()
        code, _, err = cli(url, "release", rid)
        assert code == 0
        code, _, err = cli(url, "get", "-r", "--stage", "--release", "/", str(tmp_path / "all"))
        assert code == 1 and "run3.fits.fz: staging failed: File is lost on tape" in err
        assert "4 files (3 transferred, 0 skipped, 1 failed)" in err
        assert (tmp_path / "all/raw/20241114/run2.fits.fz").read_bytes() == \
            (root / "raw/20241114/run2.fits.fz").read_bytes()
        code, out, _ = cli(url, "ls", "-l", "raw/20241114")
        assert out.count("NEARLINE") == 2           # released after the download
        code, out, _ = cli(url, "stage", "-r", "raw")
        code, _, err = cli(url, "get", "--stage-id", out.strip(), tmp_path / "byid",
                           "--release")
        assert code == 1 and (tmp_path / "byid/raw/20241114/run2.fits.fz").is_file()
        srv.tape.delay = 60                     # recalls that take a while: cancel them
        code, out, _ = cli(url, "stage", "-r", "raw")
        code, _, err = cli(url, "stage", "--cancel", out.strip())
        assert code == 0 and "cancelled 2 files" in err
        # never a GET of a file that was on tape only (serve would answer 403)
        raw_gets = [r for r in srv.requests if r["method"] == "GET" and
                    r["path"].startswith("/raw/")]
        assert raw_gets and all(r["status"] == 200 for r in raw_gets)


def test_help_of_every_new_option(capsys):
    for argv, words in [(["stage", "--help"], ["--lifetime", "--wait", "--status", "--cancel",
                                               "--json", "-r", "--include", "get --stage-id"]),
                        (["release", "--help"], ["PATH", "ID"]),
                        (["get", "--help"], ["--stage", "--stage-id", "--release",
                                             "--lifetime", "on tape only"]),
                        (["ls", "--help"], ["NEARLINE"])]:
        with pytest.raises(SystemExit):
            ctadata._build_parser().parse_args(argv)
        out = capsys.readouterr().out
        for w in words:
            assert w in " ".join(out.split()), (argv, w)
