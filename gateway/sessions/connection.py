"""How the gateway reaches Redis: the client for the ``[sessions]`` redis options.

:func:`connect` builds (without yet connecting) the ``redis.asyncio`` client
the session store and the shared state use, in one of three modes:

- one server (``url``): a client on a blocking pool of ``max_connections``,
  where a request beyond them waits up to ``pool_timeout`` for a free one;
- Redis Sentinel (``sentinels``): a client of the primary the sentinels name
  for ``sentinel_master``, on the same kind of blocking pool.  Each new
  connection asks the sentinels where the primary is, and a connection to a
  former primary (refused, or answering ``READONLY``) is dropped, so the
  client follows a failover on its own.  ``url`` gives the scheme (TLS),
  username, password and database of the primary (its host and port are
  not used); the sentinels are reached with the same TLS settings and
  ``sentinel_password``;
- Redis Cluster (``cluster``): a cluster client seeded with ``seeds`` (or
  ``url``), which discovers the nodes and slots, and reads them again when a
  node fails or a slot moves.  ``max_connections`` applies per node, and a
  request beyond them fails at once.

Failures surface quickly, always as :class:`redis.exceptions.RedisError`:
short socket timeouts and at most one retry (in cluster mode: one retry,
after reading the topology again), so the caller can answer 503.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.asyncio.retry import Retry

__all__ = ["ClusterUnavailable", "RedisClient", "RedisOptions", "connect", "parse_address"]

#: the client :func:`connect` returns
RedisClient = Any

_ADDRESS = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._\-]+)):(\d{1,5})$")


def parse_address(value: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6 address]:port"``) -> ``(host, port)``; ValueError otherwise."""
    m = _ADDRESS.match(value)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return m.group(1) or m.group(2), int(m.group(3))


@dataclass(frozen=True)
class RedisOptions:
    """Where Redis is and how long to wait for it.

    ``url`` is the one server's URL; with ``sentinels`` (``"host:port"``
    each) it gives the primary's scheme, credentials and database; with
    ``cluster`` it is a seed node, as are ``seeds`` (default: ``url`` alone).
    """

    url: str = field(repr=False)
    timeout: float = 0.5
    max_connections: int = 1000
    pool_timeout: float = 1.0
    seeds: tuple[str, ...] = field(default=(), repr=False)
    cluster: bool = False
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str = field(default="", repr=False)

    @property
    def deadline(self) -> float:
        """The longest one store call may take before it answers 503: the
        wait for a connection or two socket timeouts (a try and its retry),
        whichever is longer (1 s by default), however the time is spent
        (a blackholed node, sentinels asked one after another)."""
        return max(self.pool_timeout, 2 * self.timeout)

    @property
    def mode(self) -> str:
        """``"cluster"``, ``"sentinel"`` or ``"single"``."""
        return "cluster" if self.cluster else "sentinel" if self.sentinels else "single"


def connect(options: RedisOptions) -> RedisClient:
    """A client for ``options`` (``decode_responses``); it connects lazily."""
    if options.cluster and options.sentinels:
        raise ValueError("Redis Cluster and Redis Sentinel cannot be combined")
    if options.cluster:
        return _cluster(options)
    if options.sentinels:
        return _sentinel(options)
    # redis-py's default pool fails at once beyond its connections;
    # this one waits (bounded) for a connection to come back.
    pool = aioredis.BlockingConnectionPool.from_url(
        options.url,
        max_connections=options.max_connections,
        timeout=options.pool_timeout,
        socket_connect_timeout=options.timeout,
        socket_timeout=options.timeout,
        retry=Retry(NoBackoff(), 1),
        retry_on_timeout=True,
        health_check_interval=30,
        decode_responses=True,
    )
    return aioredis.Redis.from_pool(pool)


def _url_settings(url: str, mode: str) -> tuple[dict[str, Any], bool]:
    """What ``url`` says besides host and port (credentials, database, the
    ``ssl_*`` query options), and whether it asks for TLS."""
    settings = dict(parse_url(url))  # type: ignore[no-untyped-call]  # (redis has no annotation here)
    connection_class = settings.pop("connection_class", None)
    if connection_class is UnixDomainSocketConnection:
        raise ValueError(f"{mode} reaches Redis over TCP: use a redis:// or rediss:// URL")
    settings.pop("host", None)
    settings.pop("port", None)
    return settings, connection_class is SSLConnection


