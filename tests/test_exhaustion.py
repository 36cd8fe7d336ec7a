"""Resource exhaustion and credential leaks, each reproduced against a real
gateway: aborted and completed uploads free their memory, slow readers cost
bounded memory and cannot starve an upstream's pool for ever, the gateway's
own JSON endpoints have their own small body limit, and a gateway credential
is never forwarded from wherever in a request it hides.

Memory is the VmRSS of a `bin/gateway serve` subprocess (one process); the
upstreams are raw asyncio servers on loopback (see test_streaming).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from gateway.testing import RssWatch, assert_error, base_config, body, cookie_header, plateau, until
from gateway.testing.raw import (
    KiB,
    MiB,
    UpRequest,
    answer_digest,
    big_response,
    check_error,
    chunk,
    close_quietly,
    connect,
    pattern,
    read_head,
    read_response,
    request_head,
    upload,
    warm_up,
)
from password_support import GatewayProcess


def gws() -> str:
    return "gws_" + secrets.token_urlsafe(32)


def gwk() -> str:
    return "gwk_" + secrets.token_hex(8) + "_" + secrets.token_urlsafe(32)


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=180)
async def test_aborted_request_bodies_free_everything(tmp_path, raw_up):
    up = await raw_up()
    total = 10 * MiB - 1
    routes = [{"prefix": "/api/", "upstream": up.url, "auth": "required"},
              {"prefix": "/pub/", "upstream": up.url, "auth": "public"}]
    async with GatewayProcess(tmp_path, routes, server={"shutdown_timeout": "20s"}) as gp:
        await warm_up(gp.port, "/pub/warm")
        warm = len(up.requests)
        base = gp.rss()

        async def aborted_upload(i: int) -> None:
            reader, writer = await connect(gp.port)
            try:
                writer.write(request_head("POST", f"/api/upload/{i}", [
                    ("Content-Type", "application/octet-stream"), ("Content-Length", str(total))]))
                left = total - 1  # everything but the last byte
                for block in pattern(left):
                    writer.write(block)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass  # the gateway may hang up once it has answered 401
            finally:
                close_quietly(writer)

        async with RssWatch(gp) as watch:
            for batch in range(0, 30, 5):
                await asyncio.gather(*(aborted_upload(i) for i in range(batch, batch + 5)))
            await asyncio.sleep(1)
        assert watch.peak - base < 40 * MiB, (base >> 20, watch.peak >> 20)
        assert len(up.requests) == warm, "an unauthenticated upload reached the upstream"
        # Still serving, and nothing counted in flight: SIGTERM exits at once
        # (a request still counted would hold it for shutdown_timeout, 20 s).
        status, data, _, _ = await upload(gp.port, "/pub/after", 1000)
        assert status == 200, data
        elapsed = await gp.stop(timeout=30)
    out = gp.output()
    assert gp.proc is not None and gp.proc.returncode == 0, out[-2000:]
    assert elapsed < 10, f"SIGTERM took {elapsed:.1f} s: requests were left counted in flight"
    counts = [int(n) for n in re.findall(r"(\d+) request\(s\) in flight", out)]
    assert all(n == 0 for n in counts), counts


@pytest.mark.gen_test(timeout=180)
async def test_several_slow_readers_cost_bounded_memory(tmp_path, raw_up):
    size = 100_000_000
    up = await raw_up()

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if "warm" in req.target:
            return await answer_digest(req, reader, writer)
        return await big_response(up, size)(req, reader, writer)

    up.respond = respond
    async with GatewayProcess(tmp_path, [{"prefix": "/down/", "upstream": up.url, "auth": "public"}]) as gp:
        await warm_up(gp.port, "/down/warm")
        base = gp.rss()
        clients = []
        try:
            async with RssWatch(gp) as watch:
                for _ in range(5):
                    reader, writer = await connect(gp.port, limit=64 * KiB)
                    clients.append(writer)
                    writer.write(request_head("GET", "/down/big"))
                    status, _ = await asyncio.wait_for(read_head(reader), 10)
                    assert status == 200
                # None of them reads: the upstream's writes stall.
                held = await plateau(lambda: up.sent)
            assert held < 5 * size // 2, f"the gateway read {held >> 20} MiB for clients that read nothing"
            assert watch.peak - base < 80 * MiB, (base >> 20, watch.peak >> 20)
        finally:
            for writer in clients:
                close_quietly(writer)
        # The gateway lets go of them and carries on.
        status, data, _, _ = await upload(gp.port, "/down/warm-after", 1000)
        assert status == 200, data


@pytest.mark.gen_test(timeout=120)
async def test_bodies_of_completed_requests_are_freed_at_once(tmp_path, raw_up):
    up = await raw_up()
    async with GatewayProcess(tmp_path, [{"prefix": "/up/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "20MiB"}]) as gp:
        await warm_up(gp.port, "/up/warm")
        base = gp.rss()
        done: list[int] = []

        async def poster() -> None:
            deadline = time.monotonic() + 10
            for _ in range(200):  # bounded in count and in time
                if time.monotonic() > deadline:
                    return
                status, data, sent_sha, _ = await upload(gp.port, "/up/file", 10 * MiB)
                assert status == 200, data
                assert data["sha256"] == sent_sha
                done.append(1)

        async with RssWatch(gp) as watch:
            await asyncio.gather(poster(), poster())
        assert len(done) >= 4, done
        assert watch.peak - base < 100 * MiB, (len(done), base >> 20, watch.peak >> 20)


# ---------------------------------------------------------------------------
# The upstream pool
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_stalled_readers_do_not_starve_an_upstream_for_ever(make_gateway, raw_up, tmp_path):
    big = await raw_up()
    big.respond = big_response(big, 1 << 30)  # generated as read: the readers stall it early
    other = await raw_up()
    rg = await make_gateway(base_config(big.url, tmp_path, server={"upstream_max_connections": 4}, routes=[
        {"prefix": "/a/", "upstream": big.url, "auth": "public", "connect_timeout": "1s"},
        {"prefix": "/b/", "upstream": other.url, "auth": "public", "connect_timeout": "1s"},
    ]))
    clients = []
    try:
        readers = []
        for _ in range(5):
            reader, writer = await connect(rg.port, limit=64 * KiB)
            writer.write(request_head("GET", "/a/big"))
            clients.append(writer)
            readers.append(reader)
        await until(lambda: len(big.requests) >= 4, 5, "four responses start")
        await plateau(lambda: big.sent, quiet=1.0, limit=20)
        assert big.connections <= 4, f"{big.connections} connections to an upstream limited to 4"

        # Another request to the same upstream: 503 within about connect_timeout, not a hang.
        started = time.monotonic()
        r = await rg.client.request("GET", "/a/small")
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed
        # (named by its address or by its route, the client-facing name of an upstream)
        assert_error(r, 503, "unavailable", contains=(f"127.0.0.1:{big.port}", big.url, "/a/"))
        # Another upstream is not affected.
        r = await rg.client.request("GET", "/b/x")
        assert r.code == 200, r.body
        assert body(r)["path"] == "/b/x"
        # The fifth stalled reader, which never got a connection, got its 503 too.
        statuses = []
        for reader in readers:
            status, _ = await asyncio.wait_for(read_head(reader), 5)
            statuses.append(status)
        assert sorted(statuses) == [200, 200, 200, 200, 503], statuses
    finally:
        for writer in clients:
            close_quietly(writer)


# ---------------------------------------------------------------------------
# The gateway's own endpoints
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_10_mib_login_body_is_413_before_it_is_read(gw, upstream):
    reader, writer = await connect(gw.port)
    try:
        writer.write(request_head("POST", "/auth/password/login", [
            ("Content-Type", "application/json"), ("Content-Length", str(10 * MiB))]) + b'{"username": "')
        await writer.drain()
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 413, "payload_too_large")


@pytest.mark.gen_test(timeout=30)
async def test_a_chunked_login_body_crossing_auth_max_body_size_is_413(gw, upstream):
    reader, writer = await connect(gw.port)
    answer = asyncio.ensure_future(read_response(reader))
    try:
        writer.write(request_head("POST", "/auth/password/login", [
            ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]))
        writer.write(chunk(b'{"username": "alice", "password": "'))
        for _ in range(64):  # 1 MiB at most; the limit is 64 KiB
            if answer.done():
                break
            try:
                writer.write(chunk(b"p" * (16 * KiB)))
                await writer.drain()
            except (ConnectionError, OSError):
                break
            await asyncio.sleep(0.02)
        status, headers, data = await asyncio.wait_for(answer, 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 413, "payload_too_large")
    # A login of ordinary size is still a login.
    await gw.client.register()
    await gw.client.login()


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------


def expires_cookie(set_cookie: str) -> bool:
    """Does this Set-Cookie remove the cookie (Max-Age=0 or an Expires in the past)?"""
    attrs = {}
    for part in set_cookie.split(";")[1:]:
        k, _, v = part.strip().partition("=")
        attrs[k.lower()] = v
    if "max-age" in attrs:
        return int(attrs["max-age"]) <= 0
    if "expires" in attrs:
        return email.utils.parsedate_to_datetime(attrs["expires"]) < datetime.now(timezone.utc)
    return False


@pytest.mark.gen_test(timeout=30)
async def test_invalid_or_expired_credentials_on_an_optional_route_are_401(gw, upstream):
    reg = await gw.client.register()
    dead = reg["token"]
    r = await gw.client.request("POST", "/auth/logout", token=dead)
    assert r.code == 204, r.body
    for label, headers in (("unknown bearer token", {"Authorization": f"Bearer {gws()}"}),
                           ("ended session's token", {"Authorization": f"Bearer {dead}"}),
                           ("unknown API key", {"X-API-Key": gwk()}),
                           ("malformed API key", {"Authorization": "Bearer gwk_nonsense"})):
        r = await gw.client.request("GET", "/opt/page", headers=headers)
        assert r.code == 401, (label, r.code, r.body)
        assert body(r)["error"] in ("unauthenticated", "invalid_credentials"), (label, r.body)
    # A dead cookie: 401, and the cookie is cleared.
    r = await gw.client.request("GET", "/opt/page", headers={"Cookie": f"gw_session={dead}"})
    assert r.code == 401, r.body
    cleared = cookie_header(r)
    assert cleared is not None and expires_cookie(cleared), r.headers.get_list("Set-Cookie")
    assert upstream.seen == []
    # Only a request without any credential goes upstream, anonymously.
    r = await gw.client.request("GET", "/opt/page", headers={"Cookie": "theme=dark"})
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.path == "/opt/page"
    assert not {n.lower().replace("_", "-") for n in seen.names()} & {
        "x-user-id", "x-auth-provider", "x-session-id", "x-auth-scopes"}
    assert seen.header("Cookie") == "theme=dark"


HIDDEN_CREDENTIALS = [
    ("query access_token", lambda: (f"?access_token={gws()}", {}), ("access_token", "query")),
    ("query api_key", lambda: (f"?page=2&api_key={gwk()}", {}), ("api_key", "query")),
    ("X-Auth-Token header", lambda: ("", {"X-Auth-Token": gws()}), ("x-auth-token",)),
    ("another cookie", lambda: ("", {"Cookie": f"theme=dark; token={gws()}"}), ("cookie",)),
    ("Basic password", lambda: ("", {"Authorization": "Basic " + base64.b64encode(
        f"user:{gws()}".encode()).decode()}), ("authorization",)),
    ("Referer", lambda: ("", {"Referer": f"https://app.example/page?token={gws()}"}), ("referer",)),
]


@pytest.mark.parametrize("prefix", ["/public/", "/opt/"])
@pytest.mark.parametrize("label,make,where", HIDDEN_CREDENTIALS, ids=[c[0] for c in HIDDEN_CREDENTIALS])
@pytest.mark.gen_test(timeout=30)
async def test_a_gateway_credential_anywhere_else_is_refused_not_forwarded(gw, upstream, prefix, label, make, where):
    query, headers = make()
    r = await gw.client.request("GET", f"{prefix}x{query}", headers=headers)
    assert_error(r, 400, "invalid_request")
    message = body(r)["message"].lower()
    assert any(w in message for w in where), (label, where, message)
    assert "gws_" not in message and "gwk_" not in message  # named, not echoed
    assert upstream.seen == []


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_unicode_case_folding_cannot_make_a_required_route_public(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path, routes=[
        {"prefix": "/pub/", "upstream": upstream.url, "auth": "public"},
        {"prefix": "/pub/secret/", "upstream": upstream.url, "auth": "required"},
    ]))
    for path in ("/pub/%C5%BFecret/x",  # LATIN SMALL LETTER LONG S: casefolds to s
                 "/pub/%EF%BD%93ecret/x",  # FULLWIDTH LATIN SMALL LETTER S: NFKC to s
                 "/pub/%C5%BF%EF%BD%85cret/x"):
        r = await rg.client.request("GET", path)
        assert_error(r, 400, "invalid_request", contains=("ambiguous",))
    assert upstream.seen == []
    assert (await rg.client.request("GET", "/pub/secret/x")).code == 401
    r = await rg.client.request("GET", "/pub/other/x")
    assert r.code == 200 and upstream.last.path == "/pub/other/x"
