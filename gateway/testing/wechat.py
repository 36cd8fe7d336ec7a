"""A fake of WeChat's server API, for tests and for the local sandbox.

:class:`FakeWeChat`, served by :func:`start_fake_wechat`, is a real Tornado
HTTP server on loopback that speaks the documented protocol of the three
endpoints the WeChat mini-program provider calls:

- ``GET /sns/jscode2session?appid=&secret=&js_code=&grant_type=authorization_code``
  answers JSON sent as ``text/plain`` (as the real API does):
  ``{"openid", "session_key", "unionid"?}`` or ``{"errcode", "errmsg"}``.
  Codes are registered beforehand (:meth:`FakeWeChat.add_code`, or
  :meth:`FakeWeChat.mint_code` for a fresh one) and are single-use (40163
  the second time); an unknown code is 40029, a wrong secret 40125, an
  unknown appid 40013.  The ``session_key`` of the user's latest minted or
  exchanged code is their current one, under which
  :meth:`FakeWeChat.encrypted_data` encrypts user data, as WeChat does
  after each ``wx.login``.
- ``POST /cgi-bin/stable_token`` with a JSON body
  ``{"grant_type": "client_credential", "appid", "secret", "force_refresh"}``
  answers ``{"access_token", "expires_in"}``.  Like the real stable-token
  API it hands back the app's current token while that token is good, and
  issues a new one (``tok-1``, ``tok-2``, ...) when there is none, when the
  current one was marked invalid or expired, or when ``force_refresh`` is
  true.  ``sticky = True`` makes it hand back the current token even when
  that token was marked bad (unless ``force_refresh``).
- ``POST /wxa/business/getuserphonenumber?access_token=TOKEN`` with a JSON
  body ``{"code"}``: 40001 for an unknown or invalidated token, 42001 for an
  expired one; else ``phone_info`` for a registered phone code
  (:meth:`FakeWeChat.add_phone_code`, :meth:`FakeWeChat.mint_phone_code`;
  watermark appid of the token's app unless overridden), 40029 for an
  unknown code.

Every request is recorded (``requests`` / ``seen(endpoint)``); a test can
force a canned answer per endpoint (any status/body, optionally after a
delay) or delay the real answers.  The fake never logs a request line: its
query strings carry secrets.

What a mini-program would get from ``wx.login``, ``wx.getUserInfo`` and
``getPhoneNumber`` is made in Python::

    fake, server = start_fake_wechat(free_port())
    fake.add_app("wx4f4bc4dec97d474b", "app-secret")
    code = fake.mint_code(openid="o-alice")            # a wx.login code
    # ... log in at the gateway with it, then:
    sample = fake.encrypted_data("o-alice", {"nickName": "Alice"})  # {"encryptedData", "iv"}
    phone = fake.mint_phone_code("+86 13800138000")    # a getPhoneNumber code

or, with ``sandbox=True`` (as ``gateway serve --demo`` runs it), over HTTP:
``POST /sandbox/login-code`` ``{"openid"?, "unionid"?, "appid"?}`` ->
``{"code", "appid", "openid"}``; ``POST /sandbox/encrypted-data``
``{"openid"?, "data"?, "appid"?}`` -> ``{"encryptedData", "iv"}``;
``POST /sandbox/phone-code`` ``{"phoneNumber"?, "purePhoneNumber"?,
"countryCode"?}`` -> ``{"code"}``.  Each may be sent with an empty body.

:func:`demo_sandbox` is the sandbox ``gateway serve --demo`` starts for the
configured ``[providers.wechat]`` table; ``python -m gateway.testing.wechat
--port 9100 --app APPID:SECRET`` runs one on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

import tornado.httpserver
import tornado.web
from Crypto.Cipher import AES

from gateway.demo import Sandbox

__all__ = [
    "ERRMSG", "JSCODE2SESSION", "PHONE", "STABLE_TOKEN", "Canned", "FakeWeChat", "LoginCode", "PhoneCode",
    "Request", "demo_sandbox", "encrypt_user_data", "make_app", "new_session_key", "start_fake_wechat",
]

JSCODE2SESSION = "jscode2session"
STABLE_TOKEN = "stable_token"
PHONE = "getuserphonenumber"

PATHS = {
    "/sns/jscode2session": JSCODE2SESSION,
    "/cgi-bin/stable_token": STABLE_TOKEN,
    "/wxa/business/getuserphonenumber": PHONE,
}

ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40013: "invalid appid",
    40029: "invalid code",
    40125: "invalid appsecret",
    40163: "code been used",
    40226: "high risk level user, login intercepted",
    41002: "appid missing",
    42001: "access_token expired",
    45011: "api minute-quota reach limit  mustslower  retry next minute",
}

#: the openid the sandbox's endpoints use when none is given
SANDBOX_OPENID = "o-sandbox-user"
#: the user data the sandbox encrypts when none is given (a ``wx.getUserInfo`` answer)
SANDBOX_USER_INFO: dict[str, Any] = {
    "nickName": "Sandbox User", "gender": 0, "language": "zh_CN", "city": "Guangzhou",
    "province": "Guangdong", "country": "CN", "avatarUrl": "https://example.com/avatar.png",
}


def new_session_key() -> str:
    """A fresh ``session_key``: base64 of 16 random bytes, as WeChat's are."""
    return base64.b64encode(os.urandom(16)).decode()


