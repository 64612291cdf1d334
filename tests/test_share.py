"""`ctadata share`: links that work without an account (macaroons), issue 11
part 3, against the XRootD instance with macaroons (reached with the test
client certificate, see tests/test_cp.py), `ctadata serve` and nginx (which
issues none).  A link is checked the way its holder would use it: a raw GET
with ``?authz=`` and nothing else, and ``Authorization: Bearer``."""

import http.client
import json
import logging
import os
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import ctadata
from conftest import dav_target, make_tree
from test_cp import put_files, xclient

SERVE_TOKEN = "serve-token-share-0123456789"


@pytest.fixture
def xa(request):
    yield from dav_target(request, "xrootd")


def fetch(url, method="GET", body=None, bearer=None, ca_file=None):
    """A request as a browser or curl would send it: the URL as given (its
    ?authz= too), no other credential unless *bearer*; (status, body)."""
    u = urlsplit(url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=30,
                                           context=ssl.create_default_context(cafile=ca_file))
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Authorization": "Bearer " + bearer} if bearer else {}
    try:
        conn.request(method, u.path + ("?" + u.query if u.query else ""), body, headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_xrootd_accepts_a_shared_link_for_what_it_allows(xa, tmp_path):
    data = os.urandom(12345)
    put_files(xa, {"pub/f.bin": data, "pub/g.bin": b"other", "in/.keep": b""})
    ca = xa.ca_file
    with xclient(xa, tmp_path) as c:
        link = c.share("pub/f.bin", "1h")
        upload = c.share("in/", allow="upload", duration=600)
    assert link.url == xa.url + "pub/f.bin?authz=" + link.macaroon
    assert link.allow == ["download", "list"] and link.path == "pub/f.bin"
    assert 3500 < link.expires - time.time() <= 3600
    # a download with the link alone, and with the macaroon as a bearer token
    assert fetch(link.url, ca_file=ca) == (200, data)
    assert fetch(xa.url + "pub/f.bin", bearer=link.macaroon, ca_file=ca) == (200, data)
    # ... but not another file, not an upload, not without the macaroon
    assert fetch(xa.url + "pub/g.bin?authz=" + link.macaroon, ca_file=ca)[0] == 403
    assert fetch(xa.url + "pub/f.bin", "PUT", b"x", bearer=link.macaroon, ca_file=ca)[0] == 403
    assert fetch(xa.url + "pub/f.bin", ca_file=ca)[0] == 403
    assert (xa.root / "pub/f.bin").read_bytes() == data
    # an upload link writes into its folder, not elsewhere.  (XRootD 5.5 lets any
    # of its macaroons read within its path: there, --allow limits writes only.)
    assert fetch(xa.url + "in/new.bin", "PUT", b"new", bearer=upload.macaroon,
                 ca_file=ca)[0] in (200, 201)
    assert (xa.root / "in/new.bin").read_bytes() == b"new"
    assert fetch(xa.url + "pub/new.bin", "PUT", b"new", bearer=upload.macaroon,
                 ca_file=ca)[0] == 403
    assert fetch(xa.url + "in/new.bin?authz=" + upload.macaroon, ca_file=ca) == (200, b"new")


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    make_tree(root, {"cta/DL1/run1.h5": b"h5 data", "cta/DL1/run2.h5": b"more",
                     "private/secret.txt": b"no", "cta/incoming/.keep": b""})
    with ctadata.serve(str(root), token=SERVE_TOKEN) as srv:
        yield srv


@pytest.fixture
def cli(served, monkeypatch, capsys):
    monkeypatch.setenv("BEARER_TOKEN", SERVE_TOKEN)

    def run(*argv):
        code = ctadata.main(["--url", served.url] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_share_prints_a_link_and_never_logs_the_macaroon(served, cli, caplog):
    caplog.set_level(logging.DEBUG, logger="ctadata")
    code, out, err = cli("-v", "share", "cta/DL1/", "--for", "2h")
    assert code == 0, err
    url = out.strip()
    assert url.startswith(served.url + "/cta/DL1/?authz=") and "\n" not in url
    macaroon = url.split("authz=", 1)[1]
    assert fetch(served.url + "/cta/DL1/run2.h5?authz=" + macaroon) == (200, b"more")
    assert fetch(served.url + "/private/secret.txt?authz=" + macaroon)[0] in (401, 403)
    assert "ctadata: cta/DL1/: download,list until" in err
    assert macaroon not in err and macaroon not in caplog.text
    assert SERVE_TOKEN not in out + err + caplog.text
    code, out, err = cli("share", "cta/DL1/run1.h5", "--json", "--allow", "download",
                         "--for", "P1D", "--ip", "127.0.0.1")
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"url", "macaroon", "path", "allow", "ip", "expires",
                                      "expires_in"}
    assert doc["url"] == served.url + "/cta/DL1/run1.h5?authz=" + doc["macaroon"]
    assert doc["allow"] == ["download"] and doc["ip"] == "127.0.0.1"
    assert 86000 < doc["expires_in"] <= 86400 and doc["expires"].endswith("Z")
    assert fetch(doc["url"]) == (200, b"h5 data")
    # an upload link of ctadata serve writes, and reads nothing
    code, out, err = cli("share", "cta/incoming/", "--allow", "upload")
    assert code == 0, err
    mac = out.strip().split("authz=", 1)[1]
    assert fetch(served.url + "/cta/incoming/new.h5", "PUT", b"new", bearer=mac)[0] == 201
    assert fetch(served.url + "/cta/incoming/new.h5?authz=" + mac)[0] in (401, 403)
    assert (Path(served.root) / "cta/incoming/new.h5").read_bytes() == b"new"


def test_a_link_is_refused_outside_its_address_and_after_it_expired(served):
    with served.client() as c:
        elsewhere = c.share("cta/DL1/run1.h5", ip="192.0.2.0/24")
        short = c.share("cta/DL1/run1.h5", duration=1)
        assert "macaroon" not in repr(short).lower() and short.macaroon not in repr(short)
        assert short.url not in repr(short)
    assert fetch(elsewhere.url)[0] in (401, 403)
    assert fetch(short.url)[0] == 200
    time.sleep(1.2)
    assert fetch(short.url)[0] in (401, 403)


def test_share_refuses_bad_input_and_servers_without_macaroons(served, cli, nginx_server):
    for argv, why in ((("--for", "soon"), "positive duration"),
                      (("--for", "0s"), "positive duration"),
                      (("--allow", "download,fly"), "may allow download, list, upload"),
                      (("--ip", "not-an-address"), "--ip takes an address")):
        code, out, err = cli("share", "cta/DL1/run1.h5", *argv)
        assert code == 2 and why in err and out == "", (argv, err)
    with ctadata.Client(url=nginx_server.url, token=nginx_server.token, env={},
                        retries=0) as c:
        (Path(nginx_server.root) / "share-probe.txt").write_bytes(b"x")
        with pytest.raises(ctadata.RemoteError, match="issues no macaroons") as e:
            c.share("share-probe.txt")
        assert "share needs a storage that issues macaroons" in str(e.value)
    with pytest.raises(ctadata.ConfigError, match="not offered by the download service"):
        ctadata.Client(service="http://127.0.0.1:9/ds/", env={}).share("x")
