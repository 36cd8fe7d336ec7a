"""A fake WeChat API server: a real Tornado HTTP server on loopback that
speaks the documented protocol of the three endpoints the WeChat
mini-program provider calls.

- ``GET /sns/jscode2session?appid=&secret=&js_code=&grant_type=authorization_code``
  answers JSON sent as ``text/plain`` (as the real API does):
  ``{"openid", "session_key", "unionid"?}`` or ``{"errcode", "errmsg"}``.
  Codes are registered by the test and are single-use (40163 the second
  time); an unknown code is 40029; a wrong secret is 40125; an unknown
  appid is 40013.
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
  expired one; else ``phone_info`` for a registered phone code (watermark
  appid of the token's app unless overridden), 40029 for an unknown code.

Every request is recorded (``requests`` / ``seen(endpoint)``); a test can
force a canned answer per endpoint (any status/body, optionally after a
delay) or delay the real answers.  The fake never logs a request line: its
query strings carry secrets, and the tests check that no log line does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import tornado.httpserver
import tornado.web

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
    appid: str
    openid: str | None = None
    session_key: str | None = None
    unionid: str | None = None
    errcode: int | None = None
    with_errcode_zero: bool = False


@dataclass
class PhoneCode:
    phone_number: str | None = None
    pure_phone_number: str | None = None
    country_code: str | None = None
    watermark_appid: str | None = None
    errcode: int | None = None


@dataclass
class FakeWeChat:
    port: int
    #: appid -> secret
    apps: dict[str, str] = field(default_factory=dict)
    codes: dict[str, LoginCode] = field(default_factory=dict)
    used_codes: set[str] = field(default_factory=set)
    phone_codes: dict[str, PhoneCode] = field(default_factory=dict)
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
        return f"http://127.0.0.1:{self.port}"

    def add_app(self, appid: str, secret: str) -> None:
        self.apps[appid] = secret

    def add_code(self, code: str, *, appid: str, openid: str | None = None, session_key: str | None = None,
                 unionid: str | None = None, errcode: int | None = None, with_errcode_zero: bool = False) -> None:
        """Register a wx.login code: a success (openid, session_key, unionid) or an errcode."""
        self.codes[code] = LoginCode(appid, openid, session_key, unionid, errcode, with_errcode_zero)

    def add_phone_code(self, code: str, phone_number: str = "+86 13800138000", pure_phone_number: str = "13800138000",
                       country_code: str = "86", *, watermark_appid: str | None = None,
                       errcode: int | None = None) -> None:
        self.phone_codes[code] = PhoneCode(phone_number, pure_phone_number, country_code, watermark_appid, errcode)

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

    # -- protocol -------------------------------------------------------------------

    def _bad(self, token: str) -> bool:
        return token in self.invalid_tokens or token in self.expired_tokens

    def _issue(self, appid: str) -> str:
        self.issued += 1
        token = f"tok-{self.issued}"
        self.token_app[token] = appid
        self.current_token[appid] = token
        return token

    def jscode2session(self, q: dict[str, str]) -> dict[str, Any]:
        appid, secret, code = q.get("appid"), q.get("secret"), q.get("js_code")
        if not appid:
            return self._err(41002)
        if appid not in self.apps:
            return self._err(40013)
        if secret != self.apps[appid]:
            return self._err(40125)
        if q.get("grant_type") != "authorization_code":
            return self._err(40002)
        entry = self.codes.get(code or "")
        if entry is None or entry.appid != appid:
            return self._err(40029)
        if code in self.used_codes:
            return self._err(40163)
        self.used_codes.add(code)  # type: ignore[arg-type]
        if entry.errcode is not None:
            return self._err(entry.errcode)
        out: dict[str, Any] = {"session_key": entry.session_key, "openid": entry.openid}
        if entry.unionid is not None:
            out["unionid"] = entry.unionid
        if entry.with_errcode_zero:
            out.update(errcode=0, errmsg="ok")
        return out

    def stable_token(self, body: dict[str, Any]) -> dict[str, Any]:
        appid, secret = body.get("appid"), body.get("secret")
        if body.get("grant_type") != "client_credential":
            return self._err(40002)
        if appid not in self.apps:
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
    def initialize(self, fake: FakeWeChat) -> None:
        self.fake = fake

    def compute_etag(self) -> None:
        return None

    async def _handle(self) -> None:
        fake, r = self.fake, self.request
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
            body = canned.body.encode() if isinstance(canned.body, str) else canned.body
            return self._send(canned.content_type, body)
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

    def _send(self, content_type: str, body: bytes) -> None:
        if self.request.connection is None or self.request.connection.stream is None:
            return
        if getattr(self.request.connection.stream, "closed", lambda: False)():
            return  # the gateway gave up waiting (a timeout test)
        self.set_header("Content-Type", content_type)
        self.finish(body)

    get = post = _handle


def start_fake_wechat(port: int) -> tuple[FakeWeChat, tornado.httpserver.HTTPServer]:
    fake = FakeWeChat(port=port)
    # no access log: the fake's request lines carry the app secret and the codes
    app = tornado.web.Application([(r".*", FakeWeChatHandler, {"fake": fake})], log_function=lambda handler: None)
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    return fake, server
