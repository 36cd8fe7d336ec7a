"""Proxy throughput benchmark: figures and ratios measured in one run.

Starts, on loopback in this process: an upstream, a gateway in front of it
(memory sessions, SQLite profiles in a temporary directory), then measures
requests per second

1. direct to the upstream with the pooled (libcurl) client    -- baseline
2. direct to the upstream with Tornado's simple client         -- one connection per request
3. through the gateway (authenticated, Bearer token)           -- the gateway's cost

and prints the ratios. Usage: python bench/proxy_bench.py [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import tempfile
import time

import tornado.httpclient
import tornado.httpserver
import tornado.web
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from gateway.app import Gateway
from gateway.config import load_config


class Hello(tornado.web.RequestHandler):
    def get(self, *args: str) -> None:
        self.finish({"hello": self.request.headers.get("X-User-Id", "anonymous")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(client: tornado.httpclient.AsyncHTTPClient, url: str, n: int, concurrency: int,
                  headers: dict[str, str] | None = None) -> float:
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            r = await client.fetch(url, headers=headers)
            assert r.code == 200

    await asyncio.gather(*(worker() for _ in range(min(concurrency, 4))))  # warm-up connections
    queue = iter(range(n))
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def main(n: int, concurrency: int) -> None:
    up_port, gw_port = free_port(), free_port()
    upstream = tornado.httpserver.HTTPServer(tornado.web.Application([(r"(.*)", Hello)]))
    upstream.listen(up_port, "127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(data={
            "sessions": {"store": "memory", "cookie_secure": False},
            "profiles": {"store": "sqlite", "sqlite_path": f"{tmp}/p.db"},
            "routes": [{"prefix": "/api/", "upstream": f"http://127.0.0.1:{up_port}"}],
            "providers": {"password": {"time_cost": 1, "memory_cost": 64, "parallelism": 1}},
        })
        gw = Gateway(config)
        await gw.start()
        server = tornado.httpserver.HTTPServer(gw.make_app())
        server.listen(gw_port, "127.0.0.1")
        curl = CurlAsyncHTTPClient(force_instance=True, max_clients=concurrency)
        simple = SimpleAsyncHTTPClient(force_instance=True, max_clients=concurrency)
        reg = await curl.fetch(f"http://127.0.0.1:{gw_port}/auth/password/register", method="POST",
                               headers={"Content-Type": "application/json"},
                               body=json.dumps({"username": "bench", "password": "bench-password"}))
        token = json.loads(reg.body)["token"]
        direct = f"http://127.0.0.1:{up_port}/api/hello"
        pooled = await measure(curl, direct, n, concurrency)
        unpooled = await measure(simple, direct, n, concurrency)
        via = await measure(curl, f"http://127.0.0.1:{gw_port}/api/hello", n, concurrency,
                            {"Authorization": f"Bearer {token}"})
        print(f"requests={n} concurrency={concurrency}")
        print(f"direct, pooled client (baseline)  {pooled:9.0f} req/s  1.00")
        print(f"direct, simple client             {unpooled:9.0f} req/s  {unpooled / pooled:.2f}")
        print(f"through the gateway, pooled       {via:9.0f} req/s  {via / pooled:.2f}")
        print(f"pooled / simple client            {pooled / unpooled:.2f}x")
        curl.close()
        simple.close()
        server.stop()
        await gw.stop()
    upstream.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency))
