"""Things a user tripped over (issue 14 part 4) and the old client's API,
exactly (part 5): each case as a user meets it, against real nginx and
Apache where the server's answer matters, ctadata serve and the download
service double (tests/dsserver.py) elsewhere, the CLI in-process."""

import logging
import os
import time
from pathlib import Path

import pytest

import ctadata
from conftest import HUB_TOKEN, make_tree


# -- errors in plain words ------------------------------------------------------------

def test_mkdir_mv_and_404_say_what_happened(cli, dav, tmp_path):
    make_tree(dav.root, {"d/f.txt": b"f", "d/g.txt": b"g"})
    code, _, err = cli("mkdir", "d")
    assert code == 1 and err.startswith("ctadata: error: mkdir: already exists: d ("), err
    assert "mkdir -p accepts an existing folder" in err
    code, _, err = cli("mkdir", "a/b/c")
    assert code == 1 and "mkdir: no parent folder for a/b/c" in err and "use -p" in err, err
    code, _, err = cli("mv", "d/f.txt", "d/g.txt")
    assert code == 1 and "mv: the destination of d/f.txt exists already" in err, err
    assert "use --overwrite" in err
    assert (dav.root / "d/g.txt").read_bytes() == b"g"
    for argv, verb in ((("get", "nope.h5"), "get"), (("ls", "d/nope"), "ls"),
                       (("rm", "d/nope"), "rm"), (("stat", "nope"), "stat"),
                       (("ls", "-R", "nope/"), "ls"), (("du", "nope"), "du")):
        code, _, err = cli(*argv)
        assert code == 1, err
        assert err.startswith("ctadata: error: %s: no such file or folder: %s (" % (
            verb, argv[-1].rstrip("/"))), err
        assert "list" not in err.split("(")[0]
    # in Python: the same words, the Python hint
    c = ctadata.Client(url=dav.url, token=dav.token, retries=0)
    with pytest.raises(ctadata.NotFound) as ei:
        c.download("d/nope")
    assert ei.value.path == "d/nope" and str(ei.value).startswith("no such file or folder: ")
    with pytest.raises(ctadata.RemoteError) as ei:
        c.mkdir("d")
    assert ei.value.status == 405 and "parents=True" in str(ei.value)
    c.mkdir("d", parents=True)   # an existing folder is fine with parents


