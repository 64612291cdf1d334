#!/usr/bin/env python3
"""Benchmark ctadata against curl, davix and rclone on a loopback nginx WebDAV server.

    python3 tests/bench/run.py                  # all default tasks, 3 repetitions
    python3 tests/bench/run.py --quick          # 1 repetition, small data (smoke test)
    python3 tests/bench/run.py --tasks "get_big ls_wide" --reps 5
    python3 tests/bench/run.py --tasks ls_huge  # the 200,000-entry memory check

See tests/bench/README.md.  Standard library only; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import datagen  # noqa: E402

PY = sys.executable
CTADATA = os.path.join(REPO, "ctadata.py")
# ctadata runs as an installed module does: its bytecode compiled once (as
# `pip install` does), then `python3 -m ctadata`.  Running the source file
# itself would compile ~5,000 lines on every start (and PYTHONDONTWRITEBYTECODE
# may forbid caching it), which no installed copy pays.
INSTALL = os.path.join(REPO, "build", "bench-install")


def install_ctadata():
    import importlib.util
    import py_compile
    import shutil
    os.makedirs(INSTALL, exist_ok=True)
    dst = os.path.join(INSTALL, "ctadata.py")
    shutil.copy2(CTADATA, dst)
    py_compile.compile(dst, cfile=importlib.util.cache_from_source(dst), doraise=True)


CT = [PY, "-m", "ctadata"]
TIME_BIN = "/usr/bin/time"

# execution order: cheap tasks first so a tight time budget loses the least
ALL_TASKS = ["startup", "zipapp", "ls_wide", "get_big", "get_many", "put_big", "put_many", "ls_huge"]
DEFAULT_TASKS = [t for t in ALL_TASKS if t != "ls_huge"]  # ls_huge only when asked for

# per-run timeouts in seconds (full, quick); also clipped to the remaining budget
TIMEOUTS = {
    "startup": (30, 30), "ls_wide": (120, 60), "get_big": (300, 60), "get_many": (300, 60),
    "put_big": (300, 60), "put_many": (300, 60), "ls_huge": (300, 120), "zipapp": (120, 120),
}
STARTUP_MIN_REPS = 10  # a ~50 ms process: more samples are nearly free
# a tool whose first run of a task took longer than this is not repeated (full
# profile): rclone needs ~1 min to download and ~3 min to upload the 5,000 small
# files (its webdav pacer spaces *all* requests >= 10 ms apart), 3 repetitions
# of that alone would not fit in the 15-minute budget.
SLOW_RUN_S = 30.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clear_dir(path: str) -> None:
    """Make ``path`` an existing, empty directory."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    else:
        os.makedirs(path)


def tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------

def measure(argv, env, workdir, timeout):
    """Run argv under /usr/bin/time; returns a dict (rc, wall_s, rss_mb, ...)."""
    timef = os.path.join(workdir, "time.txt")
    outf = os.path.join(workdir, "stdout.txt")
    errf = os.path.join(workdir, "stderr.txt")
    for p in (timef,):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [TIME_BIN, "-f", "%e %M", "-o", timef] + list(argv)
    timed_out = False
    t0 = time.perf_counter()
    with open(outf, "wb") as so, open(errf, "wb") as se:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                                env=env, cwd=workdir, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
    outer = time.perf_counter() - t0
    wall = rss_kb = None
    try:
        with open(timef) as f:
            lines = [ln.split() for ln in f.read().splitlines() if ln.strip()]
        for parts in reversed(lines):
            if len(parts) == 2:
                try:
                    wall, rss_kb = float(parts[0]), int(parts[1])
                    break
                except ValueError:
                    continue
    except OSError:
        pass
    return {
        "rc": rc, "timed_out": timed_out, "wall_s": wall, "wall_outer_s": round(outer, 4),
        "rss_mb": None if rss_kb is None else round(rss_kb / 1024.0, 1),
        "stdout": outf, "stderr": errf,
    }


# --------------------------------------------------------------------------
# verification: returns None when correct, else a reason
# --------------------------------------------------------------------------

def sha256_file(path):
    return datagen.sha256_file(path)


def verify_file(path, size, sha):
    if not os.path.isfile(path):
        return "missing %s" % os.path.basename(path)
    got = os.path.getsize(path)
    if got != size:
        return "size %d != %d" % (got, size)
    if sha256_file(path) != sha:
        return "sha256 mismatch"
    return None


