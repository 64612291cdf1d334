"""Reading without downloading (issue 14, part 3): `ctadata cat` / `get PATH -`,
Client.open() / ctadata.open() (HTTP Range reads with a block cache and
read-ahead: zipfile, h5py, astropy read only what they need), and
`ctadata sum --local`."""

import hashlib
import io
import os
import random
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

import ctadata
from conftest import HUB_TOKEN, SERVICE_A_BIN, make_tree
from faultserver import FaultServer

REPO = Path(__file__).resolve().parent.parent


class Spy:
    """Counts the GETs a Client's transport sends and the body bytes they
    carry, independently of the file object's own counters."""

    def __init__(self, monkeypatch, client):
        self.gets = self.bytes = 0
        self.ranges = []
        tr = client._transport
        real = tr.request

        def request(method, url, headers=None, *args, **kwargs):
            resp = real(method, url, headers, *args, **kwargs)
            if method == "GET":
                self.gets += 1
                self.ranges.append((headers or {}).get("Range"))
                self.bytes += int(resp.getheader("Content-Length") or 0)
            return resp
        monkeypatch.setattr(tr, "request", request)


# -- cat, get PATH - ---------------------------------------------------------------


def run_cli(url, token, *argv):
    env = dict(os.environ, PYTHONPATH=str(REPO), BEARER_TOKEN=token)
    p = subprocess.Popen([sys.executable, "-m", "ctadata", "--url", url] + list(argv),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err.decode()


def test_cat_writes_the_bytes_to_stdout(dav):
    data = bytes(range(256)) * 4000 + b"\r\n\x00\x1a end"
    make_tree(dav.root, {"bin/f.dat": data, "bin/g.txt": b"second\n"})
    code, out, err = run_cli(dav.url, dav.token, "cat", "bin/f.dat")
    assert code == 0, err
    assert out == data and err == ""
    code, out, err = run_cli(dav.url, dav.token, "cat", "bin/f.dat", "bin/g.txt")
    assert code == 0 and out == data + b"second\n"
    code, out, err = run_cli(dav.url, dav.token, "get", "bin/g.txt", "-")
    assert code == 0 and out == b"second\n"
    assert not Path("-").exists()


def test_cat_refuses_a_directory_and_get_dash_options(cli, dav):
    make_tree(dav.root, {"d/f": b"f"})
    code, out, err = cli("cat", "d")
    assert code == 2 and "d is a directory (cat reads files)" in err
    code, out, err = cli("get", "-r", "d", "-")
    assert code == 2 and "get PATH - writes one file" in err
    code, out, err = cli("cat", "nope")
    assert code == 1 and "nope" in err


def test_cat_checksum_mismatch_is_an_error_after_the_bytes(tmp_path, capsysbinary,
                                                           monkeypatch):
    data = os.urandom(300000)
    make_tree(tmp_path / "root", {"f.bin": data})
    monkeypatch.setenv("BEARER_TOKEN", "tok")
    with FaultServer(tmp_path / "root") as srv:
        srv.add_fault("corrupt", method="GET", path="/f.bin", offset=1000, times=None)
        code = ctadata.main(["--url", srv.url, "--retries", "0", "cat", "f.bin"])
    out, err = capsysbinary.readouterr()
    assert code == 1
    assert len(out) == len(data) and out != data          # written, and wrong
    assert b"adler32 checksum mismatch" in err and b"not the file" in err


def test_cat_resumes_where_the_connection_dropped(tmp_path, capsysbinary, monkeypatch):
    data = os.urandom(1 << 20)
    make_tree(tmp_path / "root", {"f.bin": data})
    monkeypatch.setenv("BEARER_TOKEN", "tok")
    with FaultServer(tmp_path / "root") as srv:
        srv.add_fault("truncate", method="GET", path="/f.bin", after=300000)
        code = ctadata.main(["--url", srv.url, "--retries", "2", "cat", "f.bin"])
        ranges = [r.headers.get("range") for r in srv.requests if r.method == "GET"]
    out, err = capsysbinary.readouterr()
    assert code == 0, err
    assert out == data
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert ranges[1].endswith("-%d" % (len(data) - 1))   # closed: XRootD 5.5 wants it


def test_cat_in_service_mode(svc):
    buf = io.BytesIO()
    assert svc.cat("lst/data/run1/a.bin", buf) == len(SERVICE_A_BIN)
    assert buf.getvalue() == SERVICE_A_BIN


# -- open() --------------------------------------------------------------------------


def make_zip(path, members):
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path.read_bytes()


def test_zipfile_reads_a_remote_zip_in_a_few_requests(client, dav, tmp_path, monkeypatch):
    rnd = random.Random(5)
    members = {"m%02d.bin" % i: bytes(rnd.getrandbits(8) for _ in range(1000)) * 600
               for i in range(12)}                                # 12 x 600 kB
    members["small.txt"] = b"hello zip\n"
    blob = make_zip(tmp_path / "a.zip", members)
    (dav.root / "a.zip").write_bytes(blob)
    spy = Spy(monkeypatch, client)
    with client.open("a.zip", block_size=64 << 10) as f:
        assert f.size == len(blob) and f.name == "a.zip" and f.seekable()
        z = zipfile.ZipFile(f)
        assert sorted(z.namelist()) == sorted(members)
        assert z.read("small.txt") == b"hello zip\n"
        assert z.read("m07.bin") == members["m07.bin"]
        # the directory at the end, one small member and one 600 kB member
        assert f.fetched == spy.bytes and f.requests == spy.gets
        assert spy.gets <= 6, spy.ranges
        assert spy.bytes < 1.5 * 600000 + 3 * (64 << 10), spy.ranges
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


@pytest.mark.parametrize("block", [1000, 64 << 10, 1 << 20])
def test_reads_and_seeks_match_the_local_file(client, dav, block):
    data = os.urandom(3 * (1 << 20) + 12345)
    (dav.root / "r.bin").write_bytes(data)
    rnd = random.Random(block)
    with client.open("r.bin", block_size=block, cache_size=4 * block) as f:
        local = io.BytesIO(data)
        for _ in range(60):
            op = rnd.choice(("seek", "read", "readinto", "seek_end", "tell"))
            if op == "seek":
                pos = rnd.randrange(0, len(data) + 10)
                assert f.seek(pos) == local.seek(pos)
            elif op == "seek_end":
                assert f.seek(-rnd.randrange(1, 5000), 2) == local.seek(
                    f.tell() - len(data), 2)
            elif op == "read":
                n = rnd.choice((1, 7, block - 1, block + 1, 3 * block, 200000))
                assert f.read(n) == local.read(n)
            elif op == "readinto":
                buf = bytearray(rnd.randrange(1, 3 * block))
                n = f.readinto(buf)
                assert buf[:n] == local.read(len(buf))
            assert f.tell() == local.tell()
        f.seek(100)
        assert f.read() == data[100:]
        assert f.read(10) == b"" and f.tell() == len(data)
        f.seek(-3, 1)
        assert f.read() == data[-3:]


def test_sequential_reads_read_ahead(client, dav, monkeypatch):
    data = os.urandom(16 << 20)
    (dav.root / "seq.bin").write_bytes(data)
    spy = Spy(monkeypatch, client)
    with client.open("seq.bin", block_size=256 << 10) as f:
        out = b"".join(iter(lambda: f.read(64 << 10), b""))
    assert out == data
    # 256 reads of 64 KiB; read-ahead doubles: 1+2+4+8+16+32 blocks, then 8 MiB steps
    assert spy.gets <= 8, spy.ranges
    assert spy.bytes == len(data)


def test_a_file_changed_after_open_is_an_error(client, dav):
    (dav.root / "c.bin").write_bytes(os.urandom(300000))
    # XRootD sends neither ETag nor Last-Modified: only a new size shows there
    size = 300001 if dav.name == "xrootd" else 300000
    with client.open("c.bin", block_size=65536) as f:
        f.read(10)
        (dav.root / "c.bin").write_bytes(os.urandom(size))
        os.utime(str(dav.root / "c.bin"), (1, 1))        # new mtime and ETag
        f.seek(200000)
        with pytest.raises(ctadata.TransferError, match="changed since it was opened"):
            f.read(10)


def test_open_refuses_what_it_cannot_read(client, dav):
    make_tree(dav.root, {"d/f": b"f"})
    with pytest.raises(ctadata.ConfigError, match="is a directory"):
        client.open("d")
    with pytest.raises(ctadata.ConfigError, match="mode must be 'rb'"):
        client.open("d/f", "r")
    with pytest.raises(ctadata.NotFound):
        client.open("d/nope")


def test_module_open_on_the_default_client(dav, monkeypatch):
    make_tree(dav.root, {"m.txt": b"line one\nline two\n"})
    monkeypatch.setenv("CTADATA_URL", dav.url)
    monkeypatch.setenv("BEARER_TOKEN", dav.token)
    with ctadata.open("m.txt") as f:
        assert io.TextIOWrapper(f, encoding="utf-8").readlines() == ["line one\n",
                                                                      "line two\n"]
    # ctadata.open does not hide the built-in open() from the module itself
    assert "open" not in vars(ctadata) and "open" not in ctadata.__all__


def test_open_in_service_mode_reads_front_to_back(svc):
    with svc.open("lst/data/run1/a.bin") as f:
        assert not f.seekable()
        assert f.read(1000) == SERVICE_A_BIN[:1000]
        assert f.seek(1000) == 1000                       # where it is: fine
        with pytest.raises(io.UnsupportedOperation, match="ignores Range"):
            f.seek(0)
        assert f.read() == SERVICE_A_BIN[1000:]
        assert f.requests == 1


# -- h5py and astropy, when installed (test-only packages; see README) ---------------


def test_h5py_reads_only_what_it_needs(client, dav, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    path = tmp_path / "x.h5"
    with h5py.File(str(path), "w") as h:
        h.create_dataset("events/big", data=np.arange(4 << 20, dtype="f8"))   # 32 MiB
        h.create_group("meta").attrs["run"] = 11111
        h.create_dataset("meta/small", data=np.arange(10))
    (dav.root / "x.h5").write_bytes(path.read_bytes())
    spy = Spy(monkeypatch, client)
    with client.open("x.h5", block_size=256 << 10) as f, h5py.File(f, "r") as h:
        assert sorted(h.keys()) == ["events", "meta"]
        assert h["meta"].attrs["run"] == 11111
        assert list(h["meta/small"][:]) == list(range(10))
        assert h["events/big"][1000:1003].tolist() == [1000.0, 1001.0, 1002.0]
        assert spy.bytes < 2 << 20, spy.ranges                   # of 32 MiB
    assert f.fetched == spy.bytes


def test_astropy_fits_reads_only_what_it_needs(client, dav, tmp_path, monkeypatch):
    fits = pytest.importorskip("astropy.io.fits")
    np = pytest.importorskip("numpy")
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((2048, 2048), "f4"),
                                                          name="IMG"),
                         fits.BinTableHDU.from_columns([fits.Column("e", "E", array=np.arange(
                             100, dtype="f4"))], name="EVENTS")])
    hdus.writeto(str(tmp_path / "x.fits"))
    (dav.root / "x.fits").write_bytes((tmp_path / "x.fits").read_bytes())
    spy = Spy(monkeypatch, client)
    with client.open("x.fits", block_size=64 << 10) as f:
        with fits.open(f) as h:
            assert [x.name for x in h] == ["PRIMARY", "IMG", "EVENTS"]
            assert h["EVENTS"].data["e"][:3].tolist() == [0.0, 1.0, 2.0]
    assert spy.bytes < 1 << 20, spy.ranges                      # of 16 MiB


