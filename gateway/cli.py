"""The ``gateway`` command: ``serve``, ``check-config`` and ``apikey``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
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

    problems: list[str] = []
    gw = None
    try:
        config, problems = read_config(args.config)
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


def supervise(workers: int, *, burst: int = 10, window: float = 60.0) -> None:
    """Fork ``workers`` processes sharing the bound sockets and return in
    each of them.  The parent stays to supervise: it replaces a worker that
    exits, whatever its status (one per second; more than ``burst`` within
    ``window`` seconds means something is wrong, and it stops everything and
    exits 1), and on SIGTERM/SIGINT it stops every worker, waits for them
    and exits 0."""
    children: set[int] = set()
    stopping = False
    signals = {signal.SIGTERM, signal.SIGINT}

    def spawn() -> bool:
        # Signals stay blocked from before the fork until the child has its
        # own handlers and the parent has recorded the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
            if pid == 0:
                for sig in signals:
                    signal.signal(sig, signal.SIG_DFL)
                return True
            children.add(pid)
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for sig in signals:
        signal.signal(sig, stop)
    for _ in range(workers):
        if stopping:
            break
        if spawn():
            return
    restarts: list[float] = []
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < window] + [now]
        if len(restarts) > burst:
            log.error("worker %d exited with %d; %d restarts within %.0fs: stopping", pid, code, burst, window)
            failed = True
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d exited with %d; starting another", pid, code)
        time.sleep(1)
        if not stopping and spawn():
            return
    sys.exit(1 if failed else 0)


def cmd_serve(args: argparse.Namespace) -> int:
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from gateway.app import Gateway

    try:
        config = load_config(args.config)
        if args.host:
            config.server.values["host"] = args.host
        if args.port is not None:
            config.server.values["port"] = args.port
        Gateway(config).make_app()  # validate providers and plugin routes before binding or forking
    except Exception as exc:  # a plugin's own bug while the gateway is built, too
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)] if isinstance(exc, PluginError) \
            else [f"the gateway cannot be built: {exc!r}"]
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    sockets = bind_sockets(config.server.port, config.server.host)
    if config.server.workers > 1:
        supervise(config.server.workers)  # returns only in a worker

    async def run() -> int:
        gw = Gateway(config)
        try:
            await gw.start()
            app = gw.make_app()
        except Exception as exc:
            detail = exc.detail if isinstance(exc, GatewayError) else repr(exc)
            log.error("start-up failed: %s", detail, exc_info=not isinstance(exc, GatewayError))
            await gw.stop()
            return 1
        server = HTTPServer(app, max_body_size=config.server.max_body_size + 1,
                            idle_connection_timeout=config.server.idle_connection_timeout,
                            body_timeout=config.server.body_timeout)
        server.add_sockets(sockets)
        demo = None
        if args.demo_upstream:
            from gateway.demo import make_demo_app

            host, _, port = args.demo_upstream.rpartition(":")
            demo = HTTPServer(make_demo_app())
            demo.listen(int(port), host or "127.0.0.1")
            log.info("demo upstream on http://%s", args.demo_upstream)
        port = sockets[0].getsockname()[1]
        log.info("listening on http://%s:%d", config.server.host, port)
        print(f"gateway listening on http://{config.server.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: no new connections; %d request(s) in flight", gw.requests_in_flight)
        server.stop()
        deadline = loop.time() + config.server.shutdown_timeout
        while gw.requests_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if demo is not None:
            demo.stop()
        await server.close_all_connections()
        await gw.stop()
        return 0

    return asyncio.run(run())


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
