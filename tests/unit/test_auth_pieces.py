"""The pure pieces of access control: password hashes, secret hashing, CSRF comparison, session
expiry, where people are sent after signing in."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import PasswordHasher

from crm_bridge.users import (
    API_TOKEN_PREFIX,
    Passwords,
    WeakPassword,
    check_password_strength,
    check_phone,
    check_role,
    csrf_matches,
    hash_secret,
    new_api_token,
    new_csrf_token,
    new_session_token,
    normalize_email,
    session_is_live,
)
from pipeline.clock import FakeClock
from web.auth import DEFAULT_NEXT, LoginRequired, safe_next

# Cheap argon2id parameters keep the unit tests fast; the product uses argon2-cffi's defaults.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def test_passwords_are_hashed_with_argon2id_and_verified() -> None:
    passwords = Passwords(FAST)
    stored = passwords.hash("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert "correct horse" not in stored
    assert passwords.verify(stored, "correct horse battery") == (True, None)
    assert passwords.verify(stored, "correct horse batterY") == (False, None)


def test_the_same_password_hashes_differently_each_time() -> None:
    passwords = Passwords(FAST)
    assert passwords.hash("correct horse battery") != passwords.hash("correct horse battery")


def test_a_hash_made_with_older_parameters_is_replaced_on_a_successful_check() -> None:
    old = Passwords(FAST).hash("correct horse battery")
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1))
    ok, new_hash = stronger.verify(old, "correct horse battery")
    assert ok and new_hash is not None and new_hash != old
    assert "t=2" in new_hash and "m=2048" in new_hash
    assert stronger.verify(new_hash, "correct horse battery") == (True, None)
    assert stronger.verify(old, "wrong password!!") == (False, None)


def test_a_corrupt_stored_hash_never_verifies() -> None:
    passwords = Passwords(FAST)
    assert passwords.verify("not-a-hash", "correct horse battery") == (False, None)
    assert passwords.verify("", "correct horse battery") == (False, None)


def test_unknown_emails_cost_a_verification_too() -> None:
    Passwords(FAST).waste_time("anything at all")  # must not raise, whatever the password


@pytest.mark.parametrize("password", ["", "short", "123456789", " " * 12])
def test_weak_passwords_are_refused_with_a_message_that_says_what_to_do(password: str) -> None:
    with pytest.raises(WeakPassword) as raised:
        Passwords(FAST).hash(password)
    assert "password" in str(raised.value)
    if password.strip():
        assert "at least 10 characters" in str(raised.value)


def test_ten_characters_are_enough() -> None:
    check_password_strength("abcdefghij")


def test_secrets_are_stored_as_their_sha256() -> None:
    token = new_session_token()
    assert hash_secret(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token not in hash_secret(token)


def test_tokens_are_random_and_long() -> None:
    sessions = {new_session_token() for _ in range(50)}
    assert len(sessions) == 50
    assert all(len(t) >= 43 for t in sessions)  # 32 random bytes, base64url
    api = new_api_token()
    assert api.startswith(API_TOKEN_PREFIX) and len(api) >= len(API_TOKEN_PREFIX) + 43
    assert new_csrf_token() != new_csrf_token()


def test_csrf_tokens_must_match_exactly() -> None:
    expected = new_csrf_token()
    assert csrf_matches(expected, expected)
    assert not csrf_matches(expected, None)
    assert not csrf_matches(expected, "")
    assert not csrf_matches(expected, expected[:-1])
    assert not csrf_matches(expected, expected + "x")
    assert not csrf_matches(expected, new_csrf_token())
    assert not csrf_matches("", "")
    assert not csrf_matches(expected, "é" * 10)  # non-ASCII input is refused, not an error


def test_sessions_expire_when_idle_and_at_their_absolute_end() -> None:
    clock = FakeClock(datetime(2025, 3, 1, 9, 0, tzinfo=UTC))
    idle = timedelta(minutes=30)
    created = clock.now()
    expires = created + timedelta(hours=12)

    def live(last_seen: datetime) -> bool:
        return session_is_live(expires_at=expires, last_seen_at=last_seen, now=clock.now(), idle=idle)

    clock.advance(timedelta(minutes=29))
    assert live(created)
    clock.advance(timedelta(minutes=1))
    assert not live(created)  # 30 minutes without a request
    last_seen = clock.now() - timedelta(minutes=5)
    assert live(last_seen)
    clock.set(expires - timedelta(seconds=1))
    assert live(clock.now())
    clock.set(expires)
    assert not live(clock.now())  # used a second ago, but the session's 12 hours are over


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/docs", "/docs"),
        ("/api/tickets?status=open", "/api/tickets?status=open"),
        (None, DEFAULT_NEXT),
        ("", DEFAULT_NEXT),
        ("https://evil.example/", DEFAULT_NEXT),
        ("//evil.example/x", DEFAULT_NEXT),
        ("/\\evil.example", DEFAULT_NEXT),
        ("/ok\r\nSet-Cookie: x=1", DEFAULT_NEXT),
        ("javascript:alert(1)", DEFAULT_NEXT),
    ],
)
def test_after_sign_in_people_are_only_sent_to_pages_of_this_site(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_the_login_redirect_keeps_the_page_and_its_query() -> None:
    assert LoginRequired("/docs?x=1&y=2").login_url == "/login?next=/docs%3Fx%3D1%26y%3D2"


def test_user_fields_are_checked() -> None:
    assert normalize_email("  Ada@Example.com ") == "Ada@Example.com"
    with pytest.raises(ValueError, match="not an email"):
        normalize_email("ada.example.com")
    assert check_role("supervisor") == "supervisor"
    with pytest.raises(ValueError, match="agent, supervisor, admin"):
        check_role("root")
    assert check_phone("+1 (555) 010-0001") == "+15550100001"
    assert check_phone(None) is None
    with pytest.raises(ValueError, match="international form"):
        check_phone("555-0100")