def verify_tree(base, sums):
    found = set()
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            found.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    expected = set(sums)
    if found != expected:
        return "%d files (expected %d; %d missing, %d unexpected)" % (
            len(found), len(expected), len(expected - found), len(found - expected))
    bad = 0
    for rel, sha in sums.items():
        with open(os.path.join(base, rel), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha:
                bad += 1
    if bad:
        return "%d files with wrong sha256" % bad
    return None


def verify_names(path, expected):
    names = set()
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                names.add(line.rstrip("/").rsplit("/", 1)[-1])
    if names != expected:
        return "%d distinct names (expected %d; %d missing, %d unexpected)" % (
            len(names), len(expected), len(expected - names), len(names - expected))
    return None


# --------------------------------------------------------------------------
# the tasks and the command line of every tool
# --------------------------------------------------------------------------

PROPFIND_PY = (
    "import sys,re,urllib.parse as u;"
    "h=re.findall(rb'<(?:[A-Za-z0-9]+:)?href>([^<]*)</',sys.stdin.buffer.read());"
    "sys.stdout.write(''.join(u.unquote(x.decode()).rstrip('/').rsplit('/',1)[-1]+'\\n' for x in h[1:]))"
)


class Bench:
    def __init__(self, args):
        self.args = args
        self.profile = "quick" if args.quick else "full"
        self.ds = datagen.DataSet(os.path.join(HERE, "data"), self.profile)
        self.work = os.path.join(self.ds.dir, "work")
        self.out = os.path.join(self.work, "out")
        self.runs = os.path.join(self.work, "run")
        self.srv = None
        self.url = self.hostport = self.token = None
        self.t_start = time.monotonic()
        self.deadline = self.t_start + args.budget
        self.results = {}

    # -- environment ---------------------------------------------------------
    def env(self, extra=None):
        """A minimal, hermetic environment: no proxies, no stray tokens or configs."""
        home = os.path.join(self.work, "home")
        os.makedirs(home, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": home,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": self.work,
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        if extra:
            env.update(extra)
        return env

    def env_ctadata(self):
        return self.env({"BEARER_TOKEN": self.token, "PYTHONPATH": INSTALL})

    def env_rclone(self):
        conf = os.path.join(self.work, "rclone.conf")
        open(conf, "a").close()  # empty: the remote comes from the environment only
        return self.env({
            "RCLONE_CONFIG": conf,
            "RCLONE_CONFIG_BENCH_TYPE": "webdav",
            "RCLONE_CONFIG_BENCH_URL": self.url,
            "RCLONE_CONFIG_BENCH_VENDOR": "other",
            "RCLONE_CONFIG_BENCH_BEARER_TOKEN": self.token,
        })

    def auth(self):
        return "Authorization: Bearer %s" % self.token

    def ct(self, *args):
        return CT + ["--url", self.url] + list(args)

    # -- task definitions ------------------------------------------------------
    def tools(self, task):
        """[(tool, argv, env, prepare, verify)] for one task."""
        ds, out, scratch, U, auth = self.ds, self.out, self.ds.scratch, self.url, self.auth()
        dav = "dav://" + (self.hostport or "")
        prep_out = lambda: clear_dir(out)  # noqa: E731
        prep_scratch = lambda: clear_dir(scratch)  # noqa: E731
        big_out = os.path.join(out, "big.bin")
        big_up = os.path.join(scratch, "big.bin")
        many_out = os.path.join(out, "many")
        many_up = os.path.join(scratch, "many")
        size = ds.p["big_bytes"]

        def v_big(path):
            return lambda r: verify_file(path, size, ds.big_sha256)

        def v_tree(path):
            return lambda r: verify_tree(path, ds.many_sums)

        def v_names(expected):
            return lambda r: verify_names(r["stdout"], expected)

        if task == "startup":
            def v_version(r):
                with open(r["stdout"], "rb") as f:
                    s = f.read().decode("utf-8", "replace")
                return None if s.startswith("ctadata ") else "unexpected output %r" % s[:80]
            return [
                ("ctadata", CT + ["--version"], self.env_ctadata(), None, v_version),
                ("python -c pass", [PY, "-c", "pass"], self.env(), None, lambda r: None),
            ]
        if task == "get_big":
            return [
                ("ctadata", self.ct("get", "big.bin", big_out), self.env_ctadata(), prep_out, v_big(big_out)),
                ("curl", ["curl", "-q", "-sS", "-f", "-H", auth, "-o", big_out, U + "/big.bin"],
                 self.env(), prep_out, v_big(big_out)),
                ("davix-get", ["davix-get", "-H", auth, U + "/big.bin", big_out],
                 self.env(), prep_out, v_big(big_out)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", "bench:big.bin", out + "/"],
                 self.env_rclone(), prep_out, v_big(big_out)),
            ]
        if task == "get_many":
            return [
                ("ctadata -j4", self.ct("get", "-r", "-j", "4", "many", many_out), self.env_ctadata(),
                 prep_out, v_tree(many_out)),
                ("davix-get -r4", ["davix-get", "-r", "4", "-H", auth, dav + "/many/", many_out],
                 self.env(), prep_out, v_tree(many_out)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", "bench:many", many_out],
                 self.env_rclone(), prep_out, v_tree(many_out)),
            ]
        if task in ("ls_wide", "ls_huge"):
            names = ds.wide_names()
            if task == "ls_huge":
                hnames = ds.huge_names()
                return [
                    ("ctadata", self.ct("ls", "-U", "huge"), self.env_ctadata(), None, v_names(hnames)),
                    ("ctadata (wide)", self.ct("ls", "-U", "wide"), self.env_ctadata(), None, v_names(names)),
                ]
            script = ('curl -q -sS -f -X PROPFIND -H "Depth: 1" -H "Authorization: Bearer $BENCH_TOKEN" '
                      '"%s/wide/" | "%s" -c "%s"' % (U, PY, PROPFIND_PY.replace('"', '\\"')))
            return [
                ("ctadata", self.ct("ls", "-U", "wide"), self.env_ctadata(), None, v_names(names)),
                ("davix-ls", ["davix-ls", "-H", auth, dav + "/wide/"], self.env(), None, v_names(names)),
                ("rclone lsf", ["rclone", "lsf", "bench:wide"], self.env_rclone(), None, v_names(names)),
                ("curl+python", ["sh", "-c", script], self.env({"BENCH_TOKEN": self.token}), None,
                 v_names(names)),
            ]
        if task == "put_big":
            return [
                ("ctadata", self.ct("put", ds.big, "scratch/big.bin"), self.env_ctadata(),
                 prep_scratch, v_big(big_up)),
                ("curl -T", ["curl", "-q", "-sS", "-f", "-H", auth, "-T", ds.big, U + "/scratch/big.bin"],
                 self.env(), prep_scratch, v_big(big_up)),
                ("davix-put", ["davix-put", "-H", auth, ds.big, U + "/scratch/big.bin"],
                 self.env(), prep_scratch, v_big(big_up)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", ds.big, "bench:scratch/"],
                 self.env_rclone(), prep_scratch, v_big(big_up)),
            ]
        if task == "put_many":
            return [
                ("ctadata -j4", self.ct("put", "-r", "-j", "4", ds.many, "scratch/many"), self.env_ctadata(),
                 prep_scratch, v_tree(many_up)),
                ("davix-put -r4", ["davix-put", "-r", "4", "-H", auth, ds.many, dav + "/scratch/many"],
                 self.env(), prep_scratch, v_tree(many_up)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", ds.many, "bench:scratch/many"],
                 self.env_rclone(), prep_scratch, v_tree(many_up)),
            ]
        raise ValueError(task)

    # -- running ---------------------------------------------------------------
    def remaining(self):
        return self.deadline - time.monotonic()

    def run_task(self, task):
        reps = self.args.reps
        if task == "startup":
            reps = max(reps, STARTUP_MIN_REPS)
        tools = self.tools(task)
        res = {"reps": reps, "tools": {}}
        for name, argv, _e, _p, _v in tools:
            missing = shutil.which(argv[0]) is None
            res["tools"][name] = {"argv": self.redact(argv), "runs": [],
                                  "missing": argv[0] if missing else None}
        timeout = TIMEOUTS[task][1 if self.args.quick else 0]
        gave_up = set()
        for rep in range(reps):
            # interleaved (A B C, then B C A, ...): no tool always runs first,
            # after the same neighbour, in the same state of the page cache
            k = rep % len(tools)
            for name, argv, env, prepare, verify in tools[k:] + tools[:k]:
                tr = res["tools"][name]
                if tr["missing"] or name in gave_up:
                    continue
                left = self.remaining()
                if left <= 0:
                    tr["runs"].append({"rep": rep + 1, "ok": False, "skipped": True,
                                       "error": "skipped: time budget exhausted"})
                    continue
                if prepare:
                    prepare()
                run_dir = self.runs
                clear_dir(run_dir)
                r = measure(argv, env, run_dir, min(timeout, left + 60))
                err = None
                if r["timed_out"]:
                    err = "timeout after %.0f s" % r["wall_outer_s"]
                    gave_up.add(name)
                elif rep == 0 and reps > 1 and r["wall_outer_s"] > self.args.slow:
                    gave_up.add(name)
                    tr["capped"] = "1 run only: first run took %.0f s > %.0f s" % (
                        r["wall_outer_s"], self.args.slow)
                elif r["rc"] != 0:
                    err = "exit %s: %s" % (r["rc"], tail(r["stderr"], 300).replace("\n", " | "))
                else:
                    try:
                        err = verify(r)
                    except Exception as e:  # a broken output is a failure, not a crash
                        err = "verification error: %r" % (e,)
                    if err:
                        err = "WRONG RESULT: " + err
                if prepare:
                    prepare()  # do not leave GiBs behind between runs
                wall = r["wall_outer_s"] if task == "startup" else r["wall_s"]
                run = {"rep": rep + 1, "ok": err is None, "rc": r["rc"], "wall_s": wall,
                       "time_wall_s": r["wall_s"], "outer_wall_s": r["wall_outer_s"],
                       "rss_mb": r["rss_mb"]}
                if err:
                    run["error"] = err
                tr["runs"].append(run)
                log("  %-9s %d/%d %-15s %s s  %s MB  %s" % (
                    task, rep + 1, reps, name,
                    "-" if wall is None else ("%.3f" % wall if task == "startup" else "%.2f" % wall),
                    "-" if r["rss_mb"] is None else "%.1f" % r["rss_mb"],
                    "ok" if err is None else "FAIL " + err[:200]))
        self.summarise(task, res)
        return res

    def redact(self, argv):
        t = self.token or "\0"
        return [a.replace(t, "***") for a in argv]

    @staticmethod
    def summarise(task, res):
        for name, tr in res["tools"].items():
            runs = tr["runs"]
            good = [r for r in runs if r.get("ok")]
            tr["n_ok"], tr["n"] = len(good), len(runs)
            tr["ok"] = bool(runs) and len(good) == len(runs)
            walls = [r["wall_s"] for r in good if r.get("wall_s") is not None]
            rsss = [r["rss_mb"] for r in good if r.get("rss_mb") is not None]
            tr["median_wall_s"] = round(statistics.median(walls), 4) if walls else None
            tr["median_rss_mb"] = round(statistics.median(rsss), 1) if rsss else None
            errs = [r["error"] for r in runs if r.get("error")]
            tr["failure"] = errs[0] if errs else None
            if tr["missing"]:
                tr["failure"] = "not installed: %s" % tr["missing"]
        ct = res["tools"].get("ctadata") or res["tools"].get("ctadata -j4")
        if task == "ls_huge":
            ref = res["tools"]["ctadata (wide)"]
            if ct["ok"] and ref["ok"] and ct["median_rss_mb"] and ref["median_rss_mb"]:
                res["rss_ratio_vs_wide"] = round(ct["median_rss_mb"] / ref["median_rss_mb"], 2)
            return
        peers = [(tr["median_wall_s"], n) for n, tr in res["tools"].items()
                 if not n.startswith("ctadata") and tr["ok"] and tr["median_wall_s"]]
        if peers:
            best_wall, best = min(peers)
            res["best_peer"] = best
            if ct and ct["ok"] and ct["median_wall_s"] is not None:
                res["ratio_vs_best_peer"] = round(ct["median_wall_s"] / best_wall, 2)

    def run_zipapp(self):
        env = self.env()
        env["PYTHON"] = PY
        res = {"tools": {}}
        t0 = time.monotonic()
        pyz = os.path.join(REPO, "dist", "ctadata.pyz")
        err = None
        try:
            p = subprocess.run(["make", "-C", REPO, "zipapp", "PYTHON=" + PY], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=TIMEOUTS["zipapp"][0])
            if p.returncode != 0:
                err = "make zipapp exit %d: %s" % (p.returncode, p.stderr.decode("utf-8", "replace")[-300:])
            else:
                v = subprocess.run([PY, pyz, "--version"], env=env, capture_output=True, timeout=30)
                want = subprocess.run(CT + ["--version"], env=dict(env, PYTHONPATH=INSTALL),
                                      capture_output=True, timeout=30)
                if v.returncode != 0 or v.stdout != want.stdout:
                    err = "WRONG RESULT: pyz --version gave %r" % v.stdout[:80]
        except (OSError, subprocess.TimeoutExpired) as e:
            err = "make zipapp: %s" % e
        size = os.path.getsize(pyz) if err is None and os.path.exists(pyz) else None
        res["tools"]["ctadata.pyz"] = {
            "ok": err is None, "failure": err, "size_bytes": size,
            "size_kb": None if size is None else round(size / 1024.0, 1),
            "build_s": round(time.monotonic() - t0, 2),
        }
        log("  zipapp    dist/ctadata.pyz %s" % ("%.1f KB" % (size / 1024.0) if size else "FAIL " + str(err)))
        return res

    # -- main ---------------------------------------------------------------------
    def main(self, tasks):
        comps = []
        if {"get_big", "put_big"} & set(tasks):
            comps.append("big")
        if {"get_many", "put_many"} & set(tasks):
            comps.append("many")
        if {"ls_wide", "ls_huge"} & set(tasks):
            comps.append("wide")
        if "ls_huge" in tasks:
            comps.append("huge")
        t0 = time.monotonic()
        self.ds.ensure(comps)
        t_data = time.monotonic() - t0
        os.makedirs(self.work, exist_ok=True)
        need_server = any(t not in ("startup", "zipapp") for t in tasks)
        if need_server:
            from servers import start_nginx
            import secrets
            self.token = secrets.token_urlsafe(24)
            clear_dir(self.ds.scratch)
            self.srv = start_nginx(self.ds.root, self.token, os.path.join(self.work, "nginx"))
            self.url = self.srv.url.rstrip("/")
            self.hostport = self.url.split("://", 1)[1]
            assert self.hostport.startswith("127.0.0.1:"), self.url
            log("[bench] nginx at %s serving %s" % (self.url, self.ds.root))
        try:
            for task in tasks:
                log("[bench] %s" % task)
                if task == "zipapp":
                    self.results[task] = self.run_zipapp()
                else:
                    self.results[task] = self.run_task(task)
        finally:
            if self.srv is not None:
                self.srv.stop()
            for d in (self.out, self.ds.scratch, self.runs):
                if os.path.isdir(d):
                    clear_dir(d)
        return t_data


# --------------------------------------------------------------------------
# environment description and report
# --------------------------------------------------------------------------

def first_line(argv, stream="stdout"):
    try:
        p = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout if stream == "stdout" else p.stderr) or p.stdout or p.stderr
    lines = text.decode("utf-8", "replace").strip().splitlines()
    return lines[0].strip() if lines else None


def tool_versions():
    return {
        "ctadata": first_line([PY, os.path.join(INSTALL, "ctadata.py"), "--version"]),
        "python": sys.version.split()[0] + " (" + PY + ")",
        "curl": first_line(["curl", "--version"]),
        "davix": (first_line(["davix-get", "--version"]) or "").replace("Version:", "davix").strip() or None,
        "rclone": first_line(["rclone", "version"]),
        "nginx": first_line(["nginx", "-v"], "stderr"),
    }


def machine():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 1024.0 / 1024.0, 1)
    except (OSError, ValueError):
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"nproc": nproc, "cpu_model": cpu, "mem_gib": mem, "python": sys.version.split()[0],
            "platform": platform.platform()}


