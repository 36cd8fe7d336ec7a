"""WeChat mini-program login: ``code2Session``, user data decryption, phone numbers.

Endpoints (under ``auth_prefix``):

- ``POST /wechat/login``   ``{"code", "app"?}`` -> 200, a gateway session
- ``POST /wechat/decrypt`` ``{"encryptedData", "iv", "code"?}`` -> 200, the
  decrypted object (WeChat session required); profile fields are saved.
  With ``code`` (from a fresh ``wx.login``), the code is exchanged first and
  its ``session_key`` replaces the session's (same session, same token);
  without, a key WeChat has since replaced is 401 ``invalid_credentials``
  with ``reason: "session_key_stale"``
- ``POST /wechat/phone``   ``{"code"}`` -> 200, the phone number (WeChat
  session required); saved to the profile

A login exchanges the one-time ``code`` from ``wx.login()`` at
``auth.code2Session`` for ``openid``, ``session_key`` and maybe ``unionid``.
The identity subject is ``<appid>:<openid>``; a ``unionid`` (an Open Platform
account binding several apps) links every app's openid to one user.  The
``session_key`` is sealed (AES-GCM, ``[sessions] encryption_key``) into the
gateway session and never leaves the gateway.

The phone number API needs the app's access token, which is cached in the
session store (one for all processes) and refreshed by one caller at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import tornado.httpclient
from tornado.simple_httpclient import HTTPTimeoutError
from Crypto.Cipher import AES

from gateway import hookimpl
from gateway.api import (
    INT,
    POSITIVE_DURATION,
    ConfigContext,
    Conflict,
    Counter,
    Endpoint,
    GatewayError,
    LoginResult,
    Option,
    Principal,
    Provider,
    Request,
    Section,
    SessionView,
    User,
    at_least,
    http_url,
    invalid_credentials,
    invalid_request,
    pattern,
    too_many,
    unauthenticated,
)

#: Decrypted user-data fields copied into the user's profile.
PROFILE_FIELDS = ("nickName", "avatarUrl", "gender", "language", "city", "province", "country",
                  "phoneNumber", "purePhoneNumber", "countryCode")
PHONE_FIELDS = ("phoneNumber", "purePhoneNumber", "countryCode")
UNIONID_PROVIDER = "wechat-unionid"
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
MAX_ENCRYPTED = 64 * 1024
MAX_PROFILE_TEXT = 2048
DECRYPT_WINDOW = 3600.0

#: request bodies, as the gateway's OpenAPI document describes them
CODE_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 256, "description": "the code of a fresh wx.login"}
DECRYPT_SCHEMA = {
    "type": "object", "required": ["encryptedData", "iv"],
    "properties": {
        "encryptedData": {"type": "string", "minLength": 1, "maxLength": MAX_ENCRYPTED, "description": "base64"},
        "iv": {"type": "string", "minLength": 1, "maxLength": 64, "description": "base64 of 16 bytes"},
        "code": {**CODE_SCHEMA, "type": ["string", "null"],
                 "description": "the code of a fresh wx.login: renews the session's session_key first"},
    },
}
PHONE_SCHEMA = {"type": "object", "required": ["code"],
                "properties": {"code": {**CODE_SCHEMA, "description": "a getPhoneNumber code"}}}
PHONE_ANSWER = {"type": "object", "required": list(PHONE_FIELDS),
                "properties": {f: {"type": "string"} for f in PHONE_FIELDS}}


def login_schema(apps: list[str]) -> dict[str, Any]:
    """The login body: ``code``, and ``app``, one of ``apps`` (which may be
    left out, or null, when there is only one)."""
    app: dict[str, Any] = {"enum": apps if len(apps) > 1 else [*apps, None],
                           "description": "the mini-program, by its [providers.wechat.apps.<name>]"}
    return {"type": "object", "required": ["code"] + (["app"] if len(apps) > 1 else []),
            "properties": {"code": CODE_SCHEMA, "app": app}}

# code2Session errcodes (and the phone API's where they mean the same).
INVALID_CODE = {40029, 40163}
QUOTA = 45011
HIGH_RISK = 40226
BUSY = -1
TOKEN_INVALID = {40001, 42001}

#: the ``api`` label of ``gateway_wechat_api_calls_total``, by the path called
API_NAMES = {"/sns/jscode2session": "code2session", "/cgi-bin/stable_token": "stable_token",
             "/wxa/business/getuserphonenumber": "getuserphonenumber"}


def _apps(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("expected [providers.wechat.apps.<name>] tables")
    for name in value:
        if not _APP_NAME.match(name):
            raise ValueError(f"{name!r} is not an app name (letters, digits, '-', '_')")
    return value


APP_OPTIONS = [
    Option("appid", pattern(re.compile(r"^wx[0-9a-f]{16}$"), "a mini-program AppID such as wx4f4bc4dec97d474b"),
           None, "the mini-program's AppID", required=True),
    Option("secret", pattern(re.compile(r"^\S{1,128}$"), "the AppSecret (no spaces)"),
           None, "the mini-program's AppSecret", secret=True, required=True),
]


@dataclass(frozen=True)
class App:
    name: str
    appid: str
    secret: str = field(repr=False)


class WeChatError(Exception):
    """WeChat answered with an ``errcode``."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(errcode)
        self.errcode = errcode
        self.errmsg = errmsg


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"field {name} is not valid base64") from None


