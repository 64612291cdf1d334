#!/usr/bin/env python3
"""A/B: two versions of ctadata on the same task, runs alternating.

The machine is shared and noisy, so A and B run in turns (A B B A A B ...)
and the medians of wall time and CPU time (user + system of the ctadata
process) are compared.  A version is a folder holding a ctadata.py (e.g.
`git show main:ctadata.py > /tmp/a/ctadata.py`), run as `python3 -m ctadata`
with that folder first on PYTHONPATH, or a built zipapp (`*.pyz`, run as
`python3 X.pyz`, as users run it); each may carry its own extra arguments
(`--a-args "-j 16"`).  The server is nginx (dav-ext) on 127.0.0.1 serving
generated data, directly or through the latency proxy (--rtt; --net https:
TLS, door: https with every GET 307-redirected to a pool behind its own
proxy, as in `make bench WAN=1`).

    python3 tests/bench/ab.py /tmp/a /tmp/b --task get_many --reps 9
    python3 tests/bench/ab.py /tmp/a.pyz /tmp/b.pyz --task get_big --reps 7
    python3 tests/bench/ab.py dist/ctadata.pyz dist/ctadata.pyz --b-args "-j 16" \\
        --task get_many --rtt 20 --reps 3

Tasks: get_many (`get -r` of 5,000 x 16 KiB in 50 folders; --files N for
fewer), get_big (`get` of 1 GiB; --big-mib for another size), put_big,
put_many, ls_wide (`ls -U` of 20,000 names).  Nothing but the version's
extra arguments and -q is passed: default settings otherwise.  The data is
made once below --data (default /tmp/ctadata-ab-data) and kept.
"""

import argparse
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import servers  # noqa: E402

MiB = 1 << 20


