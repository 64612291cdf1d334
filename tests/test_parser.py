"""Layer 1: pure parsing, on multistatus XML captured from real servers (and
from dCache's documentation: tests/data/README.md) and on hand-made
dCache/StoRM/hostile answers.  No network."""

import json
from pathlib import Path

import pytest

import ctadata
from ctadata import _parse_multistatus, _parse_digest, _normpath, _should_retry, \
    _RetryPolicy, _safe_join, ProtocolError, ConfigError

DATA = Path(__file__).parent / "data"


def parse(xml, url="http://h:1/dir/", base="http://h:1", chunk=None, on_self=None,
          raw_hrefs=False):
    warnings = []
    body = xml if isinstance(xml, bytes) else xml.encode()
    chunks = [body] if chunk is None else [body[i:i + chunk] for i in range(0, len(body), chunk)]
    entries = list(_parse_multistatus(iter(chunks), url, base, on_self, warnings.append,
                                      raw_hrefs))
    return entries, warnings


def ms(*responses):
    return ('<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">%s</d:multistatus>'
            % "".join(responses))


def resp(href, size=None, collection=False, date="Mon, 11 May 2020 12:13:17 GMT",
         extra="", status="HTTP/1.1 200 OK"):
    rt = "<d:resourcetype><d:collection/></d:resourcetype>" if collection else "<d:resourcetype/>"
    size_xml = "<d:getcontentlength>%d</d:getcontentlength>" % size if size is not None else ""
    return ("<d:response><d:href>%s</d:href><d:propstat><d:prop>%s%s"
            "<d:getlastmodified>%s</d:getlastmodified>%s</d:prop>"
            "<d:status>%s</d:status></d:propstat></d:response>"
            % (href, rt, size_xml, date, extra, status))


@pytest.mark.parametrize("server", ["nginx", "apache"])
def test_captured_listing(server):
    xml = (DATA / ("propfind-%s.xml" % server)).read_bytes()
    selfs = []
    entries, warnings = parse(xml, "http://127.0.0.1:8080/dir/", "http://127.0.0.1:8080",
                              on_self=selfs.append)
    assert warnings == []
    by_name = {e.name: e for e in entries}
    assert sorted(by_name) == sorted(["a file.txt", "p%c#t.dat", "sub dir", "é日本.bin"])
    assert by_name["sub dir"].is_dir and by_name["sub dir"].size is None
    assert by_name["a file.txt"].size == 10 and not by_name["a file.txt"].is_dir
    assert by_name["a file.txt"].mtime == 1589199197
    assert by_name["a file.txt"].path == "dir/a file.txt"
    assert by_name["p%c#t.dat"].url == "http://127.0.0.1:8080/dir/p%25c%23t.dat"
    assert len(selfs) == 1 and selfs[0].is_dir and selfs[0].path == "dir"
    if server == "apache":
        assert by_name["a file.txt"].etag.strip('W/"')  # Apache sends ETags, nginx does not
        # the 404 propstat (Checksums, FileLocality) must not leak in
        assert by_name["a file.txt"].checksums == {} and by_name["a file.txt"].locality is None


# Captured from XRootD 5.5.3 by tests/data/capture_xrootd.py: hrefs are the
# names as they are (PROTOCOL.md §5), XML-escaped but not percent-encoded.
XROOTD = "https://127.0.0.1:1094"
XROOTD_NAMES = {"a file.txt": 10, "p%c#t.dat": 10, "sub dir": None, "é日本.bin": 10,
                "lit%20eral.txt": 7, "q?x.txt": 8, "semi;amp&.txt": 1, "[br]+eq=.txt": 1,
                "quote'.txt": 1, "lt<gt>.txt": 1}


