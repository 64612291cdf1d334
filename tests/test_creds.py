"""Credentials: token discovery and its order, token files, JWT expiry,
`ctadata login` (device flow against tests/oidcserver.py), refresh without a
daemon (one refresher among parallel workers, 401 -> one refresh + retry),
oidc-agent, X.509 client certificates, and secrets hygiene (logs, messages,
repr, /proc/<pid>/cmdline)."""

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from subprocess import PIPE

import pytest

import ctadata
import servers
from conftest import _require, make_tree, tree_digests
from faultserver import FaultServer
from oidcserver import OIDCProvider, jwt_claims, make_jwt

REPO = Path(__file__).resolve().parent.parent
UID = os.getuid()


def private(path, text, mode=0o600):
    """Write a token file with *mode*; return its path (str)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(str(path), mode)
    return str(path)


def jwt(seconds=300, **claims):
    now = int(time.time())
    return make_jwt(now + seconds, iat=now, **claims)


def store():
    return ctadata._TokenStore(os.environ)


def logged_in(idp, lifetime=None):
    """Put an existing login (as `ctadata login` leaves it) into the store."""
    if lifetime is not None:
        idp.access_lifetime = lifetime
    ans = idp.issue_tokens()
    rec = {"version": 1, "issuer": idp.issuer, "token_endpoint": idp.token_endpoint,
           "client_id": idp.client_id, "scope": "openid offline_access",
           "access_token": ans["access_token"], "refresh_token": ans["refresh_token"],
           "expires_at": idp.clock() + ans["expires_in"]}
    store().save(rec)
    return rec


@pytest.fixture
def idp():
    with OIDCProvider(interval=1) as provider:
        yield provider


class Clock:
    """What time it is for token lifetimes, moved forward by the test instead
    of sleeping until a token is due; *rate* > 1 makes it run faster."""

    def __init__(self, rate=1.0):
        self.start, self.rate, self.offset = time.time(), rate, 0.0

    def __call__(self):
        now = time.time()
        return now + (now - self.start) * (self.rate - 1) + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch):
    """A Clock for every ctadata client of the test (their _Auth and _OIDC;
    give it to the identity provider too: ``idp.clock = clock``); device-code
    polls do not wait."""
    c = Clock()
    monkeypatch.setattr(ctadata._Auth, "clock", staticmethod(c))
    monkeypatch.setattr(ctadata._OIDC, "sleep", staticmethod(lambda seconds: None))
    return c


@pytest.fixture
def fault(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    with FaultServer(root, token="tok-" + secrets.token_urlsafe(16)) as srv:
        yield srv


@pytest.fixture
def served(tmp_path):
    """A dCache-like `ctadata serve` wanting its own token (where no fault is needed)."""
    root = tmp_path / "served"
    root.mkdir()
    with ctadata.serve(str(root), token="tok-" + secrets.token_urlsafe(16)) as srv:
        yield srv


@pytest.fixture
def fake_oidc_token(tmp_path, monkeypatch):
    """An `oidc-token` on PATH that logs its arguments and prints the
    content of the file ``.token`` (set it with ``.token.write_text``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log, token = tmp_path / "oidc-token.log", tmp_path / "oidc-token.out"
    script = bindir / "oidc-token"
    script.write_text('#!/bin/sh\necho "$@" >> "%s"\ncat "%s"\n' % (log, token))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ["PATH"])

    class Fake:
        pass
    fake = Fake()
    fake.log, fake.token = log, token
    return fake


# -- discovery ---------------------------------------------------------------------

def test_discovery_order_every_step(tmp_path, fake_oidc_token, idp):
    home = tmp_path / "home"
    xdg = tmp_path / "run"
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(xdg), "CTADATA_OIDC_AGENT": "acct"}
    t = {k: jwt(300, src=k) for k in ("arg", "file", "ctadata", "bearer", "btf", "xdg",
                                       "tmp", "store", "agent", "old")}
    token_file = private(tmp_path / "tf", t["file"])
    env["CTADATA_TOKEN"] = t["ctadata"]
    env["BEARER_TOKEN"] = t["bearer"]
    env["BEARER_TOKEN_FILE"] = private(tmp_path / "btf", t["btf"])
    private(xdg / ("bt_u%d" % UID), t["xdg"])
    private(Path(ctadata._SYSTEM_TMP) / ("bt_u%d" % UID), t["tmp"])
    rec = logged_in(idp)
    t["store"] = rec["access_token"]
    fake_oidc_token.token.write_text(t["agent"] + "\n")
    private(home / ".config/cta-data/token", t["old"] + "\n")
    kw = {"token": t["arg"], "token_file": token_file}

    def drop(key):
        return lambda: kw.pop(key)

    steps = [
        ("token argument", "arg", drop("token")),
        ("--token-file", "file", drop("token_file")),
        ("$CTADATA_TOKEN", "ctadata", lambda: env.pop("CTADATA_TOKEN")),
        ("$BEARER_TOKEN", "bearer", lambda: env.pop("BEARER_TOKEN")),
        ("$BEARER_TOKEN_FILE", "btf", lambda: env.pop("BEARER_TOKEN_FILE")),
        (str(xdg), "xdg", lambda: env.pop("XDG_RUNTIME_DIR")),
        (ctadata._SYSTEM_TMP + "/bt_u", "tmp",
         lambda: os.unlink(os.path.join(ctadata._SYSTEM_TMP, "bt_u%d" % UID))),
        ("login store", "store", lambda: store().remove()),
        ("oidc-agent account acct", "agent", lambda: env.pop("CTADATA_OIDC_AGENT")),
        ("old client's token", "old",
         lambda: os.unlink(str(home / ".config/cta-data/token"))),
    ]
    for label, key, remove in steps:
        auth = ctadata.Client(url="https://storage.invalid", env=env, **kw)._auth
        cred = auth.load()
        assert cred.source.startswith(label), (label, cred.source)
        assert cred.value == t[key]
        assert auth.header() == "Bearer " + t[key]
        remove()
    auth = ctadata.Client(url="https://storage.invalid", env=env)._auth
    assert auth.load() is None and auth.header() is None
    assert [label for label, _ in auth.looked][-3:] == [
        "login store " + store().path, "oidc-agent",
        "old client's token %s" % (home / ".config/cta-data/token")]
    assert fake_oidc_token.log.read_text().split() == ["--time=121", "acct"]