def encrypt_user_data(session_key: str, value: Mapping[str, Any], *, iv: str | None = None) -> dict[str, str]:
    """``value`` as WeChat sends user data: JSON, PKCS#7-padded, AES-128-CBC
    under ``session_key`` (base64), with a random ``iv`` unless given;
    ``{"encryptedData", "iv"}``, both base64.  Put the ``watermark``
    (``{"appid", "timestamp"}``) in ``value`` yourself, or use
    :meth:`FakeWeChat.encrypted_data`, which does."""
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8")
    pad = 16 - len(raw) % 16
    iv_bytes = base64.b64decode(iv) if iv is not None else os.urandom(16)
    cipher = AES.new(base64.b64decode(session_key), AES.MODE_CBC, iv_bytes)
    return {"encryptedData": base64.b64encode(cipher.encrypt(raw + bytes([pad]) * pad)).decode(),
            "iv": base64.b64encode(iv_bytes).decode()}


@dataclass
class Request:
    """One request the fake received."""

    endpoint: str
    method: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Canned:
    """A forced answer: ``status``, raw ``body``, ``content_type``, after ``delay`` seconds."""

    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain"
    delay: float = 0.0


@dataclass
class LoginCode:
    """What a ``wx.login`` code stands for: a success (``openid``,
    ``session_key``, ``unionid``) or an ``errcode``."""

    appid: str
    openid: str | None = None
    session_key: str | None = None
    unionid: str | None = None
    errcode: int | None = None
    with_errcode_zero: bool = False


@dataclass
class PhoneCode:
    """What a ``getPhoneNumber`` code stands for."""

    phone_number: str | None = None
    pure_phone_number: str | None = None
    country_code: str | None = None
    watermark_appid: str | None = None
    errcode: int | None = None


class SandboxError(ValueError):
    """A sandbox request that cannot be served (answered 400 with the message)."""


