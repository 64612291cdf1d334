"""Helpers for tests that run ctadata as real, concurrent processes
(tests/test_conditions.py, tests/test_stress.py): a watched subprocess that
records what it left behind the moment it exits, polling with a deadline,
file hashes."""

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# Waits for one byte on stdin, then runs the command line: processes started
# one after the other begin their work at the same instant (see Run.release).
_GATE = ("import sys, ctadata; sys.stdin.buffer.read(1); sys.stdin.close(); "
         "sys.exit(ctadata.main(sys.argv[1:]))")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def file_sha(path):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def wait_for(pred, timeout=30.0, interval=0.01):
    """Poll *pred* until it is true or *timeout* seconds have passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def size_of(path):
    """Size of *path* itself (a symlink is not followed), -1 if absent."""
    try:
        return os.lstat(str(path)).st_size
    except OSError:
        return -1


def leftovers(root):
    """Partial downloads and their companions (NAME.part, NAME.part.*) below *root*."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if ".part" in p.name)


def cli_env(home, token):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "BEARER_TOKEN": token, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    if os.environ.get("X509_CERT_FILE"):  # a test server's private CA (the dav fixture)
        env["X509_CERT_FILE"] = os.environ["X509_CERT_FILE"]
    return env


class Run:
    """``python -m ctadata --url URL ARGS`` in a subprocess (token in
    $BEARER_TOKEN).  When it exits, *on_exit* runs at once in a watcher
    thread and its value is kept in ``snapshot``: what the process left
    behind at the moment it said it was done, before another process can
    change it.  With *gate*, the process waits for ``release()`` before it
    parses its command line.  *env*: more environment variables."""

    def __init__(self, url, argv, home, token, on_exit=None, gate=False, env=None):
        args = ["--url", url] + [str(a) for a in argv]
        self.argv = [sys.executable] + (["-c", _GATE] if gate else ["-m", "ctadata"]) + args
        self.on_exit = on_exit
        self.snapshot = None
        self.code = self.out = self.err = None
        self.started = self.ended = None
        self.done = threading.Event()
        # output to files, not pipes: nothing to drain, and stdin stays ours
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, env=dict(cli_env(home, token), **(env or {})),
                                     stdin=subprocess.PIPE if gate else subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err)
        if not gate:
            self.started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def release(self):
        self.started = time.monotonic()
        self.proc.stdin.write(b"go")
        self.proc.stdin.close()

    def _watch(self):
        self.proc.wait()
        self.ended = time.monotonic()
        if self.on_exit is not None:
            try:
                self.snapshot = self.on_exit()
            except Exception as e:  # the test sees it in .snapshot
                self.snapshot = e
        out = []
        for f in (self._out, self._err):
            f.seek(0)
            out.append(f.read().decode("utf-8", "replace"))
            f.close()
        self.code, (self.out, self.err) = self.proc.returncode, out
        self.done.set()

    def peek_err(self):
        """What the process has written to stderr so far."""
        if self.done.is_set():
            return self.err or ""
        try:
            return os.pread(self._err.fileno(), 1 << 20, 0).decode("utf-8", "replace")
        except (OSError, ValueError):  # closed meanwhile: it has exited
            return self.err or ""

    def wait(self, timeout=120):
        if not self.done.wait(timeout):
            self.kill()
            self.done.wait(10)
            raise AssertionError("still running after %ss: %s" % (timeout, self.argv))
        return self.code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def __repr__(self):
        err = self.err or ""
        if len(err) > 1500:
            err = err[:700] + "\n[...]\n" + err[-700:]
        return "<Run %s -> %s\n%s>" % (" ".join(self.argv[3:]), self.code, err)


def honest(run):
    """A run that did not exit 0 must say why truthfully: here nothing went
    wrong, so the only acceptable reason is "in progress elsewhere" (another
    process is downloading the file)."""
    return run.code == 0 or "in progress elsewhere" in (run.err or "")
