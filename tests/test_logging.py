"""``[logging]``: access lines people can read (text or JSON), and the audit log.

Everything runs ``gateway serve`` as a subprocess and reads what it wrote:
its output (the access and other log lines) and the audit file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import body, children_of, cookie_value, free_port, until
from gateway.testing.wechat import start_fake_wechat
from password_support import ROOT, GatewayProcess, PasswordClient

gen = pytest.mark.gen_test(timeout=120)

ALLOWED = "https://app.example"
EVIL = "https://evil.example"
PASSWORD = "correct horse battery"
WECHAT_APPID = "wx4f4bc4dec97d474b"
WECHAT_SECRET = "wechat-app-secret-9f8e7d"


def routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": upstream_url, "auth": "required"},
        {"prefix": "/orders/", "upstream": upstream_url, "auth": "required", "scopes": ["orders:write"]},
        {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
    ]


def client(gp: GatewayProcess) -> PasswordClient:
    return PasswordClient(gp.url)


def access_lines(gp: GatewayProcess, fmt: str) -> list[dict[str, Any]]:
    """The access lines of the process's output, as dicts of their fields."""
    out = []
    for line in gp.output().splitlines():
        if fmt == "json":
            if line.startswith("{"):
                record = json.loads(line)
                if record["logger"] == "gateway.access":
                    out.append(record)
        elif " gateway.access: " in line:
            out.append(parse_text(line.split(" gateway.access: ", 1)[1]))
    return out


_NAMES = {"rid": "request_id", "trace": "trace_id", "user": "user_id", "session": "session_id", "upstream": "upstream_ms",
          "bytes": "bytes", "ip": "ip", "provider": "provider", "error": "error", "reason": "reason",
          "route": "route", "detail": "detail"}


def parse_text(message: str) -> dict[str, Any]:
    """``401 GET /api/x route=/api/ 0.8ms rid=... error=... detail="..."`` as the JSON line's fields."""
    head, _, detail = message.partition(' detail="')
    status, method, path, *rest = head.split(" ")
    fields: dict[str, Any] = {"status": int(status), "method": method, "path": path, "detail": None}
    if detail:
        fields["detail"] = json.loads('"' + detail)
    for token in rest:
        if "=" not in token:
            assert re.fullmatch(r"\d+\.\dms", token), message
            fields["duration_ms"] = float(token[:-2])
            continue
        name, value = token.split("=", 1)
        key = _NAMES[name]
        fields[key] = float(value[:-2]) if key == "upstream_ms" else int(value) if key == "bytes" else value
    for key in _NAMES.values():
        fields.setdefault(key, None)
    return fields


