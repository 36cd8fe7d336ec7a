"""Redis Cluster and Redis Sentinel of one's own, on free loopback ports.

For testing the gateway's Redis modes against real ``redis-server``
processes, failovers included:

- :class:`RedisCluster`: three primaries and three replicas
  (``--cluster-enabled yes``, a one-second node timeout), made a cluster
  with ``redis-cli --cluster create``; :meth:`RedisCluster.kill_primary`
  then :meth:`RedisCluster.wait_failover` until a replica has taken over;
- :class:`RedisSentinels`: a primary, its replica and three sentinels
  monitoring it (one-second ``down-after-milliseconds``);
  :meth:`RedisSentinels.kill_primary` then
  :meth:`RedisSentinels.wait_failover` until every sentinel names the
  promoted replica.

Both take ``auth=(username, password)``: every server then has that ACL
user (allowed everything) and no default user, and replication (and the
sentinels) authenticate as it; :class:`RedisSentinels` also takes
``sentinel_password`` (the sentinels' own ``requirepass``).  Both take ``tls=make_tls(dir)``
(:func:`make_tls`: a test CA and a certificate for 127.0.0.1): every
server (and sentinel) then speaks TLS only, to clients, for replication and
on the cluster bus alike, and the URLs given are ``rediss://`` URLs trusting
that CA.  Readiness is
polled, never slept for; :meth:`stop` ends every process (SIGTERM, then
SIGKILL).  Both are context managers.  :func:`command` sends one command to
a server and decodes its reply.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence
from urllib.parse import quote, urlencode

from gateway.testing import LOOPBACK, RedisServerMissing, free_port

__all__ = ["RedisCluster", "RedisReplyError", "RedisSentinels", "Tls", "command", "make_tls", "tls_supported"]


class RedisReplyError(RuntimeError):
    """Redis answered an error (``-ERR ...``)."""


def _decode(reply: IO[bytes]) -> Any:
    line = reply.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("redis closed the connection mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reply.read(n + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_decode(reply) for _ in range(n)]
    raise OSError(f"not a RESP reply: {line[:40]!r}")


@dataclass(frozen=True)
class Tls:
    """A test CA and a server certificate (and key) for 127.0.0.1, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self, port: int) -> list[str]:
        """redis-server arguments: TLS only, on ``port``, for clients, replication and the cluster bus."""
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
                "--tls-replication", "yes", "--tls-cluster", "yes"]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def tls_supported(workdir: Path) -> bool:
    """Whether this redis-server was built with TLS: one serves a PING over
    TLS with a certificate made under ``workdir``."""
    tls = make_tls(workdir)
    procs = _Processes(Path(workdir), None, tls)
    port = free_port()
    procs.spawn(port, [*tls.server_args(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"])
    try:
        procs.wait_answering(port, timeout=5)
        return True
    except RuntimeError:
        return False
    finally:
        procs.stop()


def make_tls(workdir: Path) -> Tls:
    """A fresh test CA and a certificate it signed for 127.0.0.1, under ``workdir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = Tls(workdir / "ca.crt", workdir / "redis.crt", workdir / "redis.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


def command(port: int, *args: str, auth: tuple[str, str] | None = None, timeout: float = 2.0,
            tls: Tls | None = None) -> Any:
    """Send ``args`` to the server on loopback ``port`` (after ``AUTH`` with
    ``auth``; over TLS with ``tls``) and return the decoded reply: a str,
    int, None or list; :class:`RedisReplyError` for an error reply."""
    commands = ([("AUTH", *auth)] if auth else []) + [args]
    payload = b"".join(
        f"*{len(c)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in c)
        for c in commands)
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=timeout))
        if tls is not None:
            s = stack.enter_context(tls.context().wrap_socket(s, server_hostname=LOOPBACK))
        s.sendall(payload)
        with s.makefile("rb") as reply:
            answers = [_decode(reply) for _ in commands]
    for answer in answers:
        if isinstance(answer, RedisReplyError):
            raise answer
    return answers[-1]


def _info(text: str) -> dict[str, str]:
    """``INFO`` text as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RedisServerMissing(
            f"{name} is not on PATH: install Redis (on Debian or Ubuntu: apt-get install redis-server, "
            "which brings redis-cli too) to run the tests that need it")
    return found


def _poll(predicate: Callable[[], bool], timeout: float, what: Callable[[], str] | str) -> None:
    """Poll ``predicate`` (errors count as false) until it holds; RuntimeError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, RedisReplyError, ValueError, KeyError, IndexError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(0.05)


class _Processes:
    """The redis-server processes of one setup, by port, each logging to ``workdir``."""

    def __init__(self, workdir: Path, auth: tuple[str, str] | None, tls: Tls | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.tls = tls
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def auth_args(self) -> list[str]:
        if self.auth is None:
            return []
        user, password = self.auth
        return ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all",
                "--masteruser", user, "--masterauth", password]

    def spawn(self, port: int, args: Sequence[str]) -> None:
        with open(self.workdir / f"redis-{port}.log", "ab") as log:
            self.procs[port] = subprocess.Popen([_binary("redis-server"), *args], stdout=log,
                                                stderr=subprocess.STDOUT, cwd=self.workdir)

    def wait_answering(self, port: int, timeout: float = 10.0) -> None:
        def up() -> bool:
            proc = self.procs[port]
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited with {proc.returncode}: {self.log_tail(port)}")
            return bool(command(port, "PING", auth=self.auth, tls=self.tls) == "PONG")

        _poll(up, timeout, lambda: f"redis-server on {port} answering PING: {self.log_tail(port)}")

    def log_tail(self, port: int) -> str:
        try:
            return (self.workdir / f"redis-{port}.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port`` (a crash: no goodbye to its peers)."""
        proc = self.procs.pop(port, None)
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]


def _url(port: int, auth: tuple[str, str] | None, tls: Tls | None = None) -> str:
    cred = f"{quote(auth[0], safe='')}:{quote(auth[1], safe='')}@" if auth else ""
    if tls is not None:
        return f"rediss://{cred}{LOOPBACK}:{port}/0?" + urlencode({"ssl_ca_certs": str(tls.ca)})
    return f"redis://{cred}{LOOPBACK}:{port}/0"


class RedisCluster:
    """A Redis Cluster of ``primaries`` primaries with one replica each,
    every node a ``redis-server`` on a free loopback port under ``workdir``."""

    def __init__(self, workdir: Path, *, primaries: int = 3, auth: tuple[str, str] | None = None,
                 tls: Tls | None = None, node_timeout_ms: int = 1000) -> None:
        self.auth = auth
        self.tls = tls
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(primaries * 2)]
        self.bus_ports = [free_port() for _ in self.ports]  # (the default, port + 10000, may be taken)
        self._procs = _Processes(Path(workdir), auth, tls)
        self._killed: dict[int, tuple[str, set[str]]] = {}

    @property
    def urls(self) -> list[str]:
        """A URL of every node started (the seeds a client may be given)."""
        return [_url(p, self.auth, self.tls) for p in self.ports]

    def _cmd(self, port: int, *args: str, timeout: float = 2.0) -> Any:
        return command(port, *args, auth=self.auth, tls=self.tls, timeout=timeout)

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, make them a cluster and wait until every node says cluster_state:ok
        and every replica is in sync."""
        cli = _binary("redis-cli")
        try:
            for port, bus in zip(self.ports, self.bus_ports):
                self._procs.spawn(port, [
                    *(self.tls.server_args(port) if self.tls else ["--port", str(port)]),
                    "--bind", LOOPBACK, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--dir", str(self._procs.workdir), "--save", "", "--appendonly", "no",
                    "--repl-diskless-sync-delay", "0",
                    *self._procs.auth_args()])
            for port in self.ports:
                self._procs.wait_answering(port)
            auth = ["--user", self.auth[0], "--pass", self.auth[1]] if self.auth else []
            if self.tls:
                auth += ["--tls", "--cacert", str(self.tls.ca)]
            made = subprocess.run([cli, *auth, "--cluster", "create", *(f"{LOOPBACK}:{p}" for p in self.ports),
                                   "--cluster-replicas", "1", "--cluster-yes"],
                                  capture_output=True, text=True, timeout=timeout)
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout[-1500:]} {made.stderr[-500:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def nodes(self, port: int | None = None) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as a live node (``port``, or the first alive) sees it:
        ``{"id", "port", "flags", "master", "slots"}`` each."""
        at = port if port is not None else self._procs.alive()[0]
        out = []
        for line in str(self._cmd(at, "CLUSTER", "NODES")).splitlines():
            parts = line.split()
            out.append({"id": parts[0], "port": int(parts[1].split("@")[0].rsplit(":", 1)[1]),
                        "flags": set(parts[2].split(",")), "master": parts[3], "slots": parts[8:]})
        return out

    def primaries(self) -> list[int]:
        """The ports of the primaries serving slots, as the cluster sees them."""
        return sorted(n["port"] for n in self.nodes() if "master" in n["flags"] and "fail" not in n["flags"]
                      and n["slots"])

    def replicas(self) -> list[int]:
        return sorted(n["port"] for n in self.nodes() if "slave" in n["flags"] and "fail" not in n["flags"])

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on the
        primaries, and every replica's link to its primary is up."""
        alive = self._procs.alive()

        def healthy() -> bool:
            if not all(_info(self._cmd(p, "CLUSTER", "INFO"))["cluster_state"] == "ok" for p in alive):
                return False
            views = {tuple(sorted(n["port"] for n in self.nodes(p) if "master" in n["flags"] and n["slots"]
                                  and "fail" not in n["flags"])) for p in alive}
            if len(views) != 1:
                return False
            for port in self.replicas():
                if port in alive and _info(self._cmd(port, "INFO", "replication")).get(
                        "master_link_status") != "up":
                    return False
            return True

        _poll(healthy, timeout, lambda: "a healthy cluster: " + "; ".join(
            f"{p}: {self._procs.log_tail(p)[-300:]}" for p in alive[:2]))

    def sync_replicas(self, timeout_ms: int = 1000) -> None:
        """``WAIT 1`` on every primary: each write so far has reached its replica."""
        for port in self.primaries():
            acked = self._cmd(port, "WAIT", "1", str(timeout_ms), timeout=timeout_ms / 1000 + 2)
            if int(acked) < 1:
                raise RuntimeError(f"the replica of {port} did not acknowledge within {timeout_ms} ms")

    def flush(self) -> None:
        """Empty every primary."""
        for port in self.primaries():
            self._cmd(port, "FLUSHALL")

    def kill_primary(self, port: int | None = None) -> int:
        """SIGKILL a primary (``port``, or the first); its port."""
        victim = port if port is not None else self.primaries()[0]
        nodes = self.nodes()
        victim_id = next(n["id"] for n in nodes if n["port"] == victim)
        self._killed[victim] = (victim_id, {n["id"] for n in nodes if n["master"] == victim_id})
        self._procs.kill(victim)
        return victim

    def wait_failover(self, killed: int, timeout: float = 30.0) -> int:
        """Until a replica of ``killed`` (by :meth:`kill_primary`) serves its
        slots and the cluster is healthy again; the new primary's port."""
        killed_id, replica_ids = self._killed[killed]
        promoted: list[int] = []

        def taken_over() -> bool:
            nodes = self.nodes()
            promoted[:] = [n["port"] for n in nodes if n["id"] in replica_ids and "master" in n["flags"]
                           and n["slots"]]
            return bool(promoted) and any(n["id"] == killed_id and "fail" in n["flags"] for n in nodes)

        _poll(taken_over, timeout, f"a replica of {killed} to take over")
        self.wait_healthy(timeout)
        return promoted[0]

    def stop(self) -> None:
        self._procs.stop()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisSentinels:
    """A primary, its replica and ``count`` sentinels monitoring it as
    ``master``, each on a free loopback port under ``workdir``."""

    def __init__(self, workdir: Path, *, master: str = "mymaster", count: int = 3,
                 auth: tuple[str, str] | None = None, sentinel_password: str | None = None,
                 tls: Tls | None = None, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.master = master
        self.auth = auth
        self.tls = tls
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(count)]
        self._procs = _Processes(Path(workdir), auth, tls)

    @property
    def sentinels(self) -> list[str]:
        """``"host:port"`` of every sentinel."""
        return [f"{LOOPBACK}:{p}" for p in self.sentinel_ports]

    @property
    def url(self) -> str:
        """A URL for the primary (with the ACL user, when there is one): where
        the gateway takes its scheme, credentials and database from."""
        return _url(self.primary_port, self.auth, self.tls)

    def _sentinel_auth(self) -> tuple[str, str] | None:
        return ("default", self.sentinel_password) if self.sentinel_password else None

    def sentinel_command(self, port: int, *args: str) -> Any:
        return command(port, *args, auth=self._sentinel_auth(), tls=self.tls)

    def start(self, timeout: float = 30.0) -> None:
        """Start the primary, its replica (until in sync), then the sentinels,
        until each knows the replica and the other sentinels."""
        try:
            common = ["--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--dir", str(self._procs.workdir),
                      "--repl-diskless-sync-delay", "0",  # (a replica syncs at once, not after 5 s)
                      *self._procs.auth_args()]
            def listen(port: int) -> list[str]:
                return self.tls.server_args(port) if self.tls else ["--port", str(port)]

            self._procs.spawn(self.primary_port, [*listen(self.primary_port), *common])
            self._procs.wait_answering(self.primary_port)
            self._procs.spawn(self.replica_port, [*listen(self.replica_port), *common,
                                                  "--replicaof", LOOPBACK, str(self.primary_port)])
            self._procs.wait_answering(self.replica_port)
            _poll(lambda: _info(command(self.replica_port, "INFO", "replication", auth=self.auth, tls=self.tls))
                  ["master_link_status"] == "up", timeout, "the replica in sync")
            for port in self.sentinel_ports:
                conf = self._procs.workdir / f"sentinel-{port}.conf"
                lines = [f"port {port}"] if self.tls is None else [
                    "port 0", f"tls-port {port}", f"tls-cert-file {self.tls.cert}", f"tls-key-file {self.tls.key}",
                    f"tls-ca-cert-file {self.tls.ca}", "tls-auth-clients no", "tls-replication yes"]
                lines += [f"bind {LOOPBACK}", f"dir {self._procs.workdir}",
                         f"sentinel monitor {self.master} {LOOPBACK} {self.primary_port} 2",
                         f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                         f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
                         f"sentinel parallel-syncs {self.master} 1"]
                if self.auth:
                    lines += [f"sentinel auth-user {self.master} {self.auth[0]}",
                              f"sentinel auth-pass {self.master} {self.auth[1]}"]
                if self.sentinel_password:
                    lines += [f"requirepass {self.sentinel_password}",
                              f"sentinel sentinel-pass {self.sentinel_password}"]
                conf.write_text("\n".join(lines) + "\n")
                self._procs.spawn(port, [str(conf), "--sentinel"])
            others = len(self.sentinel_ports) - 1

            def ready() -> bool:
                for port in self.sentinel_ports:
                    state = self._master_state(port)
                    if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < 1:
                        return False
                return True

            _poll(ready, timeout, lambda: "sentinels knowing each other and the replica: "
                  + self._procs.log_tail(self.sentinel_ports[0])[-600:])
        except BaseException:
            self.stop()
            raise

    def _master_state(self, port: int) -> dict[str, str]:
        flat = self.sentinel_command(port, "SENTINEL", "MASTER", self.master)
        return dict(zip(flat[::2], flat[1::2]))

    def primary(self, sentinel_port: int | None = None) -> int:
        """The primary's port, as a sentinel (by default the first alive) names it."""
        port = sentinel_port if sentinel_port is not None else next(
            p for p in self.sentinel_ports if p in self._procs.alive())
        host, found = self.sentinel_command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        return int(found)

    def sync_replica(self, timeout_ms: int = 1000) -> None:
        """``WAIT 1`` on the primary: each write so far has reached the replica."""
        acked = command(self.primary(), "WAIT", "1", str(timeout_ms), auth=self.auth, tls=self.tls,
                        timeout=timeout_ms / 1000 + 2)
        if int(acked) < 1:
            raise RuntimeError(f"the replica did not acknowledge within {timeout_ms} ms")

    def flush(self) -> None:
        """Empty the primary (the replica follows)."""
        command(self.primary(), "FLUSHALL", auth=self.auth, tls=self.tls)

    def kill_primary(self) -> int:
        """SIGKILL the primary; its port."""
        victim = self.primary()
        self._procs.kill(victim)
        return victim

    def wait_failover(self, killed: int, timeout: float = 30.0) -> int:
        """Until every sentinel names another primary, and that one says it is
        a master; its port."""
        found: list[int] = []

        def elected() -> bool:
            named = {self.primary(p) for p in self.sentinel_ports}
            if len(named) != 1 or killed in named:
                return False
            port = named.pop()
            found[:] = [port]
            return _info(command(port, "INFO", "replication", auth=self.auth, tls=self.tls))["role"] == "master"

        _poll(elected, timeout, f"the sentinels naming a primary other than {killed}")
        return found[0]

    def stop(self) -> None:
        self._procs.stop()

    def __enter__(self) -> RedisSentinels:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
