"""The example provider, tested the way a plugin package tests itself: a real
gateway on a loopback port with ``[providers.example]`` configured, a real
upstream behind it, through the gateway's own fixtures (``make_gateway``,
``upstream``)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
import tornado.ioloop

from gateway.testing import RunningGateway, Upstream, assert_error, base_config

SECRET = "example-shared-secret-for-tests"


def ticket(subject: str) -> str:
    """What the identity server hands out: <subject>.<hmac>."""
    return subject + "." + hmac.new(SECRET.encode(), subject.encode(), hashlib.sha256).hexdigest()[:32]


@pytest.fixture
def example_gw(make_gateway: Any, upstream: Upstream, tmp_path: Path,
               io_loop: tornado.ioloop.IOLoop) -> RunningGateway:
    config = base_config(upstream.url, tmp_path,
                         providers={"example": {"secret": SECRET, "display_name": "Acme SSO"}})
    running: RunningGateway = io_loop.run_sync(lambda: make_gateway(config))
    return running


@pytest.mark.gen_test(timeout=30)
async def test_a_signed_ticket_logs_in_and_the_upstream_sees_the_user(
        example_gw: RunningGateway, upstream: Upstream) -> None:
    login = await example_gw.client.login_with("example", {"ticket": ticket("emp-1042")})
    assert login["token"]
    assert login["user"]["profile"] == {"sso": "Acme SSO", "sso_subject": "emp-1042"}

    r = await example_gw.client.request("GET", "/api/orders?page=2", token=login["token"])
    assert r.code == 200, r.body
    assert (upstream.last.path, upstream.last.query) == ("/api/orders", "page=2")
    assert upstream.last.header("X-User-Id") == login["user"]["id"]
    assert upstream.last.header("X-Auth-Provider") == "example"
    assert upstream.last.header("Authorization") is None


@pytest.mark.gen_test(timeout=30)
async def test_a_forged_ticket_is_refused(example_gw: RunningGateway, upstream: Upstream) -> None:
    r = await example_gw.client.request("POST", "/auth/example/login", json_body={"ticket": "emp-1042.forged"})
    assert_error(r, 401, "invalid_credentials")
    r = await example_gw.client.request("GET", "/api/orders")
    assert_error(r, 401, "unauthenticated")
    assert upstream.seen == []
