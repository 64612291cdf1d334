"""Self-test of the tape stand-in (tests/tapeserver.py) with plain http.client.

Most tests stop the emulated clock (``Clock(speed=0)``) and move it by hand, so
states are checked at exact emulated times without sleeping; the makespan and
blocking-GET tests run the clock faster than real time.
"""

import contextlib
import http.client
import json
import os
import threading
import time
import zlib
from urllib.parse import urlsplit

import pytest

from tapeserver import Clock, TapeServer, parse_duration

TOKEN = "tape-test-token"
AUTH = {"Authorization": "Bearer " + TOKEN}
PROPS = ('<?xml version="1.0"?><propfind xmlns="DAV:" xmlns:dc="http://www.dcache.org/2013/webdav"'
         ' xmlns:srm="http://srm.lbl.gov/StorageResourceManager"><prop><resourcetype/>'
         '<getcontentlength/><getetag/><getlastmodified/><dc:Checksums/><srm:FileLocality/>'
         '<srm:AccessLatency/><srm:RetentionPolicy/></prop></propfind>')


class Reply(object):
    def __init__(self, resp):
        self.status = resp.status
        self.headers = resp.headers
        self.raw = resp.read()

    @property
    def json(self):
        return json.loads(self.raw.decode("utf-8"))


def call(url, method, path="", body=None, headers=AUTH, timeout=10):
    """One request to url+path on a fresh connection -> Reply."""
    parts = urlsplit(url + path)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        hdrs = dict(headers)
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs["Content-Type"] = "application/json"
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn.request(method, target, body=body, headers=hdrs)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def make_files(root, spec):
    for rel, data in spec.items():
        path = os.path.join(str(root), rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


@pytest.fixture
def tree(tmp_path):
    make_files(tmp_path, {"/raw/a.fits": b"A" * 1000, "/raw/b.fits": b"B" * 2000,
                          "/raw/c.fits": b"C" * 3000, "/raw/empty": b"",
                          "/raw/sub/d.fits": b"D" * 10})
    return tmp_path


@contextlib.contextmanager
def tape_server(root, **kwargs):
    """A started TapeServer on a stopped clock; no stand-in error at the end."""
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("clock", Clock(speed=0))
    with TapeServer(root, **kwargs) as tape:
        yield tape
    assert tape.errors == []


def stage(tape, paths, lifetime=None, expect=201):
    files = []
    for p in paths:
        item = {"path": p}
        if lifetime:
            item["diskLifetime"] = lifetime
        files.append(item)
    r = call(tape.api_url, "POST", "/stage", {"files": files})
    assert r.status == expect, r.raw
    return r


def status(tape, rid):
    r = call(tape.api_url, "GET", "/stage/" + rid)
    assert r.status == 200, r.raw
    return r.json


def by_path(doc):
    return {f["path"]: f for f in doc["files"]}


def states(doc):
    return {f["path"]: f["state"] for f in doc["files"]}


def propfind(tape, path, depth="0"):
    r = call(tape.url, "PROPFIND", path, PROPS, dict(AUTH, Depth=depth))
    assert r.status == 207, r.raw
    return r.raw.decode()


def is_problem(r, status):
    assert r.status == status, r.raw
    assert r.headers["Content-Type"] == "application/problem+json"
    doc = r.json
    assert doc["status"] == status and doc["title"]
    return doc


# ---------------------------------------------------------------- discovery, auth

def test_discovery_on_the_door_same_origin(tree):
    with tape_server(tree, sitename="site-x") as tape:
        r = call(tape.url, "GET", "/.well-known/wlcg-tape-rest-api", headers={})
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        assert r.json == {"sitename": "site-x", "description": r.json["description"],
                          "endpoints": [{"uri": tape.url + "/api/v1/tape", "version": "v1",
                                         "metadata": {}}]}
        assert stage(tape, ["/raw/a.fits"]).json["requestId"]
        assert {r.listener for r in tape.requests} == {"door"}


def test_api_on_another_origin(tree):
    with tape_server(tree, api_origin=True) as tape:
        uri = call(tape.url, "GET", "/.well-known/wlcg-tape-rest-api").json["endpoints"][0]["uri"]
        assert uri == tape.api_url
        assert urlsplit(uri).port != urlsplit(tape.url).port
        # the door has no API, the frontend has no WebDAV
        assert call(tape.url, "POST", "/api/v1/tape/stage",
                    {"files": [{"path": "/raw/a.fits"}]}).status == 404
        assert call(tape.api_origin_url, "PROPFIND", "/raw/a.fits", PROPS,
                    dict(AUTH, Depth="0")).status == 404
        r = stage(tape, ["/raw/a.fits"])
        assert r.headers["Location"] == uri + "/stage/" + r.json["requestId"]
        assert [r.status for r in tape.find(method="POST", listener="door")] == [404]
        assert [r.status for r in tape.find(method="POST", listener="api")] == [201]


def test_auth_required_everywhere_but_discovery(tree):
    with tape_server(tree) as tape:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            r = call(tape.api_url, "POST", "/stage", {"files": [{"path": "/raw/a.fits"}]},
                     headers=headers)
            is_problem(r, 401)
            r = call(tape.url, "PROPFIND", "/raw/a.fits", PROPS, dict(headers, Depth="0"))
            assert r.status == 401 and "Bearer" in r.headers["WWW-Authenticate"]
            assert call(tape.url, "GET", "/raw/a.fits", headers=headers).status == 401
        assert not any(r.authorized for r in tape.requests)
        assert not tape._stage_requests   # nothing was submitted


def test_records_redact_the_token_and_keep_bodies(tree):
    with tape_server(tree) as tape:
        stage(tape, ["/raw/a.fits"], lifetime="PT2H")
        rec = tape.find(method="POST")[0]
        assert rec.headers["authorization"] == "Bearer <redacted>"
        assert TOKEN not in repr(rec.headers)
        assert rec.json == {"files": [{"path": "/raw/a.fits", "diskLifetime": "PT2H"}]}
        assert rec.headers["content-type"] == "application/json" and rec.status == 201


# ---------------------------------------------------------------- stage states

def test_stage_states_follow_two_drives_in_submission_order(tree):
    with tape_server(tree, stage_seconds={"*": 10, "/raw/b.fits": 30}) as tape:
        t0 = tape.now()
        r = stage(tape, ["/raw/a.fits", "/raw/b.fits", "/raw/c.fits"])
        rid = r.json["requestId"]
        assert r.headers["Location"] == tape.api_url + "/stage/" + rid
        doc = status(tape, rid)
        assert doc["id"] == rid and doc["createdAt"] == int(t0)
        assert "completedAt" not in doc
        assert states(doc) == {"/raw/a.fits": "STARTED", "/raw/b.fits": "STARTED",
                               "/raw/c.fits": "SUBMITTED"}
        assert "startedAt" not in by_path(doc)["/raw/c.fits"]
        assert "finishedAt" not in by_path(doc)["/raw/a.fits"]
        tape.advance(10)   # a done, c takes its drive
        doc = status(tape, rid)
        assert states(doc) == {"/raw/a.fits": "COMPLETED", "/raw/b.fits": "STARTED",
                               "/raw/c.fits": "STARTED"}
        files = by_path(doc)
        assert files["/raw/a.fits"]["startedAt"] == int(t0)
        assert files["/raw/a.fits"]["finishedAt"] == int(t0 + 10)
        assert files["/raw/c.fits"]["startedAt"] == int(t0 + 10)
        tape.advance(10)
        assert states(status(tape, rid))["/raw/b.fits"] == "STARTED"
        tape.advance(10)
        doc = status(tape, rid)
        assert set(states(doc).values()) == {"COMPLETED"}
        assert doc["completedAt"] == int(t0 + 30) and doc["startedAt"] == int(t0)
        assert tape.makespan() == pytest.approx(30)
        assert [(r["path"], r["ok"]) for r in tape.recalls] == [
            ("/raw/a.fits", True), ("/raw/c.fits", True), ("/raw/b.fits", True)]


def test_files_already_on_disk_and_files_not_on_tape(tree):
    with tape_server(tree) as tape:
        tape.set_file("/raw/a.fits", locality="ONLINE_AND_NEARLINE")
        tape.set_file("/raw/b.fits", locality="ONLINE")
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits", "/raw/empty", "/raw/sub",
                           "/raw/missing", "/raw/c.fits"]).json["requestId"]
        files = by_path(status(tape, rid))
        assert files["/raw/a.fits"]["state"] == "COMPLETED"     # MUST NOT reject
        assert files["/raw/b.fits"]["state"] == "COMPLETED"
        for path in ("/raw/empty", "/raw/sub", "/raw/missing"):
            assert files[path]["state"] == "FAILED" and files[path]["error"]
            assert files[path]["startedAt"] == files[path]["finishedAt"]
        assert files["/raw/missing"]["error"] == "No such file or directory"
        assert "error" not in files["/raw/a.fits"]
        assert files["/raw/c.fits"]["state"] == "STARTED"
        assert tape.recalls == []


