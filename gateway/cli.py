"""The ``gateway`` command: ``serve``, ``check-config``, the operator's
``sessions`` and ``unlock``, and the plugins' subcommands.

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
from gateway.config import Config, LoggingConfig, read_config
from gateway.errors import GatewayError
from gateway import audit, logs
from gateway.logs import install_redaction
from gateway.options import ConfigError
from gateway.plugins import PluginError, build_time_hook, get_plugin_manager, provider_classes

log = logging.getLogger("gateway")


def configure_logging(settings: LoggingConfig) -> None:
    """``[logging]``: the format of the root handlers, and the audit log
    (reopened on SIGUSR1); ``OSError`` when its file cannot be opened."""
    logs.configure(settings)
    audit.configure(settings.audit)


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


def _serve_config(args: argparse.Namespace) -> tuple[Config | None, list[str]]:
    """``serve``'s configuration: the file with the command line's
    overrides, and every problem (the providers' and plugins' included once
    the core tables are sound), as at the start and on each reload."""
    from gateway.demo import DEFAULT_UPSTREAM, follow_upstream

    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        return None, exc.problems
    demo_upstream = args.demo_upstream or (DEFAULT_UPSTREAM if args.demo else None)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None and v != ""}
    if overrides:
        config = config.with_server(**overrides)
    if args.demo and demo_upstream:
        config = follow_upstream(config, demo_upstream)
    if not problems:  # providers and plugins are checked once the core tables are sound
        problems = check(config)
    return config, problems


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.demo import DEFAULT_UPSTREAM, SandboxThread, provider_sandboxes
    from gateway.server import serve

    config, problems = _serve_config(args)
    demo_upstream = args.demo_upstream or (DEFAULT_UPSTREAM if args.demo else None)
    if problems or config is None:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    try:
        configure_logging(config.logging)  # [logging]: the format, the audit log, SIGUSR1
    except OSError as exc:
        log.error("cannot open the audit log %s: %s", config.logging.audit, exc.strerror or exc)
        return 1
    sandboxes = SandboxThread(provider_sandboxes(config) if args.demo else [])
    try:
        sandboxes.start()
    except OSError as exc:
        log.error("cannot serve the demo's sandbox on %s", exc.strerror)
        return 1
    try:
        # SIGHUP reads the file again (with the same overrides) and applies
        # [logging] to the supervisor before the new workers are forked.
        return serve(config, demo_upstream=demo_upstream, reader=lambda: _serve_config(args),
                     reconfigure=lambda new: configure_logging(new.logging))
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

    try:
        configure_logging(config.logging)
    except OSError as exc:
        print(f"error: cannot open the audit log {config.logging.audit}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    async def run() -> int:
        store = open_profile_store(config.profiles)
        try:
            await store.open()
            return await command.run(args, CommandContext(profiles=store, auditor=audit.record))
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.detail:
                log.error("%s", exc.detail)
            return 1
        finally:
            await store.close()

    return asyncio.run(run())


# -- the operator's subcommands: the gateway's stores open, no server ---------------------


def cmd_operator(args: argparse.Namespace) -> int:
    """``gateway sessions list|revoke`` and ``gateway unlock``: the
    operator API's calls (:mod:`gateway.operator`) on a gateway built from
    the configuration and started (its stores open, its providers set up),
    serving nothing; the answer is printed as JSON.  Exit 2 on a bad
    configuration, 1 when a store is unavailable or the call is refused
    (an unknown user, say)."""
    import json

    from gateway.app import Gateway
    from gateway.operator import Operator, audit, parse_identity

    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        config, problems = None, exc.problems
    if problems or config is None:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    try:
        configure_logging(config.logging)  # the audit log among them
    except OSError as exc:
        print(f"error: cannot open the audit log {config.logging.audit}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    async def run() -> int:
        try:
            gw = Gateway(config)
        except (ConfigError, PluginError) as exc:
            for problem in getattr(exc, "problems", [str(exc)]):
                print(f"config error: {problem}", file=sys.stderr)
            return 2
        operator = Operator.of(gw)
        event, target = "", {}
        try:
            await gw.start()
            if args.command == "unlock":
                provider, subject = parse_identity(args.identity)
                event, target = "admin.lockouts.unlock", {"provider": provider, "subject": subject}
                answer = await operator.unlock(provider, subject)
            elif args.session:
                event, target = "admin.sessions.revoke", {"session_id": args.session}
                answer = await operator.revoke_session(args.session)
            elif args.action == "list":
                event, target = "admin.sessions.list", {"user_id": args.user}
                answer = await operator.user_sessions(args.user)
            else:
                event, target = "admin.sessions.revoke_user", {"user_id": args.user}
                answer = await operator.revoke_user_sessions(args.user)
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.detail:
                log.error("%s", exc.detail)
            if event:
                audit(event, operator="cli", status=exc.status, **target)
            return 1
        finally:
            await gw.stop()
        audit(event, operator="cli", status=200, **target)
        print(json.dumps(answer, indent=2))
        return 0

    return asyncio.run(run())


def _operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = sub.add_parser("sessions", help="list or end a user's sessions (as the operator API does)")
    sessions.add_argument("action", choices=("list", "revoke"))
    who = sessions.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user id: list their live sessions, or end every one (reason operator)")
    who.add_argument("--session", help="revoke: this one session (reason operator)")
    config_option(sessions)
    sessions.set_defaults(func=_sessions)
    unlock = sub.add_parser("unlock", help="lift a provider's lockouts of a subject (PROVIDER:SUBJECT)")
    unlock.add_argument("identity", metavar="PROVIDER:SUBJECT")
    config_option(unlock)
    unlock.set_defaults(func=cmd_operator)


def _sessions(args: argparse.Namespace) -> int:
    if args.action == "list" and args.session:
        print("error: gateway sessions list takes --user", file=sys.stderr)
        return 2
    return cmd_operator(args)


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
    _operator_commands(sub)
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
            if not isinstance(command, Command) or command.name in ("serve", "check-config", "sessions", "unlock"):
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
