"""The shared-state contract: counters and small values with a TTL.

Besides sessions, the gateway keeps a little state that every process must
see alike: counters in a fixed window (login failures), rate-limit buckets
(:meth:`SharedState.take`) and short values with a TTL (a provider's cached access token, a lock around fetching it).
:class:`SharedState` is that service; it knows nothing of sessions.  Every
entry expires on its own, so nothing here needs cleaning up.

A backend is shared (``shared = True``) when several processes see the same
state; the in-memory one is not.  Every method may raise
:class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import abc
import math

#: slack of the rate-limit arithmetic (seconds): float rounding never refuses a request that fits
_EPSILON = 1e-6


def gcra(tat: float | None, now: float, limit: int, window: float) -> tuple[bool, int, float, float]:
    """One step of the generic cell rate algorithm for ``limit`` requests per
    ``window`` seconds: from the stored theoretical arrival time ``tat``
    (``None`` for none), ``(allowed, remaining, reset_after, new tat)``.
    The Redis backend runs the same arithmetic in Lua (in milliseconds)."""
    interval = window / limit
    start = now if tat is None or tat < now else tat
    new_tat = start + interval
    allow_at = new_tat - window
    if allow_at - now > _EPSILON:
        return False, 0, allow_at - now, start
    remaining = int(math.floor((window - (new_tat - now)) / interval + _EPSILON))
    return True, max(0, remaining), new_tat - now, new_tat


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

    # -- rate limits: one atomic step per request -------------------------

    @abc.abstractmethod
    async def take(self, key: str, limit: int, window: float) -> tuple[bool, int, float]:
        """Take one request from the bucket ``key`` allowing ``limit``
        requests per ``window`` seconds (GCRA: a burst of ``limit`` at once,
        then one every ``window / limit`` seconds; :func:`gcra`), in one
        atomic step shared by every process.  Returns ``(allowed, remaining,
        reset_after)``: ``remaining`` requests would still be allowed now;
        ``reset_after`` is, when allowed, the seconds until the whole
        ``limit`` is available again and, when refused, the seconds until a
        request will be allowed (nothing is taken then).  The bucket expires
        on its own once full again.  Keys are apart from :meth:`hit`'s."""

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