@pytest.mark.parametrize("chunk", [None, 7])
def test_captured_xrootd_listing_takes_hrefs_as_they_are(chunk):
    xml = (DATA / "propfind-xrootd-depth1.xml").read_bytes()
    selfs = []
    entries, warnings = parse(xml, XROOTD + "/dir/", XROOTD, chunk=chunk,
                              on_self=selfs.append, raw_hrefs=True)
    assert warnings == []
    by_name = {e.name: e for e in entries}
    assert {n: e.size for n, e in by_name.items()} == XROOTD_NAMES
    assert by_name["sub dir"].is_dir and not by_name["a file.txt"].is_dir
    assert by_name["a file.txt"].mtime == 1589199197
    assert by_name["lit%20eral.txt"].path == "dir/lit%20eral.txt"   # not decoded
    # the URLs to ask for them are percent-encoded, each character once
    assert by_name["lit%20eral.txt"].url == XROOTD + "/dir/lit%2520eral.txt"
    assert by_name["p%c#t.dat"].url == XROOTD + "/dir/p%25c%23t.dat"
    assert by_name["q?x.txt"].url == XROOTD + "/dir/q%3Fx.txt"
    assert by_name["é日本.bin"].url == XROOTD + "/dir/%C3%A9%E6%97%A5%E6%9C%AC.bin"
    assert by_name["sub dir"].url == XROOTD + "/dir/sub%20dir"      # no slash
    assert len(selfs) == 1 and selfs[0].is_dir and selfs[0].path == "dir"


def test_unencoded_hrefs_are_recognised_without_being_told():
    # without knowing the server, an href with a space, "#", "?", unicode or
    # a lone "%" cannot be percent-encoded: taken as it is.  A literal "%20"
    # is ambiguous: only knowing the server is XRootD keeps it.
    xml = (DATA / "propfind-xrootd-depth1.xml").read_bytes()
    entries, warnings = parse(xml, XROOTD + "/dir/", XROOTD)
    names = sorted(e.name for e in entries)
    assert names == sorted(n if n != "lit%20eral.txt" else "lit eral.txt"
                           for n in XROOTD_NAMES)
    assert warnings == []


def test_captured_xrootd_collection_without_slash():
    # PROPFIND "/dir/sub%20dir" (no slash): XRootD's self href is "/dir/sub dir"
    for depth, children in (("1", ["inner.txt"]), ("0", [])):
        xml = (DATA / ("propfind-xrootd-depth%s-%s.xml" % (
            depth, "noslash" if depth == "1" else "dir"))).read_bytes()
        selfs = []
        entries, warnings = parse(xml, XROOTD + "/dir/sub%20dir", XROOTD,
                                  on_self=selfs.append, raw_hrefs=True)
        assert [e.name for e in entries] == children and warnings == []
        assert len(selfs) == 1 and selfs[0].is_dir and selfs[0].name == "sub dir"
        if children:
            assert entries[0].path == "dir/sub dir/inner.txt"
            assert entries[0].url == XROOTD + "/dir/sub%20dir/inner.txt"


def test_captured_xrootd_file_with_a_literal_percent_20():
    xml = (DATA / "propfind-xrootd-depth0-file.xml").read_bytes()
    selfs = []
    entries, _ = parse(xml, XROOTD + "/dir/lit%2520eral.txt", XROOTD,
                       on_self=selfs.append, raw_hrefs=True)
    assert entries == [] and len(selfs) == 1
    assert (selfs[0].name, selfs[0].size) == ("lit%20eral.txt", 7)


@pytest.mark.parametrize("href", [
    "/dir/../../etc/passwd",         # climbs out
    "/dir/..",                       # the parent
    "/dir/.",                        # itself under another name
    "/etc/passwd",                   # elsewhere
    "/dir/a\\b",                    # backslash
    "/dir/sub/deeper",               # not a direct child
    "/dir/sub dir/deeper",
    "http://other:1/dir/x",          # other origin
    "https://h:1/dir/x",             # other scheme
    "//other:1/dir/x",               # scheme-relative other host
    "dir/relative",                  # relative
    "/dir/c1&#x85;ctl",              # a C1 control character
    "/dir/del&#x7f;",                # DEL
    "/dir/esc&#x9b;[2J",             # CSI: a terminal escape
])
def test_hostile_raw_hrefs_are_skipped_with_a_warning(href):
    xml = ms(resp("/dir/", collection=True), resp(href, size=1), resp("/dir/ok", size=1))
    entries, warnings = parse(xml, raw_hrefs=True)
    assert [e.name for e in entries] == ["ok"]
    assert len(warnings) == 1


def test_raw_hrefs_may_be_full_urls_of_the_same_origin():
    xml = ms(resp("http://h:1/dir/", collection=True), resp("http://h:1/dir/a b", size=1))
    entries, warnings = parse(xml, raw_hrefs=True)
    assert [(e.name, e.url) for e in entries] == [("a b", "http://h:1/dir/a%20b")]


