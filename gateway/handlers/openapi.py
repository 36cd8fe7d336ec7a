"""``GET {auth_prefix}/openapi.json``: the gateway's OpenAPI 3.1 document.

Public and cacheable (``Cache-Control: public``, an ``ETag`` and 304 for
``If-None-Match``), with CORS headers as every gateway endpoint has.  The
document (:mod:`gateway.openapi`) describes the routes this application
really serves whose handlers declare operations, and what plugins describe.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import tornado.routing

from gateway.handlers.base import BaseHandler
from gateway.openapi import Operation, Published

#: how long a client or cache may keep the document without asking again
MAX_AGE = 300


class OpenAPIHandler(BaseHandler):
    """The document of this application, built on the first request."""

    published: Published

    operations: ClassVar[Mapping[str, Operation]] = {
        "get": Operation(
            summary="This OpenAPI document",
            responses={200: {"type": "object", "required": ["openapi", "info", "paths"],
                             "properties": {"openapi": {"const": "3.1.0"}}}},
        ),
    }

    def served_routes(self) -> list[tuple[str, type, Mapping[str, Any]]]:
        """``(pattern, handler class, kwargs)`` of every path route of the
        application, in matching order."""
        out: list[tuple[str, type, Mapping[str, Any]]] = []
        for rule in self.application.wildcard_router.rules:
            if isinstance(rule.matcher, tornado.routing.PathMatches) and isinstance(rule.target, type):
                out.append((rule.matcher.regex.pattern, rule.target, rule.target_kwargs))
        return out

    async def get(self) -> None:
        body = await self.published.body(self.gateway, self.served_routes())
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", f"public, max-age={MAX_AGE}")
        self.finish(body)
