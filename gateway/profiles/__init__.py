"""Profile stores: users, profile fields, linked identities and plugins' records."""

from typing import Any

from gateway.profiles.base import (
    Below,
    Collection,
    Identity,
    ProfileStore,
    Records,
    User,
    identity_key,
    new_user_id,
    utcnow,
)

__all__ = [
    "Below", "Collection", "Identity", "ProfileStore", "Records", "User", "identity_key",
    "new_user_id", "open_profile_store", "utcnow",
]


def open_profile_store(settings: Any) -> ProfileStore:
    """Build (not yet open) the store named by the ``[profiles]`` section."""
    kind = settings.store
    if kind == "sqlite":
        from gateway.profiles.legacy import SQLITE_MIGRATIONS
        from gateway.profiles.sqlite import SQLiteProfileStore

        return SQLiteProfileStore(settings.sqlite_path, migrations=SQLITE_MIGRATIONS)
    if kind == "mongodb":
        from gateway.profiles.legacy import MONGODB_MIGRATIONS
        from gateway.profiles.mongodb import MongoProfileStore

        return MongoProfileStore(
            settings.mongodb_url,
            settings.mongodb_database,
            timeout=settings.mongodb_timeout,
            migrations=MONGODB_MIGRATIONS,
        )
    raise ValueError(f"unknown profile store {kind!r}")