def line_for(lines: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    found = [line for line in lines if line["request_id"] == rid]
    assert len(found) == 1, (rid, lines)
    return found[0]


async def access_line(gp: GatewayProcess, fmt: str, rid: str) -> dict[str, Any]:
    """The access line of request ``rid`` (once it is written)."""
    await until(lambda: any(line["request_id"] == rid for line in access_lines(gp, fmt)), 5,
                lambda: f"no access line for {rid}: {gp.output()[-2000:]}")
    return line_for(access_lines(gp, fmt), rid)


def run_command(gp: GatewayProcess, *args: str) -> str:
    """``gateway <args> --config <the process's file>``: its stdout."""
    done = subprocess.run([str(ROOT / "bin" / "gateway"), *args, "--config", str(gp.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def create_key(gp: GatewayProcess, user: str, scopes: str) -> str:
    out = run_command(gp, "apikey", "create", "--user", user, "--name", "ci", "--scopes", scopes)
    return re.search(r"^key:\s+(gwk_\S+)$", out, re.M).group(1)  # type: ignore[union-attr]


def audit_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), "a line was cut"
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------
# access lines
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "text"])
@gen
async def test_access_lines_name_the_request_its_caller_and_why_it_was_refused(tmp_path, upstream, fmt):
    async with GatewayProcess(tmp_path, routes(upstream.url), logging={"format": fmt},
                              sessions={"allowed_origins": [ALLOWED], "idle_timeout": "1s",
                                        "touch_interval": 0}) as gp:
        c = client(gp)
        user = (await c.register(password=PASSWORD))["user"]["id"]

        # a proxied request: its route, the upstream's time, who called, the path without its query
        token = (await c.login(password=PASSWORD))["token"]
        r = await c.request("GET", "/api/items?page=2&token=abc", token=token, headers={"X-Request-Id": "rid-proxy"})
        assert r.code == 200
        line = await access_line(gp, fmt, "rid-proxy")
        assert line["status"] == 200 and line["method"] == "GET" and line["route"] == "/api/"
        assert line["path"] == "/api/items"
        assert line["user_id"] == user and line["session_id"] and line["provider"] == "password"
        assert line["ip"] == "127.0.0.1"
        assert line["bytes"] == len(r.body) > 0
        assert line["upstream_ms"] is not None and 0 <= line["upstream_ms"] <= line["duration_ms"]
        assert line["error"] is None and line["detail"] is None
        if fmt == "json":
            assert set(line) >= {"time", "level", "logger", "duration_ms"}
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        session_id = line["session_id"]

        # one of the gateway's own endpoints: its route pattern, no upstream
        r = await c.request("GET", "/auth/session", token=token, headers={"X-Request-Id": "rid-own"})
        assert r.code == 200
        line = await access_line(gp, fmt, "rid-own")
        assert (line["route"], line["user_id"], line["session_id"]) == ("/auth/session", user, session_id)
        assert line["upstream_ms"] is None and line["bytes"] == len(r.body)

        # a refused CORS origin: which one
        r = await c.request("OPTIONS", "/api/items", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "GET", "X-Request-Id": "rid-cors"})
        assert r.code == 403
        line = await access_line(gp, fmt, "rid-cors")
        assert line["error"] == "forbidden" and EVIL in line["detail"] and "allowed_origins" in line["detail"]

        # a missing scope: which one
        key = create_key(gp, user, "orders:read")
        r = await c.request("POST", "/orders/1", body="{}", headers={"X-API-Key": key, "X-Request-Id": "rid-scope"})
        assert r.code == 403
        line = await access_line(gp, fmt, "rid-scope")
        assert line["error"] == "forbidden" and "orders:write" in line["detail"]
        assert (line["user_id"], line["provider"], line["session_id"]) == (user, "apikey", None)

        # a CSRF refusal: which check failed
        token = (await c.login(password=PASSWORD))["token"]
        r = await c.request("POST", "/api/items", body="{}", headers={
            "Cookie": f"gw_session={token}", "Origin": EVIL, "X-Request-Id": "rid-csrf"})
        assert r.code == 403
        line = await access_line(gp, fmt, "rid-csrf")
        assert line["error"] == "csrf" and EVIL in line["detail"]
        r = await c.request("DELETE", "/api/items/1", headers={"Cookie": f"gw_session={token}",
                                                               "X-Request-Id": "rid-csrf-bare"})
        assert r.code == 403
        line = await access_line(gp, fmt, "rid-csrf-bare")
        assert line["error"] == "csrf" and "no Origin, Referer or X-Requested-With" in line["detail"]

        # an expired session: the 401's reason
        await asyncio.sleep(1.3)
        r = await c.request("GET", "/api/items", token=token, headers={"X-Request-Id": "rid-expired"})
        assert r.code == 401
        line = await access_line(gp, fmt, "rid-expired")
        assert (line["status"], line["error"], line["reason"]) == (401, "unauthenticated", "expired")
        assert line["user_id"] is None
        c.close()

    if fmt == "text":  # the readable one-liner
        text = [ln for ln in gp.output().splitlines() if "rid=rid-expired" in ln][0]
        assert re.search(r"WARNING gateway\.access: 401 GET /api/items route=/api/ \d+\.\dms bytes=\d+ "
                         r"rid=rid-expired ip=127\.0\.0\.1 error=unauthenticated reason=expired detail=\"", text), text


# ---------------------------------------------------------------------------
# the audit log
# ---------------------------------------------------------------------------


@gen
async def test_two_workers_append_to_one_audit_file_which_a_rotation_reopens(tmp_path, upstream, redis_url):
    audit = tmp_path / "audit.log"
    async with GatewayProcess(tmp_path, routes(upstream.url), server={"workers": 2},
                              sessions={"store": "redis", "redis_url": redis_url},
                              logging={"audit": str(audit), "access_log": False}) as gp:
        await until(lambda: len(children_of(gp.pid)) == 2 and gp.output().count("gateway listening on") >= 2,
                    30, "two workers listening")
        workers = set(children_of(gp.pid))
        c = client(gp)
        token = (await c.register(password=PASSWORD))["token"]

        async def refresh(rid: str) -> None:
            nonlocal token
            r = await c.request("POST", "/auth/refresh", token=token, headers={"X-Request-Id": rid})
            assert r.code == 200, r.body
            token = body(r)["token"]

        before: list[str] = []
        for i in range(60):  # each request a connection of its own, which the kernel gives either worker
            before.append(f"before-{i}")
            await refresh(before[-1])
            if i >= 9 and {line["pid"] for line in audit_lines(audit) if line["event"] == "refresh"} == workers:
                break
        lines = audit_lines(audit)
        assert {line["pid"] for line in lines if line["event"] == "refresh"} == workers, "both workers wrote"
        assert [line["request_id"] for line in lines if line["event"] == "refresh"] == before
        assert [line["event"] for line in lines[:2]] == ["registration", "login"]

        # logrotate: rename, then SIGUSR1 to the supervisor, which passes it on
        audit.rename(tmp_path / "audit.log.1")
        os.kill(gp.pid, signal.SIGUSR1)
        await until(lambda: gp.output().count(" reopened (pid ") == 3, 10,
                    lambda: "the supervisor and both workers reopen the file: " + gp.output()[-2000:])
        assert audit.exists()
        after = []
        for i in range(20):
            after.append(f"after-{i}")
            await refresh(after[-1])
        assert gp.proc is not None and gp.proc.poll() is None
        assert set(children_of(gp.pid)) == workers, "no worker died of the signal"
        old = [line["request_id"] for line in audit_lines(tmp_path / "audit.log.1") if line["event"] == "refresh"]
        new = [line["request_id"] for line in audit_lines(audit) if line["event"] == "refresh"]
        assert old == before and new == after, "none lost, none in the wrong file"
        # access_log = false: no access line at all, the other logs still there
        assert "gateway.access" not in gp.output() and "listening on" in gp.output()
        c.close()


