"""Typed errors and the one place that turns them into JSON responses.

Providers, stores and handlers raise :class:`GatewayError` (or one of its
named subclasses); the request handler base class renders every error,
expected or not, through :func:`error_body`.  What is logged
(``log_message``) and what the client sees (``message``) are kept apart, so a
secret that reaches a log message never reaches a client and vice versa the
client never sees an internal traceback.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from tornado.web import HTTPError

#: error code -> HTTP status, the complete vocabulary of the HTTP contract.
ERROR_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "invalid_credentials": 401,
    "forbidden": 403,
    "csrf": 403,
    "consent_required": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "locked_out": 429,
    "rate_limited": 429,
    "internal": 500,
    "bad_gateway": 502,
    "unavailable": 503,
    "gateway_timeout": 504,
}

#: HTTP status -> code used when only a status is known (e.g. Tornado's own errors).
STATUS_CODE: dict[int, str] = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


class GatewayError(HTTPError):
    """An error with a contract code, a message for people, and extra headers.

    ``message`` is shown to the client and must never contain a secret.
    ``log_message``, when given, is logged instead and is not shown.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        log_message: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        if code not in ERROR_STATUS and status is None:
            raise ValueError(f"unknown error code {code!r}; pass status=")
        self.status = status or ERROR_STATUS[code]
        super().__init__(self.status, log_message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        #: extra members of the JSON body beside ``error`` and ``message``
        #: (``reason``, ``retry_after``, ``documents``...): never a secret
        self.fields = dict(fields or {})

    @property
    def detail(self) -> str | None:
        """The log-only message, if any."""
        return self.get_message()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail or self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.fields}


def invalid_request(message: str) -> GatewayError:
    return GatewayError("invalid_request", message)


#: Why a request's credential opened no session: the ``reason`` of every
#: 401 ``unauthenticated``, with the message a client gets by default and
#: the ``error_description`` of its ``WWW-Authenticate`` challenge.
UNAUTHENTICATED_REASONS: dict[str, tuple[str, str]] = {
    "missing": ("a valid session is required", ""),
    "expired": ("the session has expired; log in again", "the session has expired"),
    "revoked": ("the session was ended (signed out, possibly on another device); log in again",
                "the session was revoked"),
    "superseded": ("this token was already refreshed; use the newer token, or log in again",
                   "the token was replaced by a newer one"),
    "invalid": ("the token is not valid; log in", "the token is not valid"),
}


def unauthenticated(message: str | None = None, *, reason: str = "invalid") -> GatewayError:
    """401 ``unauthenticated`` with its ``reason`` (a key of
    :data:`UNAUTHENTICATED_REASONS`) in the body and an RFC 6750 challenge:
    ``Bearer realm="gateway"`` alone when no credential was presented
    (``missing``), with ``error="invalid_token"`` and a description otherwise."""
    if reason not in UNAUTHENTICATED_REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    default, description = UNAUTHENTICATED_REASONS[reason]
    challenge = 'Bearer realm="gateway"'
    if reason != "missing":
        challenge += f', error="invalid_token", error_description="{description}"'
    return GatewayError("unauthenticated", message or default, headers={"WWW-Authenticate": challenge},
                        fields={"reason": reason})


def invalid_credentials(message: str = "the credentials are not valid") -> GatewayError:
    return GatewayError(
        "invalid_credentials", message, headers={"WWW-Authenticate": 'Bearer realm="gateway"'}
    )


def not_found(message: str = "no such resource") -> GatewayError:
    return GatewayError("not_found", message)


def too_many(code: str, message: str, retry_after: float) -> GatewayError:
    """A 429 whose ``Retry-After`` header and ``retry_after`` body member
    give the same whole seconds (at least 1)."""
    seconds = max(1, int(retry_after + 0.999))
    return GatewayError(code, message, headers={"Retry-After": str(seconds)}, fields={"retry_after": seconds})


class StoreUnavailable(GatewayError):
    """A backing store (Redis, MongoDB, SQLite) could not be reached or failed."""

    def __init__(self, what: str, log_message: str | None = None) -> None:
        super().__init__(
            "unavailable",
            f"the {what} is unavailable, try again shortly",
            headers={"Retry-After": "1"},
            log_message=log_message,
        )
        #: which store: "session store", "profile store"... (the ``store`` label of its metric)
        self.store = what


class Conflict(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__("conflict", message)


def error_body_for_status(status: int, message: str | None = None) -> dict[str, str]:
    """Body for an error we only know by its status (Tornado's own 404/405/...)."""
    code = STATUS_CODE.get(status, "internal" if status >= 500 else "invalid_request")
    if message is None:
        try:
            message = HTTPStatus(status).phrase.lower()
        except ValueError:
            message = "error"
    return {"error": code, "message": message}
