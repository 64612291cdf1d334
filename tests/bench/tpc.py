#!/usr/bin/env python3
"""Benchmark `ctadata cp` (HTTP third-party copy) against davix-cp and gfal-copy
between two XRootD 5.5 instances on loopback (issue 11).

    python3 tests/bench/tpc.py                # 1 GiB file and a 249-file tree, 3 repetitions
    python3 tests/bench/tpc.py --quick        # 64 MiB, 1 repetition
    python3 tests/bench/tpc.py --tasks cp_big --reps 5

Two XRootD instances from tests/servers.py: A (the source) with authorization
and macaroons, reached with the test client certificate (as a grid user with
an X.509 proxy would); B (the destination) open.  Every tool copies A -> B by
HTTP-TPC pull (B fetches from A), the data never passes through the tool:

  ctadata cp             asks A for a macaroon (DOWNLOAD) itself, then checks
                         the adler32 of both sides (HEAD + Want-Digest)
  ctadata cp --no-verify the same without the checksum comparison
  davix-cp --copy-mode pull  with "Credential: none" and the macaroon (asked of
                         A by this script beforehand, with curl, not timed) as
                         TransferHeaderAuthorization; it makes no folders, so its
                         destination folders are made beforehand (not timed)
  gfal-copy [-K ADLER32] asks both sides for macaroons itself (X509_USER_PROXY);
                         -K compares checksums
  and for the tree: `ctadata cp -r -j 4`, `gfal-copy -r`, and davix-cp once per
  file through `xargs -P 4`.

Every run starts with an empty destination and is checked afterwards: each
copied file's sha256 on B's disk.  Standard library only; 127.0.0.1 only.
Results: a table on stdout, JSON in tests/bench/results/tpc.json.
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import servers  # noqa: E402
from datagen import sha256_file  # noqa: E402
from run import clear_dir  # noqa: E402

PY = sys.executable
CTADATA = os.path.join(REPO, "ctadata.py")
# gfal-copy runs under the Python that has the gfal2 module (Debian's), not
# whichever python3 comes first on PATH
GFAL_PYTHON = "/usr/bin/python3"
TASKS = ["cp_big", "cp_tree"]
TREE_FILES, TREE_DIRS = 249, 9


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Data:
    """The source data below A's root: big.bin and tree/dNN/fNNN.bin (sizes
    from 1 KiB to 1 MiB), made once per profile, with their sha256."""

    def __init__(self, base, big_bytes):
        self.root = os.path.join(base, "a")
        self.big_bytes = big_bytes
        self.record = os.path.join(base, "data.json")

    def ensure(self):
        try:
            with open(self.record) as f:
                rec = json.load(f)
            if rec["big_bytes"] == self.big_bytes and os.path.getsize(
                    os.path.join(self.root, "big.bin")) == self.big_bytes:
                self.sums = rec["sums"]
                return
        except (OSError, ValueError, KeyError):
            pass
        log("[tpc] making the data: %d MiB + %d files" % (self.big_bytes >> 20, TREE_FILES))
        clear_dir(self.root)
        sums = {}
        h = hashlib.sha256()
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            left = self.big_bytes
            while left:
                b = os.urandom(min(left, 8 << 20))
                f.write(b)
                h.update(b)
                left -= len(b)
        sums["big.bin"] = h.hexdigest()
        for i in range(TREE_FILES):
            rel = "tree/d%02d/f%03d.bin" % (i % TREE_DIRS, i)
            data = os.urandom(1024 << (i % 11))       # 1 KiB .. 1 MiB
            os.makedirs(os.path.dirname(os.path.join(self.root, rel)), exist_ok=True)
            with open(os.path.join(self.root, rel), "wb") as f:
                f.write(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
        with open(self.record, "w") as f:
            json.dump({"big_bytes": self.big_bytes, "sums": sums}, f)
        self.sums = sums


def measure(argv, env, cwd, timeout):
    t0 = time.perf_counter()
    out = os.path.join(cwd, "out.txt")
    with open(out, "wb") as so:
        try:
            p = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=so,
                               stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    with open(out, "rb") as f:
        text = f.read()[-400:].decode("utf-8", "replace")
    return rc, wall, text


class Bench:
    def __init__(self, args):
        self.args = args
        profile = "quick" if args.quick else "full"
        self.base = os.path.join(HERE, "data", "tpc-" + profile)
        os.makedirs(self.base, exist_ok=True)
        self.data = Data(self.base, (64 << 20) if args.quick else (1 << 30))
        self.work = os.path.join(self.base, "work")
        self.results = {}

    def start(self):
        w = self.work
        clear_dir(w)
        os.chmod(self.base, 0o755)
        ca_dir = os.path.join(w, "ca")
        self.a = servers.start_xrootd(self.data.root, os.path.join(w, "xa"), ca_dir=ca_dir,
                                      macaroons=True)
        self.b = servers.start_xrootd(os.path.join(w, "b"), os.path.join(w, "xb"),
                                      ca_dir=ca_dir)
        self.ca = self.a.ca_file
        self.certdir = os.path.join(ca_dir, "certdir")
        self.cert = os.path.join(w, "user.pem")          # private, as ctadata wants it
        shutil.copyfile(self.a.client_cert, self.cert)
        os.chmod(self.cert, 0o600)
        self.home = os.path.join(w, "home")
        os.makedirs(self.home)
        log("[tpc] XRootD A (macaroons) %s, B (open) %s" % (self.a.url, self.b.url))

    def stop(self):
        for srv in (getattr(self, "a", None), getattr(self, "b", None)):
            if srv is not None:
                srv.stop()

    def env(self, **extra):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "NO_PROXY": "*", "no_proxy": "*",
               "TMPDIR": self.work}
        env.update(extra)
        return env

    def macaroon(self):
        """A DOWNLOAD macaroon for A's whole tree, as a davix user would get
        one (curl with the certificate)."""
        out = subprocess.run(
            ["curl", "-q", "-sS", "-f", "--cacert", self.ca, "--cert", self.cert, "-X", "POST",
             "-H", "Content-Type: application/macaroon-request", "-d",
             '{"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT2H"}', self.a.url + "/"],
            stdout=subprocess.PIPE, check=True).stdout
        return json.loads(out.decode())["macaroon"]

    def tools(self, task):
        A, B = self.a.url, self.b.url
        ct = [PY, CTADATA, "--url", A, "--ca-file", self.ca, "--auth", "x509",
              "--cert", self.cert, "-q"]
        gfal_env = self.env(GFAL_PYTHONBIN=GFAL_PYTHON, X509_USER_PROXY=self.cert,
                            X509_CERT_DIR=self.certdir)
        davix = ["davix-cp", "--copy-mode", "pull", "--capath", self.certdir, "-H",
                 "Credential: none", "-H", "TransferHeaderAuthorization: Bearer " +
                 self.macaroon()]
        dest = self.b.root
        if task == "cp_big":
            want = {"big.bin": self.data.sums["big.bin"]}
            return want, [
                ("ctadata cp", ct + ["cp", "big.bin", B + "/big.bin"], self.env(), None),
                ("ctadata cp --no-verify", ct + ["cp", "--no-verify", "big.bin", B + "/big.bin"],
                 self.env(), None),
                ("davix-cp --copy-mode pull", davix + [A + "/big.bin", B + "/big.bin"],
                 self.env(), None),
                ("gfal-copy", ["gfal-copy", A + "/big.bin", B + "/big.bin"], gfal_env, None),
                ("gfal-copy -K ADLER32", ["gfal-copy", "-K", "ADLER32", A + "/big.bin",
                                          B + "/big.bin"], gfal_env, None),
            ]
        want = {k: v for k, v in self.data.sums.items() if k.startswith("tree/")}
        rels = sorted(want)

        def folders():           # davix-cp makes no folders
            for d in sorted(set(os.path.dirname(r) for r in rels)):
                os.makedirs(os.path.join(dest, d), exist_ok=True)
            self.b.grant_access(dest)
        pairs = "".join("%s/%s %s/%s\n" % (A, r, B, r) for r in rels)
        script = "printf '%%s' \"$PAIRS\" | xargs -P 4 -n 2 %s" % " ".join(
            "'%s'" % a for a in davix)
        return want, [
            ("ctadata cp -r -j 4", ct + ["cp", "-r", "-j", "4", "tree", B + "/"], self.env(),
             None),
            ("davix-cp x249, xargs -P 4", ["sh", "-c", script], self.env(PAIRS=pairs), folders),
            ("gfal-copy -r", ["gfal-copy", "-r", A + "/tree", B + "/tree"], gfal_env, None),
        ]

    def verify(self, want):
        for rel, sha in want.items():
            path = os.path.join(self.b.root, rel)
            if not os.path.isfile(path):
                return "missing %s" % rel
            if sha256_file(path) != sha:
                return "sha256 of %s differs" % rel
        return None

    def run(self, task):
        want, tools = self.tools(task)
        res = {}
        runs_dir = os.path.join(self.work, "runs")
        for rep in range(self.args.reps):
            k = rep % len(tools)
            for name, argv, env, prepare in tools[k:] + tools[:k]:
                if shutil.which(argv[0]) is None:
                    res.setdefault(name, {"missing": argv[0], "runs": []})
                    continue
                clear_dir(self.b.root)
                self.b.grant_access(self.b.root)
                if prepare:
                    prepare()
                clear_dir(runs_dir)
                rc, wall, text = measure(argv, env, runs_dir, 600)
                err = None if rc == 0 else "exit %s: %s" % (rc, " | ".join(text.split("\n")[-3:]))
                if err is None:
                    err = self.verify(want)
                res.setdefault(name, {"missing": None, "runs": []})["runs"].append(
                    {"ok": err is None, "wall_s": round(wall, 3), "error": err})
                log("  %-8s %d/%d %-28s %7.2f s  %s" % (task, rep + 1, self.args.reps, name,
                                                      wall, "ok" if err is None else err[:160]))
        clear_dir(self.b.root)
        for tr in res.values():
            good = [r["wall_s"] for r in tr["runs"] if r["ok"]]
            tr["ok"] = bool(tr["runs"]) and len(good) == len(tr["runs"])
            tr["median_wall_s"] = round(statistics.median(good), 3) if good else None
            bad = [r["error"] for r in tr["runs"] if r["error"]]
            tr["failure"] = bad[0] if bad else ("not installed" if tr["missing"] else None)
        return res


def version(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20,
                           env=dict(os.environ, GFAL_PYTHONBIN=GFAL_PYTHON))
        return p.stdout.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=" ".join(TASKS), help="cp_big, cp_tree (default both)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB, 1 repetition")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "tpc.json"))
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    tasks = [t for t in TASKS if t in args.tasks.replace(",", " ").split()]
    reason = servers.xrootd_missing_reason(macaroons=True)
    if reason:
        log("[tpc] skipped: %s (make deps installs XRootD)" % reason)
        return 0
    bench = Bench(args)
    bench.data.ensure()
    started = datetime.datetime.now(datetime.timezone.utc)
    bench.start()
    try:
        for task in tasks:
            log("[tpc] %s" % task)
            bench.results[task] = bench.run(task)
    finally:
        bench.stop()
    versions = {"ctadata": version([PY, CTADATA, "--version"]),
                "davix": version(["davix-cp", "--version"]),
                "gfal-copy": version(["gfal-copy", "--version"]),
                "xrootd": version(["xrootd", "-v"])}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"date": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "reps": args.reps,
                   "big_bytes": bench.data.big_bytes, "tree_files": TREE_FILES,
                   "versions": versions, "tasks": bench.results}, f, indent=1)
    print("HTTP third-party copy between two XRootD 5.5 instances on loopback, %s, "
          "%d rep(s), medians" % (started.strftime("%Y-%m-%d"), args.reps))
    print("versions: %s" % ", ".join("%s" % v for v in versions.values() if v))
    print("%-8s %-28s %9s  %s" % ("task", "tool", "wall s", "ok"))
    failed = False
    for task, res in bench.results.items():
        for name, tr in res.items():
            ok = "MISSING" if tr["missing"] else "%d/%d" % (
                sum(r["ok"] for r in tr["runs"]), len(tr["runs"]))
            print("%-8s %-28s %9s  %s%s" % (task, name, "-" if tr["median_wall_s"] is None else
                                            "%.2f" % tr["median_wall_s"], ok,
                                            "  " + tr["failure"][:100] if tr["failure"] else ""))
            failed = failed or (name.startswith("ctadata") and not tr["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
