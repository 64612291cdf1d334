#!/usr/bin/env bash
# `make demo`: ctadata's main job, without an account.  Starts `ctadata serve`
# on a temporary folder of sample files (DL1-like files on disk, raw files on
# a simulated tape), runs a tour of commands against it, printing each one and
# its output, then stops the server and removes the folder -- also on a
# failure or Ctrl-C.
#
#   tests/demo.sh [dist/ctadata.pyz]        (PYTHON=python3 by default)
#
# To add a step: `step ctadata ARGS...`; for a command or an option that not
# every build has yet, guard it with `if has COMMAND` / `if has_option COMMAND
# --OPTION`; `step_fails` shows a command that is meant to fail.
set -euo pipefail

PYTHON=${PYTHON:-python3}
PYZ=$(cd "$(dirname "${1:-dist/ctadata.pyz}")" && pwd)/$(basename "${1:-dist/ctadata.pyz}")
work=$(mktemp -d "${TMPDIR:-/tmp}/ctadata-demo.XXXXXX")
server=""

cleanup() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ctadata() { "$PYTHON" "$PYZ" "$@"; }
has() { ctadata "$1" --help >/dev/null 2>&1; }
has_option() { ctadata "$1" --help 2>/dev/null | grep -q -- "$2"; }
step() { printf '\n$ %s\n' "$*"; "$@" 2>&1; }
step_fails() {
    printf '\n$ %s    # fails on purpose\n' "$*"
    if "$@" 2>&1; then echo "demo: expected a failure" >&2; exit 1; fi
}

# Only the demo's own server and token count (no token, profile or service
# from the environment).
unset CTADATA_TOKEN BEARER_TOKEN CTADATA_PROFILE CTADS_URL CTADATA_OIDC_AGENT

# -- the archive: a night of LST-1 data ------------------------------------------
archive=$work/archive
dl1=$archive/cta/DL1/20241114/v0.1
dl0=$archive/cta/DL0/20241114
mkdir -p "$dl1" "$dl0" "$archive/users/demo"
for sub in 0100 0101 0102; do
    { printf '\211HDF\r\n\032\n'; head -c 300000 /dev/urandom; } >"$dl1/dl1_LST-1.Run11111.$sub.h5"
done
printf 'datacheck of run 11111\n' >"$dl1/datacheck_dl1_LST-1.Run11111.0100.h5"
for sub in 0000 0001; do
    head -c 500000 /dev/urandom >"$dl0/LST-1.1.Run11111.$sub.fits.fz"
done

printf '$ ctadata serve %s --port 0 --tape '"'"'cta/DL0/**'"'"' --token-file %s &\n' \
    "$archive" "$work/token"
"$PYTHON" "$PYZ" serve "$archive" --port 0 --tape 'cta/DL0/**' --stage-delay 0.5 \
    --token-file "$work/token" >"$work/url" 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do
    [ -s "$work/url" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.1
done
[ -s "$work/url" ] || { echo "demo: the server did not start" >&2; exit 1; }
cat "$work/serve.log"
CTADATA_URL=$(head -n 1 "$work/url")
export CTADATA_URL BEARER_TOKEN_FILE=$work/token
printf '\n$ export CTADATA_URL=%s BEARER_TOKEN_FILE=%s\n' "$CTADATA_URL" "$BEARER_TOKEN_FILE"
cd "$work"

# -- the tour ---------------------------------------------------------------------
step ctadata ls cta/DL1/20241114/v0.1
step ctadata ls -l -h cta/DL1/20241114/v0.1
step ctadata du -h cta
step ctadata get -r --exclude 'datacheck_*' cta/DL1/20241114/v0.1 downloads/
step ls -l downloads/v0.1
printf 'results of the demo\n' >results.txt
step ctadata put results.txt users/demo/
step ctadata sum users/demo/results.txt
step ctadata stat cta/DL0/20241114/LST-1.1.Run11111.0000.fits.fz
step_fails ctadata get cta/DL0/20241114/LST-1.1.Run11111.0000.fits.fz downloads/
if has stage; then
    step ctadata ls -l cta/DL0/20241114
    step ctadata stage --wait cta/DL0/20241114/LST-1.1.Run11111.0000.fits.fz
    step ctadata get cta/DL0/20241114/LST-1.1.Run11111.0000.fits.fz downloads/
fi
if has_option get --stage; then
    step ctadata get --stage --release cta/DL0/20241114/LST-1.1.Run11111.0001.fits.fz downloads/
fi
if has_option get --stage-id; then
    # stage in the evening, fetch in the morning (here: a second later), release
    printf '\n$ id=$(ctadata stage -r cta/DL0)\n'
    id=$(ctadata stage -q -r cta/DL0)
    step ctadata get --stage-id "$id" morning/ --release
fi
if has share; then
    # a link that works without an account (a macaroon in the URL)
    printf '\n$ link=$(ctadata share users/demo/results.txt --for 1h)\n'
    link=$(ctadata share -q users/demo/results.txt --for 1h)
    if command -v curl >/dev/null 2>&1; then
        step env -u BEARER_TOKEN_FILE curl -sS "$link"
    fi
fi
if has cp; then
    # copies on the server: no bytes through this machine
    step ctadata cp users/demo/results.txt users/demo/results-copy.txt
    step ctadata cp -r cta/DL1/20241114/v0.1 users/demo/v0.1-copy
fi
step ctadata mv users/demo/results.txt users/demo/final.txt
step ctadata ls -l users/demo
printf '\ndemo: done; stopping the server and removing %s\n' "$work"
