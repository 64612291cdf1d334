"""Capture real XRootD 5.5 answers into tests/data/ (run by hand, as root or
not: ``python3 tests/data/capture_xrootd.py``; it starts its own two
instances on loopback, see tests/servers.py, and stops them).

Writes:
  propfind-xrootd-depth1.xml        PROPFIND /dir/ Depth 1, odd names (below)
  propfind-xrootd-depth1-noslash.xml PROPFIND /dir/sub%20dir Depth 1 (no slash)
  propfind-xrootd-depth0-dir.xml    PROPFIND /dir/sub%20dir Depth 0
  propfind-xrootd-depth0-file.xml   PROPFIND /dir/lit%2520eral.txt Depth 0
  tpc-xrootd-pull.txt               COPY + Source: answer (perf markers, success)
  tpc-xrootd-push.txt               COPY + Destination: answer
  tpc-xrootd-pull-missing.txt       COPY + Source: of a missing file (failure)
  macaroon-xrootd.json              POST application/macaroon-request answer
                                    (asked with the test client certificate)
  macaroon-xrootd-asked-with-macaroon.json  the same asked with a bearer
                                    macaroon: only READ_METADATA inside

The listed folder holds "a file.txt" (10 bytes, mtime 2020-05-11 12:13:17),
"p%c#t.dat", "sub dir/" (with "inner.txt"), "é日本.bin", "lit%20eral.txt"
(a literal %20), "q?x.txt" (made on disk: XRootD cannot create it over HTTP),
"semi;amp&.txt", "[br]+eq=.txt", "quote'.txt" and "lt<gt>.txt".  The
macaroon and the time stamps in the copy answers are what the servers sent.
"""

import http.client
import json
import os
import shutil
import ssl
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import servers  # noqa: E402

NAMES = {"a file.txt": b"0123456789", "p%c#t.dat": b"0123456789",
         "sub dir/inner.txt": b"inner", "é日本.bin": b"0123456789",
         "lit%20eral.txt": b"literal", "q?x.txt": b"question",
         "semi;amp&.txt": b"x", "[br]+eq=.txt": b"x", "quote'.txt": b"x",
         "lt<gt>.txt": b"x"}


def request(srv, method, path, headers=None, body=None, cert=False):
    ctx = ssl.create_default_context(cafile=srv.ca_file)
    if cert:  # the test client certificate instead of the token
        ctx.load_cert_chain(srv.client_cert)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=60)
    h = dict(headers or {})
    if srv.requires_token and "Authorization" not in h and not cert:
        h["Authorization"] = "Bearer " + srv.token
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def main():
    base = Path(tempfile.mkdtemp(prefix="ctadata-capture-"))
    os.chmod(str(base), 0o755)
    ca = base / "ca"
    mac = servers.start_xrootd(base / "mac/root", base / "mac/work", ca_dir=ca, macaroons=True)
    opn = servers.start_xrootd(base / "open/root", base / "open/work", ca_dir=ca)
    try:
        d = mac.root / "dir"
        for name, data in NAMES.items():
            p = d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        os.utime(str(d / "a file.txt"), (1589199197, 1589199197))
        mac.grant_access(mac.root)
        for out, path, depth in (
                ("propfind-xrootd-depth1.xml", "/dir/", "1"),
                ("propfind-xrootd-depth1-noslash.xml", "/dir/sub%20dir", "1"),
                ("propfind-xrootd-depth0-dir.xml", "/dir/sub%20dir", "0"),
                ("propfind-xrootd-depth0-file.xml", "/dir/lit%2520eral.txt", "0")):
            status, data = request(mac, "PROPFIND", path, {"Depth": depth})
            assert status == 207, (status, data)
            (HERE / out).write_bytes(data)

        # third-party copies between the instances (open -> macaroons)
        (opn.root / "tpc").mkdir()
        (opn.root / "tpc/src.bin").write_bytes(os.urandom(1 << 20))
        opn.grant_access(opn.root)
        src = opn.url + "/tpc/src.bin"
        status, data = request(mac, "COPY", "/dir/pulled.bin",
                               {"Source": src, "Credential": "none"})
        assert status == 201, (status, data)
        (HERE / "tpc-xrootd-pull.txt").write_bytes(data)
        upload = servers.mint_macaroon(mac, "/dir/", ["activity:UPLOAD"], "PT10M")
        status, data = request(opn, "COPY", "/tpc/src.bin", {
            "Destination": mac.url + "/dir/pushed.bin", "Credential": "none",
            "TransferHeaderAuthorization": "Bearer " + upload})
        assert status == 201, (status, data)
        (HERE / "tpc-xrootd-push.txt").write_bytes(data)
        status, data = request(mac, "COPY", "/dir/never.bin",
                               {"Source": opn.url + "/tpc/missing.bin", "Credential": "none"})
        (HERE / "tpc-xrootd-pull-missing.txt").write_bytes(data)
        print("missing source: HTTP", status)

        ask = json.dumps({"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT1H"}).encode()
        status, data = request(mac, "POST", "/dir/", {
            "Content-Type": "application/macaroon-request"}, ask, cert=True)
        assert status == 200, (status, data)
        (HERE / "macaroon-xrootd.json").write_bytes(data)
        # asked with a bearer macaroon, the new one only allows READ_METADATA:
        # XRootD grants what its authdb gives the requester's identity
        status, data = request(mac, "POST", "/dir/", {
            "Content-Type": "application/macaroon-request"}, ask)
        assert status == 200, (status, data)
        (HERE / "macaroon-xrootd-asked-with-macaroon.json").write_bytes(data)
    finally:
        mac.stop()
        opn.stop()
        shutil.rmtree(str(base), ignore_errors=True)
    print("written to", HERE)


if __name__ == "__main__":
    main()
