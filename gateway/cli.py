"""The ``gateway`` command: ``serve`` and ``check-config``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
import sys
from typing import Sequence

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
    except (ConfigError, PluginError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Session gateway")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0 = any free port)")
    serve.add_argument("--demo-upstream", metavar="HOST:PORT", help="also serve a demo echo upstream here")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a configuration file; exit 2 listing every problem")
    check.add_argument("--config", required=True, help="TOML configuration file")
    check.set_defaults(func=cmd_check_config)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction(*logging.getLogger().handlers)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
