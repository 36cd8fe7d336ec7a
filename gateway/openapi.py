"""The gateway's OpenAPI 3.1 document, generated from what its handlers declare.

Nothing here is written beside the code it describes: the document is built
from the routes the Tornado application really serves and from declarations
next to each handler.

- A handler class of the gateway declares :class:`Operation` values:
  ``operations = {"get": Operation(...)}``, or, when they depend on the
  route's kwargs, a classmethod ``operations_for(**kwargs)`` (a provider's
  login and endpoints).  A route whose handler declares nothing is left out
  (the proxy, the JSON 404).
- A provider declares :attr:`gateway.api.Provider.login_schema` and the
  ``summary``, ``request_schema``, ``response_schema`` and
  ``requires_session`` of each :class:`gateway.api.Endpoint`.
- A plugin's own Tornado routes (``gateway_handlers``) are described by its
  ``gateway_openapi`` hook, as OpenAPI path items.

Paths come from the route patterns (``re.escape`` of literal text, capture
groups for path parameters, which are named after the handler method's
arguments); operation ids from the method and the path.  Every operation
answers the JSON error of :mod:`gateway.errors` for its error statuses and
by default; an operation that needs a session names both security schemes
(the session cookie ``sessions.cookie_name`` and Bearer tokens), and every
answer that carries a fresh token links to those operations, so that a
client generator (or a stateful test) can follow a login to them.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Iterable, Mapping, Sequence

from gateway import __version__
from gateway.api import LOGIN_ANSWER, Endpoint, Provider
from gateway.app import Gateway
from gateway.errors import ERROR_STATUS, GatewayError
from gateway.plugins import implementations, maybe_await, plugin_failure
from gateway.registry import SESSION_TOKEN_PREFIX

log = logging.getLogger("gateway.app")

OPENAPI_VERSION = "3.1.0"
HOOK = "gateway_openapi"
#: the OpenAPI security scheme type of a cookie (the specification's word)
COOKIE_SCHEME_TYPE = "apiKey"
#: the security requirement of an operation that needs a session: either scheme
SESSION_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"session_cookie": []}]


@dataclass(frozen=True)
class Operation:
    """One method of a gateway endpoint, as the document describes it."""

    summary: str
    #: status -> JSON Schema of the JSON body answered with it (``None``: no body)
    responses: Mapping[int, Mapping[str, Any] | None] = field(hash=False)
    #: JSON Schema of the JSON body the endpoint reads (``None``: it reads none)
    request_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    #: it needs the caller's session (then 401, 403 and 503 are among its errors)
    session: bool = False
    #: error statuses it answers beyond those its body and session imply
    errors: tuple[int, ...] = ()
    description: str = ""


# ---------------------------------------------------------------------------
# Schemas every document holds
# ---------------------------------------------------------------------------


def ref(name: str) -> dict[str, str]:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


TIME = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC (`2026-11-22T09:30:00Z`)"}
TOKEN = {"type": "string", "pattern": "^" + re.escape(SESSION_TOKEN_PREFIX),
         "description": "the session token: send it as `Authorization: Bearer <token>`"}


def _schemas() -> dict[str, Any]:
    session = {
        "type": "object",
        "required": ["id", "provider", "created_at", "expires_at", "absolute_expires_at"],
        "properties": {
            "id": {"type": "string", "description": "the session's non-secret id"},
            "provider": {"type": "string"},
            "created_at": TIME,
            "expires_at": {**TIME, "description": "the idle deadline (moves with use)"},
            "absolute_expires_at": {**TIME, "description": "the absolute deadline (never moves)"},
            "remembered": {"type": "boolean", "description": "a remembered (persistent) session"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "enum": list(ERROR_STATUS),
                          "description": "the error code; each has one status (`x-error-status`)"},
                "message": {"type": "string", "description": "for a person; never a secret"},
                "reason": {"type": "string", "description": "why a 401 (missing, expired, revoked, superseded, "
                                                            "invalid, or a provider's own)"},
                "retry_after": {"type": "integer", "description": "on a 429: seconds to wait, as Retry-After"},
            },
            "x-error-status": dict(ERROR_STATUS),
        },
        "User": {
            "type": "object",
            "required": ["id", "profile"],
            "properties": {"id": {"type": "string"}, "profile": {"type": "object"}},
        },
        "Session": session,
        "SessionListing": {
            "type": "object",
            "required": ["id", "provider", "created_at", "last_seen_at", "expires_at", "ip", "user_agent",
                         "current"],
            "properties": {
                "id": {"type": "string"},
                "provider": {"type": "string"},
                "created_at": TIME,
                "last_seen_at": TIME,
                "expires_at": TIME,
                "ip": {"type": "string"},
                "user_agent": {"type": "string"},
                "current": {"type": "boolean", "description": "the session of this request"},
                "remembered": {"type": "boolean"},
            },
        },
        "Login": {
            "type": "object",
            "description": "a fresh session (the cookie is set too)",
            "required": ["token", "token_type", "expires_at", "session", "user"],
            "properties": {
                "token": TOKEN,
                "token_type": {"const": "Bearer"},
                "expires_at": TIME,
                "session": ref("Session"),
                "user": ref("User"),
                "consent_required": {"type": "array", "items": {"type": "object"},
                                     "description": "consent documents whose current version this user lacks"},
                "consent_error": {"type": "object", "description": "why an `accept` given with the login was refused"},
            },
        },
        "Refreshed": {
            "type": "object",
            "description": "the session's new token (the cookie is set too)",
            "required": ["token", "token_type", "expires_at", "session"],
            "properties": {
                "token": TOKEN,
                "token_type": {"const": "Bearer"},
                "expires_at": TIME,
                "session": ref("Session"),
            },
        },
    }


def _error_statuses() -> dict[int, list[str]]:
    by_status: dict[int, list[str]] = {}
    for code, status in ERROR_STATUS.items():
        by_status.setdefault(status, []).append(code)
    return dict(sorted(by_status.items()))


def _headers() -> dict[str, Any]:
    return {
        "X-Request-Id": {"description": "names the request in the logs (the client's own when well formed)",
                         "required": True, "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._:\-]{1,128}$"}},
        "Retry-After": {"description": "seconds to wait", "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9]+$"}},
        "WWW-Authenticate": {"description": "`Bearer realm=\"gateway\"`", "schema": {"type": "string"}},
        "Allow": {"description": "the methods the resource answers", "required": True,
                  "schema": {"type": "string"}},
    }


def _header_refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id", *names)}


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {
        "Error": {"description": "an error (any code)", "headers": _header_refs(),
                  "content": {"application/json": {"schema": ref("Error")}}},
    }
    extra = {401: ("WWW-Authenticate",), 405: ("Allow",), 429: ("Retry-After",)}
    for status, codes in _error_statuses().items():
        headers = _header_refs(*extra.get(status, ()))
        if status == 503:
            headers["Retry-After"] = {"description": "seconds to wait", "schema": {"type": "string"}}
        responses[f"Error{status}"] = {
            "description": f"{_phrase(status)}: {', '.join(f'`{c}`' for c in codes)}",
            "headers": headers,
            "content": {"application/json": {"schema": {
                "allOf": [ref("Error")], "properties": {"error": {"enum": codes}}}}},
        }
    return responses


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


# ---------------------------------------------------------------------------
# Declarations of providers
# ---------------------------------------------------------------------------


#: What the gateway itself reads from any login or registration body.
LOGIN_FIELDS: dict[str, Any] = {
    "remember": {"type": ["boolean", "null"], "description": "keep the session (a persistent cookie, longer timeouts); null: as absent"},
    "accept": {"description": "consent documents accepted with this login, an object of name -> version; "
                              "one the gateway refuses (of any shape) never fails the login (the answer's consent_error says why)"},
}


def with_login_fields(schema: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A provider's login body schema, with the fields the gateway reads."""
    out = dict(schema or {"type": "object"})
    if "properties" in out or out.get("additionalProperties") is False:
        out["properties"] = {**LOGIN_FIELDS, **dict(out.get("properties") or {})}
    return out


