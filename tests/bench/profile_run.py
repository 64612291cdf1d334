#!/usr/bin/env python3
"""Where a zipapp run spends its time: cProfile over every thread.

    python3 tests/bench/profile_run.py ls -U wide
    python3 tests/bench/profile_run.py get -r many /tmp/out --rtt 20
    python3 tests/bench/profile_run.py --top 40 --sort tottime get big.bin /tmp/big.bin

Starts nginx (as `make bench` does) on the loopback bench data
(tests/bench/data/full/root, generated when missing; --profile wan for the
WAN data), optionally behind the latency proxy (--rtt MS), then runs
`dist/ctadata.pyz ARGS...` *in this process* under cProfile, the main thread
and every worker thread (threading.setprofile), with the wall clock as timer
(time spent waiting on the network, or for the GIL after a system call, shows
up in recv/sendall/open) or, with --cpu, each thread's CPU time.  Prints the total,
the top functions by cumulative and by own time, merged over all threads,
and writes the stats to tests/bench/results/profile.pstats (snakeviz,
`python3 -m pstats`).  The cache of the pyz is warmed first, so the run
starts as a second run does.
"""

import argparse
import cProfile
import io
import os
import pstats
import runpy
import secrets
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import datagen  # noqa: E402
import run as bench  # noqa: E402

PYZ = os.path.join(REPO, "dist", "ctadata.pyz")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="full", choices=sorted(datagen.PROFILES))
    ap.add_argument("--rtt", type=int, default=0, help="through the latency proxy (ms)")
    ap.add_argument("--window", type=float, default=4.0, help="latency proxy window, MiB")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default=None, help="only this order (cumulative, tottime, ...)")
    ap.add_argument("--cpu", action="store_true",
                    help="per-thread CPU time as the timer instead of the wall clock")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile.pstats"))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="ctadata's arguments (after --url)")
    a = ap.parse_args()
    if not a.args:
        ap.error("what should ctadata do? e.g. ls -U wide")
    subprocess.run(["make", "-s", "-C", REPO, "zipapp", "PYTHON=" + sys.executable], check=True,
                   stdout=subprocess.DEVNULL)
    ds = datagen.DataSet(os.path.join(HERE, "data"), a.profile)
    ds.ensure(["big", "many", "wide"])
    from servers import start_nginx
    token = secrets.token_urlsafe(24)
    work = os.path.join(ds.dir, "work")
    srv = start_nginx(ds.root, token, os.path.join(work, "nginx-profile"))
    proxy = None
    try:
        url = srv.url
        if a.rtt:
            proxy, url = bench.start_proxy(url, a.rtt, a.window, 0)
        home = os.path.join(work, "home-profile")
        os.makedirs(home, exist_ok=True)
        for k in [k for k in os.environ if k.startswith("PYTHON")]:
            del os.environ[k]
        os.environ.update({"HOME": home, "BEARER_TOKEN": token})
        subprocess.run([sys.executable, PYZ, "--version"], check=True, stdout=subprocess.DEVNULL)
        for p in a.args:  # a fresh destination for downloads
            if p.startswith(os.sep) and os.path.exists(p):
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        profs = []
        lock = threading.Lock()
        timer = time.thread_time if a.cpu else time.perf_counter

        def start_thread_profile(*_):
            p = cProfile.Profile(timer)
            with lock:
                profs.append(p)
            p.enable()

        sys.argv = [PYZ, "--url", url] + a.args
        real_stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")  # ls output is not what is measured
        threading.setprofile(start_thread_profile)
        main_prof = cProfile.Profile(timer)
        t0 = time.perf_counter()
        main_prof.enable()
        code = 0
        try:
            runpy.run_path(PYZ, run_name="__main__")
        except SystemExit as e:
            code = e.code
        finally:
            main_prof.disable()
            wall = time.perf_counter() - t0
            threading.setprofile(None)
            sys.stdout.close()
            sys.stdout = real_stdout
        stats = pstats.Stats(main_prof)
        for p in profs:
            try:
                p.disable()
            except Exception:
                pass
            stats.add(p)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        stats.dump_stats(a.out)
        print("ctadata %s: exit %s, %.3f s wall in this process (profiled: slower than a real run), "
              "%d worker thread(s) profiled%s; times: %s summed over threads"
              % (" ".join(a.args), code, wall, len(profs), ", RTT %d ms" % a.rtt if a.rtt else "",
                 "CPU" if a.cpu else "wall clock"))
        for order in ([a.sort] if a.sort else ["cumulative", "tottime"]):
            buf = io.StringIO()
            pstats.Stats(a.out, stream=buf).strip_dirs().sort_stats(order).print_stats(a.top)
            text = buf.getvalue()
            print(text[text.index("   ncalls"):] if "   ncalls" in text else text)
        print("stats: %s" % a.out)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        srv.stop()


if __name__ == "__main__":
    main()
