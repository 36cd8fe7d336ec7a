"""Finding, loading and calling plugins.

Every plugin, built-in or not, is found through the ``gateway.plugins``
entry-point group.  :func:`get_plugin_manager` builds a fresh manager each
time it is called (tests get their own), and :func:`call_hook` calls a hook
with keyword arguments, awaits whatever comes back and names the plugin that
failed.
"""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import entry_points
from typing import Any, Iterable

import pluggy

from gateway import hookspecs
from gateway.errors import GatewayError

ENTRY_POINT_GROUP = "gateway.plugins"
log = logging.getLogger("gateway.plugins")


class PluginError(Exception):
    """A plugin could not be loaded or failed at start-up."""


def get_plugin_manager(
    disabled: Iterable[str] = (), extra_plugins: Iterable[tuple[str, object]] = ()
) -> pluggy.PluginManager:
    """A new plugin manager with every installed plugin not in ``disabled``.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered after
    the entry points (used to add an application's own in-process plugin).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(disabled)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc!r}") from exc
        _register(pm, ep.name, plugin)
    for name, plugin in extra_plugins:
        if name not in disabled:
            _register(pm, name, plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    for hook in pm.hook.__dict__.values():
        for impl in getattr(hook, "get_hookimpls", lambda: [])():
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise PluginError(f"plugin {impl.plugin_name!r}: hook wrappers are not supported ({hook.name})")
    return pm


def _register(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc


def build_time_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> list[tuple[str, list[Any]]]:
    """Call a hook the gateway needs while it (or the command line) is being
    built, so each implementation must answer synchronously, with a list:
    ``(plugin name, its list)`` in calling order.  Every problem is a
    :class:`ConfigError` naming the plugin."""
    from gateway.options import ConfigError

    out = []
    for impl in implementations(pm, name):
        try:
            result: Any = impl.function(**{a: kwargs[a] for a in impl.argnames})
        except Exception as exc:
            raise ConfigError([f"plugin {impl.plugin_name!r}: {name} failed: {exc!r}"]) from exc
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise ConfigError([f"plugin {impl.plugin_name!r}: {name} must answer synchronously"])
        if result is None:
            continue
        if not isinstance(result, (list, tuple)):
            raise ConfigError([f"plugin {impl.plugin_name!r}: {name} must return a list, got {type(result).__name__}"])
        out.append((impl.plugin_name, list(result)))
    return out


def provider_classes(pm: pluggy.PluginManager) -> list[tuple[str, Any]]:
    """``(plugin name, class)`` for every provider class the plugins offer
    through ``gateway_providers``, in calling order (not yet checked)."""
    return [(plugin, cls) for plugin, classes in build_time_hook(pm, "gateway_providers") for cls in classes]


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    return sorted(n for n, _ in pm.list_name_plugin() if n)


async def maybe_await(value: Any) -> Any:
    """Await ``value`` if it is awaitable, else return it."""
    while inspect.isawaitable(value):
        value = await value
    return value


async def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> list[Any]:
    """Call every implementation of hook ``name``, one by one, awaiting each.

    Returns the non-``None`` results in call order.  For a ``firstresult``
    hook, stops at the first non-``None`` result.  A :class:`GatewayError` a
    plugin raises goes through unchanged; any other exception is wrapped in a
    500 ``internal`` error whose log message names the plugin.
    """
    caller = getattr(pm.hook, name)
    first = bool(caller.spec and caller.spec.opts.get("firstresult"))
    results: list[Any] = []
    for impl in implementations(pm, name):
        try:
            value = await maybe_await(impl.function(**{a: kwargs[a] for a in impl.argnames}))
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failure(impl.plugin_name, name, exc) from exc
        if value is not None:
            results.append(value)
            if first:
                break
    return results


async def notify_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> None:
    """Call every implementation of a notification hook; one that fails is
    logged with its plugin's name and the others still run."""
    for impl in implementations(pm, name):
        try:
            await maybe_await(impl.function(**{a: kwargs[a] for a in impl.argnames}))
        except Exception as exc:
            log.error("plugin %r failed in %s: %r", impl.plugin_name, name, exc, exc_info=exc)


def implementations(pm: pluggy.PluginManager, name: str) -> list[Any]:
    """A hook's implementations in pluggy's calling order (tryfirst first,
    then the last registered first).  Wrappers are not supported and are
    refused at registration."""
    return list(reversed(getattr(pm.hook, name).get_hookimpls()))


def plugin_failure(plugin: str, hook: str, exc: BaseException) -> GatewayError:
    log.error("plugin %r failed in %s: %r", plugin, hook, exc, exc_info=exc)
    return GatewayError(
        "internal",
        "an internal error occurred",
        log_message=f"plugin {plugin!r} failed in {hook}",
    )
