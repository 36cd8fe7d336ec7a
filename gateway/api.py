"""The public API for plugins: every type a plugin needs, and nothing more.

A plugin imports from here, and :data:`gateway.hookimpl` from ``gateway``;
nothing else of the gateway is promised to stay put.  This module is a
leaf: it imports only the standard library, Tornado's request type, and the
gateway's two other public leaves (:mod:`gateway.errors`, the typed errors,
and :mod:`gateway.options`, declared options and their checkers), which it
re-exports.

What is here:

- :class:`Provider`, the base class of identity providers, with what it may
  declare (options, credential prefixes and headers, reserved upstream
  headers) and the methods the gateway calls (:meth:`Provider.login`,
  :meth:`Provider.authenticate`, :meth:`Provider.upstream_headers`,
  :meth:`Provider.endpoints`...);
- :class:`Principal`, :class:`LoginResult`, :class:`User`, :class:`Identity`;
- :class:`Endpoint`, a provider's own HTTP endpoints, and :class:`Command`,
  a plugin's ``gateway <command>`` subcommand (``gateway_commands`` hook);
- the protocols of what a provider may use from the gateway
  (:class:`Services`: profiles, shared state, sessions, sealing, metrics:
  :class:`Metrics`, :class:`Counter`) and from a
  request (:class:`Request`), and of a provider's own storage
  (:class:`Records`, declared by a :class:`Collection`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Awaitable, Callable, ClassVar, Mapping, Protocol, Sequence

from tornado.httputil import HTTPServerRequest

from gateway.errors import (
    Conflict,
    GatewayError,
    StoreUnavailable,
    invalid_credentials,
    invalid_request,
    not_found,
    too_many,
    unauthenticated,
)
from gateway.options import (
    BOOL,
    DURATION,
    INT,
    NONNEG_INT,
    POSITIVE_DURATION,
    SCOPE,
    SIZE,
    STR,
    ConfigError,
    Option,
    Section,
    at_least,
    choice,
    http_url,
    parse_duration,
    parse_size,
    pattern,
    scopes,
    str_list,
    validate_table,
)

__all__ = [
    # providers and what they return
    "Provider", "LoginResult", "Principal", "User", "Identity", "ConfigContext",
    "Endpoint", "LOGIN_ANSWER", "Command", "CommandContext", "add_config_option",
    # what a provider may use
    "Services", "Request", "Profiles", "SharedState", "Sessions", "SessionView", "Sealer", "RouteView",
    "Metrics", "Counter", "CounterSeries",
    "Collection", "Records", "Below", "utcnow", "client_key", "new_user_id", "identity_key",
    # errors
    "GatewayError", "StoreUnavailable", "Conflict", "invalid_request", "invalid_credentials",
    "unauthenticated", "not_found", "too_many",
    # options
    "Option", "Section", "ConfigError", "validate_table", "STR", "INT", "BOOL", "NONNEG_INT", "DURATION",
    "POSITIVE_DURATION", "SIZE", "SCOPE", "at_least", "choice", "http_url", "parse_duration", "parse_size",
    "pattern", "scopes", "str_list",
]


def utcnow() -> datetime:
    """Now, as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


def client_key(ip: str) -> str:
    """Whom a limit or lockout counts as one client: the address, but an
    IPv6 client by its whole /64 (one host usually holds all of it), and an
    IPv4-mapped IPv6 address as the IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))
    return str(addr)


def identity_key(provider: str, subject: str) -> str:
    """Natural key of an identity link: ``"<provider>:<subject>"``."""
    return f"{provider}:{subject}"


def new_user_id() -> str:
    """A fresh, non-secret, URL-safe user id."""
    return "u_" + secrets.token_urlsafe(12)


# ---------------------------------------------------------------------------
# Users, identities, sessions, principals
# ---------------------------------------------------------------------------


@dataclass
class User:
    """A user: a generated id and a dict of profile fields."""

    id: str
    profile: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass
class Identity:
    """A link from ``(provider, subject)`` to one user; ``data`` holds
    provider-private fields (a password hash, say) that never leave the
    gateway."""

    provider: str
    subject: str
    user_id: str
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)

    @property
    def key(self) -> str:
        return identity_key(self.provider, self.subject)


class SessionView(Protocol):
    """A gateway session as plugins see it (times are UNIX seconds)."""

    @property
    def id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def absolute_expires_at(self) -> float: ...
    @property
    def data(self) -> dict[str, Any]:
        """What the provider's :class:`LoginResult` put in ``session_data``."""
        ...


