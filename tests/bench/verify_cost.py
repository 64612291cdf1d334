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
        put, v1, v4 = (statistics.median(x) for x in (puts, ver1, ver4))
        print("\n%d files of %d B in %d folders (%d PROPFIND Depth 1), median of %d:"
              % (args.files, args.size, args.dirs, len(index), args.reps))
        print("  put -r -j 4        %7.2f s" % put)
        print("  verify, 1 thread   %7.3f s  = %4.1f %% of the upload" % (v1, 100 * v1 / put))
        print("  verify, 4 threads  %7.3f s  = %4.1f %% of the upload" % (v4, 100 * v4 / put))
    finally:
        shutil.rmtree(str(work), ignore_errors=True)


if __name__ == "__main__":
    main()
