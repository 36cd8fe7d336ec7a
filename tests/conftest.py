"""The fixtures of this project's tests.

The shared ones (a real redis-server, a recording upstream, gateways on free
ports) come from :mod:`gateway.testing.pytest_plugin`, exactly as a plugin
package gets them; what is here is this project's own: cheap password
hashing and a password-aware client for every gateway started, the
per-store ``session_section`` and the raw upstream of the streaming tests.

Everything is a real server; nothing of the gateway is patched.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterator

import pytest
import tornado.ioloop

from gateway.testing import Client, merge_config
from gateway.testing.raw import RawUpstream, Respond
from password_support import GATEWAY_DEFAULTS, PasswordClient

pytest_plugins = ["gateway.testing.pytest_plugin"]

# The example provider package's own tests run in a fresh virtual
# environment of their own (test_plugin_package.py), not in this one.
collect_ignore = ["plugins/gateway_example_provider/tests"]


@pytest.fixture
def gateway_defaults() -> dict[str, Any]:
    """Every gateway a test starts hashes passwords cheaply."""
    return merge_config({}, GATEWAY_DEFAULTS)


@pytest.fixture
def gateway_client_class() -> type[Client]:
    """Every running gateway's client can register and log in with a password."""
    return PasswordClient


@pytest.fixture(params=["memory", "redis"])
def session_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [sessions] store settings, once for each store."""
    if request.param == "redis":
        return {"store": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return {"store": "memory"}


@pytest.fixture
def raw_up(io_loop: tornado.ioloop.IOLoop) -> Iterator[Callable[..., Awaitable[RawUpstream]]]:
    """``await raw_up(respond=None)`` -> a started :class:`RawUpstream`."""
    started: list[RawUpstream] = []

    async def make(respond: Respond | None = None) -> RawUpstream:
        up = await RawUpstream(respond).start()
        started.append(up)
        return up

    yield make

    async def close_all() -> None:
        for up in started:
            await up.close()

    io_loop.run_sync(close_all)