def decrypt_user_data(session_key_b64: str, iv_b64: str, encrypted_b64: str) -> dict[str, Any]:
    """Decrypt WeChat's ``encryptedData`` (AES-128-CBC, PKCS#7) into its JSON
    object, watermark included.  Every defect is a 400 ``invalid_request``
    that says which; padding is checked strictly (1..16, all bytes equal)."""
    key = _b64(session_key_b64, "session_key")
    if len(key) != 16:
        raise invalid_request("the session_key is not 16 bytes")
    iv = _b64(iv_b64, "iv")
    if len(iv) != 16:
        raise invalid_request(f"field iv must decode to 16 bytes, got {len(iv)}")
    data = _b64(encrypted_b64, "encryptedData")
    if not data or len(data) % 16:
        raise invalid_request(f"field encryptedData must decode to a non-empty multiple of 16 bytes, got {len(data)} "
                              "(truncated?)")
    plain = AES.new(key, AES.MODE_CBC, iv).decrypt(data)
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
        raise invalid_request("encryptedData does not decrypt to valid PKCS#7 padding: it was altered or cut, "
                              "or it was encrypted under a newer session_key (then send the code of that "
                              "wx.login with it)")
    try:
        text = plain[:-pad].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("encryptedData does not decrypt to UTF-8 text") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise invalid_request("encryptedData does not decrypt to JSON") from None
    if not isinstance(value, dict):
        raise invalid_request("encryptedData does not decrypt to a JSON object")
    try:  # JSON escapes can spell lone surrogates, which no UTF-8 consumer accepts
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_request("encryptedData holds text that is not valid Unicode") from None
    return value


def stale_session_key() -> GatewayError:
    """401 ``invalid_credentials``, ``reason: "session_key_stale"``: WeChat
    has replaced the session's ``session_key`` (a later ``wx.login``)."""
    return GatewayError(
        "invalid_credentials", "WeChat has replaced this session's session_key (wx.login was called again): "
        "send the code of a new wx.login with the request as \"code\"",
        headers={"WWW-Authenticate": 'Bearer realm="gateway"'}, fields={"reason": "session_key_stale"})


def check_watermark(value: dict[str, Any], appid: str, what: str) -> None:
    watermark = value.get("watermark")
    if not isinstance(watermark, dict) or "appid" not in watermark:
        raise invalid_request(f"the {what} has no watermark")
    if watermark.get("appid") != appid:
        raise invalid_request(f"the {what}'s watermark names another mini-program, not this session's")