# ---------------------------------------------------------------------------
# no secret in any line
# ---------------------------------------------------------------------------


@gen
async def test_no_log_or_audit_line_holds_a_secret_of_a_full_flow(tmp_path, upstream, io_loop):
    fake, wechat_server = start_fake_wechat(free_port())
    fake.add_app(WECHAT_APPID, WECHAT_SECRET)
    audit = tmp_path / "audit.log"
    secrets: dict[str, str] = {"password": PASSWORD, "new password": "a brand new horse", "app secret": WECHAT_SECRET}
    try:
        async with GatewayProcess(
                tmp_path, routes(upstream.url), logging={"format": "json", "audit": str(audit)},
                sessions={"allowed_origins": [ALLOWED], "refresh_race_window": 0},
                consent={"documents": {"terms": {"version": "2", "url": "https://app.example/terms"}}},
                providers={"password": {"max_failures": 2},
                           "wechat": {"api_base": fake.url, "timeout": "2s",
                                      "apps": {"main": {"appid": WECHAT_APPID, "secret": WECHAT_SECRET}}}}) as gp:
            c = client(gp)
            r = await c.request("POST", "/auth/password/register",
                                json_body={"username": "alice", "password": PASSWORD})
            assert r.code == 201
            secrets["registration token"] = body(r)["token"]
            secrets["registration cookie"] = cookie_value(r) or ""
            user = body(r)["user"]["id"]
            r = await c.request("POST", "/auth/password/login", json_body={"username": "alice", "password": PASSWORD})
            assert r.code == 200
            token = secrets["login token"] = body(r)["token"]
            secrets["login cookie"] = cookie_value(r) or ""

            # refusals (for another username: alice is not locked out): a wrong password twice, then the lockout
            for expected in (401, 401, 429):
                r = await c.request("POST", "/auth/password/login",
                                    json_body={"username": "bob", "password": "wrong password 1"})
                assert r.code == expected, r.body
            secrets["wrong password"] = "wrong password 1"
            # a token in the query string, a code in it
            r = await c.request("GET", f"/public/x?access_token={token}&code=query-secret-code")
            assert r.code == 400
            secrets["query code"] = "query-secret-code"

            # consent, cookie-authenticated
            r = await c.request("POST", "/auth/consent", json_body={"accept": {"terms": "2"}},
                                headers={"Cookie": f"gw_session={token}", "Origin": ALLOWED})
            assert r.code == 200, r.body
            r = await c.request("DELETE", "/auth/consent/terms", token=token)
            assert r.code == 204

            # an API key, used, then revoked
            key = secrets["api key"] = create_key(gp, "password:alice", "orders:read")
            secrets["api key secret"] = key.split("_", 2)[2]
            r = await c.request("GET", "/api/with-key", headers={"X-API-Key": key})
            assert r.code == 200
            r = await c.request("GET", "/api/with-key", headers={"Authorization": f"Bearer {key}"})
            assert r.code == 200
            key_id = key.split("_")[1]
            run_command(gp, "apikey", "revoke", key_id)

            # WeChat
            session_key = secrets["wechat session_key"] = "c2Vzc2lvbi1rZXktMTIzNA=="
            code = secrets["wechat code"] = "wx-code-" + os.urandom(6).hex()
            fake.add_code(code, appid=WECHAT_APPID, openid="o-alice", session_key=session_key)
            r = await c.request("POST", "/auth/wechat/login", json_body={"code": code})
            assert r.code == 200, r.body
            secrets["wechat token"] = body(r)["token"]

            # refresh, change the password (the registration's session ends), replay the
            # replaced token (its session ends), logout, logout everywhere
            r = await c.request("POST", "/auth/refresh", token=token)
            assert r.code == 200
            token = secrets["refreshed token"] = body(r)["token"]
            r = await c.request("POST", "/auth/password/change", token=token,
                                json_body={"old_password": PASSWORD, "new_password": secrets["new password"]})
            assert r.code == 204, r.body
            r = await c.request("POST", "/auth/refresh", token=secrets["login token"])
            assert r.code == 401
            token = secrets["third token"] = (await c.login(password=secrets["new password"]))["token"]
            r = await c.request("POST", "/auth/logout", token=token)
            assert r.code == 204
            other = (await c.login(password=secrets["new password"]))["token"]
            secrets["last token"] = other
            r = await c.request("POST", "/auth/logout-all", token=other)
            assert r.code == 204
            r = await c.request("GET", "/api/after", token=other)
            assert r.code == 401
            c.close()
        output = gp.output()
    finally:
        fake.stopping.set()
        wechat_server.stop()

    events = audit_lines(audit)
    kinds = [e["event"] for e in events]
    for kind in ("registration", "login", "login_failed", "lockout", "consent_accepted", "consent_withdrawn",
                 "apikey_created", "apikey_revoked", "refresh", "refresh_reused", "password_changed",
                 "session_revoked", "logout", "logout_all"):
        assert kind in kinds, (kind, kinds)
    by: dict[str, dict[str, Any]] = {}
    for e in events:
        by.setdefault(e["event"], e)  # the first of each kind
    assert [e["error"] for e in events if e["event"] == "login_failed"] == [
        "invalid_credentials", "invalid_credentials", "locked_out"]
    assert by["login_failed"]["error"] == "invalid_credentials" and by["login_failed"]["ip"] == "127.0.0.1"
    assert by["lockout"]["provider"] == "password" and by["lockout"]["retry_after"] >= 1
    assert by["apikey_created"]["user_id"] == user and by["apikey_created"]["scopes"] == ["orders:read"]
    assert by["apikey_revoked"]["key_id"] == key_id
    assert {e["provider"] for e in events if e["event"] == "login"} == {"password", "wechat"}
    assert by["consent_accepted"]["documents"] == {"terms": "2"}
    revoked = {(e["reason"], e["by"]) for e in events if e["event"] == "session_revoked"}
    assert {("logout", "user"), ("logout_all", "user"), ("password_changed", "user"),
            ("revoked", "gateway")} <= revoked, revoked
    for e in events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"])
        assert e["event"] in ("apikey_created", "apikey_revoked") or e.get("request_id"), e

    lines = output.splitlines() + audit.read_text().splitlines()
    assert any('"logger": "gateway.access"' in line for line in lines)
    for name, secret in secrets.items():
        assert secret, name
        for line in lines:
            assert secret not in line, f"the {name} is in: {line}"


