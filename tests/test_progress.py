"""progress= on every transfer function and method: True, False, a function,
a Progress; uploads that advance as bytes are sent; retries that do not
count twice; the CLI's --progress / --no-progress (issue 14, part 2)."""

import io
import re
import os
import sys

import pytest

import ctadata
from conftest import make_tree
from faultserver import FaultServer


class Recorder(ctadata.Progress):
    """A Progress that remembers every advance() the engine makes."""

    def __init__(self):
        ctadata.Progress.__init__(self)
        self.calls = []

    def advance(self, nbytes):
        self.calls.append(nbytes)
        ctadata.Progress.advance(self, nbytes)


def test_download_progress_true_draws_a_line_on_stderr(client, dav, tmp_path, capsys):
    # before issue 14: AttributeError ('bool' object has no attribute 'add_total')
    make_tree(dav.root, {"d/a.bin": b"a" * 3000, "d/b.bin": b"b" * 5000})
    s = client.download("d", str(tmp_path) + "/", recursive=True, progress=True)
    assert s.transferred == 2
    err = capsys.readouterr().err
    # stderr is not a terminal here: plain lines, the final one kept
    assert "\r" not in err and "\x1b" not in err
    assert err.splitlines()[-1].startswith("download 2 files  7.8KiB  in 0:0")


def test_progress_false_and_default_in_a_script_draw_nothing(client, dav, tmp_path, capsys):
    make_tree(dav.root, {"f.bin": b"x" * 100})
    client.download("f.bin", str(tmp_path / "a"), progress=False)
    client.download("f.bin", str(tmp_path / "b"))   # default: not in a script
    assert capsys.readouterr().err == ""
    with pytest.raises(ctadata.ConfigError, match="progress="):
        client.download("f.bin", str(tmp_path / "c"), progress="yes")


def test_a_function_gets_snapshots_and_a_final_one(client, dav, tmp_path):
    make_tree(dav.root, {"t/%d.bin" % i: os.urandom(100000) for i in range(5)})
    seen = []
    s = client.download("t", str(tmp_path) + "/", recursive=True, progress=seen.append)
    assert s.transferred == 5
    assert seen, "the function was never called"
    last = seen[-1]
    assert last.final and not last.listing
    assert (last.files_done, last.files_total) == (5, 5)
    assert last.bytes_done == last.bytes_total == 500000
    assert last.eta == 0 and last.rate > 0
    assert all(not x.final for x in seen[:-1])
    assert set(last.to_dict()) >= {"files_done", "files_total", "bytes_done", "bytes_total",
                                   "rate", "eta", "elapsed", "listing", "final"}


def test_old_functions_take_progress(dav, tmp_path, monkeypatch):
    # before issue 14: TypeError (unexpected keyword argument 'progress')
    make_tree(dav.root, {"d/x.txt": b"12345", "one.txt": b"1"})
    monkeypatch.setenv("CTADATA_URL", dav.url)
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    monkeypatch.chdir(tmp_path)
    finals = []

    def keep(snap):
        if snap.final:
            finals.append(snap)
    summary = ctadata.fetch_and_save_file_or_dir("d", recursive=True, progress=keep)
    assert summary.transferred == 1 and (tmp_path / "d/x.txt").read_bytes() == b"12345"
    assert ctadata.fetch_and_save_file("one.txt", progress=keep) == 1
    (tmp_path / "up.txt").write_bytes(b"up")
    ctadata.upload_file("up.txt", "dest/", progress=keep)
    ctadata.upload_dir(str(tmp_path / "d"), "dest/", progress=keep)
    api = ctadata.APIClient()
    api.fetch_and_save_file("one.txt", "again.txt", progress=keep)
    assert [f.files_done for f in finals] == [1, 1, 1, 1, 1]
    assert (dav.root / "dest/up.txt").read_bytes() == b"up"


def test_upload_progress_moves_as_bytes_are_sent(client, dav, tmp_path):
    # before: one advance(size) when the whole file was sent and verified
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    rec = Recorder()
    client.upload(str(big), "big.bin", progress=rec)
    assert sum(rec.calls) == 3 << 20 and rec.done_bytes == 3 << 20
    assert len(rec.calls) == 12 and set(rec.calls) == {256 << 10}
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 1000)       # read whole (<= 1 MiB): one step
    rec = Recorder()
    client.upload(str(small), "small.bin", progress=rec)
    assert rec.calls == [1000]


