#!/usr/bin/env python3
"""Does `get --stage -r` overlap downloads with staging? (issue 12)

The issue's measure: `ctadata get --stage -r` of 100 files on a 2-drive
emulated tape finishes within 10 % of the emulator's own staging time (the
makespan: first stage request submitted -> last file on disk).

The tape is tests/tapeserver.py on 127.0.0.1, on the REAL clock (speed 1),
each file taking STAGE seconds on a drive; ctadata runs as a user runs it
(`python3 -m ctadata get --stage -r`, a separate process), its polling set
by the profile's stage_poll.  Polling only makes sense relative to recall
times, so each run scales the default policy (1 s doubling to 60 s) by
STAGE / RECALL, where RECALL is what one file's recall takes on a real
tape system (positioning + reading a GB-sized file: ~30-120 s on LTO once
the tape is mounted; 60 s by default).  With STAGE = 1 s and RECALL = 60 s,
the client polls from every 1/60 s up to every 1 s: what the default
(1 s -> 60 s) does on 60-s recalls, 60 times faster.  --unscaled also runs
the default policy itself against the 1-s emulated recalls (which makes
its 60-s ceiling look 60 times worse than it is on real tape).

Printed per run: the client's wall time, the tape's makespan (wall), their
ratio, and for comparison the time of `stage --wait` followed by a plain
`get -r` of the same files (no overlap).

    python3 tests/bench/tape_stage.py                      # 100 x 4 MiB, 2 drives, 1 s each
    python3 tests/bench/tape_stage.py --files 20 --stage 0.5 --unscaled
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))

from tapeserver import TapeServer  # noqa: E402

TOKEN = "bench-tape-token-0123456789"


def run_cli(env, *argv):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ctadata"] + list(argv), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if p.returncode != 0:
        raise SystemExit("ctadata %s failed (%d):\n%s" % (" ".join(argv), p.returncode,
                                                          p.stderr))
    return time.monotonic() - t0, p.stdout


def one_run(work, args, poll, label):
    root = work / "tape"
    env = dict(os.environ, PYTHONPATH=str(REPO), BEARER_TOKEN=TOKEN,
               XDG_CONFIG_HOME=str(work / "cfg"), HOME=str(work))
    env.pop("CTADATA_PROFILE", None)
    cfg = work / "cfg" / "ctadata" / "config.ini"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[default]\nstage_poll = %rs,%rs\n" % poll)
    out = {"label": label, "poll": poll}
    with TapeServer(str(root), token=TOKEN, drives=args.drives, stage_seconds=args.stage,
                    disk_lifetime=3600, nearline_get_timeout=30) as tape:
        # overlapped: get --stage -r
        dest = work / "out-stage"
        shutil.rmtree(str(dest), ignore_errors=True)
        out["client"], _ = run_cli(env, "--url", tape.url, "-j", "4", "get", "--stage",
                                   "--release", "-r", "raw", str(dest) + "/")
        out["makespan"] = tape.makespan_wall()
        assert not tape.tape_only_gets(), "a GET of a file on tape only"
        assert len(list((dest / "raw").iterdir())) == args.files
        out["polls"] = len([r for r in tape.requests if r.method == "GET" and
                            r.path.startswith(tape.api_path + "/stage/")])
        # sequential: stage --wait, then a plain get (files released above)
        tape.reset_log()
        dest2 = work / "out-seq"
        shutil.rmtree(str(dest2), ignore_errors=True)
        t_stage, _ = run_cli(env, "--url", tape.url, "stage", "-r", "raw", "--wait")
        t_get, _ = run_cli(env, "--url", tape.url, "-j", "4", "get", "-r", "raw",
                           str(dest2) + "/")
        out["sequential"] = t_stage + t_get
        out["get_only"] = t_get
        assert not tape.tape_only_gets()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--size", type=int, default=4 << 20, help="bytes per file (4 MiB)")
    ap.add_argument("--drives", type=int, default=2)
    ap.add_argument("--stage", type=float, default=1.0,
                    help="emulated seconds per file on a drive (real clock)")
    ap.add_argument("--recall", type=float, default=60.0,
                    help="what one recall takes on a real tape system, to scale the "
                         "default polling by (seconds)")
    ap.add_argument("--unscaled", action="store_true",
                    help="also run with the default policy as it is (1 s -> 60 s)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctadata-tape-bench-"))
    try:
        raw = work / "tape" / "raw"
        raw.mkdir(parents=True)
        block = os.urandom(1 << 20)
        for i in range(args.files):
            with open(str(raw / ("run%03d.fits.fz" % i)), "wb") as f:
                left = args.size
                while left > 0:
                    f.write(block[:min(left, len(block))])
                    left -= len(block)
        scale = args.stage / args.recall
        runs = [(ctadata_default(scale), "default x %.4g (recall %g s)" % (scale, args.recall))]
        if args.unscaled:
            runs.append(((1.0, 60.0), "default, unscaled"))
        print("%d files x %d MiB, %d drives, %g s per file on a drive (real clock)" % (
            args.files, args.size >> 20, args.drives, args.stage))
        print("%-44s %9s %9s %7s %6s %11s %8s" % ("polling (first..longest)", "get", "makespan",
                                                 "ratio", "polls", "stage+get", "get only"))
        for poll, label in runs:
            r = one_run(work, args, poll, label)
            print("%-44s %8.2fs %8.2fs %6.1f%% %6d %10.2fs %7.2fs" % (
                "%s: %.3g..%.3g s" % (label, poll[0], poll[1]), r["client"], r["makespan"],
                100.0 * (r["client"] / r["makespan"] - 1), r["polls"], r["sequential"],
                r["get_only"]))
    finally:
        shutil.rmtree(str(work), ignore_errors=True)


def ctadata_default(scale):
    import ctadata
    first, longest = ctadata._STAGE_POLL
    return (first * scale, longest * scale)


if __name__ == "__main__":
    main()
