"""Logging: keep secrets out of every log line, ours and Tornado's; the
formats of ``[logging]``.

Tornado logs some malformed requests with the offending header value, which
may hold a session token; an upstream URL may carry a password.  The filter
here rewrites such records before any handler sees them.

``format = "text"`` writes ``<time> <LEVEL> <logger>: <message>`` lines;
``"json"`` one JSON object per line (``time``, ``level``, ``logger``,
``message``, ``exception``; an access line's fields instead of its
message: see :func:`gateway.web.log_request`).  :func:`configure` applies
it to the root handlers of ``gateway serve``.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from gateway.config import LoggingConfig

_PATTERNS = [
    (re.compile(r"gws_[A-Za-z0-9_\-]+"), "gws_[redacted]"),  # session tokens
    (re.compile(r"(\w+://)[^/@\s:]*:[^/@\s]+@"), r"\1[redacted]@"),  # [user]:password@ in URLs
    (re.compile(r"((?:\w*(?:password|passwd|pwd|secret|token|session_key)|(?<![A-Za-z0-9_])(?:js_)?code)=)[^&\s;]+", re.I), r"\1[redacted]"),  # in queries
]

#: Loggers whose records may quote a request: the filter is attached to each
#: (and to each provider's ``gateway.<name>``, when the gateway is built).
LOGGERS = ("gateway", "gateway.app", "gateway.access", "gateway.proxy", "gateway.plugins",
           "gateway.sessions", "tornado.general", "tornado.access", "tornado.application")
_PREFIXES: set[str] = {"gws_"}


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and exception text) without secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._clean(record)
        except Exception:  # a malformed log call is logging's to report, not ours to raise
            pass
        return True

    def _clean(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)


_FILTER = RedactSecrets()


def install_redaction(*handlers: logging.Handler, prefixes: Iterable[str] = (),
                      loggers: Iterable[str] = ()) -> None:
    """Attach the filter to the gateway's and Tornado's loggers, to
    ``loggers`` (the providers') and to the given handlers (for records from
    anywhere else); redact credentials beginning with any of ``prefixes``
    (the providers' ``credential_prefixes``) from now on.  Idempotent."""
    for prefix in prefixes:
        if prefix not in _PREFIXES:
            _PREFIXES.add(prefix)
            _PATTERNS.insert(0, (re.compile(re.escape(prefix) + r"[A-Za-z0-9_\-]+"), prefix + "[redacted]"))
    for name in (*LOGGERS, *loggers):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


#: the ``extra`` key under which an access record carries its fields
ACCESS_FIELDS = "access_fields"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rfc3339(seconds: float) -> str:
    """``2026-01-31T12:00:00.123Z``: RFC 3339, UTC, milliseconds."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{int(seconds * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": rfc3339(record.created), "level": record.levelname, "logger": record.name}
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = redact(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(settings: "LoggingConfig") -> None:
    """Apply ``[logging] format`` to the root logger's handlers (the
    redaction filter stays on each); the audit log is
    :func:`gateway.audit.configure`'s."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT))
    install_redaction(*root.handlers)
    # pymongo's command log (DEBUG) writes documents verbatim: profiles and
    # password hashes; it never reaches the gateway's handlers.
    logging.getLogger("pymongo").setLevel(max(logging.INFO, root.getEffectiveLevel()))
