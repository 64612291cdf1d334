"""ctadata against XRootD 5.5's HTTP door: what XRootD does differently
from nginx/Apache (tests/test_xrootd.py pins it) and how the client copes.
The everyday commands run on XRootD too, through the ``dav`` fixture
(tests/test_dav.py, tests/test_everyday.py)."""

import os
import zlib

import pytest

import ctadata
from conftest import dav_target, make_tree, tree_digests

# what XRootD stores faithfully (tests/test_xrootd.py, /work/notes/xrootd-names.md)
GOOD_NAMES = ["with space.txt", "hash#tag.h5", "100%.bin", "lit%20eral.txt", "amp&semi;.txt",
              "quote'.txt", "[br]+eq=.txt", "été 日本.fits"]


@pytest.fixture
def xrd(request):
    yield from dav_target(request, "xrootd")


@pytest.fixture
def xclient(xrd):
    with ctadata.Client(url=xrd.url, token=xrd.token, retries=1, timeout=20,
                        ca_file=xrd.ca_file) as c:
        yield c


@pytest.fixture
def cli_x(xrd, monkeypatch, capsys):
    """ctadata.main in-process on the test's XRootD folder (token from
    $BEARER_TOKEN); returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("BEARER_TOKEN", xrd.token)

    def run(*argv):
        code = ctadata.main(["--url", xrd.url, "--ca-file", xrd.ca_file, "--retries", "0"]
                            + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_listing_odd_names(xclient, xrd):
    spec = {"odd names/" + n: n.encode() for n in GOOD_NAMES}
    spec["odd names/sub dir/x"] = b"x"
    make_tree(xrd.root, spec)
    xrd.grant_access(xrd.root)
    got = {e.name: e for e in xclient.ls("odd names")}
    assert sorted(got) == sorted(GOOD_NAMES + ["sub dir"])
    assert got["lit%20eral.txt"].size == len(b"lit%20eral.txt")
    assert xclient.stat("odd names/lit%20eral.txt").size == len(b"lit%20eral.txt")
    assert xclient.stat("odd names/sub dir").is_dir
    every = {e.path for e in xclient.ls("odd names", recursive=True)}
    assert "odd names/sub dir/x" in every and len(every) == len(GOOD_NAMES) + 2
    assert xclient.warnings == []


def test_a_name_with_a_question_mark_fails_alone_and_clearly(xrd, tmp_path, cli_x):
    # XRootD would store "question?.txt" as "question" and answer a GET of
    # "q?x.txt" with the file "q": such names fail, each on its own
    src = make_tree(tmp_path / "src", {"ok.txt": b"fine", "question?.txt": b"q",
                                       "sub/also ok.txt": b"ok", "odd?/f.txt": b"f"})
    code, out, err = cli_x("put", "-r", src, "up/")
    assert code == 1 and "2 failed" in err       # the file, and the folder (the tree goes on)
    assert "failed: %s: XRootD cannot store or find a name with \"?\"" % (
        src / "question?.txt") in err
    assert "failed: %s: XRootD cannot store" % (src / "odd?") in err
    assert sorted(p.name for p in (xrd.root / "up/src").iterdir()) == ["ok.txt", "sub"]
    assert tree_digests(xrd.root / "up/src") == {"ok.txt": tree_digests(src)["ok.txt"],
                                                  "sub/also ok.txt": tree_digests(src)[
                                                      "sub/also ok.txt"]}
    # made on the server's disk, listed, but not fetched under the wrong name
    make_tree(xrd.root, {"dl/q": b"not me", "dl/q?x.txt": b"me", "dl/plain": b"p",
                         "dl/q?d/x": b"x"})
    xrd.grant_access(xrd.root)
    code, out, err = cli_x("ls", "dl")
    assert out.split() == ["plain", "q", "q?d/", "q?x.txt"]
    code, out, err = cli_x("get", "-r", "dl", tmp_path / "out")
    assert code == 1 and "2 failed" in err and "q?x.txt" in err and "q?d" in err
    assert sorted(os.listdir(str(tmp_path / "out"))) == ["plain", "q"]
    code, out, err = cli_x("stat", "dl/q?x.txt")
    assert code == 2 and 'name with "?"' in err


def test_the_first_request_learns_it_is_xrootd(xrd, tmp_path):
    f = tmp_path / "why?.txt"
    f.write_bytes(b"w")
    c = ctadata.Client(url=xrd.url, token=xrd.token, ca_file=xrd.ca_file, env={}, retries=0)
    tr = c._transport
    assert tr._quirks is None
    with pytest.raises(ctadata.ConfigError, match="cannot store") as ei:
        tr.request("PUT", c.url_for("why?.txt"), body=b"w")
    assert ei.value.path == "why?.txt" and ei.value.path in str(ei.value)
    assert tr.quirks().server.startswith("XrootD/") and tr.quirks().cuts_at_query
    assert not (xrd.root / "why").exists()
    # a query of a URL given as it is is no name
    got = c.stat(c.url_for("") + "?authz=" + xrd.token)
    assert got.is_dir


def test_other_servers_keep_question_marks(client, dav):
    # nginx and Apache store "?" faithfully: no quirk, no refusal
    if dav.name == "xrootd":
        pytest.skip("XRootD cuts names at '?': test_a_name_with_a_question_mark...")
    client._transport.request("PUT", client.url_for("why?.txt"), body=b"w")
    assert (dav.root / "why?.txt").read_bytes() == b"w"
    assert not client._transport.quirks().cuts_at_query


def test_mv_keeps_odd_names_and_never_overwrites_unasked(xclient, xrd, cli_x):
    # XRootD takes MOVE's Destination without percent-decoding and ignores
    # "Overwrite: F": the client sends the name unencoded and checks first
    make_tree(xrd.root, {"m/a b#1.txt": b"1", "m/other": b"2", "m/d/x": b"x"})
    xrd.grant_access(xrd.root)
    xclient.move("m/a b#1.txt", "m/é x%20y.txt")
    assert (xrd.root / "m/é x%20y.txt").read_bytes() == b"1"
    assert not (xrd.root / "m/a b#1.txt").exists()
    with pytest.raises(ctadata.RemoteError) as ei:
        xclient.move("m/other", "m/é x%20y.txt")
    assert ei.value.status == 412 and "exists" in str(ei.value)
    assert (xrd.root / "m/é x%20y.txt").read_bytes() == b"1"
    assert (xrd.root / "m/other").read_bytes() == b"2"
    code, out, err = cli_x("mv", "m/other", "m/é x%20y.txt")
    assert code == 1 and "exists" in err and (xrd.root / "m/other").exists()
    code, out, err = cli_x("mv", "--overwrite", "m/other", "m/é x%20y.txt")
    assert code == 0 and (xrd.root / "m/é x%20y.txt").read_bytes() == b"2"
    xclient.move("m/d", "m/new dir")                         # a directory
    assert (xrd.root / "m/new dir/x").read_bytes() == b"x"
    xclient.move("m/é x%20y.txt", "m/new dir/")              # into a folder
    assert (xrd.root / "m/new dir/é x%20y.txt").exists()
    with pytest.raises(ctadata.ConfigError, match="cannot store"):
        xclient.move("m/new dir/x", "m/what?")
    assert (xrd.root / "m/new dir/x").exists() and not (xrd.root / "m/what").exists()


def test_rm_r_empties_folders_first(xclient, xrd, cli_x):
    # XRootD's DELETE of a folder is rmdir (500 "directory not empty")
    spec = {"t/" + n: b"1" for n in GOOD_NAMES}
    spec.update({"t/sub dir/" + n: b"2" for n in GOOD_NAMES})
    spec["t/sub dir/deeper #2/f"] = b"3"
    spec["t/empty/.keep"] = b""
    make_tree(xrd.root, spec)
    xrd.grant_access(xrd.root)
    code, out, err = cli_x("rm", "-r", "--dry-run", "t")
    assert code == 0 and (xrd.root / "t/sub dir/deeper #2/f").exists()
    code, out, err = cli_x("rm", "-r", "t")
    assert code == 0, err
    assert not (xrd.root / "t").exists()
    code, out, err = cli_x("rm", "t")
    assert code == 1 and "no such" in err.lower()


def test_mkdir_without_p_refuses_what_it_refuses_elsewhere(xclient, xrd, cli_x):
    # XRootD's MKCOL makes missing parents and accepts an existing folder
    xclient.mkdir("new dir#1")
    assert (xrd.root / "new dir#1").is_dir()
    with pytest.raises(ctadata.RemoteError) as ei:
        xclient.mkdir("new dir#1")
    assert ei.value.status == 405
    with pytest.raises(ctadata.RemoteError) as ei:
        xclient.mkdir("no/such/parent")
    assert ei.value.status == 409 and not (xrd.root / "no").exists()
    xclient.mkdir("new dir#1/child")
    xclient.mkdir("é/x y/%20", parents=True)
    assert (xrd.root / "é/x y/%20").is_dir()
    xclient.mkdir("é/x y/%20", parents=True)                   # -p: existing is fine
    (xrd.root / "afile").write_bytes(b"f")
    with pytest.raises(ctadata.RemoteError):
        xclient.mkdir("afile/sub", parents=True)
    # the same words as on other servers
    code, out, err = cli_x("mkdir", "new dir#1")
    assert code == 1 and "already exists: new dir#1" in err and "mkdir -p" in err
    code, out, err = cli_x("mkdir", "no/such")
    assert code == 1 and "no parent folder for no/such" in err and "-p" in err
    assert cli_x("mkdir", "-p", "no/such")[0] == 0 and (xrd.root / "no/such").is_dir()


def test_a_resumed_read_names_its_last_byte(xclient, xrd):
    # XRootD answers "Range: bytes=N-" with an empty 206 (tests/test_xrootd.py):
    # cat's resume after a dropped connection asks for "bytes=N-LAST"
    import io
    data = os.urandom(300000)
    make_tree(xrd.root, {"c/f é.bin": data})
    xrd.grant_access(xrd.root)
    entry = xclient.stat("c/f é.bin")
    out = io.BytesIO()
    out.write(data[:1000])
    state = {"written": 1000, "hashers": None, "sums": None, "version": (None, None)}
    ctadata._copy_attempt(xclient._transport, entry, out, state, None)
    assert out.getvalue() == data and state["written"] == len(data)


def test_403_without_a_token_says_where_it_looked(xrd, cli_x, monkeypatch):
    # XRootD answers 403, never 401, when credentials are missing or refused
    c = ctadata.Client(url=xrd.url, env={}, retries=0, ca_file=xrd.ca_file)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("")
    assert ei.value.status == 403 and "no token found; looked in" in str(ei.value)
    c = ctadata.Client(url=xrd.url, token="not-a-macaroon", env={}, retries=0,
                       ca_file=xrd.ca_file)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("")
    assert "refused" in str(ei.value) and "not-a-macaroon" not in str(ei.value)
    assert "token is valid" not in str(ei.value)     # nothing says it is valid
    assert ei.value.hint.startswith("the token from ")   # XRootD's 403 is its 401
    monkeypatch.delenv("BEARER_TOKEN")
    code, out, err = cli_x("ls")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "looked in" in err


def spy(client):
    """The (method, headers) of every request the client's transport sends
    from now on (a list that grows)."""
    sent = []
    tr = client._transport
    real = tr.request

    def request(method, url, headers=None, *args, **kw):
        sent.append((method, dict(headers or {})))
        return real(method, url, headers, *args, **kw)
    tr.request = request
    return sent


def test_get_of_a_part_file_starts_over(xclient, xrd, tmp_path):
    # XRootD 5.5 ignores If-Range and cannot be asked for checksums: a .part
    # cannot be checked, so it is not resumed (a stale one would go unseen)
    data = os.urandom(3 * 1024 * 1024 + 7)
    make_tree(xrd.root, {"r/big file.bin": data})
    xrd.grant_access(xrd.root)
    (tmp_path / "big file.bin.part").write_bytes(b"\0" * 1000000)   # stale bytes
    (r,) = xclient.download("r/big file.bin", str(tmp_path) + "/").results
    assert r.status == "transferred" and r.bytes == len(data)
    assert (tmp_path / "big file.bin").read_bytes() == data
    assert not xclient._transport.quirks().digests


def test_uploads_leave_xrootd_standing(xclient, xrd, tmp_path):
    # XRootD answers a PUT without a Digest, and asking it for the adler32 of
    # a file it has just written crashes XRootD 5.5: the client does not ask
    sent = spy(xclient)
    tree = make_tree(tmp_path / "tree", {"f%02d #.txt" % i: os.urandom(100 + i)
                                         for i in range(60)})
    tree.joinpath("big é.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    s = xclient.upload(str(tree), "up/", recursive=True, jobs=4)
    assert s.transferred == 61 and s.failed == 0
    assert tree_digests(xrd.root / "up/tree") == tree_digests(tree)
    assert xrd.server.alive()
    assert [m for m, h in sent if "Want-Digest" in h] == []
    assert len([m for m, h in sent if m == "PUT"]) == 61
    # what the client computes (for a manifest) is what XRootD computes later
    xclient._transport.record_sums = True
    (r,) = xclient.upload(str(tree / "f00 #.txt"), "up/one.txt").results
    assert r.checksums["adler32"] == xclient.checksum("up/one.txt")["adler32"]


def test_get_asks_xrootd_5_5_for_no_checksum_and_sum_does(xclient, xrd, tmp_path):
    data = os.urandom(100000)
    make_tree(xrd.root, {"d/f é.bin": data})
    xrd.grant_access(xrd.root)
    sent = spy(xclient)
    (r,) = xclient.download("d/f é.bin", str(tmp_path) + "/").results
    assert (tmp_path / "f é.bin").read_bytes() == data
    assert "adler32" not in r.checksums            # nothing to compare with
    assert ("GET", {}) in sent and [m for m, h in sent if "Want-Digest" in h] == []
    assert xclient.checksum("d/f é.bin") == {"adler32": "%08x" % zlib.adler32(data)}
    assert sent[-1] == ("HEAD", {"Want-Digest": "adler32,md5;q=0.5"})


@pytest.mark.parametrize("server,safe", [
    ("XrootD/v5.5.3", False), ("XrootD/v5.8.2", False), ("XrootD/v5.8.3", True),
    ("XrootD/v6.0.0", True), ("XrootD/v5.9.0-rc1", True), ("XrootD", False),
    ("XrootD/vunknown", False), ("nginx/1.22.1", True), ("", True)])
def test_which_xrootd_may_be_asked_for_checksums(server, safe):
    assert ctadata._Quirks(server).digests is safe


def test_get_r_of_many_new_files(xclient, xrd, tmp_path):
    # XRootD 5.5 computes the adler32 of a file it has not checksummed yet
    # in a job; a GET waiting for that job can fail or hang, and the server
    # can crash.  The client does not ask it for checksums (tests/servers.py).
    spec = {"many/d%d/f%02d é.bin" % (i % 3, i): os.urandom(200 + i) for i in range(90)}
    make_tree(xrd.root, spec)
    xrd.grant_access(xrd.root)
    s = xclient.download("many", str(tmp_path) + "/", recursive=True, jobs=4)
    assert s.transferred == 90 and s.failed == 0
    assert tree_digests(tmp_path / "many") == tree_digests(xrd.root / "many")
    assert xrd.server.alive()


def test_a_token_refused_with_403_is_looked_for_again(xrd, tmp_path, monkeypatch):
    # XRootD's 403 is its 401: a token file rewritten (by an agent) after
    # the first refusal is read again, and the request sent once more
    make_tree(xrd.root, {"d/f.txt": b"f"})
    xrd.grant_access(xrd.root)
    tok = tmp_path / "bt"
    tok.write_text("stale-token-of-yesterday\n")
    os.chmod(str(tok), 0o600)
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(tok))
    c = ctadata.Client(url=xrd.url, retries=0, ca_file=xrd.ca_file)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("d")
    assert ei.value.status == 403 and "was refused" in ei.value.hint
    tok.write_text(xrd.token + "\n")
    assert [e.name for e in c.ls("d")] == ["f.txt"]