def test_file_lost_on_tape_fails_after_its_read(tree):
    with tape_server(tree, stage_seconds=5) as tape:
        tape.set_file("/raw/b.fits", locality="LOST")
        tape.set_file("/raw/c.fits", locality="UNAVAILABLE")
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits", "/raw/c.fits"]).json["requestId"]
        assert states(status(tape, rid))["/raw/b.fits"] == "STARTED"
        tape.advance(10)
        files = by_path(status(tape, rid))
        assert files["/raw/a.fits"]["state"] == "COMPLETED"
        assert files["/raw/b.fits"]["state"] == "FAILED"
        assert "lost" in files["/raw/b.fits"]["error"].lower()
        assert files["/raw/c.fits"]["state"] == "FAILED"
        assert "unavailable" in files["/raw/c.fits"]["error"].lower()
        info = call(tape.api_url, "POST", "/archiveinfo",
                    {"paths": ["/raw/b.fits", "/raw/c.fits"]}).json
        assert info == [{"path": "/raw/b.fits", "locality": "LOST"},
                        {"path": "/raw/c.fits", "locality": "UNAVAILABLE"}]
        assert "<srm:FileLocality>LOST</srm:FileLocality>" in propfind(tape, "/raw/b.fits")


def test_same_file_in_two_requests_is_read_once(tree):
    with tape_server(tree, stage_seconds=10) as tape:
        r1 = stage(tape, ["/raw/a.fits"]).json["requestId"]
        tape.advance(4)
        r2 = stage(tape, ["/raw/a.fits", "/raw/a.fits"]).json["requestId"]
        doc2 = status(tape, r2)
        assert len(doc2["files"]) == 1                     # duplicates merged
        assert doc2["files"][0]["state"] == "STARTED"
        tape.advance(6)
        assert status(tape, r1)["files"][0]["state"] == "COMPLETED"
        assert status(tape, r2)["files"][0]["finishedAt"] == status(tape, r1)["files"][0]["finishedAt"]
        assert len(tape.recalls) == 1
        # releasing for one request keeps the other one's pin
        assert call(tape.api_url, "POST", "/release/" + r1, {"paths": ["/raw/a.fits"]}).status == 200
        assert tape.locality("/raw/a.fits") == "ONLINE_AND_NEARLINE"
        assert call(tape.api_url, "POST", "/release/" + r2, {"paths": ["/raw/a.fits"]}).status == 200
        assert tape.locality("/raw/a.fits") == "NEARLINE"


