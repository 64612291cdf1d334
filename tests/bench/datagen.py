"""Benchmark data: generated once under tests/bench/data/<profile>/, then reused.

Layout of ``<profile>/root`` (served as the nginx document root):

    big.bin                       one random file (1 GiB; quick: 64 MiB)
    many/dNN/fNNNN.bin            5,000 random 16 KiB files in 50 directories
                                  (wan: 250 in 10 directories, 256 MiB big.bin)
    wide/wNNNNN.dat               20,000 random 1 KiB files in one directory
    huge/hNNNNNN                  200,000 empty files (only for ls_huge)
    scratch/                      upload target, emptied between runs

Every component is written under a temporary name, renamed into place, and
then recorded in ``<profile>/<component>.json`` (parameters + sha256 sums).
A component is regenerated when its record is missing, was made with other
parameters, or a cheap check (sizes, file counts) does not match the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

CHUNK = 4 << 20

PROFILES = {
    "full": {"big_bytes": 1 << 30, "many_files": 5000, "many_dirs": 50,
             "many_bytes": 16 << 10, "wide_files": 20000, "wide_bytes": 1 << 10,
             "huge_files": 200000},
    "quick": {"big_bytes": 64 << 20, "many_files": 500, "many_dirs": 50,
              "many_bytes": 16 << 10, "wide_files": 2000, "wide_bytes": 1 << 10,
              "huge_files": 20000},
    # the WAN mode: every small file costs round trips, every MiB a share of
    # the emulated window: fewer files and a smaller big file keep a run short
    "wan": {"big_bytes": 256 << 20, "many_files": 250, "many_dirs": 10,
            "many_bytes": 16 << 10, "wide_files": 20000, "wide_bytes": 1 << 10,
            "huge_files": 20000},
    "wan-quick": {"big_bytes": 16 << 20, "many_files": 100, "many_dirs": 10,
                  "many_bytes": 16 << 10, "wide_files": 2000, "wide_bytes": 1 << 10,
                  "huge_files": 20000},
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def many_relpath(i: int, ndirs: int) -> str:
    return "d%02d/f%04d.bin" % (i % ndirs, i)


def wide_name(i: int) -> str:
    return "w%05d.dat" % i


def huge_name(i: int) -> str:
    return "h%06d" % i


def _log(msg: str) -> None:
    print("[data] " + msg, file=sys.stderr, flush=True)


def _count_files(top: str) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(top):
        n += len(files)
    return n


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class DataSet:
    """The data of one profile; ``ensure(components)`` creates what is missing."""

    def __init__(self, base: str, profile: str, many: int = 0):
        self.p = dict(PROFILES[profile])
        if many:  # another number of small files (e.g. the loopback's 5,000 over a WAN)
            profile = "%s-many%d" % (profile, many)
            self.p["many_files"], self.p["many_dirs"] = many, max(1, min(50, many // 25))
        self.profile = profile
        self.dir = os.path.join(base, profile)
        self.root = os.path.join(self.dir, "root")
        self.big = os.path.join(self.root, "big.bin")
        self.many = os.path.join(self.root, "many")
        self.wide = os.path.join(self.root, "wide")
        self.huge = os.path.join(self.root, "huge")
        self.scratch = os.path.join(self.root, "scratch")
        self.records = {}  # component -> record dict

    # -- records -----------------------------------------------------------
    def _record_path(self, comp: str) -> str:
        return os.path.join(self.dir, comp + ".json")

    def _params(self, comp: str) -> dict:
        keys = {"big": ["big_bytes"], "many": ["many_files", "many_dirs", "many_bytes"],
                "wide": ["wide_files", "wide_bytes"], "huge": ["huge_files"]}[comp]
        return {k: self.p[k] for k in keys}

    def _load(self, comp: str):
        try:
            with open(self._record_path(comp)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if rec.get("params") != self._params(comp):
            return None
        return rec

    def _save(self, comp: str, rec: dict) -> None:
        rec["params"] = self._params(comp)
        rec["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = self._record_path(comp) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, self._record_path(comp))

    def _complete(self, comp: str, rec: dict) -> bool:
        p = self.p
        try:
            if comp == "big":
                return os.path.getsize(self.big) == p["big_bytes"]
            if comp == "many":
                return _count_files(self.many) == p["many_files"]
            if comp == "wide":
                return len(os.listdir(self.wide)) == p["wide_files"]
            if comp == "huge":
                return len(os.listdir(self.huge)) == p["huge_files"]
        except OSError:
            return False
        return False

    # -- generation --------------------------------------------------------
    def _gen_big(self) -> dict:
        tmp = self.big + ".tmp"
        h = hashlib.sha256()
        left = self.p["big_bytes"]
        with open(tmp, "wb") as f:
            while left > 0:
                b = os.urandom(min(CHUNK, left))
                h.update(b)
                f.write(b)
                left -= len(b)
        os.replace(tmp, self.big)
        return {"size": self.p["big_bytes"], "sha256": h.hexdigest()}

    def _gen_tree(self, final: str, names, size: int) -> dict:
        tmp = final + ".tmp"
        _rmtree(tmp)
        os.makedirs(tmp)
        sums = {}
        made = set()
        for rel in names:
            d = os.path.dirname(rel)
            if d and d not in made:
                os.makedirs(os.path.join(tmp, d), exist_ok=True)
                made.add(d)
            b = os.urandom(size) if size else b""
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(b)
            sums[rel] = hashlib.sha256(b).hexdigest()
        _rmtree(final)
        os.rename(tmp, final)
        return sums

    def _generate(self, comp: str) -> dict:
        p = self.p
        if comp == "big":
            return self._gen_big()
        if comp == "many":
            names = [many_relpath(i, p["many_dirs"]) for i in range(p["many_files"])]
            return {"sha256": self._gen_tree(self.many, names, p["many_bytes"])}
        if comp == "wide":
            names = [wide_name(i) for i in range(p["wide_files"])]
            self._gen_tree(self.wide, names, p["wide_bytes"])
            return {}
        if comp == "huge":
            names = [huge_name(i) for i in range(p["huge_files"])]
            self._gen_tree(self.huge, names, 0)
            return {}
        raise ValueError(comp)

    def ensure(self, components) -> None:
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.scratch, exist_ok=True)
        generated = False
        for comp in components:
            rec = self._load(comp)
            if rec is not None and self._complete(comp, rec):
                self.records[comp] = rec
                continue
            t0 = time.monotonic()
            _log("generating %s/%s ..." % (self.profile, comp))
            try:
                os.unlink(self._record_path(comp))
            except OSError:
                pass
            rec = self._generate(comp)
            self._save(comp, rec)
            self.records[comp] = self._load(comp)
            generated = True
            _log("  %s done in %.1f s" % (comp, time.monotonic() - t0))
        if generated:
            os.sync()  # do not let write-back of fresh data disturb the first runs

    # -- expectations for verification --------------------------------------
    @property
    def big_sha256(self) -> str:
        return self.records["big"]["sha256"]

    @property
    def many_sums(self) -> dict:
        return self.records["many"]["sha256"]

    def wide_names(self) -> "set[str]":
        return {wide_name(i) for i in range(self.p["wide_files"])}

    def huge_names(self) -> "set[str]":
        return {huge_name(i) for i in range(self.p["huge_files"])}
