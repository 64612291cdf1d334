"""pytest fixtures: real WebDAV servers (nginx, Apache) for the ctadata tests.

Server fixtures (session scope, started lazily on first use, stopped at the
end of the session -- see tests/servers.py for the servers and their quirks):

    nginx_server         nginx WebDAV, bearer token required
    apache_server        Apache mod_dav, bearer token required
    nginx_tls_server     nginx WebDAV over https (server.ca_file = CA PEM)
    nginx_static_server  plain static nginx (GET/HEAD), no token required
    xrootd_server        XRootD 5 over https, macaroons: the token is a macaroon
                         it issued (anything else: 403); server.client_cert,
                         server.xroot_url; servers.mint_macaroon for more
    xrootd_open_server   a second XRootD over https, no credentials needed
                         (the peer for third-party copies; same test CA)

    dav                  function scope, parametrized over nginx/apache/xrootd:
                         an empty remote folder per test (see DavTarget);
                         ``dav_target(request, kind)`` for other parametrizations

A missing server binary/module skips the tests that need it, except when the
environment variable CI is "true": then it is a test failure.  Install the
servers with tests/install-deps.sh.

No ctadata import at module level here (ctadata-specific fixtures go into the
marked section at the end of this file).
"""

import itertools
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, _TESTS_DIR)

