"""Who a request is: the principal an authenticated request carries."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sessions.manager import Session


@dataclass
class Principal:
    """An authenticated caller.

    ``session`` is set when a gateway session authenticated the request;
    plugins answering ``gateway_authenticate`` (API keys, say) leave it
    ``None`` and may give ``scopes`` and name the request headers that carried the
    credential in ``headers_to_strip``.
    """

    user_id: str
    provider: str
    session: Session | None = None
    scopes: list[str] | None = None
    #: request headers holding the credential, never forwarded upstream
    headers_to_strip: tuple[str, ...] = ()

    @property
    def session_id(self) -> str | None:
        return self.session.id if self.session else None