def login_operation(provider: Provider) -> Operation:
    """``POST {auth_prefix}/<name>/login``, from :attr:`Provider.login_schema`."""
    return Operation(
        summary=f"Log in through the {provider.name} provider",
        request_schema=with_login_fields(provider.login_schema),
        responses={200: LOGIN_ANSWER},
        errors=(401, 429),
    )


def endpoint_operation(provider: Provider, endpoint: Endpoint) -> Operation:
    """A provider's :class:`Endpoint`, from its declarations."""
    declared = endpoint.response_schema
    responses: dict[int, Mapping[str, Any] | None]
    request_schema = endpoint.request_schema
    if declared is not None and dict(declared) == dict(LOGIN_ANSWER):
        responses = {endpoint.status: LOGIN_ANSWER, 201: LOGIN_ANSWER}
        request_schema = with_login_fields(request_schema)
    elif declared is not None:
        responses = {endpoint.status: declared}
    elif endpoint.status == 204:
        responses = {204: None}
    else:  # undescribed: whatever an endpoint's function may return
        responses = {endpoint.status: {"type": "object"}, 201: LOGIN_ANSWER, 204: None}
    return Operation(
        summary=endpoint.summary or f"{endpoint.method} {endpoint.path} of the {provider.name} provider",
        request_schema=request_schema,
        responses=responses,
        session=endpoint.requires_session,
    )