def test_empty_values_mean_try_the_next_one(tmp_path):
    env = {"HOME": str(tmp_path), "CTADATA_TOKEN": "", "BEARER_TOKEN": "  \n",
           "BEARER_TOKEN_FILE": private(tmp_path / "empty", "\n")}
    private(Path(ctadata._SYSTEM_TMP) / ("bt_u%d" % UID), "the-token\n")
    auth = ctadata.Client(url="https://h.invalid", env=env)._auth
    assert auth.header() == "Bearer the-token"
    assert dict(auth.looked)["$BEARER_TOKEN"] == "empty"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_token_files_others_can_read_are_refused(tmp_path, mode):
    path = private(tmp_path / "tok", "secret-token-value", mode)
    for kw in ({"token_file": path}, {"env": {"BEARER_TOKEN_FILE": path,
                                              "HOME": str(tmp_path)}}):
        c = ctadata.Client(url="https://h.invalid", **kw)
        with pytest.raises(ctadata.ConfigError) as ei:
            c._auth.header()
        assert "group or others can access" in str(ei.value)
        assert ei.value.hint == "chmod 600 " + path
        assert "secret-token-value" not in str(ei.value)


def test_store_and_old_client_files_others_can_read_are_refused(tmp_path, idp):
    logged_in(idp)
    os.chmod(store().path, 0o644)
    with pytest.raises(ctadata.ConfigError, match="login store"):
        ctadata.Client(url="https://h.invalid")._auth.header()
    store().remove()
    private(Path(os.environ["HOME"]) / ".config/cta-data/token", jwt(), 0o640)
    with pytest.raises(ctadata.ConfigError, match="group or others"):
        ctadata.Client(url="https://h.invalid")._auth.header()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_token_file_of_another_user_is_refused(tmp_path):
    path = private(tmp_path / "tok", "planted-token")
    os.chown(path, 65534, 65534)
    with pytest.raises(ctadata.ConfigError, match="belongs to another user"):
        ctadata.Client(url="https://h.invalid", token_file=path)._auth.header()


def test_token_with_a_line_break_inside_is_refused_without_echo(tmp_path):
    path = private(tmp_path / "tok", "first-half\nsecond-half\n")
    with pytest.raises(ctadata.ConfigError) as ei:
        ctadata.Client(url="https://h.invalid", token_file=path)._auth.header()
    assert "printable ASCII" in str(ei.value) and "half" not in str(ei.value)


def test_token_file_may_be_a_pipe(tmp_path):
    r, w = os.pipe()
    os.write(w, b"piped-token\n")
    os.close(w)
    try:
        c = ctadata.Client(url="https://h.invalid", token_file="/dev/fd/%d" % r)
        assert c._auth.header() == "Bearer piped-token"
    finally:
        os.close(r)


# -- JWT ---------------------------------------------------------------------------

def test_jwt_payload_is_unpadded_base64url():
    old_rejected = 0
    for n in range(12):  # every payload length modulo 3 (and "-"/"_" in the text)
        tok = make_jwt(2000000000, pad="x" * n, odd="\u00ff\u00fe>?")
        assert ctadata._jwt_claims(tok)["pad"] == "x" * n
        seg = tok.split(".")[1]
        assert "=" not in seg
        try:  # what the old client did
            json.loads(base64.b64decode(seg + "="))
        except Exception:
            old_rejected += 1
    assert old_rejected >= 4  # about a third, or more with "-"/"_"
    for not_jwt in ("MDAxY2xvY2F0aW9uIGRjYWNoZQ", "a.b", "a.!!!.c", "a..c", "x.bnVsbA.y"):
        assert ctadata._jwt_claims(not_jwt) is None