@dataclass
class Principal:
    """An authenticated caller.

    ``session`` is set when a gateway session authenticated the request; a
    provider's :meth:`Provider.authenticate` (API keys, say) leaves it
    ``None`` and may give ``scopes`` and name the request headers that
    carried the credential in ``headers_to_strip``.
    """

    user_id: str
    provider: str
    session: SessionView | None = None
    scopes: list[str] | None = None
    #: request headers holding the credential, never forwarded upstream
    headers_to_strip: tuple[str, ...] = ()

    @property
    def session_id(self) -> str | None:
        return self.session.id if self.session else None


@dataclass
class LoginResult:
    """What a successful :meth:`Provider.login` returns.

    ``session_data`` is kept in the gateway session (never sent upstream or
    to the client; seal secrets with :attr:`Services.sealer` first);
    ``created`` says whether this login created the user.
    """

    user: User
    session_data: dict[str, Any] = field(default_factory=dict)
    created: bool = False


class RouteView(Protocol):
    """A ``[[routes]]`` entry as plugins see it."""

    @property
    def prefix(self) -> str: ...
    @property
    def upstream(self) -> str: ...
    @property
    def auth(self) -> str: ...


# ---------------------------------------------------------------------------
# Storage a provider may use
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Collection:
    """A plugin's own kind of record in the profile store.

    ``name`` (lowercase letters, digits, ``_``; unique across plugins: use
    the plugin's name as a prefix) names a SQLite table or MongoDB
    collection of the gateway's choosing.  ``key`` is the field that
    identifies a record; ``unique`` lists other fields no two records may
    share; ``indexes`` lists fields that :meth:`Records.find` looks up by.
    Records are JSON objects: strings, numbers, booleans, ``None``, lists and
    objects, plus timezone-aware :class:`datetime.datetime` values at the top
    level, which come back as UTC datetimes.
    """

    name: str
    key: str = "id"
    unique: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Below:
    """In a :meth:`Records.update` match: the field is missing, ``None``,
    or less than ``value``."""

    value: Any


