"""Login timing: an unknown username against a wrong password, in one run.

The password provider verifies unknown usernames against a dummy hash with
the configured argon2id parameters, so the two should cost the same: the
ratio printed should be close to 1.00.  Usage: python bench/login_timing.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import tempfile
import time

import tornado.httpclient
import tornado.httpserver

from gateway.app import Gateway
from gateway.web import make_app
from gateway.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def timed_login(client: tornado.httpclient.AsyncHTTPClient, url: str, username: str) -> float:
    start = time.perf_counter()
    r = await client.fetch(url, method="POST", raise_error=False, headers={"Content-Type": "application/json"},
                           body=json.dumps({"username": username, "password": "not the password"}))
    elapsed = time.perf_counter() - start
    assert r.code == 401, r.body
    return elapsed


async def main(rounds: int) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(load_config(data={
            "sessions": {"store": "memory"},
            "profiles": {"store": "sqlite", "sqlite_path": f"{tmp}/p.db"},
            # a high lockout threshold: this measures hashing, not the lockout
            "providers": {"password": {"max_failures": 10 * rounds + 10}},
        }))
        await gw.start()
        server = tornado.httpserver.HTTPServer(make_app(gw))
        server.listen(port, "127.0.0.1")
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        base = f"http://127.0.0.1:{port}/auth/password"
        await client.fetch(base + "/register", method="POST", headers={"Content-Type": "application/json"},
                           body=json.dumps({"username": "known", "password": "the real password"}))
        wrong, unknown = [], []
        for i in range(rounds):  # interleaved, so drift in machine load hits both alike
            wrong.append(await timed_login(client, base + "/login", "known"))
            unknown.append(await timed_login(client, base + "/login", f"nobody-{i}"))
        w, u = statistics.median(wrong), statistics.median(unknown)
        print(f"rounds={rounds} (default argon2id parameters)")
        print(f"wrong password (baseline)  median {w * 1000:7.1f} ms  1.00")
        print(f"unknown username           median {u * 1000:7.1f} ms  {u / w:.2f}")
        client.close()
        server.stop()
        await gw.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(parser.parse_args().rounds))
