"""The audit log: who did what to which account, as JSON lines.

``[logging] audit`` names where it goes: ``""`` (off), ``"stdout"`` or a
file path.  Each event is one line, one JSON object with ``time`` (RFC 3339,
UTC), ``event``, ``pid``, ``request_id`` and ``ip`` when the event happens
while a request is served, then the event's own fields.

The log has its own sink, not a handler of the logging tree, so that its
lines never take the level or the format of the other logs.  Every process
(each worker, the supervisor) opens the file itself with ``O_APPEND`` and
writes each line with one ``write``: lines of several processes interleave
whole, never mixed.  :func:`reopen` (on ``SIGUSR1``) opens the path again,
so that after a rotation (the file renamed) new lines go to a new file.

:func:`record` is the one way in: the gateway's handlers call it, plugins
through ``gateway.audit(...)`` (:class:`gateway.api.Services`) or
``ctx.audit(...)`` (:class:`gateway.api.CommandContext`), and an operator
API calls it directly, inside :func:`acting` ``("operator")`` when it ends
sessions, so that their ``session_revoked`` lines say ``"by": "operator"``.
Nothing here raises: an audit line that cannot be written is reported on
the ``gateway`` logger (once per failure streak), the action stands.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from gateway.logs import redact, rfc3339

log = logging.getLogger("gateway")

#: what an event in a request adds to its line (``request_id``, ``ip``)
_request: contextvars.ContextVar[Callable[[], dict[str, Any]] | None] = \
    contextvars.ContextVar("gateway_audit_request", default=None)
#: who acts, when not the caller of the request (``"operator"``, ``"gateway"``)
_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("gateway_audit_actor", default=None)


class AuditSink:
    """Where audit lines go: a file opened with ``O_APPEND``, or stdout."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._fd = -1
        self._reopen_due = False
        self._failing = False
        if target and target != "stdout":
            self._fd = self._open()  # OSError here: the caller reports it before serving

    def _open(self) -> int:
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._reopen_due:
                self._reopen()
            fd = 1 if self.target == "stdout" else self._fd
            try:
                os.write(fd, line)
            except OSError as exc:
                if not self._failing:
                    log.error("the audit log %s cannot be written: %s", self.target, exc.strerror or exc)
                self._failing = True
                return
            self._failing = False

    def request_reopen(self) -> None:
        """Reopen before the next line (safe in a signal handler)."""
        self._reopen_due = True

    def reopen(self) -> None:
        with self._lock:
            self._reopen()

    def _reopen(self) -> None:
        self._reopen_due = False
        if self.target in ("", "stdout"):
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("the audit log %s cannot be reopened: %s; still writing to the one open",
                      self.target, exc.strerror or exc)
            return
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        log.info("audit log %s reopened (pid %d)", self.target, os.getpid())

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1


_sink: AuditSink | None = None


def configure(target: str) -> None:
    """Send audit lines to ``target`` (``""``: nowhere) from now on, in this
    process and in those it forks, and make ``SIGUSR1`` reopen the file
    (until an event loop handles the signal itself: see
    :mod:`gateway.server`).  ``OSError`` when the file cannot be opened."""
    global _sink
    sink = AuditSink(target) if target else None
    old, _sink = _sink, sink
    if old is not None:
        old.close()
    signal.signal(signal.SIGUSR1, reopen_on_signal)


def reopen_on_signal(signum: int, frame: Any) -> None:
    """The ``SIGUSR1`` handler of a process without an event loop on it:
    the file is reopened before its next line."""
    request_reopen()


def enabled() -> bool:
    return _sink is not None


def reopen() -> None:
    """Open the audit file again (after a rotation: ``SIGUSR1``)."""
    if _sink is not None:
        _sink.reopen()


def request_reopen() -> None:
    """:func:`reopen` before the next line; safe in a signal handler."""
    if _sink is not None:
        _sink.request_reopen()


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


def record(event: str, **fields: Any) -> None:
    """Write one audit line: ``event`` and ``fields`` (JSON values; never a
    secret: strings are redacted all the same), with the time, the process
    and, in a request, its ``request_id`` and client ``ip``.  A no-op while
    the audit log is off."""
    sink = _sink
    if sink is None:
        return
    line: dict[str, Any] = {"time": rfc3339(time.time()), "event": event, "pid": os.getpid()}
    request = _request.get()
    if request is not None:
        try:
            line.update(request())
        except Exception:  # the request's details are a courtesy, never a failure
            pass
    line.update((k, _clean(v)) for k, v in fields.items())
    try:
        data = json.dumps(line, ensure_ascii=False, separators=(", ", ": "), default=str)
    except ValueError:
        data = json.dumps({k: line[k] for k in ("time", "event", "pid")})
    sink.write(data.encode("utf-8", "replace") + b"\n")


def bind_request(details: Callable[[], dict[str, Any]]) -> None:
    """In a request's own task: what each event recorded while it is
    served adds to its line (called only when one is recorded)."""
    _request.set(details)


def actor() -> str | None:
    """Who acts, as :func:`acting` set it (``None``: the request's caller)."""
    return _actor.get()


@contextlib.contextmanager
def acting(who: str) -> Iterator[None]:
    """Within this block, sessions ended are ended by ``who``
    (``"operator"``, ``"gateway"``): their ``session_revoked`` lines say so."""
    token = _actor.set(who)
    try:
        yield
    finally:
        _actor.reset(token)
