#!/usr/bin/env python3
"""What upload progress costs: CPU time of `ctadata put` of a 1 GiB file to a
loopback nginx, the module of another git revision (default main, whose
uploads tell the progress once, at the end) against this checkout's (which
tells it of every 256 KiB block sent), in alternating runs; medians.

    python3 tests/bench/progress_cost.py [--reps 7] [--size-mib 1024] [--base main]

Each run is a fresh `python3 -m ctadata put` (stderr not a terminal: the
counting Progress; and `--progress` for this checkout's log line).  The CPU
time is the child's user+system time (os.wait4).  Loopback only.
"""

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))

import servers  # noqa: E402


def module_dir(rev, where):
    """A folder holding ctadata.py as of git revision *rev* (None: this checkout)."""
    os.makedirs(where, exist_ok=True)
    dst = os.path.join(where, "ctadata.py")
    if rev is None:
        shutil.copy2(os.path.join(REPO, "ctadata.py"), dst)
    else:
        src = subprocess.check_output(["git", "-C", REPO, "show", rev + ":ctadata.py"])
        with open(dst, "wb") as f:
            f.write(src)
    subprocess.check_call([sys.executable, "-m", "py_compile", dst])
    return where


def run(pydir, url, token, local, extra):
    env = dict(os.environ, PYTHONPATH=pydir, BEARER_TOKEN=token)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ctadata", "--url", url, "put", "-q"] +
                            extra + [local, "big.bin"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.WEXITSTATUS(status) != 0:
        raise SystemExit("put failed (%s)" % extra)
    return usage.ru_utime + usage.ru_stime, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--base", default="main")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ctadata-progress-cost-")
    try:
        local = os.path.join(tmp, "big.bin")
        with open(local, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(a.size_mib):
                f.write(block)
        variants = [("%s" % a.base, module_dir(a.base, os.path.join(tmp, "base")), []),
                    ("this checkout", module_dir(None, os.path.join(tmp, "head")), []),
                    ("this checkout --progress", os.path.join(tmp, "head"), ["--progress"])]
        token = secrets.token_urlsafe(24)
        with servers.start_nginx(os.path.join(tmp, "root"), token,
                                 os.path.join(tmp, "work")) as srv:
            os.makedirs(os.path.join(tmp, "root"), exist_ok=True)
            times = {name: [] for name, _, _ in variants}
            for i in range(a.reps + 1):
                for name, pydir, extra in variants:
                    cpu, wall = run(pydir, srv.url, token, local, extra)
                    if i:  # the first round warms the page cache
                        times[name].append((cpu, wall))
                    os.unlink(os.path.join(tmp, "root", "big.bin"))
        print("put of %d MiB to loopback nginx, %d alternating runs (medians):"
              % (a.size_mib, a.reps))
        for name, _, _ in variants:
            cpu = statistics.median(t[0] for t in times[name])
            wall = statistics.median(t[1] for t in times[name])
            print("  %-26s CPU %.3f s  wall %.3f s  (CPU: %s)" % (
                name, cpu, wall, " ".join("%.2f" % t[0] for t in times[name])))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
