"""The proxy's data path: request bodies streamed to the upstream with
backpressure, route policy decided from the headers before any body byte,
body limits, the read and request timeouts of long transfers, slow clients,
and how a misbehaving upstream is answered.

The upstreams here are raw asyncio servers on loopback that parse HTTP/1.1
themselves, so they see exactly what arrives and when, and can stall, reset
or misbehave on cue.  Clients are raw sockets where framing matters.
Transfers of 1 GiB go through a `bin/gateway serve` subprocess whose memory
is read from /proc/<pid>/status (VmRSS); their bytes are generated on the
fly and hashed on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import RssWatch, base_config, body, plateau, until
from gateway.testing.raw import (
    GiB,
    KiB,
    MiB,
    UpRequest,
    answer_digest,
    big_response,
    check_error,
    chunk,
    close_quietly,
    connect,
    iter_body,
    pattern,
    read_head,
    read_response,
    request_head,
    upload,
    warm_up,
)
from password_support import GatewayProcess


def upstream_config(up_url: str, tmp_path: Path, routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return base_config(up_url, tmp_path, routes=routes, **sections)


# ---------------------------------------------------------------------------
# 1. Request bodies
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_401_for_a_huge_post_is_answered_at_once_and_nothing_reaches_the_upstream(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/api/", "upstream": up.url, "auth": "required", "max_body_size": "2GiB"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/upload", [("Content-Type", "application/octet-stream"),
                                                          ("Content-Length", str(GiB))]) + b"hello")
        await writer.drain()
        # Only 5 of the 1 GiB announced were sent: an answer means the
        # decision was made from the headers.
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 401, "unauthenticated")
    await asyncio.sleep(0.3)
    assert up.connections == 0 and up.requests == []


@pytest.mark.gen_test(timeout=30)
async def test_route_policy_refuses_a_huge_post_from_its_headers(make_gateway, raw_up, tmp_path):
    """A session on a route for scripts only (allow_sessions = false): 403 at once."""
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/scripts/", "upstream": up.url, "auth": "required", "allow_sessions": False,
         "max_body_size": "2GiB"}]))
    token = (await rg.client.register())["token"]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/scripts/import", [
            ("Content-Type", "application/octet-stream"), ("Content-Length", str(GiB)),
            ("Authorization", f"Bearer {token}")]) + b"hello")
        await writer.drain()
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 403, "forbidden")
    await asyncio.sleep(0.3)
    assert up.connections == 0 and up.requests == []


@pytest.mark.gen_test(timeout=30)
async def test_expect_100_continue_only_once_the_request_is_allowed(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/api/", "upstream": up.url, "auth": "required"}]))
    payload = b'{"order": 42}'

    # Unauthenticated: the 401 is the first (and only) answer, never a 100.
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(payload))),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 401, status
        data = b"".join([p async for p in iter_body(reader, headers, status)])
        check_error(status, headers, data, 401, "unauthenticated")
    finally:
        close_quietly(writer)
    assert up.requests == []

    # Allowed, but announcing more than the route takes: the 413, never a 100.
    token = (await rg.client.register())["token"]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(20 * MiB)),
                                                          ("Authorization", f"Bearer {token}"),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 413, status
        data = b"".join([p async for p in iter_body(reader, headers, status)])
        check_error(status, headers, data, 413, "payload_too_large")
    finally:
        close_quietly(writer)
    assert up.requests == []

    # Authenticated: 100 Continue, then the body goes through.
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(payload))),
                                                          ("Authorization", f"Bearer {token}"),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, _ = await asyncio.wait_for(read_head(reader), 5)
        assert status == 100, status
        assert up.requests == [] or up.requests[0].received == 0
        writer.write(payload)
        status, headers, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == hashlib.sha256(payload).hexdigest()
    assert [r.method for r in up.requests] == ["POST"]
    assert up.requests[0].header("Expect") is None  # the gateway answered it; hop-by-hop


@pytest.mark.gen_test(timeout=30)
async def test_content_length_over_the_route_limit_is_413_before_anything_is_forwarded(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/small/", "upstream": up.url, "auth": "public", "max_body_size": "1KiB"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/small/x", [("Content-Type", "application/octet-stream"),
                                                       ("Content-Length", "2048")]) + b"0123456789")
        await writer.drain()
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 413, "payload_too_large")
    await asyncio.sleep(0.3)
    assert up.requests == []
    # Exactly the limit passes.
    r = await rg.client.request("POST", "/small/x", body=b"a" * 1024)
    assert r.code == 200, r.body
    assert body(r)["length"] == 1024


@pytest.mark.gen_test(timeout=30)
async def test_chunked_body_crossing_the_limit_is_cut_and_the_upstream_request_aborted(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    limit = 64 * KiB
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/small/", "upstream": up.url, "auth": "public", "max_body_size": "64KiB"}]))
    reader, writer = await connect(rg.port)
    answer = asyncio.ensure_future(read_response(reader))
    try:
        writer.write(request_head("POST", "/small/x", [("Content-Type", "application/octet-stream"),
                                                       ("Transfer-Encoding", "chunked")]))
        for i in range(40):  # 640 KiB at most, far past the limit
            if answer.done():
                break
            try:
                writer.write(chunk(bytes([65 + i % 26]) * (16 * KiB)))
                await writer.drain()
            except (ConnectionError, OSError):
                break
            await asyncio.sleep(0.02)
        try:
            status, headers, data = await asyncio.wait_for(answer, 5)
        except (ConnectionError, asyncio.IncompleteReadError):
            status = None  # cut with a reset before the answer could be read
    finally:
        close_quietly(writer)
    if status is not None:
        check_error(status, headers, data, 413, "payload_too_large")
    # The upstream never saw a complete request, nor a byte past the limit,
    # and its request was ended.
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests), [(r.received, r.complete) for r in up.requests]
    assert all(r.received <= limit for r in up.requests), [r.received for r in up.requests]


@pytest.mark.gen_test(timeout=30)
async def test_request_body_reaches_the_upstream_as_it_arrives(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    total = 4 * MiB
    blocks = list(pattern(total, block=256 * KiB))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/up/file", [("Content-Type", "application/octet-stream"),
                                                       ("Content-Length", str(total))]))
        writer.write(blocks[0])
        await writer.drain()
        await until(lambda: bool(up.requests) and up.requests[0].received >= len(blocks[0]), 5,
                    "the upstream receives the first 256 KiB before the rest is sent")
        assert not up.requests[0].complete
        for b in blocks[1:]:
            writer.write(b)
            await writer.drain()
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data) == {"sha256": hashlib.sha256(b"".join(blocks)).hexdigest(), "length": total,
                                "method": "POST", "path": "/up/file"}


@pytest.mark.gen_test(timeout=30)
async def test_chunked_request_body_streams_too(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    parts = [os.urandom(100_000), os.urandom(70_000), os.urandom(123_457)]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/up/chunks", [("Content-Type", "application/octet-stream"),
                                                         ("Transfer-Encoding", "chunked")]))
        so_far = 0
        for p in parts:
            writer.write(chunk(p))
            await writer.drain()
            so_far += len(p)
            await until(lambda: bool(up.requests) and up.requests[0].received >= so_far, 5,
                        f"the upstream receives each chunk as it is sent ({so_far} bytes)")
            assert not up.requests[0].complete
        writer.write(b"0\r\n\r\n")
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert up.requests[0].complete and up.requests[0].received == sum(map(len, parts))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_client_stalling_mid_body_is_cut_after_read_timeout(make_gateway, raw_up, tmp_path, framing):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public", "read_timeout": "1s"}]))
    reader, writer = await connect(rg.port)
    try:
        if framing == "chunked":
            writer.write(request_head("POST", "/up/stall", [("Content-Type", "application/octet-stream"),
                                                            ("Transfer-Encoding", "chunked")])
                         + chunk(b"s" * (64 * KiB)))
        else:
            writer.write(request_head("POST", "/up/stall", [("Content-Type", "application/octet-stream"),
                                                            ("Content-Length", str(MiB))]) + b"s" * (64 * KiB))
        await writer.drain()
        await until(lambda: bool(up.requests), 5, "the upload starts upstream")
        # Then the client goes silent: within a few read_timeouts the
        # gateway hangs up on it (with or without an error answer).
        try:
            rest = await asyncio.wait_for(reader.read(), 8)
        except ConnectionError:
            rest = b""
        except asyncio.TimeoutError:
            raise AssertionError("the gateway kept waiting for a stalled request body") from None
    finally:
        close_quietly(writer)
    assert not rest.startswith(b"HTTP/1.1 2"), rest[:200]
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_client_going_away_mid_body_aborts_the_upstream_request(make_gateway, raw_up, tmp_path, framing):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    reader, writer = await connect(rg.port)
    part = b"g" * (100 * KiB)
    try:
        if framing == "chunked":
            writer.write(request_head("POST", "/up/gone", [("Content-Type", "application/octet-stream"),
                                                           ("Transfer-Encoding", "chunked")]) + chunk(part))
        else:
            writer.write(request_head("POST", "/up/gone", [("Content-Type", "application/octet-stream"),
                                                           ("Content-Length", str(MiB))]) + part)
        await writer.drain()
        await until(lambda: bool(up.requests) and up.requests[0].received >= len(part), 5,
                    "the first 100 KiB reach the upstream")
    finally:
        writer.close()  # the client goes away mid-body
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests)


@pytest.mark.parametrize("limit", ["100MiB", 0], ids=["100MiB", "no-limit"])
@pytest.mark.gen_test(timeout=60)
async def test_20_mb_upload_passes_intact(make_gateway, raw_up, tmp_path, limit):
    """Past server.max_body_size (10 MiB) on a route that allows more, or has no limit (0)."""
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public", "max_body_size": limit}]))
    payload = random.Random(20).randbytes(20_000_000)
    r = await rg.client.request("POST", "/up/big", body=payload, headers={"Content-Type": "application/octet-stream"})
    assert r.code == 200, r.body[:500]
    assert body(r)["sha256"] == hashlib.sha256(payload).hexdigest()
    assert body(r)["length"] == len(payload)


@pytest.mark.gen_test(timeout=120)
async def test_upstream_not_reading_the_body_stops_the_client_upload(tmp_path, raw_up):
    """Backpressure: while the upstream reads nothing, the gateway stops
    reading from the client (the client's writes block) and holds little."""
    up = await raw_up()
    up.hold = asyncio.Event()
    total = 512 * MiB
    async with GatewayProcess(tmp_path, [{"prefix": "/up/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "1GiB", "read_timeout": "60s"}]) as gp:
        up.hold.set()
        await warm_up(gp.port, "/up/warm")
        up.hold = asyncio.Event()
        base = gp.rss()
        reader, writer = await connect(gp.port)
        digest = hashlib.sha256()
        sent = 0
        blocks = pattern(total)
        try:
            writer.transport.set_write_buffer_limits(high=64 * KiB)
            writer.write(request_head("POST", "/up/held", [("Content-Type", "application/octet-stream"),
                                                           ("Content-Length", str(total))]))
            async with RssWatch(gp) as watch:
                stalled = False
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    block = next(blocks)
                    writer.write(block)
                    digest.update(block)
                    sent += len(block)
                    try:
                        await asyncio.wait_for(writer.drain(), 2)
                    except asyncio.TimeoutError:
                        stalled = True
                        break
                assert stalled, f"the client sent {sent >> 20} MiB while the upstream read nothing"
                assert sent < 128 * MiB, sent
                held_peak = watch.peak
            assert held_peak - base < 50 * MiB, (base >> 20, held_peak >> 20)
            # Released: the rest flows, intact.
            up.hold.set()
            for block in blocks:
                writer.write(block)
                digest.update(block)
                sent += len(block)
                await writer.drain()
            status, _, data = await asyncio.wait_for(read_response(reader), 60)
        finally:
            close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == digest.hexdigest() and sent == total


@pytest.mark.gen_test(timeout=300)
async def test_1_gib_upload_through_a_subprocess_with_bounded_memory(tmp_path, raw_up):
    up = await raw_up()
    async with GatewayProcess(tmp_path, [{"prefix": "/up/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "2GiB", "read_timeout": "60s"}]) as gp:
        await warm_up(gp.port, "/up/warm")
        base = gp.rss()
        async with RssWatch(gp) as watch:
            status, data, sent_sha, sent = await upload(gp.port, "/up/huge", GiB)
    assert status == 200, data
    assert sent == GiB
    assert data == {"sha256": sent_sha, "length": GiB, "method": "POST", "path": "/up/huge"}
    assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)


@pytest.mark.gen_test(timeout=300)
async def test_1_gib_download_through_a_subprocess_with_bounded_memory(tmp_path, raw_up):
    up = await raw_up()
    total = GiB

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if "warm" in req.target:
            return await answer_digest(req, reader, writer)
        return await big_response(up, total, small_buffer=False)(req, reader, writer)

    up.respond = respond
    async with GatewayProcess(tmp_path, [{"prefix": "/down/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "64MiB"}]) as gp:
        await warm_up(gp.port, "/down/warm")
        base = gp.rss()
        got = hashlib.sha256()
        received = 0
        async with RssWatch(gp) as watch:
            reader, writer = await connect(gp.port, limit=4 * MiB)
            try:
                writer.write(request_head("GET", "/down/huge"))
                status, headers = await asyncio.wait_for(read_head(reader), 10)
                assert status == 200
                async for part in iter_body(reader, headers, status):
                    got.update(part)
                    received += len(part)
            finally:
                close_quietly(writer)
    assert received == total == up.sent
    assert got.hexdigest() == up.sent_digest.hexdigest()
    assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)


# ---------------------------------------------------------------------------
# 2. Long responses
# ---------------------------------------------------------------------------


async def wait_for_close(reader: asyncio.StreamReader, limit: float) -> None:
    """Hold the upstream's side open until the gateway hangs up (at most ``limit`` s)."""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while await asyncio.wait_for(reader.read(65536), limit):
            pass


@pytest.mark.gen_test(timeout=30)
async def test_request_timeout_bounds_the_wait_for_the_response_head(make_gateway, raw_up, tmp_path):
    async def never_answers(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await wait_for_close(reader, 10)
        return False

    up = await raw_up(never_answers)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/slow/", "upstream": up.url, "auth": "public", "request_timeout": "0.5s",
         "read_timeout": "30s"}]))
    started = time.monotonic()
    r = await rg.client.request("GET", "/slow/x")
    elapsed = time.monotonic() - started
    assert r.code == 504, r.body
    assert body(r)["error"] == "gateway_timeout"
    assert elapsed < 5, elapsed  # not hanging for the read_timeout
    await until(lambda: up.open_connections == 0, 5, "the upstream request is abandoned")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_read_timeout_cuts_a_stalled_response_body(make_gateway, raw_up, tmp_path, framing):
    async def stalls(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(b"p" * 1000))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
                         + b"p" * 1000)
        await writer.drain()
        await wait_for_close(reader, 15)
        return False

    up = await raw_up(stalls)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/s/", "upstream": up.url, "auth": "public", "request_timeout": "30s", "read_timeout": "1s"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("GET", "/s/x"))
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 200
        try:
            rest = await asyncio.wait_for(reader.read(), 8)
        except ConnectionError:
            rest = b""
        except asyncio.TimeoutError:
            raise AssertionError("the stalled response was not cut") from None
    finally:
        close_quietly(writer)
    assert b"HTTP/1." not in rest, rest[:300]  # no second status line
    if framing == "chunked":
        assert "chunked" in headers.get("Transfer-Encoding", "")
        assert not rest.endswith(b"0\r\n\r\n"), "a cut response must not look complete"
    else:
        assert int(headers.get("Content-Length", "100000")) == 100000
        assert len(rest) < 100000
    assert b"p" * 1000 in rest
    await until(lambda: up.open_connections == 0, 5, "the upstream transfer is aborted")


@pytest.mark.gen_test(timeout=60)
async def test_server_sent_events_stream_unbuffered_through_quiet_gaps(make_gateway, raw_up, tmp_path):
    n = 4
    seen = [asyncio.Event() for _ in range(n)]
    problems: list[str] = []

    async def events(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(n):
            if i == n - 1:
                await asyncio.sleep(2.5)  # quiet for longer than request_timeout
            writer.write(chunk(f"id: {i}\ndata: event {i}\n\n".encode()))
            await writer.drain()
            try:
                await asyncio.wait_for(seen[i].wait(), 5)
            except asyncio.TimeoutError:
                problems.append(f"event {i} did not reach the client while the upstream waited")
                break
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    up = await raw_up(events)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/events/", "upstream": up.url, "auth": "public", "read_timeout": "10m",
         "request_timeout": "1s"}]))
    received = bytearray()

    def on_chunk(data: bytes) -> None:
        received.extend(data)
        for i in range(n):
            if f"data: event {i}\n\n".encode() in received:
                seen[i].set()

    r = await rg.client.request("GET", "/events/feed", headers={"Accept": "text/event-stream"},
                                streaming_callback=on_chunk)
    assert problems == []
    assert r.code == 200, bytes(received)[:300]
    assert r.headers.get("Content-Type") == "text/event-stream"
    assert bytes(received) == b"".join(f"id: {i}\ndata: event {i}\n\n".encode() for i in range(n))


@pytest.mark.gen_test(timeout=120)
async def test_slow_client_pauses_the_upstream_and_resumes(tmp_path, raw_up):
    total = 256 * MiB
    up = await raw_up()

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if "warm" in req.target:
            return await answer_digest(req, reader, writer)
        return await big_response(up, total)(req, reader, writer)

    up.respond = respond
    async with GatewayProcess(tmp_path, [{"prefix": "/down/", "upstream": up.url, "auth": "public"}]) as gp:
        await warm_up(gp.port, "/down/warm")
        base = gp.rss()
        reader, writer = await connect(gp.port, limit=64 * KiB)
        try:
            writer.write(request_head("GET", "/down/big"))
            status, headers = await asyncio.wait_for(read_head(reader), 10)
            assert status == 200
            async with RssWatch(gp) as watch:
                # The client reads nothing more: the upstream's writes block.
                held = await plateau(lambda: up.sent)
                assert held < 128 * MiB, f"the gateway read {held >> 20} MiB for a client that reads nothing"
            assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)
            got = hashlib.sha256()
            received = 0
            async for part in iter_body(reader, headers, status):
                got.update(part)
                received += len(part)
        finally:
            close_quietly(writer)
    assert received == total == up.sent
    assert got.hexdigest() == up.sent_digest.hexdigest()


