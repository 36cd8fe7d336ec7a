"""Logging: keep secrets out of every log line, ours and Tornado's.

Tornado logs some malformed requests with the offending header value, which
may hold a session token; an upstream URL may carry a password.  The filter
here rewrites such records before any handler sees them.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

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
