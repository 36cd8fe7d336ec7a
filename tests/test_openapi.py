"""The published contract: ``GET /auth/openapi.json`` and ``Allow`` on every 405.

The document is validated against the OpenAPI 3.1 specification, then
schemathesis tests a live gateway against it: a gateway on a free loopback
port with every built-in provider on (WeChat's API faked on loopback too),
every check schemathesis has, stateless and stateful (login answers link to
the endpoints that need their token).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from openapi_spec_validator import validate

from gateway.errors import ERROR_STATUS
from gateway.testing import GatewayFactory, assert_error, base_config, body, free_port, merge_config
from gateway.testing.wechat import start_fake_wechat
from password_support import GATEWAY_DEFAULTS, PasswordClient

DOC = "/auth/openapi.json"
APPID = "wx0123456789abcdef"
#: the account schemathesis logs in with (registered before it runs)
FUZZER = {"username": "fuzzer", "password": "correct horse battery"}
#: every gateway endpoint of the test gateway, and the methods it answers
ENDPOINTS = {
    "/auth/refresh": {"POST"},
    "/auth/logout": {"POST"},
    "/auth/logout-all": {"POST"},
    "/auth/session": {"GET"},
    "/auth/sessions": {"GET"},
    "/auth/sessions/s_abc": {"DELETE"},
    "/auth/openapi.json": {"GET"},
    "/auth/password/login": {"POST"},
    "/auth/password/register": {"POST"},
    "/auth/password/change": {"POST"},
    "/auth/wechat/login": {"POST"},
    "/auth/wechat/decrypt": {"POST"},
    "/auth/wechat/phone": {"POST"},
}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def gateway_config(upstream_url: str, tmp_path: Path, wechat_url: str, **sections: Any) -> dict[str, Any]:
    """:func:`base_config` with WeChat on (one mini-program, its API at ``wechat_url``)."""
    wechat = {"wechat": {"api_base": wechat_url, "apps": {"shop": {"appid": APPID, "secret": "s3cret"}}}}
    return merge_config(base_config(upstream_url, tmp_path, providers=wechat), sections)


@pytest.fixture
def wechat(io_loop):
    fake, server = start_fake_wechat(free_port())
    fake.add_app(APPID, "s3cret")
    yield fake
    server.stop()


@pytest.fixture
def full_gw(make_gateway, upstream, tmp_path, io_loop, wechat):
    config = gateway_config(upstream.url, tmp_path, wechat.url, sessions={
        "cookie_name": "shop_session", "allowed_origins": ["https://app.example"]})
    return io_loop.run_sync(lambda: make_gateway(config))


# ---------------------------------------------------------------------------
# 405 and Allow
# ---------------------------------------------------------------------------


def served_paths(doc: dict[str, Any]) -> dict[str, set[str]]:
    """Each path of the document, its parameters filled with a value they
    accept, and the methods it documents."""
    out = {}
    for path, item in doc["paths"].items():
        for op in item.values():
            for parameter in op.get("parameters", []):
                assert re.fullmatch(parameter["schema"]["pattern"], "s_abc"), parameter
                path = path.replace("{" + parameter["name"] + "}", "s_abc")
        out[path] = {method.upper() for method in item}
    return out


@pytest.mark.gen_test
async def test_every_405_names_the_methods_the_resource_answers(full_gw):
    doc = body(await full_gw.client.request("GET", DOC))
    endpoints = served_paths(doc)
    assert endpoints.items() >= ENDPOINTS.items()  # the others are being added by their own modules
    for path, allowed in endpoints.items():
        for method in METHODS:
            r = await full_gw.client.request(method, path)
            if method in allowed:
                assert r.code != 405, (method, path)
                continue
            assert r.code == 405, (method, path, r.code, r.body)
            assert set(r.headers["Allow"].split(", ")) == allowed, (method, path, r.headers["Allow"])
            if method != "HEAD":
                assert body(r)["error"] == "method_not_allowed"


@pytest.mark.gen_test
async def test_a_preflight_is_still_answered_and_a_plain_options_is_a_405_with_allow(full_gw):
    r = await full_gw.client.request("OPTIONS", "/auth/session", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert r.code == 204 and "Allow" not in r.headers
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = await full_gw.client.request("OPTIONS", "/auth/session")
    assert_error(r, 405, "method_not_allowed", contains="preflight")
    assert r.headers["Allow"] == "GET"


@pytest.mark.gen_test
async def test_the_proxy_names_what_it_forwards_on_a_method_it_does_not(full_gw, upstream):
    r = await full_gw.client.request("TRACE", "/public/x")
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
    assert not upstream.seen


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_document_is_valid_openapi_3_1_and_describes_every_endpoint(full_gw):
    r = await full_gw.client.request("GET", DOC)
    assert r.code == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = body(r)
    validate(doc)  # the OpenAPI 3.1 specification's own schema, and its rules
    assert doc["openapi"] == "3.1.0"
    assert served_paths(doc).items() >= ENDPOINTS.items()
    # every error code, with its status
    error = doc["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["enum"] == list(ERROR_STATUS)
    for code, status in ERROR_STATUS.items():
        assert code in doc["components"]["responses"][f"Error{status}"]["content"]["application/json"][
            "schema"]["properties"]["error"]["enum"]
    # both security schemes: the cookie by its configured name, and Bearer
    schemes = doc["components"]["securitySchemes"]
    assert schemes["session_cookie"] == {**schemes["session_cookie"], "type": "apiKey", "in": "cookie",
                                         "name": "shop_session"}
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    needs_session = {(path, method) for path, item in doc["paths"].items() for method, op in item.items()
                     if op["security"]}
    assert needs_session >= {
        ("/auth/refresh", "post"), ("/auth/logout", "post"), ("/auth/logout-all", "post"),
        ("/auth/session", "get"), ("/auth/sessions", "get"), ("/auth/sessions/{session_id}", "delete"),
        ("/auth/password/change", "post"), ("/auth/wechat/decrypt", "post"), ("/auth/wechat/phone", "post")}
    assert not needs_session & {("/auth/openapi.json", "get"), ("/auth/password/login", "post"),
                                ("/auth/password/register", "post"), ("/auth/wechat/login", "post")}
    # what the providers declare
    paths = doc["paths"]
    login = paths["/auth/password/login"]["post"]
    assert login["requestBody"]["content"]["application/json"]["schema"]["required"] == ["username", "password"]
    assert login["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Login"}
    register = paths["/auth/password/register"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert register["properties"]["password"]["minLength"] == 8  # the configured min_length
    assert set(paths["/auth/password/register"]["post"]["responses"]) >= {"200", "201"}
    assert "content" not in paths["/auth/password/change"]["post"]["responses"]["204"]
    wechat_login = paths["/auth/wechat/login"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert wechat_login["properties"]["app"]["enum"] == ["shop", None]
    # a login links to what needs its token
    links = login["responses"]["200"]["links"]
    assert links["get_session"] == {"operationId": "get_session",
                                    "parameters": {"header.Authorization": "Bearer {$response.body#/token}"}}


@pytest.mark.gen_test
async def test_the_document_is_public_cacheable_and_cors_like_every_endpoint(full_gw):
    r = await full_gw.client.request("GET", DOC, headers={"Origin": "https://app.example"})
    assert r.code == 200
    assert r.headers["Cache-Control"].startswith("public")
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Set-Cookie" not in r.headers
    again = await full_gw.client.request("GET", DOC, headers={"If-None-Match": r.headers["Etag"]})
    assert again.code == 304 and not again.body
    r = await full_gw.client.request("OPTIONS", DOC, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert r.code == 204


@pytest.mark.gen_test
async def test_a_provider_switched_off_is_not_described(gw):
    doc = body(await gw.client.request("GET", DOC))
    assert not any(path.startswith("/auth/wechat/") for path in doc["paths"])
    assert "/auth/password/login" in doc["paths"]


@pytest.mark.gen_test
async def test_the_prefix_is_the_configured_one(make_gateway, upstream, tmp_path):
    running = await make_gateway(base_config(upstream.url, tmp_path, server={"auth_prefix": "/id"}))
    doc = body(await running.client.request("GET", "/id/openapi.json"))
    assert "/id/session" in doc["paths"] and "/id/sessions/{session_id}" in doc["paths"]
    validate(doc)


# ---------------------------------------------------------------------------
# schemathesis against a live gateway
# ---------------------------------------------------------------------------


class LiveGateway:
    """A gateway (and a fake WeChat) served from an event loop of their own
    in a thread, so that a synchronous client (schemathesis) can call it."""

    def __init__(self, tmp_path: Path, **sections: Any) -> None:
        self.tmp_path = tmp_path
        self.sections = sections
        self.url = ""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="live-gateway", daemon=True)

    def __enter__(self) -> LiveGateway:
        self.thread.start()
        if not self.ready.wait(30):
            raise AssertionError("the live gateway did not start within 30 s")
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.done is not None:
            self.loop.call_soon_threadsafe(self.done.set)
        self.thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        fake, wechat_server = start_fake_wechat(free_port())
        fake.add_app(APPID, "s3cret")
        try:
            async with GatewayFactory(defaults=GATEWAY_DEFAULTS, client_class=PasswordClient) as factory:
                config = gateway_config("http://127.0.0.1:9", self.tmp_path, fake.url, **self.sections)
                running = await factory.start(config)
                await running.client.register(**FUZZER)
                self.url = running.base_url
                self.ready.set()
                await self.done.wait()
        finally:
            wechat_server.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    # wrong old passwords sent to /password/change must not lock the fuzzer's account
    lockout = {"max_failures": 1_000_000, "max_failures_per_username": 1_000_000}
    with LiveGateway(tmp_path_factory.mktemp("live"), providers={"password": lockout}, rate_limits=[]) as running:
        yield running


SCHEMATHESIS_CONFIG = """\
# Every check, a bounded number of examples, reproducible, nothing kept on disk.
base-url = "{base_url}"

