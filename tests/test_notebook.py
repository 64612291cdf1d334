"""Progress in a Jupyter notebook (issue 14, part 2).

Two layers:
* in-process, always: a stand-in for what an IPython kernel offers
  (``ipykernel`` loaded, ``get_ipython()`` whose shell has a kernel,
  ``IPython.display.display(..., display_id=True)`` returning a handle
  with ``update``), recording what ctadata displays;
* a real IPython kernel, driven with jupyter_client, when ipykernel and
  jupyter_client are installed (``make test-extras`` runs this file in a
  venv that has them): the cell's output messages are read off the wire.
"""

import builtins
import os
import secrets
import sys
import textwrap
import types
from pathlib import Path

import pytest

import ctadata
import servers
from conftest import make_tree

REPO = Path(__file__).resolve().parent.parent


class FakeKernel:
    """What ctadata sees of a kernel: modules and get_ipython(), and a
    display() that records every bundle (as a front end would get them)."""

    def __init__(self, monkeypatch):
        self.shown = []     # (display id, bundle) in order: "new" or "update"
        kernel = self

        class Handle:
            def __init__(self, display_id):
                self.display_id = display_id

            def update(self, obj, raw=False):
                assert raw
                kernel.shown.append(("update", self.display_id, obj))

        def display(obj, raw=False, display_id=None):
            assert raw and display_id is True
            handle = Handle("id%d" % len(kernel.shown))
            kernel.shown.append(("new", handle.display_id, obj))
            return handle

        shell = types.SimpleNamespace(kernel=object())
        ipy = types.ModuleType("IPython")
        disp = types.ModuleType("IPython.display")
        disp.display = display
        ipy.display = disp
        monkeypatch.setitem(sys.modules, "IPython", ipy)
        monkeypatch.setitem(sys.modules, "IPython.display", disp)
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
        monkeypatch.setattr(builtins, "get_ipython", lambda: shell, raising=False)


def test_progress_shows_in_a_notebook_by_default(client, dav, tmp_path, monkeypatch):
    make_tree(dav.root, {"run/%02d.bin" % i: os.urandom(200000) for i in range(10)})
    nb = FakeKernel(monkeypatch)
    assert ctadata._in_kernel()
    s = client.download("run", str(tmp_path) + "/", recursive=True)   # progress=None
    assert s.transferred == 10
    assert nb.shown, "nothing was displayed"
    kinds = [k for k, _, _ in nb.shown]
    assert kinds[0] == "new" and set(kinds[1:]) <= {"update"}
    assert len({i for _, i, _ in nb.shown}) == 1          # one output, updated in place
    final = nb.shown[-1][2]
    assert final["text/plain"].startswith("download 10 files  1.9MiB  in 0:0")
    assert "<progress" not in final["text/html"]             # the bar is gone, the line stays
    assert "download 10 files" in final["text/html"]
    first = nb.shown[0][2]
    if len(nb.shown) > 1:
        assert "<progress" in first["text/html"] and "ETA" in first["text/plain"]


def test_notebook_progress_escapes_and_survives_a_broken_display(monkeypatch):
    nb = FakeKernel(monkeypatch)
    p = ctadata._NotebookProgress("<b>get</b>")
    p.add_total(2, 100)
    p.poll()
    html = nb.shown[0][2]["text/html"]
    assert "&lt;b&gt;get&lt;/b&gt;" in html and "<b>" not in html
    assert '<progress value="0" max="100"' in html

    def broken(obj, raw=False):
        raise RuntimeError("front end gone")
    nb.shown.clear()
    p._handle.update = broken
    p._shown = 0
    p.advance(50)
    p.poll()                  # logged, then the display is off; no exception
    p.close()
    assert p.interval is None and nb.shown == []


def test_upload_progress_in_a_notebook(client, dav, tmp_path, monkeypatch):
    nb = FakeKernel(monkeypatch)
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    client.upload(str(tmp_path / "big.bin"), "big.bin")
    assert nb.shown[-1][2]["text/plain"].startswith("upload 1 file  3.0MiB  in ")


def test_no_kernel_no_notebook_display(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not ctadata._in_kernel()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
    assert not ctadata._in_kernel()        # IPython in a terminal: no kernel


# -- a real kernel ------------------------------------------------------------------


@pytest.fixture
def slow_nginx(tmp_path):
    """nginx sending 200 kB/s per connection (after a first second's worth
    at once): a transfer of a few hundred kB lasts long enough for a few
    progress updates."""
    reason = servers.nginx_missing_reason()
    if reason:
        pytest.skip("nginx: %s" % reason)
    token = secrets.token_urlsafe(24)
    root = tmp_path / "slow-root"
    root.mkdir()
    with servers.start_nginx(root, token, tmp_path / "slow-work", limit_rate="200k") as srv:
        yield srv


def test_progress_in_a_real_ipython_kernel(slow_nginx, tmp_path):
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    (tmp_path / "home").mkdir(exist_ok=True)       # $HOME of the test: IPython writes there
    make_tree(slow_nginx.root, {"run/%d.bin" % i: os.urandom(300000) for i in range(3)})
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import ctadata
        c = ctadata.Client(url=%r, token=%r, jobs=1)
        summary = c.download("run", %r, recursive=True)
        summary
    """ % (str(REPO), slow_nginx.url, slow_nginx.token, str(tmp_path / "out") + "/"))
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(code)
        messages = []
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = kc.get_shell_msg(timeout=30)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1, [m["msg_type"] for m in messages]
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert "<progress" in shown[0]["content"]["data"]["text/html"]
    assert shown[0]["content"]["data"]["text/plain"].startswith("download ")
    # about 1.5 s: several updates of the same output, then the final state
    assert len(updates) >= 3, [m["msg_type"] for m in messages]
    assert {u["content"]["transient"]["display_id"] for u in updates} == {display_id}
    assert any("ETA 0:0" in u["content"]["data"]["text/plain"] for u in updates[:-1])
    final = updates[-1]["content"]["data"]
    assert final["text/plain"].startswith("download 3 files  878.9KiB  in 0:0")
    # the cell's value: the TransferSummary as an HTML table
    result = [m for m in messages if m["msg_type"] == "execute_result"][0]
    assert "<table" in result["content"]["data"]["text/html"]
    assert "TransferSummary(files=3, transferred=3" in result["content"]["data"]["text/plain"]
    assert len(list((tmp_path / "out" / "run").iterdir())) == 3