def fmt(v, nd=2):
    return "-" if v is None else ("%.*f" % (nd, v))


def table(results, profile_params):
    rows = [("task", "tool", "wall s", "RSS MB", "ok", "ctadata/best peer")]
    notes = []
    for task, res in results.items():
        if task == "zipapp":
            tr = res["tools"]["ctadata.pyz"]
            rows.append((task, "ctadata.pyz", "-", "-", "ok" if tr["ok"] else "FAIL",
                         "size %s KB" % fmt(tr["size_kb"], 1)))
            if tr["failure"]:
                notes.append("zipapp: " + tr["failure"])
            continue
        nd = 3 if task == "startup" else 2
        first = True
        for name, tr in res["tools"].items():
            if tr.get("missing"):
                status = "MISSING"
            elif tr["n"] and tr["ok"]:
                status = "%d/%d" % (tr["n_ok"], tr["n"]) + ("*" if tr.get("capped") else "")
            else:
                status = "FAIL %d/%d" % (tr["n_ok"], tr["n"])
            extra = ""
            if name.startswith("ctadata") and first:
                if task == "ls_huge":
                    extra = ("RSS x%.2f vs 20k-entry ls" % res["rss_ratio_vs_wide"]
                             if res.get("rss_ratio_vs_wide") else "-")
                elif res.get("ratio_vs_best_peer") is not None:
                    extra = "%.2f (%s)" % (res["ratio_vs_best_peer"], res["best_peer"])
                else:
                    extra = "n/a"
            rows.append((task if first else "", name, fmt(tr["median_wall_s"], nd),
                         fmt(tr["median_rss_mb"], 1), status, extra))
            if tr.get("failure"):
                notes.append("%s / %s: %s" % (task, name, tr["failure"]))
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[j].ljust(widths[j]) if j < 2 or j >= 4 else r[j].rjust(widths[j]) for j in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if any(tr.get("capped") for res in results.values() for tr in res["tools"].values()):
        lines.append("* run once only: its first run took longer than --slow seconds")
    if notes:
        lines.append("")
        lines.append("failures (first per tool):")
        for n in notes:
            lines.append("  " + n[:400])
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=None,
                    help="space/comma separated subset of: %s (default: all but ls_huge)"
                    % " ".join(ALL_TASKS))
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per tool and task (default 5: on a VM a 1 GiB write swings between 0.7 and 3 s; 1 with --quick; "
                         "startup: at least %d)" % STARTUP_MIN_REPS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 repetition, 64 MiB / 500 files / 2,000 entries")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run, data generation included; runs that would "
                         "start later are skipped (default 780; 300 with --quick)")
    ap.add_argument("--slow", type=float, default=SLOW_RUN_S,
                    help="do not repeat a tool whose first run of a task took longer than this "
                         "many seconds (default %.0f)" % SLOW_RUN_S)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"),
                    help="where to write the JSON results (default tests/bench/results/latest.json)")
    args = ap.parse_args(argv)
    if args.tasks:
        tasks = [t for t in args.tasks.replace(",", " ").split() if t]
        bad = [t for t in tasks if t not in ALL_TASKS]
        if bad:
            ap.error("unknown task(s): %s (choose from %s)" % (" ".join(bad), " ".join(ALL_TASKS)))
        args.task_list = [t for t in ALL_TASKS if t in tasks]
    else:
        args.task_list = list(DEFAULT_TASKS)
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.budget is None:
        args.budget = 300.0 if args.quick else 780.0
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.access(TIME_BIN, os.X_OK):
        sys.exit("bench: %s is missing (apt-get install -y time)" % TIME_BIN)
    bench = Bench(args)
    log("[bench] profile %s, tasks: %s, reps %d, budget %.0f s"
        % (bench.profile, " ".join(args.task_list), args.reps, args.budget))
    started = datetime.datetime.now(datetime.timezone.utc)
    install_ctadata()
    versions = tool_versions()
    ct_sha = sha256_file(CTADATA)
    t_data = bench.main(args.task_list)
    total = time.monotonic() - bench.t_start
    ct_changed = sha256_file(CTADATA) != ct_sha
    report = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": bench.profile,
        "reps": args.reps,
        "data": bench.ds.p,
        "machine": machine(),
        "tool_versions": versions,
        "ctadata_sha256": ct_sha,
        "ctadata_changed_during_run": ct_changed,
        "data_generation_s": round(t_data, 1),
        "total_s": round(total, 1),
        "tasks": bench.results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.json)
    m = report["machine"]
    print("ctadata benchmark, %s, profile %s, %d rep(s) (medians), %s" % (
        report["date"], bench.profile, args.reps, versions["ctadata"]))
    print("machine: %s CPU(s), %s, Python %s" % (m["nproc"], m["cpu_model"], m["python"]))
    print("peers: %s | %s | %s" % (versions["curl"] and " ".join(versions["curl"].split()[:2]),
                                   versions["davix"], versions["rclone"]))
    print("ctadata.py sha256 %s%s" % (ct_sha[:16], "  WARNING: ctadata.py changed during the run"
                                        if ct_changed else ""))
    print()
    print(table(bench.results, bench.ds.p))
    print()
    shown = os.path.abspath(args.json)
    if shown.startswith(REPO + os.sep):
        shown = os.path.relpath(shown, REPO)
    print("total %.0f s (data generation %.0f s); JSON: %s" % (total, t_data, shown))
    failed_ct = any(
        (tr.get("n") and not tr.get("ok")) for res in bench.results.values()
        for n, tr in res["tools"].items() if n.startswith("ctadata"))
    return 1 if failed_ct else 0


if __name__ == "__main__":
    sys.exit(main())