# -- Redis Sentinel -----------------------------------------------------------


class _SentinelBlockingPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The sentinels' pool of primary connections, waiting (up to its
    ``timeout``) for a free connection as the one-server pool does."""


class _SentinelPrimary(aioredis.Redis):
    """The client of the primary; closing it closes its sentinels' connections too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def _sentinel(options: RedisOptions) -> RedisClient:
    settings, tls = _url_settings(options.url, "Redis Sentinel")
    quick: dict[str, Any] = {"socket_connect_timeout": options.timeout, "socket_timeout": options.timeout}
    tls_settings = {k: v for k, v in settings.items() if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {
        **quick,
        # several sentinels: a failing one is passed over for the next
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        **({"ssl": True, **tls_settings} if tls else {}),
        **({"password": options.sentinel_password} if options.sentinel_password else {}),
    }
    sentinel = Sentinel([parse_address(a) for a in options.sentinels],  # type: ignore[no-untyped-call]
                        sentinel_kwargs=sentinel_kwargs)
    primary: dict[str, Any] = {
        "max_connections": options.max_connections,
        "timeout": options.pool_timeout,
        **quick,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_timeout": True,
        "health_check_interval": 30,
        "decode_responses": True,
        **({"ssl": True} if tls else {}),
        **settings,  # (as from_url: what the URL says wins)
    }
    client = sentinel.master_for(options.sentinel_master, redis_class=_SentinelPrimary,
                                 connection_pool_class=_SentinelBlockingPool, **primary)
    assert isinstance(client, _SentinelPrimary)
    client.sentinel_manager = sentinel
    return client


# -- Redis Cluster ------------------------------------------------------------


class ClusterUnavailable(RedisConnectionError):
    """The cluster client's own failures (no reachable node, a slot no node
    serves, a connection closed under a command while the client reads the
    topology again), which redis-py raises outside
    :class:`~redis.exceptions.RedisError`."""


#: What the cluster client raises outside RedisError: its own failures, and
#: (an AttributeError on a connection's missing socket) a command caught
#: connecting while the client drops every connection to read the topology
#: again, as it does when the cluster answers CLUSTERDOWN during a failover.
_CLUSTER_FAILURES = (RedisClusterException, AttributeError)


def _unavailable(exc: Exception) -> ClusterUnavailable:
    if isinstance(exc, RedisClusterException):
        return ClusterUnavailable(f"redis cluster: {exc}")
    return ClusterUnavailable("redis cluster: a connection was closed while in use (the topology was being read again)")


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except _CLUSTER_FAILURES as exc:
            raise _unavailable(exc) from exc


class _Cluster(RedisCluster):
    """A cluster client whose every failure is a :class:`~redis.exceptions.RedisError`."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # Read the topology first (once; again after a failure made the
            # client drop it): commands sent by many tasks at once to a client
            # that has not read it yet go astray.
            await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except _CLUSTER_FAILURES as exc:
            raise _unavailable(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ClusterUnavailable("shard_hint is not supported in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # (as RedisCluster.pipeline makes one)


def _cluster(options: RedisOptions) -> RedisClient:
    seeds = options.seeds or (options.url,)
    settings, tls = _url_settings(seeds[0], "Redis Cluster")
    if int(settings.pop("db", 0) or 0) != 0:
        raise ValueError("Redis Cluster has database 0 only")
    nodes = []
    for seed in seeds:
        parsed = parse_url(seed)  # type: ignore[no-untyped-call]
        nodes.append(ClusterNode(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)))
    cluster: dict[str, Any] = {
        "max_connections": options.max_connections,
        "socket_connect_timeout": options.timeout,
        "socket_timeout": options.timeout,
        # one retry, after reading the slots again: a failing call answers
        # within about two socket timeouts (a refused node: at once; a
        # cluster still electing a primary: 0.25 s per attempt)
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        "decode_responses": True,
        "ssl": tls,
        **settings,  # (as from_url: what the URL says wins)
    }
    return _Cluster(startup_nodes=nodes, **cluster)
