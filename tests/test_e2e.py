"""End to end: `bin/gateway serve` as a subprocess with a real redis-server,
a third-party provider package installed from `tests/plugins/` into a fresh
directory, and a login through it to a proxied request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.testing import body, children_of, free_port
from password_support import PasswordClient as Client

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE_PKG = ROOT / "tests" / "plugins" / "gateway_example_provider"
SECRET = "example-shared-secret-for-tests"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The third-party provider package, installed with pip into its own directory."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "pkg"  # a build writes build/ and *.egg-info beside the source
    shutil.copytree(EXAMPLE_PKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return target


def write_config(path: Path, *, port: int, redis_url: str, upstream_url: str, db: Path) -> None:
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}

[sessions]
store = "redis"
redis_url = "{redis_url}"
cookie_secure = false

[profiles]
store = "sqlite"
sqlite_path = "{db}"

[[routes]]
prefix = "/api/"
upstream = "{upstream_url}"

[providers.password]
time_cost = 1
memory_cost = 64
parallelism = 1

[providers.example]
secret_env = "EXAMPLE_SECRET"
display_name = "Acme SSO"
""")


def gateway_env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    env["EXAMPLE_SECRET"] = SECRET
    return env


def test_check_config_sees_the_installed_third_party_provider(example_site, tmp_path, redis_url):
    cfg = tmp_path / "gateway.toml"
    write_config(cfg, port=free_port(), redis_url=redis_url, upstream_url="http://127.0.0.1:9", db=tmp_path / "p.db")
    ok = subprocess.run([str(ROOT / "bin" / "gateway"), "check-config", "--config", str(cfg)],
                        env=gateway_env(example_site), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "example" in ok.stdout and "password" in ok.stdout
    # Without the package the same file is refused, naming the table.
    env = dict(os.environ, EXAMPLE_SECRET=SECRET)
    missing = subprocess.run([str(ROOT / "bin" / "gateway"), "check-config", "--config", str(cfg)],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "providers.example" in missing.stderr


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM the gateway and collect its output; a gateway (or supervisor)
    that does not stop within 15 s is killed with its process group and fails."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
        raise AssertionError("the gateway did not stop on SIGTERM") from None


def sign(subject: str) -> str:
    """What the identity server hands out: <subject>.<hmac>."""
    return subject + "." + hmac.new(SECRET.encode(), subject.encode(), hashlib.sha256).hexdigest()[:32]


async def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("gateway did not start listening")


@pytest.mark.gen_test(timeout=60)
async def test_serve_subprocess_login_through_third_party_plugin_and_proxy(
        example_site, tmp_path, redis_url, redis_server, upstream):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_config(cfg, port=port, redis_url=redis_url, upstream_url=upstream.url, db=tmp_path / "p.db")
    proc = subprocess.Popen([str(ROOT / "bin" / "gateway"), "serve", "--config", str(cfg)],
                            env=gateway_env(example_site), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await wait_listening(proc, port)

        # A login through the third-party provider...
        r = await client.request("POST", "/auth/example/login", json_body={"ticket": sign("emp-1042")})
        assert r.code == 200, r.body
        login = body(r)
        assert login["user"]["profile"] == {"sso": "Acme SSO", "sso_subject": "emp-1042"}
        token = login["token"]

        # ...a proxied request carrying the identity, never the credential...
        r = await client.request("GET", "/api/orders?page=2", token=token)
        assert r.code == 200, r.body
        seen = upstream.last
        assert (seen.path, seen.query) == ("/api/orders", "page=2")
        assert seen.header("X-User-Id") == login["user"]["id"]
        assert seen.header("X-Auth-Provider") == "example"
        assert seen.header("X-Session-Id") == login["session"]["id"]
        assert seen.header("Authorization") is None

        # ...a refused ticket, the session kept in Redis, the built-in provider alongside.
        r = await client.request("POST", "/auth/example/login", json_body={"ticket": "emp-1042.forged"})
        assert r.code == 401 and body(r)["error"] == "invalid_credentials"
        session_id = login['session']['id']  # s_<tag>_...: its key is under the tag
        assert f"gw:{{{session_id[2:5]}}}:s:{session_id}" in redis_server.command("KEYS", "gw:{*}:s:*")
        reg = await client.register("bob", "a long enough password")
        assert reg["user"]["id"] != login["user"]["id"]
        r = await client.request("POST", "/auth/logout", token=token)
        assert r.code == 204
        assert (await client.request("GET", "/api/orders", token=token)).code == 401
    finally:
        client.close()
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert "plugins apikey, example, password, wechat;" in err  # built-ins and the installed package alike
    assert token not in out + err and SECRET not in out + err


@pytest.mark.gen_test(timeout=60)
async def test_serve_with_two_workers_shares_sessions_and_stops_on_sigterm(tmp_path, redis_url, upstream):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_config(cfg, port=port, redis_url=redis_url, upstream_url=upstream.url, db=tmp_path / "p.db")
    cfg.write_text(cfg.read_text().replace('port = ', 'workers = 2\nport = ', 1)
                   .split("[providers.example]")[0])
    proc = subprocess.Popen([str(ROOT / "bin" / "gateway"), "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await wait_listening(proc, port)  # (each worker listens on the port with its own socket)
        workers = children_of(proc.pid)
        for _ in range(100):
            if len(workers) == 2:
                break
            await asyncio.sleep(0.05)
            workers = children_of(proc.pid)
        reg = await client.register("carol", "a long enough password")
        # Many requests land on both workers; every one knows the session (it is in Redis).
        for _ in range(20):
            client.http.close()
            client = Client(f"http://127.0.0.1:{port}")
            r = await client.request("GET", "/api/x", token=reg["token"], headers={"Connection": "close"})
            assert r.code == 200, r.body
    finally:
        client.close()
        _, err = stop(proc)
    assert proc.returncode == 0, err
    assert len(workers) == 2
    for pid in workers:  # every worker is gone, not orphaned
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    # No worker survives: nothing listens on the port any more.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))
        s.listen()


def _crashing_workers(listen_first: bool) -> subprocess.CompletedProcess[str]:
    script = ("import sys\nfrom gateway.config import load_config\n"
              "from gateway.server import open_slots, supervise\n"
              "config = load_config(data={'server': {'workers': 2}, 'sessions': {'store': 'redis'}, 'admin': {'port': 0}})\n"
              "start = supervise(config, open_slots('127.0.0.1', 0, 2), burst=2, window=60)\n"
              + ("start.notify.listening()\n" if listen_first else "") +
              "sys.exit(3)  # only workers get here\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)


def test_supervisor_gives_up_on_a_crash_loop_with_a_failure_status():
    """Workers that keep dying once they served: restarted a few times, then
    the supervisor stops and exits 1, so a service manager sees the failure."""
    done = _crashing_workers(listen_first=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("starting another") == 2
    assert "restarts within 60s: stopping" in done.stderr


def test_a_worker_that_cannot_start_stops_the_gateway_at_once():
    """A worker that fails before any worker ever listened (an unusable
    profile store, a bad plugin setting) would fail again: no restarts,
    exit 1 at once."""
    done = _crashing_workers(listen_first=False)
    assert done.returncode == 1, done.stderr
    assert "starting another" not in done.stderr
    assert "exited with 3 before any worker started: stopping" in done.stderr


def test_an_unusable_sqlite_path_stops_serve_at_once_naming_the_setting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[profiles]\nsqlite_path = "{blocker}/profiles.db"\n[server]\nport = 0\n[admin]\nport = 0\n')
    done = subprocess.run([str(ROOT / "bin" / "gateway"), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "starting another" not in done.stderr
    assert "cannot open the SQLite profile store (profiles.sqlite_path)" in done.stderr


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_lets_requests_in_flight_finish(tmp_path, redis_url, upstream):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_config(cfg, port=port, redis_url=redis_url, upstream_url=upstream.url, db=tmp_path / "p.db")
    cfg.write_text(cfg.read_text().split("[providers.example]")[0]
                   + '\n[[routes]]\nprefix = "/slow/"\nupstream = "' + upstream.url + '"\nauth = "public"\n')
    proc = subprocess.Popen([str(ROOT / "bin" / "gateway"), "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await wait_listening(proc, port)
        pending = asyncio.ensure_future(client.request("GET", "/slow/slow?s=1.5"))
        for _ in range(100):  # until the upstream has the request
            if any(seen.path == "/slow/slow" for seen in upstream.seen):
                break
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        r = await pending
        assert r.code == 200, r.body
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "1 request(s) in flight" in err


@pytest.mark.gen_test(timeout=90)
async def test_two_workers_share_wechat_sessions_one_access_token_and_api_key_revocation(tmp_path, redis_url, upstream):
    """`gateway serve` with two worker processes on one Redis: a WeChat
    session's sealed session_key opens in either worker, concurrent phone
    calls across both make one stable_token request, and an API key revoked
    with the CLI stops working on every worker within cache_ttl."""
    import base64

    from Crypto.Cipher import AES

    from gateway.testing.wechat import STABLE_TOKEN, start_fake_wechat

    fake, fake_server = start_fake_wechat(free_port())
    fake.add_app("wx4f4bc4dec97d474b", "app-secret-e2e")
    fake.delays[STABLE_TOKEN] = 0.3  # the callers overlap
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_config(cfg, port=port, redis_url=redis_url, upstream_url=upstream.url, db=tmp_path / "p.db")
    cfg.write_text(cfg.read_text().replace('port = ', 'workers = 2\nport = ', 1)
                   .replace('cookie_secure = false', 'cookie_secure = false\nencryption_key_env = "GW_SEAL"')
                   .split("[providers.example]")[0]
                   + f'\n[providers.wechat]\napi_base = "{fake.url}"\n'
                   + '[providers.wechat.apps.main]\nappid = "wx4f4bc4dec97d474b"\nsecret_env = "WX_SECRET"\n'
                   + '[providers.apikey]\ncache_ttl = "1s"\n')
    env = dict(os.environ, GW_SEAL=base64.b64encode(os.urandom(32)).decode(), WX_SECRET="app-secret-e2e")
    proc = subprocess.Popen([str(ROOT / "bin" / "gateway"), "serve", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def fresh() -> Client:  # a new connection: lands on either worker
        return Client(f"http://127.0.0.1:{port}")

    clients: list[Client] = []
    try:
        await wait_listening(proc, port)
        session_key = base64.b64encode(os.urandom(16)).decode()
        fake.add_code("code-e2e", appid="wx4f4bc4dec97d474b", openid="o-e2e", session_key=session_key)
        clients.append(fresh())
        r = await clients[0].request("POST", "/auth/wechat/login", json_body={"code": "code-e2e"})
        assert r.code == 200, r.body
        login = body(r)
        token, user_id = login["token"], login["user"]["id"]

        plain = json.dumps({"nickName": "E2E", "watermark": {"appid": "wx4f4bc4dec97d474b"}}).encode()
        plain += bytes([16 - len(plain) % 16]) * (16 - len(plain) % 16)
        iv = os.urandom(16)
        encrypted = AES.new(base64.b64decode(session_key), AES.MODE_CBC, iv).encrypt(plain)
        payload = {"encryptedData": base64.b64encode(encrypted).decode(), "iv": base64.b64encode(iv).decode()}
        for _ in range(6):
            clients.append(fresh())
            r = await clients[-1].request("POST", "/auth/wechat/decrypt", json_body=payload, token=token,
                                          headers={"Connection": "close"})
            assert r.code == 200 and body(r)["nickName"] == "E2E", r.body

        for i in range(20):
            fake.add_phone_code(f"phone-{i}")
        calls = []
        for i in range(20):
            clients.append(fresh())
            calls.append(clients[-1].request("POST", "/auth/wechat/phone", json_body={"code": f"phone-{i}"},
                                             token=token, headers={"Connection": "close"}))
        answers = await asyncio.gather(*calls)
        assert [a.code for a in answers] == [200] * 20, [a.body for a in answers if a.code != 200]
        assert fake.count(STABLE_TOKEN) == 1

        created = subprocess.run([str(ROOT / "bin" / "gateway"), "apikey", "create", "--config", str(cfg),
                                  "--user", user_id, "--name", "e2e"], env=env, capture_output=True, text=True)
        assert created.returncode == 0, created.stderr
        key = next(line.split(":", 1)[1].strip() for line in created.stdout.splitlines() if line.startswith("key:"))
        key_id = next(line.split(":", 1)[1].strip() for line in created.stdout.splitlines() if line.startswith("id:"))
        for _ in range(6):
            clients.append(fresh())
            r = await clients[-1].request("GET", "/api/x", headers={"X-API-Key": key, "Connection": "close"})
            assert r.code == 200 and upstream.seen[-1].header("X-User-Id") == user_id
        revoked = subprocess.run([str(ROOT / "bin" / "gateway"), "apikey", "revoke", "--config", str(cfg), key_id],
                                 env=env, capture_output=True, text=True)
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.sleep(1.2)  # cache_ttl, on every worker
        for _ in range(6):
            clients.append(fresh())
            r = await clients[-1].request("GET", "/api/x", headers={"X-API-Key": key, "Connection": "close"})
            assert r.code == 401, r.body
    finally:
        for c in clients:
            c.close()
        out, err = stop(proc)
        fake_server.stop()
    assert proc.returncode == 0, err
    for secret in ("app-secret-e2e", session_key, key, env["GW_SEAL"], "code-e2e", "phone-1"):
        assert secret not in out + err
