"""In-memory shared state: for a one-process trial and for tests.

Same contract as the Redis state (one contract test suite runs on both);
it lives in this process only, like the in-memory session store it goes with.
Expired entries are dropped when read, and swept every so many writes.
"""

from __future__ import annotations

import time

from gateway.state.base import SharedState, gcra


class MemorySharedState(SharedState):
    name = "memory"
    shared = False

    #: every this many writes, expired entries are swept (Redis does this with TTLs)
    SWEEP_EVERY = 1000

    def __init__(self) -> None:
        #: counter -> (count, end of its window)
        self._counters: dict[str, tuple[int, float]] = {}
        #: rate-limit bucket -> (theoretical arrival time, when it is full again)
        self._buckets: dict[str, tuple[float, float]] = {}
        #: key -> (value, deadline)
        self._values: dict[str, tuple[str, float]] = {}
        self._writes = 0

    def _count_write(self) -> None:
        self._writes += 1
        if self._writes % self.SWEEP_EVERY == 0:
            self.sweep()

    def sweep(self) -> None:
        """Forget expired counters and values."""
        now = time.time()
        for key in [k for k, (_, end) in self._counters.items() if end <= now]:
            self._counters.pop(key, None)
        for key in [k for k, (_, end) in self._values.items() if end <= now]:
            self._values.pop(key, None)
        for key in [k for k, (_, end) in self._buckets.items() if end <= now]:
            self._buckets.pop(key, None)

    async def hit(self, key: str, window: float) -> tuple[int, float]:
        self._count_write()
        now = time.time()
        count, end = self._counters.get(key, (0, 0.0))
        if end <= now:
            count, end = 0, now + window
        count += 1
        self._counters[key] = (count, end)
        return count, end - now

    async def peek(self, key: str) -> tuple[int, float]:
        now = time.time()
        count, end = self._counters.get(key, (0, 0.0))
        if end <= now:
            self._counters.pop(key, None)
            return 0, 0.0
        return count, end - now

    async def clear(self, key: str) -> None:
        self._counters.pop(key, None)

    async def take(self, key: str, limit: int, window: float) -> tuple[bool, int, float]:
        now = time.time()
        stored = self._buckets.get(key)
        allowed, remaining, reset_after, tat = gcra(stored[0] if stored else None, now, limit, window)
        if allowed:  # one step of the event loop: atomic for this process
            self._count_write()
            self._buckets[key] = (tat, tat)
        return allowed, remaining, reset_after

    async def get_value(self, key: str) -> str | None:
        item = self._values.get(key)
        if item is None:
            return None
        value, end = item
        if end <= time.time():
            self._values.pop(key, None)
            return None
        return value

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        self._count_write()
        self._values[key] = (value, time.time() + ttl)

    async def add_value(self, key: str, value: str, ttl: float) -> bool:
        # get_value and set_value never suspend: the check and the write are
        # one step of the event loop, so atomic for this process
        if await self.get_value(key) is not None:
            return False
        await self.set_value(key, value, ttl)
        return True

    async def delete_value(self, key: str, expected: str | None = None) -> bool:
        current = await self.get_value(key)
        if current is None or (expected is not None and current != expected):
            return False
        self._values.pop(key, None)
        return True
