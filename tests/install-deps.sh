#!/usr/bin/env bash
# Install the real servers the test-suite needs (Debian/Ubuntu, apt-get):
#   nginx + WebDAV ext module, Apache httpd binary + modules, XRootD 5 (server,
#   its HTTP/TPC/macaroons plugins, the xrdcp/xrdfs client), openssl, curl.
#
# * Does nothing (fast) when everything is already there.
# * Installs only when running as root with apt-get; otherwise prints what
#   to install and exits 0 (e.g. run it as `sudo tests/install-deps.sh`).
# * The tests start their own servers on ephemeral loopback ports with
#   private config (tests/servers.py); they never use the system services.
#   To keep package installation from starting nginx/apache on port 80 we
#   install a temporary policy-rc.d that forbids service starts (unless one
#   already exists), and we install apache2-bin (binary + modules, no
#   service/config) rather than the apache2 metapackage where available.
set -euo pipefail

NGINX_MODULE_DIRS=(/usr/lib/nginx/modules /usr/lib64/nginx/modules /usr/share/nginx/modules
                   /usr/local/nginx/modules /etc/nginx/modules)
APACHE_MODULE_DIRS=(/usr/lib/apache2/modules /usr/lib64/httpd/modules /usr/lib/httpd/modules
                    /usr/libexec/apache2 /usr/local/apache2/modules)

have_cmd() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

have_file_in() {  # name dir...
    local name=$1; shift
    local d
    for d in "$@"; do
        [ -f "$d/$name" ] && return 0
    done
    return 1
}

# pytest, the only test dependency: pip first (venvs, pyenv), else Debian's
# package (system Pythons that refuse pip installs, PEP 668).
PY=${PYTHON:-python3}
if ! "$PY" -c 'import pytest' >/dev/null 2>&1; then
    echo "install-deps: pytest missing for $PY"
    "$PY" -m pip install -q pytest 2>/dev/null ||
    { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 &&
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pytest; } ||
    echo "install-deps: please install pytest (pip install pytest)"
fi
# setuptools older than 70.1 needs `wheel` to build one (tests/test_module.py
# builds our wheel offline, without build isolation)
"$PY" -c 'import wheel' >/dev/null 2>&1 || "$PY" -m pip install -q wheel >/dev/null 2>&1 || true

missing=()   # human readable
want=()      # apt "roles" to resolve to package names

if ! have_cmd nginx; then
    missing+=("nginx"); want+=(nginx)
fi
if ! have_file_in ngx_http_dav_ext_module.so "${NGINX_MODULE_DIRS[@]}"; then
    missing+=("nginx dav-ext module"); want+=(dav-ext)
fi
if ! { have_cmd apache2 || have_cmd httpd; } ||
   ! have_file_in mod_dav_fs.so "${APACHE_MODULE_DIRS[@]}"; then
    missing+=("apache2 (with mod_dav_fs)"); want+=(apache)
fi
if ! have_cmd xrootd; then
    missing+=("xrootd"); want+=(xrootd)
fi
# libXrdHttp (the HTTP door), libXrdHttpTPC, libXrdMacaroons: xrootd-server-plugins
if ! have_file_in libXrdMacaroons-5.so /usr/lib/*-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; then
    missing+=("xrootd server plugins (XrdHttp, TPC, macaroons)"); want+=(xrootd-plugins)
fi
if ! have_cmd xrdfs; then
    missing+=("xrootd client (xrdcp, xrdfs)"); want+=(xrootd-client)
fi
if ! have_cmd setpriv; then   # XRootD refuses to run as root: the tests drop privileges
    missing+=("setpriv"); want+=(setpriv)
fi
if ! have_cmd openssl; then
    missing+=("openssl"); want+=(openssl)
fi
if ! have_cmd curl; then
    missing+=("curl"); want+=(curl)
fi
if ! have_cmd pypy3; then   # the suite also runs under PyPy (make test-pypy)
    missing+=("pypy3"); want+=(pypy3)
fi

if [ ${#want[@]} -eq 0 ]; then
    echo "install-deps: nginx, dav-ext, apache2, xrootd, openssl, curl, pypy3 already installed"
    exit 0
fi

default_pkgs="nginx libnginx-mod-http-dav-ext apache2-bin xrootd-server xrootd-server-plugins xrootd-client openssl curl"
echo "install-deps: missing: ${missing[*]}"

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: not root or no apt-get; please install (Debian/Ubuntu):"
    echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $default_pkgs"
    echo "  (other systems: nginx with http_dav + the nginx-dav-ext module, Apache httpd with mod_dav/mod_dav_fs, XRootD 5 with its HTTP plugins, openssl, curl)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

has_candidate() {  # package -> true if apt can install it
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

pick() {  # first installable package among the arguments
    local p
    for p in "$@"; do
        if has_candidate "$p"; then echo "$p"; return 0; fi
    done
    echo "install-deps: none of these packages is available: $*" >&2
    return 1
}

pkgs=()
for role in "${want[@]}"; do
    case $role in
        nginx)   pkgs+=("$(pick nginx nginx-light nginx-core)") ;;
        dav-ext) pkgs+=("$(pick libnginx-mod-http-dav-ext)") ;;
        apache)  pkgs+=("$(pick apache2-bin apache2)") ;;
        xrootd)  pkgs+=("$(pick xrootd-server)") ;;
        xrootd-plugins) pkgs+=("$(pick xrootd-server-plugins)") ;;
        xrootd-client)  pkgs+=("$(pick xrootd-client)") ;;
        setpriv) pkgs+=("$(pick util-linux setpriv)") ;;
        openssl) pkgs+=("$(pick openssl)") ;;
        curl)    pkgs+=("$(pick curl)") ;;
        pypy3)   pkgs+=("$(pick pypy3)") ;;
    esac
done

# Keep dpkg from starting nginx/apache/xrootd system services (port 80) meanwhile.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install-deps: apt-get install ${pkgs[*]}"
apt-get install -y --no-install-recommends "${pkgs[@]}"

# sanity check
have_cmd nginx || { echo "install-deps: nginx still missing" >&2; exit 1; }
have_file_in ngx_http_dav_ext_module.so "${NGINX_MODULE_DIRS[@]}" ||
    { echo "install-deps: dav-ext module still missing" >&2; exit 1; }
{ have_cmd apache2 || have_cmd httpd; } ||
    { echo "install-deps: apache2 still missing" >&2; exit 1; }
have_cmd xrootd || { echo "install-deps: xrootd still missing" >&2; exit 1; }
echo "install-deps: done"
