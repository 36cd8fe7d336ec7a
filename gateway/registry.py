"""The providers the plugins offer: found, checked, and (by the gateway) built.

:func:`check_providers` validates every offered provider class and its
``[providers.<name>]`` table without building anything, so that ``gateway
check-config`` and ``gateway serve`` report every problem before a gateway
exists; :class:`Offered` is what passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from gateway.api import ConfigContext, Provider, Services
from gateway.config import Config
from gateway.options import ConfigError, Section, validate_table
from gateway.plugins import ENTRY_POINT_GROUP, provider_classes

PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")
#: Path segments of the gateway's own endpoints under auth_prefix.
RESERVED_NAMES = frozenset({"refresh", "logout", "logout-all", "session", "sessions", "consent", "profile"})
#: The prefix of the gateway's own session tokens.
SESSION_TOKEN_PREFIX = "gws_"
_CREDENTIAL_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{2,31}$")


@dataclass(frozen=True)
class Offered:
    """A provider class that passed its checks, with its validated settings."""

    plugin: str
    cls: type[Provider]
    settings: Section


def config_context(config: Config) -> ConfigContext:
    return ConfigContext(environ=dict(config.environ), shared_sessions=config.sessions.store != "memory",
                         sealing_key=bool(config.sessions.encryption_key))


def check_providers(config: Config, pm: pluggy.PluginManager) -> tuple[list[Offered], list[str]]:
    """Every offered provider checked against the configuration: what
    passed, and every problem (each naming its key or plugin)."""
    problems: list[str] = []
    offered: list[Offered] = []
    names: set[str] = set()  # names some plugin provides, usable or not
    collections: dict[str, str] = {}
    context = config_context(config)
    try:
        classes = provider_classes(pm)
    except ConfigError as exc:
        return [], exc.problems
    for plugin, cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Provider)):
            problems.append(f"plugin {plugin!r}: gateway_providers must return Provider subclasses, got {cls!r}")
            continue
        if not PROVIDER_NAME.match(cls.name or ""):
            problems.append(f"plugin {plugin!r}: provider name {cls.name!r} is not a lowercase identifier")
            continue
        if cls.name in RESERVED_NAMES:
            problems.append(f"plugin {plugin!r}: provider name {cls.name!r} is one of the gateway's own endpoints")
            continue
        if cls.name in names:
            problems.append(f"providers.{cls.name}: two plugins provide {cls.name!r}")
            continue
        names.add(cls.name)
        before = len(problems)
        for prefix in cls.credential_prefixes:
            if not _CREDENTIAL_PREFIX.match(prefix) or prefix.startswith(SESSION_TOKEN_PREFIX):
                problems.append(f"plugin {plugin!r}: provider {cls.name!r} declares credential prefix {prefix!r}: "
                                "expected 3 to 32 letters, digits, '.', '_' or '-', not the session token's")
        for collection in cls.collections:
            owner = collections.setdefault(collection.name, cls.name)
            if owner != cls.name:
                problems.append(f"plugin {plugin!r}: provider {cls.name!r} declares collection {collection.name!r}, "
                                f"which provider {owner!r} declares too")
        settings = validate_table(f"providers.{cls.name}", cls.options, config.providers.get(cls.name, {}),
                                  problems, dict(config.environ))
        # Every check runs, on defaults where a value was refused, so that
        # check-config lists every problem at once.
        settings = _nested_tables(cls, settings, problems, dict(config.environ))
        try:
            problems.extend(cls.check_config(settings, context))
        except Exception as exc:
            if len(problems) == before:  # else the problems found already explain it
                problems.append(f"providers.{cls.name}: the provider from plugin {plugin!r} failed to check "
                                f"its configuration: {exc!r}")
        if len(problems) == before:
            offered.append(Offered(plugin, cls, settings))
    for name in config.providers:
        if name not in names:
            problems.append(f"providers.{name}: no installed plugin provides {name!r}")
    known = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | {n for n, _ in pm.list_name_plugin()}
    for name in config.plugins.disabled:
        if name not in known:
            problems.append(f"plugins.disabled: no installed plugin is named {name!r}")
    return offered, problems


def _nested_tables(cls: type[Provider], settings: Section, problems: list[str],
                   environ: dict[str, str]) -> Section:
    """Check the tables an option holds (``option_tables = {"apps.<name>":
    [...]}``: each ``[providers.<p>.apps.<name>]`` against those options)
    and put their validated sections in its place."""
    values = settings.as_dict()
    for key, options in cls.option_tables.items():
        option, _, _ = key.partition(".")
        tables = values.get(option)
        if not isinstance(tables, dict):
            continue
        values[option] = {name: validate_table(f"providers.{cls.name}.{option}.{name}", options, table,
                                               problems, environ)
                          for name, table in tables.items()}
    return Section(values, secret=[o.name for o in cls.options if o.secret])


def build_provider(offered: Offered, gateway: Services) -> Provider:
    """An instance of an offered provider; :class:`ConfigError` naming it
    when its constructor fails."""
    try:
        return offered.cls(gateway, offered.settings)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError([f"providers.{offered.cls.name}: the provider from plugin {offered.plugin!r} "
                           f"failed to start: {exc!r}"]) from exc