def test_streamed_in_tiny_chunks_gives_the_same_entries():
    xml = (DATA / "propfind-apache.xml").read_bytes()
    whole, _ = parse(xml, "http://127.0.0.1:8080/dir/")
    bytewise, _ = parse(xml, "http://127.0.0.1:8080/dir/", chunk=1)
    assert whole == bytewise and len(whole) == 4


def test_request_url_without_trailing_slash():
    # nginx answers a PROPFIND on "/dir" with a self href "/dir" (no slash)
    xml = ms(resp("/dir", collection=True), resp("/dir/f", size=3))
    entries, _ = parse(xml, "http://h:1/dir")
    assert [(e.name, e.path) for e in entries] == [("f", "dir/f")]


DCACHE = """<?xml version="1.0" encoding="UTF-8"?>
<d:multistatus xmlns:d="DAV:" xmlns:ns1="http://www.dcache.org/2013/webdav"
 xmlns:ns2="http://srm.lbl.gov/StorageResourceManager">
<d:response><d:href>/pnfs/cta/lst/</d:href>
 <d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype>
 <d:getlastmodified>Thu, 14 Nov 2024 10:00:00 GMT</d:getlastmodified></d:prop>
 <d:status>HTTP/1.1 200 OK</d:status></d:propstat>
 <d:propstat><d:prop><d:getcontentlength/><ns1:Checksums/></d:prop>
 <d:status>HTTP/1.1 404 Not Found</d:status></d:propstat></d:response>
<d:response><d:href>/pnfs/cta/lst/run.h5</d:href>
 <d:propstat><d:prop><d:resourcetype/><d:getcontentlength>1048576</d:getcontentlength>
 <d:getlastmodified>Thu, 14 Nov 2024 10:00:00 UTC</d:getlastmodified>
 <d:getetag>"0000C9A2_1731578400000"</d:getetag>
 <ns1:Checksums>adler32=5ae07809,md5=rFb0uPrFc5zNtFd30xO+zw==</ns1:Checksums>
 <ns2:FileLocality>NEARLINE</ns2:FileLocality></d:prop>
 <d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>
</d:multistatus>"""


def test_dcache_checksums_locality_and_utc_dates():
    entries, warnings = parse(DCACHE, "https://door:2880/pnfs/cta/lst/", "https://door:2880/pnfs/cta")
    assert warnings == []
    (e,) = entries
    assert e.path == "lst/run.h5" and e.size == 1048576
    assert e.checksums == {"adler32": "5ae07809", "md5": "ac56f4b8fac5739ccdb45777d313becf"}
    assert e.locality == "NEARLINE"
    assert e.etag == '"0000C9A2_1731578400000"'
    assert e.mtime == 1731578400


def test_dcache_answer_from_its_documentation():
    # dCache's own answer (tests/data/README.md): the prefixes are swapped
    # against the hand-made sample above (ns1 = SRM, ns2 = dCache), milton
    # declares namespaces nobody uses, and properties we did not ask for
    # (RetentionPolicy, AccessLatency) come along.
    xml = (DATA / "propfind-dcache-doc.xml").read_bytes()
    for chunk in (None, 7):
        selfs = []
        entries, warnings = parse(xml, "http://localhost:2880/disk/test-1447231167-1",
                                  "http://localhost:2880", chunk, on_self=selfs.append)
        assert entries == [] and warnings == []
        (e,) = selfs
        assert (e.name, e.path, e.is_dir) == ("test-1447231167-1", "disk/test-1447231167-1",
                                              False)
        assert e.checksums == {"adler32": "3b8711d6"} and e.locality == "ONLINE"
        assert e.size is None and e.mtime is None and e.etag is None
        assert e.url == "http://localhost:2880/disk/test-1447231167-1"


def test_storm_full_url_hrefs_and_other_hosts():
    xml = ms(resp("https://storm:8443/data/", collection=True),
             resp("https://storm:8443/data/f1", size=1),
             resp("https://evil.example/data/f2", size=1))
    entries, warnings = parse(xml, "https://storm:8443/data/", "https://storm:8443")
    assert [e.name for e in entries] == ["f1"]
    assert len(warnings) == 1 and "another host" in warnings[0]


