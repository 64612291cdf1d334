#!/usr/bin/env python3
"""What would confirming an upload cost? (issue 10, case 10)

After `put -r`, ctadata is to check from the server that every file it sent
is there under its own name with the right size: one PROPFIND Depth 1 per
destination folder.  This script measures, against nginx (dav-ext) on
127.0.0.1:

  put      `python3 -m ctadata put -r -j 4 many scratch/many` of FILES files
           of SIZE bytes in DIRS folders (the bench's many/), wall time
  verify   one PROPFIND Depth 1 of every destination folder through
           ctadata.Client.iter_dir (parsing included), comparing each
           listed name and size with the local tree: on 1 thread and on 4

and prints the medians and verify/put in percent (the issue's budget: 5 %).

Then what ctadata's own confirmation (issue 10, case 10: _Confirm, one
PROPFIND Depth 1 per folder run by the worker pool as each folder's last
upload is done) costs: `Client.upload(recursive=True, jobs=4)` in this
process, with the confirmation and without it (ctadata._Uploads.confirmer
patched to return None), in alternating runs (--reps of each): wall time,
this process's CPU time, and how long the checks ran in all.

    python3 tests/bench/verify_cost.py                  # 5,000 x 16 KiB in 50 folders, 5 reps
    python3 tests/bench/verify_cost.py --files 500 --reps 2
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))

import ctadata  # noqa: E402
import servers  # noqa: E402


def make_tree(root, files, dirs, size):
    for i in range(files):
        d = root / ("d%02d" % (i % dirs))
        d.mkdir(parents=True, exist_ok=True)
        (d / ("f%05d.bin" % i)).write_bytes(os.urandom(size))


def local_index(root):
    index = {}
    for dirpath, _dirs, names in os.walk(str(root)):
        rel = os.path.relpath(dirpath, str(root))
        index[rel] = {n: os.path.getsize(os.path.join(dirpath, n)) for n in names}
    return index


def verify(client, remote_base, index, threads):
    """One PROPFIND Depth 1 per folder; returns the number of mismatches."""
    def one(rel):
        path = remote_base if rel == "." else remote_base + "/" + rel
        listed = {e.name: e.size for e in client.iter_dir(path) if not e.is_dir}
        return sum(1 for n, s in index[rel].items() if listed.get(n) != s)
    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, sorted(index)))


def confirm_cost(srv, token, src, reps):
    """Medians over *reps* alternating in-process uploads with and without
    the confirmation: {False: ..., True: ...} of (wall, cpu, tail), where
    tail is the time from the end of the last PUT to upload()'s return (what
    the confirmation adds to the wall time: the checks of the other folders
    overlap with uploads); and (wall, CPU) the checks themselves took (CPU
    of the worker threads inside them, time.thread_time)."""
    real_confirmer = ctadata._Uploads.confirmer
    real_check = ctadata._Confirm.check
    real_upload = ctadata._upload_file
    spent, last = [], [0.0]

    def timed_check(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return real_check(self)
        finally:
            spent.append((time.perf_counter() - t0, time.thread_time() - c0))

    def timed_upload(*a, **kw):
        try:
            return real_upload(*a, **kw)
        finally:
            last[0] = max(last[0], time.perf_counter())
    ctadata._Confirm.check = timed_check
    ctadata._upload_file = timed_upload
    runs = {False: [], True: []}
    try:
        with ctadata.Client(url=srv.url, token=token, env={}) as c:
            for i in range(2 * reps + 2):
                on = i % 4 in (1, 2)
                ctadata._Uploads.confirmer = real_confirmer if on else \
                    (lambda self, *a: None)
                shutil.rmtree(str(srv.root / "scratch"), ignore_errors=True)
                del spent[:]
                last[0] = 0.0
                w0, c0 = time.perf_counter(), time.process_time()
                s = c.upload(str(src), "scratch/", recursive=True, jobs=4)
                end = time.perf_counter()
                w, cpu, tail = end - w0, time.process_time() - c0, end - last[0]
                assert s.transferred == s.files and not s.failed, s
                checks = (sum(x[0] for x in spent), sum(x[1] for x in spent))
                if i >= 2:  # the first two warm up
                    runs[on].append((w, cpu, tail, checks))
                print("upload %s confirmation: wall %.3f s, cpu %.3f s, tail %.4f s, "
                      "checks %.3f s (cpu %.3f s)" % ("with" if on else "without", w, cpu,
                                                      tail, checks[0], checks[1]), flush=True)
    finally:
        ctadata._Uploads.confirmer = real_confirmer
        ctadata._Confirm.check = real_check
        ctadata._upload_file = real_upload
        shutil.rmtree(str(srv.root / "scratch"), ignore_errors=True)
    med = {on: tuple(statistics.median(r[k] for r in runs[on]) for k in range(3))
           for on in runs}
    checks = tuple(statistics.median(r[3][k] for r in runs[True]) for k in range(2))
    return med, checks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--dirs", type=int, default=50)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctadata-verify-cost-"))
    os.chmod(str(work), 0o755)
    token = secrets.token_urlsafe(24)
    try:
        src = work / "many"
        make_tree(src, args.files, args.dirs, args.size)
        index = local_index(src)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
               "BEARER_TOKEN": token, "PYTHONPATH": str(REPO)}
        with servers.start_nginx(work / "root", token, work / "nginx") as srv:
            puts, ver1, ver4 = [], [], []
            for rep in range(args.reps):
                shutil.rmtree(str(srv.root / "scratch"), ignore_errors=True)
                t0 = time.perf_counter()
                subprocess.check_call([sys.executable, "-m", "ctadata", "--url", srv.url,
                                       "-q", "put", "-r", "-j", "4", str(src), "scratch/"],
                                      env=env)
                puts.append(time.perf_counter() - t0)
                with ctadata.Client(url=srv.url, token=token, env={}) as c:
                    c.stat("")  # connected, as after an upload
                    for threads, out in ((1, ver1), (4, ver4)):
                        t0 = time.perf_counter()
                        bad = verify(c, "scratch/many", index, threads)
                        out.append(time.perf_counter() - t0)
                        assert bad == 0, bad
                print("rep %d: put %.2f s, verify %.3f s (1 thread) %.3f s (4 threads)"
                      % (rep, puts[-1], ver1[-1], ver4[-1]), flush=True)
            confirm = confirm_cost(srv, token, src, args.reps)
        put, v1, v4 = (statistics.median(x) for x in (puts, ver1, ver4))
        print("\n%d files of %d B in %d folders (%d PROPFIND Depth 1), median of %d:"
              % (args.files, args.size, args.dirs, len(index), args.reps))
        print("  put -r -j 4        %7.2f s" % put)
        print("  verify, 1 thread   %7.3f s  = %4.1f %% of the upload" % (v1, 100 * v1 / put))
        print("  verify, 4 threads  %7.3f s  = %4.1f %% of the upload" % (v4, 100 * v4 / put))
        med, (cw, cc) = confirm
        (w0, c0, t0), (w1, c1, t1) = med[False], med[True]
        print("\nClient.upload(recursive=True, jobs=4) in-process, median of %d each "
              "(alternating):" % args.reps)
        print("  without confirmation  wall %6.3f s  cpu %6.3f s  after the last PUT %6.4f s"
              % (w0, c0, t0))
        print("  with confirmation     wall %6.3f s  cpu %6.3f s  after the last PUT %6.4f s"
              % (w1, c1, t1))
        print("  the checks: %.3f s in the workers, %.3f s of CPU = %.1f %% of the upload's "
              "CPU; after the last PUT: %+.4f s = %.2f %% of the upload's wall time"
              % (cw, cc, 100 * cc / c0, t1 - t0, 100 * (t1 - t0) / w0))
    finally:
        shutil.rmtree(str(work), ignore_errors=True)


if __name__ == "__main__":
    main()
