"""People and access: users with roles, password hashes, browser sessions, API tokens, sign-in throttle.

Secrets never reach the database in the clear: passwords are argon2id hashes, and session cookies
and API tokens are random values of which only the SHA-256 is stored, so a copy of the database
lets nobody sign in. Every store takes a ``now`` callable so expiry is testable with a fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = ("agent", "supervisor", "admin")
STAFF = ROLES  # everyone with an account
MANAGERS = ("supervisor", "admin")
ADMINS = ("admin",)
MIN_PASSWORD_LENGTH = 10
API_TOKEN_PREFIX = "clk_"
# last_seen_at / last_used_at are written at most this often per secret, not on every request.
TOUCH_EVERY = timedelta(seconds=60)
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_USER_COLUMNS = "id, email, name, role, phone, disabled"

Now = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WeakPassword(ValueError):
    """The password is too easy to guess; the message says what is needed."""


class UserExists(ValueError):
    """Another user already has this email."""


class LastAdmin(ValueError):
    """The change would leave no enabled admin, and so nobody to manage people."""


_KEEP: Any = object()  # "leave this field as it is" in UserStore.update


@dataclass(frozen=True)
class User:
    id: int
    email: str
    name: str
    role: str
    phone: str | None = None
    disabled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ApiToken:
    """What is known about an API token (never the token itself)."""

    id: int
    user_id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "user_id": self.user_id,
            "name": self.name,
            "created_at": iso(self.created_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
        }


def _user(row: Any) -> User:
    return User(row["id"], row["email"], row["name"], row["role"], row["phone"], row["disabled"])


# ---- pure pieces ------------------------------------------------------------------------------------
def hash_secret(secret: str) -> str:
    """The SHA-256 (hex) under which a session cookie or API token is stored.

    A plain hash is enough here (unlike passwords): the secrets are 256 random bits.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_password() -> str:
    """A random password for a new account or a reset (16 URL-safe characters, 96 bits)."""
    return secrets.token_urlsafe(12)


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the one the request carried."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def check_password_strength(password: str) -> None:
    """Refuse passwords shorter than :data:`MIN_PASSWORD_LENGTH` characters."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(
            f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters "
            "(a few random words make a strong one)"
        )
    if not password.strip():
        raise WeakPassword("the password cannot be only spaces")


def session_is_live(*, expires_at: datetime, last_seen_at: datetime, now: datetime, idle: timedelta) -> bool:
    """A session lives until its absolute expiry, and only while used at least every ``idle``."""
    return now < expires_at and now < last_seen_at + idle


def normalize_email(email: str) -> str:
    email = email.strip()
    if not _EMAIL.match(email) or len(email) > 320:
        raise ValueError(f"{email!r} is not an email address")
    return email


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def check_phone(phone: str | None) -> str | None:
    if phone is None or phone == "":
        return None
    compact = re.sub(r"[\s().-]", "", phone)
    if not _E164.match(compact):
        raise ValueError(f"{phone!r} is not a phone number in international form, e.g. +15550100001")
    return compact


class Passwords:
    """argon2id password hashes (argon2-cffi's ``PasswordHasher``, RFC 9106 parameters by default).

    ``on_check`` is called for every verification (the expensive step a sign-in throttle must
    bound), e.g. to count them in a metric.
    """

    def __init__(
        self, hasher: PasswordHasher | None = None, *, on_check: Callable[[], None] | None = None
    ) -> None:
        self._hasher = hasher or PasswordHasher()
        self._dummy: str | None = None
        self._on_check = on_check

    def hash(self, password: str) -> str:
        check_password_strength(password)
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> tuple[bool, str | None]:
        """``(matches, new_hash)``; ``new_hash`` is set when the stored hash used old parameters."""
        if self._on_check is not None:
            self._on_check()
        try:
            self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, None
        if self._hasher.check_needs_rehash(stored_hash):
            return True, self._hasher.hash(password)
        return True, None

    def waste_time(self, password: str) -> None:
        """Spend what a real verification costs, so unknown emails answer no faster than known ones."""
        if self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
        self.verify(self._dummy, password)


# ---- stores --------------------------------------------------------------------------------------------
class UserStore:
    """Users in PostgreSQL (table ``users``); emails are unique regardless of case."""

    def __init__(self, pool: asyncpg.Pool, *, passwords: Passwords | None = None, now: Now = _utcnow) -> None:
        self._pool = pool
        self._passwords = passwords or Passwords()
        self._now = now

    async def create_user(
        self, email: str, name: str, role: str, password: str, *, phone: str | None = None
    ) -> User:
        email = normalize_email(email)
        name = name.strip()
        if not name:
            raise ValueError("a user needs a name")
        check_role(role)
        phone = check_phone(phone)
        password_hash = await asyncio.to_thread(self._passwords.hash, password)
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO users (email, name, role, password_hash, phone, created_at) VALUES ($1, $2, $3, $4, $5, $6)"
                f" RETURNING {_USER_COLUMNS}",
                email,
                name,
                role,
                password_hash,
                phone,
                self._now(),
            )
        except asyncpg.UniqueViolationError as e:
            raise UserExists(f"a user with the email {email} already exists") from e
        return _user(row)

    async def get(self, user_id: int) -> User | None:
        row = await self._pool.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)
        return _user(row) if row else None

    async def get_by_email(self, email: str) -> User | None:
        row = await self._pool.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE lower(email) = lower($1)", email.strip()
        )
        return _user(row) if row else None

    async def list(self) -> list[User]:
        return [_user(r) for r in await self._pool.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY id")]

    async def verify_password(self, email: str, password: str) -> User | None:
        """The user when the password is right and the account enabled; else ``None``.

        Hashes made with older argon2 parameters are replaced on a successful check.
        """
        row = await self._pool.fetchrow(
            f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower($1)", email.strip()
        )
        if row is None:
            await asyncio.to_thread(self._passwords.waste_time, password)
            return None
        ok, new_hash = await asyncio.to_thread(self._passwords.verify, row["password_hash"], password)
        if not ok or row["disabled"]:
            return None
        if new_hash is not None:
            await self._pool.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1 AND password_hash = $3",
                row["id"],
                new_hash,
                row["password_hash"],
            )
        return _user(row)

    async def update(
        self,
        user_id: int,
        *,
        name: str | None = None,
        role: str | None = None,
        phone: str | None = _KEEP,
        disabled: bool | None = None,
    ) -> tuple[User, User]:
        """Change what is given (``phone=None`` removes the phone); returns ``(before, after)``.

        Disabling a user also ends their browser sessions (their API tokens stop working while
        they are disabled). Raises :class:`LookupError` for an unknown user, :class:`ValueError`
        for a bad value and :class:`LastAdmin` when no enabled admin would be left.
        """
        changes: dict[str, Any] = {}
        if name is not None:
            if not name.strip():
                raise ValueError("a user needs a name")
            changes["name"] = name.strip()
        if role is not None:
            changes["role"] = check_role(role)
        if phone is not _KEEP:
            changes["phone"] = check_phone(phone)
        if disabled is not None:
            changes["disabled"] = bool(disabled)
        async with self._pool.acquire() as conn, conn.transaction():
            # Lock the enabled admins first: two admins removing each other at once cannot both pass.
            admins = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM users WHERE role = 'admin' AND NOT disabled ORDER BY id FOR UPDATE"
                )
            ]
            row = await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE", user_id)
            if row is None:
                raise LookupError(f"no user {user_id}")
            before = _user(row)
            after = User(**{**before.to_dict(), **changes})
            if before.id in admins and (after.role != "admin" or after.disabled) and len(admins) == 1:
                raise LastAdmin(f"{before.email} is the last enabled admin: make another user admin first")
            if changes:
                assignments = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(changes))
                await conn.execute(
                    f"UPDATE users SET {assignments} WHERE id = $1", user_id, *changes.values()
                )
            if after.disabled and not before.disabled:
                await conn.execute("DELETE FROM sessions WHERE user_id = $1", user_id)
        return before, after

    async def set_password(self, user_id: int, password: str) -> None:
        """Replace the password and end every browser session of the user."""
        password_hash = await asyncio.to_thread(self._passwords.hash, password)
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash
            )
            if done == "UPDATE 0":
                raise LookupError(f"no user {user_id}")
            await conn.execute("DELETE FROM sessions WHERE user_id = $1", user_id)


class SessionStore:
    """Browser sessions (table ``sessions``): the cookie value is returned once, its hash is stored.

    A session ends ``lifetime`` after sign-in (absolute expiry) or after ``idle`` without a request,
    whichever comes first.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, lifetime: timedelta, idle: timedelta, now: Now = _utcnow
    ) -> None:
        self._pool = pool
        self.lifetime = lifetime
        self._idle = idle
        self._now = now

    async def create(self, user: User) -> tuple[str, str]:
        """A new session for ``user``: ``(cookie_token, csrf_token)``."""
        token, csrf = new_session_token(), new_csrf_token()
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            # sign-in is a good moment to forget this user's dead sessions
            await conn.execute(
                "DELETE FROM sessions WHERE user_id = $1 AND (expires_at <= $2 OR last_seen_at <= $3)",
                user.id,
                now,
                now - self._idle,
            )
            await conn.execute(
                "INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, expires_at, last_seen_at)"
                " VALUES ($1, $2, $3, $4, $5, $4)",
                hash_secret(token),
                user.id,
                csrf,
                now,
                now + self.lifetime,
            )
        return token, csrf

    async def lookup(self, token: str | None) -> tuple[User, str] | None:
        """``(user, csrf_token)`` of a live session, marking it used; ``None`` otherwise."""
        if not token:
            return None
        token_hash = hash_secret(token)
        row = await self._pool.fetchrow(
            "SELECT s.csrf_token, s.expires_at, s.last_seen_at, u.id, u.email, u.name, u.role, u.phone, u.disabled"
            " FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1",
            token_hash,
        )
        if row is None or row["disabled"]:
            return None
        now = self._now()
        if not session_is_live(
            expires_at=row["expires_at"], last_seen_at=row["last_seen_at"], now=now, idle=self._idle
        ):
            await self._pool.execute("DELETE FROM sessions WHERE token_hash = $1", token_hash)
            return None
        if now - row["last_seen_at"] >= TOUCH_EVERY:
            await self._pool.execute(
                "UPDATE sessions SET last_seen_at = $2 WHERE token_hash = $1", token_hash, now
            )
        return _user(row), row["csrf_token"]

    async def revoke(self, token: str) -> bool:
        done = await self._pool.execute("DELETE FROM sessions WHERE token_hash = $1", hash_secret(token))
        return done != "DELETE 0"