def test_move_into_a_missing_folder(tmp_path, capsys, monkeypatch):
    """RFC 4918 §9.9.4: 409 (as dCache and ctadata serve answer; nginx makes
    the folders, Apache answers 500)."""
    make_tree(tmp_path / "srv", {"d/f.txt": b"f"})
    with ctadata.serve(str(tmp_path / "srv"), token="tok-mv") as srv:
        monkeypatch.setenv("BEARER_TOKEN", "tok-mv")
        assert ctadata.main(["--url", srv.url, "mv", "d/f.txt", "nowhere/f.txt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctadata: error: mv: no folder for the destination of d/f.txt ("), err
    assert err.endswith("; make that folder first (mkdir -p)\n")


def test_is_a_directory_names_the_option_of_each_world(cli, dav, tmp_path):
    make_tree(dav.root, {"d/f.txt": b"f"})
    code, _, err = cli("get", "d", str(tmp_path) + "/")
    assert code == 2 and err == "ctadata: error: d is a directory; use get -r\n"
    code, _, err = cli("rm", "d")
    assert code == 2 and err.endswith("use rm -r\n") and (dav.root / "d").is_dir()
    (tmp_path / "up").mkdir()
    code, _, err = cli("put", tmp_path / "up", "x/")
    assert code == 2 and err.endswith("use put -r\n"), err
    c = ctadata.Client(url=dav.url, token=dav.token, retries=0)
    with pytest.raises(ctadata.ConfigError) as ei:
        c.download("d")
    assert str(ei.value) == "d is a directory; use recursive=True"


def test_get_of_a_local_path_suggests_put(cli, dav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("results.txt").write_text("mine")
    code, _, err = cli("get", "results.txt", "somewhere/")
    assert code == 1 and "no such file or folder: results.txt" in err
    assert "results.txt is a local file: did you mean put?" in err, err


# -- the token and where it goes ----------------------------------------------------------

def test_a_url_on_another_host_says_the_token_was_not_sent(nginx_server, tmp_path, capsys,
                                                             monkeypatch):
    (tmp_path / "srv").mkdir()
    with ctadata.serve(str(tmp_path / "srv"), token="tok-here") as srv:
        monkeypatch.setenv("BEARER_TOKEN", "tok-here")
        other = nginx_server.url + "/"
        port = int(nginx_server.url.rsplit(":", 1)[1])
        assert ctadata.main(["--url", srv.url, "ls", other]) == 1
        err = capsys.readouterr().err
        assert "HTTP 401" in err and err.rstrip().endswith(
            "; token not sent: 127.0.0.1:%d is not the storage URL (--url)" % port), err
        assert "tok-here" not in err and "refused" not in err
        c = ctadata.Client(url=srv.url, retries=0)
        with pytest.raises(ctadata.AuthError) as ei:
            c.ls(other)
        assert ei.value.hint == "token not sent: 127.0.0.1:%d is not the storage URL (--url)" \
            % port
        assert [r for r in srv.requests] == []       # nothing went to the storage itself


def _private(path, text):
    Path(path).write_text(text)
    os.chmod(str(path), 0o600)
    return str(path)


def test_a_token_set_after_the_first_call_is_found(dav, monkeypatch, tmp_path):
    """A notebook: the first call fails (no token), then the user sets
    $BEARER_TOKEN; the same Client (and the module functions) find it."""
    make_tree(dav.root, {"d/f.txt": b"f"})
    c = ctadata.Client(url=dav.url, retries=0)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("d")
    assert ei.value.status == (403 if dav.name == "xrootd" else 401)   # XRootD: never 401
    assert "no token found; looked in:" in ei.value.hint
    with pytest.raises(ctadata.AuthError, match="^no token found; looked in: "):
        c.token()
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    assert [e.name for e in c.ls("d")] == ["f.txt"]
    assert c.token_source == "$BEARER_TOKEN"
    # auth "token" (fails before sending): looks again too
    monkeypatch.delenv("BEARER_TOKEN")
    strict = ctadata.Client(url=dav.url, retries=0, auth="token")
    with pytest.raises(ctadata.AuthError, match="no token found"):
        strict.ls("d")
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    assert [e.name for e in strict.ls("d")] == ["f.txt"]


def test_a_token_file_rewritten_by_an_agent_is_read_again(dav, monkeypatch, tmp_path):
    make_tree(dav.root, {"d/f.txt": b"f"})
    tok = _private(tmp_path / "bt", "stale-token-of-yesterday\n")
    monkeypatch.setenv("BEARER_TOKEN_FILE", tok)
    c = ctadata.Client(url=dav.url, retries=0)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("d")
    assert "was refused" in ei.value.hint
    _private(tok, dav.token + "\n")                      # the agent writes a new one
    assert [e.name for e in c.ls("d")] == ["f.txt"]      # a 401, a second look, a retry
    # ... and an expired JWT is followed by the file's next token
    jwt_srv_root = tmp_path / "srv"
    jwt_srv_root.mkdir()
    from oidcserver import make_jwt
    fresh = make_jwt(time.time() + 3600, sub="alice")
    with ctadata.serve(str(jwt_srv_root), token=fresh) as srv:
        _private(tok, make_jwt(time.time() - 60, sub="alice") + "\n")
        c = ctadata.Client(url=srv.url, retries=0)
        with pytest.raises(ctadata.AuthError, match="^token expired at "):
            c.ls("")
        assert srv.requests == []                        # refused before sending
        _private(tok, fresh + "\n")
        assert c.ls("") == []
        assert [r["status"] for r in srv.requests] == [207]


def test_the_token_file_is_not_read_for_every_request(dav, monkeypatch, tmp_path):
    make_tree(dav.root, {"t/f%d" % i: b"x" * i for i in range(20)})
    monkeypatch.setenv("BEARER_TOKEN_FILE", _private(tmp_path / "bt", dav.token))
    reads = []
    real = ctadata._read_private

    def counting(path, what="token file"):
        reads.append(path)
        return real(path, what)
    monkeypatch.setattr(ctadata, "_read_private", counting)
    c = ctadata.Client(url=dav.url, retries=0)
    assert c.download("t", str(tmp_path / "out") + "/", recursive=True).transferred == 20
    assert reads == [str(tmp_path / "bt")]


# -- what "already there" means: size and modification time ----------------------------

HOUR = 3600


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(str(path), (t, t))


def test_get_rerun_fetches_a_reprocessed_file_of_the_same_size(cli, dav, tmp_path):
    """FITS pads to 2,880-byte blocks: a reprocessed file often keeps its size."""
    make_tree(dav.root, {"night/a.fits": b"A" * 2880, "night/b.fits": b"B" * 2880})
    for name in ("a", "b"):
        _age(dav.root / ("night/%s.fits" % name), 2 * HOUR)
    code, _, err = cli("get", "-r", "night", str(tmp_path) + "/")
    assert code == 0 and "2 transferred" in err, err
    local = tmp_path / "night"
    assert abs(os.stat(str(local / "a.fits")).st_mtime - (time.time() - 2 * HOUR)) < 5
    code, _, err = cli("get", "-r", "night", str(tmp_path) + "/")
    assert "0 transferred, 2 skipped" in err, err
    (dav.root / "night/a.fits").write_bytes(b"a" * 2880)        # reprocessed on the server
    (local / "b.fits").write_bytes(b"x" * 2880)                  # changed here
    code, _, err = cli("get", "-r", "night", str(tmp_path) + "/")
    assert code == 0 and "2 transferred, 0 skipped" in err, err
    assert (local / "a.fits").read_bytes() == b"a" * 2880
    assert (local / "b.fits").read_bytes() == b"B" * 2880
    # one file too
    _age(local / "a.fits", HOUR)                                 # (an older copy here)
    (dav.root / "night/a.fits").write_bytes(b"1" * 2880)
    code, _, err = cli("get", "night/a.fits", str(local) + "/")
    assert "1 transferred" in err and (local / "a.fits").read_bytes() == b"1" * 2880
    code, _, err = cli("get", "night/a.fits", str(local) + "/")
    assert "0 transferred, 1 skipped" in err, err


def test_checksum_without_server_checksums_says_so_once(cli, dav, tmp_path):
    """nginx and Apache keep no checksums: --checksum falls back to size and
    time, and says so once."""
    make_tree(dav.root, {"n/%d.bin" % i: b"x" * 100 for i in range(5)})
    assert cli("get", "-r", "n", str(tmp_path) + "/")[0] == 0
    code, _, err = cli("get", "-r", "--checksum", "n", str(tmp_path) + "/")
    assert code == 0 and "5 skipped" in err
    assert err.count("the server has no checksums to compare") == 1, err
    code, _, err = cli("put", "-r", "--checksum", tmp_path / "n", "n2/")
    assert code == 0 and err.count("the server has no checksums to compare") == 0
    code, _, err = cli("put", "-r", "--checksum", tmp_path / "n", "n2/")
    assert "5 skipped" in err and err.count("the server has no checksums to compare") == 1


def test_put_rerun_skips_unless_the_local_file_changed_since(cli, dav, tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": b"a" * 50, "b.txt": b"b" * 50})
    for name in ("a", "b"):
        _age(src / ("%s.txt" % name), HOUR)
    code, _, err = cli("put", "-r", src, "up/")
    assert code == 0 and "2 transferred" in err, err
    # the server stamps the upload with its own time: not older than the local file
    for name in ("a", "b"):
        assert os.stat(str(dav.root / ("up/src/%s.txt" % name))).st_mtime >= \
            os.stat(str(src / ("%s.txt" % name))).st_mtime
    code, _, err = cli("put", "-r", src, "up/")
    assert "0 transferred, 2 skipped" in err, err
    (src / "b.txt").write_bytes(b"B" * 50)                       # changed after the upload
    _age(dav.root / "up/src/b.txt", HOUR / 2)
    code, _, err = cli("put", "-r", src, "up/")
    assert "1 transferred, 1 skipped" in err, err
    assert (dav.root / "up/src/b.txt").read_bytes() == b"B" * 50
    # one file: a re-run skips it too (it was sent every time)
    one = tmp_path / "one.txt"
    one.write_bytes(b"1" * 10)
    _age(one, HOUR)
    code, out, err = cli("put", one, "up/")
    assert code == 0 and "1 transferred" in err and out == "up/one.txt\n", err
    code, out, err = cli("put", one, "up/")
    assert code == 0 and "0 transferred, 1 skipped" in err and out == "", err
    code, out, err = cli("put", "--overwrite", one, "up/")
    assert "1 transferred" in err, err
    one.write_bytes(b"2" * 10)                                   # changed since: sent
    _age(dav.root / "up/one.txt", HOUR / 2)
    code, out, err = cli("put", one, "up/")
    assert "1 transferred" in err and (dav.root / "up/one.txt").read_bytes() == b"2" * 10
    # the old upload_file always sends, as the old client did
    c = ctadata.Client(url=dav.url, token=dav.token, retries=0)
    _age(one, HOUR)
    assert c.upload("%s" % one, "up/").skipped == 1
    assert c.upload_file(str(one), "up/") == {"path": "up/one.txt", "status": "uploaded",
                                              "total_written": 10}


def test_from_list_rerun_compares_last_modified(nginx_static_server, tmp_path, capsys):
    srv = nginx_static_server
    make_tree(srv.root, {"pc/f.gz": b"one" * 10})
    _age(srv.root / "pc/f.gz", HOUR)
    lst = tmp_path / "urls.txt"
    lst.write_text(srv.url + "/pc/f.gz\n")
    argv = ["get", "--from-list", str(lst), str(tmp_path / "dest")]
    assert ctadata.main(argv) == 0
    assert ctadata.main(argv) == 0 and "1 skipped" in capsys.readouterr().err
    (srv.root / "pc/f.gz").write_bytes(b"two" * 10)                # same size, newer
    assert ctadata.main(argv) == 0 and "1 transferred" in capsys.readouterr().err
    assert (tmp_path / "dest/pc/f.gz").read_bytes() == b"two" * 10


# -- retries are not silent ---------------------------------------------------------------

def test_each_retry_is_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    from faultserver import FaultServer
    root = tmp_path / "remote"
    make_tree(root, {"f.bin": b"x" * 5000, "g.bin": b"y" * 5000})
    with FaultServer(root, "tok-retry") as fs:
        monkeypatch.setenv("BEARER_TOKEN", "tok-retry")
        fs.add_fault("status", method="GET", path="/f.bin", times=2,
                     headers={"Retry-After": "0"})
        assert ctadata.main(["--url", fs.url, "--retries", "3", "get", "f.bin",
                             str(tmp_path) + "/"]) == 0
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "retrying" in ln]
        assert len(lines) == 2, err
        for n, line in zip((2, 3), lines):
            assert line.startswith("ctadata: retrying GET %s/f.bin in " % fs.url), line
            assert line.endswith(" s after: HTTP 503 (attempt %d of 4)" % n), line
        fs.add_fault("reset", method="GET", path="/g.bin", times=1)
        assert ctadata.main(["--url", fs.url, "get", "g.bin", str(tmp_path) + "/"]) == 0
        err = capsys.readouterr().err
        assert "retrying GET %s/g.bin in " % fs.url in err and "(attempt 2 of 6)" in err, err
        assert "connection reset" in err.lower()
        fs.add_fault("status", method="GET", path="/f.bin", times=1,
                     headers={"Retry-After": "0"})
        assert ctadata.main(["--url", fs.url, "-q", "get", "--overwrite", "f.bin",
                             str(tmp_path) + "/"]) == 0
        assert capsys.readouterr().err == ""
    # the library itself prints nothing: the lines go to the logger "ctadata.retry"
    assert logging.getLogger("ctadata.retry").name == "ctadata.retry"


# -- small things of the command line -----------------------------------------------------

def test_ls_exclude_without_r_keeps_the_folders(cli, dav):
    make_tree(dav.root, {"n/v0.1/a.h5": b"a", "n/v0.2/b.h5": b"b", "n/datacheck/c.h5": b"c",
                         "n/notes.txt": b"t", "n/run.h5": b"r"})
    code, out, err = cli("ls", "n", "--exclude", "datacheck*")
    assert code == 0 and out.splitlines() == ["notes.txt", "run.h5", "v0.1/", "v0.2/"], err
    code, out, _ = cli("ls", "-U", "n", "--exclude", "*.txt", "--exclude", "v0.2")
    assert sorted(out.splitlines()) == ["datacheck/", "run.h5", "v0.1/"]
    code, out, _ = cli("ls", "n", "--include", "*.h5")            # names files
    assert out.splitlines() == ["run.h5"]
    code, out, _ = cli("ls", "-R", "n", "--exclude", "datacheck/**")   # -R: files only
    assert out.splitlines() == ["notes.txt", "run.h5", "v0.1/a.h5", "v0.2/b.h5"]


def test_dry_run_and_failures_keep_hash_and_question_mark_in_local_names(cli, dav, tmp_path):
    make_tree(dav.root, {"odd/hash#tag.h5": b"h", "odd/q?x.txt": b"q"})
    code, out, err = cli("get", "-n", "-r", "odd", str(tmp_path) + "/")
    assert code == 0
    assert "-> %s\n" % (tmp_path / "odd" / "hash#tag.h5") in out.replace(" (1B)", ""), out
    assert "-> %s\n" % (tmp_path / "odd" / "q?x.txt") in out.replace(" (1B)", ""), out
    src = make_tree(tmp_path / "up", {"a#b.txt": b"1", "c?d.txt": b"2"})
    code, out, err = cli("put", "-n", "-r", src, "dst/")
    assert "would put %s -> " % (src / "a#b.txt") in out and \
        "would put %s -> " % (src / "c?d.txt") in out, out
    assert repr(ctadata.TransferResult(str(src / "a#b.txt"), "x")).startswith(
        "TransferResult(%r" % str(src / "a#b.txt"))


def test_ls_r_of_a_file_lists_the_file(cli, dav):
    make_tree(dav.root, {"d/f.txt": b"12345"})
    assert cli("ls", "d/f.txt")[1] == "f.txt\n"
    code, out, err = cli("ls", "-R", "d/f.txt")
    assert (code, out) == (0, "f.txt\n"), err
    code, out, err = cli("ls", "-R", "-l", "d/f.txt")
    assert code == 0 and out.startswith("- 5 ") and out.endswith(" f.txt\n"), out
    c = ctadata.Client(url=dav.url, token=dav.token, retries=0)
    assert [e.path for e in c.ls("d/f.txt", recursive=True)] == ["d/f.txt"]
    assert [(top, [e.path for e in kids]) for top, kids in c.walk("d/f.txt")] == []


def test_put_without_a_destination_asks_for_one(cli, dav, tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"f")
    code, out, err = cli("put", f)
    assert code == 2 and "put needs a destination" in err and not (dav.root / "f.txt").exists()
    assert cli("put", f, "/")[0] == 0 and (dav.root / "f.txt").read_bytes() == b"f"


def test_put_without_a_destination_in_service_mode_is_your_folder(hub, upstream, tmp_path,
                                                                    capsys):
    f = tmp_path / "mine.txt"
    f.write_bytes(b"m")
    assert ctadata.main(["put", str(f)]) == 0
    from conftest import HUB_AREA
    assert capsys.readouterr().out == HUB_AREA + "/mine.txt\n"
    assert (upstream.root / HUB_AREA / "mine.txt").read_bytes() == b"m"


def test_a_command_help_points_to_the_common_options_once(capsys, dav, monkeypatch):
    assert ctadata.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "--ca-dir DIR" in top and "--insecure" in top and "--token-file FILE" in top
    for cmd in ("get", "put", "ls", "mkdir", "stage", "token"):
        assert ctadata.main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--ca-dir" not in out and "--insecure" not in out and "--oidc-agent" not in out
        assert "`ctadata --help` lists them" in out, cmd
    assert len(out.splitlines()) < 20                     # token --help: 58 lines before
    # ... and they are still taken after the command
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    assert ctadata.main(["ls", "--url", dav.url, "-j", "2", "--timeout", "9", "-q"]) == 0


def test_completion_offers_the_listed_commands_only(capsys, tmp_path):
    import subprocess
    assert ctadata.main(["completion", "bash"]) == 0
    script = tmp_path / "c.bash"
    script.write_text(capsys.readouterr().out)
    r = subprocess.run(["bash", "-c", 'source "$0"; COMP_WORDS=(ctadata ""); COMP_CWORD=1; '
                        '_ctadata; echo "${COMPREPLY[@]}"', str(script)],
                       stdout=subprocess.PIPE, universal_newlines=True)
    offered = set(r.stdout.split())
    assert {"ls", "get", "put", "login", "token", "stage", "serve", "completion"} <= offered
    assert not offered & {"start-agent", "print-token", "stop-agent", "reset-config", "list"}
    assert ctadata.main(["print-token", "--help"]) == 0       # (the old names still work)


def test_one_file_is_not_1_files(cli, dav, tmp_path):
    make_tree(dav.root, {"one/f.txt": b"f"})
    code, _, err = cli("get", "-r", "one", str(tmp_path) + "/")
    assert "get: 1 file (1 transferred" in err and "1 files" not in err, err
    code, _, err = cli("get", "-n", "-r", "one", str(tmp_path / "n") + "/")
    assert "dry run: 1 file (1B) would be downloaded" in err, err
    code, _, err = cli("rm", "-n", "-r", "one")
    assert "dry run: 1 file (1B) and 1 folder would be removed" in err, err
    code, out, _ = cli("du", "one")
    assert out.splitlines()[-1].split()[:5] == ["1", "1", "file", "0", "dirs"], out
    s = ctadata._Snapshot(1, 1, 1, 1, 0, 0, 1.0, False, True)
    assert ctadata._status_line("get", s).startswith("get 1 file  1B  in 0:01")
    s.final = False
    assert ctadata._status_line("get", s).startswith("get 1/1 file  1B/1B")


def test_main_leaves_the_loggers_as_it_found_them(capsys):
    logger = logging.getLogger("ctadata")
    before = (logger.propagate, logger.level, list(logger.handlers),
              logging.getLogger("ctadata.retry").level)
    assert ctadata.main(["-v", "config"]) == 0
    assert ctadata.main(["--url", "ftp://nope", "ls"]) == 2
    assert (logger.propagate, logger.level, list(logger.handlers),
            logging.getLogger("ctadata.retry").level) == before


def test_one_convention_for_sizes(cli, dav, tmp_path):
    make_tree(dav.root, {"u/k.bin": b"k" * 4096, "u/small": b"s" * 10})
    code, out, _ = cli("ls", "-l", "-h", "u")
    sizes = [ln.split()[1] for ln in out.splitlines()]
    assert sizes == ["4.0KiB", "10B"], out
    code, out, _ = cli("du", "-h", "u")
    assert out.splitlines()[-1].split()[0] == "4.0KiB", out
    code, _, err = cli("get", "-r", "u", str(tmp_path) + "/")
    assert "4.0KiB in " in err, err


def test_token_explain_says_far_expiries_in_days_and_years(capsys, monkeypatch):
    from oidcserver import make_jwt
    now = int(time.time())
    monkeypatch.setattr(ctadata._Auth, "clock", staticmethod(lambda: float(now)))
    for seconds, said in ((38439991 * 60 + 49, "in 73 years 49 days"),
                          (3 * 86400 + 7300, "in 3 days 2 h"), (5400, "in 1 h 30 min"),
                          (125, "in 2 min 5 s")):
        monkeypatch.setenv("BEARER_TOKEN", make_jwt(now + seconds))
        assert ctadata.main(["token", "--explain"]) == 0
        out = capsys.readouterr().out
        line = [ln for ln in out.splitlines() if "expires" in ln][0]
        assert line.endswith("(%s)" % said), line
    monkeypatch.setenv("BEARER_TOKEN", make_jwt(now - 2 * 86400 - 60))
    ctadata.main(["token", "--explain"])
    assert "(2 days 0 h ago)" in capsys.readouterr().out
    assert ctadata._span(1) == "1 s" and ctadata._span(86400) == "1 day 0 h"
    assert ctadata._span(365 * 86400) == "1 year 0 days"


def test_dev_config_does_not_credit_ctadata_url(capsys, monkeypatch):
    monkeypatch.setenv("CTADATA_URL", "https://dcache.example.org:2880")
    assert ctadata.main(["--dev", "config"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("url ")][0]
    assert ctadata.DEV_URL in row and "$CTADATA_URL" not in row, row
    assert row.split()[-1] == "dev" and "profile" in row     # the built-in profile dev
    assert ctadata.Client(dev=True).url == ctadata.DEV_URL
    assert ctadata.Client().url == "https://dcache.example.org:2880"
    assert ctadata.main(["config"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("url ")][0]
    assert "dcache.example.org" in row and row.endswith("$CTADATA_URL")


def test_a_token_given_with_its_bearer_prefix(dav, monkeypatch, tmp_path, capsys):
    make_tree(dav.root, {"b/f.txt": b"f"})
    monkeypatch.setenv("BEARER_TOKEN", "Bearer " + dav.token)
    assert ctadata.main(["--url", dav.url, "ls", "b"]) == 0
    assert capsys.readouterr().out == "f.txt\n"
    monkeypatch.delenv("BEARER_TOKEN")
    monkeypatch.setenv("BEARER_TOKEN_FILE", _private(tmp_path / "t", "bearer  %s\n" % dav.token))
    assert ctadata.Client(url=dav.url).ls("b")[0].name == "f.txt"
    assert ctadata.Client(url=dav.url).token() == dav.token


@pytest.mark.parametrize("server", ["serve", "nginx"])
def test_url_without_a_scheme_on_a_plain_http_server(server, nginx_server, tmp_path, capsys,
                                                      monkeypatch):
    """HOST:PORT means https://HOST:PORT (dCache's doors); a plain-http server
    answers the TLS handshake in plain text (ctadata serve waited for a
    request line: 2 minutes of silence with the default timeout)."""
    (tmp_path / "srv").mkdir()
    with ctadata.serve(str(tmp_path / "srv"), token="tok-s") as srv:
        url = srv.url if server == "serve" else nginx_server.url
        hostport = url.split("://")[1]
        monkeypatch.setenv("BEARER_TOKEN", "tok-s")
        t0 = time.monotonic()
        assert ctadata.main(["--url", hostport, "--timeout", "30", "ls"]) == 1
        assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith("ctadata: error: %s answered https in plain http (https://%s/); if it"
                          " is a plain http server, say so: http://%s" % (hostport, hostport,
                                                                         hostport)), err
    assert "retrying" not in err


# -- the old client's API, exactly ----------------------------------------------------------

def test_what_the_old_functions_raise_is_a_storage_exception(ds, upstream, tmp_path,
                                                              monkeypatch, old_api):
    """The service's own tests: `with pytest.raises(ctadata.api.StorageException):
    ctadata.upload_file(origin_file, '../example-file')`."""
    import inspect
    import pickle
    local = tmp_path / "local-file"
    local.write_bytes(b"x" * 1000)
    kw = {"token": HUB_TOKEN, "downloadservice": ds.base_url}
    with pytest.raises(ctadata.api.StorageException) as ei:
        ctadata.upload_file(str(local), "../example-file", **kw)
    e = ei.value
    assert isinstance(e, ctadata.ConfigError) and type(e).__name__ == "ConfigError"
    assert e.exit_code == 2 and "climbs above the storage root" in str(e)
    assert not [r for r in ds.requests if "/upload" in r["path"]]     # nothing was sent
    again = pickle.loads(pickle.dumps(e))
    assert isinstance(again, ctadata.StorageException) and isinstance(again, ctadata.ConfigError)
    assert str(again) == str(e)
    with pytest.raises(ctadata.StorageException) as ei:                # a 401
        ctadata.list_dir("lst", token="wrong", downloadservice=ds.base_url)
    assert isinstance(ei.value, ctadata.AuthError) and ei.value.status == 401
    with pytest.raises(ctadata.StorageException):                       # the service's 404
        ctadata.list_dir("fake-temp", **kw)
    with pytest.raises(ctadata.StorageException):                       # a missing local file
        ctadata.upload_file(str(tmp_path / "nope"), "x", **kw)
    ctadata.APIClient.downloadservice = ds.base_url
    ctadata.APIClient.token = HUB_TOKEN
    with pytest.raises(ctadata.StorageException):
        ctadata.APIClient().upload_file(str(local), "../x")
    with pytest.raises(ctadata.StorageException):
        ctadata.fetch_and_save_file_or_dir("../x")
    # the new API keeps its classes; ConfigError still catches the old one's
    with pytest.raises(ctadata.ConfigError) as ei:
        ctadata.Client(service=ds.base_url, token=HUB_TOKEN).upload_file(str(local), "../x")
    assert not isinstance(ei.value, ctadata.StorageException)
    with pytest.raises(ctadata.ConfigError):
        ctadata.upload_file(str(local), "../x")
    assert issubclass(ctadata.RemoteError, ctadata.StorageException)
    assert not issubclass(ctadata.ConfigError, ctadata.StorageException)
    assert list(inspect.signature(ctadata.upload_file).parameters)[:2] == ["local", "remote"]


def test_old_functions_in_direct_mode_raise_storage_exceptions(dav, monkeypatch, tmp_path):
    monkeypatch.setenv("CTADATA_URL", dav.url)
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    (tmp_path / "x").write_bytes(b"x")
    from ctadata import direct
    with pytest.raises(direct.StorageException):
        direct.upload_file(str(tmp_path / "x"), "../x")
    with pytest.raises(direct.StorageException):
        direct.fetch_and_save_file("nope", str(tmp_path / "y"))
    with pytest.raises(direct.StorageException) as ei:
        direct.list_dir("", token="wrong")
    assert isinstance(ei.value, ctadata.AuthError)


def _old_client_lines(size, chunk):
    """The lines the old client's loop (ctadata/api.py, fetch_and_save_file)
    logs for a file of *size* bytes read in chunks of *chunk*."""
    lines, total, last_pc, i = [], 0, 0, 0
    while total < size:
        pc = int(total / size * 100)
        if pc > last_pc:
            lines.append("wrote %.2f / %.2f Mb in %d chunks in" % (
                total / 1024 / 1024, size / 1024 / 1024, i))
            last_pc = pc
        total += min(chunk, size - total)
        i += 1
    return lines


def _chunk_lines(caplog):
    return [r.getMessage().rsplit(" ", 2)[0] for r in caplog.records
            if r.name == "ctadata.api" and r.levelno == logging.INFO]


def test_chunk_size_is_sent_and_each_chunk_logged_as_the_old_client_did(
        ds, upstream, tmp_path, monkeypatch, caplog, old_api):
    """The download service's own test (tests/test_ctadata.py of
    cta-epfl/downloadservice): a 10 MiB file fetched with chunk_size=2 MiB
    logs 'in 4 chunks' and not 'in 9 chunks'; with 1 MiB, 'in 9 chunks'."""
    caplog.set_level(logging.DEBUG)
    size = 10 * 1024 ** 2
    (upstream.root / "lst/remote-file").write_bytes(os.urandom(size))
    ctadata.APIClient.downloadservice = ds.base_url
    ctadata.APIClient.token = HUB_TOKEN
    for chunk in (2 * 1024 ** 2, 1024 ** 2):
        caplog.clear()
        n = len(ds.requests)
        assert ctadata.fetch_and_save_file("lst/remote-file", chunk_size=chunk,
                                           save_to_fn=str(tmp_path / "copy")) == size
        assert _chunk_lines(caplog) == _old_client_lines(size, chunk)
        fetches = [r for r in ds.requests[n:] if "/fetch/" in r["path"]]
        assert [r["query"] for r in fetches] == [{"chunk_size": [str(chunk)]}]
    assert "in 9 chunks" in caplog.text and "in 10 chunks" not in caplog.text
    # APIClient.chunk_size, an instance's, and the default (10 MiB: one chunk, no line)
    ctadata.APIClient.chunk_size = 3 * 1024 ** 2
    caplog.clear()
    ctadata.fetch_and_save_file_or_dir("lst/remote-file", str(tmp_path / "c2"))
    assert _chunk_lines(caplog) == _old_client_lines(size, 3 * 1024 ** 2) != []
    api = ctadata.APIClient()
    api.chunk_size = 4 * 1024 ** 2
    caplog.clear()
    api.fetch_and_save_file("lst/remote-file", str(tmp_path / "c3"))
    assert _chunk_lines(caplog) == _old_client_lines(size, 4 * 1024 ** 2) != []
    ctadata.APIClient.chunk_size = None
    caplog.clear()
    n = len(ds.requests)
    ctadata.fetch_and_save_file("lst/remote-file", str(tmp_path / "c4"))
    assert _chunk_lines(caplog) == [] and [r["query"] for r in ds.requests[n:]
                                           if "/fetch/" in r["path"]] == [
        {"chunk_size": [str(10 * 1024 ** 2)]}]
    assert (tmp_path / "c4").read_bytes() == (upstream.root / "lst/remote-file").read_bytes()
    # a tree: per file, as the old client's recursive fetch
    caplog.clear()
    ctadata.fetch_and_save_file_or_dir("lst/data/run1", str(tmp_path / "tree"), True,
                                       chunk_size=100000)
    assert _chunk_lines(caplog) == _old_client_lines(len(upstream.root.joinpath(
        "lst/data/run1/a.bin").read_bytes()), 100000)


def test_chunk_size_only_in_service_mode(dav, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    make_tree(dav.root, {"big.bin": b"b" * 300000})
    monkeypatch.setenv("CTADATA_URL", dav.url)
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    sent = []
    monkeypatch.setattr(ctadata, "_chunked_download", lambda *a: sent.append(a))
    assert ctadata.fetch_and_save_file("big.bin", str(tmp_path / "b"), chunk_size=1000) == 300000
    assert _chunk_lines(caplog) == [] and sent == []