# ---------------------------------------------------------------- locality, lifetime, release

def test_locality_follows_staging_and_disk_lifetime(tree):
    with tape_server(tree, stage_seconds=10) as tape:
        xml = propfind(tape, "/raw/a.fits")
        assert "<srm:FileLocality>NEARLINE</srm:FileLocality>" in xml
        assert "<srm:AccessLatency>NEARLINE</srm:AccessLatency>" in xml
        assert "<srm:RetentionPolicy>CUSTODIAL</srm:RetentionPolicy>" in xml
        assert "<d:getcontentlength>1000</d:getcontentlength>" in xml
        adler = "%08x" % (zlib.adler32(b"A" * 1000) & 0xFFFFFFFF)
        assert "<dc:Checksums>adler32=%s</dc:Checksums>" % adler in xml
        info = call(tape.api_url, "POST", "/archiveinfo", {"paths": ["/raw/a.fits"]})
        assert info.status == 200 and info.json == [{"path": "/raw/a.fits", "locality": "TAPE"}]

        stage(tape, ["/raw/a.fits"], lifetime="PT1H")
        tape.advance(10)
        assert "<srm:FileLocality>ONLINE_AND_NEARLINE</srm:FileLocality>" in propfind(
            tape, "/raw/a.fits")
        info = call(tape.api_url, "POST", "/archiveinfo", {"paths": ["/raw/a.fits"]}).json
        assert info == [{"path": "/raw/a.fits", "locality": "DISK_AND_TAPE"}]
        tape.advance(3599)
        assert tape.locality("/raw/a.fits") == "ONLINE_AND_NEARLINE"
        tape.advance(2)    # the pin of one hour has expired: evicted
        assert "<srm:FileLocality>NEARLINE</srm:FileLocality>" in propfind(tape, "/raw/a.fits")


