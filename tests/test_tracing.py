"""W3C trace context: a client's ``traceparent`` (and ``tracestate``) goes
upstream as sent; without one, or with a malformed one, the gateway starts a
trace; the access line names the trace id either way."""

from __future__ import annotations

import logging
import re

import pytest

from gateway.testing import base_config

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.gen_test
async def test_a_clients_trace_context_travels_upstream_and_is_logged(make_gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await make_gateway(base_config(upstream.url, tmp_path))
    r = await gw.client.request("GET", "/public/a", headers={"traceparent": GIVEN, "tracestate": "vendor=1"})
    assert r.code == 200
    assert upstream.last.header("traceparent") == GIVEN and upstream.last.header("tracestate") == "vendor=1"
    assert [n.lower() for n in upstream.last.names()].count("traceparent") == 1
    assert "trace=4bf92f3577b34da6a3ce929d0e0e4736" in caplog.text


@pytest.mark.gen_test
async def test_without_a_valid_one_the_gateway_starts_a_trace(make_gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await make_gateway(base_config(upstream.url, tmp_path))
    assert (await gw.client.request("GET", "/public/b")).code == 200
    started = TRACEPARENT.match(upstream.last.header("traceparent") or "")
    assert started, upstream.last.headers
    assert f"trace={started.group(1)}" in caplog.text
    assert (await gw.client.request("GET", "/public/b")).code == 200
    assert TRACEPARENT.match(upstream.last.header("traceparent") or "").group(1) != started.group(1)  # a new trace

    for bad in ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "01-xyz", "00-4BF9-bad"):
        r = await gw.client.request("GET", "/public/c", headers={"traceparent": bad, "tracestate": "vendor=1"})
        assert r.code == 200
        assert TRACEPARENT.match(upstream.last.header("traceparent") or ""), (bad, upstream.last.headers)
        assert upstream.last.header("tracestate") is None  # it belonged to the trace that was refused
