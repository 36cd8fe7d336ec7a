"""Upstreams the benchmark starts as their own processes, all on 127.0.0.1.

``ws-echo``  a Tornado WebSocket server echoing every message on any path.
``big``      a Tornado upstream for the 1 GiB checks: ``POST|PUT /big/upload?id=X`` streams the body
             in and answers its SHA-256 and length; ``GET /big/download?size=N&id=X`` streams N
             bytes out; ``GET /big/received/X`` and ``GET /big/sent/X`` answer what it hashed.
``wechat``   gateway.testing.wechat as a server knowing one mini-program, where every code
             ``bench-<n>`` logs in as the WeChat user ``o-bench-<n mod 100>`` (single use, as
             WeChat's codes are).

Usage: python bench/upstreams.py {ws-echo|big|wechat} --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
from typing import Any

import tornado.httpserver
import tornado.web
import tornado.websocket

CHUNK = 1 << 20
WECHAT_APPID = "wx4f4bc4dec97d474b"
WECHAT_SECRET = "bench-s3cret"


def chunks(size: int, seed: bytes = b"") -> Any:
    """``size`` bytes in 1 MiB chunks, each distinct (a counter heads a fixed random block)."""
    block = hashlib.shake_256(b"bench" + seed).digest(CHUNK)
    sent, n = 0, 0
    while sent < size:
        piece = (n.to_bytes(8, "big") + block[8:])[: size - sent]
        yield piece
        sent += len(piece)
        n += 1


# -- ws-echo --------------------------------------------------------------------------------------


class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    async def on_message(self, message: str | bytes) -> None:
        try:
            await self.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            pass


def ws_echo_app() -> tornado.web.Application:
    return tornado.web.Application([(r".*", Echo)], websocket_ping_interval=None, log_function=lambda h: None)


# -- big ------------------------------------------------------------------------------------------

RECEIVED: dict[str, dict[str, Any]] = {}
SENT: dict[str, dict[str, Any]] = {}


@tornado.web.stream_request_body
class Upload(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.hash = hashlib.sha256()
        self.length = 0

    def data_received(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.length += len(chunk)

    def _done(self) -> None:
        result = {"sha256": self.hash.hexdigest(), "bytes": self.length}
        RECEIVED[self.get_query_argument("id", "")] = result
        self.finish(result)

    post = put = _done


class Download(tornado.web.RequestHandler):
    def compute_etag(self) -> None:
        return None

    async def get(self) -> None:
        size = int(self.get_query_argument("size"))
        key = self.get_query_argument("id", "")
        digest, length = hashlib.sha256(), 0
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(size))
        try:
            for piece in chunks(size, key.encode()):
                digest.update(piece)
                length += len(piece)
                self.write(piece)
                await self.flush()
        finally:
            SENT[key] = {"sha256": digest.hexdigest(), "bytes": length}


class Record(tornado.web.RequestHandler):
    def initialize(self, table: dict[str, dict[str, Any]]) -> None:
        self.table = table

    def get(self, key: str) -> None:
        if key not in self.table:
            raise tornado.web.HTTPError(404)
        self.finish(self.table[key])


def big_app() -> tornado.web.Application:
    return tornado.web.Application([
        (r"/big/upload", Upload),
        (r"/big/download", Download),
        (r"/big/received/(.*)", Record, {"table": RECEIVED}),
        (r"/big/sent/(.*)", Record, {"table": SENT}),
    ], log_function=lambda h: None)


# -- wechat ---------------------------------------------------------------------------------------


def start_wechat(port: int) -> Any:
    from gateway.testing.wechat import LoginCode, start_fake_wechat

    session_key = base64.b64encode(b"bench-sessionkey").decode()

    class BenchCodes(dict):
        def get(self, code: Any, default: Any = None) -> Any:
            if isinstance(code, str) and code.startswith("bench-") and code[6:].isdigit():
                return LoginCode(WECHAT_APPID, f"o-bench-{int(code[6:]) % 100}", session_key)
            return super().get(code, default)

    class Forgetful(list):  # the fake records every request: keep none, a run makes thousands
        def append(self, item: Any) -> None:
            pass

    fake, server = start_fake_wechat(port)
    fake.add_app(WECHAT_APPID, WECHAT_SECRET)
    fake.codes = BenchCodes()
    fake.requests = Forgetful()
    return server


async def main(kind: str, port: int) -> None:
    if kind == "ws-echo":
        server = tornado.httpserver.HTTPServer(ws_echo_app())
        server.listen(port, "127.0.0.1")
    elif kind == "big":
        server = tornado.httpserver.HTTPServer(big_app(), max_body_size=1 << 40, body_timeout=600)
        server.listen(port, "127.0.0.1")
    else:
        server = start_wechat(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"kind": kind, "port": port}), flush=True)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ws-echo", "big", "wechat"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.kind, args.port))
