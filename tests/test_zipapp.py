"""The one-file tool's start-up: dist/ctadata.pyz (a script with ctadata.py
inside, written by `make zipapp`; README: Performance) keeps ctadata's
compiled code in a private cache ($XDG_CACHE_HOME/ctadata/, default
~/.cache/ctadata/) and runs it from there from the second run on.

What is checked: the cache file appears with mode 0600 in a 0700 folder and
its code is what the second run executes (a planted code object in a good
cache file runs: no timing involved); a cache that someone else could have
written (another owner, group- or world-writable, a symlink) is never
executed; a damaged file is ignored and replaced; a read-only, missing or
impossible cache folder still runs (compiling); Python 2.7 gets one line and
exit status 2; every pyenv interpreter found (3.6-3.13) and PyPy use the cache;
files next to the pyz do not shadow the modules ctadata imports.
"""

import marshal
import os
import runpy
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
PLANTED = "planted code ran"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """dist/ctadata.pyz built by the Makefile's recipe, into a folder of its own."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("zipapp") / "ctadata.pyz"
    subprocess.check_call(["make", "-s", "-C", str(REPO), "zipapp", "ZIPAPP=" + str(out),
                           "PYTHON=" + sys.executable], stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="module")
def boot(pyz):
    """The pyz's functions (run under another name: no start-up)."""
    return runpy.run_path(str(pyz), run_name="pyz_main")


