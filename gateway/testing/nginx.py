"""A real ``nginx`` of one's own, for tests: a configuration file rendered
with real ports and directories, run in the foreground on loopback.

:class:`Nginx` renders a configuration by plain text substitution of
placeholders (``{"__LISTEN__": "127.0.0.1:8123", ...}``), so a test runs
exactly the file a project ships, then starts ``nginx -p <dir> -c <file>
-g 'daemon off; pid ...; error_log ...;'`` and waits until it listens.
Everything it writes (the rendered file, temporary files, logs, the pid
file) stays in its directory.  Usable as a context manager (synchronous or
``async with``); :meth:`stop` ends the process it started, and only that.

:func:`find_nginx` finds the binary on ``PATH`` or in ``/usr/sbin`` (where
Debian puts it, off most users' ``PATH``); :class:`NginxMissing` says how to
install it (a test skips on it, with that reason).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Mapping

__all__ = ["Nginx", "NginxMissing", "find_nginx"]

LOOPBACK = "127.0.0.1"
#: where nginx lives when it is not on PATH
SYSTEM_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class NginxMissing(RuntimeError):
    """No ``nginx`` binary on PATH or in the system directories."""


def find_nginx() -> str:
    """The ``nginx`` binary's path; raises :class:`NginxMissing`."""
    found = shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(SYSTEM_DIRS))
    if found is None:
        raise NginxMissing("nginx is not installed (on Debian or Ubuntu: apt-get install nginx; "
                           "`make test` installs it)")
    return found


class Nginx:
    """One nginx process with ``config`` rendered into ``workdir``.

    ``placeholders`` maps each placeholder of the configuration text to its
    value; every placeholder left in the rendered text (a word of capitals
    between double underscores, such as ``__LISTEN__``) is an error, so a
    test cannot run a half-rendered file.  ``port`` is where it listens (a
    free loopback port by default): give it to the placeholder of the
    ``listen`` directive.  ``log_level`` is its error log's (``info`` by
    default, for a test's diagnosis; ``warn`` for a measurement).
    """

    def __init__(self, workdir: Path, config: str, placeholders: Mapping[str, str], *,
                 port: int | None = None, log_level: str = "info") -> None:
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.port = port if port is not None else _free_port()
        self.text = render(config, placeholders)
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.pid_file = self.workdir / "nginx.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def argv(self) -> list[str]:
        """The command line: this directory as nginx's prefix, the
        rendered file, and the process's own pid file and error log."""
        directives = f"daemon off; pid {self.pid_file}; error_log {self.error_log} {self.log_level};"
        if os.geteuid() == 0:  # the workers would run as nobody, who cannot reach a private temp dir
            directives += " user root;"
        return [find_nginx(), "-p", str(self.workdir), "-c", str(self.conf_path), "-g", directives]

    def start(self, timeout: float = 10.0) -> None:
        """Check the file (``nginx -t``), start nginx and wait until it
        accepts connections; fails with its error log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.text)
        argv = self.argv()
        check = subprocess.run([*argv[:-2], "-t", "-g", argv[-1].replace("daemon off; ", "")],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the configuration: {check.stderr.strip()}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"nginx exited at start: {err.strip()} {self.log_tail()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on port {self.port} within {timeout:g} s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM; killed with its workers after ``timeout``)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()

    def log_tail(self, size: int = 2000) -> str:
        """The end of its error log."""
        try:
            return self.error_log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no error log)"

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Nginx:
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()


def render(config: str, placeholders: Mapping[str, str]) -> str:
    """``config`` with every placeholder replaced; raises ``ValueError``
    for a placeholder that is not in the text, or one left unreplaced."""
    text = config
    for name, value in placeholders.items():
        if name not in text:
            raise ValueError(f"the configuration has no placeholder {name}")
        text = text.replace(name, value)
    left = sorted(set(re.findall(r"__[A-Z][A-Z0-9_]*__", text)))
    if left:
        raise ValueError(f"placeholders left unreplaced: {', '.join(left)}")
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port