[cache]
enabled = false

[generation]
max-examples = {max_examples}
database = "none"
deterministic = true

[checks]
max_response_time = 10

[checks.negative_data_rejection]
# The defaults, and 413: the body limit (server.auth_max_body_size) may refuse
# an over-long field before the field's own check does.
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]

# A session for the operations that need one; on a 401 (after a logout, say)
# schemathesis logs in again and replays the request.
[auth.dynamic.openapi.bearer]
path = "/auth/password/login"
payload = {{ username = "{username}", password = "{password}" }}
extract_selector = "/token"

[[operations]]
include-path = ["/auth/password/login", "/auth/password/register"]

# The defaults, and 400: a username is checked after NFKC normalisation,
# casefolding and stripping, against Unicode categories, which no JSON Schema
# can state; the document says so in words.
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", 400, 401, 403, 404, 409, 429, "5xx"]
"""


def test_schemathesis_finds_nothing_against_a_live_gateway(live: LiveGateway, tmp_path: Path) -> None:
    """Every phase (examples, coverage, fuzzing, stateful: a login's links
    carry its token to what needs a session) and every check, against the
    document the gateway serves."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG.format(base_url=live.url, max_examples=30, **FUZZER))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         live.url + DOC, "--checks", "all", "--workers", "1", "--output-truncate", "true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.log").write_text(output)
    failures = output.find("FAILURES")
    assert run.returncode == 0, output[failures:][:20000] if failures >= 0 else output[-20000:]
    assert "Stateful" in output and "API Links" in output


@pytest.mark.gen_test
async def test_a_preflight_names_the_methods_the_resource_answers(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, sessions={"allowed_origins": ["https://app.example"]}))
    for path, methods in (("/auth/session", {"GET"}), ("/auth/refresh", {"POST"}),
                          ("/auth/profile", {"GET", "PATCH"})):
        r = await gw.client.request("OPTIONS", path, headers={"Origin": "https://app.example",
                                                             "Access-Control-Request-Method": "DELETE"})
        assert r.code == 204, (path, r.body)
        assert set(r.headers["Access-Control-Allow-Methods"].split(", ")) == methods, path
        refused = await gw.client.request("PUT", path, json_body={})  # implemented by none of them
        assert refused.code == 405 and set(refused.headers["Allow"].split(", ")) == methods, path  # the same list
