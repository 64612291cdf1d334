#!/usr/bin/env python3
"""How many requests and bytes Client.open() costs readers that seek, per
block size: zipfile (list a 100 MiB archive, read a small and a 1 MiB
member), h5py (keys() of a 1 GiB file; keys, attributes and a slice),
astropy.io.fits (the HDU names of a 192 MiB file and a table column), and a
sequential read of 256 MiB; against a loopback nginx.

    python3 tests/bench/open_blocks.py [--blocks 64K,256K,1M,4M] [--rtt-ms 20] [--mbps 100]

h5py and astropy are optional (their rows are left out when missing; a venv
with `pip install h5py astropy` runs them).  The "model" column estimates
the time over a wide-area link: requests x RTT + bytes / bandwidth.
"""

import argparse
import io
import os
import secrets
import shutil
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import ctadata  # noqa: E402
import servers  # noqa: E402


def size_arg(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


def make_zip(path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(100):
            z.writestr("member%03d.bin" % i, os.urandom(1 << 20))
        z.writestr("README.txt", b"a small member\n")


def make_h5(path):
    import h5py
    import numpy as np
    with h5py.File(path, "w") as h:
        h.create_group("config").attrs["run"] = 11111
        big = h.create_dataset("events/big", shape=(128 << 20,), dtype="f8")  # 1 GiB
        step = 8 << 20
        for i in range(0, big.shape[0], step):
            big[i:i + step] = np.arange(i, i + step, dtype="f8")
        g = h.create_group("monitoring")                 # after the data: at the end
        g.attrs["source"] = "bench"
        g.create_dataset("rates", data=np.arange(1000))


def make_fits(path):
    import numpy as np
    from astropy.io import fits
    hdus = [fits.PrimaryHDU()]
    for i in range(3):
        hdus.append(fits.ImageHDU(np.zeros((4096, 4096), "f4"), name="IMG%d" % i))  # 64 MiB
    hdus.append(fits.BinTableHDU.from_columns(
        [fits.Column("energy", "E", array=np.arange(1000, dtype="f4"))], name="EVENTS"))
    fits.HDUList(hdus).writeto(path)


def zip_task(f):
    z = zipfile.ZipFile(f)
    assert len(z.namelist()) == 101
    z.read("README.txt")
    z.read("member050.bin")


def h5_keys(f):
    import h5py
    with h5py.File(f, "r") as h:
        assert sorted(h.keys()) == ["config", "events", "monitoring"]


def h5_more(f):
    import h5py
    with h5py.File(f, "r") as h:
        list(h.keys())
        assert h["config"].attrs["run"] == 11111
        assert h["monitoring"].attrs["source"] == "bench"
        assert h["monitoring/rates"][:10].tolist() == list(range(10))
        assert h["events/big"][5000000:5000003].tolist() == [5000000.0, 5000001.0, 5000002.0]


def fits_task(f):
    from astropy.io import fits
    with fits.open(f) as h:
        assert [x.name for x in h] == ["PRIMARY", "IMG0", "IMG1", "IMG2", "EVENTS"]
        assert h["EVENTS"].data["energy"][:3].tolist() == [0.0, 1.0, 2.0]


def sequential(f):
    while f.read(1 << 20):
        pass


def have(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="64K,256K,1M,4M")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbps", type=float, default=100.0, help="MB/s of the model link")
    a = ap.parse_args()
    blocks = [size_arg(b) for b in a.blocks.split(",")]
    tmp = tempfile.mkdtemp(prefix="ctadata-open-blocks-")
    try:
        root = os.path.join(tmp, "root")
        os.makedirs(root)
        tasks = [("zipfile: list, read 2 members", "a.zip", zip_task)]
        make_zip(os.path.join(root, "a.zip"))
        with open(os.path.join(root, "seq.bin"), "wb") as out:
            for _ in range(256):
                out.write(os.urandom(1 << 20))
        if have("h5py"):
            make_h5(os.path.join(root, "x.h5"))
            tasks += [("h5py: keys() of 1 GiB", "x.h5", h5_keys),
                      ("h5py: keys, attrs, 2 slices", "x.h5", h5_more)]
        if have("astropy"):
            make_fits(os.path.join(root, "x.fits"))
            tasks.append(("astropy: 5 HDU names, a column", "x.fits", fits_task))
        tasks.append(("sequential read of 256 MiB", "seq.bin", sequential))
        token = secrets.token_urlsafe(24)
        with servers.start_nginx(root, token, os.path.join(tmp, "work")) as srv:
            c = ctadata.Client(url=srv.url, token=token)
            print("%-32s %6s %9s %12s %9s" % ("task (file size)", "block", "requests",
                                              "bytes", "model s"))
            for label, name, task in tasks:
                size = os.path.getsize(os.path.join(root, name))
                for bs in blocks:
                    with c.open(name, block_size=bs) as f:
                        task(f)
                        model = f.requests * a.rtt_ms / 1000 + f.fetched / (a.mbps * 1e6)
                        print("%-32s %6s %9d %12d %9.2f" % (
                            "%s (%s)" % (label, ctadata._human_bytes(size)),
                            ctadata._human(bs), f.requests, f.fetched, model))
            c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
