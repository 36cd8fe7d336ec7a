"""The profile store contract: users, their profile fields, linked identities.

A *user* has a generated id and a dict of profile fields.  An *identity* links
``(provider, subject)`` to exactly one user; its natural key is the string
``"<provider>:<subject>"`` (e.g. ``"password:alice"``), and uniqueness rests on
that key, which is what makes a first-login upsert atomic: fifty concurrent
first logins for the same subject create exactly one user.

An identity also carries ``data``: provider-private fields (a password hash,
say) that never leave the gateway.

An *API key* record (:class:`ApiKey`) belongs to one user; the store keeps
only the SHA-256 of the key's secret, never the key.

Every method may raise :class:`gateway.errors.StoreUnavailable` when the
backing database cannot be reached; nothing already stored is lost.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def identity_key(provider: str, subject: str) -> str:
    """Natural key of an identity link: ``"<provider>:<subject>"``."""
    return f"{provider}:{subject}"


def new_user_id() -> str:
    """A fresh, non-secret, URL-safe user id."""
    return "u_" + secrets.token_urlsafe(12)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class User:
    id: str
    profile: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass
class Identity:
    provider: str
    subject: str
    user_id: str
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)

    @property
    def key(self) -> str:
        return identity_key(self.provider, self.subject)


@dataclass
class ApiKey:
    """An API key's record: owner, name, scopes, the SHA-256 (hex) of its
    secret and timezone-aware UTC datetimes.  ``expires_at`` ``None``: never
    expires; ``revoked_at``/``last_used_at`` ``None``: not (yet)."""

    id: str
    user_id: str
    name: str
    scopes: list[str]
    secret_hash: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


class ProfileStore(abc.ABC):
    """Where users and identity links live.  See the module docstring."""

    #: short name used in configuration (``[profiles] store = "..."``)
    name: str = ""

    async def open(self) -> None:
        """Connect, create tables / indexes idempotently."""

    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> User | None:
        """The user with this id, or ``None``."""

    @abc.abstractmethod
    async def update_profile(self, user_id: str, fields: dict[str, Any]) -> User:
        """Merge ``fields`` into the user's profile (a ``None`` value removes a
        field) and return the updated user.  Raises ``KeyError`` for an unknown
        user id."""

    @abc.abstractmethod
    async def get_identity(self, provider: str, subject: str) -> Identity | None:
        """The identity link ``(provider, subject)``, or ``None``."""

    @abc.abstractmethod
    async def resolve_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity, bool]:
        """Find the user linked to ``(provider, subject)``, creating user and
        link atomically when there is none (``profile`` and ``data`` are only
        used on creation).  Returns ``(user, identity, created)``.  Concurrent
        calls for the same subject all get the same single user."""

    @abc.abstractmethod
    async def create_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity]:
        """Create a new user and its link; raise
        :class:`gateway.errors.Conflict` if the link already exists (and create
        nothing)."""

    @abc.abstractmethod
    async def link_identity(
        self, user_id: str, provider: str, subject: str, data: dict[str, Any] | None = None
    ) -> Identity:
        """Link ``(provider, subject)`` to an existing user; raise
        :class:`gateway.errors.Conflict` if it is linked to another user
        (linking it again to the same user is a no-op returning the link)."""

    @abc.abstractmethod
    async def update_identity_data(
        self, provider: str, subject: str, data: dict[str, Any]
    ) -> None:
        """Merge ``data`` into the link's provider-private data.  Raises
        ``KeyError`` if the link does not exist."""

    @abc.abstractmethod
    async def list_identities(self, user_id: str) -> list[Identity]:
        """Every identity linked to the user, oldest first."""

    # -- API keys ----------------------------------------------------------------

    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey) -> None:
        """Store a new key record; raise :class:`gateway.errors.Conflict` if a
        key with this id exists and ``KeyError`` if ``key.user_id`` is not a
        user (storing nothing either way)."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key record with this id, or ``None``."""

    @abc.abstractmethod
    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        """Every key of the user, revoked and expired ones included, oldest first."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, when: datetime) -> ApiKey | None:
        """Set ``revoked_at = when`` unless already set (the first revocation
        stands) and return the record; ``None`` for an unknown id."""

    @abc.abstractmethod
    async def touch_api_key(self, key_id: str, when: datetime, older_than: datetime) -> bool:
        """Set ``last_used_at = when`` only if it is unset or earlier than
        ``older_than`` (one conditional write, so processes sharing the store
        write at most once per interval); True if written."""