class ApiTokenStore:
    """API tokens for integrations (table ``api_tokens``): ``clk_...``, shown once, stored as a hash."""

    def __init__(self, pool: asyncpg.Pool, *, now: Now = _utcnow) -> None:
        self._pool = pool
        self._now = now

    async def create(self, user: User, name: str) -> str:
        """A new token acting as ``user``. The caller must show it now: it cannot be recovered."""
        token, _ = await self.issue(user, name)
        return token

    async def issue(self, user: User, name: str) -> tuple[str, ApiToken]:
        """Like :meth:`create`, also returning what may be listed about the token later."""
        name = name.strip()
        if not name:
            raise ValueError("an API token needs a name that says what uses it")
        if len(name) > 100:
            raise ValueError("an API token's name is at most 100 characters")
        if user.disabled:
            raise ValueError(f"user {user.email} is disabled")
        token = new_api_token()
        row = await self._pool.fetchrow(
            "INSERT INTO api_tokens (user_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)"
            " RETURNING id, user_id, name, created_at, last_used_at, revoked_at",
            user.id,
            name,
            hash_secret(token),
            self._now(),
        )
        return token, ApiToken(**dict(row))

    async def get(self, token_id: int) -> ApiToken | None:
        row = await self._pool.fetchrow(
            "SELECT id, user_id, name, created_at, last_used_at, revoked_at FROM api_tokens WHERE id = $1",
            token_id,
        )
        return ApiToken(**dict(row)) if row else None

    async def lookup(self, token: str | None) -> User | None:
        """The user a live token acts as (marking the token used), or ``None``."""
        if not token or not token.startswith(API_TOKEN_PREFIX):
            return None
        row = await self._pool.fetchrow(
            "SELECT t.id AS token_id, t.last_used_at, u.id, u.email, u.name, u.role, u.phone, u.disabled"
            " FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
            hash_secret(token),
        )
        if row is None or row["disabled"]:
            return None
        now = self._now()
        if row["last_used_at"] is None or now - row["last_used_at"] >= TOUCH_EVERY:
            await self._pool.execute(
                "UPDATE api_tokens SET last_used_at = $2 WHERE id = $1", row["token_id"], now
            )
        return _user(row)

    async def revoke(self, token: str) -> bool:
        """Revoke by the token itself. True when a live token was revoked."""
        done = await self._pool.execute(
            "UPDATE api_tokens SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL",
            hash_secret(token),
            self._now(),
        )
        return done != "UPDATE 0"

    async def revoke_id(self, token_id: int) -> bool:
        """Revoke by id (as listed by :meth:`list`). True when a live token was revoked."""
        done = await self._pool.execute(
            "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            token_id,
            self._now(),
        )
        return done != "UPDATE 0"

    async def list(self, user_id: int | None = None) -> list[ApiToken]:
        rows = await self._pool.fetch(
            "SELECT id, user_id, name, created_at, last_used_at, revoked_at FROM api_tokens"
            " WHERE $1::bigint IS NULL OR user_id = $1 ORDER BY id",
            user_id,
        )
        return [ApiToken(**dict(r)) for r in rows]


