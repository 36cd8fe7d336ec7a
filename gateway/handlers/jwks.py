"""``GET {auth_prefix}/.well-known/jwks.json``: the keys that verify ``X-Gateway-Assertion``.

The JWK Set (RFC 7517) of every ``[[assertion.keys]]`` entry, public parts
only (``kid``, ``alg``, ``use = "sig"``): ``{"keys": []}`` when none is
configured.  Public and cacheable (``Cache-Control: public, max-age=300``,
an ``ETag`` and 304 for ``If-None-Match``).  The admin listener serves the
same document at ``/.well-known/jwks.json`` (:class:`AdminJWKSHandler`), for
upstreams that reach the admin listener rather than the public side.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Mapping

import tornado.web

from gateway.assertion import KeySet
from gateway.errors import error_body_for_status
from gateway.handlers.base import BaseHandler
from gateway.openapi import Operation

#: how long a client or cache may keep the key set without asking again
MAX_AGE = 300

JWK = {
    "type": "object",
    "required": ["kty", "kid", "alg", "use"],
    "properties": {
        "kty": {"enum": ["EC", "OKP", "RSA"]},
        "kid": {"type": "string"},
        "alg": {"enum": ["ES256", "EdDSA", "RS256"]},
        "use": {"const": "sig"},
    },
    "not": {"anyOf": [{"required": [name]} for name in ("d", "p", "q", "dp", "dq", "qi")]},
}


def answer(handler: tornado.web.RequestHandler, keys: KeySet) -> None:
    """The key set, or 304 for a matching ``If-None-Match``."""
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.set_header("Cache-Control", f"public, max-age={MAX_AGE}")
    handler.set_header("Etag", keys.etag)
    if handler.check_etag_header():
        handler.set_status(304)
        handler.finish()
        return
    handler.finish(keys.body)


class JWKSHandler(BaseHandler):
    """The gateway's public keys for assertions."""

    keys: KeySet

    operations: ClassVar[Mapping[str, Operation]] = {
        "get": Operation(
            summary="The keys that verify X-Gateway-Assertion (a JWK Set)",
            responses={200: {"type": "object", "required": ["keys"],
                             "properties": {"keys": {"type": "array", "items": JWK}}}},
            description="Every configured `[[assertion.keys]]` key, public parts only; the first signs. "
                        "Cacheable: `Cache-Control: public, max-age=300`, an `ETag`, 304 for `If-None-Match`.",
        ),
    }

    def compute_etag(self) -> None:
        return None  # the key set's own, set by answer()

    def get(self) -> None:
        answer(self, self.keys)


class AdminJWKSHandler(tornado.web.RequestHandler):
    """The same key set on the admin listener."""

    keys: KeySet

    def initialize(self, keys: KeySet, **_: Any) -> None:
        self.keys = keys

    def set_default_headers(self) -> None:
        self.clear_header("Server")

    def compute_etag(self) -> None:
        return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(error_body_for_status(status_code)))

    def get(self) -> None:
        answer(self, self.keys)

    head = get
