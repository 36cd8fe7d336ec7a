"""The benchmark's baseline: a bare pooled Tornado reverse proxy.

The least a Tornado proxy can do with the gateway's own upstream client: a
``RequestHandler`` that forwards every request to one upstream through a
single shared ``aiohttp.ClientSession`` (``TCPConnector(limit=100)``) and
streams the answer back with ``write()`` and ``await flush()``.  No
sessions, no authentication, no header policy, no access log.

Usage: python bench/bare_proxy.py --port PORT --upstream http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import tornado.httpserver
import tornado.web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class Forward(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, session: aiohttp.ClientSession, upstream: str) -> None:
        self.session = session
        self.upstream = upstream

    def compute_etag(self) -> None:
        return None

    async def _forward(self, *args: str) -> None:
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in HOP_BY_HOP}
        async with self.session.request(self.request.method, self.upstream + self.request.uri, headers=headers,
                                        data=self.request.body or None, allow_redirects=False) as resp:
            self.set_status(resp.status, resp.reason)
            self._headers.clear()  # none of Tornado's defaults: the upstream's answer as sent
            for name, value in resp.headers.items():
                if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                    self.add_header(name, value)
            async for chunk in resp.content.iter_any():
                self.write(chunk)
                await self.flush()
        self.finish()

    get = head = post = put = patch = delete = options = _forward


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100), auto_decompress=False,
                                    timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60))
    app = tornado.web.Application([(r".*", Forward, {"session": session, "upstream": upstream.rstrip("/")})],
                                  log_function=lambda handler: None)
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare proxy listening on http://127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.stop()
    await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.upstream))
