"""pytest fixtures for testing the gateway and its plugins against real servers.

Load them from a ``conftest.py`` (explicitly: nothing is loaded merely by
installing the gateway)::

    pytest_plugins = ["gateway.testing.pytest_plugin"]

They need ``pytest`` and ``pytest-tornado`` (which provides the ``io_loop``
fixture and runs ``@pytest.mark.gen_test`` coroutines), both installed by
the gateway's ``[test]`` extra: ``pip install "session-gateway[test]"``.

The fixtures:

``redis_server`` (session)
    a :class:`gateway.testing.RedisServer` of the test session's own; the
    test fails with a clear message when ``redis-server`` is not installed.
``redis_url``
    its URL, emptied (``FLUSHALL``) for each test.
``redis_cluster``, ``redis_sentinels`` (session)
    a :class:`gateway.testing.redis_modes.RedisCluster` (three primaries,
    three replicas) and a :class:`gateway.testing.redis_modes.RedisSentinels`
    (a primary, a replica, three sentinels) of the test session's own; a
    test that kills nodes starts its own instead.
``redis_cluster_options``, ``redis_sentinel_options``
    :class:`gateway.sessions.connection.RedisOptions` for them, emptied for each test.
``upstream``
    a recording :class:`gateway.testing.Upstream` on a free loopback port.
``make_gateway``
    ``await make_gateway(config, environ=None, pm=None)`` starts a gateway
    (:meth:`gateway.testing.GatewayFactory.start`) and returns a
    :class:`gateway.testing.RunningGateway`; all are stopped after the test.
``gw``
    a gateway with :func:`gateway.testing.base_config` in front of
    ``upstream``.

Two fixtures exist to be overridden in a ``conftest.py``:
``gateway_defaults`` (a configuration dict merged under every configuration
``make_gateway`` starts; empty by default) and ``gateway_client_class``
(the :class:`gateway.testing.Client` subclass each running gateway gets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import pluggy
import pytest
import tornado.ioloop

from gateway.sessions.connection import RedisOptions
from gateway.testing import (
    Client,
    GatewayFactory,
    RedisServer,
    RedisServerMissing,
    RunningGateway,
    Upstream,
    base_config,
)
from gateway.testing.redis_modes import RedisCluster, RedisSentinels

__all__ = [
    "StartGateway",
    "gateway_client_class",
    "gateway_defaults",
    "gw",
    "make_gateway",
    "redis_cluster",
    "redis_cluster_options",
    "redis_sentinel_options",
    "redis_sentinels",
    "redis_server",
    "redis_url",
    "upstream",
]


class StartGateway(Protocol):
    """What the ``make_gateway`` fixture is."""

    async def __call__(self, config: Mapping[str, Any], *, environ: Mapping[str, str] | None = None,
                       pm: pluggy.PluginManager | None = None) -> RunningGateway: ...


def pytest_configure(config: pytest.Config) -> None:
    # pytest-tornado still calls IOLoop.make_current(), deprecated in Tornado 6.
    config.addinivalue_line("filterwarnings", "ignore:make_current is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:clear_current is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, for the whole test session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's redis-server URL, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster (three primaries, three replicas) for the whole test session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_options(redis_cluster: RedisCluster) -> RedisOptions:
    """Options for the session's cluster (every node a seed), emptied for this test."""
    redis_cluster.flush()
    return RedisOptions(redis_cluster.urls[0], seeds=tuple(redis_cluster.urls), cluster=True)


@pytest.fixture(scope="session")
def redis_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinels]:
    """A primary, its replica and three sentinels for the whole test session."""
    sentinels = RedisSentinels(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        sentinels.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield sentinels
    sentinels.stop()


@pytest.fixture
def redis_sentinel_options(redis_sentinels: RedisSentinels) -> RedisOptions:
    """Options for the session's sentinels, the primary emptied for this test."""
    redis_sentinels.flush()
    return RedisOptions(redis_sentinels.url, sentinels=tuple(redis_sentinels.sentinels),
                        sentinel_master=redis_sentinels.master)


@pytest.fixture
def upstream(io_loop: tornado.ioloop.IOLoop) -> Iterator[Upstream]:
    """A recording upstream HTTP server on a free loopback port."""
    up = Upstream.start()
    yield up
    up.stop()


@pytest.fixture
def gateway_defaults() -> dict[str, Any]:
    """Configuration merged under every configuration ``make_gateway``
    starts (override it in a conftest.py); empty here."""
    return {}


@pytest.fixture
def gateway_client_class() -> type[Client]:
    """The client class of each running gateway (override it in a
    conftest.py to add a provider's login helpers)."""
    return Client


@pytest.fixture
def make_gateway(io_loop: tornado.ioloop.IOLoop, gateway_defaults: Mapping[str, Any],
                 gateway_client_class: type[Client]) -> Iterator[StartGateway]:
    """``await make_gateway(config)`` -> a started :class:`RunningGateway`;
    every gateway started is stopped after the test."""
    factory = GatewayFactory(defaults=gateway_defaults, client_class=gateway_client_class)
    yield factory.start
    io_loop.run_sync(factory.stop_all)


@pytest.fixture
def gw(make_gateway: StartGateway, upstream: Upstream, tmp_path: Path,
       io_loop: tornado.ioloop.IOLoop) -> RunningGateway:
    """A gateway with :func:`base_config` in front of ``upstream``."""
    running: RunningGateway = io_loop.run_sync(lambda: make_gateway(base_config(upstream.url, tmp_path)))
    return running
