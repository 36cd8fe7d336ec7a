"""Preferences: the profile fields users set themselves, and the profile
fields sent upstream as request headers.

``[profiles] editable`` names the fields ``PATCH {auth_prefix}/profile``
may set, each declared with a type and limits (``[profiles.fields.<name>]``,
or the built-in declarations of ``nickname`` and ``language``).  A
``language`` field holds a well-formed BCP 47 tag (RFC 5646 section 2.1,
checked by :data:`LANGUAGE_TAG`), stored in the conventional letter case
(``en-GB``, ``zh-Hans-CN``).

``[profiles] upstream_headers`` maps request headers to profile fields.
Their values are read from the profile store at most once per
``upstream_headers_ttl`` per user in each process (a small bounded cache;
a ``PATCH`` refreshes its own process's entry at once), so a proxied
request costs no store read in the common case and a change reaches every
process within the TTL.  A copy in the session record was the other
choice; the cache also serves callers without a session (API keys) and
never races the session's own writes.  When the store cannot be reached
the last values known are sent, or none: preferences are not security.

Nothing here knows HTTP.
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
from collections import OrderedDict
from typing import Any, Mapping
from urllib.parse import quote

from gateway.api import Profiles, User
from gateway.config import ProfileFieldConfig, ProfilesConfig
from gateway.errors import StoreUnavailable, invalid_request

__all__ = ["LANGUAGE_TAG", "LANGUAGE_TAG_PATTERN", "Preferences", "check_value", "describe", "field_schema",
           "header_value", "is_language_tag", "normalise_language_tag"]

log = logging.getLogger("gateway.app")

_ALPHA, _DIGIT, _ALNUM = "[A-Za-z]", "[0-9]", "[A-Za-z0-9]"
_LANGTAG = (
    f"(?:{_ALPHA}{{2,3}}(?:-{_ALPHA}{{3}}){{0,3}}|{_ALPHA}{{4}}|{_ALPHA}{{5,8}})"  # language (and extlang)
    f"(?:-{_ALPHA}{{4}})?"  # script
    f"(?:-(?:{_ALPHA}{{2}}|{_DIGIT}{{3}}))?"  # region
    f"(?:-(?:{_ALNUM}{{5,8}}|{_DIGIT}{_ALNUM}{{3}}))*"  # variants
    f"(?:-[0-9A-WYZa-wyz](?:-{_ALNUM}{{2,8}})+)*"  # extensions: a singleton other than x
    f"(?:-[Xx](?:-{_ALNUM}{{1,8}})+)?"  # private use
)
_GRANDFATHERED = (
    "en-GB-oed", "i-ami", "i-bnn", "i-default", "i-enochian", "i-hak", "i-klingon", "i-lux", "i-mingo",
    "i-navajo", "i-pwn", "i-tao", "i-tay", "i-tsu", "sgn-BE-FR", "sgn-BE-NL", "sgn-CH-DE",
    "art-lojban", "cel-gaulish", "no-bok", "no-nyn", "zh-guoyu", "zh-hakka", "zh-min", "zh-min-nan", "zh-xiang",
)


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


#: RFC 5646 section 2.1, the well-formed ``Language-Tag``: a langtag, a
#: private-use tag or a grandfathered one, letter case ignored; one regular
#: expression that Python and JSON Schema (ECMA-262) read alike
LANGUAGE_TAG_PATTERN = (f"^(?:{_LANGTAG}|[Xx](?:-{_ALNUM}{{1,8}})+|"
                        + "|".join(_any_case(tag) for tag in _GRANDFATHERED) + ")$")
LANGUAGE_TAG = re.compile(LANGUAGE_TAG_PATTERN, re.ASCII)
#: text without control characters (C0, DEL, C1), for JSON Schema
_NO_CONTROLS = r"^[^\u0000-\u001f\u007f-\u009f]*$"

_INT64 = (-(2**63), 2**63 - 1)


def is_language_tag(text: str) -> bool:
    """Is ``text`` a well-formed BCP 47 language tag?"""
    return LANGUAGE_TAG.fullmatch(text) is not None


def normalise_language_tag(tag: str) -> str:
    """A well-formed tag in the case RFC 5646 section 2.1.1 recommends:
    two-letter subtags (regions) upper case, four-letter ones (scripts)
    title case, the rest lower case; everything after a singleton lower case."""
    parts = tag.split("-")
    out = [parts[0].lower()]
    after_singleton = len(parts[0]) == 1
    for part in parts[1:]:
        if after_singleton or len(part) == 1:
            after_singleton = True
            out.append(part.lower())
        elif len(part) == 2:
            out.append(part.upper())
        elif len(part) == 4:
            out.append(part.capitalize())
        else:
            out.append(part.lower())
    return "-".join(out)


def check_value(name: str, rule: ProfileFieldConfig, value: Any) -> Any:
    """``value`` for field ``name`` as stored, or 400 ``invalid_request``
    naming the field."""
    kind = rule.type
    if kind in ("string", "language"):
        if not isinstance(value, str):
            raise invalid_request(f"field {name} must be a string")
        if len(value) > rule.longest:
            raise invalid_request(f"field {name} is longer than {rule.longest} characters")
        if kind == "language":
            if not is_language_tag(value):
                raise invalid_request(f"field {name} must be a BCP 47 language tag, such as \"en-GB\" or \"zh-Hans-CN\"")
            return normalise_language_tag(value)
        if len(value) < rule.shortest:
            raise invalid_request(f"field {name} is shorter than {rule.shortest} "
                                  f"character{'' if rule.shortest == 1 else 's'} (null removes it)")
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
            raise invalid_request(f"field {name} must not contain control characters")
        if rule.pattern is not None and re.fullmatch(rule.pattern, value) is None:
            raise invalid_request(f"field {name} does not have the expected form")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise invalid_request(f"field {name} must be true or false")
        return value
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has numbers only: 30.0 is 30
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "integer" and not isinstance(value, int)):
        raise invalid_request(f"field {name} must be {'an integer' if kind == 'integer' else 'a number'}")
    if not math.isfinite(value) or not _INT64[0] <= value <= _INT64[1]:
        raise invalid_request(f"field {name} is out of range (numbers lie within ±2**63)")
    if rule.minimum is not None and value < rule.minimum:
        raise invalid_request(f"field {name} must be at least {rule.minimum:g}")
    if rule.maximum is not None and value > rule.maximum:
        raise invalid_request(f"field {name} must be at most {rule.maximum:g}")
    return value


def header_value(value: Any) -> str | None:
    """A profile value as a header value: strings with every character
    outside printable ASCII, and ``%``, percent-encoded as UTF-8 (so a
    space is ``%20``); numbers and booleans as JSON writes them; ``None``
    (no header) for anything else or an empty string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str) and value:
        return "".join(c if "!" <= c <= "~" and c != "%" else quote(c, safe="", errors="replace") for c in value)
    return None


