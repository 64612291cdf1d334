"""The module's public face, packaging and start-up (layer 4)."""

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
import types
from pathlib import Path
from subprocess import PIPE

import pytest

import ctadata

REPO = Path(__file__).resolve().parent.parent


def test_all_matches_public_names():
    # CPython's test_httpservers.MiscTestCase.test_all does the same.
    public = {name for name, value in vars(ctadata).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert set(ctadata.__all__) == public
    assert len(ctadata.__all__) == len(set(ctadata.__all__))


def test_public_functions_have_docstrings():
    for name in ctadata.__all__:
        obj = getattr(ctadata, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name


def test_errors_form_one_hierarchy():
    for name in ctadata.__all__:
        obj = getattr(ctadata, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ctadata.CtadataError), name


def test_no_f_strings():
    """Python 3.5 must parse the module to reach its version check: no
    f-strings (ast's feature_version no longer sees them from 3.12 on)."""
    src = (REPO / "ctadata.py").read_text(encoding="utf-8")
    found = [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(src).readline)
             if tok.type == getattr(tokenize, "FSTRING_START", None) or (
                 tok.type == tokenize.STRING and
                 "f" in re.match(r"[A-Za-z]*", tok.string).group().lower())]
    assert found == [], "f-strings on lines %s" % found


@pytest.mark.skipif(sys.version_info < (3, 8), reason="ast feature_version= needs Python >= 3.8")
def test_parses_as_python_35():
    """No 3.6+ syntax: variable annotations, underscores in numbers, async
    comprehensions (and on Python >= 3.10: walrus, positional-only)."""
    ast.parse((REPO / "ctadata.py").read_text(encoding="utf-8"), feature_version=(3, 5))


def test_pyproject_says_the_same_python_versions():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'requires-python = ">=3.6"' in text
    assert "sys.version_info < (3, 6)" in (REPO / "ctadata.py").read_text(encoding="utf-8")
    assert re.findall(r"Python :: (3\.\d+)", text) == ["3.%d" % v for v in range(6, 14)]


_AS_PYTHON_35 = "import sys; sys.version_info = (3, 5, 2, 'final', 0); "


@pytest.mark.parametrize("code", [
    "sys.argv = ['ctadata.py', 'ls']; import runpy; runpy.run_path(%r, run_name='__main__')"
    % str(REPO / "ctadata.py"),
    "import ctadata; ctadata.main(['ls'])",
], ids=["script", "import"])
def test_older_python_gets_one_line_and_exit_2(code):
    """What Python 3.5 shows (simulated: the version is replaced before the
    module runs; tests/test_module.py::test_parses_as_python_35 checks that
    3.5 gets that far)."""
    r = subprocess.run([sys.executable, "-c", _AS_PYTHON_35 + code],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=PIPE,
                       stderr=PIPE, universal_newlines=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "ctadata needs Python >= 3.6; this is 3.5.2\n"


def test_older_python_interactive_import_raises():
    """In an interactive session `import ctadata` raises, it does not exit."""
    code = (_AS_PYTHON_35 + "sys.ps1 = '>>> '\ntry:\n import ctadata\n"
            "except ImportError as e:\n print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       stdout=PIPE, stderr=PIPE, universal_newlines=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "ctadata needs Python >= 3.6; this is 3.5.2\n", "")


def test_import_has_no_side_effects(tmp_path):
    """No directories, no network modules, no token files read at import."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys, ctadata; heavy = [m for m in ('ssl', 'http.client', 'xml.parsers.expat',"
            " 'concurrent.futures', 'argparse', 'logging', 'urllib.parse') if m in sys.modules];"
            " print(','.join(heavy))")
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO),
               BEARER_TOKEN_FILE=str(tmp_path / "must-not-be-read"))
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, stdout=PIPE,
                         stderr=PIPE, universal_newlines=True, check=True).stdout.strip()
    assert out == ""
    assert list(home.iterdir()) == []


def test_repr_and_errors_never_show_the_token(tmp_path):
    secret = "s3cr3t-TOKEN-value"
    c = ctadata.Client(url="https://example.invalid:2880", token=secret, env={})
    assert secret not in repr(c) and secret not in repr(c._auth) and secret not in repr(c.settings)
    assert secret not in repr(c._transport)


def test_settings_validation():
    with pytest.raises(ctadata.ConfigError):
        ctadata.Client(url="ftp://x", env={})
    with pytest.raises(ctadata.ConfigError):
        ctadata.Client(url="https://user:pw@x", env={})
    with pytest.raises(ctadata.ConfigError):
        ctadata.Client(url="https://x", jobs=0, env={})
    assert ctadata.Client(env={}).url == ctadata.DEFAULT_URL
    assert ctadata.Client(dev=True, env={}).url == ctadata.DEV_URL
    assert ctadata.Client(env={"CTADATA_URL": "https://h:1/p/"}).url == "https://h:1/p"


def test_url_for_quotes_and_normalises():
    c = ctadata.Client(url="https://h:2880/pnfs", env={})
    assert c.url_for("a b/c#d%e?f") == "https://h:2880/pnfs/a%20b/c%23d%25e%3Ff"
    assert c.url_for("/lst/x/../y") == "https://h:2880/pnfs/lst/y"
    assert c.url_for("https://other/x") == "https://other/x"
    with pytest.raises(ctadata.ConfigError):
        c.url_for("../../etc")


# -- CLI surface --------------------------------------------------------------

def test_version_and_help(capsys):
    assert ctadata.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "ctadata " + ctadata.__version__
    assert ctadata.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("ls", "get", "put", "mkdir", "rm", "mv", "stat", "sum"):
        assert cmd in out
    for cmd, opt in (("ls", "--unsorted"), ("get", "--overwrite"), ("put", "--verify"),
                     ("mkdir", "--parents"), ("rm", "--recursive"), ("mv", "--overwrite")):
        assert ctadata.main([cmd, "--help"]) == 0
        assert opt in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert ctadata.main([]) == 2
    assert ctadata.main(["frobnicate"]) == 2
    assert ctadata.main(["get"]) == 2
    assert ctadata.main(["--url", "ftp://nope", "ls"]) == 2
    assert "ftp" in capsys.readouterr().err


def test_zipapp_builds_and_runs(nginx_server, tmp_path):
    subprocess.run(["make", "-s", "zipapp"], cwd=str(REPO), check=True,
                   stdout=PIPE, stderr=PIPE)
    pyz = REPO / "dist" / "ctadata.pyz"
    # One file to copy to a login node: ctadata.py zlib-compressed inside a
    # script (~30 % of the source).  A guard against shipping something else.
    src = (REPO / "ctadata.py").stat().st_size
    assert pyz.stat().st_size < 0.5 * src
    (nginx_server.root / "zipapp-test.txt").write_bytes(b"from the zipapp")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BEARER_TOKEN": nginx_server.token}
    r = subprocess.run([sys.executable, str(pyz), "--version"], stdout=PIPE, stderr=PIPE,
                       universal_newlines=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ctadata " + ctadata.__version__
    r = subprocess.run([sys.executable, str(pyz), "--url", nginx_server.url, "get",
                        "zipapp-test.txt", str(tmp_path) + "/"], stdout=PIPE, stderr=PIPE,
                       universal_newlines=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "zipapp-test.txt").read_bytes() == b"from the zipapp"
    r = subprocess.run([sys.executable, str(pyz), "--url", nginx_server.url, "stat", "nope"],
                       stdout=PIPE, stderr=PIPE, universal_newlines=True, env=env,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("ctadata: error:")


def test_python_dash_m(nginx_server, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "BEARER_TOKEN": nginx_server.token}
    (nginx_server.root / "dash-m").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "ctadata", "--url", nginx_server.url, "ls", "-l"],
                       stdout=PIPE, stderr=PIPE, universal_newlines=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "dash-m/" in r.stdout


def test_c_locale_and_non_ascii_names(nginx_server, tmp_path):
    """With no locale set (LANG unset, or one ssh passed that the node lacks),
    names like "é" still list and download: Python 3.7+ use UTF-8 there by
    themselves (PEP 538, 540); on 3.6 and PyPy ctadata runs itself again under C.UTF-8."""
    top = nginx_server.root / "c-locale"
    (top / "\u00e9t\u00e9").mkdir(parents=True, exist_ok=True)
    (top / "\u00e9t\u00e9" / "M\u00fcnchen.txt").write_bytes(b"u")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BEARER_TOKEN": nginx_server.token}
    script = str(REPO / "ctadata.py")
    r = subprocess.run([sys.executable, script, "--url", nginx_server.url, "ls", "-R", "c-locale"],
                       stdout=PIPE, stderr=PIPE, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode("utf-8").split() == ["\u00e9t\u00e9/", "\u00e9t\u00e9/M\u00fcnchen.txt"]
    r = subprocess.run([sys.executable, script, "--url", nginx_server.url, "get", "-r", "c-locale",
                        str(tmp_path) + "/"], stdout=PIPE, stderr=PIPE, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c-locale" / "\u00e9t\u00e9" / "M\u00fcnchen.txt").read_bytes() == b"u"


def test_wheel_has_the_console_scripts(tmp_path):
    """pip builds a wheel holding the one module and the old and new command names."""
    setuptools = pytest.importorskip("setuptools")
    if sys.version_info < (3, 7):
        pytest.skip("building the wheel needs setuptools >= 61 (pyproject.toml "
                    "metadata), which needs Python >= 3.7")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")     # tests/install-deps.sh installs it
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                       stdout=PIPE, stderr=PIPE, universal_newlines=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile
    (wheel,) = tmp_path.glob("ctadata-*.whl")
    names = zipfile.ZipFile(str(wheel)).namelist()
    assert "ctadata.py" in names
    ep = zipfile.ZipFile(str(wheel)).read(
        [n for n in names if n.endswith("entry_points.txt")][0]).decode()
    for script in ("ctadata = ctadata:_entry", "cta-data = ctadata:_entry"):
        assert script in ep
