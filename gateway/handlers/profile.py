"""``{auth_prefix}/profile``: the caller's profile and the fields they may
set themselves (``[profiles] editable``).

``GET`` answers the user and the editable fields' declarations;
``PATCH`` with a JSON object sets fields (``null`` removes one) and answers
the user.  A session is required (CSRF rules as for the other endpoints);
the rules of each field are :mod:`gateway.preferences`'.
"""

from __future__ import annotations

from typing import Mapping

from gateway.api import User
from gateway.errors import not_found
from gateway.handlers.base import BaseHandler
from gateway.openapi import Operation, ref
from gateway.preferences import Preferences


def user_body(user: User) -> dict[str, object]:
    return {"id": user.id, "profile": user.profile}


class ProfileHandler(BaseHandler):
    preferences: Preferences

    @classmethod
    def operations_for(cls, preferences: Preferences) -> Mapping[str, Operation]:
        return {
            "get": Operation("This user and the profile fields they may set", {200: {
                "type": "object", "required": ["user", "editable"],
                "properties": {"user": ref("User"), "editable": {
                    "type": "object", "description": "field -> its declaration (`type`, limits)",
                    "additionalProperties": {"type": "object", "required": ["type"]}}}}}, session=True),
            "patch": Operation("Set (or, with null, remove) editable profile fields", {200: {
                "type": "object", "required": ["user"], "properties": {"user": ref("User")}}}, session=True,
                request_schema=preferences.body_schema(),
                description="A field that is not editable or not valid is 400 naming it; nothing is changed then."),
        }

    async def get(self) -> None:
        principal = await self.require_session()
        user = await self.gateway.profiles.get_user(principal.user_id)
        if user is None:
            raise not_found("no such user")
        self.write_json({"user": user_body(user), "editable": self.preferences.declarations()})

    async def patch(self) -> None:
        principal = await self.require_session()
        preferences = self.preferences
        changes = preferences.checked_changes(self.json_body())
        try:
            user = await preferences.update(principal.user_id, changes)
        except KeyError:
            raise not_found("no such user") from None
        self.write_json({"user": user_body(user)})