import servers  # noqa: E402  (tests/servers.py)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _require(what: str, reason: Optional[str]) -> None:
    """Skip (or fail in CI) when a server is not installed."""
    if reason is None:
        return
    msg = "%s not available: %s -- run tests/install-deps.sh" % (what, reason)
    if _in_ci():
        pytest.fail(msg + " (CI=true: missing servers are failures)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def server_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session directory holding every server's data root and workdir.

    As root, Apache's workers run as an unprivileged user who cannot enter
    pytest's 0700 basetemp, so a world-traversable mkdtemp directory is used
    (removed at the end unless CTADATA_KEEP_SERVER_DATA is set).
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="ctadata-servers-"))
        os.chmod(str(base), 0o755)
        try:
            yield base
        finally:
            if not os.environ.get("CTADATA_KEEP_SERVER_DATA"):
                shutil.rmtree(str(base), ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("servers")


def _start(kind: str, base: Path) -> "servers.RunningServer":
    token = secrets.token_urlsafe(24)
    root = base / kind / "root"
    work = base / kind / "work"
    if kind == "apache":
        return servers.start_apache(root, token, work)
    if kind in ("xrootd", "xrootd-open"):
        # one CA for both instances: each verifies the other in copies
        return servers.start_xrootd(root, work, ca_dir=base / "xrootd-ca",
                                    macaroons=(kind == "xrootd"), token=token)
    return servers.start_nginx(
        root, token, work,
        static_only=(kind == "nginx-static"), tls=(kind == "nginx-tls"),
    )


@pytest.fixture(scope="session")
def nginx_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("nginx (WebDAV)", servers.nginx_missing_reason())
    with _start("nginx", server_base_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def apache_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("Apache (mod_dav)", servers.apache_missing_reason())
    with _start("apache", server_base_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def nginx_tls_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("nginx (WebDAV over TLS)", servers.nginx_missing_reason(tls=True))
    with _start("nginx-tls", server_base_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def nginx_static_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("nginx (static)", servers.nginx_missing_reason(static_only=True))
    with _start("nginx-static", server_base_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def xrootd_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("XRootD (with macaroons)", servers.xrootd_missing_reason(macaroons=True))
    with _start("xrootd", server_base_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def xrootd_open_server(server_base_dir: Path) -> Iterator["servers.RunningServer"]:
    _require("XRootD", servers.xrootd_missing_reason())
    with _start("xrootd-open", server_base_dir) as srv:
        yield srv


class DavTarget:
    """One empty remote folder on a running DAV server, private to one test.

    name    "nginx" / "apache" / "xrootd"
    url     server url + "/" + folder + "/"   (always ends with "/")
    root    Path of that folder on disk
    token   bearer token of the server
    ca_file CA of the server's certificate (https servers), else None
    server  the servers.RunningServer
    """

    def __init__(self, server: "servers.RunningServer", folder: str) -> None:
        self.server = server
        self.name = server.name
        self.folder = folder
        self.url = server.url + "/" + folder + "/"
        self.root = server.root / folder
        self.token = server.token
        self.ca_file = server.ca_file

    @property
    def path(self) -> str:
        """URL path of the folder ("/<folder>/"), handy for http.client."""
        return "/" + self.folder + "/"

    @property
    def headers(self) -> Dict[str, str]:
        return {"Authorization": "Bearer " + self.token}

    def grant_access(self, path: "os.PathLike[str] | str") -> None:
        """See RunningServer.grant_access (normally not needed)."""
        self.server.grant_access(path)

    def __repr__(self) -> str:
        return "<DavTarget %s %s>" % (self.name, self.url)


_folder_counter = itertools.count(1)


def _folder_name(nodename: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodename).strip("-.")[:60] or "test"
    return "t%04d-%s" % (next(_folder_counter), safe)


DAV_SERVERS = ["nginx", "apache", "xrootd"]


@pytest.fixture(params=DAV_SERVERS, ids=DAV_SERVERS)
def dav(request: pytest.FixtureRequest, monkeypatch) -> Iterator[DavTarget]:
    for target in dav_target(request, request.param):
        if target.ca_file:
            # a private CA (XRootD's https), trusted as a user would make it
            # trusted: every Client and command of the test finds it
            monkeypatch.setenv("X509_CERT_FILE", target.ca_file)
        yield target


def dav_target(request: pytest.FixtureRequest, kind: str) -> Iterator[DavTarget]:
    """The body of the ``dav`` fixture, for a fixture parametrized otherwise
    (``yield from dav_target(request, request.param)``)."""
    server = request.getfixturevalue(kind + "_server")
    if not server.alive():
        pytest.fail("%s server died earlier in the session:\n%s"
                    % (server.name, server.logs()), pytrace=False)
    target = DavTarget(server, _folder_name(request.node.name))
    target.root.mkdir()
    server.grant_access(target.root)
    try:
        yield target
    finally:
        if not os.environ.get("CTADATA_KEEP_SERVER_DATA"):
            shutil.rmtree(str(target.root), ignore_errors=True)


# ===========================================================================
# ctadata-specific fixtures (lead) -- add them below this line.
# Everything above is the generic real-server machinery (tests/servers.py).
# ===========================================================================

_TOKEN_ENV = ("CTADATA_TOKEN", "BEARER_TOKEN", "BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR",
              "CTADATA_URL", "X509_CERT_DIR", "X509_CERT_FILE", "CTADS_URL",
              "JUPYTERHUB_API_TOKEN", "CTADATA_PROFILE", "CTADATA_OIDC_AGENT",
              "CTADATA_CLIENT_SECRET", "X509_USER_PROXY", "XDG_CONFIG_HOME")

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No test sees the developer's tokens, storage URL or home folder."""
    for name in _TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import ctadata
    # /tmp/bt_u$UID and /tmp/x509up_u$UID: a private "tmp" per test, never the real one
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(ctadata, "_SYSTEM_TMP", str(tmp_path / "tmp"))
    ctadata.set_default_client(None)
    yield
    ctadata.set_default_client(None)


@pytest.fixture
def client(dav):
    """A ctadata.Client on the test's empty folder of a real server."""
    import ctadata
    with ctadata.Client(url=dav.url, token=dav.token, retries=1, timeout=20,
                        ca_file=dav.ca_file) as c:
        yield c


@pytest.fixture
def cli(dav, monkeypatch, capsys):
    """Run ``ctadata.main([...])`` in-process against the test's folder,
    token from $BEARER_TOKEN (never on the command line).  Returns
    (exit code, stdout, stderr)."""
    import ctadata
    monkeypatch.setenv("BEARER_TOKEN", dav.token)

    tls = ["--ca-file", dav.ca_file] if dav.ca_file else []

    def run(*argv):
        code = ctadata.main(["--url", dav.url] + tls + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def make_tree(root, spec):
    """Create files below *root* from {relative path: bytes}; return root."""
    root = Path(root)
    for rel, data in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def tree_digests(root):
    """{relative path: sha256 hex} of every file below *root*."""
    import hashlib
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftover_part(dest, head, client, path):
    """What an interrupted download of the remote *path* leaves at *dest*:
    DEST.part holding *head*, and DEST.part.meta, its provenance (the format
    in README, "Integrity and resilience"), without which it is not resumed."""
    import json
    e = client.stat(path)
    Path(str(dest) + ".part").write_bytes(head)
    Path(str(dest) + ".part.meta").write_text(json.dumps(
        {"format": 1, "url": e.url, "size": e.size, "validator": e.etag}))


# Names that break naive clients: spaces, percent, hash, question mark, unicode.
ODD_NAMES = ["plain.txt", "with space.dat", "100%.bin", "hash#tag.h5", "q?x.txt",
             "été 日本.fits"]


# -- service mode -------------------------------------------------------------
# The download-service double (tests/dsserver.py) in front of a seeded folder
# of the session's nginx, and clients of it.  (tests/test_dsserver.py has its
# own upstream and ds fixtures, parametrized over FaultServer, nginx, Apache.)

HUB_TOKEN = "alice-hub-token"
HUB_AREA = "lst/users/alice_example_org"   # HUB_TOKEN's own folder
SERVICE_A_BIN = bytes(range(256)) * 1200  # 307200 bytes
SERVICE_ODD = "été 日本 #1%.fits"


def _hub_users():
    from dsserver import CS_SCOPE, DS_SCOPE
    return {
        HUB_TOKEN: "alice_example_org",
        # The old README's user, so that its literal fetch of the uploaded path works.
        "volodymyr-token": "volodymyr.savchenko@epfl.ch",
        "no-scope-token": {"name": "carol", "scopes": ["read:users"]},
        "cert-only-token": {"name": "dave", "scopes": [CS_SCOPE]},
        "bob-token": {"name": "Bob", "scopes": [DS_SCOPE, CS_SCOPE]},
    }


HUB_USERS = _hub_users()


class Upstream:
    """Where a test's storage root is: ``url`` (no trailing slash), ``token``, ``root``."""

    def __init__(self, url, token, root):
        self.url, self.token, self.root = url, token, Path(root)


def seed_service_tree(root):
    """The storage tree the service tests expect below *root*."""
    return make_tree(root, {
        "lst/data/run1/a.bin": SERVICE_A_BIN,
        "lst/data/run1/with space.txt": b"spaced\n",
        "lst/data/run1/" + SERVICE_ODD: b"odd name\n",
        "lst/data/run1/sub/b.txt": b"12345",
        "lst/data/run1/sub/deeper/c.txt": b"c",
        HUB_AREA + "/.keep": b"",
        "lst/some-data-dir/some-data-file": b"some data\n",
        "lst/some-data-dir/sub/deeper.txt": b"deeper\n",
        "cta/DL1/20241114/v0.1/dl1_LST-1.Run11111.0100.h5": b"\x89HDF" * (512 * 1024),
        "cta/DL1/20241114/v0.1/datacheck_dl1_LST-1.Run11111.0100.h5": b"datacheck",
        "cta/DL1/20241114/v0.1/dl1_LST-1.Run11111.0101.h5": b"other subrun",
        "cta/DL1/20241114/v0.1/dl1_LST-1.Run22222.0100.h5": b"other run",
    })


@pytest.fixture
def upstream(nginx_server):
    """A seeded storage root (seed_service_tree) in a private folder of the
    session's nginx."""
    folder = "svc-" + secrets.token_hex(6)
    root = seed_service_tree(nginx_server.root / folder)
    nginx_server.grant_access(root)
    try:
        yield Upstream(nginx_server.url + "/" + folder, nginx_server.token, root)
    finally:
        shutil.rmtree(str(root), ignore_errors=True)


@pytest.fixture
def ds(upstream):
    """The download service (and certificate service) double over *upstream*;
    its users are HUB_USERS."""
    from dsserver import DownloadService
    with DownloadService(upstream.url, upstream.token, users=HUB_USERS) as service:
        yield service


@pytest.fixture
def svc(ds):
    """A service-mode Client with an explicit token and nothing from the environment."""
    import ctadata
    with ctadata.Client(service=ds.base_url, token=HUB_TOKEN, env={}, retries=1,
                        timeout=20) as c:
        yield c


@pytest.fixture
def hub(ds, monkeypatch):
    """The environment of a notebook using the service (as the old README sets it)."""
    monkeypatch.setenv("CTADS_URL", ds.base_url)
    monkeypatch.setenv("CTACS_URL", ds.cert_base_url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_TOKEN)
    return ds


@pytest.fixture
def old_api(monkeypatch):
    """Restore APIClient's class attributes after a test sets them."""
    import ctadata
    for name in ("downloadservice", "certificateservice", "token", "chunk_size"):
        monkeypatch.setattr(ctadata.APIClient, name, getattr(ctadata.APIClient, name))
    return ctadata.APIClient
