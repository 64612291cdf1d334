"""Layer 3: every everyday operation against real WebDAV servers (nginx with
dav-ext and Apache mod_dav, both requiring a bearer token), through the
Python API and through the CLI (ctadata.main in-process); and against XRootD
(the macaroon instance, tests/test_xrootd.py), which cannot store a "?"."""

import hashlib
import json
import os
import socket
import ssl
import zlib
from pathlib import Path

import pytest

import ctadata
from conftest import make_tree, tree_digests, ODD_NAMES


def odd_tree(root):
    spec = {}
    for i, name in enumerate(ODD_NAMES):
        spec[name] = os.urandom(100 + i)
        spec["sub dir/" + name] = os.urandom(2000 + i)
        spec["sub dir/déep#1/" + name] = os.urandom(3000 + i)
    spec["sub dir/déep#1/big.bin"] = os.urandom(3 * 1024 * 1024 + 7)
    return make_tree(root, spec)


def unstorable(dav, names):
    """The names this server cannot store faithfully: XRootD cuts a name at
    "?" (/work/notes/xrootd-names.md), so ctadata fails those files."""
    return {n for n in names if "?" in n} if dav.name == "xrootd" else set()


def test_put_r_then_get_r_round_trips_odd_names(client, dav, tmp_path):
    src = odd_tree(tmp_path / "src")
    want = tree_digests(src)
    bad = unstorable(dav, want)
    if bad:  # each fails alone, clearly; nothing is stored under another name
        with pytest.raises(ctadata.PartialFailure) as ei:
            client.upload_dir(str(src), "up/")
        summary = ei.value.summary
        failed = {os.path.relpath(r.source, str(src)) for r in summary.failures}
        assert failed == bad and summary.transferred == len(want) - len(bad)
        assert all('name with "?"' in r.error for r in summary.failures)
        for n in bad:
            (src / n).unlink()
            want.pop(n)
    else:
        summary = client.upload_dir(str(src), "up/")          # trailing slash: into
        assert summary.transferred == summary.files == len(want)
    assert tree_digests(dav.root / "up" / "src") == want   # on the server's disk

    out = tmp_path / "out"
    summary = client.download("up/src", str(out) + "/", recursive=True)
    assert summary.failed == 0 and summary.transferred == summary.files
    assert tree_digests(out / "src") == tree_digests(src)
    assert not list(out.rglob("*.part"))

    again = client.download("up/src", str(out) + "/", recursive=True)  # nothing to do
    assert again.skipped == again.files and again.bytes == 0


def test_ls_stat_and_list_dir(client, dav, tmp_path):
    make_tree(dav.root, {"d/a.txt": b"abc", "d/sub/b.txt": b"12345", "d/é x#.dat": b""})
    names = [e.name for e in client.ls("d")]
    assert names == sorted(["a.txt", "sub", "é x#.dat"])
    assert client.list_dir("d") == ["d/a.txt", "d/sub/", "d/é x#.dat"]
    every = {e.path: e for e in client.ls("d", recursive=True)}
    assert set(every) == {"d/a.txt", "d/sub", "d/sub/b.txt", "d/é x#.dat"}
    assert every["d/sub/b.txt"].size == 5
    st = client.stat("d/a.txt")
    assert (st.is_dir, st.size, st.name) == (False, 3, "a.txt")
    assert abs(st.mtime - os.stat(dav.root / "d/a.txt").st_mtime) < 2
    assert client.stat("d/sub").is_dir and client.stat("d/sub/").is_dir
    with pytest.raises(ctadata.NotFound):
        client.stat("d/missing")
    assert [e.name for e in client.ls("d/a.txt")] == ["a.txt"]   # a file lists itself


