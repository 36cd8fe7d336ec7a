"""Logging: keep secrets out of every log line, ours and Tornado's.

Tornado logs some malformed requests with the offending header value, which
may hold a session token; an upstream URL may carry a password.  The filter
here rewrites such records before any handler sees them.
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    (re.compile(r"gws_[A-Za-z0-9_\-]+"), "gws_[redacted]"),  # session tokens
    (re.compile(r"gwk_[A-Za-z0-9_\-]+"), "gwk_[redacted]"),  # API keys
    (re.compile(r"(\w+://)[^/@\s:]*:[^/@\s]+@"), r"\1[redacted]@"),  # [user]:password@ in URLs
    (re.compile(r"((?:\w*(?:password|passwd|pwd|secret|token|session_key)|(?<![A-Za-z0-9_])(?:js_)?code)=)[^&\s;]+", re.I), r"\1[redacted]"),  # in queries
]

#: Loggers whose records may quote a request: the filter is attached to each.
LOGGERS = ("gateway", "gateway.app", "gateway.access", "gateway.proxy", "gateway.plugins",
           "gateway.sessions", "gateway.password", "gateway.wechat", "gateway.apikey", "tornado.general", "tornado.access", "tornado.application")


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


def install_redaction(*handlers: logging.Handler) -> None:
    """Attach the filter to the gateway's and Tornado's loggers (and to the
    given handlers, for records from anywhere else).  Idempotent."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