@pytest.mark.parametrize("href", [
    "/dir/../../etc/passwd",         # resolves outside
    "/etc/passwd",                   # absolute elsewhere
    "/dir/%2e%2e",                   # encoded dot-dot
    "/dir/a%2Fb",                    # encoded slash inside a name
    "/dir/a%5Cb",                    # backslash
    "/dir/nul%00byte",               # NUL
    "/dir/sub/deeper",               # not a direct child
    "http://other:1/dir/x",          # other origin
    "//other:1/dir/x",               # scheme-relative other host
    "/dir/%2E",                      # encoded dot
])
def test_hostile_hrefs_are_skipped_with_a_warning(href):
    xml = ms(resp("/dir/", collection=True), resp(href, size=1), resp("/dir/ok", size=1))
    entries, warnings = parse(xml)
    assert [e.name for e in entries] == ["ok"]
    assert len(warnings) == 1


def test_dtd_and_entities_are_refused():
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
            '<d:multistatus xmlns:d="DAV:"><d:response><d:href>/dir/&lol2;</d:href>'
            '</d:response></d:multistatus>')
    with pytest.raises(ProtocolError, match="document type"):
        parse(bomb)
    ext = ('<?xml version="1.0"?><!DOCTYPE x SYSTEM "file:///etc/passwd">'
           '<d:multistatus xmlns:d="DAV:"/>')
    with pytest.raises(ProtocolError):
        parse(ext)


def test_malformed_xml_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="malformed"):
        parse("<d:multistatus xmlns:d='DAV:'><d:response>")


def test_unparsable_date_is_none_and_warned():
    xml = ms(resp("/dir/", collection=True), resp("/dir/f", size=1, date="yesterday-ish"))
    (e,), warnings = parse(xml)
    assert e.mtime is None  # not 1970
    assert len(warnings) == 1 and "yesterday-ish" in warnings[0]


def test_failed_propstat_is_ignored():
    xml = ms(resp("/dir/", collection=True),
             resp("/dir/f", size=5, status="HTTP/1.1 404 Not Found"))
    (e,), _ = parse(xml)
    assert e.size is None


def test_entry_to_dict_is_json_ready():
    xml = ms(resp("/dir/", collection=True), resp("/dir/f", size=5))
    (e,), _ = parse(xml)
    d = json.loads(json.dumps(e.to_dict()))
    assert d["type"] == "file" and d["size"] == 5 and d["mtime"] == "2020-05-11T12:13:17Z"


