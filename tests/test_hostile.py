"""Hostile servers: listings that try to make `get -r` write outside the
destination, XML with document type declarations, answers that try to make
us buffer without bound, terminal escapes, duplicate names, and a listing of
a million entries (streamed in bounded memory)."""

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from subprocess import PIPE

import pytest

import ctadata
from faultserver import FaultServer
from httpdouble import Listener

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tok-hostile-0123456789"


def multistatus(*responses):
    return ('<?xml version="1.0" encoding="utf-8"?>\n<d:multistatus xmlns:d="DAV:">%s'
            '</d:multistatus>' % "".join(responses)).encode()


def resp(href, size=None, collection=False):
    props = "<d:resourcetype>%s</d:resourcetype>" % ("<d:collection/>" if collection else "")
    if size is not None:
        props += "<d:getcontentlength>%d</d:getcontentlength>" % size
    return ("<d:response><d:href>%s</d:href><d:propstat><d:prop>%s</d:prop>"
            "<d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>" % (href, props))


def snapshot(root):
    """Every path below *root* (files, folders, links) with its size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[p] = os.lstat(p).st_size if name in filenames else None
    return out


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A dCache-like server whose /dir listing is replaced by a raw answer;
    the test runs from tmp/work and downloads into tmp/work/dest/."""
    root = tmp_path / "srv"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "ok.txt").write_bytes(b"the good file")
    (root / "escape.txt").write_bytes(b"must never be downloaded")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(str(work))
    monkeypatch.setenv("BEARER_TOKEN", TOKEN)
    with FaultServer(root, token=TOKEN) as srv:
        srv.tmp = tmp_path
        yield srv


# The list, plus variants: every href tries to name something outside
# /dir/ or a name that cannot be a safe local file name.
HOSTILE_HREFS = [
    "/dir/../escape.txt",                         # dot-dot
    "/dir/../../../../../../../tmp/escape.txt",   # dot-dot, far up
    "/escape.txt",                                # absolute, elsewhere on the server
    "/dir/%2e%2e/escape.txt",                     # encoded dot-dot
    "/dir/%2e%2e",                                # encoded dot-dot as the name
    "/dir/%2E%2E%2Fescape.txt",                   # encoded dot-dot + encoded slash
    "/dir/..%2fescape.txt",                       # name "../escape.txt"
    "/dir/%2Ftmp%2Fescape.txt",                   # name "/tmp/escape.txt" (absolute)
    "/dir/..%5cescape.txt",                       # backslash
    "/dir/a%5c..%5c..%5cescape.txt",              # backslashes, Windows-style climb
    "/dir/nul%00escape.txt",                      # NUL
    "/dir/sub%2fescape.txt",                      # "/" inside a name
    "/dir/.",                                     # the folder itself, once more
    "/dir/%2e",
    "/dir/sub/deeper.txt",                        # not a direct child
    "http://evil.example/dir/escape.txt",         # another host
    "//evil.example/dir/escape.txt",              # scheme-relative, another host
    "http://127.0.0.1:1/dir/escape.txt",          # same host, another port
    "https://127.0.0.1:{port}/dir/escape.txt",    # same host and port, other scheme
    "file:///etc/passwd",                         # not HTTP at all
    "/dir/%1b%5d0%3bpwned%07.txt",                # terminal escape in a name
    "/dir/line%0abreak.txt",                      # line break in a name
    "/dir/c1%c2%9bcsi.txt",                       # C1 control (CSI) in a name
]


@pytest.mark.parametrize("href", HOSTILE_HREFS)
def test_hostile_listing_writes_nothing_outside_the_destination(hostile, href, capsys):
    body = multistatus(resp("/dir/", collection=True),
                       resp(href.format(port=hostile.port), size=24),
                       resp(href.format(port=hostile.port) + "/", collection=True),
                       resp("/dir/ok.txt", size=13))
    hostile.add_fault("hostile_propfind", method="PROPFIND", path="/dir", times=None,
                      body=body)
    before = snapshot(hostile.tmp)
    code = ctadata.main(["--url", hostile.url, "--retries", "0", "get", "-r", "dir", "dest/"])
    err = capsys.readouterr().err
    assert code == 0, err
    after = snapshot(hostile.tmp)
    new = sorted(set(after) - set(before))
    dest = hostile.tmp / "work" / "dest"
    assert new == [str(dest), str(dest / "dir"), str(dest / "dir" / "ok.txt")]
    assert (dest / "dir" / "ok.txt").read_bytes() == b"the good file"
    if href != "/dir/.":  # that one resolves to the folder itself: harmless
        assert "skipping" in err               # said so
    assert "\x1b" not in err and "\x07" not in err
    assert hostile.count("GET", "/escape.txt") == 0


