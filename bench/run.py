"""The gateway's data path against a bare baseline, measured in one run.

``make bench`` runs this.  It starts, all on 127.0.0.1 on free ports with
their files in one temporary directory, and stops at the end:

- nginx (``worker_processes 1``) answering ``hello\\n`` with keep-alive: the upstream;
- redis-server without persistence: the gateway's session store;
- ``bench/bare_proxy.py``: a bare Tornado proxy with one pooled ``aiohttp.ClientSession``,
  the baseline;
- ``bench/upstreams.py``: a WebSocket echo server, a hashing upstream for 1 GiB
  transfers and the fake WeChat API of the test suite;
- ``bin/gateway serve`` with sessions in that Redis (one worker, then two, then a third
  start with default password hashing and the fake WeChat for the login rows).

Every measurement is independent: one that fails prints ``failed: reason``
in its row and the others still run.  The table goes to stdout and every
figure, with the machine, to ``bench/results.json``.  The exit status is 0
unless the harness itself is broken (a server of its own does not start, or
the baseline cannot be measured).

Environment: ``BENCH_DURATION`` (seconds per wrk figure, default 10),
``BENCH_CONNECTIONS`` (wrk connections, 16), ``BENCH_WARMUP`` (seconds, 2),
``BENCH_ROUNDS`` (1: rounds over the baseline, public, auth and API key rows,
each row keeping its median round; for a busy machine),
``BENCH_WS_DURATION`` (5), ``BENCH_LOGIN_DURATION`` (5), ``BENCH_BIG_SIZE``
(bytes or e.g. ``1GiB``), ``BENCH_ONLY`` (comma-separated row keys; all by
default), ``BENCH_RESULTS`` (output file, default ``bench/results.json``),
``BENCH_EVENT_LOOP`` (the gateway's ``server.event_loop``, default asyncio).

Row keys: ``nginx`` (the upstream alone, for context), ``baseline`` (the bare
proxy), ``public`` (/pub/), ``auth`` (/api/, Bearer session), ``apikey``
(/keyed/, X-API-Key), ``forward_auth`` (/api/ through nginx with the shipped
``conf/nginx-forward-auth.example.conf``: ``auth_request`` to the gateway's
``/auth/verify``, then nginx proxying to the same upstream), ``redis`` (commands and round trips per request),
``ws_gateway``, ``ws_direct``, ``big_upload``, ``big_download``,
``auth_2_workers``, ``password_logins``, ``wechat_logins``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from upstreams import WECHAT_APPID, WECHAT_SECRET, chunks

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
GATEWAY = str(ROOT / "bin" / "gateway")
SYSTEM_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip().rstrip("s")
    return float(raw) if raw else default


def _size(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", raw)
    if not m:
        raise SystemExit(f"{name}: expected bytes or e.g. 256MiB, 1GiB (got {raw!r})")
    return int(m.group(1)) * {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


DURATION = max(1, int(_seconds("BENCH_DURATION", 10)))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS") or 16)
WARMUP = max(1, int(_seconds("BENCH_WARMUP", 2)))
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS") or 1))
WS_DURATION = _seconds("BENCH_WS_DURATION", 5)
WS_SOCKETS = 8
LOGIN_DURATION = _seconds("BENCH_LOGIN_DURATION", 5)
PASSWORD_CLIENTS = 4
WECHAT_CLIENTS = 16
BIG_SIZE = _size("BENCH_BIG_SIZE", 1 << 30)
BIG_TIMEOUT = 150.0
REDIS_REQUESTS = 2000
REDIS_CLIENTS = 8
#: the gateway's event loop (``BENCH_EVENT_LOOP``: asyncio or uvloop)
EVENT_LOOP = os.environ.get("BENCH_EVENT_LOOP", "asyncio")
ONLY = {k.strip() for k in os.environ.get("BENCH_ONLY", "").split(",") if k.strip()}
RESULTS = Path(os.environ.get("BENCH_RESULTS") or BENCH / "results.json")
PASSWORD = "bench-password-1"
BENCH_ARGON2 = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}


class HarnessError(Exception):
    """A server of the harness's own cannot run: the benchmark means nothing."""


class Failed(Exception):
    """One measurement could not be made; its row says why."""


def want(key: str) -> bool:
    return not ONLY or key in ONLY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, so no server outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Proc:
    """A server the benchmark started (its own session and process group)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.handle = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.handle, stderr=subprocess.STDOUT,
                                      cwd=ROOT, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:  # whatever is left in its group (a gateway's workers, nginx's worker)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.alive():
            self.popen.kill()
        self.popen.wait()
        self.handle.close()


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.tmp / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:
                traceback.print_exc()
        self.procs.clear()


async def wait_port(proc: Proc, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Failed(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)
    raise Failed(f"{proc.name} not listening on port {port} after {timeout:.0f}s: {proc.tail()}")


async def wait_http(proc: Proc, url: str, timeout: float = 30.0) -> None:
    """Until ``url`` answers anything at all over HTTP."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise Failed(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
    raise Failed(f"{proc.name} gave no HTTP answer at {url} within {timeout:.0f}s: {proc.tail()}")


# ---------------------------------------------------------------------------------------------
# the servers
# ---------------------------------------------------------------------------------------------


def which(name: str) -> str:
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        raise HarnessError(f"{name} is not installed (make bench installs it with apt)")
    return path


NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        default_type text/plain;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""


async def start_nginx(stack: Stack) -> str:
    nginx = which("nginx")
    port = free_port()
    conf = stack.tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=stack.tmp, port=port))
    argv = [nginx, "-p", str(stack.tmp), "-e", str(stack.tmp / "nginx-error.log"), "-c", str(conf),
            "-g", "daemon off;"]
    if os.geteuid() == 0:  # its worker would run as nobody: keep it as this user, in this directory
        argv[-1] = "daemon off; user root;"
    proc = stack.start("nginx", argv)
    try:
        await wait_port(proc, port)
    except Failed as exc:
        raise HarnessError(f"nginx did not start: {exc} {(stack.tmp / 'nginx-error.log').read_text(errors='replace')[-400:] if (stack.tmp / 'nginx-error.log').exists() else ''}") from None
    return f"http://127.0.0.1:{port}"


#: the forward-auth nginx configuration the project ships, measured as it is
FORWARD_AUTH_CONF = ROOT / "conf" / "nginx-forward-auth.example.conf"


async def start_forward_auth_nginx(stack: Stack, gateway_url: str, upstream_url: str) -> str:
    """nginx with the shipped forward-auth configuration (rendered and run
    by :class:`gateway.testing.nginx.Nginx`, as the tests run it) in front of
    ``upstream_url``, asking the gateway at ``gateway_url``; its URL.  It is
    stopped with the stack's other servers."""
    from gateway.testing.nginx import Nginx, NginxMissing

    work = stack.tmp / "forward-auth-nginx"
    port = free_port()
    edge = Nginx(work, FORWARD_AUTH_CONF.read_text(), {
        "__LISTEN__": f"127.0.0.1:{port}", "__GATEWAY__": gateway_url.split("://", 1)[1],
        "__UPSTREAM__": upstream_url.split("://", 1)[1], "__TEMP_DIR__": str(work), "__LOG_DIR__": str(work),
    }, port=port, log_level="warn")
    try:
        await asyncio.get_running_loop().run_in_executor(None, edge.start)
    except (NginxMissing, RuntimeError, ValueError) as exc:
        raise Failed(str(exc)) from None
    stack.procs.append(edge)  # type: ignore[arg-type]  # stop_all() stops it too (it has stop())
    return edge.url


async def start_redis(stack: Stack) -> int:
    port = free_port()
    proc = stack.start("redis", [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(stack.tmp)])
    try:
        await wait_port(proc, port)
    except Failed as exc:
        raise HarnessError(f"redis-server did not start: {exc}") from None
    return port


async def start_python(stack: Stack, name: str, script: str, *args: str) -> tuple[Proc, int]:
    port = free_port()
    proc = stack.start(name, [PYTHON, str(BENCH / script), *args, "--port", str(port)])
    await wait_port(proc, port)
    return proc, port


# ---------------------------------------------------------------------------------------------
# gateway configuration
# ---------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(data: dict[str, Any]) -> str:
    out: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and not _tables(v)}
        if name:
            out.append(f"\n[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v)
            elif _tables(v):
                for item in v:
                    out.append(f"\n[[{name + '.' if name else ''}{k}]]")
                    out.extend(f"{ik} = {toml_value(iv)}" for ik, iv in item.items())

    table("", data)
    return "\n".join(out).lstrip() + "\n"


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


@dataclasses.dataclass
class Upstreams:
    nginx: str
    redis_port: int
    ws: str | None
    big: str | None


#: keys of the proxy rewrite, dropped in the fallback configuration
NEW_ROUTE_KEYS = ("websocket", "max_body_size", "read_timeout")


def gateway_config(tmp: Path, up: Upstreams, port: int, workers: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"prefix": "/pub/", "upstream": up.nginx, "auth": "public"},
        {"prefix": "/api/", "upstream": up.nginx, "auth": "required"},
        {"prefix": "/keyed/", "upstream": up.nginx, "auth": "required", "scopes": ["bench"], "allow_sessions": False},
    ]
    if up.ws:
        routes.append({"prefix": "/ws/", "upstream": up.ws, "auth": "required", "websocket": True})
    if up.big:
        routes.append({"prefix": "/big/", "upstream": up.big, "auth": "public", "max_body_size": 0,
                       "connect_timeout": "5s", "request_timeout": "120s", "read_timeout": "60s"})
    return {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers, "shutdown_timeout": "2s",
                   "event_loop": EVENT_LOOP,
                   # the forward-auth nginx on loopback asks /auth/verify (clients of the other rows send
                   # no X-Forwarded-* header: nothing else changes)
                   "trusted_proxies": ["127.0.0.1"], "forward_auth": True},
        "sessions": {"store": "redis", "redis_url": f"redis://127.0.0.1:{up.redis_port}/0",
                     "idle_timeout": "1h", "touch_interval": "10m", "cookie_secure": False},
        "profiles": {"store": "sqlite", "sqlite_path": str(tmp / "profiles.db")},
        "routes": routes,
        "providers": {"password": dict(BENCH_ARGON2)},
        # the gateways measured side by side need no admin listener (its port is one for all)
        "admin": {"port": 0},
        # the figures are the proxy's; the default login limit (20 a minute per address) would only
        # turn the set-up's logins into 429s
        "rate_limits": [],
    }


