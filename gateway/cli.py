"""The ``gateway`` command: ``serve``, ``check-config`` and the plugins' subcommands.

Argument parsing and configuration checks; serving itself (sockets,
workers, the event loop, signals, the graceful stop) is :mod:`gateway.server`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Sequence

import pluggy

from gateway.api import Command, CommandContext, add_config_option
from gateway.config import Config, read_config
from gateway.errors import GatewayError
from gateway.logs import install_redaction
from gateway.options import ConfigError
from gateway.plugins import PluginError, build_time_hook, get_plugin_manager, provider_classes

log = logging.getLogger("gateway")


def check(config: Config, pm: pluggy.PluginManager | None = None) -> list[str]:
    """Every problem of a configuration, the plugins' included, found
    without building a gateway (no store is opened, nothing is bound)."""
    from gateway.registry import check_providers
    from gateway.server import event_loop_problems

    problems = event_loop_problems(config)
    try:
        if pm is None:
            pm = get_plugin_manager(config.plugins.disabled)
        problems += check_providers(config, pm)[1]
    except PluginError as exc:
        problems.append(str(exc))
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        problems, config = exc.problems, None
    names: list[str] = []
    if config is not None:
        problems = problems + check(config)
        if not problems:
            names, problems = _build(config)
    if problems or config is None:
        print(f"{args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK (providers: {', '.join(names) or 'none'}; "
          f"sessions: {config.sessions.store}; profiles: {config.profiles.store}; routes: {len(config.routes)})")
    return 0


def _build(config: Config) -> tuple[list[str], list[str]]:
    """Build the gateway and its application once, opening no store and
    binding nothing, so that what only a built gateway shows (the enabled
    providers, the routes plugins contribute) is checked too: ``(enabled
    providers, problems)``."""
    from gateway.app import Gateway
    from gateway.web import make_app

    try:
        gateway = Gateway(config)
        make_app(gateway)
    except ConfigError as exc:
        return [], exc.problems
    except PluginError as exc:
        return [], [str(exc)]
    except Exception as exc:  # a plugin's own bug, say
        return [], [f"the gateway cannot be built: {exc!r}"]
    return list(gateway.providers), []


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.demo import DEFAULT_UPSTREAM, SandboxThread, follow_upstream, provider_sandboxes
    from gateway.server import serve

    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        config, problems = None, exc.problems
    demo_upstream = args.demo_upstream or (DEFAULT_UPSTREAM if args.demo else None)
    if config is not None:
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None and v != ""}
        if overrides:
            config = config.with_server(**overrides)
        if args.demo and demo_upstream:
            config = follow_upstream(config, demo_upstream)
        if not problems:  # providers and plugins are checked once the core tables are sound
            problems = check(config)
    if problems or config is None:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    sandboxes = SandboxThread(provider_sandboxes(config) if args.demo else [])
    try:
        sandboxes.start()
    except OSError as exc:
        log.error("cannot serve the demo's sandbox on %s", exc.strerror)
        return 1
    try:
        return serve(config, demo_upstream=demo_upstream)
    finally:
        sandboxes.stop()


# -- plugins' subcommands: the profile store only, no server ----------------------------


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Run a plugin's subcommand with the configured profile store open:
    exit 2 on a bad ``[profiles]`` configuration, 1 when the store is
    unavailable or the command raises a :class:`GatewayError`."""
    from gateway.profiles import open_profile_store

    if not getattr(args, "config", None):
        print(f"config error: gateway {command.name} takes no --config (its configure must call "
              "gateway.api.add_config_option)", file=sys.stderr)
        return 2
    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc.problems[0]}", file=sys.stderr)
        return 2
    # Only the profile store is opened: the rest (a Redis URL or a sealing
    # key from the environment, say) need not be set to run a command.
    problems = [p for p in problems if p.startswith("profiles")]
    if problems:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2

    async def run() -> int:
        store = open_profile_store(config.profiles)
        try:
            await store.open()
            return await command.run(args, CommandContext(profiles=store))
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.detail:
                log.error("%s", exc.detail)
            return 1
        finally:
            await store.close()

    return asyncio.run(run())


def config_option(parser: argparse.ArgumentParser) -> None:
    """``--config PATH``, which ``GATEWAY_CONFIG`` may stand in for."""
    add_config_option(parser)


def _global_options(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--log-level`` and ``--config``, wherever they are on the command
    line (before the subcommand or after it), and the rest of it, with
    ``--config`` moved to its end, where the subcommand's parser reads it."""
    early = argparse.ArgumentParser(prog="gateway", add_help=False, allow_abbrev=False)
    early.add_argument("--log-level", type=_log_level, default=None)
    early.add_argument("--config", default=None)
    known, rest = early.parse_known_args(argv)
    if known.config is not None:
        end = rest.index("--") if "--" in rest else len(rest)
        rest[end:end] = ["--config", known.config]
    return known, rest


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(f"{value!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _plugin_manager(config_path: str | None) -> pluggy.PluginManager | None:
    """The plugins the configuration named on the command line (or in
    ``GATEWAY_CONFIG``) leaves enabled; ``None`` when they cannot load."""
    config_path = config_path or os.environ.get("GATEWAY_CONFIG") or None
    disabled: list[str] = []
    if config_path:
        try:
            disabled = list(read_config(config_path)[0].plugins.disabled)
        except ConfigError:
            pass
    try:
        return get_plugin_manager(disabled)
    except PluginError as exc:  # serve and check-config report it in full
        print(f"warning: plugin commands are unavailable: {exc}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    known, argv = _global_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gateway", description="Session gateway")
    parser.add_argument("--log-level", type=_log_level, default="INFO",
                        help="DEBUG, INFO, WARNING, ERROR (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    config_option(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0 = any free port)")
    serve.add_argument("--demo", action="store_true",
                       help="serve the demo beside the gateway: the echo upstream (at --demo-upstream, default "
                            "127.0.0.1:9000, where the routes pointing at 127.0.0.1:9000 follow it) and the "
                            "sandbox of each configured provider that has one")
    serve.add_argument("--demo-upstream", metavar="HOST:PORT", help="also serve a demo echo upstream here")
    serve.set_defaults(func=cmd_serve)
    check_parser = sub.add_parser("check-config", help="validate a configuration file; exit 2 listing every problem")
    config_option(check_parser)
    check_parser.set_defaults(func=cmd_check_config)
    pm = _plugin_manager(known.config)
    prefixes: list[str] = []
    if pm is not None:
        try:
            prefixes = [p for _, cls in provider_classes(pm) for p in getattr(cls, "credential_prefixes", ())]
            commands = [c for _, listed in build_time_hook(pm, "gateway_commands") for c in listed]
        except ConfigError as exc:
            commands = []
            for problem in exc.problems:
                print(f"warning: plugin commands are unavailable: {problem}", file=sys.stderr)
        for command in commands:
            if not isinstance(command, Command) or command.name in ("serve", "check-config"):
                continue
            command_parser = sub.add_parser(command.name, help=command.help)
            command.configure(command_parser)
            command_parser.set_defaults(func=lambda args, c=command: run_command(c, args))
    args = parser.parse_args(argv)
    args.log_level = known.log_level or args.log_level
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction(*logging.getLogger().handlers, prefixes=prefixes)
    status: int = args.func(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
