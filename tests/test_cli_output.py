"""What the CLI shows a person: the progress line on a terminal, nothing on a
pipe, request logging at -v without secrets."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ctadata
from conftest import make_tree

REPO = Path(__file__).resolve().parent.parent


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_term_progress_draws_and_clears():
    stream = FakeTTY()
    p = ctadata._TermProgress(stream, "get")
    p.add_total(2, 3 * 1024 * 1024)
    p.advance(1024 * 1024)
    assert stream.getvalue() == ""          # workers only count: poll() draws
    p.started -= 10                          # 1 MiB in 10 s: 2 MiB left take 20 s
    p.poll()
    text = stream.getvalue()
    assert "2+ files" in text                # still listing: totals may grow
    assert "ETA 0:20+" in text               # ... and the ETA is a lower bound
    p.planned()
    r = ctadata.TransferResult("s", "d", 10)
    p.file_done(r)
    p.poll()
    assert stream.getvalue() == text         # at most 5 lines a second
    p._shown = 0
    p.poll()
    text = stream.getvalue()
    assert text.startswith("\r") and "get 1/2 files" in text and "1.0MiB/3.0MiB" in text
    assert "ETA 0:20\x1b[K" in text and "/s" in text
    p.close()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_eta_is_estimated_from_what_is_known():
    p = ctadata.Progress()
    p.add_total(1, 100 << 20)
    p.started -= 4
    p.advance(10 << 20)                      # 10 MiB in 4 s
    s = p.snapshot()
    assert s.listing and s.rate == pytest.approx(2.5 * (1 << 20), rel=0.05)
    assert s.eta == pytest.approx(36, rel=0.05)
    p.planned()
    assert not p.snapshot().listing
    q = ctadata.Progress()                   # sizes unknown (a URL list): by files
    q.add_total(4, 0)
    q.planned()
    q.started -= 6
    q.file_done(ctadata.TransferResult("s", "d", None))
    assert q.snapshot().eta == pytest.approx(18, rel=0.05)
    assert ctadata.Progress().snapshot().eta is None     # nothing to go by
    q.advance(5)
    f = q.snapshot(final=True)
    assert f.final and not f.listing and f.to_dict()["bytes_done"] == 5


def test_line_progress_for_logs():
    stream = io.StringIO()
    p = ctadata._LineProgress(stream, "put", interval=5.0, keep=True)
    p.add_total(1, 2048)
    p.planned()
    p.poll()
    p.advance(1024)
    p.poll()                                 # not 5 s yet: nothing more
    lines = stream.getvalue().splitlines()
    assert lines == ["put 0/1 file  0B/2.0KiB  0B/s  ETA -"]
    p.file_done(ctadata.TransferResult("s", "d", 2048))
    p.advance(1024)
    p.close()
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("put 1 file  2.0KiB  in 0:00")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_progress_draws_nothing_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    args = type("A", (), {"quiet": False})()
    p = ctadata._make_progress(args, "get")
    assert type(p) is ctadata.Progress
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert isinstance(ctadata._make_progress(args, "get"), ctadata._TermProgress)
    args.quiet = True
    assert type(ctadata._make_progress(args, "get")) is ctadata.Progress


def test_verbose_logs_requests_but_never_the_token(cli, dav, tmp_path):
    make_tree(dav.root, {"d/a.txt": b"a", "d/b.txt": b"bb"})
    code, out, err = cli("-v", "get", "-r", "d", str(tmp_path) + "/")
    assert code == 0
    assert re.search(r"PROPFIND https?://127\.0\.0\.1:\d+/.*/d/ -> 207", err)
    assert re.search(r"GET .*/d/a\.txt -> 200", err)
    assert dav.token not in err and dav.token not in out


def test_progress_line_in_a_real_terminal(nginx_server, tmp_path):
    """Run the CLI in a pseudo-terminal and read what it draws."""
    import pty
    make_tree(nginx_server.root / "tty", {"f%d" % i: os.urandom(200000) for i in range(20)})
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "BEARER_TOKEN": nginx_server.token}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(str(tmp_path))
        os.execve(sys.executable, [sys.executable, "-m", "ctadata", "--url", nginx_server.url,
                                   "-j", "1", "get", "-r", "tty"], env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, screen
    assert "get: 20 files (20 transferred, 0 skipped, 0 failed)" in screen
    assert re.search(r"\rget \d+/\d+\+? files ", screen)     # the live line was drawn
    assert "\r\x1b[K" in screen                              # and cleared before the summary
    assert len(list((tmp_path / "tty").iterdir())) == 20