def test_service_upload_progress_moves_as_bytes_are_sent(svc, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((2 << 20) + 5))
    rec = Recorder()
    svc.upload(str(big), "", progress=rec)
    assert sum(rec.calls) == (2 << 20) + 5 and len(rec.calls) == 9


def test_a_resent_body_is_not_counted_twice(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"z" * ((1 << 20) + 10))
    rec = Recorder()
    body = ctadata._FileBody(str(path), (1 << 20) + 10)
    body.advance = rec.advance
    for _ in body.chunks():
        pass
    for _ in body.chunks():      # a retry or a redirect sends it again
        pass
    assert rec.done_bytes == (1 << 20) + 10
    assert rec.calls[5] == -((1 << 20) + 10)


def test_a_retried_upload_counts_its_bytes_once(tmp_path):
    data = os.urandom((2 << 20) + 1)
    (tmp_path / "up.bin").write_bytes(data)
    root = tmp_path / "root"
    root.mkdir()
    with FaultServer(root) as srv:
        srv.add_fault("status", method="PUT", status=503, headers={}, times=1)
        with ctadata.Client(url=srv.url, token="tok", retries=2, backoff=0.01) as c:
            rec = Recorder()
            s = c.upload(str(tmp_path / "up.bin"), "up.bin", progress=rec)
    assert s.transferred == 1 and (root / "up.bin").read_bytes() == data
    assert rec.done_bytes == len(data)


def test_a_resumed_download_counts_its_bytes_once(tmp_path):
    data = os.urandom(3 << 20)
    root = tmp_path / "root"
    make_tree(root, {"a.bin": data})
    with FaultServer(root) as srv:
        srv.add_fault("truncate", method="GET", path="/a.bin", after=1 << 20)
        with ctadata.Client(url=srv.url, token="tok", retries=2, backoff=0.01) as c:
            rec = Recorder()
            s = c.download("a.bin", str(tmp_path / "a.bin"), progress=rec)
    assert s.transferred == 1 and (tmp_path / "a.bin").read_bytes() == data
    assert s.bytes == len(data)                      # the retry resumed
    assert rec.done_bytes == len(data) and rec.total_bytes == len(data)


def test_single_file_eta_is_not_a_lower_bound(client, dav, tmp_path):
    # before: "ETA -" until the end, the file list was "still being listed"
    make_tree(dav.root, {"one.bin": b"o" * 1000})
    seen = []
    client.download("one.bin", str(tmp_path / "one.bin"), progress=seen.append)
    assert seen[0].files_total == 1 and not seen[0].listing


# -- the command line -----------------------------------------------------------


def test_cli_progress_forces_lines_where_stderr_is_no_terminal(cli, dav, tmp_path):
    make_tree(dav.root, {"d/%d" % i: b"x" * 1000 for i in range(3)})
    code, out, err = cli("get", "-r", "--progress", "d", str(tmp_path) + "/")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("get ") and " files " in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("get: 3 files (3 transferred")
    assert "\r" not in err and "\x1b" not in err
    code, out, err = cli("get", "-r", "--overwrite", "d", str(tmp_path) + "/")
    assert err.splitlines() == [l for l in err.splitlines() if l.startswith("get: ")]
    (tmp_path / "u.bin").write_bytes(b"u" * 10)
    code, out, err = cli("put", "--progress", "-q", str(tmp_path / "u.bin"), "u.bin")
    # a progress line even with -q (0/1, or 1/1 if the upload beat the first line)
    assert code == 0 and re.match(r"put [01]/1 file ", err), err


def test_cli_no_progress_on_a_terminal(dav, monkeypatch, capsys, tmp_path):
    class TTY(io.StringIO):
        def isatty(self):
            return True
    make_tree(dav.root, {"d/f": b"f" * 100})
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    tty = TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert ctadata.main(["--url", dav.url, "get", "-r", "--no-progress", "d",
                         str(tmp_path) + "/"]) == 0
    assert "\r" not in tty.getvalue() and "get: 1 file (" in tty.getvalue()
    tty2 = TTY()
    monkeypatch.setattr(sys, "stderr", tty2)
    assert ctadata.main(["--url", dav.url, "get", "-r", "--overwrite", "d",
                         str(tmp_path) + "/"]) == 0
    assert re.search(r"\rget \d+/\d+\+? files? ", tty2.getvalue())   # the live line
