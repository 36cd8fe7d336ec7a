"""Consent: the documents users accept, what each user has accepted, and
the rule of routes that require it.

Documents are configured (``[consent.documents.<name>]``: the current
``version``, a ``url``, a ``title``).  What users do is kept in the profile
store as history, one record per event in the ``consent_events``
collection, never changed or removed (SQLite and MongoDB alike, through
:class:`gateway.api.Records`): an acceptance (``"accepted"``, always of a
document's current version) or a withdrawal (``"withdrawn"``), each with
the time, the version, the session id and the client's IP.

What a user has accepted now is the fold of that history, oldest first: per
document, the latest event, when it is an acceptance.  An acceptance of a
version that is no longer current is kept but no longer enough: a new
version makes every user accept again.  Accepting the version one has
already accepted records nothing (a client may send the same ``accept``
with every login); withdrawing what one has not accepted records nothing.

Nothing here knows HTTP: :mod:`gateway.handlers.consent` and the proxy call
:class:`Consent`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from gateway.api import Collection, Profiles, Records, utcnow
from gateway.config import ConsentConfig
from gateway.errors import GatewayError, invalid_request

__all__ = ["EVENTS", "Acceptance", "Consent", "Document", "iso"]

#: the history: one record per acceptance or withdrawal, looked up by user
EVENTS = Collection("consent_events", key="id", indexes=("user_id",))


def iso(moment: datetime) -> str:
    """``2026-11-22T09:30:00Z``."""
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Document:
    """A configured document, at its current version."""

    name: str
    version: str
    url: str
    title: str

    def public(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "url": self.url, "title": self.title}


@dataclass(frozen=True)
class Acceptance:
    """A user's standing acceptance of one version of a document."""

    version: str
    at: datetime
    session_id: str | None = None