def make_data(root, task, files, big_mib):
    many = root / ("many%d" % files if files != 5000 else "many")
    if task in ("get_many", "put_many") and not (many / "done").exists():
        shutil.rmtree(str(many), ignore_errors=True)
        ndirs = max(1, min(50, files // 25))
        for i in range(files):
            d = many / ("d%02d" % (i % ndirs))
            d.mkdir(parents=True, exist_ok=True)
            (d / ("f%05d.bin" % i)).write_bytes(os.urandom(16384))
        (many / "done").write_bytes(b"")
    big = root / ("big%d.bin" % big_mib)
    if task in ("get_big", "put_big") and not (big.exists() and big.stat().st_size == big_mib * MiB):
        with open(str(big), "wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(MiB))
    wide = root / "wide"
    if task == "ls_wide" and not (wide / "done").exists():
        shutil.rmtree(str(wide), ignore_errors=True)
        wide.mkdir()
        for i in range(20000):
            (wide / ("w%05d.dat" % i)).write_bytes(b"x" * 1024)
        (wide / "done").write_bytes(b"")
    return many, big


def start_proxy(url, rtt, window):
    scheme, hostport = url.rstrip("/").split("://", 1)
    argv = [sys.executable, str(HERE / "latency.py"), "--to", hostport, "--rtt", str(rtt)]
    if window:
        argv += ["--window", str(window)]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         start_new_session=True)
    line = p.stdout.readline().decode().split()
    if len(line) != 2 or line[0] != "listening":
        p.kill()
        raise SystemExit("latency proxy did not start")
    return p, "%s://%s" % (scheme, line[1])


def run_once(version, extra, url, token, argv, home, ca, stdout=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "BEARER_TOKEN": token, "LC_ALL": "C.UTF-8"}
    if ca:
        env["X509_CERT_FILE"] = ca
    if version.suffix == ".pyz":
        cmd, cwd = [sys.executable, str(version)], str(home)
    else:
        # cwd: `python -m` puts the current folder first on sys.path
        env["PYTHONPATH"] = str(version)
        cmd, cwd = [sys.executable, "-m", "ctadata"], str(version)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--url", url, "-q"] + extra + argv, env=env, cwd=cwd,
                            stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else status >> 8
    if code != 0:
        raise SystemExit("%s failed (%s): %s" % (version, code, err[-2000:]))
    return wall, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="version A: a folder holding ctadata.py, or a .pyz")
    ap.add_argument("b", help="version B: a folder holding ctadata.py, or a .pyz")
    ap.add_argument("--task", default="get_many",
                    choices=["get_many", "get_big", "put_big", "put_many", "ls_wide"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--args", default="", help="extra arguments for both versions")
    ap.add_argument("--a-args", default="", help="extra arguments for version A")
    ap.add_argument("--b-args", default="", help="extra arguments for version B")
    ap.add_argument("--files", type=int, default=5000, help="get_many/put_many: files (16 KiB)")
    ap.add_argument("--big-mib", type=int, default=1024, help="get_big/put_big: MiB")
    ap.add_argument("--rtt", type=float, default=0, help="through the latency proxy (ms)")
    ap.add_argument("--window", type=float, default=4, help="the proxy's window (MiB, 0: none)")
    ap.add_argument("--net", default="http", choices=["http", "https", "door"])
    ap.add_argument("--data", default="/tmp/ctadata-ab-data")
    args = ap.parse_args()
    data = Path(args.data)
    (data / "root").mkdir(parents=True, exist_ok=True)
    many, big = make_data(data / "root", args.task, args.files, args.big_mib)
    work = Path(tempfile.mkdtemp(prefix="ctadata-ab-"))
    token = secrets.token_urlsafe(24)
    versions = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    extra = {"A": shlex.split(args.args) + shlex.split(args.a_args),
             "B": shlex.split(args.args) + shlex.split(args.b_args)}
    out = work / "out"
    times = {"A": [], "B": []}
    stops = []
    try:
        tls = args.net != "http"
        srv = servers.start_nginx(data / "root", token, work / "nginx", tls=tls)
        stops.append(srv.stop)
        url, ca = srv.url, srv.ca_file
        if args.net == "door":
            shutil.copytree(str(work / "nginx" / "tls"), str(work / "pool" / "tls"))
            pool = servers.start_nginx(data / "root", token, work / "pool", tls=True,
                                       static_only=True)
            stops.append(pool.stop)
            pool_url = pool.url
            if args.rtt:
                pp, pool_url = start_proxy(pool.url, args.rtt, args.window)
                stops.append(pp.kill)
            shutil.rmtree(str(work / "door" / "tls"), ignore_errors=True)
            shutil.copytree(str(work / "nginx" / "tls"), str(work / "door" / "tls"))
            door = servers.start_nginx(data / "root", token, work / "door", tls=True,
                                       redirect_get=pool_url)
            stops.append(door.stop)
            url = door.url
        if args.rtt:
            p, url = start_proxy(url, args.rtt, args.window)
            stops.append(p.kill)
        rel = os.path.relpath(str(many), str(data / "root"))
        brel = os.path.relpath(str(big), str(data / "root"))

        def one(name):
            shutil.rmtree(str(out), ignore_errors=True)
            shutil.rmtree(str(data / "root" / "scratch"), ignore_errors=True)
            out.mkdir()
            if args.task == "get_many":
                argv = ["get", "-r", rel, str(out / "many")]
            elif args.task == "get_big":
                argv = ["get", brel, str(out / "big.bin")]
            elif args.task == "put_big":
                argv = ["put", str(big), "scratch/big.bin"]
            elif args.task == "ls_wide":
                argv = ["ls", "-U", "wide"]
            else:
                argv = ["put", "-r", str(many), "scratch/many"]
            return run_once(versions[name], extra[name], url, token, argv, work, ca)
        one("A"), one("B")  # warm-up: bytecode compiled, page cache filled
        order = ["A", "B", "B", "A"]
        for i in range(args.reps * 2):
            name = order[i % 4]
            wall, cpu = one(name)
            times[name].append((wall, cpu))
            print("%s wall %6.3f s  cpu %6.3f s" % (name, wall, cpu), flush=True)
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(str(work), ignore_errors=True)
        shutil.rmtree(str(data / "root" / "scratch"), ignore_errors=True)
    print("\n%s%s, medians of %d runs each (alternating):" % (
        args.task, ", %g ms %s" % (args.rtt, args.net) if args.rtt else "", args.reps))
    med = {}
    for name in ("A", "B"):
        walls = [w for w, _c in times[name]]
        cpus = [c for _w, c in times[name]]
        med[name] = statistics.median(walls), statistics.median(cpus)
        print("  %s  wall %6.3f s (%.3f-%.3f)  cpu %6.3f s (%.3f-%.3f)  %s %s" % (
            name, med[name][0], min(walls), max(walls), med[name][1], min(cpus), max(cpus),
            versions[name], " ".join(extra[name])))
    print("  B/A  wall %.3f  cpu %.3f" % (med["B"][0] / med["A"][0], med["B"][1] / med["A"][1]))


if __name__ == "__main__":
    main()