def test_propfind_depth_one_and_props_a_directory_lacks(tree):
    with tape_server(tree) as tape:
        tape.set_file("/raw/b.fits", locality="ONLINE")
        xml = propfind(tape, "/raw/", depth="1")
        assert xml.count("<d:response>") == 6
        assert "<d:href>/raw/</d:href>" in xml and "<d:href>/raw/sub/</d:href>" in xml
        b = xml.split("<d:href>/raw/b.fits</d:href>")[1].split("</d:response>")[0]
        assert "<srm:FileLocality>ONLINE</srm:FileLocality>" in b
        assert "<srm:AccessLatency>ONLINE</srm:AccessLatency>" in b
        assert "<srm:RetentionPolicy>REPLICA</srm:RetentionPolicy>" in b
        empty = xml.split("<d:href>/raw/empty</d:href>")[1].split("</d:response>")[0]
        assert "<srm:FileLocality>NONE</srm:FileLocality>" in empty
        top = xml.split("<d:href>/raw/</d:href>")[1].split("</d:response>")[0]
        assert "HTTP/1.1 404 Not Found" in top and "<srm:FileLocality/>" in top
        assert call(tape.url, "PROPFIND", "/raw/", PROPS, AUTH).status == 403   # no Depth
        allprop = call(tape.url, "PROPFIND", "/raw/a.fits", None, dict(AUTH, Depth="0")).raw
        assert b"FileLocality" not in allprop and b"getcontentlength" in allprop


def test_release_evicts_but_keeps_the_state(tree):
    with tape_server(tree, stage_seconds=1) as tape:
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits"]).json["requestId"]
        tape.advance(1)
        assert tape.on_disk("/raw/a.fits") and tape.on_disk("/raw/b.fits")
        r = call(tape.api_url, "POST", "/release/" + rid, {"paths": ["/raw/a.fits"]})
        assert r.status == 200 and r.raw == b""
        assert tape.locality("/raw/a.fits") == "NEARLINE"
        assert tape.locality("/raw/b.fits") == "ONLINE_AND_NEARLINE"
        assert states(status(tape, rid)) == {"/raw/a.fits": "COMPLETED",
                                             "/raw/b.fits": "COMPLETED"}
        doc = is_problem(call(tape.api_url, "POST", "/release/" + rid,
                              {"paths": ["/raw/b.fits", "/raw/c.fits"]}), 400)
        assert "/raw/c.fits" in doc["detail"]
        assert tape.on_disk("/raw/b.fits")      # nothing done
        is_problem(call(tape.api_url, "POST", "/release/no-such-id",
                        {"paths": ["/raw/b.fits"]}), 404)


# ---------------------------------------------------------------- cancel, delete, expiry

def test_cancel_pending_files_and_free_the_drive(tree):
    with tape_server(tree, drives=1, stage_seconds=10) as tape:
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits", "/raw/c.fits"]).json["requestId"]
        tape.advance(3)
        before = status(tape, rid)
        doc = is_problem(call(tape.api_url, "POST", "/stage/%s/cancel" % rid,
                              {"paths": ["/raw/a.fits", "/raw/nope"]}), 400)
        assert doc["title"] == "File missing from stage request"
        assert "/raw/nope" in doc["detail"] and rid in doc["detail"]
        assert states(status(tape, rid)) == states(before)       # no action taken
        r = call(tape.api_url, "POST", "/stage/%s/cancel" % rid,
                 {"paths": ["/raw/a.fits", "/raw/b.fits"]})
        assert r.status == 200 and r.raw == b""
        files = by_path(status(tape, rid))
        assert files["/raw/a.fits"]["state"] == "CANCELLED"       # was STARTED
        assert files["/raw/b.fits"]["state"] == "CANCELLED"       # was SUBMITTED
        assert files["/raw/a.fits"]["finishedAt"] == files["/raw/c.fits"]["startedAt"]
        assert files["/raw/c.fits"]["state"] == "STARTED"          # got the freed drive
        tape.advance(10)
        doc = status(tape, rid)
        assert states(doc)["/raw/c.fits"] == "COMPLETED" and "completedAt" in doc
        assert [r["path"] for r in tape.recalls] == ["/raw/c.fits"]
        assert not tape.on_disk("/raw/a.fits")
        tape.cancelled_state = "CANCELED"
        assert states(status(tape, rid))["/raw/b.fits"] == "CANCELED"
        is_problem(call(tape.api_url, "POST", "/stage/nope/cancel",
                        {"paths": ["/raw/a.fits"]}), 404)


