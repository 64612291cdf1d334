"""How results look in a notebook and at a prompt: Entry, listings,
TransferSummary and du results have an escaped HTML table (_repr_html_) and
a readable repr; Entry.modified is a datetime (issue 14, part 2)."""

import datetime
import html.parser
import json
import os
import pickle

import pytest

import ctadata
from conftest import make_tree

HOSTILE = '<img src=x onerror="alert(1)">&amp;.fits'


class Cells(html.parser.HTMLParser):
    """The text of every <td>/<th>/<caption>, and every tag seen."""

    def __init__(self, text):
        html.parser.HTMLParser.__init__(self)
        self.cells, self.tags, self._in = [], [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th", "caption"):
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th", "caption"):
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def test_listing_is_a_list_and_a_table(client, dav):
    make_tree(dav.root, {"d/" + HOSTILE: b"x" * 2048, "d/sub/a.txt": b"a", "d/b.txt": b"bb"})
    listing = client.ls("d")
    assert isinstance(listing, list) and listing == list(listing)
    assert [e.name for e in listing] == sorted([HOSTILE, "sub", "b.txt"])
    assert pickle.loads(pickle.dumps(listing)) == listing
    assert json.loads(json.dumps([e.to_dict() for e in listing]))[0]["name"] == HOSTILE
    page = listing._repr_html_()
    cells = Cells(page)
    # the server's name is text in a cell, never markup
    assert "img" not in cells.tags and "<img" not in page
    assert "d/" + HOSTILE in cells.cells
    assert "3 entries: 2 files, 2.0KiB" in cells.cells
    assert "directory" in cells.cells and "2.0KiB" in cells.cells
    rec = client.ls("d", recursive=True)
    assert "d/sub/a.txt" in Cells(rec._repr_html_()).cells and len(rec) == 4
    # a one-row table for an Entry, and a repr that says what it is
    e = [x for x in listing if x.name == HOSTILE][0]
    assert Cells(e._repr_html_()).cells[6] == "d/" + HOSTILE
    assert repr(e).startswith("<Entry %r file 2.0KiB " % ("d/" + HOSTILE)) and "UTC>" in repr(e)
    assert repr([x for x in listing if x.is_dir][0]) == "<Entry 'd/sub' directory>"


def test_entry_modified_is_an_aware_datetime(client, dav):
    make_tree(dav.root, {"f.txt": b"f"})
    os.utime(str(dav.root / "f.txt"), (1731553920, 1731553920))
    e = client.stat("f.txt")
    assert e.mtime == 1731553920.0 and isinstance(e.mtime, float)
    assert e.modified == datetime.datetime(2024, 11, 14, 3, 12, tzinfo=datetime.timezone.utc)
    assert e.modified.tzinfo is not None and e.modified.timestamp() == e.mtime
    assert ctadata.Entry("x", "x", "http://h/x", True).modified is None


def test_long_listings_are_cut_in_html():
    entries = ctadata._Listing(ctadata.Entry("f%d" % i, "f%d" % i, "http://h/f%d" % i, False,
                                             i) for i in range(ctadata._HTML_ROWS + 5))
    cells = Cells(entries._repr_html_()).cells
    assert "... and 5 more" in cells and "f%d" % (ctadata._HTML_ROWS - 1) in cells
    assert "f%d" % ctadata._HTML_ROWS not in cells


def test_du_result_is_a_dict_and_a_table(client, dav):
    make_tree(dav.root, {"t/" + HOSTILE + "/a": b"a" * 10, "t/b": b"b" * 5})
    usage = client.du("t")
    assert usage == {"path": "t", "files": 2, "dirs": 1, "bytes": 15, "children": [
        {"name": HOSTILE, "type": "directory", "files": 1, "dirs": 0, "bytes": 10},
        {"name": "b", "type": "file", "files": 1, "dirs": 0, "bytes": 5}]}
    assert json.loads(json.dumps(usage)) == usage
    page = usage._repr_html_()
    cells = Cells(page).cells
    assert "<img" not in page and HOSTILE + "/" in cells
    assert cells[-4:] == ["total", "2", "1", "15B"] and cells[0] == "t"


def test_transfer_summary_table_lists_failures(client, dav, tmp_path):
    make_tree(dav.root, {"d/ok.txt": b"ok", "d/" + HOSTILE: b"no"})
    blocker = tmp_path / "out" / "d" / (HOSTILE + ".part")
    blocker.mkdir(parents=True)      # a folder where the .part must go: that file fails
    s = client.download("d", str(tmp_path / "out") + "/", recursive=True,
                        raise_on_failure=False)
    assert (s.transferred, s.failed) == (1, 1)
    page = s._repr_html_()
    cells = Cells(page).cells
    assert "<img" not in page
    assert cells[8:11] == ["2", "1", "0"] and cells[11] == "1"
    assert any(HOSTILE in c for c in cells)
    assert repr(s).startswith("TransferSummary(files=2, transferred=1, skipped=0, failed=1")


def test_pandas_recipe():
    pandas = pytest.importorskip("pandas")
    entries = [ctadata.Entry("a", "d/a", "http://h/d/a", False, 3, 1731553920.0),
               ctadata.Entry("s", "d/s", "http://h/d/s/", True)]
    df = pandas.DataFrame(x.to_dict() for x in entries)
    assert list(df["path"]) == ["d/a", "d/s"] and df["size"][0] == 3
