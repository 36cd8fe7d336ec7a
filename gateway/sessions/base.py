"""The session store contract, shared by the Redis and in-memory stores.

A stored session is a JSON-able dict (see :class:`gateway.sessions.manager.Session`)
with at least ``id``, ``user_id``, ``token_hash`` and ``prev_token_hash``.
The store indexes it four ways: by session id, by the SHA-256 of each live
token (never by the token itself), by the SHA-256 of each token ``/refresh``
replaced that the record still lists in ``superseded_hashes`` (so that a
replayed old token can end its session), and by user (for listings, "logout
everywhere" and ``max_per_user``).  Every record and index entry carries a TTL
so expired sessions vanish on their own.

Ended sessions stay recognisable for ``retention`` seconds (the store's
constructor argument, ``sessions.ended_retention``), so that a refused token
can be told why: a *marker* keyed by the SHA-256 of a token holds only a
reason (:data:`ENDED_REASONS`), never the session or anything that could
open it again.  Nobody writes at expiry time, so every token carries a
marker from the start:

- :meth:`SessionStore.create` and :meth:`SessionStore.save` mark the current
  token ``expired``, for the session's TTL plus ``retention`` (the marker
  only speaks once the token no longer opens the session);
- :meth:`SessionStore.rotate` and :meth:`SessionStore.save` mark the
  previous token and those of ``superseded_hashes`` ``superseded``, for the
  same time;
- :meth:`SessionStore.delete` and a ``max_per_user`` eviction mark every
  token of the session (current, previous, superseded) ``revoked``, for
  ``retention``.

With ``retention`` 0 no marker is written.  Markers cost nothing on the hot
path: :meth:`SessionStore.ended` is read only after a lookup failed.

The store keeps sessions only; counters and small shared values are
:mod:`gateway.state`'s.

Every method may raise :class:`gateway.errors.StoreUnavailable`.

Slot tags: every user belongs to one of :data:`SLOT_TAGS` buckets,
:func:`slot_tag` (three hex digits, ``000`` to ``3ff``), and everything of
the user carries it: the session id (``s_<tag>_<random>``), each token
(``gws_<tag>_<secret>``, :mod:`gateway.sessions.manager`) and so each token
hash (``<tag>.<sha256 hex>``).  A store that spreads its data (Redis
Cluster's hash slots) finds a session from its id or a token hash alone
(:func:`session_tag`, :func:`hash_tag`), all of a user's keys in one place;
the in-memory store ignores the tags.  A value without a well-formed tag
(an old token, garbage from a URL) simply finds nothing.
"""

from __future__ import annotations

import abc
import hashlib
import re
from typing import Any

Record = dict[str, Any]

#: What a marker says of a token that opens no session any more.
ENDED_REASONS = ("expired", "revoked", "superseded")
#: Why the gateway itself ends a session (``gateway_session_revoked``'s
#: ``reason``; a provider may pass another word).  Every one marks the
#: tokens ``revoked``.
REVOCATION_REASONS = ("logout", "logout_all", "revoked", "max_per_user", "operator")

#: how many slot tags there are (the buckets users are spread over)
SLOT_TAGS = 1024
#: a slot tag: three lowercase hex digits below 0x400
TAG = r"[0-3][0-9a-f]{2}"
_TOKEN_HASH = re.compile(rf"({TAG})\.[0-9a-f]{{64}}")
_SESSION_ID = re.compile(rf"s_({TAG})_[A-Za-z0-9_\-]{{1,64}}")


def slot_tag(user_id: str) -> str:
    """The slot tag of a user: the first 32 bits of the SHA-256 of the user
    id, modulo :data:`SLOT_TAGS`, as three hex digits."""
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogateescape")).digest()
    return f"{int.from_bytes(digest[:4], 'big') % SLOT_TAGS:03x}"


def all_slot_tags() -> list[str]:
    """Every slot tag, in order."""
    return [f"{n:03x}" for n in range(SLOT_TAGS)]


def new_session_id(tag: str, random: str) -> str:
    """A session id carrying ``tag``: ``s_<tag>_<random>``."""
    return f"s_{tag}_{random}"


