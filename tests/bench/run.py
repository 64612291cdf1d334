#!/usr/bin/env python3
"""Benchmark ctadata as users run it (python3 dist/ctadata.pyz) against curl, davix and rclone.

    python3 tests/bench/run.py                  # loopback: all default tasks, 5 repetitions
    python3 tests/bench/run.py --mode wan       # the same tasks through a latency proxy:
                                                #   20 and 80 ms RTT x http, https, 307 door
    python3 tests/bench/run.py --quick          # smoke test: 1 repetition, small data
    python3 tests/bench/run.py --tasks "get_big ls_wide" --reps 3
    python3 tests/bench/run.py --mode wan --rtt 20 --nets https,door
    python3 tests/bench/run.py --tasks ls_huge  # the 200,000-entry memory check

See tests/bench/README.md.  Standard library only; talks to 127.0.0.1 only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import datagen  # noqa: E402

PY = sys.executable
CTADATA = os.path.join(REPO, "ctadata.py")
# ctadata runs as users run it: the zipapp `make zipapp` builds, with its
# default settings.  Its __main__ keeps the compiled code in
# $HOME/.cache/ctadata/ (HOME is a scratch folder here), so from the second
# run on it starts like an installed module; `startup` and `ls_wide` also
# measure the first run, with that cache emptied.
PYZ = os.path.join(REPO, "dist", "ctadata.pyz")
CT = [PY, PYZ]
# For the start-up comparison only: an installed copy, bytecode compiled once
# (as `pip install` does), run as `python3 -m ctadata`.
INSTALL = os.path.join(REPO, "build", "bench-install")
LATENCY = os.path.join(HERE, "latency.py")
TIME_BIN = "/usr/bin/time"

# execution order: cheap tasks first so a tight time budget loses the least
ALL_TASKS = ["startup", "zipapp", "ls_wide", "get_big", "get_many", "put_big", "put_many", "ls_huge"]
DEFAULT_TASKS = [t for t in ALL_TASKS if t != "ls_huge"]  # ls_huge only when asked for
WAN_TASKS = ["ls_wide", "get_big", "get_many", "put_big", "put_many"]
NETS = ["http", "https", "door"]

# per-run timeouts in seconds (full, quick); also clipped to the remaining budget
TIMEOUTS = {
    "startup": (30, 30), "ls_wide": (120, 60), "get_big": (300, 60), "get_many": (300, 60),
    "put_big": (300, 60), "put_many": (400, 60), "ls_huge": (300, 120),
}
STARTUP_MIN_REPS = 10  # a ~50 ms process: more samples are nearly free
WAN_LS_MIN_REPS = 3
# a tool whose first run of a task took longer than this is not repeated:
# rclone needs ~1 min to download and ~3 min to upload the 5,000 small files
# on loopback (its webdav pacer spaces *all* requests >= 10 ms apart).
SLOW_RUN_S = 30.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def clear_dir(path):
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


def tail(path, n=400):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def install_module():
    import importlib.util
    import py_compile
    os.makedirs(INSTALL, exist_ok=True)
    dst = os.path.join(INSTALL, "ctadata.py")
    shutil.copy2(CTADATA, dst)
    py_compile.compile(dst, cfile=importlib.util.cache_from_source(dst), doraise=True)


def build_pyz():
    """`make zipapp`; returns (seconds, error or None)."""
    t0 = time.monotonic()
    p = subprocess.run(["make", "-s", "-C", REPO, "zipapp", "PYTHON=" + PY], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if p.returncode != 0:
        return None, "make zipapp exit %d: %s" % (p.returncode, p.stderr.decode("utf-8", "replace")[-300:])
    return time.monotonic() - t0, None


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------

def measure(argv, env, workdir, timeout):
    """Run argv under /usr/bin/time; returns a dict (rc, wall_s, rss_mb, ...).

    The wall time is perf_counter around a blocking wait (Popen.wait with a
    timeout polls with growing sleeps: it rounded 30-120 ms runs up to 32,
    64, 116 ms); /usr/bin/time's %M gives the peak RSS (of the largest process
    of a pipeline).  wait4's own ru_maxrss would count the bench's pages the
    child had before exec.  A timer kills the process group after *timeout*
    seconds."""
    timef = os.path.join(workdir, "time.txt")
    outf = os.path.join(workdir, "stdout.txt")
    errf = os.path.join(workdir, "stderr.txt")
    if os.path.exists(timef):
        os.unlink(timef)
    killed = []

    def kill(pid):
        killed.append(True)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    with open(outf, "wb") as so, open(errf, "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen([TIME_BIN, "-f", "%e %M", "-o", timef] + list(argv),
                                stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                                env=env, cwd=workdir, start_new_session=True)
        timer = threading.Timer(max(1.0, timeout), kill, (proc.pid,))
        timer.start()
        try:
            rc = proc.wait()  # no timeout: a blocking waitpid
            wall = time.perf_counter() - t0
        except BaseException:
            kill(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
    rss_kb = None
    try:
        with open(timef) as f:
            lines = [ln.split() for ln in f.read().splitlines() if ln.strip()]
        for parts in reversed(lines):
            if len(parts) == 2:
                try:
                    rss_kb = int(parts[1])
                    break
                except ValueError:
                    continue
    except OSError:
        pass
    return {"rc": rc, "timed_out": bool(killed), "wall_s": round(wall, 4),
            "rss_mb": None if rss_kb is None else round(rss_kb / 1024.0, 1),
            "stdout": outf, "stderr": errf}


# --------------------------------------------------------------------------
# verification: returns None when correct, else a reason.  Bytes are
# compared with the source (the nginx root is on this machine).
# --------------------------------------------------------------------------

def same_bytes(a, b, chunk=4 << 20):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(chunk)
            if x != fb.read(chunk):
                return False
            if not x:
                return True


def verify_file(path, src):
    if not os.path.isfile(path):
        return "missing %s" % os.path.basename(path)
    got, want = os.path.getsize(path), os.path.getsize(src)
    if got != want:
        return "size %d != %d" % (got, want)
    if not same_bytes(path, src):
        return "bytes differ"
    return None


def list_tree(base):
    found = set()
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            found.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return found


def verify_tree(base, src, expected):
    found = list_tree(base)
    if found != expected:
        return "%d files (expected %d; %d missing, %d unexpected)" % (
            len(found), len(expected), len(expected - found), len(found - expected))
    bad = 0
    for rel in expected:
        with open(os.path.join(base, rel), "rb") as f, open(os.path.join(src, rel), "rb") as g:
            if f.read() != g.read():
                bad += 1
    if bad:
        return "%d files with other bytes" % bad
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
# networks: loopback, or the latency proxy in front of http / https / a door
# --------------------------------------------------------------------------

class Net:
    """Where the tools go: ``url`` (WebDAV), ``ca`` (PEM file) and ``capath``
    (its hashed folder, for davix) for https."""

    def __init__(self, name, url, rtt_ms=0, kind="http", ca=None, capath=None):
        self.name, self.url, self.rtt_ms, self.kind = name, url.rstrip("/"), rtt_ms, kind
        self.ca, self.capath = ca, capath
        self.procs = []
        self.servers = []
        self.hostport = self.url.split("://", 1)[1]
        assert self.hostport.startswith("127.0.0.1:"), self.url

    @property
    def tls(self):
        return self.url.startswith("https:")

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.servers:
            s.stop()


def start_proxy(target_url, rtt_ms, window_mib, rate_mib):
    """A latency proxy (latency.py) in front of target_url; returns (process, url)."""
    scheme, hostport = target_url.rstrip("/").split("://", 1)
    argv = [PY, LATENCY, "--to", hostport, "--rtt", str(rtt_ms)]
    if window_mib:
        argv += ["--window", str(window_mib)]
    if rate_mib:
        argv += ["--rate", str(rate_mib)]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    line = p.stdout.readline().decode().split()
    if len(line) != 2 or line[0] != "listening":
        p.kill()
        raise RuntimeError("latency proxy did not start: %r" % line)
    return p, "%s://%s" % (scheme, line[1])


def make_capath(ca, d):
    """A hashed CA folder (what davix's --capath wants)."""
    os.makedirs(d, exist_ok=True)
    h = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", ca], stdout=subprocess.PIPE,
                       check=True).stdout.decode().strip()
    dst = os.path.join(d, h + ".0")
    if not os.path.exists(dst):
        shutil.copy(ca, dst)
    return d


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
        self.wan = args.mode == "wan"
        self.profile = ("wan-quick" if args.quick else "wan") if self.wan else (
            "quick" if args.quick else "full")
        self.ds = datagen.DataSet(os.path.join(HERE, "data"), self.profile, args.many)
        self.profile = self.ds.profile
        self.work = os.path.join(self.ds.dir, "work")
        self.out = os.path.join(self.work, "out")
        self.runs = os.path.join(self.work, "run")
        self.home = os.path.join(self.work, "home")
        self.cache = os.path.join(self.home, ".cache", "ctadata")
        self.token = None
        self.t_start = time.monotonic()
        self.deadline = self.t_start + args.budget
        self.results = {}
        self.servers = {}

    # -- environment ---------------------------------------------------------
    def env(self, extra=None):
        """A minimal, hermetic environment: no proxies, no stray tokens or
        configs, no PYTHON* variables (PYTHONDONTWRITEBYTECODE would keep the
        pyz from caching its code, as it does on a machine that sets it)."""
        os.makedirs(self.home, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": self.home,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": self.work,
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        if extra:
            env.update(extra)
        return env

    def env_ctadata(self, net=None):
        extra = {"BEARER_TOKEN": self.token}
        if net is not None and net.ca:
            extra["X509_CERT_FILE"] = net.ca
        return self.env(extra)

    def env_rclone(self, net):
        conf = os.path.join(self.work, "rclone.conf")
        open(conf, "a").close()  # empty: the remote comes from the environment only
        extra = {
            "RCLONE_CONFIG": conf,
            "RCLONE_CONFIG_BENCH_TYPE": "webdav",
            "RCLONE_CONFIG_BENCH_URL": net.url,
            "RCLONE_CONFIG_BENCH_VENDOR": "other",
            "RCLONE_CONFIG_BENCH_BEARER_TOKEN": self.token,
        }
        if net.ca:
            extra["RCLONE_CA_CERT"] = net.ca
        return self.env(extra)

    def auth(self):
        return "Authorization: Bearer %s" % self.token

    # -- the pyz's code cache --------------------------------------------------
    def cache_clear(self):
        shutil.rmtree(self.cache, ignore_errors=True)

    def cache_warm(self):
        if not (os.path.isdir(self.cache) and os.listdir(self.cache)):
            subprocess.run(CT + ["--version"], env=self.env(), stdout=subprocess.DEVNULL, check=True)

    # -- task definitions ------------------------------------------------------
    def tools(self, task, net):
        """[(tool, argv, env, prepare, verify)] for one task."""
        ds, out, scratch, auth = self.ds, self.out, self.ds.scratch, self.auth()
        U = net.url if net else None
        ct = (lambda *a: CT + ["--url", U] + list(a))  # noqa: E731
        dav = ("davs://" if net and net.tls else "dav://") + (net.hostport if net else "")
        curl = ["curl", "-q", "-sS", "-f", "-H", auth] + (["--cacert", net.ca] if net and net.ca else [])
        davix = ["-H", auth] + (["--capath", net.capath] if net and net.capath else [])
        prep_out = lambda: clear_dir(out)  # noqa: E731
        prep_scratch = lambda: clear_dir(scratch)  # noqa: E731
        big_out = os.path.join(out, "big.bin")
        big_up = os.path.join(scratch, "big.bin")
        many_out = os.path.join(out, "many")
        many_up = os.path.join(scratch, "many")
        many_rels = set(ds.records["many"]["sha256"]) if "many" in ds.records else set()

        def prep_first(prepare=None):
            def f():
                self.cache_clear()
                if prepare:
                    prepare()
            return f

        def prep_warm(prepare=None):
            def f():
                self.cache_warm()
                if prepare:
                    prepare()
            return f

        def v_big(path):
            return lambda r: verify_file(path, ds.big)

        def v_tree(path):
            return lambda r: verify_tree(path, ds.many, many_rels)

        def v_names(expected):
            return lambda r: verify_names(r["stdout"], expected)

        if task == "startup":
            def v_version(r):
                with open(r["stdout"], "rb") as f:
                    s = f.read().decode("utf-8", "replace")
                return None if s.startswith("ctadata ") else "unexpected output %r" % s[:80]
            mod = self.env({"PYTHONPATH": INSTALL})
            none = lambda r: None  # noqa: E731
            return [
                ("python3 -c pass", [PY, "-c", "pass"], self.env(), None, none),
                ("ctadata.pyz, 1st run", CT + ["--version"], self.env(), prep_first(), v_version),
                ("ctadata.pyz", CT + ["--version"], self.env(), prep_warm(), v_version),
                ("python3 ctadata.py", [PY, CTADATA, "--version"], self.env(), None, v_version),
                ("python3 -m ctadata (installed)", [PY, "-m", "ctadata", "--version"], mod, None, v_version),
                ("python3 -S -c pass", [PY, "-S", "-c", "pass"], self.env(), None, none),
                ("python3 -S ctadata.pyz", [PY, "-S", PYZ, "--version"], self.env(), prep_warm(), v_version),
                ("python3 -S -m ctadata (installed)", [PY, "-S", "-m", "ctadata", "--version"], mod, None,
                 v_version),
            ]
        if task == "get_big":
            return [
                ("ctadata", ct("get", "big.bin", big_out), self.env_ctadata(net), prep_out, v_big(big_out)),
                ("curl", curl + (["-L"] if net.kind == "door" else []) + ["-o", big_out, U + "/big.bin"],
                 self.env(), prep_out, v_big(big_out)),
                ("davix-get", ["davix-get"] + davix + [U + "/big.bin", big_out],
                 self.env(), prep_out, v_big(big_out)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", "bench:big.bin", out + "/"],
                 self.env_rclone(net), prep_out, v_big(big_out)),
            ]
        if task == "get_many":
            return [
                ("ctadata", ct("get", "-r", "many", many_out), self.env_ctadata(net),
                 prep_out, v_tree(many_out)),
                ("davix-get -r4", ["davix-get", "-r", "4"] + davix + [dav + "/many/", many_out],
                 self.env(), prep_out, v_tree(many_out)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", "bench:many", many_out],
                 self.env_rclone(net), prep_out, v_tree(many_out)),
            ]
        if task in ("ls_wide", "ls_huge"):
            names = ds.wide_names()
            if task == "ls_huge":
                hnames = ds.huge_names()
                return [
                    ("ctadata", ct("ls", "-U", "huge"), self.env_ctadata(net), prep_warm(), v_names(hnames)),
                    ("ctadata (wide)", ct("ls", "-U", "wide"), self.env_ctadata(net), prep_warm(),
                     v_names(names)),
                ]
            script = ('curl -q -sS -f %s -X PROPFIND -H "Depth: 1" -H "Authorization: Bearer $BENCH_TOKEN" '
                      '"%s/wide/" | "%s" -c "%s"' % ("--cacert '%s'" % net.ca if net.ca else "", U, PY,
                                                     PROPFIND_PY.replace('"', '\\"')))
            tools = [
                ("ctadata", ct("ls", "-U", "wide"), self.env_ctadata(net), prep_warm(), v_names(names)),
                ("ctadata, 1st run", ct("ls", "-U", "wide"), self.env_ctadata(net), prep_first(),
                 v_names(names)),
                ("davix-ls", ["davix-ls"] + davix + [dav + "/wide/"], self.env(), None, v_names(names)),
                ("rclone lsf", ["rclone", "lsf", "bench:wide"], self.env_rclone(net), None, v_names(names)),
                ("curl+python", ["sh", "-c", script], self.env({"BENCH_TOKEN": self.token}), None,
                 v_names(names)),
            ]
            if self.wan:
                del tools[1]  # start-up is measured on loopback
            return tools
        if task == "put_big":
            return [
                ("ctadata", ct("put", ds.big, "scratch/big.bin"), self.env_ctadata(net),
                 prep_scratch, v_big(big_up)),
                ("curl -T", curl + ["-T", ds.big, U + "/scratch/big.bin"],
                 self.env(), prep_scratch, v_big(big_up)),
                ("davix-put", ["davix-put"] + davix + [ds.big, U + "/scratch/big.bin"],
                 self.env(), prep_scratch, v_big(big_up)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", ds.big, "bench:scratch/"],
                 self.env_rclone(net), prep_scratch, v_big(big_up)),
            ]
        if task == "put_many":
            return [
                ("ctadata", ct("put", "-r", ds.many, "scratch/many"), self.env_ctadata(net),
                 prep_scratch, v_tree(many_up)),
                ("davix-put -r4", ["davix-put", "-r", "4"] + davix + [ds.many, dav + "/scratch/many"],
                 self.env(), prep_scratch, v_tree(many_up)),
                ("rclone copy", ["rclone", "copy", "--transfers", "4", ds.many, "bench:scratch/many"],
                 self.env_rclone(net), prep_scratch, v_tree(many_up)),
            ]
        raise ValueError(task)

    # -- running ---------------------------------------------------------------
    def remaining(self):
        return self.deadline - time.monotonic()

    def run_task(self, task, net):
        reps = self.args.reps
        if task == "startup":
            reps = max(reps, STARTUP_MIN_REPS)
        if self.wan and task == "ls_wide":
            reps = max(reps, WAN_LS_MIN_REPS)
        tools = self.tools(task, net)
        res = {"task": task, "net": net.name if net else None, "reps": reps, "tools": {}}
        for name, argv, _e, _p, _v in tools:
            missing = shutil.which(argv[0]) is None
            res["tools"][name] = {"argv": self.redact(argv), "runs": [],
                                  "missing": argv[0] if missing else None}
        timeout = TIMEOUTS[task][1 if self.args.quick else 0] * (4 if self.wan else 1)
        gave_up = set()
        label = task if not net or not self.wan else "%s %s" % (task, net.name)
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
                clear_dir(self.runs)
                r = measure(argv, env, self.runs, min(timeout, left + 60))
                err = None
                if r["timed_out"]:
                    err = "timeout after %.0f s" % r["wall_s"]
                    gave_up.add(name)
                elif r["rc"] != 0:
                    err = "exit %s: %s" % (r["rc"], tail(r["stderr"], 300).replace("\n", " | "))
                else:
                    try:
                        err = verify(r)
                    except Exception as e:  # a broken output is a failure, not a crash
                        err = "verification error: %r" % (e,)
                    if err:
                        err = "WRONG RESULT: " + err
                if rep == 0 and reps > 1 and r["wall_s"] > self.args.slow and not r["timed_out"]:
                    gave_up.add(name)
                    tr["capped"] = "1 run only: first run took %.0f s > %.0f s" % (
                        r["wall_s"], self.args.slow)
                if prepare:
                    prepare()  # do not leave GiBs behind between runs
                wall = r["wall_s"]
                run = {"rep": rep + 1, "ok": err is None, "rc": r["rc"], "wall_s": wall,
                       "rss_mb": r["rss_mb"]}
                if err:
                    run["error"] = err
                tr["runs"].append(run)
                log("  %-22s %d/%d %-34s %s s  %s MB  %s" % (
                    label, rep + 1, reps, name, "%.3f" % wall,
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
            tr["min_wall_s"] = min(walls) if walls else None
            tr["max_wall_s"] = max(walls) if walls else None
            tr["median_rss_mb"] = round(statistics.median(rsss), 1) if rsss else None
            errs = [r["error"] for r in runs if r.get("error")]
            tr["failure"] = errs[0] if errs else None
            if tr["missing"]:
                tr["failure"] = "not installed: %s" % tr["missing"]
        tools = res["tools"]
        if task == "startup":
            # every ctadata row against python itself (started the same way)
            for name, tr in tools.items():
                base = tools["python3 -S -c pass" if " -S " in name + " " else "python3 -c pass"]
                if name.endswith("pass") or not (tr["median_wall_s"] and base["median_wall_s"]):
                    continue
                tr["ratio"] = round(tr["median_wall_s"] / base["median_wall_s"], 2)
            return
        ct = tools.get("ctadata")
        if task == "ls_huge":
            ref = tools["ctadata (wide)"]
            if ct["ok"] and ref["ok"] and ct["median_rss_mb"] and ref["median_rss_mb"]:
                res["rss_ratio_vs_wide"] = round(ct["median_rss_mb"] / ref["median_rss_mb"], 2)
            return
        peers = [(tr["median_wall_s"], n) for n, tr in tools.items()
                 if not n.startswith("ctadata") and tr["ok"] and tr["median_wall_s"]]
        if peers:
            best_wall, best = min(peers)
            res["best_peer"] = best
            if ct and ct["ok"] and ct["median_wall_s"] is not None:
                res["ratio_vs_best_peer"] = round(ct["median_wall_s"] / best_wall, 2)
                ct["ratio"] = res["ratio_vs_best_peer"]

    # -- servers -----------------------------------------------------------------
    def start_server(self, kind, **kw):
        """nginx serving the data (kinds: http, https, pool = static https)."""
        from servers import start_nginx
        wd = os.path.join(self.work, "nginx-" + kind)
        if kw.get("tls"):
            shutil.rmtree(os.path.join(wd, "tls"), ignore_errors=True)
            shutil.copytree(self.tls_dir, os.path.join(wd, "tls"))  # one CA for all
        srv = start_nginx(self.ds.root, self.token, wd, **kw)
        log("[bench] nginx (%s) at %s" % (kind, srv.url))
        return srv

    def server(self, kind):
        if kind not in self.servers:
            if kind == "http":
                self.servers[kind] = self.start_server(kind)
            elif kind == "https":
                self.servers[kind] = self.start_server(kind, tls=True)
            elif kind == "pool":
                self.servers[kind] = self.start_server(kind, tls=True, static_only=True)
        return self.servers[kind]

    def open_net(self, rtt, kind):
        a = self.args
        name = "%d ms %s" % (rtt, kind)
        if kind == "http":
            p, url = start_proxy(self.server("http").url, rtt, a.window, a.rate)
            net = Net(name, url, rtt, kind)
        else:
            pool_url = None
            procs = []
            if kind == "door":
                pp, pool_url = start_proxy(self.server("pool").url, rtt, a.window, a.rate)
                procs.append(pp)
                door = self.start_server("door-%d" % rtt, tls=True, redirect_get=pool_url)
                p, url = start_proxy(door.url, rtt, a.window, a.rate)
            else:
                door = None
                p, url = start_proxy(self.server("https").url, rtt, a.window, a.rate)
            net = Net(name, url, rtt, kind, ca=self.ca, capath=self.capath)
            net.procs += procs
            if door is not None:
                net.servers.append(door)
        net.procs.append(p)
        log("[bench] %s: %s%s" % (name, url, " (GET -> 307 -> %s)" % pool_url if kind == "door" else ""))
        return net

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
        import secrets
        from servers import make_test_ca
        self.token = secrets.token_urlsafe(24)
        clear_dir(self.ds.scratch)
        nets = []
        try:
            if self.wan:
                self.tls_dir = os.path.join(self.work, "tls")
                self.ca = make_test_ca(self.tls_dir)[0]
                self.capath = make_capath(self.ca, os.path.join(self.work, "capath"))
                for rtt in self.args.rtt:
                    for kind in self.args.nets:
                        net = self.open_net(rtt, kind)
                        nets.append(net)
                        try:
                            for task in tasks:
                                key = "%s | %s" % (task, net.name)
                                log("[bench] %s" % key)
                                self.results[key] = self.run_task(task, net)
                        finally:
                            net.close()
            else:
                net = None
                if any(t not in ("startup", "zipapp") for t in tasks):
                    net = Net("loopback", self.server("http").url)
                for task in tasks:
                    log("[bench] %s" % task)
                    if task == "zipapp":
                        size = os.path.getsize(PYZ)
                        self.results[task] = {"task": task, "tools": {"ctadata.pyz": {
                            "ok": True, "size_kb": round(size / 1024.0, 1), "build_s": self.build_s}}}
                        log("  zipapp    dist/ctadata.pyz %.1f KB" % (size / 1024.0))
                    else:
                        self.results[task] = self.run_task(task, net)
        finally:
            for net in nets:
                net.close()
            for srv in self.servers.values():
                srv.stop()
            for d in (self.out, self.ds.scratch, self.runs):
                if os.path.isdir(d):
                    clear_dir(d)
        return t_data


# --------------------------------------------------------------------------
# environment description and report
# --------------------------------------------------------------------------

def first_line(argv, stream="stdout"):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout if stream == "stdout" else p.stderr) or p.stdout or p.stderr
    lines = text.decode("utf-8", "replace").strip().splitlines()
    return lines[0].strip() if lines else None


def tool_versions():
    return {
        "ctadata": first_line([PY, PYZ, "--version"]),
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
    try:
        load = " ".join("%.2f" % x for x in os.getloadavg())
    except OSError:
        load = None
    return {"nproc": nproc, "cpu_model": cpu, "mem_gib": mem, "python": sys.version.split()[0],
            "platform": platform.platform(), "loadavg_at_start": load}


def fmt(v, nd=2):
    return "-" if v is None else ("%.*f" % (nd, v))


def table(results, wan):
    """The medians as a markdown table."""
    head = ["task"] + (["network"] if wan else []) + ["tool", "wall s", "RSS MB", "runs", "ctadata / best peer"]
    rows = []
    notes = []
    for key, res in results.items():
        task = res["task"]
        if task == "zipapp":
            tr = res["tools"]["ctadata.pyz"]
            rows.append(["zipapp"] + [""] * wan + ["dist/ctadata.pyz", "-", "-", "ok",
                                                   "size %s KB" % fmt(tr["size_kb"], 1)])
            continue
        nd = 3 if task in ("startup", "ls_wide", "ls_huge") else 2
        first = True
        for name, tr in res["tools"].items():
            if tr.get("missing"):
                status = "MISSING"
            elif tr["n"] and tr["ok"]:
                status = "%d/%d" % (tr["n_ok"], tr["n"]) + ("*" if tr.get("capped") else "")
            else:
                status = "FAIL %d/%d" % (tr["n_ok"], tr["n"])
            extra = ""
            if task == "startup" and tr.get("ratio") is not None:
                extra = "%.2f x python" % tr["ratio"]
            elif name == "ctadata":
                if task == "ls_huge":
                    extra = ("RSS x%.2f vs 20k-entry ls" % res["rss_ratio_vs_wide"]
                             if res.get("rss_ratio_vs_wide") else "-")
                elif res.get("ratio_vs_best_peer") is not None:
                    extra = "**%.2f** (%s)" % (res["ratio_vs_best_peer"], res["best_peer"])
                else:
                    extra = "n/a"
            wall = fmt(tr["median_wall_s"], nd)
            if tr.get("n_ok", 0) > 2 and tr["max_wall_s"] > 1.5 * tr["min_wall_s"]:
                wall += " (%s-%s)" % (fmt(tr["min_wall_s"], nd), fmt(tr["max_wall_s"], nd))
            rows.append([task if first else ""] + ([res["net"] if first else ""] if wan else [])
                        + ["`%s`" % name, wall, fmt(tr["median_rss_mb"], 1), status, extra])
            if tr.get("failure"):
                notes.append("%s / %s: %s" % (key, name, tr["failure"]))
            first = False
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if any(tr.get("capped") for res in results.values() for tr in res["tools"].values()):
        lines.append("")
        lines.append("\\* run once only: its first run took longer than --slow seconds")
    if notes:
        lines.append("")
        lines.append("failures (first per tool):")
        for n in notes:
            lines.append("- " + n[:400])
    return "\n".join(lines)


TASK_LABELS = {
    "get_big": "get big.bin", "get_many": "get -r many", "put_big": "put big.bin", "put_many": "put -r many",
}


def compact_table(results, p):
    """One row per task (and network): wall s / peak RSS MB of each tool, and
    ctadata against the best peer (the README's table)."""
    cols = ["ctadata", "curl", "davix", "rclone"]
    lines = ["| task | " + " | ".join(cols) + " | ctadata / best peer |",
             "|---|" + "---|" * (len(cols) + 1)]
    for res in results.values():
        task = res["task"]
        if task in ("startup", "zipapp"):
            continue
        label = TASK_LABELS.get(task, task)
        if task in ("get_big", "put_big"):
            label = label.replace("big.bin", "%d MiB" % (p["big_bytes"] >> 20) if p["big_bytes"] < 1 << 30
                                  else "%d GiB" % (p["big_bytes"] >> 30))
        elif task in ("ls_wide", "ls_huge"):
            label = "ls %s names" % "{:,}".format(p["wide_files" if task == "ls_wide" else "huge_files"])
        elif task in ("get_many", "put_many"):
            label = label.replace("many", "%s × %d KiB" % ("{:,}".format(p["many_files"]), p["many_bytes"] >> 10))
        if res.get("net") not in (None, "loopback"):
            label += ", " + res["net"]
        cells = []
        for col in cols:
            tr = next((t for n, t in res["tools"].items()
                       if (n == "ctadata" if col == "ctadata" else n.startswith(col))), None)
            if tr is None or tr.get("missing"):
                cells.append("")
            elif not tr["ok"]:
                cells.append("fails")
            else:
                nd = 3 if tr["median_wall_s"] < 1 else 2
                cells.append("%s / %s" % (fmt(tr["median_wall_s"], nd), fmt(tr["median_rss_mb"], 0)))
        ratio = ("%.2f × %s" % (res["ratio_vs_best_peer"], res["best_peer"].split()[0])
                 if res.get("ratio_vs_best_peer") is not None else "")
        lines.append("| %s | %s | %s |" % (label, " | ".join(cells), ratio))
    return "\n".join(lines)


def startup_table(results):
    res = results.get("startup")
    if not res:
        return ""
    lines = ["| `--version` | wall ms (median) | peak RSS MB | × python3 -c pass |", "|---|---|---|---|"]
    for name, tr in res["tools"].items():
        lines.append("| `%s` | %s | %s | %s |" % (
            name, fmt(tr["median_wall_s"] and tr["median_wall_s"] * 1000, 0), fmt(tr["median_rss_mb"], 1),
            "%.2f" % tr["ratio"] if tr.get("ratio") is not None else ""))
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("loopback", "wan"), default="loopback",
                    help="loopback (default) or wan: the tasks through tests/bench/latency.py")
    ap.add_argument("--tasks", default=None,
                    help="space/comma separated subset of: %s (default: all but ls_huge; wan: %s)"
                    % (" ".join(ALL_TASKS), " ".join(WAN_TASKS)))
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per tool and task (default 5 on loopback: on a VM a 1 GiB write "
                         "swings between 0.7 and 3 s; 1 in wan mode, where latency dominates; 1 with "
                         "--quick; startup: at least %d, wan ls_wide: at least %d)"
                         % (STARTUP_MIN_REPS, WAN_LS_MIN_REPS))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 repetition, small data")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run, data generation included; runs that would "
                         "start later are skipped (default 720; 300 with --quick)")
    ap.add_argument("--slow", type=float, default=SLOW_RUN_S,
                    help="do not repeat a tool whose first run of a task took longer than this "
                         "many seconds (default %.0f)" % SLOW_RUN_S)
    ap.add_argument("--many", type=int, default=0, metavar="N",
                    help="get_many/put_many with N small files instead of the profile's (e.g. "
                         "--mode wan --many 5000: the loopback's 5,000 over a WAN; its own data "
                         "folder <profile>-manyN)")
    ap.add_argument("--rtt", default="20,80", help="wan: round-trip times in ms (default 20,80)")
    ap.add_argument("--nets", default=",".join(NETS),
                    help="wan: http (plain), https (TLS), door (https, GETs 307-redirected to a "
                         "pool behind its own latency proxy) (default: all three)")
    ap.add_argument("--window", type=float, default=4.0,
                    help="wan: MiB in flight per connection and direction, as a TCP window "
                         "(default 4: 200 MiB/s per connection at 20 ms, 50 MiB/s at 80 ms; 0: unlimited)")
    ap.add_argument("--rate", type=float, default=0,
                    help="wan: MiB/s per connection and direction (default 0: unlimited)")
    ap.add_argument("--json", default=None,
                    help="where to write the JSON results (default tests/bench/results/latest[-wan].json)")
    args = ap.parse_args(argv)
    valid = WAN_TASKS if args.mode == "wan" else ALL_TASKS
    if args.tasks:
        tasks = [t for t in args.tasks.replace(",", " ").split() if t]
        bad = [t for t in tasks if t not in valid]
        if bad:
            ap.error("unknown task(s) for %s mode: %s (choose from %s)"
                     % (args.mode, " ".join(bad), " ".join(valid)))
        args.task_list = [t for t in valid if t in tasks]
    else:
        args.task_list = list(WAN_TASKS if args.mode == "wan" else DEFAULT_TASKS)
    if args.reps is None:
        args.reps = 1 if (args.quick or args.mode == "wan") else 5
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.budget is None:
        args.budget = 300.0 if args.quick else 720.0
    try:
        args.rtt = [int(x) for x in args.rtt.replace(",", " ").split()]
    except ValueError:
        ap.error("--rtt: milliseconds, e.g. 20,80")
    args.nets = [x for x in args.nets.replace(",", " ").split() if x]
    if any(n not in NETS for n in args.nets):
        ap.error("--nets: choose from %s" % ",".join(NETS))
    if args.json is None:
        args.json = os.path.join(HERE, "results", "latest-wan.json" if args.mode == "wan" else "latest.json")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.access(TIME_BIN, os.X_OK):
        sys.exit("bench: %s is missing (apt-get install -y time)" % TIME_BIN)
    bench = Bench(args)
    log("[bench] %s mode, profile %s, tasks: %s, reps %d, budget %.0f s%s"
        % (args.mode, bench.profile, " ".join(args.task_list), args.reps, args.budget,
           ", rtt %s ms, nets %s, window %s MiB" % (args.rtt, ",".join(args.nets), args.window or "unlimited")
           if bench.wan else ""))
    started = datetime.datetime.now(datetime.timezone.utc)
    install_module()
    bench.build_s, err = build_pyz()
    if err:
        sys.exit("bench: " + err)
    versions = tool_versions()
    ct_sha = datagen.sha256_file(CTADATA)
    t_data = bench.main(args.task_list)
    total = time.monotonic() - bench.t_start
    ct_changed = datagen.sha256_file(CTADATA) != ct_sha
    report = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": args.mode,
        "profile": bench.profile,
        "reps": args.reps,
        "wan": {"rtt_ms": args.rtt, "nets": args.nets, "window_mib": args.window,
                "rate_mib_s": args.rate} if bench.wan else None,
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
    p = bench.ds.p
    print("ctadata benchmark, %s mode, %s, %s (pyz, default settings)" % (
        args.mode, report["date"], versions["ctadata"]))
    print("machine: %s CPU(s) %s, %s GiB, %s, Python %s; load at start %s" % (
        m["nproc"], m["cpu_model"], m["mem_gib"], m["platform"], m["python"], m["loadavg_at_start"]))
    print("peers: %s | %s | %s | %s" % (versions["curl"] and " ".join(versions["curl"].split()[:2]),
                                        versions["davix"], versions["rclone"], versions["nginx"]))
    print("data (%s): big %d MiB, many %d x %d KiB in %d folders, wide %d names; medians of %d run(s)" % (
        bench.profile, p["big_bytes"] >> 20, p["many_files"], p["many_bytes"] >> 10, p["many_dirs"],
        p["wide_files"], args.reps))
    if bench.wan:
        print("wan: latency proxy, RTT %s ms, window %s MiB per connection, rate %s" % (
            "/".join(map(str, args.rtt)), args.window or "unlimited",
            "%s MiB/s" % args.rate if args.rate else "unlimited"))
    print("ctadata.py sha256 %s%s" % (ct_sha[:16], "  WARNING: ctadata.py changed during the run"
                                        if ct_changed else ""))
    print()
    print(table(bench.results, bench.wan))
    print()
    print("compact (wall s / peak RSS MB, medians):")
    print()
    if "startup" in bench.results:
        print(startup_table(bench.results))
        print()
    if any(r["task"] not in ("startup", "zipapp") for r in bench.results.values()):
        print(compact_table(bench.results, p))
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
