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
    assert ei.value.status == 401 and "no token found; looked in:" in ei.value.hint
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
