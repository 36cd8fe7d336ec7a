"""The configuration reference (``docs/configuration.md``), generated.

:func:`render` builds it from the declarations alone: the core tables from
:func:`gateway.config.describe_options`, then one table per provider that
the installed plugins offer, sorted by name, with a table for each entry of
a provider class's ``option_tables``.  Nothing here names a provider: the
reference lists whatever is installed.  ``python -m gateway.reference``
prints it; ``make docs`` writes it, and a test checks the file against it.
"""

from __future__ import annotations

from typing import Any

from gateway.config import describe_options, reference_table
from gateway.plugins import get_plugin_manager, provider_classes

INTRO = """\
# Configuration reference

<!-- Generated from the declared options by `make docs` (`python -m gateway.reference`); do not edit. -->

The configuration is one TOML file (`conf/gateway.toml` is a working
minimal example; every key below has the default shown). Durations take
seconds (integer or fractional) or strings such as `"500ms"`, `"90s"`,
`"30m"`, `"12h"`, `"7d"` (at most ten years); sizes take bytes or strings
with `B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB` (`"10MiB"`). Any secret
option `key` may be given as `key_env = "VAR"` to read it from the
environment.

Unknown keys, unknown tables and wrong types are start-up errors naming the
key; `gateway check-config` lists them all. So are combinations that cannot
work: `touch_interval` not shorter than `idle_timeout` (or than
`remember_idle_timeout`, unless `remember = "never"`),
`cookie_samesite = "None"` without `cookie_secure`, the memory store with
several workers, two routes with one prefix or a route under `auth_prefix`,
a `[providers.<name>]` table no plugin provides, a name in
`plugins.disabled` that is not installed, a `__Host-` cookie name with
`cookie_domain` or without `cookie_secure`, a `__Secure-` one without
`cookie_secure`, and whatever a provider's own checks refuse in its table.
Provider names are lowercase (`[a-z0-9][a-z0-9_-]*`) and cannot be
`refresh`, `logout`, `logout-all`, `session` or `sessions`.

The `[providers.<name>]` tables are those of the providers installed when
this file was generated.
"""


def _summary(cls: Any) -> str:
    """The first line of the class's own docstring (not an inherited one)."""
    doc = cls.__dict__.get("__doc__") or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines and lines[0] else ""


def _section(title: str, table: str, summary: str = "") -> str:
    # "<name>" would otherwise be read as an HTML tag and vanish from the heading
    head = "### " + title.replace("<", "\\<") + "\n\n"
    return head + (f"{summary}\n\n" if summary else "") + table + "\n"


def render() -> str:
    """The whole reference, as Markdown."""
    parts = [INTRO, "## Core\n"]
    parts += [_section(title, table) for title, table in describe_options().items()]
    providers = sorted(
        ((getattr(cls, "name", "") or plugin, cls) for plugin, cls in provider_classes(get_plugin_manager())),
        key=lambda pair: pair[0],
    )
    parts.append("## Providers\n")
    if not providers:
        parts.append("No provider is installed.\n")
    for name, cls in providers:
        parts.append(_section(f"[providers.{name}]", reference_table(cls.options), _summary(cls)))
        for sub, options in (getattr(cls, "option_tables", None) or {}).items():
            parts.append(_section(f"[providers.{name}.{sub}]", reference_table(options)))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
