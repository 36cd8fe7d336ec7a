"""The shared-state contract: counters and small values with a TTL.

Besides sessions, the gateway keeps a little state that every process must
see alike: counters in a fixed window (login failures, rate limits) and short
values with a TTL (a provider's cached access token, a lock around fetching it).
:class:`SharedState` is that service; it knows nothing of sessions.  Every
entry expires on its own, so nothing here needs cleaning up.

A backend is shared (``shared = True``) when several processes see the same
state; the in-memory one is not.  Every method may raise
:class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import abc


class SharedState(abc.ABC):
    name: str = ""
    #: True when several processes see the same state.
    shared: bool = False

    async def open(self) -> None:
        """Get ready (may be lazy)."""

    async def close(self) -> None:
        """Release what :meth:`open` took."""

    # -- counters (login failures, rate limits), shared across processes ----

    @abc.abstractmethod
    async def hit(self, key: str, window: float) -> tuple[int, float]:
        """Count one event in a fixed window started by the first hit;
        return ``(count, seconds until the window ends)``."""

    @abc.abstractmethod
    async def peek(self, key: str) -> tuple[int, float]:
        """``(count, seconds left)`` without counting; ``(0, 0)`` when none."""

    @abc.abstractmethod
    async def clear(self, key: str) -> None:
        """Forget a counter."""

    # -- small shared values with a TTL (a cached access token, a lock) --

    @abc.abstractmethod
    async def get_value(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None`` (absent or expired)."""

    @abc.abstractmethod
    async def set_value(self, key: str, value: str, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds, replacing any."""

    @abc.abstractmethod
    async def add_value(self, key: str, value: str, ttl: float) -> bool:
        """Store ``value`` only if ``key`` holds nothing; True if stored.
        Atomic across processes, so it can serve as a short lock."""

    @abc.abstractmethod
    async def delete_value(self, key: str, expected: str | None = None) -> bool:
        """Remove ``key`` (only while it still holds ``expected``, when
        given); True if something was removed."""