class WeChatProvider(Provider):
    name = "wechat"
    #: sent upstream with a WeChat session (a backend needs the openid for
    #: WeChat Pay or subscription messages); never taken from a client
    reserved_headers = ("X-WeChat-AppId", "X-WeChat-OpenId", "X-WeChat-UnionId")
    #: nested tables, ``[providers.wechat.apps.<name>]``
    option_tables = {"apps.<name>": APP_OPTIONS}
    options = [
        Option("api_base", http_url, "https://api.weixin.qq.com", "base URL of WeChat's server API"),
        Option("timeout", POSITIVE_DURATION, "5s", "longest wait for each call to WeChat (502 beyond)"),
        Option("token_margin", POSITIVE_DURATION, "5m", "refresh an app's access token this long before it expires "
               "(halfway through, for a token that lives less than twice as long)"),
        Option("max_decrypt_failures", at_least(INT, 1), 20, "failed /decrypt calls per WeChat user within an "
               "hour before 429 rate_limited (AES-CBC has no integrity check: this blunts padding-oracle forgery)"),
        Option("apps", _apps, {}, "one `[providers.wechat.apps.<name>]` table per mini-program, "
               "with `appid` and `secret` (or `secret_env`); none = provider off"),
    ]

    @classmethod
    def check_config(cls, settings: Section, context: ConfigContext) -> list[str]:
        problems: list[str] = []
        seen: dict[str, str] = {}
        for name, app in settings.apps.items():
            if app.appid in seen:
                problems.append(f"providers.wechat.apps.{name}.appid: {app.appid} is also app {seen[app.appid]!r}")
            seen[app.appid] = name
        if settings.apps and context.shared_sessions and not context.sealing_key:
            problems.append("sessions.encryption_key: required (or encryption_key_env) with the shared "
                            "'redis' session store and the WeChat provider: it seals "
                            "each session's session_key, and every process must open it")
        return problems

    def __init__(self, gateway: Any, settings: Section) -> None:
        super().__init__(gateway, settings)
        self.apps = {name: App(name, app.appid, app.secret) for name, app in settings.apps.items()}
        self.login_schema = login_schema(sorted(self.apps))
        self.http: tornado.httpclient.AsyncHTTPClient | None = None
        self.calls: Counter | None = None
        #: refreshes in flight, by (appid, the token they replace)
        self._refreshing: dict[tuple[str, str | None], asyncio.Task[str]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.apps)

    async def setup(self) -> None:
        self.http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=100)
        self.calls = self.gateway.metrics.counter(
            "wechat_api_calls", "Calls to WeChat's API, by API and the errcode answered "
            "(0: success; unreachable, timeout, http_<status>, bad_reply: no errcode came)", ("api", "errcode"))
        if self.gateway.sealer.ephemeral:
            self.log.warning("sessions.encryption_key is not set: WeChat session_keys are sealed under a key of this "
                        "process only, so /wechat/decrypt needs a new login after a restart")

    async def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    # -- calling WeChat ----------------------------------------------------------

    async def call(self, endpoint: str, query: dict[str, str], body: dict[str, Any] | None = None,
                   redact: tuple[str, ...] = ()) -> dict[str, Any]:
        """One call to WeChat's API; the reply as a dict.  Raises 502 when
        WeChat cannot be reached or answers with anything but JSON, and
        :class:`WeChatError` for an ``errcode``.  Nothing in ``redact`` (and
        no query string) reaches a log line."""
        if self.http is None:
            raise RuntimeError("WeChatProvider.setup() has not been called")
        url = self.settings.api_base + endpoint + "?" + urlencode(query)
        timeout = self.settings.timeout
        try:
            response = await self.http.fetch(
                url, method="POST" if body is not None else "GET",
                body=json.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None,
                connect_timeout=timeout, request_timeout=timeout, raise_error=False, follow_redirects=False,
            )
        except Exception as exc:  # DNS failure and the like, before any response
            self._count(endpoint, "timeout" if isinstance(exc, HTTPTimeoutError) else "unreachable")
            raise self._bad_gateway(endpoint, f"{type(exc).__name__}") from None
        if response.code == 599:
            self._count(endpoint, "timeout" if isinstance(response.error, HTTPTimeoutError) else "unreachable")
            raise self._bad_gateway(endpoint, f"no answer ({type(response.error).__name__})")
        if response.code != 200:
            self._count(endpoint, f"http_{response.code}")
            raise self._bad_gateway(endpoint, f"HTTP {response.code}")
        try:  # JSON, whatever the Content-Type says (code2Session sends text/plain)
            reply = json.loads(response.body)
        except (ValueError, RecursionError):
            self._count(endpoint, "bad_reply")
            raise self._bad_gateway(endpoint, "the reply is not JSON") from None
        if not isinstance(reply, dict):
            self._count(endpoint, "bad_reply")
            raise self._bad_gateway(endpoint, "the reply is not a JSON object")
        errcode = reply.get("errcode", 0)
        self._count(endpoint, errcode if isinstance(errcode, int) and not isinstance(errcode, bool)
                    else 0 if errcode is None else "bad_reply")
        if errcode not in (0, None):
            errmsg = str(reply.get("errmsg", ""))[:200]
            for secret in redact:
                if secret:
                    errmsg = errmsg.replace(secret, "[redacted]")
            raise WeChatError(errcode if isinstance(errcode, int) else -99999, errmsg)
        return reply

    def _count(self, endpoint: str, errcode: int | str) -> None:
        """One call in ``gateway_wechat_api_calls_total``: its API and what came back."""
        if self.calls is not None:
            self.calls.labels(API_NAMES.get(endpoint, "other"), errcode).inc()

    @staticmethod
    def _bad_gateway(endpoint: str, why: str) -> GatewayError:
        return GatewayError("bad_gateway", "WeChat's API did not answer usably; try again",
                            log_message=f"WeChat {endpoint}: {why}")

    @staticmethod
    def map_error(exc: WeChatError, endpoint: str, invalid_code: tuple[str, str]) -> GatewayError:
        """The gateway's answer to an ``errcode``; ``invalid_code`` is the
        ``(code, message)`` for 40029/40163 at this endpoint.  WeChat's own
        words go to the log only."""
        detail = f"WeChat {endpoint}: errcode {exc.errcode} {exc.errmsg}"
        headers: dict[str, str] = {}
        if exc.errcode in INVALID_CODE:
            code, message = invalid_code
            if code == "invalid_credentials":
                headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
        elif exc.errcode == QUOTA:
            code, message = "rate_limited", "WeChat's API quota for this mini-program is used up; try again later"
            headers["Retry-After"] = "60"
        elif exc.errcode == HIGH_RISK:
            code, message = "forbidden", "WeChat refused: it judged this user high-risk"
        elif exc.errcode == BUSY:
            code, message = "unavailable", "WeChat is busy; try again shortly"
            headers["Retry-After"] = "1"
        else:
            code, message = "bad_gateway", "WeChat's API refused the request"
        return GatewayError(code, message, headers=headers, log_message=detail)

    # -- login ---------------------------------------------------------------------

    def app_for(self, request: Request, body: dict[str, Any]) -> App:
        name = request.field(body, "app", str, default=None, max_length=64)
        if name is None:
            if len(self.apps) != 1:
                raise invalid_request("field app is required: several mini-programs are configured ("
                                      + ", ".join(sorted(self.apps)) + ")")
            return next(iter(self.apps.values()))
        if name not in self.apps:
            raise invalid_request(f"field app names no configured mini-program (known: {', '.join(sorted(self.apps))})")
        return self.apps[name]

    async def login(self, request: Request, body: dict[str, Any]) -> LoginResult:
        code = request.field(body, "code", str, max_length=256)
        app = self.app_for(request, body)
        openid, key, unionid = await self.exchange(app, code)
        key_id = await self._mark_current(app.appid, openid)
        user, created = await self.resolve_user(app, openid, unionid)
        data = {"app": app.name, "appid": app.appid, "openid": openid, "unionid": unionid, "key_id": key_id,
                "session_key": self.gateway.sealer.seal(key, self._context(app.appid, openid, key_id))}
        return LoginResult(user=user, session_data=data, created=created)

    async def exchange(self, app: App, code: str) -> tuple[str, bytes, str | None]:
        """``auth.code2Session`` for a ``wx.login`` code: ``(openid,
        session_key, unionid or None)``."""
        query = {"appid": app.appid, "secret": app.secret, "js_code": code, "grant_type": "authorization_code"}
        try:  # never retried: a code is single-use
            reply = await self.call("/sns/jscode2session", query, redact=(app.secret, code))
        except WeChatError as exc:
            raise self.map_error(exc, "code2Session", (
                "invalid_credentials", "the code is not valid or was already used; call wx.login again")) from None
        openid, session_key, unionid = reply.get("openid"), reply.get("session_key"), reply.get("unionid")
        if not (isinstance(openid, str) and openid and isinstance(session_key, str)):
            raise self._bad_gateway("code2Session", "the reply lacks openid or session_key")
        try:
            key = base64.b64decode(session_key, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 16:
            raise self._bad_gateway("code2Session", "the session_key is not base64 of 16 bytes")
        return openid, key, unionid if isinstance(unionid, str) and unionid else None

    async def _mark_current(self, appid: str, openid: str) -> str:
        """WeChat replaces a user's session_key at every code2Session:
        remember which exchange holds the current one (its new id, returned),
        so that every session holding an older one is known stale."""
        key_id = secrets.token_urlsafe(12)
        await self.gateway.state.set_value(self._key_marker(appid, openid), key_id,
                                           self.gateway.sessions.absolute_timeout)
        return key_id

    @staticmethod
    def _key_marker(appid: str, openid: str) -> str:
        return f"wechat:key:{appid}:{openid}"

    @staticmethod
    def _context(appid: str, openid: str, key_id: str) -> str:
        return f"wechat.session_key:{appid}:{openid}:{key_id}"

    async def resolve_user(self, app: App, openid: str, unionid: str | None) -> tuple[User, bool]:
        """The user of ``(appid, openid)``, created on first login; a
        ``unionid`` joins the same person's accounts across apps."""
        profiles = self.gateway.profiles
        subject = f"{app.appid}:{openid}"
        data = {"appid": app.appid, "openid": openid, **({"unionid": unionid} if unionid else {})}
        identity = await profiles.get_identity(self.name, subject)
        if identity is None and unionid:
            user, _, created = await profiles.resolve_identity(UNIONID_PROVIDER, unionid, profile={}, data={})
            try:
                await profiles.link_identity(user.id, self.name, subject, data=data)
                return user, created
            except Conflict:  # a concurrent login linked it first
                identity = await profiles.get_identity(self.name, subject)
        if identity is None:
            user, identity, created = await profiles.resolve_identity(self.name, subject, profile={}, data=data)
        else:
            found = await profiles.get_user(identity.user_id)
            if found is None:
                raise GatewayError("internal", "an internal error occurred",
                                   log_message=f"wechat identity points at missing user {identity.user_id}")
            user, created = found, False
        if unionid and identity.data.get("unionid") != unionid:
            # The app was bound to an Open Platform account after this user's
            # first login: join the accounts now.
            try:
                await profiles.link_identity(user.id, UNIONID_PROVIDER, unionid)
            except Conflict:
                self.log.warning("wechat: a unionid already belongs to another user; the accounts stay apart")
            await profiles.update_identity_data(self.name, subject, {"unionid": unionid})
        return user, created

    # -- the session's own WeChat data ----------------------------------------------------

    async def session_key(self, principal: Principal) -> bytes:
        """The session's ``session_key``; 401 ``session_key_stale`` when
        WeChat has replaced it (or it no longer opens)."""
        assert principal.session is not None
        data = principal.session.data
        current = await self.gateway.state.get_value(self._key_marker(data["appid"], data["openid"]))
        if current is not None and current != data.get("key_id"):
            raise stale_session_key()
        try:
            return self.gateway.sealer.open(data["session_key"], self._context(data["appid"], data["openid"],
                                                                                data.get("key_id", "")))
        except (ValueError, KeyError):  # sealed under another key (a restart without encryption_key)
            raise stale_session_key() from None

    async def renew_session_key(self, app: App, session: SessionView, code: str) -> bytes:
        """Exchange a fresh ``wx.login`` code and keep its ``session_key`` in
        this session (same session, same token): the new key."""
        openid, key, _ = await self.exchange(app, code)
        key_id = await self._mark_current(app.appid, openid)  # the user's other sessions hold a stale key now
        if openid != session.data.get("openid"):
            raise invalid_credentials("the code is another WeChat user's than this session's; log in with it")
        sealed = self.gateway.sealer.seal(key, self._context(app.appid, openid, key_id))
        if await self.gateway.sessions.update_data(session.id, {"key_id": key_id, "session_key": sealed}) is None:
            raise unauthenticated()
        return key

    def require_wechat(self, principal: Principal) -> App:
        if principal.session is None or principal.session.provider != self.name:
            raise GatewayError("forbidden", "this endpoint needs a session from WeChat login")
        app = self.apps.get(principal.session.data.get("app", ""))
        if app is None or app.appid != principal.session.data.get("appid"):
            raise unauthenticated("this session's mini-program is no longer configured; log in again")
        return app

    async def save_profile(self, user_id: str, value: dict[str, Any], fields: tuple[str, ...]) -> None:
        """Copy ``fields`` into the profile: short strings and small integers
        only (anything else in client-supplied data is left out)."""
        def fits(v: Any) -> bool:
            if isinstance(v, str):
                return len(v) <= MAX_PROFILE_TEXT
            return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**31

        update = {k: value[k] for k in fields if fits(value.get(k))}
        if isinstance(update.get("language"), str):
            # WeChat writes zh_CN; the profile's language is a BCP 47 tag (zh-CN)
            update["language"] = update["language"].replace("_", "-")
        if update:
            try:
                await self.gateway.profiles.update_profile(user_id, update)
            except KeyError:
                raise unauthenticated("this session's user no longer exists") from None

    # -- the access token, shared by every process --------------------------------------

    async def access_token(self, app: App, rejected: str | None = None) -> str:
        """The app's access token from the shared cache, else fetched once for
        every concurrent caller.  ``rejected``: the token WeChat just refused."""
        cached = await self._cached_token(app)
        if cached and cached != rejected:
            return cached
        # Callers replacing the same token (or none) share one refresh; one
        # that holds a rejected token never joins a refresh that might hand
        # that very token back without forcing a new one.
        flight = (app.appid, rejected)
        task = self._refreshing.get(flight)
        if task is None:
            task = asyncio.ensure_future(self._refresh(app, rejected))
            self._refreshing[flight] = task
            task.add_done_callback(lambda _: self._refreshing.pop(flight, None))
        return await asyncio.shield(task)

    @staticmethod
    def _token_key(app: App) -> str:
        return f"wechat:token:{app.appid}"

    async def _cached_token(self, app: App) -> str | None:
        """The shared access token, kept sealed (it is a credential of the
        app); ``None`` when there is none or it does not open."""
        sealed = await self.gateway.state.get_value(self._token_key(app))
        if sealed is None:
            return None
        try:
            return self.gateway.sealer.open(sealed, self._token_key(app)).decode()
        except (ValueError, UnicodeDecodeError):
            return None

    async def _refresh(self, app: App, rejected: str | None) -> str:
        """Fetch a token under a short lock in the shared store, so that one
        process asks WeChat while the others wait for the cached result."""
        store = self.gateway.state
        lock = f"wechat:token-lock:{app.appid}"
        owner = secrets.token_hex(8)
        hold = 2 * self.settings.timeout + 1  # at most two calls to WeChat under the lock
        deadline = time.monotonic() + hold + self.settings.timeout
        while time.monotonic() < deadline:
            if await store.add_value(lock, owner, hold):
                try:
                    cached = await self._cached_token(app)
                    if cached and cached != rejected:
                        return cached  # another process refreshed it meanwhile
                    token, expires_in = await self._fetch_token(app, force=False)
                    if token == rejected:  # WeChat handed back the token it refuses
                        token, expires_in = await self._fetch_token(app, force=True)
                    margin = min(self.settings.token_margin, expires_in / 2)
                    await store.set_value(self._token_key(app), self.gateway.sealer.seal(token.encode(), self._token_key(app)),
                                          max(1.0, expires_in - margin))
                    return token
                finally:
                    await store.delete_value(lock, expected=owner)
            await asyncio.sleep(0.05)
            cached = await self._cached_token(app)
            if cached and cached != rejected:
                return cached
        raise GatewayError("bad_gateway", "WeChat's access token could not be obtained in time; try again",
                           log_message=f"WeChat stable_token: no token for app {app.name!r} within the wait")

    async def _fetch_token(self, app: App, *, force: bool) -> tuple[str, float]:
        body = {"grant_type": "client_credential", "appid": app.appid, "secret": app.secret, "force_refresh": force}
        try:
            reply = await self.call("/cgi-bin/stable_token", {}, body, redact=(app.secret,))
        except WeChatError as exc:
            raise self.map_error(exc, "stable_token", ("bad_gateway", "WeChat's API refused the request")) from None
        token, expires_in = reply.get("access_token"), reply.get("expires_in")
        if not (isinstance(token, str) and token and isinstance(expires_in, (int, float)) and expires_in > 0):
            raise self._bad_gateway("stable_token", "the reply lacks access_token or expires_in")
        return token, float(expires_in)

    async def phone_number(self, app: App, code: str) -> dict[str, Any]:
        token = await self.access_token(app)
        for attempt in (1, 2):
            try:
                reply = await self.call("/wxa/business/getuserphonenumber", {"access_token": token}, {"code": code},
                                        redact=(token, code))
                break
            except WeChatError as exc:
                if exc.errcode in TOKEN_INVALID and attempt == 1:
                    token = await self.access_token(app, rejected=token)
                    continue
                raise self.map_error(exc, "getuserphonenumber", (
                    "invalid_request", "the phone code is not valid or has expired")) from None
        info = reply.get("phone_info")
        if not isinstance(info, dict) or not all(isinstance(info.get(f), str) for f in PHONE_FIELDS):
            raise self._bad_gateway("getuserphonenumber", "the reply lacks phone_info")
        watermark = info.get("watermark")
        if not isinstance(watermark, dict) or watermark.get("appid") != app.appid:
            raise self._bad_gateway("getuserphonenumber", "phone_info's watermark names another appid")
        return {f: info[f] for f in PHONE_FIELDS}

    # -- endpoints and upstream headers ------------------------------------------------

    async def decrypt(self, request: Request) -> dict[str, Any]:
        """``POST {auth_prefix}/wechat/decrypt``: user data from ``wx.getUserInfo`` and the like;
        with ``code`` (from a fresh ``wx.login``), the session's ``session_key`` is renewed first."""
        principal = await request.require_session()
        app = self.require_wechat(principal)
        body = request.json_body()
        encrypted = request.field(body, "encryptedData", str, max_length=MAX_ENCRYPTED)
        iv = request.field(body, "iv", str, max_length=64)
        code = request.field(body, "code", str, default=None, max_length=256)
        # Each failure is counted per WeChat user: the thousands of tries a
        # padding-oracle forgery needs end in 429 long before they add up.
        assert principal.session is not None
        store, data = self.gateway.state, principal.session.data
        counter = f"wechat:decrypt-fail:{data['appid']}:{data['openid']}"
        failures, left = await store.peek(counter)
        if failures >= self.settings.max_decrypt_failures:
            raise too_many("rate_limited", "too many failed decryptions; try again later", left)
        if code is not None:
            key = await self.renew_session_key(app, principal.session, code)
        else:
            key = await self.session_key(principal)
        try:
            value = decrypt_user_data(base64.b64encode(key).decode(), iv, encrypted)
            check_watermark(value, app.appid, "decrypted data")
        except GatewayError:
            await store.hit(counter, DECRYPT_WINDOW)
            raise
        await self.save_profile(principal.user_id, value, PROFILE_FIELDS)
        value.pop("watermark", None)
        return value

    async def phone(self, request: Request) -> dict[str, Any]:
        """``POST {auth_prefix}/wechat/phone``: the number behind a ``getPhoneNumber`` code."""
        principal = await request.require_session()
        app = self.require_wechat(principal)
        code = request.field(request.json_body(), "code", str, max_length=256)
        phone = await self.phone_number(app, code)
        await self.save_profile(principal.user_id, phone, PHONE_FIELDS)
        return phone

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("decrypt", self.decrypt, summary="Decrypt user data (wx.getUserInfo and the like)",
                         request_schema=DECRYPT_SCHEMA, response_schema={"type": "object"}, requires_session=True),
                Endpoint("phone", self.phone, summary="The phone number behind a getPhoneNumber code",
                         request_schema=PHONE_SCHEMA, response_schema=PHONE_ANSWER, requires_session=True)]

    def upstream_headers(self, principal: Principal) -> dict[str, str] | None:
        """A WeChat session's app, openid and unionid, for the upstream."""
        session = principal.session
        if session is None:
            return None
        data = session.data
        headers = {"X-WeChat-AppId": data.get("appid", ""), "X-WeChat-OpenId": data.get("openid", "")}
        if data.get("unionid"):
            headers["X-WeChat-UnionId"] = data["unionid"]
        return headers


@hookimpl
def gateway_providers() -> list[type[Provider]]:
    return [WeChatProvider]