def test_names_only_listing_gives_the_same_names_and_types(client, dav, cli):
    # `ls` without -l asks for <resourcetype/> only: the real servers then
    # leave out sizes and dates, and the names and types are the same
    make_tree(dav.root, {"d/a.txt": b"abc", "d/sub/b.txt": b"12345", "d/é x#.dat": b"z"})
    full = client.ls("d", recursive=True)
    bare = client.ls("d", recursive=True, details=False)
    assert [(e.path, e.is_dir) for e in bare] == [(e.path, e.is_dir) for e in full]
    if dav.name != "xrootd":   # XRootD ignores the request body: it sends everything
        assert all(e.size is None and e.mtime is None for e in bare)
    assert {e.path: e.size for e in full if not e.is_dir} == {
        "d/a.txt": 3, "d/sub/b.txt": 5, "d/é x#.dat": 1}
    assert [e.name for e in client.iter_dir("d", details=False)] != []
    assert cli("ls", "d")[1] == "a.txt\nsub/\né x#.dat\n"
    assert cli("ls", "-U", "-R", "d")[1].count("\n") == 4
    assert cli("ls", "-l", "d")[1].split("\n")[0].split()[1] == "3"


def test_mkdir_rm_mv(client, dav):
    client.mkdir("x/y/z", parents=True)
    assert (dav.root / "x/y/z").is_dir()
    client.mkdir("x/y/z", parents=True)        # -p: existing is fine
    with pytest.raises(ctadata.RemoteError):
        client.mkdir("x/y/z")                  # without -p it is an error
    (dav.root / "x/y/z/f").write_bytes(b"data")
    client.move("x/y/z/f", "x/g")
    assert (dav.root / "x/g").read_bytes() == b"data" and not (dav.root / "x/y/z/f").exists()
    client.move("x/y", "x/renamed")
    assert (dav.root / "x/renamed/z").is_dir()
    client.move("x/g", "x/renamed/")           # trailing slash: into
    assert (dav.root / "x/renamed/g").exists()
    with pytest.raises(ctadata.ConfigError):
        client.remove("x")                     # a directory needs recursive
    client.remove("x/renamed/g")
    assert not (dav.root / "x/renamed/g").exists()
    client.remove("x", recursive=True)
    assert not (dav.root / "x").exists()
    with pytest.raises(ctadata.NotFound):
        client.remove("x")


def test_upload_file_rules(client, dav, tmp_path):
    f = tmp_path / "latest.txt"
    f.write_bytes(b"hello")
    assert client.upload_file(str(f), "your-folder/") == {
        "path": "your-folder/latest.txt", "status": "uploaded", "total_written": 5}
    assert (dav.root / "your-folder/latest.txt").read_bytes() == b"hello"
    r = client.upload_file(str(f), "your-folder/new-name.md")
    assert r["path"] == "your-folder/new-name.md"
    assert (dav.root / "your-folder/new-name.md").read_bytes() == b"hello"
    r = client.upload_file(str(f), "deep/er/still/f.txt")   # parents created (Apache: 409 -> mkdir)
    assert (dav.root / "deep/er/still/f.txt").read_bytes() == b"hello"
    with pytest.raises(ctadata.ConfigError):
        client.upload_file(str(tmp_path / "missing"), "x")


def test_upload_dir_without_slash_names_the_target(client, dav, tmp_path):
    src = make_tree(tmp_path / "results", {"a": b"1", "b/c": b"2"})
    client.upload_dir(str(src) + "/", "your-folder/results")
    assert tree_digests(dav.root / "your-folder/results") == tree_digests(src)
    client.upload_dir(str(src), "your-folder/results")   # re-run: same place, not nested
    assert not (dav.root / "your-folder/results/results").exists()


