import pytest
from gateway.testing import base_config
@pytest.mark.gen_test
async def test_probe(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path))
    r = await rg.client.request("GET", "/public/x", headers={"Upgrade": "h2c", "HTTP2-Settings": "AAMA", "Connection": "Upgrade, HTTP2-Settings"})
    print("STATUS", r.code, r.body, upstream.seen and upstream.last.headers)
