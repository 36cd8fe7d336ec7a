"""The serving layer of `gateway serve`, run as a real subprocess on
loopback: worker processes with their own listening sockets, running out of
file descriptors, the graceful stop on SIGTERM and the uvloop event loop."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import aiohttp

from gateway.testing import Client, body, children_of

ROOT = Path(__file__).resolve().parent.parent

GATEWAY = str(ROOT / "bin" / "gateway")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- helpers -----------------------------------------------------------------------------


def write_config(tmp_path: Path, upstream_url: str, *, server: str = "", redis_url: str | None = None) -> Path:
    sessions = f'store = "redis"\nredis_url = "{redis_url}"' if redis_url else 'store = "memory"'
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[server]
host = "127.0.0.1"
port = 8080
{server}

[sessions]
{sessions}
cookie_secure = false

[profiles]
store = "sqlite"
sqlite_path = "{tmp_path / 'profiles.db'}"

[[routes]]
prefix = "/public/"
upstream = "{upstream_url}"
auth = "public"

[providers.password]
time_cost = 1
memory_cost = 64
parallelism = 1
""")
    return cfg


@dataclass
class Served:
    """A `gateway serve --port 0` subprocess, its output going to files."""

    proc: subprocess.Popen
    out: Path
    err: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; a gateway that does not stop is killed and fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("the gateway did not stop on SIGTERM") from None


async def start_gateway(tmp_path: Path, cfg: Path, *, prefix: list[str] = (), env: dict | None = None) -> Served:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([*prefix, GATEWAY, "serve", "--config", str(cfg), "--port", "0"],
                                stdout=o, stderr=e, env=env, start_new_session=True)
    served = Served(proc, out, err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}: {served.log()}")
        for line in out.read_text().splitlines():
            if line.startswith("gateway listening on http://127.0.0.1:"):
                served.port = int(line.rsplit(":", 1)[1])
                return served
        await asyncio.sleep(0.05)
    served.stop()
    raise AssertionError("the gateway did not start listening: " + served.log())