def session_tag(session_id: object) -> str | None:
    """The slot tag a session id carries; ``None`` for anything else."""
    if not isinstance(session_id, str):
        return None
    found = _SESSION_ID.fullmatch(session_id)
    return found.group(1) if found else None


def tagged_hash(tag: str, digest: str) -> str:
    """A token hash carrying ``tag``: ``<tag>.<sha256 hex>``."""
    return f"{tag}.{digest}"


def hash_tag(token_hash: object) -> str | None:
    """The slot tag a token hash carries; ``None`` for anything else."""
    if not isinstance(token_hash, str):
        return None
    found = _TOKEN_HASH.fullmatch(token_hash)
    return found.group(1) if found else None


class SessionStore(abc.ABC):
    name: str = ""
    #: True when several processes can share the store.
    shared: bool = False
    #: seconds an ended session's tokens stay recognisable (see the module docstring)
    retention: float = 0.0

    async def open(self) -> None:
        """Connect (may be lazy)."""

    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    async def create(self, record: Record, ttl: float, max_per_user: int) -> list[Record]:
        """Store a new session under its id and ``record["token_hash"]``
        (marked ``expired`` for ``ttl`` + retention).  When ``max_per_user``
        > 0 and the user now has more live sessions, delete the oldest ones
        (marking their tokens ``revoked``) and return them."""

    @abc.abstractmethod
    async def lookup(self, token_hash: str) -> Record | None:
        """The session that a token hash (current or previous) points at."""

    @abc.abstractmethod
    async def lookup_superseded(self, token_hash: str) -> Record | None:
        """The session whose ``superseded_hashes`` lists ``token_hash``: a
        token that ``rotate`` replaced, in its grace period or long after
        (such an entry lives as long as its session).  ``None`` when no live
        session lists it."""

    @abc.abstractmethod
    async def ended(self, token_hash: str) -> str | None:
        """What the marker of ``token_hash`` says (one of
        :data:`ENDED_REASONS`), ``None`` when there is none.  Meaningful
        only for a token that :meth:`lookup` no longer finds a live session
        for: a live session's current token is marked ``expired`` already."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> Record | None:
        """The session with this id."""

    @abc.abstractmethod
    async def save(self, record: Record, ttl: float) -> bool:
        """Overwrite an *existing* session and extend its TTL (and its current
        token's and those of ``record["superseded_hashes"]``), but only if the
        stored record's ``token_hash`` is still ``record["token_hash"]``
        (compare and set), and renew the markers: the current token
        ``expired``, ``record["prev_token_hash"]`` and
        ``record["superseded_hashes"]`` ``superseded``, each for ``ttl`` +
        retention.  Returns False, writing
        nothing, otherwise: a revoked session is never brought back, and a
        touch racing a ``/refresh`` never undoes the rotation."""

    @abc.abstractmethod
    async def rotate(self, record: Record, ttl: float, grace: float) -> bool:
        """Save ``record`` whose ``token_hash`` is new and whose
        ``prev_token_hash`` is the old one: index the new hash, let the old one
        live ``grace`` more seconds, index every hash in
        ``record["superseded_hashes"]`` for :meth:`lookup_superseded` as long
        as the session (forgetting those the stored record listed and this one
        no longer does), and mark the tokens as :meth:`save` does (the old one
        ``superseded``: it speaks once its grace is over).  Only if the stored ``token_hash`` is still
        ``record["prev_token_hash"]``; False (writing nothing) if the session
        is gone or was rotated meanwhile."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> Record | None:
        """Remove a session and its token index entries (superseded ones
        too), marking each of its tokens ``revoked`` for retention; return
        it.  ``None`` (marking nothing) when there is no such live session."""

    @abc.abstractmethod
    async def list_user(self, user_id: str) -> list[Record]:
        """The user's live sessions, oldest first."""

    async def online(self, since: float, limit: int, after: tuple[float, str] | None = None) -> list[tuple[str, float]]:
        """The online index: ``(user id, last seen)`` of at most ``limit``
        users one of whose sessions was created or saved (touched) at
        ``since`` or later, ordered by ``(last seen, user id)`` and strictly
        after ``after``; those seen before ``since`` may be forgotten.  The
        index is kept by :meth:`create` and :meth:`save` themselves (no
        extra write), and a user leaves it when :meth:`delete` removes
        their last live session."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} session store keeps no online index")
