"""Shared state: counters and small values with a TTL, seen alike by every process.

:func:`open_shared_state` picks the backend that goes with the session store:
in memory beside the memory store, on the same Redis (through the store's own
client) beside the Redis store.  The backends are imported only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.state.base import SharedState

if TYPE_CHECKING:
    from gateway.config import SessionsConfig
    from gateway.sessions.base import SessionStore

__all__ = ["SharedState", "open_shared_state"]


def open_shared_state(settings: SessionsConfig, session_store: SessionStore) -> SharedState:
    """Build (not yet open) the shared state for the ``[sessions]`` section.

    With ``store = "redis"`` the state uses ``session_store``'s Redis client:
    open the session store first and close it last."""
    if settings.store == "redis":
        from gateway.sessions.redis import RedisSessionStore
        from gateway.state.redis import RedisSharedState

        if not isinstance(session_store, RedisSessionStore):
            raise TypeError(f"sessions.store is redis but the session store is {session_store.name!r}")
        return RedisSharedState(session_store)
    from gateway.state.memory import MemorySharedState

    return MemorySharedState()
