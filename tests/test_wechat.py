"""The WeChat mini-program provider (plugins/wechat.py), end to end.

Every test drives a real gateway over HTTP; the gateway talks to a fake
WeChat server (gateway.testing.wechat), a real Tornado server on loopback
that speaks WeChat's documented protocol: ``jscode2session`` (JSON sent as
text/plain, single-use codes), ``stable_token`` (tokens tok-1, tok-2, ...)
and ``getuserphonenumber``.  Failure cases (errcodes, non-JSON replies,
HTTP 5xx, timeouts, refused connections, rejected tokens) come from the
fake, never from patching the provider.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
from Crypto.Cipher import AES

from gateway.app import Gateway
from gateway.config import ConfigError, load_config
from gateway.testing import assert_error, base_config, body, free_port
from gateway.testing.wechat import JSCODE2SESSION, PHONE, STABLE_TOKEN, encrypt_user_data, start_fake_wechat

ROOT = Path(__file__).resolve().parent.parent

gen = pytest.mark.gen_test(timeout=30)

MAIN_APPID = "wx4f4bc4dec97d474b"
MAIN_SECRET = "s3cret-main"
OTHER_APPID = "wx0a1b2c3d4e5f6a7b"
OTHER_SECRET = "s3cret-other"
ENCRYPTION_KEY = base64.b64encode(b"k" * 32).decode()
LOGIN = "/auth/wechat/login"
DECRYPT = "/auth/wechat/decrypt"
PHONE_PATH = "/auth/wechat/phone"
TOKEN_RE = re.compile(r"^gws_[A-Za-z0-9_\-]{43,}$")
ALLOWED_PROFILE_FIELDS = ("nickName", "avatarUrl", "gender", "language", "city", "province", "country",
                          "phoneNumber", "purePhoneNumber", "countryCode")

# WeChat's official sample (WXBizDataCrypt demo).
SAMPLE_SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
SAMPLE_IV = "r7BXXKkLb8qrSNn05n0qiA=="
SAMPLE_ENCRYPTED = (
    "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz"
    "6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpX"
    "fz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5E"
    "f7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85"
    "IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew=="
)
SAMPLE_PLAINTEXT = {
    "openId": "oGZUI0egBJY1zhBYw2KhdUfwVJJE",
    "nickName": "Band",
    "gender": 1,
    "language": "zh_CN",
    "city": "Guangzhou",
    "province": "Guangdong",
    "country": "CN",
    "avatarUrl": "http://wx.qlogo.cn/mmopen/vi_32/aSKcBBPpibyKNicHNTMM0qJVh8Kjgiak2AHWr8MHM4WgMEm7GFhsf8OYrySdbvAMvTsw3mo8ibKicsnfN5pRjl1p8HQ/0",
    "unionId": "ocMvos6NjeKLIBqg5Mr9QjxrP1FA",
    "watermark": {"timestamp": 1477314187, "appid": "wx4f4bc4dec97d474b"},
}

_codes = itertools.count(1)


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def fake(io_loop):
    """The fake WeChat API, knowing the two test mini-programs."""
    fake, server = start_fake_wechat(free_port())
    fake.add_app(MAIN_APPID, MAIN_SECRET)
    fake.add_app(OTHER_APPID, OTHER_SECRET)
    yield fake
    fake.stopping.set()  # cut short any reply the fake is still delaying
    server.stop()
    io_loop.run_sync(server.close_all_connections)


MAIN_APP = {"main": {"appid": MAIN_APPID, "secret": MAIN_SECRET}}
TWO_APPS = {**MAIN_APP, "other": {"appid": OTHER_APPID, "secret": OTHER_SECRET}}


def wechat_config(upstream_url: str, tmp_path, api_base: str, *, apps: dict | None = None,
                  sessions: dict | None = None, **options: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"api_base": api_base, "timeout": "2s"}
    if apps is not False:
        section["apps"] = apps if apps is not None else MAIN_APP
    section.update(options)
    return base_config(upstream_url, tmp_path, providers={"wechat": section}, sessions=sessions or {})


@pytest.fixture
def start(make_gateway, upstream, tmp_path, fake):
    """``await start(apps=..., sessions=..., **wechat_options)`` -> a running gateway using the fake."""

    async def _start(*, api_base: str | None = None, environ: dict[str, str] | None = None, **kw: Any):
        cfg = wechat_config(upstream.url, tmp_path, api_base or fake.url, **kw)
        return await make_gateway(cfg, environ=environ)

    return _start


def redis_sessions(redis_url: str) -> dict[str, Any]:
    return {"store": "redis", "redis_url": redis_url, "encryption_key": ENCRYPTION_KEY}


def new_session_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def new_code() -> str:
    return f"wxcode-{next(_codes)}-{os.urandom(6).hex()}"


async def login_raw(gw, fake, *, appid: str = MAIN_APPID, openid: str = "o-alice", session_key: str | None = None,
                    unionid: str | None = None, app: str | None = None):
    """Register a fresh code with the fake and log in with it; the raw response."""
    code = new_code()
    fake.add_code(code, appid=appid, openid=openid, session_key=session_key or new_session_key(), unionid=unionid)
    payload: dict[str, Any] = {"code": code}
    if app is not None:
        payload["app"] = app
    return await gw.client.request("POST", LOGIN, json_body=payload)


async def login(gw, fake, **kw: Any) -> dict[str, Any]:
    r = await login_raw(gw, fake, **kw)
    assert r.code == 200, (r.code, r.body)
    return body(r)


def pkcs7(data: bytes) -> bytes:
    n = 16 - len(data) % 16
    return data + bytes([n]) * n


def encrypt(session_key_b64: str, iv_b64: str, raw: bytes) -> str:
    """AES-128-CBC of ``raw`` (already padded) -> base64, as WeChat sends it."""
    cipher = AES.new(base64.b64decode(session_key_b64), AES.MODE_CBC, base64.b64decode(iv_b64))
    return base64.b64encode(cipher.encrypt(raw)).decode()


def user_data(appid: str | None = MAIN_APPID, **fields: Any) -> bytes:
    obj = dict(fields)
    if appid is not None:
        obj["watermark"] = {"timestamp": 1700000000, "appid": appid}
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def new_iv() -> str:
    return base64.b64encode(os.urandom(16)).decode()


async def decrypt(gw, token: str, session_key: str, plaintext: bytes, *, pad: bool = True):
    iv = new_iv()
    data = encrypt(session_key, iv, pkcs7(plaintext) if pad else plaintext)
    return await gw.client.request("POST", DECRYPT, json_body={"encryptedData": data, "iv": iv}, token=token)


async def profile_of(gw, token: str) -> dict[str, Any]:
    r = await gw.client.request("GET", "/auth/session", token=token)
    assert r.code == 200, r.body
    return body(r)["user"]["profile"]


def all_text(r) -> str:
    return r.body.decode("utf-8", "replace") + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.get_all())


def log_text(caplog) -> str:
    return caplog.text + "\n" + "\n".join(rec.getMessage() for rec in caplog.records)


def assert_stale(r) -> None:
    """401 invalid_credentials, reason session_key_stale, asking for a new wx.login code."""
    assert r.code == 401, (r.code, r.body)
    data = body(r)
    assert set(data) == {"error", "message", "reason"}, data
    assert data["error"] == "invalid_credentials" and data["reason"] == "session_key_stale", data
    assert "wx.login" in data["message"] and '"code"' in data["message"], data
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), dict(r.headers)


# ---------------------------------------------------------------------------
# login: success, identity, users
# ---------------------------------------------------------------------------


@gen
async def test_login_answers_the_standard_login_body_and_calls_jscode2session_once(start, fake):
    gw = await start()
    session_key = new_session_key()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=session_key)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert r.code == 200, r.body
    data = body(r)
    assert TOKEN_RE.match(data["token"]), data["token"]
    assert data["token_type"] == "Bearer"
    assert data["expires_at"] == data["session"]["expires_at"]
    assert set(data["session"]) >= {"id", "provider", "created_at", "expires_at", "absolute_expires_at"}
    assert data["session"]["provider"] == "wechat"
    assert set(data["user"]) == {"id", "profile"} and data["user"]["id"]
    # the session_key never leaves the gateway
    assert session_key not in all_text(r)

    seen = fake.seen(JSCODE2SESSION)
    assert len(seen) == 1
    assert seen[0].method == "GET"
    assert seen[0].query == {"appid": MAIN_APPID, "secret": MAIN_SECRET, "js_code": code,
                             "grant_type": "authorization_code"}

    r = await gw.client.request("GET", "/auth/session", token=data["token"])
    assert r.code == 200
    assert body(r)["session"]["provider"] == "wechat"
    assert body(r)["user"]["id"] == data["user"]["id"]
    assert session_key not in all_text(r)
    r = await gw.client.request("GET", "/auth/sessions", token=data["token"])
    assert r.code == 200 and session_key not in all_text(r)


@gen
async def test_a_reply_with_errcode_zero_is_a_success(start, fake):
    gw = await start()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-zero", session_key=new_session_key(), with_errcode_zero=True)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert r.code == 200, r.body


@gen
async def test_same_openid_is_the_same_user_and_another_openid_is_not(start, fake):
    gw = await start()
    first = await login(gw, fake, openid="o-alice")
    again = await login(gw, fake, openid="o-alice")
    other = await login(gw, fake, openid="o-bob")
    assert again["user"]["id"] == first["user"]["id"]
    assert again["token"] != first["token"]
    assert other["user"]["id"] != first["user"]["id"]


@gen
async def test_unionid_links_one_user_across_two_apps(start, fake):
    gw = await start(apps=TWO_APPS)
    a = await login(gw, fake, app="main", appid=MAIN_APPID, openid="o-main-alice", unionid="u-alice")
    b = await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-other-alice", unionid="u-alice")
    assert a["user"]["id"] == b["user"]["id"]
    # the identities the spec names: ("wechat", "<appid>:<openid>") per app, ("wechat-unionid", unionid)
    profiles = gw.gateway.profiles
    for provider, subject in (("wechat", f"{MAIN_APPID}:o-main-alice"), ("wechat", f"{OTHER_APPID}:o-other-alice"),
                              ("wechat-unionid", "u-alice")):
        identity = await profiles.get_identity(provider, subject)
        assert identity is not None and identity.user_id == a["user"]["id"], (provider, subject, identity)
    # without a shared unionid, another app's user is another user
    c = await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-other-carol")
    assert c["user"]["id"] != a["user"]["id"]
    # and the same openid under two apps is not the same user either (the subject is appid:openid)
    d = await login(gw, fake, app="main", appid=MAIN_APPID, openid="o-shared")
    e = await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-shared")
    assert d["user"]["id"] != e["user"]["id"]


# ---------------------------------------------------------------------------
# login: request validation and apps
# ---------------------------------------------------------------------------


@gen
@pytest.mark.parametrize("payload", [{}, {"code": ""}, {"code": 123}, {"code": None}, {"code": ["x"]}])
async def test_missing_empty_or_non_string_code_is_400_naming_code(start, fake, payload):
    gw = await start()
    r = await gw.client.request("POST", LOGIN, json_body=payload)
    assert_error(r, 400, "invalid_request", contains="code")
    assert fake.count(JSCODE2SESSION) == 0


@gen
async def test_several_apps_need_the_app_field(start, fake):
    gw = await start(apps=TWO_APPS)
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, 400, "invalid_request", contains="app")
    r = await gw.client.request("POST", LOGIN, json_body={"code": code, "app": "nope"})
    assert_error(r, 400, "invalid_request")
    assert fake.count(JSCODE2SESSION) == 0

    r = await gw.client.request("POST", LOGIN, json_body={"code": code, "app": "main"})
    assert r.code == 200, r.body
    code2 = new_code()
    fake.add_code(code2, appid=OTHER_APPID, openid="o-alice", session_key=new_session_key())
    r = await gw.client.request("POST", LOGIN, json_body={"code": code2, "app": "other"})
    assert r.code == 200, r.body
    seen = fake.seen(JSCODE2SESSION)
    assert [(s.query["appid"], s.query["secret"]) for s in seen] == [(MAIN_APPID, MAIN_SECRET),
                                                                      (OTHER_APPID, OTHER_SECRET)]


@gen
async def test_one_app_is_the_default_and_an_unknown_app_is_400(start, fake):
    gw = await start()
    assert (await login_raw(gw, fake)).code == 200
    assert (await login_raw(gw, fake, app="main")).code == 200
    r = await login_raw(gw, fake, app="nope")
    assert_error(r, 400, "invalid_request")
    assert fake.count(JSCODE2SESSION) == 2


@gen
async def test_secret_may_come_from_the_environment(start, fake):
    gw = await start(apps={"main": {"appid": MAIN_APPID, "secret_env": "WX_MAIN_SECRET"}},
                     environ={"WX_MAIN_SECRET": MAIN_SECRET})
    await login(gw, fake)
    assert fake.seen(JSCODE2SESSION)[0].query["secret"] == MAIN_SECRET


@gen
async def test_without_apps_the_provider_is_off_and_its_endpoints_are_json_404(start, fake):
    gw = await start(apps=False)
    for path in (LOGIN, DECRYPT, PHONE_PATH):
        r = await gw.client.request("POST", path, json_body={"code": "x"})
        assert_error(r, 404, "not_found")
    assert fake.requests == []


# ---------------------------------------------------------------------------
# login: every failure WeChat can answer, and the code is never retried
# ---------------------------------------------------------------------------


@gen
@pytest.mark.parametrize("errcode,status,error", [
    (40029, 401, "invalid_credentials"),
    (45011, 429, "rate_limited"),
    (40226, 403, "forbidden"),
    (-1, 503, "unavailable"),
    (40013, 502, "bad_gateway"),
    (61024, 502, "bad_gateway"),
])
async def test_login_errcodes_map_to_gateway_errors(start, fake, errcode, status, error):
    gw = await start()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, errcode=errcode)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, status, error)
    assert fake.count(JSCODE2SESSION) == 1  # never retried
    assert code not in all_text(r) and MAIN_SECRET not in all_text(r)
    if status == 429:
        assert r.headers.get("Retry-After"), "the README's contract: 429 carries Retry-After"


@gen
async def test_unknown_code_is_401_invalid_credentials(start, fake):
    gw = await start()
    r = await gw.client.request("POST", LOGIN, json_body={"code": "never-issued"})
    assert_error(r, 401, "invalid_credentials")
    assert fake.count(JSCODE2SESSION) == 1


@gen
async def test_a_used_code_is_401_invalid_credentials(start, fake):
    gw = await start()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    assert (await gw.client.request("POST", LOGIN, json_body={"code": code})).code == 200
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, 401, "invalid_credentials")
    assert fake.count(JSCODE2SESSION) == 2


@gen
async def test_a_wrong_secret_is_502_and_never_shown(start, fake):
    gw = await start(apps={"main": {"appid": MAIN_APPID, "secret": "wr0ng-s3cret-xyzzy"}})
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, 502, "bad_gateway")
    assert "wr0ng-s3cret-xyzzy" not in all_text(r) and code not in all_text(r)
    assert fake.count(JSCODE2SESSION) == 1


@gen
@pytest.mark.parametrize("canned", [
    {"status": 200, "body": "<html><body>Welcome to nginx</body></html>", "content_type": "text/html"},
    {"status": 200, "body": "", "content_type": "text/plain"},
    {"status": 200, "body": "[1, 2, 3]", "content_type": "text/plain"},
    {"status": 200, "body": '{"openid": "o-1"', "content_type": "text/plain"},
    {"status": 500, "body": "Internal Server Error", "content_type": "text/plain"},
    {"status": 502, "body": "<html>502 Bad Gateway</html>", "content_type": "text/html"},
    {"status": 503, "body": '{"errcode": 0, "openid": "o-1", "session_key": "tiihtNczf5v6AKRyjwEUhQ=="}',
     "content_type": "text/plain"},
], ids=["html", "empty", "json-array", "truncated-json", "http-500", "http-502", "http-503-with-json"])
async def test_a_reply_that_is_not_a_wechat_answer_is_502_and_not_retried(start, fake, canned):
    gw = await start()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    fake.force(JSCODE2SESSION, **canned)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, 502, "bad_gateway")
    assert fake.count(JSCODE2SESSION) == 1


@gen
async def test_a_reply_missing_openid_or_session_key_is_502(start, fake):
    gw = await start()
    fake.force(JSCODE2SESSION, body=json.dumps({"openid": "o-1"}))
    r = await gw.client.request("POST", LOGIN, json_body={"code": new_code()})
    assert_error(r, 502, "bad_gateway")


@gen
async def test_a_wechat_slower_than_the_timeout_is_502_and_not_retried(start, fake):
    gw = await start(timeout="0.3s")
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    ok = json.dumps({"openid": "o-alice", "session_key": new_session_key()})
    fake.force(JSCODE2SESSION, body=ok, delay=5)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert_error(r, 502, "bad_gateway")
    assert fake.count(JSCODE2SESSION) == 1


@gen
async def test_a_refused_connection_is_502(start, fake):
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await start(api_base=closed)
    r = await gw.client.request("POST", LOGIN, json_body={"code": new_code()})
    assert_error(r, 502, "bad_gateway")


# ---------------------------------------------------------------------------
# secrets: never in logs or error messages
# ---------------------------------------------------------------------------

LOG_SECRET = "s3cret-for-the-log-test-Zq9"


@gen
@pytest.mark.parametrize("scenario", ["success", "40029", "-1", "html-echoing-the-url", "http-500", "timeout",
                                      "refused"])
async def test_neither_secret_nor_code_is_logged_or_shown(start, fake, caplog, scenario):
    caplog.set_level(logging.DEBUG)  # before the gateway (and its HTTP clients) exist
    fake.add_app(MAIN_APPID, LOG_SECRET)
    api_base = f"http://127.0.0.1:{free_port()}" if scenario == "refused" else fake.url
    gw = await start(apps={"main": {"appid": MAIN_APPID, "secret": LOG_SECRET}}, api_base=api_base,
                     timeout="0.3s" if scenario == "timeout" else "2s")
    code = "the-code-" + os.urandom(8).hex()
    session_key = new_session_key()
    if scenario == "40029":
        pass  # the fake never issued this code
    elif scenario == "-1":
        fake.add_code(code, appid=MAIN_APPID, errcode=-1)
    else:
        fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=session_key)
    if scenario == "html-echoing-the-url":
        # a misconfigured proxy in front of WeChat that echoes the request line
        fake.force(JSCODE2SESSION, status=404, content_type="text/html",
                   body=f"<html>no route for GET /sns/jscode2session?appid={MAIN_APPID}&secret={LOG_SECRET}"
                        f"&js_code={code}&grant_type=authorization_code</html>")
    elif scenario == "http-500":
        fake.force(JSCODE2SESSION, status=500, body="Internal Server Error")
    elif scenario == "timeout":
        fake.force(JSCODE2SESSION, body=json.dumps({"openid": "o", "session_key": session_key}), delay=5)
    r = await gw.client.request("POST", LOGIN, json_body={"code": code})
    assert (r.code == 200) == (scenario == "success"), (r.code, r.body)
    text = log_text(caplog)
    assert "/auth/wechat/login" in text  # the logs did capture the request
    for secret in (LOG_SECRET, code, session_key):
        assert secret not in text, f"{secret!r} was logged"
        assert secret not in all_text(r), f"{secret!r} was in the response"


# ---------------------------------------------------------------------------
# session_key: stored sealed; encryption_key configuration
# ---------------------------------------------------------------------------


async def redis_dump(redis_url: str) -> list[bytes]:
    """Every key and every value in the test Redis, as bytes."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    out: list[bytes] = []
    try:
        async for key in client.scan_iter(count=1000):
            out.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                out.append(await client.get(key) or b"")
            elif kind == "hash":
                for k, v in (await client.hgetall(key)).items():
                    out += [k, v]
            elif kind == "zset":
                out += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
            elif kind == "set":
                out += list(await client.smembers(key))
            elif kind == "list":
                out += await client.lrange(key, 0, -1)
            else:
                raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
    finally:
        await client.aclose()
    return out