def test_cancel_of_a_completed_file_drops_its_pin(tree):
    with tape_server(tree, stage_seconds=1) as tape:
        rid = stage(tape, ["/raw/a.fits"]).json["requestId"]
        tape.advance(1)
        call(tape.api_url, "POST", "/stage/%s/cancel" % rid, {"paths": ["/raw/a.fits"]})
        assert states(status(tape, rid)) == {"/raw/a.fits": "COMPLETED"}
        assert tape.locality("/raw/a.fits") == "NEARLINE"


def test_delete_cancels_and_forgets(tree):
    with tape_server(tree, drives=1, stage_seconds=10) as tape:
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits"]).json["requestId"]
        r = call(tape.api_url, "DELETE", "/stage/" + rid)
        assert r.status == 200 and r.raw == b""
        is_problem(call(tape.api_url, "GET", "/stage/" + rid), 404)
        is_problem(call(tape.api_url, "DELETE", "/stage/" + rid), 404)
        tape.advance(30)
        assert tape.recalls == [] and not tape.on_disk("/raw/a.fits")


def test_request_expires(tree):
    with tape_server(tree, stage_seconds=10, request_ttl=600) as tape:
        rid = stage(tape, ["/raw/a.fits"]).json["requestId"]
        tape.advance(600)       # not expired: counted from completion (t+10)
        assert status(tape, rid)["completedAt"]
        tape.advance(10)
        doc = is_problem(call(tape.api_url, "GET", "/stage/" + rid), 404)
        assert rid in doc["detail"]
        other = stage(tape, ["/raw/b.fits"]).json["requestId"]
        tape.expire(other)
        is_problem(call(tape.api_url, "GET", "/stage/" + other), 404)
        is_problem(call(tape.api_url, "POST", "/release/" + rid, {"paths": ["/raw/a.fits"]}), 404)


# ---------------------------------------------------------------- answer shapes

def test_file_order_is_not_the_submission_order(tree):
    names = ["/raw/f%02d" % i for i in range(30)]
    make_files(tree, {n: b"x" for n in names})
    with tape_server(tree) as tape:
        rid = stage(tape, names).json["requestId"]
        orders = [[f["path"] for f in status(tape, rid)["files"]] for _ in range(3)]
        for order in orders:
            assert sorted(order) == names
        assert any(order != names for order in orders)
        tape.shuffle = False
        assert [f["path"] for f in status(tape, rid)["files"]] == names


def test_on_disk_mode_instead_of_state(tree):
    with tape_server(tree, stage_seconds=10, report="onDisk") as tape:
        tape.set_file("/raw/b.fits", locality="LOST")
        rid = stage(tape, ["/raw/a.fits", "/raw/b.fits", "/raw/missing"],
                    lifetime="PT100S").json["requestId"]
        doc = status(tape, rid)
        for f in doc["files"]:
            assert "state" not in f and "startedAt" not in f and "finishedAt" not in f
        assert by_path(doc)["/raw/a.fits"] == {"path": "/raw/a.fits", "onDisk": False}
        assert by_path(doc)["/raw/missing"]["error"] == "No such file or directory"
        tape.advance(10)
        files = by_path(status(tape, rid))
        assert files["/raw/a.fits"] == {"path": "/raw/a.fits", "onDisk": True}
        tape.advance(10)
        files = by_path(status(tape, rid))
        assert files["/raw/b.fits"]["onDisk"] is False and "lost" in files["/raw/b.fits"]["error"]
        tape.advance(100)       # evicted: onDisk follows the disk, a state would stay COMPLETED
        assert by_path(status(tape, rid))["/raw/a.fits"]["onDisk"] is False
        tape.report = "state"
        assert states(status(tape, rid))["/raw/a.fits"] == "COMPLETED"


def test_millisecond_timestamps(tree):
    with tape_server(tree, timestamps="ms", clock=Clock(speed=0, start=1700000000.5)) as tape:
        rid = stage(tape, ["/raw/a.fits"]).json["requestId"]
        assert status(tape, rid)["createdAt"] == 1700000000500