def field_schema(rule: ProfileFieldConfig) -> dict[str, Any]:
    """The JSON Schema of a field's value in a ``PATCH`` body (``null`` removes it)."""
    kind = rule.type
    if kind == "boolean":
        return {"type": ["boolean", "null"]}
    if kind == "language":
        return {"type": ["string", "null"], "maxLength": rule.longest, "pattern": LANGUAGE_TAG_PATTERN,
                "description": "a well-formed BCP 47 language tag (RFC 5646)"}
    if kind == "string":
        schema: dict[str, Any] = {"type": ["string", "null"], "minLength": rule.shortest, "maxLength": rule.longest}
        if rule.pattern is None:
            schema["pattern"] = _NO_CONTROLS
        else:
            schema["allOf"] = [{"pattern": _NO_CONTROLS}, {"pattern": f"^(?:{rule.pattern})$"}]
        return schema
    low = _INT64[0] if rule.minimum is None else max(rule.minimum, _INT64[0])
    high = _INT64[1] if rule.maximum is None else min(rule.maximum, _INT64[1])
    return {"type": [kind, "null"], "minimum": low, "maximum": high}


def describe(rule: ProfileFieldConfig) -> dict[str, Any]:
    """A field's declaration as front ends see it."""
    out: dict[str, Any] = {"type": rule.type}
    if rule.type in ("string", "language"):
        out["max_length"] = rule.longest
    if rule.type == "string":
        out["min_length"] = rule.shortest
        if rule.pattern is not None:
            out["pattern"] = rule.pattern
    for name in ("minimum", "maximum"):
        if getattr(rule, name) is not None:
            out[name] = getattr(rule, name)
    return out


