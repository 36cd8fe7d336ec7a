"""Options and value checkers: what a configuration table is checked against.

This module is the public vocabulary of configuration, for the core and for
plugins alike.  A provider declares its ``[providers.<name>]`` table as a list
of :class:`Option` built from the checkers here; :func:`validate_table` turns
the raw table into a :class:`Section`, which is immutable and read by
attribute only (``settings.cache_ttl``).

A checker is a callable taking the raw value (what TOML gave) and returning
the checked value, or raising :class:`ValueError` with a sentence for people;
the caller prefixes it with the key.  Durations take integer seconds or
``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``; sizes take bytes or ``"10MiB"``.
Lists come back as tuples, so that a checked value cannot change.

It imports the standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import FrozenInstanceError, dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "BOOL", "DURATION", "INT", "MAX_DURATION", "NONNEG_INT", "POSITIVE_DURATION", "SCOPE", "SIZE", "STR",
    "ConfigError", "Network", "Option", "Section", "at_least", "choice", "http_url", "networks", "optional_size",
    "origins", "parse_duration", "parse_size", "pattern", "port", "reference_table", "scopes", "str_list",
    "validate_table",
]

T = TypeVar("T")
N = TypeVar("N", int, float)

#: what :func:`networks` gives a list of
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Value checkers
# ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: dict[str | None, float] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS: dict[str | None, int] = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20,
                                      "GB": 10**9, "GiB": 2**30}

#: Ten years: longer durations are mistakes (and overflow date arithmetic).
MAX_DURATION = 10 * 365 * 86400.0

#: an RFC 6749 scope-token: what route ``scopes`` and API key scopes are made of
SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")


def parse_duration(value: Any) -> float:
    """Seconds from an int/float or a string like ``"30m"``."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        raise ValueError("expected a duration such as 30, \"90s\", \"30m\", \"12h\" or \"7d\"")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("a duration must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot exceed ten years")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``"10MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError("expected a size such as 1048576 or \"10MiB\"")


def _typed(pytype: type[T], label: str) -> Callable[[Any], T]:
    def check(value: Any) -> T:
        if isinstance(value, bool) and pytype is not bool:
            raise ValueError(f"expected {label}")
        if not isinstance(value, pytype):
            raise ValueError(f"expected {label}")
        return value

    return check


def at_least(check: Callable[[Any], N], low: float) -> Callable[[Any], N]:
    """``check``, then refuse a value below ``low``."""

    def bounded(value: Any) -> N:
        checked = check(value)
        if checked < low:
            raise ValueError(f"must be at least {low:g}")
        return checked

    return bounded


def choice(*choices: str) -> Callable[[Any], str]:
    """One of the strings ``choices``."""

    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return check


def pattern(regex: re.Pattern[str], what: str) -> Callable[[Any], str]:
    """A string that ``regex`` matches (``what`` names it in the problem)."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.match(value):
            raise ValueError(f"expected {what}")
        return value

    return check


def http_url(value: Any) -> str:
    """An ``http://`` or ``https://`` URL with a host, without its trailing slashes."""
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def str_list(value: Any) -> tuple[str, ...]:
    """A list of strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def scopes(value: Any) -> tuple[str, ...]:
    """A list of scope-tokens (see :data:`SCOPE`)."""
    out = str_list(value)
    for item in out:
        if not SCOPE.match(item):
            raise ValueError(f"{item!r} is not a scope (printable ASCII, no spaces, quotes or backslashes)")
    return out


def networks(value: Any) -> tuple[Network, ...]:
    """A list of IP addresses or CIDR networks."""
    out: list[Network] = []
    for item in str_list(value):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(out)


def origins(value: Any) -> tuple[str, ...]:
    """A list of web origins (``https://app.example.com``), lowercased."""
    out: list[str] = []
    for item in str_list(value):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"{item!r} is not an origin such as \"https://app.example.com\"")
        out.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(out)


def optional_size(value: Any) -> int | None:
    """A size, or ``None`` (unset)."""
    return None if value is None else parse_size(value)


STR = _typed(str, "a string")
INT = _typed(int, "an integer")
BOOL = _typed(bool, "true or false")
NONNEG_INT = at_least(INT, 0)
DURATION = parse_duration
POSITIVE_DURATION = at_least(parse_duration, 0.001)
SIZE = parse_size