def accepted_connections(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to local ``port`` each process holds
    (from /proc/net/tcp and the processes' descriptor tables)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # ESTABLISHED
                    inodes.add(cols[9])
    held = {}
    for pid in pids:
        mine = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    mine.add(link[8:-1])
        held[pid] = len(mine & inodes)
    return held


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process so far, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


async def fresh_connection_request(port: int, path: str) -> bytes:
    """One request on a new connection (``Connection: close``): the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()


# -- workers --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_two_workers_each_serve_a_real_share_of_a_burst_of_connections(tmp_path, upstream, redis_url):
    cfg = write_config(tmp_path, upstream.url, server="workers = 2", redis_url=redis_url)
    served = await start_gateway(tmp_path, cfg)
    try:
        workers: list[int] = []
        for _ in range(200):
            workers = children_of(served.proc.pid)
            if len(workers) == 2 and "listening on" in served.log() and served.log().count("listening on") >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(workers) == 2, served.log()
        before = {pid: cpu_ticks(pid) for pid in workers}

        # A burst of 64 new keep-alive connections, 20 requests on each
        # (1280 in all, to 127.0.0.1).  One shared accepting socket lets the
        # first worker awake take most of such a burst; each worker's own
        # SO_REUSEPORT socket gets about half of the connections.
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                     timeout=aiohttp.ClientTimeout(total=20))

        async def one(url: str) -> int:
            async with http.get(url) as r:
                await r.read()
                return r.status

        answers: list[int] = []
        try:
            for n in range(20):
                answers += await asyncio.gather(*(one(f"{served.url}/public/w?c={i}&n={n}") for i in range(64)))
                if n == 0:  # the 64 connections are open (idle in the client's pool): who accepted them?
                    held = accepted_connections(served.port, workers)
        finally:
            await http.close()
        used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
        assert children_of(served.proc.pid) == workers or set(children_of(served.proc.pid)) == set(workers)
    finally:
        code = served.stop()
    assert code == 0, served.log()
    assert answers == [200] * 1280, sorted(set(answers))
    assert sum(held.values()) == 64 and min(held.values()) >= 13, held  # each worker >= 20% of the connections
    total = sum(used.values())
    assert total >= 20, used  # enough work to tell shares apart (20 ticks = 0.2 s of CPU at 100 Hz)
    for pid, ticks in used.items():
        assert ticks >= 0.2 * total, f"worker {pid} did {ticks} of {total} ticks: {used}"
    # --port 0: every worker listened on the one port the parent picked.
    ports = {line.rsplit(":", 1)[1] for line in served.out.read_text().splitlines() if "listening on" in line}
    assert ports == {str(served.port)}


# -- file descriptors ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.gen_test(timeout=90)
async def test_out_of_file_descriptors_backs_off_quietly_and_serves_again(tmp_path, upstream):
    cfg = write_config(tmp_path, upstream.url)
    served = await start_gateway(tmp_path, cfg, prefix=["prlimit", "--nofile=64:64"])
    idle: list[socket.socket] = []
    try:
        assert "open file limit: 64" in served.log()
        first = await fresh_connection_request(served.port, "/public/before")
        assert first.startswith(b"HTTP/1.1 200 "), first
        # More idle connections than the gateway has descriptors (the rest wait in the backlog).
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        for _ in range(200):
            if "out of file descriptors" in served.log():
                break
            await asyncio.sleep(0.05)
        assert "out of file descriptors" in served.log(), served.log()
        lines_before = served.log().count("out of file descriptors")
        # One worker under its supervisor (which only holds the listening
        # socket): the worker is the process that accepts.
        worker, = children_of(served.proc.pid)
        ticks_before = cpu_ticks(worker)
        started = time.monotonic()
        await asyncio.sleep(3)
        elapsed = time.monotonic() - started
        ticks = cpu_ticks(worker) - ticks_before
        lines = served.log().count("out of file descriptors") - lines_before
        # At most one report a second, and the process mostly sleeps (a busy
        # accept loop would use a whole CPU, elapsed * CLK_TCK ticks).
        assert lines <= elapsed + 1, served.log()
        assert ticks <= 0.25 * elapsed * CLK_TCK, f"{ticks} ticks in {elapsed:.1f}s"
        assert "Traceback" not in served.log()

        for s in idle:
            s.close()
        idle.clear()
        client = Client(served.url)
        try:
            r = await client.request("GET", "/public/after")
        finally:
            client.close()
        assert r.code == 200, r.body
        assert body(r)["path"] == "/public/after"
    finally:
        for s in idle:
            s.close()
        code = served.stop()
    assert code == 0, served.log()
    log = served.log()
    assert "accepting connections again" in log
    assert "Traceback" not in log and "Exception in callback" not in log


# -- graceful stop ---------------------------------------------------------------------------------


@dataclass
class Tally:
    answered: list[tuple[str, int, str | None]] = field(default_factory=list)  # (path, status, Connection)
    closed_unanswered: int = 0  # the connection was closed; the request got no byte of an answer
    refused: int = 0  # could not even connect (nothing listens any more)
    broken: list[str] = field(default_factory=list)  # a partial answer, or none on an open connection
    lock: threading.Lock = field(default_factory=threading.Lock)


def keep_alive_client(port: int, name: str, tally: Tally, stop: threading.Event, limit: int = 2000) -> None:
    """Requests one after the other on one keep-alive connection until the
    gateway closes it (or says Connection: close), ``stop`` or ``limit``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        for n in range(limit):
            if stop.is_set():
                return
            path = f"/public/k?c={name}&n={n}"
            try:
                conn.request("GET", path)
            except ConnectionRefusedError:
                with tally.lock:
                    tally.refused += 1
                return
            except (BrokenPipeError, ConnectionResetError):
                with tally.lock:
                    tally.closed_unanswered += 1
                return
            try:
                response = conn.getresponse()
                response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                with tally.lock:
                    tally.closed_unanswered += 1
                return
            except Exception as exc:  # a timeout (no answer on an open connection), a cut body
                with tally.lock:
                    tally.broken.append(f"{path}: {exc!r}")
                return
            with tally.lock:
                tally.answered.append((path, response.status, response.getheader("Connection")))
            if response.will_close:
                return
    finally:
        conn.close()


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_under_keep_alive_load_answers_every_request_it_took(tmp_path, upstream):
    cfg = write_config(tmp_path, upstream.url, server='shutdown_timeout = "20s"')
    served = await start_gateway(tmp_path, cfg)
    tally = Tally()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        # An idle keep-alive connection: one answered request, then silence.
        # (The upstream runs on this event loop: blocking calls go to threads.)
        loop = asyncio.get_running_loop()
        idle = socket.create_connection(("127.0.0.1", served.port), timeout=10)

        def idle_request() -> bytes:
            idle.sendall(b"GET /public/idle HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += idle.recv(65536)
            return head

        assert (await loop.run_in_executor(None, idle_request)).startswith(b"HTTP/1.1 200 ")

        # A slow request in flight...
        slow_conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)

        def slow_request() -> tuple[int, str | None, bytes]:
            slow_conn.request("GET", "/public/slow?s=2")
            response = slow_conn.getresponse()
            return response.status, response.getheader("Connection"), response.read()

        slow = loop.run_in_executor(None, slow_request)
        # ...and 20 keep-alive clients requesting in a loop (bounded: 2000 requests each).
        for i in range(20):
            threads.append(threading.Thread(target=keep_alive_client, args=(served.port, f"k{i}", tally, stop),
                                            daemon=True))
            threads[-1].start()
        for _ in range(500):
            if any(s.path == "/public/slow" for s in upstream.seen) and len(tally.answered) >= 100:
                break
            await asyncio.sleep(0.02)
        assert any(s.path == "/public/slow" for s in upstream.seen) and len(tally.answered) >= 100, served.log()

        served.proc.send_signal(signal.SIGTERM)
        status, connection, slow_body = await slow
        # The idle connection was closed at once: before the slow answer came.
        idle.setblocking(False)
        try:
            assert idle.recv(65536) == b""
        except ConnectionResetError:
            pass
        idle.close()
        for t in threads:
            await loop.run_in_executor(None, t.join, 30)
        assert not any(t.is_alive() for t in threads)
        code = await loop.run_in_executor(None, served.proc.wait, 30)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            slow_conn.close()
        code = served.stop()
    assert code == 0, served.log()
    assert status == 200 and b"/public/slow" in slow_body
    assert connection is not None and connection.lower() == "close", connection
    # Every request is accounted for: answered in full, or its connection was
    # closed (each client at most once, then it stops); none hung or was cut.
    assert tally.broken == []
    assert tally.closed_unanswered + tally.refused <= 20
    assert all(status == 200 for _, status, _ in tally.answered)
    # Every request the gateway passed on got its answer.
    sent_upstream = {s.path + "?" + s.query for s in upstream.seen if s.path == "/public/k"}
    assert sent_upstream == {path for path, _, _ in tally.answered}
    assert "Traceback" not in served.log()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_went_away_does_not_hold_up_the_stop(tmp_path, upstream):
    """shutdown_timeout is long, and a client gave up on a slow request: the
    stop does not wait for it."""
    cfg = write_config(tmp_path, upstream.url, server='shutdown_timeout = "60s"')
    served = await start_gateway(tmp_path, cfg)
    try:
        gone = socket.create_connection(("127.0.0.1", served.port), timeout=5)
        gone.sendall(b"GET /public/slow?s=40 HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(500):
            if any(s.path == "/public/slow" for s in upstream.seen):
                break
            await asyncio.sleep(0.02)
        gone.close()
        await asyncio.sleep(0.3)
        served.proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, served.proc.wait, 20)
    finally:
        served.stop()
    assert code == 0, served.log()
    assert "0 request(s) in flight" in served.log(), served.log()


# -- event loop ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_uvloop_event_loop_serves_a_proxied_request(tmp_path, upstream):
    pytest.importorskip("uvloop", reason="uvloop is not installed")
    cfg = write_config(tmp_path, upstream.url, server='event_loop = "uvloop"')
    served = await start_gateway(tmp_path, cfg)
    client = Client(served.url)
    try:
        r = await client.request("GET", "/public/on-uvloop?x=1")
    finally:
        client.close()
        code = served.stop()
    assert r.code == 200, r.body
    assert (upstream.last.path, upstream.last.query) == ("/public/on-uvloop", "x=1")
    assert code == 0, served.log()
    assert "event loop uvloop" in served.log()


def test_uvloop_that_cannot_be_imported_is_a_config_error(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('no uvloop here')\n")
    cfg = write_config(tmp_path, "http://127.0.0.1:9", server='event_loop = "uvloop"')
    env = dict(os.environ, PYTHONPATH=str(hidden) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    checked = subprocess.run([GATEWAY, "check-config", "--config", str(cfg)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2, checked.stderr
    assert "server.event_loop" in checked.stderr and "uvloop" in checked.stderr
    served = subprocess.run([GATEWAY, "serve", "--config", str(cfg), "--port", "0"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2, served.stderr
    assert "config error: server.event_loop" in served.stderr
    assert "Traceback" not in served.stderr
