"""The Redis modes: one server, Redis Sentinel, Redis Cluster.

Their settings and the problems of the settings that cannot work; the
client :func:`gateway.sessions.connection.connect` builds for each mode;
the store the ``[sessions]`` section opens, writing where it should; every
failure a 503 ``unavailable`` quickly, never a password in a message.
(The contract suites run on every mode too: test_session_store.py and
test_state.py; failovers: test_redis_failover.py.)
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from gateway.config import ConfigError, load_config, read_config
from gateway.errors import StoreUnavailable
from gateway.sessions import open_session_store
from gateway.sessions.connection import RedisOptions, connect, parse_address
from gateway.sessions.manager import SessionManager
from gateway.sessions.redis import RedisSessionStore
from gateway.testing import base_config, body, free_port
from gateway.testing.redis_modes import RedisCluster, RedisSentinels, command, make_tls, tls_supported


def problems_of(sessions: dict, environ: dict[str, str] | None = None) -> list[str]:
    return read_config(data={"sessions": {"store": "redis", **sessions}}, environ=environ or {})[1]


def sessions_of(sessions: dict, environ: dict[str, str] | None = None):
    return load_config(data={"sessions": {"store": "redis", **sessions}}, environ=environ or {}).sessions


# -- settings ------------------------------------------------------------------


def test_one_server_is_the_default_mode():
    s = sessions_of({"redis_url": "redis://127.0.0.1:6390/2"})
    assert (s.redis_url, s.redis_urls, s.redis_cluster, s.redis_sentinels) == \
        ("redis://127.0.0.1:6390/2", ("redis://127.0.0.1:6390/2",), False, ())
    assert (s.redis_sentinel_master, s.redis_sentinel_password) == ("mymaster", "")


def test_sentinel_settings():
    s = sessions_of({"redis_url": "rediss://gw:pw@ignored:1/3", "redis_sentinels": ["10.0.0.7:26379", "[::1]:26380"],
                     "redis_sentinel_master": "sessions", "redis_sentinel_password_env": "SP"}, {"SP": "s3cret"})
    assert s.redis_sentinels == ("10.0.0.7:26379", "[::1]:26380")
    assert (s.redis_sentinel_master, s.redis_sentinel_password) == ("sessions", "s3cret")
    assert "s3cret" not in repr(s)


def test_cluster_takes_one_seed_or_an_array_of_them():
    assert sessions_of({"redis_cluster": True, "redis_url": "redis://10.0.0.1:7000"}).redis_urls == \
        ("redis://10.0.0.1:7000",)
    s = sessions_of({"redis_cluster": True, "redis_url": ["redis://a:pw@10.0.0.1:7000/0", "redis://a:pw@10.0.0.2:7000"]})
    assert s.redis_urls == ("redis://a:pw@10.0.0.1:7000/0", "redis://a:pw@10.0.0.2:7000")
    assert "pw@" not in repr(s)


@pytest.mark.parametrize("sessions, key, words", [
    ({"redis_cluster": True, "redis_sentinels": ["h:26379"]}, "sessions.redis_cluster", "redis_sentinels"),
    ({"redis_url": ["redis://a:1", "redis://b:1"]}, "sessions.redis_url", "redis_cluster = true"),
    ({"redis_url": [], "redis_cluster": True}, "sessions.redis_url", "non-empty"),
    ({"redis_url": ["redis://a:1", "http://b"], "redis_cluster": True}, "sessions.redis_url", "item 2"),
    ({"redis_url": "redis://a:1/2", "redis_cluster": True}, "sessions.redis_url", "database 0"),
    ({"redis_url": ["redis://a:1/0", "redis://b:1/1"], "redis_cluster": True}, "sessions.redis_url", "database 0"),
    ({"redis_url": ["redis://u:p@a:1", "rediss://u:p@b:1"], "redis_cluster": True}, "sessions.redis_url", "differ"),
    ({"redis_url": "unix:///run/redis.sock", "redis_cluster": True}, "sessions.redis_url", "TCP"),
    ({"redis_url": "unix:///run/redis.sock", "redis_sentinels": ["h:1"]}, "sessions.redis_url", "TCP"),
    ({"redis_sentinels": ["sentinel-1"]}, "sessions.redis_sentinels", "host:port"),
    ({"redis_sentinels": ["h:0"]}, "sessions.redis_sentinels", "host:port"),
    ({"redis_sentinels": ["h:26379 "]}, "sessions.redis_sentinels", "host:port"),
    ({"redis_sentinels": "h:26379"}, "sessions.redis_sentinels", "list"),
    ({"redis_sentinel_master": "my master"}, "sessions.redis_sentinel_master", "space"),
    ({"redis_cluster": "yes"}, "sessions.redis_cluster", "true or false"),
])
def test_settings_that_cannot_work_are_named(sessions, key, words):
    problems = problems_of(sessions)
    assert len(problems) == 1 and problems[0].startswith(key + ":") and words in problems[0], problems


def test_an_unset_sentinel_password_variable_is_reported_at_start():
    problems = problems_of({"redis_sentinels": ["h:26379"], "redis_sentinel_password_env": "GW_NO_SUCH_VAR"})
    assert problems == ["sessions.redis_sentinel_password_env: environment variable GW_NO_SUCH_VAR is not set"]
    with pytest.raises(ConfigError):
        sessions_of({"redis_sentinels": ["h:26379"], "redis_sentinel_password_env": "GW_NO_SUCH_VAR"})


def test_no_password_in_any_problem():
    problems = problems_of({"redis_url": ["redis://u:hunter2-a@h:1/1", "rediss://u:hunter2-b@h:2"],
                            "redis_sentinels": ["h:1"], "redis_sentinel_password": 5})
    text = "\n".join(problems)
    assert problems and "hunter2" not in text and "sessions.redis_sentinel_password" in text


def test_parse_address():
    assert parse_address("10.0.0.7:26379") == ("10.0.0.7", 26379)
    assert parse_address("sentinel-1.internal:26379") == ("sentinel-1.internal", 26379)
    assert parse_address("[::1]:26379") == ("::1", 26379)
    for bad in ("h", "h:", ":1", "h:70000", "h:1:2", "a b:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- the clients -----------------------------------------------------------------


def test_options_keep_passwords_out_of_their_repr():
    shown = repr(RedisOptions("redis://u:hunter2-x@h:1/0", seeds=("redis://u:hunter2-y@h:2",), cluster=True,
                              sentinel_password="hunter2-z"))
    assert "hunter2" not in shown and "cluster=True" in shown


@pytest.mark.gen_test
async def test_connect_builds_the_client_of_each_mode():
    single = connect(RedisOptions("redis://127.0.0.1:1/0"))
    sentinel = connect(RedisOptions("rediss://u:p@ignored:1/2", sentinels=("127.0.0.1:1", "127.0.0.1:2")))
    cluster = connect(RedisOptions("redis://127.0.0.1:1", seeds=("redis://127.0.0.1:1", "redis://127.0.0.1:2"),
                                   cluster=True))
    try:
        assert isinstance(single, Redis) and not isinstance(single.connection_pool, SentinelConnectionPool)
        assert isinstance(sentinel, Redis) and isinstance(sentinel.connection_pool, SentinelConnectionPool)
        assert sentinel.connection_pool.connection_kwargs["db"] == 2
        assert sentinel.connection_pool.connection_kwargs["username"] == "u"
        assert isinstance(cluster, ClusterClient)
    finally:
        for client in (single, sentinel, cluster):
            await client.aclose()
    with pytest.raises(ValueError):
        connect(RedisOptions("redis://h:1/1", cluster=True))  # a cluster has database 0 only


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
@pytest.mark.gen_test
async def test_nothing_reachable_is_a_quick_503(mode):
    if mode == "sentinel":
        options = RedisOptions("redis://127.0.0.1:1/0", sentinels=(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"))
    else:
        options = RedisOptions("redis://127.0.0.1:1/0", seeds=(f"redis://127.0.0.1:{free_port()}",), cluster=True)
    store = RedisSessionStore(options=options)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=10, rotation_grace=5)
        for call in (lambda: mgr.create("u1", "password"), lambda: store.list_user("u1")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await call()
            assert time.monotonic() - started < 2.0  # about a second, on a shared machine
            assert (info.value.status, info.value.code) == (503, "unavailable")
    finally:
        await store.close()


# -- the store a [sessions] section opens ------------------------------------------


async def session_in(settings) -> tuple[RedisSessionStore, str]:
    store = open_session_store(settings)
    assert isinstance(store, RedisSessionStore)
    await store.open()
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=10, rotation_grace=5)
    token, session = await mgr.create("u1", "password")
    assert (await mgr.authenticate(token)).id == session.id
    return store, token


def dbsize(port: int, auth: tuple[str, str] | None = None) -> int:
    return int(command(port, "DBSIZE", auth=auth))


@pytest.mark.gen_test
async def test_the_sentinel_section_writes_to_the_primary(redis_sentinels: RedisSentinels):
    redis_sentinels.flush()
    settings = sessions_of({"redis_url": redis_sentinels.url, "redis_sentinels": redis_sentinels.sentinels,
                            "redis_sentinel_master": redis_sentinels.master})
    store, _ = await session_in(settings)
    try:
        assert dbsize(redis_sentinels.primary()) > 0
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_the_cluster_section_writes_to_the_cluster(redis_cluster: RedisCluster):
    redis_cluster.flush()
    settings = sessions_of({"redis_url": redis_cluster.urls[3], "redis_cluster": True})  # one seed: a replica
    store, _ = await session_in(settings)
    try:
        assert sum(dbsize(p) for p in redis_cluster.primaries()) > 0
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=40)
async def test_a_wrong_password_is_a_503_that_names_no_password(tmp_path, caplog):
    sentinels = RedisSentinels(tmp_path / "acl", auth=("gateway", "right-pass-9"), sentinel_password="sent-pass-9")
    sentinels.start()
    try:
        base = {"redis_sentinels": sentinels.sentinels, "redis_sentinel_master": sentinels.master}
        good = sessions_of({**base, "redis_url": sentinels.url, "redis_sentinel_password": "sent-pass-9"})
        store, _ = await session_in(good)
        await store.close()
        wrong_user = sentinels.url.replace("right-pass-9", "wrong-pass-9")
        for settings in (sessions_of({**base, "redis_url": wrong_user, "redis_sentinel_password": "sent-pass-9"}),
                         sessions_of({**base, "redis_url": sentinels.url, "redis_sentinel_password": "wrong-sent-9"})):
            store = open_session_store(settings)
            await store.open()
            try:
                with pytest.raises(StoreUnavailable) as info:
                    await store.list_user("u1")
            finally:
                await store.close()
            shown = f"{info.value} {info.value.log_message} {caplog.text}"
            assert "pass-9" not in shown and "sent-9" not in shown, shown
    finally:
        sentinels.stop()


def test_every_failure_is_a_redis_error():
    from gateway.sessions.connection import ClusterUnavailable

    assert issubclass(ClusterUnavailable, RedisError)


# -- TLS and an ACL user, on a cluster -------------------------------------------------


@pytest.fixture
def tls_cluster(tmp_path):
    """A cluster speaking TLS only, with an ACL user and no default user."""
    if not tls_supported(tmp_path / "probe"):
        pytest.skip("this redis-server was built without TLS (--tls-port): the TLS test cannot run")
    cluster = RedisCluster(tmp_path / "cluster", tls=make_tls(tmp_path / "tls"), auth=("gateway", "tls-acl-pass-7"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.gen_test(timeout=60)
async def test_a_tls_cluster_with_an_acl_user_serves_sessions(make_gateway, upstream, tmp_path, tls_cluster, caplog):
    assert all(url.startswith("rediss://gateway:tls-acl-pass-7@") for url in tls_cluster.urls)
    sessions = {"store": "redis", "redis_url": tls_cluster.urls[:1], "redis_cluster": True}
    gw = await make_gateway(base_config(upstream.url, tmp_path, sessions=sessions))
    reg = await gw.client.register()
    r = await gw.client.request("GET", "/api/x", token=reg["token"])
    assert r.code == 200 and upstream.last.header("X-User-Id") == reg["user"]["id"]
    assert sum(int(command(p, "DBSIZE", auth=tls_cluster.auth, tls=tls_cluster.tls))
               for p in tls_cluster.primaries()) > 0

    # plain TCP, a wrong password, a CA that is not the servers': 503 unavailable, no password shown
    plain = tls_cluster.urls[0].replace("rediss://", "redis://").split("?")[0]
    wrong = tls_cluster.urls[0].replace("tls-acl-pass-7", "wrong-pass-7")
    untrusted = tls_cluster.urls[0].split("?")[0]  # (the system's CAs only)
    for url in (plain, wrong, untrusted):
        other = await make_gateway(base_config(upstream.url, tmp_path, sessions={**sessions, "redis_url": url}))
        started = time.monotonic()
        r = await other.client.request("GET", "/api/x", token=reg["token"])
        assert r.code == 503 and body(r)["error"] == "unavailable", r.body
        assert time.monotonic() - started < 2.0  # about a second, on a shared machine
    assert "pass-7" not in caplog.text


@pytest.mark.gen_test(timeout=20)
async def test_the_sentinel_pool_waits_for_a_free_connection(redis_sentinel_options: RedisOptions):
    from dataclasses import replace

    client = connect(replace(redis_sentinel_options, max_connections=2, pool_timeout=2.0))
    try:
        assert await client.set("k", "v")
        answers = await asyncio.gather(*(client.get("k") for _ in range(30)))
        assert answers == ["v"] * 30  # 30 calls over 2 connections: queued, none refused
    finally:
        await client.aclose()


def test_serve_reports_an_unset_sentinel_password_variable(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "gateway.toml"
    path.write_text('[sessions]\nstore = "redis"\nredis_sentinels = ["127.0.0.1:26379"]\n'
                    'redis_sentinel_password_env = "GW_UNSET_SENTINEL_PASSWORD"\n')
    env = {k: v for k, v in os.environ.items() if k != "GW_UNSET_SENTINEL_PASSWORD"}
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "sessions.redis_sentinel_password_env: environment variable GW_UNSET_SENTINEL_PASSWORD is not set" \
        in p.stdout + p.stderr


@pytest.mark.gen_test(timeout=60)
async def test_sentinels_and_their_primary_over_tls(tmp_path):
    if not tls_supported(tmp_path / "probe"):
        pytest.skip("this redis-server was built without TLS (--tls-port): the TLS test cannot run")
    sentinels = RedisSentinels(tmp_path / "sentinels", tls=make_tls(tmp_path / "tls"))
    sentinels.start()
    try:
        assert sentinels.url.startswith("rediss://")
        settings = sessions_of({"redis_url": sentinels.url, "redis_sentinels": sentinels.sentinels})
        store, _ = await session_in(settings)
        await store.close()
        assert int(command(sentinels.primary(), "DBSIZE", tls=sentinels.tls)) > 0
        plain = sessions_of({"redis_url": sentinels.url.replace("rediss://", "redis://").split("?")[0],
                             "redis_sentinels": sentinels.sentinels})
        store = open_session_store(plain)
        await store.open()
        try:
            with pytest.raises(StoreUnavailable):
                await store.list_user("u1")
        finally:
            await store.close()
    finally:
        sentinels.stop()


@pytest.mark.parametrize("mode", ["single", "sentinel"])
@pytest.mark.gen_test(timeout=30)
async def test_a_redis_that_accepts_and_never_answers_is_a_503_within_the_deadline(mode):
    """A blackholed server (it accepts connections and answers nothing):
    however the client spends its time (a read timeout and its retry, four
    sentinels asked one after another), each call answers 503 by the
    store's deadline, 1 s by default."""
    import socket

    silent = []
    for _ in range(4):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        silent.append(sock)
    ports = [s.getsockname()[1] for s in silent]
    try:
        if mode == "single":
            options = RedisOptions(f"redis://127.0.0.1:{ports[0]}/0")
        else:
            options = RedisOptions("redis://127.0.0.1:1/0", sentinels=tuple(f"127.0.0.1:{p}" for p in ports))
        assert options.deadline == 1.0
        store = RedisSessionStore(options=options)
        await store.open()
        try:
            mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=10, rotation_grace=5)
            for call in (lambda: mgr.create("u1", "password"), lambda: store.list_user("u1"),
                         lambda: store.get("s_000_abcdefgh")):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as info:
                    await call()
                took = time.monotonic() - started
                print(f"{mode}: 503 after {took:.2f} s")
                assert took < 1.6  # the deadline, with room for a shared machine
                assert (info.value.status, info.value.code) == (503, "unavailable")
        finally:
            await store.close()
    finally:
        for sock in silent:
            sock.close()