@dataclass
class FakeWeChat:
    """The fake's state: its apps, codes and tokens, and what it has seen."""

    port: int
    host: str = "127.0.0.1"
    #: serve the ``/sandbox/...`` endpoints (minting codes and samples over HTTP)
    sandbox: bool = False
    #: appid -> secret
    apps: dict[str, str] = field(default_factory=dict)
    codes: dict[str, LoginCode] = field(default_factory=dict)
    used_codes: set[str] = field(default_factory=set)
    phone_codes: dict[str, PhoneCode] = field(default_factory=dict)
    #: (appid, openid) -> the user's current session_key (of their latest minted or exchanged code)
    session_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (appid, openid) -> the unionid WeChat knows for the user
    unionids: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: endpoint -> a forced answer (stays until removed)
    canned: dict[str, Canned] = field(default_factory=dict)
    #: endpoint -> seconds to wait before a real (not canned) answer
    delays: dict[str, float] = field(default_factory=dict)
    #: expires_in of issued access tokens
    expires_in: int = 7200
    #: hand back the current token even when it was marked bad (no force_refresh)
    sticky: bool = False
    #: token -> appid
    token_app: dict[str, str] = field(default_factory=dict)
    #: appid -> the app's current token
    current_token: dict[str, str] = field(default_factory=dict)
    invalid_tokens: set[str] = field(default_factory=set)
    expired_tokens: set[str] = field(default_factory=set)
    issued: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    # -- configuration by tests ---------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to configure as ``[providers.wechat] api_base``."""
        return f"http://{self.host}:{self.port}"

    def add_app(self, appid: str, secret: str) -> None:
        self.apps[appid] = secret

    def add_code(self, code: str, *, appid: str, openid: str | None = None, session_key: str | None = None,
                 unionid: str | None = None, errcode: int | None = None, with_errcode_zero: bool = False) -> None:
        """Register a wx.login code: a success (openid, session_key, unionid) or an errcode."""
        self.codes[code] = LoginCode(appid, openid, session_key, unionid, errcode, with_errcode_zero)

    def mint_code(self, openid: str = SANDBOX_OPENID, *, appid: str | None = None, unionid: str | None = None,
                  session_key: str | None = None) -> str:
        """A fresh ``wx.login`` code for this user of ``appid`` (by default
        the one app the fake knows), handing out ``session_key`` (by default
        a new one) when exchanged.  As at WeChat, that key is the user's
        current one from now on: :meth:`encrypted_data` encrypts under it."""
        code = "sbx-" + secrets.token_urlsafe(18)
        appid = self._appid(appid)
        key = session_key or new_session_key()
        self.add_code(code, appid=appid, openid=openid, session_key=key, unionid=unionid)
        self.session_keys[(appid, openid)] = key  # wx.login replaces the key at once
        if unionid is not None:
            self.unionids[(appid, openid)] = unionid
        return code

    def add_phone_code(self, code: str, phone_number: str = "+86 13800138000", pure_phone_number: str = "13800138000",
                       country_code: str = "86", *, watermark_appid: str | None = None,
                       errcode: int | None = None) -> None:
        self.phone_codes[code] = PhoneCode(phone_number, pure_phone_number, country_code, watermark_appid, errcode)

    def mint_phone_code(self, phone_number: str = "+86 13800138000", pure_phone_number: str | None = None,
                        country_code: str = "86") -> str:
        """A fresh ``getPhoneNumber`` code for this number (``purePhoneNumber``
        defaults to ``phone_number`` without its country prefix)."""
        if pure_phone_number is None:
            pure_phone_number = phone_number.split(" ", 1)[-1] if phone_number.startswith("+") else phone_number
        code = "sbx-phone-" + secrets.token_urlsafe(12)
        self.add_phone_code(code, phone_number, pure_phone_number, country_code)
        return code

    def encrypted_data(self, openid: str = SANDBOX_OPENID, value: Mapping[str, Any] | None = None, *,
                       appid: str | None = None) -> dict[str, str]:
        """User data (``value``, by default a sample ``wx.getUserInfo``
        answer) as WeChat hands it to the mini-program: encrypted under the
        user's current session_key (see :meth:`mint_code`), with the
        ``openId`` (and ``unionId``) and the app's ``watermark`` added.
        ``{"encryptedData", "iv"}``; :class:`SandboxError` when the user has
        not logged in (no code of theirs was exchanged yet)."""
        appid = self._appid(appid)
        key = self.session_keys.get((appid, openid))
        if key is None:
            raise SandboxError(f"WeChat user {openid!r} of app {appid} has no session_key yet: "
                               "get a login code for them first")
        data: dict[str, Any] = {"openId": openid}
        if (appid, openid) in self.unionids:
            data["unionId"] = self.unionids[(appid, openid)]
        data.update(SANDBOX_USER_INFO if value is None else value)
        data["watermark"] = {"timestamp": int(time.time()), "appid": appid}
        return encrypt_user_data(key, data)

    def force(self, endpoint: str, status: int = 200, body: bytes | str = b"", *,
              content_type: str = "text/plain", delay: float = 0.0) -> None:
        self.canned[endpoint] = Canned(status, body, content_type, delay)

    def invalidate(self, token: str) -> None:
        """The token is now refused with 40001 (as when another party refreshed it)."""
        self.invalid_tokens.add(token)

    def expire(self, token: str) -> None:
        """The token is now refused with 42001."""
        self.expired_tokens.add(token)

    def seen(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.endpoint == endpoint]

    def count(self, endpoint: str) -> int:
        return len(self.seen(endpoint))

    def _appid(self, appid: str | None) -> str:
        if appid is not None:
            if appid not in self.apps:
                raise SandboxError(f"unknown appid {appid!r} (known: {', '.join(sorted(self.apps)) or 'none'})")
            return appid
        if len(self.apps) != 1:
            raise SandboxError(f"name the appid: the fake knows {len(self.apps)} apps")
        return next(iter(self.apps))

    # -- protocol -------------------------------------------------------------------

    def _bad(self, token: str) -> bool:
        return token in self.invalid_tokens or token in self.expired_tokens

    def _issue(self, appid: str) -> str:
        self.issued += 1
        token = f"tok-{self.issued}"
        self.token_app[token] = appid
        self.current_token[appid] = token
        return token

    def jscode2session(self, q: Mapping[str, str]) -> dict[str, Any]:
        appid, secret, code = q.get("appid"), q.get("secret"), q.get("js_code") or ""
        if not appid:
            return self._err(41002)
        if appid not in self.apps:
            return self._err(40013)
        if secret != self.apps[appid]:
            return self._err(40125)
        if q.get("grant_type") != "authorization_code":
            return self._err(40002)
        entry = self.codes.get(code)
        if entry is None or entry.appid != appid:
            return self._err(40029)
        if code in self.used_codes:
            return self._err(40163)
        self.used_codes.add(code)
        if entry.errcode is not None:
            return self._err(entry.errcode)
        if entry.openid is not None and entry.session_key is not None:
            self.session_keys[(appid, entry.openid)] = entry.session_key
            if entry.unionid is not None:
                self.unionids[(appid, entry.openid)] = entry.unionid
        out: dict[str, Any] = {"session_key": entry.session_key, "openid": entry.openid}
        if entry.unionid is not None:
            out["unionid"] = entry.unionid
        if entry.with_errcode_zero:
            out.update(errcode=0, errmsg="ok")
        return out

    def stable_token(self, body: Mapping[str, Any]) -> dict[str, Any]:
        appid, secret = body.get("appid"), body.get("secret")
        if body.get("grant_type") != "client_credential":
            return self._err(40002)
        if not isinstance(appid, str) or appid not in self.apps:
            return self._err(40013)
        if secret != self.apps[appid]:
            return self._err(40125)
        current = self.current_token.get(appid)
        force = body.get("force_refresh") is True
        if force or current is None or (self._bad(current) and not self.sticky):
            current = self._issue(appid)
        return {"access_token": current, "expires_in": self.expires_in}

    def phone(self, token: str, body: Any) -> dict[str, Any]:
        if token in self.expired_tokens:
            return self._err(42001)
        if token not in self.token_app or token in self.invalid_tokens:
            return self._err(40001)
        code = body.get("code") if isinstance(body, dict) else None
        entry = self.phone_codes.get(code) if isinstance(code, str) else None
        if entry is None:
            return self._err(40029)
        if entry.errcode is not None:
            return self._err(entry.errcode)
        return {
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {
                "phoneNumber": entry.phone_number,
                "purePhoneNumber": entry.pure_phone_number,
                "countryCode": entry.country_code,
                "watermark": {"timestamp": int(time.time()),
                              "appid": entry.watermark_appid or self.token_app[token]},
            },
        }

    def sandbox_call(self, action: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One ``POST /sandbox/<action>``; :class:`SandboxError` for a bad request."""
        def text(name: str, default: str | None = None) -> str | None:
            value = body.get(name, default)
            if value is not None and not (isinstance(value, str) and value):
                raise SandboxError(f"field {name} must be a non-empty string")
            return value

        if action == "login-code":
            openid = text("openid", SANDBOX_OPENID) or SANDBOX_OPENID
            appid = self._appid(text("appid"))
            return {"code": self.mint_code(openid, appid=appid, unionid=text("unionid")), "appid": appid,
                    "openid": openid}
        if action == "encrypted-data":
            data = body.get("data")
            if data is not None and not isinstance(data, dict):
                raise SandboxError("field data must be a JSON object")
            return self.encrypted_data(text("openid", SANDBOX_OPENID) or SANDBOX_OPENID, data, appid=text("appid"))
        if action == "phone-code":
            number = text("phoneNumber", "+86 13800138000") or ""
            return {"code": self.mint_phone_code(number, text("purePhoneNumber"),
                                                 text("countryCode", "86") or "86")}
        raise LookupError(action)

    @staticmethod
    def _err(code: int) -> dict[str, Any]:
        return {"errcode": code, "errmsg": f"{ERRMSG.get(code, 'error')}, rid: 6650c7d2-1a2b3c4d-5e6f7a8b"}

    async def sleep(self, seconds: float) -> None:
        """Wait, but never past the fake's shutdown."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), seconds)
            except asyncio.TimeoutError:
                pass


class FakeWeChatHandler(tornado.web.RequestHandler):
    """Serves WeChat's three endpoints (and the sandbox's) from a :class:`FakeWeChat`."""

    def initialize(self, fake: FakeWeChat) -> None:
        self.fake = fake
        self.gone = False

    def compute_etag(self) -> None:
        return None

    def on_connection_close(self) -> None:
        self.gone = True  # the gateway gave up waiting (a timeout test)

    async def _handle(self, *args: str) -> None:
        fake, r = self.fake, self.request
        if fake.sandbox and r.path.startswith("/sandbox/"):
            return self._sandbox(r.path[len("/sandbox/"):])
        endpoint = PATHS.get(r.path)
        if endpoint is None:
            self.set_status(404)
            return self._send("text/html", b"<html><body>404 Not Found</body></html>")
        query = dict(parse_qsl(r.query, keep_blank_values=True))
        fake.requests.append(Request(endpoint, r.method or "", query, dict(r.headers), r.body))
        canned = fake.canned.get(endpoint)
        if canned is not None:
            await fake.sleep(canned.delay)
            self.set_status(canned.status)
            return self._send(canned.content_type, canned.body.encode() if isinstance(canned.body, str) else canned.body)
        await fake.sleep(fake.delays.get(endpoint, 0.0))
        if endpoint == JSCODE2SESSION:
            if r.method != "GET":
                self.set_status(405)
                return self._send("text/plain", b"method not allowed")
            # the real API sends its JSON as text/plain
            return self._send("text/plain", json.dumps(fake.jscode2session(query)).encode())
        if r.method != "POST":
            self.set_status(405)
            return self._send("text/plain", b"method not allowed")
        try:
            payload = json.loads(r.body or b"null")
        except ValueError:
            payload = None
        if endpoint == STABLE_TOKEN:
            answer = fake.stable_token(payload if isinstance(payload, dict) else {})
        else:
            answer = fake.phone(query.get("access_token", ""), payload)
        return self._send("application/json; charset=UTF-8", json.dumps(answer, ensure_ascii=False).encode())

    def _sandbox(self, action: str) -> None:
        if self.request.method != "POST":
            self.set_status(405)
            return self._json({"error": "use POST"})
        try:
            payload = json.loads(self.request.body) if self.request.body.strip() else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self.set_status(400)
            return self._json({"error": "the body must be a JSON object (or empty)"})
        try:
            answer = self.fake.sandbox_call(action, payload)
        except LookupError:
            self.set_status(404)
            return self._json({"error": "no such sandbox endpoint: login-code, encrypted-data or phone-code"})
        except SandboxError as exc:
            self.set_status(400)
            return self._json({"error": str(exc)})
        self._json(answer)

    def _json(self, value: dict[str, Any]) -> None:
        self._send("application/json; charset=UTF-8", json.dumps(value, ensure_ascii=False).encode() + b"\n")

    def _send(self, content_type: str, body: bytes) -> None:
        if self.gone:
            return
        self.set_header("Content-Type", content_type)
        self.finish(body)

    get = post = _handle


def make_app(fake: FakeWeChat) -> tornado.web.Application:
    """The fake's Tornado application (no access log: its request lines
    carry the app secret and the codes)."""
    return tornado.web.Application([(r".*", FakeWeChatHandler, {"fake": fake})],
                                   log_function=lambda handler: None)


def start_fake_wechat(port: int, host: str = "127.0.0.1", *,
                      sandbox: bool = False) -> tuple[FakeWeChat, tornado.httpserver.HTTPServer]:
    """A :class:`FakeWeChat` served on ``host:port`` in the running event
    loop, and its server (``stop()`` it; set ``fake.stopping`` first to cut
    short any delayed reply)."""
    fake = FakeWeChat(port=port, host=host, sandbox=sandbox)
    server = tornado.httpserver.HTTPServer(make_app(fake))
    server.listen(port, host)
    return fake, server


# ---------------------------------------------------------------------------
# The sandbox of `gateway serve --demo`
# ---------------------------------------------------------------------------


def demo_sandbox(table: Mapping[str, Any], environ: Mapping[str, str]) -> Sandbox | None:
    """The WeChat sandbox for a ``[providers.wechat]`` configuration table:
    a :class:`FakeWeChat` with ``sandbox=True`` that knows every configured
    app (its ``secret``, or the variable its ``secret_env`` names), to serve
    where ``api_base`` points.  ``None`` when there is no app or
    ``api_base`` is not a plain ``http://`` URL of a loopback address with a
    port (a real WeChat, never replaced)."""
    base = urlsplit(str(table.get("api_base", "")))
    apps = table.get("apps") or {}
    if base.scheme != "http" or base.hostname not in ("127.0.0.1", "localhost", "::1") or not base.port:
        return None
    if base.path.strip("/") or not isinstance(apps, dict) or not apps:
        return None
    fake = FakeWeChat(port=base.port, host=base.hostname or "127.0.0.1", sandbox=True)
    for app in apps.values():
        if not isinstance(app, dict) or not isinstance(app.get("appid"), str):
            continue
        secret = app.get("secret")
        if secret is None and isinstance(app.get("secret_env"), str):
            secret = environ.get(app["secret_env"])
        if isinstance(secret, str):
            fake.add_app(app["appid"], secret)
    if not fake.apps:
        return None
    return Sandbox(fake.host, fake.port, make_app(fake),
                   f"WeChat sandbox on {fake.url} (apps {', '.join(sorted(fake.apps))}): "
                   f"POST {fake.url}/sandbox/login-code for a wx.login code")


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.testing.wechat --port P --app APPID:SECRET ...``:
    a sandbox of its own, until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.testing.wechat", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--app", action="append", required=True, metavar="APPID:SECRET",
                        help="a mini-program the sandbox knows (repeatable)")
    args = parser.parse_args(argv)

    async def run() -> None:
        fake, server = start_fake_wechat(args.port, args.host, sandbox=True)
        for app in args.app:
            appid, _, secret = app.partition(":")
            fake.add_app(appid, secret)
        print(f"WeChat sandbox on {fake.url}: POST {fake.url}/sandbox/login-code for a wx.login code", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            server.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
