"""Profile stores: users, profile fields and linked identities."""

from typing import Any

from gateway.profiles.base import Identity, ProfileStore, User, identity_key, new_user_id

__all__ = ["Identity", "ProfileStore", "User", "identity_key", "new_user_id", "open_profile_store"]


def open_profile_store(settings: Any) -> ProfileStore:
    """Build (not yet open) the store named by the ``[profiles]`` section."""
    kind = settings["store"]
    if kind == "sqlite":
        from gateway.profiles.sqlite import SQLiteProfileStore

        return SQLiteProfileStore(settings["sqlite_path"])
    if kind == "mongodb":
        from gateway.profiles.mongodb import MongoProfileStore

        return MongoProfileStore(
            settings["mongodb_url"],
            settings["mongodb_database"],
            timeout=settings.get("mongodb_timeout", 1.0),
        )
    raise ValueError(f"unknown profile store {kind!r}")