def check_config(path: Path) -> list[str]:
    r = subprocess.run([GATEWAY, "check-config", "--config", str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    if r.returncode == 0:
        return []
    lines = [ln.strip() for ln in r.stderr.strip().splitlines()[1:] if ln.strip()]
    return lines or [f"check-config exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}"]


class Gateway:
    """One ``bin/gateway serve`` start; ``problem`` says why it is not usable."""

    def __init__(self) -> None:
        self.proc: Proc | None = None
        self.url = ""
        self.problem: str | None = None
        self.refused: list[str] = []  # route prefixes left out of the configuration, with why

    def need(self) -> str:
        if self.problem or self.proc is None:
            raise Failed(self.problem or "the gateway is not running")
        if not self.proc.alive():
            raise Failed(f"the gateway exited with {self.proc.popen.returncode}: {self.proc.tail()}")
        return self.url

    def hint(self, needle: str) -> str:
        """The gateway's last log line naming ``needle``, to explain a failure."""
        if self.proc is None:
            return ""
        try:
            lines = self.proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        found = [ln.strip() for ln in lines if needle in ln]
        return f" (gateway log: {found[-1][:300]})" if found else ""

    def need_route(self, prefix: str) -> str:
        url = self.need()
        for refused in self.refused:
            if refused.startswith(prefix):
                raise Failed(refused)
        return url


async def start_gateway(stack: Stack, name: str, data: dict[str, Any]) -> Gateway:
    gw = Gateway()
    path = stack.tmp / f"{name}.toml"
    try:
        path.write_text(to_toml(data))
        problems = check_config(path)
        if problems:
            fallback = json.loads(json.dumps(data))
            dropped = [r["prefix"] for r in fallback["routes"] if any(k in r for k in NEW_ROUTE_KEYS)]
            if not dropped:
                raise Failed("config refused: " + "; ".join(problems))
            fallback["routes"] = [r for r in fallback["routes"] if r["prefix"] not in dropped]
            path.write_text(to_toml(fallback))
            if check_config(path):
                raise Failed("config refused: " + "; ".join(problems))
            gw.refused = [f"{prefix} config refused: " + "; ".join(problems) for prefix in dropped]
        gw.url = f"http://127.0.0.1:{data['server']['port']}"
        gw.proc = stack.start(name, [GATEWAY, "--log-level", "WARNING", "serve", "--config", str(path)])
        await wait_http(gw.proc, gw.url + "/pub/ready")
    except Failed as exc:
        gw.problem = f"gateway did not start: {exc}"
    except Exception as exc:
        gw.problem = f"gateway did not start: {exc!r}"
    return gw


async def register(http: aiohttp.ClientSession, url: str, username: str) -> dict[str, Any]:
    async with http.post(url + "/auth/password/register", json={"username": username, "password": PASSWORD},
                         timeout=aiohttp.ClientTimeout(total=30)) as r:
        text = await r.text()
        if r.status not in (200, 201):
            raise Failed(f"register answered HTTP {r.status}: {text[:200]}")
        return json.loads(text)


def create_api_key(config: Path, user_id: str) -> str:
    r = subprocess.run([GATEWAY, "apikey", "create", "--config", str(config), "--user", user_id, "--name", "bench",
                        "--scopes", "bench"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    m = re.search(r"^key:\s+(gwk_\S+)", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise Failed(f"apikey create exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    lat = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$",
                                                              text, re.M)}
    if not rps or not total or "50" not in lat or "99" not in lat:
        raise Failed("could not read wrk's output: " + " | ".join(text.strip().splitlines()[-4:]))
    out: dict[str, Any] = {"rps": float(rps.group(1)), "requests": int(total.group(1)),
                           "p50_ms": lat["50"], "p75_ms": lat.get("75"), "p90_ms": lat.get("90"),
                           "p99_ms": lat["99"]}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) \
        if errors else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    return out


async def run_wrk(url: str, headers: dict[str, str], duration: int) -> str:
    argv = [which("wrk"), "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    proc = await asyncio.create_subprocess_exec(*argv, url, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise Failed(f"wrk did not finish within {duration + 30}s")
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise Failed(f"wrk exited {proc.returncode}: {text.strip()[-300:]}")
    return text


async def http_load(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """One request first (it must be a 200), a warm-up, then the measured wrk run."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
            body = await r.read()
            if r.status != 200:
                raise Failed(f"HTTP {r.status}: {body[:200].decode(errors='replace')}")
    await run_wrk(url, headers, WARMUP)
    result = parse_wrk(await run_wrk(url, headers, DURATION))
    if result["non_2xx"] > result["requests"] * 0.001:
        raise Failed(f"{result['non_2xx']} of {result['requests']} answers were not 2xx/3xx")
    return result


def redis_stats(port: int) -> tuple[dict[str, int], int]:
    """Calls per command (``INFO commandstats``, less INFO/CONFIG) and reads processed
    (``total_reads_processed``: a pipeline arriving at once is one read, so this counts round trips)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        stats = client.info("all")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
             if name.startswith("cmdstat_") and name not in ("cmdstat_info", "cmdstat_config")}
    return calls, int(stats.get("total_reads_processed", 0))


async def redis_per_request(port: int, url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Redis commands and round trips per request, over REDIS_REQUESTS requests."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=REDIS_CLIENTS)) as http:
        async def one() -> None:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                body = await r.read()
                if r.status != 200:
                    raise Failed(f"HTTP {r.status}: {body[:200].decode(errors='replace')}")

        await one()
        await asyncio.sleep(0.2)
        before, reads_before = redis_stats(port)
        left = iter(range(REDIS_REQUESTS))

        async def worker() -> None:
            for _ in left:
                await one()

        await asyncio.gather(*(worker() for _ in range(REDIS_CLIENTS)))
        await asyncio.sleep(0.2)
        after, reads_after = redis_stats(port)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v}
    total = sum(delta.values())
    reads = max(0, reads_after - reads_before - 1)  # less the second INFO's own read
    return {"requests": REDIS_REQUESTS, "concurrency": REDIS_CLIENTS, "commands": total,
            "per_request": total / REDIS_REQUESTS, "round_trips_per_request": reads / REDIS_REQUESTS,
            "by_command": delta}


async def ws_echo(url: str, headers: dict[str, str], gw: Gateway | None = None) -> dict[str, Any]:
    """WS_SOCKETS sockets, each sending a 32-byte text message and awaiting its echo, for WS_DURATION."""
    message = "x" * 32
    async with aiohttp.ClientSession() as http:
        sockets = []
        try:
            for _ in range(WS_SOCKETS):
                try:
                    sockets.append(await http.ws_connect(url, headers=headers, autoping=True,
                                                         timeout=aiohttp.ClientWSTimeout(ws_close=2),
                                                         max_msg_size=1 << 20))
                except aiohttp.WSServerHandshakeError as exc:
                    hint = gw.hint(" /ws/") if gw else ""
                    raise Failed(f"handshake answered HTTP {exc.status} ({exc.message}){hint}") from None

            async def exchange(ws: aiohttp.ClientWebSocketResponse, until: float) -> int:
                n = 0
                while time.monotonic() < until:
                    await ws.send_str(message)
                    msg = await ws.receive(timeout=5)
                    if msg.type != aiohttp.WSMsgType.TEXT or msg.data != message:
                        raise Failed(f"expected the echo, got {msg.type.name} {str(msg.data)[:100]}")
                    n += 1
                return n

            await asyncio.gather(*(exchange(ws, time.monotonic() + 1.0) for ws in sockets))  # warm-up
            start = time.monotonic()
            counts = await asyncio.gather(*(exchange(ws, start + WS_DURATION) for ws in sockets))
            elapsed = time.monotonic() - start
        except asyncio.TimeoutError:
            raise Failed("no echo within 5s") from None
        finally:
            for ws in sockets:
                await ws.close()
    return {"messages": sum(counts), "seconds": elapsed, "msgs_per_s": sum(counts) / elapsed,
            "sockets": WS_SOCKETS, "message_bytes": len(message)}


def worker_of(supervisor: int) -> int:
    """The one worker of a one-worker gateway (the supervisor's child), whose
    memory the streaming figures are about."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(supervisor):
            return int(status.parent.name)
    raise RuntimeError(f"gateway {supervisor} has no worker")


class RssSampler:
    """Peak VmRSS of one process, read every 50 ms on a thread of its own."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.read()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def rss_figures(rss: RssSampler, size: int, seconds: float) -> dict[str, Any]:
    return {"bytes": size, "seconds": seconds, "mib_per_s": size / (1 << 20) / seconds if seconds else None,
            "rss_before_kib": rss.before, "rss_peak_kib": rss.peak, "rss_growth_kib": rss.peak - rss.before}


async def upstream_record(big: str, kind: str, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{big}/big/{kind}/{key}", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                return {}
            return await r.json()


async def big_upload(gw: Gateway, big: str) -> dict[str, Any]:
    url = gw.need_route("/big/")
    assert gw.proc is not None
    key = f"up-{os.getpid()}-{time.time_ns()}"
    sent = hashlib.sha256()

    async def body() -> Any:
        for piece in chunks(BIG_SIZE, key.encode()):
            sent.update(piece)
            yield piece

    timeout = aiohttp.ClientTimeout(total=BIG_TIMEOUT, sock_read=60)
    with RssSampler(worker_of(gw.proc.pid)) as rss:
        start = time.monotonic()
        async with aiohttp.ClientSession() as http:
            try:
                async with http.post(f"{url}/big/upload?id={key}", data=body(), timeout=timeout,
                                     headers={"Content-Length": str(BIG_SIZE),
                                              "Content-Type": "application/octet-stream"}) as r:
                    text = await r.text()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise Failed(f"upload cut short: {exc!r}"[:300] + gw.hint("/big/upload")) from None
        seconds = time.monotonic() - start
    if status != 200:
        raise Failed(f"HTTP {status}: {text[:200]}")
    received = await upstream_record(big, "received", key)
    out = rss_figures(rss, BIG_SIZE, seconds)
    out.update(client_sha256=sent.hexdigest(), upstream_sha256=received.get("sha256"),
               upstream_bytes=received.get("bytes"))
    out["sha256_match"] = out["client_sha256"] == out["upstream_sha256"] and received.get("bytes") == BIG_SIZE
    if not out["sha256_match"]:
        out["error"] = (f"SHA-256 mismatch: sent {BIG_SIZE} bytes, upstream received {received.get('bytes')} "
                        f"({out['upstream_sha256']} vs {out['client_sha256']})")
    return out


async def big_download(gw: Gateway, big: str) -> dict[str, Any]:
    url = gw.need_route("/big/")
    assert gw.proc is not None
    key = f"down-{os.getpid()}-{time.time_ns()}"
    got, length = hashlib.sha256(), 0
    timeout = aiohttp.ClientTimeout(total=BIG_TIMEOUT, sock_read=60)
    with RssSampler(worker_of(gw.proc.pid)) as rss:
        start = time.monotonic()
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            try:
                async with http.get(f"{url}/big/download?size={BIG_SIZE}&id={key}", timeout=timeout) as r:
                    if r.status != 200:
                        raise Failed(f"HTTP {r.status}: {(await r.read())[:200].decode(errors='replace')}")
                    async for piece in r.content.iter_chunked(1 << 20):
                        got.update(piece)
                        length += len(piece)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise Failed(f"download cut short after {length} bytes: {exc!r}"[:300] + gw.hint("/big/download")) from None
        seconds = time.monotonic() - start
    await asyncio.sleep(0.2)
    sent = await upstream_record(big, "sent", key)
    out = rss_figures(rss, length, seconds)
    out.update(client_sha256=got.hexdigest(), upstream_sha256=sent.get("sha256"), upstream_bytes=sent.get("bytes"))
    out["sha256_match"] = out["client_sha256"] == out["upstream_sha256"] and length == BIG_SIZE
    if not out["sha256_match"]:
        out["error"] = (f"SHA-256 mismatch: upstream sent {sent.get('bytes')} bytes, client received {length} "
                        f"({out['upstream_sha256']} vs {out['client_sha256']})")
    return out


async def logins(url: str, clients: int, make_request: Callable[[], tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """``clients`` concurrent loops of logins for LOGIN_DURATION; logins/s counts the 200s."""
    ok, errors, latencies = 0, 0, []
    first_error: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        async def one() -> None:
            nonlocal ok, errors
            path, payload = make_request()
            t0 = time.monotonic()
            try:
                async with http.post(url + path, json=payload, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    text = await r.text()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, text = 0, repr(exc)
            if status == 200:
                ok += 1
                latencies.append(time.monotonic() - t0)
            else:
                errors += 1
                if not first_error:
                    first_error.append(f"HTTP {status}: {text[:200]}")

        async def loop(until: float) -> None:
            while time.monotonic() < until:
                await one()

        await loop(time.monotonic() + 0.5)  # warm-up: the first hashes, connections
        if not ok:
            raise Failed(first_error[0] if first_error else "no login succeeded")
        ok = errors = 0
        latencies.clear()
        start = time.monotonic()
        await asyncio.gather(*(loop(start + LOGIN_DURATION) for _ in range(clients)))
        elapsed = time.monotonic() - start
    if not ok:
        raise Failed(first_error[0] if first_error else "no login succeeded")
    latencies.sort()
    out = {"logins": ok, "errors": errors, "seconds": elapsed, "logins_per_s": ok / elapsed, "clients": clients,
           "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}
    if first_error:
        out["first_error"] = first_error[0]
    return out


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


class Run:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rows: dict[str, Any] = {}
        self.logs: dict[str, Any] = {}

    async def measure(self, key: str, what: Awaitable[dict[str, Any]] | Callable[[], Awaitable[dict[str, Any]]],
                      limit: float = 240.0) -> dict[str, Any] | None:
        if not want(key):
            if asyncio.iscoroutine(what):
                what.close()
            return None
        print(f"  measuring {key} ...", file=sys.stderr, flush=True)
        try:
            coro = what() if callable(what) else what
            result = await asyncio.wait_for(coro, limit)
        except Failed as exc:
            result = {"error": self.clean(str(exc))}
        except asyncio.TimeoutError:
            result = {"error": f"did not finish within {limit:.0f}s"}
        except HarnessError:
            raise
        except Exception as exc:
            result = {"error": self.clean(f"{type(exc).__name__}: {exc}")}
        self.rows[key] = result
        return result

    async def measure_rounds(self, items: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]]) -> None:
        """ROUNDS rounds over ``items``; each row keeps its round of median req/s."""
        samples: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in items}
        for n in range(ROUNDS):
            for key, factory in items:
                result = await self.measure(key, factory)
                if result is not None:
                    samples[key].append(result)
        if ROUNDS == 1:
            return
        for key, results in samples.items():
            if not results:
                continue
            good = sorted((r for r in results if "error" not in r), key=lambda r: r["rps"])
            if not good:
                self.rows[key] = results[0]
                continue
            row = dict(good[(len(good) - 1) // 2])
            row["rounds_rps"] = [r.get("rps") for r in results]
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                row["round_errors"] = errors
            self.rows[key] = row

    def stop_gateway(self, stack: Stack, gw: Gateway, name: str) -> None:
        """Stop it and keep a summary of its log (the gateway logs at WARNING here)."""
        if gw.proc is None:
            return
        stack.stop(gw.proc)
        try:
            lines = gw.proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return
        errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("Traceback")]
        summary: dict[str, Any] = {"error_lines": len(errors),
                                   "warning_lines": sum(" WARNING " in ln for ln in lines)}
        if errors:
            summary["last_error"] = self.clean(errors[-1][:400])
        warnings = [ln for ln in lines if " WARNING " in ln]
        if warnings:
            summary["last_warning"] = self.clean(warnings[-1][:400])
        self.logs[name] = summary

    def clean(self, text: str) -> str:
        """Reasons name no temporary path."""
        return text.replace(str(self.tmp), "<tmp>").replace(str(ROOT) + "/", "")


def ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and "error" not in row


async def measure_all(stack: Stack, run: Run) -> None:
    tmp = stack.tmp
    print("starting nginx, redis, the bare proxy and the upstreams ...", file=sys.stderr, flush=True)
    nginx = await start_nginx(stack)
    redis_port = await start_redis(stack)
    try:
        _, bare_port = await start_python(stack, "bare-proxy", "bare_proxy.py", "--upstream", nginx)
    except Failed as exc:
        raise HarnessError(f"the bare proxy did not start: {exc}") from None
    up = Upstreams(nginx, redis_port, None, None)
    problems: dict[str, str] = {}
    for kind in ("ws-echo", "big"):
        try:
            _, port = await start_python(stack, kind, "upstreams.py", kind)
            if kind == "ws-echo":
                up.ws = f"http://127.0.0.1:{port}"
            else:
                up.big = f"http://127.0.0.1:{port}"
        except Failed as exc:
            problems[kind] = f"the {kind} upstream did not start: {run.clean(str(exc))}"

    await run.measure("nginx", http_load(f"{nginx}/bench/hello", {}))

    # -- one worker ------------------------------------------------------------------------------
    port = free_port()
    gw = await start_gateway(stack, "gateway", gateway_config(tmp, up, port, 1))
    token = key = None
    async with aiohttp.ClientSession() as http:
        try:
            url = gw.need()
            answer = await register(http, url, "bench")
            token, user_id = answer["token"], answer["user"]["id"]
            key = create_api_key(tmp / "gateway.toml", user_id)
        except Failed as exc:
            gw.problem = gw.problem or f"no credentials: {exc}"
        except Exception as exc:
            gw.problem = gw.problem or f"no credentials: {exc!r}"
    bearer = {"Authorization": f"Bearer {token}"}
    keyed = {"X-API-Key": str(key)}

    async def via(path: str, headers: dict[str, str]) -> dict[str, Any]:
        return await http_load(gw.need() + path, headers)

    edge: list[str] = []  # the forward-auth nginx, started on first use

    async def forward_auth() -> dict[str, Any]:
        url = gw.need()
        if not edge:
            edge.append(await start_forward_auth_nginx(stack, url, nginx))
        return await http_load(edge[0] + "/api/hello", bearer)

    # interleaved, so that drift in the machine's load hits every row alike
    await run.measure_rounds([
        ("baseline", lambda: http_load(f"http://127.0.0.1:{bare_port}/bench/hello", {})),
        ("public", lambda: via("/pub/hello", {})),
        ("auth", lambda: via("/api/hello", bearer)),
        ("apikey", lambda: via("/keyed/hello", keyed)),
        ("forward_auth", forward_auth),
    ])

    async def redis_rows() -> dict[str, Any]:
        url = gw.need()
        out: dict[str, Any] = {}
        for name, path, headers in (("auth", "/api/hello", bearer), ("apikey", "/keyed/hello", keyed),
                                    ("public", "/pub/hello", {})):
            try:
                out[name] = await redis_per_request(redis_port, url + path, headers)
            except Failed as exc:
                out[name] = {"error": run.clean(str(exc))}
        if "error" in out["auth"]:
            raise Failed(out["auth"]["error"])
        return out

    await run.measure("redis", redis_rows)

    async def ws(which_: str) -> dict[str, Any]:
        if up.ws is None:
            raise Failed(problems["ws-echo"])
        if which_ == "direct":
            return await ws_echo(up.ws.replace("http://", "ws://") + "/ws/echo", {})
        return await ws_echo(gw.need_route("/ws/").replace("http://", "ws://") + "/ws/echo", bearer, gw)

    await run.measure("ws_gateway", lambda: ws("gateway"), 60)
    await run.measure("ws_direct", lambda: ws("direct"), 60)

    async def big(which_: str) -> dict[str, Any]:
        if up.big is None:
            raise Failed(problems["big"])
        return await (big_upload if which_ == "upload" else big_download)(gw, up.big)

    await run.measure("big_upload", lambda: big("upload"), BIG_TIMEOUT + 30)
    await run.measure("big_download", lambda: big("download"), BIG_TIMEOUT + 30)
    run.stop_gateway(stack, gw, "1 worker")

    # -- two workers -----------------------------------------------------------------------------
    if want("auth_2_workers"):
        port = free_port()
        gw2 = await start_gateway(stack, "gateway-2-workers", gateway_config(tmp, up, port, 2))

        async def two_workers() -> dict[str, Any]:
            url = gw2.need()
            headers = bearer
            if token is None:  # the one-worker start gave none
                async with aiohttp.ClientSession() as http:
                    headers = {"Authorization": f"Bearer {(await register(http, url, 'bench'))['token']}"}
            return await http_load(url + "/api/hello", headers)

        await run.measure("auth_2_workers", two_workers)
        run.stop_gateway(stack, gw2, "2 workers")

    # -- logins ----------------------------------------------------------------------------------
    if want("password_logins") or want("wechat_logins"):
        wechat_url = None
        try:
            _, wx_port = await start_python(stack, "fake-wechat", "upstreams.py", "wechat")
            wechat_url = f"http://127.0.0.1:{wx_port}"
        except Failed as exc:
            problems["wechat"] = f"the fake WeChat server did not start: {run.clean(str(exc))}"
        port = free_port()
        data = {
            "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout": "2s"},
            "sessions": {"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/1",
                         "cookie_secure": False,
                         "encryption_key": base64.b64encode(os.urandom(32)).decode()},
            "profiles": {"store": "sqlite", "sqlite_path": str(tmp / "login-profiles.db")},
            "routes": [{"prefix": "/pub/", "upstream": nginx, "auth": "public"}],
            "providers": {"password": {}},  # the provider's default argon2id parameters
            "admin": {"port": 0},
            "rate_limits": [],  # logins per second are measured, not the per-address login limit
        }
        if wechat_url:
            data["providers"]["wechat"] = {"api_base": wechat_url, "timeout": "5s",
                                           "apps": {"bench": {"appid": WECHAT_APPID, "secret": WECHAT_SECRET}}}
        gwl = await start_gateway(stack, "gateway-logins", data)

        async def password_logins() -> dict[str, Any]:
            url = gwl.need()
            async with aiohttp.ClientSession() as http:
                await register(http, url, "bench-login")
            payload = {"username": "bench-login", "password": PASSWORD}
            out = await logins(url, PASSWORD_CLIENTS, lambda: ("/auth/password/login", payload))
            out["argon2id"] = "provider defaults"
            return out

        codes = iter(range(10**9))

        async def wechat_logins() -> dict[str, Any]:
            url = gwl.need()
            if wechat_url is None:
                raise Failed(problems["wechat"])
            return await logins(url, WECHAT_CLIENTS, lambda: ("/auth/wechat/login", {"code": f"bench-{next(codes)}"}))

        await run.measure("password_logins", password_logins, 60)
        await run.measure("wechat_logins", wechat_logins, 60)
        run.stop_gateway(stack, gwl, "logins")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "memory": mem, "python": platform.python_version()}


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, argv in (("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"]), ("redis", ["redis-server", "--version"])):
        try:
            path = shutil.which(argv[0], path=SYSTEM_PATH)
            r = subprocess.run([path or argv[0], *argv[1:]], capture_output=True, text=True, timeout=10)
            out[name] = (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            out[name] = "unknown"
    import tornado

    out["tornado"] = tornado.version
    out["aiohttp"] = aiohttp.__version__
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
        out["gateway_commit"] = rev + ("+uncommitted changes" if dirty else "")
    except Exception:
        pass
    return out


ROWS = [
    ("nginx", "nginx direct (the upstream alone)"),
    ("baseline", "baseline: bare proxy -> nginx"),
    ("public", "gateway /pub/ (public)"),
    ("auth", "gateway /api/ (Bearer session)"),
    ("apikey", "gateway /keyed/ (X-API-Key)"),
    ("forward_auth", "nginx + /auth/verify -> nginx"),
    ("auth_2_workers", "gateway /api/, 2 workers"),
]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: dict[str, Any]) -> dict[str, float | None]:
    def get(key: str, field: str) -> float | None:
        row = rows.get(key)
        return row.get(field) if ok(row) else None

    return {
        "auth_vs_baseline": ratio(get("auth", "rps"), get("baseline", "rps")),
        "public_vs_baseline": ratio(get("public", "rps"), get("baseline", "rps")),
        "apikey_vs_baseline": ratio(get("apikey", "rps"), get("baseline", "rps")),
        "forward_auth_vs_auth": ratio(get("forward_auth", "rps"), get("auth", "rps")),
        "p99_auth_vs_p99_baseline": ratio(get("auth", "p99_ms"), get("baseline", "p99_ms")),
        "auth_2_workers_vs_1_worker": ratio(get("auth_2_workers", "rps"), get("auth", "rps")),
        "ws_gateway_vs_direct": ratio(get("ws_gateway", "msgs_per_s"), get("ws_direct", "msgs_per_s")),
    }


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def report(rows: dict[str, Any], ratio_table: dict[str, float | None], host: dict[str, Any]) -> str:
    lines = [f"{host['nproc']} x {host['cpu_model']}, Linux {host['kernel']}, load average at start "
             f"{host['load_average_at_start'][0]:.2f}",
             f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s --latency, after {WARMUP}s of warm-up"
             + (f"; median of {ROUNDS} interleaved rounds" if ROUNDS > 1 else ""), "",
             f"{'':34}{'req/s':>10}{'p50':>10}{'p99':>10}{'vs baseline':>13}"]
    base = rows.get("baseline", {}).get("rps") if ok(rows.get("baseline")) else None
    for key, label in ROWS:
        row = rows.get(key)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{label:34}failed: {row['error']}")
            continue
        lines.append(f"{label:34}{row['rps']:>10.0f}{row['p50_ms']:>8.2f}ms{row['p99_ms']:>8.2f}ms"
                     f"{fmt(ratio(row['rps'], base)) if key != 'nginx' else '-':>13}")
    lines.append("")
    redis_row = rows.get("redis")
    if redis_row is not None:
        label = "Redis per request"
        if "error" in redis_row:
            lines.append(f"{label:34}failed: {redis_row['error']}")
        else:
            for name, path in (("auth", "/api/"), ("apikey", "/keyed/"), ("public", "/pub/")):
                r = redis_row.get(name, {})
                if "per_request" not in r:
                    lines.append(f"{label + ' ' + path:34}failed: {r.get('error')}")
                    continue
                detail = ", ".join(f"{k} {v / REDIS_REQUESTS:.2f}" for k, v in sorted(r["by_command"].items())
                                   if v / REDIS_REQUESTS >= 0.01)
                lines.append(f"{label + ' ' + path:34}{r['per_request']:>6.2f} commands"
                             + (f" ({detail})" if detail else "")
                             + f", {r['round_trips_per_request']:.2f} round trips")
    for key, label in (("ws_gateway", "WebSocket echo via gateway /ws/"), ("ws_direct", "WebSocket echo direct")):
        row = rows.get(key)
        if row is not None:
            lines.append(f"{label:34}" + (f"failed: {row['error']}" if "error" in row else
                                          f"{row['msgs_per_s']:>10.0f} msgs/s ({row['sockets']} sockets, "
                                          f"{row['message_bytes']}-byte messages, {row['seconds']:.0f}s)"))
    for key, label in (("password_logins", "password logins (default argon2id)"),
                       ("wechat_logins", "WeChat logins (fake WeChat API)")):
        row = rows.get(key)
        if row is not None:
            lines.append(f"{label:34}" + (f"failed: {row['error']}" if "error" in row else
                                          f"{row['logins_per_s']:>10.1f} logins/s (p50 {row['p50_ms']:.1f}ms, "
                                          f"p99 {row['p99_ms']:.1f}ms, {row['clients']} clients)"))
    for key, label in (("big_upload", "upload through /big/"), ("big_download", "download through /big/")):
        row = rows.get(key)
        if row is None:
            continue
        label = f"{BIG_SIZE / (1 << 30):g} GiB {label}" if BIG_SIZE >= 1 << 30 else f"{BIG_SIZE >> 20} MiB {label}"
        if "rss_growth_kib" not in row:
            lines.append(f"{label:34}failed: {row['error']}")
            continue
        text = (f"RSS {row['rss_before_kib'] / 1024:.0f} -> peak {row['rss_peak_kib'] / 1024:.0f} MiB "
                f"(+{row['rss_growth_kib'] / 1024:.1f} MiB), {row['mib_per_s']:.0f} MiB/s, ")
        text += "SHA-256 match" if row.get("sha256_match") else f"failed: {row.get('error')}"
        lines.append(f"{label:34}{text}")
    if max(host["load_average_at_start"][0], host["load_average_at_end"][0]) > host["nproc"] / 2:
        lines += ["", f"note: the machine was busy (load average {host['load_average_at_start'][0]:.2f} at start, "
                      f"{host['load_average_at_end'][0]:.2f} at end, on {host['nproc']} CPUs): the figures are noisy"]
    lines += ["", "ratios"]
    labels = {"auth_vs_baseline": "auth / baseline (req/s)", "public_vs_baseline": "public / baseline (req/s)",
              "apikey_vs_baseline": "API key / baseline (req/s)",
              "forward_auth_vs_auth": "forward auth / gateway auth (req/s)",
              "p99_auth_vs_p99_baseline": "p99 auth / p99 baseline",
              "auth_2_workers_vs_1_worker": "2 workers / 1 worker (auth req/s)",
              "ws_gateway_vs_direct": "WebSocket gateway / direct (msgs/s)"}
    for key, label in labels.items():
        lines.append(f"  {label:40}{fmt(ratio_table.get(key))}")
    return "\n".join(lines)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    stack = Stack(tmp)
    run = Run(tmp)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    broken: str | None = None
    try:
        asyncio.run(measure_all(stack, run))
    except HarnessError as exc:
        broken = run.clean(str(exc))
    except KeyboardInterrupt:
        broken = "interrupted"
    finally:
        stack.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if not broken and want("baseline") and not ok(run.rows.get("baseline")):
        broken = f"the baseline could not be measured: {run.rows.get('baseline', {}).get('error')}"
    ratio_table = ratios(run.rows)
    host = {**machine(), "load_average_at_start": [round(x, 2) for x in load_at_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    print()
    print(report(run.rows, ratio_table, host))
    failed = [k for k, v in run.rows.items() if not ok(v)]
    results = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": host,
        "software": versions(),
        "parameters": {"wrk": f"-t1 -c{CONNECTIONS} -d{DURATION}s --latency", "warmup_s": WARMUP,
                       "ws_sockets": WS_SOCKETS, "ws_duration_s": WS_DURATION,
                       "login_duration_s": LOGIN_DURATION, "password_clients": PASSWORD_CLIENTS,
                       "wechat_clients": WECHAT_CLIENTS, "big_bytes": BIG_SIZE,
                       "redis_requests": REDIS_REQUESTS, "gateway_log_level": "WARNING", "rounds": ROUNDS,
                       "proxy_runs_argon2id": BENCH_ARGON2, "login_runs_argon2id": "provider defaults"},
        "rows": run.rows,
        "ratios": {k: None if v is None else round(v, 3) for k, v in ratio_table.items()},
        "failed": failed,
        "gateway_logs": run.logs,
        "harness_error": broken,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if broken == "interrupted":  # keep the last complete run's file
        print("interrupted: results not written", file=sys.stderr)
        return 1
    try:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS} "
              f"({results['elapsed_s']:.0f}s)")
    except OSError as exc:
        print(f"cannot write {RESULTS}: {exc}", file=sys.stderr)
        return 1
    if failed:
        print(f"failed rows: {', '.join(failed)}")
    if broken:
        print(f"benchmark harness broken: {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
