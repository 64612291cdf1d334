"""Everyday habits: selecting files, dry runs, du, URL lists, manifests,
JSON output, shell completion -- against real nginx/Apache servers."""

import json
import os
import re
import subprocess
from pathlib import Path
from subprocess import PIPE

import pytest

import ctadata
from conftest import make_tree, tree_digests

TREE = {
    "night/run1.0100.h5": b"a" * 10,
    "night/run1.0200.h5": b"b" * 20,
    "night/datacheck.0100.h5": b"c" * 30,
    "night/sub/run2.0100.h5": b"d" * 40,
    "night/sub/tmp/run3.0100.h5": b"e" * 50,
    "night/notes.txt": b"f" * 60,
}


def remote_listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.mark.parametrize("select", [
    ["*.0100.h5"],
    re.compile(r"\.0100\.h5$"),
    lambda rel: rel.endswith(".0100.h5"),
    "*.0100.h5",
])
def test_select_variants_on_download(client, dav, tmp_path, select):
    make_tree(dav.root, TREE)
    s = client.download("night", str(tmp_path) + "/", recursive=True, select=select)
    got = sorted(tree_digests(tmp_path / "night"))
    assert got == ["datacheck.0100.h5", "run1.0100.h5", "sub/run2.0100.h5",
                   "sub/tmp/run3.0100.h5"]
    assert s.transferred == 4


def test_include_exclude_on_get_ls_du_put(cli, dav, tmp_path):
    make_tree(dav.root, TREE)
    code, out, err = cli("get", "-r", "night", str(tmp_path) + "/", "--include", "*.0100*",
                         "--exclude", "datacheck*", "--exclude", "**/tmp/**")
    assert code == 0, err
    assert sorted(tree_digests(tmp_path / "night")) == ["run1.0100.h5", "sub/run2.0100.h5"]
    assert not (tmp_path / "night/sub/tmp").exists()      # no empty folders for nothing
    code, out, _ = cli("ls", "-R", "night", "--include", "sub/**")
    assert out.splitlines() == ["sub/run2.0100.h5", "sub/tmp/run3.0100.h5"]
    code, out, _ = cli("ls", "night", "--include", "*.txt")
    assert out.splitlines() == ["notes.txt"]
    code, out, _ = cli("du", "--json", "night", "--include", "*.h5")
    doc = json.loads(out)
    assert doc["files"] == 5 and doc["bytes"] == 10 + 20 + 30 + 40 + 50
    local = make_tree(tmp_path / "up", {"a.h5": b"1", "b.txt": b"2", "d/c.h5": b"3",
                                         "d/e.log": b"4"})
    code, out, err = cli("put", "-r", local, "dest/", "--exclude", "*.txt",
                         "--exclude", "*.log")
    assert code == 0, err
    assert remote_listing(dav.root / "dest") == ["up", "up/a.h5", "up/d", "up/d/c.h5"]


def test_du_totals_match_the_disk(cli, dav):
    make_tree(dav.root, TREE)
    code, out, _ = cli("du", "--json", "night")
    doc = json.loads(out)
    files = [p for p in (dav.root / "night").rglob("*") if p.is_file()]
    dirs = [p for p in (dav.root / "night").rglob("*") if p.is_dir()]
    assert doc["files"] == len(files) and doc["dirs"] == len(dirs)
    assert doc["bytes"] == sum(p.stat().st_size for p in files)
    kids = {c["name"]: c for c in doc["children"]}
    assert kids["sub"] == {"name": "sub", "type": "directory", "files": 2, "dirs": 1,
                           "bytes": 90}
    assert kids["notes.txt"]["type"] == "file" and kids["notes.txt"]["bytes"] == 60
    code, out, _ = cli("du", "-h", "night")
    assert out.splitlines()[-1].split()[0] == "210B" and "total" in out
    code, out, _ = cli("du", "--jsonl", "night")
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[-1]["name"] == "total" and lines[-1]["bytes"] == 210


def test_dry_runs_change_nothing(cli, dav, tmp_path):
    make_tree(dav.root, TREE)
    local = make_tree(tmp_path / "up", {"a.h5": b"1", "d/c.h5": b"3"})
    before_remote = remote_listing(dav.root)
    before_local = remote_listing(tmp_path)
    code, out, err = cli("get", "-n", "-r", "night", str(tmp_path / "dl") + "/")
    assert code == 0 and out.count("would get") == 6 and "6 files" in err
    code, out, err = cli("put", "-n", "-r", local, "dest/")
    assert code == 0 and out.count("would put") == 2
    code, out, err = cli("rm", "-n", "-r", "night")
    assert code == 0 and "would remove night/" in out and "6 files" in err
    code, out, err = cli("mv", "-n", "night/notes.txt", "moved.txt")
    assert code == 0 and out.strip() == "would move night/notes.txt -> moved.txt"
    assert remote_listing(dav.root) == before_remote
    assert remote_listing(tmp_path) == before_local


