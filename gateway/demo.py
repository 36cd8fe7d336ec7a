"""A tiny demo upstream for ``make run``: it answers with what it received,
so a request through the gateway visibly carries the identity headers."""

from __future__ import annotations

import json

import tornado.web

SHOWN = ("X-User-Id", "X-Auth-Provider", "X-Session-Id", "X-Request-Id", "X-Forwarded-For")


class EchoHandler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def _echo(self, *args: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({
            "upstream": "demo",
            "method": self.request.method,
            "path": self.request.path,
            "headers": {h: self.request.headers.get(h) for h in SHOWN if h in self.request.headers},
            "message": f"hello, {self.request.headers.get('X-User-Id', 'anonymous')}",
        }, indent=2) + "\n")

    get = head = post = delete = patch = put = options = _echo


def make_demo_app() -> tornado.web.Application:
    return tornado.web.Application([(r".*", EchoHandler)])
