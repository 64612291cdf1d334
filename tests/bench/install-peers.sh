#!/usr/bin/env bash
# The tools `make bench` compares ctadata with (Debian packages): /usr/bin/time,
# curl, davix (davix-get/-put/-ls/-cp), rclone, and for third-party copies
# (tests/bench/tpc.py) gfal-copy with its http plugin.  Installs only what is missing, only
# as root with apt-get; otherwise says what to install (the bench then marks a
# missing peer MISSING and goes on).
set -euo pipefail
want=()
[ -x /usr/bin/time ] || want+=(time)
command -v curl >/dev/null 2>&1 || want+=(curl)
command -v davix-get >/dev/null 2>&1 || want+=(davix)
command -v rclone >/dev/null 2>&1 || want+=(rclone)
# -- third-party copy (tests/bench/tpc.py) --
command -v gfal-copy >/dev/null 2>&1 || want+=(gfal2-util-scripts python3-gfal2-util)
ls /usr/lib/*/gfal2-plugins/libgfal_plugin_http.so >/dev/null 2>&1 || want+=(gfal2-plugin-http)
if [ ${#want[@]} -eq 0 ]; then
    echo "install-peers: time, curl, davix, rclone, gfal-copy already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-peers: please install: ${want[*]} (Debian: apt-get install -y ${want[*]})"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}"