@gen
async def test_session_key_is_not_readable_in_redis_and_never_in_a_response(start, fake, redis_url):
    gw = await start(sessions=redis_sessions(redis_url))
    session_key = new_session_key()
    data = await login(gw, fake, openid="o-redis", session_key=session_key)
    token = data["token"]
    # the sealed key works: decrypting with it succeeds
    r = await decrypt(gw, token, session_key, user_data(nickName="Redis"))
    assert r.code == 200, r.body
    assert session_key not in all_text(r)
    fake.add_phone_code("pc-redis")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-redis"}, token=token)
    assert r.code == 200, r.body
    assert session_key not in all_text(r)
    for path in ("/auth/session", "/auth/sessions"):
        r = await gw.client.request("GET", path, token=token)
        assert r.code == 200 and session_key not in all_text(r)
    r = await gw.client.request("POST", "/auth/refresh", token=token)
    assert r.code == 200 and session_key not in all_text(r)

    dump = await redis_dump(redis_url)
    assert any(b"wechat" in v for v in dump), "the wechat session should be in Redis"
    raw_key = base64.b64decode(session_key)
    for value in dump:
        assert session_key.encode() not in value
        assert base64.urlsafe_b64encode(raw_key) not in value
        assert session_key.rstrip("=").encode() not in value
        assert raw_key not in value
        assert raw_key.hex().encode() not in value
        assert b"tok-1" not in value  # the app's access token is kept sealed too