def test_fetch_functions_and_module_api(dav, tmp_path, monkeypatch):
    make_tree(dav.root, {"lst/x/file.h5": b"h5" * 1000, "lst/x/y/z.fits": b"fits"})
    monkeypatch.setenv("CTADATA_URL", dav.url)
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    if dav.ca_file:
        monkeypatch.setenv("X509_CERT_FILE", dav.ca_file)
    monkeypatch.chdir(tmp_path)
    assert ctadata.list_dir("lst/x") == ["lst/x/file.h5", "lst/x/y/"]
    assert ctadata.fetch_and_save_file("lst/x/file.h5") == 2000
    assert (tmp_path / "file.h5").read_bytes() == b"h5" * 1000
    assert ctadata.fetch_and_save_file("lst/x/file.h5", "other.h5") == 2000
    assert (tmp_path / "other.h5").exists()
    summary = ctadata.fetch_and_save_file_or_dir("lst/x", recursive=True)
    assert (tmp_path / "x/y/z.fits").read_bytes() == b"fits" and summary.files == 2
    from ctadata import direct
    assert direct.list_dir("lst/x/y") == ["lst/x/y/z.fits"]
    assert ctadata.direct.direct.list_dir is ctadata.list_dir
    assert ctadata.default_client().url == dav.url.rstrip("/")


def test_401_without_token_says_where_it_looked(dav, tmp_path):
    c = ctadata.Client(url=dav.url, env={}, retries=0, ca_file=dav.ca_file)
    with pytest.raises(ctadata.AuthError) as ei:
        c.list_dir("")
    msg = str(ei.value)
    assert ei.value.status == (403 if dav.name == "xrootd" else 401)  # XRootD: never 401
    assert "no token found" in msg and "$BEARER_TOKEN" in msg and "/tmp/bt_u" in msg
    bad = ctadata.Client(url=dav.url, token="wrong-token", env={}, retries=0,
                         ca_file=dav.ca_file)
    with pytest.raises(ctadata.AuthError) as ei:
        bad.list_dir("")
    assert "refused" in str(ei.value) and "wrong-token" not in str(ei.value)


# -- the CLI, in-process -------------------------------------------------------------

def test_cli_ls_variants(cli, dav):
    make_tree(dav.root, {"d/b.txt": b"12345", "d/a dir/c.txt": b"x", "d/#odd%.h5": b"12"})
    code, out, err = cli("ls", "d")
    assert code == 0 and out.splitlines() == ["#odd%.h5", "a dir/", "b.txt"]
    code, out, _ = cli("ls", "-l", "d")
    lines = out.splitlines()
    assert lines[0].startswith("- ") and lines[0].endswith(" #odd%.h5") and " 2 " in lines[0]
    assert lines[1].startswith("d ") and lines[1].endswith("a dir/")
    assert len({ln.index(ln.split()[2]) for ln in lines}) == 1  # aligned date column
    code, out, _ = cli("ls", "-R", "d")
    assert out.splitlines() == ["#odd%.h5", "a dir/", "a dir/c.txt", "b.txt"]
    code, out, _ = cli("ls", "-R", "--json", "d")
    doc = json.loads(out)
    assert {e["path"]: e["size"] for e in doc if e["type"] == "file"} == {
        "d/#odd%.h5": 2, "d/a dir/c.txt": 1, "d/b.txt": 5}
    code, out, _ = cli("ls", "-U", "d")
    assert sorted(out.splitlines()) == ["#odd%.h5", "a dir/", "b.txt"]
    code, out, _ = cli("ls", "-U", "--json", "d")
    assert len(json.loads(out)) == 3