def test_archiveinfo_may_answer_for_some_paths_only(tree):
    with tape_server(tree, archiveinfo_limit=2) as tape:
        paths = ["/raw/a.fits", "/raw/b.fits", "/raw/c.fits", "/raw/nope"]
        r = call(tape.api_url, "POST", "/archiveinfo", {"paths": paths})
        assert r.status == 200 and len(r.json) == 2
        tape.archiveinfo_limit = None
        out = call(tape.api_url, "POST", "/archiveinfo", {"paths": paths}).json
        assert out[-1] == {"path": "/raw/nope", "error": "No such file or directory"}
        assert [o["path"] for o in out] == paths


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("route,body,detail", [
    ("/stage", b"{not json", "JSON"),
    ("/stage", {}, "files"),
    ("/stage", {"files": []}, "files"),
    ("/stage", {"files": "x"}, "files"),
    ("/stage", {"files": [{"diskLifetime": "PT1H"}]}, "path"),
    ("/stage", {"files": [{"path": 3}]}, "path"),
    ("/stage", {"files": [{"path": "/raw/a.fits", "diskLifetime": "1 hour"}]}, "diskLifetime"),
    ("/stage", {"files": [{"path": "/raw/a.fits", "diskLifetime": "P1M"}]}, "diskLifetime"),
    ("/archiveinfo", {"path": ["/raw/a.fits"]}, "paths"),
    ("/archiveinfo", [], "paths"),
])
def test_malformed_requests_get_400_problems(tree, route, body, detail):
    with tape_server(tree) as tape:
        if isinstance(body, bytes):
            r = call(tape.api_url, "POST", route, body,
                     dict(AUTH, **{"Content-Type": "application/json"}))
        else:
            r = call(tape.api_url, "POST", route, body)
        doc = is_problem(r, 400)
        assert detail in doc["detail"]
        assert not tape._stage_requests


def test_batch_limit_and_unknown_routes(tree):
    names = ["/raw/g%04d" % i for i in range(1001)]
    make_files(tree, {n: b"y" for n in names})
    with tape_server(tree) as tape:
        doc = is_problem(call(tape.api_url, "POST", "/stage",
                              {"files": [{"path": n} for n in names]}), 400)
        assert "1000" in doc["detail"]
        assert stage(tape, names[:1000]).status == 201
        is_problem(call(tape.api_url, "GET", "/stagex"), 404)
        is_problem(call(tape.api_url, "GET", "/stage/a/b/c"), 404)
        r = call(tape.api_url, "GET", "/stage")
        is_problem(r, 405)
        assert r.headers["Allow"] == "POST"
        is_problem(call(tape.api_url, "PUT", "/stage/x"), 405)