def test_manifest_records_field_by_field(cli, dav, tmp_path):
    make_tree(dav.root, {"m/a.bin": b"x" * 1000, "m/b.bin": b"y" * 5})
    os.utime(dav.root / "m/a.bin", (1589199197, 1589199197))
    man = tmp_path / "manifest.json"
    code, _, err = cli("get", "-r", "m", str(tmp_path) + "/", "--manifest", man)
    assert code == 0, err
    doc = json.loads(man.read_text())
    assert doc["command"] == "get" and doc["transferred"] == 2 and doc["failed"] == 0
    recs = {Path(r["local"]).name: r for r in doc["files"]}
    a = recs["a.bin"]
    assert a["remote"] == dav.url + "m/a.bin"
    assert a["local"] == str(tmp_path / "m" / "a.bin")
    assert a["size"] == 1000 and a["bytes"] == 1000
    assert a["mtime"] == "2020-05-11T12:13:17Z"
    import zlib
    assert a["checksums"] == {"adler32": "%08x" % zlib.adler32(b"x" * 1000)}
    assert a["status"] == "transferred" and a["error"] is None
    # a second run records skips
    code, _, _ = cli("get", "-r", "m", str(tmp_path) + "/", "--manifest", man)
    assert {r["status"] for r in json.loads(man.read_text())["files"]} == {"skipped"}
    # uploads too
    src = make_tree(tmp_path / "u", {"f.txt": b"hello"})
    code, _, _ = cli("put", "-r", src, "up/", "--manifest", tmp_path / "up.json")
    (rec,) = json.loads((tmp_path / "up.json").read_text())["files"]
    assert rec["remote_path"] == "up/u/f.txt" and rec["local"] == str(src / "f.txt")
    assert rec["size"] == 5 and rec["checksums"]["adler32"] == "%08x" % zlib.adler32(b"hello")


def test_from_list_against_a_plain_static_server(nginx_static_server, tmp_path, monkeypatch,
                                                 capsys):
    srv = nginx_static_server
    files = {"archive/2022/01/f.gz": b"one" * 100, "archive/2022/02/g.gz": b"two" * 50,
             "archive/2023/h é.gz": b"three"}
    make_tree(srv.root, files)
    from urllib.parse import quote
    urls = ["# night of 2022", ""] + [srv.url + "/" + quote(p) for p in files] + [
        srv.url + "/archive/2022/missing.gz"]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    man = tmp_path / "m.json"
    code = ctadata.main(["get", "--from-list", str(lst), "--strip-prefix",
                         srv.url + "/archive/", str(tmp_path / "dest"), "--manifest", str(man)])
    err = capsys.readouterr().err
    assert code == 1 and "missing.gz" in err and "no such file or folder" in err
    assert tree_digests(tmp_path / "dest") == tree_digests(srv.root / "archive")
    recs = json.loads(man.read_text())["files"]
    assert sorted(r["status"] for r in recs) == ["failed", "transferred", "transferred",
                                                  "transferred"]
    failed = [r for r in recs if r["status"] == "failed"][0]
    assert failed["remote"].endswith("missing.gz") and "no such file or folder" in failed["error"]
    # without a prefix the URL path is kept; a re-run skips what is there
    code = ctadata.main(["get", "--from-list", str(lst), str(tmp_path / "kept")])
    capsys.readouterr()
    assert (tmp_path / "kept/archive/2022/01/f.gz").read_bytes() == files["archive/2022/01/f.gz"]
    code = ctadata.main(["get", "--json", "--from-list", str(lst), str(tmp_path / "kept")])
    doc = json.loads(capsys.readouterr().out)
    assert doc["skipped"] == 3 and doc["failed"] == 1


def test_from_list_stdin_with_remote_paths_and_dav_urls(cli, dav, tmp_path, monkeypatch):
    make_tree(dav.root, {"x/a.dat": b"A", "x/y/b.dat": b"BB"})
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("x/a.dat\n%sx/y/b.dat\n" % dav.url))
    code, out, err = cli("get", "--from-list", "-", str(tmp_path / "d"))
    assert code == 0, err
    assert (tmp_path / "d/x/a.dat").read_bytes() == b"A"
    folder = dav.url.rstrip("/").rpartition("/")[2]
    assert (tmp_path / "d" / folder / "x/y/b.dat").read_bytes() == b"BB"


