"""What a newcomer meets first: ``make run``, that is ``gateway serve --demo``
with its echo upstream and WeChat sandbox, driven over HTTP as the README
shows; the echo upstream itself; and the command line's global flags,
which may follow the subcommand.

The demo runs as a real ``gateway serve`` subprocess on free ports, with
``conf/gateway.toml`` (its sandbox port and database path moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver

from gateway.config import load_config
from gateway.demo import follow_upstream, make_demo_app
from gateway.testing import body, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHIPPED = ROOT / "conf" / "gateway.toml"


def demo_config(tmp_path: Path, sandbox_port: int) -> Path:
    """conf/gateway.toml, with the WeChat sandbox on ``sandbox_port`` and the
    profile database under ``tmp_path``."""
    text = SHIPPED.read_text()
    assert 'api_base = "http://127.0.0.1:9100"' in text and 'sqlite_path = "var/profiles.db"' in text
    text = (text.replace("http://127.0.0.1:9100", f"http://127.0.0.1:{sandbox_port}")
            .replace('"var/profiles.db"', json.dumps(str(tmp_path / "profiles.db"))))
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


class Gateway:
    """``python -m gateway.cli <argv>`` in a session of its own, its output
    in ``tmp_path/gateway.log``; waits for ``port`` to listen."""

    def __init__(self, tmp_path: Path, argv: list[str], port: int) -> None:
        self.argv, self.port = argv, port
        self.log_path = tmp_path / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def __aenter__(self) -> "Gateway":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *self.argv], cwd=str(ROOT),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.output()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    await self.__aexit__()
                    raise AssertionError("gateway did not start listening: " + self.output()) from None
                await asyncio.sleep(0.1)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError("the gateway did not exit on SIGTERM: " + self.output())
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            await self.stop()


async def fetch(url: str, *, data: str | None = None, json_body: Any = None, token: str | None = None,
                headers: dict[str, str] | None = None) -> tornado.httpclient.HTTPResponse:
    """One request as the README's curl makes it: ``-d`` sends a form
    content type, ``-H 'Content-Type: application/json'`` JSON."""
    hdrs = dict(headers or {})
    payload = None
    if data is not None:
        hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        payload = data
    if json_body is not None:
        hdrs["Content-Type"] = "application/json"
        payload = json.dumps(json_body)
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(url, method="POST" if payload is not None else "GET", body=payload,
                                  headers=hdrs, raise_error=False, request_timeout=20)
    finally:
        client.close()


def readme_shows(*fragments: str) -> None:
    for fragment in fragments:
        assert fragment in README, f"the README no longer shows {fragment!r}"


# ---------------------------------------------------------------------------
# gateway serve --demo
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_serve_demo_logs_in_with_wechat_as_the_readme_shows(tmp_path):
    port, upstream_port, sandbox_port = free_port(), free_port(), free_port()
    config = demo_config(tmp_path, sandbox_port)
    argv = ["serve", "--log-level", "WARNING", "--config", str(config), "--port", str(port),
            "--demo", "--demo-upstream", f"127.0.0.1:{upstream_port}"]
    gw, sandbox = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}"
    async with Gateway(tmp_path, argv, port) as demo:
        # 1. a login code, as wx.login gives it
        readme_shows("""curl -s -X POST localhost:9100/sandbox/login-code -d '{"openid": "o-alice"}'""")
        r = await fetch(sandbox + "/sandbox/login-code", data='{"openid": "o-alice"}')
        assert r.code == 200, r.body
        minted = body(r)
        assert minted["appid"] == "wx1234567890abcdef" and minted["openid"] == "o-alice"
        readme_shows('"appid": "wx1234567890abcdef", "openid": "o-alice"')

        # 2. log in with it
        readme_shows("localhost:8080/auth/wechat/login", """-d '{"code": "sbx-..."}'""")
        assert minted["code"].startswith("sbx-")
        r = await fetch(gw + "/auth/wechat/login", json_body={"code": minted["code"]})
        assert r.code == 200, r.body
        login = body(r)
        token = login["token"]
        assert token.startswith("gws_") and login["session"]["provider"] == "wechat"

        # 3. user data, encrypted under this login's session_key, decrypted by the gateway
        readme_shows("""curl -s -X POST localhost:9100/sandbox/encrypted-data -d '{"openid": "o-alice", "data": {"nickName": "Alice"}}'""",
                     "localhost:8080/auth/wechat/decrypt", """-d '{"encryptedData": "...", "iv": "..."}'""",
                     """{"openId": "o-alice", "nickName": "Alice"}""")
        r = await fetch(sandbox + "/sandbox/encrypted-data", data='{"openid": "o-alice", "data": {"nickName": "Alice"}}')
        assert r.code == 200, r.body
        sample = body(r)
        assert set(sample) == {"encryptedData", "iv"}
        r = await fetch(gw + "/auth/wechat/decrypt", json_body=sample, token=token)
        assert r.code == 200, r.body
        assert body(r) == {"openId": "o-alice", "nickName": "Alice"}

        # 4. a phone number from a getPhoneNumber code
        readme_shows("""curl -s -X POST localhost:9100/sandbox/phone-code -d '{"phoneNumber": "+86 13800138000"}'""",
                     "localhost:8080/auth/wechat/phone", """-d '{"code": "sbx-phone-..."}'""",
                     """{"phoneNumber": "+86 13800138000", "purePhoneNumber": "13800138000", "countryCode": "86"}""")
        r = await fetch(sandbox + "/sandbox/phone-code", data='{"phoneNumber": "+86 13800138000"}')
        assert r.code == 200, r.body
        phone_code = body(r)["code"]
        assert phone_code.startswith("sbx-phone-")
        r = await fetch(gw + "/auth/wechat/phone", json_body={"code": phone_code}, token=token)
        assert r.code == 200, r.body
        assert body(r) == {"phoneNumber": "+86 13800138000", "purePhoneNumber": "13800138000", "countryCode": "86"}

        r = await fetch(gw + "/auth/session", token=token)
        profile = body(r)["user"]["profile"]
        assert profile["nickName"] == "Alice" and profile["purePhoneNumber"] == "13800138000"

        # a later wx.login: its code goes along with the data sampled after it
        readme_shows('"reason": "session_key_stale"', '{"encryptedData", "iv", "code"}')
        fresh_code = body(await fetch(sandbox + "/sandbox/login-code", data='{"openid": "o-alice"}'))["code"]
        fresh = body(await fetch(sandbox + "/sandbox/encrypted-data", data='{"openid": "o-alice"}'))
        r = await fetch(gw + "/auth/wechat/decrypt", json_body={**fresh, "code": fresh_code}, token=token)
        assert r.code == 200 and body(r)["nickName"] == "Sandbox User", r.body

        # the demo upstream, moved to upstream_port with the routes, echoes every X-* header
        r = await fetch(gw + "/api/hello", token=token, headers={"X-Trace": "readme"})
        assert r.code == 200, r.body
        echo = body(r)
        seen = {k.lower(): v for k, v in echo["headers"].items()}
        assert seen["x-user-id"] == login["user"]["id"] and seen["x-auth-provider"] == "wechat"
        assert seen["x-session-id"] == login["session"]["id"]
        assert seen["x-wechat-appid"] == "wx1234567890abcdef" and seen["x-wechat-openid"] == "o-alice"
        assert {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"} <= set(seen)
        assert seen["x-trace"] == "readme"
        assert "authorization" not in seen

        assert await demo.stop() == 0
    out = demo.output()
    assert "gateway listening on" in out
    assert " INFO " not in out, out  # --log-level WARNING, given after the subcommand


@pytest.mark.gen_test(timeout=60)
async def test_serve_demo_says_which_sandbox_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sandbox_port = taken.getsockname()[1]
        config = demo_config(tmp_path, sandbox_port)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(free_port()),
            "--demo", "--demo-upstream", f"127.0.0.1:{free_port()}", cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, out
    assert f"127.0.0.1:{sandbox_port}" in out.decode() and "Traceback" not in out.decode()


def test_demo_routes_follow_the_moved_upstream_and_others_stay(tmp_path):
    config = load_config(data={
        "profiles": {"sqlite_path": str(tmp_path / "p.db")},
        "routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9000"},
                   {"prefix": "/v2/", "upstream": "http://127.0.0.1:9000/base"},
                   {"prefix": "/other/", "upstream": "http://127.0.0.1:9001"}],
    }, environ={})
    moved = follow_upstream(config, "127.0.0.1:9100")
    assert [r.upstream for r in moved.routes] == ["http://127.0.0.1:9100", "http://127.0.0.1:9100/base",
                                                  "http://127.0.0.1:9001"]
    assert follow_upstream(config, "127.0.0.1:9000") is config


def test_make_run_moves_the_gateway_and_the_demo_upstream():
    def dry_run(*variables: str) -> str:
        p = subprocess.run(["make", "-n", "run", *variables], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        (line,) = [line for line in p.stdout.splitlines() if " serve " in line]
        return line

    assert dry_run().endswith("serve --config conf/gateway.toml --port 8080 --demo --demo-upstream 127.0.0.1:9000")
    assert dry_run("PORT=8081", "UPSTREAM_PORT=9001").endswith(
        "--port 8081 --demo --demo-upstream 127.0.0.1:9001")


# ---------------------------------------------------------------------------
# The echo upstream
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_the_demo_upstream_echoes_every_x_header_and_nothing_else():
    server = tornado.httpserver.HTTPServer(make_demo_app())
    port = free_port()
    server.listen(port, "127.0.0.1")
    try:
        sent = {"X-User-Id": "u_1", "X-Auth-Provider": "apikey", "X-Auth-Scopes": "orders:read orders:write",
                "X-WeChat-OpenId": "o-1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com",
                "X-Consent": "terms-2024", "X-Profile-Nickname": "Alice", "X-Request-Id": "r1",
                "Authorization": "Bearer gws_x", "Cookie": "a=b", "Accept": "application/json"}
        r = await fetch(f"http://127.0.0.1:{port}/api/hello?x=1", headers=sent)
        assert r.code == 200, r.body
        echo = body(r)
        assert echo["path"] == "/api/hello" and echo["method"] == "GET" and echo["message"] == "hello, u_1"
        seen = {k.lower(): v for k, v in echo["headers"].items()}
        assert seen == {k.lower(): v for k, v in sent.items() if k.lower().startswith("x-")}
        r = await fetch(f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": "10.0.0.1"})
        assert body(r)["headers"] == {"X-Forwarded-For": "10.0.0.1"} and body(r)["message"] == "hello, anonymous"
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Global flags after the subcommand
# ---------------------------------------------------------------------------


def gateway_cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_log_level_and_config_go_before_or_after_the_subcommand(tmp_path):
    for argv in (["check-config", "--log-level", "DEBUG", "--config", "conf/gateway.toml"],
                 ["--log-level", "debug", "check-config", "--config", "conf/gateway.toml"],
                 ["--config", "conf/gateway.toml", "check-config", "--log-level=WARNING"]):
        p = gateway_cli(*argv)
        assert p.returncode == 0 and "OK" in p.stdout, (argv, p.stderr)
    p = gateway_cli("check-config", "--config", "conf/gateway.toml", "--log-level", "LOUD")
    assert p.returncode == 2 and "LOUD" in p.stderr and "Traceback" not in p.stderr, p.stderr
    # a plugin's nested subcommand takes them too
    config = tmp_path / "g.toml"
    config.write_text(f'[profiles]\nsqlite_path = {json.dumps(str(tmp_path / "p.db"))}\n')
    p = gateway_cli("apikey", "list", "--user", "u_nobody", "--log-level", "ERROR", "--config", str(config))
    assert p.returncode == 1 and "no user with id 'u_nobody'" in p.stderr, p.stderr
    p = gateway_cli("--config", str(config), "apikey", "list", "--user", "u_nobody")
    assert p.returncode == 1 and "no user with id 'u_nobody'" in p.stderr, p.stderr
