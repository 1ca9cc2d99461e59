"""The gate in front of every ``/twilio/*`` route: did this request come from Twilio?

Every Twilio route (voice, status, messaging, the media upgrade, the transfer callbacks) asks
one :class:`TwilioGuard`, which applies :func:`telephony.signatures.check_twilio_request`:

* with ``TWILIO_AUTH_TOKEN`` the ``X-Twilio-Signature`` must match the public URL (rebuilt from
  ``PUBLIC_BASE_URL``, never from forwarded headers);
* without a token, requests are refused with 403 unless the server listens on loopback only or
  ``CLOSELOOP_ALLOW_UNSIGNED_TWILIO=true`` was set (``server.py`` decides ``allow_unsigned``).

Refusals are logged with identifiers only (path, CallSid/MessageSid), never phone numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse

from telephony.signatures import Verdict, check_twilio_request, public_url, ws_url

log = logging.getLogger(__name__)

_MESSAGES = {
    "bad_signature": "X-Twilio-Signature is missing or does not match PUBLIC_BASE_URL and TWILIO_AUTH_TOKEN",
    "no_auth_token": "TWILIO_AUTH_TOKEN is not set, so Twilio requests cannot be verified and are refused on a "
    "public listen address: set TWILIO_AUTH_TOKEN (or CLOSELOOP_ALLOW_UNSIGNED_TWILIO=true on a trusted network)",
}
_IDS = ("CallSid", "MessageSid", "ConferenceSid")


@dataclass(frozen=True)
class TwilioGuard:
    """Checks Twilio requests for every Twilio route of one app.

    Attributes:
        auth_token: the account Auth Token; None/empty when not configured.
        public_base_url: the URL Twilio reaches this server at (``PUBLIC_BASE_URL``).
        allow_unsigned: accept requests without a signature when no token is configured (a
            loopback listen host, or the explicit opt-in). Ignored when a token is set.
        on_rejected: called with a short reason for each refusal (a metric).
    """

    auth_token: str | None
    public_base_url: str | None
    allow_unsigned: bool
    on_rejected: Callable[[str], None] = lambda reason: None

    @property
    def accepts_unsigned(self) -> bool:
        """True when requests without a valid signature get through (no token, opted in)."""
        return not self.auth_token and self.allow_unsigned

    def _base(self, request: Request | WebSocket) -> str:
        if self.public_base_url:
            return self.public_base_url
        return f"{request.url.scheme.replace('ws', 'http')}://{request.url.netloc}"

    def _refuse(self, verdict: Verdict, path: str, ids: dict[str, str], *, websocket: bool) -> None:
        self.on_rejected(verdict + ("_ws" if websocket else ""))
        log.warning(
            "refused a Twilio request: %s",
            "TWILIO_AUTH_TOKEN is not set on a public listen address"
            if verdict == "no_auth_token"
            else "missing or wrong X-Twilio-Signature",
            extra={"reason": verdict, "path": path, **ids},
        )

    async def signed_form(self, request: Request) -> tuple[dict[str, str], JSONResponse | None]:
        """The POST form of a webhook, and a 403 response to return when it must be refused."""
        form = await request.form()
        params = {k: str(v) for k, v in form.multi_items()}
        url = (
            public_url(self.public_base_url, request.url.path, request.url.query)
            if self.public_base_url
            else str(request.url)
        )
        verdict = check_twilio_request(
            auth_token=self.auth_token,
            allow_unsigned=self.allow_unsigned,
            url=url,
            params=params,
            signature=request.headers.get("X-Twilio-Signature"),
        )
        if verdict in ("ok", "unsigned_allowed"):
            return params, None
        ids = {k.lower(): params[k] for k in _IDS if params.get(k)}
        self._refuse(verdict, request.url.path, ids, websocket=False)
        return params, JSONResponse(
            {"error": {"code": verdict, "message": _MESSAGES[verdict]}}, status_code=403
        )

    def websocket_allowed(self, ws: WebSocket) -> bool:
        """Check a WebSocket upgrade (signed over the ``wss://`` URL); False: close it with 1008."""
        verdict = check_twilio_request(
            auth_token=self.auth_token,
            allow_unsigned=self.allow_unsigned,
            url=ws_url(self._base(ws), ws.url.path),
            params={},
            signature=ws.headers.get("X-Twilio-Signature"),
        )
        if verdict in ("ok", "unsigned_allowed"):
            return True
        self._refuse(verdict, ws.url.path, {}, websocket=True)
        return False
