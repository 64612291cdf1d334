"""Self-test of the OIDC provider double (tests/oidcserver.py), via http.client."""

import base64
import http.client
import json
import time
import urllib.parse

import pytest

from oidcserver import DEVICE_GRANT, OIDCProvider, jwt_claims, make_jwt

CLIENT = "dcache-cta-cscs-ch-users"


@pytest.fixture
def idp():
    with OIDCProvider(interval=1) as provider:
        yield provider


def call(provider, method, url, form=None, headers=None):
    """-> (status, parsed JSON or text, response headers)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    body = urllib.parse.urlencode(form) if form is not None else None
    hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    hdrs.update(headers or {})
    conn.request(method, parts.path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(data) if is_json else data.decode(), dict(resp.getheaders())


def start_device(provider, **extra):
    form = dict(client_id=CLIENT, scope="openid offline_access", **extra)
    status, answer, _ = call(provider, "POST", provider.device_authorization_endpoint, form)
    assert status == 200, answer
    return answer


def poll(provider, device_code, **extra):
    form = dict(dict(grant_type=DEVICE_GRANT, device_code=device_code, client_id=CLIENT), **extra)
    return call(provider, "POST", provider.token_endpoint, form)[:2]


def refresh(provider, token, **extra):
    form = dict(dict(grant_type="refresh_token", refresh_token=token, client_id=CLIENT), **extra)
    return call(provider, "POST", provider.token_endpoint, form)[:2]


def test_discovery_document_is_keycloak_shaped(idp):
    assert idp.issuer == idp.url + "/realms/cta"
    status, doc, _ = call(idp, "GET", idp.issuer + "/.well-known/openid-configuration")
    assert status == 200
    assert doc["issuer"] == idp.issuer
    assert doc["device_authorization_endpoint"] == idp.issuer + "/protocol/openid-connect/auth/device"
    assert doc["token_endpoint"] == idp.issuer + "/protocol/openid-connect/token"
    assert DEVICE_GRANT in doc["grant_types_supported"]


def test_device_authorization_answer(idp):
    answer = start_device(idp)
    assert set(answer) >= {"device_code", "user_code", "verification_uri",
                           "verification_uri_complete", "expires_in", "interval"}
    assert answer["interval"] == 1 and answer["expires_in"] == 600
    assert answer["verification_uri_complete"].endswith("user_code=" + answer["user_code"])
    assert idp.device_requests == [{"client_id": CLIENT, "scope": "openid offline_access"}]
    assert call(idp, "GET", answer["verification_uri"])[0] == 200


def test_scripted_device_flow_ends_with_tokens(idp):
    idp.device_script = ["authorization_pending", "slow_down", "ok"]
    code = start_device(idp)["device_code"]
    assert poll(idp, code) == (400, {"error": "authorization_pending",
                                     "error_description": "The authorization request is still pending"})
    status, answer = poll(idp, code)
    assert (status, answer["error"]) == (400, "slow_down")
    status, tokens = poll(idp, code)
    assert status == 200
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 300
    assert tokens["refresh_token"] and idp.is_valid(tokens["access_token"])
    assert len(idp.poll_times) == 3 and idp.poll_times == sorted(idp.poll_times)
    assert [r["grant_type"] for r in idp.token_requests] == [DEVICE_GRANT] * 3
    # A device code is good for one set of tokens only.
    assert poll(idp, code)[1]["error"] == "invalid_grant"


@pytest.mark.parametrize("final", ["access_denied", "expired_token"])
def test_device_flow_can_end_in_refusal(idp, final):
    idp.device_script = ["authorization_pending", final]
    code = start_device(idp)["device_code"]
    assert poll(idp, code)[1]["error"] == "authorization_pending"
    status, answer = poll(idp, code)
    assert (status, answer["error"]) == (400, final) and answer["error_description"]
    assert poll(idp, code)[1]["error"] == "invalid_grant"  # the code is gone
    assert idp.valid_tokens() == set()


def test_terminal_answer_body(idp):
    idp.device_script = ["access_denied"]
    status, answer = poll(idp, start_device(idp)["device_code"])
    assert status == 400 and answer["error"] == "access_denied"


def test_last_non_terminal_answer_repeats_and_script_is_read_at_issue(idp):
    idp.device_script = ["slow_down"]
    code = start_device(idp)["device_code"]
    idp.device_script = ["ok"]  # too late for that device code
    assert [poll(idp, code)[1]["error"] for _ in range(3)] == ["slow_down"] * 3


def test_device_code_expires_with_time():
    with OIDCProvider(device_expires_in=0) as idp:
        code = start_device(idp)["device_code"]
        assert poll(idp, code) == (400, {"error": "expired_token",
                                         "error_description": "Device code is expired"})


def test_scripted_http_status(idp):
    idp.device_script = [503, "ok"]
    code = start_device(idp)["device_code"]
    assert poll(idp, code) == (503, "scripted HTTP 503")
    assert poll(idp, code)[0] == 200


def test_unknown_device_code(idp):
    assert poll(idp, "nope")[1]["error"] == "invalid_grant"


def test_client_id_is_checked(idp):
    status, answer, _ = call(idp, "POST", idp.device_authorization_endpoint,
                             {"client_id": "other", "scope": "openid"})
    assert (status, answer["error"]) == (401, "invalid_client")
    status, answer = poll(idp, start_device(idp)["device_code"], client_id="other")
    assert (status, answer["error"]) == (401, "invalid_client")


def test_client_secret_is_checked_in_form_and_basic_auth():
    with OIDCProvider(client_secret="s3cret") as idp:
        status, answer, _ = call(idp, "POST", idp.device_authorization_endpoint,
                                 {"client_id": CLIENT, "scope": "openid"})
        assert (status, answer["error"]) == (401, "invalid_client")
        wrong = {"client_id": CLIENT, "client_secret": "nope", "scope": "openid"}
        assert call(idp, "POST", idp.device_authorization_endpoint, wrong)[0] == 401
        code = start_device(idp, client_secret="s3cret")["device_code"]
        assert idp.device_requests[-1]["client_secret"] == "s3cret"
        basic = "Basic " + base64.b64encode(("%s:s3cret" % CLIENT).encode()).decode()
        form = {"grant_type": DEVICE_GRANT, "device_code": code}
        status, tokens, _ = call(idp, "POST", idp.token_endpoint, form, {"Authorization": basic})
        assert status == 200 and idp.is_valid(tokens["access_token"])


def test_refresh_rotates_and_rejects_old_token(idp):
    first = idp.issue_tokens()
    status, second = refresh(idp, first["refresh_token"])
    assert status == 200 and idp.refresh_count == 1
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == "openid offline_access"
    assert refresh(idp, first["refresh_token"]) == (400, {"error": "invalid_grant",
                                                          "error_description": "Invalid refresh token"})
    assert idp.refresh_count == 1
    assert refresh(idp, second["refresh_token"])[0] == 200 and idp.refresh_count == 2
    assert idp.token_requests[0]["refresh_token"] == first["refresh_token"]


def test_revoked_refresh_tokens_are_rejected(idp):
    tokens = idp.issue_tokens()
    idp.revoke_refresh_tokens()
    assert refresh(idp, tokens["refresh_token"])[1]["error"] == "invalid_grant"


def test_access_tokens_are_unpadded_jwts_some_needing_padding(idp):
    before = int(time.time())
    tokens = [idp.issue_tokens()["access_token"] for _ in range(3)]
    for token in tokens:
        header, payload, signature = token.split(".")
        assert "=" not in token
        assert json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["typ"] == "JWT"
        claims = jwt_claims(token)
        assert claims["iss"] == idp.issuer and claims["sub"] == "alice"
        assert before <= claims["iat"] <= claims["exp"] - 300 <= time.time()
        assert len(signature) > 100
    # The old client decoded without adding padding and failed on these.
    assert sorted(len(t.split(".")[1]) % 4 for t in tokens) == [0, 2, 3]
    with pytest.raises(ValueError):
        base64.urlsafe_b64decode(tokens[0].split(".")[1])


def test_token_validity_and_expiry():
    with OIDCProvider(access_lifetime=-1) as idp:
        token = idp.issue_tokens()["access_token"]
        assert not idp.is_valid(token) and idp.valid_tokens() == set()
    with OIDCProvider() as idp:
        token = idp.issue_tokens()["access_token"]
        assert idp.valid_tokens() == {token}
        assert not idp.is_valid(make_jwt(time.time() + 60, sub="forged"))
        idp.revoke_access_tokens()
        assert not idp.is_valid(token)
        assert jwt_claims(token)["exp"] > time.time()  # still looks valid to a client


def test_make_jwt():
    token = make_jwt(1234567890, sub="bob", scope="storage.read:/")
    assert "=" not in token and token.count(".") == 2
    assert jwt_claims(token) == {"exp": 1234567890, "sub": "bob", "scope": "storage.read:/"}


def test_bad_requests(idp):
    status, answer, _ = call(idp, "POST", idp.token_endpoint, {"client_id": CLIENT, "grant_type": "password"})
    assert (status, answer["error"]) == (400, "unsupported_grant_type")
    status, answer, _ = call(idp, "POST", idp.token_endpoint, {"client_id": CLIENT})
    assert (status, answer["error"]) == (400, "invalid_request")
    status, answer, _ = call(idp, "POST", idp.token_endpoint, None)  # no form content type
    assert (status, answer["error"]) == (400, "invalid_request")
    assert call(idp, "GET", idp.token_endpoint)[0] == 405
    assert call(idp, "GET", idp.url + "/realms/other/.well-known/openid-configuration")[0] == 404


def test_keep_alive_and_request_log(idp):
    conn = http.client.HTTPConnection("127.0.0.1", idp.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/realms/cta/.well-known/openid-configuration")
        resp = conn.getresponse()
        assert resp.status == 200 and not resp.will_close
        resp.read()
    sock = conn.sock
    conn.request("POST", "/realms/cta/protocol/openid-connect/token", body="client_id=x",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    conn.getresponse().read()
    assert conn.sock is sock  # one connection for all four requests
    conn.close()
    assert [r[0] for r in idp.requests] == ["GET", "GET", "GET", "POST"]


def test_stop_closes_idle_connections():
    idp = OIDCProvider().start()
    conn = http.client.HTTPConnection("127.0.0.1", idp.port, timeout=5)
    conn.request("GET", "/realms/cta/.well-known/openid-configuration")
    conn.getresponse().read()
    idp.stop()
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/realms/cta/.well-known/openid-configuration")
        conn.getresponse()


def test_userinfo_checks_the_bearer_token(idp):
    tokens = idp.issue_tokens()
    status, claims, _ = call(idp, "GET", idp.userinfo_endpoint,
                             headers={"Authorization": "Bearer " + tokens["access_token"]})
    assert status == 200 and claims["sub"] == "alice"
    assert call(idp, "GET", idp.userinfo_endpoint)[0] == 401
    idp.revoke_access_tokens()
    status, answer, headers = call(idp, "GET", idp.userinfo_endpoint,
                                   headers={"Authorization": "Bearer " + tokens["access_token"]})
    assert status == 401 and answer["error"] == "invalid_token"
    assert headers["WWW-Authenticate"].startswith("Bearer")
