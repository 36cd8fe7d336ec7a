"""The ``gateway`` command: ``serve``, ``check-config`` and ``apikey``.

Argument parsing and configuration checks; serving itself (sockets,
workers, the event loop, signals, the graceful stop) is :mod:`gateway.server`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from datetime import datetime
from typing import Any, Awaitable, Callable, Sequence

from gateway.errors import GatewayError
from gateway.config import ConfigError, load_config, read_config
from gateway.logs import install_redaction
from gateway.plugins import PluginError

log = logging.getLogger("gateway")


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.server import event_loop_problems

    problems: list[str] = []
    gw = None
    try:
        config, problems = read_config(args.config)
        problems = problems + event_loop_problems(config)
        gw = Gateway(config)
        gw.make_app()  # plugin routes too
    except ConfigError as exc:
        problems = problems + exc.problems
    except PluginError as exc:
        problems = problems + [str(exc)]
    except Exception as exc:  # a plugin's own bug, say
        problems = problems + [f"the gateway cannot be built: {exc!r}"]
    if problems or gw is None:
        print(f"{args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK (providers: {', '.join(gw.providers) or 'none'}; "
          f"sessions: {config.sessions.store}; profiles: {config.profiles.store}; routes: {len(config.routes)})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.server import event_loop_problems, serve

    try:
        config = load_config(args.config)
        if args.host:
            config.server.values["host"] = args.host
        if args.port is not None:
            config.server.values["port"] = args.port
        problems = event_loop_problems(config)
        if problems:
            raise ConfigError(problems)
        Gateway(config).make_app()  # validate providers and plugin routes before binding or forking
    except Exception as exc:  # a plugin's own bug while the gateway is built, too
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)] if isinstance(exc, PluginError) \
            else [f"the gateway cannot be built: {exc!r}"]
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    return serve(config, demo_upstream=args.demo_upstream)


# -- gateway apikey create|list|revoke: the profile store only, no server ------------------


def _expires(value: str) -> float:
    """``--expires``: a positive duration (argparse exits 2 on ValueError)."""
    from gateway.config import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be longer than zero")
    return seconds


def _when(value: datetime | None, never: str = "-") -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else never


def _with_profiles(args: argparse.Namespace, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work(store)`` with the configured profile store open: exit 2 on a
    bad configuration, 1 when the store is unavailable."""
    from gateway.profiles import open_profile_store

    try:
        config, problems = read_config(args.config)
    except ConfigError as exc:
        problems = exc.problems
    # Only the profile store is opened: the rest (a Redis URL or a sealing
    # key from the environment, say) need not be set to manage keys.
    problems = [p for p in problems if p.startswith("profiles")]
    if problems:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2

    async def run() -> int:
        store = open_profile_store(config.profiles)
        try:
            await store.open()
            return await work(store)
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.detail:
                log.error("%s", exc.detail)
            return 1
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from gateway_plugins.apikey import new_api_key

    scopes = [s.strip() for s in (args.scopes or "").split(",") if s.strip()]
    try:
        key, record = new_api_key(args.user, args.name, scopes, args.expires)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def work(store: Any) -> int:
        if await store.get_user(args.user) is None:
            print(f"error: no user with id {args.user!r}", file=sys.stderr)
            return 1
        try:
            await store.create_api_key(record)
        except KeyError:  # the user went away meanwhile
            print(f"error: no user with id {args.user!r}", file=sys.stderr)
            return 1
        print(f"key:     {key}")
        print("         (shown only this once: store it now; the gateway keeps only its hash)")
        print(f"id:      {record.id}")
        print(f"user:    {record.user_id}")
        print(f"name:    {record.name}")
        print(f"scopes:  {' '.join(record.scopes) or '-'}")
        print(f"expires: {_when(record.expires_at, 'never')}")
        return 0

    return _with_profiles(args, work)


def cmd_apikey_list(args: argparse.Namespace) -> int:
    async def work(store: Any) -> int:
        if await store.get_user(args.user) is None:
            print(f"error: no user with id {args.user!r}", file=sys.stderr)
            return 1
        rows = [("ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "REVOKED", "LAST USED")]
        for k in await store.list_api_keys(args.user):
            rows.append((k.id, k.name, ",".join(k.scopes) or "-", _when(k.created_at),
                         _when(k.expires_at, "never"), _when(k.revoked_at), _when(k.last_used_at)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return 0

    return _with_profiles(args, work)


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from gateway_plugins.apikey import parse_key

    key_id = args.id
    if key_id.startswith("gwk_"):  # a whole key pasted: use its id, never echo it
        parsed = parse_key(key_id)
        if parsed is None:
            print("error: that is not a well-formed API key or key id", file=sys.stderr)
            return 2
        key_id = parsed[0]

    async def work(store: Any) -> int:
        from gateway.profiles.base import utcnow

        record = await store.revoke_api_key(key_id, utcnow())
        if record is None:
            shown = repr(key_id) if len(key_id) <= 64 and key_id.isprintable() else "given"
            print(f"error: no API key with id {shown}", file=sys.stderr)
            return 1
        print(f"revoked: {record.id} ({record.name}) at {_when(record.revoked_at)}")
        return 0

    return _with_profiles(args, work)


def config_option(parser: argparse.ArgumentParser) -> None:
    """``--config PATH``, which ``GATEWAY_CONFIG`` may stand in for."""
    default = os.environ.get("GATEWAY_CONFIG") or None
    parser.add_argument("--config", default=default, required=default is None,
                        help="TOML configuration file (default: $GATEWAY_CONFIG)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Session gateway")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    config_option(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0 = any free port)")
    serve.add_argument("--demo-upstream", metavar="HOST:PORT", help="also serve a demo echo upstream here")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a configuration file; exit 2 listing every problem")
    config_option(check)
    check.set_defaults(func=cmd_check_config)
    apikey = sub.add_parser("apikey", help="create, list and revoke API keys (uses the profile store only)")
    keys = apikey.add_subparsers(dest="apikey_command", required=True)
    create = keys.add_parser("create", help="make a key for a user and print it (once)")
    config_option(create)
    create.add_argument("--user", required=True, help="the owner's user id (u_...)")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--scopes", default="", help="comma-separated scopes, e.g. orders:read,orders:write")
    create.add_argument("--expires", type=_expires, help="lifetime, e.g. 90d (default: never expires)")
    create.set_defaults(func=cmd_apikey_create)
    listing = keys.add_parser("list", help="list a user's keys (never their secrets)")
    config_option(listing)
    listing.add_argument("--user", required=True, help="the owner's user id (u_...)")
    listing.set_defaults(func=cmd_apikey_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id (takes effect within providers.apikey.cache_ttl)")
    config_option(revoke)
    revoke.add_argument("id", help="the key id (the 16 hex digits after gwk_)")
    revoke.set_defaults(func=cmd_apikey_revoke)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction(*logging.getLogger().handlers)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
