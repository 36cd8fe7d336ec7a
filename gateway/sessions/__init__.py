"""Sessions: the manager and its stores."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.sessions.base import SessionStore
from gateway.sessions.manager import Session, SessionManager, hash_token

if TYPE_CHECKING:
    from gateway.config import SessionsConfig

__all__ = ["Session", "SessionManager", "SessionStore", "hash_token", "open_session_store"]


def open_session_store(settings: SessionsConfig) -> SessionStore:
    """Build (not yet open) the store named by the ``[sessions]`` section."""
    if settings.store == "redis":
        from gateway.sessions.connection import RedisOptions
        from gateway.sessions.redis import RedisSessionStore

        urls = settings.redis_urls
        options = RedisOptions(urls[0], timeout=settings.redis_timeout,
                               max_connections=settings.redis_max_connections,
                               pool_timeout=settings.redis_pool_timeout,
                               seeds=urls if settings.redis_cluster else (),
                               cluster=settings.redis_cluster,
                               sentinels=settings.redis_sentinels,
                               sentinel_master=settings.redis_sentinel_master,
                               sentinel_password=settings.redis_sentinel_password)
        return RedisSessionStore(options=options, retention=settings.ended_retention)
    from gateway.sessions.memory import MemorySessionStore

    return MemorySessionStore(retention=settings.ended_retention)