@pytest.mark.gen_test(timeout=30)
async def test_client_going_away_mid_response_aborts_the_upstream_transfer(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    up.respond = big_response(up, 1 << 30)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/down/", "upstream": up.url, "auth": "public"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("GET", "/down/big"))
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 200
        await reader.readexactly(MiB)
    finally:
        writer.close()
    await until(lambda: up.open_connections == 0, 5, "the upstream transfer is aborted")
    assert up.sent < 1 << 30


# ---------------------------------------------------------------------------
# 3. Upstream behaviour
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_post_reset_on_a_reused_connection_is_502_and_never_sent_twice(make_gateway, raw_up, tmp_path):
    async def resets_reused_posts(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if req.method == "POST" and req.index > 0:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST: the POST was read, no answer comes
            return False
        return await answer_digest(req, reader, writer)

    up = await raw_up(resets_reused_posts)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/shop/", "upstream": up.url, "auth": "public"}]))
    r = await rg.client.request("GET", "/shop/cart")
    assert r.code == 200, r.body
    await asyncio.sleep(0.2)
    r = await rg.client.request("POST", "/shop/orders", body=b'{"item": 1}',
                                headers={"Content-Type": "application/json"})
    posts = [q for q in up.requests if q.method == "POST"]
    assert posts and posts[0].index > 0, "the POST did not go on the pooled connection the GET used"
    assert len(posts) == 1, f"the upstream received the POST {len(posts)} times"
    data = body(r)
    assert r.code == 502, r.body
    assert data["error"] == "bad_gateway"
    assert "may" in data["message"].lower() and "processed" in data["message"].lower(), data


@pytest.mark.gen_test(timeout=30)
async def test_malformed_upstream_header_is_502_and_one_log_line(make_gateway, raw_up, tmp_path, caplog):
    async def malformed(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nThis line is not a header\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        return False

    up = await raw_up(malformed)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/m/", "upstream": up.url, "auth": "public"}]))
    caplog.set_level(logging.INFO, logger="gateway")
    caplog.clear()
    r = await rg.client.request("GET", "/m/x")
    assert r.code == 502, r.body
    assert body(r)["error"] == "bad_gateway"
    assert b"Traceback" not in r.body and b"This line" not in r.body
    await asyncio.sleep(0.2)
    records = [rec for rec in caplog.records if rec.name.startswith("gateway")]
    naming = [rec for rec in records if rec.name != "gateway.access" and f"127.0.0.1:{up.port}" in rec.getMessage()]
    assert len(naming) == 1, [(rec.name, rec.getMessage()) for rec in records]
    assert naming[0].levelno >= logging.WARNING
    for rec in records:
        assert rec.exc_info is None and not rec.exc_text, (rec.name, rec.getMessage())
        assert "Traceback" not in rec.getMessage() and "\n" not in rec.getMessage(), rec.getMessage()


ALLOWED_ADDED = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
                 "traceparent",  # W3C trace context: a trace is started when the client sent none
                 "content-length", "transfer-encoding"}  # (framing is the transport's, not an addition)


@pytest.mark.gen_test(timeout=30)
async def test_no_header_is_added_upstream_that_the_client_did_not_send(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/public/", "upstream": up.url, "auth": "public"}]))
    for method, payload in (("POST", b"hello"), ("GET", b""), ("PUT", b"")):
        reader, writer = await connect(rg.port)
        try:
            extra = [("Content-Length", str(len(payload)))] if method != "GET" else []
            writer.write(request_head(method, "/public/bare", [("X-Custom", "1"), *extra]) + payload)
            status, _, data = await asyncio.wait_for(read_response(reader), 5)
        finally:
            close_quietly(writer)
        assert status == 200, data
        seen = up.requests[-1]
        assert seen.method == method and bytes(seen.data) == payload
        added = seen.names() - ALLOWED_ADDED - {"x-custom"}
        assert added == set(), (method, seen.headers)
        for name in ("content-type", "accept", "accept-encoding", "user-agent"):
            assert name not in seen.names(), (method, seen.headers)
