"""One-time verification codes on PostgreSQL (implements :class:`pipeline.ports.VerificationCodes`).

Codes are stored as salted HMACs, never in clear; each has an expiry and an attempt counter that
is increased atomically before the comparison, so parallel guesses cannot get more than
``CODE_ATTEMPTS`` tries. Issuing is rate limited per conversation, per customer and per client
address over a sliding window, and an unknown contact counts exactly like a known one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from pipeline.identity import CODE_ATTEMPTS, CODE_TTL, CodeCheck, CodeIssue, code_matches, hash_code, new_code


@dataclass(frozen=True)
class CodeLimits:
    """How many codes may be issued in ``window``: per conversation, customer, client address.

    The app takes the customer and client limits from settings (``CLOSELOOP_CODE_LIMIT_PER_CUSTOMER_HOUR``,
    ``CLOSELOOP_CODE_LIMIT_PER_CLIENT_HOUR``); the defaults here are theirs."""

    per_conversation: int = 5
    per_customer: int = 5
    per_client: int = 10
    window: timedelta = timedelta(hours=1)


class PgVerificationCodes:
    def __init__(self, pool: asyncpg.Pool, limits: CodeLimits | None = None) -> None:
        self._pool = pool
        self.limits = limits or CodeLimits()

    async def issue(
        self,
        *,
        conversation_id: int,
        customer_ref: str | None,
        client: str | None,
        channel: str | None,
        now: datetime,
    ) -> CodeIssue:
        lim = self.limits
        since = now - lim.window
        async with self._pool.acquire() as conn, conn.transaction():
            # One issuer at a time per conversation, so two parallel requests cannot both pass the count.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('otp'), $1::int)", conversation_id % 2**31
            )
            counts = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE conversation_id = $1) AS conv,
                          count(*) FILTER (WHERE $2::text IS NOT NULL AND customer_ref = $2) AS cust,
                          count(*) FILTER (WHERE $3::text IS NOT NULL AND client = $3) AS client
                     FROM verification_codes
                    WHERE created_at > $4 AND (conversation_id = $1 OR customer_ref = $2 OR client = $3)""",
                conversation_id,
                customer_ref,
                client,
                since,
            )
            if (
                counts["conv"] >= lim.per_conversation
                or counts["cust"] >= lim.per_customer
                or counts["client"] >= lim.per_client
            ):
                return CodeIssue("rate_limited")
            await conn.execute(
                "UPDATE verification_codes SET used_at = $2 WHERE conversation_id = $1 AND used_at IS NULL",
                conversation_id,
                now,
            )
            code, salt = new_code(), secrets.token_hex(16)
            await conn.execute(
                """INSERT INTO verification_codes
                       (conversation_id, customer_ref, client, channel, salt, code_hash, expires_at, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                conversation_id,
                customer_ref,
                client,
                channel,
                salt,
                # An unknown contact gets a row like any other (it counts for the limits) whose
                # hash matches nothing anybody was told.
                hash_code(code if customer_ref else secrets.token_hex(16), salt),
                now + CODE_TTL,
                now,
            )
        if customer_ref is None:
            return CodeIssue("sent")
        return CodeIssue("sent", code=code, channel=channel)

    async def check(self, *, conversation_id: int, code: str, now: datetime) -> CodeCheck:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE verification_codes SET attempts = attempts + 1
                    WHERE id = (SELECT id FROM verification_codes
                                 WHERE conversation_id = $1 AND used_at IS NULL
                                 ORDER BY id DESC LIMIT 1)
                      AND attempts < $2 AND expires_at > $3
                RETURNING *""",
                conversation_id,
                CODE_ATTEMPTS,
                now,
            )
            if row is None:
                latest = await conn.fetchrow(
                    """SELECT attempts, expires_at, used_at FROM verification_codes
                        WHERE conversation_id = $1 ORDER BY id DESC LIMIT 1""",
                    conversation_id,
                )
                if latest is None:
                    return CodeCheck("none")
                if latest["used_at"] is None and latest["attempts"] >= CODE_ATTEMPTS:
                    return CodeCheck("locked")
                return CodeCheck("expired")
            left = CODE_ATTEMPTS - row["attempts"]
            if row["customer_ref"] and code_matches(code, row["salt"], row["code_hash"]):
                await conn.execute("UPDATE verification_codes SET used_at = $2 WHERE id = $1", row["id"], now)
                return CodeCheck("ok", customer_ref=row["customer_ref"], attempts_left=left)
            return CodeCheck("locked" if left <= 0 else "wrong", attempts_left=left)


async def local_outbox(pool: asyncpg.Pool, *, limit: int = 20) -> list[dict[str, Any]]:
    """The latest verification texts that no provider delivered (the embedded demo has no SMS
    provider): what an admin reads to pass a code on. Delivered codes are blanked after sending."""
    rows = await pool.fetch(
        """SELECT id, conversation_id, channel, address, body, status, provider_ref, created_at FROM outbox
            WHERE kind = 'verification_code' AND (provider_ref IS NULL OR provider_ref = 'local-only')
            ORDER BY id DESC LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]