def redis_wechat_config(upstream_url: str, tmp_path, redis_url: str, api_base: str, **sessions: Any) -> dict:
    return wechat_config(upstream_url, tmp_path, api_base,
                         sessions={"store": "redis", "redis_url": redis_url, **sessions})


def test_redis_store_without_encryption_key_is_a_config_error_at_build_time(upstream, tmp_path, redis_url, fake):
    cfg = load_config(data=redis_wechat_config(upstream.url, tmp_path, redis_url, fake.url), environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(cfg)
    assert any("sessions.encryption_key" in p for p in info.value.problems), info.value.problems


def test_redis_store_with_encryption_key_or_without_wechat_apps_builds(upstream, tmp_path, redis_url, fake):
    cfg = load_config(data=redis_wechat_config(upstream.url, tmp_path, redis_url, fake.url,
                                               encryption_key=ENCRYPTION_KEY), environ={})
    assert "wechat" in Gateway(cfg).providers
    # a disabled WeChat provider keeps no session_key, so it needs no key
    data = redis_wechat_config(upstream.url, tmp_path, redis_url, fake.url)
    del data["providers"]["wechat"]["apps"]
    assert "wechat" not in Gateway(load_config(data=data, environ={})).providers


def test_check_config_exits_2_naming_the_missing_encryption_key(tmp_path):
    path = tmp_path / "wechat.toml"
    path.write_text(f"""
[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:6399/0"

[profiles]
sqlite_path = "{tmp_path / 'profiles.db'}"

[providers.wechat]
api_base = "http://127.0.0.1:9"

[providers.wechat.apps.main]
appid = "{MAIN_APPID}"
secret = "{LOG_SECRET}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GW_")}
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "gateway"), "check-config", "--config", str(path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "sessions.encryption_key" in p.stderr, p.stderr
    assert LOG_SECRET not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


@gen
async def test_memory_store_without_key_works_and_warns(start, fake, caplog):
    caplog.set_level(logging.WARNING)
    gw = await start()
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert any("encryption_key" in w for w in warnings), warnings
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    r = await decrypt(gw, data["token"], session_key, user_data(nickName="Mem"))
    assert r.code == 200, r.body


# ---------------------------------------------------------------------------
# decrypt
# ---------------------------------------------------------------------------


def test_decrypt_user_data_returns_the_official_sample_object_with_its_watermark():
    from gateway_plugins.wechat import decrypt_user_data

    assert decrypt_user_data(SAMPLE_SESSION_KEY, SAMPLE_IV, SAMPLE_ENCRYPTED) == SAMPLE_PLAINTEXT


@pytest.mark.parametrize("case", ["tampered", "truncated", "empty", "bad-base64", "short-iv", "bad-key"])
def test_decrypt_user_data_raises_invalid_request(case):
    from gateway.errors import GatewayError
    from gateway_plugins.wechat import decrypt_user_data

    raw = bytearray(base64.b64decode(SAMPLE_ENCRYPTED))
    key, iv, data = SAMPLE_SESSION_KEY, SAMPLE_IV, SAMPLE_ENCRYPTED
    if case == "tampered":
        raw[-17] ^= 0x01  # the last plaintext byte (padding 0x07) becomes 0x06
        data = base64.b64encode(bytes(raw)).decode()
    elif case == "truncated":
        data = base64.b64encode(bytes(raw[:-5])).decode()
    elif case == "empty":
        data = ""
    elif case == "bad-base64":
        data = "this is *not* base64!"
    elif case == "short-iv":
        iv = base64.b64encode(b"12345678").decode()
    elif case == "bad-key":
        key = "not base64 at all"
    with pytest.raises(GatewayError) as info:
        decrypt_user_data(key, iv, data)
    assert info.value.code == "invalid_request"


@gen
async def test_decrypt_official_sample_returns_the_object_without_watermark_and_saves_the_profile(start, fake):
    gw = await start()
    data = await login(gw, fake, openid=SAMPLE_PLAINTEXT["openId"], session_key=SAMPLE_SESSION_KEY)
    r = await gw.client.request("POST", DECRYPT, json_body={"encryptedData": SAMPLE_ENCRYPTED, "iv": SAMPLE_IV},
                                token=data["token"])
    assert r.code == 200, r.body
    expected = {k: v for k, v in SAMPLE_PLAINTEXT.items() if k != "watermark"}
    assert body(r) == expected
    profile = await profile_of(gw, data["token"])
    for k in ("nickName", "gender", "city", "province", "country", "avatarUrl"):
        assert profile[k] == SAMPLE_PLAINTEXT[k], (k, profile)
    assert profile["language"] == SAMPLE_PLAINTEXT["language"].replace("_", "-")  # a BCP 47 tag, as PATCH /profile wants
    for k in ("openId", "unionId", "watermark"):
        assert k not in profile, profile


@gen
async def test_decrypt_saves_only_allowed_fields_and_unicode_survives(start, fake):
    gw = await start()
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    fields = {
        "nickName": "🐼 小熊 Ünïcødé 𝄞", "avatarUrl": "https://thirdwx.qlogo.cn/mmopen/vi_32/x/132", "gender": 2,
        "language": "zh_CN", "city": "广州 🌏", "province": "广东", "country": "中国",
        "phoneNumber": "+86 13900139000", "purePhoneNumber": "13900139000", "countryCode": "86",
        "openId": "o-should-not-be-saved", "unionId": "u-should-not-be-saved", "isAdmin": True,
    }
    r = await decrypt(gw, data["token"], session_key, user_data(**fields))
    assert r.code == 200, r.body
    assert body(r) == fields
    profile = await profile_of(gw, data["token"])
    for k in ALLOWED_PROFILE_FIELDS:
        assert profile.get(k) == (fields[k] if k != "language" else "zh-CN"), (k, profile)
    for k in ("openId", "unionId", "isAdmin", "watermark"):
        assert k not in profile, profile


def _bad_vectors(session_key: str) -> dict[str, tuple[dict[str, Any], str | None]]:
    """name -> (request body, a word the 400 message should contain, or None)."""
    iv = new_iv()
    good = user_data(nickName="x")
    ct = base64.b64decode(encrypt(session_key, iv, pkcs7(good)))
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    tampered = bytearray(ct)
    tampered[-17] ^= 0x01  # flips the last padding byte: 0x.. -> not a valid PKCS#7 tail
    return {
        "tampered": ({"encryptedData": b64(bytes(tampered)), "iv": iv}, None),
        "truncated": ({"encryptedData": b64(ct[:-5]), "iv": iv}, None),
        "last-block-dropped": ({"encryptedData": b64(ct[:-16]), "iv": iv}, None),
        "empty-ciphertext": ({"encryptedData": "", "iv": iv}, None),
        "bad-base64-data": ({"encryptedData": "%%%not-base64%%%", "iv": iv}, "encryptedData"),
        "bad-base64-iv": ({"encryptedData": b64(ct), "iv": "%%%not-base64%%%"}, "iv"),
        "iv-8-bytes": ({"encryptedData": b64(ct), "iv": b64(os.urandom(8))}, "iv"),
        "iv-32-bytes": ({"encryptedData": b64(ct), "iv": b64(os.urandom(32))}, "iv"),
        "padding-zero": ({"encryptedData": encrypt(session_key, iv, good + b" " * (16 - len(good) % 16 - 1) + b"\x00"),
                          "iv": iv}, None),
        "padding-17": ({"encryptedData": encrypt(session_key, iv, pkcs7(good)[:-1] + b"\x11"), "iv": iv}, None),
        "padding-inconsistent": ({"encryptedData": encrypt(session_key, iv, _inconsistent_padding(good)), "iv": iv},
                                 None),
        "missing-encryptedData": ({"iv": iv}, "encryptedData"),
        "missing-iv": ({"encryptedData": b64(ct)}, "iv"),
        "non-string-iv": ({"encryptedData": b64(ct), "iv": 16}, "iv"),
    }


def _inconsistent_padding(plaintext: bytes) -> bytes:
    """Valid JSON (trailing spaces) whose padding says n but whose byte before the
    last is not n: a lenient unpadder that just cuts n bytes would accept it."""
    padded = bytearray(pkcs7(plaintext + b" "))
    if padded[-1] < 2:
        padded = bytearray(pkcs7(plaintext + b"  "))
    n = padded[-1]
    assert n >= 2
    padded[-2] = n + 1
    return bytes(padded)


BAD_VECTOR_NAMES = list(_bad_vectors(base64.b64encode(b"0" * 16).decode()))


@gen
@pytest.mark.parametrize("name", BAD_VECTOR_NAMES)
async def test_decrypt_refuses_malformed_input_with_400(start, fake, name):
    gw = await start()
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    payload, word = _bad_vectors(session_key)[name]
    r = await gw.client.request("POST", DECRYPT, json_body=payload, token=data["token"])
    err = assert_error(r, 400, "invalid_request", contains=word)
    assert session_key not in err["message"]
    assert "nickName" not in await profile_of(gw, data["token"])


@gen
@pytest.mark.parametrize("plaintext,word", [
    (b"\xff\xfe{\"nickName\": \"x\"}", None),                                   # not UTF-8
    (b"hello, not json", None),                                                  # not JSON
    (b"[1, 2, 3]", None),                                                        # JSON, not an object
    (b"\"a string\"", None),                                                     # JSON, not an object
    (json.dumps({"nickName": "x"}).encode(), "watermark"),                       # no watermark
    (json.dumps({"nickName": "x", "watermark": "wx4f4bc4dec97d474b"}).encode(), "watermark"),
    (json.dumps({"nickName": "x", "watermark": {"timestamp": 1}}).encode(), ("watermark", "appid")),
    (user_data(appid=OTHER_APPID, nickName="x"), ("watermark", "appid")),        # another app's data
], ids=["not-utf8", "not-json", "json-array", "json-string", "no-watermark", "watermark-not-object",
        "watermark-without-appid", "wrong-watermark-appid"])
async def test_decrypt_refuses_bad_plaintext_with_400(start, fake, plaintext, word):
    gw = await start()
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    r = await decrypt(gw, data["token"], session_key, plaintext)
    assert_error(r, 400, "invalid_request", contains=word)
    assert "nickName" not in await profile_of(gw, data["token"])


@gen
async def test_decrypt_checks_the_watermark_against_the_sessions_own_app(start, fake):
    gw = await start(apps=TWO_APPS)
    session_key = new_session_key()
    data = await login(gw, fake, app="other", appid=OTHER_APPID, session_key=session_key)
    r = await decrypt(gw, data["token"], session_key, user_data(appid=MAIN_APPID, nickName="x"))
    assert_error(r, 400, "invalid_request")
    r = await decrypt(gw, data["token"], session_key, user_data(appid=OTHER_APPID, nickName="x"))
    assert r.code == 200, r.body


@gen
async def test_decrypt_with_a_session_key_replaced_by_a_later_login_is_401_session_key_stale(start, fake):
    gw = await start(apps=TWO_APPS)
    k1, k2 = new_session_key(), new_session_key()
    first = await login(gw, fake, app="main", openid="o-alice", session_key=k1, unionid="u-alice")
    r = await decrypt(gw, first["token"], k1, user_data(nickName="one"))
    assert r.code == 200, r.body
    # a login to ANOTHER app (same unionid, same user) does not replace this app's session_key
    await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-other-alice", unionid="u-alice")
    r = await decrypt(gw, first["token"], k1, user_data(nickName="two"))
    assert r.code == 200, r.body
    # the same appid+openid logging in again does
    second = await login(gw, fake, app="main", openid="o-alice", session_key=k2, unionid="u-alice")
    r = await decrypt(gw, first["token"], k1, user_data(nickName="three"))
    assert_stale(r)
    r = await decrypt(gw, second["token"], k2, user_data(nickName="four"))
    assert r.code == 200, r.body


async def decrypt_with_code(gw, fake, token: str, plaintext: bytes, *, openid: str = "o-alice",
                            session_key: str | None = None):
    """/decrypt with a fresh wx.login code whose session_key encrypted ``plaintext``."""
    session_key = session_key or new_session_key()
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid=openid, session_key=session_key)
    iv = new_iv()
    payload = {"encryptedData": encrypt(session_key, iv, pkcs7(plaintext)), "iv": iv, "code": code}
    return await gw.client.request("POST", DECRYPT, json_body=payload, token=token), code


@pytest.mark.parametrize("store", ["memory", "redis"])
@gen
async def test_decrypt_with_a_fresh_code_renews_the_session_key_in_the_same_session(start, fake, request, store):
    sessions = redis_sessions(request.getfixturevalue("redis_url")) if store == "redis" else {}
    gw = await start(sessions=sessions)
    k1, k2, k3 = new_session_key(), new_session_key(), new_session_key()
    first = await login(gw, fake, openid="o-alice", session_key=k1)
    second = await login(gw, fake, openid="o-alice", session_key=k2)  # WeChat replaced k1
    assert_stale(await decrypt(gw, first["token"], k1, user_data(nickName="stale")))

    r, code = await decrypt_with_code(gw, fake, first["token"], user_data(nickName="renewed"), session_key=k3)
    assert r.code == 200, r.body
    assert body(r) == {"nickName": "renewed"}
    assert fake.seen(JSCODE2SESSION)[-1].query == {"appid": MAIN_APPID, "secret": MAIN_SECRET, "js_code": code,
                                                   "grant_type": "authorization_code"}
    assert k3 not in all_text(r)
    # the same session and token, now holding k3: later calls need no code
    r = await gw.client.request("GET", "/auth/session", token=first["token"])
    assert r.code == 200 and body(r)["session"]["id"] == first["session"]["id"], r.body
    assert body(r)["user"]["profile"]["nickName"] == "renewed"
    r = await decrypt(gw, first["token"], k3, user_data(nickName="again"))
    assert r.code == 200, r.body
    # the exchange replaced the other session's key in turn
    assert_stale(await decrypt(gw, second["token"], k2, user_data(nickName="x")))
    # one session each, no new one
    r = await gw.client.request("GET", "/auth/sessions", token=first["token"])
    assert sorted(s["id"] for s in body(r)["sessions"]) == sorted([first["session"]["id"], second["session"]["id"]])


@gen
async def test_a_renewed_session_key_opens_in_another_gateway_on_one_redis(start, fake, redis_url):
    gw1 = await start(sessions=redis_sessions(redis_url))
    gw2 = await start(sessions=redis_sessions(redis_url))
    data = await login(gw1, fake, openid="o-alice")
    k2 = new_session_key()
    r, _ = await decrypt_with_code(gw1, fake, data["token"], user_data(nickName="one"), session_key=k2)
    assert r.code == 200, r.body
    r = await decrypt(gw2, data["token"], k2, user_data(nickName="two"))
    assert r.code == 200, r.body


@gen
async def test_decrypt_with_a_bad_or_used_code_is_401_and_keeps_the_session_key(start, fake):
    gw = await start()
    k1 = new_session_key()
    data = await login(gw, fake, openid="o-alice", session_key=k1)
    iv = new_iv()
    payload = {"encryptedData": encrypt(k1, iv, pkcs7(user_data(nickName="x"))), "iv": iv, "code": "no-such-code"}
    r = await gw.client.request("POST", DECRYPT, json_body=payload, token=data["token"])
    assert_error(r, 401, "invalid_credentials", contains="wx.login")
    r, code = await decrypt_with_code(gw, fake, data["token"], user_data(nickName="y"))
    assert r.code == 200, r.body
    payload["code"] = code  # used
    r = await gw.client.request("POST", DECRYPT, json_body=payload, token=data["token"])
    assert_error(r, 401, "invalid_credentials")
    for bad in (7, "", "c" * 257):
        payload["code"] = bad
        r = await gw.client.request("POST", DECRYPT, json_body=payload, token=data["token"])
        assert_error(r, 400, "invalid_request", contains="code")


@gen
async def test_decrypt_with_another_wechat_users_code_is_refused_and_changes_nothing(start, fake):
    gw = await start()
    k1 = new_session_key()
    alice = await login(gw, fake, openid="o-alice", session_key=k1)
    r, _ = await decrypt_with_code(gw, fake, alice["token"], user_data(nickName="bob"), openid="o-bob")
    assert_error(r, 401, "invalid_credentials", contains="another WeChat user")
    assert "nickName" not in await profile_of(gw, alice["token"])
    r = await decrypt(gw, alice["token"], k1, user_data(nickName="alice"))
    assert r.code == 200, r.body


@gen
async def test_the_fakes_own_codes_and_samples_log_in_and_decrypt(start, fake):
    """What gateway.testing.wechat offers a plugin's tests: minted wx.login
    codes, user data encrypted under the user's current session_key (which,
    as at WeChat, each wx.login replaces), and phone codes."""
    from gateway_plugins.wechat import decrypt_user_data

    gw = await start()
    r = await gw.client.request("POST", LOGIN, json_body={"code": fake.mint_code("o-carol", appid=MAIN_APPID)})
    assert r.code == 200, r.body
    token = body(r)["token"]
    r = await gw.client.request("POST", DECRYPT, json_body=fake.encrypted_data("o-carol", {"nickName": "Carol"}, appid=MAIN_APPID),
                                token=token)
    assert r.code == 200, r.body
    assert body(r) == {"openId": "o-carol", "nickName": "Carol"}
    # wx.login again: the data comes under the new key, which the gateway learns from the code
    code = fake.mint_code("o-carol", appid=MAIN_APPID)
    fresh = fake.encrypted_data("o-carol", {"nickName": "Carol 2"}, appid=MAIN_APPID)
    r = await gw.client.request("POST", DECRYPT, json_body=fresh, token=token)
    assert_error(r, 400, "invalid_request")  # under a key the session does not hold
    r = await gw.client.request("POST", DECRYPT, json_body={**fresh, "code": code}, token=token)
    assert r.code == 200 and body(r)["nickName"] == "Carol 2", r.body
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": fake.mint_phone_code("+86 13900139000")},
                                token=token)
    assert r.code == 200, r.body
    assert body(r) == {"phoneNumber": "+86 13900139000", "purePhoneNumber": "13900139000", "countryCode": "86"}
    with pytest.raises(ValueError, match="no session_key yet"):
        fake.encrypted_data("o-nobody", appid=MAIN_APPID)
    sample = encrypt_user_data(SAMPLE_SESSION_KEY, SAMPLE_PLAINTEXT)
    assert decrypt_user_data(SAMPLE_SESSION_KEY, sample["iv"], sample["encryptedData"]) == SAMPLE_PLAINTEXT


@gen
async def test_decrypt_needs_a_wechat_session(start, fake):
    gw = await start()
    payload = {"encryptedData": SAMPLE_ENCRYPTED, "iv": SAMPLE_IV}
    r = await gw.client.request("POST", DECRYPT, json_body=payload)
    assert_error(r, 401, "unauthenticated")
    r = await gw.client.request("POST", DECRYPT, json_body=payload, token="gws_" + "A" * 43)
    assert_error(r, 401, "unauthenticated")
    reg = await gw.client.register()
    r = await gw.client.request("POST", DECRYPT, json_body=payload, token=reg["token"])
    assert_error(r, 403, "forbidden")


# ---------------------------------------------------------------------------
# phone number
# ---------------------------------------------------------------------------

PHONE_ANSWER = {"phoneNumber": "+86 13800138000", "purePhoneNumber": "13800138000", "countryCode": "86"}


def stable_bodies(fake) -> list[dict[str, Any]]:
    return [r.json for r in fake.seen(STABLE_TOKEN)]


def phone_tokens(fake) -> list[str]:
    return [r.query.get("access_token") for r in fake.seen(PHONE)]


def stable_body(force: bool, appid: str = MAIN_APPID, secret: str = MAIN_SECRET) -> dict[str, Any]:
    return {"grant_type": "client_credential", "appid": appid, "secret": secret, "force_refresh": force}


@gen
async def test_phone_number_is_returned_saved_and_the_token_cached(start, fake):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert r.code == 200, r.body
    assert body(r) == PHONE_ANSWER
    assert stable_bodies(fake) == [stable_body(False)]
    seen = fake.seen(PHONE)
    assert len(seen) == 1 and seen[0].method == "POST"
    assert seen[0].query == {"access_token": "tok-1"}
    assert seen[0].json == {"code": "pc-1"}
    profile = await profile_of(gw, data["token"])
    for k, v in PHONE_ANSWER.items():
        assert profile[k] == v
    # the second call uses the cached token
    fake.add_phone_code("pc-2", "+86 13900139000", "13900139000", "86")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-2"}, token=data["token"])
    assert r.code == 200, r.body
    assert body(r)["purePhoneNumber"] == "13900139000"
    assert fake.count(STABLE_TOKEN) == 1
    assert phone_tokens(fake) == ["tok-1", "tok-1"]
    assert (await profile_of(gw, data["token"]))["purePhoneNumber"] == "13900139000"


@gen
@pytest.mark.parametrize("how", ["invalidate", "expire"], ids=["40001", "42001"])
async def test_a_rejected_token_is_refreshed_once_and_the_call_retried(start, fake, how):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])).code == 200
    getattr(fake, how)("tok-1")
    fake.add_phone_code("pc-2")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-2"}, token=data["token"])
    assert r.code == 200, r.body
    assert body(r) == PHONE_ANSWER
    assert phone_tokens(fake) == ["tok-1", "tok-1", "tok-2"]
    # the re-fetch after the rejection does not force a refresh: WeChat issued a new token by itself
    assert stable_bodies(fake) == [stable_body(False), stable_body(False)]
    # the new token is cached
    fake.add_phone_code("pc-3")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-3"}, token=data["token"])).code == 200
    assert fake.count(STABLE_TOKEN) == 2
    assert phone_tokens(fake)[-1] == "tok-2"


@gen
async def test_when_wechat_hands_back_the_rejected_token_the_gateway_forces_a_refresh(start, fake):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])).code == 200
    fake.invalidate("tok-1")
    fake.sticky = True  # stable_token keeps answering tok-1 unless force_refresh is true
    fake.add_phone_code("pc-2")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-2"}, token=data["token"])
    assert r.code == 200, r.body
    assert body(r) == PHONE_ANSWER
    assert stable_bodies(fake) == [stable_body(False), stable_body(False), stable_body(True)]
    assert phone_tokens(fake) == ["tok-1", "tok-1", "tok-2"]


@gen
async def test_the_phone_call_is_retried_only_once(start, fake):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.force(PHONE, body=json.dumps({"errcode": 40001, "errmsg": "invalid credential"}),
               content_type="application/json")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")
    assert fake.count(PHONE) == 2
    assert 2 <= fake.count(STABLE_TOKEN) <= 3
    assert "phoneNumber" not in await profile_of(gw, data["token"])


@gen
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_twenty_concurrent_phone_calls_share_one_token_request(start, fake, request, store):
    sessions = redis_sessions(request.getfixturevalue("redis_url")) if store == "redis" else {}
    gw = await start(sessions=sessions)
    data = await login(gw, fake)
    fake.delays[STABLE_TOKEN] = 0.2  # the callers overlap while the token is being fetched
    codes = [f"pc-{i}" for i in range(20)]
    for i, code in enumerate(codes):
        fake.add_phone_code(code, f"+86 1380000{i:04d}", f"1380000{i:04d}", "86")
    http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=50)
    try:
        results = await asyncio.gather(*(
            http.fetch(gw.base_url + PHONE_PATH, method="POST", body=json.dumps({"code": c}), raise_error=False,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {data['token']}"},
                       request_timeout=20)
            for c in codes))
    finally:
        http.close()
    assert [r.code for r in results] == [200] * 20, [(r.code, r.body) for r in results if r.code != 200]
    assert sorted(body(r)["purePhoneNumber"] for r in results) == sorted(f"1380000{i:04d}" for i in range(20))
    assert fake.count(STABLE_TOKEN) == 1
    assert set(phone_tokens(fake)) == {"tok-1"}


@gen
async def test_two_gateways_on_one_redis_share_the_cached_token(start, fake, redis_url):
    gw1 = await start(sessions=redis_sessions(redis_url))
    gw2 = await start(sessions=redis_sessions(redis_url))
    data = await login(gw1, fake)
    fake.add_phone_code("pc-1")
    fake.add_phone_code("pc-2")
    assert (await gw1.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])).code == 200
    r = await gw2.client.request("POST", PHONE_PATH, json_body={"code": "pc-2"}, token=data["token"])
    assert r.code == 200, r.body
    assert fake.count(STABLE_TOKEN) == 1
    assert phone_tokens(fake) == ["tok-1", "tok-1"]


@gen
async def test_two_gateways_on_one_redis_share_one_token_refresh(start, fake, redis_url):
    gw1 = await start(sessions=redis_sessions(redis_url))
    gw2 = await start(sessions=redis_sessions(redis_url))
    data = await login(gw1, fake)
    fake.delays[STABLE_TOKEN] = 0.3
    for i in range(10):
        fake.add_phone_code(f"pc-{i}")
    calls = [gw.client.request("POST", PHONE_PATH, json_body={"code": f"pc-{i}"}, token=data["token"])
             for i, gw in zip(range(10), itertools.cycle([gw1, gw2]))]
    results = await asyncio.gather(*calls)
    assert [r.code for r in results] == [200] * 10, [r.body for r in results]
    assert fake.count(STABLE_TOKEN) == 1


@gen
async def test_the_token_is_refreshed_token_margin_before_it_expires(start, fake):
    gw = await start(token_margin="1s")
    fake.expires_in = 2  # usable for 1 s after the margin
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.add_phone_code("pc-2")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])).code == 200
    await asyncio.sleep(1.5)  # past expires_in - token_margin, before expires_in
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-2"}, token=data["token"])).code == 200
    assert fake.count(STABLE_TOKEN) == 2


@gen
async def test_each_app_has_its_own_access_token(start, fake):
    gw = await start(apps=TWO_APPS)
    a = await login(gw, fake, app="main", appid=MAIN_APPID)
    b = await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-other")
    fake.add_phone_code("pc-a")
    fake.add_phone_code("pc-b")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-a"}, token=a["token"])).code == 200
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-b"}, token=b["token"])
    assert r.code == 200, r.body
    assert stable_bodies(fake) == [stable_body(False), stable_body(False, OTHER_APPID, OTHER_SECRET)]
    assert phone_tokens(fake) == ["tok-1", "tok-2"]


@gen
@pytest.mark.parametrize("errcode,status,error", [
    (40029, 400, "invalid_request"),
    (45011, 429, "rate_limited"),
    (-1, 503, "unavailable"),
    (47001, 502, "bad_gateway"),
    (40013, 502, "bad_gateway"),
])
async def test_phone_errcodes_map_to_gateway_errors(start, fake, errcode, status, error):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1", errcode=errcode)
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, status, error)
    assert fake.count(PHONE) == 1
    assert "phoneNumber" not in await profile_of(gw, data["token"])
    if status == 429:
        assert r.headers.get("Retry-After"), "the README's contract: 429 carries Retry-After"


@gen
async def test_an_unknown_phone_code_is_400(start, fake):
    gw = await start()
    data = await login(gw, fake)
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "never-issued"}, token=data["token"])
    assert_error(r, 400, "invalid_request")


@gen
@pytest.mark.parametrize("canned", [
    {"status": 200, "body": "<html>oops</html>", "content_type": "text/html"},
    {"status": 500, "body": "Internal Server Error"},
    {"status": 200, "body": json.dumps({"errcode": 0, "errmsg": "ok"}), "content_type": "application/json"},
    {"status": 200, "body": json.dumps({"errcode": 0, "errmsg": "ok", "phone_info": PHONE_ANSWER}),
     "content_type": "application/json"},  # no watermark
    {"status": 200, "body": json.dumps({"errcode": 0, "errmsg": "ok", "phone_info": {}}),
     "content_type": "application/json"},
    {"status": 200, "body": json.dumps({"errcode": 0, "errmsg": "ok", "phone_info": "+86 138"}),
     "content_type": "application/json"},
], ids=["html", "http-500", "no-phone-info", "no-watermark", "empty-phone-info", "phone-info-not-object"])
async def test_a_phone_reply_that_is_not_a_wechat_answer_is_502(start, fake, canned):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.force(PHONE, **canned)
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")
    assert "phoneNumber" not in await profile_of(gw, data["token"])


@gen
async def test_a_phone_wechat_slower_than_the_timeout_is_502(start, fake):
    gw = await start(timeout="0.3s")
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.delays[PHONE] = 5
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")


@gen
async def test_a_stable_token_slower_than_the_timeout_is_502(start, fake):
    gw = await start(timeout="0.3s")
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.delays[STABLE_TOKEN] = 5
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")
    assert fake.count(PHONE) == 0


@gen
async def test_a_refused_stable_token_is_502_and_does_not_leak_the_secret(start, fake, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    fake.apps[MAIN_APPID] = "rotated-elsewhere"  # the configured secret is now wrong: 40125
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")
    assert MAIN_SECRET not in all_text(r)
    assert fake.count(PHONE) == 0
    assert MAIN_SECRET not in log_text(caplog)


@gen
async def test_the_phone_flow_logs_no_secret(start, fake, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert r.code == 200, r.body
    text = log_text(caplog)
    assert "/auth/wechat/phone" in text
    assert MAIN_SECRET not in text


@gen
async def test_a_phone_number_for_another_app_is_502_and_not_saved(start, fake):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1", watermark_appid=OTHER_APPID)
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=data["token"])
    assert_error(r, 502, "bad_gateway")
    profile = await profile_of(gw, data["token"])
    assert "phoneNumber" not in profile and "purePhoneNumber" not in profile


@gen
@pytest.mark.parametrize("payload", [{}, {"code": ""}, {"code": 5}])
async def test_phone_needs_a_code(start, fake, payload):
    gw = await start()
    data = await login(gw, fake)
    r = await gw.client.request("POST", PHONE_PATH, json_body=payload, token=data["token"])
    assert_error(r, 400, "invalid_request", contains="code")
    assert fake.count(PHONE) == 0 and fake.count(STABLE_TOKEN) == 0


@gen
async def test_phone_needs_a_wechat_session(start, fake):
    gw = await start()
    fake.add_phone_code("pc-1")
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"})
    assert_error(r, 401, "unauthenticated")
    reg = await gw.client.register()
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, token=reg["token"])
    assert_error(r, 403, "forbidden")
    assert fake.count(PHONE) == 0


@gen
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_concurrent_callers_holding_a_rejected_token_share_one_refresh(start, fake, request, store):
    sessions = redis_sessions(request.getfixturevalue("redis_url")) if store == "redis" else {}
    gw = await start(sessions=sessions)
    data = await login(gw, fake)
    fake.add_phone_code("pc-first")
    assert (await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-first"},
                                    token=data["token"])).code == 200
    fake.invalidate("tok-1")
    fake.delays[STABLE_TOKEN] = 0.2
    for i in range(10):
        fake.add_phone_code(f"pc-{i}")
    results = await asyncio.gather(*(
        gw.client.request("POST", PHONE_PATH, json_body={"code": f"pc-{i}"}, token=data["token"]) for i in range(10)))
    assert [r.code for r in results] == [200] * 10, [r.body for r in results]
    assert fake.count(STABLE_TOKEN) == 2  # the first fetch, then one shared refresh
    assert phone_tokens(fake).count("tok-2") == 10


@gen
async def test_a_second_gateway_on_one_redis_opens_the_sealed_session_key_and_sees_a_newer_login(start, fake, redis_url):
    gw1 = await start(sessions=redis_sessions(redis_url))
    gw2 = await start(sessions=redis_sessions(redis_url))
    k1, k2 = new_session_key(), new_session_key()
    first = await login(gw1, fake, openid="o-alice", session_key=k1)
    r = await decrypt(gw2, first["token"], k1, user_data(nickName="via gw2"))
    assert r.code == 200, r.body
    assert (await profile_of(gw1, first["token"]))["nickName"] == "via gw2"
    second = await login(gw2, fake, openid="o-alice", session_key=k2)
    r = await decrypt(gw1, first["token"], k1, user_data(nickName="stale"))
    assert_stale(r)
    r = await decrypt(gw1, second["token"], k2, user_data(nickName="fresh"))
    assert r.code == 200, r.body


@gen
async def test_a_gateway_with_another_encryption_key_cannot_open_the_session_key(start, fake, redis_url):
    """The sealed session_key is bound to the key: a dump plus a wrong key gives nothing
    (the session still authenticates, but decrypt asks for a new login)."""
    gw1 = await start(sessions=redis_sessions(redis_url))
    gw2 = await start(sessions={**redis_sessions(redis_url), "encryption_key": base64.b64encode(b"z" * 32).decode()})
    session_key = new_session_key()
    data = await login(gw1, fake, session_key=session_key)
    r = await decrypt(gw2, data["token"], session_key, user_data(nickName="x"))
    assert_stale(r)
    r = await decrypt(gw1, data["token"], session_key, user_data(nickName="x"))
    assert r.code == 200, r.body


@gen
async def test_wechat_endpoints_require_a_json_content_type(start, fake):
    gw = await start()
    data = await login(gw, fake)
    code = new_code()
    fake.add_code(code, appid=MAIN_APPID, openid="o-alice", session_key=new_session_key())
    for path, payload in ((LOGIN, {"code": code}), (DECRYPT, {"encryptedData": SAMPLE_ENCRYPTED, "iv": SAMPLE_IV}),
                          (PHONE_PATH, {"code": "pc-1"})):
        r = await gw.client.request("POST", path, body=json.dumps(payload), token=data["token"],
                                    headers={"Content-Type": "text/plain"})
        assert_error(r, 400, "invalid_request", contains="Content-Type")
    assert fake.count(JSCODE2SESSION) == 1 and fake.count(PHONE) == 0  # only the login above


@gen
async def test_cookie_authenticated_phone_and_decrypt_need_the_csrf_check(start, fake):
    gw = await start()
    data = await login(gw, fake)
    fake.add_phone_code("pc-1")
    cookie = {"Cookie": f"gw_session={data['token']}"}
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"}, headers=cookie)
    assert_error(r, 403, "csrf")
    r = await gw.client.request("POST", DECRYPT, json_body={"encryptedData": SAMPLE_ENCRYPTED, "iv": SAMPLE_IV},
                                headers=cookie)
    assert_error(r, 403, "csrf")
    assert fake.count(PHONE) == 0 and fake.count(STABLE_TOKEN) == 0
    r = await gw.client.request("POST", PHONE_PATH, json_body={"code": "pc-1"},
                                headers={**cookie, "X-Requested-With": "XMLHttpRequest"})
    assert r.code == 200, r.body


# ---------------------------------------------------------------------------
# decrypt: what a client controls is treated as such
# ---------------------------------------------------------------------------


@gen
async def test_failed_decryptions_are_limited_per_wechat_user(start, fake):
    # AES-CBC carries no integrity check and the padding verdict is visible,
    # so forging data takes thousands of tries: they end in 429.
    gw = await start(max_decrypt_failures=3)
    session_key = new_session_key()
    data = await login(gw, fake, openid="o-limited", session_key=session_key)
    for _ in range(3):
        r = await decrypt(gw, data["token"], session_key, b"x" * 16, pad=False)
        assert_error(r, 400, "invalid_request")
    r = await decrypt(gw, data["token"], session_key, user_data(nickName="ok"))
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) > 3000  # the hour's window
    # the limit follows the WeChat user into a new session, not just this one
    again = await login(gw, fake, openid="o-limited", session_key=session_key)
    assert_error(await decrypt(gw, again["token"], session_key, user_data(nickName="ok")), 429, "rate_limited")
    # and nobody else's
    other_key = new_session_key()
    other = await login(gw, fake, openid="o-other", session_key=other_key)
    assert (await decrypt(gw, other["token"], other_key, user_data(nickName="ok"))).code == 200


@gen
async def test_successful_decryptions_are_not_limited(start, fake):
    gw = await start(max_decrypt_failures=2)
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    for i in range(5):
        assert (await decrypt(gw, data["token"], session_key, user_data(nickName=f"n{i}"))).code == 200


@gen
async def test_lone_surrogates_and_oversized_values_in_decrypted_data(start, fake):
    gw = await start()
    session_key = new_session_key()
    data = await login(gw, fake, session_key=session_key)
    lone = b'{"nickName":"\\ud800","watermark":{"appid":"%s"}}' % MAIN_APPID.encode()
    r = await decrypt(gw, data["token"], session_key, lone)
    assert_error(r, 400, "invalid_request", contains="Unicode")
    r = await decrypt(gw, data["token"], session_key,
                      user_data(nickName="ok", gender=2**70, city="c" * 5000, country=["CN"]))
    assert r.code == 200, r.body
    assert body(r)["gender"] == 2**70  # returned as decrypted...
    profile = await profile_of(gw, data["token"])
    assert profile.get("nickName") == "ok"
    assert not {"gender", "city", "country"} & set(profile)  # ...but only sane values are saved


def test_the_app_secret_stays_out_of_reprs():
    from gateway_plugins.wechat import App

    assert "s3cret" not in repr(App("main", MAIN_APPID, "s3cret"))


@gen
async def test_a_unionid_already_joined_elsewhere_leaves_the_accounts_apart_and_says_so_once(start, fake, caplog):
    gw = await start(apps=TWO_APPS)
    first = await login(gw, fake, app="main", openid="o-early")  # before the app was bound: no unionid
    other = await login(gw, fake, app="other", appid=OTHER_APPID, openid="o-other", unionid="un-shared")
    caplog.set_level("WARNING", logger="gateway.wechat")
    again = await login(gw, fake, app="main", openid="o-early", unionid="un-shared")
    assert again["user"]["id"] == first["user"]["id"] != other["user"]["id"]
    assert sum("unionid" in r.getMessage() for r in caplog.records) == 1
    await login(gw, fake, app="main", openid="o-early", unionid="un-shared")
    assert sum("unionid" in r.getMessage() for r in caplog.records) == 1  # not repeated at every login


# ---------------------------------------------------------------------------
# What the upstream learns of a WeChat user
# ---------------------------------------------------------------------------


@gen
async def test_upstream_gets_the_openid_of_a_wechat_session_and_nobody_can_forge_it(start, fake, upstream):
    gw = await start()
    data = await login(gw, fake, openid="o-pay", unionid="un-pay")
    forged = {"X-WeChat-OpenId": "o-victim", "X_WeChat_OpenId": "o-victim", "x-wechat-unionid": "un-victim"}
    r = await gw.client.request("GET", "/api/pay", token=data["token"], headers=forged)
    assert r.code == 200
    seen = upstream.last
    assert seen.header("X-WeChat-AppId") == MAIN_APPID
    assert seen.header("X-WeChat-OpenId") == "o-pay"
    assert seen.header("X-WeChat-UnionId") == "un-pay"
    assert "o-victim" not in str(seen.headers) and "un-victim" not in str(seen.headers)
    # another provider's session, and an anonymous request, carry none of them
    password = await gw.client.register("bob")
    for token, path in ((password["token"], "/api/pay"), (None, "/public/pay")):
        r = await gw.client.request("GET", path, token=token, headers=forged)
        assert r.code == 200
        assert not {n for n in upstream.last.names() if "wechat" in n.lower().replace("_", "-")}
    # without a unionid there is no such header
    plain = await login(gw, fake, openid="o-plain")
    await gw.client.request("GET", "/api/x", token=plain["token"])
    assert upstream.last.header("X-WeChat-OpenId") == "o-plain"
    assert upstream.last.header("X-WeChat-UnionId") is None
