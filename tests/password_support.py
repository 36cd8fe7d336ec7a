"""What this project's tests add to :mod:`gateway.testing` for the built-in
password provider: hashing settings cheap enough for tests, a client that
registers and logs in through the provider, and ``bin/gateway serve`` as a
subprocess with those settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

from gateway import testing

ROOT = Path(__file__).resolve().parent.parent

#: Fast hashing in tests: the cost parameters are configuration, not behaviour.
FAST_ARGON2 = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}

#: merged under every configuration the tests start a gateway with: fast
#: hashing, and no default login rate limit (tests log in far more often than
#: 20 times a minute from one address; tests/test_rate_limits.py sees the real
#: default)
GATEWAY_DEFAULTS: dict[str, Any] = {"providers": {"password": FAST_ARGON2}, "rate_limits": []}


class PasswordClient(testing.Client):
    """A :class:`gateway.testing.Client` that also registers and logs in
    with a username and password."""

    async def register(self, username: str = "alice", password: str = "correct horse",
                       **kw: Any) -> dict[str, Any]:
        """``POST {auth_prefix}/password/register``; asserts 201."""
        r = await self.request("POST", f"{self.auth_prefix}/password/register",
                               json_body={"username": username, "password": password}, **kw)
        assert r.code == 201, r.body
        answer: dict[str, Any] = testing.body(r)
        return answer

    async def login(self, username: str = "alice", password: str = "correct horse",
                    **kw: Any) -> dict[str, Any]:
        """``POST {auth_prefix}/password/login``; asserts 200."""
        return await self.login_with("password", {"username": username, "password": password}, **kw)


class GatewayProcess(testing.GatewayProcess):
    """``bin/gateway serve`` as a subprocess, with cheap password hashing."""

    defaults: ClassVar[Mapping[str, Any]] = GATEWAY_DEFAULTS
    command = (str(ROOT / "bin" / "gateway"),)
