"""ctadata against XRootD 5.5's HTTP door: what XRootD does differently
from nginx/Apache (tests/test_xrootd.py pins it) and how the client copes.
The everyday commands run on XRootD too, through the ``dav`` fixture
(tests/test_dav.py, tests/test_everyday.py)."""

import os
import zlib

import pytest

import ctadata
from conftest import dav_target, make_tree, tree_digests

# what XRootD stores faithfully (tests/test_xrootd.py, /work/notes/xrootd-names.md)
GOOD_NAMES = ["with space.txt", "hash#tag.h5", "100%.bin", "lit%20eral.txt", "amp&semi;.txt",
              "quote'.txt", "[br]+eq=.txt", "été 日本.fits"]


@pytest.fixture
def xrd(request):
    yield from dav_target(request, "xrootd")


@pytest.fixture
def xclient(xrd):
    with ctadata.Client(url=xrd.url, token=xrd.token, retries=1, timeout=20,
                        ca_file=xrd.ca_file) as c:
        yield c


def test_listing_odd_names(xclient, xrd):
    spec = {"odd names/" + n: n.encode() for n in GOOD_NAMES}
    spec["odd names/sub dir/x"] = b"x"
    make_tree(xrd.root, spec)
    xrd.grant_access(xrd.root)
    got = {e.name: e for e in xclient.ls("odd names")}
    assert sorted(got) == sorted(GOOD_NAMES + ["sub dir"])
    assert got["lit%20eral.txt"].size == len(b"lit%20eral.txt")
    assert xclient.stat("odd names/lit%20eral.txt").size == len(b"lit%20eral.txt")
    assert xclient.stat("odd names/sub dir").is_dir
    every = {e.path for e in xclient.ls("odd names", recursive=True)}
    assert "odd names/sub dir/x" in every and len(every) == len(GOOD_NAMES) + 2
    assert xclient.warnings == []