# One rule (ctadata._is_safe_name) for both listing parsers and for
# _safe_join: each name here is dropped by the WebDAV parser and by the
# download service's, with a warning that carries no control character, and
# _safe_join refuses it.
UNSAFE_NAMES = ["..", "a/b", "a\\b", "nul\x00x", "\x1b]0;pwned\x07.txt", "line\nbreak.txt",
                "c1\x9bcsi.txt", "\x1b[31mred", "del\x7f.txt", "tab\tx"]


def _parse_listing(parser, name):
    from urllib.parse import quote
    href, warnings = quote(name, safe=""), []
    if parser == "webdav":
        body = multistatus(resp("/dir/", collection=True), resp("/dir/" + href, size=1),
                           resp("/dir/ok.txt", size=1))
        entries = list(ctadata._parse_multistatus([body], "http://127.0.0.1/dir/",
                                                  "http://127.0.0.1", warn=warnings.append))
    else:
        items = [{"href": "dir/", "type": "directory"},
                 {"href": "dir/" + href, "type": "file", "size": 1},
                 {"href": "dir/ok.txt", "type": "file", "size": 1}]
        entries = ctadata._parse_service_listing(items, "http://127.0.0.1/s", "dir", None,
                                                 warnings.append)
    return entries, warnings


@pytest.mark.parametrize("parser", ["webdav", "service"])
@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_both_listing_parsers_refuse_the_same_unsafe_names(parser, name):
    entries, warnings = _parse_listing(parser, name)
    assert [e.name for e in entries] == ["ok.txt"]
    # ("..": the WebDAV parser resolves the href first: it is then outside /dir/)
    assert len(warnings) == 1 and ("unsafe" in warnings[0] or "outside" in warnings[0])
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for w in warnings for c in w)
    with pytest.raises(ctadata.ProtocolError, match="unsafe remote name"):
        ctadata._safe_join("dest", ["sub", name])


@pytest.mark.parametrize("parser", ["webdav", "service"])
@pytest.mark.parametrize("name", ["plain.txt", "with space", "été 日本.fits", "100%.bin",
                                  "hash#tag", "q?x", "nbsp\xa0x", "...", ".hidden"])
def test_both_listing_parsers_keep_the_same_odd_but_safe_names(parser, name):
    entries, warnings = _parse_listing(parser, name)
    assert sorted(e.name for e in entries) == sorted([name, "ok.txt"]) and not warnings
    assert ctadata._safe_join("dest", [name]) == os.path.join("dest", name)


def test_dtd_and_entities_are_refused_on_the_download_path(hostile, capsys):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;">]>'
            b'<d:multistatus xmlns:d="DAV:"><d:response><d:href>/dir/&c;</d:href>'
            b'</d:response></d:multistatus>')
    hostile.add_fault("hostile_propfind", method="PROPFIND", times=None, body=bomb)
    before = snapshot(hostile.tmp)
    assert ctadata.main(["--url", hostile.url, "get", "-r", "dir", "dest/"]) == 1
    assert "document type declaration" in capsys.readouterr().err
    assert snapshot(hostile.tmp) == before
    external = (b'<?xml version="1.0"?><!DOCTYPE m SYSTEM "file:///etc/passwd">'
                b'<d:multistatus xmlns:d="DAV:"/>')
    hostile.clear_faults()
    hostile.add_fault("hostile_propfind", method="PROPFIND", times=None, body=external)
    assert ctadata.main(["--url", hostile.url, "ls", "dir"]) == 1
    assert "document type declaration" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    (multistatus(resp("/dir/", collection=True), resp("/dir/" + "x" * 70000, size=1)),
     "text of more than"),
    (b'<d:multistatus xmlns:d="DAV:"><d:response>' + b" " * 200000, "text of more than"),
])
def test_listing_buffers_are_bounded(hostile, body, message):
    hostile.add_fault("hostile_propfind", method="PROPFIND", times=None, body=body)
    c = ctadata.Client(url=hostile.url, retries=0)
    with pytest.raises(ctadata.ProtocolError, match=message):
        c.ls("dir")


