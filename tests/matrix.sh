#!/usr/bin/env bash
# The whole suite under every pyenv interpreter ($(pyenv root)/versions/*),
# one line each (make test-matrix, part of make test):
#
#   == Python 3.6.15: 474 passed, 3 skipped in 71 s
#      skipped: tests/test_module.py:54: ast feature_version= needs Python >= 3.8
#
# Each minor version gets a venv under build/ (build/venv-3.6, ...) holding
# pytest -- 7.0.x for 3.6 and 7.4.x for 3.7 (the last releases that support
# them), the latest for the others -- and setuptools + wheel for the wheel
# test.  Installed once from PyPI, reused afterwards.  The interpreter the
# default run (PYTHON) already used is not run twice; Python 2 is skipped
# (ctadata needs 3.6).  Runs them one after the other (the suite starts real
# servers and has timing tests; 2 cores).  Full logs: build/matrix-X.Y.log;
# a failing interpreter's log is shown and makes the script fail at the end.
# PYTHONS="3.6 3.7" limits the run to those minor versions.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || true)}
if [ -z "$root" ] || [ ! -d "$root/versions" ]; then
    echo "== pyenv not found: no other Python versions tested"
    exit 0
fi
# the default run's interpreter, to skip it here
default_prefix=$("$PY" -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)

pytest_spec() {  # minor version -> what pip installs
    case $1 in
        3.6) echo "pytest==7.0.*" ;;
        3.7) echo "pytest==7.4.* setuptools>=61 wheel" ;;
        *)   echo "pytest setuptools>=61 wheel" ;;
    esac
}

failed=()
for dir in $(ls -d "$root"/versions/*/ | sort -V); do
    ver=$(basename "$dir")
    py=$dir/bin/python3
    if [ -n "${PYTHONS:-}" ] && [[ " $PYTHONS " != *" ${ver%.*} "* ]]; then
        continue
    fi
    case $ver in
        2.*|3.[0-5].*)
            echo "== Python $ver: not supported (ctadata needs Python >= 3.6): skipped"
            continue ;;
        [0-9]*) ;;
        *)  continue ;;   # pyenv virtualenvs, pypy, ... : not ours
    esac
    [ -x "$py" ] || { echo "== Python $ver: no $py: skipped"; continue; }
    if [ "$("$py" -c 'import sys; print(sys.base_prefix)')" = "$default_prefix" ]; then
        echo "== Python $ver: the default interpreter ($PY), tested above"
        continue
    fi
    minor=${ver%.*}
    venv=build/venv-$minor
    log=build/matrix-$minor.log
    mkdir -p build
    if ! "$venv/bin/python" -c 'import pytest' >/dev/null 2>&1; then
        rm -rf "$venv"
        if ! { "$py" -m venv "$venv" &&
               { [ "$minor" != 3.6 ] || "$venv/bin/python" -m pip install -q -U "pip<22"; } &&
               "$venv/bin/python" -m pip install -q $(pytest_spec "$minor"); } >"$log" 2>&1; then
            echo "== Python $ver: FAILED to install $(pytest_spec "$minor") into $venv:"
            tail -n 20 "$log" | sed 's/^/   /'
            failed+=("$ver")
            continue
        fi
    fi
    start=$(date +%s)
    "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    # pytest's last line: "470 passed, 8 skipped in 71.20s (0:01:11)"
    counts=$(grep -E '^=*[ ]*[0-9]+ (passed|failed|error|skipped)' "$log" | tail -n 1 |
             sed -E 's/^=+ //; s/ in [0-9.]+s.*//')
    if [ "$rc" -eq 0 ]; then
        echo "== Python $ver: ${counts:-no tests ran} in $secs s"
        grep -E '^SKIPPED' "$log" | sed -E 's/^SKIPPED \[[0-9]+\] /   skipped: /'
    else
        echo "== Python $ver: FAILED (exit $rc): ${counts:-see $log} in $secs s"
        tail -n 300 "$log" | sed 's/^/   /'
        echo "   (full output: $log)"
        failed+=("$ver")
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "== failed under Python ${failed[*]}"
    exit 1
fi