# ---------------------------------------------------------------------------
# Paths from route patterns
# ---------------------------------------------------------------------------

_META = frozenset(".^$*+?{}[]|()")


def path_template(pattern: str, names: Sequence[str] = ()) -> tuple[str, list[tuple[str, str]]] | None:
    """A Tornado route pattern as an OpenAPI path and its parameters:
    ``/auth/sessions/([a-z]+)/?`` -> ``("/auth/sessions/{id}", [("id",
    "[a-z]+")])`` with ``names=("id",)``.  Literal text (as ``re.escape``
    writes it), capturing groups and a final ``/?`` are understood; ``None``
    for any other pattern."""
    if pattern.endswith("$"):
        pattern = pattern[:-1]
    if pattern.endswith("/?"):
        pattern = pattern[:-2]
    out: list[str] = []
    groups: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum():
                return None
            out.append(pattern[i + 1])
            i += 2
        elif c == "(":
            end = _group_end(pattern, i)
            if end is None or pattern.startswith("(?", i):
                return None
            name = names[len(groups)] if len(groups) < len(names) else f"param{len(groups) + 1}"
            groups.append((name, pattern[i + 1:end]))
            out.append("{" + name + "}")
            i = end + 1
        elif c in _META:
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out) or "/", groups


def _group_end(pattern: str, start: int) -> int | None:
    depth, i, in_class = 0, start, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":  # a class: a leading "^" and a "]" right after it are literal
            in_class = True
            i += 1
            if pattern.startswith("^", i):
                i += 1
            if pattern.startswith("]", i):
                i += 1
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _argument_names(handler: type, method: str) -> list[str]:
    """The path arguments the handler's method takes (after ``self``)."""
    function = getattr(handler, method, None)
    if function is None:
        return []
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def declared_operations(handler: type, kwargs: Mapping[str, Any]) -> Mapping[str, Operation]:
    """What a handler class declares for a route with these kwargs."""
    operations_for = getattr(handler, "operations_for", None)
    if callable(operations_for):
        declared: Mapping[str, Operation] = operations_for(**kwargs)
        return declared
    return getattr(handler, "operations", None) or {}


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (mappings as dicts), a copy."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _operation_id(method: str, path: str, prefix: str, taken: set[str]) -> str:
    rest = path[len(prefix):] if path.startswith(prefix + "/") else path
    base = f"{method}_" + ("_".join(re.findall(r"[A-Za-z0-9]+", rest)) or "root")
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _describe(op: Operation, op_id: str, parameters: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if parameters:
        out["parameters"] = [{"name": name, "in": "path", "required": True,
                              "schema": {"type": "string", "pattern": f"^(?:{regex})$"}}
                             for name, regex in parameters]
    if op.request_schema is not None:
        out["requestBody"] = {"required": True,
                              "content": {"application/json": {"schema": _plain(op.request_schema)}}}
    out["security"] = list(SESSION_SECURITY) if op.session else []
    responses: dict[str, Any] = {}
    for status, schema in sorted(op.responses.items()):
        response: dict[str, Any] = {"description": _phrase(status), "headers": _header_refs()}
        if schema is not None:
            response["content"] = {"application/json": {"schema": _plain(schema)}}
        responses[str(status)] = response
    errors = set(op.errors)
    if op.request_schema is not None:
        errors |= {400, 413}
    if op.session:
        errors |= {401, 403, 503}
    known = _error_statuses()
    for status in sorted(errors):
        if str(status) not in responses and status in known:
            responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    responses["default"] = {"$ref": "#/components/responses/Error"}
    out["responses"] = responses
    return out


def _link_fresh_tokens(paths: dict[str, Any], session_operations: list[tuple[str, list[str]]]) -> None:
    """Every answer carrying a fresh token links to each operation that
    needs a session (the token as Bearer; a session id parameter filled
    with the session's own id)."""
    fresh = ({"$ref": "#/components/schemas/Login"}, {"$ref": "#/components/schemas/Refreshed"})
    for item in paths.values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema not in fresh:
                    continue
                links = response.setdefault("links", {})
                for target, parameters in session_operations:
                    values = {"header.Authorization": "Bearer {$response.body#/token}"}
                    values.update({f"path.{name}": "$response.body#/session/id" for name in parameters})
                    links[target] = {"operationId": target, "parameters": values}


def build_document(gateway: Gateway, routes: Iterable[tuple[str, type, Mapping[str, Any]]],
                   plugin_paths: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (``(pattern, handler class,
    kwargs)``, in matching order) and of the path items plugins describe
    (``{path: (plugin name, path item)}``)."""
    prefix = gateway.config.server.auth_prefix.rstrip("/")
    paths: dict[str, Any] = {}
    taken: set[str] = set()
    session_operations: list[tuple[str, list[str]]] = []
    for pattern, handler, kwargs in routes:
        operations = declared_operations(handler, kwargs)
        if not operations:
            continue
        for method, op in operations.items():
            method = method.lower()
            found = path_template(pattern, _argument_names(handler, method))
            if found is None:
                log.warning("openapi: the route pattern %r is not a plain path; %s is left out", pattern, method)
                continue
            path, parameters = found
            item = paths.setdefault(path, {})
            if method in item:
                continue  # an earlier route answers it
            op_id = _operation_id(method, path, prefix, taken)
            item[method] = _describe(op, op_id, parameters)
            if op.session:
                session_operations.append((op_id, [name for name, _ in parameters]))
    _link_fresh_tokens(paths, session_operations)
    for path, (plugin, item) in (plugin_paths or {}).items():
        if path in paths:
            log.warning("openapi: plugin %r describes %s, which the gateway describes itself; left out", plugin, path)
            continue
        paths[path] = _plain(item)
    cookie = gateway.config.sessions.cookie_name
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Session gateway",
            "version": __version__,
            "description": (
                f"The gateway's own endpoints under `{prefix or '/'}`, its providers' logins and endpoints, "
                "and the endpoints plugins describe. Every other path is proxied to an upstream by the "
                "configured routes, and is described by that upstream, not here. Every error is "
                "`{\"error\", \"message\"}`; a 405 names the methods the resource answers in `Allow`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "responses": _error_responses(),
            "headers": _headers(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": SESSION_TOKEN_PREFIX + "...",
                           "description": "the `token` of a login, as `Authorization: Bearer <token>`"},
                "session_cookie": {"type": COOKIE_SCHEME_TYPE, "in": "cookie", "name": cookie,
                                   "description": "the session cookie a login sets (HttpOnly); a "
                                                  "cookie-authenticated POST, PUT, PATCH or DELETE also needs "
                                                  "an allowed `Origin` (or `Referer`) or `X-Requested-With`"},
            },
        },
    }


async def plugin_paths(gateway: Gateway) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """The path items plugins describe (``gateway_openapi``), keyed by
    path (a key not beginning with ``/`` lies under ``auth_prefix``), with
    the plugin's name.  A failing or malformed answer is a 500 naming the
    plugin."""
    prefix = gateway.config.server.auth_prefix.rstrip("/")
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for impl in implementations(gateway.pm, HOOK):
        try:
            value = await maybe_await(impl.function(**{a: gateway for a in impl.argnames if a == "gateway"}))
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failure(impl.plugin_name, HOOK, exc) from exc
        if value is None:
            continue
        if not (isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, Mapping)
                                                    for k, v in value.items())):
            raise plugin_failure(impl.plugin_name, HOOK, TypeError(
                f"expected a dict of path items keyed by path, got {type(value).__name__}"))
        for key, item in value.items():
            path = key if key.startswith("/") else f"{prefix}/{key}"
            if path in out:
                log.warning("openapi: plugin %r describes %s again; left out", impl.plugin_name, path)
                continue
            out[path] = (impl.plugin_name, item)
    return out


class Published:
    """One application's document, built on its first request and kept
    (routes, providers and plugins do not change while it runs)."""

    def __init__(self) -> None:
        self._body: bytes | None = None

    async def body(self, gateway: Gateway, routes: Iterable[tuple[str, type, Mapping[str, Any]]]) -> bytes:
        if self._body is None:
            document = build_document(gateway, routes, await plugin_paths(gateway))
            self._body = json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")
        return self._body