@pytest.mark.parametrize("header,expected", [
    ("adler32=5ae07809", {"adler32": "5ae07809"}),
    ("ADLER32=ABC", {"adler32": "00000abc"}),
    ("adler32=5ae07809,md5=rFb0uPrFc5zNtFd30xO+zw==",
     {"adler32": "5ae07809", "md5": "ac56f4b8fac5739ccdb45777d313becf"}),
    ("md5=AC56f4bae3c5ce5cd9b45dd3f313be3f", {"md5": "ac56f4bae3c5ce5cd9b45dd3f313be3f"}),
    ("sha-256=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
     {"sha-256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}),
    ("adler32=nothex!, md5=%%%", {}),
    ("", {}),
    (None, {}),
])
def test_parse_digest(header, expected):
    assert _parse_digest(header) == expected


@pytest.mark.parametrize("path,expected", [
    ("a/b/../c", "a/c"), ("./a//b/", "a/b/"), ("", ""), ("/lst/x", "lst/x"),
    ("a/./b", "a/b"),
])
def test_normpath(path, expected):
    assert _normpath(path) == expected


@pytest.mark.parametrize("path", ["..", "a/../../b", "/../etc"])
def test_normpath_refuses_climbing_above_root(path):
    with pytest.raises(ConfigError, match="above the storage root"):
        _normpath(path)


def test_retry_policy():
    p = _RetryPolicy(3, base=0.1, cap=1.0)
    assert _should_retry(p, 0, status=503) is not None
    assert _should_retry(p, 0, status=404) is None
    assert _should_retry(p, 0, status=401) is None
    assert _should_retry(p, 3, status=503) is None           # bounded
    assert _should_retry(p, 0, status=503, replayable=False) is None
    assert _should_retry(p, 0, status=429, retry_after="0.7") == pytest.approx(0.7, abs=0.11)
    assert _should_retry(p, 0, status=503, retry_after="3600") <= 1.0  # capped
    assert _should_retry(p, 0, exc=ConnectionResetError()) is not None
    assert _should_retry(p, 0, exc=ValueError()) is None
    delays = [_should_retry(p, 2, status=500) for _ in range(50)]
    assert all(0 <= d <= 0.4 for d in delays) and len(set(delays)) > 1  # jitter


@pytest.mark.parametrize("parts", [[".."], ["a", "..", ".."], ["a/b"], ["x\\y"], ["n\x00"], [""]])
def test_safe_join_refuses(tmp_path, parts):
    with pytest.raises(ProtocolError):
        _safe_join(str(tmp_path), parts)


def test_safe_join_ok(tmp_path):
    assert _safe_join(str(tmp_path), ["a", "é b"]) == str(tmp_path / "a" / "é b")


def test_lean_header_parser():
    import io
    raw = (b"Content-Length: 5\r\nDigest: adler32=01\r\nX-Folded: a\r\n  b\r\n"
           b"digest: md5=AAAA\r\nBroken line without colon\r\n\r\nbody")
    fp = io.BytesIO(raw)
    h = ctadata._Headers(ctadata._read_header_lines(fp))
    assert fp.read() == b"body"                       # stops at the blank line
    assert h.get("content-length") == "5" and h.get("CONTENT-LENGTH") == "5"
    assert h.get_all("Digest") == ["adler32=01", "md5=AAAA"]
    assert h.get("x-folded") == "a b"
    assert h.get("missing", "d") == "d" and "digest" in h and len(h) == 4


def test_header_parser_limits():
    import io
    import http.client
    with pytest.raises(http.client.HTTPException):
        ctadata._read_header_lines(io.BytesIO(b"".join(b"H%d: v\r\n" % i for i in range(101))))
    with pytest.raises(http.client.LineTooLong):
        ctadata._read_header_lines(io.BytesIO(b"X: " + b"a" * 70000 + b"\r\n\r\n"))


def test_safe_place_strips_queries_of_urls_only():
    assert ctadata._safe_place("https://u:p@h:1/a?authz=secret") == "https://h:1/a"
    assert ctadata._safe_place("/home/me/why?.txt") == "/home/me/why?.txt"   # a file name
    assert ctadata._safe_place("rel/what?#1") == "rel/what?#1"


@pytest.mark.parametrize("server,quirky", [
    ("XrootD/v5.5.3", True), ("XrootD", True), ("nginx/1.22.1", False),
    ("Apache/2.4.62 (Debian)", False), (None, False), ("dCache/9.2.0", False)])
def test_quirks_come_from_the_server_header_alone(server, quirky):
    q = ctadata._Quirks(server)
    assert (q.raw_hrefs, q.cuts_at_query) == (quirky, quirky)


def test_a_name_cut_at_a_question_mark_fails_that_folder_alone():
    err = ctadata._cut_name_error("a/what?/b")
    assert isinstance(err, ctadata.ConfigError) and err.path == "a/what?/b"
    assert 'name with "?"' in str(err) and "a/what?/b" in str(err)
    assert not ctadata._fails_everything(err)
    assert ctadata._fails_everything(ctadata.ConfigError("bad setting"))


def test_rel_parts_compares_paths_decoded():
    # nginx leaves "&", "'", ";", "[", "]", "+", "=" unencoded in hrefs;
    # Python's quote (url_for) encodes them: the same folder either way
    base = "http://h:1/t%20a%26b%27c%3Bd%5Be%5D%2Bf%3Dg/"
    url = "http://h:1/t%20a&b'c;d[e]+f=g/sub%20dir/x%23y"
    assert ctadata._rel_parts(base, url) == ["sub dir", "x#y"]
    assert ctadata._rel_path(base, url.rpartition("/")[0] + "/") == "sub dir"
    assert ctadata._rel_parts(base, "http://h:1/t%20a&b'c;d[e]+f=g/") == []
    assert ctadata._rel_parts(base, "http://h:1/t%20a&b'c;d[e]+f=g/a%2Fb") == ["a/b"]
    with pytest.raises(ctadata.ProtocolError):
        ctadata._rel_parts(base, "http://h:1/t%20a&b'c;d[e]+f=h/x")
    with pytest.raises(ctadata.ProtocolError):
        ctadata._rel_parts(base, "http://h:1/t%20a&b'c;d[e]+f=g%2Fx")   # not below it