# ---------------------------------------------------------------------------
# the section itself
# ---------------------------------------------------------------------------


def test_the_logging_section_is_checked_naming_its_keys(tmp_path):
    from gateway.config import read_config

    config, problems = read_config(data={})
    assert (config.logging.format, config.logging.access_log, config.logging.audit) == ("text", True, "")
    _, problems = read_config(data={"logging": {"format": "xml", "access_log": "yes",
                                                "audit": str(tmp_path / "missing" / "audit.log")}})
    assert any(p.startswith("logging.format:") for p in problems), problems
    assert any(p.startswith("logging.access_log:") for p in problems), problems
    assert any(p.startswith("logging.audit:") and "does not exist" in p for p in problems), problems
    _, problems = read_config(data={"logging": {"audit": str(tmp_path)}})
    assert any(p.startswith("logging.audit:") and "directory" in p for p in problems), problems
    config, problems = read_config(data={"logging": {"format": "json", "audit": str(tmp_path / "audit.log")}})
    assert not problems and not (tmp_path / "audit.log").exists(), "checking makes nothing"


def test_pymongo_command_documents_stay_out_of_a_debug_log():
    """pymongo logs whole documents (profiles, password hashes) at DEBUG:
    even with the gateway at DEBUG they reach no handler."""
    import logging

    from gateway import logs
    from gateway.config import LoggingConfig

    root = logging.getLogger()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, level = Keep(), root.level
    root.addHandler(handler)
    try:
        root.setLevel(logging.DEBUG)
        logs.configure(LoggingConfig())
        logging.getLogger("pymongo.command").debug('{"password_hash": "$argon2id$secret"}')
        logging.getLogger("gateway.sessions").debug("still here")
        logging.getLogger("pymongo.topology").warning("a warning still shows")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger("pymongo").setLevel(logging.NOTSET)
    assert seen == ["still here", "a warning still shows"]