def version():
    ns = {}
    with open(str(REPO / "ctadata.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, ns)
                return "ctadata " + ns["__version__"]
    raise AssertionError("no __version__ in ctadata.py")


def run(pyz, cache, *args, python=None, verbose=True, env=None, prefix=()):
    """Run the pyz with XDG_CACHE_HOME=cache; returns (status, stdout, stderr)."""
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
         "HOME": str(cache) + "-home", "XDG_CACHE_HOME": str(cache)}
    if cache is None:
        del e["XDG_CACHE_HOME"]
    e.update(env or {})
    argv = list(prefix) + [python or sys.executable] + (["-v"] if verbose else []) + [str(pyz)]
    p = subprocess.run(argv + list(args or ["--version"]), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=e, timeout=120)
    # -v: keep the pyz's own notes (and tracebacks), not Python's import trace
    err = "\n".join(ln for ln in p.stderr.splitlines()
                    if not ln.startswith(("#", "import ", "Python ", "Type ", "Processing ",
                                          "Adding directory")) or ln.startswith("# ctadata.pyz:"))
    return p.returncode, p.stdout, err


def cache_files(cache):
    d = Path(str(cache)) / "ctadata"
    return sorted(d.glob("ctadata-*.pyc")) if d.is_dir() else []


def warm(pyz, cache):
    """Run once so that the cache holds this ctadata's code; return its file."""
    rc, out, err = run(pyz, cache)
    assert rc == 0 and out.strip() == version(), err
    files = cache_files(cache)
    assert len(files) == 1, files
    return files[0]


def plant(boot, path, body=PLANTED):
    """Write a good cache file at *path* whose code prints *body*."""
    code = compile("import sys\n\ndef _entry():\n    sys.stdout.write(%r)\n    sys.exit(0)\n"
                   % (body + "\n"), "planted", "exec")
    head = path.read_bytes()[:len(b"ctadata\0") + 4 + 64]
    dfd = os.open(str(path.parent), os.O_RDONLY)
    try:
        boot["store"](os, dfd, path.name, head, code)
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------

def test_second_run_uses_the_cache(pyz, boot, tmp_path):
    cache = tmp_path / "cache"
    rc, out, err = run(pyz, cache)
    assert rc == 0 and out.strip() == version(), err
    files = cache_files(cache)
    assert len(files) == 1
    f = files[0]
    assert "# ctadata.pyz: compiled %s/ctadata.py, cached in %s" % (pyz, f) in err
    assert f.name.endswith(".%s.pyc" % sys.implementation.cache_tag)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    assert f.stat().st_uid == os.getuid()
    assert not [p for p in f.parent.iterdir() if p.name.endswith(".tmp")]

    rc, out, err = run(pyz, cache)
    assert rc == 0 and out.strip() == version(), err
    assert "# ctadata.pyz: code from %s" % f in err
    assert "compiled" not in err

    # what runs is the code in that file: a planted code object says so
    plant(boot, f)
    rc, out, err = run(pyz, cache, verbose=False)
    assert (rc, out) == (0, PLANTED + "\n"), err


def test_exit_status_and_errors_from_the_cached_code(pyz, tmp_path):
    cache = tmp_path / "cache"
    for _ in range(2):  # compiled, then from the cache
        rc, out, err = run(pyz, cache, "--url", "ftp://nowhere", "ls", verbose=False)
        assert rc == 2 and "ftp" in err and "Traceback" not in err
    assert len(cache_files(cache)) == 1


@pytest.mark.parametrize("case", ["file group-writable", "file world-writable", "file of another user",
                                  "folder of another user", "folder group-writable", "symlink"])
def test_a_cache_others_could_write_is_never_executed(pyz, boot, tmp_path, case):
    cache = tmp_path / "cache"
    f = warm(pyz, cache)
    plant(boot, f)
    if "another user" in case and os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    if case == "file group-writable":
        os.chmod(str(f), 0o620)
    elif case == "file world-writable":
        os.chmod(str(f), 0o602)
    elif case == "file of another user":
        os.chown(str(f), NOBODY, -1)
    elif case == "folder of another user":
        os.chown(str(f.parent), NOBODY, -1)
    elif case == "folder group-writable":
        os.chmod(str(f.parent), 0o770)
    elif case == "symlink":
        other = tmp_path / "elsewhere.pyc"
        f.rename(other)
        f.symlink_to(other)
    before = f.lstat()
    rc, out, err = run(pyz, cache)
    assert rc == 0 and out.strip() == version(), err
    assert PLANTED not in out
    assert "ignored" in err, err
    if "folder" in case:
        # not ours: nothing read, nothing written there
        assert f.lstat().st_mtime == before.st_mtime and f.lstat().st_ino == before.st_ino
        assert "cached in" not in err
    else:
        # our folder: the file is replaced by a good one, used from then on
        assert not f.is_symlink() and f.stat().st_ino != before.st_ino
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == os.getuid()
        rc, out, err = run(pyz, cache)
        assert rc == 0 and out.strip() == version() and "code from" in err, err


@pytest.mark.parametrize("damage", ["truncated", "empty", "one byte changed", "garbage",
                                    "other Python's magic"])
def test_a_damaged_cache_file_is_ignored_and_replaced(pyz, tmp_path, damage):
    cache = tmp_path / "cache"
    f = warm(pyz, cache)
    good = f.read_bytes()
    data = bytearray(good)
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "one byte changed":
        data[len(data) // 2] ^= 0x55
    elif damage == "garbage":
        data = os.urandom(len(data))
    elif damage == "other Python's magic":
        data[8] ^= 0xFF
    f.write_bytes(bytes(data))
    rc, out, err = run(pyz, cache)
    assert rc == 0 and out.strip() == version(), err
    assert "ignored" in err and "cached in" in err
    new = f.read_bytes()
    head = len(b"ctadata\0") + 4 + 64     # name, magic number, sha256 of the source
    assert new[:head] == good[:head] and new != bytes(data)
    # marshal's bytes differ between runs (its reference flags follow the
    # objects' reference counts): compare the code they hold
    assert marshal.loads(new[head + 12:]) == marshal.loads(good[head + 12:])
    rc, out, err = run(pyz, cache)
    assert rc == 0 and "code from" in err


def _no_dac_override():
    """A prefix that runs a command as root without the power to ignore file
    modes (so that a 0500 folder is read-only for it too), or None."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")
    probe = subprocess.run(list(prefix) + [sys.executable, "-c", "pass"])
    return prefix if probe.returncode == 0 else None


def test_read_only_cache_folder(pyz, tmp_path):
    prefix = _no_dac_override()
    if prefix is None:
        pytest.skip("root without setpriv: a 0500 folder is writable for root")
    # a good cache in a read-only folder is used
    cache = tmp_path / "cache"
    f = warm(pyz, cache)
    os.chmod(str(f.parent), 0o500)
    try:
        rc, out, err = run(pyz, cache, prefix=prefix)
        assert rc == 0 and out.strip() == version() and "code from" in err, err
        # an empty read-only folder: compiled every time, nothing written
        f.parent.chmod(0o700)
        f.unlink()
        f.parent.chmod(0o500)
        for _ in range(2):
            rc, out, err = run(pyz, cache, prefix=prefix)
            assert rc == 0 and out.strip() == version(), err
            assert "not cached" in err and "Permission denied" in err
        assert list(f.parent.iterdir()) == []
    finally:
        f.parent.chmod(0o700)


def test_no_place_for_a_cache(pyz, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    # XDG_CACHE_HOME below a file; HOME below a file, no XDG_CACHE_HOME; HOME
    # unset and the user's home not the cache (relative XDG_CACHE_HOME is ignored)
    for cache, env in ((afile / "cache", {}),
                       (None, {"HOME": str(afile / "home")}),
                       (afile / "cache", {"XDG_CACHE_HOME": "relative/cache",
                                          "HOME": str(afile / "home")})):
        for _ in range(2):
            rc, out, err = run(pyz, cache, env=env)
            assert rc == 0 and out.strip() == version(), err
            assert "not cached" in err
    assert afile.read_text() == "not a folder"
    assert not (Path(os.getcwd()) / "relative").exists()


def test_no_bytecode_written_when_python_is_told_not_to(pyz, tmp_path):
    cache = tmp_path / "cache"
    rc, out, err = run(pyz, cache, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert rc == 0 and out.strip() == version(), err
    assert cache_files(cache) == []
    f = warm(pyz, cache)
    rc, out, err = run(pyz, cache, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert rc == 0 and "code from %s" % f in err  # read, as Python reads .pyc files


def test_runs_started_together(pyz, tmp_path):
    cache = tmp_path / "cache"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(cache)}
    procs = [subprocess.Popen([sys.executable, str(pyz), "--version"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.decode().strip() == version(), err
    assert len(cache_files(cache)) == 1
    assert [p.name for p in (cache / "ctadata").iterdir() if not p.name.endswith(".pyc")] == []
    rc, out, err = run(pyz, cache)
    assert rc == 0 and "code from" in err


def test_old_files_are_cleared_away(pyz, boot, tmp_path):
    cache = tmp_path / "cache"
    d = cache / "ctadata"
    d.mkdir(parents=True, mode=0o700)
    for i in range(12):  # other ctadata versions, oldest first
        p = d / ("ctadata-%016x.cpython-311.pyc" % i)
        p.write_bytes(b"old")
        os.utime(str(p), (1e9 + i, 1e9 + i))
    stale = d / ".ctadata-0.cpython-311.pyc.1234.tmp"
    stale.write_bytes(b"")
    os.utime(str(stale), (1e9, 1e9))
    rc, out, err = run(pyz, cache)
    assert rc == 0 and "cached in" in err, err
    mine = "ctadata-%s.%s.pyc" % (boot["SOURCE_SHA256"][:16], sys.implementation.cache_tag)
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted([mine] + ["ctadata-%016x.cpython-311.pyc" % i
                                    for i in range(12 - boot["KEEP"], 12)])


def pyenv_pythons():
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if shutil.which("pyenv"):
        try:
            root = subprocess.check_output(["pyenv", "root"], universal_newlines=True).strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    found = {}
    vdir = Path(root) / "versions"
    if vdir.is_dir():
        for v in sorted(vdir.iterdir()):
            for name in ("python3", "python"):
                exe = v / "bin" / name
                if exe.exists():
                    found[v.name] = str(exe)
                    break
    return found


def test_python_2_gets_one_line(pyz, tmp_path):
    pythons = pyenv_pythons()
    olds = [(v, exe) for v, exe in pythons.items() if v.startswith("2.")]
    if not olds:
        pytest.skip("no pyenv Python 2 (%s)" % ", ".join(pythons) or "no pyenv")
    for v, exe in olds:
        p = subprocess.run([exe, str(pyz), "ls"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, env={"PATH": os.environ.get("PATH", ""),
                                                         "HOME": str(tmp_path)})
        assert (p.returncode, p.stdout) == (2, "ctadata needs Python >= 3.6; this is %s\n" % v)
    assert not (tmp_path / ".cache").exists()


def test_every_python_uses_the_cache(pyz, tmp_path):
    pythons = sorted((v, exe) for v, exe in pyenv_pythons().items() if v[:2] == "3.")
    pypy = shutil.which("pypy3")
    if pypy:
        pythons.append(("pypy3", pypy))
    if not pythons:
        pytest.skip("no pyenv interpreters or PyPy")
    cache = tmp_path / "cache"
    tags = set()
    for v, exe in pythons:
        for what in ("compiled", "code from"):
            rc, out, err = run(pyz, cache, python=exe)
            assert rc == 0 and out.strip() == version(), (v, err)
            assert "# ctadata.pyz: " + what in err, (v, err)
        tags.add(subprocess.check_output([exe, "-c", "import sys; print(sys.implementation.cache_tag)"],
                                         universal_newlines=True).strip())
    assert {f.name.split(".")[1] for f in cache_files(cache)} == tags


def test_the_source_inside_is_ctadata_py(pyz, boot):
    pyz.read_bytes().decode("ascii")  # Python 2.7 parses only ASCII without a coding line
    assert boot["source"]() == (REPO / "ctadata.py").read_bytes()
    assert boot["Loader"]().get_source("ctadata") == (REPO / "ctadata.py").read_text("utf-8")


def test_files_next_to_the_pyz_do_not_shadow_modules(pyz, tmp_path):
    """A script's folder comes first on sys.path: the pyz takes it away, so an
    argparse.py (or ssl.py, ...) beside it is not what ctadata imports."""
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(str(pyz), str(d / "ctadata.pyz"))
    (d / "argparse.py").write_text("raise SystemExit('the wrong argparse')\n")
    for _ in range(2):
        rc, out, err = run(d / "ctadata.pyz", tmp_path / "cache", "--help", verbose=False)
        assert rc == 0 and "usage:" in out and "wrong" not in err, err