def test_cli_get_put_mkdir_rm_mv_stat(cli, dav, tmp_path):
    src = odd_tree(tmp_path / "localdir")
    bad = unstorable(dav, tree_digests(src))
    code, out, err = cli("put", "-r", src, "your-folder/")
    assert code == (1 if bad else 0), err
    assert "%d failed" % len(bad) in err
    for n in bad:
        assert "failed: %s: XRootD cannot store" % (src / n) in err
        (src / n).unlink()
    assert tree_digests(dav.root / "your-folder/localdir") == tree_digests(src)
    code, out, err = cli("put", src / "plain.txt", "your-folder/")
    assert code == 0 and out.strip() == "your-folder/plain.txt"
    code, out, err = cli("get", "-r", "your-folder/localdir", tmp_path / "dl")
    assert code == 0, err
    assert tree_digests(tmp_path / "dl") == tree_digests(src)
    code, out, err = cli("get", "your-folder/plain.txt", str(tmp_path / "dl2") + "/")
    assert code == 0 and (tmp_path / "dl2/plain.txt").read_bytes() == (src / "plain.txt").read_bytes()
    code, out, err = cli("mkdir", "-p", "a/b/c")
    assert code == 0 and (dav.root / "a/b/c").is_dir()
    code, out, err = cli("mv", "your-folder/plain.txt", "a/b/c/")
    assert code == 0 and (dav.root / "a/b/c/plain.txt").exists()
    code, out, err = cli("stat", "a/b/c/plain.txt")
    assert code == 0 and "size:" in out and str((src / "plain.txt").stat().st_size) in out
    code, out, err = cli("stat", "--json", "a/b/c")
    assert json.loads(out)["type"] == "directory"
    code, out, err = cli("rm", "a")
    assert code == 2 and "is a directory" in err
    code, out, err = cli("rm", "-r", "a")
    assert code == 0 and not (dav.root / "a").exists()
    code, out, err = cli("stat", "a")
    assert code == 1 and err.startswith("ctadata: error:") and len(err.splitlines()) == 1


