#!/usr/bin/env python3
"""A/B: two versions of ctadata.py on the same loopback task, runs alternating.

The machine is shared and noisy, so A and B run in turns (A B B A A B ...)
and the medians of wall time and CPU time (user + system of the ctadata
process) are compared.  Each version is a folder holding a ctadata.py (e.g.
`git show main:ctadata.py > /tmp/a/ctadata.py`); it runs as
`python3 -m ctadata` with that folder first on PYTHONPATH, against nginx
(dav-ext) on 127.0.0.1 serving generated data.

    python3 tests/bench/ab.py /tmp/a /tmp/b --task get_many --reps 9
    python3 tests/bench/ab.py /tmp/a /tmp/b --task get_big --reps 7

Tasks: get_many (`get -r -j 4` of 5,000 x 16 KiB in 50 folders), get_big
(`get` of 1 GiB), put_many (`put -r -j 4` of the same 5,000 files).  The data
is made once below --data (default /tmp/ctadata-ab-data) and kept.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import servers  # noqa: E402

MiB = 1 << 20


def make_data(root, task):
    many = root / "many"
    if task in ("get_many", "put_many") and not (many / "done").exists():
        shutil.rmtree(str(many), ignore_errors=True)
        for i in range(5000):
            d = many / ("d%02d" % (i % 50))
            d.mkdir(parents=True, exist_ok=True)
            (d / ("f%05d.bin" % i)).write_bytes(os.urandom(16384))
        (many / "done").write_bytes(b"")
    big = root / "big.bin"
    if task == "get_big" and not (big.exists() and big.stat().st_size == 1024 * MiB):
        with open(str(big), "wb") as f:
            for _ in range(64):
                f.write(os.urandom(16 * MiB))


def run_once(version, url, token, argv, home):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "BEARER_TOKEN": token, "PYTHONPATH": str(version), "LC_ALL": "C.UTF-8"}
    t0 = time.perf_counter()
    # cwd: `python -m` puts the current folder first on sys.path
    proc = subprocess.Popen([sys.executable, "-m", "ctadata", "--url", url, "-q"] + argv,
                            env=env, cwd=str(version), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(
        os, "waitstatus_to_exitcode") else status >> 8
    if proc.returncode != 0:
        raise SystemExit("%s failed (%s): %s" % (version, proc.returncode, err[-2000:]))
    return wall, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="folder holding version A's ctadata.py")
    ap.add_argument("b", help="folder holding version B's ctadata.py")
    ap.add_argument("--task", default="get_many", choices=["get_many", "get_big", "put_many"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--data", default="/tmp/ctadata-ab-data")
    args = ap.parse_args()
    data = Path(args.data)
    (data / "root").mkdir(parents=True, exist_ok=True)
    make_data(data / "root", args.task)
    work = Path(tempfile.mkdtemp(prefix="ctadata-ab-"))
    token = secrets.token_urlsafe(24)
    versions = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    out = work / "out"
    times = {"A": [], "B": []}
    try:
        with servers.start_nginx(data / "root", token, work / "nginx") as srv:
            def one(name):
                shutil.rmtree(str(out), ignore_errors=True)
                shutil.rmtree(str(data / "root" / "scratch"), ignore_errors=True)
                out.mkdir()
                if args.task == "get_many":
                    argv = ["get", "-r", "-j", "4", "many", str(out / "many")]
                elif args.task == "get_big":
                    argv = ["get", "big.bin", str(out / "big.bin")]
                else:
                    argv = ["put", "-r", "-j", "4", str(data / "root" / "many"),
                            "scratch/many"]
                return run_once(versions[name], srv.url, token, argv, work)
            one("A"), one("B")  # warm-up: bytecode compiled, page cache filled
            order = ["A", "B", "B", "A"]
            for i in range(args.reps * 2):
                name = order[i % 4]
                wall, cpu = one(name)
                times[name].append((wall, cpu))
                print("%s wall %6.3f s  cpu %6.3f s" % (name, wall, cpu), flush=True)
    finally:
        shutil.rmtree(str(work), ignore_errors=True)
        shutil.rmtree(str(data / "root" / "scratch"), ignore_errors=True)
    print("\n%s, medians of %d runs each (alternating):" % (args.task, args.reps))
    med = {}
    for name in ("A", "B"):
        walls = [w for w, _c in times[name]]
        cpus = [c for _w, c in times[name]]
        med[name] = statistics.median(walls), statistics.median(cpus)
        print("  %s  wall %6.3f s (%.3f-%.3f)  cpu %6.3f s (%.3f-%.3f)  %s" % (
            name, med[name][0], min(walls), max(walls), med[name][1], min(cpus), max(cpus),
            versions[name]))
    print("  B/A  wall %.3f  cpu %.3f" % (med["B"][0] / med["A"][0], med["B"][1] / med["A"][1]))


if __name__ == "__main__":
    main()