class LoginLocked(Exception):
    """A sign-in refused before the password was checked: too many failures for ``scope``
    (``"email"`` or ``"client"``, the address the attempt came from)."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"too many failed sign-ins for this {scope}")
        self.scope = scope


@dataclass(frozen=True)
class LoginAttempt:
    """A sign-in admitted by :meth:`LoginThrottle.begin`, counted already; finish it with
    :meth:`LoginThrottle.failed` or :meth:`LoginThrottle.succeeded`."""

    email_key: str
    client: str
    email_count: int
    client_count: int


# One statement takes a slot in a count, or refuses while the key is locked; the row lock makes
# parallel attempts queue up, so each sees the count the ones before it left.
_TAKE_SLOT = """
INSERT INTO {table} AS t ({key}, failures, window_start) VALUES ($1, 1, $2)
ON CONFLICT ({key}) DO UPDATE SET
  failures = CASE WHEN {fresh} THEN 1 ELSE t.failures + 1 END,
  window_start = CASE WHEN {fresh} THEN $2 ELSE t.window_start END,
  locked_until = NULL
 WHERE t.locked_until IS NULL OR t.locked_until <= $2
RETURNING failures"""
# A new window: the old one ended, or a lock ran out.
_FRESH = "(t.window_start <= $2 - $3::interval OR t.locked_until <= $2)"


class LoginThrottle:
    """Failed sign-ins per email and per client address, counted *before* the password is checked.

    :meth:`begin` takes a slot in both counts with one atomic statement each; an attempt that
    finds ``max_failures`` slots of its email (or ``max_client_failures`` of its address) already
    taken inside ``window`` is refused without a password check, so any number of parallel guesses
    costs at most that many checks. A failure that fills the count locks the email (or address)
    for ``lockout``; a success deletes the email's count and gives the address its slot back.

    Emails are counted whether or not an account has them, so the answer never tells which exist.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_failures: int = 5,
        max_client_failures: int = 50,
        window: timedelta = timedelta(minutes=15),
        lockout: timedelta = timedelta(minutes=15),
        now: Now = _utcnow,
    ) -> None:
        self._pool = pool
        self._max = max_failures
        self._max_client = max_client_failures
        self._window = window
        self.lockout = lockout
        self._now = now

    @staticmethod
    def _key(email: str) -> str:
        return email.strip().lower()[:320]

    async def begin(self, email: str, client: str) -> LoginAttempt:
        """Count an attempt of ``email`` from ``client``; raises :class:`LoginLocked` when refused."""
        now = self._now()
        key = self._key(email)
        client = client[:100]
        client_count = await self._take("login_throttle_clients", "client", client, now)
        if client_count is None or client_count > self._max_client:
            raise LoginLocked("client")
        email_count = await self._take("login_throttle", "email", key, now)
        if email_count is None or email_count > self._max:
            await self._give_back(client)  # refused before any check: costs the address nothing
            raise LoginLocked("email")
        return LoginAttempt(key, client, email_count, client_count)

    async def _take(self, table: str, column: str, key: str, now: datetime) -> int | None:
        sql = _TAKE_SLOT.format(table=table, key=column, fresh=_FRESH)
        count = await self._pool.fetchval(sql, key, now, self._window)
        return int(count) if count is not None else None

    async def _give_back(self, client: str) -> None:
        await self._pool.execute(
            "UPDATE login_throttle_clients SET failures = greatest(failures - 1, 0) WHERE client = $1", client
        )

    async def failed(self, attempt: LoginAttempt) -> datetime | None:
        """The attempt failed; returns the end of the lock when it locks the email (or address)."""
        now = self._now()
        until = now + self.lockout
        locked = False
        async with self._pool.acquire() as conn, conn.transaction():
            if attempt.email_count >= self._max:
                await conn.execute(
                    "UPDATE login_throttle SET failures = 0, window_start = $2, locked_until = $3 WHERE email = $1",
                    attempt.email_key,
                    now,
                    until,
                )
                locked = True
            if attempt.client_count >= self._max_client:
                await conn.execute(
                    "UPDATE login_throttle_clients SET failures = 0, window_start = $2, locked_until = $3"
                    " WHERE client = $1",
                    attempt.client,
                    now,
                    until,
                )
                locked = True
            if locked:  # forget stale rows (typos, old attacks) while we are here
                for table in ("login_throttle", "login_throttle_clients"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE window_start < $1 AND (locked_until IS NULL OR locked_until < $1)",
                        now - timedelta(days=1),
                    )
        return until if locked else None

    async def succeeded(self, attempt: LoginAttempt) -> None:
        await self._pool.execute("DELETE FROM login_throttle WHERE email = $1", attempt.email_key)
        await self._give_back(attempt.client)
