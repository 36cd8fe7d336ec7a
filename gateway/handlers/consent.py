"""``{auth_prefix}/consent``: the consent documents, what the caller
accepted, accepting and withdrawing; and the ``accept`` of a login body.

Every endpoint needs a gateway session (CSRF rules as for the other
endpoints).  The rules themselves are :mod:`gateway.consent`'s.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping

import tornado.web

from gateway import audit
from gateway.consent import Consent
from gateway.errors import GatewayError, StoreUnavailable, invalid_request, not_found
from gateway.handlers.base import BaseHandler
from gateway.openapi import TIME, Operation

log = logging.getLogger("gateway.app")

_DOCUMENT = {
    "type": "object", "required": ["name", "version", "url", "title"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string", "description": "the current version"},
                   "url": {"type": "string"}, "title": {"type": "string"}},
}
_LISTING = {
    "type": "object", "required": ["documents", "consent_required"],
    "properties": {
        "documents": {"type": "array", "items": {"allOf": [_DOCUMENT], "required": ["accepted", "current"], "properties": {
            "accepted": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["version", "at"],
                "properties": {"version": {"type": "string"}, "at": TIME}}]},
            "current": {"type": "boolean", "description": "the user accepted the current version"}}}},
        "consent_required": {"type": "array", "items": {"type": "string"},
                             "description": "the documents whose current version the user has not accepted"},
    },
}


class ConsentHandler(BaseHandler):
    """``GET`` lists the documents and what the caller accepted;
    ``POST {"accept": {"<document>": "<version>"}}`` accepts (and answers
    the same listing); without documents there is nothing to accept, and
    ``POST`` is 405."""

    consent: Consent

    @classmethod
    def operations_for(cls, consent: Consent) -> Mapping[str, Operation]:
        """POST only with documents to accept (without, it is always a 400)."""
        out = {"get": Operation("The consent documents and what this user accepted", {200: _LISTING}, session=True)}
        if consent.documents:
            out["post"] = Operation(
                "Accept the current version of documents", {200: _LISTING}, session=True,
                request_schema={"type": "object", "required": ["accept"],
                                "properties": {"accept": consent.accept_schema()}},
                errors=(409,), description="A version that is not the current one is 409 `conflict` "
                                           "(the body adds `documents`); an unknown document is 400.")
        return out

    async def get(self) -> None:
        principal = await self.require_session()
        consent = self.consent
        self.write_json(consent.listing(await consent.accepted(principal.user_id)))

    def allowed_methods(self) -> list[str]:
        methods = super().allowed_methods()
        return methods if self.consent.documents else [m for m in methods if m != "POST"]

    async def post(self) -> None:
        if not self.consent.documents:
            raise tornado.web.HTTPError(405)  # nothing to accept: the method is not offered
        principal = await self.require_session()
        body = self.json_body()
        if body.get("accept") is None:
            raise invalid_request("missing field: accept")
        consent = self.consent
        versions = consent.checked_acceptance(body["accept"])
        state = await consent.accept(principal.user_id, versions, session_id=principal.session_id,
                                     ip=self.client_ip)
        audit.record("consent_accepted", user_id=principal.user_id, session_id=principal.session_id,
                     documents=dict(versions))
        self.write_json(consent.listing(state))


class ConsentItemHandler(BaseHandler):
    """``DELETE {auth_prefix}/consent/<document>``: withdraw (204, also
    when there was nothing to withdraw)."""

    consent: Consent

    operations: ClassVar[Mapping[str, Operation]] = {
        "delete": Operation("Withdraw the acceptance of a document", {204: None}, session=True, errors=(404,)),
    }

    async def delete(self, name: str) -> None:
        principal = await self.require_session()
        consent = self.consent
        if name not in consent.documents:
            raise not_found(f"no consent document {name!r}")
        await consent.withdraw(principal.user_id, name, session_id=principal.session_id, ip=self.client_ip)
        audit.record("consent_withdrawn", user_id=principal.user_id, session_id=principal.session_id, document=name)
        self.set_status(204)
        self.finish()


async def login_consent(handler: BaseHandler, user_id: str, session_id: str) -> dict[str, Any]:
    """What a login's answer says of consent, having recorded the ``accept``
    of the login's JSON body (if any) under the new session:
    ``consent_required`` (the documents whose current version the user has
    not accepted; ``[]`` when none or none are configured) and, when the
    ``accept`` was refused or the history could not be read,
    ``consent_error`` (the error body POST /consent would have answered).
    The login itself never fails for it: its credentials may have been
    single-use."""
    consent = handler.gateway.consent
    accept = _accept_of(handler)
    if not consent.documents and accept is None:
        return {"consent_required": []}
    error: GatewayError | None = None
    versions: dict[str, str] = {}
    if accept is not None:
        try:
            versions = consent.checked_acceptance(accept)
        except GatewayError as exc:
            error = exc
    try:
        state = await consent.accepted(user_id)
        if versions:
            state = await consent.accept(user_id, versions, session_id=session_id, ip=handler.client_ip,
                                         accepted=state)
            audit.record("consent_accepted", user_id=user_id, session_id=session_id, documents=dict(versions))
        required = [d.name for d in consent.missing(state)]
    except StoreUnavailable as exc:
        log.warning("login of user %s: consent not read or recorded: %s", user_id, exc.detail or exc.message)
        error, required = exc, list(consent.documents)
    out: dict[str, Any] = {"consent_required": required}
    if error is not None:
        out["consent_error"] = error.body()
    return out


def _accept_of(handler: BaseHandler) -> Any:
    """The ``accept`` member of the request's JSON body (``None``: none)."""
    if not handler.body.strip():
        return None
    try:
        body = handler.json_body()
    except GatewayError:
        return None
    return body.get("accept")