# -- sum --local -----------------------------------------------------------------------


def test_sum_local_streams_adler32_and_md5(cli, tmp_path):
    a = tmp_path / "a.bin"
    b = tmp_path / "b b.bin"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(b"")
    code, out, err = cli("sum", "--local", str(a))
    assert code == 0, err
    assert out == "adler32 %08x\n" % (zlib.adler32(a.read_bytes()) & 0xFFFFFFFF)
    code, out, err = cli("sum", "--local", "--algo", "md5", str(a), str(b))
    assert out == "md5 %s  %s\nmd5 %s  %s\n" % (
        hashlib.md5(a.read_bytes()).hexdigest(), a, hashlib.md5(b"").hexdigest(), b)
    code, out, err = cli("sum", "--local", str(tmp_path / "nope"))
    assert code == 2 and "cannot read" in err


def test_sum_local_matches_the_server(tmp_path, capsys, monkeypatch):
    data = os.urandom(500000)
    make_tree(tmp_path / "root", {"f.bin": data})
    (tmp_path / "f.bin").write_bytes(data)
    monkeypatch.setenv("BEARER_TOKEN", "tok")
    with FaultServer(tmp_path / "root") as srv:
        assert ctadata.main(["--url", srv.url, "sum", "--algo", "adler32", "f.bin"]) == 0
        remote = capsys.readouterr().out
    assert ctadata.main(["sum", "--local", str(tmp_path / "f.bin")]) == 0
    assert capsys.readouterr().out == remote


def test_local_checksums_do_not_read_the_whole_file(tmp_path):
    tracemalloc = pytest.importorskip("tracemalloc")     # not in PyPy
    big = tmp_path / "big.bin"
    with open(str(big), "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    tracemalloc.start()
    try:
        sums = ctadata._local_checksums(str(big), ("adler32", "md5"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20
    assert sums["md5"] == hashlib.md5(big.read_bytes()).hexdigest()


def test_open_through_the_services_webdav_pass_through_seeks(svc):
    # the pass-through forwards Range to the storage (as the double does)
    with svc.webdav_client() as dav_client:
        with dav_client.open("lst/data/run1/a.bin", block_size=65536) as f:
            assert f.seekable()
            f.seek(-100, 2)
            assert f.read() == SERVICE_A_BIN[-100:]
            f.seek(1000)
            assert f.read(10) == SERVICE_A_BIN[1000:1010]
            assert f.fetched < len(SERVICE_A_BIN)
