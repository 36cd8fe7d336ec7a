"""Plugins' own counters (``Services.metrics``): ``gateway_<name>_total``,
declared once per name, with bounded labels; and the WeChat provider's
``gateway_wechat_api_calls_total``, counted by a real ``gateway serve`` of
two workers against the fake WeChat API (real HTTP) and read from the
admin listener's ``/metrics`` with prometheus_client's own parser."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway import hookimpl
from gateway.api import Endpoint, Provider, Request
from gateway.plugins import get_plugin_manager
from gateway.testing import Client, assert_error, base_config, body, free_port
from gateway.testing.wechat import JSCODE2SESSION, PHONE, STABLE_TOKEN, start_fake_wechat
from password_support import GatewayProcess

APPID = "wx4f4bc4dec97d474b"
APP_SECRET = "s3cret-of-the-app"
ENCRYPTION_KEY = base64.b64encode(b"m" * 32).decode()


# -- the API, through a plugin of the test's own -------------------------------------------


class TallyProvider(Provider):
    """Counts what its endpoint is told, by kind."""

    name = "tally"
    login_route = False

    async def setup(self) -> None:
        self.events = self.gateway.metrics.counter("tally_events", "Events told to the tally endpoint, by kind",
                                                   ("kind",))
        self.pings = self.gateway.metrics.counter("tally_pings", "Pings of the tally endpoint")

    async def count(self, request: Request) -> dict[str, Any]:
        kind = request.field(request.json_body(), "kind", str)
        self.events.labels(kind=kind).inc()
        self.pings.inc()
        return {"counted": kind}

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("count", self.count)]


class TallyPlugin:
    @hookimpl
    def gateway_providers(self) -> list[type[Provider]]:
        return [TallyProvider]


def events(kind: str) -> float:
    return REGISTRY.get_sample_value("gateway_tally_events_total", {"kind": kind}) or 0.0


@pytest.mark.gen_test(timeout=60)
async def test_a_plugins_counter_counts_with_its_labels_bounded(make_gateway, upstream, tmp_path):
    pm = get_plugin_manager(extra_plugins=[("tally", TallyPlugin())])
    gw = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    before_a = events("a")
    before_other = events("other")
    pings = REGISTRY.get_sample_value("gateway_tally_pings_total") or 0.0
    for kind in ("a", "a", "b"):
        r = await gw.client.request("POST", "/auth/tally/count", json_body={"kind": kind})
        assert r.code == 200 and body(r) == {"counted": kind}
    assert events("a") == before_a + 2
    assert REGISTRY.get_sample_value("gateway_tally_pings_total") == pings + 3

    # 60 more distinct kinds: the first ones up to 50 in all get a series each, the rest count as "other"
    seen_before = {s.labels["kind"] for m in REGISTRY.collect() if m.name == "gateway_tally_events"
                   for s in m.samples if s.name == "gateway_tally_events_total"}
    for n in range(60):
        r = await gw.client.request("POST", "/auth/tally/count", json_body={"kind": f"k{n}"})
        assert r.code == 200
    r = await gw.client.request("POST", "/auth/tally/count", json_body={"kind": "x" * 65})  # too long
    assert r.code == 200
    kinds = {s.labels["kind"] for m in REGISTRY.collect() if m.name == "gateway_tally_events"
             for s in m.samples if s.name == "gateway_tally_events_total"}
    assert len(kinds - {"other"}) == 50, sorted(kinds)
    kept = len((kinds - {"other"}) - seen_before)
    assert events("other") == before_other + (60 - kept) + 1
    assert events("a") == before_a + 2  # a value already seen still counts as itself

    # a second gateway of this process declares the same counters again: the same series
    second = await make_gateway(base_config(upstream.url, tmp_path / "second"),
                                pm=get_plugin_manager(extra_plugins=[("tally", TallyPlugin())]))
    r = await second.client.request("POST", "/auth/tally/count", json_body={"kind": "a"})
    assert r.code == 200 and events("a") == before_a + 3


@pytest.mark.gen_test
async def test_declaring_a_counter_checks_its_name_and_labels(make_gateway, upstream, tmp_path):
    metrics = (await make_gateway(base_config(upstream.url, tmp_path))).gateway.metrics
    first = metrics.counter("acme_lookups", "Lookups of the Acme directory", ("result",))
    assert metrics.counter("acme_lookups_total", "Lookups of the Acme directory", ["result"]) is first
    with pytest.raises(ValueError, match=r"gateway_acme_lookups is already declared with the labels \(result\)"):
        metrics.counter("acme_lookups", "Lookups", ("result", "region"))
    with pytest.raises(ValueError, match="one of the gateway's own"):
        metrics.counter("http_requests", "Clashes with the core's", ("route",))
    for bad in ("Acme", "gateway_acme", "1acme", "acme-lookups", "", "_total"):
        with pytest.raises(ValueError, match="metric name"):
            metrics.counter(bad, "Bad name")
    with pytest.raises(ValueError, match="documentation is required"):
        metrics.counter("acme_empty", " ")
    for labels in (("le",), ("Region",), ("a", "a")):
        with pytest.raises(ValueError, match="label"):
            metrics.counter("acme_bad_labels", "Bad labels", labels)

    with pytest.raises(ValueError, match="takes the labels result"):
        first.labels(outcome="ok")
    with pytest.raises(ValueError, match="takes 1 label value"):
        first.labels("ok", "more")
    with pytest.raises(ValueError, match="call labels"):
        first.inc()
    with pytest.raises(ValueError, match="at least 0"):
        first.labels("ok").inc(-1)
    first.labels(404).inc(2)  # an integer is its decimal text
    assert REGISTRY.get_sample_value("gateway_acme_lookups_total", {"result": "404"}) == 2


# -- gateway_wechat_api_calls_total, on the admin listener of two workers ---------------------


def calls(families: dict[str, Any]) -> dict[tuple[str, str], float]:
    """``(api, errcode) -> count`` of gateway_wechat_api_calls_total."""
    family = families.get("gateway_wechat_api_calls")
    assert family is not None, sorted(families)
    assert family.type == "counter"
    return {(s.labels["api"], s.labels["errcode"]): s.value for s in family.samples
            if s.name == "gateway_wechat_api_calls_total" and s.value}


@pytest.mark.gen_test(timeout=120)
async def test_every_wechat_api_call_is_counted_by_api_and_errcode(io_loop, tmp_path, upstream, redis_url):
    fake, fake_server = start_fake_wechat(free_port())
    fake.add_app(APPID, APP_SECRET)
    admin_port = free_port()
    admin = Client(f"http://127.0.0.1:{admin_port}")
    try:
        async with GatewayProcess(
                tmp_path, [{"prefix": "/api/", "upstream": upstream.url, "auth": "required"}],
                server={"workers": 2}, admin={"port": admin_port},
                sessions={"store": "redis", "redis_url": redis_url, "encryption_key": ENCRYPTION_KEY},
                providers={"wechat": {"api_base": fake.url, "timeout": "1s",
                                      "apps": {"main": {"appid": APPID, "secret": APP_SECRET}}}}) as gp:
            client = Client(gp.url)
            try:
                # code2session: a success, and an unknown code (40029)
                login = body(await client.request("POST", "/auth/wechat/login",
                                                  json_body={"code": fake.mint_code("o-alice")}))
                token = login["token"]
                assert_error(await client.request("POST", "/auth/wechat/login", json_body={"code": "nobody's"}),
                             401, "invalid_credentials")
                # a phone number: the access token (stable_token), then getuserphonenumber
                phone_code = fake.mint_phone_code("+86 13800138000")
                r = await client.request("POST", "/auth/wechat/phone", json_body={"code": phone_code}, token=token)
                assert r.code == 200, r.body
                assert_error(await client.request("POST", "/auth/wechat/phone", json_body={"code": "unknown"},
                                                  token=token), 400, "invalid_request")
                # the token refused (40001): a fresh one, and the call again
                fake.invalidate(fake.current_token[APPID])
                r = await client.request("POST", "/auth/wechat/phone",
                                         json_body={"code": fake.mint_phone_code()}, token=token)
                assert r.code == 200, r.body
                # an HTML error page, a reply that is not JSON, no answer in time
                fake.force(JSCODE2SESSION, 502, "<html>bad gateway</html>", content_type="text/html")
                assert_error(await client.request("POST", "/auth/wechat/login", json_body={"code": "c1"}),
                             502, "bad_gateway")
                fake.force(JSCODE2SESSION, 200, "certainly not json")
                assert_error(await client.request("POST", "/auth/wechat/login", json_body={"code": "c2"}),
                             502, "bad_gateway")
                fake.force(JSCODE2SESSION, 200, '{"openid": "o-late"}', delay=5)
                assert_error(await client.request("POST", "/auth/wechat/login", json_body={"code": "c3"}),
                             502, "bad_gateway")
                # WeChat unreachable
                fake.stopping.set()
                fake_server.stop()
                await fake_server.close_all_connections()
                assert_error(await client.request("POST", "/auth/wechat/login", json_body={"code": "c4"}),
                             502, "bad_gateway")
            finally:
                client.close()

            r = await admin.request("GET", "/metrics")
            assert r.code == 200
            text = r.body.decode()
            counted = calls({f.name: f for f in text_string_to_metric_families(text)})
            assert counted == {
                ("code2session", "0"): 1, ("code2session", "40029"): 1, ("code2session", "http_502"): 1,
                ("code2session", "bad_reply"): 1, ("code2session", "timeout"): 1,
                ("code2session", "unreachable"): 1,
                ("stable_token", "0"): 2,
                ("getuserphonenumber", "0"): 2, ("getuserphonenumber", "40029"): 1,
                ("getuserphonenumber", "40001"): 1,
            }, counted
            # what the fake saw, call for call (the unreachable one never reached it)
            assert fake.count(JSCODE2SESSION) == 5 and fake.count(STABLE_TOKEN) == 2 and fake.count(PHONE) == 4
            assert "# HELP gateway_wechat_api_calls_total Calls to WeChat's API" in text
            for secret in (APP_SECRET, token, phone_code, "tok-1", "tok-2", "o-alice"):
                assert secret not in text
    finally:
        admin.close()
        fake.stopping.set()
        fake_server.stop()