def test_deep_nesting_costs_no_python_memory(hostile):
    # the parser keeps no element stack of its own (expat's is in C, bounded by
    # the input); 100,000 levels are parsed and yield nothing
    body = (b'<d:multistatus xmlns:d="DAV:">' + b"<d:x>" * 100000 + b"</d:x>" * 100000
            + b"</d:multistatus>")
    hostile.add_fault("hostile_propfind", method="PROPFIND", times=None, body=body)
    c = ctadata.Client(url=hostile.url, retries=0)
    assert c.ls("dir") == []


def test_a_name_listed_twice_is_downloaded_once(hostile, capsys):
    body = multistatus(resp("/dir/", collection=True), resp("/dir/ok.txt", size=13),
                       resp("/dir/ok.txt", size=13), resp("/dir/ok.txt/", collection=True))
    hostile.add_fault("hostile_propfind", method="PROPFIND", path="/dir", times=None,
                      body=body)
    assert ctadata.main(["--url", hostile.url, "get", "-r", "dir", "dest/"]) == 0
    err = capsys.readouterr().err
    assert "second entry named 'ok.txt'" in err
    assert hostile.count("GET", "/dir/ok.txt") == 1
    assert (hostile.tmp / "work/dest/dir/ok.txt").read_bytes() == b"the good file"


def test_error_bodies_are_bounded_and_cannot_drive_the_terminal(hostile):
    c = ctadata.Client(url=hostile.url, retries=0)
    hostile.add_fault("status", status=500, body=b"\x1b[2J\x1b]0;owned\x07 oops\r\nFake: line")
    with pytest.raises(ctadata.RemoteError) as ei:
        c.stat("dir/ok.txt")
    assert "\x1b" not in str(ei.value) and "\x07" not in str(ei.value)
    assert "oops" in str(ei.value) and "\n" not in str(ei.value)
    hostile.add_fault("status", status=500, body=b"E" * (5 << 20))
    with pytest.raises(ctadata.RemoteError) as ei:
        c.stat("dir/ok.txt")
    assert len(str(ei.value)) < 400
    assert c.stat("dir/ok.txt").size == 13  # and the client still works


def test_identity_provider_answers_are_bounded(tmp_path):
    with FaultServer(tmp_path, token=None) as srv:
        oidc = ctadata._OIDC(ctadata.Settings(env={}, retries=0), ctadata._Secrets())
        srv.add_fault("status", status=200, times=None,
                      body=b'{"issuer": "' + b"x" * (2 << 20) + b'"}')
        with pytest.raises(ctadata.ProtocolError, match="larger than"):
            oidc.discover(srv.url + "/realms/x")
        srv.clear_faults()
        srv.add_fault("status", status=200, times=None, body=b"[1, 2, 3]")
        with pytest.raises(ctadata.ProtocolError, match="JSON object"):
            oidc.discover(srv.url + "/realms/x")
        srv.clear_faults()
        srv.add_fault("status", status=200, times=None, body=(
            b'{"device_authorization_endpoint": "http://evil.example/device",'
            b' "token_endpoint": "http://evil.example/token"}'))
        with pytest.raises(ctadata.ConfigError, match="only over https"):
            oidc.discover(srv.url + "/realms/x")