class Preferences:
    """The editable fields of ``[profiles]`` and its ``upstream_headers``."""

    #: users whose header values a process keeps at most
    CACHE_SIZE = 10_000

    def __init__(self, config: ProfilesConfig, profiles: Profiles) -> None:
        self.profiles = profiles
        #: editable field -> its declaration, in the configuration's order
        self.rules: dict[str, ProfileFieldConfig] = {}
        for name in config.editable:
            rule = config.declared(name)
            if rule is not None:  # (a configuration that loaded declares them all)
                self.rules[name] = rule
        self.header_fields: tuple[tuple[str, str], ...] = tuple(config.upstream_headers.items())
        self.ttl = config.upstream_headers_ttl
        self._cache: OrderedDict[str, tuple[float, list[tuple[str, str]]]] = OrderedDict()

    def declarations(self) -> dict[str, dict[str, Any]]:
        """What ``GET {auth_prefix}/profile`` shows of the editable fields."""
        return {name: describe(rule) for name, rule in self.rules.items()}

    def body_schema(self) -> dict[str, Any]:
        """The JSON Schema of a ``PATCH`` body."""
        return {"type": "object", "additionalProperties": False,
                "properties": {name: field_schema(rule) for name, rule in self.rules.items()}}

    def checked_changes(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A ``PATCH`` body as profile changes (``None`` removes a field),
        or 400 naming the first field that is not editable or not valid."""
        changes: dict[str, Any] = {}
        for name, value in body.items():
            rule = self.rules.get(name)
            if rule is None:
                raise invalid_request(f"field {name[:64]!r} cannot be set here "
                                      f"(editable: {', '.join(self.rules) or 'none'})")
            changes[name] = None if value is None else check_value(name, rule, value)
        return changes

    async def update(self, user_id: str, changes: dict[str, Any]) -> User:
        """Apply ``changes``; the updated user (``KeyError``: no such user)."""
        if changes:
            user = await self.profiles.update_profile(user_id, changes)
        else:
            found = await self.profiles.get_user(user_id)
            if found is None:
                raise KeyError(user_id)
            user = found
        self.remember(user.id, user.profile)
        return user

    # -- upstream headers --------------------------------------------------------------

    def _headers_of(self, profile: Mapping[str, Any]) -> list[tuple[str, str]]:
        out = []
        for header, name in self.header_fields:
            value = header_value(profile.get(name))
            if value is not None:
                out.append((header, value))
        return out

    def remember(self, user_id: str, profile: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Cache (for ``upstream_headers_ttl``) the header values of this profile."""
        headers = self._headers_of(profile)
        if self.header_fields and self.ttl > 0:
            self._cache[user_id] = (time.monotonic() + self.ttl, headers)
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return headers

    async def upstream_headers(self, user_id: str) -> list[tuple[str, str]]:
        """The ``upstream_headers`` of this user's request: no store read
        while the process's cached values are younger than the TTL."""
        if not self.header_fields:
            return []
        cached = self._cache.get(user_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            user = await self.profiles.get_user(user_id)
        except StoreUnavailable as exc:
            log.warning("profile store unavailable: upstream_headers of user %s sent %s (%s)", user_id,
                        "as last known" if cached is not None else "without values", exc.detail or exc.message)
            return cached[1] if cached is not None else []
        return self.remember(user_id, user.profile if user is not None else {})