class Records(Protocol):
    """The records of one :class:`Collection`.  Every method may raise
    :class:`StoreUnavailable`; what is stored survives restarts."""

    async def insert(self, record: Mapping[str, Any]) -> None:
        """Store a new record; raise :class:`Conflict` if its key or a
        ``unique`` field's value is taken (storing nothing)."""
        ...

    async def get(self, key: str) -> dict[str, Any] | None:
        """The record whose key field is ``key``, or ``None``."""
        ...

    async def find(self, field: str, value: Any) -> list[dict[str, Any]]:
        """The records whose ``field`` (the key, a ``unique`` or an
        ``indexes`` field) equals ``value``, in insertion order."""
        ...

    async def update(self, key: str, changes: Mapping[str, Any],
                     where: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Set ``changes`` on the record with this key, only if each field
        of ``where`` equals its value (``None``: missing or null) or, for a
        :class:`Below` value, is missing, null or less; one atomic
        conditional write.  Returns the updated record, or ``None`` when
        there is no such record or ``where`` does not hold (nothing
        written)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the record; True if there was one."""
        ...


class Profiles(Protocol):
    """Users, their profile fields and linked identities (the profile
    store), and plugins' own records."""

    async def get_user(self, user_id: str) -> User | None: ...

    async def update_profile(self, user_id: str, fields: dict[str, Any]) -> User:
        """Merge ``fields`` (a ``None`` value removes a field); ``KeyError``
        for an unknown user."""
        ...

    async def get_identity(self, provider: str, subject: str) -> Identity | None: ...

    async def resolve_identity(
        self, provider: str, subject: str, profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity, bool]:
        """The user linked to ``(provider, subject)``, created with its link
        atomically when there is none: ``(user, identity, created)``."""
        ...

    async def create_identity(
        self, provider: str, subject: str, profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity]:
        """A new user and its link; :class:`Conflict` if the link exists."""
        ...

    async def link_identity(
        self, user_id: str, provider: str, subject: str, data: dict[str, Any] | None = None
    ) -> Identity:
        """Link to an existing user; :class:`Conflict` if linked to another."""
        ...

    async def update_identity_data(self, provider: str, subject: str, data: dict[str, Any]) -> None: ...

    async def list_identities(self, user_id: str) -> list[Identity]: ...

    def records(self, collection: Collection) -> Records:
        """The records of a plugin's :class:`Collection`; the store makes its
        table (or collection) and indexes on first use, idempotently."""
        ...


class SharedState(Protocol):
    """Counters, small values with a TTL and locks, shared by every process
    of the gateway (Redis in production).  Every method may raise
    :class:`StoreUnavailable`.  Name keys after your plugin
    (``"<plugin>:..."``)."""

    async def hit(self, key: str, window: float) -> tuple[int, float]:
        """Count one event in a fixed window started by the first hit:
        ``(count, seconds until the window ends)``."""
        ...

    async def peek(self, key: str) -> tuple[int, float]:
        """``(count, seconds left)`` without counting; ``(0, 0)`` when none."""
        ...

    async def clear(self, key: str) -> None: ...

    async def get_value(self, key: str) -> str | None: ...

    async def set_value(self, key: str, value: str, ttl: float) -> None: ...

    async def add_value(self, key: str, value: str, ttl: float) -> bool:
        """Store only if ``key`` holds nothing (atomic: a lock); True if stored."""
        ...

    async def delete_value(self, key: str, expected: str | None = None) -> bool:
        """Remove ``key`` (only while it holds ``expected``, when given)."""
        ...


class Sessions(Protocol):
    """The gateway's sessions, as far as a provider may act on them."""

    @property
    def absolute_timeout(self) -> float:
        """Seconds a session lives at most."""
        ...

    async def revoke_user(self, user_id: str, reason: str, *, keep: str | None = None) -> Sequence[SessionView]:
        """End every session of the user (but ``keep``, a session id)."""
        ...

    async def update_data(self, session_id: str, changes: Mapping[str, Any]) -> SessionView | None:
        """Set these keys of a live session's ``data`` (what its
        :class:`LoginResult` put there), keeping its token and deadlines:
        the session as saved, or ``None`` when it has ended."""
        ...


class Sealer(Protocol):
    """Authenticated encryption for secrets kept in session data or state."""

    @property
    def ephemeral(self) -> bool:
        """True when no ``sessions.encryption_key`` is configured: what is
        sealed opens in this process only."""
        ...

    def seal(self, data: bytes, context: str = "") -> str: ...

    def open(self, sealed: str, context: str = "") -> bytes:
        """The data; ``ValueError`` when it was sealed under another key or
        context, or altered."""
        ...


class CounterSeries(Protocol):
    """One series of a :class:`Counter`: the counter at some label values."""

    def inc(self, amount: float = 1.0) -> None:
        """Count ``amount`` (at least 0; ``ValueError`` otherwise)."""
        ...


class Counter(Protocol):
    """A plugin's Prometheus counter (:meth:`Metrics.counter`)."""

    def labels(self, *values: str | int, **named: str | int) -> CounterSeries:
        """The series of these label values, all of them, in the declared
        order or by name (``labels(api="code2session", errcode=0)``); an
        integer is its decimal text.  A value that is not text or an
        integer, is longer than 64 characters, or would be its label's 51st
        distinct value in this process counts as ``"other"``: the series
        stay bounded whatever the traffic.  ``ValueError`` for missing or
        unknown labels."""
        ...

    def inc(self, amount: float = 1.0) -> None:
        """Count on a counter declared without labels (``ValueError`` on one with labels)."""
        ...


class Metrics(Protocol):
    """Prometheus metrics of a plugin's own, served with the gateway's on
    the admin listener's ``/metrics`` and summed over every worker like
    them."""

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """The counter ``gateway_<name>_total``: ``name`` is lowercase
        letters, digits and ``_``, beginning with a letter, and named after
        the plugin (``"acme_directory_calls"``); ``documentation`` is its
        HELP text; ``labels`` its label names (lowercase words).  Declared
        once per process: the same name with the same labels is the same
        counter (declare it in ``setup()``); with other labels, or a name
        of the gateway's own, it is a ``ValueError``.  Never put a user id,
        a token or anything else unbounded or secret in a label."""
        ...


class Services(Protocol):
    """What a provider (``self.gateway``) and a hook's ``gateway`` argument
    may use."""

    @property
    def profiles(self) -> Profiles: ...
    @property
    def state(self) -> SharedState: ...
    @property
    def sessions(self) -> Sessions: ...
    @property
    def sealer(self) -> Sealer: ...
    @property
    def metrics(self) -> Metrics:
        """The plugins' counters (:class:`Metrics`)."""
        ...

    def auth_path(self, *parts: str) -> str:
        """A route pattern under ``server.auth_prefix`` (parts may be regexes)."""
        ...

    def audit(self, event: str, **fields: Any) -> None:
        """Record ``event`` in the audit log (``[logging] audit``; a no-op
        while it is off): one JSON line with the time, the event, the
        request's ``request_id`` and ``ip`` when called while serving one,
        and ``fields`` (JSON values, never a secret), e.g.
        ``gateway.audit("password_changed", user_id=...)``.  Never raises."""
        ...


class Request(Protocol):
    """The request a provider's :meth:`Provider.login` or :class:`Endpoint`
    serves."""

    @property
    def request(self) -> HTTPServerRequest:
        """Tornado's request: method, path, headers."""
        ...

    @property
    def client_ip(self) -> str:
        """The client's address (behind trusted proxies, the first untrusted hop)."""
        ...

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, or 400 ``invalid_request``."""
        ...

    def field(self, body: dict[str, Any], name: str, kind: type = str, *, default: Any = ...,
              max_length: int = 4096) -> Any:
        """``body[name]`` checked to be a ``kind`` (400 naming the field
        otherwise); ``default`` when absent, else missing is a 400."""
        ...

    async def require_session(self, *, allow_superseded: bool = True) -> Principal:
        """The caller's session (401 without one, 403 on a cross-site
        cookie request).  ``allow_superseded=False``: a token ``/refresh``
        replaced moments ago (in its grace period) is not enough, as for
        managing sessions or credentials."""
        ...


# ---------------------------------------------------------------------------
# Endpoints and commands
# ---------------------------------------------------------------------------

#: What an endpoint's function returns: a JSON object (answered with the
#: endpoint's ``status``), a :class:`LoginResult` (a fresh session, answered
#: as a login is: 201 when it created the user, else ``status``), or
#: ``None`` (204 No Content).
EndpointResult = dict[str, Any] | LoginResult | None

#: An :class:`Endpoint`'s ``response_schema`` when its function answers with
#: a fresh session (a :class:`LoginResult`): the gateway's login answer,
#: ``#/components/schemas/Login`` in its OpenAPI document.
LOGIN_ANSWER: Mapping[str, Any] = MappingProxyType({"$ref": "#/components/schemas/Login"})


@dataclass(frozen=True)
class Endpoint:
    """An HTTP endpoint under ``{auth_prefix}/<provider>/``: ``path`` is
    the rest (``"register"``), ``method`` its one method.  The gateway
    renders errors, applies the body limit, CORS and CSRF rules, and answers
    with what ``handler`` returns (see :data:`EndpointResult`)."""

    path: str
    handler: Callable[[Request], Awaitable[EndpointResult]]
    method: str = "POST"
    status: int = 200
    #: What the gateway's OpenAPI document (``GET {auth_prefix}/openapi.json``)
    #: says of it: a one-line summary; the JSON Schema (2020-12) of the JSON
    #: body the function reads (``None``: it reads none); that of the JSON
    #: object it answers with (:data:`LOGIN_ANSWER` for a fresh session;
    #: ``None`` with ``status=204`` for a function that returns ``None``;
    #: ``None`` otherwise: any of the three, undescribed); and whether it
    #: needs the caller's session (:meth:`Request.require_session`).
    #: Schemas may refer to ``#/components/schemas/User``, ``Session`` and
    #: ``Login``.
    summary: str = ""
    request_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    response_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    requires_session: bool = False


@dataclass
class CommandContext:
    """What a :class:`Command` runs with: the opened profile store, and
    the audit log (:meth:`audit`)."""

    profiles: Profiles
    #: what :meth:`audit` hands each event to (the gateway's audit log)
    auditor: Callable[..., None] | None = None

    def audit(self, event: str, **fields: Any) -> None:
        """Record ``event`` in the audit log, as :meth:`Services.audit`
        does (``"invitation_sent"``, say); a no-op while it is off."""
        if self.auditor is not None:
            self.auditor(event, **fields)


@dataclass(frozen=True)
class Command:
    """A ``gateway <name> ...`` subcommand.  ``configure`` adds its
    arguments (and sub-subcommands) to its parser; ``run`` does the work
    with the profile store open and returns the exit status.  A
    :class:`GatewayError` from ``run`` prints its message and exits 1; a bad
    ``[profiles]`` configuration exits 2 before ``run``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, CommandContext], Awaitable[int]]


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config PATH``, which ``GATEWAY_CONFIG`` may stand in for (every
    subcommand that reads the configuration takes it)."""
    default = os.environ.get("GATEWAY_CONFIG") or None
    parser.add_argument("--config", default=default, required=default is None,
                        help="TOML configuration file (default: $GATEWAY_CONFIG)")


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigContext:
    """What :meth:`Provider.check_config` may know of the rest of the
    configuration."""

    environ: Mapping[str, str]
    #: the session store is shared by several processes (Redis)
    shared_sessions: bool
    #: ``sessions.encryption_key`` is set (what is sealed opens in every process)
    sealing_key: bool


class Provider:
    """Base class of identity providers.

    A plugin offers provider classes through the ``gateway_providers`` hook.
    The gateway checks the ``[providers.<name>]`` table against
    :attr:`options` and :meth:`check_config`, builds one instance per
    gateway (keep side effects in :meth:`setup`), serves
    ``POST {auth_prefix}/<name>/login`` with :meth:`login` and the
    :meth:`endpoints`, and calls the other methods below.  The gateway owns
    the fixed outer steps (read the body, render errors, create the session,
    set the cookie, strip credentials before proxying); a provider fills in
    the inner ones.
    """

    #: URL segment and config table name; lowercase letters, digits, ``-``, ``_``.
    name: ClassVar[str] = ""
    #: the ``[providers.<name>]`` options, declared once with type, default, help.
    options: ClassVar[list[Option]] = []
    #: tables an option holds (``{"apps.<name>": [...]}``: each
    #: ``[providers.<name>.apps.<app>]`` table): the gateway checks each
    #: against these options and hands them over as sections
    #: (``settings.apps["shop"].appid``); they are documented beside the options.
    option_tables: ClassVar[dict[str, list[Option]]] = {}
    #: serve ``POST {auth_prefix}/<name>/login`` (False for a provider that
    #: only authenticates requests, through :meth:`authenticate`).
    login_route: ClassVar[bool] = True
    #: how this provider's credentials begin (``"sk_live_"``, say): a value with one
    #: is never forwarded upstream in ``Authorization`` or a
    #: :attr:`credential_header_names` header, a request carrying one
    #: anywhere else (the query, another header) is refused, and log lines
    #: show it as ``<prefix>[redacted]``.  3 to 32 letters, digits, ``.``, ``_`` or ``-``.
    credential_prefixes: ClassVar[tuple[str, ...]] = ()
    #: request headers that carry this provider's credential (``X-Example-Key``):
    #: dropped from every proxied request in any spelling (``X_Example_Key``).
    credential_header_names: ClassVar[tuple[str, ...]] = ()
    #: request headers only this provider sets upstream (through
    #: :meth:`upstream_headers`), such as ``X-Example-Account``: any variant a
    #: client sends is dropped on every route, so none is forged, even while
    #: the provider is switched off (an upstream may still trust them).
    reserved_headers: ClassVar[tuple[str, ...]] = ()
    #: the provider's own kinds of record in the profile store (two
    #: providers may not declare the same name)
    collections: ClassVar[tuple[Collection, ...]] = ()
    #: the JSON Schema (2020-12) of the body :meth:`login` reads, for the
    #: gateway's OpenAPI document (``None``: a JSON object, undescribed); a
    #: provider whose body depends on its settings sets it in ``__init__``.
    login_schema: Mapping[str, Any] | None = None

    def __init__(self, gateway: Services, settings: Section) -> None:
        self.gateway = gateway
        self.settings = settings

    @classmethod
    def check_config(cls, settings: Section, context: ConfigContext) -> list[str]:
        """Problems with this provider's settings beyond each option's own
        check (rules across options or tables), each naming its key
        (``providers.<name>.<key>: ...``).  No side effects: it runs on
        ``gateway check-config`` too."""
        return []

    @property
    def log(self) -> logging.Logger:
        """The provider's logger, ``gateway.<name>`` (secrets redacted)."""
        return logging.getLogger(f"gateway.{self.name}")

    @property
    def enabled(self) -> bool:
        """False when the configuration leaves this provider off (no routes,
        no :meth:`setup`); e.g. a provider with none of its apps configured."""
        return True

    async def setup(self) -> None:
        """Called once the stores are open, before the gateway listens."""

    async def close(self) -> None:
        """Called when the gateway stops."""

    async def login(self, request: Request, body: dict[str, Any]) -> LoginResult:
        """Check the credentials in ``body`` and return the user.

        Raise :class:`GatewayError` (``invalid_request``,
        ``invalid_credentials``, ``locked_out``...) to refuse.  Never put a
        secret in an error message.
        """
        raise NotImplementedError

    async def authenticate(self, request: HTTPServerRequest) -> Principal | None:
        """Authenticate a request that carries this provider's credential
        (an API key) rather than a session.

        Called, enabled providers in name order, for a request with no live
        session (no token, or a stale cookie; a stale Bearer session token
        is not offered), and first, before the session, when
        :meth:`credential_headers` names a header of a request that also
        carries a session cookie (the explicit credential speaks for it).
        Return ``None`` when the request holds no credential of yours,
        raise :class:`GatewayError` to refuse a bad one.
        """
        return None

    def credential_headers(self, request: HTTPServerRequest) -> list[str]:
        """Names of the headers of ``request`` that carry this provider's
        credential; by default those of :attr:`credential_header_names`
        present in any spelling, and ``Authorization`` when it holds one of
        :attr:`credential_prefixes`."""
        wanted = {h.lower().replace("_", "-") for h in self.credential_header_names}
        names = list(dict.fromkeys(
            name for name, _ in request.headers.get_all() if name.lower().replace("_", "-") in wanted))
        if self.credential_prefixes and any(
                _bearer_value(v).startswith(self.credential_prefixes)
                for v in request.headers.get_list("Authorization")):
            names.append("Authorization")
        return names

    def upstream_headers(self, principal: Principal) -> dict[str, str] | None:
        """Headers for the upstream request of a caller this provider
        authenticated (``principal.provider == self.name``), such as the
        names in :attr:`reserved_headers`.  The gateway's own headers and
        hop-by-hop headers cannot be set this way."""
        return None

    def endpoints(self) -> list[Endpoint]:
        """Extra endpoints under ``{auth_prefix}/<name>/``."""
        return []

    async def unlock(self, subject: str) -> bool:
        """Lift every lockout this provider keeps for ``subject`` (its own
        subject: a username, say), for an operator
        (``DELETE /admin/lockouts/<name>/<subject>``, ``gateway unlock
        <name>:<subject>``).  Return False when this provider keeps no
        lockouts (the default: nothing to unlock), True once those of
        ``subject``, if any, are lifted.  The keys of the shared state that
        hold them are the provider's own: only it knows them."""
        return False


def _bearer_value(header: str) -> str:
    parts = header.split(None, 1)
    return parts[1].strip() if len(parts) == 2 and parts[0].lower() == "bearer" else ""