def test_a_macaroon_is_used_as_it_is(served, tmp_path):
    (Path(served.root) / "f").write_bytes(b"abc")
    answer = served.client(retries=0)._transport.request(
        "POST", served.url + "/", {"Content-Type": "application/macaroon-request"},
        b'{"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT1H"}', ok=(200,))
    macaroon = json.loads(answer.read())["macaroon"]
    packet = base64.urlsafe_b64decode(macaroon + "=" * (-len(macaroon) % 4))[:13]
    assert packet[4:] == b"location "                  # libmacaroons v1, as dCache's
    c = ctadata.Client(url=served.url, token=macaroon, retries=0)
    assert c.list_dir("") == ["f"]
    assert c._auth.load().exp is None


def test_expired_jwt_fails_before_any_request(served, monkeypatch, capsys):
    exp = int(time.time()) - 30
    token = make_jwt(exp)
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(exp))
    c = ctadata.Client(url=served.url, token=token)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("")
    assert str(ei.value).startswith("token expired at %s" % local)
    assert "(source: token argument)" in str(ei.value)
    monkeypatch.setenv("BEARER_TOKEN", token)
    assert ctadata.main(["--url", served.url, "ls"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctadata: error: token expired at %s" % local)
    assert "(source: $BEARER_TOKEN)" in err and token not in err
    assert served.requests == []


def test_refresh_margin_follows_the_lifetime():
    assert ctadata._Token(jwt(3600), "x").margin == 60
    assert ctadata._Token(jwt(10), "x").margin == 5
    assert ctadata._Token("opaque", "x").margin == 60


# -- token / explain / aliases ----------------------------------------------------------

def test_token_prints_it_and_explain_never_does(tmp_path, monkeypatch, capsys):
    token = jwt(600, sub="alice", iss="https://issuer.example")
    monkeypatch.setenv("BEARER_TOKEN", token)
    assert ctadata.main(["token"]) == 0
    assert capsys.readouterr().out == token + "\n"
    assert ctadata.main(["print-token"]) == 0
    out, err = capsys.readouterr()
    assert out == token + "\n" and "`print-token` is now `ctadata token`" in err
    assert ctadata.main(["token", "--explain"]) == 0
    out = capsys.readouterr().out
    assert token not in out
    assert "$CTADATA_TOKEN" in out and "not set" in out
    assert "$BEARER_TOKEN " in out and "found" in out
    assert "using the token from $BEARER_TOKEN" in out
    assert "sub alice" in out and "expires" in out and "refreshed automatically: no" in out
    assert "login store" in out and "not consulted" in out
    monkeypatch.delenv("BEARER_TOKEN")
    assert ctadata.main(["token", "--explain"]) == 1
    assert "no token found" in capsys.readouterr().out
    assert ctadata.main(["token"]) == 1
    assert "no token found; looked in:" in capsys.readouterr().err


def test_token_option_is_documented_as_visible_in_ps(capsys):
    assert ctadata.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--token TOKEN" in out and "DISCOURAGED" in out and "`ps`" in out
    for cmd in ("login", "logout", "token"):
        assert cmd in out
    assert "start-agent" not in out  # old names work, but are not advertised


# -- ctadata login / logout --------------------------------------------------------------

def test_login_device_flow_then_private_store(idp, capsys, monkeypatch):
    idp.device_script = ["authorization_pending", "ok"]
    slept = []
    monkeypatch.setattr(ctadata._OIDC, "sleep", staticmethod(slept.append))
    assert ctadata.main(["login", "--issuer", idp.issuer]) == 0
    err = capsys.readouterr().err
    assert idp.verification_uri in err and "user_code=" in err
    assert "logged in as alice" in err and store().path in err
    assert idp.device_requests[0] == {"client_id": "dcache-cta-cscs-ch-users",
                                      "scope": "openid offline_access"}
    assert [r["grant_type"] for r in idp.token_requests] == [
        "urn:ietf:params:oauth:grant-type:device_code"] * 2
    assert slept == [1, 1]  # the interval is honoured before each poll
    st = os.stat(store().dir)
    assert st.st_mode & 0o777 == 0o700
    assert os.stat(store().path).st_mode & 0o777 == 0o600
    rec = json.loads(Path(store().path).read_text())
    assert idp.is_valid(rec["access_token"]) and rec["refresh_token"]
    assert rec["token_endpoint"] == idp.token_endpoint and "client_secret" not in rec
    # the device code travelled in form bodies, never in a URL
    assert idp.token_requests[-1]["device_code"]
    assert all("code" not in path and "token=" not in path for _m, path, _h in idp.requests)
    # the store is now a token source (and refreshable)
    auth = ctadata.Client(url="https://h.invalid")._auth
    assert auth.load().source == "login store " + store().path
    assert auth.load().refresh is not None
    assert ctadata.main(["logout"]) == 0
    assert "logged out" in capsys.readouterr().err
    assert not os.path.exists(store().path)
    assert ctadata.main(["stop-agent"]) == 0
    err = capsys.readouterr().err
    assert "`stop-agent` is now `ctadata logout`" in err and "not logged in" in err


def test_login_honours_xdg_config_home_and_fixes_a_wide_folder(idp, tmp_path, monkeypatch,
                                                                 capsys, clock):
    cfg = tmp_path / "cfg"
    (cfg / "ctadata").mkdir(parents=True)
    os.chmod(str(cfg / "ctadata"), 0o755)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    assert ctadata.main(["start-agent", "--issuer", idp.issuer]) == 0
    assert "`start-agent` is now `ctadata login`" in capsys.readouterr().err
    assert (cfg / "ctadata" / "tokens.json").exists()
    assert os.stat(str(cfg / "ctadata")).st_mode & 0o777 == 0o700


def test_login_dev_pair_has_its_own_store(tmp_path, capsys, clock):
    with OIDCProvider(client_id="dcache-dev", interval=1) as dev_idp:
        assert ctadata.main(["--dev", "login", "--issuer", dev_idp.issuer]) == 0
        assert dev_idp.device_requests[0]["client_id"] == "dcache-dev"
    path = ctadata._TokenStore(os.environ, "dev").path
    assert path.endswith("tokens-dev.json") and os.path.exists(path)
    assert ctadata.Client(dev=True)._auth.load().source == "login store " + path
    assert ctadata.Client(url="https://h.invalid")._auth.load() is None


def test_device_flow_polling_pending_slow_down_and_5xx(idp):
    idp.device_script = ["authorization_pending", "slow_down", 503, "authorization_pending",
                         "ok"]
    slept = []
    oidc = ctadata._OIDC(ctadata.Settings(backoff=0.01, env={}), ctadata._Secrets(),
                         sleep=slept.append)
    shown = []
    rec = oidc.device_login(idp.issuer, idp.client_id,
                            show=lambda *a: shown.append(a))
    assert idp.is_valid(rec["access_token"])
    # interval 1; slow_down adds 5 s for good; the 503 is retried by the
    # transport within the same poll
    assert slept == [1, 1, 6, 6]
    assert len(idp.poll_times) == 5
    uri, code, complete, expires_in = shown[0]
    assert uri == idp.verification_uri and complete.endswith(code) and expires_in == 600


@pytest.mark.parametrize("final, message", [
    ("access_denied", "denied"), ("expired_token", "expired")])
def test_device_flow_denied_or_expired(idp, final, message):
    idp.device_script = ["authorization_pending", final]
    oidc = ctadata._OIDC(ctadata.Settings(env={}), ctadata._Secrets(), sleep=lambda s: None)
    with pytest.raises(ctadata.AuthError, match=message):
        oidc.device_login(idp.issuer, idp.client_id)
    assert idp.valid_tokens() == set()


def test_device_flow_gives_up_when_the_code_expires(idp):
    idp.device_expires_in = 0
    idp.device_script = ["authorization_pending"]
    oidc = ctadata._OIDC(ctadata.Settings(env={}), ctadata._Secrets(), sleep=lambda s: None)
    with pytest.raises(ctadata.AuthError, match="expired"):
        oidc.device_login(idp.issuer, idp.client_id)


def test_client_secret_from_env_is_used_and_kept_private(tmp_path, monkeypatch, capsys, clock):
    secret = "cl13nt-s3cr3t-" + secrets.token_hex(4)
    with OIDCProvider(client_secret=secret, interval=1, access_lifetime=1) as idp:
        idp.clock = clock
        assert ctadata.main(["login", "--issuer", idp.issuer]) == 1  # no secret: refused
        assert "refused to start a login" in capsys.readouterr().err
        monkeypatch.setenv("CTADATA_CLIENT_SECRET", secret)
        assert ctadata.main(["login", "--issuer", idp.issuer]) == 0
        assert idp.device_requests[-1]["client_secret"] == secret
        monkeypatch.delenv("CTADATA_CLIENT_SECRET")
        clock.advance(0.6)  # the access token is due: the stored secret refreshes it
        auth = ctadata.Client(url="https://h.invalid")._auth
        assert auth.header()
        assert idp.token_requests[-1]["grant_type"] == "refresh_token"
        assert idp.token_requests[-1]["client_secret"] == secret
        assert secret not in repr(auth) and secret not in "\n".join(auth.explain())
    assert ctadata.main(["start-agent", "-s", "typed-secret"]) == 2
    assert "not taken from the command line" in capsys.readouterr().err


def test_client_secret_prompt_does_not_echo(monkeypatch):
    import getpass
    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or " s3 \n")
    monkeypatch.setattr(sys, "stdin", type("TTY", (), {"isatty": lambda self: True})())
    assert ctadata._client_secret("my-client") == "s3"
    assert "my-client" in asked[0]
    private(Path(os.environ["HOME"]) / ".config/cta-data/secret", "old-secret")
    assert ctadata._client_secret(ctadata._DEFAULT_CLIENT_ID) == "old-secret"
    assert ctadata._client_secret("my-client") == "s3"  # the old file is not its


# -- refresh -------------------------------------------------------------------------------

def test_refresh_shortly_before_expiry_rotates_the_refresh_token(idp, clock):
    idp.clock = clock
    rec = logged_in(idp, lifetime=3)  # refreshed 1.5 s before it expires
    auth = ctadata.Client(url="https://h.invalid")._auth
    assert auth.header() == "Bearer " + rec["access_token"]
    assert idp.refresh_count == 0
    clock.advance(1.6)
    value = auth.header()
    assert idp.refresh_count == 1 and value != "Bearer " + rec["access_token"]
    new = store().load()
    assert new["refresh_token"] != rec["refresh_token"]       # rotated and stored
    assert "Bearer " + new["access_token"] == value
    assert os.stat(store().path).st_mode & 0o777 == 0o600
    assert auth.header() == value and idp.refresh_count == 1  # no second refresh


def test_another_process_refresh_is_reused(idp, clock):
    idp.clock = clock
    logged_in(idp, lifetime=2)
    a = ctadata.Client(url="https://h.invalid")._auth
    b = ctadata.Client(url="https://h.invalid")._auth
    a.header(), b.header()
    clock.advance(1.1)
    va, vb = a.header(), b.header()
    assert va == vb and idp.refresh_count == 1  # b took a's token from the store


def test_expired_and_refresh_refused_says_so(idp, served, clock):
    idp.clock = clock
    logged_in(idp, lifetime=1)
    idp.revoke_refresh_tokens()
    clock.advance(1.1)
    c = ctadata.Client(url=served.url, retries=0)
    with pytest.raises(ctadata.AuthError) as ei:
        c.ls("")
    msg = str(ei.value)
    assert msg.startswith("token expired at ") and "(source: login store" in msg
    assert "refreshing it failed" in msg and "invalid_grant" in msg
    assert ei.value.hint == "run `ctadata login` again"
    assert served.requests == []
    with pytest.raises(ctadata.AuthError):  # asked again: no new refresh attempt
        c.ls("")
    assert sum(r["grant_type"] == "refresh_token" for r in idp.token_requests) == 1


def test_oidc_agent_is_asked_again_near_expiry(fake_oidc_token, monkeypatch):
    now = int(time.time())
    first = make_jwt(now + 30, iat=now - 100)  # margin 60: already due
    second = make_jwt(now + 300, iat=now)
    fake_oidc_token.token.write_text(first)
    monkeypatch.setenv("CTADATA_OIDC_AGENT", "my-account")
    auth = ctadata.Client(url="https://h.invalid")._auth
    assert auth.load().value == first
    fake_oidc_token.token.write_text(second)
    assert auth.header() == "Bearer " + second
    calls = fake_oidc_token.log.read_text().splitlines()
    assert calls == ["--time=121 my-account", "--time=121 my-account"]
    assert auth.header() == "Bearer " + second and len(
        fake_oidc_token.log.read_text().splitlines()) == 2


def test_oidc_agent_failures_are_clear(fake_oidc_token, monkeypatch, tmp_path):
    fake_oidc_token.token.write_text("")
    (tmp_path / "bin" / "oidc-token").write_text(
        "#!/bin/sh\necho 'Error: Could not connect to oidc-agent' >&2\nexit 1\n")
    auth = ctadata.Client(url="https://h.invalid", oidc_agent="acct")._auth
    with pytest.raises(ctadata.AuthError, match="Could not connect to oidc-agent"):
        auth.header()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    auth = ctadata.Client(url="https://h.invalid", oidc_agent="acct")._auth
    with pytest.raises(ctadata.AuthError, match="not installed"):
        auth.header()


# -- against a real WebDAV server that asks the identity provider ----------------------------

@pytest.fixture(scope="module")
def oidc_dav(tmp_path_factory):
    """(provider, nginx checking every token at the provider's userinfo)."""
    _require("nginx with auth_request", servers.nginx_missing_reason(auth_request=True))
    base = tmp_path_factory.mktemp("oidc-dav")
    with OIDCProvider(interval=1) as provider:
        with servers.start_nginx(base / "root", "unused-static-token", base / "work",
                                 auth_url=provider.userinfo_endpoint) as srv:
            yield provider, srv


@pytest.fixture
def oidc_folder(oidc_dav, request):
    idp, srv = oidc_dav
    name = "t-" + secrets.token_hex(4)
    files = {"run/f%02d.bin" % i: os.urandom(20000 + i) for i in range(40)}
    files["run/sub/deeper.bin"] = os.urandom(1000)
    make_tree(srv.root / name, files)
    idp.access_lifetime = 300
    idp.device_script = ["ok"]
    yield idp, srv, name
    shutil.rmtree(str(srv.root / name), ignore_errors=True)


class _Gate(ctadata.Progress):
    """After *after* files, every worker waits here once for *until()*."""

    def __init__(self, after, until):
        ctadata.Progress.__init__(self)
        self.after, self.until = after, until

    def file_done(self, result):
        ctadata.Progress.file_done(self, result)
        if self.done_files >= self.after:
            self.until()


def test_parallel_download_refreshes_once_when_the_token_expires(oidc_folder, tmp_path, clock,
                                                                  monkeypatch):
    idp, srv, name = oidc_folder
    monkeypatch.setattr(idp, "clock", clock)  # the provider outlives the test
    rec = logged_in(idp, lifetime=4)  # refreshed in its last 2 s
    exp = jwt_claims(rec["access_token"])["exp"]
    before = idp.refresh_count

    def wait_for_the_refresh_window():
        idp.access_lifetime = 300  # the next token lasts: one refresh, however slow
        clock.advance(max(0.0, exp - 1.7 - clock()))

    c = ctadata.Client(url=srv.url, jobs=6, retries=0)
    summary = c.download(name + "/run", str(tmp_path / "out") + "/", recursive=True,
                         progress=_Gate(6, wait_for_the_refresh_window))
    assert summary.transferred == 41 and summary.failed == 0
    assert idp.refresh_count - before == 1 and c._auth.refreshes == 1
    assert tree_digests(tmp_path / "out" / "run") == tree_digests(srv.root / name / "run")


def test_401_in_mid_transfer_refreshes_once_and_retries(oidc_folder, tmp_path):
    idp, srv, name = oidc_folder
    logged_in(idp, lifetime=300)
    before = idp.refresh_count
    revoked = []

    def revoke_once():
        if not revoked:
            revoked.append(1)
            idp.revoke_access_tokens()  # the server now refuses the token, exp or not

    c = ctadata.Client(url=srv.url, jobs=6, retries=0)
    summary = c.download(name + "/run", str(tmp_path / "out") + "/", recursive=True,
                         progress=_Gate(5, revoke_once))
    assert summary.failed == 0 and summary.transferred == 41
    assert idp.refresh_count - before == 1
    assert tree_digests(tmp_path / "out" / "run") == tree_digests(srv.root / name / "run")
    idp.revoke_access_tokens()
    idp.revoke_refresh_tokens()
    with pytest.raises(ctadata.AuthError) as ei:  # refresh refused: one clear error
        c.ls(name)
    assert ei.value.status == 401 and "was refused" in ei.value.hint


def test_a_server_refusing_every_token_costs_one_refresh(oidc_folder, served):
    idp, _srv, _name = oidc_folder
    logged_in(idp)
    before = idp.refresh_count
    c = ctadata.Client(url=served.url, retries=0)  # the server wants its own token
    for _ in range(3):
        with pytest.raises(ctadata.AuthError) as ei:
            c.ls("")
    assert idp.refresh_count - before == 1
    assert "even after refreshing it" in ei.value.hint


@pytest.fixture(scope="module")
def slow_oidc_dav(tmp_path_factory):
    _require("nginx with auth_request", servers.nginx_missing_reason(auth_request=True))
    base = tmp_path_factory.mktemp("slow-oidc-dav")
    with OIDCProvider(interval=1) as provider:
        with servers.start_nginx(base / "root", "unused-static-token", base / "work",
                                 auth_url=provider.userinfo_endpoint,
                                 limit_rate="40k") as srv:
            yield provider, srv


def test_login_then_get_r_end_to_end_with_a_token_expiring_meanwhile(slow_oidc_dav, tmp_path,
                                                                       capsys, monkeypatch):
    """`ctadata login`, then `ctadata get -r` of files the server sends slowly
    (nginx sends the first second's worth at once, then 40 kB/s) while the
    2-second access tokens keep expiring (on a clock that runs 4 times as
    fast, for the client and the identity provider)."""
    idp, srv = slow_oidc_dav
    fast = Clock(rate=4)
    monkeypatch.setattr(ctadata._Auth, "clock", staticmethod(fast))
    monkeypatch.setattr(ctadata._OIDC, "sleep", staticmethod(lambda seconds: None))
    monkeypatch.setattr(idp, "clock", fast)
    make_tree(srv.root / "e2e", {"data/f%02d.bin" % i: os.urandom(60000) for i in range(8)})
    idp.access_lifetime = 2
    idp.device_script = ["authorization_pending", "ok"]
    assert ctadata.main(["login", "--issuer", idp.issuer]) == 0
    assert "logged in as alice" in capsys.readouterr().err
    first = store().load()["access_token"]
    started = fast()
    code = ctadata.main(["--url", srv.url, "-j", "4", "get", "-r", "e2e/data",
                         str(tmp_path / "dl") + "/"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert fast() - started > 2  # longer than a token lives
    assert tree_digests(tmp_path / "dl" / "data") == tree_digests(srv.root / "e2e" / "data")
    assert idp.refresh_count >= 1
    last = store().load()["access_token"]  # the last refreshed one, kept for the next run
    assert last != first and last in idp._access


# -- X.509 ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def x509_dav(tmp_path_factory):
    """(nginx over https accepting a client certificate of its test CA
    instead of the token, the CA folder)."""
    _require("nginx (WebDAV over TLS)", servers.nginx_missing_reason(tls=True))
    base = tmp_path_factory.mktemp("x509")
    with servers.start_nginx(base / "root", secrets.token_urlsafe(16), base / "work",
                             tls=True, client_certs=True) as srv:
        (srv.root / "x509.txt").write_bytes(b"via a client certificate")
        yield srv, Path(srv.ca_file).parent


def test_x509_client_certificate(x509_dav, tmp_path, monkeypatch):
    srv, ca_dir = x509_dav
    proxy = servers.make_client_cert(ca_dir, tmp_path / "x509up")
    assert os.stat(proxy).st_mode & 0o777 == 0o600
    ok = dict(url=srv.url, ca_file=srv.ca_file, retries=0)
    with pytest.raises(ctadata.AuthError):  # neither token nor certificate
        ctadata.Client(**ok).list_dir("")
    assert ctadata.Client(cert=proxy, **ok).list_dir("") == ["x509.txt"]
    assert ctadata.Client(auth="x509", cert=proxy, **ok).list_dir("") == ["x509.txt"]
    monkeypatch.setenv("X509_USER_PROXY", proxy)
    c = ctadata.Client(auth="x509", **ok)
    assert c.list_dir("") == ["x509.txt"] and c._auth.client_cert() == proxy
    monkeypatch.delenv("X509_USER_PROXY")
    shutil.copy(proxy, os.path.join(ctadata._SYSTEM_TMP, "x509up_u%d" % UID))
    c = ctadata.Client(**ok)  # auto: no token, so the proxy in /tmp
    assert c.list_dir("") == ["x509.txt"]
    # a token wins in "auto": no certificate is then presented
    assert ctadata.Client(token=srv.token, **ok)._auth.client_cert() is None
    assert ctadata.Client(token=srv.token, **ok).list_dir("") == ["x509.txt"]
    # --auth x509 never sends a token, even when there is one
    monkeypatch.setenv("BEARER_TOKEN", srv.token)
    assert ctadata.Client(auth="x509", **ok)._auth.header() is None
    code = ctadata.main(["--url", srv.url, "--ca-file", srv.ca_file, "--auth", "x509",
                         "--cert", proxy, "ls"])
    assert code == 0


def test_x509_problems_are_reported_before_connecting(tmp_path):
    with pytest.raises(ctadata.ConfigError, match="no client certificate"):
        ctadata.Client(url="https://h.invalid", auth="x509")._transport.ssl_context()
    wide = private(tmp_path / "proxy", "-----BEGIN CERTIFICATE-----\n", 0o644)
    with pytest.raises(ctadata.ConfigError, match="key must be private"):
        ctadata.Client(url="https://h.invalid", cert=wide)._transport.ssl_context()
    with pytest.raises(ctadata.ConfigError):
        ctadata.Client(url="https://h.invalid", auth="sso")
    with pytest.raises(ctadata.ConfigError):
        ctadata.Client(url="https://h.invalid", auth="token", cert=wide)


def test_ca_file_and_ca_dir_from_the_grid_variables(x509_dav, tmp_path, monkeypatch, capsys):
    srv, _ = x509_dav
    c = ctadata.Client(url=srv.url, token=srv.token, retries=0)
    with pytest.raises(ctadata.TransferError, match="certificate verification"):
        c.list_dir("")
    monkeypatch.setenv("X509_CERT_FILE", srv.ca_file)
    assert ctadata.Client(url=srv.url, token=srv.token).list_dir("") == ["x509.txt"]
    monkeypatch.delenv("X509_CERT_FILE")
    cadir = tmp_path / "certificates"  # an IGTF-style hashed folder
    cadir.mkdir()
    h = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", srv.ca_file],
                       stdout=PIPE, stderr=PIPE, universal_newlines=True,
                       check=True).stdout.strip()
    shutil.copy(srv.ca_file, str(cadir / (h + ".0")))
    monkeypatch.setenv("X509_CERT_DIR", str(cadir))
    assert ctadata.Client(url=srv.url, token=srv.token).list_dir("") == ["x509.txt"]
    monkeypatch.delenv("X509_CERT_DIR")
    monkeypatch.setenv("BEARER_TOKEN", srv.token)
    for _ in range(2):  # --insecure works, and warns every single time
        assert ctadata.main(["--url", srv.url, "--insecure", "ls"]) == 0
        assert "WARNING: TLS certificate verification is OFF" in capsys.readouterr().err


# -- secrets hygiene -------------------------------------------------------------------------

def _everything(capsys, caplog, extra=()):
    out, err = capsys.readouterr()
    return "\n".join([out, err, caplog.text] + list(extra))


def test_secrets_never_in_logs_messages_or_reprs(oidc_folder, fault, tmp_path, monkeypatch,
                                                 capsys, caplog, clock):
    """Every way a token could leak, at -vv: requests, refresh, 401, a server
    echoing the token back, expiry, network errors; each captured output,
    exception text, repr and traceback is scanned for every secret."""
    import logging
    caplog.set_level(logging.DEBUG, logger="ctadata")
    idp, srv, name = oidc_folder
    monkeypatch.setattr(idp, "clock", clock)  # the provider outlives the test
    rec = logged_in(idp, lifetime=2)
    clock.advance(1.1)  # due for a refresh
    texts = []
    assert ctadata.main(["-vv", "--url", srv.url, "ls", "-l", name + "/run"]) == 0
    new = store().load()
    secrets_ = [rec["access_token"], rec["refresh_token"], new["access_token"],
                new["refresh_token"], fault.token]
    assert new["access_token"] != rec["access_token"]  # it did refresh
    # a server that echoes the Authorization it got into its error answer
    fault.add_fault("status", status=500, times=None,
                    body=("invalid token %s" % fault.token).encode())
    assert ctadata.main(["-vv", "--url", fault.url, "--token", fault.token, "--retries", "0",
                         "ls"]) == 1
    out, err = capsys.readouterr()
    assert "HTTP 500 invalid token <redacted>" in err
    texts += [out, err]
    fault.clear_faults()
    assert ctadata.main(["-vv", "--url", fault.url, "ls"]) == 1  # refused, refreshed, refused
    assert ctadata.main(["-vv", "--url", "http://127.0.0.1:9", "--retries", "0",
                         "ls"]) == 1  # no server
    assert ctadata.main(["-vv", "token", "--explain"]) == 0
    monkeypatch.setenv("BEARER_TOKEN", make_jwt(time.time() - 5))
    secrets_.append(os.environ["BEARER_TOKEN"])
    assert ctadata.main(["-vv", "--url", srv.url, "ls"]) == 1  # expired
    for kw in ({"token": fault.token}, {}):
        c = ctadata.Client(url=fault.url, retries=0, **kw)
        fault.add_fault("status", status=503, body=fault.token.encode())
        try:
            c.ls("")
        except ctadata.CtadataError as e:
            texts += [str(e), repr(e), e.hint or "", "".join(traceback.format_exception(
                type(e), e, e.__traceback__))]
        texts += [repr(c), repr(c._auth), repr(c._transport), repr(c.settings), repr(c._oidc),
                  repr(c._auth.store), repr(c._auth._cred), repr(c._auth.secrets)]
    everything = _everything(capsys, caplog, texts)
    assert "PROPFIND" in everything and "refreshed the token" in everything  # -vv logs
    # every access and refresh token the provider ever issued or was sent
    secrets_ += list(idp._access) + list(idp._refresh) + [
        form["refresh_token"] for form in idp.token_requests if "refresh_token" in form]
    assert len(secrets_) > 6
    for s in secrets_:
        assert s not in everything
    assert not any(s in r.raw_path for r in fault.requests for s in secrets_)


def test_authorization_only_to_the_configured_origin(tmp_path):
    root = tmp_path / "srv"
    make_tree(root, {"d/f.bin": os.urandom(5000)})
    with FaultServer(root, token="tok-origin", redirect_get=True) as srv:
        c = ctadata.Client(url=srv.url, token="tok-origin", retries=0)
        c.download("d/f.bin", str(tmp_path / "f.bin"))
        assert (tmp_path / "f.bin").read_bytes() == (root / "d/f.bin").read_bytes()
        pool = srv.find(server="pool")
        assert pool and all("Authorization" not in r.headers for r in pool)
        srv.add_fault("redirect", method="PROPFIND",
                      location=srv.pool_url + "/d/?dcache-http-uuid=x")
        with pytest.raises(ctadata.CtadataError):
            c.ls("d")
        assert "Authorization" not in srv.requests[-1].headers
    # plain http: only to this machine
    assert ctadata._Transport(ctadata.Settings("http://127.0.0.2:80", env={}), None)._auth_ok
    assert not ctadata._Transport(ctadata.Settings("http://dcache.example:2880", env={}),
                                  None)._auth_ok
    with pytest.raises(ctadata.ConfigError):
        ctadata._OIDC(ctadata.Settings(env={}), ctadata._Secrets()).discover(
            "http://keycloak.example/realms/x")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("source", ["token-file", "env", "login"])
def test_the_token_is_on_no_command_line(tmp_path, source, idp):
    root = tmp_path / "srv"
    root.mkdir()
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(REPO)}
    argv = []
    if source == "login":
        env_store = ctadata._TokenStore({"HOME": str(home)})
        ans = idp.issue_tokens()
        env_store.save({"access_token": ans["access_token"], "refresh_token": "r" * 20,
                        "token_endpoint": idp.token_endpoint, "client_id": "x"})
        token = ans["access_token"]
    else:
        token = "tok-" + secrets.token_urlsafe(24)
        if source == "env":
            env["BEARER_TOKEN"] = token
        else:
            argv = ["--token-file", private(tmp_path / "tf", token)]
    with FaultServer(root, token=token) as srv:
        srv.add_fault("stall", method="PROPFIND", seconds=30)
        p = subprocess.Popen([sys.executable, "-m", "ctadata", "--url", srv.url] + argv
                             + ["ls"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not srv.count("PROPFIND") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert srv.find("PROPFIND")[0].headers["Authorization"] == "Bearer " + token
            assert p.poll() is None  # alive, holding the token, waiting for the answer
            assert token.encode() not in Path("/proc/%d/cmdline" % p.pid).read_bytes()
            for proc in Path("/proc").iterdir():  # nor any other process (no children)
                if proc.name.isdigit():
                    try:
                        assert token.encode() not in (proc / "cmdline").read_bytes()
                    except OSError:
                        pass
        finally:
            p.kill()
            p.communicate()
