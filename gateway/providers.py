"""The identity provider base class.

A provider is contributed by a plugin through the ``gateway_providers`` hook
as a :class:`Provider` *subclass*.  The gateway validates the
``[providers.<name>]`` table against :attr:`Provider.options`, builds an
instance (each time a gateway is built: side effects belong in
:meth:`Provider.setup`), serves ``POST {auth_prefix}/<name>/login`` with it, and adds the
routes its :meth:`Provider.handlers` returns.

The gateway owns the fixed outer steps of a login (read the JSON body,
call :meth:`Provider.login`, create a fresh session, set the cookie, answer);
the provider fills in one inner step: turn the body into a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from gateway.config import Option, Section
from gateway.profiles.base import User

if TYPE_CHECKING:  # pragma: no cover
    from gateway.app import Gateway
    from gateway.handlers.base import BaseHandler
    from tornado.httputil import HTTPServerRequest


@dataclass
class LoginResult:
    """What a successful :meth:`Provider.login` returns.

    ``session_data`` is kept in the gateway session (never sent upstream or
    to the client); ``created`` says whether this login created the user.
    """

    user: User
    session_data: dict[str, Any] = field(default_factory=dict)
    created: bool = False


class Provider:
    """Base class of identity providers.  See the module docstring."""

    #: URL segment and config table name; lowercase letters, digits, ``-``, ``_``.
    name: ClassVar[str] = ""
    #: the ``[providers.<name>]`` options, declared once with type, default, help.
    options: ClassVar[list[Option]] = []
    #: serve ``POST {auth_prefix}/<name>/login`` (False for a provider that
    #: only authenticates requests, through ``gateway_authenticate``).
    login_route: ClassVar[bool] = True
    #: request headers this provider sets upstream (through
    #: ``gateway_upstream_headers``), such as ``X-WeChat-OpenId``: any
    #: variant a client sends is dropped on every route, so none is forged.
    reserved_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, gateway: "Gateway", settings: Section) -> None:
        self.gateway = gateway
        self.settings = settings

    @property
    def enabled(self) -> bool:
        """False when the configuration leaves this provider off (no routes,
        no :meth:`setup`); e.g. WeChat with no mini-program configured."""
        return True

    def credential_headers(self, request: "HTTPServerRequest") -> list[str]:
        """Names of the request headers that carry this provider's credential
        in ``request``.  The proxy strips them from every proxied request
        (public routes too), so a credential never reaches an upstream."""
        return []

    async def setup(self) -> None:
        """Called once the stores are open, before the gateway listens."""

    async def close(self) -> None:
        """Called when the gateway stops."""

    async def login(self, handler: "BaseHandler", body: dict[str, Any]) -> LoginResult:
        """Check the credentials in ``body`` and return the user.

        Raise :class:`gateway.errors.GatewayError` (``invalid_request``,
        ``invalid_credentials``, ``locked_out``...) to refuse.  Never put a
        secret in an error message.
        """
        raise NotImplementedError

    def handlers(self) -> list[tuple[Any, ...]]:
        """Extra ``(pattern, handler_class[, kwargs])`` routes; build patterns
        with ``self.gateway.auth_path(self.name, "...")``."""
        return []
