"""How the gateway reaches Redis: the client for the ``[sessions]`` redis options.

:func:`connect` builds (without yet connecting) the ``redis.asyncio`` client
the session store and the shared state use.  Failures surface quickly:
short socket timeouts and at most one retry, so the caller can answer 503.
Connections come from a blocking pool of ``max_connections``: a request
beyond them waits up to ``pool_timeout`` for a free one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: the client :func:`connect` returns
RedisClient = Any


@dataclass(frozen=True)
class RedisOptions:
    """Where Redis is and how long to wait for it."""

    url: str
    timeout: float = 0.5
    max_connections: int = 1000
    pool_timeout: float = 1.0


def connect(options: RedisOptions) -> RedisClient:
    """A client for ``options`` (``decode_responses``); it connects lazily."""
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
