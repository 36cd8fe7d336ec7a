"""The profile store contract: users, their profile fields, linked identities,
and plugins' own records.

A *user* has a generated id and a dict of profile fields.  An *identity* links
``(provider, subject)`` to exactly one user; its natural key is the string
``"<provider>:<subject>"`` (e.g. ``"password:alice"``), and uniqueness rests on
that key, which is what makes a first-login upsert atomic: fifty concurrent
first logins for the same subject create exactly one user.

An identity also carries ``data``: provider-private fields (a password hash,
say) that never leave the gateway.

A plugin keeps its own records in a :class:`~gateway.api.Collection`, through
the :class:`~gateway.api.Records` that :meth:`ProfileStore.records` returns;
the contract of those methods is written in :mod:`gateway.api`.  What every
backend enforces the same way, before touching its database
(``ValueError`` otherwise):

- a collection's ``name`` matches ``^[a-z][a-z0-9_]{0,47}$``; the store keeps
  it apart from its own tables (``plugin_<name>``);
- its ``key``, ``unique`` and ``indexes`` fields are identifiers
  (``^[A-Za-z][A-Za-z0-9_]{0,63}$``), and a collection's key never changes;
- a record is a mapping with the key field holding a string; field names
  are non-empty strings without ``.``, a leading ``$`` or a leading ``_``;
  values are JSON values (strings, booleans, ``None``, finite numbers,
  integers within 64 bits, lists, objects whose keys do not begin with
  ``$``) or, at the top level only, timezone-aware datetimes, which come
  back as UTC datetimes (to the millisecond on MongoDB, the microsecond on
  SQLite);
- a ``unique`` field constrains only records where it holds a value: any
  number of records may lack it or hold ``None``;
- :meth:`~gateway.api.Records.update` cannot change the key; a ``where``
  value compares equal only within one type (``1`` equals ``1.0``, never
  ``True``), and a :class:`~gateway.api.Below` bound (a number, string or
  datetime) is met by a missing or ``None`` field, or a smaller value of
  the same kind (numbers with numbers, datetimes with datetimes, strings by
  code point).

Every method may raise :class:`gateway.errors.StoreUnavailable` when the
backing database cannot be reached; nothing already stored is lost.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from gateway.api import (
    Below,
    Collection,
    Identity,
    Records,
    User,
    identity_key,
    new_user_id,
    utcnow,
)

__all__ = [
    "Below", "Collection", "Identity", "ProfileStore", "Records", "User",
    "check_changes", "check_collection", "check_record", "check_value", "check_where", "identity_key",
    "new_user_id", "record_matches", "utcnow", "values_equal",
]

COLLECTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
DECLARED_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_INT64 = (-(2**63), 2**63 - 1)


class ProfileStore(abc.ABC):
    """Where users, identity links and plugins' records live.  See the module
    docstring."""

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

    # -- plugins' records ---------------------------------------------------------

    @abc.abstractmethod
    def records(self, collection: Collection) -> Records:
        """The records of ``collection`` (the contract:
        :class:`gateway.api.Records`).  Checks the declaration at once
        (:func:`check_collection`, ``ValueError``); the table or collection
        and its indexes are made on first use, idempotently and safely when
        several callers (or processes) get there at once.  The store may be
        opened later; until it is, every method raises
        :class:`~gateway.errors.StoreUnavailable`."""


# ---------------------------------------------------------------------------
# Checks shared by every backend (so each one refuses the same things)
# ---------------------------------------------------------------------------


def check_collection(collection: Collection) -> Collection:
    """``collection`` itself if its name and fields are well formed, else ``ValueError``."""
    if not isinstance(collection, Collection):
        raise ValueError(f"expected a Collection, got {type(collection).__name__}")
    if not isinstance(collection.name, str) or not COLLECTION_NAME.match(collection.name):
        raise ValueError(
            f"invalid collection name {collection.name!r}: lowercase letters, digits and '_',"
            " starting with a letter, at most 48 characters")
    for what, names in (("key", (collection.key,)), ("unique", collection.unique),
                        ("indexes", collection.indexes)):
        if not isinstance(names, tuple):
            raise ValueError(f"collection {collection.name}: {what} must be a tuple of field names")
        for name in names:
            if not isinstance(name, str) or not DECLARED_FIELD.match(name):
                raise ValueError(
                    f"collection {collection.name}: invalid {what} field {name!r}: letters, digits"
                    " and '_', starting with a letter, at most 64 characters")
    declared = set(dict.fromkeys((collection.key, *collection.unique, *collection.indexes)))
    if len({name.lower() for name in declared}) != len(declared):
        raise ValueError(f"collection {collection.name}: declared fields must differ in more than case")
    return collection


def _check_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or "." in name or "\0" in name
            or name.startswith(("$", "_"))):
        raise ValueError(f"invalid field name {name!r}: must be a non-empty string without '.'"
                         " or a leading '$' or '_'")
    return name


def _check_value(value: Any, path: str, top: bool) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"field {path}: integer out of 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"field {path}: numbers must be finite")
        return
    if isinstance(value, datetime):
        if not top:
            raise ValueError(f"field {path}: datetimes are only allowed at a record's top level")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"field {path}: datetimes must be timezone-aware")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{path}[{i}]", False)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$") or "\0" in key:
                raise ValueError(f"field {path}: object keys must be strings not starting with '$'")
            _check_value(item, f"{path}.{key}", False)
        return
    raise ValueError(f"field {path}: {type(value).__name__} is not a JSON value or a datetime")


def _plain(value: Any) -> Any:
    """A copy with tuples as lists, mappings as dicts and datetimes in UTC
    (what comes back)."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_record(collection: Collection, record: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of ``record`` for :meth:`Records.insert`, or ``ValueError``."""
    if not isinstance(record, Mapping):
        raise ValueError("a record must be a mapping")
    for name, value in record.items():
        _check_value(value, _check_name(name), True)
    key = record.get(collection.key)
    if not isinstance(key, str):
        raise ValueError(f"collection {collection.name}: the key field {collection.key!r} must hold a string")
    return {name: _plain(value) for name, value in record.items()}