def test_cli_get_reports_failures_and_exit_code(cli, dav, tmp_path):
    make_tree(dav.root, {"d/ok.txt": b"fine", "d/blocked.txt": b"x"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out/d").mkdir()
    (tmp_path / "out/d/blocked.txt.part").mkdir()   # cannot be written locally
    code, out, err = cli("get", "-r", "d", str(tmp_path / "out") + "/")
    assert code == 1
    assert "blocked.txt" in err and "1 failed" in err
    assert (tmp_path / "out/d/ok.txt").read_bytes() == b"fine"   # the others go on


def test_cli_no_token_401_one_line(dav, monkeypatch, capsys):
    monkeypatch.delenv("BEARER_TOKEN", raising=False)
    tls = ["--ca-file", dav.ca_file] if dav.ca_file else []
    code = ctadata.main(["--url", dav.url, "--retries", "0"] + tls + ["ls"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "looked in" in err


def test_tls_verified_by_default(nginx_tls_server, tmp_path):
    srv = nginx_tls_server
    (srv.root / "tls.txt").write_bytes(b"secure")
    ok = ctadata.Client(url=srv.url, token=srv.token, ca_file=srv.ca_file, env={})
    assert ok.stat("tls.txt").size == 6
    assert ok.fetch_and_save_file("tls.txt", str(tmp_path / "t")) == 6
    untrusted = ctadata.Client(url=srv.url, token=srv.token, env={}, retries=0)
    with pytest.raises(ctadata.TransferError, match="certificate verification failed"):
        untrusted.stat("tls.txt")


def test_a_certificate_for_another_host_is_a_verification_failure(nginx_tls_server):
    # what the handshake raises differs by version (3.6: ssl.CertificateError,
    # a ValueError; 3.7+: ssl.SSLCertVerificationError): both are final, and
    # both say that the certificate is the problem
    ctx = ssl.create_default_context(cafile=nginx_tls_server.ca_file)
    with socket.create_connection(("127.0.0.1", nginx_tls_server.port), timeout=10) as raw:
        with pytest.raises(Exception) as ei:
            ctx.wrap_socket(raw, server_hostname="example.org")
    assert not ctadata._is_transient(ei.value)
    err = ctadata._network_error(ei.value, "https://example.org/x", "list")
    assert "certificate verification failed" in str(err) and "--ca-file" in err.hint


def test_a_large_first_upload_is_hashed_only_when_the_answer_can_confirm_it(
        client, dav, tmp_path):
    # nginx and Apache send no Digest: a file over 1 MiB is not hashed at
    # all (no adler32 on the sending thread), unless a manifest wants it
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    r = client.upload(str(src), "big.bin").results[0]
    assert r.status == "transferred" and "adler32" not in r.checksums
    assert (dav.root / "big.bin").read_bytes() == src.read_bytes()
    client._transport.record_sums = True
    r = client.upload(str(src), "big2.bin").results[0]
    assert r.checksums["adler32"] == "%08x" % zlib.adler32(src.read_bytes())


def test_uploads_stop_hashing_once_the_server_shows_it_sends_no_digest(client, dav, tmp_path):
    # nginx and Apache answer a PUT without a Digest: after the first upload
    # there is nothing to compare an adler32 with, so none is computed (small
    # files still carry Content-MD5, computed from memory)
    src = make_tree(tmp_path / "s", {"a": b"1" * 10, "b": b"2" * 10, "c": b"3" * 10})
    s = client.upload(str(src), "up", recursive=True, jobs=1)
    sums = [r.checksums for r in s.results]
    assert sums[0].get("adler32") and all("adler32" not in x for x in sums[1:])
    assert client._transport.put_digests is False


def test_cli_sum_and_du(cli, dav):
    data = os.urandom(5000)
    make_tree(dav.root, {"s/f é#1.bin": data, "s/sub/g": b"12"})
    code, out, err = cli("sum", "s/f é#1.bin")
    if dav.name == "xrootd":    # the only one of these that computes checksums
        assert code == 0 and out == "adler32 %08x\n" % zlib.adler32(data)
    else:
        assert code == 1 and "no known checksum" in err
    code, out, err = cli("du", "--json", "s")
    doc = json.loads(out)
    assert (doc["files"], doc["dirs"], doc["bytes"]) == (2, 1, 5002)


# Every character that trips a client that does not percent-encode (or
# decodes twice): space, "#", "%", a literal "%20", "&", "'", ";", "[]", "+",
# "=", unicode.  ("?" is apart: XRootD cannot store it, see below.)
HARD = "a b#c%d&e'f;g[h]i+j=k é日本 %20"


def test_every_command_with_hard_names(cli, dav, tmp_path):
    d, f = "dir " + HARD, "file " + HARD + ".txt"
    src = make_tree(tmp_path / ("src " + HARD), {
        f: b"one", d + "/" + f: b"two", d + "/" + d + "/" + f: b"three"})
    top = dav.root / ("top " + HARD)
    # put, put -r
    code, out, err = cli("put", src / f, "top " + HARD + "/")
    assert code == 0, err
    assert out.strip() == "top %s/%s" % (HARD, f) and (top / f).read_bytes() == b"one"
    code, out, err = cli("put", "-r", src, "top " + HARD + "/")
    assert code == 0 and "3 transferred" in err, err
    assert tree_digests(top / src.name) == tree_digests(src)
    # ls, ls -l, ls -R, ls --json, stat
    remote = "top %s/%s" % (HARD, src.name)
    code, out, err = cli("ls", remote)
    assert (code, out.splitlines()) == (0, [d + "/", f]), err
    code, out, err = cli("ls", "-l", remote)
    assert code == 0 and out.splitlines()[1].endswith(" " + f) and " 3 " in out.splitlines()[1]
    code, out, err = cli("ls", "-R", remote)
    assert out.splitlines() == [d + "/", d + "/" + d + "/", d + "/" + d + "/" + f,
                                d + "/" + f, f]
    code, out, err = cli("ls", "--json", remote + "/" + d)
    assert sorted(e["name"] for e in json.loads(out)) == sorted([d, f])
    code, out, err = cli("stat", "--json", remote + "/" + d + "/" + f)
    assert code == 0 and json.loads(out)["size"] == 3 and json.loads(out)["name"] == f
    # get, get -r
    code, out, err = cli("get", remote + "/" + f, str(tmp_path / ("one " + HARD)) + "/")
    assert code == 0 and (tmp_path / ("one " + HARD) / f).read_bytes() == b"one", err
    code, out, err = cli("get", "-r", remote, tmp_path / "back")
    assert code == 0 and tree_digests(tmp_path / "back") == tree_digests(src), err
    # sum (only XRootD computes checksums of these three), du
    code, out, err = cli("sum", remote + "/" + f)
    if dav.name == "xrootd":
        assert code == 0 and out == "adler32 %08x\n" % zlib.adler32(b"one")
    else:
        assert code == 1 and "no known checksum" in err
    code, out, err = cli("du", "--json", remote)
    assert (json.loads(out)["files"], json.loads(out)["bytes"]) == (3, 11)
    # mkdir, mkdir -p
    code, out, err = cli("mkdir", "-p", remote + "/new " + HARD + "/deeper " + HARD)
    assert code == 0 and (top / src.name / ("new " + HARD) / ("deeper " + HARD)).is_dir()
    code, out, err = cli("mkdir", remote + "/new " + HARD + "/deeper " + HARD)
    assert code == 1 and "already exists" in err
    code, out, err = cli("mkdir", remote + "/new " + HARD + "/x/y")
    assert code == 1 and "no parent folder" in err
    # mv: a file into a folder, a folder to a new name, a refused overwrite
    code, out, err = cli("mv", remote + "/" + f, remote + "/new " + HARD + "/")
    assert code == 0 and (top / src.name / ("new " + HARD) / f).read_bytes() == b"one", err
    code, out, err = cli("mv", remote + "/" + d, remote + "/moved " + HARD)
    assert code == 0 and (top / src.name / ("moved " + HARD) / d / f).read_bytes() == b"three"
    code, out, err = cli("mv", remote + "/moved " + HARD + "/" + f, remote + "/new " + HARD
                         + "/" + f)
    assert code == 1 and "exists already" in err
    assert (top / src.name / ("new " + HARD) / f).read_bytes() == b"one"
    # rm, rm -r
    code, out, err = cli("rm", remote + "/new " + HARD + "/" + f)
    assert code == 0 and not (top / src.name / ("new " + HARD) / f).exists()
    code, out, err = cli("rm", "-r", "top " + HARD)
    assert code == 0 and not top.exists(), err
    assert [p.name for p in dav.root.iterdir()] == []


def test_a_question_mark_is_kept_or_refused_never_cut(cli, dav, tmp_path):
    # nginx and Apache store "?" like any character; XRootD cuts a name
    # there (even sent as %3F): each command refuses it, nothing is cut
    src = make_tree(tmp_path / "src", {"what?.txt": b"w", "d?/f": b"f", "ok": b"k"})
    runs = [cli("put", src / "what?.txt", "q/"), cli("put", "-r", src, "q/"),
            cli("mkdir", "-p", "q/new?"), cli("stat", "q/what?.txt")]
    codes = [r[0] for r in runs]
    if dav.name == "xrootd":
        # one name: a usage error (2); in a tree: that file and that folder fail
        assert codes == [2, 1, 2, 2]
        for _code, _out, err in runs:
            assert 'XRootD cannot store or find a name with "?" in it' in err
        assert "2 failed" in runs[1][2] and "1 transferred" in runs[1][2]
        assert sorted(str(p.relative_to(dav.root)) for p in dav.root.rglob("*")) == [
            "q", "q/src", "q/src/ok"]                       # nothing cut at the "?"
    else:
        assert codes == [0, 0, 0, 0]
        assert (dav.root / "q/what?.txt").read_bytes() == b"w"
        assert (dav.root / "q/src/d?/f").read_bytes() == b"f"
        assert (dav.root / "q/new?").is_dir()
        code, out, err = cli("mv", "q/what?.txt", "q/new?/")
        assert code == 0 and (dav.root / "q/new?/what?.txt").exists()
        code, out, err = cli("rm", "-r", "q")
        assert code == 0 and not (dav.root / "q").exists()