class Consent:
    """The configured documents and the users' history of accepting them."""

    def __init__(self, config: ConsentConfig, profiles: Profiles) -> None:
        #: by name, in the configuration's order
        self.documents: dict[str, Document] = {
            name: Document(name, doc.version, doc.url, doc.title or name) for name, doc in config.documents.items()
        }
        self.events: Records = profiles.records(EVENTS)

    # -- what a user has accepted ------------------------------------------------

    async def accepted(self, user_id: str) -> dict[str, Acceptance]:
        """What the user has accepted now, by document (current versions or
        not; documents no longer configured left out): one store read."""
        state: dict[str, Acceptance] = {}
        for event in await self.events.find("user_id", user_id):
            name, version = event.get("document"), event.get("version")
            if not isinstance(name, str) or name not in self.documents:
                continue
            if event.get("action") == "accepted" and isinstance(version, str):
                at = event.get("at")
                state[name] = Acceptance(version, at if isinstance(at, datetime) else utcnow(),
                                         event.get("session_id"))
            elif event.get("action") == "withdrawn":
                state.pop(name, None)
        return state

    async def history(self, user_id: str) -> list[dict[str, Any]]:
        """Every event of the user, oldest first, as stored."""
        return await self.events.find("user_id", user_id)

    def missing(self, accepted: Mapping[str, Acceptance], names: Iterable[str] | None = None) -> list[Document]:
        """The documents of ``names`` (default: all) whose current version
        ``accepted`` lacks, in the order given."""
        wanted = self.documents if names is None else names
        return [self.documents[n] for n in wanted if not self._current(accepted, n)]

    def _current(self, accepted: Mapping[str, Acceptance], name: str) -> bool:
        have = accepted.get(name)
        return have is not None and have.version == self.documents[name].version

    def listing(self, accepted: Mapping[str, Acceptance]) -> dict[str, Any]:
        """What ``GET {auth_prefix}/consent`` answers."""
        documents = []
        for doc in self.documents.values():
            have = accepted.get(doc.name)
            documents.append({
                **doc.public(),
                "accepted": None if have is None else {"version": have.version, "at": iso(have.at)},
                "current": self._current(accepted, doc.name),
            })
        return {"documents": documents, "consent_required": [d.name for d in self.missing(accepted)]}

    def header(self, accepted: Mapping[str, Acceptance]) -> str:
        """The ``X-Consent`` value: each document whose current version the
        user accepted, ``name=version``, comma-separated, in configuration
        order; versions percent-encoded (all but letters, digits and
        ``-._~``), so any version is one unambiguous header token."""
        return ", ".join(f"{d.name}={quote(d.version, safe='')}" for d in self.documents.values()
                         if self._current(accepted, d.name))

    def accept_schema(self) -> dict[str, Any]:
        """The JSON Schema of an ``accept`` object: documents and their current versions."""
        return {"type": "object", "minProperties": 1, "additionalProperties": False,
                "properties": {d.name: {"const": d.version} for d in self.documents.values()},
                "description": "document name -> its current version, accepted"}

    # -- the route rule ------------------------------------------------------------

    async def admit(self, user_id: str, required: Iterable[str]) -> str:
        """The ``X-Consent`` value for a caller of a route that requires
        ``required``, or 403 ``consent_required`` listing the documents whose
        current version the user has not accepted.  One store read."""
        accepted = await self.accepted(user_id)
        missing = self.missing(accepted, required)
        if missing:
            names = ", ".join(d.name for d in missing)
            raise GatewayError("consent_required", f"this route requires accepting the current version of: {names}",
                               fields={"documents": [d.public() for d in missing]})
        return self.header(accepted)

    # -- accepting and withdrawing -----------------------------------------------------

    def checked_acceptance(self, value: Any) -> dict[str, str]:
        """An ``accept`` object (``{"<document>": "<version>"}``) as given,
        or the error to answer: 400 ``invalid_request`` for a malformed one
        or an unknown document, 409 ``conflict`` naming the current version
        of each document it names at another one (with ``documents``)."""
        if not isinstance(value, dict) or not value:
            raise invalid_request('field accept must be a JSON object of document names and versions, '
                                  'such as {"terms": "2026-11"}')
        unknown = [name for name in value if name not in self.documents]
        if unknown:
            known = ", ".join(self.documents) or "none are configured"
            raise invalid_request(f"no consent document {', '.join(repr(n[:64]) for n in unknown[:5])} "
                                  f"(the documents: {known})")
        for name, version in value.items():
            if not isinstance(version, str):
                raise invalid_request(f"field accept.{name} must be a string (the version accepted)")
        stale = [self.documents[name] for name, version in value.items() if version != self.documents[name].version]
        if stale:
            said = "; ".join(f"{d.name} is at version {d.version!r}, not {value[d.name][:64]!r}" for d in stale)
            raise GatewayError("conflict", f"not the current version: {said}",
                               fields={"documents": [d.public() for d in stale]})
        return dict(value)

    async def accept(self, user_id: str, versions: Mapping[str, str], *, session_id: str | None, ip: str,
                     accepted: Mapping[str, Acceptance] | None = None) -> dict[str, Acceptance]:
        """Record the acceptance of each of ``versions`` (checked by
        :meth:`checked_acceptance`) that is not already in place; what the
        user has accepted now.  ``accepted``: the user's standing
        acceptances, if just read."""
        state = dict(accepted if accepted is not None else await self.accepted(user_id))
        now = utcnow()
        for name, version in versions.items():
            have = state.get(name)
            if have is not None and have.version == version:
                continue
            await self._record(user_id, name, version, "accepted", now, session_id, ip)
            state[name] = Acceptance(version, now, session_id)
        return state

    async def withdraw(self, user_id: str, name: str, *, session_id: str | None, ip: str) -> bool:
        """Withdraw the user's acceptance of document ``name`` (of whatever
        version); False, recording nothing, when there was none."""
        have = (await self.accepted(user_id)).get(name)
        if have is None:
            return False
        await self._record(user_id, name, have.version, "withdrawn", utcnow(), session_id, ip)
        return True

    async def _record(self, user_id: str, name: str, version: str, action: str, at: datetime,
                      session_id: str | None, ip: str) -> None:
        await self.events.insert({
            "id": "ce_" + secrets.token_urlsafe(12),
            "user_id": user_id,
            "document": name,
            "version": version,
            "action": action,
            "at": at,
            "session_id": session_id,
            "ip": ip,
        })
