"""Per-call media stream tokens: who may open ``WS /twilio/media`` for a call, checked without I/O.

The signed ``POST /twilio/voice`` answers ``<Connect><Stream>`` with a ``<Parameter name="token">``:
``<expiry>.<mac>`` where ``mac`` is HMAC-SHA256 (key: ``CLOSELOOP_SECRET_KEY``) over the CallSid
and the expiry (Unix seconds). The stream's ``start`` frame brings it back in
``customParameters``; :meth:`StreamTokens.verify` checks the MAC, the expiry and that it was
issued for ``start.callSid``. Single use is enforced by the call row
(:meth:`crm_bridge.calls.CallStore.claim_stream`), not here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from typing import Literal

Refusal = Literal["token_missing", "token_malformed", "token_forged", "token_expired"]


class StreamTokens:
    """Issues and verifies stream tokens.

    Args:
        key: the server secret (at least 16 bytes).
        now: seconds since the epoch (the app's clock), read at issue and verify time.
        ttl_s: how long after ``POST /twilio/voice`` the stream may start.
    """

    def __init__(self, key: bytes, now: Callable[[], float], *, ttl_s: float = 60.0) -> None:
        if len(key) < 16:
            raise ValueError("the stream token key must be at least 16 bytes")
        self._key = key
        self._now = now
        self.ttl_s = ttl_s

    def _mac(self, call_sid: str, expiry: int) -> str:
        digest = hmac.new(self._key, f"stream:{call_sid}:{expiry}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, call_sid: str) -> str:
        """A token for the media stream of ``call_sid``, valid for ``ttl_s``."""
        expiry = int(self._now() + self.ttl_s)
        return f"{expiry}.{self._mac(call_sid, expiry)}"

    def verify(self, token: str | None, call_sid: str) -> Refusal | None:
        """None when ``token`` was issued by this server for ``call_sid`` and has not expired;
        otherwise why it is refused."""
        if not token:
            return "token_missing"
        expiry_s, _, mac = token.partition(".")
        if not expiry_s.isdigit() or not mac or len(token) > 128:
            return "token_malformed"
        if not hmac.compare_digest(mac, self._mac(call_sid, int(expiry_s))):
            return "token_forged"
        if self._now() > int(expiry_s):
            return "token_expired"
        return None