def test_from_list_refuses_paths_escaping_dest(nginx_static_server, tmp_path, capsys):
    lst = tmp_path / "l"
    lst.write_text(nginx_static_server.url + "/a/%2e%2e/%2e%2e/evil\n")
    code = ctadata.main(["get", "--from-list", str(lst), str(tmp_path / "d")])
    assert code == 1 and "unsafe" in capsys.readouterr().err
    assert not (tmp_path / "evil").exists()


def test_jsonl_listing_streams_one_object_per_line(cli, dav):
    make_tree(dav.root, {"j/a": b"1", "j/b/c": b"22"})
    code, out, _ = cli("ls", "-R", "--jsonl", "j")
    objs = [json.loads(x) for x in out.splitlines()]
    assert [(o["path"], o["type"], o["size"]) for o in objs] == [
        ("j/a", "file", 1), ("j/b", "directory", None), ("j/b/c", "file", 2)]
    code, out, _ = cli("get", "-r", "--jsonl", "j", "/tmp/ctadata-jsonl-%d/" % os.getpid())
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[-1]["summary"]["transferred"] == 2 and len(lines) == 3
    import shutil
    shutil.rmtree("/tmp/ctadata-jsonl-%d" % os.getpid())


def test_completion_scripts_are_valid_shell(capsys):
    for shell in ("bash", "zsh"):
        assert ctadata.main(["completion", shell]) == 0
        script = capsys.readouterr().out
        assert "--include" in script and "--from-list" in script and "du" in script
        r = subprocess.run(["bash", "-n"], input=script, stdout=PIPE, stderr=PIPE,
                           universal_newlines=True)
        assert r.returncode == 0, r.stderr
    # it completes for real in bash
    script_file = Path("/tmp/ctadata-completion-%d" % os.getpid())
    ctadata.main(["completion", "bash"])
    script_file.write_text(capsys.readouterr().out)
    r = subprocess.run(["bash", "-c", 'source "$0"; COMP_WORDS=(ctadata get --from); '
                        'COMP_CWORD=2; _ctadata; echo "${COMPREPLY[@]}"', str(script_file)],
                       stdout=PIPE, stderr=PIPE, universal_newlines=True)
    script_file.unlink()
    assert r.stdout.split() == ["--from-list"]


def _config(tmp_path, text):
    d = tmp_path / "xdg" / "ctadata"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.ini").write_text(text)
    return str(tmp_path / "xdg")


def test_profile_precedence_flag_env_profile_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", _config(tmp_path, (
        "[default]\njobs = 8\n\n[lab]\nurl = https://lab.example:2880\nretries = 2\n"
        "timeout = 7\nissuer = https://idp.example/realms/lab/\n"
        "[dev]\njobs = 3\n")))
    c = ctadata.Client()
    assert (c.url, c.settings.jobs) == (ctadata.DEFAULT_URL, 8)           # [default]
    assert not c.settings.adaptive      # a profile's jobs fixes the number, as -j does
    c = ctadata.Client(profile="lab")
    assert (c.url, c.settings.retries, c.settings.timeout) == ("https://lab.example:2880", 2, 7)
    assert c.settings.jobs == 4 and c.issuer == "https://idp.example/realms/lab/"
    assert c.settings.adaptive
    monkeypatch.setenv("CTADATA_URL", "https://env.example")
    c = ctadata.Client(profile="lab")
    assert c.url == "https://env.example" and c.sources["url"] == "$CTADATA_URL"
    c = ctadata.Client(profile="lab", url="https://flag.example", retries=9)
    assert (c.url, c.settings.retries) == ("https://flag.example", 9)       # flag wins
    monkeypatch.delenv("CTADATA_URL")
    monkeypatch.setenv("CTADATA_PROFILE", "lab")
    assert ctadata.Client().url == "https://lab.example:2880"
    c = ctadata.Client(dev=True)                                            # built-in + [dev]
    assert (c.url, c.settings.jobs, c.client_id) == (ctadata.DEV_URL, 3, "dcache-dev")
    with pytest.raises(ctadata.ConfigError, match="no profile"):
        ctadata.Client(profile="nope")
    # the CLI shows it all, with sources, and never a secret
    monkeypatch.setenv("BEARER_TOKEN", "very-secret-value")
    assert ctadata.main(["--profile", "lab", "config", "--retries", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "https://lab.example:2880" in rows["url"] and "profile lab" in rows["url"]
    assert rows["retries"].split()[1] == "5" and "command line" in rows["retries"]
    assert "built-in default (transfers adapt: up to 32, uploads 16)" in rows["jobs"]
    assert "very-secret-value" not in out and "$BEARER_TOKEN" in rows["token"]


def test_unknown_profile_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", _config(tmp_path, "[default]\ntoken = abc\n"))
    with pytest.raises(ctadata.ConfigError, match="unknown setting 'token'"):
        ctadata.Client()