def port(value: Any) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    checked = _typed(int, "an integer port")(value)
    if not 0 <= checked <= 65535:
        raise ValueError("expected a port between 0 and 65535")
    return checked


# ---------------------------------------------------------------------------
# Options, sections and tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One configuration key: its name, how to check it, its default, its help."""

    name: str
    check: Callable[[Any], Any]
    default: Any
    help: str
    secret: bool = False
    required: bool = False


class Section:
    """The validated values of one table: immutable, read as attributes
    (``settings.cache_ttl``); a name that is not one of them raises
    :class:`AttributeError`.  :meth:`as_dict` gives a copy of the values."""

    __slots__ = ("_values", "_secret")

    _values: Mapping[str, Any]
    _secret: frozenset[str]

    def __init__(self, values: Mapping[str, Any] | None = None, *, secret: Iterable[str] = ()) -> None:
        object.__setattr__(self, "_values", MappingProxyType(dict(values or {})))
        object.__setattr__(self, "_secret", frozenset(secret))

    def __getattr__(self, name: str) -> Any:
        if name in Section.__slots__:  # not yet set (while being copied)
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to option {name!r}: a Section is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete option {name!r}: a Section is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_section, (dict(self._values), tuple(self._secret)))

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Section):
            return NotImplemented
        return dict(self._values) == dict(other._values)

    __hash__ = None  # type: ignore[assignment]  # values may be tables

    def __repr__(self) -> str:
        shown = (f"{k}=***" if k in self._secret else f"{k}={v!r}" for k, v in self._values.items())
        return f"Section({', '.join(shown)})"

    def as_dict(self) -> dict[str, Any]:
        """A copy of the values, by option name."""
        return dict(self._values)


def _section(values: dict[str, Any], secret: tuple[str, ...]) -> Section:
    return Section(values, secret=secret)


def validate_table(
    where: str, options: Iterable[Option], table: Any, problems: list[str], environ: Mapping[str, str]
) -> Section:
    """Check ``table`` against ``options``; append problems naming ``where.key``.

    Every option gets a value: a bad one is replaced by the option's default
    (checked), a missing required one by ``None``, so that later checks can
    still run and report their own problems too.  A secret option ``key`` may
    be given as ``key_env = "VAR"``, read from ``environ``; its value never
    appears in a problem.
    """
    options = list(options)
    values: dict[str, Any] = {}
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table")
        table = {}
    known = {o.name for o in options} | {o.name + "_env" for o in options if o.secret}
    for key in table:
        if key not in known:
            problems.append(f"{where}.{key}: unknown key")
    for opt in options:
        key = f"{where}.{opt.name}"
        raw = table.get(opt.name)
        if opt.secret and opt.name + "_env" in table:
            var = table[opt.name + "_env"]
            if opt.name in table:
                problems.append(f"{key}: give either {opt.name} or {opt.name}_env, not both")
                continue
            if not isinstance(var, str):
                problems.append(f"{key}_env: expected the name of an environment variable")
                continue
            if var not in environ:
                problems.append(f"{key}_env: environment variable {var} is not set")
                continue
            raw = environ[var]
        elif opt.name not in table:
            if opt.required:
                problems.append(f"{key}: required")
                continue
            raw = opt.default
            if raw is None:
                values[opt.name] = None
                continue
        try:
            values[opt.name] = opt.check(raw)
        except ValueError as exc:
            shown = "" if opt.secret or repr(raw) in str(exc) else f" (got {raw!r})"
            problems.append(f"{key}: {exc}{shown}")
            values[opt.name] = None if opt.default is None else opt.check(opt.default)
    for opt in options:
        values.setdefault(opt.name, None if opt.default is None else opt.check(opt.default))
    return Section(values, secret=(o.name for o in options if o.secret))


# ---------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if value is None:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def reference_table(options: Iterable[Option]) -> str:
    """A Markdown table of options: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for o in options:
        meaning = o.help + (f" (or `{o.name}_env`)" if o.secret else "")
        default = "(required)" if o.required else "(unset)" if o.default is None else _toml_value(o.default)
        rows.append(f"| `{o.name}` | `{default}` | {meaning} |")
    return "\n".join(rows)
