import pytest

from gateway.testing import body


@pytest.mark.gen_test
async def test_register_then_proxied_request_carries_identity(gw, upstream):
    reg = await gw.client.register()
    r = await gw.client.request("GET", "/api/hello", token=reg["token"])
    assert r.code == 200, r.body
    assert upstream.last.header("X-User-Id") == reg["user"]["id"]
    assert body(r)["path"] == "/api/hello"