def test_parse_duration():
    assert parse_duration("PT1H") == 3600
    assert parse_duration("P1DT2H3M4.5S") == 93784.5
    assert parse_duration("pt90s") == 90
    for bad in ("P", "PT", "1H", "P1Y", "P1W", "PT-1S", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ---------------------------------------------------------------- path prefixes

def test_api_paths_differ_from_webdav_paths(tree):
    with tape_server(tree, dav_prefix="/pnfs/example.org/data", tape_prefix="/data",
                     stage_seconds=1) as tape:
        assert "<srm:FileLocality>NEARLINE</srm:FileLocality>" in propfind(
            tape, "/pnfs/example.org/data/raw/a.fits")
        assert call(tape.url, "PROPFIND", "/raw/a.fits", PROPS, dict(AUTH, Depth="0")).status == 404
        assert tape.dav_url("/raw/a.fits") == tape.url + "/pnfs/example.org/data/raw/a.fits"
        assert tape.api_name("/raw/a.fits") == "/data/raw/a.fits"
        rid = stage(tape, ["//data//raw/a.fits/", "/pnfs/example.org/data/raw/b.fits",
                           "/data/raw/a.fits"]).json["requestId"]
        files = by_path(status(tape, rid))
        assert set(files) == {"/data/raw/a.fits", "/pnfs/example.org/data/raw/b.fits"}
        assert files["/pnfs/example.org/data/raw/b.fits"]["error"] == "No such file or directory"
        tape.advance(1)
        assert files and states(status(tape, rid))["/data/raw/a.fits"] == "COMPLETED"
        xml = propfind(tape, "/pnfs/example.org/data/raw/", depth="1")
        assert "<d:href>/pnfs/example.org/data/raw/a.fits</d:href>" in xml
        out = call(tape.api_url, "POST", "/archiveinfo", {"paths": ["/data/raw/a.fits"]}).json
        assert out == [{"path": "/data/raw/a.fits", "locality": "DISK_AND_TAPE"}]
        r = call(tape.api_url, "POST", "/stage/%s/cancel" % rid, {"paths": ["/data//raw/a.fits"]})
        assert r.status == 200      # sanitised before matching


# ---------------------------------------------------------------- the door's GET

def test_get_of_a_tape_only_file_blocks_then_fails_and_is_recorded(tree):
    with tape_server(tree, nearline_get_timeout=0.3, stage_seconds=1) as tape:
        began = time.monotonic()
        r = call(tape.url, "GET", "/raw/a.fits")
        assert r.status == 503 and time.monotonic() - began >= 0.3
        head = call(tape.url, "HEAD", "/raw/a.fits")          # metadata: never blocks
        assert head.status == 200 and head.headers["Content-Length"] == "1000"
        gets = tape.tape_only_gets()
        assert [(g.path, g.locality, g.status) for g in gets] == [("/raw/a.fits", "NEARLINE", 503)]
        stage(tape, ["/raw/a.fits"])
        tape.advance(1)
        r = call(tape.url, "GET", "/raw/a.fits", headers=dict(AUTH, **{"Want-Digest": "adler32"}))
        assert r.status == 200 and r.raw == b"A" * 1000
        assert r.headers["Digest"] == "adler32=%08x" % (zlib.adler32(b"A" * 1000) & 0xFFFFFFFF)
        r = call(tape.url, "GET", "/raw/a.fits", headers=dict(AUTH, Range="bytes=10-19"))
        assert r.status == 206 and r.raw == b"A" * 10
        assert r.headers["Content-Range"] == "bytes 10-19/1000"
        assert call(tape.url, "GET", "/raw/a.fits",
                    headers=dict(AUTH, Range="bytes=5000-")).status == 416
        assert len(tape.tape_only_gets()) == 1
        assert call(tape.url, "GET", "/raw/empty").status == 200   # NONE: nothing to stage
        assert call(tape.url, "PUT", "/raw/a.fits", b"x").status == 405


def test_blocked_get_is_served_when_the_file_comes_online(tree):
    with tape_server(tree, nearline_get_timeout=5, stage_seconds=10) as tape:
        stage(tape, ["/raw/b.fits"])
        timer = threading.Timer(0.2, tape.advance, (10,))
        timer.start()
        try:
            began = time.monotonic()
            r = call(tape.url, "GET", "/raw/b.fits")
        finally:
            timer.join()
        assert r.status == 200 and r.raw == b"B" * 2000
        assert 0.15 < time.monotonic() - began < 4
        assert tape.tape_only_gets()[0].status == 200


# ---------------------------------------------------------------- makespan, speed

def test_makespan_of_100_files_on_two_drives_in_real_time(tmp_path):
    names = ["/run/f%03d" % i for i in range(100)]
    make_files(tmp_path, {n: b"z" * 100 for n in names})
    with TapeServer(tmp_path, token=TOKEN, drives=2, stage_seconds=1.0, speed=100) as tape:
        began = time.monotonic()
        rids = [stage(tape, names[:60]).json["requestId"], stage(tape, names[60:]).json["requestId"]]
        done_first = {}
        while time.monotonic() - began < 20:
            docs = [status(tape, rid) for rid in rids]
            for doc in docs:
                for f in doc["files"]:
                    if f["state"] == "COMPLETED":
                        done_first.setdefault(f["path"], time.monotonic() - began)
            if all("completedAt" in doc for doc in docs):
                break
            time.sleep(0.02)
        wall = time.monotonic() - began
        assert len(done_first) == 100
        # 100 reads of 1 s on 2 drives: 50 emulated s, 0.5 real s at speed 100
        assert tape.makespan() == pytest.approx(50, abs=0.1)
        assert tape.makespan(rids[:1]) == pytest.approx(30, abs=0.1)
        assert tape.makespan_wall() == pytest.approx(0.5, abs=0.01)
        assert tape.makespan_wall() * 0.9 <= wall < tape.makespan_wall() + 5
        # files come online in submission order, two at a time, one second apart
        assert [r["path"] for r in tape.recalls] == names
        start = tape.recalls[0]["start"]
        for i, r in enumerate(tape.recalls):
            assert r["end"] - start == pytest.approx(i // 2 + 1, abs=1e-6)