def check_changes(collection: Collection, key: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of ``changes`` for :meth:`Records.update`, or ``ValueError``
    (the key field may only be "changed" to its own value, which is dropped)."""
    if not isinstance(changes, Mapping):
        raise ValueError("changes must be a mapping")
    out: dict[str, Any] = {}
    for name, value in changes.items():
        _check_value(value, _check_name(name), True)
        if name == collection.key:
            if value != key:
                raise ValueError(f"collection {collection.name}: the key field {name!r} cannot change")
            continue
        out[name] = _plain(value)
    return out


def check_value(name: str, value: Any) -> Any:
    """A plain copy of a value looked up by :meth:`Records.find`, or ``ValueError``."""
    if isinstance(value, Below):
        raise ValueError(f"find {name}: Below only applies to update's where")
    _check_value(value, name, True)
    return _plain(value)


def check_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """``where`` as a dict, or ``ValueError`` (a :class:`Below` bound must be a
    number, string or timezone-aware datetime)."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise ValueError("where must be a mapping")
    out: dict[str, Any] = {}
    for name, value in where.items():
        _check_name(name)
        if isinstance(value, Below):
            bound = value.value
            if _kind(bound) not in ("number", "str", "datetime"):
                raise ValueError(f"where {name}: Below needs a number, string or datetime")
            _check_value(bound, name, True)
            out[name] = value
        else:
            _check_value(value, name, True)
            out[name] = _plain(value)
    return out


def _kind(value: Any) -> str | None:
    """The comparison family of a value: values of different families never
    compare equal or less."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return None


def values_equal(a: Any, b: Any) -> bool:
    """Equality as the stores mean it: within one family only."""
    if a is None or b is None:
        return a is None and b is None
    return _kind(a) == _kind(b) and bool(a == b)


def record_matches(record: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Whether ``record`` meets ``where`` (checked by :func:`check_where`), as
    :meth:`Records.update` describes it."""
    for name, expected in where.items():
        current = record.get(name)
        if isinstance(expected, Below):
            if current is None:
                continue
            bound = expected.value
            if _kind(current) != _kind(bound) or not current < bound:
                return False
        elif not values_equal(current, expected):
            return False
    return True
