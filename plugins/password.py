"""Username/password provider: argon2id hashes, lockout, registration, change.

Endpoints (under ``auth_prefix``):

- ``POST /password/login``    ``{"username", "password"}`` -> 200, a session
- ``POST /password/register`` ``{"username", "password"}`` -> 201, a session
- ``POST /password/change``   ``{"old_password", "new_password"}`` -> 204,
  every other session of the user revoked

Usernames are normalised with NFKC and casefolded.  A login for an unknown
user verifies against a dummy hash, so it costs as much as a wrong password.
Failures are counted in the session store (so the lockout holds across
processes) per username and client address: after ``max_failures`` from one
client within ``lockout_window`` that client gets 429 ``locked_out`` with
``Retry-After`` for the username, and only ``max_failures_per_username``
from all clients together lock the username for everyone, so no single
client can lock someone else out.  A login turned away because the hashing
threads are busy (429 ``rate_limited``) is not an attempt and counts nowhere.
An operator lifts a username's lockouts with :meth:`PasswordProvider.unlock`:
the username-wide counter is cleared, and an unlock time is kept for
``lockout_window`` so that each client's counter started before it is
cleared at that client's next attempt (read only when the counter says
locked: no cost on other logins).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import Type

from gateway import hookimpl
from gateway.api import (
    BOOL,
    INT,
    LOGIN_ANSWER,
    POSITIVE_DURATION,
    ConfigContext,
    Conflict,
    Endpoint,
    GatewayError,
    LoginResult,
    Option,
    Provider,
    Request,
    Section,
    at_least,
    invalid_credentials,
    invalid_request,
    too_many,
    client_key,
)

T = TypeVar("T")
MAX_PASSWORD = 1024
MAX_USERNAME = 150


def normalise_username(raw: str) -> str:
    name = unicodedata.normalize("NFKC", raw).casefold().strip()
    if not name:
        raise invalid_request("field username must not be empty")
    if len(name) > MAX_USERNAME:
        raise invalid_request(f"field username is longer than {MAX_USERNAME} characters")
    if any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name):
        raise invalid_request("field username contains control or separator characters")
    return name


#: a username in a request body: the schema holds what is checked before NFKC
#: normalisation, casefolding and stripping, the description what is checked after
USERNAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 4 * MAX_USERNAME,
                   "description": f"at most {MAX_USERNAME} characters once NFKC-normalised, casefolded and "
                                  "stripped; no control, format or separator characters but spaces"}


def _password_schema(min_length: int, max_length: int = MAX_PASSWORD) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


class PasswordProvider(Provider):
    name = "password"
    login_schema = {"type": "object", "required": ["username", "password"],
                    "properties": {"username": USERNAME_SCHEMA, "password": _password_schema(1)}}
    options = [
        Option("allow_registration", BOOL, True, "allow POST /password/register"),
        Option("min_length", at_least(INT, 1), 8, "shortest password accepted (the longest is 1024)"),
        Option("max_failures", at_least(INT, 1), 5, "failed logins for a username from one client address within lockout_window before that client gets 429 locked_out"),
        Option("max_failures_per_username", at_least(INT, 1), 100, "failed logins for a username from all clients together within lockout_window before everyone gets 429 locked_out"),
        Option("lockout_window", POSITIVE_DURATION, "15m", "window in which failures are counted"),
        Option("time_cost", at_least(INT, 1), 3, "argon2id iterations"),
        Option("memory_cost", at_least(INT, 8), 65536, "argon2id memory in KiB"),
        Option("parallelism", at_least(INT, 1), 4, "argon2id lanes"),
        Option("hash_threads", at_least(INT, 1), 2, "threads that hash passwords (kept apart from other work)"),
        Option("max_pending_hashes", at_least(INT, 1), 64, "hash jobs (logins, registrations, changes) running or queued before 429 rate_limited"),
    ]

    @classmethod
    def check_config(cls, settings: Section, context: ConfigContext) -> list[str]:
        problems = []
        if settings.memory_cost < 8 * settings.parallelism:
            problems.append("providers.password.memory_cost: argon2 needs at least 8 KiB per lane "
                            f"(8 x parallelism = {8 * settings.parallelism})")
        if settings.min_length > MAX_PASSWORD:
            problems.append(f"providers.password.min_length: at most {MAX_PASSWORD}, the longest password accepted")
        return problems

    def __init__(self, gateway: Any, settings: Section) -> None:
        super().__init__(gateway, settings)
        self.hasher = PasswordHasher(
            time_cost=settings.time_cost, memory_cost=settings.memory_cost,
            parallelism=settings.parallelism, type=Type.ID,
        )
        self._dummy_hash = ""
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0

    async def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self.settings.hash_threads, thread_name_prefix="argon2")
        self._dummy_hash = await self._hash(secrets.token_urlsafe(16))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- hashing off the event loop, on threads of its own -------------------------

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of ``max_pending_hashes`` places, or 429 ``rate_limited``
        (taken before anything is counted toward a lockout)."""
        if self._pending >= self.settings.max_pending_hashes:
            raise too_many("rate_limited", "too many logins are in progress; try again shortly", 1)
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the hashing threads; a flood of logins waits there
        (bounded by :meth:`_slot`), never in the loop's default pool that DNS
        lookups use."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        with self._slot():
            return await self._run(fn, *args)

    async def _hash(self, password: str) -> str:
        return await self._in_pool(self.hasher.hash, password)

    async def _verify(self, hashed: str, password: str) -> bool:
        """Verify on the hashing threads; the caller holds a :meth:`_slot`."""
        def verify() -> bool:
            try:
                return self.hasher.verify(hashed, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await self._run(verify)

    def check_password(self, password: str, field: str) -> None:
        if len(password) < self.settings.min_length:
            raise invalid_request(f"field {field} must be at least {self.settings.min_length} characters")
        if len(password) > MAX_PASSWORD:
            raise invalid_request(f"field {field} must be at most {MAX_PASSWORD} characters")

    # -- lockout ------------------------------------------------------------------

    def _counter(self, username: str) -> str:
        """The username-wide counter (failures from all clients together)."""
        return "pwfail:" + hashlib.sha256(username.encode()).hexdigest()[:32]

    def _client_counter(self, username: str, ip: str) -> str:
        """The counter of one client's failures for a username."""
        return "pwfail-client:" + hashlib.sha256(f"{username}\0{client_key(ip)}".encode()).hexdigest()[:32]

    def _unlock_key(self, username: str) -> str:
        """The shared value holding when an operator last unlocked the username."""
        return "pwunlock:" + hashlib.sha256(username.encode()).hexdigest()[:32]

    async def unlock(self, subject: str) -> bool:
        """Lift the lockouts of a username: the username-wide counter now,
        every client's at its next attempt (see the module docstring)."""
        username = normalise_username(subject)
        store, window = self.gateway.state, self.settings.lockout_window
        await store.set_value(self._unlock_key(username), repr(time.time()), window)
        await store.clear(self._counter(username))
        return True

    async def _unlocked_since_counted(self, username: str, left: float) -> bool:
        """Whether an unlock came after the start of a client counter's
        window (``left``: the seconds that window still runs)."""
        raw = await self.gateway.state.get_value(self._unlock_key(username))
        try:
            unlocked = float(raw) if raw else 0.0
        except ValueError:
            return False
        return bool(unlocked >= time.time() + left - self.settings.lockout_window)

    async def _count_attempt(self, username: str, ip: str) -> None:
        """Count this attempt *before* verifying (atomic increments), so
        concurrent guesses cannot all pass a check made before any of them
        failed; a success clears the counts again.  An attempt this client is
        already locked out of stops at its own counter: it never counts toward
        the username-wide lock, so one client cannot lock the username for all."""
        store, window = self.gateway.state, self.settings.lockout_window
        count, left = await store.hit(self._client_counter(username, ip), window)
        if count > self.settings.max_failures and await self._unlocked_since_counted(username, left):
            await store.clear(self._client_counter(username, ip))  # counted before an operator's unlock
            count, left = await store.hit(self._client_counter(username, ip), window)
        if count > self.settings.max_failures:
            raise too_many("locked_out", "too many failed attempts for this username; try again later", left)
        count, left = await store.hit(self._counter(username), window)
        if count > self.settings.max_failures_per_username:
            raise too_many("locked_out", "too many failed attempts for this username; try again later", left)

    async def _failed(self, username: str) -> GatewayError:
        return invalid_credentials("the username or password is not correct")

    async def verify_credentials(self, username: str, password: str, ip: str = "") -> str:
        """The user id for these credentials, or a 401/429 error.  ``ip`` is
        the client's address (``request.client_ip``), for the lockout."""
        with self._slot():  # a login refused as busy is not counted as an attempt
            await self._count_attempt(username, ip)
            identity = await self.gateway.profiles.get_identity(self.name, username)
            hashed = identity.data.get("hash", "") if identity else ""
            ok = await self._verify(hashed or self._dummy_hash, password)
            stale = bool(hashed) and self.hasher.check_needs_rehash(hashed)
            if not (identity and hashed and ok):
                if stale:
                    # A hash made with older (cheaper) parameters answered faster
                    # than the dummy would: spend the difference, or the timing
                    # would tell existing accounts from unknown names.
                    await self._verify(self._dummy_hash, password)
                raise await self._failed(username)
            await self.gateway.state.clear(self._client_counter(username, ip))
            await self.gateway.state.clear(self._counter(username))
            if stale:
                try:
                    await self.gateway.profiles.update_identity_data(
                        self.name, username, {"hash": await self._run(self.hasher.hash, password)})
                except GatewayError as exc:  # the login stands; the rehash waits for the next one
                    self.log.warning("password rehash for a user failed: %s", exc.detail or exc.message)
        return identity.user_id

    # -- endpoints ------------------------------------------------------------------

    def _credentials(self, request: Request, body: dict[str, Any]) -> tuple[str, str]:
        username = normalise_username(request.field(body, "username", str, max_length=4 * MAX_USERNAME))
        password = request.field(body, "password", str, max_length=4 * MAX_PASSWORD)
        if len(password) > MAX_PASSWORD:
            raise invalid_request(f"field password must be at most {MAX_PASSWORD} characters")
        return username, password

    async def login(self, request: Request, body: dict[str, Any]) -> LoginResult:
        username, password = self._credentials(request, body)
        user_id = await self.verify_credentials(username, password, request.client_ip)
        user = await self.gateway.profiles.get_user(user_id)
        if user is None:
            raise GatewayError("internal", "an internal error occurred",
                               log_message=f"password identity points at missing user {user_id}")
        return LoginResult(user=user)

    async def register(self, request: Request) -> LoginResult:
        """``POST /password/register``: 201 and a session for a new user."""
        body = request.json_body()
        if not self.settings.allow_registration:
            raise GatewayError("forbidden", "registration is disabled")
        username, password = self._credentials(request, body)
        self.check_password(password, "password")
        hashed = await self._hash(password)
        try:
            user, _ = await self.gateway.profiles.create_identity(
                self.name, username, profile={"username": username}, data={"hash": hashed})
        except Conflict:
            # Registering again with the same password (a client retrying
            # after a lost answer) logs in (200); anything else is "taken".
            # The attempt counts toward the lockout like a login.
            try:
                return await self.login(request, body)
            except GatewayError as exc:
                if exc.code == "invalid_credentials":
                    raise Conflict("that username is already taken") from None
                raise
        return LoginResult(user=user, created=True)

    async def change(self, request: Request) -> None:
        """``POST /password/change``: 204, every other session revoked."""
        # session management: a token /refresh already replaced is not enough
        principal = await request.require_session(allow_superseded=False)
        body = request.json_body()
        old = request.field(body, "old_password", str, max_length=4 * MAX_PASSWORD)
        new = request.field(body, "new_password", str, max_length=4 * MAX_PASSWORD)
        self.check_password(new, "new_password")
        links = [i for i in await self.gateway.profiles.list_identities(principal.user_id) if i.provider == self.name]
        if not links:
            raise GatewayError("forbidden", "this account has no password")
        username = links[0].subject
        await self.verify_credentials(username, old, request.client_ip)
        # Other sessions go first: should the store then fail, no session
        # opened with the old password survives a change the user asked for.
        ended = await self.gateway.sessions.revoke_user(principal.user_id, "password_changed",
                                                        keep=principal.session_id)
        await self.gateway.profiles.update_identity_data(self.name, username, {"hash": await self._hash(new)})
        self.gateway.audit("password_changed", provider=self.name, user_id=principal.user_id,
                           session_id=principal.session_id, sessions_ended=len(ended))

    def endpoints(self) -> list[Endpoint]:
        new_password = _password_schema(self.settings.min_length)
        return [
            Endpoint("register", self.register, summary="Register a username and password, and log in",
                     request_schema={"type": "object", "required": ["username", "password"],
                                     "properties": {"username": USERNAME_SCHEMA, "password": new_password}},
                     response_schema=LOGIN_ANSWER),
            Endpoint("change", self.change, status=204, requires_session=True,
                     summary="Change the password; every other session of the user ends",
                     request_schema={"type": "object", "required": ["old_password", "new_password"],
                                     "properties": {"old_password": _password_schema(1, 4 * MAX_PASSWORD),
                                                    "new_password": new_password}}),
        ]


@hookimpl
def gateway_providers() -> list[type[Provider]]:
    return [PasswordProvider]