def test_listing_streams_with_one_chunk_of_lookahead():
    """The parser yields entries as their bytes arrive: however long the
    listing, it never holds more than one chunk's worth of entries."""
    per_chunk, chunks = 200, 100
    produced = [0]

    def body():
        yield b'<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">' + \
            resp("/dir/", collection=True).encode()
        for c in range(chunks):
            produced[0] += 1
            yield "".join(resp("/dir/f%07d" % (c * per_chunk + i), size=i)
                          for i in range(per_chunk)).encode()
        yield b"</d:multistatus>"

    n = 0
    for entry in ctadata._parse_multistatus(body(), "http://h/dir/"):
        assert produced[0] <= n // per_chunk + 1
        n += 1
    assert n == per_chunk * chunks


class _MillionHandler(http.server.BaseHTTPRequestHandler):
    """PROPFIND /big/: a generated chunked listing of ``server.entries`` files."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_PROPFIND(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(207)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        chunk(b'<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">'
              + resp("/big/", collection=True).encode())
        if self.headers.get("Depth") == "1":
            n, step = self.server.entries, 5000
            for start in range(0, n, step):
                chunk("".join(resp("/big/file-%07d.fits" % i, size=i)
                              for i in range(start, min(n, start + step))).encode())
        chunk(b"</d:multistatus>")
        self.wfile.write(b"0\r\n\r\n")


def _ls_unsorted_max_rss_mb(entries):
    """Run `ctadata ls -U big` in a child against a generated listing of
    *entries* files; return (its max RSS in MB, lines printed)."""
    srv = Listener(("127.0.0.1", 0), _MillionHandler)
    srv.entries = entries
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = ("import resource, sys, ctadata\n"
                "rc = ctadata.main(['--url', sys.argv[1], 'ls', '-U', 'big'])\n"
                "sys.stderr.write('maxrss_kb=%d\\n' % resource.getrusage("
                "resource.RUSAGE_SELF).ru_maxrss)\n"
                "sys.exit(rc)\n")
        r = subprocess.run([sys.executable, "-c", code, "http://127.0.0.1:%d"
                            % srv.server_address[1]], stdout=PIPE, stderr=PIPE,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
        assert r.returncode == 0, r.stderr
        return (int(r.stderr.decode().rpartition("maxrss_kb=")[2]) / 1024.0,
                r.stdout.count(b"\n"))
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.skipif(not os.environ.get("CTADATA_SLOW_TESTS"),
                    reason="about 35 s; set CTADATA_SLOW_TESTS=1")
def test_ls_unsorted_of_a_million_entries_in_bounded_memory():
    base, lines = _ls_unsorted_max_rss_mb(0)
    assert lines == 0
    rss, lines = _ls_unsorted_max_rss_mb(1000000)
    assert lines == 1000000
    print("ls -U: max RSS %.1f MB for an empty listing, %.1f MB for 1e6 entries"
          % (base, rss))
    assert rss - base < 16  # a few 1 MiB read buffers, not 1e6 entries


def test_a_listed_x_part_cannot_pollute_the_download_of_x(hostile, capsys):
    body = multistatus(resp("/dir/", collection=True), resp("/dir/ok.txt", size=13),
                       resp("/dir/ok.txt.part", size=13))
    hostile.add_fault("hostile_propfind", method="PROPFIND", path="/dir", times=None,
                      body=body)
    assert ctadata.main(["--url", hostile.url, "get", "-r", "dir", "dest/"]) == 0
    assert "clash with the partial download of 'ok.txt'" in capsys.readouterr().err
    assert (hostile.tmp / "work/dest/dir/ok.txt").read_bytes() == b"the good file"
    assert not (hostile.tmp / "work/dest/dir/ok.txt.part").exists()


def test_a_download_stops_at_the_announced_size(tmp_path):
    # a chunked body (no Content-Length) that runs past the listed size: what a
    # misbehaving proxy could send; the engine stops instead of filling the disk
    class Endless:
        def readinto(self, buf):
            buf[:4] = b"more"
            return 4
    with open(str(tmp_path / "f.part"), "wb") as f:
        with pytest.raises(ctadata.TransferError, match="more than the 10 bytes"):
            ctadata._copy_body(Endless(), f.write, ctadata._Hashers(()), None, None,
                               str(tmp_path / "f.part"), [0], 10)
    assert (tmp_path / "f.part").stat().st_size <= 12
