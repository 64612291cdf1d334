"""In-process OpenID Connect provider double, shaped like Keycloak.

Serves discovery, the OAuth 2.0 device authorization grant (RFC 8628) with a
scripted sequence of answers, and refresh with refresh-token rotation.  Access
tokens are unsigned JWTs (base64url without padding, dummy signature) that a
WebDAV test server can check with ``provider.is_valid(token)``, or over HTTP
at ``provider.userinfo_endpoint`` (GET with ``Authorization: Bearer``: 200 and
the claims for a valid token, else 401), e.g. from nginx ``auth_request``.

    with OIDCProvider() as idp:
        idp.device_script = ["authorization_pending", "slow_down", "ok"]
        ... client runs the device flow against idp.issuer ...
        assert idp.poll_times[2] - idp.poll_times[1] >= idp.interval + 5
"""

import base64
import binascii
import json
import secrets
import threading
import time
import urllib.parse
import uuid

from httpdouble import DoubleHandler, ServerDouble

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"
TERMINAL_ERRORS = ("access_denied", "expired_token")

_ERROR_TEXT = {
    "authorization_pending": "The authorization request is still pending",
    "slow_down": "Slow down",
    "access_denied": "The end user denied the authorization request",
    "expired_token": "Device code is expired",
    "invalid_grant": "Invalid refresh token",
    "invalid_client": "Invalid client or Invalid client credentials",
    "invalid_request": "Missing form parameter: grant_type",
    "unsupported_grant_type": "Unsupported grant_type",
}


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_segment(obj):
    return _b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def make_jwt(exp, **claims):
    """An unsigned-looking JWT ``header.payload.signature`` (base64url, no
    padding, as RFC 7515 requires) whose payload is ``{"exp": exp, **claims}``;
    the signature is random bytes."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "ctadata-test-key"}
    payload = dict(exp=int(exp), **claims)
    return ".".join([_json_segment(header), _json_segment(payload), _b64url(secrets.token_bytes(256))])


def jwt_claims(token):
    """Decode the payload of a JWT (adds back the padding JWTs leave out)."""
    segment = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


class _Device:
    """One pending device authorization."""

    def __init__(self, client_id, scope, script, expires_at):
        self.client_id = client_id
        self.scope = scope
        self.script = list(script)
        self.expires_at = expires_at
        self.polls = 0

    def next_answer(self):
        """Scripted answers are used in order; the last one repeats."""
        answer = self.script[min(self.polls, len(self.script) - 1)]
        self.polls += 1
        return answer


class OIDCProvider(ServerDouble):
    """Keycloak-like OIDC provider on 127.0.0.1 (see module docstring).

    Settable by tests at any time: ``device_script`` (read when a device code
    is issued), ``interval``, ``access_lifetime``, ``device_expires_in``,
    ``clock`` (what time it is for token lifetimes, default ``time.time``: a
    test gives the client and this provider one clock it moves forward,
    instead of sleeping until a token is due).
    Script entries: ``"ok"`` (tokens), an RFC 8628 error code (HTTP 400 JSON
    error; ``access_denied``/``expired_token`` also end the authorization) or
    an int (that HTTP status with a text body, to test retries).
    """

    def __init__(self, client_id="dcache-cta-cscs-ch-users", client_secret=None,
                 access_lifetime=300, realm="cta", interval=5, device_expires_in=600,
                 refresh_lifetime=1800, subject="alice"):
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_lifetime = access_lifetime
        self.realm = realm
        self.interval = interval
        self.device_expires_in = device_expires_in
        self.refresh_lifetime = refresh_lifetime
        self.subject = subject
        self.device_script = ["ok"]
        self.clock = time.time
        self.refresh_count = 0
        self.token_requests = []   # form dicts sent to the token endpoint, secrets included
        self.device_requests = []  # form dicts sent to the device endpoint
        self.poll_times = []       # time.monotonic() of each device-code poll
        self.requests = []         # (method, path, headers dict) of every request
        self._lock = threading.Lock()
        self._devices = {}         # device_code -> _Device
        self._access = {}          # access token -> exp (unix time)
        self._refresh = {}         # live refresh token -> scope
        self._issued = 0

    # ---- addresses --------------------------------------------------------
    @property
    def issuer(self):
        return "%s/realms/%s" % (self.url, self.realm)

    @property
    def discovery_url(self):
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def device_authorization_endpoint(self):
        return self.issuer + "/protocol/openid-connect/auth/device"

    @property
    def token_endpoint(self):
        return self.issuer + "/protocol/openid-connect/token"

    @property
    def userinfo_endpoint(self):
        return self.issuer + "/protocol/openid-connect/userinfo"

    @property
    def verification_uri(self):
        return self.issuer + "/device"

    # ---- tokens -----------------------------------------------------------
    def issue_tokens(self, scope="openid offline_access"):
        """Mint an access + refresh token pair as the token endpoint would
        (for tests that start from an existing login); returns the JSON dict."""
        now = int(self.clock())
        with self._lock:
            self._issued += 1
            serial = self._issued
        access = self._access_token(serial, now, scope)
        refresh = make_jwt(now + (self.refresh_lifetime or 10 ** 9), iat=now,
                           jti=str(uuid.uuid4()), iss=self.issuer, sub=self.subject,
                           typ="Offline" if "offline_access" in scope.split() else "Refresh")
        with self._lock:
            self._access[access] = jwt_claims(access)["exp"]
            self._refresh[refresh] = scope
        return {
            "access_token": access,
            "expires_in": self.access_lifetime,
            "refresh_expires_in": 0 if "offline_access" in scope.split() else self.refresh_lifetime,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "session_state": str(uuid.uuid4()),
            "scope": scope,
        }

    def _access_token(self, serial, now, scope):
        """The n-th token's payload is n (mod 3) bytes past a multiple of 3, so
        two tokens out of three have segments that would need '=' padding."""
        claims = dict(iat=now, jti="", iss=self.issuer, sub=self.subject, typ="Bearer",
                      azp=self.client_id, scope=scope, preferred_username=self.subject)
        base = len(json.dumps(dict(exp=now + self.access_lifetime, **claims), separators=(",", ":")))
        claims["jti"] = "%08d-" % serial + "x" * ((serial - base - 9) % 3)
        return make_jwt(now + self.access_lifetime, **claims)

    def is_valid(self, token):
        """True for an access token this provider issued that has not expired
        (nor been revoked)."""
        with self._lock:
            exp = self._access.get(token)
        return exp is not None and self.clock() < exp

    def valid_tokens(self):
        """The set of access tokens that are currently valid."""
        now = self.clock()
        with self._lock:
            return {token for token, exp in self._access.items() if now < exp}

    def revoke_access_tokens(self):
        """Make every issued access token invalid server-side (their ``exp``
        claim still looks fine to a client)."""
        with self._lock:
            self._access = dict.fromkeys(self._access, 0)

    def revoke_refresh_tokens(self):
        with self._lock:
            self._refresh.clear()

    # ---- endpoint logic (called by the handler) -----------------------------
    def _check_client(self, form, basic):
        client_id, secret = basic or (form.get("client_id"), form.get("client_secret"))
        if client_id != self.client_id:
            return False
        return self.client_secret is None or secrets.compare_digest(
            str(secret or ""), self.client_secret)

    def _device_authorization(self, form):
        code = secrets.token_urlsafe(32)
        user_code = "%s-%s" % (secrets.token_hex(2).upper(), secrets.token_hex(2).upper())
        scope = form.get("scope", "openid")
        with self._lock:
            self._devices[code] = _Device(form.get("client_id"), scope, self.device_script or ["ok"],
                                          time.monotonic() + self.device_expires_in)
        return {
            "device_code": code,
            "user_code": user_code,
            "verification_uri": self.verification_uri,
            "verification_uri_complete": self.verification_uri + "?user_code=" + user_code,
            "expires_in": self.device_expires_in,
            "interval": self.interval,
        }

    def _poll(self, form):
        """-> (status, json or text)."""
        with self._lock:
            self.poll_times.append(time.monotonic())
            device = self._devices.get(form.get("device_code"))
            if device is None or device.client_id != form.get("client_id", device.client_id):
                return 400, _error("invalid_grant", "Device code not valid")
            if time.monotonic() >= device.expires_at:
                del self._devices[form["device_code"]]
                return 400, _error("expired_token")
            answer = device.next_answer()
            if answer == "ok" or answer in TERMINAL_ERRORS:
                del self._devices[form["device_code"]]  # a device code is used once
        if isinstance(answer, int):
            return answer, "scripted HTTP %d" % answer
        if answer == "ok":
            return 200, self.issue_tokens(device.scope)
        return 400, _error(answer)

    def _refresh_grant(self, form):
        with self._lock:
            scope = self._refresh.pop(form.get("refresh_token"), None)
            if scope is None:
                return 400, _error("invalid_grant")
            self.refresh_count += 1
        return 200, self.issue_tokens(form.get("scope") or scope)


def _error(code, description=None):
    return {"error": code, "error_description": description or _ERROR_TEXT.get(code, code)}


class _Handler(DoubleHandler):
    def _route(self):
        idp = self.double
        path = urllib.parse.urlsplit(self.path).path
        idp.requests.append((self.command, self.path, dict(self.headers)))
        realm = "/realms/%s" % idp.realm
        routes = {
            realm + "/.well-known/openid-configuration": ("GET", self._discovery),
            realm + "/protocol/openid-connect/auth/device": ("POST", self._device),
            realm + "/protocol/openid-connect/token": ("POST", self._token),
            realm + "/device": ("GET", self._device_page),
            realm + "/protocol/openid-connect/userinfo": ("GET", self._userinfo),
        }
        if path not in routes:
            return self.send(404, "Not Found")
        method, view = routes[path]
        if self.command != method and not (self.command == "HEAD" and method == "GET"):
            return self.send(405, "Method Not Allowed", headers=[("Allow", method)])
        view()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _route

    def _discovery(self):
        idp = self.double
        self.send_json(200, {
            "issuer": idp.issuer,
            "authorization_endpoint": idp.issuer + "/protocol/openid-connect/auth",
            "device_authorization_endpoint": idp.device_authorization_endpoint,
            "token_endpoint": idp.token_endpoint,
            "userinfo_endpoint": idp.userinfo_endpoint,
            "jwks_uri": idp.issuer + "/protocol/openid-connect/certs",
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_GRANT],
            "scopes_supported": ["openid", "offline_access", "profile", "email"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        })

    def _userinfo(self):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.double.is_valid(token.strip()):
            return self.send_json(401, _error("invalid_token", "Token verification failed"),
                                  headers=[("WWW-Authenticate", 'Bearer error="invalid_token"')])
        claims = jwt_claims(token.strip())
        self.send_json(200, {k: claims[k] for k in ("sub", "preferred_username") if k in claims})

    def _device_page(self):
        self.send(200, "<html><body>Enter the code shown by your device.</body></html>",
                  "text/html; charset=utf-8")

    def _client_form(self, log):
        """Parse and log the form; answer 400/401 and return None if unusable."""
        if not self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            self.send_json(400, _error("invalid_request", "Expected a form body"))
            return None
        form = self.read_form()
        log.append(form)
        if not self.double._check_client(form, self._basic_auth()):
            self.send_json(401, _error("invalid_client"))
            return None
        return form

    def _basic_auth(self):
        """(client_id, client_secret) from HTTP Basic (RFC 6749 2.3.1), or None."""
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")
        return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)

    def _device(self):
        form = self._client_form(self.double.device_requests)
        if form is not None:
            self.send_json(200, self.double._device_authorization(form))

    def _token(self):
        form = self._client_form(self.double.token_requests)
        if form is None:
            return
        grant = form.get("grant_type")
        if grant == DEVICE_GRANT:
            status, answer = self.double._poll(form)
        elif grant == REFRESH_GRANT:
            status, answer = self.double._refresh_grant(form)
        elif not grant:
            status, answer = 400, _error("invalid_request")
        else:
            status, answer = 400, _error("unsupported_grant_type")
        if isinstance(answer, dict):
            self.send_json(status, answer, headers=[("Cache-Control", "no-store")])
        else:
            self.send(status, answer)


OIDCProvider.handler_class = _Handler
